"""Batched outcomes: report_steps records many claimed steps' outcomes in one transaction, each
with the guarantees of complete_step / fail_step; bad batches change nothing; steps no longer
held are reported and left alone; concurrent batches never finish a step twice.
report_and_claim records outcomes and claims the next steps in one transaction, and its claim
never waits for a lock."""
import json
import threading
import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from psycopg.types.json import Jsonb

from conftest import sqlstate_of

DIAMOND = {"name": "diamond", "namespace_name": "batch", "version": "1.0.0",
           "step_templates": [{"name": "a", "handler_class": "A"},
                              {"name": "b", "handler_class": "B", "depends_on_step": "a"},
                              {"name": "c", "handler_class": "C", "depends_on_step": "a"},
                              {"name": "d", "handler_class": "D", "depends_on_steps": ["b", "c"]}]}


@pytest.fixture
def bdb(tasker_db):
    tasker_db.scalar("SELECT tasker_core.enable_tracking()")
    tasker_db.scalar("SELECT tasker_core.register_task_template(%s)", (Jsonb(DIAMOND),))
    return tasker_db


def tasks(conn, n):
    return [conn.execute("SELECT tasker_core.create_task('batch', 'diamond', NULL, %s)",
                         (Jsonb({"i": i}),)).fetchone()[0] for i in range(n)]


def claim(conn, worker, n):
    return [r[0] for r in conn.execute(
        "SELECT workflow_step_id FROM tasker_core.claim_steps(%s, ARRAY['batch'], %s, 600)", (worker, n))]


def report(conn, worker, outcomes):
    return conn.execute("SELECT * FROM tasker_core.report_steps(%s, %s)",
                        (worker, Jsonb(outcomes))).fetchall()


def snapshot(conn):
    """Everything a report writes."""
    return conn.execute("""
        SELECT (SELECT count(*) FROM tasker_workflow_step_transitions),
               (SELECT count(*) FROM tasker_task_transitions),
               (SELECT count(*) FROM tasker_core.step_claims),
               (SELECT count(*) FROM tasker_core.events),
               (SELECT json_agg(json_build_object('id', workflow_step_id, 'r', results, 'p', processed,
                                                  'i', in_process) ORDER BY workflow_step_id)::text
                FROM tasker_workflow_steps)""").fetchone()


def test_a_batch_completes_and_fails_steps_and_finalizes_their_tasks(bdb):
    with bdb.connect() as conn:
        conn.execute("SET tasker_core.backoff_jitter = off")
        t1, t2, t3 = tasks(conn, 3)
        a1, a2, a3 = claim(conn, "w", 3)
        rows = report(conn, "w", [{"step_id": a3, "error": {"m": "boom"}, "retry_after_seconds": 7},
                                  {"step_id": a1, "results": {"n": 1}},
                                  {"step_id": a2, "error": "fatal", "retryable": False}])
        assert rows == [(a1, "completed", None), (a2, "failed", None), (a3, "failed", 7)]
        state = dict(conn.execute("SELECT workflow_step_id, to_state FROM tasker_workflow_step_transitions "
                                  "WHERE workflow_step_id = ANY (%s) AND most_recent", ([a1, a2, a3],)).fetchall())
        assert state == {a1: "complete", a2: "error", a3: "error"}
        assert conn.execute("SELECT results FROM tasker_workflow_steps WHERE workflow_step_id = %s",
                            (a1,)).fetchone()[0] == {"n": 1}
        assert conn.execute("SELECT count(*) FROM tasker_core.step_claims").fetchone()[0] == 0
        # the permanent failure failed its task (finalized); the completed step readied b and c
        assert conn.execute("SELECT to_state FROM tasker_task_transitions WHERE task_id = %s AND most_recent",
                            (t2,)).fetchone()[0] == "error"
        ready = claim(conn, "w", 10)
        assert len(ready) == 2                       # b and c of task 1 (a3 backs off 7 s)
        rows = report(conn, "w", [{"step_id": s} for s in ready])
        assert [r[1] for r in rows] == ["completed", "completed"]
        (d,) = claim(conn, "w", 10)
        assert report(conn, "w", [{"step_id": d, "results": {}}]) == [(d, "completed", None)]
        assert conn.execute("SELECT to_state FROM tasker_task_transitions WHERE task_id = %s AND most_recent",
                            (t1,)).fetchone()[0] == "complete"
        events = [r[0] for r in conn.execute("SELECT name FROM tasker_core.events WHERE task_id = %s "
                                             "ORDER BY id", (t1,))]
        assert events.count("step.completed") == 4 and "task.completed" in events, events
        assert report(conn, "w", []) == []
        assert conn.execute("SELECT count(*) FROM tasker_core.check_tracking()").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM tasker_core.verify()").fetchone()[0] == 0


BAD = [
    (None, "22004"),
    ({"step_id": 1}, "22023"),                                       # not an array
    ([1], "22023"),
    ([{"step_id": "x"}], "22023"),
    ([{"step_id": None}], "22023"),
    ([{"step_id": -4}], "22023"),
    ([{"step_id": 1.5}], "22023"),
    ([{"stepid": 1}], "22023"),
    ([{"step_id": 1, "error": None}], "22023"),
    ([{"step_id": 1, "error": "x", "results": {}}], "22023"),
    ([{"step_id": 1, "error": "x", "retryable": "no"}], "22023"),
    ([{"step_id": 1, "error": "x", "retry_after_seconds": 1e12}], "22023"),
    ([{"step_id": 1, "retry_after_seconds": 3}], "22023"),
    ("DUP", "22023"),                                                # a step named twice
    ([{"step_id": i} for i in range(1, 1002)], "54000"),
]


@pytest.mark.parametrize("batch,sqlstate", BAD, ids=[f"{i}-{s}" for i, (_, s) in enumerate(BAD)])
def test_a_bad_batch_changes_nothing(bdb, batch, sqlstate):
    with bdb.connect() as conn:
        tasks(conn, 2)
        a1, a2 = claim(conn, "w", 2)
        if batch == "DUP":
            batch = [{"step_id": a1}, {"step_id": a2}, {"step_id": a1, "results": {}}]
        before = snapshot(conn)
        arg = None if batch is None else Jsonb(batch)
        assert sqlstate_of(conn, "SELECT * FROM tasker_core.report_steps('w', %s)", (arg,)) == sqlstate
        assert snapshot(conn) == before


def test_bad_worker_ids_and_deep_json_change_nothing(bdb):
    with bdb.connect() as conn:
        tasks(conn, 1)
        (a,) = claim(conn, "w", 1)
        before = snapshot(conn)
        assert sqlstate_of(conn, "SELECT * FROM tasker_core.report_steps(NULL, %s)",
                           (Jsonb([{"step_id": a}]),)) == "22004"
        assert sqlstate_of(conn, "SELECT * FROM tasker_core.report_steps('', %s)",
                           (Jsonb([{"step_id": a}]),)) == "22023"
        deep = json.dumps([{"step_id": a, "results": json.loads("[" * 150 + "]" * 150)}])
        assert sqlstate_of(conn, "SELECT * FROM tasker_core.report_steps('w', %s::jsonb)", (deep,)) == "TK026"
        assert snapshot(conn) == before


def test_steps_no_longer_held_are_reported_and_left_alone(bdb):
    """Mid-batch, one lease expired and another worker took the step, and one step was never
    this worker's: those are reported lease_lost and left as they are; the rest is recorded."""
    start = datetime(2030, 1, 1, tzinfo=timezone.utc)
    later = (start + timedelta(seconds=11)).isoformat()

    def clock(c, at):
        c.execute("SELECT set_config('tasker_core.fake_now', %s, false)", (at,))

    with bdb.connect() as w, bdb.connect() as other:
        clock(w, start.isoformat())
        clock(other, start.isoformat())
        tasks(w, 3)
        (s1,) = [r[0] for r in w.execute(
            "SELECT workflow_step_id FROM tasker_core.claim_steps('w', ARRAY['batch'], 1, 10)")]
        (s2,) = claim(w, "w", 1)                     # lease 600 s
        (s3,) = claim(other, "o", 1)
        clock(other, later)
        clock(w, later)
        assert claim(other, "o", 1) == [s1]          # s1's lease expired: failed, claimed again
        transitions = w.execute("SELECT count(*) FROM tasker_workflow_step_transitions "
                                "WHERE workflow_step_id = ANY (%s)", ([s1, s3],)).fetchone()[0]
        rows = report(w, "w", [{"step_id": s3}, {"step_id": s2}, {"step_id": s1}])
        assert rows == sorted([(s1, "lease_lost", None), (s2, "completed", None), (s3, "lease_lost", None)])
        assert w.execute("SELECT count(*) FROM tasker_workflow_step_transitions "
                         "WHERE workflow_step_id = ANY (%s)", ([s1, s3],)).fetchone()[0] == transitions
        holders = dict(w.execute("SELECT workflow_step_id, worker_id FROM tasker_core.step_claims").fetchall())
        assert holders == {s1: "o", s3: "o"}
        assert w.execute("SELECT count(*) FROM tasker_core.check_tracking()").fetchone()[0] == 0


def test_concurrent_batches_never_finish_a_step_twice(bdb):
    with bdb.connect() as conn:
        tasks(conn, 60)
    errors, reported = [], []
    lock = threading.Lock()

    def worker(n):
        try:
            with bdb.connect() as c:
                c.execute("SET deadlock_timeout = '100ms'")
                for _ in range(200):
                    got = claim(c, f"w{n}", 10)
                    if not got:
                        return
                    # a second connection of the same worker reports the same steps too
                    twin = [None]
                    th = threading.Thread(target=lambda: twin.__setitem__(0, report(
                        bdb.connect(), f"w{n}", [{"step_id": s} for s in got])))
                    th.start()
                    mine = report(c, f"w{n}", [{"step_id": s} for s in reversed(got)])
                    th.join(30)
                    with lock:
                        reported.extend(r for r in mine + (twin[0] or []) if r[1] == "completed")
        except psycopg.Error as e:
            with lock:
                errors.append((e.sqlstate, str(e).splitlines()[0]))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    steps = [r[0] for r in reported]
    assert len(steps) == len(set(steps)) == 240, (len(steps), len(set(steps)))
    with bdb.connect() as conn:
        assert conn.execute("SELECT count(*) FROM tasker_workflow_step_transitions "
                            "WHERE to_state = 'complete'").fetchone()[0] == 240
        assert conn.execute("SELECT count(*) FROM tasker_task_transitions "
                            "WHERE to_state = 'complete'").fetchone()[0] == 60
        assert conn.execute("SELECT count(*) FROM tasker_core.check_tracking()").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM tasker_core.verify()").fetchone()[0] == 0


# ---------------------------------------------------------------- report_and_claim (0.6.0)

def report_and_claim(conn, worker, outcomes, n=10, lease=600):
    return conn.execute("SELECT outcome, workflow_step_id, backoff_seconds, task_id, step_name, "
                        "parent_results, attempt, lease_expires_at IS NOT NULL "
                        "FROM tasker_core.report_and_claim(%s, %s, ARRAY['batch'], %s, %s)",
                        (worker, Jsonb(outcomes), n, lease)).fetchall()


def test_report_and_claim_takes_the_steps_its_outcomes_made_ready(bdb):
    with bdb.connect() as conn:
        (t,) = tasks(conn, 1)
        (a,) = claim(conn, "w", 1)
        conn.execute("BEGIN")
        rows = report_and_claim(conn, "w", [{"step_id": a, "results": {"n": 1}}])
        # b and c were ready only inside this transaction, and are claimed by it
        assert conn.execute("SELECT count(*) FROM tasker_core.step_claims WHERE worker_id = 'w'").fetchone()[0] == 2
        assert conn.execute("SHOW lock_timeout").fetchone()[0] == "0"    # the claim's setting is gone
        conn.execute("COMMIT")
        assert rows[0] == ("completed", a, None, None, None, None, None, False)
        claimed = rows[1:]
        assert [(r[0], r[3], r[4], r[5], r[6], r[7]) for r in claimed] == [
            ("claimed", t, "b", {"a": {"n": 1}}, 1, True), ("claimed", t, "c", {"a": {"n": 1}}, 1, True)]
        b, c = claimed[0][1], claimed[1][1]
        # report only (0 steps), then claim only (no outcomes)
        assert report_and_claim(conn, "w", [{"step_id": b}, {"step_id": c, "error": "x", "retryable": False}],
                                n=0) == [("completed", b, None, None, None, None, None, False),
                                         ("failed", c, None, None, None, None, None, False)]
        assert report_and_claim(conn, "w", []) == []                      # d waits for c forever
        assert conn.execute("SELECT to_state FROM tasker_task_transitions WHERE task_id = %s AND most_recent",
                            (t,)).fetchone()[0] == "error"
        tasks(conn, 1)
        assert [r[4] for r in report_and_claim(conn, "w", [])] == ["a"]
        assert conn.execute("SELECT count(*) FROM tasker_core.check_tracking()").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM tasker_core.verify()").fetchone()[0] == 0


BAD_CLAIM = [
    ("NULL", "'[]'", "1", "60", "22004"),
    ("''", "'[]'", "1", "60", "22023"),
    ("'w'", "NULL", "1", "60", "22004"),
    ("'w'", "'{}'", "1", "60", "22023"),
    ("'w'", "'[]'", "-1", "60", "22023"),
    ("'w'", "'[]'", "1001", "60", "22023"),
    ("'w'", "'[]'", "NULL", "60", "22004"),
    ("'w'", "'[]'", "1", "0", "22023"),
    ("'w'", "'[]'", "1", "86401", "22023"),
]


@pytest.mark.parametrize("worker,outcomes,n,lease,sqlstate", BAD_CLAIM,
                         ids=[f"{i}-{b[-1]}" for i, b in enumerate(BAD_CLAIM)])
def test_report_and_claim_with_bad_input_changes_nothing(bdb, worker, outcomes, n, lease, sqlstate):
    with bdb.connect() as conn:
        tasks(conn, 2)
        (a,) = claim(conn, "w", 1)
        before = snapshot(conn)
        outcomes = outcomes.replace("[]", json.dumps([{"step_id": a}]))
        assert sqlstate_of(conn, f"SELECT * FROM tasker_core.report_and_claim({worker}, {outcomes}, NULL, "
                                 f"{n}, {lease})") == sqlstate
        assert snapshot(conn) == before
        assert sqlstate_of(conn, "SELECT * FROM tasker_core.report_and_claim('w', %s, NULL, 1, 60, 'nope')",
                           (Jsonb([{"step_id": a}]),)) == "22023"
        assert snapshot(conn) == before


def test_the_claim_half_gives_up_rather_than_wait(bdb):
    """Another session holds the row of a task whose first step is ready: claiming that step
    starts the task, which would wait for the row. So the claim half gives up: nothing is
    claimed (not even the steps it could have had), and the outcomes are recorded."""
    with bdb.connect() as w, bdb.connect() as holder:
        t1, t2 = tasks(w, 2)
        (a1,) = claim(w, "w", 1)
        holder.execute("BEGIN")
        holder.execute("SELECT 1 FROM tasker_tasks WHERE task_id = %s FOR UPDATE", (t2,))
        w.execute("SET deadlock_timeout = '50ms'")
        rows = report_and_claim(w, "w", [{"step_id": a1}], n=10)
        assert rows == [("completed", a1, None, None, None, None, None, False)]
        assert w.execute("SELECT count(*) FROM tasker_core.step_claims").fetchone()[0] == 0
        assert w.execute("SHOW lock_timeout").fetchone()[0] == "0"
        holder.execute("ROLLBACK")
        claimed = report_and_claim(w, "w", [], n=10)
        assert sorted((r[3], r[4]) for r in claimed) == [(t1, "b"), (t1, "c"), (t2, "a")]
        assert w.execute("SELECT count(*) FROM tasker_core.check_tracking()").fetchone()[0] == 0


def test_concurrent_report_and_claim_loops_finish_every_step_once(bdb):
    """Eight workers that only ever report and claim in one call: no deadlock, no step run
    twice, every task complete."""
    with bdb.connect() as conn:
        tasks(conn, 80)
    errors, done = [], []
    lock = threading.Lock()

    def worker(n):
        try:
            with bdb.connect() as c:
                c.execute("SET deadlock_timeout = '100ms'")
                held, deadline = [], time.monotonic() + 120
                while time.monotonic() < deadline:
                    with lock:
                        if len(done) >= 320 and not held:
                            return
                    rows = report_and_claim(c, f"w{n}", [{"step_id": s, "results": {"by": n}} for s in held],
                                            n=1 + n % 3)
                    with lock:
                        done.extend(r[1] for r in rows if r[0] == "completed")
                        assert not [r for r in rows if r[0] == "lease_lost"], rows
                    held = [r[1] for r in rows if r[0] == "claimed"]
        except (psycopg.Error, AssertionError) as e:
            with lock:
                errors.append((getattr(e, "sqlstate", None), str(e).splitlines()[0]))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    assert len(done) == len(set(done)) == 320, (len(done), len(set(done)))
    with bdb.connect() as conn:
        assert conn.execute("SELECT count(*) FROM tasker_workflow_step_transitions "
                            "WHERE to_state = 'in_progress'").fetchone()[0] == 320
        assert conn.execute("SELECT count(*) FROM tasker_task_transitions "
                            "WHERE to_state = 'complete'").fetchone()[0] == 80
        assert conn.execute("SELECT count(*) FROM tasker_core.check_tracking()").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM tasker_core.verify()").fetchone()[0] == 0
