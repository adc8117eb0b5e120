"""Fixtures for integration tests against the throwaway cluster started by run.sh.

Each test that needs a database gets a fresh one with `CREATE EXTENSION tasker_core`, so
tests never see each other's rows and can commit freely.
"""
import os
import uuid
from pathlib import Path

import psycopg
import pytest

ROOT = Path(os.environ.get("TASKER_ROOT", Path(__file__).resolve().parents[3]))


def connect(dbname="postgres", autocommit=True, **kw):
    """A real connection to the cluster (libpq env vars set by run.sh)."""
    return psycopg.connect(dbname=dbname, autocommit=autocommit, **kw)


def sqlstate_of(conn, sql, params=None):
    """The SQLSTATE the statement raises (None when it succeeds)."""
    try:
        conn.execute(sql, params)
    except psycopg.Error as e:
        return e.sqlstate
    return None


def run_all(db, worker="w"):
    """Claims and completes every ready step of the database until none is left."""
    while True:
        rows = db.execute("SELECT workflow_step_id FROM tasker_core.claim_steps(%s, NULL, 10, 30)", (worker,))
        if not rows:
            return
        for (step,) in rows:
            db.scalar("SELECT tasker_core.complete_step(%s, %s, '{}')", (step, worker))


class Database:
    """A scratch database on the cluster."""

    def __init__(self, name):
        self.name = name

    def connect(self, autocommit=True, **kw):
        return connect(self.name, autocommit=autocommit, **kw)

    def execute(self, sql, params=None):
        with self.connect() as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else None

    def scalar(self, sql, params=None):
        with self.connect() as conn:
            row = conn.execute(sql, params).fetchone()
            return None if row is None else row[0]

    def run_file(self, path):
        with self.connect() as conn:
            conn.execute(Path(path).read_text())


def create_database(prefix="t", extension=True):
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db = Database(name)
    if extension:
        with db.connect() as conn:
            conn.execute("CREATE EXTENSION tasker_core")
            # the suite runs once per index profile of install_schema() (tests/integration/run.sh)
            profile = os.environ.get("TASKER_INDEX_PROFILE")
            if profile:
                conn.execute(f"ALTER DATABASE \"{name}\" SET tasker_core.index_profile = '{profile}'")
    return db


def drop_database(db):
    with connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)')


@pytest.fixture
def db():
    """A fresh database with tasker_core created and nothing else."""
    database = create_database()
    yield database
    drop_database(database)


@pytest.fixture
def tasker_db(db):
    """A fresh database with tasker_core and the Tasker schema in public."""
    db.scalar("SELECT tasker_core.install_schema()")
    return db
