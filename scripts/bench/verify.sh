# Section of scripts/bench.sh (sourced with set -e; see its header for the conventions):
# `invsync verify db` beside reladiff (PyPI, all columns compared, --threads RELADIFF_THREADS per
# database, default 2, as its documentation advises raising it from 1; one table at a time, as
# it compares) and beside two floors, on identical copies of the invoice and invoice_item
# tables, then with 10 rows changed on the target, then (invsync alone, for its time and peak
# memory) with 10% of the rows changed.
# The floors read the same tables on both sides at once, one table after the other, in
# sessions set as invsync's (jit off, its text form), with the server's parallel workers:
#   count floor:  `SELECT count(*)` of each table, the least any scan costs;
#   hash floor:   `SELECT count(*), sum(<invsync's row hash>)`, the same read with the same hash
#                 expression invsync's checksums use (without its key buckets).
# The differences reladiff reports are counted (distinct keys) and checked against those planted.

VERIFY_DIR="$BENCH_DIR/verify"
mkdir -p "$VERIFY_DIR"
VERIFY_TABLES=(invoice invoice_item)

# reladiff lives in the project's .venv, like moto for the tests.
if [ ! -x .venv/bin/reladiff ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet 'reladiff[postgresql]==0.6.0'
fi
RELADIFF="$PWD/.venv/bin/reladiff"
VENV_PYTHON="$PWD/.venv/bin/python"

section "verify db: ${VERIFY_TABLES[*]} of $INVOICES invoices, identical copies"
"$EINVOICE_GEN" fill --url "$DST_URL" --invoices "$INVOICES" --seed "$BENCH_SEED" >/dev/null
psql_src "ANALYZE" >/dev/null
psql_dst "ANALYZE" >/dev/null

# invsync: exit 0 identical, 1 differences; anything else is a failure.
verify_invsync() {
  "$INVSYNC" verify db --source "$SRC_URL" --target "$DST_URL" \
    --tables "$(printf 'public.%s,' "${VERIFY_TABLES[@]}" | sed 's/,$//')" --json >"$VERIFY_DIR/invsync.json"
  local rc=$?
  [ "$rc" -le 1 ]
}
# reladiff: one run per table, as it compares one table at a time; JSON lines, one per
# differing row image.
RELADIFF_THREADS="${RELADIFF_THREADS:-2}"
verify_reladiff() {
  local src=${SRC_URL%%\?*} dst=${DST_URL%%\?*}
  src=${src/postgres:/postgresql:}
  dst=${dst/postgres:/postgresql:}
  # A wide console, so that its JSON lines are not wrapped.
  export COLUMNS=1000000
  "$RELADIFF" "$src" invoice "$dst" invoice -k invoice_number -c '%' --threads "$RELADIFF_THREADS" --json \
    >"$VERIFY_DIR/reladiff-invoice.jsonl" 2>/dev/null
  "$RELADIFF" "$src" invoice_item "$dst" invoice_item -k invoice_number -k seq -c '%' --threads "$RELADIFF_THREADS" --json \
    >"$VERIFY_DIR/reladiff-invoice_item.jsonl" 2>/dev/null
}
# How many distinct keys reladiff reported as differing, over both tables.
reladiff_found() {
  # A stream of JSON values: reladiff prints through a console that may wrap long lines.
  "$VENV_PYTHON" -c '
import json, sys
decoder = json.JSONDecoder(strict=False)
n = 0
for path, width in ((sys.argv[1], 1), (sys.argv[2], 2)):
    text, pos, keys = open(path).read(), 0, set()
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            break
        value, pos = decoder.raw_decode(text, pos)
        keys.add(tuple(value[1][:width]))
    n += len(keys)
print(n)' "$VERIFY_DIR/reladiff-invoice.jsonl" "$VERIFY_DIR/reladiff-invoice_item.jsonl"
}
# The floors' session: invsync's scan settings and text form.
FLOOR_SET="SET jit = off; SET statement_timeout = 0; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres';
  SET TimeZone = 'UTC'; SET extra_float_digits = 3; SET lc_monetary = 'C'; SET bytea_output = 'hex';"
# invsync's row hash of each table: every column's text hashed with its position as seed.
row_hash() {
  psql_src "SELECT '(' || string_agg(format('coalesce(hashtextextended(%I::text, %s), %s)', attname, n - 1, -n), ' # ' ORDER BY n) || ')'
            FROM (SELECT attname, row_number() OVER (ORDER BY attnum) AS n FROM pg_attribute
                  WHERE attrelid = 'public.$1'::regclass AND attnum > 0 AND NOT attisdropped) c"
}
for t in "${VERIFY_TABLES[@]}"; do
  echo "SELECT count(*), sum($(row_hash "$t")) FROM public.$t" >"$VERIFY_DIR/hash-$t.sql"
  echo "SELECT count(*) FROM public.$t" >"$VERIFY_DIR/count-$t.sql"
done
# verify_floor count|hash: the floor's query of each table on both sides at once.
verify_floor() {
  local t
  for t in "${VERIFY_TABLES[@]}"; do
    psql -X -qtA -v ON_ERROR_STOP=1 "$SRC_URL" -c "$FLOOR_SET" -c "$(cat "$VERIFY_DIR/$1-$t.sql")" >/dev/null &
    psql -X -qtA -v ON_ERROR_STOP=1 "$DST_URL" -c "$FLOOR_SET" -c "$(cat "$VERIFY_DIR/$1-$t.sql")" >/dev/null &
    wait
  done
}
export -f verify_invsync verify_reladiff verify_floor
export VERIFY_DIR RELADIFF RELADIFF_THREADS FLOOR_SET
export VERIFY_TABLES_LIST="${VERIFY_TABLES[*]}"

verify_round() {
  local label=$1 round side mine=() peer=() count=() hash=() mine_mb=() peer_mb=()
  for round in $(seq 0 $((BENCH_RUNS - 1))); do
    for side in $(rotate "$round" invsync reladiff count hash); do
      settle
      case $side in
      invsync)
        timeit "verify-invsync-$label" bash -c 'VERIFY_TABLES=($VERIFY_TABLES_LIST); verify_invsync'
        mine+=("$TIME_S") mine_mb+=("$RSS_MB")
        ;;
      reladiff)
        timeit "verify-reladiff-$label" bash -c 'verify_reladiff'
        peer+=("$TIME_S") peer_mb+=("$RSS_MB")
        ;;
      count | hash)
        timeit "verify-floor-$side-$label" bash -c "VERIFY_TABLES=(\$VERIFY_TABLES_LIST); verify_floor $side"
        if [ "$side" = count ]; then count+=("$TIME_S"); else hash+=("$TIME_S"); fi
        ;;
      esac
    done
  done
  report_row "verify db $label vs reladiff --threads $RELADIFF_THREADS (s)" "$(median "${mine[@]}")" "$(median "${peer[@]}")" s
  report_row "verify db $label vs count floor (s)" "$(median "${mine[@]}")" "$(median "${count[@]}")" s
  report_row "verify db $label vs hash floor (s)" "$(median "${mine[@]}")" "$(median "${hash[@]}")" s
  report_row "verify db $label peak memory vs reladiff" "$(median "${mine_mb[@]}")" "$(median "${peer_mb[@]}")" MB
}
# report_found PLANTED: invsync's and reladiff's counts of differing rows beside the planted
# number, with a warning row for a tool that did not find exactly those.
report_found() {
  local planted=$1 mine peer
  mine=$({ grep -o '"kind"' "$VERIFY_DIR/invsync.json" || true; } | wc -l)
  peer=$(reladiff_found)
  report_row "verify db: differing rows reported (planted: $planted)" "$mine" "$peer" rows
  if [ "$mine" != "$planted" ]; then report_value "WARNING: invsync reported $mine differing rows, $planted planted" "$mine"; fi
  if [ "$peer" != "$planted" ]; then report_value "WARNING: reladiff reported $peer differing rows, $planted planted" "$peer"; fi
}

verify_round identical
report_found 0

section "verify db: 10 rows changed on the target"
# plant_ten STEP: 5 invoices' status flipped and 5 items' quantity moved by STEP on the target;
# `plant_ten -1` puts them back.
plant_ten() {
  psql_dst "UPDATE public.invoice SET status = CASE status WHEN 'issued' THEN 'voided' ELSE 'issued' END
            WHERE invoice_number IN (SELECT invoice_number FROM public.invoice ORDER BY invoice_number
                                     OFFSET (SELECT count(*) / 11 FROM public.invoice) LIMIT 5);
            UPDATE public.invoice_item SET quantity = quantity + ($1)
            WHERE (invoice_number, seq) IN (SELECT invoice_number, seq FROM public.invoice_item
                                            ORDER BY 1, 2 DESC LIMIT 5)" >/dev/null
}
plant_ten 1
verify_round "10 differences"
report_found 10
plant_ten -1

section "verify db: 10% of rows changed on the target (memory stays bounded)"
# Every 10th invoice and every 10th item changed; one run, as the peer takes minutes here.
psql_dst "UPDATE public.invoice SET status = CASE status WHEN 'issued' THEN 'voided' ELSE 'issued' END
          WHERE hashtext(invoice_number) % 10 = 0;
          UPDATE public.invoice_item SET quantity = quantity + 1
          WHERE hashtext(invoice_number || seq) % 10 = 0" >/dev/null
changed=$(psql_src "SELECT (SELECT count(*) FROM public.invoice WHERE hashtext(invoice_number) % 10 = 0)
                         + (SELECT count(*) FROM public.invoice_item WHERE hashtext(invoice_number || seq) % 10 = 0)")
settle
timeit "verify-invsync-10pct" bash -c '"$INVSYNC" verify db --source "$SRC_URL" --target "$DST_URL" \
  --tables public.invoice,public.invoice_item --repair-sql "$VERIFY_DIR/repair.sql" --json \
  >"$VERIFY_DIR/invsync-10pct.json"; [ $? -le 1 ]'
found=$(sed -n 's/^      "differences_found": \([0-9]*\),*/\1/p' "$VERIFY_DIR/invsync-10pct.json" |
  awk '{ s += $1 } END { print s + 0 }')
report_value "verify db 10%: rows changed" "$changed" rows
report_value "verify db 10%: differing rows counted" "$found" rows
if [ "$found" != "$changed" ]; then report_value "WARNING: invsync counted $found differing rows, $changed changed" "$found"; fi
report_value "verify db 10%: wall time (incl. repair SQL)" "$TIME_S" s
report_value "verify db 10%: peak memory" "$RSS_MB" MB
report_value "verify db 10%: repair SQL statements" "$(grep -c '^UPDATE' "$VERIFY_DIR/repair.sql")" lines

# Leave DST empty again, as bench.sh found it.
psql_dst "DROP TABLE IF EXISTS public.invoice, public.invoice_item, public.allowance, public.carrier" >/dev/null
