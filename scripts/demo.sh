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

case "${1:-start}" in
  start) ;;
  stop)
    ensure_postgres
    cluster_stop "$DEMO_DIR/maindc"
    cluster_stop "$DEMO_DIR/cloud_a"
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
MAINDC_URL="postgres://postgres@127.0.0.1:$MAINDC_PORT/einvoice?sslmode=disable"
CLOUD_A_URL="postgres://postgres@127.0.0.1:$CLOUD_A_PORT/einvoice?sslmode=disable"
export MAINDC_URL CLOUD_A_URL
echo "maindc:  $MAINDC_URL"
echo "cloud_a: $CLOUD_A_URL"

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

# Later capabilities (sync, backup, verify) add their sections here.

section "done"
cat <<TXT
The clusters keep running:
  maindc   psql "$MAINDC_URL"
  cloud_a  psql "$CLOUD_A_URL"
Drive changes on the data center:
  $EINVOICE_GEN load --url "$MAINDC_URL" --rate 200 --duration 30
Use the configuration:
  export MAINDC_URL="$MAINDC_URL" CLOUD_A_URL="$CLOUD_A_URL"
  $INVSYNC --config $CONFIG config check
Stop them with: scripts/demo.sh stop
TXT
