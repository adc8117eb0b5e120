"""The Python worker against a real tasker_core database: real connections, worker threads, and a
worker subprocess for the signal tests. Each test gets its own database (see conftest.py)."""
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from conftest import PACKAGE_ROOT, running
from tasker_worker import PermanentError, RetryableError, Step, Worker, create_task

NS = "pytest"


def template(name, steps):
    """A template of `steps`: (step name, handler_class, [parents], {extra fields})."""
    out = {"name": name, "namespace_name": NS, "version": "1.0.0", "step_templates": []}
    for sname, handler_class, parents, *extra in steps:
        st = {"name": sname, "handler_class": handler_class, "depends_on_steps": parents}
        st.update(extra[0] if extra else {})
        out["step_templates"].append(st)
    return out


def path(transitions):
    return [(f, t) for f, t, _ in transitions]


FAN = template("fan", [
    ("fetch", "Fan::Fetch", [], {"handler_config": {"factor": 10}}),
    ("a", "Fan::Part", ["fetch"]),
    ("b", "Fan::Part", ["fetch"]),
    ("c", "Fan::Part", ["fetch"]),
    ("total", "Fan::Total", ["a", "b", "c"]),
])


def fan_handlers(worker, seen):
    @worker.handler("Fan::Fetch")
    def fetch(step):
        seen.append(step)
        return {"n": step.inputs["n"] * step.config["factor"]}

    @worker.handler("Fan::Part")
    def part(step):
        seen.append(step)
        return {"part": step.parent_results["fetch"]["n"] + ord(step.name)}

    @worker.handler("Fan::Total")
    def total(step):
        seen.append(step)
        return {"total": sum(r["part"] for r in step.parent_results.values()),
                "parents": sorted(step.parent_results)}


def test_fan_out_fan_in_runs_to_completion(db):
    db.register(FAN)
    tasks = {db.create_task(FAN, {"n": n}): n for n in range(1, 21)}
    seen_a, seen_b = [], []
    helper = Worker(db.conninfo, worker_id="helper", batch_size=2, poll_interval=0.2)
    fan_handlers(helper, seen_a)
    main = Worker(db.conninfo, worker_id="main", namespaces=[NS], poll_interval=0.2)
    fan_handlers(main, seen_b)

    def all_done():
        return all(db.task_state(t) in ("complete", "error") for t in tasks)

    with running(helper):
        main.run(until=all_done)  # in this thread: run(until=...) returns when it says so

    for task_id, n in tasks.items():
        assert db.task_state(task_id) == "complete"
        expected = 3 * n * 10 + ord("a") + ord("b") + ord("c")
        assert db.step(task_id, "total")[3] == {"total": expected, "parents": ["a", "b", "c"]}
    seen = seen_a + seen_b
    assert len(seen) == 5 * len(tasks)  # each step ran once
    first = next(s for s in seen if s.name == "fetch" and tasks[s.task_id] == 1)
    assert first == Step(task_id=first.task_id, step_id=db.step(first.task_id, "fetch")[0], name="fetch",
                         namespace=NS, task_name="fan", handler_class="Fan::Fetch",
                         config={"factor": 10}, inputs={"n": 1}, parent_results={}, attempt=1)
    part = next(s for s in seen if s.name == "b" and s.task_id == first.task_id)
    assert part.parent_results == {"fetch": {"n": 10}}


def test_retryable_error_honours_retry_after_and_is_recorded(db):
    t = template("flaky", [("call", "Flaky::Call", [])])
    db.register(t)
    task_id = db.create_task(t)
    started = []
    # A long poll interval: the retry is driven by the backoff fail_step returned, not a poll.
    w = Worker(db.conninfo, worker_id="w1", poll_interval=30)

    @w.handler("Flaky::Call")
    def call(step):
        started.append((step.attempt, time.monotonic()))
        if step.attempt == 1:
            raise RetryableError("rate limited", retry_after=2)
        return {"ok": True}

    with running(w):
        assert db.wait_task(task_id) == "complete"

    assert [a for a, _ in started] == [1, 2]
    delay = started[1][1] - started[0][1]
    assert 2.0 <= delay < 4.0, delay
    step_id, attempts, _, results = db.step(task_id, "call")
    assert attempts == 2 and results == {"ok": True}
    trans = db.transitions(step_id)
    assert path(trans)[-5:] == [("pending", "in_progress"), ("in_progress", "error"),
                                ("error", "pending"), ("pending", "in_progress"),
                                ("in_progress", "complete")]
    error_meta = trans[-4][2]
    assert error_meta["retryable"] is True and error_meta["backoff_seconds"] == 2
    assert error_meta["worker_id"] == "w1"
    assert error_meta["error"]["message"] == "rate limited"
    assert error_meta["error"]["error_class"] == "tasker_worker.RetryableError"
    assert "raise RetryableError" in error_meta["error"]["traceback"]


def test_permanent_error_ends_the_task_in_error(db):
    t = template("doomed", [("first", "Doomed::First", []), ("second", "Doomed::Second", ["first"])])
    db.register(t)
    task_id = db.create_task(t)
    calls = []
    w = Worker(db.conninfo, poll_interval=0.2)

    class CardDeclined(PermanentError):
        pass

    @w.handler("Doomed::First")
    def first(step):
        calls.append(step.attempt)
        raise CardDeclined("card declined")

    with running(w):
        assert db.wait_task(task_id) == "error"
        time.sleep(0.5)  # a retry would happen now

    assert calls == [1]
    _, attempts, retryable, results = db.step(task_id, "first")
    assert attempts == 1 and retryable is False
    assert results["error"]["message"] == "card declined"
    assert results["error"]["error_class"].endswith("CardDeclined")
    assert not db.step(task_id, "second")[1]  # never ran


def test_unknown_handler_class_fails_the_step_permanently(db):
    t = template("orphan", [("lost", "Nobody::Home", [])])
    db.register(t)
    task_id = db.create_task(t)
    w = Worker(db.conninfo, worker_id="w-known", poll_interval=0.2)
    w.handler("Somebody::Else")(lambda step: {})

    with running(w):
        assert db.wait_task(task_id) == "error"

    _, attempts, retryable, results = db.step(task_id, "lost")
    assert attempts == 1 and retryable is False
    assert results["error"]["error_class"] == "tasker_worker.UnknownHandler"
    assert "'Nobody::Home'" in results["error"]["message"]
    assert "Somebody::Else" in results["error"]["message"]


@pytest.mark.parametrize("where", ["handler", "worker"])
def test_a_handler_over_its_timeout_fails_retryably(db, where):
    t = template("slow", [("wait", "Slow::Wait", [])])
    db.register(t)
    task_id = db.create_task(t)
    w = Worker(db.conninfo, poll_interval=0.2, step_timeout=0.5 if where == "worker" else None)

    @w.handler("Slow::Wait", timeout=0.5 if where == "handler" else None)
    def wait(step):
        if step.attempt == 1:
            time.sleep(3)
        return {"attempt": step.attempt}

    began = time.monotonic()
    with running(w):
        assert db.wait_task(task_id) == "complete"
    assert time.monotonic() - began < 2.5  # the timeout, a ~1 s backoff, the retry

    step_id, attempts, _, results = db.step(task_id, "wait")
    assert attempts == 2 and results == {"attempt": 2}
    errors = [m for _, to, m in db.transitions(step_id) if to == "error"]
    assert len(errors) == 1 and errors[0]["retryable"] is True
    assert errors[0]["error"]["error_class"] == "TimeoutError"
    assert "timed out after 0.5 s" in errors[0]["error"]["message"]


def test_heartbeats_keep_the_lease_of_a_long_step(db):
    t = template("long", [("crunch", "Long::Crunch", [])])
    db.register(t)
    task_id = db.create_task(t)
    runs = []
    holder = Worker(db.conninfo, worker_id="holder", lease_seconds=2, poll_interval=0.2)
    # A rival claiming all the time: its claims expire any lease that was not extended.
    rival = Worker(db.conninfo, worker_id="rival", lease_seconds=2, poll_interval=0.1)

    def crunch(step):
        runs.append(step.attempt)
        time.sleep(5)  # 2.5 leases
        return {"done": True}

    holder.handler("Long::Crunch")(crunch)
    with running(holder):
        while not runs:
            time.sleep(0.02)
        rival.handler("Long::Crunch")(crunch)
        with running(rival):
            assert db.wait_task(task_id, timeout=15) == "complete"

    assert runs == [1]
    step_id, attempts, _, results = db.step(task_id, "crunch")
    assert attempts == 1 and results == {"done": True}
    assert path(db.transitions(step_id))[-2:] == [("pending", "in_progress"), ("in_progress", "complete")]
    assert db.transitions(step_id)[-1][2]["worker_id"] == "holder"


def test_a_lost_lease_is_logged_and_the_worker_goes_on(db, caplog):
    t = template("stolen", [("grab", "Stolen::Grab", [])])
    db.register(t)
    task_id = db.create_task(t)
    w = Worker(db.conninfo, worker_id="w-lost", poll_interval=0.2)

    @w.handler("Stolen::Grab")
    def grab(step):
        if step.attempt == 1:  # as if the worker had stalled past its lease
            db.rows("UPDATE tasker_core.step_claims SET lease_expires_at = now() - interval '1 s' "
                    "WHERE workflow_step_id = %s", [step.step_id])
        return {"attempt": step.attempt}

    with caplog.at_level(logging.WARNING, logger="tasker_worker"):
        with running(w):
            assert db.wait_task(task_id) == "complete"

    assert any("lease lost" in r.getMessage() for r in caplog.records)
    step_id, attempts, _, results = db.step(task_id, "grab")
    assert attempts == 2 and results == {"attempt": 2}
    reasons = [m.get("reason") for _, to, m in db.transitions(step_id) if to == "error"]
    assert reasons == ["lease_expired"]


def lose_one_report(worker, lost):
    """Makes the worker's first report lose its connection, `lost` "before the commit" or "after
    the commit" (the answer lost): what a failover does to a call in flight. Returns a list that
    holds the report's SQL once it happened."""
    real, broken = worker._sql, []

    def lossy(query, params=None):
        if "report_" in query and not broken:
            broken.append(query)
            if lost == "after the commit":
                real(query, params)
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return real(query, params)
    worker._sql = lossy
    return broken


@pytest.mark.parametrize("lost", ["before the commit", "after the commit"])
def test_an_outcome_whose_connection_was_lost_is_sent_again_and_applied_once(db, caplog, lost):
    """The connection breaks while an outcome is being recorded (a failover): before the
    commit, or after it with the answer lost. Either way the worker cannot know which; it sends
    the outcome again on a new connection, and the step is completed exactly once."""
    t = template("lossy", [("only", "Lossy::Only", [])])
    db.register(t)
    task_id = db.create_task(t)
    w = Worker(db.conninfo, worker_id="w-lossy", poll_interval=0.2)
    runs = []
    w.handler("Lossy::Only")(lambda step: runs.append(step.step_id) or {"ok": True})
    broken = lose_one_report(w, lost)

    with caplog.at_level(logging.INFO, logger="tasker_worker"):
        with running(w):
            assert db.wait_task(task_id) == "complete"
    messages = [r.getMessage() for r in caplog.records]
    assert broken and any("connection lost" in m and "sending again" in m for m in messages), messages
    resent_found_it_done = any("no longer held" in m for m in messages)
    assert resent_found_it_done == (lost == "after the commit"), messages
    assert not any("lease lost, outcome dropped" in m for m in messages)
    step_id, attempts, _, results = db.step(task_id, "only")
    assert runs == [step_id] and attempts == 1 and results == {"ok": True}
    assert [to for _, to, _ in db.transitions(step_id)].count("complete") == 1


@pytest.mark.parametrize("lost", ["before the commit", "after the commit"])
def test_a_retryable_failure_whose_connection_was_lost_is_not_sent_again(db, caplog, lost):
    """A retryable failure's first send is cut off. If it committed, the step may already be
    claimed again (here: by the claim half of that very call, the backoff being 0), so a resend
    could count as the new attempt's failure: the worker does not send it again. The step is
    retried either way (after its lease expires when the failure was not recorded) and the
    handler's failure is recorded at most once."""
    t = template("lossyfail", [("only", "LossyFail::Only", [])])
    db.register(t)
    task_id = db.create_task(t)
    w = Worker(db.conninfo, worker_id="w-lossyfail", poll_interval=0.2, lease_seconds=2)
    runs = []

    @w.handler("LossyFail::Only")
    def only(step):
        runs.append(step.attempt)
        if len(runs) == 1:
            raise RetryableError("first try fails", retry_after=0)
        return {"ok": True}
    broken = lose_one_report(w, lost)

    with caplog.at_level(logging.INFO, logger="tasker_worker"):
        with running(w):
            assert db.wait_task(task_id) == "complete"
    messages = [r.getMessage() for r in caplog.records]
    assert any("retryable failure is not sent again" in m for m in messages), messages
    step_id, _, _, results = db.step(task_id, "only")
    assert results == {"ok": True}
    failures = [m for _, to, m in db.transitions(step_id) if to == "error" and m.get("reason") != "lease_expired"]
    assert len(failures) == (1 if lost == "after the commit" else 0), db.transitions(step_id)


@pytest.mark.parametrize("case", ["finishes", "releases"])
def test_sigterm_mid_step_finishes_or_releases_and_nothing_is_lost(db, case):
    t = template("term", [("slow", "Slow::Step", []), ("after", "Slow::Step", ["slow"])])
    db.register(t)
    task_id = db.create_task(t)
    sleep, grace = (1.0, 10.0) if case == "finishes" else (60.0, 1.0)
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_ROOT))
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).parent / "proc_worker.py"), db.conninfo, "proc", str(sleep),
         str(grace)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("started "), (line, proc.stderr.read() if proc.poll() is not None else "")
        step_id = int(line.split()[1])
        proc.send_signal(signal.SIGTERM)
        began = time.monotonic()
        out, err = proc.communicate(timeout=20)
        took = time.monotonic() - began
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "exited" in out
    assert took < (sleep if case == "finishes" else grace) + 2.0, took

    trans = db.transitions(step_id)
    if case == "finishes":
        assert path(trans)[-1] == ("in_progress", "complete") and trans[-1][2]["worker_id"] == "proc"
        assert not db.step(task_id, "after")[1]  # it stopped claiming after SIGTERM
    else:
        assert path(trans)[-1] == ("in_progress", "error")
        assert trans[-1][2]["reason"] == "released"
        assert "released" in err

    other = Worker(db.conninfo, worker_id="other", poll_interval=0.2)
    other.handler("Slow::Step")(lambda step: {"by": "other"})
    with running(other):
        assert db.wait_task(task_id) == "complete"
    assert db.step(task_id, "slow")[1] == 1  # a released attempt is not counted


def test_a_worker_blocked_in_listen_wakes_up_for_a_new_task(db):
    t = template("wake", [("one", "Wake::Step", []), ("two", "Wake::Step", ["one"])])
    db.register(t)
    w = Worker(db.conninfo, poll_interval=30)
    w.handler("Wake::Step")(lambda step: {"name": step.name})

    with running(w):
        deadline = time.monotonic() + 10
        while not db.scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                            "AND query = 'LISTEN tasker_ready'", [db.name]):
            assert time.monotonic() < deadline, "the worker never listened"
            time.sleep(0.05)
        time.sleep(0.5)  # its first claim found nothing: it now waits for up to 30 s
        began = time.monotonic()
        task_id = db.create_task(t)
        assert db.wait_task(task_id, timeout=10) == "complete"
        took = time.monotonic() - began

    print(f"woke and ran a 2-step task in {took:.3f} s")
    assert took < 2.0, took  # two wake-ups (create_task, then complete_step), no poll


def test_a_worker_trace_is_joined_by_untraced_tasks(db):
    chain = template("traced", [("first", "Trace::Step", []), ("second", "Trace::Step", ["first"])])
    db.register(chain)
    tasks = [db.create_task(chain, {}) for _ in range(3)]
    worker_tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    seen = []
    w = Worker(db.conninfo, worker_id="tracer", poll_interval=0.2, traceparent=lambda: worker_tp)

    @w.handler("Trace::Step")
    def step(s):
        seen.append((s.task_id, s.name, s.traceparent))
        return {}

    w.run(until=lambda: all(db.task_state(t) == "complete" for t in tasks))
    # every step's handler saw the worker's trace, the first one (whose claim joined the task
    # to it) included; and the database recorded it for the task
    assert sorted(seen) == sorted((t, n, worker_tp) for t in tasks for n in ("first", "second"))
    for t in tasks:
        assert db.scalar("SELECT tasker_core.task_traceparent(%s)", (t,)) == worker_tp


def test_outcomes_are_recorded_in_batches(db):
    """Quick handlers finishing together are recorded by one report_steps call each round: the
    completions of several steps share a transaction (their events share an xid)."""
    t = template("many", [(f"s{i}", "Many::Step", []) for i in range(12)])
    db.register(t)
    task_id = db.create_task(t)
    worker = Worker(db.conninfo, worker_id="batcher", batch_size=12, poll_interval=0.2,
                    flush_interval=0.05, pool_size=2)
    worker.handler("Many::Step")(lambda step: {"i": step.name})
    with running(worker):
        assert db.wait_task(task_id) == "complete"
    per_xid = db.rows("SELECT xid, count(*) FROM tasker_core.events WHERE task_id = %s "
                      "AND name = 'step.completed' GROUP BY xid", (task_id,))
    assert sum(n for _, n in per_xid) == 12
    assert max(n for _, n in per_xid) >= 2, per_xid


@pytest.mark.parametrize("server,has", [("0.4.0", "SELECT false, false"), ("0.5.0", "SELECT true, false")])
def test_older_servers_get_the_calls_they_have(db, server, has):
    """A server before 0.5.0 (no report_steps) gets complete_step calls; one before 0.6.0 (no
    report_and_claim) gets report_steps and separate claims."""
    t = template("single", [("one", "Single::Step", []), ("two", "Single::Step", ["one"])])
    db.register(t)
    task_id = db.create_task(t)
    worker = Worker(db.conninfo, worker_id="single", poll_interval=0.2)
    worker.handler("Single::Step")(lambda step: {"ok": True})
    import tasker_worker.worker as w
    saved, w.HAS_SQL = w.HAS_SQL, has
    try:
        with running(worker):
            assert db.wait_task(task_id) == "complete"
    finally:
        w.HAS_SQL = saved
    assert [to for _, to, _ in db.transitions(db.step(task_id, "two")[0])][-1] == "complete"
    # the dependent was claimed in a transaction of its own, not with its parent's outcome
    xids = db.rows("SELECT name, xid FROM tasker_core.events WHERE task_id = %s AND name IN "
                   "('step.completed', 'step.execution_requested') ORDER BY id", (task_id,))
    assert len({x for _, x in xids}) == 4, xids


def test_a_dependent_is_claimed_with_its_parents_outcome(db):
    """With report_and_claim, the worker that records a step's success claims the step it made
    ready in the same transaction, and runs it."""
    t = template("chain", [("one", "Chain::Step", []), ("two", "Chain::Step", ["one"]),
                           ("three", "Chain::Step", ["two"])])
    db.register(t)
    task_id = db.create_task(t)
    worker = Worker(db.conninfo, worker_id="chain", poll_interval=5)
    worker.handler("Chain::Step")(lambda step: {"seen": sorted(step.parent_results)})
    with running(worker):
        assert db.wait_task(task_id) == "complete"
    rows = db.rows("SELECT e.name, s.name, e.xid FROM tasker_core.events e "
                   "JOIN tasker_workflow_steps ws ON ws.workflow_step_id = e.step_id "
                   "JOIN tasker_named_steps s ON s.named_step_id = ws.named_step_id "
                   "WHERE e.task_id = %s AND e.name IN ('step.completed', 'step.execution_requested') "
                   "ORDER BY e.id", (task_id,))
    xid = {(event, step): x for event, step, x in rows}
    assert xid[("step.completed", "one")] == xid[("step.execution_requested", "two")], rows
    assert xid[("step.completed", "two")] == xid[("step.execution_requested", "three")], rows
    assert db.rows("SELECT results FROM tasker_workflow_steps ws JOIN tasker_named_steps s "
                   "ON s.named_step_id = ws.named_step_id WHERE task_id = %s AND s.name = 'three'",
                   (task_id,)) == [({"seen": ["two"]},)]


def test_sigterm_at_any_moment_stops_the_worker_promptly(db):
    """SIGTERM sent at random moments (idle, claiming, mid-step, recording) — the handler only
    writes a byte, so the worker always exits within its grace period."""
    import random
    t = template("loop", [("a", "Slow::Step", []), ("b", "Slow::Step", ["a"])])
    db.register(t)
    env = dict(os.environ, PYTHONPATH=str(PACKAGE_ROOT))
    rng = random.Random(7)
    for i in range(15):
        db.create_task(t, {"i": i})
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent / "proc_worker.py"), db.conninfo, f"loop{i}", "0.05",
             "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            # once run() has installed its handlers (before that, SIGTERM's default ends Python)
            for line in proc.stderr:
                if "started (namespaces" in line:
                    break
            time.sleep(rng.uniform(0.0, 0.7))
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                pytest.fail(f"round {i}: the worker did not exit within 10 s of SIGTERM")
        assert proc.returncode == 0 and "exited" in out, (i, err[-2000:])
    # nothing is left claimed
    assert db.scalar("SELECT count(*) FROM tasker_core.step_claims") == 0


def test_create_task_with_priority_and_a_later_start(db):
    import datetime as dt
    db.register(FAN)
    with db.connect() as conn:
        later = dt.datetime(2099, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
        scheduled = create_task(conn, NS, "fan", {"n": 1}, priority=7, run_at=later, initiator="pytest")
        delayed = create_task(conn, NS, "fan", {"n": 2}, delay_seconds=3600)
        urgent = create_task(conn, NS, "fan", {"n": 3}, priority=9)
    assert db.rows("SELECT task_id, priority, run_at FROM tasker_core.task_options ORDER BY 1")[0] == \
        (scheduled, 7, dt.datetime(2099, 1, 1, 12, 0))
    assert db.scalar("SELECT initiator FROM tasker_tasks WHERE task_id = %s", [scheduled]) == "pytest"
    # only the urgent task can start now
    assert [r[0] for r in db.rows("SELECT task_id FROM tasker_core.claim_steps('w', NULL, 10, 60)")] == [urgent]
    assert delayed != urgent


MAP = template("map", [
    ("fetch", "Map::Fetch", []),
    ("price", "Map::Price", ["fetch"], {"map": {"over": "/parents/fetch/skus"}}),
    ("gift", "Map::Gift", ["fetch"], {"condition": {"path": "/context/gift", "eq": True}}),
    ("total", "Map::Total", ["price", "gift"]),
])


def test_a_map_instance_gets_its_element_and_the_fan_in_the_array(db):
    db.register(MAP)
    task = db.create_task(MAP, {"gift": False})
    seen = []
    w = Worker(db.conninfo, worker_id="mapper", poll_interval=0.1)

    @w.handler("Map::Fetch")
    def fetch(step):
        return {"skus": ["a", "bb", "ccc"]}

    @w.handler("Map::Price")
    def price(step):
        seen.append((step.index, step.element))
        return {"sku": step.element, "price": len(step.element)}

    @w.handler("Map::Gift")
    def gift(step):  # pragma: no cover - skipped by its condition
        raise AssertionError("the gift step is skipped")

    @w.handler("Map::Total")
    def total(step):
        assert not step.is_map_instance and step.element is None
        return {"prices": [r["price"] for r in step.parent_results["price"]],
                "gift": step.parent_results["gift"]}

    w.run(until=lambda: db.task_state(task) in ("complete", "error"))
    assert db.task_state(task) == "complete"
    assert sorted(seen) == [(0, "a"), (1, "bb"), (2, "ccc")]
    assert db.step(task, "total")[3] == {"prices": [1, 2, 3], "gift": None}
