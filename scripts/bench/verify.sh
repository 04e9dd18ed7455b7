# Section of scripts/bench.sh (sourced with set -e; see its header for the conventions):
# `invsync verify db` beside reladiff (PyPI, its defaults, all columns compared) and beside the
# scan floor (`SELECT count(*), sum(hashtext(t::text))` on both sides at once), on identical
# copies of the invoice and invoice_item tables, then with 10 rows changed on the target.

VERIFY_DIR="$BENCH_DIR/verify"
mkdir -p "$VERIFY_DIR"
VERIFY_TABLES=(invoice invoice_item)

# reladiff lives in the project's .venv, like moto for the tests.
if [ ! -x .venv/bin/reladiff ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet 'reladiff[postgresql]==0.6.0'
fi
RELADIFF="$PWD/.venv/bin/reladiff"

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
# reladiff: one run per table, as it compares one table at a time.
verify_reladiff() {
  local src=${SRC_URL%%\?*} dst=${DST_URL%%\?*}
  src=${src/postgres:/postgresql:}
  dst=${dst/postgres:/postgresql:}
  : >"$VERIFY_DIR/reladiff.out"
  "$RELADIFF" "$src" invoice "$dst" invoice -k invoice_number -c '%' >>"$VERIFY_DIR/reladiff.out" 2>/dev/null
  "$RELADIFF" "$src" invoice_item "$dst" invoice_item -k invoice_number -k seq -c '%' \
    >>"$VERIFY_DIR/reladiff.out" 2>/dev/null
}
verify_floor() {
  local t
  for t in "${VERIFY_TABLES[@]}"; do
    psql -X -qtA "$SRC_URL" -c "SELECT count(*), sum(hashtext(t::text)) FROM public.$t t" &
    psql -X -qtA "$DST_URL" -c "SELECT count(*), sum(hashtext(t::text)) FROM public.$t t" &
    wait
  done
}
export -f verify_invsync verify_reladiff verify_floor
export VERIFY_DIR RELADIFF
export VERIFY_TABLES_LIST="${VERIFY_TABLES[*]}"

verify_round() {
  local label=$1 mine=() peer=() floor=() mine_mb=() peer_mb=()
  for _ in 1 2 3; do
    timeit "verify-invsync-$label" bash -c 'VERIFY_TABLES=($VERIFY_TABLES_LIST); verify_invsync'
    mine+=("$TIME_S")
    mine_mb+=("$RSS_MB")
    timeit "verify-reladiff-$label" bash -c 'verify_reladiff'
    peer+=("$TIME_S")
    peer_mb+=("$RSS_MB")
    timeit "verify-floor-$label" bash -c 'VERIFY_TABLES=($VERIFY_TABLES_LIST); verify_floor'
    floor+=("$TIME_S")
  done
  report_row "verify db $label vs reladiff (s)" "$(median "${mine[@]}")" "$(median "${peer[@]}")" s
  report_row "verify db $label vs scan floor (s)" "$(median "${mine[@]}")" "$(median "${floor[@]}")" s
  report_row "verify db $label peak memory vs reladiff" "$(median "${mine_mb[@]}")" "$(median "${peer_mb[@]}")" MB
}

verify_round identical
found=$({ grep -o '"kind"' "$VERIFY_DIR/invsync.json" || true; } | wc -l)
report_value "verify db identical: differences reported" "$found" rows

section "verify db: 10 rows changed on the target"
psql_dst "UPDATE public.invoice SET status = CASE status WHEN 'issued' THEN 'voided' ELSE 'issued' END
          WHERE invoice_number IN (SELECT invoice_number FROM public.invoice ORDER BY invoice_number
                                   OFFSET (SELECT count(*) / 11 FROM public.invoice) LIMIT 5);
          UPDATE public.invoice_item SET quantity = quantity + 1
          WHERE (invoice_number, seq) IN (SELECT invoice_number, seq FROM public.invoice_item
                                          ORDER BY 1, 2 DESC LIMIT 5)" >/dev/null
verify_round "10 differences"
found=$({ grep -o '"kind"' "$VERIFY_DIR/invsync.json" || true; } | wc -l)
report_value "verify db: differing rows reported (of 10)" "$found" rows

# Leave DST empty again, as bench.sh found it.
psql_dst "DROP TABLE IF EXISTS public.invoice, public.invoice_item, public.allowance, public.carrier" >/dev/null
