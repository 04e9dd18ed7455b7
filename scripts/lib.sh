# Shared install helpers for the scripts. Each installs only what is missing, so a second run
# is quick, and uses only the Debian and PyPI package registries.

apt_updated=0
apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "missing $*: install them (as root: apt-get install $*)" >&2
    exit 1
  fi
  if [ "$apt_updated" = 0 ]; then
    apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# PostgreSQL 15 server binaries (initdb, pg_ctl) and client tools (psql, pg_dump).
ensure_postgres() {
  if ! command -v pg_config >/dev/null 2>&1 || [ ! -x "$(pg_config --bindir)/initdb" ]; then
    apt_install postgresql postgresql-client
  fi
  if ! command -v psql >/dev/null 2>&1; then
    apt_install postgresql-client
  fi
  PG_BINDIR="$(pg_config --bindir)"
  export PG_BINDIR
}

# moto_server, a real S3 API server, in the project's own virtualenv.
ensure_moto() {
  if [ ! -x .venv/bin/moto_server ]; then
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
      apt_install python3-venv
    fi
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check 'moto[server]>=5,<6'
  fi
  INVSYNC_MOTO_SERVER="$PWD/.venv/bin/moto_server"
  export INVSYNC_MOTO_SERVER
}

# Azurite, a real Azure Blob API server, from the npm registry into the project's `.azurite/`,
# and the Azure SDK for Python (in `.venv/`, beside moto) that the tests use to create its
# container. The tests run it with telemetry off.
ensure_azurite() {
  if [ ! -x .azurite/node_modules/.bin/azurite-blob ]; then
    if ! command -v npm >/dev/null 2>&1; then
      apt_install nodejs npm
    fi
    npm install --silent --no-audit --no-fund --prefix .azurite 'azurite@3' >/dev/null
  fi
  if ! .venv/bin/python -c 'import azure.storage.blob' 2>/dev/null; then
    .venv/bin/pip install -q --disable-pip-version-check 'azure-storage-blob>=12,<13'
  fi
  INVSYNC_AZURITE="$PWD/.azurite/node_modules/.bin/azurite-blob"
  export INVSYNC_AZURITE
}

# Command-line tools the tests call: openssl makes TLS certificates for the sslmode tests.
ensure_test_tools() {
  command -v openssl >/dev/null 2>&1 || apt_install openssl
}

ensure_rust_tools() {
  if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is missing: install a Rust toolchain (rustup) first" >&2
    exit 1
  fi
  rustup component add rustfmt clippy >/dev/null 2>&1 || true
}

# Debian's `prometheus` package: promtool, to check and unit-test the alert rules in
# deploy/prometheus (tests/deploy_rules.rs), and the server binary, which tests/agent_archive.rs
# runs on loopback to scrape a live agent. The package's own service is not started here.
ensure_prometheus() {
  if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    apt_install --no-install-recommends prometheus
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
      systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
  fi
}

# systemd-analyze, to verify the systemd unit in deploy/systemd (systemd need not be running).
ensure_systemd_analyze() {
  if ! command -v systemd-analyze >/dev/null 2>&1; then
    apt_install --no-install-recommends systemd
  fi
}

# age-keygen, to make the demo repository's key.
ensure_age() {
  if ! command -v age-keygen >/dev/null 2>&1; then
    apt_install age
  fi
}

# A non-C monetary locale (zh_TW.UTF-8), for the tests of values across servers whose
# lc_monetary differs.
ensure_locales() {
  if ! locale -a 2>/dev/null | grep -qix 'zh_TW.utf8'; then
    apt_install locales-all
  fi
}

# /usr/bin/time, for the benchmarks' peak memory.
ensure_time() {
  if [ ! -x /usr/bin/time ]; then
    apt_install time
  fi
}

# ---- local PostgreSQL clusters for the demo and the benchmarks ----
# A cluster lives in DIR: DIR/data, DIR/server.log, DIR/port. It listens on 127.0.0.1 only,
# with trust authentication for the `postgres` superuser and wal_level=logical. As root, the
# server runs as the `postgres` OS user, as PostgreSQL refuses to run as root.

# Runs a command as the server's OS user.
as_pg_user() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

# Prints a TCP port on 127.0.0.1 that nobody listens on now, from 25432 up.
free_port() {
  local p
  for p in $(seq 25432 26431); do
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  echo "no free port in 25432-26431" >&2
  return 1
}

# cluster_start DIR [CONF_LINE...]: initdb into DIR if needed, start the server if it is not
# running, create database `einvoice` if missing. Prints the port. Safe to run again.
cluster_start() {
  local dir=$1
  shift
  local data="$dir/data" port
  if [ ! -f "$data/PG_VERSION" ]; then
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; fi
    as_pg_user "$PG_BINDIR/initdb" -D "$data" -U postgres --auth=trust -E UTF8 \
      --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; return 1; }
    {
      echo "listen_addresses = '127.0.0.1'"
      echo "unix_socket_directories = '$dir'"
      echo "wal_level = logical"
      echo "max_replication_slots = 16"
      echo "max_wal_senders = 16"
      local line
      for line in "$@"; do echo "$line"; done
    } | as_pg_user tee -a "$data/postgresql.conf" >/dev/null
  fi
  if as_pg_user "$PG_BINDIR/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    port=$(cat "$dir/port")
  else
    port=$(free_port)
    as_pg_user "$PG_BINDIR/pg_ctl" -D "$data" -l "$dir/server.log" -w -t 60 \
      -o "-p $port" start >/dev/null || { tail -20 "$dir/server.log" >&2; return 1; }
    echo "$port" >"$dir/port"
  fi
  if [ -z "$(psql -X -qtA -h 127.0.0.1 -p "$port" -U postgres -d postgres \
      -c "SELECT 1 FROM pg_database WHERE datname = 'einvoice'")" ]; then
    psql -X -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -c "CREATE DATABASE einvoice"
  fi
  echo "$port"
}

# cluster_stop DIR: stops the server in DIR if it runs.
cluster_stop() {
  local data="$1/data"
  if [ -f "$data/PG_VERSION" ] && as_pg_user "$PG_BINDIR/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    as_pg_user "$PG_BINDIR/pg_ctl" -D "$data" -m fast -w stop >/dev/null
    echo "stopped the cluster in $1"
  fi
}
