"""Cost of tasker_core.metrics() on a database with a million steps (250,000 four-step tasks in
mixed states), against floors measured in the same run: a bare count of the maintained step
state, and the same rows grouped by state (what any per-state gauge must at least read).

Run by `make bench`. Prints ratios, never asserts.
"""
import os
import statistics
import time

import psycopg

DB = "tasker_bench_metrics"
TASKS = int(os.environ.get("TASKER_BENCH_METRICS_TASKS", "250000"))
TEMPLATE = """{"name": "metrics_flow", "namespace_name": "bench", "version": "1.0.0",
  "step_templates": [
    {"name": "a", "handler_class": "A"},
    {"name": "b", "handler_class": "B", "depends_on_step": "a"},
    {"name": "c", "handler_class": "C", "depends_on_step": "a"},
    {"name": "d", "handler_class": "D", "depends_on_steps": ["b", "c"]}]}"""

# Tasks by n % 10: 0-5 complete, 6 running (a in progress), 7 a failed and backing off,
# 8-9 not started.
LOAD = """
INSERT INTO tasker_tasks (named_task_id, requested_at, identity_hash, context, complete, created_at, updated_at)
SELECT (SELECT named_task_id FROM tasker_named_tasks WHERE name = 'metrics_flow'), now(), md5(i::text),
       jsonb_build_object('n', i), i %% 10 < 6, now(), now()
FROM generate_series(1, %(tasks)s) i;

INSERT INTO tasker_workflow_steps (task_id, named_step_id, attempts, retry_limit, retryable, processed, in_process,
                                   last_attempted_at, backoff_request_seconds, created_at, updated_at)
SELECT t.task_id, ns.named_step_id,
       CASE WHEN (t.context->>'n')::int %% 10 < 6 OR (ns.name = 'a' AND (t.context->>'n')::int %% 10 IN (6, 7)) THEN 1 ELSE 0 END,
       3, true, (t.context->>'n')::int %% 10 < 6, ns.name = 'a' AND (t.context->>'n')::int %% 10 = 6,
       CASE WHEN ns.name = 'a' AND (t.context->>'n')::int %% 10 = 7 THEN now() AT TIME ZONE 'UTC' END,
       CASE WHEN ns.name = 'a' AND (t.context->>'n')::int %% 10 = 7 THEN 3600 END,
       now(), now()
FROM tasker_tasks t
CROSS JOIN tasker_named_steps ns
WHERE ns.name IN ('a', 'b', 'c', 'd');

INSERT INTO tasker_workflow_step_edges (from_step_id, to_step_id, name, created_at, updated_at)
SELECT p.workflow_step_id, c.workflow_step_id, 'provides', now(), now()
FROM tasker_workflow_steps p JOIN tasker_named_steps pn ON pn.named_step_id = p.named_step_id
JOIN tasker_workflow_steps c ON c.task_id = p.task_id JOIN tasker_named_steps cn ON cn.named_step_id = c.named_step_id
WHERE (pn.name, cn.name) IN (('a', 'b'), ('a', 'c'), ('b', 'd'), ('c', 'd'));

INSERT INTO tasker_workflow_step_transitions (workflow_step_id, to_state, from_state, sort_key, most_recent, metadata, created_at, updated_at)
SELECT s.workflow_step_id,
       CASE WHEN (t.context->>'n')::int %% 10 < 6 THEN 'complete' WHEN (t.context->>'n')::int %% 10 = 6 THEN 'in_progress' ELSE 'error' END,
       'pending', 1, true, '{}', now(), now()
FROM tasker_workflow_steps s JOIN tasker_tasks t ON t.task_id = s.task_id
JOIN tasker_named_steps ns ON ns.named_step_id = s.named_step_id
WHERE (t.context->>'n')::int %% 10 < 6 OR (ns.name = 'a' AND (t.context->>'n')::int %% 10 IN (6, 7));

INSERT INTO tasker_task_transitions (task_id, to_state, from_state, sort_key, most_recent, metadata, created_at, updated_at)
SELECT t.task_id, CASE WHEN (t.context->>'n')::int %% 10 < 6 THEN 'complete' ELSE 'in_progress' END, 'pending', 1, true,
       '{}', now(), now()
FROM tasker_tasks t WHERE (t.context->>'n')::int %% 10 < 8;
"""


def timed(conn, sql, runs=7):
    conn.execute(sql).fetchall()   # warm
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        conn.execute(sql).fetchall()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def main():
    with psycopg.connect(dbname="postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {DB}")
    with psycopg.connect(dbname=DB, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION tasker_core")
        conn.execute("SELECT tasker_core.install_schema('public', 'rails')")
        conn.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (TEMPLATE,))
        t0 = time.time()
        for statement in LOAD.split(";\n\n"):
            conn.execute(statement, {"tasks": TASKS})
        loaded = time.time() - t0
        t0 = time.time()
        conn.execute("SELECT tasker_core.enable_tracking()")
        tracked = time.time() - t0
        conn.execute("VACUUM ANALYZE")
        steps = conn.execute("SELECT count(*) FROM tasker_core.step_state").fetchone()[0]
        print(f"\n== metrics() at {steps:,} steps ({TASKS:,} tasks; loaded in {loaded:.1f} s, "
              f"tracking backfilled in {tracked:.1f} s) ==")
        metrics = timed(conn, "SELECT tasker_core.metrics()")
        count = timed(conn, "SELECT count(*) FROM tasker_core.step_state")
        grouped = timed(conn, "SELECT state, count(*) FROM tasker_core.step_state GROUP BY 1")
        health = timed(conn, "SELECT * FROM tasker_core.get_system_health_counts_v01()")
        print(f"{'query':<52} {'median':>10} {'vs count floor':>15} {'vs grouped floor':>17}")
        for name, ms in [("tasker_core.metrics()", metrics), ("floor: count(*) of step_state", count),
                         ("floor: step_state grouped by state", grouped),
                         ("get_system_health_counts_v01() (for scale)", health)]:
            print(f"{name:<52} {ms:>8.1f} ms {ms / count:>14.1f}x {ms / grouped:>16.1f}x")
        print(f"scraped every 15 s, metrics() keeps one core busy {metrics / 15000 * 100:.2f} % of the time")
    with psycopg.connect(dbname="postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")


if __name__ == "__main__":
    main()
