#!/usr/bin/env bash
# `make demo`: install what is missing, build and install tasker_core into a throwaway
# cluster, create the Tasker schema, insert a sample workflow and show it, then stop.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

step "1/6 checking prerequisites"
"$ROOT/scripts/prereqs.sh"

step "2/6 building and installing the extension"
"$ROOT/scripts/install.sh"

step "3/6 starting a throwaway PostgreSQL cluster under target/"
"$ROOT/scripts/cluster.sh" start
eval "$("$ROOT/scripts/cluster.sh" env)"
trap '"$ROOT/scripts/cluster.sh" stop' EXIT
psql_q() { psql -X -q -v ON_ERROR_STOP=1 "$@"; }
psql_q -c "DROP DATABASE IF EXISTS tasker_demo WITH (FORCE)" -c "CREATE DATABASE tasker_demo"
export PGDATABASE=tasker_demo

step "4/6 CREATE EXTENSION tasker_core; SELECT tasker_core.install_schema()"
psql_q -c "CREATE EXTENSION tasker_core" \
       -c "SELECT tasker_core.install_schema() AS created_tasker_tables" \
       -c "SELECT extversion AS tasker_core_version FROM pg_extension WHERE extname = 'tasker_core'"

step "5/6 inserting a sample workflow: validate -> {reserve, charge, pack} -> ship -> notify"
psql_q -f "$ROOT/demo/sample_workflow.sql"
task_id="$(psql -X -At -c "SELECT max(task_id) FROM tasker_tasks")"
note "task $task_id created"

step "6/6 the workflow of task $task_id"
psql_q -v task_id="$task_id" <<'SQL'
\echo 'steps, in dependency order (tasker_core.task_steps):'
SELECT workflow_step_id AS step, name, current_state AS state,
       parent_step_ids AS parents, dependency_level AS level
FROM tasker_core.task_steps(:task_id);
\echo 'edges (parent -> child):'
SELECT p.name || ' -> ' || c.name AS edge
FROM tasker_workflow_step_edges e
JOIN tasker_core.task_steps(:task_id) p ON p.workflow_step_id = e.from_step_id
JOIN tasker_core.task_steps(:task_id) c ON c.workflow_step_id = e.to_step_id
ORDER BY p.dependency_level, p.workflow_step_id, c.workflow_step_id;
SQL

step "done: stopping the cluster (data stays in target/tasker-cluster until 'make clean-cluster')"
