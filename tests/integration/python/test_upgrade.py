"""Upgrades: install an earlier version (0.1.0 to 0.8.0), load data and run part of a workload,
then ALTER EXTENSION tasker_core UPDATE; the catalog must equal a fresh install of the new
version, and the workload must finish on the upgraded database."""
import json

import pytest

from conftest import create_database, drop_database

TEMPLATE = {"name": "up", "namespace_name": "upgrade", "version": "1.0.0",
            "step_templates": [{"name": "a", "handler_class": "A"},
                               {"name": "b", "handler_class": "B", "depends_on_step": "a"}]}

# Everything the extension defines, without oids: functions (with their security, settings,
# privileges and bodies), relations and columns, indexes, constraints, membership, reloptions.
CATALOG = {
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), pg_get_function_result(p.oid),
               l.lanname, p.prosecdef, p.proconfig::text, p.provolatile, p.proisstrict, p.proparallel,
               p.proacl::text, CASE WHEN l.lanname = 'c' THEN p.prosrc ELSE md5(p.prosrc) END
        FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
        WHERE p.pronamespace = 'tasker_core'::regnamespace ORDER BY 1, 2""",
    "columns": """
        SELECT c.relname, c.relkind, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid), c.relacl::text
        FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
        LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
        WHERE c.relnamespace = 'tasker_core'::regnamespace ORDER BY 1, 3""",
    "indexes": """
        SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index
        WHERE indrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'tasker_core'::regnamespace)
        ORDER BY 1""",
    "constraints": """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint
        WHERE connamespace = 'tasker_core'::regnamespace ORDER BY 1, 2""",
    "members": """
        SELECT classid::regclass::text, count(*) FROM pg_depend
        WHERE refobjid = (SELECT oid FROM pg_extension WHERE extname = 'tasker_core') AND deptype = 'e'
        GROUP BY 1 ORDER BY 1""",
    "schema": "SELECT nspacl::text FROM pg_namespace WHERE nspname = 'tasker_core'",
    # storage and autovacuum settings of the extension's tables
    "reloptions": """
        SELECT relname, reloptions::text FROM pg_class
        WHERE relnamespace = 'tasker_core'::regnamespace AND reloptions IS NOT NULL ORDER BY 1""",
    # the tracking triggers on the data schema (0.5.0 re-attaches them with their condition)
    "triggers": """
        SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid) FROM pg_trigger
        WHERE NOT tgisinternal AND tgname LIKE 'tasker_core_track%' ORDER BY 1, 2""",
}


def catalog(db):
    with db.connect() as conn:
        return {k: conn.execute(q).fetchall() for k, q in CATALOG.items()}


def versions(db):
    return [r[0] for r in db.execute(
        "SELECT version FROM pg_available_extension_versions WHERE name = 'tasker_core' ORDER BY 1")]


@pytest.fixture
def old_and_new():
    old = create_database("up_old", extension=False)
    new = create_database("up_new")
    yield old, new
    drop_database(old)
    drop_database(new)


CURRENT = "0.9.0"
DYNAMIC = {"name": "dyn", "namespace_name": "upgrade", "version": "1.0.0",
           "step_templates": [{"name": "each", "handler_class": "E", "map": {"over": "/context/xs"}},
                              {"name": "never", "handler_class": "N", "depends_on_step": "each",
                               "condition": {"path": "/context/go", "eq": True}}]}
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize("start", ["0.1.0", "0.2.0", "0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0"])
def test_update_from_an_earlier_version_equals_a_fresh_install(old_and_new, start):
    old, new = old_and_new
    assert {"0.1.0", "0.2.0", "0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", CURRENT} <= set(versions(new)), versions(new)
    old.execute(f"CREATE EXTENSION tasker_core VERSION '{start}'")
    old.execute("SELECT tasker_core.install_schema()")
    old.execute("SELECT tasker_core.enable_tracking()")
    if start != "0.1.0":
        # roles and their grants (claim_steps is replaced by the update: its grant must follow)
        old.execute("SELECT tasker_core.create_roles()")
        new.execute("SELECT tasker_core.create_roles()")
        old.execute("SELECT tasker_core.subscribe('before-update', ARRAY['task.*'])")
    old.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (json.dumps(TEMPLATE),))
    keyed = old.scalar("SELECT tasker_core.create_task('upgrade', 'up', NULL, '{}', '{\"idempotency_key\": \"k-1\"}')")
    old.execute("SELECT tasker_core.create_task('upgrade', 'up', NULL, jsonb_build_object('i', i)) "
                "FROM generate_series(1, 20) i")
    # half the workload runs on the old version; a claim is in flight across the upgrade
    for (step,) in old.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w', NULL, 10, 60)"):
        old.execute("SELECT tasker_core.complete_step(%s, 'w', '{}')", (step,))
    held = old.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w', NULL, 1, 60)")[0][0]
    events_before = old.scalar("SELECT count(*) FROM tasker_core.events")

    old.execute("ALTER EXTENSION tasker_core UPDATE")
    assert old.scalar("SELECT extversion FROM pg_extension WHERE extname = 'tasker_core'") == CURRENT

    new.execute("SELECT tasker_core.install_schema()")
    new.execute("SELECT tasker_core.enable_tracking()")
    upgraded, fresh = catalog(old), catalog(new)
    for part in CATALOG:
        assert upgraded[part] == fresh[part], part

    # the data survived and the workload finishes on the new version
    assert old.scalar("SELECT count(*) FROM tasker_core.events") >= events_before
    old.execute("SELECT tasker_core.complete_step(%s, 'w', '{}')", (held,))
    while True:   # by namespace: the per-namespace ready queue of 0.3.0, backfilled by the update
        rows = old.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w', ARRAY['upgrade'], 10, 60)")
        if not rows:
            break
        for (step,) in rows:
            old.execute("SELECT tasker_core.complete_step(%s, 'w', '{}')", (step,))
    assert old.scalar("SELECT count(*) FROM tasker_tasks WHERE complete") == 21
    assert old.execute("SELECT * FROM tasker_core.verify()") == []
    assert old.execute("SELECT * FROM tasker_core.check_tracking()") == []
    # and what 0.2.0 fixed works on the upgraded database
    assert old.scalar("SELECT tasker_core.cancel_task(1)") == 0
    # and what 0.3.0 added: a worker's traceparent at claim, owned subscriptions (an older one
    # stays shared)
    task = old.scalar("SELECT tasker_core.create_task('upgrade', 'up', NULL, '{}')")
    claimed = old.execute("SELECT task_id FROM tasker_core.claim_steps('w', NULL, 1, 60, %s)", (TP,))
    assert claimed == [(task,)]
    assert old.scalar("SELECT tasker_core.task_traceparent(%s)", (task,)) == TP
    if start == "0.2.0":
        assert old.scalar("SELECT owner FROM tasker_core.subscriptions WHERE name = 'before-update'") is None
    elif start == "0.3.0":
        assert old.scalar("SELECT owner = session_user FROM tasker_core.subscriptions WHERE name = 'before-update'")
    old.execute("SELECT tasker_core.subscribe('after-update')")
    assert old.scalar("SELECT owner = session_user FROM tasker_core.subscriptions WHERE name = 'after-update'")
    # an idempotency key used before the update still finds its task (identities changed)
    assert old.scalar("SELECT tasker_core.create_task('upgrade', 'up', NULL, '{}', "
                      "'{\"idempotency_key\": \"k-1\"}')") == keyed
    # and what 0.4.0 added: a claim belongs to the login that made it
    assert old.scalar("SELECT login = session_user FROM tasker_core.step_claims WHERE task_id = %s", (task,))
    # and what 0.5.0 added: batched outcomes, wake-up mode in health()
    old.execute("SELECT tasker_core.create_task('upgrade', 'up', NULL, '{\"batch\": 1}')")
    (step,) = old.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w2', NULL, 1, 60)")[0]
    assert old.execute("SELECT * FROM tasker_core.report_steps('w2', %s::jsonb)",
                       (json.dumps([{"step_id": step}]),)) == [(step, "completed", None)]
    assert old.scalar("SELECT ok FROM tasker_core.health() WHERE check_name = 'wakeups'") is True
    # and what 0.6.0 added: report and claim in one call
    old.execute("SELECT tasker_core.create_task('upgrade', 'up', NULL, '{\"batch\": 2}')")
    (step,) = old.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w3', NULL, 1, 60)")[0]
    rows = old.execute("SELECT outcome, workflow_step_id FROM tasker_core.report_and_claim('w3', %s::jsonb, NULL, 0)",
                       (json.dumps([{"step_id": step}]),))
    assert rows == [("completed", step)]
    # and what 0.7.0 changed: metrics() and tick() read readiness from the library
    assert "tasker_steps_ready " in old.scalar("SELECT tasker_core.metrics()")
    assert old.scalar("SELECT tasker_core.tick()") >= 0
    assert old.execute("SELECT * FROM tasker_core.check_tracking()") == []
    # and what 0.8.0 added: explain, for readers too
    assert old.execute("SELECT code FROM tasker_core.explain_task(%s)", (task,)) != []
    # priorities, scheduled starts, retention on the upgraded database (the claimable index was
    # rebuilt with the priority; existing steps have priority 0)
    later = old.scalar("SELECT tasker_core.create_task('upgrade', 'up', NULL, '{\"s\": 1}', "
                       "'{\"delay_seconds\": 3600}')")
    urgent = old.scalar("SELECT tasker_core.create_task('upgrade', 'up', NULL, '{\"s\": 2}', '{\"priority\": 5}')")
    assert [r[0] for r in old.execute("SELECT task_id FROM tasker_core.claim_steps('w4', NULL, 1, 60)")] == [urgent]
    assert old.scalar("SELECT code FROM tasker_core.explain_task(%s) LIMIT 1", (later,)) == "scheduled"
    old.execute("CALL tasker_core.archive_tasks('0', 1000)")
    assert old.scalar("SELECT count(*) FROM tasker_tasks WHERE complete") == 0
    assert old.execute("SELECT * FROM tasker_core.check_tracking()") == []
    if start != "0.1.0":
        assert old.scalar("SELECT has_function_privilege('tasker_reader', "
                          "'tasker_core.explain_step(bigint)', 'EXECUTE')")
    # and what 0.9.0 added: a map step and a conditional step on the upgraded database
    old.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (json.dumps(DYNAMIC),))
    task = old.scalar("SELECT tasker_core.create_task('upgrade', 'dyn', NULL, '{\"xs\": [1, 2, 3]}')")
    while True:
        rows = old.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w5', ARRAY['upgrade'], 10, 60)")
        if not rows:
            break
        for (step,) in rows:
            old.execute("SELECT tasker_core.complete_step(%s, 'w5', '{\"ok\": 1}')", (step,))
    assert old.scalar("SELECT complete FROM tasker_tasks WHERE task_id = %s", (task,))
    assert old.scalar("SELECT count(*) FROM tasker_core.events WHERE task_id = %s AND name = 'step.skipped'",
                      (task,)) == 1
    assert old.execute("SELECT * FROM tasker_core.check_tracking()") == []
