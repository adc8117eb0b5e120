"""Least privilege: tasker_core.create_roles() and what each role may (and may not) do, tried
through real logins; settings that change what the SECURITY DEFINER functions do are
superuser-only; names that reach SQL or NOTIFY can not inject anything."""
import json
import threading
import time
import uuid

import psycopg
import pytest

from conftest import connect, drop_database, sqlstate_of

TEMPLATE = """{"name": "roles_flow", "namespace_name": "roles", "version": "1.0.0",
  "step_templates": [
    {"name": "a", "handler_class": "A"},
    {"name": "b", "handler_class": "B", "depends_on_step": "a"}]}"""


@pytest.fixture
def logins(tasker_db):
    """The database set up with tracking, a template, a task and the roles, plus one LOGIN
    role per tasker role (and one with none), cleaned up afterwards."""
    db = tasker_db
    db.scalar("SELECT tasker_core.enable_tracking()")
    db.scalar("SELECT tasker_core.register_task_template(%s::jsonb)", (TEMPLATE,))
    db.scalar("SELECT tasker_core.create_task('roles', 'roles_flow', NULL, '{}')")
    db.execute("SELECT tasker_core.create_roles()")
    suffix = uuid.uuid4().hex[:8]
    users = {kind: f"tk_{kind}_{suffix}" for kind in ("worker", "worker2", "reader", "admin", "nobody", "writer")}
    with connect() as admin:
        for kind, user in users.items():
            admin.execute(f'CREATE ROLE "{user}" LOGIN')
            if kind in ("worker", "worker2", "reader", "admin"):
                admin.execute(f'GRANT tasker_{kind.rstrip("2")} TO "{user}"')
        admin.execute(f'GRANT CONNECT ON DATABASE "{db.name}" TO PUBLIC')
    with db.connect() as owner:
        # an application role that writes the Tasker tables (as a Rails app does) but has no
        # privilege on tasker_core's own tables
        owner.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{users["writer"]}"')
        owner.execute(f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO "{users["writer"]}"')

    def login(kind):
        return psycopg.connect(dbname=db.name, user=users[kind], autocommit=True)

    yield db, login
    drop_database(db)
    with connect() as admin:
        for user in users.values():
            admin.execute(f'DROP ROLE IF EXISTS "{user}"')


def test_create_roles_is_idempotent_and_owner_only(logins):
    db, login = logins
    again = db.execute("SELECT * FROM tasker_core.create_roles()")
    assert not any("created role" in r[0] for r in again), again
    with login("admin") as c:
        assert sqlstate_of(c, "SELECT tasker_core.create_roles()") == "42501"


def test_a_worker_runs_steps_and_nothing_else(logins):
    db, login = logins
    with login("worker") as w:
        rows = w.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w1')").fetchall()
        assert len(rows) == 1
        step = rows[0][0]
        assert w.execute("SELECT tasker_core.heartbeat(%s, 'w1') IS NOT NULL", (step,)).fetchone()[0]
        assert w.execute("SELECT tasker_core.complete_step(%s, 'w1', '{\"ok\": 1}')", (step,)).fetchone()[0]
        # events and its own subscriptions
        assert w.execute("SELECT tasker_core.subscribe('w1-sub', ARRAY['step.*'])").fetchone()[0]
        assert w.execute("SELECT count(*) FROM tasker_core.events_after(NULL, 1000)").fetchone()[0] > 0
        # nothing else: no tables, no operator or admin functions, no maintenance
        for sql in [
            "SELECT * FROM tasker_workflow_steps",
            "UPDATE tasker_workflow_steps SET processed = true",
            "SELECT * FROM tasker_core.events",
            "SELECT * FROM tasker_core.step_state",
            "DELETE FROM tasker_core.step_claims",
            "SELECT tasker_core.register_task_template('{}'::jsonb)",
            "SELECT tasker_core.create_task('roles', 'roles_flow', NULL, '{}')",
            "SELECT tasker_core.cancel_task(1)",
            "SELECT tasker_core.retry_task(1)",
            "SELECT tasker_core.resolve_step_manually(1)",
            "SELECT tasker_core.transition_step(1, 'complete')",
            "SELECT tasker_core.tick()",
            "SELECT tasker_core.prune_events('1 day')",
            "SELECT tasker_core.enable_tracking()",
            "SELECT tasker_core.disable_tracking()",
            "SELECT tasker_core.install_schema('elsewhere')",
            "SELECT tasker_core.switch_over()",
            "SELECT tasker_core._set_step_state(1, 'complete', now()::timestamp, 1, NULL, 0)",
            "SELECT tasker_core._expire_leases(10)",
            "SELECT * FROM tasker_core.get_step_readiness_status(1)",
            "SELECT tasker_core.metrics()",
        ]:
            assert sqlstate_of(w, sql) == "42501", sql


def test_a_subscription_belongs_to_the_login_that_made_it(logins):
    db, login = logins
    with login("worker") as w1, login("worker2") as w2, login("admin") as a:
        w1.execute("SELECT tasker_core.subscribe('mine', ARRAY['step.*'])")
        cursor = w1.execute("SELECT tasker_core.event_horizon()").fetchone()[0]
        # another worker login can neither read, move, change nor remove it
        for sql, args in [("SELECT * FROM tasker_core.poll('mine')", None),
                          ("SELECT tasker_core.ack('mine', %s)", (cursor,)),
                          ("SELECT tasker_core.subscribe('mine', ARRAY['*'])", None),
                          ("SELECT tasker_core.unsubscribe('mine')", None)]:
            assert sqlstate_of(w2, sql, args) == "42501", sql
        assert db.scalar("SELECT patterns FROM tasker_core.subscriptions WHERE name = 'mine'") == ["step.*"]
        # SET ROLE does not change whose it is: the login is the owner
        w2.execute("SET ROLE tasker_worker")
        assert sqlstate_of(w2, "SELECT * FROM tasker_core.poll('mine')") == "42501"
        # the owner uses it; an operator (tasker_admin, here with tasker_worker too) may look
        # after anyone's
        w1.execute("SELECT * FROM tasker_core.poll('mine')")
        w1.execute("SELECT tasker_core.ack('mine', %s)", (cursor,))
        db.execute(f"GRANT tasker_worker TO {a.info.user}")
        a.execute("SELECT * FROM tasker_core.poll('mine')")
        assert a.execute("SELECT tasker_core.unsubscribe('mine')").fetchone()[0] is True
        # a name freed is free for anyone
        w2.execute("RESET ROLE")
        w2.execute("SELECT tasker_core.subscribe('mine')")
        assert sqlstate_of(w1, "SELECT * FROM tasker_core.poll('mine')") == "42501"


def test_settings_that_change_the_definer_functions_are_superuser_only(logins):
    db, login = logins
    with login("worker") as w:
        w.execute("SELECT tasker_core.backoff_seconds(1)")   # the library is loaded
        for setting, value in [("tasker_core.fake_now", "2099-01-01"), ("tasker_core.data_schema", "mine"),
                               ("tasker_core.event_log", "off"), ("tasker_core.notify", "off"),
                               ("tasker_core.max_template_steps", "1000000"),
                               ("tasker_core.max_payload_bytes", "100000000")]:
            assert sqlstate_of(w, f"SET {setting} = '{value}'") == "42501", setting
    # set before the library is loaded, a superuser-only value is dropped when it loads
    with login("worker") as w:
        w.execute("SET tasker_core.fake_now = '2099-01-01'")
        w.execute("SELECT tasker_core.backoff_seconds(1)")
        assert w.execute("SELECT current_setting('tasker_core.fake_now', true)").fetchone()[0] in (None, "")


def test_a_reader_reads_and_writes_nothing(logins):
    db, login = logins
    with login("reader") as r:
        rows = r.execute("SELECT workflow_step_id, ready_for_execution FROM tasker_core.get_step_readiness_status(1)").fetchall()
        assert len(rows) == 2 and sum(1 for _, ready in rows if ready) == 1
        assert r.execute("SELECT count(*) FROM tasker_core.get_task_execution_context(1)").fetchone()[0] == 1
        assert "tasker_steps" in r.execute("SELECT tasker_core.metrics()").fetchone()[0]
        assert r.execute("SELECT count(*) FROM tasker_core.health()").fetchone()[0] > 0
        assert r.execute("SELECT count(*) FROM tasker_core.verify()").fetchone()[0] == 0
        assert r.execute("SELECT tasker_core.task_graph_dot(1)").fetchone()[0].startswith("digraph")
        assert r.execute("SELECT count(*) FROM tasker_workflow_steps").fetchone()[0] == 2
        for sql in [
            "SELECT * FROM tasker_core.claim_steps('r')",
            "SELECT tasker_core.complete_step(1, 'r')",
            "SELECT tasker_core.create_task('roles', 'roles_flow', NULL, '{}')",
            "UPDATE tasker_workflow_steps SET processed = true",
            "INSERT INTO tasker_core.events (name) VALUES ('x')",
            "UPDATE tasker_core.step_state SET blocked_parents = 0",
        ]:
            assert sqlstate_of(r, sql) == "42501", sql
    assert db.scalar("SELECT count(*) FROM tasker_workflow_steps WHERE processed") == 0


def test_an_admin_manages_templates_and_tasks_but_claims_nothing(logins):
    db, login = logins
    with login("admin") as a:
        assert a.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (TEMPLATE,)).fetchone()[0]
        task = a.execute("SELECT tasker_core.create_task('roles', 'roles_flow', NULL, '{}')").fetchone()[0]
        assert a.execute("SELECT tasker_core.cancel_task(%s)", (task,)).fetchone()[0] == 2
        assert a.execute("SELECT count(*) FROM tasker_core.get_step_readiness_status(1)").fetchone()[0] == 2
        assert sqlstate_of(a, "SELECT * FROM tasker_core.claim_steps('a')") == "42501"
        assert sqlstate_of(a, "DELETE FROM tasker_tasks") == "42501"
        assert sqlstate_of(a, "SELECT tasker_core.enable_tracking()") == "42501"


def test_a_role_without_a_tasker_role_gets_nothing(logins):
    db, login = logins
    with login("nobody") as n:
        for sql in ["SELECT * FROM tasker_core.claim_steps('n')", "SELECT tasker_core.metrics()",
                    "SELECT * FROM tasker_core.get_step_readiness_status(1)",
                    "SELECT * FROM tasker_core.events_after(NULL)"]:
            assert sqlstate_of(n, sql) == "42501", sql


def test_an_application_role_writing_the_tables_keeps_the_maintained_state(logins):
    """The trigger functions run as the owner: a role that may write the Tasker tables, and has
    no privilege on tasker_core's tables, still keeps tasker_core.step_state right."""
    db, login = logins
    with login("writer") as app:
        assert sqlstate_of(app, "SELECT * FROM tasker_core.step_state") == "42501"
        app.execute("UPDATE tasker_workflow_steps SET retry_limit = 7")
        step = app.execute("SELECT workflow_step_id FROM tasker_workflow_steps ORDER BY 1 LIMIT 1").fetchone()[0]
        app.execute("UPDATE tasker_workflow_step_transitions SET most_recent = false WHERE workflow_step_id = %s", (step,))
        app.execute("""INSERT INTO tasker_workflow_step_transitions
                       (workflow_step_id, to_state, from_state, sort_key, most_recent, metadata, created_at, updated_at)
                       VALUES (%s, 'in_progress', 'pending',
                               (SELECT COALESCE(max(sort_key), 0) + 1 FROM tasker_workflow_step_transitions WHERE workflow_step_id = %s),
                               true, '{}', now(), now())""", (step, step))
    assert db.scalar("SELECT count(*) FROM tasker_core.step_state WHERE retry_limit = 7") == 2
    assert db.scalar("SELECT state FROM tasker_core.step_state WHERE workflow_step_id = %s", (step,)) == "in_progress"
    assert db.execute("SELECT * FROM tasker_core.check_tracking()") == []


INJECTIONS = ["x'); DROP TABLE tasker_tasks; --", 'q"; DROP TABLE tasker_tasks; --', "a$$b", "tasker_events; DROP"]


@pytest.mark.parametrize("evil", INJECTIONS)
def test_names_can_not_inject_sql(logins, evil):
    db, login = logins
    with login("admin") as a:
        template = {"name": evil, "namespace_name": evil, "version": "1.0.0",
                    "step_templates": [{"name": evil, "handler_class": evil},
                                       {"name": "next", "handler_class": "N", "depends_on_step": evil}]}
        state = sqlstate_of(a, "SELECT tasker_core.register_task_template(%s::jsonb)", (json.dumps(template),))
        if state is None:   # accepted: stored literally
            task = a.execute("SELECT tasker_core.create_task(%s, %s, NULL, '{}')", (evil, evil)).fetchone()[0]
            dot = a.execute("SELECT tasker_core.task_graph_dot(%s)", (task,)).fetchone()[0]
            assert dot.count('"') % 2 == 0 or '\\"' in dot
            assert db.scalar("SELECT count(*) FROM tasker_task_namespaces WHERE name = %s", (evil,)) == 1
        else:
            assert state.startswith("TK02") or state in ("22023", "42602"), state
    with login("worker") as w:
        assert w.execute("SELECT count(*) FROM tasker_core.claim_steps('w', ARRAY[%s])", (evil,)).fetchone()[0] in (0, 1)
        assert sqlstate_of(w, "SELECT tasker_core.subscribe(%s)", (evil,)) == "42602"
        assert sqlstate_of(w, "SELECT * FROM tasker_core.poll(%s)", (evil,)) == "42602"
        assert sqlstate_of(w, "SELECT tasker_core.subscribe('ok', ARRAY[%s])", (evil,)) == "22023"
    with db.connect() as su:
        su.execute("SELECT set_config('tasker_core.data_schema', %s, false)", (evil,))
        assert sqlstate_of(su, "SELECT * FROM tasker_core.claim_steps('w')") in ("22023", "3F000", "42602", "TK010")
    assert db.scalar("SELECT to_regclass('public.tasker_tasks') IS NOT NULL")
    assert db.scalar("SELECT count(*) FROM tasker_tasks") >= 1


# --- issue 11 item 3: a worker id is tied to the login that claimed with it -------------------

def error_text(e):
    d = e.diag
    return " ".join(x or "" for x in (str(e), d.message_primary, d.message_detail, d.message_hint, d.context))


WORKER_CALLS = [("complete_step", "SELECT tasker_core.complete_step(%s, %s, '{\"forged\": true}')"),
                ("fail_step", "SELECT tasker_core.fail_step(%s, %s, '{\"message\": \"forged\"}')"),
                ("release_step", "SELECT tasker_core.release_step(%s, %s)"),
                ("heartbeat", "SELECT tasker_core.heartbeat(%s, %s)")]


def test_another_login_can_neither_learn_nor_reuse_a_worker_id(logins):
    db, login = logins
    secret = f"worker-a-{uuid.uuid4().hex[:10]}"
    with login("worker") as a, login("worker2") as b:
        (step,) = a.execute("SELECT workflow_step_id FROM tasker_core.claim_steps(%s)", (secret,)).fetchone()
        before = db.execute("SELECT * FROM tasker_core.step_claims") + db.execute(
            "SELECT workflow_step_id, results, processed, in_process, attempts FROM tasker_workflow_steps ORDER BY 1")
        # B guesses: TK030, and the error does not tell it A's worker id or login
        for fn, sql in WORKER_CALLS:
            with pytest.raises(psycopg.Error) as err:
                b.execute(sql, (step, "guess"))
            assert err.value.sqlstate == "TK030", (fn, str(err.value))
            text = error_text(err.value)
            assert secret not in text and a.info.user not in text, (fn, text)
        # B uses A's worker id (read from a log, a dashboard, an old error): still TK030
        for fn, sql in WORKER_CALLS:
            with pytest.raises(psycopg.Error) as err:
                b.execute(sql, (step, secret))
            assert err.value.sqlstate == "TK030", (fn, str(err.value))
            assert a.info.user not in error_text(err.value), fn
        after = db.execute("SELECT * FROM tasker_core.step_claims") + db.execute(
            "SELECT workflow_step_id, results, processed, in_process, attempts FROM tasker_workflow_steps ORDER BY 1")
        assert after == before, "another login's call changed the step"
        # A still holds its step; the child sees A's results, not forged ones
        assert a.execute("SELECT tasker_core.heartbeat(%s, %s) IS NOT NULL", (step, secret)).fetchone()[0]
        assert a.execute("SELECT tasker_core.complete_step(%s, %s, '{\"by\": \"a\"}')", (step, secret)).fetchone()[0]
        (parents,) = b.execute("SELECT parent_results FROM tasker_core.claim_steps('b1')").fetchone()
        assert parents == {"a": {"by": "a"}}
        assert db.scalar("SELECT worker_id FROM tasker_core.step_claims") == "b1"


def test_an_operator_or_a_superuser_may_finish_another_login_s_step(logins):
    db, login = logins
    db.execute("SELECT tasker_core.create_task('roles', 'roles_flow', NULL, jsonb_build_object('n', g)) "
               "FROM generate_series(1, 3) g")
    with login("worker") as w, login("admin") as adm:
        db.execute(f'GRANT tasker_worker TO "{adm.info.user}"')     # the worker functions, as an operator
        s1, s2, s3, s4 = [r[0] for r in w.execute(
            "SELECT workflow_step_id FROM tasker_core.claim_steps('wa', NULL, 4)").fetchall()]
        assert adm.execute("SELECT tasker_core.heartbeat(%s, 'wa') IS NOT NULL", (s1,)).fetchone()[0]
        assert adm.execute("SELECT tasker_core.complete_step(%s, 'wa', '{\"by\": \"admin\"}')", (s1,)).fetchone()[0]
        assert adm.execute("SELECT tasker_core.release_step(%s, 'wa')", (s2,)).fetchone()[0]
        assert adm.execute("SELECT tasker_core.fail_step(%s, 'wa', '{\"by\": \"admin\"}', false)", (s3,)).fetchone()[0] is None
        with db.connect() as su:
            assert su.execute("SELECT tasker_core.complete_step(%s, 'wa', '{\"by\": \"superuser\"}')", (s4,)).fetchone()[0]
        states = dict(db.execute("SELECT workflow_step_id, to_state FROM tasker_workflow_step_transitions "
                                 "WHERE most_recent AND workflow_step_id = ANY(%s)", ([s1, s2, s3, s4],)))
        assert states == {s1: "complete", s2: "error", s3: "error", s4: "complete"}
        assert db.scalar("SELECT results FROM tasker_workflow_steps WHERE workflow_step_id = %s", (s4,)) == {"by": "superuser"}


# --- issue 11 item 12: subscription creation under one lock, and a cap per login -------------

@pytest.mark.parametrize("first_commits", [True, False], ids=["first-commits", "first-rolls-back"])
def test_two_logins_racing_to_create_one_subscription(logins, first_commits):
    db, login = logins
    with login("worker") as w1, login("worker2") as w2:
        w1.execute("BEGIN")
        w1.execute("SELECT tasker_core.subscribe('contested', ARRAY['task.*'])")
        box = {}
        th = threading.Thread(target=lambda: box.setdefault(
            "state", sqlstate_of(w2, "SELECT tasker_core.subscribe('contested', ARRAY['*'])")))
        th.start()
        with db.connect() as probe:
            for _ in range(100):           # until the second login waits for the first
                if not th.is_alive() or probe.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE usename = %s AND wait_event_type = 'Lock'",
                        (w2.info.user,)).fetchone()[0]:
                    break
                time.sleep(0.02)
        w1.execute("COMMIT" if first_commits else "ROLLBACK")
        th.join(30)
        assert not th.is_alive()
        row = db.execute("SELECT owner::text, patterns FROM tasker_core.subscriptions WHERE name = 'contested'")
        if first_commits:
            assert box["state"] == "42501", box
            assert row == [(w1.info.user, ["task.*"])], "the first login's subscription was overwritten"
        else:
            assert box["state"] is None, box
            assert row == [(w2.info.user, ["*"])]


def test_subscriptions_per_login_are_capped(logins):
    db, login = logins
    with login("worker") as w, login("worker2") as w2:
        w.execute("SELECT count(tasker_core.subscribe('cap-' || g)) FROM generate_series(1, 1000) g")
        assert db.scalar("SELECT count(*) FROM tasker_core.subscriptions") == 1000
        with pytest.raises(psycopg.Error) as err:
            w.execute("SELECT tasker_core.subscribe('cap-1001')")
        assert err.value.sqlstate == "54000", str(err.value)
        assert "1000" in str(err.value)
        assert db.scalar("SELECT count(*) FROM tasker_core.subscriptions") == 1000
        # changing the patterns of one it has is not one more
        w.execute("SELECT tasker_core.subscribe('cap-1', ARRAY['task.*'])")
        # the cap is per login
        w2.execute("SELECT tasker_core.subscribe('other-1')")
        # unsubscribing makes room
        assert w.execute("SELECT tasker_core.unsubscribe('cap-2')").fetchone()[0] is True
        w.execute("SELECT tasker_core.subscribe('cap-1001')")
        assert sqlstate_of(w, "SELECT tasker_core.subscribe('cap-1002')") == "54000"
