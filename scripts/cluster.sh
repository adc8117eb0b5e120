#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the demo, tests and benchmarks.
#
#   scripts/cluster.sh start    start it (initdb on first use, a free port), print its env
#   scripts/cluster.sh stop     stop it
#   scripts/cluster.sh env      print PGHOST/PGPORT/PGUSER lines for `eval`
#   scripts/cluster.sh status   exit 0 if it runs
#
# It lives in $TASKER_CLUSTER_DIR (default target/tasker-cluster) and runs as the postgres
# user when started by root. Settings favour speed over durability: it is disposable.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

DIR="${TASKER_CLUSTER_DIR:-$ROOT/target/tasker-cluster}"
DATA="$DIR/data"
BIN="$(pg_bindir)"

running() { [ -f "$DATA/postmaster.pid" ] && as_pg "$BIN/pg_ctl" status -D "$DATA" >/dev/null 2>&1; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

print_env() {
    local port
    port="$(cat "$DIR/port")"
    echo "export PGHOST=127.0.0.1 PGPORT=$port PGUSER=postgres PGDATABASE=postgres"
}

start() {
    mkdir -p "$DIR"
    if is_root; then
        chown postgres:postgres "$DIR"
        runuser -u postgres -- test -w "$DIR" \
            || die "the postgres user cannot write $DIR; set TASKER_CLUSTER_DIR to a directory it can reach"
    fi
    if [ ! -f "$DATA/PG_VERSION" ]; then
        step "creating a throwaway cluster in $DATA"
        as_pg "$BIN/initdb" -D "$DATA" -U postgres -A trust -E UTF8 --no-sync >/dev/null
        cat >> "$DATA/postgresql.conf" <<CONF
# tasker_core throwaway cluster
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
shared_buffers = 256MB
log_min_messages = warning
log_line_prefix = '%m [%p] '
CONF
    fi
    if running; then
        note "cluster already running on port $(cat "$DIR/port")"
    else
        local port
        port="$(free_port)"
        echo "$port" > "$DIR/port"
        chmod 644 "$DIR/port"
        as_pg env -u RUST_BACKTRACE -u RUST_LIB_BACKTRACE "$BIN/pg_ctl" start -D "$DATA" -w -t 60 -l "$DIR/server.log" -o "-p $port ${TASKER_PG_OPTS:-}" >/dev/null \
            || { cat "$DIR/server.log" >&2; die "the cluster did not start"; }
        note "cluster running on 127.0.0.1:$port (log: $DIR/server.log)"
    fi
}

stop() {
    if running; then
        as_pg "$BIN/pg_ctl" stop -D "$DATA" -m fast -w >/dev/null
        note "cluster stopped"
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) print_env ;;
    status) running ;;
    *) die "usage: $0 start|stop|env|status" ;;
esac
