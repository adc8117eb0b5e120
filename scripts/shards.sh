#!/usr/bin/env bash
# Sharding by task with PL/Proxy: N partition clusters, each an ordinary tasker_core database,
# and one router cluster whose schema tasker_core holds PL/Proxy functions with the names and
# arguments of the worker protocol (docs/scaling.md, "Sharding by task with PL/Proxy").
#
#   scripts/shards.sh start [N]   start N partitions (1, 2, 4, 8 ...; default: the set's, or 2) and the router,
#                                 set them up (idempotent), print the router's env
#   scripts/shards.sh stop        stop every cluster of the set
#   scripts/shards.sh env         print the router's PG* variables and conninfo, and each partition's
#   scripts/shards.sh status      list the clusters and whether they run (exit 0 if all do)
#   scripts/shards.sh clean       stop, then delete the set's directory
#
# Everything lives in $TASKER_SHARDS_DIR (default target/shards): p0 ... p<N-1> and router, each
# a scripts/cluster.sh cluster. The application database is $TASKER_SHARDS_DB (default
# tasker_app) on every cluster. $TASKER_PG_OPTS goes to every cluster (e.g. fsync=on for the
# bench; $TASKER_ROUTER_PG_OPTS, when set, to the router instead); partitions also preload
# tasker_core with the timer and the notifier in that database.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

DIR="${TASKER_SHARDS_DIR:-$ROOT/target/shards}"
DB="${TASKER_SHARDS_DB:-tasker_app}"
SERVER=tasker_partitions   # the SQL/MED server, i.e. the PL/Proxy cluster name the router uses
CLUSTER="$ROOT/scripts/cluster.sh"

[[ "$DB" =~ ^[a-z_][a-z0-9_]*$ ]] || die "TASKER_SHARDS_DB must be a plain lower-case identifier, not '$DB'"

cluster() {   # cluster <name> <cluster.sh arguments...>
    local name="$1"
    shift
    TASKER_CLUSTER_DIR="$DIR/$name" "$CLUSTER" "$@"
}

port_of() { cat "$DIR/$1/port"; }

psql_on() {   # psql_on <cluster name> <database> <psql arguments...>
    local name="$1" db="$2"
    shift 2
    PGHOST=127.0.0.1 PGPORT="$(port_of "$name")" PGUSER=postgres PGDATABASE="$db" \
        psql -X -q -v ON_ERROR_STOP=1 "$@"
}

partitions_of_set() {   # the partition count recorded by the last start, empty when none
    [ -f "$DIR/partitions" ] && cat "$DIR/partitions" || true
}

conninfo() { echo "host=127.0.0.1 port=$(port_of "$1") dbname=$DB user=postgres"; }

ensure_db() {   # ensure_db <cluster name>
    local exists
    exists="$(psql_on "$1" postgres -At -c "SELECT 1 FROM pg_database WHERE datname = '$DB'")"
    [ "$exists" = 1 ] || psql_on "$1" postgres -c "CREATE DATABASE $DB"
}

start() {
    local n="${1:-$(partitions_of_set)}"
    n="${n:-2}"
    [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 64 ] || die "the partition count must be 1..64, not '$n'"
    [ $((n & (n - 1))) -eq 0 ] \
        || die "the partition count must be a power of two (PL/Proxy maps a hash to a partition with hash & (N-1)), not $n"
    command -v pg_config >/dev/null || die "pg_config is not on PATH (scripts/prereqs.sh installs PostgreSQL $PG_MAJOR)"
    [ -f "$(pg_config --sharedir)/extension/plproxy.control" ] \
        || die "PL/Proxy is not installed: apt-get install postgresql-$PG_MAJOR-plproxy (scripts/prereqs.sh)"
    [ -f "$(pg_config --sharedir)/extension/tasker_core.control" ] \
        || die "tasker_core is not installed into $(pg_config --sharedir): run scripts/install.sh first"
    local before
    before="$(partitions_of_set)"
    if [ -n "$before" ] && [ "$before" != "$n" ]; then
        die "$DIR holds a set of $before partitions, not $n: ids are striped by the partition count, so
       it cannot change in place. Run '$0 clean' first, or set TASKER_SHARDS_DIR to another directory."
    fi
    mkdir -p "$DIR"
    echo "$n" > "$DIR/partitions"

    step "starting $n partition cluster(s) and the router under $DIR"
    local k
    for ((k = 0; k < n; k++)); do
        TASKER_PG_OPTS="${TASKER_PG_OPTS:-} -c shared_preload_libraries=tasker_core -c tasker_core.tick_database=$DB" \
            cluster "p$k" start
    done
    # (the router runs no tasker_core: should the options preload it, its timer and notifier stay off)
    TASKER_PG_OPTS="${TASKER_ROUTER_PG_OPTS:-${TASKER_PG_OPTS:-}} -c tasker_core.tick_interval_ms=0 -c tasker_core.notifier=off" \
        cluster router start

    step "partitions: tasker_core, the Tasker schema, tracking, ids striped by $n"
    for ((k = 0; k < n; k++)); do
        ensure_db "p$k"
        psql_on "p$k" "$DB" -v partition="$k" -v partitions="$n" -f "$ROOT/sql/plproxy/partition.sql" >/dev/null \
            || die "setting up partition $k failed (log: $DIR/p$k/server.log)"
        note "p$k: $(conninfo "p$k")"
    done

    step "router: PL/Proxy, the cluster '$SERVER' and the proxy functions (sql/plproxy/router.sql)"
    ensure_db router
    local options="" sep=""
    for ((k = 0; k < n; k++)); do
        options+="${sep}p$k '$(conninfo "p$k")'"
        sep=", "
    done
    # The server is made again on every start (the partitions' ports change when they restart),
    # and so are the functions, in one transaction: clients see the old router or the new one.
    psql_on router "$DB" >/dev/null <<SQL || die "setting up the router failed (log: $DIR/router/server.log)"
SET client_min_messages = warning;
BEGIN;
CREATE EXTENSION IF NOT EXISTS plproxy;
DROP SERVER IF EXISTS $SERVER CASCADE;
CREATE SERVER $SERVER FOREIGN DATA WRAPPER plproxy OPTIONS ($options);
CREATE USER MAPPING FOR PUBLIC SERVER $SERVER;
GRANT USAGE ON FOREIGN SERVER $SERVER TO PUBLIC;
DO \$\$ BEGIN
    IF EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'tasker_core') THEN
        RAISE EXCEPTION 'the router database $DB has the tasker_core extension: a router holds only PL/Proxy functions';
    END IF;
END \$\$;
-- the router holds no data: its functions are made afresh, in the same transaction
DROP SCHEMA IF EXISTS tasker_core CASCADE;
\i '$ROOT/sql/plproxy/router.sql'
COMMIT;
SQL
    # Each partition reached through the router must be the one its ids say it is.
    local bad
    bad="$(psql_on router "$DB" -At -F ' ' -c \
        "SELECT partition, problem FROM tasker_core.shard_check() WHERE problem IS NOT NULL")" \
        || die "the router cannot reach its partitions (log: $DIR/router/server.log)"
    [ -z "$bad" ] || die "partition check failed: $bad"
    note "router: $(conninfo router)"
    note "shard_check: $n partition(s), each reached at its own number, ids striped by $n"
    print_env
}

stop() {
    local d
    [ -d "$DIR" ] || return 0
    for d in "$DIR"/router "$DIR"/p*; do
        [ -f "$d/data/PG_VERSION" ] || continue
        TASKER_CLUSTER_DIR="$d" "$CLUSTER" stop
    done
}

print_env() {
    local n k
    n="$(partitions_of_set)"
    [ -n "$n" ] && [ -f "$DIR/router/port" ] || die "no shard set in $DIR: run '$0 start N' first"
    echo "export PGHOST=127.0.0.1 PGPORT=$(port_of router) PGUSER=postgres PGDATABASE=$DB"
    echo "export TASKER_ROUTER='$(conninfo router)'"
    echo "export TASKER_PARTITIONS=$n"
    for ((k = 0; k < n; k++)); do
        echo "export TASKER_PARTITION_$k='$(conninfo "p$k")'"
    done
}

status() {
    local n k ok=0
    n="$(partitions_of_set)"
    [ -n "$n" ] || { note "no shard set in $DIR"; return 1; }
    for name in router $(for ((k = 0; k < n; k++)); do echo "p$k"; done); do
        if cluster "$name" status; then
            note "$name: running on port $(port_of "$name")"
        else
            note "$name: stopped"
            ok=1
        fi
    done
    return $ok
}

clean() {
    stop
    rm -rf "$DIR"
    note "removed $DIR"
}

case "${1:-}" in
    start) start "${2:-}" ;;
    stop) stop ;;
    env) print_env ;;
    status) status ;;
    clean) clean ;;
    *) die "usage: $0 start [N] | stop | env | status | clean" ;;
esac
