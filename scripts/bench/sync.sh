# sync section of scripts/bench.sh (sourced). Compares, on the same two clusters and data:
#   initial copy:  invsync sync setup  vs  a native subscription (copy_data; timed to "data
#                  copied", every table's copy done, and to "ready")  vs  `pg_dump -a | psql`
#                  (one stream)  vs  `pg_dump -Fd -Z0 -j2` then `pg_restore -j2` (through disk)
#   catch-up:      invsync sync run    vs  a native subscription, on the same backlog of changes
#                  (inserts of new rows, updates and deletes of rows both copied before, in transactions
#                  of 100 rows) written while both were stopped, each consumer replicating that one table
#                  and starting from a checkpoint on both clusters,
#                  and on one transaction of SYNC_BIG rows (default 5000000; 0 skips it), with sync run's peak RSS
#   agent:         catch-up of the same backlog by `invsync agent` running the pipeline, vs `sync run`;
#                  the agent at rest (pipeline idle, a backup each minute): CPU % of a core and peak RSS
#   lag:           p99 and max lag under `einvoice-gen load` at SYNC_LAG_RATE rows/s (default 10000)
#                  on SYNC_LAG_CONNECTIONS connections (default 4)
#                  for SYNC_LAG_SECS s (default 30), in a database bench_lag of its own: a probe row
#                  written every 50 ms, the age of the newest visible probe sampled every 50 ms
# Three runs each (the 5M-row transaction too), each round in another order (`rotate`), every
# timed step from a checkpoint on both clusters (`settle`); prints medians, the ratios
# invsync/peer, and peak RSS of invsync.
# Expects from bench.sh: SRC_URL DST_URL BENCH_DIR INVSYNC EINVOICE_GEN INVOICES.
# SYNC_BACKLOG sets the number of changes (default 1000000), SYNC_RUNS the runs (default BENCH_RUNS).

sync_main() {
  local runs="${SYNC_RUNS:-$BENCH_RUNS}" backlog="${SYNC_BACKLOG:-1000000}"
  local dir="$BENCH_DIR/sync"
  mkdir -p "$dir"
  local src="$SRC_URL" dst="$DST_URL"

  # The server binary directory's psql: Debian's psql wrapper is a Perl script, and the waits poll.
  sync_q() { PGOPTIONS="-c client_min_messages=warning" "${PG_BINDIR:+$PG_BINDIR/}psql" -X -q -A -t -v ON_ERROR_STOP=1 -d "$1" -c "$2"; }
  sync_now() { date +%s.%N; }
  sync_median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
  sync_rss_mib() { awk -F: '/Maximum resident set size/ {printf "%.0f", $2/1024}' "$1"; }

  if [ "$(sync_q "$src" "SELECT to_regclass('public.invoice') IS NOT NULL")" != t ]; then
    echo "sync: filling the source with $INVOICES invoices"
    "$EINVOICE_GEN" fill --url "$src" --invoices "$INVOICES" >/dev/null
  fi
  change_table "$src"
  local tables
  tables=$(sync_q "$src" "SELECT string_agg(format('%I.%I', schemaname, tablename), ' ') FROM pg_tables WHERE schemaname = 'public'")
  local table_list
  table_list=$(for t in $tables; do printf '"%s", ' "$t"; done | sed 's/, $//')
  local dump_args=()
  for t in $tables; do dump_args+=(-t "$t"); done
  pg_dump -s "${dump_args[@]}" "$src" > "$dir/schema.sql"

  cat > "$dir/invsync.toml" <<TOML
[databases.src]
url = "$src"
[databases.dst]
url = "$dst"
[pipelines.bench]
source = "src"
targets = ["dst"]
tables = [$table_list]
TOML
  local cfg="$dir/invsync.toml"
  # The catch-up runs replicate the changed table only, for both consumers: copying the whole
  # database before each run left autovacuum and checkpoint work of that copy running into
  # whichever measurement came next.
  sed 's/^tables = .*/tables = ["public.bench_change"]/' "$cfg" > "$dir/catch.toml"

  sync_reset_target() {
    sync_q "$dst" "DROP SCHEMA IF EXISTS invsync CASCADE" >/dev/null
    for t in $tables; do sync_q "$dst" "DROP TABLE IF EXISTS $t CASCADE" >/dev/null; done
    PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 -d "$dst" -f "$dir/schema.sql" >/dev/null
  }
  sync_drop_native() {
    sync_q "$dst" "DROP SUBSCRIPTION IF EXISTS bench_native" >/dev/null 2>&1 || true
    sync_q "$src" "DROP PUBLICATION IF EXISTS bench_native" >/dev/null
  }
  sync_native_subscribe() { # $1 = copy_data, $2 = the tables (default: all of them)
    sync_q "$src" "CREATE PUBLICATION bench_native FOR TABLE $(echo "${2:-$tables}" | sed 's/ /, /g')" >/dev/null
    sync_q "$dst" "CREATE SUBSCRIPTION bench_native CONNECTION '$src' PUBLICATION bench_native WITH (copy_data = $1)" >/dev/null
  }
  sync_wait() { # $1 = url, $2 = query that returns t when done
    until [ "$(sync_q "$1" "$2")" = t ]; do sleep 0.1; done
  }

  # ---- initial copy: each round in another order, each copy into emptied tables from a checkpoint
  local inv_copy=() nat_copy=() nat_data=() pipe_copy=() dir_copy=() inv_rss=()
  local t0 t1 td side
  for i in $(seq 1 "$runs"); do
    for side in $(rotate "$i" invsync native pipe dir); do
      sync_reset_target
      case $side in
      invsync)
        "$INVSYNC" --config "$cfg" sync teardown bench --yes >/dev/null 2>&1 || true
        settle
        t0=$(sync_now)
        # Two copy sessions, as the peers: a native subscription's default two table-sync
        # workers, pg_dump -j2 and pg_restore -j2.
        /usr/bin/time -v -o "$dir/setup.time" "$INVSYNC" --config "$cfg" --log warn sync setup bench --no-create --jobs 2 >/dev/null
        t1=$(sync_now)
        inv_copy+=("$(echo "$t1 - $t0" | bc)")
        inv_rss+=("$(sync_rss_mib "$dir/setup.time")")
        "$INVSYNC" --config "$cfg" sync teardown bench --yes >/dev/null
        ;;
      native)
        sync_drop_native
        settle
        t0=$(sync_now)
        sync_native_subscribe true
        # "Data copied": every table's copy finished (f, s or r); "ready": every table
        # handed over to the apply worker (r).
        td=
        until [ "$(sync_q "$dst" "SELECT count(*) > 0 AND bool_and(srsubstate = 'r') FROM pg_subscription_rel")" = t ]; do
          if [ -z "$td" ] && [ "$(sync_q "$dst" "SELECT count(*) > 0 AND bool_and(srsubstate IN ('f', 's', 'r')) FROM pg_subscription_rel")" = t ]; then
            td=$(sync_now)
          fi
          sleep 0.1
        done
        t1=$(sync_now)
        nat_copy+=("$(echo "$t1 - $t0" | bc)")
        nat_data+=("$(echo "${td:-$t1} - $t0" | bc)")
        sync_drop_native
        ;;
      pipe)
        # One stream: the data as COPY text straight into the target, its triggers (and so its
        # foreign key checks) off during the load, as invsync's replica role has them.
        settle
        t0=$(sync_now)
        pg_dump -a --disable-triggers "${dump_args[@]}" "$src" |
          PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 -d "$dst" >/dev/null
        t1=$(sync_now)
        pipe_copy+=("$(echo "$t1 - $t0" | bc)")
        ;;
      dir)
        # Two sessions each way, through disk: an uncompressed directory dump, then its restore.
        rm -rf "$dir/dump"
        settle
        t0=$(sync_now)
        pg_dump -Fd -Z0 -j2 -a "${dump_args[@]}" -f "$dir/dump" "$src"
        pg_restore -j2 -a --disable-triggers -d "$dst" "$dir/dump"
        t1=$(sync_now)
        dir_copy+=("$(echo "$t1 - $t0" | bc)")
        rm -rf "$dir/dump"
        ;;
      esac
    done
  done

  # ---- catch-up: both consumers stopped while the same changes are written, then started
  sync_backlog() { change_backlog "$src" "$1" "$backlog"; } # $1 = base id (see bench.sh)
  sync_big_transaction() { # $1 = base id: one transaction inserting $big rows
    local base=$1
    sync_q "$src" "
      INSERT INTO public.bench_change (id, invoice_number, amount, note)
        SELECT $base + g, 'AB' || lpad(g::text, 8, '0'), g * 0.01, 'big' FROM generate_series(1, $big) g;
      INSERT INTO public.bench_change (id, note) VALUES (-$base, 'marker');" >/dev/null
  }
  # sync_catch_up invsync|native WRITER ROWS: writes with WRITER while the consumer is stopped,
  # times until the target holds the marker; sets CATCH_RATE (rows/s), CATCH_RSS (MiB of
  # sync run; empty for native) and CATCH_CPU: CPU seconds per 1M rows of the source's
  # walsender and of the consumer (native: its apply worker; invsync: its target session plus
  # sync run itself), as "walsender consumer". Wall time depends on how the machine schedules
  # the processes on its cores; CPU per row shows what each consumer costs.
  # Every run starts from a checkpoint on both clusters (`settle`): a checkpoint the copies' WAL set off
  # would otherwise spread over whichever runs come next, and the first change to each page
  # after it writes the whole page to the WAL.
  sync_cpu() { # $1 = url, $2 = query for a server process id: its CPU seconds so far
    local pid
    pid=$(sync_q "$1" "$2")
    sed 's/.*) //' "/proc/$pid/stat" | awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f", ($12 + $13) / hz}'
  }
  sync_per_million() { echo "scale=2; $1 * 1000000 / $2" | bc; }
  local base=0
  sync_catch_up() {
    local kind=$1 writer=$2 rows=$3 t0 t1 pid cfg="$dir/catch.toml" walsender_cpu consumer_cpu
    sync_q "$src" "TRUNCATE public.bench_change" >/dev/null
    sync_reset_target
    base=$((base + 100000000))
    change_prefill "$src" "$base" "$backlog"
    CATCH_RSS=
    if [ "$kind" != native ]; then
      "$INVSYNC" --config "$cfg" sync teardown bench --yes >/dev/null 2>&1 || true
      "$INVSYNC" --config "$cfg" --log warn sync setup bench --no-create >/dev/null
      "$writer" "$base"
      settle
      t0=$(sync_now)
      if [ "$kind" = agent ]; then
        # The same pipeline run by the agent (endpoint, metrics poller, supervision beside it).
        /usr/bin/time -v -o "$dir/run.time" "$INVSYNC" --config "$cfg" --log warn agent --listen 127.0.0.1:0 &
      else
        /usr/bin/time -v -o "$dir/run.time" "$INVSYNC" --config "$cfg" --log warn sync run bench &
      fi
      pid=$!
      sync_wait "$dst" "SELECT EXISTS (SELECT 1 FROM public.bench_change WHERE id = -$base)"
      t1=$(sync_now)
      walsender_cpu=$(sync_cpu "$src" "SELECT pid FROM pg_stat_replication")
      consumer_cpu=$(sync_cpu "$dst" "SELECT pid FROM pg_stat_activity WHERE application_name = 'invsync_bench_dst' AND backend_type = 'client backend'")
      kill -TERM "$(pgrep -P "$pid" invsync || echo "$pid")" 2>/dev/null || true
      wait "$pid" || true
      CATCH_RSS=$(sync_rss_mib "$dir/run.time")
      consumer_cpu=$(awk -F': ' -v c="$consumer_cpu" '/(User|System) time \(seconds\)/ {c += $2} END {print c}' "$dir/run.time")
      "$INVSYNC" --config "$cfg" sync teardown bench --yes >/dev/null
    else
      sync_drop_native
      sync_native_subscribe true public.bench_change
      sync_wait "$dst" "SELECT count(*) > 0 AND bool_and(srsubstate = 'r') FROM pg_subscription_rel"
      sync_q "$dst" "ALTER SUBSCRIPTION bench_native DISABLE" >/dev/null
      local started retry
      started=$(sync_now)
      "$writer" "$base"
      # PostgreSQL 15's launcher starts a subscription's worker at most once per
      # wal_retrieve_retry_interval (5 s by default): an ENABLE sooner after the worker last
      # started would wait out the rest of it, which is not catch-up. Outside the timed part.
      retry=$(sync_q "$dst" "SELECT setting::numeric / 1000 FROM pg_settings WHERE name = 'wal_retrieve_retry_interval'")
      sleep "$(echo "x = $started + $retry + 0.5 - $(sync_now); if (x > 0) x else 0" | bc)"
      settle
      t0=$(sync_now)
      sync_q "$dst" "ALTER SUBSCRIPTION bench_native ENABLE" >/dev/null
      sync_wait "$dst" "SELECT EXISTS (SELECT 1 FROM public.bench_change WHERE id = -$base)"
      t1=$(sync_now)
      walsender_cpu=$(sync_cpu "$src" "SELECT pid FROM pg_stat_replication")
      consumer_cpu=$(sync_cpu "$dst" "SELECT pid FROM pg_stat_subscription WHERE subname = 'bench_native' AND relid IS NULL")
      sync_drop_native
    fi
    CATCH_RATE=$(echo "$rows / ($t1 - $t0)" | bc)
    CATCH_CPU="$(sync_per_million "$walsender_cpu" "$rows") $(sync_per_million "$consumer_cpu" "$rows")"
  }
  local inv_catch=() nat_catch=() run_rss=() inv_cpu=() nat_cpu=() agent_catch=() agent_rss=()
  for i in $(seq 1 "$runs"); do
    for side in $(rotate "$i" invsync agent native); do
      sync_catch_up "$side" sync_backlog "$backlog"
      if [ "$side" = invsync ]; then
        inv_catch+=("$CATCH_RATE"); run_rss+=("$CATCH_RSS"); inv_cpu+=("$CATCH_CPU")
      elif [ "$side" = agent ]; then
        agent_catch+=("$CATCH_RATE"); agent_rss+=("$CATCH_RSS")
      else
        nat_catch+=("$CATCH_RATE"); nat_cpu+=("$CATCH_CPU")
      fi
    done
  done
  # The agent at rest: the catch-up pipeline streaming with nothing to do and a backup of its
  # table (10,000 rows) every minute into a local repository, for AGENT_IDLE_S seconds after a
  # 5 s start-up. Its CPU (user + system, from /proc) and peak RSS (VmHWM) are the agent's own.
  AGENT_IDLE_S="${AGENT_IDLE_S:-125}"
  local acfg="$dir/agent.toml" arepo="$dir/agent-repo" apid c0 c1 hz
  rm -rf "$arepo" "$dir/agent-state.json" "$dir/agent.key"
  # An age key file, as a production agent has: a passphrase would add scrypt's memory (sized
  # at `repo init`) to every backup, which is the key's cost, not the agent's.
  ensure_age
  age-keygen -o "$dir/agent.key" 2>/dev/null
  {
    cat "$dir/catch.toml"
    cat <<TOML
[repositories.agentbench]
url = "file://$arepo"
recipients = ["$(age-keygen -y "$dir/agent.key")"]
identity_file = "$dir/agent.key"
[[schedules]]
name = "minute-backup"
cron = "0 * * * * *"
job = "backup"
repo = "agentbench"
db = "src"
tables = ["public.bench_change"]
TOML
  } > "$acfg"
  sync_q "$src" "TRUNCATE public.bench_change; INSERT INTO public.bench_change (id, invoice_number, amount, note) SELECT g, 'AB' || g, g, 'note' FROM generate_series(1, 10000) g" >/dev/null
  sync_reset_target
  "$INVSYNC" --config "$acfg" repo init --repo agentbench >/dev/null
  "$INVSYNC" --config "$acfg" sync teardown bench --yes >/dev/null 2>&1 || true
  "$INVSYNC" --config "$acfg" --log warn sync setup bench --no-create >/dev/null
  "$INVSYNC" --config "$acfg" --log warn agent --listen 127.0.0.1:0 >"$dir/agent-idle.log" 2>&1 &
  apid=$!
  sleep 5
  hz=$(getconf CLK_TCK)
  c0=$(sed 's/.*) //' "/proc/$apid/stat" | awk '{print $12 + $13}')
  sleep "$AGENT_IDLE_S"
  c1=$(sed 's/.*) //' "/proc/$apid/stat" | awk '{print $12 + $13}')
  AGENT_IDLE_RSS=$(awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$apid/status")
  AGENT_IDLE_CPU=$(awk -v a="$c0" -v b="$c1" -v hz="$hz" -v s="$AGENT_IDLE_S" 'BEGIN { printf "%.2f", (b - a) * 100 / hz / s }')
  kill -TERM "$apid"
  wait "$apid" || true
  AGENT_IDLE_BACKUPS=$("$INVSYNC" --config "$acfg" snapshots --repo agentbench --json | python3 -c 'import json, sys; print(len(json.load(sys.stdin)))')
  "$INVSYNC" --config "$acfg" sync teardown bench --yes >/dev/null
  sync_q "$src" "TRUNCATE public.bench_change" >/dev/null
  sync_reset_target

  # One source transaction of $big rows, $runs runs each: it must stream through, not sit in
  # memory. SYNC_BIG=0 skips it (quicker iterations on the catch-up figure).
  local big="${SYNC_BIG:-5000000}" big_inv=() big_nat=() big_rss=() big_inv_cpu=() big_nat_cpu=()
  if [ "$big" -gt 0 ]; then
    for i in $(seq 1 "$runs"); do
      for side in $(rotate "$i" invsync native); do
        sync_catch_up "$side" sync_big_transaction "$big"
        if [ "$side" = invsync ]; then
          big_inv+=("$CATCH_RATE"); big_rss+=("$CATCH_RSS"); big_inv_cpu+=("$CATCH_CPU")
        else
          big_nat+=("$CATCH_RATE"); big_nat_cpu+=("$CATCH_CPU")
        fi
      done
    done
  fi
  sync_q "$src" "DROP TABLE public.bench_change" >/dev/null
  sync_q "$dst" "DROP TABLE IF EXISTS public.bench_change" >/dev/null

  # ---- lag under a steady load, in a database of its own (the load changes what it runs on)
  local lag_rate="${SYNC_LAG_RATE:-10000}" lag_secs="${SYNC_LAG_SECS:-30}" lag_conns="${SYNC_LAG_CONNECTIONS:-4}"
  local lsrc="${src/\/einvoice\?//bench_lag?}" ldst="${dst/\/einvoice\?//bench_lag?}"
  local inv_lag=() nat_lag=() lag_achieved=()
  sync_lag_db() { # (re)creates bench_lag: filled on the source, empty tables on the target
    sync_q "${src/\/einvoice\?//postgres?}" "DROP DATABASE IF EXISTS bench_lag WITH (FORCE)" >/dev/null
    sync_q "${dst/\/einvoice\?//postgres?}" "DROP DATABASE IF EXISTS bench_lag WITH (FORCE)" >/dev/null
    sync_q "${src/\/einvoice\?//postgres?}" "CREATE DATABASE bench_lag" >/dev/null
    sync_q "${dst/\/einvoice\?//postgres?}" "CREATE DATABASE bench_lag" >/dev/null
    "$EINVOICE_GEN" fill --url "$lsrc" --invoices "${SYNC_LAG_INVOICES:-50000}" >/dev/null
    # Each load connection runs one transaction per round trip: without waiting for the
    # source's fsync per commit, a few connections together can reach the rate.
    sync_q "$lsrc" "ALTER DATABASE bench_lag SET synchronous_commit = off"
    sync_q "$lsrc" "CREATE TABLE public.bench_probe (id bigint PRIMARY KEY, sent timestamptz NOT NULL)"
    sync_q "$ldst" "DROP SCHEMA public"
    pg_dump -s -n public "$lsrc" | PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 -d "$ldst" >/dev/null
    sync_q "$ldst" "CREATE UNLOGGED TABLE bench_lag_sample (lag interval)"
  }
  # Writes a probe every 50 ms beside the load, samples on the target every 50 ms how old the
  # newest visible probe is, and prints "p99 max" in seconds of those samples.
  sync_lag_measure() {
    local n=$((lag_secs * 20)) load_pid probe_pid
    "$EINVOICE_GEN" load --url "$lsrc" --rate "$lag_rate" --duration "$lag_secs" \
      --connections "$lag_conns" >"$dir/load.out" &
    load_pid=$!
    sync_q "$lsrc" "DO \$\$ BEGIN FOR i IN 1 .. $n LOOP
        INSERT INTO public.bench_probe VALUES (i, clock_timestamp()); COMMIT; PERFORM pg_sleep(0.05);
      END LOOP; END \$\$" &
    probe_pid=$!
    sync_q "$ldst" "DO \$\$ BEGIN PERFORM pg_sleep(2); FOR i IN 1 .. $(((lag_secs - 4) * 20)) LOOP
        INSERT INTO bench_lag_sample SELECT clock_timestamp() - max(sent) FROM public.bench_probe;
        PERFORM pg_sleep(0.05);
      END LOOP; END \$\$"
    wait "$load_pid" "$probe_pid"
    lag_achieved+=("$(sed -n 's/.*s (\([0-9]*\) rows\/s, target.*/\1/p' "$dir/load.out")")
    sync_q "$ldst" "SELECT round(extract(epoch FROM percentile_cont(0.99) WITHIN GROUP (ORDER BY lag))::numeric, 3),
                           round(extract(epoch FROM max(lag))::numeric, 3) FROM bench_lag_sample" | tr '|' ' '
  }
  sed -e "s#$src#$lsrc#; s#$dst#$ldst#" -e 's#^tables = .*#tables = ["public.invoice", "public.invoice_item", "public.allowance", "public.carrier", "public.bench_probe"]#' \
    "$cfg" > "$dir/lag.toml"
  local lag_pid lag_tables="public.invoice, public.invoice_item, public.allowance, public.carrier, public.bench_probe"
  for i in $(seq 1 "$runs"); do
    for side in $(rotate "$i" invsync native); do
      sync_lag_db
      settle
      if [ "$side" = invsync ]; then
        "$INVSYNC" --config "$dir/lag.toml" --log warn sync setup bench --no-create >/dev/null
        "$INVSYNC" --config "$dir/lag.toml" --log warn sync run bench &
        lag_pid=$!
        sync_lag_measure >"$dir/lag.out"
        inv_lag+=("$(cat "$dir/lag.out")")
        kill -TERM "$lag_pid"; wait "$lag_pid" || true
        "$INVSYNC" --config "$dir/lag.toml" sync teardown bench --yes >/dev/null
      else
        sync_q "$lsrc" "CREATE PUBLICATION bench_native FOR TABLE $lag_tables" >/dev/null
        sync_q "$ldst" "CREATE SUBSCRIPTION bench_native CONNECTION '$lsrc' PUBLICATION bench_native" >/dev/null
        sync_wait "$ldst" "SELECT count(*) > 0 AND bool_and(srsubstate = 'r') FROM pg_subscription_rel"
        sync_lag_measure >"$dir/lag.out"
        nat_lag+=("$(cat "$dir/lag.out")")
        sync_q "$ldst" "DROP SUBSCRIPTION bench_native" >/dev/null
      fi
    done
  done
  sync_q "${src/\/einvoice\?//postgres?}" "DROP DATABASE bench_lag WITH (FORCE)" >/dev/null
  sync_q "${dst/\/einvoice\?//postgres?}" "DROP DATABASE bench_lag WITH (FORCE)" >/dev/null

  local ic nc nd pc dc ir nr
  ic=$(sync_median "${inv_copy[@]}"); nc=$(sync_median "${nat_copy[@]}"); nd=$(sync_median "${nat_data[@]}")
  pc=$(sync_median "${pipe_copy[@]}"); dc=$(sync_median "${dir_copy[@]}")
  ir=$(sync_median "${inv_catch[@]}"); nr=$(sync_median "${nat_catch[@]}")
  local ilp ilm nlp nlm
  ilp=$(sync_median "$(printf '%s\n' "${inv_lag[@]}" | cut -d' ' -f1)"); ilm=$(sync_median "$(printf '%s\n' "${inv_lag[@]}" | cut -d' ' -f2)")
  nlp=$(sync_median "$(printf '%s\n' "${nat_lag[@]}" | cut -d' ' -f1)"); nlm=$(sync_median "$(printf '%s\n' "${nat_lag[@]}" | cut -d' ' -f2)")
  # sync_cpu_median "walsender consumer"...: the medians of each column, as "walsender consumer".
  sync_cpu_median() {
    echo "$(sync_median $(printf '%s\n' "$@" | cut -d' ' -f1)) $(sync_median $(printf '%s\n' "$@" | cut -d' ' -f2))"
  }
  {
  echo "== sync ($INVOICES invoices; backlog $backlog changes; median of $runs runs, each round in another order)"
  printf '%-44s %10s %10s %8s\n' "measure" "invsync" "peer" "ratio"
  printf '%-44s %9.2fs %9.2fs %8.2f\n' "initial copy vs native subscription, ready" "$ic" "$nc" "$(echo "$ic / $nc" | bc -l)"
  printf '%-44s %9.2fs %9.2fs %8.2f\n' "initial copy vs native subscription, data copied" "$ic" "$nd" "$(echo "$ic / $nd" | bc -l)"
  printf '%-44s %9.2fs %9.2fs %8.2f\n' "initial copy vs pg_dump -a | psql (one stream)" "$ic" "$pc" "$(echo "$ic / $pc" | bc -l)"
  printf '%-44s %9.2fs %9.2fs %8.2f\n' "initial copy vs pg_dump -Fd -Z0 -j2, then pg_restore -j2" "$ic" "$dc" "$(echo "$ic / $dc" | bc -l)"
  printf '%-44s %10s %10s %8.2f\n' "catch-up rows/s vs native subscription" "$ir" "$nr" "$(echo "$ir / $nr" | bc -l)"
  echo "(catch-up runs, rows/s: invsync ${inv_catch[*]}; native ${nat_catch[*]})"
  local ar
  ar=$(sync_median "${agent_catch[@]}")
  printf '%-44s %10s %10s %8.2f\n' "catch-up rows/s: invsync agent vs sync run" "$ar" "$ir" "$(echo "$ar / $ir" | bc -l)"
  echo "(agent catch-up runs, rows/s: ${agent_catch[*]}; peak RSS agent $(sync_median "${agent_rss[@]}") MiB)"
  echo "agent with the pipeline idle and a backup schedule each minute, over $AGENT_IDLE_S s: $AGENT_IDLE_CPU% of one core, peak RSS $AGENT_IDLE_RSS MiB ($AGENT_IDLE_BACKUPS backups ran)"
  sync_cpu_line() { # $1 = label, $2 = invsync "walsender consumer" figures, $3 = native's
    printf '%s CPU s per 1M rows: invsync: walsender %s, target session + sync run %s; native: walsender %s, apply worker %s\n' \
      "$1" $2 $3
  }
  sync_cpu_line "catch-up (median)" "$(sync_cpu_median "${inv_cpu[@]}")" "$(sync_cpu_median "${nat_cpu[@]}")"
  if [ "$big" -gt 0 ]; then
    local bi bn
    bi=$(sync_median "${big_inv[@]}"); bn=$(sync_median "${big_nat[@]}")
    printf '%-44s %10s %10s %8.2f\n' "one ${big}-row transaction rows/s vs native" "$bi" "$bn" "$(echo "$bi / $bn" | bc -l)"
    echo "(one ${big}-row transaction runs, rows/s: invsync ${big_inv[*]}; native ${big_nat[*]})"
    sync_cpu_line "one ${big}-row transaction (median)" "$(sync_cpu_median "${big_inv_cpu[@]}")" "$(sync_cpu_median "${big_nat_cpu[@]}")"
  fi
  printf '%-44s %9.3fs %9.3fs %8.2f\n' "lag p99 at $lag_rate rows/s vs native" "$ilp" "$nlp" "$(echo "$ilp / $nlp" | bc -l)"
  printf '%-44s %9.3fs %9.3fs %8.2f\n' "lag max at $lag_rate rows/s vs native" "$ilm" "$nlm" "$(echo "$ilm / $nlm" | bc -l)"
  echo "(lag: load reached $(sync_median "${lag_achieved[@]}") rows/s on $lag_conns connections, median of the runs; target $lag_rate)"
  echo "peak RSS: sync setup $(sync_median "${inv_rss[@]}") MiB, sync run (catch-up) $(sync_median "${run_rss[@]}") MiB${big_rss[0]:+, sync run (one ${big}-row transaction) $(sync_median "${big_rss[@]}") MiB}"
  echo "(ratios: time ratio < 1 and rows/s ratio > 1 favour invsync)"
  } | tee -a "$REPORT"
}

sync_main
