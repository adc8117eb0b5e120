"""Signatures of the Rails functions, and the reversible switch-over of a Rails database."""
import psycopg
import pytest

from conftest import ROOT

REFERENCE = ROOT / "tests" / "integration" / "reference" / "rails_functions.tsv"
MIGRATIONS = ROOT / "sql" / "migrations"
REFERENCE_SQL = ROOT / "sql" / "reference" / "tasker_reference.sql"

SIGNATURES = """
    SELECT p.proname::text, pg_get_function_arguments(p.oid), pg_get_function_result(p.oid)
    FROM pg_proc p WHERE p.pronamespace = %s::regnamespace AND p.proname = ANY(%s)
    ORDER BY 1"""


def reference():
    return sorted(tuple(l.split("\t")) for l in REFERENCE.read_text().splitlines() if l)


def signatures(db, schema):
    names = [r[0] for r in reference()]
    return [tuple(r) for r in db.execute(SIGNATURES, (schema, names))]


def test_tasker_core_has_the_exact_rails_signatures(db):
    assert signatures(db, "tasker_core") == reference()


def test_step_dag_relationships_has_the_view_columns(tasker_db):
    view_cols = tasker_db.execute("""
        SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute
        WHERE attrelid = 'public.tasker_step_dag_relationships'::regclass AND attnum > 0 ORDER BY attnum""")
    fn = tasker_db.scalar("SELECT pg_get_function_result('tasker_core.step_dag_relationships(bigint)'::regprocedure)")
    assert fn == "TABLE(" + ", ".join(f"{n} {t}" for n, t in view_cols) + ")"


def simulate_rails_functions(db):
    """Public functions standing in for the Rails ones (PL/pgSQL, from the reference)."""
    db.run_file(REFERENCE_SQL)
    with db.connect() as conn:
        for name, args, result in reference():
            arg_names = ", ".join(a.strip().split(" ")[0] for a in args.split(",") if a.strip())
            conn.execute(
                f"CREATE FUNCTION public.{name}({args}) RETURNS {result} LANGUAGE plpgsql STABLE AS "
                f"$$ BEGIN RETURN QUERY SELECT * FROM tasker_ref.{name}({arg_names}); END $$")


def run_migration(db, direction):
    db.run_file(MIGRATIONS / f"0001_switch_over_to_tasker_core.{direction}.sql")


def function_bodies(db):
    return db.execute("""
        SELECT p.proname::text, (SELECT l.lanname::text FROM pg_language l WHERE l.oid = p.prolang), p.prosrc FROM pg_proc p
        WHERE p.pronamespace = 'public'::regnamespace ORDER BY 1""")


def test_switch_over_and_back(tasker_db):
    db = tasker_db
    db.run_file(ROOT / "demo" / "sample_workflow.sql")
    simulate_rails_functions(db)
    before = function_bodies(db)
    view_before = db.scalar("SELECT pg_get_viewdef('public.tasker_step_dag_relationships'::regclass)")
    assert all(lang == "plpgsql" for _, lang, _ in before)

    run_migration(db, "up")
    after = function_bodies(db)
    assert len(after) == 9
    for name, lang, src in after:
        assert lang == "sql" and f"tasker_core.{name}(" in src, (name, lang, src)
    assert signatures(db, "public") == reference()
    assert "tasker_core.step_dag_relationships" in db.scalar(
        "SELECT pg_get_viewdef('public.tasker_step_dag_relationships'::regclass)")
    assert db.scalar("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'tasker_core_track%%'") == 11
    assert db.scalar("SELECT count(*) FROM tasker_core.step_state") == 6
    # the public names answer as the reference does
    assert db.execute("SELECT * FROM get_step_readiness_status(1) EXCEPT ALL SELECT * FROM tasker_ref.get_step_readiness_status(1)") == []
    assert db.execute("SELECT * FROM tasker_ref.get_task_execution_context(1) EXCEPT ALL SELECT * FROM get_task_execution_context(1)") == []
    assert db.execute("""SELECT * FROM tasker_step_dag_relationships EXCEPT ALL
                         SELECT * FROM tasker_ref.step_dag_relationships(1)""") == []
    # running it again changes nothing
    run_migration(db, "up")
    assert function_bodies(db) == after

    run_migration(db, "down")
    assert function_bodies(db) == before
    assert db.scalar("SELECT pg_get_viewdef('public.tasker_step_dag_relationships'::regclass)") == view_before
    assert db.scalar("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'tasker_core_track%%'") == 0
    assert db.scalar("SELECT count(*) FROM tasker_core.step_state") == 0
    assert db.scalar("SELECT count(*) FROM tasker_core.switchover") == 0


def test_switch_over_without_previous_functions_and_back(tasker_db):
    db = tasker_db
    run_migration(db, "up")
    assert len(function_bodies(db)) == 9
    run_migration(db, "down")
    assert function_bodies(db) == []


def test_drop_extension_refuses_while_tracking_and_cascade_keeps_data(tasker_db):
    db = tasker_db
    db.run_file(ROOT / "demo" / "sample_workflow.sql")
    db.scalar("SELECT tasker_core.enable_tracking()")
    with pytest.raises(psycopg.errors.DependentObjectsStillExist):
        db.execute("DROP EXTENSION tasker_core")
    db.execute("DROP EXTENSION tasker_core CASCADE")
    assert db.scalar("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'tasker_core_track%%'") == 0
    assert db.scalar("SELECT count(*) FROM tasker_workflow_steps") == 6
    # writes still work without the extension
    db.execute("UPDATE tasker_workflow_steps SET attempts = 1")
    db.execute("CREATE EXTENSION tasker_core")
    assert db.scalar("SELECT tasker_core.enable_tracking()") == 6


def test_tracking_survives_rails_style_writes_and_truncate(tasker_db):
    db = tasker_db
    db.scalar("SELECT tasker_core.enable_tracking()")
    db.run_file(ROOT / "demo" / "sample_workflow.sql")
    with db.connect() as conn:
        # Statesman: clear most_recent, insert the new row
        for step, state in [(1, "in_progress"), (1, "complete"), (2, "error")]:
            conn.execute("UPDATE tasker_workflow_step_transitions SET most_recent = false, updated_at = now() "
                         "WHERE workflow_step_id = %s AND most_recent", (step,))
            conn.execute("""INSERT INTO tasker_workflow_step_transitions
                (to_state, from_state, metadata, sort_key, most_recent, workflow_step_id, created_at, updated_at)
                VALUES (%s, NULL, '{}', (SELECT COALESCE(max(sort_key), 0) + 10 FROM tasker_workflow_step_transitions
                                          WHERE workflow_step_id = %s), true, %s, now(), now())""", (state, step, step))
        conn.execute("UPDATE tasker_workflow_steps SET attempts = 2, last_attempted_at = now() WHERE workflow_step_id = 2")
        conn.execute("INSERT INTO tasker_workflow_step_edges (from_step_id, to_step_id, name, created_at, updated_at) "
                     "VALUES (1, 6, 'provides', now(), now()), (1, 6, 'provides', now(), now())")
        conn.execute("DELETE FROM tasker_workflow_step_edges WHERE id = (SELECT min(id) FROM tasker_workflow_step_edges WHERE to_step_id = 6 AND from_step_id = 1)")
        conn.execute("UPDATE tasker_named_steps SET name = 'check_order' WHERE name = 'validate_order'")
        conn.execute("DELETE FROM tasker_workflow_step_transitions WHERE workflow_step_id = 2 AND most_recent")
    assert db.execute("SELECT * FROM tasker_core.check_tracking()") == []
    state = db.execute("SELECT name, state, parent_ids FROM tasker_core.step_state WHERE workflow_step_id IN (1, 2, 6) ORDER BY 1")
    assert state == [("check_order", "complete", []), ("notify_customer", None, [1, 5]),
                     ("reserve_inventory", None, [1])]
    db.execute("TRUNCATE tasker_workflow_step_transitions")
    assert db.execute("SELECT * FROM tasker_core.check_tracking()") == []
    db.execute("TRUNCATE tasker_workflow_step_edges, tasker_workflow_step_transitions, tasker_workflow_steps CASCADE")
    assert db.scalar("SELECT count(*) FROM tasker_core.step_state") == 0


def test_tracking_errors_have_their_own_sqlstates(tasker_db):
    db = tasker_db
    with pytest.raises(psycopg.Error) as err:
        db.execute("SELECT * FROM tasker_core.check_tracking()")
    assert err.value.sqlstate == "TK011"
    db.scalar("SELECT tasker_core.install_schema('other')")
    db.scalar("SELECT tasker_core.enable_tracking()")
    with db.connect() as conn:
        conn.execute("SET tasker_core.data_schema = 'other'")
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT tasker_core.enable_tracking()")
        assert err.value.sqlstate == "TK012"


def test_switch_back_without_switch_over_is_refused_and_changes_nothing(tasker_db):
    """Issue 11 item 13: switch_back() used to report success (and remove tracking) when
    nothing had been switched over."""
    db = tasker_db
    db.run_file(ROOT / "demo" / "sample_workflow.sql")
    db.scalar("SELECT tasker_core.enable_tracking()")
    with pytest.raises(psycopg.Error) as err:
        db.execute("SELECT tasker_core.switch_back()")
    assert err.value.sqlstate == "55000", (err.value.sqlstate, str(err.value))
    assert "tasker_core is not switched over" in str(err.value)
    assert db.scalar("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'tasker_core_track%%'") == 11
    assert db.scalar("SELECT count(*) FROM tasker_core.step_state") == 6
    assert db.execute("SELECT * FROM tasker_core.check_tracking()") == []
