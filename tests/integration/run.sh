#!/usr/bin/env bash
# The integration harness: real connections to a real cluster, committed transactions.
#
# Starts (or reuses) the throwaway cluster with tasker_core installed, then runs every test
# under tests/integration/:
#   python/test_*.py     pytest + psycopg (fixtures in python/conftest.py)
#   ../scaling/test_*.py pg_auto_failover and PL/Proxy on clusters of their own (once)
#   ruby/*_test.rb       plain Ruby (ActiveRecord, pg) — each file is one program, exit 0 = pass
#   node/*.test.js       node --test, with `pg` from target/node
#   clients/{python,node,ruby}  the worker clients' own test suites
#   ../pg_regress        SQL files with expected output (PostgreSQL's pg_regress)
#   rust/Cargo.toml      cargo test, if that crate exists
# Every test gets PGHOST/PGPORT/PGUSER of the cluster and creates its own databases.
#   tests/integration/run.sh [pytest args...]
set -uo pipefail
source "$(dirname "$0")/../../scripts/lib.sh"
HERE="$ROOT/tests/integration"

"$ROOT/scripts/install.sh" || exit 1
"$ROOT/scripts/cluster.sh" start || exit 1
eval "$("$ROOT/scripts/cluster.sh" env)"
export TASKER_ROOT="$ROOT"

failed=0
pass=0
run() {
    local label="$1"; shift
    step "integration: $label"
    if "$@"; then pass=$((pass + 1)); else failed=$((failed + 1)); echo "FAILED: $label" >&2; fi
}

run "sql regress (pg_regress: tests/pg_regress)" "$ROOT/tests/pg_regress/run.sh"
run "python (pytest)" "$ROOT/target/venv/bin/pytest" -q -p no:cacheprovider "$HERE/python" "$@"
# and again with the exact Rails index set in every database install_schema() creates
run "python (pytest), Rails index profile" env TASKER_INDEX_PROFILE=rails \
    "$ROOT/target/venv/bin/pytest" -q -p no:cacheprovider "$HERE/python" "$@"

# Beyond one machine (docs/scaling.md), once: formations and partitions of their own clusters
run "failover (pg_auto_failover: tests/scaling/test_failover.py)" \
    "$ROOT/target/venv/bin/pytest" -q -s -p no:cacheprovider "$ROOT/tests/scaling/test_failover.py"
run "sharding (PL/Proxy: tests/scaling/test_sharding.py)" \
    "$ROOT/target/venv/bin/pytest" -q -p no:cacheprovider "$ROOT/tests/scaling/test_sharding.py"

shopt -s nullglob
for t in "$HERE"/ruby/*_test.rb; do
    run "ruby $(basename "$t")" ruby "$t"
done
node_tests=("$HERE"/node/*.test.js)
if [ ${#node_tests[@]} -gt 0 ]; then
    if command -v node >/dev/null && [ -d "$ROOT/target/node/node_modules" ]; then
        run "node" env NODE_PATH="$ROOT/target/node/node_modules" node --test "${node_tests[@]}"
    else
        echo "node or target/node missing: run scripts/prereqs.sh" >&2; failed=$((failed + 1))
    fi
fi
# The worker clients (clients/*) and their own tests, against the same cluster.
run "python client (pytest)" "$ROOT/target/venv/bin/pytest" -q -p no:cacheprovider "$ROOT/clients/python/tests"
if command -v node >/dev/null && [ -d "$ROOT/target/node/node_modules" ]; then
    run "node client" env NODE_PATH="$ROOT/target/node/node_modules" node --test "$ROOT/clients/node/test/worker.test.js"
fi
for t in "$ROOT"/clients/ruby/test/*_test.rb; do
    run "ruby client $(basename "$t")" ruby -I"$ROOT/clients/ruby/lib" -I"$ROOT/clients/ruby/test" "$t"
done
if [ -f "$HERE/rust/Cargo.toml" ]; then
    run "rust" cargo test --manifest-path "$HERE/rust/Cargo.toml"
fi

step "integration suites: $pass passed, $failed failed"
[ "$failed" = 0 ]
