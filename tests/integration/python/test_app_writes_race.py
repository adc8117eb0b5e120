"""Issue 11 item 6: the tracking triggers must not make application writes deadlock with workers.

An application transaction (Rails writing through ActiveRecord: autocommit off, plain UPDATEs of
tasker_workflow_steps) touches two steps of a task, child b and parent a (a -> b), in either
order, while a worker finishes a with complete_step or transition_step on its own connection.
The application's first write comes before the worker's call; its second write comes while the
worker's call is blocked or done. Without tracking the pair only waits for each other; with
tracking, _set_step_state used to lock b's step_state row when a became complete, so
child-then-parent closed a cycle (T1 holds b, waits for a; W holds a, waits for b) and one side
got 40P01.

Expected, in every order, with and without tracking: neither side gets an error, both commit,
a is complete, b can be claimed, and check_tracking() finds nothing. Each case runs REPEAT
times on fresh tasks; deadlock_timeout is 100 ms in both sessions so a deadlock shows fast.
"""
import threading
import time

import psycopg
import pytest
from psycopg.types.json import Jsonb

REPEAT = 5
NS = "race"
PAIR = {"name": "pair", "namespace_name": NS, "version": "1.0.0",
        "step_templates": [{"name": "a", "handler_class": "A"},
                           {"name": "b", "handler_class": "B", "depends_on_step": "a"}]}
SESSION = ("SET deadlock_timeout = '100ms'", "SET statement_timeout = '10s'", "SET lock_timeout = '10s'")
WORKER_CALLS = {
    "complete_step": "SELECT tasker_core.complete_step(%s, 'w', '{}')",
    "transition_step": "SELECT tasker_core.transition_step(%s, 'complete', '{}', 'in_progress')",
}
# The application's write of a step. A bare touch (updated_at only) is not a column the tracking
# trigger on tasker_workflow_steps is declared for (AFTER UPDATE OF retryable, retry_limit,
# in_process, ...), so it never reaches step_state; a write of a tracked column (ActiveRecord's
# update(retry_limit: ...); the value may be unchanged, the trigger fires on the column list)
# updates the step's step_state row, and so locks it until the transaction ends.
WRITES = {
    "touch": "UPDATE tasker_workflow_steps SET updated_at = now() WHERE workflow_step_id = %s",
    "tracked_column": "UPDATE tasker_workflow_steps SET retry_limit = retry_limit, updated_at = now() "
                      "WHERE workflow_step_id = %s",
}
# How long the worker keeps its transaction open after its call returned, so that an application
# write of the same step reached in that time waits for it (the "only waits" of the control).
WORKER_HOLD = 0.1

CASES = [
    # (worker call, application order, application write, tracking)
    (call, order, write, True)
    for call in ("complete_step", "transition_step")
    for order in ("child_then_parent", "parent_then_child")
    for write in ("touch", "tracked_column")
] + [
    # the control: the worker protocol needs tracking, so without it only transition_step (a is
    # claimed with tracking on, then tracking is disabled for the race and enabled again after)
    ("transition_step", order, "tracked_column", False)
    for order in ("child_then_parent", "parent_then_child")
]


def session(db, autocommit=True):
    conn = db.connect(autocommit=autocommit)
    for sql in SESSION:
        conn.execute(sql)
    if not autocommit:
        conn.commit()
    return conn


def error_of(e):
    return (e.sqlstate, str(e).splitlines()[0])


def one_round(db, admin, n, call, order, write, tracking):
    """One task, one race. Returns a dict of what each side saw; asserts nothing."""
    task = admin.execute("SELECT tasker_core.create_task(%s, 'pair', NULL, %s)", (NS, Jsonb({"n": n}))).fetchone()[0]
    steps = dict(admin.execute(
        """SELECT ns.name::text, ws.workflow_step_id FROM tasker_workflow_steps ws
           JOIN tasker_named_steps ns USING (named_step_id) WHERE ws.task_id = %s""", (task,)).fetchall())
    a, b = steps["a"], steps["b"]
    claimed = [r[0] for r in admin.execute(
        "SELECT workflow_step_id FROM tasker_core.claim_steps('w', ARRAY[%s], 10, 600)", (NS,))]
    assert claimed == [a], (n, claimed, a)
    if not tracking:
        admin.execute("SELECT tasker_core.disable_tracking()")
    first, second = (b, a) if order == "child_then_parent" else (a, b)

    out = {"task": task, "a": a, "b": b}
    go = threading.Event()
    called = threading.Event()
    app = session(db, autocommit=False)
    worker = session(db, autocommit=False)
    wpid = worker.info.backend_pid

    def work():
        go.wait(10)
        try:
            out["w_result"] = worker.execute(WORKER_CALLS[call], (a,)).fetchone()[0]
            called.set()
            time.sleep(WORKER_HOLD)
            worker.commit()
            out["w"] = "committed"
        except psycopg.Error as e:
            called.set()
            worker.rollback()
            out["w"] = error_of(e)

    th = threading.Thread(target=work, daemon=True)
    th.start()
    try:
        try:
            app.execute(WRITES[write], (first,))
        except psycopg.Error as e:
            app.rollback()
            out["t1"] = ("first write",) + error_of(e)
            go.set()
            th.join(15)
            return out
        go.set()                              # the worker's call starts right after T1's first write
        blocked = False
        with db.connect() as probe:           # until the worker's call waits for a lock, or returned
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and not called.is_set():
                if probe.execute("SELECT cardinality(pg_blocking_pids(%s)) > 0", (wpid,)).fetchone()[0]:
                    blocked = True
                    break
                time.sleep(0.01)
        out["w_blocked_before_second_write"] = blocked
        try:
            app.execute(WRITES[write], (second,))
            app.commit()
            out["t1"] = "committed"
        except psycopg.Error as e:
            app.rollback()
            out["t1"] = ("second write",) + error_of(e)
        th.join(15)
        out.setdefault("w", "hung")
    finally:
        app.close()
        worker.close()
    return out


def check_round(admin, out, tracking):
    """What must hold after a round; returns a list of problems (empty when all is well)."""
    problems = []
    if out.get("t1") != "committed":
        problems.append(f"application: {out.get('t1')}")
    if out.get("w") != "committed":
        problems.append(f"worker: {out.get('w')}")
    if not tracking:
        admin.execute("SELECT tasker_core.enable_tracking()")
    a, b = out["a"], out["b"]
    state = admin.execute("SELECT to_state FROM tasker_workflow_step_transitions "
                          "WHERE workflow_step_id = %s AND most_recent", (a,)).fetchone()
    if state != ("complete",):
        problems.append(f"step a is {state}, not complete")
    bad = admin.execute("SELECT * FROM tasker_core.check_tracking()").fetchall()
    if bad:
        problems.append(f"check_tracking: {bad}")
    claimed = [r[0] for r in admin.execute(
        "SELECT workflow_step_id FROM tasker_core.claim_steps('w2', ARRAY[%s], 10, 600)", (NS,))]
    if claimed != [b]:
        problems.append(f"claim_steps returned {claimed}, not b={b}")
    # leave nothing claimable for the next round
    for s in claimed:
        admin.execute("SELECT tasker_core.complete_step(%s, 'w2', '{}')", (s,))
    return problems


@pytest.mark.parametrize("call,order,write,tracking", CASES,
                         ids=[f"{c}-{o}-{w}-{'tracking' if t else 'untracked'}" for c, o, w, t in CASES])
def test_application_writes_of_child_and_parent_never_deadlock_with_the_worker(tasker_db, call, order, write,
                                                                                  tracking):
    tasker_db.scalar("SELECT tasker_core.enable_tracking()")
    tasker_db.scalar("SELECT tasker_core.register_task_template(%s)", (Jsonb(PAIR),))
    failures = []
    with session(tasker_db) as admin:
        for n in range(REPEAT):
            out = one_round(tasker_db, admin, n, call, order, write, tracking)
            problems = check_round(admin, out, tracking)
            print(n, {k: v for k, v in out.items() if k not in ("task",)})
            if problems:
                failures.append((n, problems))
    assert not failures, f"{len(failures)} of {REPEAT} rounds failed: {failures}"
