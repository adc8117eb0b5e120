"""Hostile and bad input through the SQL surface: NULLs, empty and huge arrays, unknown ids,
wrong JSON types, templates at and past the step limit, cycles — each a clear error with its
own SQLSTATE that changes nothing — and DROP EXTENSION while workers run (clear errors, no
backend crash)."""
import json
import threading
import time

import psycopg
import pytest

TEMPLATE = {"name": "h", "namespace_name": "hostile", "version": "1.0.0",
            "step_templates": [{"name": "a", "handler_class": "A"},
                               {"name": "b", "handler_class": "B", "depends_on_step": "a"}]}


@pytest.fixture
def hdb(tasker_db):
    tasker_db.scalar("SELECT tasker_core.enable_tracking()")
    tasker_db.scalar("SELECT tasker_core.register_task_template(%s::jsonb)", (json.dumps(TEMPLATE),))
    tasker_db.scalar("SELECT tasker_core.create_task('hostile', 'h', NULL, '{}')")
    return tasker_db


def snapshot(conn):
    """Everything a bad call could have touched."""
    tables = ["tasker_tasks", "tasker_workflow_steps", "tasker_workflow_step_transitions",
              "tasker_task_transitions", "tasker_named_tasks", "tasker_named_steps",
              "tasker_core.step_state", "tasker_core.step_claims", "tasker_core.events", "tasker_core.subscriptions"]
    return {t: conn.execute(f"SELECT md5(COALESCE(string_agg(x::text, ',' ORDER BY x::text), '')) FROM {t} x")
            .fetchone()[0] for t in tables}


BAD_CALLS = [
    # NULLs where a value is required
    ("SELECT * FROM tasker_core.claim_steps(NULL)", "22004"),
    ("SELECT tasker_core.complete_step(NULL, 'w')", "22004"),
    ("SELECT tasker_core.complete_step(1, NULL)", "22004"),
    ("SELECT tasker_core.fail_step(1, NULL, '{}')", "22004"),
    ("SELECT tasker_core.heartbeat(NULL, 'w')", "22004"),
    ("SELECT tasker_core.create_task(NULL, 'h', NULL, '{}')", "22004"),
    ("SELECT tasker_core.create_task('hostile', 'h', NULL, NULL)", "22004"),
    ("SELECT tasker_core.register_task_template(NULL)", "22004"),
    ("SELECT tasker_core.cancel_task(NULL)", "22004"),
    ("SELECT tasker_core.backoff_seconds(NULL)", "22004"),
    ("SELECT tasker_core.transition_step(NULL, 'complete')", "22004"),
    # out-of-range sizes and limits
    ("SELECT * FROM tasker_core.claim_steps('w', NULL, 0)", "22023"),
    ("SELECT * FROM tasker_core.claim_steps('w', NULL, 100000000)", "22023"),
    ("SELECT * FROM tasker_core.claim_steps('w', NULL, 1, 0)", "22023"),
    ("SELECT * FROM tasker_core.claim_steps('w', NULL, 1, -5)", "22023"),
    ("SELECT * FROM tasker_core.events_after(NULL, 0)", "22023"),
    ("SELECT * FROM tasker_core.events_after('not-a-cursor')", "22P02"),
    # unknown ids and other workers' steps
    ("SELECT tasker_core.complete_step(999999, 'w')", "TK030"),
    ("SELECT tasker_core.complete_step(1, 'w')", "TK030"),
    ("SELECT tasker_core.cancel_task(999999)", "TK004"),
    ("SELECT tasker_core.retry_task(-1)", "TK004"),
    ("SELECT tasker_core.task_graph_dot(999999)", "TK004"),
    ("SELECT tasker_core.transition_step(999999, 'complete')", "TK004"),
    ("SELECT tasker_core.transition_step(1, 'no_such_state')", "TK001"),
    ("SELECT tasker_core.transition_step(1, 'complete')", "TK002"),
    ("SELECT tasker_core.resolve_step_manually(999999)", "TK004"),
    ("SELECT tasker_core.create_task('hostile', 'nope', NULL, '{}')", "TK007"),
    ("SELECT tasker_core.create_task('hostile', 'h', '9.9.9', '{}')", "TK007"),
    ("SELECT * FROM tasker_core.poll('never-subscribed')", "TK004"),
    # wrong JSON types
    ("SELECT tasker_core.create_task('hostile', 'h', NULL, '[]')", "22023"),
    ("SELECT tasker_core.create_task('hostile', 'h', NULL, '\"text\"')", "22023"),
    ("SELECT tasker_core.create_task('hostile', 'h', NULL, '{}', '[1]')", "22023"),
    ("SELECT tasker_core.register_task_template('[]')", "TK020"),
    ("SELECT tasker_core.register_task_template('\"template\"')", "TK020"),
    ("SELECT tasker_core.register_task_template('{\"name\": 5}')", "TK020"),
    ("SELECT tasker_core.transition_step(1, 'in_progress', '[1, 2]')", "22023"),
    # cycles
    ("""SELECT tasker_core.register_task_template('{"name": "c", "namespace_name": "hostile", "step_templates": [
          {"name": "x", "handler_class": "X", "depends_on_step": "y"},
          {"name": "y", "handler_class": "Y", "depends_on_step": "x"}]}')""", "TK006"),
    ("""SELECT tasker_core.register_task_template('{"name": "c", "namespace_name": "hostile", "step_templates": [
          {"name": "x", "handler_class": "X", "depends_on_step": "x"}]}')""", "TK006"),
]


@pytest.mark.parametrize("sql,state", BAD_CALLS, ids=[f"{i}:{s}" for i, (_, s) in enumerate(BAD_CALLS)])
def test_bad_input_has_its_own_sqlstate_and_changes_nothing(hdb, sql, state):
    with hdb.connect() as conn:
        before = snapshot(conn)
        with pytest.raises(psycopg.Error) as err:
            conn.execute(sql)
        assert err.value.sqlstate == state, (sql, err.value.sqlstate, str(err.value))
        assert snapshot(conn) == before, sql


def test_empty_and_huge_arrays(hdb):
    with hdb.connect() as conn:
        assert conn.execute("SELECT count(*) FROM tasker_core.get_step_readiness_status_batch('{}')").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM tasker_core.get_task_execution_contexts_batch('{}')").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM tasker_core.claim_steps('w', '{}')").fetchone()[0] == 0
        huge = conn.execute("""SELECT count(*) FROM tasker_core.get_step_readiness_status_batch(
                                   ARRAY(SELECT generate_series(1, 200000)::bigint))""").fetchone()[0]
        assert huge == 2
        assert conn.execute("""SELECT count(*) FROM tasker_core.get_step_readiness_status(1,
                                   ARRAY(SELECT generate_series(1, 200000)::bigint))""").fetchone()[0] == 2
        assert conn.execute("SELECT count(*) FROM tasker_core.claim_steps('w', "
                            "ARRAY(SELECT 'ns' || g FROM generate_series(1, 50000) g))").fetchone()[0] == 0


def test_templates_at_and_past_the_step_limit(hdb):
    def chain(n):
        return json.dumps({"name": f"big{n}", "namespace_name": "hostile", "version": "1.0.0",
                           "step_templates": [{"name": f"s{i}", "handler_class": "S",
                                               **({"depends_on_step": f"s{i - 1}"} if i else {})}
                                              for i in range(n)]})

    with hdb.connect() as conn:
        assert conn.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (chain(10_000),)).fetchone()[0]
        task = conn.execute("SELECT tasker_core.create_task('hostile', 'big10000', NULL, '{}')").fetchone()[0]
        assert conn.execute("SELECT count(*) FROM tasker_workflow_steps WHERE task_id = %s", (task,)).fetchone()[0] == 10_000
        levels = conn.execute("SELECT max(dependency_level) FROM tasker_core.calculate_dependency_levels(%s)",
                              (task,)).fetchone()[0]
        assert levels == 9_999
        before = snapshot(conn)
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (chain(10_001),))
        assert err.value.sqlstate == "54000"
        conn.execute("SET tasker_core.max_template_steps = 5")
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (chain(6),))
        assert err.value.sqlstate == "54000" and "5" in str(err.value)
        assert snapshot(conn) == before


def test_drop_extension_while_workers_run(hdb):
    """Workers see clear errors once the extension is gone; no backend crashes (a crash would
    restart every backend and break the idle canary connection)."""
    hdb.execute("SELECT tasker_core.create_task('hostile', 'h', NULL, jsonb_build_object('i', i)) "
                "FROM generate_series(1, 300) i")
    canary = hdb.connect()
    stop = threading.Event()
    errors, done = [], [0]

    def worker(name):
        with hdb.connect() as conn:
            while not stop.is_set():
                try:
                    rows = conn.execute("SELECT workflow_step_id FROM tasker_core.claim_steps(%s, NULL, 2, 30)",
                                        (name,)).fetchall()
                    for (step,) in rows:
                        conn.execute("SELECT tasker_core.complete_step(%s, %s)", (step, name))
                        done[0] += 1
                except psycopg.Error as e:
                    errors.append(e.sqlstate)
                    time.sleep(0.01)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    with hdb.connect() as admin:
        # both take exclusive locks on objects the workers hold: PostgreSQL may pick them as a
        # deadlock victim, and an operator would simply run them again
        for attempt in range(10):
            try:
                admin.execute("SELECT tasker_core.disable_tracking()")
                admin.execute("DROP EXTENSION tasker_core CASCADE")
                break
            except psycopg.errors.DeadlockDetected:
                assert attempt < 9, "DROP EXTENSION lost every deadlock"
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert done[0] > 0
    assert errors, "workers must notice the extension is gone"
    # function or schema gone, a plan invalidated mid-call, or a deadlock with the DROP:
    # each a clean error, never XX000 or a lost connection
    assert set(errors) <= {"42883", "3F000", "42P01", "TK011", "TK010", "40P01", "0A000"}, set(errors)
    assert canary.execute("SELECT 1").fetchone()[0] == 1
    canary.close()


def test_oversized_payloads_are_refused_with_54000(hdb):
    with hdb.connect() as conn:
        step = conn.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w')").fetchone()[0]
        conn.execute("SET tasker_core.max_payload_bytes = 2048")
        before = snapshot(conn)
        big = json.dumps({"blob": "x" * 4096})
        for sql, args in [
            ("SELECT tasker_core.complete_step(%s, 'w', %s::jsonb)", (step, big)),
            ("SELECT tasker_core.fail_step(%s, 'w', %s::jsonb)", (step, big)),
            ("SELECT tasker_core.resolve_step_manually(%s, %s::jsonb)", (step, big)),
            ("SELECT tasker_core.create_task('hostile', 'h', NULL, %s::jsonb)", (big,)),
            ("SELECT tasker_core.transition_task(1, 'pending', %s::jsonb)", (big,)),
        ]:
            with pytest.raises(psycopg.Error) as err:
                conn.execute(sql, args)
            assert err.value.sqlstate == "54000" and "2048" in str(err.value), (sql, str(err.value))
        assert snapshot(conn) == before
        # under the limit it goes through
        assert conn.execute("SELECT tasker_core.complete_step(%s, 'w', %s::jsonb)",
                            (step, json.dumps({"blob": "x" * 100}))).fetchone()[0]

