#!/usr/bin/env bash
# `make demo`: install what is missing, build and install tasker_core into a throwaway
# cluster, register an order-fulfilment workflow, create a few tasks, and run them to the end
# with two workers written only in SQL, printing the events as they arrive.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"
# The demo has a cluster of its own, so it never disturbs the one the tests use.
export TASKER_CLUSTER_DIR="${TASKER_CLUSTER_DIR:-$ROOT/target/demo-cluster}"
# tasker_core preloaded: the notifier sends the demo's wake-ups after commit and the timer runs
# tick() (both in the demo's database).
export TASKER_PG_OPTS="${TASKER_PG_OPTS:--c shared_preload_libraries=tasker_core -c tasker_core.tick_database=tasker_demo}"

step "1/8 checking prerequisites"
"$ROOT/scripts/prereqs.sh"

step "2/8 building and installing the extension"
"$ROOT/scripts/install.sh"

step "3/8 starting a throwaway PostgreSQL cluster under target/ (tasker_core preloaded)"
"$ROOT/scripts/cluster.sh" stop   # a preloaded library is the one of the server's start
"$ROOT/scripts/cluster.sh" start
eval "$("$ROOT/scripts/cluster.sh" env)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    "$ROOT/scripts/cluster.sh" stop
}
trap cleanup EXIT
psql_q() { psql -X -q -v ON_ERROR_STOP=1 "$@"; }
psql_q -c "DROP DATABASE IF EXISTS tasker_demo WITH (FORCE)" -c "CREATE DATABASE tasker_demo"
export PGDATABASE=tasker_demo

step "4/8 CREATE EXTENSION tasker_core; install the Tasker schema; enable tracking"
psql_q -c "CREATE EXTENSION tasker_core" \
       -c "SELECT tasker_core.install_schema() AS created_tasker_tables" \
       -c "SELECT tasker_core.enable_tracking() AS tracked_steps"
# (the notifier restarts a second after the database is created)
for _ in $(seq 50); do
    mode="$(psql -X -At -c "SELECT detail FROM tasker_core.health() WHERE check_name = 'wakeups'")"
    case "$mode" in notifier*) break ;; esac
    sleep 0.1
done
note "wake-ups: $mode"

step "5/8 registering the order-fulfilment template: validate -> {reserve, charge, pack each item (a map), gift wrap (a condition)} -> ship -> notify"
psql_q -v template="$(cat "$ROOT/demo/order_fulfilment.json")" <<'SQL'
SELECT tasker_core.register_task_template(:'template'::jsonb) AS named_task_id;
SELECT namespace, name, version, step_count FROM tasker_core.list_task_templates();
SQL

step "6/8 creating three tasks (charge_payment will fail once in each and retry after its backoff; only order 2 is a gift)"
psql_q <<'SQL'
SELECT tasker_core.subscribe('demo', ARRAY['task.*', 'step.*']) AS subscribed_at;
SELECT tasker_core.create_task('shop', 'order_fulfilment', NULL,
         jsonb_build_object('order_id', n, 'amount_cents', 1000 * n, 'items', jsonb_build_array('book', 'lamp'),
                            'gift', n = 2),
         jsonb_build_object('initiator', 'demo', 'idempotency_key', 'order-' || n)) AS task_id
FROM generate_series(1, 3) AS n;
SQL

step "7/8 running two SQL workers (psql sessions calling claim_steps / complete_step / fail_step)"
psql_q -f "$ROOT/demo/worker.sql"
for w in sql-worker-1 sql-worker-2; do
    psql -X -q -v ON_ERROR_STOP=1 -c "CALL demo.run_worker('$w')" >/dev/null &
    pids+=("$!")
done
# Print the events as they arrive, from the durable log through the subscription.
deadline=$((SECONDS + 90))
while :; do
    psql -X -At -F ' ' <<'SQL' | sed 's/^/    /'
WITH batch AS (SELECT * FROM tasker_core.poll('demo', 500)),
     shown AS (SELECT to_char(b.created_at, 'HH24:MI:SS.MS') AS at, b.name,
                      'task ' || b.task_id || COALESCE(' step ' || b.step_id || ' (' || ns.name || ')', '') AS what,
                      COALESCE(b.from_state || ' -> ' || b.to_state, '') AS change, b.cursor, b.id
               FROM batch b
               LEFT JOIN tasker_workflow_steps ws ON ws.workflow_step_id = b.step_id
               LEFT JOIN tasker_named_steps ns ON ns.named_step_id = ws.named_step_id),
     acked AS (SELECT tasker_core.ack('demo', (SELECT cursor FROM shown ORDER BY id DESC LIMIT 1))
               WHERE EXISTS (SELECT 1 FROM shown))
SELECT at, rpad(name, 26), rpad(what, 40), change FROM shown, (SELECT count(*) FROM acked) a ORDER BY id;
SQL
    done_tasks="$(psql -X -At -c "SELECT count(*) FILTER (WHERE complete) || '/' || count(*) FROM tasker_tasks")"
    if [ "${done_tasks%/*}" = "${done_tasks#*/}" ] && ! jobs -r | grep -q .; then break; fi
    if [ "$SECONDS" -gt "$deadline" ]; then die "the workflow did not finish in 90 s"; fi
    sleep 0.3
done
wait
pids=()

step "8/8 final states"
psql_q <<'SQL'
SELECT task_id, status, completed_steps || '/' || total_steps AS steps, execution_status, health_status
FROM tasker_core.get_task_execution_contexts_batch((SELECT array_agg(task_id) FROM tasker_tasks));
\echo 'charge_payment of task 1, transition by transition:'
SELECT t.sort_key, t.from_state, t.to_state, t.metadata ->> 'worker_id' AS worker,
       t.metadata -> 'error' ->> 'message' AS error, t.metadata ->> 'backoff_seconds' AS backoff_s
FROM tasker_workflow_step_transitions t
JOIN tasker_workflow_steps ws ON ws.workflow_step_id = t.workflow_step_id
JOIN tasker_named_steps ns ON ns.named_step_id = ws.named_step_id
WHERE ws.task_id = 1 AND ns.name = 'charge_payment' ORDER BY t.sort_key;
\echo 'task 1 step by step: pack_item expanded into one step per item, gift_wrap skipped (not a gift):'
SELECT s.workflow_step_id AS step, s.name, s.state,
       CASE WHEN d.skipped THEN 'skipped: ' || (t.metadata ->> 'reason')
            WHEN d.rule ? 'map' THEN 'map step: results ' || (ws.results)::text
            WHEN ws.inputs ? 'element' THEN 'instance for ' || (ws.inputs ->> 'element') END AS dynamic
FROM tasker_core.step_state s
JOIN tasker_workflow_steps ws ON ws.workflow_step_id = s.workflow_step_id
LEFT JOIN tasker_core.dynamic_steps d ON d.workflow_step_id = s.workflow_step_id
LEFT JOIN tasker_workflow_step_transitions t ON t.workflow_step_id = s.workflow_step_id AND t.most_recent
WHERE s.task_id = 1 ORDER BY s.workflow_step_id;
\echo 'gift_wrap ran for the gift (task 2):'
SELECT s.name, s.state FROM tasker_core.step_state s WHERE s.task_id = 2 AND s.name = 'gift_wrap';
SELECT tasker_core.task_graph_dot(1) AS dag_of_task_1 \gset
\echo :dag_of_task_1
\echo 'Why is it not running? A fourth order whose validation failed with a 60 s backoff, explained:'
SELECT tasker_core.create_task('shop', 'order_fulfilment', NULL,
         '{"order_id": 4, "amount_cents": 4000, "items": ["pen"]}', '{"initiator": "demo"}') AS task_4 \gset
SELECT tasker_core.fail_step(workflow_step_id, 'demo-operator', '"address not found"', true, 60) AS backoff_seconds
FROM tasker_core.claim_steps('demo-operator', NULL, 1, 30);
SELECT workflow_step_id AS step, step_name, code, reason FROM tasker_core.explain_task(:task_4);
\echo 'the same for the failed step alone: explain_step'
SELECT code, reason, at FROM tasker_core.explain_step(
    (SELECT workflow_step_id FROM tasker_core.step_state WHERE task_id = :task_4 AND state = 'error'));
SELECT tasker_core.cancel_task(:task_4, 'demo over') AS steps_cancelled;
SQL
mkdir -p "$ROOT/target/demo"
psql -X -At -c "SELECT tasker_core.task_graph_dot(1)" > "$ROOT/target/demo/task_1.dot"
if command -v dot >/dev/null; then
    dot -Tpng "$ROOT/target/demo/task_1.dot" -o "$ROOT/target/demo/task_1.png"
    note "DAG rendered with Graphviz: target/demo/task_1.png"
else
    note "Graphviz is not installed: the DOT source is in target/demo/task_1.dot"
fi
step "done: stopping the cluster (data stays in target/demo-cluster until 'make clean-cluster')"
