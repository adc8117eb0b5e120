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
"$ROOT/scripts/cluster.sh" start
eval "$("$ROOT/scripts/cluster.sh" env)"
export TASKER_ROOT="$ROOT"
for b in "${benches[@]}"; do
    "$ROOT/target/venv/bin/python" "$b"
done
