"""Sharding by task with PL/Proxy (docs/scaling.md): a router and 2 or 4 partition clusters
started by scripts/shards.sh, and the clients run unchanged against the router.

Each partition is an ordinary tasker_core database whose task and step ids are striped by the
partition count; the router's schema tasker_core holds PL/Proxy functions with the names and
arguments of the engine's. The tests drive everything through the router with the Python
client (clients/python, in this process), the Node and Ruby clients (the end-to-end test's
workers under tests/integration/e2e, unchanged, pointed at the router by PG* variables) and
plain SQL, and check the results on the partitions themselves.

Run: target/venv/bin/pytest tests/scaling/test_sharding.py   (about 30 s; make test-sharding)
"""
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "clients" / "python"))
from tasker_worker import PermanentError, RetryableError, Worker  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support import wait_until  # noqa: E402

SHARDS = ROOT / "scripts" / "shards.sh"
E2E = ROOT / "tests" / "integration" / "e2e"
NODE_MODULES = ROOT / "target" / "node" / "node_modules"
FINISHED = ("complete", "error", "cancelled", "resolved_manually")


class ShardSet:
    """N partitions and a router, in a directory of their own (scripts/shards.sh)."""

    def __init__(self, n):
        self.n = n
        self.env = dict(os.environ, TASKER_SHARDS_DIR=str(ROOT / "target" / f"shards-test-{n}"))
        self.env.pop("TASKER_PG_OPTS", None)

    def start(self):
        self.run("clean")  # a set left by an interrupted run
        out = self.run("start", str(self.n))
        exports = dict(line.split(" ", 1)[1].split("=", 1) for line in out.splitlines()
                       if line.startswith("export TASKER_"))
        unquote = lambda v: v.strip("'")  # noqa: E731
        self.router = unquote(exports["TASKER_ROUTER"])
        self.partitions = [unquote(exports[f"TASKER_PARTITION_{k}"]) for k in range(self.n)]
        pg = next(line for line in out.splitlines() if line.startswith("export PGHOST="))
        self.pg_env = dict(kv.split("=", 1) for kv in pg.split()[1:])

    def run(self, *args):
        p = subprocess.run([str(SHARDS), *args], env=self.env, capture_output=True, text=True)
        if p.returncode != 0:
            raise AssertionError(f"shards.sh {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
        return p.stdout

    def connect(self):
        return psycopg.connect(self.router, autocommit=True)

    def part(self, k):
        return psycopg.connect(self.partitions[k], autocommit=True)

    def owner(self, id_):
        return (id_ - 1) % self.n


@pytest.fixture(scope="class")
def shards(request):
    s = ShardSet(request.cls.PARTITIONS)
    s.start()
    yield s
    s.run("clean")


def sqlstate(conn, sql, params=None):
    try:
        conn.execute(sql, params)
    except psycopg.Error as e:
        return e.sqlstate
    return None


def statuses(db, task_ids):
    rows = db.execute("SELECT task_id, status FROM tasker_core.get_task_execution_contexts_batch(%s)",
                      (task_ids,)).fetchall()
    return dict(rows)


def register(db, template):
    return db.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (json.dumps(template),)).fetchone()[0]


def step_history(shards, step_ids):
    """{step id: [(to_state, worker_id)]} in transition order, read on each step's partition."""
    by_part = defaultdict(list)
    for s in step_ids:
        by_part[shards.owner(s)].append(s)
    out = defaultdict(list)
    for k, ids in by_part.items():
        with shards.part(k) as p:
            for step, to_state, worker in p.execute(
                    """SELECT workflow_step_id, to_state, metadata->>'worker_id' FROM tasker_workflow_step_transitions
                       WHERE workflow_step_id = ANY(%s) ORDER BY workflow_step_id, sort_key""", (ids,)):
                out[step].append((to_state, worker))
    return out


def task_steps(shards, task_ids):
    """[(task id, step id, step name, results)] read on the partitions."""
    rows = []
    for k in range(shards.n):
        with shards.part(k) as p:
            rows += p.execute("""SELECT ws.task_id, ws.workflow_step_id, ns.name::text, ws.results
                                 FROM tasker_workflow_steps ws JOIN tasker_named_steps ns USING (named_step_id)
                                 WHERE ws.task_id = ANY(%s)""", (task_ids,)).fetchall()
    return rows


class Subscriber(threading.Thread):
    """Reads the router's subscription (every partition's log), acking each batch."""

    def __init__(self, conninfo, name):
        super().__init__(daemon=True)
        self.conninfo, self.name, self.events, self.error = conninfo, name, [], None
        self.stop = threading.Event()

    def run(self):
        try:
            with psycopg.connect(self.conninfo, autocommit=True) as conn:
                while True:
                    stopping = self.stop.is_set()
                    batch = conn.execute("SELECT cursor, id, name, task_id, step_id FROM tasker_core.poll(%s, 50)",
                                         (self.name,)).fetchall()
                    if batch:
                        self.events.extend(batch)
                        conn.execute("SELECT tasker_core.ack(%s, %s)", (self.name, batch[-1][0]))
                        continue
                    if stopping:
                        return
                    time.sleep(0.05)
        except Exception as e:  # reported by the test
            self.error = e


def partition_of_router_row(cursor_before, cursor_after):
    """The partition whose position a row moved (its cursor differs from the previous row's there)."""
    before = dict(item.split(":", 1) for item in cursor_before.split(",")) if cursor_before else {}
    after = dict(item.split(":", 1) for item in cursor_after.split(","))
    moved = [k for k, v in after.items() if before.get(k) != v]
    assert len(moved) == 1, (cursor_before, cursor_after)
    return int(moved[0]), after[moved[0]]


def direct_log(shards, k, after):
    """Partition k's own log after its cursor `after`, read on the partition."""
    out, cursor = [], after
    with shards.part(k) as p:
        while True:
            rows = p.execute("SELECT cursor, id FROM tasker_core.events_after(%s, 1000)", (cursor,)).fetchall()
            if not rows:
                return out
            out += rows
            cursor = rows[-1][0]


FLOW = {
    "name": "flow", "namespace_name": "py", "version": "1.0.0",
    "step_templates": [
        {"name": "fetch", "handler_class": "Py::Work"},
        {"name": "flaky", "handler_class": "Py::Flaky", "depends_on_step": "fetch", "default_retry_limit": 3},
        {"name": "check", "handler_class": "Py::Check", "depends_on_step": "fetch"},
        {"name": "join", "handler_class": "Py::Work", "depends_on_steps": ["flaky", "check"]},
    ],
}


def run_python_workload(shards, tasks, workers=3):
    """`tasks` tasks of FLOW run by `workers` Python workers on the router while a subscriber
    reads the router's subscription; checks every task, handler run, transition and event."""
    db = shards.connect()
    assert register(db, FLOW) >= 1
    start = db.execute("SELECT tasker_core.subscribe('py_sub')").fetchone()[0]
    subscriber = Subscriber(shards.router, "py_sub")
    subscriber.start()
    ids = [db.execute("SELECT tasker_core.create_task('py', 'flow', NULL, %s::jsonb)",
                      (json.dumps({"n": n, "doomed": n % 10 == 0}),)).fetchone()[0] for n in range(1, tasks + 1)]
    assert len(set(ids)) == tasks
    per_partition = Counter(shards.owner(t) for t in ids)
    assert sorted(per_partition) == list(range(shards.n)), per_partition   # every partition got tasks
    assert max(per_partition.values()) - min(per_partition.values()) <= 1   # round robin

    runs = Counter()   # (step id, attempt) -> handler calls
    ran_by = {}
    lock = threading.Lock()

    def make_worker(i):
        w = Worker(shards.router, worker_id=f"py-{i}", namespaces=["py"], batch_size=4, lease_seconds=10,
                   poll_interval=0.2)

        def count(step):
            with lock:
                runs[(step.step_id, step.attempt)] += 1
                ran_by[step.step_id] = w.worker_id

        @w.handler("Py::Work")
        def work(step):
            count(step)
            time.sleep(0.005)
            return {"n": step.inputs["n"], "parents": sorted(step.parent_results)}

        @w.handler("Py::Flaky")
        def flaky(step):
            count(step)
            if step.attempt == 1:
                raise RetryableError("first attempt fails", retry_after=0)
            return {"attempt": step.attempt}

        @w.handler("Py::Check")
        def check(step):
            count(step)
            if step.inputs["doomed"]:
                raise PermanentError("doomed")
            return {"ok": True}
        return w

    finished = threading.Event()

    def until():
        return finished.is_set()

    pool = [make_worker(i) for i in range(workers)]
    threads = [threading.Thread(target=w.run, kwargs={"until": until}, daemon=True) for w in pool]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    try:
        wait_until(lambda: all(s in FINISHED for s in statuses(db, ids).values())
                   and len(statuses(db, ids)) == tasks, 90, "every task to finish")
    finally:
        finished.set()
        for t in threads:
            t.join(timeout=15)
    elapsed = time.monotonic() - t0

    final = statuses(db, ids)
    doomed = {t for n, t in enumerate(ids, 1) if n % 10 == 0}
    assert {t for t, s in final.items() if s == "error"} == doomed
    assert {t for t, s in final.items() if s == "complete"} == set(ids) - doomed

    # each handler ran exactly once per attempt, and the partitions' transitions agree
    assert set(runs.values()) == {1}, [k for k, v in runs.items() if v > 1]
    steps = task_steps(shards, ids)
    assert len(steps) == 4 * tasks
    history = step_history(shards, [s for _, s, _, _ in steps])
    for task, step, name, results in steps:
        assert shards.owner(step) == shards.owner(task)   # a task's steps live with it
        attempts = [a for (s, a) in runs if s == step]
        claims = [w for to, w in history[step] if to == "in_progress"]
        assert len(claims) == len(attempts), (step, history[step])
        if task in doomed and name == "join":
            assert not attempts
            continue
        if name == "flaky":
            assert sorted(attempts) == [1, 2]
        else:
            assert attempts == [1]
        if name == "check" and task in doomed:
            assert [to for to, _ in history[step]][-1] == "error"
            continue
        assert [to for to, _ in history[step]].count("complete") == 1
        assert claims[-1] == ran_by[step]   # the worker that ran it is the one that claimed it

    # the subscription saw every event of every partition exactly once, in each log's order
    starts = dict(item.split(":", 1) for item in start.split(","))
    logs = {k: [c for c, _ in direct_log(shards, k, starts[str(k)])] for k in range(shards.n)}
    assert sum(len(v) for v in logs.values()) > 10 * tasks
    wait_until(lambda: len(subscriber.events) >= sum(len(v) for v in logs.values()) or subscriber.error, 30,
               "the subscriber to catch up")
    subscriber.stop.set()
    subscriber.join(timeout=30)
    assert subscriber.error is None, subscriber.error
    seen = defaultdict(list)
    previous = None
    for cursor, *_ in subscriber.events:
        k, position = partition_of_router_row(previous, cursor)
        seen[k].append(position)
        previous = cursor
    # the router's events_after, paged from the same start, gives the same events
    cursor, paged = start, defaultdict(list)
    while True:
        rows = db.execute("SELECT cursor FROM tasker_core.events_after(%s, 37)", (cursor,)).fetchall()
        if not rows:
            break
        for (c,) in rows:
            k, position = partition_of_router_row(cursor, c)
            paged[k].append(position)
            cursor = c
    # (a log only grows at its end: read it again after the readers, in case a timer wrote to it)
    logs_after = {k: [c for c, _ in direct_log(shards, k, starts[str(k)])] for k in range(shards.n)}
    for k in range(shards.n):
        assert logs_after[k][:len(logs[k])] == logs[k]
        assert len(seen[k]) >= len(logs[k]) and seen[k] == logs_after[k][:len(seen[k])], \
            f"partition {k}: {len(seen[k])} events seen by the subscription, {len(logs[k])} in its log"
        assert len(paged[k]) >= len(logs[k]) and paged[k] == logs_after[k][:len(paged[k])], \
            f"partition {k}: {len(paged[k])} events read by events_after, {len(logs[k])} in its log"
    db.execute("SELECT tasker_core.unsubscribe('py_sub')")
    db.close()
    return elapsed, len(runs)


class TestFourPartitions:
    PARTITIONS = 4

    def test_setup_each_partition_is_reached_at_its_number(self, shards):
        with shards.connect() as db:
            rows = db.execute("SELECT partition, version, task_ids, step_ids, problem FROM tasker_core.shard_check()").fetchall()
        assert [(r[0], r[2], r[4]) for r in rows] == [(k, f"{k + 1} + 4i", None) for k in range(4)]
        for k in range(4):
            with shards.part(k) as p:
                assert p.execute("SELECT extversion FROM pg_extension WHERE extname = 'tasker_core'").fetchone() == (rows[k][1],)
        # the router itself has no tasker_core extension and no Tasker tables
        with shards.connect() as db:
            assert db.execute("SELECT count(*) FROM pg_extension WHERE extname = 'tasker_core'").fetchone()[0] == 0
            assert db.execute("SELECT to_regclass('public.tasker_tasks')").fetchone()[0] is None

    def test_router_functions_have_the_engines_signatures(self, shards):
        """Names, arguments (with defaults) and result columns are the engine's."""
        sig = """SELECT p.proname, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid)
                 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                 WHERE n.nspname = 'tasker_core' AND p.proname NOT LIKE '\\_%%'"""
        with shards.connect() as db:
            router = {r[0]: r[1:] for r in db.execute(sig)}
        with shards.part(0) as p:
            engine = {r[0]: r[1:] for r in p.execute(sig)}
        own = {"events_after_on", "shard_check"}   # the router's own
        for name in ("claim_steps", "complete_step", "fail_step", "heartbeat", "release_step", "report_steps",
                     "report_and_claim", "create_task", "cancel_task", "register_task_template",
                     "task_traceparent", "events_after", "event_horizon", "subscribe", "poll", "ack",
                     "get_step_readiness_status", "get_task_execution_context", "explain_task", "task_graph_dot"):
            assert name in router
        for name, signature in router.items():
            if name not in own:
                assert signature == engine[name], name

    def test_templates_land_on_every_partition(self, shards):
        template = {"name": "tpl", "namespace_name": "tpl", "version": "2.0.0",
                    "step_templates": [{"name": "only", "handler_class": "X"}]}
        with shards.connect() as db:
            named = register(db, template)
            assert db.execute("SELECT name, version FROM tasker_core.list_task_templates('tpl')").fetchall() == [("tpl", "2.0.0")]
        for k in range(4):
            with shards.part(k) as p:
                assert p.execute("SELECT tasker_core.get_task_template('tpl', 'tpl')->>'version'").fetchone() == ("2.0.0",)
                assert p.execute("""SELECT named_task_id FROM tasker_named_tasks nt
                                    JOIN tasker_task_namespaces ns USING (task_namespace_id)
                                    WHERE ns.name = 'tpl' AND nt.name = 'tpl'""").fetchone() == (named,)

    def test_python_workers_run_a_workload_exactly_once_across_four_partitions(self, shards):
        elapsed, runs = run_python_workload(shards, tasks=80)
        print(f"\n4 partitions: 80 tasks, {runs} handler runs in {elapsed:.1f} s")

    def test_map_instances_are_made_on_the_owner_with_its_ids(self, shards):
        """Steps made while a task runs (map instances) take ids of the task's partition too."""
        template = {"name": "mapped", "namespace_name": "maps", "step_templates": [
            {"name": "fetch", "handler_class": "M::Fetch"},
            {"name": "each", "handler_class": "M::Each", "depends_on_step": "fetch",
             "map": {"over": "/parents/fetch/items"}},
            {"name": "total", "handler_class": "M::Total", "depends_on_step": "each"}]}
        with shards.connect() as db:
            register(db, template)
            ids = [db.execute("SELECT tasker_core.create_task('maps', 'mapped', NULL, %s::jsonb)",
                              (json.dumps({"n": n}),)).fetchone()[0] for n in range(1, 9)]
            w = Worker(shards.router, worker_id="maps", namespaces=["maps"], batch_size=8, poll_interval=0.1)
            w.handler("M::Fetch")(lambda step: {"items": list(range(step.inputs["n"] + 1))})
            w.handler("M::Each")(lambda step: {"square": step.element * step.element})
            w.handler("M::Total")(lambda step: {"sum": sum(r["square"] for r in step.parent_results["each"])})
            w.run(until=lambda: all(s in FINISHED for s in statuses(db, ids).values()))
            assert set(statuses(db, ids).values()) == {"complete"}
        steps = task_steps(shards, ids)
        assert len(steps) == sum(3 + n + 1 for n in range(1, 9))   # fetch, each, total and the instances
        for task, step, name, results in steps:
            assert shards.owner(step) == shards.owner(task)
            if name == "total":
                n = ids.index(task) + 1
                assert results == {"sum": sum(i * i for i in range(n + 1))}

    def test_idempotency_key_finds_its_task_on_its_partition(self, shards):
        template = {"name": "keyed", "namespace_name": "keys", "step_templates": [{"name": "s", "handler_class": "X"}]}
        with shards.connect() as db:
            register(db, template)
            first, again = {}, {}
            for i in range(24):
                key = f"order-{i}"
                opts = json.dumps({"idempotency_key": key})
                first[key] = db.execute("SELECT tasker_core.create_task('keys', 'keyed', NULL, '{}', %s::jsonb)",
                                        (opts,)).fetchone()[0]
            for key in first:
                opts = json.dumps({"idempotency_key": key})
                again[key] = db.execute("SELECT tasker_core.create_task('keys', 'keyed', NULL, '{}', %s::jsonb)",
                                        (opts,)).fetchone()[0]
            assert again == first
            # the key's hash picks the partition (PL/Proxy masks hashtext(key) with N - 1)
            for key, task in first.items():
                assert shards.owner(task) == db.execute("SELECT hashtext(%s) & 3", (key,)).fetchone()[0]
            assert len({shards.owner(t) for t in first.values()}) == 4
        for k in range(4):
            with shards.part(k) as p:
                n = p.execute("""SELECT count(*) FROM tasker_tasks t JOIN tasker_named_tasks nt USING (named_task_id)
                                 WHERE nt.name = 'keyed'""").fetchone()[0]
                assert n == sum(1 for t in first.values() if shards.owner(t) == k)

    def test_calls_go_to_the_owner(self, shards):
        template = {"name": "route", "namespace_name": "route",
                    "step_templates": [{"name": "a", "handler_class": "X"}, {"name": "b", "handler_class": "X"},
                                       {"name": "c", "handler_class": "X", "depends_on_steps": ["a", "b"]}]}
        with shards.connect() as db:
            register(db, template)
            tasks = [db.execute("SELECT tasker_core.create_task('route', 'route', NULL, '{}')").fetchone()[0]
                     for _ in range(4)]
            assert sorted(shards.owner(t) for t in tasks) == [0, 1, 2, 3]
            # one claim of 8 takes the a and b of every task: it asks the partitions in turn
            claimed = db.execute("SELECT task_id, workflow_step_id, step_name FROM tasker_core.claim_steps('r1', ARRAY['route'], 8, 30)").fetchall()
            assert len(claimed) == 8 and {t for t, _, _ in claimed} == set(tasks)
            by_task = defaultdict(dict)
            for t, s, name in claimed:
                assert shards.owner(s) == shards.owner(t)
                by_task[t][name] = s
            t_done, t_fail, t_release, t_cancel = tasks

            deadline = db.execute("SELECT tasker_core.heartbeat(%s, 'r1')", (by_task[t_done]["a"],)).fetchone()[0]
            assert db.execute("SELECT tasker_core.complete_step(%s, 'r1', '{\"v\": 1}')", (by_task[t_done]["a"],)).fetchone()[0]
            backoff = db.execute("SELECT tasker_core.fail_step(%s, 'r1', '{\"m\": \"x\"}', true, 7)",
                                 (by_task[t_fail]["a"],)).fetchone()[0]
            assert backoff == 7
            assert db.execute("SELECT tasker_core.release_step(%s, 'r1')", (by_task[t_release]["a"],)).fetchone()[0]
            cancelled = db.execute("SELECT tasker_core.cancel_task(%s, 'test')", (t_cancel,)).fetchone()[0]
            assert cancelled == 3
            # the per-task readers answer from the owner, as the owner itself does
            for t in tasks:
                with shards.part(shards.owner(t)) as p:
                    for q in ("SELECT * FROM tasker_core.get_task_execution_context(%s)",
                              "SELECT * FROM tasker_core.get_step_readiness_status(%s)",
                              "SELECT * FROM tasker_core.explain_task(%s)",
                              "SELECT tasker_core.task_graph_dot(%s)",
                              "SELECT * FROM tasker_core.step_dag_relationships(%s)"):
                        assert db.execute(q, (t,)).fetchall() == p.execute(q, (t,)).fetchall(), q
            contexts = dict(db.execute("SELECT task_id, status FROM tasker_core.get_task_execution_contexts_batch(%s)",
                                       (tasks,)).fetchall())
            assert contexts[t_cancel] == "cancelled"

        def current(step):
            with shards.part(shards.owner(step)) as p:
                return p.execute("""SELECT to_state FROM tasker_workflow_step_transitions
                                    WHERE workflow_step_id = %s AND most_recent""", (step,)).fetchone()[0]
        assert current(by_task[t_done]["a"]) == "complete"
        assert current(by_task[t_fail]["a"]) == "error"
        assert current(by_task[t_release]["a"]) == "error"   # released: retried at once, the attempt not counted
        with shards.part(shards.owner(t_release)) as p:
            assert p.execute("SELECT count(*) FROM tasker_core.step_claims WHERE workflow_step_id = %s",
                             (by_task[t_release]["a"],)).fetchone()[0] == 0
        assert current(by_task[t_cancel]["a"]) == "cancelled"
        with shards.part(shards.owner(t_done)) as p:
            lease = p.execute("SELECT lease_expires_at FROM tasker_core.step_claims WHERE workflow_step_id = %s",
                              (by_task[t_done]["b"],)).fetchone()
            assert lease is not None
            assert p.execute("SELECT results FROM tasker_workflow_steps WHERE workflow_step_id = %s",
                             (by_task[t_done]["a"],)).fetchone()[0] == {"v": 1}
        assert deadline is not None

        # the engine's own errors come back through the router, SQLSTATE and all
        with shards.connect() as db:
            held = by_task[t_done]["b"]
            assert sqlstate(db, "SELECT tasker_core.complete_step(%s, 'someone-else')", (held,)) == "TK030"
            for wrong in (10 ** 9 + 1, 10 ** 9 + 2, 10 ** 9 + 3, 10 ** 9 + 4, 0, -5):
                with shards.part(shards.owner(wrong)) as p:
                    for q in ("SELECT tasker_core.complete_step(%s, 'r1')", "SELECT tasker_core.heartbeat(%s, 'r1')",
                              "SELECT tasker_core.fail_step(%s, 'r1', '{}')", "SELECT tasker_core.cancel_task(%s)"):
                        want = sqlstate(p, q, (wrong,))
                        got = sqlstate(db, q, (wrong,))
                        assert got == want, (q, wrong, got, want)
            # and the claimed b steps are finished through a report split over their partitions
            rows = db.execute("SELECT workflow_step_id, outcome FROM tasker_core.report_steps('r1', %s::jsonb)",
                              (json.dumps([{"step_id": by_task[t]["b"], "results": {}}
                                           for t in (t_done, t_fail, t_release)]),)).fetchall()
            assert rows == sorted((by_task[t]["b"], "completed") for t in (t_done, t_fail, t_release))

    def test_bad_input_keeps_the_engines_sqlstate(self, shards):
        cases = [
            "SELECT tasker_core.complete_step(NULL, 'w')",
            "SELECT tasker_core.fail_step(NULL, 'w', '{}')",
            "SELECT tasker_core.fail_step(1, 'w', NULL)",
            "SELECT tasker_core.heartbeat(NULL, 'w')",
            "SELECT tasker_core.heartbeat(1, NULL)",
            "SELECT tasker_core.release_step(NULL, 'w')",
            "SELECT tasker_core.cancel_task(NULL)",
            "SELECT * FROM tasker_core.claim_steps(NULL)",
            "SELECT * FROM tasker_core.claim_steps('w', NULL, 0)",
            "SELECT * FROM tasker_core.claim_steps('w', NULL, 5000)",
            "SELECT * FROM tasker_core.claim_steps('w', NULL, 1, -1)",
            "SELECT * FROM tasker_core.report_steps('w', NULL)",
            "SELECT * FROM tasker_core.report_steps('w', '{}')",
            "SELECT * FROM tasker_core.report_steps('w', '[1]')",
            "SELECT * FROM tasker_core.report_steps('w', '[{\"step_id\": \"5\"}]')",
            "SELECT * FROM tasker_core.report_steps('w', '[{\"step_id\": 0, \"results\": {}}]')",
            "SELECT * FROM tasker_core.report_and_claim('w', '[]', NULL, -1)",
            "SELECT * FROM tasker_core.report_and_claim('w', '[]', NULL, 1, 0)",
            "SELECT * FROM tasker_core.report_and_claim('w', 'true')",
            "SELECT tasker_core.create_task('nope', 'nope', NULL, '{}')",
            "SELECT tasker_core.create_task('tpl', 'tpl', NULL, '[]')",
            "SELECT tasker_core.create_task('tpl', 'tpl', NULL, '{}', '{\"idempotency_key\": 5}')",
            "SELECT tasker_core.create_task('tpl', 'tpl', NULL, '{}', '{\"priority\": 5000}')",
            "SELECT tasker_core.register_task_template(NULL)",
            "SELECT tasker_core.register_task_template('{\"name\": \"x\"}')",
            "SELECT * FROM tasker_core.poll('no_such_subscription')",
            "SELECT * FROM tasker_core.events_after(NULL, 0)",
        ]
        with shards.connect() as db, shards.part(0) as p:
            for q in cases:
                want = sqlstate(p, q)
                assert want is not None, q
                assert sqlstate(db, q) == want, q
            # per partition log: the engine's cursor check
            assert sqlstate(db, "SELECT * FROM tasker_core.events_after_on(2, 'garbage')") == \
                sqlstate(p, "SELECT * FROM tasker_core.events_after('garbage')") == "22P02"
            # a router cursor that is not one fails as the engine's bad cursor does
            assert sqlstate(db, "SELECT * FROM tasker_core.events_after('garbage')") == "22P02"
            assert sqlstate(db, "SELECT * FROM tasker_core.events_after('9:1/1')") == "22P02"
            assert sqlstate(db, "SELECT * FROM tasker_core.events_after_on(4)") == "22023"

    def test_a_report_is_atomic_per_partition_not_across(self, shards):
        """A report spanning partitions is recorded by each partition on its own: one refusing
        its part (bad input) changes nothing there, and cannot undo another's part."""
        template = {"name": "split", "namespace_name": "split", "step_templates": [{"name": "s", "handler_class": "X"}]}
        with shards.connect() as db:
            register(db, template)
            tasks = [db.execute("SELECT tasker_core.create_task('split', 'split', NULL, '{}')").fetchone()[0]
                     for _ in range(4)]
            steps = [r[0] for r in db.execute(
                "SELECT workflow_step_id FROM tasker_core.claim_steps('sp', ARRAY['split'], 4, 30)").fetchall()]
            assert sorted(shards.owner(s) for s in steps) == [0, 1, 2, 3]
            good, bad = steps[0], steps[1]
            batch = [{"step_id": good, "results": {"ok": 1}}, {"step_id": bad, "results": {}, "bogus": 1}]
            assert sqlstate(db, "SELECT * FROM tasker_core.report_steps('sp', %s::jsonb)", (json.dumps(batch),)) == "22023"
            with shards.part(shards.owner(bad)) as p:
                assert p.execute("SELECT worker_id FROM tasker_core.step_claims WHERE workflow_step_id = %s",
                                 (bad,)).fetchone() == ("sp",)   # untouched
            with shards.part(shards.owner(good)) as p:
                state = p.execute("""SELECT to_state FROM tasker_workflow_step_transitions
                                     WHERE workflow_step_id = %s AND most_recent""", (good,)).fetchone()[0]
            assert state in ("in_progress", "complete")   # all of its part or none of it
            # the clients' answer to a refused batch: one by one (a recorded step is TK030 there)
            for s in steps:
                st = sqlstate(db, "SELECT tasker_core.complete_step(%s, 'sp')", (s,))
                assert st is None or (s == good and st == "TK030")
            assert set(statuses(db, tasks).values()) == {"complete"}

    @pytest.mark.skipif(shutil.which("node") is None or shutil.which("ruby") is None
                        or not (NODE_MODULES / "pg").exists(),
                        reason="node (with target/node/node_modules/pg) and ruby are needed")
    def test_node_and_ruby_workers_run_unchanged_against_the_router(self, shards):
        """The end-to-end test's Node and Ruby workers (tests/integration/e2e), unchanged, share
        60 tasks through the router; every step ran once, by the worker that claimed it."""
        template = {"name": "mixed", "namespace_name": "e2e", "version": "1.0.0", "step_templates": [
            {"name": "fetch", "handler_class": "E2E::Work", "default_retry_limit": 5},
            {"name": "a", "handler_class": "E2E::Flaky", "depends_on_step": "fetch", "default_retry_limit": 5},
            {"name": "b", "handler_class": "E2E::Work", "depends_on_step": "fetch", "default_retry_limit": 5},
            {"name": "c", "handler_class": "E2E::Fatal", "depends_on_step": "fetch", "default_retry_limit": 5},
            {"name": "join", "handler_class": "E2E::Join", "depends_on_steps": ["a", "b", "c"],
             "default_retry_limit": 5}]}
        tasks = 60
        with shards.connect() as db:
            register(db, template)
            ids = [db.execute("""SELECT tasker_core.create_task('e2e', 'mixed', NULL, %s::jsonb,
                                        jsonb_build_object('traceparent', %s::text))""",
                              (json.dumps({"n": n, "doomed": n % 10 == 0}),
                               f"00-{n:032x}-{n:016x}-01")).fetchone()[0] for n in range(1, tasks + 1)]
            env = dict(os.environ, **shards.pg_env, NODE_PATH=str(NODE_MODULES))
            procs = {"node": subprocess.Popen(["node", str(E2E / "worker.js")], env=env, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.PIPE, text=True),
                     "ruby": subprocess.Popen(["ruby", str(E2E / "worker.rb")], env=env, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.PIPE, text=True)}
            try:
                wait_until(lambda: all(s in FINISHED for s in statuses(db, ids).values())
                           or any(p.poll() is not None for p in procs.values()), 90, "every task to finish")
                for name, p in procs.items():
                    assert p.poll() is None, f"{name} exited: {p.stderr.read()}"
            finally:
                for p in procs.values():
                    if p.poll() is None:
                        p.terminate()
                codes = {name: p.wait(timeout=20) for name, p in procs.items()}
            assert codes == {"node": 0, "ruby": 0}, {n: p.stderr.read()[-2000:] for n, p in procs.items()}
            final = statuses(db, ids)
        doomed = {t for n, t in enumerate(ids, 1) if n % 10 == 0}
        assert {t for t, s in final.items() if s == "error"} == doomed
        assert {t for t, s in final.items() if s == "complete"} == set(ids) - doomed
        assert len({shards.owner(t) for t in ids}) == 4

        steps = task_steps(shards, ids)
        history = step_history(shards, [s for _, s, _, _ in steps])
        by_worker = Counter()
        for task, step, name, results in steps:
            n = ids.index(task) + 1
            claims = [w for to, w in history[step] if to == "in_progress"]
            states = [to for to, _ in history[step]]
            if name == "join" and task in doomed:
                assert claims == []
                continue
            if name == "c" and task in doomed:
                assert len(claims) == 1 and states[-1] == "error"
                continue
            assert states.count("complete") == 1, (step, history[step])
            assert len(claims) == (2 if name == "a" else 1), (step, history[step])
            assert results["by"] == claims[-1]   # ran by the worker that holds the claim
            assert results["n"] == n and results["tp"] == f"00-{n:032x}-{n:016x}-01"
            by_worker[results["by"]] += 1
        assert set(by_worker) == {"node", "ruby"}, by_worker


class TestTwoPartitions:
    PARTITIONS = 2

    def test_python_workers_run_a_workload_exactly_once_across_two_partitions(self, shards):
        elapsed, runs = run_python_workload(shards, tasks=60)
        print(f"\n2 partitions: 60 tasks, {runs} handler runs in {elapsed:.1f} s")

    def test_a_partition_down_stops_only_its_own_tasks(self, shards):
        """With partition 1 stopped, claims and event reads go on with partition 0 (WARNING);
        calls that need partition 1 fail; when it is back, its work resumes."""
        template = {"name": "down", "namespace_name": "down", "step_templates": [{"name": "s", "handler_class": "X"}]}
        with shards.connect() as db:
            register(db, template)
            tasks = [db.execute("SELECT tasker_core.create_task('down', 'down', NULL, '{}')").fetchone()[0]
                     for _ in range(4)]
            horizon = db.execute("SELECT tasker_core.event_horizon()").fetchone()[0]
            db.execute("SELECT tasker_core.subscribe('down_sub')")
        p1 = dict(shards.env, TASKER_CLUSTER_DIR=shards.env["TASKER_SHARDS_DIR"] + "/p1")
        subprocess.run([str(ROOT / "scripts" / "cluster.sh"), "stop"], env=p1, check=True, capture_output=True)
        try:
            with shards.connect() as db:
                claimed = db.execute("SELECT task_id, workflow_step_id FROM tasker_core.claim_steps('dn', ARRAY['down'], 4, 30)").fetchall()
                assert sorted(shards.owner(t) for t, _ in claimed) == [0, 0]
                for _, s in claimed:
                    assert db.execute("SELECT tasker_core.complete_step(%s, 'dn')", (s,)).fetchone()[0]
                on_p1 = next(t for t in tasks if shards.owner(t) == 1)
                assert sqlstate(db, "SELECT tasker_core.cancel_task(%s)", (on_p1,)) == "XX000"
                # tasks without a key pass over the partition that is down; a key that hashes to it waits for it
                made = [db.execute("SELECT tasker_core.create_task('down', 'down', NULL, '{}')").fetchone()[0]
                        for _ in range(3)]
                assert {shards.owner(t) for t in made} == {0}
                key = next(k for k in (f"key-{i}" for i in range(100))
                           if db.execute("SELECT hashtext(%s) & 1", (k,)).fetchone()[0] == 1)
                assert sqlstate(db, "SELECT tasker_core.create_task('down', 'down', NULL, '{}', %s::jsonb)",
                                (json.dumps({"idempotency_key": key}),)) == "XX000"
                assert sqlstate(db, "SELECT tasker_core.register_task_template(%s::jsonb)",
                                (json.dumps(template),)) == "XX000"
                events = db.execute("SELECT cursor FROM tasker_core.events_after(%s, 1000)", (horizon,)).fetchall()
                assert events   # partition 0's, partition 1's position kept where it was
                previous = horizon
                for (c,) in events:
                    assert partition_of_router_row(previous, c)[0] == 0
                    previous = c
                assert dict(i.split(":", 1) for i in previous.split(","))["1"] == \
                    dict(i.split(":", 1) for i in horizon.split(","))["1"]
                # the subscription reads partition 0 meanwhile; partition 1's events wait for it
                polled = db.execute("SELECT cursor, task_id FROM tasker_core.poll('down_sub', 1000)").fetchall()
                assert polled and all(shards.owner(t) == 0 for _, t in polled if t is not None)
                assert db.execute("SELECT tasker_core.ack('down_sub', %s)", (polled[-1][0],)).fetchone()[0]
        finally:
            shards.run("start", "2")   # restarts partition 1 (on a new port) and points the router at it
        with shards.connect() as db:
            keyed = db.execute("SELECT tasker_core.create_task('down', 'down', NULL, '{}', %s::jsonb)",
                               (json.dumps({"idempotency_key": key}),)).fetchone()[0]
            assert shards.owner(keyed) == 1
            rest = db.execute("SELECT task_id, workflow_step_id FROM tasker_core.claim_steps('dn', ARRAY['down'], 10, 30)").fetchall()
            assert sorted(t for t, _ in rest) == sorted([t for t in tasks if shards.owner(t) == 1] + made + [keyed])
            for _, s in rest:
                db.execute("SELECT tasker_core.complete_step(%s, 'dn')", (s,))
            assert set(statuses(db, tasks + made + [keyed]).values()) == {"complete"}
            later = db.execute("SELECT cursor, task_id FROM tasker_core.poll('down_sub', 1000)").fetchall()
            on_p1 = {t for _, t in later if t is not None and shards.owner(t) == 1}
            assert on_p1 == {t for t in tasks + [keyed] if shards.owner(t) == 1}   # created before, and after
