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
