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
        # deadlock victim, and an operator would simply run them again. A longer
        # deadlock_timeout than the workers' lets a worker's check find a cycle first, so the
        # worker is the victim (an operator's usual way to win against a busy workload).
        admin.execute("SET deadlock_timeout = '5s'")
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



# --- issue 11 item 1: JSON nested past serde's 128 levels ---------------------------------
# The limit is 100 levels (a scalar is depth 0, [] and {} depth 1, [[1]] depth 2); deeper
# arguments are refused with TK026 and change nothing. Stored data of any depth (Rails writes
# it directly) never makes a claim fail.

def nested(depth):
    """A JSON array text exactly `depth` levels deep."""
    return "[" * depth + "1" + "]" * depth


def nested_object(depth):
    """A JSON object text exactly `depth` levels deep ({"a": [[...]]})."""
    return '{"a": ' + nested(depth - 1) + "}"


def deep_template(depth):
    """The module's template with handler_config nesting it to exactly `depth` levels
    (template object, step_templates array, step object, then the config)."""
    t = json.dumps({**TEMPLATE, "name": f"deep{depth}"})
    return t.replace('"handler_class": "A"', '"handler_class": "A", "handler_config": ' + nested_object(depth - 3), 1)


# (what, SQL, builder of the argument at a given depth)
DEEP_CALLS = [
    ("results", "SELECT tasker_core.complete_step(%(step)s, 'w', %(arg)s::jsonb)", nested),
    ("results_object", "SELECT tasker_core.complete_step(%(step)s, 'w', %(arg)s::jsonb)", nested_object),
    ("resolve_results", "SELECT tasker_core.resolve_step_manually(%(step)s, %(arg)s::jsonb)", nested),
    ("error", "SELECT tasker_core.fail_step(%(step)s, 'w', %(arg)s::jsonb)", nested),
    ("context", "SELECT tasker_core.create_task('hostile', 'h', NULL, %(arg)s::jsonb)", nested_object),
    ("options", "SELECT tasker_core.create_task('hostile', 'h', NULL, '{}', %(arg)s::jsonb)",
     lambda d: '{"tags": ' + nested(d - 1) + "}"),
    ("template", "SELECT tasker_core.register_task_template(%(arg)s::jsonb)", deep_template),
    ("step_metadata", "SELECT tasker_core.transition_step(%(child)s, 'error', %(arg)s::jsonb)", nested_object),
    ("task_metadata", "SELECT tasker_core.transition_task(1, 'error', %(arg)s::jsonb)", nested_object),
]


@pytest.mark.parametrize("depth", [101, 1000])
@pytest.mark.parametrize("what,sql,build", DEEP_CALLS, ids=[c[0] for c in DEEP_CALLS])
def test_json_nested_past_the_limit_is_refused_with_tk026(hdb, what, sql, build, depth):
    with hdb.connect() as conn:
        step = conn.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w')").fetchone()[0]
        child = conn.execute("SELECT workflow_step_id FROM tasker_workflow_steps WHERE workflow_step_id <> %s "
                             "ORDER BY 1 LIMIT 1", (step,)).fetchone()[0]
        before = snapshot(conn)
        with pytest.raises(psycopg.Error) as err:
            conn.execute(sql, {"step": step, "child": child, "arg": build(depth)})
        assert err.value.sqlstate == "TK026", (what, depth, err.value.sqlstate, str(err.value))
        assert snapshot(conn) == before, what
        # the worker still holds its step and finishes it
        assert conn.execute("SELECT tasker_core.complete_step(%s, 'w', '{}')", (step,)).fetchone()[0] is True


def test_json_nested_exactly_100_deep_is_accepted_everywhere(hdb):
    with hdb.connect() as conn:
        assert conn.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (deep_template(100),)).fetchone()[0]
        task = conn.execute("SELECT tasker_core.create_task('hostile', 'h', NULL, %s::jsonb, %s::jsonb)",
                            (nested_object(100), '{"tags": ' + nested(99) + "}")).fetchone()[0]
        conn.execute("SELECT tasker_core.transition_task(%s, 'in_progress', %s::jsonb)", (task, nested_object(100)))
        steps = [r[0] for r in conn.execute("SELECT workflow_step_id FROM tasker_workflow_steps WHERE task_id = %s "
                                            "ORDER BY 1", (task,))]
        assert conn.execute("SELECT tasker_core.transition_step(%s, 'error', %s::jsonb)",
                            (steps[1], nested_object(100))).fetchone()[0] is True
        # the deep context reached the steps' inputs; the deep template config reaches the worker
        claimed = {r[0]: r for r in conn.execute(
            "SELECT workflow_step_id, inputs, handler_config FROM tasker_core.claim_steps('w', ARRAY['hostile'], 10)")}
        assert claimed[steps[0]][1] == json.loads(nested_object(100))
        # an error 100 deep is stored under "error"
        assert conn.execute("SELECT tasker_core.fail_step(%s, 'w', %s::jsonb, false)", (steps[0], nested(100))).fetchone()[0] is None
        assert conn.execute("SELECT results -> 'error' FROM tasker_workflow_steps WHERE workflow_step_id = %s",
                            (steps[0],)).fetchone()[0] == json.loads(nested(100))
        assert conn.execute("SELECT tasker_core.resolve_step_manually(%s, %s::jsonb)",
                            (steps[0], nested(100))).fetchone()[0] is True
        deep = json.loads(deep_template(100))["step_templates"][0]["handler_config"]
        assert conn.execute("SELECT tasker_core.get_task_template('hostile', 'deep100')").fetchone()[0][
            "step_templates"][0]["handler_config"] == deep


def test_results_100_deep_are_accepted_and_the_child_claims_them_101_are_refused(hdb):
    """Complete with results at the limit: the child's parent_results wraps them one level
    deeper, and claims of the namespace (and unfiltered ones) keep working."""
    hdb.scalar("SELECT tasker_core.create_task('hostile', 'h', NULL, '{\"other\": 1}')")
    with hdb.connect() as conn:
        (a,) = conn.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w', ARRAY['hostile'])").fetchone()
        before = snapshot(conn)
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT tasker_core.complete_step(%s, 'w', %s::jsonb)", (a, nested(101)))
        assert err.value.sqlstate == "TK026", str(err.value)
        assert snapshot(conn) == before
        assert conn.execute("SELECT tasker_core.complete_step(%s, 'w', %s::jsonb)", (a, nested(100))).fetchone()[0]
        rows = conn.execute("SELECT workflow_step_id, step_name, parent_results "
                            "FROM tasker_core.claim_steps('w2', ARRAY['hostile'], 10)").fetchall()
        child = [r for r in rows if r[1] == "b"]
        assert len(child) == 1, rows
        assert child[0][2] == {"a": json.loads(nested(100))}
        assert [r[1] for r in rows].count("a") == 1, "the other task's root is claimed in the same call"
        assert conn.execute("SELECT tasker_core.complete_step(%s, 'w2', '{}')", (child[0][0],)).fetchone()[0]


def test_data_300_deep_written_directly_never_makes_a_claim_fail(hdb):
    """Rails writes the tables directly: results, inputs and template configuration of any
    depth are handed to workers as they are, and no claim (filtered or not) fails."""
    deep = nested(300)
    with hdb.connect() as conn:
        (a,) = conn.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w', ARRAY['hostile'])").fetchone()
        assert conn.execute("SELECT tasker_core.complete_step(%s, 'w', '{}')", (a,)).fetchone()[0]
        b = conn.execute("SELECT workflow_step_id FROM tasker_workflow_steps WHERE workflow_step_id <> %s "
                         "AND task_id = 1", (a,)).fetchone()[0]
        # as Rails could: the parent's results, the child's inputs, the template's handler_config
        other = conn.execute("SELECT tasker_core.create_task('hostile', 'h', NULL, '{\"n\": 2}')").fetchone()[0]
        conn.execute("UPDATE tasker_workflow_steps SET results = %s::jsonb WHERE workflow_step_id = %s", (deep, a))
        conn.execute("UPDATE tasker_workflow_steps SET inputs = %s::jsonb WHERE workflow_step_id = %s",
                     (nested_object(300), b))
        conn.execute("""UPDATE tasker_named_tasks SET configuration =
                            jsonb_set(configuration, '{step_templates,1,handler_config}', %s::jsonb)
                        WHERE name = 'h'""", (nested_object(300),))
        # a filtered claim of the namespace
        rows = conn.execute("SELECT workflow_step_id, parent_results, inputs, handler_config "
                            "FROM tasker_core.claim_steps('w2', ARRAY['hostile'], 1)").fetchall()
        assert [r[0] for r in rows] == [b]
        assert rows[0][1] == {"a": json.loads(deep)}
        assert rows[0][2] == json.loads(nested_object(300))
        assert rows[0][3] == json.loads(nested_object(300))
        # an unfiltered claim right after gets the other task's root
        rows = conn.execute("SELECT task_id, step_name FROM tasker_core.claim_steps('w3', NULL, 10)").fetchall()
        assert rows == [(other, "a")]
        assert conn.execute("SELECT tasker_core.complete_step(%s, 'w2', %s::jsonb)", (b, '{"ok": 1}')).fetchone()[0]
        assert conn.execute("SELECT * FROM tasker_core.check_tracking()").fetchall() == []


# --- issue 11 item 2: uniqueItems is linear (and compares numbers by value) ------------------

UNIQUE = {"name": "uniq", "namespace_name": "hostile", "version": "1.0.0",
          "schema": {"type": "object", "properties": {"ids": {"type": "array", "uniqueItems": True}}},
          "step_templates": [{"name": "a", "handler_class": "A"}]}


def test_large_unique_items_arrays_are_checked_within_a_statement_timeout(hdb):
    hdb.scalar("SELECT tasker_core.register_task_template(%s::jsonb)", (json.dumps(UNIQUE),))
    n = 100_000      # quadratic: minutes of uninterruptible CPU; linear: well under a second
    with hdb.connect() as conn:
        conn.execute("SET statement_timeout = '20s'")
        started = time.monotonic()
        task = conn.execute("SELECT tasker_core.create_task('hostile', 'uniq', NULL, %s::jsonb)",
                            (json.dumps({"ids": list(range(n))}),)).fetchone()[0]
        assert task and time.monotonic() - started < 20
        before = snapshot(conn)
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT tasker_core.create_task('hostile', 'uniq', NULL, %s::jsonb)",
                         (json.dumps({"ids": list(range(n)) + [n - 1]}),))
        assert err.value.sqlstate == "TK025", (err.value.sqlstate, str(err.value))
        assert "/ids" in str(err.value)
        assert snapshot(conn) == before


@pytest.mark.parametrize("ids,unique", [
    ([1, 1.0], False),
    ([1, 2, 3, 2.00], False),
    ([0, -0.0], False),
    ([{"a": 1, "b": [1, 2]}, {"b": [1.0, 2], "a": 1}], False),
    ([[1, 2], [2, 1]], True),
    ([1, "1", True, None, [1], {"1": 1}], True),
    ([{"a": 1}, {"a": 1, "b": None}], True),
])
def test_unique_items_compares_values_not_text(hdb, ids, unique):
    hdb.scalar("SELECT tasker_core.register_task_template(%s::jsonb)", (json.dumps(UNIQUE),))
    with hdb.connect() as conn:
        state = None
        try:
            conn.execute("SELECT tasker_core.create_task('hostile', 'uniq', NULL, %s::jsonb)", (json.dumps({"ids": ids}),))
        except psycopg.Error as e:
            state = e.sqlstate
        assert state == (None if unique else "TK025"), ids


def test_a_stored_template_nested_too_deep_is_an_error_not_an_older_version(hdb):
    """A configuration written directly (as Rails could) past the nesting limit: create_task of
    the latest version refuses with TK026 instead of quietly using an older version, and the
    older version stays usable by name."""
    two = dict(TEMPLATE, version="2.0.0")
    hdb.scalar("SELECT tasker_core.register_task_template(%s::jsonb)", (json.dumps(two),))
    with hdb.connect() as c:
        c.execute("UPDATE tasker_named_tasks SET configuration = jsonb_set(configuration, '{deep}', %s::jsonb) "
                  "WHERE version = '2.0.0'", (nested(150),))
        before = snapshot(c)
        with pytest.raises(psycopg.Error) as err:
            c.execute("SELECT tasker_core.create_task('hostile', 'h', NULL, '{}')")
        assert err.value.sqlstate == "TK026", str(err.value)
        assert snapshot(c) == before
        task = c.execute("SELECT tasker_core.create_task('hostile', 'h', '1.0.0', '{}')").fetchone()[0]
        assert c.execute("SELECT nt.version FROM tasker_tasks t JOIN tasker_named_tasks nt USING (named_task_id) "
                         "WHERE t.task_id = %s", (task,)).fetchone()[0] == "1.0.0"


def rss_anon_kib(pid):
    """The backend's private resident memory (heap: palloc'd and Rust-allocated alike)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc status")


RAISING_LOOP = """
DO $loop$
DECLARE
    ids bigint[] := ARRAY(SELECT generate_series(1, 200));
    long_name text := repeat('n', 500);
BEGIN
    FOR i IN 1..%s LOOP
        -- argument checks (22004, 22023), unknown templates (TK), malformed batches (22023)
        BEGIN PERFORM * FROM tasker_core.claim_steps(long_name, ARRAY[long_name], 0); EXCEPTION WHEN OTHERS THEN NULL; END;
        BEGIN PERFORM tasker_core.create_task(long_name, long_name, NULL, '{"k": [1, 2, 3]}'); EXCEPTION WHEN OTHERS THEN NULL; END;
        BEGIN PERFORM * FROM tasker_core.report_steps(long_name, '[{"step_id": 1}, {"step_id": 1}]'); EXCEPTION WHEN OTHERS THEN NULL; END;
        BEGIN PERFORM * FROM tasker_core.report_and_claim(long_name, '[]', ARRAY[long_name], -1); EXCEPTION WHEN OTHERS THEN NULL; END;
        BEGIN PERFORM tasker_core.transition_step(1, long_name); EXCEPTION WHEN OTHERS THEN NULL; END;
        -- the data schema's name refused after the arguments were read (the compatibility
        -- functions and the readers)
        PERFORM set_config('tasker_core.data_schema', 'pg_nowhere', true);
        BEGIN PERFORM * FROM tasker_core.get_step_readiness_status(1, ids); EXCEPTION WHEN OTHERS THEN NULL; END;
        BEGIN PERFORM * FROM tasker_core.get_task_execution_contexts_batch(ids); EXCEPTION WHEN OTHERS THEN NULL; END;
        BEGIN PERFORM * FROM tasker_core.list_task_templates(long_name); EXCEPTION WHEN OTHERS THEN NULL; END;
        BEGIN PERFORM tasker_core.get_task_template(long_name, long_name, long_name); EXCEPTION WHEN OTHERS THEN NULL; END;
        PERFORM set_config('tasker_core.data_schema', 'public', true);
        -- (a transaction holding a million subtransactions keeps a little of each)
        IF i %% 500 = 0 THEN
            COMMIT;
        END IF;
    END LOOP;
END;
$loop$"""


def test_raised_errors_leak_no_memory(hdb):
    """An error is raised only from a function's last expression, with nothing of its own
    alive: 100,000 rounds of nine errors of every layer leave the backend's memory flat
    (a leaked argument of a few hundred bytes per call would be hundreds of MB)."""
    with hdb.connect() as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        # every error once first, and a warm-up: caches, plans, the allocator's own arenas
        conn.execute(RAISING_LOOP % 5000)
        before = rss_anon_kib(pid)
        conn.execute(RAISING_LOOP % 100000)
        after = rss_anon_kib(pid)
    assert after - before < 4096, f"backend heap grew {after - before} KiB over 100,000 rounds ({before} -> {after})"
