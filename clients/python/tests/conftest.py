"""Fixtures: a fresh database per test (tasker_core, the Tasker schema, tracking), dropped after.

The cluster is found through the libpq environment (PGHOST, PGPORT, PGUSER); when PGPORT is not
set and this checkout has the throwaway cluster (scripts/cluster.sh), its settings are used.
"""
import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg.types.json import Jsonb

HERE = Path(__file__).resolve().parent
PACKAGE_ROOT = HERE.parent
sys.path.insert(0, str(PACKAGE_ROOT))

if "PGPORT" not in os.environ:
    cluster = PACKAGE_ROOT.parents[1] / "scripts" / "cluster.sh"
    if cluster.exists():
        out = subprocess.run([str(cluster), "env"], capture_output=True, text=True).stdout
        for word in out.replace("export", " ").split():
            key, _, value = word.partition("=")
            if key.startswith("PG") and value:
                os.environ.setdefault(key, value)


class Database:
    """A scratch database with tasker_core installed and tracking enabled."""

    def __init__(self, name):
        self.name = name
        self.conninfo = f"dbname={name}"

    def connect(self):
        return psycopg.connect(self.conninfo, autocommit=True)

    def rows(self, sql, params=None):
        with self.connect() as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def scalar(self, sql, params=None):
        rows = self.rows(sql, params)
        return rows[0][0] if rows else None

    def register(self, template):
        return self.scalar("SELECT tasker_core.register_task_template(%s)", [Jsonb(template)])

    def create_task(self, template, context=None):
        return self.scalar("SELECT tasker_core.create_task(%s, %s, NULL, %s)",
                           [template["namespace_name"], template["name"], Jsonb(context or {})])

    def task_state(self, task_id):
        return self.scalar("SELECT to_state FROM tasker_task_transitions WHERE task_id = %s AND most_recent",
                           [task_id])

    def step(self, task_id, name):
        """(workflow_step_id, attempts, retryable, results) of the task's step `name`."""
        return self.rows(
            """SELECT ws.workflow_step_id, ws.attempts, ws.retryable, ws.results
               FROM tasker_workflow_steps ws JOIN tasker_named_steps ns USING (named_step_id)
               WHERE ws.task_id = %s AND ns.name = %s""", [task_id, name])[0]

    def transitions(self, step_id):
        """[(from_state, to_state, metadata)] of a step, in order."""
        return self.rows("""SELECT from_state, to_state, metadata FROM tasker_workflow_step_transitions
                            WHERE workflow_step_id = %s ORDER BY sort_key""", [step_id])

    def wait_task(self, task_id, states=("complete", "error"), timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.task_state(task_id)
            if state in states:
                return state
            time.sleep(0.05)
        raise AssertionError(f"task {task_id} still {self.task_state(task_id)!r} after {timeout} s")


def admin():
    return psycopg.connect(dbname="postgres", autocommit=True)


@pytest.fixture
def db():
    name = f"pyworker_{uuid.uuid4().hex[:12]}"
    with admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    database = Database(name)
    try:
        with database.connect() as conn:
            conn.execute("CREATE EXTENSION tasker_core")
            conn.execute("SELECT tasker_core.install_schema()")
            conn.execute("SELECT tasker_core.enable_tracking()")
        yield database
    finally:
        with admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def running(worker):
    """Runs `worker` in a thread; stops it and checks it exited cleanly afterwards."""
    errors = []

    def target():
        try:
            worker.run()
        except BaseException as e:  # surfaced in the test
            errors.append(e)

    t = threading.Thread(target=target, name=f"run-{worker.worker_id}", daemon=True)
    t.start()
    try:
        yield worker
    finally:
        worker.stop()
        t.join(timeout=30)
        assert not t.is_alive(), f"worker {worker.worker_id} did not stop"
        if errors:
            raise errors[0]
