"""Wake-ups off the commit path: with tasker_core preloaded, the notifier background worker
sends the NOTIFY wake-ups of committed worker transactions; without it (or in a database it
does not serve) each transaction sends its own. A cluster of its own, preloaded."""
import os
import shutil
import signal
import subprocess
import time

import psycopg
import pytest

from conftest import ROOT, connect

CHAIN = """{"name": "chain", "namespace_name": "%s", "version": "1.0.0",
  "step_templates": [{"name": "first", "handler_class": "F"},
                     {"name": "second", "handler_class": "S", "depends_on_step": "first"}]}"""

CLUSTER = ROOT / "target" / "wakeup-cluster"
ENV = dict(os.environ, TASKER_CLUSTER_DIR=str(CLUSTER),
           TASKER_PG_OPTS="-c shared_preload_libraries=tasker_core -c tasker_core.tick_database=wake_db "
                          "-c tasker_core.tick_interval_ms=0")


def cluster(cmd):
    return subprocess.run([ROOT / "scripts" / "cluster.sh", cmd], env=ENV, capture_output=True, text=True)


@pytest.fixture(scope="module")
def conninfo():
    cluster("stop")
    shutil.rmtree(CLUSTER, ignore_errors=True)
    started = cluster("start")
    assert started.returncode == 0, started.stderr
    info = dict(host="127.0.0.1", port=(CLUSTER / "port").read_text().strip(), user="postgres",
                autocommit=True)
    with psycopg.connect(dbname="postgres", **info) as admin:
        for db in ("wake_db", "other_db"):
            admin.execute(f"CREATE DATABASE {db}")
    for db in ("wake_db", "other_db"):
        with psycopg.connect(dbname=db, **info) as conn:
            conn.execute("CREATE EXTENSION tasker_core")
            conn.execute("SELECT tasker_core.install_schema()")
            conn.execute("SELECT tasker_core.enable_tracking()")
    notifier_pid(info)                 # started, connected
    yield info
    cluster("stop")


def notifier_pid(info, other_than=None, seconds=15):
    """The notifier's pid once it runs (and is not `other_than`)."""
    deadline = time.time() + seconds
    with psycopg.connect(dbname="postgres", **info) as admin:
        while time.time() < deadline:
            row = admin.execute("SELECT pid FROM pg_stat_activity "
                                "WHERE backend_type = 'tasker_core notifier'").fetchone()
            if row and row[0] != other_than:
                # registered as the notifier of wake_db (it does so right after connecting)
                with psycopg.connect(dbname="wake_db", **info) as c:
                    mode = c.execute("SELECT detail FROM tasker_core.health() "
                                     "WHERE check_name = 'wakeups'").fetchone()[0]
                if mode.startswith(f"notifier: notifier pid {row[0]}:"):
                    return row[0]
            time.sleep(0.1)
    raise AssertionError("the notifier did not start")


def wakeups(conn, seconds):
    """Every notification on the connection within `seconds`."""
    got = []
    deadline = time.time() + seconds
    while time.time() < deadline:
        got.extend(conn.notifies(timeout=max(0.01, deadline - time.time())))
    return got


def ready_first_step(conn, ns, worker="w"):
    """Creates a chain task of namespace `ns` (each test has its own) and claims its first
    step."""
    conn.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (CHAIN % ns,))
    conn.execute("SELECT tasker_core.create_task(%s, 'chain', NULL, '{}')", (ns,))
    return conn.execute("SELECT workflow_step_id FROM tasker_core.claim_steps(%s, ARRAY[%s], 1, 60)",
                        (worker, ns)).fetchone()[0]


def mode(conn):
    return conn.execute("SELECT detail FROM tasker_core.health() WHERE check_name = 'wakeups'").fetchone()[0]


def test_the_notifier_sends_wakeups_after_commit(conninfo):
    pid = notifier_pid(conninfo)
    with psycopg.connect(dbname="wake_db", **conninfo) as work, \
            psycopg.connect(dbname="wake_db", **conninfo) as listener:
        assert mode(work).startswith("notifier:")
        listener.execute("LISTEN tasker_ready")
        first = ready_first_step(work, "alpha")
        wakeups(listener, 0.3)                              # drain the claim's own
        # The notifier stopped: the committed completion's wake-up waits for it — the worker's
        # transaction did not send it.
        os.kill(pid, signal.SIGSTOP)
        try:
            work.execute("SELECT tasker_core.complete_step(%s, 'w', '{}')", (first,))
            assert wakeups(listener, 0.5) == []
        finally:
            os.kill(pid, signal.SIGCONT)
        got = wakeups(listener, 2)
        assert [n.channel for n in got] == ["tasker_ready"], got
        assert '"namespace":"alpha"' in got[0].payload.replace(" ", "")
        # the second step is claimable by the woken worker
        assert listener.execute("SELECT count(*) FROM tasker_core.claim_steps('l', ARRAY['alpha'], 1, 60)"
                                ).fetchone()[0] == 1


def test_events_channel_goes_through_the_notifier_too(conninfo):
    with psycopg.connect(dbname="wake_db", **conninfo) as work, \
            psycopg.connect(dbname="wake_db", **conninfo) as listener:
        listener.execute("LISTEN tasker_events")
        work.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (CHAIN % "events",))
        wakeups(listener, 0.3)
        work.execute("SELECT tasker_core.create_task('events', 'chain', NULL, '{}')")
        got = wakeups(listener, 2)
        assert len(got) == 1 and '"event"' in got[0].payload, got


def test_a_rolled_back_transaction_wakes_nobody(conninfo):
    with psycopg.connect(dbname="wake_db", **conninfo) as work, \
            psycopg.connect(dbname="wake_db", **conninfo) as listener:
        first = ready_first_step(work, "rollback")
        listener.execute("LISTEN tasker_ready")
        wakeups(listener, 0.3)
        with pytest.raises(psycopg.errors.RaiseException):
            work.execute("""DO $$ BEGIN
                              PERFORM tasker_core.complete_step(%s, 'w', '{}');
                              RAISE EXCEPTION 'changed my mind';
                            END $$""" % first)
        assert wakeups(listener, 1.0) == []


def test_one_transaction_wakes_every_namespace_it_readied(conninfo):
    with psycopg.connect(dbname="wake_db", **conninfo) as work, \
            psycopg.connect(dbname="wake_db", **conninfo) as listener:
        a = ready_first_step(work, "multi_a")
        b = ready_first_step(work, "multi_b")
        listener.execute("LISTEN tasker_ready")
        wakeups(listener, 0.3)
        with work.transaction():
            work.execute("SELECT tasker_core.complete_step(%s, 'w', '{}')", (a,))
            work.execute("SELECT tasker_core.complete_step(%s, 'w', '{}')", (b,))
        payloads = " ".join(n.payload.replace(" ", "") for n in wakeups(listener, 1.5))
        assert '"namespace":"multi_a"' in payloads and '"namespace":"multi_b"' in payloads, payloads


FAN = """{"name": "fan", "namespace_name": "%s", "version": "1.0.0",
  "step_templates": [{"name": "root", "handler_class": "R"},
                     {"name": "left", "handler_class": "L", "depends_on_step": "root"},
                     {"name": "right", "handler_class": "R", "depends_on_step": "root"}]}"""


def test_steps_a_transaction_readies_and_claims_itself_wake_nobody(conninfo):
    with psycopg.connect(dbname="wake_db", **conninfo) as work, \
            psycopg.connect(dbname="wake_db", **conninfo) as listener:
        listener.execute("LISTEN tasker_ready")
        work.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (FAN % "selfclaim",))
        work.execute("SELECT tasker_core.create_task('selfclaim', 'fan', NULL, '{\"n\": 1}')")
        root = work.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w', ARRAY['selfclaim'], 1, 60)"
                            ).fetchone()[0]
        wakeups(listener, 0.5)                          # drain the creation's
        # the root's outcome readies two steps; the same call claims both: nobody to wake
        rows = work.execute("SELECT outcome FROM tasker_core.report_and_claim('w', %s::jsonb, "
                            "ARRAY['selfclaim'], 2, 60)",
                            (f'[{{"step_id": {root}}}]',)).fetchall()
        assert [r[0] for r in rows] == ["completed", "claimed", "claimed"], rows
        assert wakeups(listener, 1.0) == []
        # the same again, claiming one of the two: the other still needs a worker
        work.execute("SELECT tasker_core.create_task('selfclaim', 'fan', NULL, '{\"n\": 2}')")
        wakeups(listener, 0.5)
        root = work.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w', ARRAY['selfclaim'], 1, 60)"
                            ).fetchone()[0]
        rows = work.execute("SELECT outcome FROM tasker_core.report_and_claim('w', %s::jsonb, "
                            "ARRAY['selfclaim'], 1, 60)",
                            (f'[{{"step_id": {root}}}]',)).fetchall()
        assert [r[0] for r in rows] == ["completed", "claimed"], rows
        got = wakeups(listener, 1.5)
        assert len(got) == 1 and '"namespace":"selfclaim"' in got[0].payload.replace(" ", ""), got


def test_other_databases_and_a_restarting_notifier_fall_back_to_in_transaction_notify(conninfo):
    # a database the notifier does not serve: each transaction sends its own
    with psycopg.connect(dbname="other_db", **conninfo) as work, \
            psycopg.connect(dbname="other_db", **conninfo) as listener:
        assert mode(work).startswith("in_transaction:")
        first = ready_first_step(work, "alpha")
        listener.execute("LISTEN tasker_ready")
        wakeups(listener, 0.3)
        work.execute("SELECT tasker_core.complete_step(%s, 'w', '{}')", (first,))
        assert len(wakeups(listener, 1.0)) == 1
    # the notifier terminated: until it is back (1 s later), in-transaction NOTIFY; then the
    # notifier again
    pid = notifier_pid(conninfo)
    with psycopg.connect(dbname="wake_db", **conninfo) as work, \
            psycopg.connect(dbname="wake_db", **conninfo) as listener:
        listener.execute("LISTEN tasker_ready")
        steps = [ready_first_step(work, "restart") for _ in range(2)]
        wakeups(listener, 0.3)
        work.execute("SELECT pg_terminate_backend(%s)", (pid,))
        deadline = time.time() + 5
        while time.time() < deadline and not mode(work).startswith("in_transaction:"):
            time.sleep(0.02)
        work.execute("SELECT tasker_core.complete_step(%s, 'w', '{}')", (steps[0],))
        assert len(wakeups(listener, 1.0)) >= 1, "no wake-up while the notifier was down"
        new_pid = notifier_pid(conninfo, other_than=pid)
        assert new_pid != pid
        wakeups(listener, 0.5)                  # the restarted notifier wakes everyone once
        work.execute("SELECT tasker_core.complete_step(%s, 'w', '{}')", (steps[1],))
        got = wakeups(listener, 2)
        assert len(got) == 1 and '"namespace":"restart"' in got[0].payload.replace(" ", ""), got


def test_without_preload_each_transaction_notifies(db):
    """The suite's own cluster does not preload tasker_core: the fallback."""
    db.scalar("SELECT tasker_core.install_schema()")
    db.scalar("SELECT tasker_core.enable_tracking()")
    db.scalar("SELECT tasker_core.register_task_template(%s::jsonb)", (CHAIN % "alpha",))
    with db.connect() as work, db.connect() as listener:
        assert mode(work).startswith("in_transaction: tasker_core is not in shared_preload_libraries")
        first = ready_first_step(work, "alpha")
        listener.execute("LISTEN tasker_ready")
        wakeups(listener, 0.3)
        work.execute("SELECT tasker_core.complete_step(%s, 'w', '{}')", (first,))
        got = wakeups(listener, 1.0)
        assert len(got) == 1 and '"namespace":"alpha"' in got[0].payload.replace(" ", ""), got
