# Benchmark section: the change archive, point-in-time restore, DR drills, switchover and a table
# joining a streaming pipeline. Sourced by scripts/bench.sh (see its conventions and fairness
# rules). Works in databases of its own, all dropped at the end: SRC's `bench_recovery` (a copy
# of `einvoice`, so INVOICES invoices, plus bench.sh's change table and a probe table), DST's
# `bench_recovery` (the pipelines' target) and DST's `bench_restore` (made afresh before every
# restore, drill and dump). `bench_recovery` on SRC has synchronous_commit off, as the sync
# section's lag database, so that einvoice-gen load can reach its rate.
#
#   archive:    a backlog of RECOVERY_BACKLOG changes (default 1000000, bench.sh's change_backlog,
#               as the sync section's catch-up) written while `invsync archive run` and two
#               pg_receivewal (the physical WAL archive that Barman streams and pgBackRest and
#               WAL-G store), with lz4 and with gzip, read it: bytes each stored against the WAL
#               written; the archive's CPU seconds per 1M changes (its process and its
#               walsender), its peak RSS, and how long after the backlog's last commit its segment
#               was stored (segments close every 5 s here).
#               einvoice-gen load at RECOVERY_LOAD_RATE rows/s (default 10000, 4 connections) for
#               RECOVERY_LOAD_SECS s (default 30) with nothing reading the WAL, with the archive,
#               and with pg_receivewal (lz4): the rows/s the load reaches and what the reader costs.
#   replay:     a point-in-time restore (`restore --until latest`) of a snapshot of the change
#               table plus the archived backlog written after it, against `sync run` catching
#               up on the same backlog from a slot made right after the snapshot. The replay's
#               rate: its changes over the restore's time minus that of the snapshot alone
#               (also restored in the same round). Each restored table is checked against the
#               source.
#   drill:      `invsync drill` (restore of a snapshot of every table, INVOICES invoices and the
#               change table, plus a backlog replayed, then every row verified against the
#               source) against `pg_dump -Fd -Z0 -j2` then `pg_restore -j2` of the same tables
#               as they are now into an empty database (which verifies nothing).
#   switchover: `sync switchover` of the four invoice tables (INVOICES invoices) while
#               einvoice-gen load writes as the application role at RECOVERY_SWITCH_RATE rows/s
#               (default 2000); the write pause it measures (the tables are verified whole
#               before it, while streaming; inside it only the rows changed since). The load
#               must still run when the switchover starts, or the part fails. No peer: native
#               logical replication has no switchover.
#   join:       the lag of a streaming target (a probe row written every 50 ms, the age of the
#               newest one the target shows sampled every 50 ms, as in the sync section) under
#               einvoice-gen load while a table of the items' size, which the load does not
#               write, joins the pipeline (`sync setup` beside the running `sync run`), against
#               a native subscription's ALTER PUBLICATION ... ADD TABLE + REFRESH PUBLICATION.
# RECOVERY_PARTS="switchover join" runs only the parts named (default: all).
# Each timed side runs BENCH_RUNS times, each round in another order (`rotate`), from `settle`.

section "recovery: change archive, point-in-time restore, DR drill, switchover, a table joining (INVOICES=$INVOICES)"
ensure_age

R="$BENCH_DIR/recovery"
rm -rf "$R"
mkdir -p "$R"
SRC_BASE="${SRC_URL%%/einvoice*}"
DST_BASE="${DST_URL%%/einvoice*}"
RSRC="$SRC_BASE/bench_recovery?sslmode=disable"
RDST="$DST_BASE/bench_recovery?sslmode=disable"
RRES="$DST_BASE/bench_restore?sslmode=disable"
APP_SRC="${SRC_BASE/postgres@/bench_app@}/bench_recovery?sslmode=disable"
backlog="${RECOVERY_BACKLOG:-1000000}"
load_rate="${RECOVERY_LOAD_RATE:-10000}"
load_secs="${RECOVERY_LOAD_SECS:-30}"
ITEMS="public.invoice, public.invoice_item, public.allowance, public.carrier"

rq() { PGOPTIONS="-c client_min_messages=warning" psql -X -qtA -v ON_ERROR_STOP=1 "$1" -c "$2"; }
now() { date +%s.%N; }
until_true() { until [ "$(rq "$1" "$2")" = t ]; do sleep 0.1; done; } # URL QUERY
cpu_s() { sed 's/.*) //' "/proc/$1/stat" | awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($12 + $13) / hz}'; }
per_million() { awk -v c="$1" -v n="$2" 'BEGIN { printf "%.2f", c * 1000000 / n }'; }
# json_field FILE PATH: a field of the JSON object in FILE (log lines around it are skipped),
# PATH as Python subscripts, e.g. "['restore']['seconds']".
json_field() {
  python3 -c "
import json, sys
text = open(sys.argv[1]).read()
v = json.JSONDecoder().raw_decode(text[text.index('{'):])[0]
print(eval('v' + sys.argv[2]))" "$@"
}
# drop_db BASE NAME: NAME gone from the cluster at BASE, with the replication slots that would
# block DROP DATABASE.
drop_db() {
  rq "$1/postgres?sslmode=disable" "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
    WHERE database = '$2' AND active_pid IS NOT NULL" >/dev/null
  until [ "$(rq "$1/postgres?sslmode=disable" "SELECT count(*) FROM pg_replication_slots WHERE database = '$2' AND active")" = 0 ]; do
    sleep 0.1
  done
  rq "$1/postgres?sslmode=disable" "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '$2'" >/dev/null
  rq "$1/postgres?sslmode=disable" "DROP DATABASE IF EXISTS $2 WITH (FORCE)" >/dev/null
}
fresh_restore_db() {
  drop_db "$DST_BASE" bench_restore
  rq "$DST_BASE/postgres?sslmode=disable" "CREATE DATABASE bench_restore" >/dev/null
}
BG_PIDS=()
recovery_cleanup() {
  local p
  for p in "${BG_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rq "$DST_BASE/bench_recovery?sslmode=disable" "DROP SUBSCRIPTION IF EXISTS bench_native" >/dev/null 2>&1 || true
  drop_db "$SRC_BASE" bench_recovery || true
  drop_db "$DST_BASE" bench_recovery || true
  drop_db "$DST_BASE" bench_restore || true
  rq "$SRC_BASE/postgres?sslmode=disable" "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
    WHERE slot_name LIKE 'bench_wal_%'" >/dev/null 2>&1 || true
  rq "$SRC_BASE/postgres?sslmode=disable" "DROP ROLE IF EXISTS bench_app" >/dev/null 2>&1 || true
  rq "$DST_BASE/postgres?sslmode=disable" "DROP ROLE IF EXISTS bench_app" >/dev/null 2>&1 || true
}
trap recovery_cleanup EXIT
recovery_cleanup

rq "$SRC_BASE/postgres?sslmode=disable" "CREATE DATABASE bench_recovery TEMPLATE einvoice" >/dev/null
rq "$SRC_BASE/postgres?sslmode=disable" "ALTER DATABASE bench_recovery SET synchronous_commit = off" >/dev/null
rq "$DST_BASE/postgres?sslmode=disable" "CREATE DATABASE bench_recovery" >/dev/null
change_table "$RSRC"
rq "$RSRC" "CREATE TABLE public.bench_probe (id bigint PRIMARY KEY, sent timestamptz NOT NULL)"
rq "$RDST" "DROP SCHEMA public"
pg_dump -s -n public "$RSRC" | PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 -d "$RDST" >/dev/null
# The join part's samples and stop flags live outside the replicated tables.
rq "$RDST" "CREATE SCHEMA bench_ctl; CREATE UNLOGGED TABLE bench_ctl.sample (at timestamptz, lag interval);
  CREATE UNLOGGED TABLE bench_ctl.stop (at timestamptz)"
rq "$RSRC" "CREATE SCHEMA bench_ctl; CREATE UNLOGGED TABLE bench_ctl.stop (at timestamptz)"

age-keygen -o "$R/key" 2>/dev/null
write_config() { # FILE [TOML...]: the databases and the repository, then the extra lines
  local file=$1
  shift
  {
    cat <<TOML
[databases.src]
url = "$RSRC"
[databases.dst]
url = "$RDST"
[databases.restore]
url = "$RRES"
[repositories.rec]
url = "file://$R/repo"
recipients = ["$(age-keygen -y "$R/key")"]
identity_file = "$R/key"
TOML
    printf '%s\n' "$@"
  } >"$file"
}
write_config "$R/invsync.toml" '[pipelines.change]' 'source = "src"' 'targets = ["dst"]' 'tables = ["public.bench_change"]'
inv() { "$INVSYNC" --config "$R/invsync.toml" --log warn "$@"; }
inv repo init --repo rec >/dev/null

# ---- the archive: started once, kept running (it is stopped only for the load runs without it)
ARCHIVE_PID=
archive_start() {
  "$INVSYNC" --config "$R/invsync.toml" --log warn archive run src --repo rec --tables 'public.*' \
    --segment-seconds 5 >>"$R/archive.log" 2>&1 &
  ARCHIVE_PID=$!
  BG_PIDS+=("$ARCHIVE_PID")
  until_true "$RSRC" "SELECT count(*) = 1 FROM pg_replication_slots WHERE slot_name LIKE 'invsync_archive_%' AND active"
}
archive_stop() {
  kill -TERM "$ARCHIVE_PID"
  wait "$ARCHIVE_PID" || true
  ARCHIVE_PID=
}
archive_wait() { # LSN: until the archive's slot is confirmed at or past LSN (its segment stored)
  until_true "$RSRC" "SELECT coalesce(bool_and(confirmed_flush_lsn >= '$1'), false) FROM pg_replication_slots WHERE slot_name LIKE 'invsync_archive_%'"
}
archive_walsender() { rq "$RSRC" "SELECT active_pid FROM pg_replication_slots WHERE slot_name LIKE 'invsync_archive_%'"; }
lsn_now() { rq "$RSRC" "SELECT pg_current_wal_lsn()"; }
repo_bytes() { du -sb "$R/repo" | cut -f1; }
# pg_receivewal into R/wal-Z through a physical slot of its own, flushing each write so that
# its slot shows what it holds.
receivewal_start() { # Z: a new slot each time, so that it starts at the current WAL position
  local z=$1
  rm -rf "$R/wal-$z" && mkdir -p "$R/wal-$z"
  receivewal_drop "$z"
  pg_receivewal -h 127.0.0.1 -p "$SRC_PORT" -U postgres --slot "bench_wal_$z" --create-slot --if-not-exists 2>/dev/null
  pg_receivewal -h 127.0.0.1 -p "$SRC_PORT" -U postgres --slot "bench_wal_$z" -D "$R/wal-$z" \
    --compress="$z" --synchronous --status-interval=1 --no-loop 2>>"$R/receivewal.log" &
  RECEIVE_PID=$!
  BG_PIDS+=("$RECEIVE_PID")
  until_true "$RSRC" "SELECT active FROM pg_replication_slots WHERE slot_name = 'bench_wal_$z'"
}
receivewal_drop() { # Z
  rq "$RSRC" "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'bench_wal_$1'" >/dev/null
}
receivewal_wait() { # Z LSN
  until_true "$RSRC" "SELECT restart_lsn >= '$2' FROM pg_replication_slots WHERE slot_name = 'bench_wal_$1'"
}

# part NAME: whether RECOVERY_PARTS (default: all of them, in this order) names part NAME.
part() { [[ " ${RECOVERY_PARTS:-archive replay drill switchover join} " == *" $1 "* ]]; }

archive_start

# ---- archive: bytes stored for the backlog, against the WAL and pg_receivewal
if part archive; then
  rq "$RSRC" "TRUNCATE public.bench_change"
  change_prefill "$RSRC" 100000000 "$backlog"
  receivewal_start lz4
  RECEIVE_LZ4=$RECEIVE_PID
  receivewal_start gzip
  RECEIVE_GZIP=$RECEIVE_PID
  rq "$RSRC" "SELECT pg_switch_wal()" >/dev/null
  L0=$(lsn_now)
  archive_wait "$L0"
  receivewal_wait lz4 "$L0"
  receivewal_wait gzip "$L0"
  A0=$(repo_bytes)
  Z0_lz4=$(du -sb "$R/wal-lz4" | cut -f1)
  Z0_gzip=$(du -sb "$R/wal-gzip" | cut -f1)
  WS=$(archive_walsender)
  C0_archive=$(cpu_s "$ARCHIVE_PID")
  C0_walsender=$(cpu_s "$WS")
  change_backlog "$RSRC" 100000000 "$backlog"
  L1=$(lsn_now)
  t_end=$(now)
  archive_wait "$L1"
  t_stored=$(now)
  C1_archive=$(cpu_s "$ARCHIVE_PID")
  C1_walsender=$(cpu_s "$WS")
  ARCHIVE_RSS=$(awk '/VmHWM/ { printf "%.0f", $2 / 1024 }' "/proc/$ARCHIVE_PID/status")
  receivewal_wait lz4 "$L1"
  receivewal_wait gzip "$L1"
  A1=$(repo_bytes)
  Z1_lz4=$(du -sb "$R/wal-lz4" | cut -f1)
  Z1_gzip=$(du -sb "$R/wal-gzip" | cut -f1)
  kill -INT "$RECEIVE_LZ4" "$RECEIVE_GZIP"
  wait "$RECEIVE_LZ4" "$RECEIVE_GZIP" || true
  receivewal_drop lz4
  receivewal_drop gzip
  WAL_BYTES=$(rq "$RSRC" "SELECT pg_wal_lsn_diff('$L1', '$L0')")
  report_value "archive: WAL written by $backlog changes" "$WAL_BYTES" bytes
  report_row "archive: bytes stored for $backlog changes (peer: pg_receivewal -Z lz4)" "$((A1 - A0))" "$((Z1_lz4 - Z0_lz4))" bytes
  report_row "archive: bytes stored for $backlog changes (peer: pg_receivewal -Z gzip)" "$((A1 - A0))" "$((Z1_gzip - Z0_gzip))" bytes
  report_value "archive: CPU s per 1M changes, archive run / its walsender" "$(per_million "$(echo "$C1_archive - $C0_archive" | bc)" "$backlog") / $(per_million "$(echo "$C1_walsender - $C0_walsender" | bc)" "$backlog")" s
  report_value "archive: backlog's end stored after its commit (5 s segments)" "$(awk -v a="$t_end" -v b="$t_stored" 'BEGIN { printf "%.2f", b - a }')" s
  report_value "archive: peak RSS of archive run" "$ARCHIVE_RSS" MB

  # ---- archive under load: the rows/s einvoice-gen load reaches with each reader
  declare -A LOAD_RATES=()
  for i in $(seq 1 "$BENCH_RUNS"); do
    for side in $(rotate "$i" none archive receivewal); do
      case $side in
      none) archive_stop ;;
      receivewal) archive_stop && receivewal_start lz4 ;;
      esac
      settle
      "$EINVOICE_GEN" load --url "$RSRC" --rate "$load_rate" --duration "$load_secs" --connections 4 --json >"$R/load.json"
      LOAD_RATES[$side]+="$(json_field "$R/load.json" "['rows_per_second']" | xargs printf '%.0f') "
      case $side in
      none | receivewal)
        if [ "$side" = receivewal ]; then
          kill -INT "$RECEIVE_PID"
          wait "$RECEIVE_PID" || true
          receivewal_drop lz4
        fi
        # The archive catches up on the WAL it missed before the next run starts.
        archive_start
        archive_wait "$(lsn_now)"
        ;;
      esac
    done
  done
  # shellcheck disable=SC2086 # the runs, one word each
  report_row "load reached, rows/s at $load_rate: archive vs nothing reading" "$(median ${LOAD_RATES[archive]})" "$(median ${LOAD_RATES[none]})" rows/s
  # shellcheck disable=SC2086
  report_row "load reached, rows/s at $load_rate: archive vs pg_receivewal lz4" "$(median ${LOAD_RATES[archive]})" "$(median ${LOAD_RATES[receivewal]})" rows/s
fi

# ---- replay: point-in-time restore against sync run, on the same backlog
if part replay; then
  source_state() { rq "$1" "SELECT count(*), sum(amount), count(*) FILTER (WHERE note = 'upd'), max(id) FROM public.bench_change"; }
  declare -A T=()
  replay_changes=
  bad=0
  for i in $(seq 1 "$BENCH_RUNS"); do
    base=$(((i + 1) * 100000000))
    rq "$RSRC" "TRUNCATE public.bench_change"
    rq "$RDST" "TRUNCATE public.bench_change"
    change_prefill "$RSRC" "$base" "$backlog"
    inv backup --repo rec --db src --tables public.bench_change --json >"$R/snap.json"
    snap=$(json_field "$R/snap.json" "['snapshot']")
    inv sync teardown change --yes >/dev/null 2>&1 || true
    inv sync setup change --no-create >/dev/null
    change_backlog "$RSRC" "$base" "$backlog"
    L=$(lsn_now)
    archive_wait "$L"
    expected=$(source_state "$RSRC")
    for side in $(rotate "$i" sync snapshot pitr); do
      case $side in
      sync)
        settle
        t0=$(now)
        "$INVSYNC" --config "$R/invsync.toml" --log warn sync run change &
        pid=$!
        until_true "$RDST" "SELECT EXISTS (SELECT 1 FROM public.bench_change WHERE id = -$base)"
        t1=$(now)
        kill -TERM "$pid"
        wait "$pid" || true
        T[sync]+="$(echo "$t1 - $t0" | bc) "
        [ "$(source_state "$RDST")" = "$expected" ] || { echo "replay: sync run's target differs from the source" >&2; bad=1; }
        ;;
      snapshot)
        fresh_restore_db
        settle
        timeit recovery-snapshot "$INVSYNC" --config "$R/invsync.toml" --log warn restore "$snap" --repo rec --to-db restore
        T[snapshot]+="$TIME_S "
        ;;
      pitr)
        fresh_restore_db
        settle
        timeit recovery-pitr "$INVSYNC" --config "$R/invsync.toml" --log warn restore --repo rec --to-db restore \
          --until latest --tables public.bench_change --json
        T[pitr]+="$TIME_S "
        replay_changes=$(json_field "$TIMEIT_LOG" "['replay']['changes']")
        [ "$(source_state "$RRES")" = "$expected" ] || { echo "replay: the point-in-time restore differs from the source" >&2; bad=1; }
        ;;
      esac
    done
    inv sync teardown change --yes >/dev/null
  done
  # shellcheck disable=SC2086
  {
    t_sync=$(median ${T[sync]})
    t_snap=$(median ${T[snapshot]})
    t_pitr=$(median ${T[pitr]})
  }
  report_value "replay: restore of the snapshot alone ($((backlog / 2)) rows)" "$t_snap" s
  report_value "replay: point-in-time restore (snapshot + $replay_changes archived changes)" "$t_pitr" s
  report_row "replay rows/s (restore --until) vs sync run catch-up" \
    "$(awk -v n="$replay_changes" -v a="$t_pitr" -v b="$t_snap" 'BEGIN { printf "%.0f", n / (a - b) }')" \
    "$(awk -v n="$((backlog + 1))" -v t="$t_sync" 'BEGIN { printf "%.0f", n / t }')" rows/s
  report_value "replay: restored tables checked against the source" "$([ "$bad" = 0 ] && echo all || echo "SOME DIFFER")"
fi

# ---- drill: restore + replay + verify, against a fresh dump and restore of the same tables
if part drill; then
  rq "$RSRC" "TRUNCATE public.bench_change"
  change_prefill "$RSRC" 900000000 "$backlog"
  inv backup --repo rec --db src --tables 'public.*' >/dev/null
  change_backlog "$RSRC" 900000000 "$backlog"
  L=$(lsn_now)
  archive_wait "$L"
  declare -A D=()
  drill_failed=0
  for i in $(seq 1 "$BENCH_RUNS"); do
    for side in $(rotate "$i" drill dump); do
      fresh_restore_db
      rm -rf "$R/dump"
      settle
      case $side in
      drill)
        timeit recovery-drill "$INVSYNC" --config "$R/invsync.toml" --log warn drill --repo rec --to-db restore \
          --source src --archive-wait 60 --json || drill_failed=1
        D[drill]+="$(json_field "$TIMEIT_LOG" "['rto_seconds']" | xargs printf '%.3f') "
        D[drill_restore]+="$(json_field "$TIMEIT_LOG" "['restore']['seconds']" | xargs printf '%.3f') "
        D[drill_rpo]+="$(json_field "$TIMEIT_LOG" "['rpo']['seconds']" | xargs printf '%.1f') "
        D[drill_rpo_bytes]+="$(json_field "$TIMEIT_LOG" "['rpo']['bytes']") "
        D[drill_rss]+="$RSS_MB "
        [ "$(json_field "$TIMEIT_LOG" "['passed']")" = True ] || drill_failed=1
        ;;
      dump)
        timeit recovery-dump bash -c "pg_dump -Fd -Z0 -j2 --no-publications --no-subscriptions -t 'public.*' -f '$R/dump' '$RSRC' &&
          pg_restore -j2 -d '$RRES' '$R/dump'"
        D[dump]+="$TIME_S "
        D[dump_rss]+="$RSS_MB "
        ;;
      esac
    done
  done
  rm -rf "$R/dump"
  # shellcheck disable=SC2086
  {
    report_row "drill RTO (restore, replay, verify every row), s (peer: pg_dump -Fd -Z0 -j2 + pg_restore -j2, no verify)" \
      "$(median ${D[drill]})" "$(median ${D[dump]})" s
    report_row "drill's restore + replay part, s (peer: the same dump + restore)" "$(median ${D[drill_restore]})" "$(median ${D[dump]})" s
    report_row "drill peak RSS, MB (peer: pg_dump / pg_restore, largest process)" "$(median ${D[drill_rss]})" "$(median ${D[dump_rss]})" MB
    # The source is idle during the drills: the RPO in time is the age of its last commit.
    report_value "drill RPO measured, WAL bytes (archive running, source idle)" "$(median ${D[drill_rpo_bytes]})" bytes
    report_value "drill RPO measured, s (the idle source's last commit's age)" "$(median ${D[drill_rpo]})" s
    report_value "drills passed" "$([ "$drill_failed" = 0 ] && echo all || echo "SOME FAILED")"
  }
fi
archive_stop

# ---- switchover under load: the write pause
if part switchover; then
  for url in "$SRC_BASE" "$DST_BASE"; do
    rq "$url/postgres?sslmode=disable" "CREATE ROLE bench_app LOGIN" >/dev/null
    rq "$url/bench_recovery?sslmode=disable" "GRANT USAGE ON SCHEMA public TO bench_app;
      GRANT ALL ON ALL TABLES IN SCHEMA public TO bench_app; GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO bench_app" >/dev/null
  done
  write_config "$R/switch.toml" \
    '[pipelines.sw]' 'source = "src"' 'targets = ["dst"]' "tables = [\"${ITEMS//, /\", \"}\"]" 'application_roles = ["bench_app"]' \
    '[pipelines.sw_back]' 'source = "dst"' 'targets = ["src"]' "tables = [\"${ITEMS//, /\", \"}\"]" 'application_roles = ["bench_app"]'
  sw() { "$INVSYNC" --config "$R/switch.toml" --log warn "$@"; }
  pauses=()
  for i in $(seq 1 "$BENCH_RUNS"); do
    sw sync teardown sw_back --yes >/dev/null 2>&1 || true
    sw sync teardown sw --yes >/dev/null 2>&1 || true
    for url in "$SRC_BASE" "$DST_BASE"; do
      rq "$url/postgres?sslmode=disable" "ALTER ROLE bench_app IN DATABASE bench_recovery RESET default_transaction_read_only" >/dev/null
    done
    rq "$RDST" "TRUNCATE $ITEMS"
    sw sync setup sw --no-create --jobs 2 >/dev/null
    "$EINVOICE_GEN" load --url "$APP_SRC" --rate "${RECOVERY_SWITCH_RATE:-2000}" --duration 600 --connections 2 >"$R/switch-load.log" 2>&1 &
    load_pid=$!
    BG_PIDS+=("$load_pid")
    "$INVSYNC" --config "$R/switch.toml" --log warn sync run sw &
    pid=$!
    sleep 15
    kill -TERM "$pid"
    wait "$pid" || true
    if ! kill -0 "$load_pid" 2>/dev/null; then
      echo "the application's load stopped before the switchover: $(tail -1 "$R/switch-load.log")" >&2
      exit 1
    fi
    settle
    sw sync switchover sw --timeout 300s --json >"$R/switch.json"
    kill -INT "$load_pid" 2>/dev/null || true
    wait "$load_pid" || true
    pauses+=("$(json_field "$R/switch.json" "['write_pause_ms']")")
    rows_verified=$(json_field "$R/switch.json" "['rows_verified']")
    changed_verified=$(json_field "$R/switch.json" "['changed_rows_verified']")
    steps=$(python3 -c "import json, sys; print(', '.join('%s %d' % (s['step'], s['millis']) for s in json.load(open(sys.argv[1]))['steps']))" "$R/switch.json")
  done
  report_value "switchover write pause under load, $rows_verified rows verified before it, $changed_verified changed rows in it (last run)" "$(median "${pauses[@]}")" ms
  report_value "switchover pauses of the runs (ms)" "${pauses[*]}"
  report_value "switchover steps of the last run (ms)" "$steps"
  sw sync teardown sw_back --yes >/dev/null 2>&1 || true
fi

# ---- a table joining a streaming pipeline: the running target's lag
if part join; then
  rq "$RSRC" "CREATE TABLE public.bench_join (LIKE public.invoice_item INCLUDING ALL);
    INSERT INTO public.bench_join SELECT * FROM public.invoice_item"
  rq "$RSRC" "VACUUM ANALYZE public.bench_join"
  rq "$RDST" "CREATE TABLE public.bench_join (LIKE public.invoice_item INCLUDING ALL)"
  for url in "$SRC_BASE" "$DST_BASE"; do
    rq "$url/postgres?sslmode=disable" "ALTER ROLE bench_app IN DATABASE bench_recovery RESET default_transaction_read_only" >/dev/null
  done
  write_config "$R/join.toml" '[pipelines.jn]' 'source = "src"' 'targets = ["dst"]' \
    "tables = [\"${ITEMS//, /\", \"}\", \"public.bench_probe\"]"
  jn() { "$INVSYNC" --config "$R/join.toml" --log warn "$@"; }
  # join_measure JOIN_COMMAND: the load, the probe writer and the sampler running, JOIN_COMMAND
  # after 10 s; prints "p99 max baseline_p99" in seconds: the lag sampled while the join ran (and
  # 1 s after), and before it.
  join_measure() {
    rq "$RSRC" "TRUNCATE bench_ctl.stop"
    rq "$RDST" "TRUNCATE bench_ctl.stop, bench_ctl.sample"
    "$EINVOICE_GEN" load --url "$RSRC" --rate "$load_rate" --duration 600 --connections 4 >"$R/join-load.log" 2>&1 &
    local load_pid=$! probe_pid sample_pid j0 j1
    rq "$RSRC" "DO \$\$ DECLARE i bigint := 0; BEGIN
        WHILE NOT EXISTS (SELECT 1 FROM bench_ctl.stop) LOOP
          i := i + 1; INSERT INTO public.bench_probe VALUES (i, clock_timestamp()); COMMIT; PERFORM pg_sleep(0.05);
        END LOOP; END \$\$" &
    probe_pid=$!
    rq "$RDST" "DO \$\$ BEGIN PERFORM pg_sleep(2);
        WHILE NOT EXISTS (SELECT 1 FROM bench_ctl.stop) LOOP
          INSERT INTO bench_ctl.sample SELECT clock_timestamp(), clock_timestamp() - max(sent) FROM public.bench_probe;
          COMMIT; PERFORM pg_sleep(0.05);
        END LOOP; END \$\$" &
    sample_pid=$!
    sleep 10
    j0=$(now)
    "$@"
    j1=$(now)
    sleep 3
    rq "$RSRC" "INSERT INTO bench_ctl.stop VALUES (now())"
    rq "$RDST" "INSERT INTO bench_ctl.stop VALUES (now())"
    kill -INT "$load_pid"
    wait "$load_pid" "$probe_pid" "$sample_pid" || true
    rq "$RDST" "SELECT round(extract(epoch FROM percentile_cont(0.99) WITHIN GROUP (ORDER BY lag) FILTER (WHERE at BETWEEN to_timestamp($j0) AND to_timestamp($j1 + 1)))::numeric, 3),
                       round(extract(epoch FROM max(lag) FILTER (WHERE at BETWEEN to_timestamp($j0) AND to_timestamp($j1 + 1)))::numeric, 3),
                       round(extract(epoch FROM percentile_cont(0.99) WITHIN GROUP (ORDER BY lag) FILTER (WHERE at < to_timestamp($j0)))::numeric, 3),
                       round($j1 - $j0, 2)
                FROM bench_ctl.sample" | tr '|' ' '
  }
  join_reset() {
    rq "$RSRC" "TRUNCATE public.bench_probe"
    rq "$RDST" "TRUNCATE $ITEMS, public.bench_probe, public.bench_join"
  }
  join_invsync() {
    sed -i 's/"public.bench_probe"\]/"public.bench_probe", "public.bench_join"]/' "$R/join.toml"
    jn sync setup jn --no-create >/dev/null
  }
  join_native() {
    rq "$RSRC" "ALTER PUBLICATION bench_native ADD TABLE public.bench_join"
    rq "$RDST" "ALTER SUBSCRIPTION bench_native REFRESH PUBLICATION"
    until_true "$RDST" "SELECT count(*) = 1 AND bool_and(srsubstate = 'r') FROM pg_subscription_rel WHERE srrelid = 'public.bench_join'::regclass"
  }
  declare -A J=()
  for i in $(seq 1 "$BENCH_RUNS"); do
    for side in $(rotate "$i" invsync native); do
      join_reset
      case $side in
      invsync)
        write_config "$R/join.toml" '[pipelines.jn]' 'source = "src"' 'targets = ["dst"]' \
          "tables = [\"${ITEMS//, /\", \"}\", \"public.bench_probe\"]"
        jn sync teardown jn --yes >/dev/null 2>&1 || true
        jn sync setup jn --no-create --jobs 2 >/dev/null
        "$INVSYNC" --config "$R/join.toml" --log warn sync run jn &
        pid=$!
        settle
        J[invsync]+="$(join_measure join_invsync | tr ' ' ,) "
        kill -TERM "$pid"
        wait "$pid" || true
        jn sync teardown jn --yes >/dev/null
        ;;
      native)
        rq "$RSRC" "CREATE PUBLICATION bench_native FOR TABLE $ITEMS, public.bench_probe"
        rq "$RDST" "CREATE SUBSCRIPTION bench_native CONNECTION '$RSRC' PUBLICATION bench_native"
        until_true "$RDST" "SELECT count(*) > 0 AND bool_and(srsubstate = 'r') FROM pg_subscription_rel"
        settle
        J[native]+="$(join_measure join_native | tr ' ' ,) "
        rq "$RDST" "DROP SUBSCRIPTION bench_native"
        rq "$RSRC" "DROP PUBLICATION bench_native"
        ;;
      esac
    done
  done
  join_col() { # SIDE N: the median of column N of SIDE's runs
    # shellcheck disable=SC2046
    median $(printf '%s\n' ${J[$1]} | cut -d, -f"$2")
  }
  report_row "lag p99 while a $(rq "$RSRC" "SELECT count(*) FROM public.bench_join")-row table joins, s (peer: native ADD TABLE)" "$(join_col invsync 1)" "$(join_col native 1)" s
  report_row "lag max while the table joins, s (peer: native)" "$(join_col invsync 2)" "$(join_col native 2)" s
  report_row "lag p99 before the join, s (peer: native)" "$(join_col invsync 3)" "$(join_col native 3)" s
  report_row "the join's duration, s (peer: native, until its table is ready)" "$(join_col invsync 4)" "$(join_col native 4)" s
  report_value "join runs (p99,max,before,duration)" "invsync ${J[invsync]}; native ${J[native]}"
fi
