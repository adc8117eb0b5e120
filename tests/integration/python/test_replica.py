"""Read replicas (docs/scaling.md): a hot standby made by PostgreSQL's own streaming
replication (pg_basebackup -R from a primary of its own), on this machine. The functions the
documentation lists as safe on a standby run there and return the primary's answers; the ones
that write fail with PostgreSQL's read-only error (25006); an event consumer polling the
standby with its own cursor sees every event of the primary exactly once, in order."""
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

ROOT = Path(os.environ.get("TASKER_ROOT", Path(__file__).resolve().parents[3]))
BASE = ROOT / "target" / "replica"
FAKE_NOW = "2026-12-01 12:00:00+00"

TEMPLATE = {"name": "ship", "namespace_name": "replica", "version": "1.0.0",
            "step_templates": [
                {"name": "fetch", "handler_class": "F"},
                {"name": "pack", "handler_class": "P", "depends_on_step": "fetch",
                 "map": {"over": "/parents/fetch/items"}},
                {"name": "gift", "handler_class": "G", "depends_on_step": "fetch",
                 "condition": {"path": "/context/gift", "eq": True}},
                {"name": "send", "handler_class": "S", "depends_on_steps": ["pack", "gift"]}]}


def cluster(name, action, **extra):
    env = dict(os.environ, TASKER_CLUSTER_DIR=str(BASE / name), **extra)
    return subprocess.run([ROOT / "scripts" / "cluster.sh", action], env=env, capture_output=True, text=True)


def as_postgres(args):
    """Runs a PostgreSQL client program as the postgres user when we are root (the data
    directories belong to it)."""
    if os.geteuid() == 0:
        args = ["runuser", "-u", "postgres", "--", *args]
    return subprocess.run(args, capture_output=True, text=True)


def bindir():
    return subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip()


def conninfo(name, db="app"):
    port = (BASE / name / "port").read_text().strip()
    return dict(host="127.0.0.1", port=port, user="postgres", dbname=db, autocommit=True)


@pytest.fixture(scope="module")
def pair():
    """A primary with tasker_core and a workload, and a hot standby streaming from it."""
    for name in ("standby", "primary"):
        cluster(name, "stop")
    shutil.rmtree(BASE, ignore_errors=True)
    started = cluster("primary", "start")
    assert started.returncode == 0, started.stderr
    try:
        with psycopg.connect(**conninfo("primary", "postgres")) as admin:
            admin.execute("CREATE DATABASE app")
        with psycopg.connect(**conninfo("primary")) as p:
            p.execute("CREATE EXTENSION tasker_core")
            p.execute("SELECT tasker_core.install_schema()")
            p.execute("SELECT tasker_core.enable_tracking()")
            p.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (json.dumps(TEMPLATE),))
        standby = BASE / "standby"
        standby.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(standby, "postgres", "postgres")
        port = conninfo("primary")["port"]
        backup = as_postgres([f"{bindir()}/pg_basebackup", "-h", "127.0.0.1", "-p", port, "-U", "postgres",
                              "-D", str(standby / "data"), "-R", "-X", "stream", "-c", "fast", "--no-sync"])
        assert backup.returncode == 0, backup.stderr
        started = cluster("standby", "start")
        assert started.returncode == 0, started.stderr
        with psycopg.connect(**conninfo("standby")) as s:
            assert s.execute("SELECT pg_is_in_recovery()").fetchone()[0]
        yield
    finally:
        for name in ("standby", "primary"):
            cluster(name, "stop")


def primary():
    return psycopg.connect(**conninfo("primary"))


def standby():
    return psycopg.connect(**conninfo("standby"))


def caught_up(timeout=30):
    """Waits until the standby has replayed everything the primary wrote so far. The insert
    position, not the write position: the test clusters run with synchronous_commit = off, so
    a commit record may still sit in the WAL buffers (not yet written, not yet streamed)."""
    with primary() as p:
        lsn = p.execute("SELECT pg_current_wal_insert_lsn()").fetchone()[0]
    deadline = time.time() + timeout
    with standby() as s:
        while time.time() < deadline:
            if s.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0]:
                return
            time.sleep(0.05)
    raise AssertionError(f"the standby did not replay up to {lsn} in {timeout} s")


def work(p, steps, worker="w"):
    """Claims and completes up to `steps` steps on the primary."""
    done = 0
    while done < steps:
        rows = p.execute("SELECT workflow_step_id, step_name FROM tasker_core.claim_steps(%s, NULL, 5, 60)",
                         (worker,)).fetchall()
        if not rows:
            return done
        for step, name in rows:
            results = {"items": [1, 2, 3]} if name == "fetch" else {"ok": step}
            p.execute("SELECT tasker_core.complete_step(%s, %s, %s::jsonb)", (step, worker, json.dumps(results)))
            done += 1
    return done


READS = [
    "SELECT * FROM tasker_core.get_step_readiness_status(%(t)s::bigint) ORDER BY workflow_step_id",
    "SELECT * FROM tasker_core.get_step_readiness_status_batch(%(ts)s::bigint[]) ORDER BY task_id, workflow_step_id",
    "SELECT * FROM tasker_core.get_task_execution_context(%(t)s::bigint)",
    "SELECT * FROM tasker_core.get_task_execution_contexts_batch(%(ts)s::bigint[]) ORDER BY task_id",
    "SELECT * FROM tasker_core.calculate_dependency_levels(%(t)s::bigint) ORDER BY workflow_step_id",
    "SELECT * FROM tasker_core.step_dag_relationships(%(t)s::bigint) ORDER BY workflow_step_id",
    "SELECT * FROM tasker_core.get_system_health_counts_v01()",
    # (its last two columns are the period it covers, which ends at the transaction's now())
    "SELECT * FROM tasker_core.get_analytics_metrics_v01(%(since)s::timestamptz)",
    "SELECT tasker_core.task_graph_dot(%(t)s::bigint)",
    "SELECT * FROM tasker_core.explain_task(%(t)s::bigint) ORDER BY 1, 3, 5",
    "SELECT * FROM tasker_core.verify()",
    "SELECT * FROM tasker_core.check_tracking()",
    "SELECT cursor, id, name, task_id, step_id FROM tasker_core.events_after(NULL, 10000)",
    "SELECT tasker_core.metrics()",
]


def test_reads_on_the_standby_return_the_primarys_answers(pair):
    with primary() as p:
        tasks = [p.execute("SELECT tasker_core.create_task('replica', 'ship', NULL, %s::jsonb)",
                           (json.dumps({"gift": i % 2 == 0, "i": i}),)).fetchone()[0] for i in range(6)]
        work(p, 14)  # some tasks finished, some mid-map, some not started
    caught_up()
    args = {"t": tasks[0], "ts": tasks, "since": "2026-01-01 00:00+00"}
    with primary() as p, standby() as s:
        for c in (p, s):
            c.execute("SELECT set_config('tasker_core.fake_now', %s, false)", (FAKE_NOW,))
        for sql in READS:
            on_primary = p.execute(sql, args).fetchall()
            on_standby = s.execute(sql, args).fetchall()
            if "analytics" in sql:
                on_primary, on_standby = [r[:-1] for r in on_primary], [r[:-1] for r in on_standby]
            if "tasker_core.metrics()" in sql:
                # tasker_events_written_total reads the event sequence, which a standby sees up
                # to 32 values ahead (PostgreSQL logs sequences ahead of use): every other line
                def lines(rows):
                    return [x for x in rows[0][0].splitlines() if not x.startswith("tasker_events_written_total")]
                on_primary, on_standby = [lines(on_primary)], [lines(on_standby)]
            assert on_standby == on_primary, sql
            # (verify() and check_tracking() are empty when all is well, on both)
            assert on_primary or "verify" in sql or "check_tracking" in sql, f"nothing to compare: {sql}"
        # and for every task, the readiness and the context
        for t in tasks:
            for sql in READS[:1] + READS[2:3]:
                assert s.execute(sql, {"t": t}).fetchall() == p.execute(sql, {"t": t}).fetchall()


@pytest.mark.parametrize("sql", [
    "SELECT * FROM tasker_core.claim_steps('w', NULL, 1, 60)",
    "SELECT tasker_core.create_task('replica', 'ship', NULL, '{}')",
    "SELECT tasker_core.complete_step(1, 'w', '{}')",
    "SELECT tasker_core.transition_step(1, 'cancelled')",
    "SELECT tasker_core.cancel_task(1)",
    "SELECT tasker_core.tick()",
    "SELECT tasker_core.subscribe('standby')",
    "SELECT tasker_core.register_task_template('{\"name\": \"x\", \"step_templates\": [{\"name\": \"a\", \"handler_class\": \"A\"}]}')",
])
def test_writes_on_the_standby_fail_with_the_read_only_error(pair, sql):
    with standby() as s:
        with pytest.raises(psycopg.Error) as e:
            s.execute(sql)
        assert e.value.sqlstate == "25006", (e.value.sqlstate, str(e.value))


def test_a_consumer_polling_the_standby_sees_every_event_once(pair):
    """Workers run on the primary while a consumer polls the standby with its own cursor; after
    the work, the consumer has every event of the primary's log exactly once, in log order."""
    with primary() as p:
        start = p.execute("SELECT tasker_core.event_horizon()").fetchone()[0]
        for i in range(10):
            p.execute("SELECT tasker_core.create_task('replica', 'ship', NULL, %s::jsonb)",
                      (json.dumps({"gift": i % 3 == 0, "n": i}),))
    seen = []
    stop = threading.Event()
    errors = []

    def consume():
        cursor = start
        try:
            with standby() as s:
                while True:
                    rows = s.execute("SELECT cursor, id FROM tasker_core.events_after(%s, 100)", (cursor,)).fetchall()
                    seen.extend(r[1] for r in rows)
                    if rows:
                        cursor = rows[-1][0]
                    elif stop.is_set():
                        return
                    else:
                        time.sleep(0.02)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    consumer = threading.Thread(target=consume)
    consumer.start()
    def run(k):
        with primary() as p:
            work(p, 1000, f"w{k}")

    workers = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    caught_up()
    time.sleep(0.3)  # one more poll after the last replayed event
    stop.set()
    consumer.join(60)
    assert not errors, errors
    with primary() as p:
        expected = [r[0] for r in p.execute("SELECT id FROM tasker_core.events_after(%s, 10000)", (start,))]
    assert len(expected) > 100
    assert seen == expected
