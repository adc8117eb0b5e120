"""The Tasker data schema created by tasker_core.install_schema() against the Rails reference."""
import re

import psycopg
import pytest
from psycopg import sql

from conftest import ROOT, create_database, drop_database

# The Rails engine's structure.sql as facts, one per line (kinds: column, sequence, index,
# constraint, viewcolumn). Index predicates are printed as PostgreSQL 15 prints them, which is
# how the Rails HEAD structure.sql shows them too.
REFERENCE = ROOT / "tests" / "integration" / "reference" / "rails_schema.tsv"

CATALOG_QUERIES = {
    # Defaults are printed with the schema on search_path, as structure.sql shows them.
    "column": ("path", """
        SELECT 'column', c.relname, a.attnum::text, a.attname, format_type(a.atttypid, a.atttypmod),
               CASE WHEN a.attnotnull THEN 't' ELSE 'f' END,
               COALESCE(pg_get_expr(d.adbin, d.adrelid), '')
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname = %(schema)s AND c.relkind = 'r' AND c.relname LIKE 'tasker\\_%%'
          AND a.attnum > 0 AND NOT a.attisdropped"""),
    "sequence": ("path", """
        SELECT 'sequence', s.relname, format_type(q.seqtypid, NULL), t.relname || '.' || a.attname
        FROM pg_class s
        JOIN pg_namespace n ON n.oid = s.relnamespace
        JOIN pg_sequence q ON q.seqrelid = s.oid
        JOIN pg_depend dep ON dep.objid = s.oid AND dep.classid = 'pg_class'::regclass AND dep.deptype = 'a'
        JOIN pg_class t ON t.oid = dep.refobjid
        JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = dep.refobjsubid
        WHERE n.nspname = %(schema)s AND s.relkind = 'S'"""),
    # Index and constraint definitions are printed fully qualified, then the schema is
    # replaced by public, as pg_dump prints them.
    "index": ("qualified", """
        SELECT 'index', tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = %(schema)s AND tablename LIKE 'tasker\\_%%'"""),
    "constraint": ("qualified", """
        SELECT 'constraint', c.relname, k.conname, k.contype::text, pg_get_constraintdef(k.oid)
        FROM pg_constraint k
        JOIN pg_class c ON c.oid = k.conrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %(schema)s AND c.relname LIKE 'tasker\\_%%'"""),
    "viewcolumn": ("path", """
        SELECT 'viewcolumn', c.relname, a.attnum::text, a.attname, format_type(a.atttypid, a.atttypmod)
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = %(schema)s AND c.relkind = 'v' AND c.relname = 'tasker_step_dag_relationships'
          AND a.attnum > 0"""),
}


def catalog_lines(db, schema):
    """The schema's catalog, in the reference file's format."""
    quoted = '"' + schema.replace('"', '""') + '"'
    lines = []
    with db.connect() as conn:
        for kind, (mode, query) in CATALOG_QUERIES.items():
            if mode == "path":
                conn.execute(sql.SQL("SET search_path = {}").format(sql.Identifier(schema)))
            else:
                conn.execute("SET search_path = ''")
            for row in conn.execute(query, {"schema": schema}):
                line = "\t".join(row)
                if mode == "qualified":
                    for prefix in (f"{quoted}.", f"{schema}."):
                        line = line.replace(f" {prefix}", " public.")
                lines.append(line)
    return sorted(lines, key=lambda s: s.encode())


def reference_lines():
    return sorted((l for l in REFERENCE.read_text().splitlines() if l.strip()), key=lambda s: s.encode())


def assert_matches_reference(db, schema):
    actual = catalog_lines(db, schema)
    expected = reference_lines()
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    assert not missing and not extra, (
        "schema differs from the Rails reference\nmissing:\n  " + "\n  ".join(missing)
        + "\nunexpected:\n  " + "\n  ".join(extra))
    assert len(actual) == len(expected)


def test_reference_is_complete():
    kinds = {}
    for line in reference_lines():
        kind, table = line.split("\t")[:2]
        kinds.setdefault(kind, set()).add(table)
    assert len(kinds["column"]) == 13, sorted(kinds["column"])
    assert kinds["viewcolumn"] == {"tasker_step_dag_relationships"}


def test_install_schema_matches_rails(tasker_db):
    # (over whichever profile the fixture installed: 'rails' adds what 'lean' left out)
    tasker_db.scalar("SELECT tasker_core.install_schema('public', 'rails')")
    assert_matches_reference(tasker_db, "public")


def test_install_into_another_schema_matches_rails(db):
    assert db.scalar("SELECT tasker_core.install_schema('Work Flows', 'rails')") is True
    assert_matches_reference(db, "Work Flows")
    # nothing leaked into public
    assert db.scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0


SNAPSHOT = """
    SELECT c.relname, c.relkind, c.oid::bigint, c.relfilenode::bigint, c.xmin::text
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'public' ORDER BY c.relname"""


def test_second_install_changes_nothing(tasker_db):
    before = tasker_db.execute(SNAPSHOT)
    constraints_before = tasker_db.execute("SELECT oid::bigint, xmin::text FROM pg_constraint ORDER BY oid")
    assert tasker_db.scalar("SELECT tasker_core.install_schema()") is False
    assert tasker_db.execute(SNAPSHOT) == before
    assert tasker_db.execute("SELECT oid::bigint, xmin::text FROM pg_constraint ORDER BY oid") == constraints_before


def test_invalid_schema_names_are_rejected(db):
    for bad, state in [("pg_temp_x", "42602"), ("", "42602"), ("x" * 64, "42602"), (None, "22004")]:
        with pytest.raises(psycopg.Error) as err:
            db.scalar("SELECT tasker_core.install_schema(%s)", (bad,))
        assert err.value.sqlstate == state, (bad, err.value)
    assert db.scalar("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'pg_temp_x%%'") == 0


def test_data_tables_are_not_extension_members(tasker_db):
    members = tasker_db.scalar("""
        SELECT count(*) FROM pg_depend d JOIN pg_class c ON c.oid = d.objid
        WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e' AND c.relname LIKE 'tasker\\_%%'""")
    assert members == 0


def test_drop_extension_keeps_data_and_create_picks_it_up(tasker_db):
    tasker_db.run_file(ROOT / "demo" / "sample_workflow.sql")
    task_id = tasker_db.scalar("SELECT max(task_id) FROM tasker_tasks")
    before = tasker_db.execute("SELECT * FROM tasker_core.task_steps(%s)", (task_id,))
    assert len(before) == 6
    counts = "SELECT (SELECT count(*) FROM tasker_tasks), (SELECT count(*) FROM tasker_workflow_steps), (SELECT count(*) FROM tasker_workflow_step_edges)"
    rows_before = tasker_db.execute(counts)
    tasker_db.execute("DROP EXTENSION tasker_core")
    assert tasker_db.scalar("SELECT count(*) FROM pg_proc WHERE pronamespace = 'tasker_core'::regnamespace") == 0
    assert tasker_db.execute(counts) == rows_before
    tasker_db.execute("CREATE EXTENSION tasker_core")
    assert tasker_db.execute("SELECT * FROM tasker_core.task_steps(%s)", (task_id,)) == before
    assert tasker_db.scalar("SELECT tasker_core.install_schema()") is False


def test_missing_schema_and_unknown_task_have_their_own_sqlstates(db):
    with pytest.raises(psycopg.Error) as err:
        db.scalar("SELECT count(*) FROM tasker_core.task_steps(1)")
    assert err.value.sqlstate == "TK010"
    assert "install_schema" in str(err.value)
    db.scalar("SELECT tasker_core.install_schema()")
    with pytest.raises(psycopg.Error) as err:
        db.scalar("SELECT count(*) FROM tasker_core.task_steps(12345)")
    assert err.value.sqlstate == "TK004"
    assert str(err.value).startswith("task 12345 not found")


def test_data_schema_setting_points_at_other_schemas(db):
    db.scalar("SELECT tasker_core.install_schema('flows')")
    with db.connect() as conn:
        conn.execute("SET search_path = flows")
        conn.execute((ROOT / "demo" / "sample_workflow.sql").read_text())
        task_id = conn.execute("SELECT max(task_id) FROM flows.tasker_tasks").fetchone()[0]
        conn.execute("SET search_path = public")
        assert conn.execute("SELECT tasker_core.data_schema()").fetchone()[0] == "public"
        with pytest.raises(psycopg.Error) as err:
            conn.execute("SELECT * FROM tasker_core.task_steps(%s)", (task_id,))
        assert err.value.sqlstate == "TK010"
        conn.execute("SET tasker_core.data_schema = 'flows'")
        assert len(conn.execute("SELECT * FROM tasker_core.task_steps(%s)", (task_id,)).fetchall()) == 6


def test_several_connections_see_each_others_commits(tasker_db):
    """The harness itself: separate connections, committed transactions."""
    with tasker_db.connect(autocommit=False) as writer, tasker_db.connect() as reader:
        writer.execute((ROOT / "demo" / "sample_workflow.sql").read_text())
        assert reader.execute("SELECT count(*) FROM tasker_tasks").fetchone()[0] == 0
        writer.commit()
        assert reader.execute("SELECT count(*) FROM tasker_tasks").fetchone()[0] == 1


# The lean profile: the unique indexes, and those tasker_core's statements and documented
# queries read (README, "Index profiles").
LEAN = {
    "tasker_task_namespaces": {"task_namespaces_name_unique"},
    "tasker_named_tasks": {"named_tasks_namespace_name_version_unique"},
    "tasker_dependent_systems": {"dependent_systems_name_unique"},
    "tasker_dependent_system_object_maps": {"dependent_system_object_maps_dependent_system_one_id_dependent_"},
    "tasker_named_steps": {"named_step_by_system_uniq", "named_steps_name_index"},
    "tasker_named_tasks_named_steps": {"named_tasks_steps_ids_unique", "named_tasks_named_steps_named_step_id_index"},
    "tasker_tasks": {"index_tasks_on_identity_hash", "tasks_named_task_id_index", "idx_tasks_completion_status_created"},
    "tasker_workflow_steps": {"index_workflow_steps_task_and_step_optimized", "workflow_steps_named_step_id_index"},
    "tasker_workflow_step_edges": {"idx_step_edges_from_to", "idx_step_edges_to_from"},
    "tasker_task_transitions": {"index_tasker_task_transitions_on_task_id_and_most_recent",
                                "index_tasker_task_transitions_on_task_id_and_sort_key"},
    "tasker_workflow_step_transitions": {"idx_on_workflow_step_id_most_recent_97d5374ad6",
                                         "idx_on_workflow_step_id_sort_key_4d476d7adb"},
    "tasker_annotation_types": {"annotation_types_name_unique"},
    "tasker_task_annotations": {"task_annotations_task_id_index", "task_annotations_annotation_type_id_index"},
}


def indexes_of(db, schema):
    got = {}
    for table, index in db.execute("SELECT tablename, indexname FROM pg_indexes WHERE schemaname = %s "
                                   "AND indexname NOT LIKE '%%_pkey'", (schema,)):
        got.setdefault(table, set()).add(index)
    return got


def test_the_lean_profile_has_the_unique_indexes_and_those_tasker_core_reads(db):
    assert db.scalar("SELECT tasker_core.install_schema('lean_one', 'lean')") is True
    assert indexes_of(db, "lean_one") == LEAN
    # every unique index of the Rails set is in it: constraints and ON CONFLICT keep working
    db.scalar("SELECT tasker_core.install_schema('rails_one', 'rails')")
    unique = {r[0] for r in db.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'rails_one' "
                                       "AND indexdef LIKE 'CREATE UNIQUE%%' AND indexname NOT LIKE '%%_pkey'")}
    assert unique <= set().union(*LEAN.values())
    # the setting chooses when the argument does not
    with db.connect() as conn:
        conn.execute("SET tasker_core.index_profile = 'rails'")
        conn.execute("SELECT tasker_core.install_schema('rails_two')")
    assert indexes_of(db, "rails_two") == indexes_of(db, "rails_one")


@pytest.mark.parametrize("profile,sqlstate", [("fat", "22023"), ("", "22023"), ("LEAN", "22023")])
def test_unknown_index_profiles_are_refused(db, profile, sqlstate):
    with pytest.raises(psycopg.Error) as err:
        db.scalar("SELECT tasker_core.install_schema('nope', %s)", (profile,))
    assert err.value.sqlstate == sqlstate
    assert db.scalar("SELECT count(*) FROM pg_namespace WHERE nspname = 'nope'") == 0


def index_shapes(db):
    """name -> (table, columns, predicate) of the btree indexes of public."""
    out = {}
    for table, name, definition in db.execute(
            "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"):
        m = re.match(r".* USING btree \((.*?)\)(?: INCLUDE \(.*?\))?(?: WHERE (.*))?$", definition)
        if m:
            out[name] = (table, [c.strip() for c in m.group(1).split(",")], m.group(2))
    return out


def test_the_duplicate_index_migration_for_rails_apps_is_reversible(db):
    """sql/migrations/0002: on a Rails schema, drops 29 indexes that others cover and keeps
    every unique one; its down file gives back exactly the Rails set."""
    db.scalar("SELECT tasker_core.install_schema('public', 'rails')")
    before = indexes_of(db, "public")
    shapes = index_shapes(db)
    up = (ROOT / "sql" / "migrations" / "0002_drop_duplicate_indexes.up.sql").read_text()
    down = (ROOT / "sql" / "migrations" / "0002_drop_duplicate_indexes.down.sql").read_text()
    with db.connect() as conn:
        conn.execute(up)
    after = indexes_of(db, "public")
    kept = set().union(*after.values())
    dropped = set().union(*before.values()) - kept
    assert len(dropped) == 29
    assert set().union(*LEAN.values()) <= kept
    # each dropped index is covered: a kept btree index of its table, with its predicate, whose
    # columns start with the dropped one's
    for name in dropped:
        table, cols, pred = shapes[name]
        assert any(shapes[k][0] == table and shapes[k][2] == pred and shapes[k][1][:len(cols)] == cols
                   for k in kept if k in shapes), name
    with db.connect() as conn:
        conn.execute(down)
    assert indexes_of(db, "public") == before
    assert_matches_reference(db, "public")
