"""explain_task / explain_step: one row per reason a step is not being worked on, and 'ready'
exactly for the steps a claim would take."""
import json

import psycopg
import pytest

TEMPLATE = {"name": "why", "namespace_name": "explain", "version": "1.0.0",
            "step_templates": [{"name": "root", "handler_class": "R", "default_retry_limit": 2},
                               {"name": "left", "handler_class": "L", "depends_on_step": "root"},
                               {"name": "right", "handler_class": "R", "depends_on_step": "root"},
                               {"name": "join", "handler_class": "J", "depends_on_steps": ["left", "right"]}]}


# one step at a time per customer
KEYED = {"name": "keyed", "namespace_name": "explain", "version": "1.0.0",
         "concurrency": {"key": "/customer", "limit": 1},
         "step_templates": [{"name": "only", "handler_class": "K"}]}


@pytest.fixture
def conn(tasker_db):
    with tasker_db.connect() as c:
        c.execute("SELECT tasker_core.enable_tracking()")
        c.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (json.dumps(TEMPLATE),))
        c.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (json.dumps(KEYED),))
        yield c


def new_task(c, i):
    return c.execute("SELECT tasker_core.create_task('explain', 'why', NULL, %s::jsonb)",
                     (json.dumps({"i": i}),)).fetchone()[0]


def step_of(c, task, name):
    return c.execute("SELECT workflow_step_id FROM tasker_core.step_state WHERE task_id = %s AND name = %s",
                     (task, name)).fetchone()[0]


def claim_one(c, task, name, worker="w", lease=600):
    """Claims the named step of the task (the only ready one of its task left unclaimed by others)."""
    step = step_of(c, task, name)
    for (s,) in c.execute("SELECT workflow_step_id FROM tasker_core.claim_steps(%s, NULL, 1000, %s)",
                          (worker, lease)).fetchall():
        if s != step:
            c.execute("SELECT tasker_core.release_step(%s, %s)", (s, worker))
    return step


def reasons(c, task):
    out = {}
    for step, name, code, reason, related, at in c.execute(
            "SELECT * FROM tasker_core.explain_task(%s)", (task,)).fetchall():
        out.setdefault(step, []).append((code, reason, related, at))
    return out


def build_every_case(c):
    tasks = {k: new_task(c, k) for k in ("fresh", "leased", "backoff", "not_retryable", "exhausted",
                                         "cancelled", "done", "half", "error_ready")}
    # leased: its root held by a worker
    claim_one(c, tasks["leased"], "root")
    # backoff: the root failed, retry after an hour (capped to 300 s)
    s = claim_one(c, tasks["backoff"], "root")
    c.execute("SELECT tasker_core.fail_step(%s, 'w', '\"slow\"', true, 3600)", (s,))
    # not_retryable: the root failed for good
    s = claim_one(c, tasks["not_retryable"], "root")
    c.execute("SELECT tasker_core.fail_step(%s, 'w', '\"bad\"', false)", (s,))
    # exhausted: the root (retry limit 2) failed twice
    for _ in range(2):
        s = claim_one(c, tasks["exhausted"], "root")
        c.execute("SELECT tasker_core.fail_step(%s, 'w', '\"again\"', true, 0)", (s,))
    # cancelled
    c.execute("SELECT tasker_core.cancel_task(%s)", (tasks["cancelled"],))
    # done: every step complete
    for name in ("root", "left", "right", "join"):
        s = claim_one(c, tasks["done"], name)
        c.execute("SELECT tasker_core.complete_step(%s, 'w', '{}')", (s,))
    # half: root and left complete, right held, join waits for right
    for name in ("root", "left"):
        s = claim_one(c, tasks["half"], name)
        c.execute("SELECT tasker_core.complete_step(%s, 'w', '{}')", (s,))
    claim_one(c, tasks["half"], "right", worker="w2")
    # error_ready: the root failed with no backoff left: in error, claimable again
    s = claim_one(c, tasks["error_ready"], "root")
    c.execute("SELECT tasker_core.fail_step(%s, 'w', '\"flaky\"', true, 0)", (s,))
    # scheduled for tomorrow
    tasks["scheduled"] = c.execute("SELECT tasker_core.create_task('explain', 'why', NULL, '{}', "
                                   "'{\"delay_seconds\": 86400}')").fetchone()[0]
    # a customer's one slot taken: its second task waits for it
    held, waiting = [c.execute("SELECT tasker_core.create_task('explain', 'keyed', NULL, %s::jsonb)",
                               (json.dumps({"customer": 7, "n": n}),)).fetchone()[0] for n in (1, 2)]
    claim_one(c, held, "only")
    tasks["key_held"], tasks["key_full"] = held, waiting
    return tasks


def test_ready_is_exactly_what_a_claim_takes(conn):
    tasks = build_every_case(conn)
    every = {}
    for t in tasks.values():
        every.update(reasons(conn, t))
    steps = {r[0] for r in conn.execute("SELECT workflow_step_id FROM tasker_core.step_state "
                                        "WHERE task_id = ANY(%s)", (list(tasks.values()),)).fetchall()}
    assert set(every) == steps                      # every step has at least one row
    ready = {s for s, rs in every.items() if [r[0] for r in rs] == ["ready"]}
    assert all("ready" not in [r[0] for r in rs] for s, rs in every.items() if s not in ready)
    # every code of the catalog that these cases can show, shown
    codes = {r[0] for rs in every.values() for r in rs}
    assert codes >= {"ready", "leased", "backoff", "not_retryable", "retries_exhausted", "task_cancelled",
                     "finished", "waiting_for_parent", "task_complete", "scheduled", "concurrency_limit"}, codes
    # what a claim would take, rolled back
    with conn.transaction(force_rollback=True):
        claimed = {r[0] for r in conn.execute(
            "SELECT workflow_step_id FROM tasker_core.claim_steps('probe', NULL, 1000, 60)").fetchall()}
    assert claimed == ready
    assert ready == {step_of(conn, tasks["fresh"], "root"), step_of(conn, tasks["error_ready"], "root")}
    # explain_step says the same for one step
    for step, rs in every.items():
        got = conn.execute("SELECT code, reason, related_step_id, at FROM tasker_core.explain_step(%s)",
                           (step,)).fetchall()
        assert got == rs


def test_reasons_name_who_what_and_until_when(conn):
    tasks = build_every_case(conn)
    r = reasons(conn, tasks["half"])
    right = step_of(conn, tasks["half"], "right")
    (code, reason, _, until), = r[right]
    lease = conn.execute("SELECT lease_expires_at FROM tasker_core.step_claims WHERE workflow_step_id = %s",
                         (right,)).fetchone()[0]
    assert code == "leased" and "worker w2" in reason and until == lease
    join = step_of(conn, tasks["half"], "join")
    assert r[join] == [("waiting_for_parent", f"parent {right} (right) is in_progress", right, None)]
    root = step_of(conn, tasks["backoff"], "root")
    (code, reason, _, until), = reasons(conn, tasks["backoff"])[root]
    assert code == "backoff" and reason.startswith("backoff until ")
    assert until is not None and until.timestamp() > conn.execute("SELECT extract(epoch FROM now())").fetchone()[0] + 200  # (retry_after is capped at 300 s)
    root = step_of(conn, tasks["exhausted"], "root")
    assert ("retries_exhausted", "retries exhausted (2 of 2)", None, None) in reasons(conn, tasks["exhausted"])[root]
    (code, reason, _, since), = reasons(conn, tasks["fresh"])[step_of(conn, tasks["fresh"], "root")]
    assert code == "ready" and reason.startswith("ready since ") and since is not None
    # a lease that ended: the next claim or tick() fails it
    with conn.transaction(force_rollback=True):
        conn.execute("UPDATE tasker_core.step_claims SET lease_expires_at = now() - interval '1 minute' "
                     "WHERE workflow_step_id = %s", (right,))
        (code, reason, _, _), = reasons(conn, tasks["half"])[right]
        assert code == "lease_expired" and "tick()" in reason


def test_bad_input_has_its_own_sqlstate(conn):
    for sql, state in [("SELECT * FROM tasker_core.explain_task(NULL)", "22004"),
                       ("SELECT * FROM tasker_core.explain_step(NULL)", "22004"),
                       ("SELECT * FROM tasker_core.explain_task(987654321)", "TK004"),
                       ("SELECT * FROM tasker_core.explain_step(987654321)", "TK004")]:
        with pytest.raises(psycopg.Error) as e:
            conn.execute(sql)
        assert e.value.sqlstate == state, sql
        conn.rollback()
    task = new_task(conn, 1)
    with conn.transaction(force_rollback=True):
        conn.execute("SELECT tasker_core.disable_tracking()")
        with pytest.raises(psycopg.Error) as e:
            conn.execute("SELECT * FROM tasker_core.explain_task(%s)", (task,))
        assert e.value.sqlstate == "TK011"


def test_readers_may_explain(conn):
    task = new_task(conn, 1)
    conn.execute("SELECT tasker_core.create_roles()")
    conn.commit()
    with conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL ROLE tasker_reader")
        assert conn.execute("SELECT code FROM tasker_core.explain_task(%s)", (task,)).fetchall()[0] == ("ready",)
    with conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL ROLE tasker_worker")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM tasker_core.explain_task(%s)", (task,))
