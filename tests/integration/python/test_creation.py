"""create_task's write path: a new task's steps, edges and maintained rows in one statement,
and templates parsed once per backend and row version."""
import threading

from psycopg.types.json import Jsonb


def tmpl(steps, version="1.0.0"):
    return {"name": "made", "namespace_name": "create", "version": version,
            "step_templates": [{"name": n, "handler_class": "H", **({"depends_on_steps": d} if d else {})}
                               for n, d in steps]}


def step_names(conn, task):
    return [r[0] for r in conn.execute(
        "SELECT name FROM tasker_core.step_state WHERE task_id = %s ORDER BY workflow_step_id", (task,))]


def test_the_maintained_rows_of_a_new_task_equal_a_recomputation(tasker_db):
    tasker_db.scalar("SELECT tasker_core.enable_tracking()")
    dag = [("a", []), ("b", ["a"]), ("c", ["a"]), ("d", ["b", "c"]), ("e", ["d", "a"]), ("f", []),
           ("g", ["f", "e", "b"])]
    tasker_db.scalar("SELECT tasker_core.register_task_template(%s)", (Jsonb(tmpl(dag)),))
    with tasker_db.connect() as conn:
        for i in range(5):
            conn.execute("SELECT tasker_core.create_task('create', 'made', NULL, %s)", (Jsonb({"i": i}),))
        assert conn.execute("SELECT * FROM tasker_core.check_tracking()").fetchall() == []
        # the ready roots are claimable, the rest blocked
        claimed = {r[0] for r in conn.execute(
            "SELECT step_name FROM tasker_core.claim_steps('w', ARRAY['create'], 100, 60)")}
        assert claimed == {"a", "f"}


def test_a_re_registered_template_is_parsed_again(tasker_db):
    tasker_db.scalar("SELECT tasker_core.enable_tracking()")
    tasker_db.scalar("SELECT tasker_core.register_task_template(%s)", (Jsonb(tmpl([("a", []), ("b", ["a"])])),))
    with tasker_db.connect() as conn, tasker_db.connect() as admin:
        first = conn.execute("SELECT tasker_core.create_task('create', 'made', NULL, '{}')").fetchone()[0]
        assert step_names(conn, first) == ["a", "b"]
        # the same name and version, registered again elsewhere with a third step
        admin.execute("SELECT tasker_core.register_task_template(%s)",
                      (Jsonb(tmpl([("a", []), ("b", ["a"]), ("c", ["b"])])),))
        second = conn.execute("SELECT tasker_core.create_task('create', 'made', NULL, '{}')").fetchone()[0]
        assert step_names(conn, second) == ["a", "b", "c"]
        # and a newer version is chosen by default
        admin.execute("SELECT tasker_core.register_task_template(%s)", (Jsonb(tmpl([("z", [])], "1.1.0")),))
        third = conn.execute("SELECT tasker_core.create_task('create', 'made', NULL, '{}')").fetchone()[0]
        assert step_names(conn, third) == ["z"]
        assert conn.execute("SELECT * FROM tasker_core.check_tracking()").fetchall() == []


def test_concurrent_creation_keeps_the_tracking_exact(tasker_db):
    tasker_db.scalar("SELECT tasker_core.enable_tracking()")
    tasker_db.scalar("SELECT tasker_core.register_task_template(%s)",
                     (Jsonb(tmpl([("a", []), ("b", ["a"]), ("c", ["a", "b"])])),))
    errors = []

    def create(n):
        try:
            with tasker_db.connect() as c:
                for i in range(30):
                    c.execute("SELECT tasker_core.create_task('create', 'made', NULL, %s)", (Jsonb({"n": n, "i": i}),))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=create, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert tasker_db.scalar("SELECT count(*) FROM tasker_workflow_steps") == 540
    assert tasker_db.execute("SELECT * FROM tasker_core.check_tracking()") == []
    assert tasker_db.execute("SELECT * FROM tasker_core.verify()") == []


def test_without_tracking_creation_writes_no_maintained_rows(tasker_db):
    tasker_db.scalar("SELECT tasker_core.register_task_template(%s)", (Jsonb(tmpl([("a", []), ("b", ["a"])])),))
    task = tasker_db.scalar("SELECT tasker_core.create_task('create', 'made', NULL, '{}')")
    assert tasker_db.scalar("SELECT count(*) FROM tasker_workflow_steps WHERE task_id = %s", (task,)) == 2
    assert tasker_db.scalar("SELECT count(*) FROM tasker_workflow_step_edges") == 1
    assert tasker_db.scalar("SELECT count(*) FROM tasker_core.step_state") == 0
