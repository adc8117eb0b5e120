#!/usr/bin/env bash
# Installs everything tasker_core needs to build, demo and test, skipping what is present:
# Debian packages, cargo-pgrx and cargo-fuzz (pinned), the pgrx registration of the system PostgreSQL,
# and the Python/Node client libraries used by the integration tests (under target/).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

wanted=(postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR libclang-dev clang ruby ruby-activerecord ruby-pg)
wanted+=(postgresql-$PG_MAJOR-cron)                  # the recurring-task recipe's test runs the real pg_cron
wanted+=(postgresql-$PG_MAJOR-auto-failover pg-auto-failover-cli)  # the failover test (docs/scaling.md)
wanted+=(postgresql-$PG_MAJOR-plproxy)               # the sharding test and bench (docs/scaling.md)
is_root && wanted+=(sudo)
wanted+=(graphviz)                                   # the demo draws its DAG with dot
command -v node >/dev/null || wanted+=(nodejs npm)   # the Node client and its tests
missing=()
for pkg in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    step "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
    note "Debian packages present"
fi

command -v pg_config >/dev/null || die "pg_config is not on PATH after installing postgresql-server-dev-$PG_MAJOR"

if cargo pgrx --version 2>/dev/null | grep -qx "cargo-pgrx $PGRX_VERSION"; then
    note "cargo-pgrx $PGRX_VERSION present"
else
    step "installing cargo-pgrx $PGRX_VERSION (a few minutes, once)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

if cargo fuzz --version 2>/dev/null | grep -q "^cargo-fuzz $CARGO_FUZZ_VERSION"; then
    note "cargo-fuzz $CARGO_FUZZ_VERSION present"
else
    step "installing cargo-fuzz $CARGO_FUZZ_VERSION (the fuzz suite of make test)"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

PG_CONFIG="$(command -v pg_config)"
PGRX_HOME="${PGRX_HOME:-$HOME/.pgrx}"
if grep -qx "pg$PG_MAJOR = \"$PG_CONFIG\"" "$PGRX_HOME/config.toml" 2>/dev/null; then
    note "pgrx knows PostgreSQL $PG_MAJOR at $PG_CONFIG"
else
    step "registering PostgreSQL $PG_MAJOR with pgrx"
    cargo pgrx init --pg$PG_MAJOR="$PG_CONFIG"
fi

VENV="$ROOT/target/venv"
if "$VENV/bin/python" -c 'import psycopg, psycopg_pool, pytest' 2>/dev/null; then
    note "Python test environment present"
else
    step "creating the Python test environment in target/venv (psycopg, psycopg_pool, pytest)"
    [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check 'psycopg[binary]>=3.2,<4' \
        'psycopg-pool>=3.2,<4' 'pytest>=7,<9'
fi

NODE_DIR="$ROOT/target/node"
if [ -f "$NODE_DIR/node_modules/pg/package.json" ]; then
    note "Node test environment present"
elif command -v npm >/dev/null; then
    step "installing the Node test environment in target/node (pg)"
    mkdir -p "$NODE_DIR"
    (cd "$NODE_DIR" && { [ -f package.json ] || echo '{"private":true}' > package.json; } \
        && npm install --silent --no-audit --no-fund 'pg@^8' >/dev/null)
else
    note "npm not found: Node integration tests will be skipped"
fi
