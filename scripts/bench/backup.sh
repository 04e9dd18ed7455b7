# Benchmark section: backup and restore, invsync beside restic and borg (and pg_dump/pg_restore).
# Sourced by scripts/bench.sh (see its conventions and fairness rules). Works on a copy of
# SRC's database (`bench_backup`), so SRC's `einvoice` is left as it was; DST's database is
# made afresh (empty) before every restore. BACKUP_ONLY=large runs only the part on a table
# of large values.
#
# The peers cannot read a database. Their best fair pipeline, timed as one command: each table
# streamed from `COPY (SELECT * FROM t ORDER BY pk) TO STDOUT` straight into the tool (restic:
# `backup --stdin --stdin-filename t.copy`, two tables at a time like invsync's two sessions;
# borg: `create --content-from-command`, one table at a time, as `borg create` holds the
# repository's lock exclusively). The COPY statements are built before the timing. Each part is
# also timed alone: the dump (the same COPYs, two at a time, to /dev/null) and the peer (a
# backup of the dump already on disk). The peers' COPYs run in separate transactions (no one
# consistent cut, which invsync pays for): that favours the peers.
# Keys: invsync runs in passphrase mode (the repository key wrapped with an age scrypt
# passphrase, derived on every command), as restic derives its key with scrypt on every
# command; borg's repokey uses PBKDF2. That derivation is inside every timing of both, and is
# also timed alone (listing snapshots), with its peak memory. Compression: restic's default (auto, zstd), borg with its
# default (lz4) and with zstd (its default level), invsync's zstd.

section "backup: first backup, second backups, restore (INVOICES=$INVOICES)"
command -v restic >/dev/null 2>&1 || apt_install restic
command -v borg >/dev/null 2>&1 || apt_install borgbackup

B="$BENCH_DIR/backup"
rm -rf "$B"
mkdir -p "$B"
export RESTIC_PASSWORD=bench BORG_PASSPHRASE=bench BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes \
  BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
SRC_BASE="${SRC_URL%%/einvoice*}"
DST_BASE="${DST_URL%%/einvoice*}"
BDB_URL="$SRC_BASE/bench_backup?sslmode=disable"
psql -X -qtA -v ON_ERROR_STOP=1 "$SRC_BASE/postgres?sslmode=disable" \
  -c "DROP DATABASE IF EXISTS bench_backup" -c "CREATE DATABASE bench_backup TEMPLATE einvoice"
# DST's `einvoice`, dropped and created empty: every restore starts from an empty database.
fresh_dst() {
  psql -X -qtA -v ON_ERROR_STOP=1 "$DST_BASE/postgres?sslmode=disable" \
    -c "DROP DATABASE IF EXISTS einvoice WITH (FORCE)" -c "CREATE DATABASE einvoice" >/dev/null
}
cleanup_backup() {
  psql -X -qtA "$SRC_BASE/postgres?sslmode=disable" -c "DROP DATABASE IF EXISTS bench_backup" >/dev/null || true
  psql -X -qtA "$SRC_BASE/postgres?sslmode=disable" -c "DROP DATABASE IF EXISTS bench_large" >/dev/null || true
  fresh_dst || true
}
trap cleanup_backup EXIT
bdb() { psql -X -qtA -v ON_ERROR_STOP=1 "$BDB_URL" -c "$1"; }
# Items and allowances belong to an invoice; the generated schema does not declare it, the
# copy does, so that every backup and restore below carries foreign keys to build and validate.
bdb "ALTER TABLE invoice_item ADD FOREIGN KEY (invoice_number) REFERENCES invoice;
     ALTER TABLE allowance ADD FOREIGN KEY (invoice_number) REFERENCES invoice" >/dev/null
TABLES=$(bdb "SELECT string_agg(tablename, ' ' ORDER BY tablename) FROM pg_tables WHERE schemaname = 'public'")

{
  echo "[databases.src]"
  echo "url = \"$BDB_URL\""
  echo "[databases.dst]"
  echo "url = \"$DST_URL\""
  for r in inv large; do
    echo "[repositories.$r]"
    echo "url = \"file://$B/$r-invsync\""
    # shellcheck disable=SC2016 # invsync expands it from the environment
    echo 'passphrase = "${RESTIC_PASSWORD}"'
  done
} >"$B/invsync.toml"
inv() { "$INVSYNC" --config "$B/invsync.toml" --log warn "$@"; }

# copy_statements URL DIR: one file DIR/<table>.sql per table of URL's `public` schema,
# holding the COPY that streams it ordered by its primary key.
copy_statements() {
  local url=$1 dir=$2 t pk
  rm -rf "$dir" && mkdir -p "$dir"
  for t in $(psql -X -qtA -v ON_ERROR_STOP=1 "$url" -c "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"); do
    pk=$(psql -X -qtA -v ON_ERROR_STOP=1 "$url" -c "SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY array_position(i.indkey::int2[], a.attnum))
              FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
              WHERE i.indrelid = 'public.$t'::regclass AND i.indisprimary")
    echo "COPY (SELECT * FROM public.$t ORDER BY $pk) TO STDOUT" >"$dir/$t.sql"
  done
}
# The pipelines' parts. Each takes the database URL and the directory of COPY statements.
copy_out() { psql -X -qtA -v ON_ERROR_STOP=1 "$1" -c "$(cat "$2/$3.sql")"; }
# restic_one REPO URL SQLDIR TABLE: one table streamed into restic.
restic_one() {
  set -o pipefail
  copy_out "$2" "$3" "$4" | restic backup --repo "$1" --quiet --stdin --stdin-filename "$4.copy"
}
# tables_of SQLDIR: the table names, one a line.
tables_of() { for f in "$1"/*.sql; do basename "$f" .sql; done; }
# restic_stream REPO URL SQLDIR: every table, two at a time.
restic_stream() {
  tables_of "$3" | xargs -P2 -n1 bash -c 'restic_one "$@"' _ "$1" "$2" "$3"
}
# borg_stream REPO ARCHIVE URL SQLDIR COMPRESSION: every table, one archive ARCHIVE-<table> each.
borg_stream() {
  local t
  for t in $(tables_of "$4"); do
    BORG_BASE_DIR="$1.home" borg create --compression "$5" --content-from-command --stdin-name "$t.copy" \
      "$1::$2-$t" -- psql -X -qtA -v ON_ERROR_STOP=1 "$3" -c "$(cat "$4/$t.sql")" || return 1
  done
}
# dump_null URL SQLDIR: the dump alone, two tables at a time, into /dev/null.
dump_null() {
  tables_of "$2" | xargs -P2 -n1 bash -c 'copy_out "$@" >/dev/null' _ "$1" "$2"
}
# dump_files URL SQLDIR DIR: the dump, two tables at a time, into DIR/<table>.copy (made afresh).
dump_files() {
  rm -rf "$3" && mkdir -p "$3" &&
    tables_of "$2" | xargs -P2 -n1 bash -c 'copy_out "$1" "$2" "$4" >"$3/$4.copy"' _ "$1" "$2" "$3"
}
export -f copy_out restic_one tables_of restic_stream borg_stream dump_null dump_files
export BDB_URL
size_of() { du -sb "$1" | cut -f1; }
# "N reused unread, M read" from invsync's backup summary.
segments_of() { sed -n 's/.*table segments: \([0-9]* reused unread, [0-9]* read\).*/\1/p' "$1"; }
# new_repo SIDE PATH: an empty repository of SIDE's tool at PATH (the old one removed).
new_repo() {
  rm -rf "$2"
  case $1 in
  invsync) inv repo init --repo "$(basename "$2" -invsync)" >/dev/null ;;
  restic*) restic init --repo "$2" >/dev/null 2>&1 ;;
  borg*)
    rm -rf "$2.home"
    BORG_BASE_DIR="$2.home" borg init --encryption=repokey "$2" >/dev/null 2>&1
    ;;
  esac
}
# Timings per side, as "time rss" lines in $B/t/<phase>.<side>.
record() { echo "$TIME_S $RSS_MB" >>"$B/t/$1.$2"; }
med_t() { median $(cut -d' ' -f1 "$B/t/$1.$2"); }
med_m() { median $(cut -d' ' -f2 "$B/t/$1.$2"); }
mkdir -p "$B/t"
# first_round PHASE DBNAME URL SQLDIR ROUND SIDE...: one timed run of each side, in SIDE order.
# invsync backs up database DBNAME of its config into repository PHASE; the peers stream URL.
first_round() {
  local phase=$1 db=$2 url=$3 sql=$4 side
  shift 4
  for side in "$@"; do
    case $side in
    invsync)
      new_repo invsync "$B/$phase-invsync"
      settle
      timeit "$phase-invsync" "$INVSYNC" --config "$B/invsync.toml" --log warn backup --repo "$phase" --db "$db" --tables 'public.*'
      segments_of "$TIMEIT_LOG" >"$B/t/$phase.segments"
      ;;
    restic)
      new_repo restic "$B/$phase-restic"
      settle
      timeit "$phase-restic" bash -c "restic_stream '$B/$phase-restic' '$url' '$sql'"
      ;;
    borg | borgz)
      local comp=lz4
      [ "$side" = borgz ] && comp=zstd
      new_repo borg "$B/$phase-$side"
      settle
      timeit "$phase-$side" bash -c "borg_stream '$B/$phase-$side' first '$url' '$sql' $comp"
      ;;
    dump)
      settle
      timeit "$phase-dump" bash -c "dump_null '$url' '$sql'"
      ;;
    restic_files)
      new_repo restic "$B/$phase-restic_files"
      settle
      timeit "$phase-restic_files" restic backup --repo "$B/$phase-restic_files" --quiet "$B/$phase-files"
      ;;
    borg_files)
      new_repo borg "$B/$phase-borg_files"
      settle
      timeit "$phase-borg_files" env BORG_BASE_DIR="$B/$phase-borg_files.home" borg create "$B/$phase-borg_files::first" "$B/$phase-files"
      ;;
    esac
    record "$phase" "$side"
  done
}
# report_first PHASE LABEL: rows for PHASE's first backups (medians of the runs).
report_first() {
  local p=$1 l=$2 inv_t
  inv_t=$(med_t "$p" invsync)
  report_row "$l, s (peer: COPY | restic, 2 at a time)" "$inv_t" "$(med_t "$p" restic)" s
  report_row "$l, s (peer: COPY | borg, lz4)" "$inv_t" "$(med_t "$p" borg)" s
  report_row "$l, s (peer: COPY | borg, zstd)" "$inv_t" "$(med_t "$p" borgz)" s
  if [ -e "$B/t/$p.dump" ]; then
    report_row "$l, s (peer part: the COPYs alone, 2 at a time)" "$inv_t" "$(med_t "$p" dump)" s
    report_row "$l, s (peer part: restic alone, dump on disk)" "$inv_t" "$(med_t "$p" restic_files)" s
    report_row "$l, s (peer part: borg alone, lz4, dump on disk)" "$inv_t" "$(med_t "$p" borg_files)" s
  fi
  report_row "$l peak RSS, MB (peer: COPY | restic)" "$(med_m "$p" invsync)" "$(med_m "$p" restic)" MB
  report_row "$l peak RSS, MB (peer: COPY | borg, lz4)" "$(med_m "$p" invsync)" "$(med_m "$p" borg)" MB
  report_row "$l peak RSS, MB (peer: COPY | borg, zstd)" "$(med_m "$p" invsync)" "$(med_m "$p" borgz)" MB
  local inv_size
  inv_size=$(size_of "$B/$p-invsync")
  report_row "$l stored, bytes (peer: restic)" "$inv_size" "$(size_of "$B/$p-restic")" B
  report_row "$l stored, bytes (peer: borg, lz4)" "$inv_size" "$(size_of "$B/$p-borg")" B
  report_row "$l stored, bytes (peer: borg, zstd)" "$inv_size" "$(size_of "$B/$p-borgz")" B
  report_value "$l, invsync table segments" "$(cat "$B/t/$p.segments")"
}

# ---- large values: 20 values of 32 MB in one table (scanned documents, XML), alternating ----
# Every other value is incompressible (md5 output), the others repetitive XML. Its own
# database and repositories; BACKUP_ONLY=large runs just this part, BENCH_LARGE_VALUES sets
# how many values (default 20).
LDB_URL="$SRC_BASE/bench_large?sslmode=disable"
psql -X -qtA -v ON_ERROR_STOP=1 "$SRC_BASE/postgres?sslmode=disable" \
  -c "DROP DATABASE IF EXISTS bench_large" -c "CREATE DATABASE bench_large"
psql -X -qtA -v ON_ERROR_STOP=1 "$LDB_URL" -c "CREATE TABLE scans (id int PRIMARY KEY, doc bytea)" \
  -c "INSERT INTO scans SELECT i, CASE WHEN i % 2 = 0
        THEN (SELECT decode(string_agg(md5((i * 100000000 + g)::text), '' ORDER BY g), 'hex') FROM generate_series(1, 32 * 65536) g)
        ELSE convert_to(substr(repeat('<invoice><no>AB' || lpad(i::text, 8, '0') || '</no></invoice>', 900000), 1, 32 * 1048576), 'UTF8') END
      FROM generate_series(1, ${BENCH_LARGE_VALUES:-20}) i"
echo "[databases.large_db]" >>"$B/invsync.toml"
echo "url = \"$LDB_URL\"" >>"$B/invsync.toml"
copy_statements "$LDB_URL" "$B/large-sql"
for round in $(seq 0 $((BENCH_RUNS - 1))); do
  first_round large large_db "$LDB_URL" "$B/large-sql" $(rotate "$round" invsync restic borg borgz)
done
report_first large "large values backup"
fresh_dst
settle
timeit large_restore_invsync "$INVSYNC" --config "$B/invsync.toml" --log warn restore latest --repo large --to-db dst
report_value "large values restore, invsync" "$TIME_S" s
report_value "large values restore peak RSS, invsync" "$RSS_MB" MB
fresh_dst
rm -rf "$B"/large-*
psql -X -qtA "$SRC_BASE/postgres?sslmode=disable" -c "DROP DATABASE IF EXISTS bench_large" >/dev/null
if [ "${BACKUP_ONLY:-}" = large ]; then
  cleanup_backup
  trap - EXIT
  return 0
fi

# ---- first backup: three runs of each side, each round in another order ----
copy_statements "$BDB_URL" "$B/sql"
# The dump on disk that the peers back up alone (outside the timing).
dump_files "$BDB_URL" "$B/sql" "$B/inv-files"
for round in $(seq 0 $((BENCH_RUNS - 1))); do
  first_round inv src "$BDB_URL" "$B/sql" $(rotate "$round" invsync restic borg borgz dump restic_files borg_files)
done
report_first inv "first backup"
INV_FIRST=$(med_t inv invsync)
INV_SIZE=$(size_of "$B/inv-invsync")
# Key opening alone: the part of every invsync and restic command above that derives the key
# from the passphrase (both scrypt), shown by listing the snapshots of the first backups.
for round in $(seq 0 $((BENCH_RUNS - 1))); do
  for side in $(rotate "$round" invsync restic); do
    settle
    case $side in
    invsync) timeit key-invsync "$INVSYNC" --config "$B/invsync.toml" --log warn snapshots --repo inv ;;
    restic) timeit key-restic restic snapshots --repo "$B/inv-restic" ;;
    esac
    record key "$side"
  done
done
report_row "key opening alone (listing snapshots), s (peer: restic)" "$(med_t key invsync)" "$(med_t key restic)" s
report_row "key opening alone peak RSS, MB (peer: restic)" "$(med_m key invsync)" "$(med_m key restic)" MB
rm -rf "$B/inv-files" "$B"/inv-*_files

# ---- second backups: three runs of each side, each from a copy of the same first backup ----
SIDES2="invsync restic borg borgz"
# A repository's copy takes its tool's client state with it (borg keeps, in REPO.home, a
# security record and a cache that must match the repository, or it refuses or resyncs).
copy_repo() { # FROM TO
  rm -rf "$2" "$2.home"
  cp -a "$1" "$2"
  if [ -e "$1.home" ]; then cp -a "$1.home" "$2.home"; fi
}
for side in $SIDES2; do copy_repo "$B/inv-$side" "$B/base-$side"; done
second() {
  local label=$1 n=$2 round side ai ar ab abz segs
  rm -f "$B"/t/second*
  for round in $(seq 0 $((BENCH_RUNS - 1))); do
    for side in $(rotate "$round" $SIDES2); do
      copy_repo "$B/base-$side" "$B/inv-$side"
      settle
      case $side in
      invsync)
        timeit second-invsync "$INVSYNC" --config "$B/invsync.toml" --log warn backup --repo inv --db src --tables 'public.*'
        segs=$(segments_of "$TIMEIT_LOG")
        ;;
      restic) timeit second-restic bash -c "restic_stream '$B/inv-restic' '$BDB_URL' '$B/sql'" ;;
      borg) timeit second-borg bash -c "borg_stream '$B/inv-borg' second$n '$BDB_URL' '$B/sql' lz4" ;;
      borgz) timeit second-borgz bash -c "borg_stream '$B/inv-borgz' second$n '$BDB_URL' '$B/sql' zstd" ;;
      esac
      record second "$side"
    done
  done
  # Bytes added by the last run of each (the same data each run).
  ai=$(($(size_of "$B/inv-invsync") - $(size_of "$B/base-invsync")))
  ar=$(($(size_of "$B/inv-restic") - $(size_of "$B/base-restic")))
  ab=$(($(size_of "$B/inv-borg") - $(size_of "$B/base-borg")))
  abz=$(($(size_of "$B/inv-borgz") - $(size_of "$B/base-borgz")))
  local ti
  ti=$(med_t second invsync)
  report_row "second backup ($label), s (peer: COPY | restic)" "$ti" "$(med_t second restic)" s
  report_row "second backup ($label), s (peer: COPY | borg, lz4)" "$ti" "$(med_t second borg)" s
  report_row "second backup ($label), s (peer: COPY | borg, zstd)" "$ti" "$(med_t second borgz)" s
  report_row "second backup ($label) stored, B (restic)" "$ai" "$ar" B
  report_row "second backup ($label) stored, B (borg, lz4)" "$ai" "$ab" B
  report_row "second backup ($label) stored, B (borg, zstd)" "$ai" "$abz" B
  report_row "second backup ($label) peak RSS, MB (restic)" "$(med_m second invsync)" "$(med_m second restic)" MB
  report_row "second backup ($label) peak RSS, MB (borg, lz4)" "$(med_m second invsync)" "$(med_m second borg)" MB
  report_value "second backup ($label) / first, invsync bytes" "$(awk -v a="$ai" -v b="$INV_SIZE" 'BEGIN { printf "%.2f%%", 100 * a / b }')"
  report_value "second backup ($label) / first, invsync time" "$(awk -v a="$ti" -v b="$INV_FIRST" 'BEGIN { printf "%.2f", a / b }')"
  report_value "second backup ($label), invsync table segments" "$segs"
  # The next change is backed up on top of this one, as a third backup.
  for side in $SIDES2; do
    copy_repo "$B/inv-$side" "$B/base-$side"
  done
}
N=$(bdb "SELECT greatest(count(*) / 100, 1) FROM invoice")
# 1% of invoices updated at the recent end of the key order, and 1% added after it.
bdb "UPDATE invoice SET status = 'voided', updated_at = now()
     WHERE invoice_number IN (SELECT invoice_number FROM invoice ORDER BY invoice_number DESC LIMIT $N)" >/dev/null
bdb "INSERT INTO invoice SELECT (jsonb_populate_record(i, jsonb_build_object('invoice_number', 'ZZ' || substr(i.invoice_number, 3)))).*
     FROM invoice i ORDER BY invoice_number DESC LIMIT $N ON CONFLICT DO NOTHING" >/dev/null
second "1% updated + 1% added at the end" 1
# 1% of invoices updated, spread evenly over the key order.
bdb "UPDATE invoice SET updated_at = updated_at + interval '1 second' WHERE abs(hashtext(invoice_number)) % 100 = 0" >/dev/null
second "1% updated evenly" 2
rm -rf "$B"/base-*

# ---- restore into an empty DST database, to usable: three runs each, each round in another order ----
# The same tables at the same state for every side: invsync's latest snapshot; a pg_dump
# -Fd -j2 and a restic repository of the COPY text, both taken now (outside the timing).
# "Usable": tables loaded, every index built, every foreign key added and validated.
rm -rf "$B/pgdump"
pg_dump -Fd -j2 -f "$B/pgdump" -t 'public.*' "$BDB_URL"
# restic holds only the table data; the end-to-end peer also needs the schema, also taken
# here, as a schema-only dump.
pg_dump -Fc --schema-only -f "$B/schema.dump" -t 'public.*' "$BDB_URL"
dump_files "$BDB_URL" "$B/sql" "$B/restore-files"
restic init --repo "$B/restore-restic" >/dev/null 2>&1
restic backup --repo "$B/restore-restic" --quiet "$B/restore-files"
rm -rf "$B/restore-files"
# The end-to-end peer: restic restores the dump files, then they are loaded the way invsync
# loads: tables created, each filled with COPY .. FREEZE in the transaction that truncates
# it, two tables at a time, then constraints and indexes built two at a time.
restic_restore_and_load() {
  restic restore latest --repo "$B/restore-restic" --target "$B/restic-out" &&
    pg_restore --section=pre-data -d "$DST_URL" "$B/schema.dump" &&
    printf '%s\n' $TABLES | xargs -P2 -I{} psql -X -q -v ON_ERROR_STOP=1 "$DST_URL" \
      -c "BEGIN" -c "TRUNCATE public.{}" -c "\\copy public.{} FROM '$B/restic-out$B/restore-files/{}.copy' WITH (FREEZE)" -c "COMMIT" &&
    pg_restore -j2 --section=post-data -d "$DST_URL" "$B/schema.dump"
}
export -f restic_restore_and_load
export B DST_URL TABLES
# What "usable" means, as counts: valid indexes, validated foreign keys, and each table's rows.
usable_sql="SELECT (SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND i.indisvalid AND i.indisready)
  || ' indexes, ' || (SELECT count(*) FROM pg_constraint k JOIN pg_namespace n ON n.oid = k.connamespace
    WHERE n.nspname = 'public' AND k.contype = 'f' AND k.convalidated) || ' foreign keys, rows'
  $(for t in $TABLES; do printf " || ' %s ' || (SELECT count(*) FROM public.%s)" "$t" "$t"; done)"
expected=$(bdb "$usable_sql")
report_value "restore: what the source holds" "$expected"
unusable=0
for round in $(seq 0 $((BENCH_RUNS - 1))); do
  for side in $(rotate "$round" invsync pg_restore restic_load restic_files); do
    fresh_dst
    rm -rf "$B/restic-out"
    settle
    case $side in
    invsync) timeit restore-invsync "$INVSYNC" --config "$B/invsync.toml" --log warn restore latest --repo inv --to-db dst ;;
    pg_restore) timeit restore-pg_restore pg_restore -j2 -d "$DST_URL" "$B/pgdump" ;;
    restic_load) timeit restore-restic_load bash -c restic_restore_and_load ;;
    restic_files) timeit restore-restic_files restic restore latest --repo "$B/restore-restic" --target "$B/restic-out" ;;
    esac
    record restore "$side"
    if [ "$side" != restic_files ]; then
      got=$(psql_dst "$usable_sql")
      if [ "$got" != "$expected" ]; then
        echo "restore by $side: $got; the source has $expected" >&2
        unusable=$((unusable + 1))
      fi
    fi
  done
done
INV_RESTORE=$(med_t restore invsync)
report_row "restore to usable into an empty DB, s (peer: pg_restore -j2 of pg_dump -Fd -j2)" "$INV_RESTORE" "$(med_t restore pg_restore)" s
report_row "restore to usable into an empty DB, s (peer: restic restore + load: schema, COPY FREEZE -P2, indexes and FKs -j2)" "$INV_RESTORE" "$(med_t restore restic_load)" s
report_value "restore, restic restore of the COPY files only (no database load; not comparable)" "$(med_t restore restic_files)" s
report_row "restore peak RSS, MB (peer: pg_restore)" "$(med_m restore invsync)" "$(med_m restore pg_restore)" MB
report_row "restore peak RSS, MB (peer: restic + load, largest process)" "$(med_m restore invsync)" "$(med_m restore restic_load)" MB
if [ "$unusable" -gt 0 ]; then
  report_value "WARNING: restores not usable (indexes, foreign keys or rows differ from the source)" "$unusable"
else
  report_value "restores checked usable (indexes, validated FKs, rows as the source)" "all"
fi
cleanup_backup
trap - EXIT
