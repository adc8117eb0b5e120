"""W3C trace context: a traceparent given at task creation (or by the first worker that claims
a step of an untraced task) travels with every event and transition of the task, and workers
read it for their spans; bad values are refused."""
import json
import threading
import time

import psycopg
import pytest

from conftest import run_all

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
WORKER_TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
OTHER_TP = "00-11111111111111111111111111111111-2222222222222222-01"
BAD = [
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",        # no flags
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",     # zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",     # zero parent id
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",     # upper case
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",     # unknown version
    "",
    "x'); DROP TABLE tasker_tasks; --",
]
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


@pytest.mark.parametrize("bad", BAD)
def test_a_bad_traceparent_is_refused_and_creates_nothing(tdb, bad):
    with pytest.raises(psycopg.Error) as err:
        tdb.scalar("SELECT tasker_core.create_task('trace', 'traced', NULL, '{}', %s::jsonb)",
                   (json.dumps({"traceparent": bad}),))
    assert err.value.sqlstate == "22023"
    assert tdb.scalar("SELECT count(*) FROM tasker_tasks") == 0
    assert tdb.scalar("SELECT count(*) FROM tasker_core.task_traces") == 0


def test_a_worker_traceparent_joins_an_untraced_task_to_the_workers_trace(tdb):
    plain = tdb.scalar("SELECT tasker_core.create_task('trace', 'traced', NULL, '{}')")
    traced = tdb.scalar("SELECT tasker_core.create_task('trace', 'traced', NULL, '{}', %s::jsonb)",
                        (json.dumps({"traceparent": TP}),))
    claimed = tdb.execute("SELECT task_id, workflow_step_id FROM tasker_core.claim_steps('w', NULL, 10, 60, %s)",
                          (WORKER_TP,))
    assert sorted(t for t, _ in claimed) == sorted([plain, traced])
    # the untraced task joined the worker's trace; the traced one kept its own
    assert tdb.scalar("SELECT tasker_core.task_traceparent(%s)", (plain,)) == WORKER_TP
    assert tdb.scalar("SELECT tasker_core.task_traceparent(%s)", (traced,)) == TP
    # from the claim on: its in_progress transition and step.started event carry the trace
    started = tdb.execute("""SELECT tr.metadata ->> 'traceparent' FROM tasker_workflow_step_transitions tr
                             JOIN tasker_workflow_steps ws USING (workflow_step_id)
                             WHERE ws.task_id = %s AND tr.to_state = 'in_progress'""", (plain,))
    assert started == [(WORKER_TP,)]
    assert tdb.execute("SELECT metadata ->> 'traceparent' FROM tasker_task_transitions WHERE task_id = %s",
                       (plain,)) == [(WORKER_TP,)]
    # the events written when the task was created, before any claim, stay as they were
    events = tdb.execute("SELECT name, payload ->> 'traceparent' FROM tasker_core.events WHERE task_id = %s "
                         "ORDER BY id", (plain,))
    assert events == [("task.initialize_requested", None), ("observability.task.enqueue", None),
                      ("step.execution_requested", WORKER_TP), ("task.start_requested", WORKER_TP)]
    # a later worker with another trace does not move the task out of the first one
    for _, step in claimed:
        tdb.scalar("SELECT tasker_core.complete_step(%s, 'w', '{}')", (step,))
    second = tdb.execute("SELECT task_id, workflow_step_id FROM tasker_core.claim_steps('w2', NULL, 10, 60, %s)",
                         (OTHER_TP,))
    assert sorted(t for t, _ in second) == sorted([plain, traced])
    for _, step in second:
        tdb.scalar("SELECT tasker_core.complete_step(%s, 'w2', '{}')", (step,))
    assert tdb.scalar("SELECT tasker_core.task_traceparent(%s)", (plain,)) == WORKER_TP
    late = tdb.execute("""SELECT DISTINCT payload ->> 'traceparent' FROM tasker_core.events
                          WHERE task_id = %s AND name IN ('step.completed', 'task.completed')""", (plain,))
    assert late == [(WORKER_TP,)]


@pytest.mark.parametrize("bad", BAD)
def test_a_bad_worker_traceparent_is_refused_and_claims_nothing(tdb, bad):
    tdb.scalar("SELECT tasker_core.create_task('trace', 'traced', NULL, '{}')")
    with pytest.raises(psycopg.Error) as err:
        tdb.execute("SELECT * FROM tasker_core.claim_steps('w', NULL, 10, 60, %s)", (bad,))
    assert err.value.sqlstate == "22023"
    assert tdb.scalar("SELECT count(*) FROM tasker_core.step_claims") == 0
    assert tdb.scalar("SELECT count(*) FROM tasker_core.task_traces") == 0
    # a NULL traceparent is no traceparent
    assert len(tdb.execute("SELECT * FROM tasker_core.claim_steps('w', NULL, 10, 60, NULL)")) == 1
    assert tdb.scalar("SELECT count(*) FROM tasker_core.task_traces") == 0


def test_a_claim_statement_reads_the_trace_of_a_task_committed_after_it_began(tdb):
    # The clients read the trace in the claim's statement. The claim reads fresh snapshots, so
    # it can claim a task committed after the statement's own snapshot was taken: the trace must
    # come from a fresh snapshot too (seen once as a flaky end-to-end run).
    with tdb.connect() as creator, tdb.connect() as claimer:
        creator.execute("SELECT pg_advisory_lock(4242)")
        result = {}

        def claim():
            result["rows"] = claimer.execute(
                """WITH gate AS MATERIALIZED (SELECT 'w'::text AS w, pg_advisory_lock(4242))
                   SELECT c.task_id, tasker_core.task_traceparent(c.task_id)
                   FROM gate, LATERAL tasker_core.claim_steps(gate.w, NULL, 10, 60) c""").fetchall()

        t = threading.Thread(target=claim)
        t.start()   # its statement has begun (snapshot taken) and waits at the gate
        time.sleep(0.5)
        task = creator.execute("SELECT tasker_core.create_task('trace', 'traced', NULL, '{}', %s::jsonb)",
                               (json.dumps({"traceparent": TP}),)).fetchone()[0]
        creator.execute("SELECT pg_advisory_unlock(4242)")
        t.join(10)
        assert result["rows"] == [(task, TP)]
