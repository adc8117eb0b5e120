"""End to end, in four languages at once: a Ruby (ActiveRecord), a Python, a Node and a psql
worker run 200 tasks of one mixed template against one database, while a subscriber reads the
durable event log; the Python worker is killed with SIGKILL in the middle of its steps.

The template (namespace e2e): fetch -> (a, b, c) -> join
  a  E2E::Flaky  fails its first attempt, retry after 1 s
  b  E2E::Work
  c  E2E::Fatal  fails permanently when the task is doomed (every tenth task)
Workers live in tests/integration/e2e/ and use the clients under clients/.
"""
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import defaultdict

import psycopg
import pytest

from conftest import ROOT, create_database, drop_database

E2E = ROOT / "tests" / "integration" / "e2e"
TASKS = 200
TEMPLATE = {
    "name": "mixed", "namespace_name": "e2e", "version": "1.0.0",
    "step_templates": [
        {"name": "fetch", "handler_class": "E2E::Work", "default_retry_limit": 5},
        {"name": "a", "handler_class": "E2E::Flaky", "depends_on_step": "fetch", "default_retry_limit": 5},
        {"name": "b", "handler_class": "E2E::Work", "depends_on_step": "fetch", "default_retry_limit": 5},
        {"name": "c", "handler_class": "E2E::Fatal", "depends_on_step": "fetch", "default_retry_limit": 5},
        {"name": "join", "handler_class": "E2E::Join", "depends_on_steps": ["a", "b", "c"],
         "default_retry_limit": 5},
    ],
}
WORKERS = ("python", "node", "ruby", "psql")


def doomed(n):
    return n % 10 == 0


def trace(n):
    return f"00-{n:032x}-{n:016x}-01"


class Listener(threading.Thread):
    """Reads the subscription 'e2e' from the durable log, woken by NOTIFY, acking each batch."""

    def __init__(self, dbname):
        super().__init__(daemon=True)
        self.dbname, self.events, self.stop, self.error = dbname, [], threading.Event(), None

    def run(self):
        try:
            with psycopg.connect(dbname=self.dbname, autocommit=True) as conn:
                conn.execute("LISTEN tasker_events")
                while True:
                    stopping = self.stop.is_set()
                    batch = conn.execute("SELECT * FROM tasker_core.poll('e2e', 1000)").fetchall()
                    if batch:
                        self.events.extend(batch)
                        conn.execute("SELECT tasker_core.ack('e2e', %s)", (batch[-1][0],))
                        continue
                    if stopping:
                        return
                    for _ in conn.notifies(timeout=0.5, stop_after=1):
                        pass
        except Exception as e:  # reported by the test
            self.error = e


def start_workers(dbname):
    env = dict(os.environ, PGDATABASE=dbname)
    node_path = ROOT / "target" / "node" / "node_modules"
    procs = {
        "python": subprocess.Popen([str(ROOT / "target" / "venv" / "bin" / "python"), str(E2E / "worker.py")],
                                   env=dict(env, E2E_SLOW="1"), stderr=subprocess.PIPE, text=True),
        "node": subprocess.Popen(["node", str(E2E / "worker.js")], env=dict(env, NODE_PATH=str(node_path)),
                                 stderr=subprocess.PIPE, text=True),
        "ruby": subprocess.Popen(["ruby", str(E2E / "worker.rb")], env=env, stderr=subprocess.PIPE, text=True),
        "psql": subprocess.Popen(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", "CALL e2e.psql_worker('psql')"],
                                 env=env, stderr=subprocess.PIPE, text=True),
    }
    return procs


@pytest.fixture
def e2e_db():
    if shutil.which("node") is None or not (ROOT / "target" / "node" / "node_modules" / "pg").exists():
        pytest.fail("node and target/node (scripts/prereqs.sh) are needed for the end-to-end test")
    db = create_database("e2e")
    yield db
    drop_database(db)


def wait_until(predicate, seconds, what):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def test_four_languages_run_200_tasks_together_and_survive_a_sigkill(e2e_db):
    db = e2e_db
    db.scalar("SELECT tasker_core.install_schema()")
    db.scalar("SELECT tasker_core.enable_tracking()")
    db.run_file(E2E / "worker.sql")
    db.scalar("SELECT tasker_core.register_task_template(%s::jsonb)", (json.dumps(TEMPLATE),))
    db.scalar("SELECT tasker_core.subscribe('e2e', ARRAY['*'])")
    listener = Listener(db.name)
    listener.start()
    procs = start_workers(db.name)
    try:
        with db.connect() as conn:
            # every task in a trace of its own (W3C traceparent): workers must pass it on
            conn.execute("""SELECT tasker_core.create_task('e2e', 'mixed', NULL,
                                   jsonb_build_object('n', n, 'doomed', n %% 10 = 0),
                                   jsonb_build_object('traceparent', format('00-%%s-%%s-01',
                                       lpad(to_hex(n), 32, '0'), lpad(to_hex(n), 16, '0'))))
                            FROM generate_series(1, %s) n""", (TASKS,))
            # Kill the (slow) Python worker once the run is well under way and it holds steps.
            wait_until(lambda: conn.execute("SELECT count(*) FROM tasker_tasks WHERE complete").fetchone()[0] >= 40
                       and conn.execute("SELECT count(*) FROM tasker_core.step_claims WHERE worker_id = 'python'")
                       .fetchone()[0] > 0, 120, "the python worker to hold steps mid-run")
            procs["python"].send_signal(signal.SIGKILL)
            procs["python"].wait(timeout=10)
            time.sleep(0.5)   # a call the worker had in flight finishes on the server or not at all
            orphans = [r[0] for r in conn.execute(
                "SELECT workflow_step_id FROM tasker_core.step_claims WHERE worker_id = 'python'").fetchall()]
            assert orphans, "the python worker was killed holding no step"
            finished = """SELECT count(*) FROM tasker_task_transitions
                          WHERE most_recent AND to_state IN ('complete', 'error')"""
            # A doomed task goes to error as soon as its fatal step fails while nothing else can
            # run, even with its flaky step still waiting out a backoff: that step's retry
            # still comes (and completes), so wait for every pending retry too.
            retrying = """SELECT count(*) FROM tasker_core.step_state
                          WHERE state = 'error' AND COALESCE(retryable, true)
                            AND COALESCE(attempts, 0) < COALESCE(retry_limit, 3)"""
            wait_until(lambda: conn.execute(finished).fetchone()[0] == TASKS
                       and conn.execute(retrying).fetchone()[0] == 0, 240,
                       "every task to finish and every retry to run")
            conn.execute("UPDATE e2e.control SET stop = true")
        for name in ("node", "ruby"):
            procs[name].send_signal(signal.SIGTERM)
        for name in ("node", "ruby", "psql"):
            assert procs[name].wait(timeout=60) == 0, f"{name} worker: {procs[name].stderr.read()[-2000:]}"
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        listener.stop.set()
        listener.join(timeout=30)
    assert listener.error is None, listener.error

    with db.connect() as conn:
        q = lambda sql, *a: conn.execute(sql, a or None).fetchall()  # noqa: E731

        # 1. every task ends in the state the template implies
        tasks = {n: (tid, state) for tid, n, state in q(
            """SELECT t.task_id, (t.context ->> 'n')::int, tt.to_state FROM tasker_tasks t
               JOIN tasker_task_transitions tt ON tt.task_id = t.task_id AND tt.most_recent""")}
        assert len(tasks) == TASKS
        wrong = [(n, s) for n, (_, s) in tasks.items() if s != ("error" if doomed(n) else "complete")]
        assert not wrong, wrong[:10]
        steps = q("""SELECT (t.context ->> 'n')::int, ns.name, s.state, ws.results, ws.attempts, ws.workflow_step_id
                     FROM tasker_workflow_steps ws JOIN tasker_tasks t USING (task_id)
                     JOIN tasker_named_steps ns USING (named_step_id)
                     JOIN tasker_core.step_state s USING (workflow_step_id)""")
        for n, name, state, results, attempts, sid in steps:
            if doomed(n) and name == "c":
                assert state == "error", (n, name, state)
            elif doomed(n) and name == "join":
                assert state in (None, "pending"), (n, name, state)
            else:
                assert state == "complete", (n, name, state)
                assert results["step"] == name and results["n"] == n and results["by"] in WORKERS, results
                assert results["tp"] == trace(n), results   # each language handed the trace on
            if name == "join" and not doomed(n):
                assert results["parents"] == ["a", "b", "c"], results

        # 2. no step ran twice at once: each claim ends (complete or error) before the next one
        chains = defaultdict(list)
        for sid, to_state, meta in q("""SELECT workflow_step_id, to_state, metadata FROM tasker_workflow_step_transitions
                                         ORDER BY workflow_step_id, sort_key"""):
            chains[sid].append((to_state, meta or {}))
        by_step = {sid: (n, name, attempts) for n, name, _, _, attempts, sid in steps}
        ran_by = set()
        for sid, chain in chains.items():
            running = False
            starts = 0
            for to_state, meta in chain:
                if to_state == "in_progress":
                    assert not running, (sid, chain)
                    running, starts = True, starts + 1
                    ran_by.add(meta.get("worker_id"))
                elif to_state in ("complete", "error"):
                    assert running, (sid, chain)
                    running = False
            assert [s for s, _ in chain].count("complete") <= 1, chain
            assert starts == by_step[sid][2], (sid, starts, by_step[sid], chain)   # attempts
        assert set(WORKERS) <= ran_by, ran_by

        # 3. every retry and backoff is in the transitions
        for sid, chain in chains.items():
            n, name, _ = by_step[sid]
            states = [s for s, _ in chain]
            for i, (to_state, meta) in enumerate(chain):
                if to_state != "error":
                    continue
                retried = i + 1 < len(chain)
                if meta.get("reason") == "lease_expired":
                    assert retried, (sid, chain)
                elif name == "a":                         # the flaky first attempt
                    assert meta["backoff_seconds"] == 1 and meta["retryable"] is True, meta
                    assert states[i + 1:i + 3] == ["pending", "in_progress"], chain
                    assert chain[i + 1][1].get("reason") == "retry", chain
                elif name == "c":                         # the permanent failure
                    assert doomed(n) and meta["retryable"] is False and not retried, (n, chain)
                else:
                    raise AssertionError(f"unexpected error transition: {n} {name} {chain}")
            if name == "a":
                assert any(m.get("backoff_seconds") == 1 or m.get("reason") == "lease_expired"
                           for s, m in chain if s == "error"), chain

        # 4. SIGKILL: the killed worker's steps expired and were finished by the others
        for sid in orphans:
            chain = chains[sid]
            reasons = [m.get("reason") for s, m in chain if s == "error"]
            assert "lease_expired" in reasons, chain
            n, name, _ = by_step[sid]
            last_start = [m for s, m in chain if s == "in_progress"][-1]
            assert last_start.get("worker_id") != "python", chain
        assert q("SELECT count(*) FROM tasker_core.step_claims") == [(0,)]
        assert q("SELECT * FROM tasker_core.verify()") == []

        # 5. the subscriber saw every event once, in log order
        seen = listener.events
        cursors = [tuple(int(x) for x in e[0].split("/")) for e in seen]
        assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)
        task_n = {tid: n for n, (tid, _) in tasks.items()}
        untraced = [e for e in seen if e[3] is not None and e[7].get("traceparent") != trace(task_n[e[3]])]
        assert not untraced, untraced[:3]
        logged = {r[0] for r in q("SELECT id FROM tasker_core.events")}
        assert {e[1] for e in seen} == logged and len(seen) == len(logged)
        # each step's transition events are in the order of its transitions
        step_events = defaultdict(list)
        completed_by = defaultdict(int)
        for chain in chains.values():
            for (s1, m1), (s2, _) in zip(chain, chain[1:]):
                if s1 == "in_progress" and s2 == "complete":
                    completed_by[m1.get("worker_id")] += 1
        print(f"\ne2e: {len(seen)} events, steps completed by {dict(completed_by)}, "
              f"killed worker held steps {orphans}")
        for e in seen:
            if e[4] is not None and e[6] is not None and e[2].startswith("step."):
                step_events[e[4]].append(e[6])
        for sid, chain in chains.items():
            assert step_events[sid] == [s for s, _ in chain][1:] or step_events[sid] == [s for s, _ in chain], \
                (sid, step_events[sid], chain)
