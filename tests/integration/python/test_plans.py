"""Plans of the hot statements on tables PostgreSQL never analysed.

The tiny tables (namespaces, named tasks) stay below autovacuum's thresholds in real
deployments, and a fresh database has no statistics at all: the statements of a claim must take
their indexed paths whatever the planner believes. auto_explain logs every nested statement's
plan with actual row counts; no statement of a claim may read its way through the queue.
"""
import re

from psycopg.types.json import Jsonb

TEMPLATE = {"name": "d", "namespace_name": "plans", "version": "1.0.0",
            "step_templates": [{"name": "a", "handler_class": "A"},
                               {"name": "b", "handler_class": "B", "depends_on_step": "a"},
                               {"name": "c", "handler_class": "C"},
                               {"name": "d", "handler_class": "D", "depends_on_steps": ["b", "c"]},
                               {"name": "e", "handler_class": "E", "depends_on_step": "d"}]}
TABLES = ["tasker_tasks", "tasker_workflow_steps", "tasker_named_tasks", "tasker_task_namespaces",
          "tasker_named_steps", "tasker_workflow_step_edges", "tasker_workflow_step_transitions",
          "tasker_task_transitions", "tasker_core.step_state", "tasker_core.step_claims"]


def plans_of(conn, sql, params=None):
    """The plans auto_explain logs while `sql` runs, with their actual row counts."""
    logged = []
    conn.add_notice_handler(lambda d: logged.append(d.message_primary or ""))
    conn.execute("LOAD 'auto_explain'")
    for setting in ("auto_explain.log_min_duration = 0", "auto_explain.log_nested_statements = on",
                    "auto_explain.log_analyze = on", "auto_explain.log_timing = off",
                    "client_min_messages = log"):
        conn.execute(f"SET {setting}")
    conn.execute(sql, params)
    conn.execute("SET client_min_messages = notice")
    return logged


def test_a_claim_reads_no_queue_on_never_analysed_tables(tasker_db):
    with tasker_db.connect() as c:
        for t in TABLES:
            c.execute(f"ALTER TABLE {t} SET (autovacuum_enabled = false)")
        c.execute("SELECT tasker_core.enable_tracking()")
        c.execute("SELECT tasker_core.register_task_template(%s)", (Jsonb(TEMPLATE),))
        c.execute("SELECT count(tasker_core.create_task('plans', 'd', NULL, '{}')) FROM generate_series(1, 2000)")
        assert c.execute("SELECT count(*) FROM pg_stat_user_tables WHERE last_analyze IS NOT NULL "
                         "OR last_autoanalyze IS NOT NULL").fetchone()[0] == 0
    with tasker_db.connect() as c:
        logged = plans_of(c, "SELECT * FROM tasker_core.claim_steps('w', ARRAY['plans'], 1, 60)")
    assert any("step_state_claimable_ns_idx" in p for p in logged), "no plan was logged"
    # 4,000 steps are ready: a claim that walks the ready queue filters thousands of rows away
    for plan in logged:
        for removed in re.findall(r"Rows Removed by (?:Filter|Join Filter): (\d+)", plan):
            assert int(removed) < 100, plan


def test_create_task_reads_no_catalogue_on_never_analysed_tables(tasker_db):
    """create_task looks up its template's named steps one index probe each: with 1,000 named
    steps of other templates in the catalogue, it reads none of them."""
    with tasker_db.connect() as c:
        for t in TABLES + ["tasker_dependent_systems"]:
            c.execute(f"ALTER TABLE {t} SET (autovacuum_enabled = false)")
        c.execute("SELECT tasker_core.enable_tracking()")
        c.execute("SELECT tasker_core.register_task_template(%s)", (Jsonb(TEMPLATE),))
        c.execute("""SELECT count(tasker_core.register_task_template(jsonb_build_object(
                         'name', 'other' || i, 'namespace_name', 'others', 'version', '1.0.0',
                         'step_templates', (SELECT jsonb_agg(jsonb_build_object('name', 's' || i || '_' || j,
                                                                                'handler_class', 'H'))
                                            FROM generate_series(1, 10) j))))
                     FROM generate_series(1, 100) i""")
    with tasker_db.connect() as c:
        logged = plans_of(c, "SELECT tasker_core.create_task('plans', 'd', NULL, '{}')")
        assert c.execute("SELECT count(*) FROM tasker_workflow_steps").fetchone()[0] == 5
    assert any("tasker_named_steps" in p for p in logged), "no plan was logged"
    for plan in logged:
        for removed in re.findall(r"Rows Removed by (?:Filter|Join Filter): (\d+)", plan):
            assert int(removed) < 100, plan
        for scanned in re.findall(r"Seq Scan on tasker_named_steps .*?actual rows=(\d+)", plan):
            assert int(scanned) < 100, plan


def test_the_worker_path_keeps_its_index_paths_on_tables_analysed_while_empty(tasker_db):
    """A fresh install analysed before any step ran has statistics saying the transition
    tables are empty: a plan made then must still find a step's transitions through an index
    as the tables grow (it scanned all of them, once per transition, before 0.5.0)."""
    with tasker_db.connect() as c:
        for t in TABLES:
            c.execute(f"ALTER TABLE {t} SET (autovacuum_enabled = false)")
        c.execute("SELECT tasker_core.enable_tracking()")
        c.execute("SELECT tasker_core.register_task_template(%s)", (Jsonb(TEMPLATE),))
        c.execute("SELECT count(tasker_core.create_task('plans', 'd', NULL, '{}')) FROM generate_series(1, 100)")
        c.execute("ANALYZE")                      # the transition tables are empty now
        c.execute("SELECT pg_stat_reset()")
    with tasker_db.connect() as c:               # one backend: plans made now are kept
        for _ in range(120):
            c.execute("SELECT tasker_core.complete_step(workflow_step_id, 'w', '{}') "
                      "FROM tasker_core.claim_steps('w', ARRAY['plans'], 1, 60)")
        c.execute("SELECT pg_stat_force_next_flush()")
    with tasker_db.connect() as c:
        scans = dict(c.execute("SELECT relname, seq_scan FROM pg_stat_user_tables WHERE relname IN "
                               "('tasker_workflow_step_transitions', 'tasker_task_transitions', "
                               "'tasker_workflow_steps', 'tasker_workflow_step_edges')").fetchall())
    assert scans["tasker_workflow_step_transitions"] == 0, scans
    assert scans["tasker_task_transitions"] == 0, scans
    assert scans["tasker_workflow_step_edges"] == 0, scans
