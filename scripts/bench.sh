#!/usr/bin/env bash
# The benchmarks: invsync beside its peers, on the same clusters and the same data, in one run.
# Installs what is missing, builds release binaries, starts two fresh clusters under ./.bench/
# (SRC filled by einvoice-gen, DST empty), then runs each section scripts/bench/*.sh in name
# order, and stops the clusters at the end, also on failure or Ctrl-C.
#
#   scripts/bench.sh                 all sections
#   INVOICES=100000 scripts/bench.sh a smaller data set (default 1000000, about 3M items)
#   BENCH_ONLY=sync scripts/bench.sh only sections whose file name contains "sync"
#   BENCH_RUNS=1 scripts/bench.sh    one run of each side instead of three (a quick check that
#                                    the sections work, not a measurement)
#
# Conventions for a section (scripts/bench/<area>.sh, sourced by this script in a subshell
# with `set -e`; a failing section is reported and the next one runs):
# - It uses what this script exports: SRC_URL, DST_URL, SRC_PORT, DST_PORT (the two clusters,
#   database `einvoice`, superuser `postgres`, trust auth, wal_level=logical), BENCH_DIR (scratch
#   space; put files under "$BENCH_DIR/<area>/"), INVSYNC and EINVOICE_GEN (release binaries),
#   BENCH_RUNS (runs of each side), INVOICES and BENCH_SEED (what SRC holds; `$EINVOICE_GEN
#   fill --url "$DST_URL" --invoices "$INVOICES" --seed "$BENCH_SEED"` gives DST the very same
#   rows), and the functions below.
# - It leaves both clusters as it found them (drop its slots, subscriptions, publications and
#   extra tables; restore DST to empty), so sections do not depend on their order.
# - Every figure is measured beside the peer's, on the same data, in this run: three runs each
#   (BENCH_RUNS), so drift on this shared, noisy machine hits both alike. Report the medians
#   with `report_row`, which also prints the ratio invsync / peer: only ratios from one run mean
#   anything. Time every command with `timeit`, which also records its peak resident memory;
#   report memory as rows too, the peer's beside invsync's.
# Fairness rules (what a peer's maintainer may check):
# - Order: each round starts with another side (`rotate`), so neither always runs first or
#   last after the previous round's work.
# - State: before every timed step, `settle` checkpoints both clusters and flushes the page
#   cache's dirty pages, so no step pays for the writes of the one before; the previous run's
#   output (repositories, dumps, restored tables) is removed before the next run.
# - Peers get their best fair set-up, not just their defaults: the fastest pipeline their
#   documented options allow for the same job (e.g. tables streamed into restic or borg
#   rather than dumped to disk first), with the same parallelism invsync gets (two sessions).
#   Where a peer has a compression or key-derivation setting that changes the comparison,
#   both settings are reported or invsync is run in the matching mode.
# - Every part is shown: when the peer's timed command is a pipeline (a dump into a backup
#   tool), its parts are also timed alone, so a reader sees where the time goes.
# - Set-up steps (creating a subscription, a restic repository) are outside the timed part
#   unless invsync's equivalent is inside its own; catalog queries that only build the peer's
#   command line are outside too.
# - Rows are named for what they measure; a row whose peer does less (e.g. files restored but
#   not loaded) says so in its label and has no ratio.
#
# Helpers:
#   section TITLE                         prints a heading
#   timeit NAME CMD...                    runs CMD under /usr/bin/time -v, its output in
#                                         $TIMEIT_LOG; sets TIME_S (wall seconds) and RSS_MB
#                                         (peak resident MB); returns non-zero if CMD fails
#   median V...                           prints the median of the values
#   report_row LABEL INVSYNC PEER [UNIT]  prints a row with both values and invsync/peer
#   report_value LABEL VALUE [UNIT]       prints a row without a peer
#   psql_src SQL / psql_dst SQL           runs SQL on SRC / DST, prints unaligned tuples
#   settle                                CHECKPOINT on SRC and DST, then sync(1)
#   rotate N WORD...                      prints the words rotated left by N (round N's order)
#   change_table URL                      creates public.bench_change, the table the change
#                                         backlogs below write (the sync and recovery sections)
#   change_prefill URL BASE N             the N/2 rows (ids below BASE) a backlog of N changes
#                                         from BASE updates and deletes
#   change_backlog URL BASE N             N changes in transactions of 100: 60 inserts of new
#                                         rows, 30 updates and 10 deletes of prefilled rows, each
#                                         row touched once; then a marker row with id -BASE
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

BENCH_DIR="${BENCH_DIR:-$PWD/.bench}"
INVOICES="${INVOICES:-1000000}"
BENCH_SEED="${BENCH_SEED:-1}"
BENCH_RUNS="${BENCH_RUNS:-3}"
INVSYNC="$PWD/target/release/invsync"
EINVOICE_GEN="$PWD/target/release/einvoice-gen"
REPORT="$BENCH_DIR/report.txt"

section() { printf '\n== %s\n' "$*" | tee -a "$REPORT"; }

timeit_runs=0
timeit() {
  local name=$1
  shift
  timeit_runs=$((timeit_runs + 1))
  local log="$BENCH_DIR/logs/$name.$BASHPID.$timeit_runs.log"
  local tv="$BENCH_DIR/logs/$name.$BASHPID.$timeit_runs.time"
  local start end
  start=$(date +%s.%N)
  if ! /usr/bin/time -v -o "$tv" "$@" >"$log" 2>&1; then
    echo "timeit $name: command failed: $*" >&2
    tail -20 "$log" >&2
    return 1
  fi
  end=$(date +%s.%N)
  TIME_S=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }')
  RSS_MB=$(awk -F: '/Maximum resident set size/ { printf "%.1f", $2 / 1024 }' "$tv")
  TIMEIT_LOG="$log"
  printf '%s\t%s\t%s\n' "$name" "$TIME_S" "$RSS_MB" >>"$BENCH_DIR/timings.tsv"
}

median() {
  printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END {
    if (NR == 0) exit 1
    if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

report_row() {
  local label=$1 mine=$2 peer=$3 unit=${4:-}
  local ratio
  ratio=$(awk -v a="$mine" -v b="$peer" 'BEGIN { if (b == 0) print "n/a"; else printf "%.2f", a / b }')
  printf '%-44s invsync %12s %-6s peer %12s %-6s invsync/peer %s\n' \
    "$label" "$mine" "$unit" "$peer" "$unit" "$ratio" | tee -a "$REPORT"
}

report_value() {
  printf '%-44s %12s %s\n' "$1" "$2" "${3:-}" | tee -a "$REPORT"
}

psql_src() { psql -X -qtA -v ON_ERROR_STOP=1 "$SRC_URL" -c "$1"; }
psql_dst() { psql -X -qtA -v ON_ERROR_STOP=1 "$DST_URL" -c "$1"; }

settle() {
  psql_src "CHECKPOINT" >/dev/null
  psql_dst "CHECKPOINT" >/dev/null
  sync
}

rotate() {
  local n=$1
  shift
  local words=("$@") i
  for ((i = 0; i < ${#words[@]}; i++)); do
    printf '%s\n' "${words[$(((i + n) % ${#words[@]}))]}"
  done
}

change_table() {
  psql -X -qtA -v ON_ERROR_STOP=1 "$1" -c "CREATE TABLE IF NOT EXISTS public.bench_change (id bigint PRIMARY KEY,
    invoice_number text, amount numeric(12,2), note text, changed_at timestamptz DEFAULT now())" >/dev/null
}

change_prefill() {
  psql -X -qtA -v ON_ERROR_STOP=1 "$1" -c "INSERT INTO public.bench_change (id, invoice_number, amount, note)
    SELECT $2 - g, 'AB' || lpad(g::text, 8, '0'), g * 0.5, 'old' FROM generate_series(1, $(($3 / 2))) g" >/dev/null
}

change_backlog() {
  local base=$2 n=$3
  psql -X -qtA -v ON_ERROR_STOP=1 "$1" -c "
    DO \$\$
    DECLARE b bigint;
    BEGIN
      FOR k IN 0 .. ($n / 100) - 1 LOOP
        b := $base + k * 60;
        INSERT INTO public.bench_change (id, invoice_number, amount, note)
          SELECT b + g, 'AB' || lpad((b + g)::text, 8, '0'), g * 1.25, 'new' FROM generate_series(1, 60) g;
        UPDATE public.bench_change SET amount = amount + 1, note = 'upd'
          WHERE id > $base - (k + 1) * 30 AND id <= $base - k * 30;
        DELETE FROM public.bench_change
          WHERE id > $base - $((n * 3 / 10)) - (k + 1) * 10 AND id <= $base - $((n * 3 / 10)) - k * 10;
        COMMIT;
      END LOOP;
      INSERT INTO public.bench_change (id, note) VALUES (-$base, 'marker');
    END \$\$" >/dev/null
}

echo "== install what is missing, build release binaries"
ensure_postgres
ensure_rust_tools
ensure_time
cargo build --release --locked --bins

# Fresh clusters every run: figures must not depend on what an earlier run left.
cluster_stop "$BENCH_DIR/src" >/dev/null
cluster_stop "$BENCH_DIR/dst" >/dev/null
rm -rf "$BENCH_DIR"
mkdir -p "$BENCH_DIR/logs"
: >"$REPORT"
stop_clusters() {
  cluster_stop "$BENCH_DIR/src" || true
  cluster_stop "$BENCH_DIR/dst" || true
}
trap stop_clusters EXIT
# Durable settings (fsync on), sized so that a checkpoint does not land in the middle of a
# measurement by chance.
CONF=("shared_buffers = 512MB" "max_wal_size = 8GB" "checkpoint_timeout = 30min"
  "maintenance_work_mem = 256MB" "max_connections = 100")
SRC_PORT=$(cluster_start "$BENCH_DIR/src" "${CONF[@]}")
DST_PORT=$(cluster_start "$BENCH_DIR/dst" "${CONF[@]}")
SRC_URL="postgres://postgres@127.0.0.1:$SRC_PORT/einvoice?sslmode=disable"
DST_URL="postgres://postgres@127.0.0.1:$DST_PORT/einvoice?sslmode=disable"
export SRC_URL DST_URL SRC_PORT DST_PORT BENCH_DIR INVSYNC EINVOICE_GEN INVOICES BENCH_SEED BENCH_RUNS
export -f section timeit median report_row report_value psql_src psql_dst settle rotate \
  change_table change_prefill change_backlog
export REPORT

section "einvoice-gen fill: $INVOICES invoices into SRC (no peer)"
timeit fill "$EINVOICE_GEN" fill --url "$SRC_URL" --invoices "$INVOICES" --seed "$BENCH_SEED" --json
fill_rows=$(sed -n 's/.*"rows": \([0-9]*\).*/\1/p' "$TIMEIT_LOG")
report_value "fill wall time" "$TIME_S" s
report_value "fill rows (invoices, items, allowances, carriers)" "$fill_rows" rows
report_value "fill throughput" "$(awk -v r="$fill_rows" -v t="$TIME_S" 'BEGIN { printf "%.0f", r / t }')" rows/s
report_value "fill peak memory (einvoice-gen)" "$RSS_MB" MB
report_value "SRC database size" "$(psql_src "SELECT pg_size_pretty(pg_database_size('einvoice'))")"

failed=()
for f in scripts/bench/*.sh; do
  [ -e "$f" ] || continue
  if [ -n "${BENCH_ONLY:-}" ] && [[ "$(basename "$f")" != *"$BENCH_ONLY"* ]]; then
    continue
  fi
  set +e
  (
    set -e
    source "$f"
  )
  rc=$?
  set -e
  if [ "$rc" != 0 ]; then
    echo "section $f FAILED (exit $rc)" | tee -a "$REPORT"
    failed+=("$f")
  fi
done

printf '\n== report (also in %s)\n' "$REPORT"
cat "$REPORT"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "failed sections: ${failed[*]}"
  exit 1
fi
