"""Lifecycle events: the durable log and its cursor, NOTIFY wake-ups, subscriptions, pruning,
and a real Python listener.

Every test uses its own database and real connections with committed transactions. Reading
the log waits for the event horizon (the oldest running transaction) to pass the events read:
that is the design of the cursor, and other sessions on a shared cluster can hold it back for a
while (`settle` reports who does when it gives up).
"""
import fnmatch
import json
import threading
import time

import psycopg
import pytest

from conftest import ROOT, create_database, drop_database

SAMPLE = (ROOT / "demo" / "sample_workflow.sql").read_text()
CHANNEL = "tasker_events"
SETTLE_TIMEOUT = 120


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def xid_of(position):
    return int(position.split("/")[0])


def settle(conn, position, timeout=SETTLE_TIMEOUT):
    """Wait until every transaction up to the one at `position` ('xid/id') is over, so that
    events_after / poll may return it."""
    xid = xid_of(position)
    deadline = time.monotonic() + timeout
    while True:
        horizon = int(conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text").fetchone()[0])
        if horizon > xid:
            return
        if time.monotonic() > deadline:
            blockers = conn.execute(
                "SELECT datname, pid, backend_xid::text, state, now() - xact_start FROM pg_stat_activity "
                "WHERE backend_xid IS NOT NULL ORDER BY backend_xid::text::bigint LIMIT 5").fetchall()
            pytest.fail(f"event horizon {horizon} did not pass xid {xid} in {timeout}s; oldest: {blockers}")
        time.sleep(0.05)


def current_position(conn):
    """The log position of the last event committed so far in this database."""
    row = conn.execute("SELECT xid::text || '/' || id FROM tasker_core.events ORDER BY xid, id DESC LIMIT 1").fetchone()
    return row[0] if row else "0/0"


def read_all(conn, cursor=None, batch=100):
    """Every settled event after `cursor`, oldest first, paging with the returned cursors."""
    out = []
    while True:
        rows = conn.execute("SELECT cursor, id, name, task_id, step_id, from_state, to_state "
                            "FROM tasker_core.events_after(%s, %s)", (cursor, batch)).fetchall()
        if not rows:
            return out
        out += rows
        cursor = rows[-1][0]


def poll(conn, sub, n=1000):
    return conn.execute("SELECT cursor, id, name FROM tasker_core.poll(%s, %s)", (sub, n)).fetchall()


def ack(conn, sub, cursor):
    return conn.execute("SELECT tasker_core.ack(%s, %s)", (sub, cursor)).fetchone()[0]


def step(conn, step_id, to, metadata="{}"):
    return conn.execute("SELECT tasker_core.transition_step(%s, %s, %s::jsonb)", (step_id, to, metadata)).fetchone()[0]


def task(conn, task_id, to):
    return conn.execute("SELECT tasker_core.transition_task(%s, %s)", (task_id, to)).fetchone()[0]


def sqlstate_of(conn, sql, params=None):
    try:
        conn.execute(sql, params)
    except psycopg.Error as e:
        return e.sqlstate
    return None


# The sample workflow run to completion, one transition per transaction.
WORKFLOW = [("task", 1, "in_progress")] + [
    ("step", s, to) for s in (1, 2, 3, 4, 5, 6) for to in ("in_progress", "complete")
] + [("task", 1, "complete")]
WORKFLOW_EVENTS = ["task.start_requested"] + [
    e for _ in range(6) for e in ("step.execution_requested", "step.completed")
] + ["task.completed"]


def run_workflow(conn, moves=WORKFLOW):
    for kind, owner, to in moves:
        assert (task if kind == "task" else step)(conn, owner, to) is True, (kind, owner, to)


@pytest.fixture
def wf(tasker_db):
    """A database with the sample workflow (task 1, steps 1..6)."""
    tasker_db.run_file(ROOT / "demo" / "sample_workflow.sql")
    return tasker_db


# ------------------------------------------------------------------------------------------
# the cursor
# ------------------------------------------------------------------------------------------

def test_cursor_cannot_skip_out_of_order_commits(wf):
    """Writer A takes a smaller event id but commits after writer B. A cursor reader must not
    return B's event while A is open, and then returns A's and B's. A reader of `id > last_id`
    sees B's first, moves past A's id, and never sees A's event."""
    with wf.connect() as reader, wf.connect(autocommit=False) as a, wf.connect(autocommit=False) as b:
        # one committed event both readers have consumed
        assert task(reader, 1, "in_progress") is True
        settle(reader, current_position(reader))
        first = read_all(reader)
        assert [e[2] for e in first] == ["task.start_requested"]
        cursor, naive_last = first[-1][0], first[-1][1]
        naive_seen = [first[-1][1]]

        # A: an event in an open transaction
        assert step(a, 1, "in_progress") is True
        a_id, a_xid = a.execute("SELECT id, xid::text FROM tasker_core.events WHERE step_id = 1").fetchone()
        # B: a later event, committed
        assert step(b, 2, "error") is True
        b_id, b_xid = b.execute("SELECT id, xid::text FROM tasker_core.events WHERE step_id = 2").fetchone()
        b.commit()
        assert a_id < b_id

        # the cursor reader: nothing yet, in particular not B's event
        got = reader.execute("SELECT id FROM tasker_core.events_after(%s)", (cursor,)).fetchall()
        assert got == [], "events_after returned an event while an earlier one could still commit"
        assert xid_of(reader.execute("SELECT tasker_core.event_horizon()").fetchone()[0]) <= int(a_xid)
        # the naive reader: B's event, and it moves past A's id
        naive = [r[0] for r in reader.execute(
            "SELECT id FROM tasker_core.events WHERE id > %s ORDER BY id", (naive_last,))]
        assert naive == [b_id]
        naive_seen += naive
        naive_last = naive[-1]

        a.commit()
        settle(reader, f"{max(int(a_xid), int(b_xid))}/0")
        got = read_all(reader, cursor)
        assert [(e[1], e[2], e[4]) for e in got] == [(a_id, "step.execution_requested", 1),
                                                     (b_id, "step.failed", 2)]
        assert [e[0] for e in got] == [f"{a_xid}/{a_id}", f"{b_xid}/{b_id}"]
        # the naive reader never gets A's event: it is lost to it
        naive_seen += [r[0] for r in reader.execute(
            "SELECT id FROM tasker_core.events WHERE id > %s ORDER BY id", (naive_last,))]
        assert a_id not in naive_seen
        assert sorted(naive_seen) != [e[1] for e in first + got]
        # and the cursor reader has everything, in order, once
        assert [e[1] for e in first + got] == [first[0][1], a_id, b_id]
        assert read_all(reader, got[-1][0]) == []


def test_events_after_pages_and_starts(wf):
    with wf.connect() as conn:
        run_workflow(conn)
        settle(conn, current_position(conn))
        full = read_all(conn, None, 1000)
        assert [e[2] for e in full] == WORKFLOW_EVENTS
        assert read_all(conn, "0/0", 1000) == full == read_all(conn, "", 1000)
        assert read_all(conn, None, 1) == full                         # paging one at a time
        assert read_all(conn, None, 3) == full
        for i in range(len(full)):                                     # exclusive cursor
            assert read_all(conn, full[i][0]) == full[i + 1:]
        # default limit 100, and the columns
        cols = [d.name for d in conn.execute("SELECT * FROM tasker_core.events_after()").description]
        assert cols == ["cursor", "id", "name", "task_id", "step_id", "from_state", "to_state", "payload", "created_at"]


# ------------------------------------------------------------------------------------------
# NOTIFY
# ------------------------------------------------------------------------------------------

def notifications(listener, timeout=2.0):
    return [(n.channel, n.payload) for n in listener.notifies(timeout=timeout)]


def check_payload(raw):
    assert len(raw.encode()) < 8000
    payload = json.loads(raw)
    assert set(payload) == {"event", "task_id", "step_id", "position"}, payload
    return payload


def test_one_notify_per_transaction_and_every_event_in_the_log(wf):
    big = json.dumps({"blob": "x" * 20000})            # metadata never travels in a NOTIFY
    with wf.connect() as listener, wf.connect(autocommit=False) as w, wf.connect() as reader:
        listener.execute(f"LISTEN {CHANNEL}")
        # tx1: four transitions on the task and two steps
        assert task(w, 1, "in_progress") and step(w, 1, "in_progress", big) and step(w, 1, "complete")
        assert step(w, 2, "in_progress")
        w.commit()
        # tx2: two transitions
        assert step(w, 2, "complete") and step(w, 3, "in_progress")
        w.commit()
        # tx3: only a no-op: no event, no NOTIFY
        assert task(w, 1, "in_progress") is False
        w.commit()
        # tx4: rolled back: no event, no NOTIFY
        assert step(w, 4, "in_progress") is True
        w.rollback()
        # two autocommit calls: two transactions
        w.autocommit = True
        assert step(w, 3, "error") and step(w, 3, "pending")
        got = notifications(listener)
        settle(reader, current_position(reader))
        log = reader.execute("SELECT xid::text || '/' || id, xid::text, name, task_id, step_id "
                             "FROM tasker_core.events ORDER BY xid, id").fetchall()

    assert [e[2] for e in log] == [
        "task.start_requested", "step.execution_requested", "step.completed", "step.execution_requested",
        "step.completed", "step.execution_requested",
        "step.failed",
        "step.retry_requested",
    ]
    by_xid = {}
    for e in log:
        by_xid.setdefault(e[1], []).append(e)
    assert [len(v) for v in by_xid.values()] == [4, 2, 1, 1]
    assert len(got) == 4, got
    for (channel, raw), (xid, evs) in zip(got, by_xid.items()):
        assert channel == CHANNEL
        payload = check_payload(raw)
        first = evs[0]
        # the wake-up names the transaction's first event and its log position
        assert payload == {"event": first[2], "task_id": first[3], "step_id": first[4], "position": first[0]}


@pytest.mark.parametrize("how", ["savepoint", "plpgsql_exception_block"])
def test_notify_survives_a_rolled_back_first_transition(wf, how):
    """The first transition of a transaction is undone (ROLLBACK TO SAVEPOINT, or a PL/pgSQL
    EXCEPTION block, which is a subtransaction), a second one commits with the transaction:
    listeners must still get their one wake-up for the committed event."""
    with wf.connect() as listener, wf.connect(autocommit=False) as w, wf.connect() as reader:
        listener.execute(f"LISTEN {CHANNEL}")
        if how == "savepoint":
            w.execute("SAVEPOINT s")
            assert task(w, 1, "in_progress") is True
            w.execute("ROLLBACK TO SAVEPOINT s")
            assert task(w, 1, "error") is True
        else:
            w.execute("""
                DO $$
                BEGIN
                    BEGIN
                        PERFORM tasker_core.transition_task(1, 'in_progress');
                        RAISE EXCEPTION 'handler failed';
                    EXCEPTION WHEN raise_exception THEN
                        NULL;
                    END;
                    PERFORM tasker_core.transition_task(1, 'error');
                END $$""")
        w.commit()
        log = reader.execute("SELECT xid::text || '/' || id, name FROM tasker_core.events").fetchall()
        got = notifications(listener)
    assert [e[1] for e in log] == ["task.failed"]
    assert len(got) == 1, f"a committed transaction with events sent {len(got)} NOTIFY"
    assert check_payload(got[0][1])["position"] == log[0][0]


def test_no_notify_for_failed_calls(wf):
    with wf.connect() as listener, wf.connect() as w:
        listener.execute(f"LISTEN {CHANNEL}")
        for sql in ("SELECT tasker_core.transition_step(2, 'in_progress')",        # guard
                    "SELECT tasker_core.transition_step(1, 'complete')",           # forbidden
                    "SELECT tasker_core.transition_step(1, 'error', '{}', 'in_progress')",  # CAS
                    "SELECT tasker_core.transition_step(99, 'error')"):            # not found
            assert sqlstate_of(w, sql) is not None
        assert step(w, 1, "pending") is False
        assert notifications(listener, 1.0) == []
        assert w.execute("SELECT count(*) FROM tasker_core.events").fetchone()[0] == 0


# ------------------------------------------------------------------------------------------
# subscriptions
# ------------------------------------------------------------------------------------------

WITH_RETRY = [("task", 1, "in_progress"), ("step", 1, "in_progress"), ("step", 1, "error"),
              ("step", 1, "pending"), ("step", 1, "in_progress"), ("step", 1, "complete"),
              ("step", 2, "in_progress"), ("step", 2, "complete"), ("step", 3, "resolved_manually"),
              ("step", 4, "cancelled"), ("task", 1, "error"), ("task", 1, "pending")]


def test_subscription_patterns_filter(wf):
    subs = {"all": None, "tasks": ["task.*"], "done": ["step.completed", "task.completed"],
            "retries": ["*.retry_requested"], "steps-not-obs": ["step.*", "observability.*"],
            "nothing": ["workflow.no_viable_steps"]}
    with wf.connect() as conn:
        for name, patterns in subs.items():
            if patterns is None:
                pos = conn.execute("SELECT tasker_core.subscribe(%s)", (name,)).fetchone()[0]
            else:
                pos = conn.execute("SELECT tasker_core.subscribe(%s, %s)", (name, patterns)).fetchone()[0]
            assert pos.endswith("/0") and xid_of(pos) > 0
        run_workflow(conn, WITH_RETRY)
        settle(conn, current_position(conn))
        log = read_all(conn)
        names = [e[2] for e in log]
        assert names.count("step.retry_requested") == 1 and "task.retry_requested" in names
        for name, patterns in subs.items():
            want = [(e[0], e[1], e[2]) for e in log
                    if any(fnmatch.fnmatchcase(e[2], p) for p in (patterns or ["*"]))]
            assert poll(conn, name) == want, name
        assert poll(conn, "nothing") == []
        # re-subscribing changes the patterns, not the position
        assert conn.execute("SELECT tasker_core.subscribe('tasks', '{step.completed}')").fetchone()[0] \
            == conn.execute("SELECT cursor_xid::text || '/' || cursor_id FROM tasker_core.subscriptions "
                            "WHERE name = 'tasks'").fetchone()[0]
        assert [e[2] for e in poll(conn, "tasks")] == ["step.completed", "step.completed"]


def test_poll_repeats_until_ack_and_ack_never_moves_backwards(wf):
    with wf.connect() as conn:
        conn.execute("SELECT tasker_core.subscribe('s')")
        run_workflow(conn, WORKFLOW[:5])
        settle(conn, current_position(conn))
        p1 = poll(conn, "s", 3)
        assert len(p1) == 3
        assert poll(conn, "s", 3) == p1                     # at-least-once: same until acked
        assert poll(conn, "s") == [(e[0], e[1], e[2]) for e in read_all(conn)]
        assert len(poll(conn, "s")) == 5
        assert ack(conn, "s", p1[1][0]) is True
        assert poll(conn, "s", 3) == poll(conn, "s")[:3]
        assert poll(conn, "s")[0] == p1[2]
        # backwards, same place, the beginning: no move, and the position stays
        assert ack(conn, "s", p1[0][0]) is False
        assert ack(conn, "s", p1[1][0]) is False
        assert ack(conn, "s", "0/0") is False
        assert ack(conn, "s", "") is False
        assert poll(conn, "s")[0] == p1[2]
        rest = poll(conn, "s")
        assert ack(conn, "s", rest[-1][0]) is True
        assert poll(conn, "s") == []
        acked_at = conn.execute("SELECT acked_at FROM tasker_core.subscriptions WHERE name = 's'").fetchone()[0]
        assert acked_at is not None


def test_consumer_resumes_after_reconnect(wf):
    """A consumer handles two events of a batch of four, acks them, and dies. Events keep
    coming. A new connection resumes at the first unacked event: nothing is lost, and the only
    repeats are the unacked events of the batch that died (at-least-once)."""
    handled = []
    with wf.connect() as producer:
        with wf.connect() as c1:
            c1.execute("SELECT tasker_core.subscribe('worker-1', '{step.*}')")
            run_workflow(producer, WORKFLOW[:7])
            settle(producer, current_position(producer))
            batch = poll(c1, "worker-1", 4)
            assert len(batch) == 4
            handled += batch[:2]
            assert ack(c1, "worker-1", batch[1][0]) is True
        # c1 is gone without acking batch[2:]; more events while nobody listens
        run_workflow(producer, WORKFLOW[7:])
        settle(producer, current_position(producer))
        with wf.connect() as c2:
            resumed = poll(c2, "worker-1")
            assert resumed[:2] == batch[2:]
            handled += resumed
            assert ack(c2, "worker-1", resumed[-1][0]) is True
            assert poll(c2, "worker-1") == []
        log = [(e[0], e[1], e[2]) for e in read_all(producer) if e[2].startswith("step.")]
        assert handled == log
        assert len(log) == 12


def test_unsubscribe(wf):
    with wf.connect() as conn:
        conn.execute("SELECT tasker_core.subscribe('gone')")
        assert conn.execute("SELECT tasker_core.unsubscribe('gone')").fetchone()[0] is True
        assert conn.execute("SELECT tasker_core.unsubscribe('gone')").fetchone()[0] is False
        assert sqlstate_of(conn, "SELECT * FROM tasker_core.poll('gone')") == "TK004"
        assert sqlstate_of(conn, "SELECT tasker_core.ack('gone', '0/0')") == "TK004"
        assert conn.execute("SELECT count(*) FROM tasker_core.subscriptions").fetchone()[0] == 0


BAD_NAMES = ["", " x", "x ", "a b", "-x", "_x", ".x", "x/y", "x;drop", "é", "x" * 129, None]
BAD_CURSORS = ["abc", "1", "1/", "/1", "1/2/3", "-1/2", "1/-2", " 1/2", "1/2 ", "0x1/2", "1.5/2", "1/2\n"]
BAD_PATTERNS = [[], None, [None], ["Task.*"], ["task.%"], [""], ["step completed"], ["task.*", "x;y"],
                ["*"] * 101, ["a" * 201]]


def test_subscription_and_cursor_errors(wf):
    with wf.connect() as conn:
        conn.execute("SELECT tasker_core.subscribe('ok')")
        conn.execute("SELECT tasker_core.subscribe(%s)", ("x" * 128,))             # longest name
        before = conn.execute("SELECT * FROM tasker_core.subscriptions ORDER BY name").fetchall()
        # unknown subscription
        assert sqlstate_of(conn, "SELECT * FROM tasker_core.poll('nope')") == "TK004"
        assert sqlstate_of(conn, "SELECT tasker_core.ack('nope', '0/0')") == "TK004"
        assert conn.execute("SELECT tasker_core.unsubscribe('nope')").fetchone()[0] is False
        # bad names
        for name in BAD_NAMES:
            for sql in ("SELECT tasker_core.subscribe(%s)", "SELECT * FROM tasker_core.poll(%s)",
                        "SELECT tasker_core.ack(%s, '0/0')", "SELECT tasker_core.unsubscribe(%s)"):
                assert sqlstate_of(conn, sql, (name,)) == "42602", (sql, name)
        # bad cursors
        for cursor in BAD_CURSORS:
            assert sqlstate_of(conn, "SELECT * FROM tasker_core.events_after(%s)", (cursor,)) == "22P02", cursor
            assert sqlstate_of(conn, "SELECT tasker_core.ack('ok', %s)", (cursor,)) == "22P02", cursor
        assert sqlstate_of(conn, "SELECT tasker_core.ack('ok', NULL)") == "22004"
        # bad patterns
        for patterns in BAD_PATTERNS:
            assert sqlstate_of(conn, "SELECT tasker_core.subscribe('new', %s::text[])", (patterns,)) == "22023", patterns
            assert sqlstate_of(conn, "SELECT tasker_core.subscribe('ok', %s::text[])", (patterns,)) == "22023", patterns
        # bad limits
        for n in (0, -1, 10001, None):
            assert sqlstate_of(conn, "SELECT * FROM tasker_core.events_after(NULL, %s)", (n,)) == "22023", n
            assert sqlstate_of(conn, "SELECT * FROM tasker_core.poll('ok', %s)", (n,)) == "22023", n
        assert conn.execute("SELECT * FROM tasker_core.subscriptions ORDER BY name").fetchall() == before


def test_out_of_range_cursor_is_rejected_not_clamped(wf):
    """Cursors whose numbers do not fit are invalid cursors (22P02), and must not move a
    subscription: '99999999999999999999/1' is read as xid 2^64-1 today, so acking it would put
    the subscription past every future event."""
    with wf.connect() as conn:
        conn.execute("SELECT tasker_core.subscribe('ok')")
        before = conn.execute("SELECT * FROM tasker_core.subscriptions").fetchall()
        got = {}
        for cursor in ("1/9999999999999999999", "99999999999999999999/1"):
            got[("events_after", cursor)] = sqlstate_of(conn, "SELECT * FROM tasker_core.events_after(%s)", (cursor,))
            got[("ack", cursor)] = sqlstate_of(conn, "SELECT tasker_core.ack('ok', %s)", (cursor,))
        after = conn.execute("SELECT * FROM tasker_core.subscriptions").fetchall()
        moved = conn.execute("SELECT cursor_xid::text || '/' || cursor_id FROM tasker_core.subscriptions").fetchone()[0]
        assert (all(code == "22P02" for code in got.values()), after == before) == (True, True), \
            f"SQLSTATEs {got}; subscription position now {moved}"


# ------------------------------------------------------------------------------------------
# retention
# ------------------------------------------------------------------------------------------

def test_prune_keeps_what_a_subscription_has_not_acked(wf):
    with wf.connect() as conn:
        conn.execute("SELECT tasker_core.subscribe('slow')")
        conn.execute("SELECT tasker_core.subscribe('fast')")
        run_workflow(conn, WORKFLOW[:6])
        settle(conn, current_position(conn))
        ev = read_all(conn)
        ids = [e[1] for e in ev]
        assert len(ev) == 6
        assert ack(conn, "fast", ev[5][0]) and ack(conn, "slow", ev[2][0])
        # e1..e5 are three days old; e6 is fresh
        conn.execute("UPDATE tasker_core.events SET created_at = now() - interval '3 days' WHERE id = ANY(%s)",
                     (ids[:5],))

        def remaining():
            return [r[0] for r in conn.execute("SELECT id FROM tasker_core.events ORDER BY id")]

        prune = "SELECT tasker_core.prune_events(%s::interval)"
        assert conn.execute(prune, ("1 day",)).fetchone()[0] == 3          # acked by both and old
        assert remaining() == ids[3:]
        assert conn.execute(prune, ("1 day",)).fetchone()[0] == 0
        assert conn.execute(prune, ("4 days",)).fetchone()[0] == 0          # not old enough
        # the slow consumer still gets everything it has not acked, in order
        assert [r[1] for r in poll(conn, "slow")] == ids[3:]
        assert ack(conn, "slow", ev[4][0])
        assert conn.execute(prune, ("1 day",)).fetchone()[0] == 2
        assert remaining() == ids[5:]
        # the clock: with tasker_core.fake_now two days ahead, e6 is old too; still kept until acked
        conn.execute("SELECT set_config('tasker_core.fake_now', (now() + interval '2 days')::text, false)")
        assert conn.execute(prune, ("1 day",)).fetchone()[0] == 0
        assert ack(conn, "slow", ev[5][0])
        assert conn.execute(prune, ("1 day",)).fetchone()[0] == 1
        assert remaining() == []
        conn.execute("RESET tasker_core.fake_now")
        # later events still flow to both
        run_workflow(conn, WORKFLOW[6:8])
        settle(conn, current_position(conn))
        assert len(poll(conn, "slow")) == len(poll(conn, "fast")) == 2
        # with no subscription left, old events go whatever was read
        conn.execute("SELECT tasker_core.unsubscribe('slow'), tasker_core.unsubscribe('fast')")
        conn.execute("UPDATE tasker_core.events SET created_at = now() - interval '2 days'")
        assert conn.execute(prune, ("1 day",)).fetchone()[0] == 2
        for bad in (None, "-1 day"):
            assert sqlstate_of(conn, prune, (bad,)) == "22023"


def test_event_time_follows_the_tasker_clock(wf):
    """With tasker_core.fake_now set, the transition row is stamped with it, and prune_events
    measures age with it; the event of that transition should carry the same time."""
    with wf.connect() as conn:
        conn.execute("SET tasker_core.fake_now = '2030-01-01 00:00:00+00'")
        conn.execute("SET TIME ZONE 'UTC'")
        assert step(conn, 1, "in_progress") is True
        tr = conn.execute("SELECT created_at FROM tasker_workflow_step_transitions WHERE workflow_step_id = 1").fetchone()[0]
        ev = conn.execute("SELECT created_at AT TIME ZONE 'UTC' FROM tasker_core.events WHERE step_id = 1").fetchone()[0]
        assert str(tr) == "2030-01-01 00:00:00"
        assert ev == tr, f"event stamped {ev}, its transition {tr}"


# ------------------------------------------------------------------------------------------
# horizon across databases
# ------------------------------------------------------------------------------------------

@pytest.fixture
def other_db():
    database = create_database("other", extension=False)
    yield database
    drop_database(database)


def test_a_transaction_in_another_database_does_not_hold_back_events(wf, other_db):
    """A transaction of another database can never write this database's log, so it cannot
    precede any of its events; events_after must not wait for it."""
    with other_db.connect(autocommit=False) as long_tx, wf.connect() as conn:
        long_tx.execute("SELECT pg_current_xact_id()")               # an open writing transaction
        assert task(conn, 1, "in_progress") is True
        deadline = time.monotonic() + 5
        got = []
        while not got and time.monotonic() < deadline:
            got = read_all(conn)
            time.sleep(0.05)
        long_tx.rollback()
    assert [e[2] for e in got] == ["task.start_requested"], \
        "a committed event stayed invisible while an unrelated database had an open transaction"


# ------------------------------------------------------------------------------------------
# a real listener
# ------------------------------------------------------------------------------------------

def test_python_listener_gets_the_workflow(wf):
    """psycopg LISTEN: the wake-ups of a workflow driven by another connection (one transition
    per transaction), then the same events, in order, from the log."""
    errors = []

    def worker():
        try:
            with wf.connect() as w:
                for kind, owner, to in WORKFLOW:
                    (task if kind == "task" else step)(w, owner, to)
                    time.sleep(0.01)
        except Exception as e:                  # reported by the assertions below
            errors.append(e)

    with wf.connect() as listener, wf.connect() as reader:
        listener.execute(f"LISTEN {CHANNEL}")
        th = threading.Thread(target=worker)
        th.start()
        got = [n for n in listener.notifies(timeout=60, stop_after=len(WORKFLOW))]
        th.join()
        assert errors == []
        got += list(listener.notifies(timeout=0.5))            # and nothing more
        assert all(n.channel == CHANNEL for n in got)
        payloads = [check_payload(n.payload) for n in got]
        assert [p["event"] for p in payloads] == WORKFLOW_EVENTS
        assert [(p["task_id"], p["step_id"]) for p in payloads] == [
            (1, None if kind == "task" else owner) for kind, owner, _ in WORKFLOW]
        # then the log, from the beginning, after the last wake-up's position
        settle(reader, payloads[-1]["position"])
        log = read_all(reader)
        assert [e[2] for e in log] == WORKFLOW_EVENTS
        assert [e[0] for e in log] == [p["position"] for p in payloads]
        assert [(e[3], e[4]) for e in log] == [(p["task_id"], p["step_id"]) for p in payloads]
        # each wake-up's position is the cursor of its event: reading after the previous one
        # position gives exactly that event first
        for prev, p in zip([None] + payloads[:-1], payloads):
            nxt = reader.execute("SELECT cursor, name FROM tasker_core.events_after(%s, 1)",
                                 (prev and prev["position"],)).fetchone()
            assert nxt == (p["position"], p["event"])
