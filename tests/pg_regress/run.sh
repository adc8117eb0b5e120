#!/usr/bin/env bash
# SQL regression tests, the PostgreSQL way: each sql/NAME.sql runs through psql on a fresh
# database of the throwaway cluster (PostgreSQL's pg_regress, in the order of `schedule`), and
# its output must equal expected/NAME.out. Readable by anyone who knows SQL: the files are the
# contract of the errors table, template errors, the state machine and readiness rows.
#   tests/pg_regress/run.sh            run them (make test runs them through the harness)
#   tests/pg_regress/run.sh --accept   after a deliberate change: copy the new outputs to
#                                      expected/ (read the diff first)
set -euo pipefail
source "$(dirname "$0")/../../scripts/lib.sh"
HERE="$ROOT/tests/pg_regress"

"$ROOT/scripts/cluster.sh" start >/dev/null
eval "$("$ROOT/scripts/cluster.sh" env)"
out="$ROOT/target/pg_regress"
rm -rf "$out"
mkdir -p "$out"
pg_regress="$(dirname "$(pg_config --pgxs)")/../test/regress/pg_regress"
[ -x "$pg_regress" ] || die "pg_regress not found at $pg_regress (postgresql-server-dev-$PG_MAJOR)"
if "$pg_regress" --host="$PGHOST" --port="$PGPORT" --user="$PGUSER" \
        --inputdir="$HERE" --outputdir="$out" --dbname=tasker_regress \
        --schedule="$HERE/schedule"; then
    exit 0
fi
if [ "${1:-}" = "--accept" ]; then
    cp "$out"/results/*.out "$HERE/expected/"
    note "copied $(ls "$out"/results/*.out | wc -l) outputs to tests/pg_regress/expected/"
    exit 0
fi
cat "$out/regression.diffs" >&2 || true
exit 1
