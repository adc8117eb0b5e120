"""Operations: verify(), metrics(), health(), and crash safety — a backend killed with SIGKILL
mid-call and PostgreSQL restarted with `pg_ctl -m immediate` under a running workload lose
nothing, and verify() is empty afterwards."""
import os
import shutil
import signal
import subprocess
import threading
import time

import psycopg
import pytest

from conftest import ROOT, run_all

TEMPLATE = """{"name": "ops_flow", "namespace_name": "ops", "version": "1.0.0",
  "step_templates": [
    {"name": "a", "handler_class": "A"},
    {"name": "b", "handler_class": "B", "depends_on_step": "a"},
    {"name": "c", "handler_class": "C", "depends_on_step": "a"},
    {"name": "d", "handler_class": "D", "depends_on_steps": ["b", "c"]}]}"""


def setup_db(db, tasks=3):
    db.scalar("SELECT tasker_core.install_schema()")
    db.scalar("SELECT tasker_core.enable_tracking()")
    db.scalar("SELECT tasker_core.register_task_template(%s::jsonb)", (TEMPLATE,))
    db.execute("SELECT tasker_core.create_task('ops', 'ops_flow', NULL, jsonb_build_object('i', i)) "
               "FROM generate_series(1, %s) i", (tasks,))


def test_verify_is_empty_on_a_healthy_run_and_names_each_violation(db):
    setup_db(db)
    assert db.execute("SELECT * FROM tasker_core.verify()") == [], "tasks not started yet are consistent"
    run_all(db)
    assert db.execute("SELECT * FROM tasker_core.verify()") == []
    # break each invariant by hand, the way a bad script or a restore might
    db.execute("UPDATE tasker_tasks SET complete = false WHERE task_id = 1")
    db.execute("UPDATE tasker_workflow_step_transitions SET sort_key = -1 WHERE most_recent AND workflow_step_id = 2")
    db.execute("DELETE FROM tasker_core.events WHERE step_id = 3 AND name = 'step.completed'")
    db.execute("""INSERT INTO tasker_core.step_claims (workflow_step_id, task_id, worker_id, lease_seconds, lease_expires_at)
                  VALUES (4, 1, 'ghost', 30, now() + interval '30 seconds')""")
    found = {(c, e, i) for c, e, i, _ in db.execute("SELECT * FROM tasker_core.verify()")}
    assert ("task_state_consistent", "task", 1) in found
    assert ("sort_key_increasing", "step", 2) in found
    assert ("transition_has_event", "step", 3) in found
    assert ("lease_matches_state", "step", 4) in found


def test_verify_sees_children_started_before_parents(db):
    setup_db(db, tasks=1)
    # Rails-style writes that bypass the guards: the child starts while its parent is pending
    db.execute("""INSERT INTO tasker_workflow_step_transitions (to_state, metadata, sort_key, most_recent,
                  workflow_step_id, created_at, updated_at) VALUES ('in_progress', '{}', 10, true, 2, now(), now())""")
    rows = db.execute("SELECT check_name, id FROM tasker_core.verify()")
    assert ("parents_before_children", 2) in rows


def test_metrics_are_prometheus_text(db):
    setup_db(db, tasks=2)
    step = db.scalar("SELECT workflow_step_id FROM tasker_core.claim_steps('m', NULL, 1, 30)")
    db.scalar("SELECT tasker_core.complete_step(%s, 'm', '{}')", (step,))
    text = db.scalar("SELECT tasker_core.metrics()")
    lines = [l for l in text.splitlines() if l and not l.startswith("#")]
    samples = {l.rsplit(" ", 1)[0]: float(l.rsplit(" ", 1)[1]) for l in lines}
    assert samples['tasker_tasks{state="in_progress"}'] == 1
    assert samples['tasker_tasks{state="pending"}'] == 1
    assert samples['tasker_steps{state="complete"}'] == 1
    assert samples['tasker_steps{state="pending"}'] == 7
    assert samples["tasker_steps_ready"] == 3       # b and c of task 1, a of task 2
    assert samples['tasker_steps_completed_total{namespace="ops"}'] == 1
    assert samples["tasker_events_written_total"] >= 5
    # every sample has HELP and TYPE
    for name in {k.split("{")[0] for k in samples}:
        assert f"# HELP {name} " in text and f"# TYPE {name} " in text
    # label values escape backslash, double quote and newline (a name Rails may have written)
    db.execute("UPDATE tasker_task_namespaces SET name = %s WHERE name = 'ops'", ('o"p\\s\nx',))
    text = db.scalar("SELECT tasker_core.metrics()")
    assert 'tasker_steps_completed_total{namespace="o\\"p\\\\s\\nx"} 1\n' in text, text
    assert all(l.startswith("#") or l.startswith("tasker_") for l in text.splitlines())


def test_health_reports_each_check(db):
    rows = db.execute("SELECT * FROM tasker_core.health()")
    assert all(r[0] is False for r in rows)
    setup_db(db, tasks=1)
    rows = {r[1]: r[2] for r in db.execute("SELECT * FROM tasker_core.health()")}
    assert rows == {"schema_installed": True, "tracking_enabled": True, "timers_running": True, "wakeups": True}


# --- crash safety, on a cluster of its own ------------------------------------------------

def cluster(cmd, cluster_dir):
    return subprocess.run([ROOT / "scripts" / "cluster.sh", cmd], capture_output=True, text=True,
                          env=dict(os.environ, TASKER_CLUSTER_DIR=str(cluster_dir)))


def pg_ctl(args, cluster_dir):
    bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()
    cmd = [f"{bindir}/pg_ctl", *args, "-D", str(cluster_dir / "data")]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--"] + cmd
    return subprocess.run(cmd, capture_output=True, text=True)


def test_workload_survives_sigkill_and_immediate_restart():
    cluster_dir = ROOT / "target" / "crash-cluster"
    cluster("stop", cluster_dir)
    shutil.rmtree(cluster_dir, ignore_errors=True)
    assert cluster("start", cluster_dir).returncode == 0
    port = (cluster_dir / "port").read_text().strip()
    conninfo = dict(host="127.0.0.1", port=port, user="postgres", dbname="crash", autocommit=True)
    try:
        with psycopg.connect(**dict(conninfo, dbname="postgres")) as admin:
            admin.execute("CREATE DATABASE crash")
        with psycopg.connect(**conninfo) as conn:
            conn.execute("CREATE EXTENSION tasker_core")
            conn.execute("SELECT tasker_core.install_schema()")
            conn.execute("SELECT tasker_core.enable_tracking()")
            conn.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (TEMPLATE,))
            conn.execute("SELECT tasker_core.create_task('ops', 'ops_flow', NULL, jsonb_build_object('i', i)) "
                         "FROM generate_series(1, 150) i")
        stop = threading.Event()
        errors = []

        def worker(name):
            conn = None
            while not stop.is_set():
                try:
                    if conn is None or conn.closed:
                        conn = psycopg.connect(**conninfo)
                    rows = conn.execute("SELECT workflow_step_id FROM tasker_core.claim_steps(%s, NULL, 2, 2)",
                                        (name,)).fetchall()
                    if not rows:
                        time.sleep(0.05)
                    for (step,) in rows:
                        time.sleep(0.005)
                        try:
                            conn.execute("SELECT tasker_core.complete_step(%s, %s, '{}')", (step, name))
                        except psycopg.Error as e:
                            if e.sqlstate != "TK030":   # the lease was lost across the crash
                                raise
                except (psycopg.OperationalError, psycopg.errors.AdminShutdown, psycopg.InterfaceError):
                    conn = None
                    time.sleep(0.2)                     # the server is restarting
                except psycopg.Error as e:
                    errors.append((name, e.sqlstate, str(e)))
                    conn = None

        threads = [threading.Thread(target=worker, args=(f"crash-{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        # SIGKILL a backend in the middle of a call: the postmaster resets every backend.
        with psycopg.connect(**conninfo) as probe:
            pid = probe.execute("SELECT pid FROM pg_stat_activity WHERE application_name = '' AND datname = 'crash' "
                                "AND pid <> pg_backend_pid() AND state = 'active' LIMIT 1").fetchone()
            if pid is None:
                pid = probe.execute("SELECT pid FROM pg_stat_activity WHERE datname = 'crash' "
                                    "AND pid <> pg_backend_pid() LIMIT 1").fetchone()
        os.kill(pid[0], signal.SIGKILL)
        time.sleep(2.0)
        # and an immediate restart in the middle of the workload
        res = pg_ctl(["restart", "-m", "immediate", "-w", "-t", "60", "-l", str(cluster_dir / "server.log"),
                      "-o", f"-p {port}"], cluster_dir)
        assert res.returncode == 0, res.stderr
        deadline = time.time() + 90
        done = False
        while time.time() < deadline and not done:
            time.sleep(0.5)
            try:
                with psycopg.connect(**conninfo) as conn:
                    done = conn.execute("SELECT count(*) = 0 FROM tasker_tasks WHERE NOT complete").fetchone()[0]
            except psycopg.OperationalError:
                pass
        stop.set()
        for t in threads:
            t.join(timeout=10)
        assert not errors, errors[:5]
        assert done, "the workload did not finish after the crashes"
        with psycopg.connect(**conninfo) as conn:
            assert conn.execute("SELECT count(*) FROM tasker_workflow_steps WHERE NOT processed").fetchone()[0] == 0
            assert conn.execute("SELECT * FROM tasker_core.verify()").fetchall() == []
            # every step completed exactly once
            twice = conn.execute("""SELECT workflow_step_id FROM tasker_workflow_step_transitions
                                    WHERE to_state = 'complete' GROUP BY 1 HAVING count(*) > 1""").fetchall()
            assert twice == []
    finally:
        cluster("stop", cluster_dir)


def test_metrics_and_verify_without_the_tables_raise_tk010(db):
    """Issue 11 item 13: they raised PostgreSQL's 42P01 where every other function says TK010."""
    for sql in ["SELECT tasker_core.metrics()", "SELECT * FROM tasker_core.verify()"]:
        with pytest.raises(psycopg.Error) as err:
            db.execute(sql)
        assert err.value.sqlstate == "TK010", (sql, err.value.sqlstate, str(err.value))
    db.execute("CREATE SCHEMA elsewhere")
    setup_db(db, tasks=1)
    with db.connect() as conn:
        conn.execute("SET tasker_core.data_schema = 'elsewhere'")
        for sql in ["SELECT tasker_core.metrics()", "SELECT * FROM tasker_core.verify()"]:
            with pytest.raises(psycopg.Error) as err:
                conn.execute(sql)
            assert err.value.sqlstate == "TK010", (sql, err.value.sqlstate, str(err.value))
