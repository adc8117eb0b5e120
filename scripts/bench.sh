#!/usr/bin/env bash
# `make bench`: performance figures, each a ratio against a baseline measured in the same run
# on the same database (the PL/pgSQL reference, and the floor of the bare reads/writes).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

"$ROOT/scripts/prereqs.sh" >/dev/null
step "tasker_core benchmarks"
note "machine: $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB, $(uname -m), $(pg_config --version)"
benches=("$ROOT"/benches/*.py)
if [ ! -e "${benches[0]}" ]; then
    note "no benchmarks yet"
    exit 0
fi
"$ROOT/scripts/install.sh" --release
# A cluster of its own, durable as users run it (fsync and synchronous_commit on), with
# autovacuum visiting each database every 10 s as the README advises for busy workers, and
# tasker_core preloaded so that the notifier sends the worker benchmark's wake-ups. Started
# fresh each time: a preloaded library is the one of the server's start.
export TASKER_CLUSTER_DIR="$ROOT/target/bench-cluster"
export TASKER_PG_OPTS="-c fsync=on -c synchronous_commit=on -c full_page_writes=on -c autovacuum_naptime=10s \
    -c shared_preload_libraries=tasker_core -c tasker_core.tick_database=tasker_bench_worker"
"$ROOT/scripts/cluster.sh" stop
"$ROOT/scripts/cluster.sh" start
eval "$("$ROOT/scripts/cluster.sh" env)"
note "cluster: fsync=on, synchronous_commit=on, autovacuum_naptime=10s, tasker_core preloaded (notifier for tasker_bench_worker)"
export TASKER_ROOT="$ROOT"
for b in "${benches[@]}"; do
    "$ROOT/target/venv/bin/python" "$b"
done
