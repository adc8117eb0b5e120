"""Maintenance of other writers' statements (Rails, migrations, bulk SQL): deletes of steps and
step transitions (and inserts and deletes of edges) fire their tracking trigger once per
statement, whatever the number of rows; inserts of steps and transitions fire it per row (Rails
writes them one per statement, where that is cheaper); the maintained rows stay exact
(check_tracking() empty at every stage)."""
from conftest import ROOT

SAMPLE = (ROOT / "demo" / "sample_workflow.sql").read_text()


def calls(conn, fn):
    """Calls of a trigger function counted by this backend and not reported yet
    (track_functions = 'pl'): compared before and after a statement."""
    return conn.execute("SELECT COALESCE(pg_stat_get_xact_function_calls(%s::regprocedure), 0)",
                        (fn,)).fetchone()[0]


def drift(conn):
    return conn.execute("SELECT count(*) FROM tasker_core.check_tracking()").fetchone()[0]


def test_bulk_deletes_fire_each_tracking_trigger_once(tasker_db):
    tasker_db.scalar("SELECT tasker_core.enable_tracking()")
    with tasker_db.connect(autocommit=False) as conn:
        conn.execute("SET track_functions = 'pl'")
        conn.execute(SAMPLE)                      # one task of six steps, the way Rails writes it
        conn.commit()
        steps, transitions = "tasker_core.track_steps()", "tasker_core.track_step_transitions()"
        task, named = conn.execute("SELECT task_id, min(named_step_id) FROM tasker_workflow_steps "
                                   "GROUP BY task_id").fetchone()

        # 300 steps in one statement, each a child of the task's first step
        base_steps, base_transitions = calls(conn, steps), calls(conn, transitions)
        new = [r[0] for r in conn.execute(
            "INSERT INTO tasker_workflow_steps (task_id, named_step_id, retryable, retry_limit, attempts, "
            "                                   inputs, results, created_at, updated_at) "
            "SELECT %s, %s, true, 3, 0, '{}', '{}', now(), now() FROM generate_series(1, 300) "
            "RETURNING workflow_step_id", (task, named))]
        first = conn.execute("SELECT min(workflow_step_id) FROM tasker_workflow_steps WHERE task_id = %s",
                             (task,)).fetchone()[0]
        conn.execute("INSERT INTO tasker_workflow_step_edges (from_step_id, to_step_id, name, created_at, updated_at) "
                     "SELECT %s, s, 'provides', now(), now() FROM unnest(%s::bigint[]) s", (first, new))
        assert calls(conn, steps) == base_steps + 300          # inserts: per row
        assert drift(conn) == 0
        assert conn.execute("SELECT count(*) FROM tasker_core.step_state WHERE workflow_step_id = ANY (%s) "
                            "AND blocked_parents = 1", (new,)).fetchone()[0] == 300

        # a current transition for each, and a historic one, in one statement
        conn.execute("INSERT INTO tasker_workflow_step_transitions "
                     "  (to_state, metadata, sort_key, most_recent, workflow_step_id, created_at, updated_at) "
                     "SELECT x.to_state, '{}', x.k, x.k = 2, s, now(), now() FROM unnest(%s::bigint[]) s, "
                     "       (VALUES ('pending', 1), ('in_progress', 2)) x(to_state, k)", (new,))
        assert calls(conn, transitions) == base_transitions + 600
        assert drift(conn) == 0
        # the first step completes: every child unblocked by one statement's maintenance
        conn.execute("UPDATE tasker_workflow_step_transitions SET most_recent = false "
                     "WHERE workflow_step_id = %s AND most_recent", (first,))
        conn.execute("INSERT INTO tasker_workflow_step_transitions "
                     "  (to_state, metadata, sort_key, most_recent, workflow_step_id, created_at, updated_at) "
                     "VALUES ('complete', '{}', 10, true, %s, now(), now())", (first,))
        assert drift(conn) == 0
        assert conn.execute("SELECT count(*) FROM tasker_core.step_state WHERE workflow_step_id = ANY (%s) "
                            "AND blocked_parents = 0", (new,)).fetchone()[0] == 300
        before = calls(conn, transitions)
        # every transition of the 300 gone in one statement, then the steps
        conn.execute("DELETE FROM tasker_workflow_step_transitions WHERE workflow_step_id = ANY (%s)", (new,))
        assert calls(conn, transitions) == before + 1
        assert conn.execute("SELECT count(*) FROM tasker_core.step_state WHERE workflow_step_id = ANY (%s) "
                            "AND (state IS NOT NULL OR transition_count <> 0)", (new,)).fetchone()[0] == 0
        conn.execute("DELETE FROM tasker_workflow_step_edges WHERE to_step_id = ANY (%s)", (new,))
        conn.execute("DELETE FROM tasker_workflow_steps WHERE workflow_step_id = ANY (%s)", (new,))
        assert calls(conn, steps) == base_steps + 301          # the delete: once
        assert conn.execute("SELECT count(*) FROM tasker_core.step_state WHERE workflow_step_id = ANY (%s)",
                            (new,)).fetchone()[0] == 0
        assert drift(conn) == 0
        conn.commit()
        assert drift(conn) == 0
        assert conn.execute("SELECT count(*) FROM tasker_core.verify()").fetchone()[0] == 0
