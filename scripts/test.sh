#!/usr/bin/env bash
# `make test`: every test tasker_core has.
#   scripts/test.sh            prerequisites, then core, fuzz, pg and integration suites (SQL regress included)
#   scripts/test.sh core|fuzz|pg|integration   one suite (prerequisites still checked)
#   FUZZ_SECONDS=N             how long each fuzz target runs (default 30)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

what="${1:-all}"
"$ROOT/scripts/prereqs.sh"

run_core() {
    step "core: plain Rust tests of the rules crate (crates/tasker_rules: no PostgreSQL, no pgrx)"
    cargo test -p tasker_rules
}

# libFuzzer on the pure Rust rules (fuzz/): each target starts from the seeds in
# fuzz/seeds/<target> and keeps what it learns in target/fuzz-corpus/<target>. A finding
# stops the suite and is saved under fuzz/artifacts/<target>/ to be replayed with
# `cargo fuzz run <target> <file>`.
run_fuzz() {
    step "fuzz: libFuzzer on template parsing and context validation (${FUZZ_SECONDS:-30} s each)"
    local toolchain=()
    if rustup run nightly rustc --version >/dev/null 2>&1; then
        toolchain=(+nightly)
    else
        # cargo fuzz passes -Z flags (the sanitizer); the stable compiler accepts them this way
        note "no nightly toolchain: building the fuzz targets with the stable one"
        export RUSTC_BOOTSTRAP=1
    fi
    local t
    for t in template_parse context_validate; do
        mkdir -p "$ROOT/target/fuzz-corpus/$t"
        local log="$ROOT/target/fuzz-corpus/$t.log" rc=0
        (cd "$ROOT/fuzz" && cargo "${toolchain[@]}" fuzz run -O "$t" \
            "$ROOT/target/fuzz-corpus/$t" "seeds/$t" -- \
            -max_total_time="${FUZZ_SECONDS:-30}" -max_len=4096) >"$log" 2>&1 || rc=$?
        if [ "$rc" != 0 ]; then
            tail -40 "$log"
            die "fuzz target $t failed (log: $log)"
        fi
        note "$t: $(grep -E '^Done' "$log" | tail -1)"
    done
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
    fuzz) run_fuzz ;;
    pg) run_pg ;;
    integration) run_integration ;;
    all) run_core; run_fuzz; run_pg; run_integration ;;
    *) die "usage: $0 [core|fuzz|pg|integration]" ;;
esac
step "all requested suites passed"
