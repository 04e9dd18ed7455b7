#!/usr/bin/env bash
# The invsync demo, on a fresh Debian machine too: installs what is missing, builds, starts two
# local PostgreSQL clusters standing for the main data center (`maindc`) and a public-cloud
# database (`cloud_a`), fills the data center with e-invoices, writes a configuration and checks
# it. Everything lives in ./.demo/; running the script again reuses what is there.
#
#   scripts/demo.sh          run the demo (start is the default)
#   scripts/demo.sh stop     stop the demo's clusters
#
#   DEMO_INVOICES=N   invoices to fill the data center with (default 100000)
#   DEMO_SEED=S       the generator's seed (default 1)
#
# Each capability adds its own section below, before "done", so that the demo always shows
# everything invsync can do.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

DEMO_DIR="$PWD/.demo"
DEMO_INVOICES="${DEMO_INVOICES:-100000}"
DEMO_SEED="${DEMO_SEED:-1}"
CONFIG="$DEMO_DIR/invsync.toml"
INVSYNC="$PWD/target/release/invsync"
EINVOICE_GEN="$PWD/target/release/einvoice-gen"

section() { printf '\n== %s\n' "$*"; }

# Stops a `sync run` the demo left running (SIGTERM: it finishes its batch and exits 0).
stop_sync() {
  if [ -f "$DEMO_DIR/sync.pid" ]; then
    kill -TERM "$(cat "$DEMO_DIR/sync.pid")" 2>/dev/null || true
    while kill -0 "$(cat "$DEMO_DIR/sync.pid")" 2>/dev/null; do sleep 0.2; done
    rm -f "$DEMO_DIR/sync.pid"
  fi
}

case "${1:-start}" in
  start) ;;
  stop)
    ensure_postgres
    stop_sync
    cluster_stop "$DEMO_DIR/maindc"
    cluster_stop "$DEMO_DIR/cloud_a"
    cluster_stop "$DEMO_DIR/standby"
    exit 0
    ;;
  *)
    echo "usage: scripts/demo.sh [start|stop]" >&2
    exit 2
    ;;
esac

section "install what is missing"
ensure_postgres
ensure_rust_tools
ensure_age
echo "PostgreSQL: $("$PG_BINDIR/postgres" --version); age: $(age-keygen --version 2>/dev/null || echo present)"

section "build (release)"
cargo build --release --locked --bins
echo "built $INVSYNC and $EINVOICE_GEN"

section "start the data center (maindc) and the cloud database (cloud_a)"
mkdir -p "$DEMO_DIR"
MAINDC_PORT=$(cluster_start "$DEMO_DIR/maindc")
CLOUD_A_PORT=$(cluster_start "$DEMO_DIR/cloud_a")
STANDBY_PORT=$(cluster_start "$DEMO_DIR/standby")
MAINDC_URL="postgres://postgres@127.0.0.1:$MAINDC_PORT/einvoice?sslmode=disable"
CLOUD_A_URL="postgres://postgres@127.0.0.1:$CLOUD_A_PORT/einvoice?sslmode=disable"
STANDBY_URL="postgres://postgres@127.0.0.1:$STANDBY_PORT/einvoice?sslmode=disable"
export MAINDC_URL CLOUD_A_URL STANDBY_URL
echo "maindc:  $MAINDC_URL"
echo "cloud_a: $CLOUD_A_URL"
echo "standby: $STANDBY_URL   (the disaster-recovery cluster backups are restored into)"

section "fill the data center with $DEMO_INVOICES e-invoices (seed $DEMO_SEED)"
"$EINVOICE_GEN" schema --url "$MAINDC_URL" >/dev/null
filled=$(psql -X -qtA "$MAINDC_URL" -c "SELECT count(*) FROM public.invoice")
if [ "$filled" -gt 0 ]; then
  echo "maindc already holds $filled invoices; keeping them (scripts/demo.sh stop; rm -rf .demo to start over)"
else
  "$EINVOICE_GEN" fill --url "$MAINDC_URL" --invoices "$DEMO_INVOICES" --seed "$DEMO_SEED"
fi
psql -X "$MAINDC_URL" -c "SELECT invoice_number, invoice_date, invoice_time, seller_id, \
  total_amount, carrier_type, carrier_id, status FROM public.invoice ORDER BY invoice_number DESC LIMIT 3"
psql -X "$MAINDC_URL" -c "SELECT invoice_number, seq, description, quantity, amount \
  FROM public.invoice_item ORDER BY invoice_number DESC, seq LIMIT 4"

section "write the configuration $CONFIG"
# The repository's age key: the recipient goes into the config, the identity file stays here.
if [ ! -f "$DEMO_DIR/backup.key" ]; then
  age-keygen -o "$DEMO_DIR/backup.key" 2>/dev/null
  chmod 600 "$DEMO_DIR/backup.key"
fi
RECIPIENT=$(age-keygen -y "$DEMO_DIR/backup.key")
mkdir -p "$DEMO_DIR/repo"
# The URLs come from the environment, as secrets would in production.
cat >"$CONFIG" <<TOML
# Written by scripts/demo.sh. \${VAR} is replaced from the environment.
[databases.maindc]
url = "\${MAINDC_URL}"

[databases.cloud_a]
url = "\${CLOUD_A_URL}"

[databases.standby]
url = "\${STANDBY_URL}"

[pipelines.invoices_to_cloud]
source = "maindc"
targets = ["cloud_a"]
tables = ["public.invoice", "public.invoice_item", "public.allowance"]

[repositories.offsite]
url = "file://$DEMO_DIR/repo"
recipients = ["$RECIPIENT"]
identity_file = "$DEMO_DIR/backup.key"
TOML
cat "$CONFIG"

section "check the configuration: invsync config check"
"$INVSYNC" --config "$CONFIG" config check

# Later capabilities add their sections here.

section "sync: set up the pipeline invoices_to_cloud (publication, slot, target tables, initial copy)"
"$INVSYNC" --config "$CONFIG" sync setup invoices_to_cloud

section "sync: stream changes while einvoice-gen writes to the data center"
stop_sync
"$INVSYNC" --config "$CONFIG" sync run invoices_to_cloud >"$DEMO_DIR/sync.log" 2>&1 &
echo $! >"$DEMO_DIR/sync.pid"
echo "sync run started (pid $(cat "$DEMO_DIR/sync.pid"), log $DEMO_DIR/sync.log)"
"$EINVOICE_GEN" load --url "$MAINDC_URL" --rate 1000 --duration 10
"$INVSYNC" --config "$CONFIG" sync status invoices_to_cloud

section "verify: the cloud replica holds exactly the data center's rows (while sync runs)"
"$INVSYNC" --config "$CONFIG" verify db --pipeline invoices_to_cloud

section "verify: change three rows on the replica by hand; verify names each one"
psql -X -q "$CLOUD_A_URL" <<'SQL'
UPDATE public.invoice SET total_amount = total_amount + 1
 WHERE invoice_number = (SELECT min(invoice_number) FROM public.invoice);
DELETE FROM public.invoice_item
 WHERE (invoice_number, seq) = (SELECT invoice_number, seq FROM public.invoice_item ORDER BY 1, 2 LIMIT 1 OFFSET 10);
INSERT INTO public.allowance SELECT 'ZZ' || substr(allowance_number, 3), invoice_number, allowance_date,
       amount, tax_amount, reason FROM public.allowance ORDER BY 1 LIMIT 1;
SQL
status=0
"$INVSYNC" --config "$CONFIG" verify db --pipeline invoices_to_cloud --settle 2 \
  --repair-sql "$DEMO_DIR/repair.sql" || status=$?
echo "exit status $status (1: differences found)"
echo "-- $DEMO_DIR/repair.sql:"
cat "$DEMO_DIR/repair.sql"
psql -X -q "$CLOUD_A_URL" -f "$DEMO_DIR/repair.sql"
"$INVSYNC" --config "$CONFIG" verify db --pipeline invoices_to_cloud --settle 2

section "backup: initialise the repository $DEMO_DIR/repo (age key $DEMO_DIR/backup.key)"
if [ -f "$DEMO_DIR/repo/config" ]; then
  echo "the repository exists already; keeping it"
else
  "$INVSYNC" --config "$CONFIG" repo init --repo offsite
fi
"$INVSYNC" --config "$CONFIG" key list --repo offsite

section "backup: the data center's pipeline tables and a configuration directory"
mkdir -p "$DEMO_DIR/etc/invsync/conf.d"
cp "$CONFIG" "$DEMO_DIR/etc/invsync/invsync.toml"
echo "peak_windows = [\"odd months 13-15\", \"odd months 25-26\"]" >"$DEMO_DIR/etc/invsync/conf.d/agent.toml"
ln -sfn invsync.toml "$DEMO_DIR/etc/invsync/current.toml"
"$INVSYNC" --config "$CONFIG" backup --repo offsite --db maindc --config-dir "$DEMO_DIR/etc/invsync" --tag demo

section "backup: change 1% of the invoices, back up again (only the changed chunks are stored)"
"$EINVOICE_GEN" load --url "$MAINDC_URL" --rate 2000 --duration 2 >/dev/null
"$INVSYNC" --config "$CONFIG" backup --repo offsite --db maindc --config-dir "$DEMO_DIR/etc/invsync" --tag demo
"$INVSYNC" --config "$CONFIG" snapshots --repo offsite

section "restore: the latest snapshot into the standby cluster, and the configuration tree"
"$INVSYNC" --config "$CONFIG" restore latest --repo offsite --to-db standby --replace
psql -X "$STANDBY_URL" -c "SELECT 'invoice' AS table, count(*) FROM public.invoice \
  UNION ALL SELECT 'invoice_item', count(*) FROM public.invoice_item \
  UNION ALL SELECT 'allowance', count(*) FROM public.allowance"
rm -rf "$DEMO_DIR/restored"
"$INVSYNC" --config "$CONFIG" restore latest --repo offsite --to-dir "$DEMO_DIR/restored"
find "$DEMO_DIR/restored" | sort

section "verify the repository: every reference resolves and 100% of the data reads back"
"$INVSYNC" --config "$CONFIG" verify repo --repo offsite --read-data

section "archive: the data center's change stream into the repository, beside the backups"
"$INVSYNC" --config "$CONFIG" archive run maindc --repo offsite --segment-seconds 2 \
  >"$DEMO_DIR/archive.log" 2>&1 &
ARCHIVE_PID=$!
until [ "$(psql -X -Atc "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'invsync_archive_%'" "$MAINDC_URL")" = 1 ]; do
  sleep 0.2
done
echo "archive run started (pid $ARCHIVE_PID, log $DEMO_DIR/archive.log); a snapshot for it to carry forward:"
"$INVSYNC" --config "$CONFIG" backup --repo offsite --db maindc --tag demo
"$EINVOICE_GEN" load --url "$MAINDC_URL" --rate 500 --duration 3 >/dev/null
AT_T=$(psql -X -Atc "SELECT count(*) FROM public.invoice" "$MAINDC_URL")
T=$(date -u '+%Y-%m-%d %H:%M:%S.%6N')
sleep 1
echo "at $T UTC the data center held $AT_T invoices; more changes follow"
"$EINVOICE_GEN" load --url "$MAINDC_URL" --rate 500 --duration 3 >/dev/null
sleep 3
"$INVSYNC" --config "$CONFIG" archive status --repo offsite

section "point-in-time restore: the standby as the data center was at $T UTC"
"$INVSYNC" --config "$CONFIG" restore --repo offsite --to-db standby --replace --until "$T"
echo "invoices: standby $(psql -X -Atc "SELECT count(*) FROM public.invoice" "$STANDBY_URL") (the data center held $AT_T at $T; it holds $(psql -X -Atc "SELECT count(*) FROM public.invoice" "$MAINDC_URL") now)"

section "DR drill: the latest recoverable point into the standby, verified against the live data center"
# The archive keeps running: the drill explains rows the data center changed after the restore
# point by the archived changes, and measures RPO and RTO.
"$EINVOICE_GEN" load --url "$MAINDC_URL" --rate 200 --duration 4 >/dev/null &
LOAD_PID=$!
"$INVSYNC" --config "$CONFIG" drill --repo offsite --to-db standby --replace --report "$DEMO_DIR/drills"
wait "$LOAD_PID"
ls "$DEMO_DIR/drills"
"$INVSYNC" --config "$CONFIG" drill history --repo offsite
kill -TERM "$ARCHIVE_PID"
wait "$ARCHIVE_PID" && echo "archive run stopped on SIGTERM (its open segment stored)"
# The demo's archive is done: its slot would otherwise keep the data center's WAL.
psql -X -q -Atc "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'invsync_archive_%'" "$MAINDC_URL" >/dev/null

section "agent: the pipeline and two schedules in one process, around a blackout window"
# The agent runs the pipeline itself: the `sync run` above steps aside while it runs.
stop_sync
AGENT_PORT="${AGENT_PORT:-19187}"
AGENT_CONFIG="$DEMO_DIR/agent.toml"
cp "$CONFIG" "$AGENT_CONFIG"
cat >>"$AGENT_CONFIG" <<TOML

[agent]
listen = "127.0.0.1:$AGENT_PORT"
state_dir = "agent-state"

[[schedules]]
name = "verify-replica"              # fires every 10 s during the demo
cron = "*/10 * * * * *"
job = "verify"
pipeline = "invoices_to_cloud"
during_blackout = "ignore"

[[schedules]]
name = "backup-maindc"               # deferred: the window below covers maindc now
cron = "*/15 * * * * *"
job = "backup"
repo = "offsite"
db = "maindc"

[[blackouts]]
name = "demo-peak"
time_zone = "UTC"
start = "$(date -u -d '-1 minute' '+%Y-%m-%d %H:%M')"
end = "$(date -u -d '+2 hours' '+%Y-%m-%d %H:%M')"
databases = ["maindc"]
TOML
mkdir -p "$DEMO_DIR/agent-state"
"$INVSYNC" --config "$AGENT_CONFIG" agent --check --count 2
"$INVSYNC" --config "$AGENT_CONFIG" agent >"$DEMO_DIR/agent.log" 2>&1 &
AGENT_PID=$!
"$EINVOICE_GEN" load --url "$MAINDC_URL" --rate 500 --duration 25 >/dev/null
python3 - "$AGENT_PORT" <<'PY'
import json, sys, urllib.error, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
try:
    ready = urllib.request.urlopen(base + "/readyz").read().decode()
except urllib.error.HTTPError as e:
    ready = e.read().decode()
print("/readyz:", ready.strip())
s = json.load(urllib.request.urlopen(base + "/status"))
for p in s["pipelines"]:
    for t in p["targets"]:
        print(f"pipeline {p['name']}: {p['state']}, target {t['name']} applied {t['applied_lsn']}, "
              f"lag {t['lag_bytes']} B, {t['applied_transactions']} transactions")
for j in s["schedules"]:
    last = j["last_run"] or {}
    d = j["deferred"]
    line = f"schedule {j['name']}: last run {last.get('result', '-')}, next {j['next_run']}"
    if d:
        line += f", deferred to {d['until']} by {','.join(d['windows'])}"
    print(line)
print("windows open:", ", ".join(s["windows_active"]) or "none")
wanted = ("pipeline_lag_bytes", "pipeline_applied_transactions_total", "job_runs_total",
          "job_deferred_total", "blackout_active")
for line in urllib.request.urlopen(base + "/metrics").read().decode().splitlines():
    if line.startswith(tuple("invsync_" + w for w in wanted)):
        print(line)
PY
kill -TERM "$AGENT_PID"
wait "$AGENT_PID" && echo "agent stopped on SIGTERM (exit 0); log: $DEMO_DIR/agent.log"
"$INVSYNC" --config "$CONFIG" sync run invoices_to_cloud >>"$DEMO_DIR/sync.log" 2>&1 &
echo $! >"$DEMO_DIR/sync.pid"

section "done"
cat <<TXT
The clusters keep running:
  maindc   psql "$MAINDC_URL"
  cloud_a  psql "$CLOUD_A_URL"
  standby  psql "$STANDBY_URL"
sync run keeps streaming (log: $DEMO_DIR/sync.log); watch it with
  $INVSYNC --config $CONFIG sync status
Drive changes on the data center:
  $EINVOICE_GEN load --url "$MAINDC_URL" --rate 200 --duration 30
Use the configuration:
  export MAINDC_URL="$MAINDC_URL" CLOUD_A_URL="$CLOUD_A_URL" STANDBY_URL="$STANDBY_URL"
  $INVSYNC --config $CONFIG config check
Stop them with: scripts/demo.sh stop
TXT
