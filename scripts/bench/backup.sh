# Benchmark section: backup and restore, invsync beside restic and borg (and pg_dump/pg_restore).
# Sourced by scripts/bench.sh (see its conventions). Works on a copy of SRC's database
# (`bench_backup`), so SRC's `einvoice` is left as it was; DST's tables are dropped after
# every restore. BACKUP_ONLY=large runs only the part on a table of large values.
#
# The peers cannot read a database: their timed part includes dumping the same tables with
# `COPY (SELECT * FROM t ORDER BY pk) TO` into files, which they then back up. invsync reads
# the database itself. Repository set-up (init, keys) is outside the timed part for all.

section "backup: first backup, second backups, restore (INVOICES=$INVOICES)"
command -v restic >/dev/null 2>&1 || apt_install restic
command -v borg >/dev/null 2>&1 || apt_install borgbackup
ensure_age

B="$BENCH_DIR/backup"
rm -rf "$B"
mkdir -p "$B"
export RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes \
  BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
SRC_BASE="${SRC_URL%%/einvoice*}"
BDB_URL="$SRC_BASE/bench_backup?sslmode=disable"
psql -X -qtA -v ON_ERROR_STOP=1 "$SRC_BASE/postgres?sslmode=disable" \
  -c "DROP DATABASE IF EXISTS bench_backup" -c "CREATE DATABASE bench_backup TEMPLATE einvoice"
cleanup_backup() {
  psql -X -qtA "$SRC_BASE/postgres?sslmode=disable" -c "DROP DATABASE IF EXISTS bench_backup" >/dev/null || true
  drop_dst_tables || true
}
trap cleanup_backup EXIT
bdb() { psql -X -qtA -v ON_ERROR_STOP=1 "$BDB_URL" -c "$1"; }
drop_dst_tables() {
  psql_dst "SELECT format('DROP TABLE %I.%I', schemaname, tablename) FROM pg_tables WHERE schemaname = 'public'" |
    while read -r stmt; do psql_dst "$stmt" >/dev/null; done
}
TABLES=$(bdb "SELECT string_agg(tablename, ' ' ORDER BY tablename) FROM pg_tables WHERE schemaname = 'public'")

age-keygen -o "$B/key.txt" 2>/dev/null
RECIPIENT=$(age-keygen -y "$B/key.txt")
{
  echo "[databases.src]"
  echo "url = \"$BDB_URL\""
  echo "[databases.dst]"
  echo "url = \"$DST_URL\""
  for i in 1 2 3; do
    echo "[repositories.r$i]"
    echo "url = \"file://$B/invsync-$i\""
    echo "recipients = [\"$RECIPIENT\"]"
    echo "identity_file = \"$B/key.txt\""
  done
} >"$B/invsync.toml"
inv() { "$INVSYNC" --config "$B/invsync.toml" --log warn "$@"; }

# The peers' dump: every table, ordered by its primary key, as COPY text.
dump_tables() {
  local dir=$1 t pk
  rm -rf "$dir"
  mkdir -p "$dir"
  for t in $TABLES; do
    pk=$(bdb "SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY array_position(i.indkey::int2[], a.attnum))
              FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
              WHERE i.indrelid = 'public.$t'::regclass AND i.indisprimary")
    psql -X -qtA -v ON_ERROR_STOP=1 "$BDB_URL" -c "\\copy (SELECT * FROM public.$t ORDER BY $pk) TO '$dir/$t.copy'"
  done
}
export -f dump_tables bdb
export TABLES BDB_URL
size_of() { du -sb "$1" | cut -f1; }
# "N reused unread, M read" from invsync's backup summary.
segments_of() { sed -n 's/.*table segments: \([0-9]* reused unread, [0-9]* read\).*/\1/p' "$1"; }

# ---- large values: 20 values of 32 MB in one table (scanned documents, XML), alternating ----
# Every other value is incompressible (md5 output), the others repetitive XML. Its own
# database and repositories; BACKUP_ONLY=large runs just this part.
LDB_URL="$SRC_BASE/bench_large?sslmode=disable"
psql -X -qtA -v ON_ERROR_STOP=1 "$SRC_BASE/postgres?sslmode=disable" \
  -c "DROP DATABASE IF EXISTS bench_large" -c "CREATE DATABASE bench_large"
psql -X -qtA -v ON_ERROR_STOP=1 "$LDB_URL" -c "CREATE TABLE scans (id int PRIMARY KEY, doc bytea)" \
  -c "INSERT INTO scans SELECT i, CASE WHEN i % 2 = 0
        THEN (SELECT decode(string_agg(md5((i * 100000000 + g)::text), '' ORDER BY g), 'hex') FROM generate_series(1, 32 * 65536) g)
        ELSE convert_to(substr(repeat('<invoice><no>AB' || lpad(i::text, 8, '0') || '</no></invoice>', 900000), 1, 32 * 1048576), 'UTF8') END
      FROM generate_series(1, 20) i"
{
  echo "[databases.large]"
  echo "url = \"$LDB_URL\""
  for i in 1 2 3; do
    echo "[repositories.l$i]"
    echo "url = \"file://$B/large-invsync-$i\""
    echo "recipients = [\"$RECIPIENT\"]"
    echo "identity_file = \"$B/key.txt\""
  done
} >>"$B/invsync.toml"
# dump_large DIR: the table's COPY text into DIR (made afresh).
dump_large() {
  rm -rf "$1" && mkdir -p "$1" &&
    psql -X -qtA -v ON_ERROR_STOP=1 "$LDB_URL" -c "\\copy (SELECT * FROM scans ORDER BY id) TO '$1/scans.copy'"
}
export -f dump_large
export LDB_URL
inv_t=() res_t=() borg_t=() inv_m=() res_m=() borg_m=()
for i in 1 2 3; do
  inv repo init --repo "l$i" >/dev/null
  timeit large_invsync "$INVSYNC" --config "$B/invsync.toml" --log warn backup --repo "l$i" --db large --tables public.scans
  inv_t+=("$TIME_S") inv_m+=("$RSS_MB")
  restic init --repo "$B/large-restic-$i" >/dev/null 2>&1
  timeit large_restic bash -c "dump_large '$B/large-dump' && restic backup --repo '$B/large-restic-$i' '$B/large-dump'"
  res_t+=("$TIME_S") res_m+=("$RSS_MB")
  borg init --encryption=repokey "$B/large-borg-$i" >/dev/null 2>&1
  timeit large_borg bash -c "dump_large '$B/large-dump' && borg create '$B/large-borg-$i::first' '$B/large-dump'"
  borg_t+=("$TIME_S") borg_m+=("$RSS_MB")
done
report_row "large values backup, s (peer: restic)" "$(median "${inv_t[@]}")" "$(median "${res_t[@]}")" s
report_row "large values backup, s (peer: borg)" "$(median "${inv_t[@]}")" "$(median "${borg_t[@]}")" s
report_row "large values backup peak RSS, MB (restic)" "$(median "${inv_m[@]}")" "$(median "${res_m[@]}")" MB
report_row "large values backup peak RSS, MB (borg)" "$(median "${inv_m[@]}")" "$(median "${borg_m[@]}")" MB
report_row "large values stored, bytes (peer: restic)" "$(size_of "$B/large-invsync-3")" "$(size_of "$B/large-restic-3")" B
drop_dst_tables
timeit large_restore_invsync "$INVSYNC" --config "$B/invsync.toml" --log warn restore latest --repo l3 --to-db dst
report_value "large values restore, invsync" "$TIME_S" s
report_value "large values restore peak RSS, invsync" "$RSS_MB" MB
drop_dst_tables
rm -rf "$B"/large-*
psql -X -qtA "$SRC_BASE/postgres?sslmode=disable" -c "DROP DATABASE IF EXISTS bench_large" >/dev/null
if [ "${BACKUP_ONLY:-}" = large ]; then
  cleanup_backup
  trap - EXIT
  return 0
fi

# ---- first backup: three runs each, alternating ----
inv_t=() res_t=() borg_t=() inv_m=() res_m=() borg_m=()
for i in 1 2 3; do
  inv repo init --repo "r$i" >/dev/null
  timeit backup_invsync "$INVSYNC" --config "$B/invsync.toml" --log warn backup --repo "r$i" --db src --tables 'public.*'
  inv_t+=("$TIME_S") inv_m+=("$RSS_MB") inv_segs=$(segments_of "$TIMEIT_LOG")
  restic init --repo "$B/restic-$i" >/dev/null 2>&1
  timeit backup_restic bash -c "dump_tables '$B/dump' && restic backup --repo '$B/restic-$i' '$B/dump'"
  res_t+=("$TIME_S") res_m+=("$RSS_MB")
  borg init --encryption=repokey "$B/borg-$i" >/dev/null 2>&1
  timeit backup_borg bash -c "dump_tables '$B/dump' && borg create '$B/borg-$i::first' '$B/dump'"
  borg_t+=("$TIME_S") borg_m+=("$RSS_MB")
done
INV_FIRST=$(median "${inv_t[@]}")
report_row "first backup, s (peer: restic)" "$INV_FIRST" "$(median "${res_t[@]}")" s
report_row "first backup, s (peer: borg)" "$INV_FIRST" "$(median "${borg_t[@]}")" s
INV_SIZE=$(size_of "$B/invsync-3")
report_row "first backup stored, bytes (peer: restic)" "$INV_SIZE" "$(size_of "$B/restic-3")" B
report_row "first backup stored, bytes (peer: borg)" "$INV_SIZE" "$(size_of "$B/borg-3")" B
report_value "first backup, invsync table segments" "$inv_segs"
report_row "first backup peak RSS, MB (peer: restic)" "$(median "${inv_m[@]}")" "$(median "${res_m[@]}")" MB
report_row "first backup peak RSS, MB (peer: borg)" "$(median "${inv_m[@]}")" "$(median "${borg_m[@]}")" MB

# ---- second backups: one run each against the third repositories ----
second() {
  local label=$1 before_i before_r before_b
  before_i=$(size_of "$B/invsync-3") before_r=$(size_of "$B/restic-3") before_b=$(size_of "$B/borg-3")
  timeit backup2_invsync "$INVSYNC" --config "$B/invsync.toml" --log warn backup --repo r3 --db src --tables 'public.*'
  local ti=$TIME_S mi=$RSS_MB segs
  segs=$(segments_of "$TIMEIT_LOG")
  timeit backup2_restic bash -c "dump_tables '$B/dump' && restic backup --repo '$B/restic-3' '$B/dump'"
  local tr=$TIME_S
  timeit backup2_borg bash -c "dump_tables '$B/dump' && borg create '$B/borg-3::$label' '$B/dump'"
  local tb=$TIME_S
  local ai ar ab
  ai=$(($(size_of "$B/invsync-3") - before_i)) ar=$(($(size_of "$B/restic-3") - before_r)) ab=$(($(size_of "$B/borg-3") - before_b))
  report_row "second backup ($label), s (peer: restic)" "$ti" "$tr" s
  report_row "second backup ($label), s (peer: borg)" "$ti" "$tb" s
  report_row "second backup ($label) stored, B (restic)" "$ai" "$ar" B
  report_row "second backup ($label) stored, B (borg)" "$ai" "$ab" B
  report_value "second backup ($label) / first, invsync bytes" "$(awk -v a="$ai" -v b="$INV_SIZE" 'BEGIN { printf "%.2f%%", 100 * a / b }')"
  report_value "second backup ($label) / first, invsync time" "$(awk -v a="$ti" -v b="$INV_FIRST" 'BEGIN { printf "%.2f", a / b }')"
  report_value "second backup ($label) peak RSS, invsync" "$mi" MB
  report_value "second backup ($label), invsync table segments" "$segs"
}
N=$(bdb "SELECT greatest(count(*) / 100, 1) FROM invoice")
# 1% of invoices updated at the recent end of the key order, and 1% added after it.
bdb "UPDATE invoice SET status = 'voided', updated_at = now()
     WHERE invoice_number IN (SELECT invoice_number FROM invoice ORDER BY invoice_number DESC LIMIT $N)" >/dev/null
bdb "INSERT INTO invoice SELECT (jsonb_populate_record(i, jsonb_build_object('invoice_number', 'ZZ' || substr(i.invoice_number, 3)))).*
     FROM invoice i ORDER BY invoice_number DESC LIMIT $N ON CONFLICT DO NOTHING" >/dev/null
second "1% updated + 1% added at the end"
# 1% of invoices updated, spread evenly over the key order.
bdb "UPDATE invoice SET updated_at = updated_at + interval '1 second' WHERE abs(hashtext(invoice_number)) % 100 = 0" >/dev/null
second "1% updated evenly"

# ---- restore into DST: three runs each, alternating ----
drop_dst_tables
rm -rf "$B/pgdump"
pg_dump -Fd -j2 -f "$B/pgdump" -t 'public.*' "$BDB_URL"
# restic holds only the table data; the end-to-end peer also needs the schema. Taken here,
# outside the timed part (like the peers' repository set-up), as a schema-only dump.
pg_dump -Fc --schema-only -f "$B/schema.dump" -t 'public.*' "$BDB_URL"
# The end-to-end peer: restic restores the dump files, then they are loaded the way invsync
# loads: tables created, each filled with COPY .. FREEZE in the transaction that truncates
# it, two tables at a time, then constraints and indexes built two at a time.
restic_restore_and_load() {
  restic restore latest --repo "$B/restic-3" --target "$B/restic-out" &&
    pg_restore --section=pre-data -d "$DST_URL" "$B/schema.dump" &&
    printf '%s\n' $TABLES | xargs -P2 -I{} psql -X -q -v ON_ERROR_STOP=1 "$DST_URL" \
      -c "BEGIN" -c "TRUNCATE public.{}" -c "\\copy public.{} FROM '$B/restic-out$B/dump/{}.copy' WITH (FREEZE)" -c "COMMIT" &&
    pg_restore -j2 --section=post-data -d "$DST_URL" "$B/schema.dump"
}
export -f restic_restore_and_load
export B DST_URL
inv_t=() pgr_t=() res_t=() rel_t=() inv_m=() pgr_m=() res_m=() rel_m=()
for i in 1 2 3; do
  timeit restore_invsync "$INVSYNC" --config "$B/invsync.toml" --log warn restore latest --repo r3 --to-db dst
  inv_t+=("$TIME_S") inv_m+=("$RSS_MB")
  drop_dst_tables
  timeit restore_pg_restore pg_restore -j2 -d "$DST_URL" "$B/pgdump"
  pgr_t+=("$TIME_S") pgr_m+=("$RSS_MB")
  drop_dst_tables
  rm -rf "$B/restic-out"
  timeit restore_restic_load bash -c restic_restore_and_load
  rel_t+=("$TIME_S") rel_m+=("$RSS_MB")
  drop_dst_tables
  rm -rf "$B/restic-out"
  timeit restore_restic restic restore latest --repo "$B/restic-3" --target "$B/restic-out"
  res_t+=("$TIME_S") res_m+=("$RSS_MB")
done
INV_RESTORE=$(median "${inv_t[@]}")
report_row "restore into empty DB, s (peer: pg_restore -j2)" "$INV_RESTORE" "$(median "${pgr_t[@]}")" s
report_row "restore into empty DB, s (peer: restic restore + load: schema, COPY FREEZE -P2, indexes -j2)" "$INV_RESTORE" "$(median "${rel_t[@]}")" s
report_row "restore into DB vs restic FILES ONLY, s (peer: restic restore of the dump, no load)" "$INV_RESTORE" "$(median "${res_t[@]}")" s
report_row "restore peak RSS, MB (peer: pg_restore)" "$(median "${inv_m[@]}")" "$(median "${pgr_m[@]}")" MB
report_row "restore peak RSS, MB (peer: restic + load, largest process)" "$(median "${inv_m[@]}")" "$(median "${rel_m[@]}")" MB
report_row "restore peak RSS, MB (peer: restic files only)" "$(median "${inv_m[@]}")" "$(median "${res_m[@]}")" MB
cleanup_backup
trap - EXIT
