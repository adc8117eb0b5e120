"""Map steps at scale: the expansion of an N-element map (the completion of the step whose
results it maps over, which expands it in the same transaction) and the fan-in (the completion
of the last instance, which completes the map step with the N results in element order and
makes its dependent ready), each against a floor measured in the same run:

- expansion: inserting the same rows — N steps, N edges, N maintained rows — with plain
  INSERT ... SELECT into copies of the tables (same columns and indexes, no triggers) in one
  transaction, without foreign keys and with the Tasker tables' (steps to tasks and named
  steps, edges to steps: four checks per element);
- fan-in: an ordinary completion (the median of the instances') plus reading the N results into
  one array in id order (jsonb_agg), each timed as a statement of its own and added.

Every figure is the median of RUNS tasks, each a commit with fsync on. Run by `make bench`;
prints, never asserts.
"""
import json
import os
import statistics
import time

import psycopg

DB = "tasker_bench_dynamic"
SIZES = [int(s) for s in os.environ.get("TASKER_BENCH_MAP_SIZES", "1000,10000").split(",")]
RUNS = int(os.environ.get("TASKER_BENCH_MAP_RUNS", "3"))

TEMPLATE = {"name": "fan", "namespace_name": "bench_map", "version": "1.0.0",
            "step_templates": [
                {"name": "fetch", "handler_class": "F"},
                {"name": "each", "handler_class": "E", "depends_on_step": "fetch",
                 "map": {"over": "/parents/fetch/items"}},
                {"name": "sum", "handler_class": "S", "depends_on_step": "each"}]}


def ms(f):
    t0 = time.perf_counter()
    f()
    return (time.perf_counter() - t0) * 1000


def floor_insert(conn, n, schema):
    """Inserting n steps, edges and maintained rows into trigger-less copies of the tables in
    `schema`, one commit (steps numbered 1..n, each with an edge into step 0, the map step)."""
    task, named = conn.execute("SELECT min(task_id), (SELECT min(named_step_id) FROM tasker_named_steps) "
                               "FROM tasker_tasks").fetchone()
    cols = ("task_id, named_step_id, retryable, retry_limit, in_process, processed, attempts, inputs, results, "
            "skippable, created_at, updated_at")

    def go():
        with conn.transaction():
            conn.execute(f"""INSERT INTO {schema}.steps (workflow_step_id, {cols})
                             SELECT i, %s, %s, true, 3, false, false, 0, jsonb_build_object('element', i, 'index', i),
                                    '{{}}', false, now(), now() FROM generate_series(1, %s) i""", (task, named, n))
            conn.execute(f"""INSERT INTO {schema}.edges (from_step_id, to_step_id, name, created_at, updated_at)
                             SELECT i, 0, 'map_instance', now(), now() FROM generate_series(1, %s) i""", (n,))
            conn.execute(f"""INSERT INTO {schema}.states (workflow_step_id, task_id, named_step_id, name, parent_ids,
                                 child_ids, retryable, retry_limit, in_process, processed, attempts, created_at,
                                 namespace_id)
                             SELECT i, %s, %s, 'each', '{{}}', '{{0}}', true, 3, false, false, 0, now(), 1
                             FROM generate_series(1, %s) i""", (task, named, n))
    t = ms(go)
    conn.execute(f"TRUNCATE {schema}.edges, {schema}.states")
    conn.execute(f"DELETE FROM {schema}.steps WHERE workflow_step_id > 0")
    return t


def floor_tables(conn):
    """Copies of the steps, edges and maintained rows (columns and indexes, no triggers): in
    schema floor without foreign keys, in floor_fk with the Tasker tables' (steps to tasks and
    named steps, edges to steps), and the map step 0 the edges point to."""
    for schema, fks in (("floor", False), ("floor_fk", True)):
        conn.execute(f"CREATE SCHEMA {schema}")
        for name, table in (("steps", "public.tasker_workflow_steps"), ("edges", "public.tasker_workflow_step_edges"),
                            ("states", "tasker_core.step_state")):
            conn.execute(f"CREATE TABLE {schema}.{name} (LIKE {table} INCLUDING ALL)")
        if fks:
            conn.execute(f"ALTER TABLE {schema}.steps ADD FOREIGN KEY (task_id) REFERENCES public.tasker_tasks, "
                         "ADD FOREIGN KEY (named_step_id) REFERENCES public.tasker_named_steps")
            conn.execute(f"ALTER TABLE {schema}.edges ADD FOREIGN KEY (from_step_id) REFERENCES {schema}.steps, "
                         f"ADD FOREIGN KEY (to_step_id) REFERENCES {schema}.steps")
        conn.execute(f"""INSERT INTO {schema}.steps (workflow_step_id, task_id, named_step_id, created_at, updated_at)
                         SELECT 0, min(task_id), (SELECT min(named_step_id) FROM tasker_named_steps), now(), now()
                         FROM tasker_tasks""")


def run_task(conn, n):
    """(expansion ms, fan-in ms, median ordinary completion ms, jsonb_agg ms) of one task."""
    conn.execute("SELECT tasker_core.create_task('bench_map', 'fan', NULL, '{}')")
    (fetch,) = conn.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('b', NULL, 1, 600)").fetchone()
    items = json.dumps({"items": list(range(n))})
    expand = ms(lambda: conn.execute("SELECT tasker_core.complete_step(%s, 'b', %s::jsonb)", (fetch, items)))
    ids = []
    while True:
        batch = [r[0] for r in conn.execute(
            "SELECT workflow_step_id FROM tasker_core.claim_steps('b', NULL, 1000, 600)").fetchall()]
        if not batch:
            break
        ids += batch
    assert len(ids) == n, f"{len(ids)} instances claimed, not {n}"
    rest, final = ids[:-1], ids[-1]
    # a sample of ordinary completions, then the others in batches
    ordinary = [ms(lambda s=step: conn.execute("SELECT tasker_core.complete_step(%s, 'b', '{\"ok\": true}')", (s,)))
                for step in rest[:20]]
    for k in range(20, len(rest), 1000):
        conn.execute("SELECT count(*) FROM tasker_core.report_steps('b', %s::jsonb)",
                     (json.dumps([{"step_id": s, "results": {"ok": True}} for s in rest[k:k + 1000]]),))
    # the last instance: its completion collects the results and readies the fan-in
    last = ms(lambda: conn.execute("SELECT tasker_core.complete_step(%s, 'b', '{\"ok\": true}')", (final,)))
    agg = ms(lambda: conn.execute(
        "SELECT jsonb_agg(results ORDER BY workflow_step_id) FROM tasker_workflow_steps "
        "WHERE task_id = (SELECT max(task_id) FROM tasker_tasks) AND inputs ? 'element'"))
    (sum_step, parents) = conn.execute(
        "SELECT workflow_step_id, parent_results FROM tasker_core.claim_steps('b', NULL, 1, 600)").fetchone()
    assert len(parents["each"]) == n, "the fan-in sees every result"
    conn.execute("SELECT tasker_core.complete_step(%s, 'b', '{}')", (sum_step,))
    return expand, last, statistics.median(ordinary), agg


def main():
    with psycopg.connect(dbname="postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {DB}")
    with psycopg.connect(dbname=DB, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION tasker_core")
        conn.execute("SELECT tasker_core.install_schema()")
        conn.execute("SELECT tasker_core.enable_tracking()")
        conn.execute("SET tasker_core.max_map_elements = %s" % max(SIZES))
        conn.execute("SET tasker_core.notify = off")
        conn.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (json.dumps(TEMPLATE),))
        print(f"\n**map steps: expansion and fan-in** (fsync on, tracking on, median of {RUNS} tasks)\n")
        print("| elements | expansion ms | floor: insert the rows ms | vs floor "
              "| floor with the Tasker foreign keys ms | vs it | fan-in ms "
              "| floor: a completion + jsonb_agg ms | vs floor |")
        print("|---|---|---|---|---|---|---|---|---|")
        for n in SIZES:
            rows = [run_task(conn, n) for _ in range(RUNS)]
            if n == SIZES[0]:
                floor_tables(conn)
            floors = [floor_insert(conn, n, "floor") for _ in range(RUNS)]
            floors_fk = [floor_insert(conn, n, "floor_fk") for _ in range(RUNS)]
            expand = statistics.median(r[0] for r in rows)
            fan_in = statistics.median(r[1] for r in rows)
            fan_floor = statistics.median(r[2] + r[3] for r in rows)
            floor, floor_fk = statistics.median(floors), statistics.median(floors_fk)
            print(f"| {n:,} | {expand:.1f} | {floor:.1f} | {expand / floor:.2f}× | {floor_fk:.1f} "
                  f"| {expand / floor_fk:.2f}× | {fan_in:.1f} | {fan_floor:.1f} | {fan_in / fan_floor:.2f}× |")
        problems = conn.execute("SELECT count(*) FROM tasker_core.verify()").fetchone()[0]
        print(f"\nafter the runs: verify() {problems} rows")


if __name__ == "__main__":
    main()
