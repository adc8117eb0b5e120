"""Retention: CALL tasker_core.archive_tasks(finished_before, max_tasks [, batch_size]) deletes
finished tasks with everything of theirs, in committed batches, while workers work."""
import json
import threading

import psycopg
import pytest

TEMPLATE = {"name": "short", "namespace_name": "keep", "version": "1.0.0",
            "step_templates": [{"name": "a", "handler_class": "A"},
                               {"name": "b", "handler_class": "B", "depends_on_step": "a"}]}

COUNTS = """SELECT (SELECT count(*) FROM tasker_tasks), (SELECT count(*) FROM tasker_workflow_steps),
                   (SELECT count(*) FROM tasker_workflow_step_edges), (SELECT count(*) FROM tasker_workflow_step_transitions),
                   (SELECT count(*) FROM tasker_task_transitions), (SELECT count(*) FROM tasker_core.step_state),
                   (SELECT count(*) FROM tasker_core.task_options), (SELECT count(*) FROM tasker_core.step_claims)"""


@pytest.fixture
def conn(tasker_db):
    with tasker_db.connect() as c:
        c.execute("SELECT tasker_core.enable_tracking()")
        c.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (json.dumps(TEMPLATE),))
        c.db = tasker_db
        yield c


def create(c, n, options=None):
    return [c.execute("SELECT tasker_core.create_task('keep', 'short', NULL, %s::jsonb, %s::jsonb)",
                      (json.dumps({"i": i}), json.dumps(options or {}))).fetchone()[0] for i in range(n)]


def run_all(c, worker="w"):
    while True:
        rows = c.execute("SELECT workflow_step_id FROM tasker_core.claim_steps(%s, NULL, 100, 60)", (worker,)).fetchall()
        if not rows:
            return
        for (s,) in rows:
            c.execute("SELECT tasker_core.complete_step(%s, %s, '{}')", (s, worker))


def archive(c, finished_before="0", max_tasks=1000, batch_size=100):
    return c.execute("CALL tasker_core.archive_tasks(%s::interval, %s, %s)",
                     (finished_before, max_tasks, batch_size)).fetchone()[0]


def test_finished_tasks_leave_with_everything_of_theirs(conn):
    done = create(conn, 5, {"priority": 3, "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"})
    run_all(conn)
    cancelled = create(conn, 2)
    for t in cancelled:
        conn.execute("SELECT tasker_core.cancel_task(%s)", (t,))
    running = create(conn, 3)
    (held,) = conn.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w', NULL, 1, 60)").fetchone()
    # nobody subscribed: the archived tasks' events go with them
    assert archive(conn, max_tasks=100, batch_size=2) == 7
    left = {r[0] for r in conn.execute("SELECT task_id FROM tasker_tasks").fetchall()}
    assert left == set(running)
    assert conn.execute(COUNTS).fetchone() == (3, 6, 3, 1, 1, 6, 0, 1)
    assert conn.execute("SELECT count(*) FROM tasker_core.events WHERE task_id = ANY(%s)",
                        (done + cancelled,)).fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM tasker_core.task_traces").fetchone()[0] == 0
    assert conn.execute("SELECT * FROM tasker_core.check_tracking()").fetchall() == []
    assert conn.execute("SELECT * FROM tasker_core.verify()").fetchall() == []
    # the workload goes on
    conn.execute("SELECT tasker_core.complete_step(%s, 'w', '{}')", (held,))
    run_all(conn)
    assert archive(conn) == 3
    assert conn.execute(COUNTS).fetchone() == (0,) * 8


def test_recent_tasks_max_tasks_and_unacknowledged_events_stay(conn):
    tasks = create(conn, 6)
    conn.execute("SELECT tasker_core.subscribe('audit', ARRAY['task.*'])")   # at the start: acknowledges nothing
    run_all(conn)
    assert archive(conn, finished_before="1 hour") == 0                     # finished just now
    assert archive(conn, max_tasks=4, batch_size=3) == 4                      # 3 + 1
    assert conn.execute("SELECT count(*) FROM tasker_tasks").fetchone()[0] == 2
    # their events wait for the subscription, as prune_events would let them
    assert conn.execute("SELECT count(*) FROM tasker_core.events WHERE task_id = ANY(%s) AND name LIKE 'task.%%'",
                        (tasks[:4],)).fetchone()[0] > 0


@pytest.mark.parametrize("args, state", [
    (("0", None, 10), "22004"),
    ((None, 10, 10), "22004"),
    (("-1 day", 10, 10), "22023"),
    (("0", 0, 10), "22023"),
    (("0", 10, 0), "22023"),
    (("0", 10, 10001), "22023"),
])
def test_bad_input_has_its_own_sqlstate_and_changes_nothing(conn, args, state):
    create(conn, 2)
    run_all(conn)
    before = conn.execute(COUNTS).fetchone()
    with pytest.raises(psycopg.Error) as e:
        conn.execute("CALL tasker_core.archive_tasks(%s::interval, %s, %s)", args)
    assert e.value.sqlstate == state
    assert conn.execute(COUNTS).fetchone() == before


def test_inside_a_transaction_block_it_refuses_and_changes_nothing(conn):
    create(conn, 2)
    run_all(conn)
    before = conn.execute(COUNTS).fetchone()
    with pytest.raises(psycopg.Error) as e:
        with conn.transaction():
            conn.execute("CALL tasker_core.archive_tasks('0', 10)")
    assert e.value.sqlstate == "2D000"      # invalid transaction termination: it commits per batch
    assert conn.execute(COUNTS).fetchone() == before


def test_archiving_while_workers_work_touches_nothing_in_flight(conn):
    """Four workers run 300 tasks (some cancelled on the way) while archive_tasks runs in a
    loop: no worker call fails, no unfinished task loses a row, and at the end every task is
    gone and the maintained state is exact."""
    tasks = create(conn, 300)
    errors, lost, stop = [], [], threading.Event()

    def worker(name):
        try:
            with psycopg.connect(conn.info.dsn, autocommit=True) as c:
                while not stop.is_set():
                    rows = c.execute("SELECT workflow_step_id, task_id FROM tasker_core.claim_steps(%s, NULL, 5, 60)",
                                     (name,)).fetchall()
                    for s, t in rows:
                        try:
                            c.execute("SELECT tasker_core.complete_step(%s, %s, '{}')", (s, name))
                        except psycopg.Error as e:
                            if e.sqlstate != "TK030":
                                raise
                            lost.append(t)     # cancelled under the worker: its lease went with it
        except Exception as e:          # noqa: BLE001 - reported below
            errors.append(repr(e))

    def canceller():
        try:
            with psycopg.connect(conn.info.dsn, autocommit=True) as c:
                for t in tasks[::10]:
                    try:
                        c.execute("SELECT tasker_core.cancel_task(%s)", (t,))
                    except psycopg.Error as e:
                        # finished and archived before the canceller came to it
                        if e.sqlstate != "TK004":
                            raise
        except Exception as e:          # noqa: BLE001
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    threads.append(threading.Thread(target=canceller))
    for t in threads:
        t.start()
    archived = 0
    with psycopg.connect(conn.info.dsn, autocommit=True) as a:
        for _ in range(400):
            archived += archive(a, max_tasks=50, batch_size=10)
            # every task still there is whole: two steps, one edge, a maintained row per step
            broken = a.execute("""SELECT t.task_id FROM tasker_tasks t
                                  LEFT JOIN tasker_workflow_steps ws ON ws.task_id = t.task_id
                                  LEFT JOIN tasker_core.step_state s ON s.workflow_step_id = ws.workflow_step_id
                                  GROUP BY t.task_id HAVING count(ws.*) <> 2 OR count(s.*) <> 2""").fetchall()
            assert broken == []
            if archived == len(tasks):
                break
        stop.set()
        for t in threads:
            t.join()
        archived += archive(a)
    assert errors == []
    assert set(lost) <= set(tasks[::10])          # only cancelled tasks lost a lease
    assert archived == len(tasks)
    assert conn.execute(COUNTS).fetchone() == (0,) * 8
    assert conn.execute("SELECT * FROM tasker_core.check_tracking()").fetchall() == []


def test_admins_may_archive_and_workers_may_not(conn):
    create(conn, 1)
    run_all(conn)
    conn.execute("SELECT tasker_core.create_roles()")
    with conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL ROLE tasker_worker")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("CALL tasker_core.archive_tasks('0', 10)")
    conn.execute("SET ROLE tasker_admin")
    try:
        assert archive(conn) == 1
    finally:
        conn.execute("RESET ROLE")
