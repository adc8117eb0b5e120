"""W3C trace context: a traceparent given at task creation travels with every event and
transition of the task, and workers read it for their spans; bad values are refused."""
import json

import psycopg
import pytest

from conftest import run_all

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TEMPLATE = {"name": "traced", "namespace_name": "trace", "version": "1.0.0",
            "step_templates": [{"name": "a", "handler_class": "A"},
                               {"name": "b", "handler_class": "B", "depends_on_step": "a"}]}


@pytest.fixture
def tdb(tasker_db):
    tasker_db.scalar("SELECT tasker_core.enable_tracking()")
    tasker_db.scalar("SELECT tasker_core.register_task_template(%s::jsonb)", (json.dumps(TEMPLATE),))
    return tasker_db


def test_the_traceparent_travels_with_events_and_transitions(tdb):
    traced = tdb.scalar("SELECT tasker_core.create_task('trace', 'traced', NULL, '{}', %s::jsonb)",
                        (json.dumps({"traceparent": TP}),))
    plain = tdb.scalar("SELECT tasker_core.create_task('trace', 'traced', NULL, '{}')")
    claimed = tdb.execute("SELECT task_id, tasker_core.task_traceparent(task_id), workflow_step_id "
                          "FROM tasker_core.claim_steps('w', NULL, 10)")
    assert sorted((t, tp) for t, tp, _ in claimed) == sorted([(traced, TP), (plain, None)])
    for _, _, step in claimed:
        tdb.scalar("SELECT tasker_core.complete_step(%s, 'w', '{}')", (step,))
    run_all(tdb)
    assert tdb.scalar("SELECT count(*) FROM tasker_tasks WHERE complete") == 2
    events = tdb.execute("SELECT task_id, payload ->> 'traceparent' FROM tasker_core.events")
    assert {tp for t, tp in events if t == traced} == {TP}
    assert {tp for t, tp in events if t == plain} == {None}
    assert len([1 for t, _ in events if t == traced]) >= 8
    step_meta = tdb.execute("""SELECT ws.task_id, tr.metadata ->> 'traceparent' FROM tasker_workflow_step_transitions tr
                               JOIN tasker_workflow_steps ws USING (workflow_step_id)""")
    task_meta = tdb.execute("SELECT task_id, metadata ->> 'traceparent' FROM tasker_task_transitions")
    for rows in (step_meta, task_meta):
        assert {tp for t, tp in rows if t == traced} == {TP}
        assert {tp for t, tp in rows if t == plain} == {None}


@pytest.mark.parametrize("bad", [
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",        # no flags
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",     # zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",     # zero parent id
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",     # upper case
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",     # unknown version
    "x'); DROP TABLE tasker_tasks; --",
])
def test_a_bad_traceparent_is_refused_and_creates_nothing(tdb, bad):
    with pytest.raises(psycopg.Error) as err:
        tdb.scalar("SELECT tasker_core.create_task('trace', 'traced', NULL, '{}', %s::jsonb)",
                   (json.dumps({"traceparent": bad}),))
    assert err.value.sqlstate == "22023"
    assert tdb.scalar("SELECT count(*) FROM tasker_tasks") == 0
    assert tdb.scalar("SELECT count(*) FROM tasker_core.task_traces") == 0
