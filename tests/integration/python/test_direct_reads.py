"""Direct reads of the maintained state (store::direct): the readiness functions read
tasker_core.step_state through its index without SPI, with the relations looked up once per
backend and forgotten on every relation cache invalidation. One connection (one backend)
runs each scenario, so a stale lookup would show: after every change below, the rows are
those of the SPI path (tasker_core.direct_reads = off), and _direct_reads() says which path
was taken."""
import json

import psycopg
import pytest

TEMPLATE = {"name": "direct", "namespace_name": "direct", "version": "1.0.0",
            "step_templates": [{"name": "a", "handler_class": "A"},
                               {"name": "b", "handler_class": "B", "depends_on_step": "a"},
                               {"name": "c", "handler_class": "C", "depends_on_step": "a"},
                               {"name": "d", "handler_class": "D", "depends_on_steps": ["b", "c"]}]}

READINESS = "SELECT * FROM tasker_core.get_step_readiness_status(%s) ORDER BY workflow_step_id"
BATCH = "SELECT * FROM tasker_core.get_step_readiness_status_batch(%s) ORDER BY workflow_step_id"
CONTEXT = "SELECT * FROM tasker_core.get_task_execution_context(%s)"


@pytest.fixture
def conn(tasker_db):
    with tasker_db.connect() as c:
        c.execute("SELECT tasker_core.enable_tracking()")
        c.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (json.dumps(TEMPLATE),))
        tasks = [c.execute("SELECT tasker_core.create_task('direct', 'direct', NULL, %s::jsonb)",
                           (json.dumps({"i": i}),)).fetchone()[0] for i in range(3)]
        # some history: the first task's root done, the second's failed once
        (a,) = c.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w', NULL, 1, 60)").fetchone()
        c.execute("SELECT tasker_core.complete_step(%s, 'w', '{}')", (a,))
        (b,) = c.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w', NULL, 1, 60)").fetchone()
        c.execute("SELECT tasker_core.fail_step(%s, 'w', '\"boom\"')", (b,))
        c.tasks = tasks
        yield c


def reads(c):
    return c.execute("SELECT tasker_core._direct_reads()").fetchone()[0]


def answers(c):
    """Every readiness answer for the fixture's tasks, and how many direct reads they took."""
    before = reads(c)
    out = [c.execute(READINESS, (t,)).fetchall() for t in c.tasks]
    out.append(c.execute(BATCH, (c.tasks,)).fetchall())
    out.extend(c.execute(CONTEXT, (t,)).fetchall() for t in c.tasks)
    return out, reads(c) - before


def spi_answers(c):
    c.execute("SET tasker_core.direct_reads = off")
    try:
        out, direct = answers(c)
        assert direct == 0
        return out
    finally:
        c.execute("RESET tasker_core.direct_reads")


def check(c, direct_expected):
    got, direct = answers(c)
    assert got == spi_answers(c), "direct and SPI reads differ"
    assert all(got), got                     # every answer has rows
    # each context also reads its task's head (tasker_tasks and its current transition)
    # directly, whatever happens to step_state
    if direct_expected:
        assert direct == 10, direct          # 3 single, 1 batch, 3 contexts × 2
    else:
        assert direct == 3, direct           # the 3 contexts' heads only


def test_direct_and_spi_reads_agree(conn):
    check(conn, True)
    # a step changes: the next read sees it (same backend, same lookup)
    (s,) = conn.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w', NULL, 1, 60)").fetchone()
    conn.execute("SELECT tasker_core.complete_step(%s, 'w', '{}')", (s,))
    check(conn, True)
    # in an open transaction, the read sees the transaction's own writes
    with conn.transaction():
        (s,) = conn.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w', NULL, 1, 60)").fetchone()
        check(conn, True)


def test_rewritten_table_and_index(conn):
    check(conn, True)
    conn.execute("VACUUM FULL tasker_core.step_state")      # new files, same relations
    check(conn, True)
    conn.execute("REINDEX INDEX tasker_core.step_state_task_idx")
    check(conn, True)
    conn.execute("SELECT tasker_core.rebuild_tracking()")
    check(conn, True)


def test_altered_table(conn):
    check(conn, True)
    conn.execute("ALTER TABLE tasker_core.step_state ADD COLUMN extra integer DEFAULT 7")
    check(conn, True)
    conn.execute("ALTER TABLE tasker_core.step_state DROP COLUMN extra")
    check(conn, True)
    # a column of another type than the reads expect: not read directly, and the SPI path
    # (which checks the types too) refuses rather than misread
    with conn.transaction(force_rollback=True):
        conn.execute("ALTER TABLE tasker_core.step_state ALTER COLUMN attempts TYPE bigint")
        before = reads(conn)
        with pytest.raises(Exception, match="attempts"):
            conn.execute(READINESS, (conn.tasks[0],))
    assert reads(conn) == before
    check(conn, True)


def test_index_gone_or_different(conn):
    check(conn, True)
    with conn.transaction(force_rollback=True):
        conn.execute("DROP INDEX tasker_core.step_state_task_idx")
        check(conn, False)                                     # no index: SPI
    check(conn, True)
    with conn.transaction(force_rollback=True):
        # an index of that name led by another column: not used
        conn.execute("DROP INDEX tasker_core.step_state_task_idx")
        conn.execute("CREATE INDEX step_state_task_idx ON tasker_core.step_state (workflow_step_id)")
        check(conn, False)
    with conn.transaction(force_rollback=True):
        # a partial one: not every row is in it
        conn.execute("DROP INDEX tasker_core.step_state_task_idx")
        conn.execute("CREATE INDEX step_state_task_idx ON tasker_core.step_state (task_id) WHERE attempts > 0")
        check(conn, False)
    check(conn, True)


def test_table_dropped_and_created_again(conn):
    check(conn, True)
    with conn.transaction(force_rollback=True):
        # the maintained table replaced by a new relation of the same name (another OID)
        conn.execute("ALTER TABLE tasker_core.step_state RENAME TO step_state_old")
        conn.execute("ALTER INDEX tasker_core.step_state_task_idx RENAME TO step_state_old_task_idx")
        conn.execute("CREATE TABLE tasker_core.step_state (LIKE tasker_core.step_state_old INCLUDING ALL)")
        conn.execute("INSERT INTO tasker_core.step_state SELECT * FROM tasker_core.step_state_old")
        conn.execute("ALTER TABLE tasker_core.step_state_old RENAME TO step_state_older")
        # its index has another name: SPI reads the new table
        check(conn, False)
        idx = conn.execute("SELECT indexrelid::regclass::text FROM pg_index "
                           "WHERE indrelid = 'tasker_core.step_state'::regclass "
                           "AND pg_get_indexdef(indexrelid) LIKE '%(task_id, workflow_step_id)%'").fetchone()[0]
        conn.execute(f"ALTER INDEX {idx} RENAME TO step_state_task_idx")
        check(conn, True)                                      # the new table, directly
        # rows only in the new table are seen: the lookup follows the new relation
        conn.execute("UPDATE tasker_core.step_state SET attempts = 2 WHERE task_id = %s", (conn.tasks[2],))
        rows = conn.execute(READINESS, (conn.tasks[2],)).fetchall()
        assert {r[12] for r in rows} == {2}
    check(conn, True)


def test_untracked_schema_is_not_read_directly(conn):
    check(conn, True)
    with conn.transaction(force_rollback=True):
        conn.execute("SELECT tasker_core.disable_tracking()")
        check(conn, False)                                     # recomputed from the Tasker tables


def test_batches_dense_and_sparse(conn):
    # ten more tasks: a dense batch (one pass over the id range, rows of other tasks in the
    # range skipped) and a sparse one (one descent per task) read the same rows as SPI
    more = [conn.execute("SELECT tasker_core.create_task('direct', 'direct', NULL, %s::jsonb)",
                         (json.dumps({"more": i}),)).fetchone()[0] for i in range(10)]
    every = sorted(conn.tasks + more)
    for ids in (every, every[::2], [every[0], every[-1]], [every[-1]], [], [every[0], 10**12]):
        before = reads(conn)
        got = conn.execute(BATCH, (ids,)).fetchall()
        assert reads(conn) - before == (1 if ids else 0)
        conn.execute("SET tasker_core.direct_reads = off")
        want = conn.execute(BATCH, (ids,)).fetchall()
        conn.execute("RESET tasker_core.direct_reads")
        assert got == want
        assert {r[1] for r in got} == set(ids) - {10**12}


def test_privileges_and_row_security_are_those_of_sql(conn):
    # the compatibility functions run as their caller: a direct read must not show what the
    # caller could not SELECT
    conn.execute("SELECT tasker_core.create_roles()")
    conn.execute("DROP ROLE IF EXISTS direct_no_select")
    conn.execute("CREATE ROLE direct_no_select NOLOGIN")
    try:
        conn.execute("GRANT USAGE ON SCHEMA tasker_core TO direct_no_select")
        conn.execute("GRANT EXECUTE ON FUNCTION tasker_core.get_step_readiness_status(bigint, bigint[]), "
                     "tasker_core.data_schema(), tasker_core._data_schema() TO direct_no_select")
        want = conn.execute(READINESS, (conn.tasks[0],)).fetchall()
        before = reads(conn)
        conn.execute("SET ROLE direct_no_select")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(READINESS, (conn.tasks[0],))
        conn.execute("RESET ROLE")
        assert reads(conn) == before
        # a role that may read the maintained state reads it directly
        conn.execute("SET ROLE tasker_reader")
        assert conn.execute(READINESS, (conn.tasks[0],)).fetchall() == want
        conn.execute("RESET ROLE")
        assert reads(conn) == before + 1
        # row-level security: SQL's answer (filtered by the policy), never the whole table
        with conn.transaction(force_rollback=True):
            conn.execute("ALTER TABLE tasker_core.step_state ENABLE ROW LEVEL SECURITY")
            conn.execute("CREATE POLICY only_first ON tasker_core.step_state FOR SELECT TO tasker_reader "
                         "USING (task_id = %s)" % conn.tasks[0])
            conn.execute("SET ROLE tasker_reader")
            assert conn.execute(READINESS, (conn.tasks[1],)).fetchall() == []
            assert conn.execute(READINESS, (conn.tasks[0],)).fetchall() == want
            conn.execute("RESET ROLE")
            assert reads(conn) == before + 1
    finally:
        conn.execute("RESET ROLE")
        conn.execute("DROP OWNED BY direct_no_select")
        conn.execute("DROP ROLE direct_no_select")


def test_task_heads_read_directly_or_through_spi(conn):
    check(conn, True)
    # no index led by task_id on the transitions: SPI for the heads
    with conn.transaction(force_rollback=True):
        for (idx,) in conn.execute("SELECT indexrelid::regclass::text FROM pg_index "
                                   "WHERE indrelid = 'tasker_task_transitions'::regclass "
                                   "AND indkey[0] = (SELECT attnum FROM pg_attribute WHERE attname = 'task_id' "
                                   "AND attrelid = 'tasker_task_transitions'::regclass)").fetchall():
            conn.execute(f"DROP INDEX {idx}")
        before = reads(conn)
        want = [conn.execute(CONTEXT, (t,)).fetchall() for t in conn.tasks]
        assert reads(conn) - before == 3                          # the steps only
        conn.execute("SET tasker_core.direct_reads = off")
        assert [conn.execute(CONTEXT, (t,)).fetchall() for t in conn.tasks] == want
        conn.execute("RESET tasker_core.direct_reads")
    # row-level security on the tasks: SPI
    with conn.transaction(force_rollback=True):
        conn.execute("ALTER TABLE tasker_tasks ENABLE ROW LEVEL SECURITY")
        before = reads(conn)
        conn.execute(CONTEXT, (conn.tasks[0],)).fetchall()
        assert reads(conn) - before == 1
    check(conn, True)


def test_parent_arrays_and_names_in_every_stored_form(conn):
    # Fan-ins of 3, 100 and 300 parents: their parent_ids are stored with a 1-byte header, a
    # 4-byte header, and compressed; the direct read parses the first two where they lie and
    # detoasts the third. The step names are long and not ASCII (a 4-byte header in the result
    # row). Ground truth: the edges themselves.
    widths = {"ü" * 100: 3, "join_" + "é" * 60: 100, "wide": 300}
    roots = [{"name": f"r{i}", "handler_class": "R"} for i in range(300)]
    joins = [{"name": name, "handler_class": "J", "depends_on_steps": [f"r{i}" for i in range(w)]}
             for name, w in widths.items()]
    template = {"name": "fanins", "namespace_name": "direct", "version": "1.0.0",
                "step_templates": roots + joins}
    conn.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (json.dumps(template),))
    task = conn.execute("SELECT tasker_core.create_task('direct', 'fanins', NULL, '{}')").fetchone()[0]
    forms = dict(conn.execute(
        "SELECT name, pg_column_compression(parent_ids) IS NOT NULL FROM tasker_core.step_state "
        "WHERE task_id = %s AND cardinality(parent_ids) > 2", (task,)).fetchall())
    assert forms == {"ü" * 100: False, "join_" + "é" * 60: False, "wide": True}, forms
    edges = dict(conn.execute(
        "SELECT ws.workflow_step_id, array_agg(e.from_step_id ORDER BY e.from_step_id) "
        "FROM tasker_workflow_steps ws JOIN tasker_workflow_step_edges e ON e.to_step_id = ws.workflow_step_id "
        "WHERE ws.task_id = %s GROUP BY 1", (task,)).fetchall())
    before = reads(conn)
    dag = conn.execute("SELECT workflow_step_id, parent_step_ids FROM tasker_core.step_dag_relationships(%s)",
                       (task,)).fetchall()
    ready = conn.execute(READINESS, (task,)).fetchall()
    assert reads(conn) - before == 2
    assert {s: sorted(p) for s, p in dag if p} == edges
    by_name = {r[3]: r for r in ready}
    for name, w in widths.items():
        assert by_name[name][10] == w                          # total_parents
        assert by_name[name][11] == 0                          # completed_parents
    conn.execute("SET tasker_core.direct_reads = off")
    assert conn.execute(READINESS, (task,)).fetchall() == ready
    conn.execute("RESET tasker_core.direct_reads")
