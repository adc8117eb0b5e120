"""Fairness: a template's concurrency key (a JSON pointer into the task context) and limit — at
most that many steps of its tasks with the same key value in progress at once, across all
workers."""
import datetime as dt
import json
import threading
import time

import psycopg
import pytest

KEYED = {"name": "sync", "namespace_name": "fair", "version": "1.0.0",
         "concurrency": {"key": "/customer_id", "limit": 2},
         "step_templates": [{"name": "pull", "handler_class": "P"},
                            {"name": "push", "handler_class": "Q", "depends_on_step": "pull"}]}
LIVE = """SELECT count(*) FROM tasker_core.step_claims c JOIN tasker_core.task_options o USING (task_id)
          WHERE o.concurrency_key = %s AND c.lease_expires_at > tasker_core.now()"""


@pytest.fixture
def conn(tasker_db):
    with tasker_db.connect() as c:
        c.execute("SELECT tasker_core.enable_tracking()")
        c.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (json.dumps(KEYED),))
        yield c


def create(c, context, n=1):
    return [c.execute("SELECT tasker_core.create_task('fair', 'sync', NULL, %s::jsonb)",
                      (json.dumps(dict(context, i=i)),)).fetchone()[0] for i in range(n)]


def claim(c, n=10, lease=60, worker="w"):
    return c.execute("SELECT workflow_step_id, task_id FROM tasker_core.claim_steps(%s, NULL, %s, %s)",
                     (worker, n, lease)).fetchall()


def test_a_full_key_is_passed_over_and_others_are_taken(conn):
    a = create(conn, {"customer_id": 7}, 5)
    b = create(conn, {"customer_id": "acme"}, 3)
    free = create(conn, {"other": 1}, 2)              # no value at the pointer: no limit
    got = claim(conn, 20)
    by_task = [t for _, t in got]
    assert sum(t in a for t in by_task) == 2 and sum(t in b for t in by_task) == 2
    assert sorted(t for t in by_task if t in free) == free
    assert conn.execute(LIVE, ("fair.sync:7",)).fetchone()[0] == 2
    assert conn.execute(LIVE, ("fair.sync:acme",)).fetchone()[0] == 2
    waiting = next(t for t in a if t not in by_task)
    assert conn.execute("SELECT code, reason FROM tasker_core.explain_task(%s) ORDER BY workflow_step_id LIMIT 1",
                        (waiting,)).fetchone() == ("concurrency_limit",
                                                   "concurrency key fair.sync:7 is full (2 of 2 in progress)")
    assert claim(conn, 20) == []
    # a step of the key finishes: one more of the key starts (its own next step or another task)
    step = next(s for s, t in got if t == a[0] or t in a)
    conn.execute("SELECT tasker_core.complete_step(%s, 'w', '{}')", (step,))
    again = claim(conn, 20)
    assert len(again) == 1 and again[0][1] in a
    assert conn.execute("SELECT * FROM tasker_core.check_tracking()").fetchall() == []


def test_an_expired_lease_frees_its_slot(conn):
    a = create(conn, {"customer_id": 1}, 3)
    first = claim(conn, 10, lease=30)
    assert len(first) == 2
    assert claim(conn, 10) == []
    later = conn.execute("SELECT tasker_core.now() + interval '31 seconds'").fetchone()[0]
    conn.execute("SELECT set_config('tasker_core.fake_now', %s, false)", (later.isoformat(),))
    # the leases ended: the slots are free (the expired steps are failed and retried later)
    assert conn.execute(LIVE, ("fair.sync:1",)).fetchone()[0] == 0
    got = claim(conn, 10)
    assert 1 <= len(got) <= 2 and all(t in a for _, t in got)
    assert conn.execute(LIVE, ("fair.sync:1",)).fetchone()[0] == len(got)


def test_sixteen_claimers_never_exceed_the_limit(conn):
    """16 connections claim, hold a step a few milliseconds and complete it, until 40 tasks of
    one key (limit 2) and 20 of another are done. Each claimer counts the key's live leases in
    its claim's transaction, before it commits; a 17th connection samples them the whole time:
    never above 2."""
    hot = create(conn, {"customer_id": "hot"}, 40)
    warm = create(conn, {"customer_id": "warm"}, 20)
    stop, errors, seen = threading.Event(), [], {"hot": 0, "warm": 0}

    def claimer(i):
        try:
            with psycopg.connect(conn.info.dsn, autocommit=True) as c:
                while not stop.is_set():
                    # the claim, and in the same transaction (still holding the key's gate)
                    # the key's live leases, its own included: never more than the limit
                    with c.transaction():
                        rows = claim(c, 1, worker=f"c{i}")
                        if rows:
                            key = c.execute("SELECT concurrency_key FROM tasker_core.task_options WHERE task_id = %s",
                                            (rows[0][1],)).fetchone()[0]
                            live = c.execute(LIVE, (key,)).fetchone()[0]
                            if live > 2:
                                errors.append(f"{key}: {live} in progress at a claim's commit")
                    if not rows:
                        time.sleep(0.002)
                        continue
                    time.sleep(0.003)
                    c.execute("SELECT tasker_core.complete_step(%s, %s, '{}')", (rows[0][0], f"c{i}"))
        except Exception as e:          # noqa: BLE001 - reported below
            errors.append(repr(e))

    def sampler():
        with psycopg.connect(conn.info.dsn, autocommit=True) as c:
            while not stop.is_set():
                for k in seen:
                    seen[k] = max(seen[k], c.execute(LIVE, (f"fair.sync:{k}",)).fetchone()[0])

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(16)] + [threading.Thread(target=sampler)]
    for t in threads:
        t.start()
    deadline = time.time() + 120
    while time.time() < deadline:
        done = conn.execute("SELECT count(*) FROM tasker_tasks WHERE complete").fetchone()[0]
        if done == len(hot) + len(warm):
            break
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []
    assert conn.execute("SELECT count(*) FROM tasker_tasks WHERE complete").fetchone()[0] == 60
    assert seen["hot"] == 2 and seen["warm"] <= 2      # reached, never exceeded


@pytest.mark.parametrize("concurrency", [
    {"key": "customer_id", "limit": 2},          # not a pointer
    {"key": "/customer_id", "limit": 0},
    {"key": "/customer_id", "limit": "2"},
    {"key": "/customer_id"},
    {"key": "/c", "limit": 1, "per": "minute"},
    "customer_id",
])
def test_bad_concurrency_is_refused_at_registration(conn, concurrency):
    bad = dict(KEYED, name="bad", concurrency=concurrency)
    with pytest.raises(psycopg.Error) as e:
        conn.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (json.dumps(bad),))
    assert e.value.sqlstate == "TK020"
    assert conn.execute("SELECT count(*) FROM tasker_named_tasks WHERE name = 'bad'").fetchone()[0] == 0
