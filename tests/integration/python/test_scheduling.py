"""Priorities and scheduled starts (create_task options priority, run_at, delay_seconds)."""
import datetime as dt
import json

import psycopg
import pytest

TEMPLATE = {"name": "job", "namespace_name": "sched", "version": "1.0.0",
            "step_templates": [{"name": "first", "handler_class": "F"},
                               {"name": "then", "handler_class": "T", "depends_on_step": "first"}]}
OTHER = dict(TEMPLATE, namespace_name="other")


@pytest.fixture
def conn(tasker_db):
    with tasker_db.connect() as c:
        c.execute("SELECT tasker_core.enable_tracking()")
        for t in (TEMPLATE, OTHER):
            c.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (json.dumps(t),))
        c.db = tasker_db
        yield c


def create(c, options=None, namespace="sched", i=0):
    return c.execute("SELECT tasker_core.create_task(%s, 'job', NULL, %s::jsonb, %s::jsonb)",
                     (namespace, json.dumps({"i": i}), json.dumps(options or {}))).fetchone()[0]


def claim(c, n=1, namespaces=None):
    return [r[0] for r in c.execute("SELECT task_id FROM tasker_core.claim_steps('w', %s, %s, 60)",
                                    (namespaces, n)).fetchall()]


def now(c):
    return c.execute("SELECT tasker_core.now()").fetchone()[0]


def test_higher_priority_first_then_oldest(conn):
    plain1 = create(conn, i=1)
    high1 = create(conn, {"priority": 5}, i=2)
    low = create(conn, {"priority": -5}, i=3)
    high2 = create(conn, {"priority": 5}, i=4)
    plain2 = create(conn, {"priority": 0}, i=5)
    top = create(conn, {"priority": 1000}, namespace="other", i=6)
    # one root at a time, in the sched namespace only: the other namespace's top priority is
    # not this queue's
    order = [claim(conn, 1, ["sched"])[0] for _ in range(5)]
    assert order == [high1, high2, plain1, plain2, low]
    assert claim(conn, 5) == [top]
    assert conn.execute("SELECT * FROM tasker_core.check_tracking()").fetchall() == []


def test_priority_across_namespaces_and_batches(conn):
    a = create(conn, {"priority": 1}, i=1)
    b = create(conn, {"priority": 3}, namespace="other", i=2)
    c = create(conn, {"priority": 2}, i=3)
    assert set(claim(conn, 2)) == {b, c}     # a batch takes the highest of all queues first
    assert claim(conn, 2) == [a]


def test_a_scheduled_task_starts_when_due(conn):
    start = now(conn) + dt.timedelta(hours=1)
    task = create(conn, {"run_at": start.isoformat()})
    plain = create(conn, i=1)
    assert claim(conn, 10) == [plain]
    # (done, so that its lease cannot expire when the clock jumps)
    conn.execute("SELECT tasker_core.complete_step(workflow_step_id, 'w', '{}') FROM tasker_core.step_claims")
    codes = conn.execute("SELECT code, at FROM tasker_core.explain_task(%s) ORDER BY workflow_step_id",
                         (task,)).fetchall()
    assert codes == [("scheduled", start), ("waiting_for_parent", None)]
    # an hour later (the test clock): the next claim promotes the due root and takes it
    conn.execute("SELECT set_config('tasker_core.fake_now', %s, false)",
                 ((start + dt.timedelta(seconds=1)).isoformat(),))
    assert conn.execute("SELECT code FROM tasker_core.explain_task(%s) ORDER BY workflow_step_id",
                        (task,)).fetchall() == [("ready",), ("waiting_for_parent",)]
    assert set(claim(conn, 10)) == {task, plain}     # the scheduled root, and plain's second step
    assert conn.execute("SELECT not_before FROM tasker_core.step_state WHERE task_id = %s",
                        (task,)).fetchall() == [(None,), (None,)]
    assert conn.execute("SELECT * FROM tasker_core.check_tracking()").fetchall() == []


def test_tick_promotes_due_tasks_and_wakes_workers(conn):
    task = create(conn, {"delay_seconds": 3600})
    not_before = conn.execute("SELECT not_before FROM tasker_core.step_state WHERE task_id = %s "
                              "AND not_before IS NOT NULL", (task,)).fetchone()[0]
    expected = now(conn).astimezone(dt.timezone.utc).replace(tzinfo=None) + dt.timedelta(seconds=3600)
    assert abs((not_before - expected).total_seconds()) < 5
    with psycopg.connect(conn.info.dsn, autocommit=True) as listener:
        listener.execute("LISTEN tasker_ready")
        assert conn.execute("SELECT tasker_core.tick()").fetchone()[0] == 0       # not due yet
        conn.execute("SELECT set_config('tasker_core.fake_now', %s, false)",
                     ((now(conn) + dt.timedelta(seconds=3601)).isoformat(),))
        assert conn.execute("SELECT tasker_core.tick()").fetchone()[0] == 1
        notes = list(listener.notifies(timeout=5, stop_after=1))
        assert notes and json.loads(notes[0].payload)["reason"] == "tick"
    assert conn.execute("SELECT count(*) FROM tasker_core.step_state WHERE not_before IS NOT NULL").fetchone()[0] == 0
    assert claim(conn) == [task]


def test_a_start_in_the_past_is_at_once(conn):
    task = create(conn, {"run_at": "2001-01-01 00:00:00+00"})
    assert conn.execute("SELECT count(*) FROM tasker_core.step_state WHERE task_id = %s AND not_before IS NOT NULL",
                        (task,)).fetchone()[0] == 0
    assert claim(conn) == [task]


def test_idempotency_keys_work_with_scheduled_tasks(conn):
    opts = {"idempotency_key": "nightly-2026-11-30", "run_at": "2099-01-01T03:00:00Z", "priority": 2}
    first = create(conn, opts)
    again = create(conn, dict(opts, priority=9, run_at="2099-06-01T00:00:00Z"))
    assert again == first
    assert conn.execute("SELECT priority, run_at FROM tasker_core.task_options").fetchall() == [
        (2, dt.datetime(2099, 1, 1, 3, 0))]


def test_rebuild_keeps_priorities_and_schedules(conn):
    create(conn, {"priority": 7, "run_at": "2099-01-01T00:00:00Z"})
    create(conn, {"priority": -3}, i=1)
    before = conn.execute("SELECT workflow_step_id, priority, not_before FROM tasker_core.step_state ORDER BY 1").fetchall()
    conn.execute("SELECT tasker_core.rebuild_tracking()")
    assert conn.execute("SELECT workflow_step_id, priority, not_before FROM tasker_core.step_state "
                        "ORDER BY 1").fetchall() == before
    assert conn.execute("SELECT * FROM tasker_core.check_tracking()").fetchall() == []


@pytest.mark.parametrize("options, state", [
    ({"priority": 1001}, "22023"),
    ({"priority": "high"}, "22023"),
    ({"priority": 1.5}, "22023"),
    ({"delay_seconds": -1}, "22023"),
    ({"delay_seconds": "soon"}, "22023"),
    ({"run_at": "2099-01-01", "delay_seconds": 5}, "22023"),
    ({"run_at": "not a time"}, "22007"),
    ({"run_at": ""}, "22023"),
])
def test_bad_options_have_their_own_sqlstate_and_change_nothing(conn, options, state):
    before = conn.execute("SELECT (SELECT count(*) FROM tasker_tasks), (SELECT count(*) FROM tasker_core.task_options), "
                          "(SELECT count(*) FROM tasker_core.step_state)").fetchone()
    with pytest.raises(psycopg.Error) as e:
        create(conn, options)
    assert e.value.sqlstate == state
    assert conn.execute("SELECT (SELECT count(*) FROM tasker_tasks), (SELECT count(*) FROM tasker_core.task_options), "
                        "(SELECT count(*) FROM tasker_core.step_state)").fetchone() == before


# The recurring-task recipe of the README: pg_cron runs this command on its schedule; the
# idempotency key is the tick's time truncated to the schedule's unit, so a tick that fires
# twice (a retry, two schedulers) creates one task.
RECIPE = """SELECT tasker_core.create_task('sched', 'job', NULL, '{}',
      jsonb_build_object('idempotency_key',
                         'sched.job@' || to_char(date_trunc('minute', now() AT TIME ZONE 'UTC'),
                                                 'YYYY-MM-DD"T"HH24:MI')))"""


def test_the_recurring_recipe_creates_one_task_per_tick(conn):
    # (the test clock instead of now(): two runs of one tick, then the next minute's)
    recipe = RECIPE.replace("now()", "tasker_core.now()")
    conn.execute("SELECT set_config('tasker_core.fake_now', '2026-11-30 03:00:00+00', false)")
    first = conn.execute(recipe).fetchone()[0]
    conn.execute("SELECT set_config('tasker_core.fake_now', '2026-11-30 03:00:40+00', false)")
    assert conn.execute(recipe).fetchone()[0] == first
    conn.execute("SELECT set_config('tasker_core.fake_now', '2026-11-30 03:01:00+00', false)")
    assert conn.execute(recipe).fetchone()[0] != first
    assert conn.execute("SELECT count(*) FROM tasker_tasks").fetchone()[0] == 2
