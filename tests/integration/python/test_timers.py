"""Timers: tick() and the background worker wake listeners when leases or backoffs run out,
without any client polling the tables."""
import os
import shutil
import subprocess
import time

import psycopg
import pytest

from conftest import ROOT, create_database, drop_database

TEMPLATE = """{"name": "timed", "namespace_name": "timers", "version": "1.0.0",
  "step_templates": [{"name": "only", "handler_class": "Only"}]}"""


def prepare(db):
    db.scalar("SELECT tasker_core.install_schema()")
    db.scalar("SELECT tasker_core.enable_tracking()")
    db.scalar("SELECT tasker_core.register_task_template(%s::jsonb)", (TEMPLATE,))
    return db.scalar("SELECT tasker_core.create_task('timers', 'timed', NULL, '{}')")


def step_state(db, task_id):
    return db.execute("""SELECT s.state, t.metadata ->> 'reason' FROM tasker_core.step_state s
                         JOIN tasker_workflow_step_transitions t ON t.id = s.state_transition_id
                         WHERE s.task_id = %s""", (task_id,))[0]


def wait_for_notify(conn, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        for n in conn.notifies(timeout=0.2, stop_after=1):
            return n
    return None


def test_tick_expires_leases_and_wakes_listeners(db):
    task = prepare(db)
    step = db.scalar("SELECT workflow_step_id FROM tasker_core.claim_steps('w1', NULL, 1, 1)")
    with db.connect() as listener:
        listener.execute("LISTEN tasker_ready")
        assert db.scalar("SELECT tasker_core.tick()") == 0          # the lease still runs
        assert wait_for_notify(listener, 0.3) is None
        time.sleep(1.2)
        assert db.scalar("SELECT tasker_core.tick()") == 1
        # one wake-up per transaction: tick's, or the one finalizing the task (its step is ready
        # again) sent first in the same transaction
        n = wait_for_notify(listener, 2)
        assert n is not None and ('"tick"' in n.payload or f'"task_id":{task}' in n.payload), n
    assert step_state(db, task) == ("error", "lease_expired")
    with pytest.raises(psycopg.Error) as err:
        db.scalar("SELECT tasker_core.complete_step(%s, 'w1', '{}')", (step,))
    assert err.value.sqlstate == "TK030"
    assert db.scalar("SELECT workflow_step_id FROM tasker_core.claim_steps('w2', NULL, 1, 30)") == step


def test_tick_announces_ended_backoffs(db):
    prepare(db)
    step = db.scalar("SELECT workflow_step_id FROM tasker_core.claim_steps('w1', NULL, 1, 30)")
    assert db.scalar("SELECT tasker_core.fail_step(%s, 'w1', '{}', true, 1)", (step,)) == 1
    db.scalar("SELECT tasker_core.tick()")
    with db.connect() as listener:
        listener.execute("LISTEN tasker_ready")
        time.sleep(1.1)
        assert db.scalar("SELECT tasker_core.tick()") == 1
        assert wait_for_notify(listener, 2) is not None
        assert db.scalar("SELECT tasker_core.tick()") == 0         # announced once


def test_background_worker_runs_tick_without_any_client():
    """A cluster with tasker_core in shared_preload_libraries: nobody calls tick(), yet an
    expired lease is failed and listeners are woken."""
    cluster_dir = ROOT / "target" / "timer-cluster"
    subprocess.run([ROOT / "scripts" / "cluster.sh", "stop"], capture_output=True,
                   env=dict(os.environ, TASKER_CLUSTER_DIR=str(cluster_dir)))
    shutil.rmtree(cluster_dir, ignore_errors=True)      # a fresh cluster: no tick_db yet
    env = dict(os.environ, TASKER_CLUSTER_DIR=str(cluster_dir),
               TASKER_PG_OPTS="-c shared_preload_libraries=tasker_core -c tasker_core.tick_database=tick_db "
                              "-c tasker_core.tick_interval_ms=200")
    subprocess.run([ROOT / "scripts" / "cluster.sh", "start"], env=env, check=True, capture_output=True)
    try:
        port = (cluster_dir / "port").read_text().strip()
        conninfo = dict(host="127.0.0.1", port=port, user="postgres", autocommit=True)
        with psycopg.connect(dbname="postgres", **conninfo) as admin:
            admin.execute("CREATE DATABASE tick_db")
            # The worker started with the cluster, found no tick_db and exited; the postmaster
            # restarts it 5 s later, now that the database exists.
            deadline = time.time() + 15
            while time.time() < deadline:
                workers = admin.execute("SELECT count(*) FROM pg_stat_activity "
                                        "WHERE backend_type = 'tasker_core timer'").fetchone()[0]
                if workers == 1:
                    break
                time.sleep(0.2)
            assert workers == 1
        with psycopg.connect(dbname="tick_db", **conninfo) as conn:
            conn.execute("CREATE EXTENSION tasker_core")
            conn.execute("SELECT tasker_core.install_schema()")
            conn.execute("SELECT tasker_core.enable_tracking()")
            conn.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (TEMPLATE,))
            task = conn.execute("SELECT tasker_core.create_task('timers', 'timed', NULL, '{}')").fetchone()[0]
            conn.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w1', NULL, 1, 1)")
            conn.execute("LISTEN tasker_ready")
            n = wait_for_notify(conn, 5)
            assert n is not None, "the background worker did not wake the listener"
            state = conn.execute("""SELECT s.state, t.metadata ->> 'reason' FROM tasker_core.step_state s
                                    JOIN tasker_workflow_step_transitions t ON t.id = s.state_transition_id
                                    WHERE s.task_id = %s""", (task,)).fetchone()
            assert state == ("error", "lease_expired")
    finally:
        subprocess.run([ROOT / "scripts" / "cluster.sh", "stop"], env=env, capture_output=True)
