#!/usr/bin/env bash
# `make test`: every test tasker_core has.
#   scripts/test.sh            prerequisites, then core, pg and integration suites
#   scripts/test.sh core|pg|integration   one suite (prerequisites still checked)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

what="${1:-all}"
"$ROOT/scripts/prereqs.sh"

run_core() {
    step "core: plain Rust tests of src/core"
    cargo test --lib --features "pg$PG_MAJOR pg_test" --no-default-features -- core::
}

run_pg() {
    step "pg: #[pg_test]s through the SQL surface (cargo pgrx test pg$PG_MAJOR)"
    local args=()
    local pgdata="$ROOT/target/pgrx-test/data"
    if is_root; then
        mkdir -p "$ROOT/target/pgrx-test"
        chown postgres:postgres "$ROOT/target/pgrx-test"
        args+=(--runas postgres --pgdata "$pgdata")
    fi
    cargo pgrx test "pg$PG_MAJOR" "${args[@]}"
}

run_integration() {
    step "integration: real cluster, real connections"
    "$ROOT/tests/integration/run.sh"
}

case "$what" in
    core) run_core ;;
    pg) run_pg ;;
    integration) run_integration ;;
    all) run_core; run_pg; run_integration ;;
    *) die "usage: $0 [core|pg|integration]" ;;
esac
step "all requested suites passed"
