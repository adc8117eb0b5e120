#!/usr/bin/env bash
# Beyond one machine, on this machine (docs/scaling.md): each check by one command.
#   scripts/scaling.sh failover   pg_auto_failover: monitor, primary, synchronous secondary; the
#                                 primary killed mid-run (tests/scaling/test_failover.py)
#   scripts/scaling.sh replica    a hot standby by streaming replication (test_replica.py)
#   scripts/scaling.sh sharding   PL/Proxy: a router and 2 or 4 partitions (tests/scaling/test_sharding.py)
#   scripts/scaling.sh bench      steps/s through a PL/Proxy router with 1, 2 and 4 partitions
# Each installs what is missing and the extension first; `make test` runs the three tests.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

what="${1:-}"
case "$what" in
    failover|replica|sharding|bench) ;;
    *) die "usage: scripts/scaling.sh failover|replica|sharding|bench" ;;
esac
"$ROOT/scripts/prereqs.sh"
if [ "$what" = bench ]; then "$ROOT/scripts/install.sh" --release; else "$ROOT/scripts/install.sh"; fi
export TASKER_ROOT="$ROOT"
PYTEST=("$ROOT/target/venv/bin/pytest" -q -s -p no:cacheprovider)
case "$what" in
    failover) step "failover with pg_auto_failover"; "${PYTEST[@]}" tests/scaling/test_failover.py ;;
    sharding) step "sharding by task with PL/Proxy"; "${PYTEST[@]}" tests/scaling/test_sharding.py ;;
    replica)
        step "a read replica by streaming replication"
        "$ROOT/scripts/cluster.sh" start
        eval "$("$ROOT/scripts/cluster.sh" env)"
        "${PYTEST[@]}" tests/integration/python/test_replica.py ;;
    bench) step "steps/s through a PL/Proxy router (fsync on)"; "$ROOT/target/venv/bin/python" benches/shards.py ;;
    *) die "usage: scripts/scaling.sh failover|replica|sharding|bench" ;;
esac
