"""transition_task / transition_step under real concurrency: many connections, committed
transactions, racing each other and racing Rails (Statesman-style raw SQL) on the same rows.

The race runs once per module (the `race` fixture) and each property is its own test, so a
failure names the property that broke. TASKER_RACE_SEED replays the random choices (the
interleaving itself is up to the scheduler).
"""
import collections
import os
import random
import threading
import time
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from psycopg.types.json import Jsonb

from conftest import ROOT, create_database, drop_database

SAMPLE = (ROOT / "demo" / "sample_workflow.sql").read_text()

N_CONN = 16
ATTEMPTS = 1000
N_RAILS = 3
N_TASKS = 4          # 4 sample tasks: 4 task owners + 24 step owners, all shared by every thread

STATES = ("pending", "in_progress", "complete", "error", "cancelled", "resolved_manually")
# Rails' machines (rails-tasker.md §3.2). Moves are weighted so owners mostly cycle through the
# non-terminal states (pending -> in_progress -> error -> pending ...) and only sometimes end.
MOVES = {
    "task": {
        "pending": [("in_progress", 10), ("error", 3), ("cancelled", 0.01)],
        "in_progress": [("pending", 4), ("error", 6), ("complete", 1), ("cancelled", 0.01)],
        "error": [("pending", 10), ("resolved_manually", 0.05)],
        "complete": [("cancelled", 1)],
        "resolved_manually": [("cancelled", 1)],
        "cancelled": [],
    },
    "step": {
        "pending": [("in_progress", 10), ("error", 3), ("cancelled", 0.005), ("resolved_manually", 0.005)],
        "in_progress": [("error", 10), ("complete", 0.05), ("cancelled", 0.005)],
        "error": [("pending", 10), ("resolved_manually", 0.01)],
        "complete": [],
        "cancelled": [],
        "resolved_manually": [],
    },
}
TABLE = {"task": ("tasker_task_transitions", "task_id"),
         "step": ("tasker_workflow_step_transitions", "workflow_step_id")}
# A deadlock costs deadlock_timeout (1 s by default) before one side is aborted; detect it sooner
# so that a run with deadlocks still finishes in time to report them.
FAST_DEADLOCK_DETECTION = "SET deadlock_timeout = '100ms'"
EXPECTED_ERRORS = {"TK002", "TK003", "TK005"}
EVENT_SUFFIX = {"pending": "initialize_requested", "complete": "completed", "error": "failed",
                "cancelled": "cancelled", "resolved_manually": "resolved_manually"}


def expected_event(kind, frm, to):
    if (frm, to) == ("error", "pending"):
        return f"{kind}.retry_requested"
    if to == "in_progress":
        return "task.start_requested" if kind == "task" else "step.execution_requested"
    return f"{kind}.{EVENT_SUFFIX[to]}"


def pick(rng, kind, state):
    moves = MOVES[kind].get(state) or []
    if not moves or rng.random() < 0.05:
        # sometimes, on purpose, a move the machine forbids (or the state it is in: a no-op)
        return rng.choice([s for s in STATES if s not in dict(moves)])
    targets, weights = zip(*moves)
    return rng.choices(targets, weights)[0]


def read_state(conn, kind, owner):
    table, key = TABLE[kind]
    row = conn.execute(f"SELECT to_state, id FROM {table} WHERE {key} = %s AND most_recent", (owner,)).fetchone()
    return (row[0], row[1]) if row else ("pending", None)


# ------------------------------------------------------------------------------------------
# the race
# ------------------------------------------------------------------------------------------

def ours(db, t, seed, owners, barrier, out):
    """One connection making ATTEMPTS transition calls, each its own committed transaction."""
    rng = random.Random(seed * 1000 + t)
    known = {}
    records = []
    with db.connect() as conn:
        conn.execute(FAST_DEADLOCK_DETECTION)
        barrier.wait()
        for n in range(ATTEMPTS):
            kind, owner = rng.choice(owners)
            read_id = None
            if (kind, owner) not in known or rng.random() < 0.5:
                state, read_id = read_state(conn, kind, owner)
                known[(kind, owner)] = state
            expected = known[(kind, owner)]
            to = pick(rng, kind, expected)
            meta = Jsonb({"by": "us", "t": t, "n": n})
            try:
                res = conn.execute(f"SELECT tasker_core.transition_{kind}(%s, %s, %s, %s)",
                                   (owner, to, meta, expected)).fetchone()[0]
                outcome = res
                if res:
                    known[(kind, owner)] = to
            except psycopg.Error as e:
                outcome = (e.sqlstate, str(e).splitlines()[0])
                known.pop((kind, owner), None)
            records.append((t, n, kind, owner, expected, to, read_id, outcome))
    out[t] = records


def rails(db, r, seed, owners, stop, out):
    """Statesman's create_transition with plain SQL, racing ours: read the last transition,
    UPDATE most_recent = false, (callbacks), INSERT with last.sort_key + 10, commit. Rails gets
    unique violations of its own when it loses a race; those are its behaviour and ignored."""
    rng = random.Random(seed * 1000 + 500 + r)
    done = errors = 0
    with db.connect(autocommit=False) as conn:
        conn.execute(FAST_DEADLOCK_DETECTION)
        conn.commit()
        while not stop.is_set():
            kind, owner = rng.choice(owners)
            table, key = TABLE[kind]
            try:
                last = conn.execute(f"SELECT to_state, sort_key FROM {table} WHERE {key} = %s AND most_recent",
                                    (owner,)).fetchone()
                state, sort_key = last if last else ("pending", 0)
                moves = MOVES[kind][state]
                if not moves:
                    conn.rollback()
                    continue
                targets, weights = zip(*moves)
                to = rng.choices(targets, weights)[0]
                conn.execute(f"UPDATE {table} SET most_recent = false, updated_at = now() "
                             f"WHERE {key} = %s AND most_recent", (owner,))
                time.sleep(rng.random() * 0.002)          # before/after-transition callbacks
                conn.execute(
                    f"INSERT INTO {table} (to_state, metadata, sort_key, most_recent, {key}, created_at, updated_at) "
                    "VALUES (%s, '{\"by\": \"rails\"}', %s, true, %s, now(), now())",
                    (to, sort_key + 10, owner))
                conn.commit()
                done += 1
            except psycopg.Error:
                conn.rollback()
                errors += 1
            time.sleep(rng.random() * 0.003)
    out[f"rails{r}"] = (done, errors)


@pytest.fixture(scope="module")
def race():
    seed = int(os.environ.get("TASKER_RACE_SEED", random.randrange(1, 10**6)))
    print(f"TASKER_RACE_SEED={seed}")
    db = create_database("race")
    try:
        with db.connect() as conn:
            conn.execute("SELECT tasker_core.install_schema()")
            for _ in range(N_TASKS):
                conn.execute(SAMPLE)
            conn.execute("SELECT tasker_core.enable_tracking()")
            owners = [("task", r[0]) for r in conn.execute("SELECT task_id FROM tasker_tasks ORDER BY 1")]
            owners += [("step", r[0]) for r in conn.execute(
                "SELECT workflow_step_id FROM tasker_workflow_steps ORDER BY 1")]
        assert len(owners) == N_TASKS * 7
        out = {}
        barrier = threading.Barrier(N_CONN + 1)
        stop = threading.Event()
        threads = [threading.Thread(target=ours, args=(db, t, seed, owners, barrier, out)) for t in range(N_CONN)]
        rails_threads = [threading.Thread(target=rails, args=(db, r, seed, owners, stop, out)) for r in range(N_RAILS)]
        for th in threads + rails_threads:
            th.start()
        barrier.wait()
        started = time.monotonic()
        for th in threads:
            th.join()
        elapsed = time.monotonic() - started
        stop.set()
        for th in rails_threads:
            th.join()
        assert all(t in out for t in range(N_CONN)), "a racing thread died"
        records = [rec for t in range(N_CONN) for rec in out[t]]
        with db.connect() as conn:
            tr = {}
            for kind, (table, key) in TABLE.items():
                tr[kind] = conn.execute(
                    f"SELECT id, {key}, to_state, from_state, sort_key, most_recent, metadata FROM {table} ORDER BY id"
                ).fetchall()
            evs = conn.execute(
                "SELECT id, name, task_id, step_id, from_state, to_state, payload FROM tasker_core.events ORDER BY id"
            ).fetchall()
            tracking = conn.execute("SELECT * FROM tasker_core.check_tracking()").fetchall()
        outcomes = collections.Counter(r[7] if isinstance(r[7], bool) else r[7][0] for r in records)
        print(f"{len(records)} calls in {elapsed:.1f}s; outcomes {dict(outcomes)}; rails (ok, errors) "
              f"{[out[f'rails{r}'] for r in range(N_RAILS)]}")
        yield {"records": records, "transitions": tr, "events": evs, "tracking": tracking,
               "outcomes": outcomes, "rails": [out[f"rails{r}"] for r in range(N_RAILS)]}
    finally:
        drop_database(db)


def our_rows(race):
    """(kind, row) for every transition row our calls wrote (metadata by = us)."""
    return [(kind, row) for kind, rows in race["transitions"].items() for row in rows
            if row[6].get("by") == "us"]


# ------------------------------------------------------------------------------------------
# properties
# ------------------------------------------------------------------------------------------

def test_the_race_was_a_race(race):
    o = race["outcomes"]
    assert len(race["records"]) == N_CONN * ATTEMPTS
    # enough of each outcome for the properties below to mean something
    assert o[True] >= 1000, o
    assert o["TK005"] >= 100, o            # lost compare-and-swaps
    assert o[False] >= 10, o               # no-ops
    assert sum(done for done, _ in race["rails"]) >= 50, race["rails"]


def test_no_unique_violation_deadlock_or_unexpected_error(race):
    bad = collections.Counter()
    examples = {}
    for rec in race["records"]:
        outcome = rec[7]
        if isinstance(outcome, tuple) and outcome[0] not in EXPECTED_ERRORS:
            bad[outcome[0]] += 1
            examples.setdefault(outcome[0], (rec[2], rec[3], rec[4], rec[5], outcome[1]))
    assert not bad, f"unexpected SQLSTATEs reached callers: {dict(bad)}; e.g. {examples}"


def test_every_true_is_one_row_and_one_event(race):
    wins = {(r[0], r[1]): r for r in race["records"] if r[7] is True}
    rows = our_rows(race)
    by_call = collections.Counter((row[6]["t"], row[6]["n"]) for _, row in rows)
    assert len(rows) == len(wins)
    assert set(by_call) == set(wins) and max(by_call.values(), default=1) == 1
    # the row is the one the call asked for
    for kind, row in rows:
        t, n, rkind, owner, expected, to, _, _ = wins[(row[6]["t"], row[6]["n"])]
        assert (kind, row[1], row[2], row[3]) == (rkind, owner, to, expected)
    # exactly one event per row, naming it
    events = race["events"]
    assert len(events) == len(wins)
    by_transition = {}
    for ev in events:
        kind = "task" if ev[3] is None else "step"
        by_transition.setdefault((kind, ev[6]["transition_id"]), []).append(ev)
    assert all(len(v) == 1 for v in by_transition.values())
    for kind, row in rows:
        (ev,) = by_transition[(kind, row[0])]
        owner_id = ev[2] if kind == "task" else ev[3]
        assert (owner_id, ev[4], ev[5], ev[6]["sort_key"]) == (row[1], row[3], row[2], row[4])
        assert ev[1] == expected_event(kind, row[3], row[2]), (ev, row)


def test_never_two_most_recent_rows(race):
    for kind, rows in race["transitions"].items():
        current = collections.Counter(r[1] for r in rows if r[5])
        assert all(c == 1 for c in current.values()), (kind, current.most_common(3))


def test_sort_key_strictly_increasing_in_insertion_order(race):
    for kind, rows in race["transitions"].items():
        last = {}
        for r in rows:                        # ordered by id
            assert r[4] > last.get(r[1], -1), (kind, r)
            last[r[1]] = r[4]


def test_most_recent_is_the_highest_sort_key(race):
    for kind, rows in race["transitions"].items():
        top = {}
        for r in rows:
            if r[1] not in top or r[4] > top[r[1]][4]:
                top[r[1]] = r
        assert all(r[5] for r in top.values()), kind
        assert sum(1 for r in rows if r[5]) == len(top)


def test_compare_and_swap_one_winner_per_change(race):
    """Each of our rows records the state its caller expected, and that is the state of the row
    just before it: so no two callers ever both won from one current transition, and no caller
    won from a state the owner was no longer in."""
    winners = collections.Counter()
    aba = 0
    wins = {(r[0], r[1]): r for r in race["records"] if r[7] is True}
    for kind, rows in race["transitions"].items():
        prev = {}
        for r in sorted(rows, key=lambda r: (r[1], r[4])):
            before = prev.get(r[1])
            if r[6].get("by") == "us":
                before_state = before[2] if before else "pending"
                assert r[3] == before_state, (kind, r, before)
                winners[(kind, r[1], before[0] if before else None)] += 1
                read_id = wins.get((r[6]["t"], r[6]["n"]), [None] * 8)[6]
                if read_id is not None and before is not None and read_id != before[0]:
                    aba += 1          # won from the same state after it had changed and come back
            prev[r[1]] = r
    assert winners and max(winners.values()) == 1
    print(f"{len(winners)} wins, {aba} of them after an A-B-A change of the state read")


def test_tracking_stays_exact(race):
    assert race["tracking"] == []


# ------------------------------------------------------------------------------------------
# exactly one winner, by construction: everyone races the same change at the same moment
# ------------------------------------------------------------------------------------------

def test_simultaneous_callers_one_winner(tasker_db):
    rounds = 30
    with tasker_db.connect() as conn:
        for _ in range(rounds // 6 + 1):
            conn.execute(SAMPLE)
        steps = [r[0] for r in conn.execute(
            "SELECT workflow_step_id FROM tasker_workflow_steps s WHERE NOT EXISTS "
            "(SELECT 1 FROM tasker_workflow_step_edges e WHERE e.to_step_id = s.workflow_step_id) ORDER BY 1")]
        tasks = [r[0] for r in conn.execute("SELECT task_id FROM tasker_tasks ORDER BY 1")]
    targets = [("task", t) for t in tasks] + [("step", s) for s in steps]
    barrier = threading.Barrier(N_CONN)
    results = collections.defaultdict(list)

    def caller(i):
        with tasker_db.connect() as conn:
            for kind, owner in targets:
                to = "in_progress" if i % 2 else "error"
                barrier.wait()
                try:
                    r = conn.execute(f"SELECT tasker_core.transition_{kind}(%s, %s, '{{}}', 'pending')",
                                     (owner, to)).fetchone()[0]
                except psycopg.Error as e:
                    r = e.sqlstate
                results[(kind, owner)].append((to, r))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(N_CONN)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    with tasker_db.connect() as conn:
        for kind, owner in targets:
            got = results[(kind, owner)]
            assert len(got) == N_CONN
            won = [to for to, r in got if r is True]
            assert len(won) == 1, (kind, owner, got)
            # the losers: a no-op when they wanted the same state, a CAS failure otherwise
            for to, r in got:
                if r is not True:
                    assert r == (False if to == won[0] else "TK005"), (kind, owner, got)
            table, key = TABLE[kind]
            assert conn.execute(f"SELECT array_agg(to_state::text) FROM {table} WHERE {key} = %s",
                                (owner,)).fetchone()[0] == won
        assert conn.execute("SELECT count(*) FROM tasker_core.events").fetchone()[0] == len(targets)


# ------------------------------------------------------------------------------------------
# one precise interleaving with Rails: Statesman has flipped most_recent and not yet inserted
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["step", "task"])
def test_no_deadlock_with_statesman_update_then_insert(tasker_db, kind):
    """Rails: UPDATE ... SET most_recent = false (row lock on the current transition); we call
    transition_*; Rails then INSERTs its new row (the foreign key takes KEY SHARE on the owner
    row). Whatever the outcome for Rails, our call must not fail with a deadlock."""
    table, key = TABLE[kind]
    with tasker_db.connect() as conn:
        conn.execute(SAMPLE)
        assert conn.execute(f"SELECT tasker_core.transition_{kind}(1, 'in_progress')").fetchone()[0] is True
    result = {}
    with tasker_db.connect(autocommit=False) as rails_conn, tasker_db.connect() as our_conn:
        rails_conn.execute(f"UPDATE {table} SET most_recent = false, updated_at = now() WHERE {key} = 1 AND most_recent")

        def call():
            try:
                result["ours"] = our_conn.execute(
                    f"SELECT tasker_core.transition_{kind}(1, 'error')").fetchone()[0]
            except psycopg.Error as e:
                result["ours"] = e.sqlstate
                result["message"] = str(e)

        th = threading.Thread(target=call)
        th.start()
        # wait until our call is blocked on Rails' row lock
        with tasker_db.connect() as probe:
            for _ in range(200):
                if probe.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                 "AND wait_event_type = 'Lock' AND query LIKE '%transition_%'").fetchone()[0]:
                    break
                time.sleep(0.02)
        try:
            rails_conn.execute(
                f"INSERT INTO {table} (to_state, metadata, sort_key, most_recent, {key}, created_at, updated_at) "
                "VALUES ('error', '{}', 20, true, 1, now(), now())")
            rails_conn.commit()
            result["rails"] = "committed"
        except psycopg.Error as e:
            rails_conn.rollback()
            result["rails"] = e.sqlstate
        th.join()
    assert result["ours"] != "40P01", f"our call was the deadlock victim: {result}"
    # Rails committed error first, so ours is a no-op; or ours went first and Rails lost
    assert result["ours"] in (True, False), result
    with tasker_db.connect() as conn:
        assert conn.execute(f"SELECT count(*) FROM {table} WHERE {key} = 1 AND most_recent").fetchone()[0] == 1


# ------------------------------------------------------------------------------------------
# issue 11 items 4 and 7: operator calls, lease expiry (claims and tick) and heartbeats racing
# workers on real connections. One lock order everywhere: no deadlock, unique violation or
# internal error ever reaches a caller, and every outcome is one the caller can act on.
# ------------------------------------------------------------------------------------------

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
NEVER = {"40P01", "23505", "XX000"}
WIDE = {"name": "wide", "namespace_name": "wide", "version": "1.0.0",
        "step_templates": [{"name": f"s{i}", "handler_class": "S"} for i in range(60)]}
PAIR = {"name": "pair", "namespace_name": "lease", "version": "1.0.0",
        "step_templates": [{"name": "a", "handler_class": "A"},
                           {"name": "b", "handler_class": "B", "depends_on_step": "a"}]}
ONE = {"name": "one", "namespace_name": "one", "version": "1.0.0",
       "step_templates": [{"name": "only", "handler_class": "O"}]}


@pytest.fixture
def rdb(tasker_db):
    tasker_db.scalar("SELECT tasker_core.enable_tracking()")
    for t in (WIDE, PAIR, ONE):
        tasker_db.scalar("SELECT tasker_core.register_task_template(%s)", (Jsonb(t),))
    return tasker_db


def session(db):
    conn = db.connect()
    conn.execute(FAST_DEADLOCK_DETECTION)
    conn.execute("SET tasker_core.backoff_jitter = off")
    return conn


def at(conn, ts):
    conn.execute("SELECT set_config('tasker_core.fake_now', %s, false)", (ts.isoformat(),))


def call(conn, sql, params=None):
    """('ok', rows) or (sqlstate, first line of the message)."""
    try:
        return ("ok", conn.execute(sql, params).fetchall())
    except psycopg.Error as e:
        return (e.sqlstate, str(e).splitlines()[0])


def together(*fns):
    """Runs the callables in threads released at the same moment; returns their results."""
    barrier = threading.Barrier(len(fns))
    results = [None] * len(fns)

    def run(i, fn):
        barrier.wait()
        try:
            results[i] = fn()
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = ("exception", repr(e))

    threads = [threading.Thread(target=run, args=(i, fn), daemon=True) for i, fn in enumerate(fns)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not any(th.is_alive() for th in threads), "a racing call hung"
    return results


def last_step_transition(conn, step):
    return conn.execute("SELECT to_state, metadata FROM tasker_workflow_step_transitions "
                        "WHERE workflow_step_id = %s AND most_recent", (step,)).fetchone()


def lease_expired_count(conn, step):
    return conn.execute("SELECT count(*) FROM tasker_workflow_step_transitions WHERE workflow_step_id = %s "
                        "AND metadata ->> 'reason' = 'lease_expired'", (step,)).fetchone()[0]


def drain(conn, worker, namespace):
    """Completes the steps the worker holds, then claims and completes whatever is left of a
    namespace (the worker's clock as it is)."""
    for (s,) in conn.execute("SELECT workflow_step_id FROM tasker_core.step_claims WHERE worker_id = %s",
                             (worker,)).fetchall():
        conn.execute("SELECT tasker_core.complete_step(%s, %s, '{}')", (s, worker))
    for _ in range(20):
        rows = conn.execute("SELECT workflow_step_id FROM tasker_core.claim_steps(%s, ARRAY[%s], 100, 600)",
                            (worker, namespace)).fetchall()
        if not rows:
            return
        for (s,) in rows:
            conn.execute("SELECT tasker_core.complete_step(%s, %s, '{}')", (s, worker))
    raise AssertionError("the namespace did not drain")


def test_workers_race_cancel_task_of_a_wide_task(rdb):
    """complete_step / fail_step / release_step / heartbeat of a task's steps while an
    operator cancels it: the worker loses the steps the cancellation took (TK030), nothing
    else; the operator's call always succeeds."""
    worker, op = session(rdb), session(rdb)
    bad = collections.Counter()
    try:
        for it in range(20):
            task = op.execute("SELECT tasker_core.create_task('wide', 'wide', NULL, %s)", (Jsonb({"i": it}),)).fetchone()[0]
            steps = [r[0] for r in worker.execute(
                "SELECT workflow_step_id FROM tasker_core.claim_steps('w', ARRAY['wide'], 100, 600)")]
            assert len(steps) == 60
            sqls = ["SELECT tasker_core.complete_step(%s, 'w', '{}')",
                    "SELECT tasker_core.fail_step(%s, 'w', '{\"message\": \"x\"}')",
                    "SELECT tasker_core.release_step(%s, 'w')",
                    "SELECT tasker_core.heartbeat(%s, 'w')"]

            def work():
                return {s: (k % 4, call(worker, sqls[k % 4], (s,))) for k, s in enumerate(steps)}

            done, cancelled = together(work, lambda: call(op, "SELECT tasker_core.cancel_task(%s, 'race')", (task,)))
            for kind, (state, _) in done.values():
                if state not in ("ok", "TK030"):
                    bad[state] += 1
            if cancelled[0] != "ok":
                bad[cancelled[0]] += 1
                continue
            completed = {s for s, (kind, (state, _)) in done.items() if kind == 0 and state == "ok"}
            with rdb.connect() as c:
                states = dict(c.execute("SELECT workflow_step_id, to_state FROM tasker_workflow_step_transitions "
                                        "WHERE most_recent AND workflow_step_id = ANY(%s)", (steps,)).fetchall())
                assert {s for s, st in states.items() if st == "complete"} == completed, it
                assert all(st == "cancelled" for s, st in states.items() if s not in completed), states
                assert c.execute("SELECT to_state FROM tasker_task_transitions WHERE task_id = %s AND most_recent",
                                 (task,)).fetchone()[0] == "cancelled"
                assert c.execute("SELECT count(*) FROM tasker_core.step_claims WHERE task_id = %s", (task,)).fetchone()[0] == 0
                assert c.execute("SELECT count(*) FROM tasker_workflow_steps WHERE task_id = %s AND in_process",
                                 (task,)).fetchone()[0] == 0
        assert not bad, f"errors reached the worker or the operator: {dict(bad)}"
        with rdb.connect() as c:
            assert c.execute("SELECT * FROM tasker_core.verify()").fetchall() == []
            assert c.execute("SELECT * FROM tasker_core.check_tracking()").fetchall() == []
    finally:
        worker.close()
        op.close()


@pytest.mark.parametrize("expirer", ["claim", "tick"])
def test_completion_races_lease_expiry_at_the_deadline(rdb, expirer):
    """A worker completes its step just before its lease deadline while another worker's claim
    (or tick()) expires leases just after it: either the completion wins (the step is complete,
    never expired) or the expiry wins (the completion gets TK030, the step is retried) —
    never a deadlock, and the claim never fails."""
    w1, w2 = session(rdb), session(rdb)
    outcomes = collections.Counter()
    try:
        for it in range(30):
            t = T0 + timedelta(hours=it)
            at(w1, t)
            at(w2, t + timedelta(seconds=10))
            w1.execute("SELECT tasker_core.create_task('lease', 'pair', NULL, %s)", (Jsonb({"i": it}),))
            (a,) = w1.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w1', ARRAY['lease'], 1, 10)").fetchone()
            at(w1, t + timedelta(seconds=10) - timedelta(milliseconds=1))
            expire = ("SELECT workflow_step_id FROM tasker_core.claim_steps('w2', ARRAY['lease'], 5, 600)"
                      if expirer == "claim" else "SELECT tasker_core.tick()")
            done, expired = together(lambda: call(w1, "SELECT tasker_core.complete_step(%s, 'w1', '{\"by\": 1}')", (a,)),
                                     lambda: call(w2, expire))
            outcomes[(done[0], expired[0])] += 1
            assert done[0] in ("ok", "TK030"), (it, done)
            assert expired[0] == "ok", (it, expired)
            with rdb.connect() as c:
                if done[0] == "ok":
                    assert lease_expired_count(c, a) == 0, (it, "completed and expired")
                    assert last_step_transition(c, a)[0] == "complete"
                    if expirer == "claim":
                        assert a not in [r[0] for r in expired[1]]
                else:
                    assert lease_expired_count(c, a) == 1, it
                    if expirer == "claim":
                        assert a in [r[0] for r in expired[1]], (it, expired)
            drain(w2, "w2", "lease")
            with rdb.connect() as c:
                assert c.execute("SELECT count(*) FROM tasker_workflow_step_transitions WHERE workflow_step_id = %s "
                                 "AND to_state = 'complete'", (a,)).fetchone()[0] == 1
        print(dict(outcomes))
        with rdb.connect() as c:
            assert c.execute("SELECT count(*) FROM tasker_tasks WHERE NOT complete").fetchone()[0] == 0
            assert c.execute("SELECT * FROM tasker_core.check_tracking()").fetchall() == []
    finally:
        w1.close()
        w2.close()


@pytest.mark.parametrize("expirer", ["claim", "tick"])
def test_heartbeat_races_lease_expiry_at_the_deadline(rdb, expirer):
    """A heartbeat just before the deadline against an expiry just after it: a heartbeat that
    returned a new deadline means the worker still holds the step until that deadline; a
    heartbeat that lost gets TK030."""
    w1, w2 = session(rdb), session(rdb)
    outcomes = collections.Counter()
    try:
        for it in range(30):
            t = T0 + timedelta(hours=it)
            at(w1, t)
            at(w2, t + timedelta(seconds=10))
            w1.execute("SELECT tasker_core.create_task('one', 'one', NULL, %s)", (Jsonb({"i": it}),))
            (s,) = w1.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w1', ARRAY['one'], 1, 10)").fetchone()
            at(w1, t + timedelta(seconds=10) - timedelta(milliseconds=1))
            expire = ("SELECT workflow_step_id FROM tasker_core.claim_steps('w2', ARRAY['one'], 5, 600)"
                      if expirer == "claim" else "SELECT tasker_core.tick()")
            beat, expired = together(lambda: call(w1, "SELECT tasker_core.heartbeat(%s, 'w1')", (s,)),
                                     lambda: call(w2, expire))
            outcomes[(beat[0], expired[0])] += 1
            assert beat[0] in ("ok", "TK030"), (it, beat)
            assert expired[0] == "ok", (it, expired)
            with rdb.connect() as c:
                claim = c.execute("SELECT worker_id, lease_expires_at FROM tasker_core.step_claims "
                                  "WHERE workflow_step_id = %s", (s,)).fetchone()
                if beat[0] == "ok":
                    deadline = beat[1][0][0]
                    assert deadline == t + timedelta(seconds=20) - timedelta(milliseconds=1)
                    assert claim == ("w1", deadline), (it, "the heartbeat was discarded", claim)
                    assert last_step_transition(c, s)[0] == "in_progress"
                    assert lease_expired_count(c, s) == 0, it
                    if expirer == "claim":
                        assert s not in [r[0] for r in expired[1]], it
                    assert w1.execute("SELECT tasker_core.complete_step(%s, 'w1', '{}')", (s,)).fetchone()[0]
                else:
                    assert claim is None or claim[0] == "w2", (it, claim)
                    assert lease_expired_count(c, s) == 1, it
            drain(w2, "w2", "one")
        print(dict(outcomes))
        with rdb.connect() as c:
            assert c.execute("SELECT count(*) FROM tasker_tasks WHERE NOT complete").fetchone()[0] == 0
    finally:
        w1.close()
        w2.close()


def test_a_heartbeat_committed_while_a_claim_expires_the_lease_keeps_the_step(rdb):
    """The window widened by hand: the heartbeat's transaction is still open when a claim at
    the deadline looks for expired leases. Once the heartbeat commits, its deadline holds:
    the claim must not take the step (nor fail)."""
    w1, w2 = session(rdb), session(rdb)
    try:
        at(w1, T0)
        w1.execute("SELECT tasker_core.create_task('one', 'one', NULL, '{}')")
        (s,) = w1.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w1', ARRAY['one'], 1, 10)").fetchone()
        at(w2, T0 + timedelta(seconds=10))
        with rdb.connect(autocommit=False) as beat:
            beat.execute("SELECT set_config('tasker_core.fake_now', %s, true)",
                         ((T0 + timedelta(seconds=9)).isoformat(),))
            deadline = beat.execute("SELECT tasker_core.heartbeat(%s, 'w1')", (s,)).fetchone()[0]
            assert deadline == T0 + timedelta(seconds=19)
            box = {}
            th = threading.Thread(target=lambda: box.setdefault(
                "claim", call(w2, "SELECT workflow_step_id FROM tasker_core.claim_steps('w2', ARRAY['one'], 5, 600)")))
            th.start()
            with rdb.connect() as probe:
                for _ in range(100):       # until the claim waits for the heartbeat, or is done
                    if not th.is_alive() or probe.execute(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                            "AND wait_event_type = 'Lock' AND query LIKE '%claim_steps%'").fetchone()[0]:
                        break
                    time.sleep(0.02)
            beat.commit()
            th.join(30)
        assert box["claim"][0] == "ok", box
        assert s not in [r[0] for r in box["claim"][1]], "the claim took a step whose heartbeat succeeded"
        with rdb.connect() as c:
            assert c.execute("SELECT worker_id, lease_expires_at FROM tasker_core.step_claims WHERE workflow_step_id = %s",
                             (s,)).fetchone() == ("w1", deadline)
            assert lease_expired_count(c, s) == 0
        at(w1, T0 + timedelta(seconds=18))
        assert w1.execute("SELECT tasker_core.complete_step(%s, 'w1', '{}')", (s,)).fetchone()[0] is True
    finally:
        w1.close()
        w2.close()


def test_resolve_step_manually_races_the_worker(rdb):
    """An operator resolves a step while its worker completes (or fails) it: one of them
    wins, the other gets its documented error (TK030 for the worker, TK002 for resolving a
    completed step), never a deadlock."""
    worker, op = session(rdb), session(rdb)
    outcomes = collections.Counter()
    try:
        for it in range(30):
            task = op.execute("SELECT tasker_core.create_task('one', 'one', NULL, %s)", (Jsonb({"i": it}),)).fetchone()[0]
            (s,) = worker.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w', ARRAY['one'], 1, 600)").fetchone()
            if it % 2 == 0:
                work = "SELECT tasker_core.complete_step(%s, 'w', '{\"by\": \"worker\"}')"
            else:
                work = "SELECT tasker_core.fail_step(%s, 'w', '{\"message\": \"x\"}', false)"
            done, resolved = together(lambda: call(worker, work, (s,)),
                                      lambda: call(op, "SELECT tasker_core.resolve_step_manually(%s, '{\"by\": \"op\"}')", (s,)))
            outcomes[(it % 2, done[0], resolved[0])] += 1
            assert done[0] in ("ok", "TK030"), (it, done, resolved)
            assert resolved[0] in ("ok", "TK002"), (it, done, resolved)
            with rdb.connect() as c:
                state = last_step_transition(c, s)[0]
                results = c.execute("SELECT results FROM tasker_workflow_steps WHERE workflow_step_id = %s", (s,)).fetchone()[0]
                task_state = c.execute("SELECT to_state FROM tasker_task_transitions WHERE task_id = %s AND most_recent",
                                       (task,)).fetchone()[0]
            if it % 2 == 0:
                # exactly one of them finished the step
                assert (done[0] == "ok") != (resolved[0] == "ok"), (it, done, resolved)
                assert state == ("complete" if done[0] == "ok" else "resolved_manually")
                assert results == {"by": "worker" if done[0] == "ok" else "op"}
            else:
                # a failed step can still be resolved: the operator always succeeds
                assert resolved[0] == "ok", (it, done, resolved)
                assert state == "resolved_manually" and results == {"by": "op"}
            assert task_state == "complete", (it, task_state)
        print(dict(outcomes))
        with rdb.connect() as c:
            assert c.execute("SELECT count(*) FROM tasker_core.step_claims").fetchone()[0] == 0
            assert c.execute("SELECT * FROM tasker_core.verify()").fetchall() == []
    finally:
        worker.close()
        op.close()


TWIN = {"name": "twin", "namespace_name": "twin", "version": "1.0.0",
        "step_templates": [{"name": "x", "handler_class": "X"}, {"name": "y", "handler_class": "Y"}]}


def waiting_on_lock(db, pid):
    with db.connect() as probe:
        return probe.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                             (pid,)).fetchone()[0]


def test_claims_expiring_leases_of_several_tasks_never_deadlock(rdb):
    """Two claimers expire leases of the same two tasks, their deadlines interleaved (T1, T2,
    T2, T1): each finalizes the tasks of the leases it expired, and a task stays locked until
    commit. Taken in deadline order, claimer A held T1 and waited for T2 while B held T2 and
    waited for T1. A lock on one claim row (what a heartbeat at the deadline holds) stops A
    between its two releases, so the race happens every time."""
    rdb.scalar("SELECT tasker_core.register_task_template(%s)", (Jsonb(TWIN),))
    w, a, b = session(rdb), session(rdb), session(rdb)
    try:
        at(w, T0)
        t1 = w.execute("SELECT tasker_core.create_task('twin', 'twin', NULL, '{}')").fetchone()[0]
        t2 = w.execute("SELECT tasker_core.create_task('twin', 'twin', NULL, '{}')").fetchone()[0]
        steps = {tid: [r[0] for r in w.execute(
            "SELECT workflow_step_id FROM tasker_workflow_steps WHERE task_id = %s ORDER BY 1", (tid,)).fetchall()]
            for tid in (t1, t2)}
        # leases ending at T0+1 (t1), +2 (t2), +3 (t2), +4 (t1)
        w.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w', ARRAY['twin'], 4, 60)")
        for lease, step in enumerate([steps[t1][0], steps[t2][0], steps[t2][1], steps[t1][1]], start=1):
            w.execute("UPDATE tasker_core.step_claims SET lease_expires_at = %s WHERE workflow_step_id = %s",
                      (T0 + timedelta(seconds=lease), step))
        held = dict(w.execute("SELECT workflow_step_id, lease_expires_at FROM tasker_core.step_claims").fetchall())
        order = sorted(held, key=held.get)
        assert [rdb.scalar("SELECT task_id FROM tasker_workflow_steps WHERE workflow_step_id = %s", (s,))
                for s in order] == [t1, t2, t2, t1], "the deadlines do not interleave"
        for c in (a, b):
            at(c, T0 + timedelta(seconds=10))
        with rdb.connect(autocommit=False) as blocker:
            # holds the second lease A will expire, as a heartbeat at the deadline would
            blocker.execute("SELECT 1 FROM tasker_core.step_claims WHERE workflow_step_id = %s FOR UPDATE",
                            (order[1],))
            box = {}
            claim = "SELECT workflow_step_id FROM tasker_core.claim_steps(%s, ARRAY['twin'], 2, 600)"
            ta = threading.Thread(target=lambda: box.setdefault("a", call(a, claim, ("a",))))
            ta.start()
            for _ in range(250):
                if waiting_on_lock(rdb, a.info.backend_pid):
                    break
                time.sleep(0.02)
            assert waiting_on_lock(rdb, a.info.backend_pid), "claimer A did not reach the held lease"
            tb = threading.Thread(target=lambda: box.setdefault("b", call(b, claim, ("b",))))
            tb.start()
            for _ in range(100):       # B finishes, or waits for a task A holds (the old order)
                if not tb.is_alive() or waiting_on_lock(rdb, b.info.backend_pid):
                    break
                time.sleep(0.02)
            time.sleep(0.3)
            blocker.rollback()
            ta.join(30)
            tb.join(30)
        assert box["a"][0] == "ok" and box["b"][0] == "ok", box
        with rdb.connect() as c:
            assert c.execute("SELECT * FROM tasker_core.verify()").fetchall() == []
            assert c.execute("SELECT * FROM tasker_core.check_tracking()").fetchall() == []
    finally:
        for c in (w, a, b):
            c.close()


def test_completion_waits_for_a_held_child_row_while_holding_nothing(rdb):
    """complete_step takes the step's rows and its children's all at once or not at all: while
    another transaction holds a child's maintained row, the completion waits without holding
    the step's own row (a third session takes that one with NOWAIT), then finishes once the
    child's row is free, with the tracking exact."""
    task = rdb.scalar("SELECT tasker_core.create_task('lease', 'pair', NULL, '{}')")
    a, b = [r[0] for r in rdb.execute("SELECT workflow_step_id FROM tasker_workflow_steps "
                                      "WHERE task_id = %s ORDER BY workflow_step_id", (task,))]
    with session(rdb) as worker, session(rdb) as holder, session(rdb) as prober:
        assert worker.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w', ARRAY['lease'], 1, 600)"
                              ).fetchone()[0] == a
        holder.execute("BEGIN")
        holder.execute("SELECT 1 FROM tasker_core.step_state WHERE workflow_step_id = %s FOR UPDATE", (b,))
        done = {}
        th = threading.Thread(target=lambda: done.update(
            r=call(worker, "SELECT tasker_core.complete_step(%s, 'w', '{}')", (a,))), daemon=True)
        th.start()
        time.sleep(0.5)
        assert th.is_alive(), f"the completion did not wait: {done}"
        # the waiting completion holds nothing: its own step's row is free
        prober.execute("BEGIN")
        assert call(prober, "SELECT 1 FROM tasker_workflow_steps WHERE workflow_step_id = %s "
                            "FOR NO KEY UPDATE NOWAIT", (a,))[0] == "ok"
        prober.execute("ROLLBACK")
        holder.execute("COMMIT")
        th.join(10)
        assert not th.is_alive() and done["r"][0] == "ok", done
    assert rdb.scalar("SELECT count(*) FROM tasker_core.check_tracking()") == 0
    assert rdb.scalar("SELECT workflow_step_id FROM tasker_core.claim_steps('w2', ARRAY['lease'], 1, 600)") == b
