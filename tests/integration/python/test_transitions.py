"""transition_task / transition_step: the two state machines, guards, compare-and-swap, rows
and events written, argument errors; and the event catalog.

Owners are put in their `from` state the way Rails leaves them: Statesman-style rows written
with plain SQL (from_state NULL, first sort_key 0 or 10, most_recent). The expected machines,
event names and SQLSTATEs are written out here from the Rails reference (rails-tasker.md
§3.2/§3.3) and the issue, not read from the extension, so a change on either side fails here.
"""
import json
import re

import psycopg
import pytest

from conftest import ROOT, create_database, drop_database, sqlstate_of

SAMPLE = (ROOT / "demo" / "sample_workflow.sql").read_text()
STATES = ("pending", "in_progress", "complete", "error", "cancelled", "resolved_manually")

TASK_ALLOWED = {
    "pending": {"in_progress", "cancelled", "error"},
    "in_progress": {"complete", "error", "cancelled", "pending"},
    "error": {"pending", "resolved_manually"},
    "complete": {"cancelled"},
    "resolved_manually": {"cancelled"},
    "cancelled": set(),
}
STEP_ALLOWED = {
    "pending": {"in_progress", "error", "cancelled", "resolved_manually"},
    "in_progress": {"complete", "error", "cancelled"},
    "error": {"pending", "resolved_manually"},
    "complete": set(),
    "cancelled": set(),
    "resolved_manually": set(),
}
EVENT_SUFFIX = {
    "pending": "initialize_requested",
    "in_progress": {"task": "start_requested", "step": "execution_requested"},
    "complete": "completed",
    "error": "failed",
    "cancelled": "cancelled",
    "resolved_manually": "resolved_manually",
}


def expected_event(kind, frm, to):
    if frm == "error" and to == "pending":
        return f"{kind}.retry_requested"
    suffix = EVENT_SUFFIX[to]
    if isinstance(suffix, dict):
        suffix = suffix[kind]
    return f"{kind}.{suffix}"


class Kind:
    def __init__(self, kind):
        self.kind = kind
        self.fn = f"tasker_core.transition_{kind}"
        self.table = "tasker_task_transitions" if kind == "task" else "tasker_workflow_step_transitions"
        self.key = "task_id" if kind == "task" else "workflow_step_id"
        self.allowed = TASK_ALLOWED if kind == "task" else STEP_ALLOWED


TASK, STEP = Kind("task"), Kind("step")


# ------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mdb():
    """One database for the module; every test makes its own tasks, so they never share rows."""
    database = create_database("tr")
    database.scalar("SELECT tasker_core.install_schema()")
    yield database
    drop_database(database)


@pytest.fixture
def conn(mdb):
    with mdb.connect() as c:
        yield c


def new_task(conn):
    """A fresh sample task (6 steps: 1 -> {2,3,4} -> 5 -> 6); returns (task_id, [step ids])."""
    conn.execute(SAMPLE)
    task_id = conn.execute("SELECT max(task_id) FROM tasker_tasks").fetchone()[0]
    steps = [r[0] for r in conn.execute(
        "SELECT workflow_step_id FROM tasker_workflow_steps WHERE task_id = %s ORDER BY workflow_step_id",
        (task_id,))]
    return task_id, steps


def rails_row(conn, k, owner, to_state, sort_key, most_recent=True, flip=True):
    """A transition row as Statesman writes it: flip the old most_recent, insert, from_state NULL."""
    if flip and most_recent:
        conn.execute(f"UPDATE {k.table} SET most_recent = false, updated_at = now() "
                     f"WHERE {k.key} = %s AND most_recent", (owner,))
    conn.execute(
        f"INSERT INTO {k.table} (to_state, from_state, metadata, sort_key, most_recent, {k.key}, created_at, updated_at) "
        "VALUES (%s, NULL, '{}', %s, %s, %s, now(), now())",
        (to_state, sort_key, most_recent, owner))


def rows(conn, k, owner):
    return conn.execute(
        f"SELECT id, to_state, from_state, sort_key, most_recent, metadata FROM {k.table} "
        f"WHERE {k.key} = %s ORDER BY id", (owner,)).fetchall()


def events(conn, after_id=0):
    return conn.execute(
        "SELECT id, name, task_id, step_id, from_state, to_state, payload FROM tasker_core.events "
        "WHERE id > %s ORDER BY id", (after_id,)).fetchall()


def max_event_id(conn):
    return conn.execute("SELECT coalesce(max(id), 0) FROM tasker_core.events").fetchone()[0]


def call(conn, k, owner, to_state, metadata="{}", expected_from=None):
    return conn.execute(f"SELECT {k.fn}(%s, %s, %s::jsonb, %s)",
                        (owner, to_state, metadata, expected_from)).fetchone()[0]


def listed_ids(err):
    """The ids a guard message lists after its last colon ('...: steps 4, 5' -> [4, 5])."""
    tail = str(err).splitlines()[0].rsplit(":", 1)[1]
    return [int(x) for x in re.findall(r"\d+", tail)]


def fails(conn, k, owner, to_state, metadata="{}", expected_from=None):
    with pytest.raises(psycopg.Error) as info:
        call(conn, k, owner, to_state, metadata, expected_from)
    return info.value


def owner_of(conn, k):
    """A fresh owner: a task whose steps are all complete (so task -> complete passes its
    guard), or the root step of a fresh task (no parents, so -> in_progress passes)."""
    task_id, steps = new_task(conn)
    if k is TASK:
        for s in steps:
            rails_row(conn, STEP, s, "complete", 10)
        return task_id, task_id, None
    return steps[0], task_id, steps[0]


def put_in_state(conn, k, owner, state, history):
    """Statesman rows ending in `state`: 'none' (no rows, so pending), 'sk0' (one row, sort_key
    0, as initialize_state_machine! writes it) or 'sk10' (one row, sort_key 10, Statesman's first)."""
    if history == "none":
        assert state == "pending"
        return None
    sort_key = 0 if history == "sk0" else 10
    rails_row(conn, k, owner, state, sort_key)
    return sort_key


MATRIX = [(k, frm, to, hist)
          for k in ("task", "step")
          for frm in STATES
          for to in STATES
          for hist in (("none", "sk0", "sk10") if frm == "pending" else ("sk0", "sk10"))]


# ------------------------------------------------------------------------------------------
# the machines: every from/to pair, allowed and forbidden
# ------------------------------------------------------------------------------------------

def test_the_expected_machines_have_rails_edge_counts():
    # guards the tables above: 11 task edges, 9 step edges (rails-tasker.md §3.2)
    assert sum(len(v) for v in TASK_ALLOWED.values()) == 11
    assert sum(len(v) for v in STEP_ALLOWED.values()) == 9


@pytest.mark.parametrize("kind,frm,to,hist", MATRIX,
                         ids=[f"{k}-{f}-to-{t}-{h}" for k, f, t, h in MATRIX])
def test_every_pair(conn, kind, frm, to, hist):
    k = TASK if kind == "task" else STEP
    owner, task_id, step_id = owner_of(conn, k)
    last_sort_key = put_in_state(conn, k, owner, frm, hist)
    before = rows(conn, k, owner)
    ev0 = max_event_id(conn)
    metadata = {"case": f"{kind}:{frm}->{to}", "n": 1}

    if frm == to:
        assert call(conn, k, owner, to, json.dumps(metadata)) is False
        assert rows(conn, k, owner) == before
        assert events(conn, ev0) == []
        return

    if to not in k.allowed[frm]:
        err = fails(conn, k, owner, to, json.dumps(metadata))
        assert err.sqlstate == "TK002", err
        msg = str(err)
        assert f"{kind} {owner}" in msg and frm in msg and to in msg, msg
        assert rows(conn, k, owner) == before
        assert events(conn, ev0) == []
        return

    assert call(conn, k, owner, to, json.dumps(metadata)) is True
    after = rows(conn, k, owner)
    assert len(after) == len(before) + 1
    # the old current row is flipped, nothing else about it changes
    for old, new in zip(before, after):
        assert new[:4] == old[:4] and new[5] == old[5]
        assert new[4] is False
    new_id, to_state, from_state, sort_key, most_recent, md = after[-1]
    assert (to_state, from_state, most_recent, md) == (to, frm, True, metadata)
    assert sort_key == (10 if last_sort_key is None else last_sort_key + 10)
    # exactly one event, from-aware, naming the transition
    evs = events(conn, ev0)
    assert len(evs) == 1, evs
    _, name, e_task, e_step, e_from, e_to, payload = evs[0]
    assert name == expected_event(kind, frm, to)
    assert (e_task, e_step, e_from, e_to) == (task_id, step_id, frm, to)
    assert payload == {"transition_id": new_id, "sort_key": sort_key}


def test_the_matrix_covers_every_pair():
    pairs = {(k, f, t) for k, f, t, _ in MATRIX}
    assert len(pairs) == 72
    assert sum(1 for k, f, t in pairs if f != t and t in (TASK if k == "task" else STEP).allowed[f]) == 20


# ------------------------------------------------------------------------------------------
# sort_key and from_state next to rows Rails writes
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("first", [0, 10])
@pytest.mark.parametrize("kind", ["task", "step"])
def test_interleaved_with_rails_rows(conn, kind, first):
    k = TASK if kind == "task" else STEP
    owner, _, _ = owner_of(conn, k)
    rails_row(conn, k, owner, "pending", first)
    assert call(conn, k, owner, "in_progress") is True
    # Rails moves on from our row with last.sort_key + 10
    rails_row(conn, k, owner, "error", first + 20)
    assert call(conn, k, owner, "pending") is True
    assert call(conn, k, owner, "in_progress", expected_from="pending") is True
    got = [(r[1], r[2], r[3], r[4]) for r in rows(conn, k, owner)]
    assert got == [
        ("pending", None, first, False),
        ("in_progress", "pending", first + 10, False),
        ("error", None, first + 20, False),
        ("pending", "error", first + 30, False),
        ("in_progress", "pending", first + 40, True),
    ]
    mine = [e for e in events(conn) if (e[3] == owner if kind == "step" else (e[2], e[3]) == (owner, None))]
    start = expected_event(kind, "pending", "in_progress")
    assert [(e[1], e[4], e[5]) for e in mine] == [
        (start, "pending", "in_progress"),
        (f"{kind}.retry_requested", "error", "pending"),
        (start, "pending", "in_progress"),
    ]


@pytest.mark.parametrize("kind", ["task", "step"])
def test_sort_key_is_max_plus_ten_not_current_plus_ten(conn, kind):
    # A Rails history whose most_recent row is not the highest sort_key (hand-edited or racing
    # writers): the new key must still be above every existing key.
    k = TASK if kind == "task" else STEP
    owner, _, _ = owner_of(conn, k)
    rails_row(conn, k, owner, "pending", 0, most_recent=False)
    rails_row(conn, k, owner, "error", 30, most_recent=False)
    rails_row(conn, k, owner, "pending", 20, most_recent=True, flip=False)
    assert call(conn, k, owner, "in_progress") is True
    last = rows(conn, k, owner)[-1]
    assert (last[1], last[2], last[3], last[4]) == ("in_progress", "pending", 40, True)
    assert conn.execute(f"SELECT count(*) FROM {k.table} WHERE {k.key} = %s AND most_recent",
                        (owner,)).fetchone()[0] == 1


@pytest.mark.parametrize("kind", ["task", "step"])
def test_first_transition_without_rows_records_pending_and_sort_key_10(conn, kind):
    k = TASK if kind == "task" else STEP
    owner, _, _ = owner_of(conn, k)
    assert rows(conn, k, owner) == []
    assert call(conn, k, owner, "error") is True
    assert [(r[1], r[2], r[3], r[4]) for r in rows(conn, k, owner)] == [("error", "pending", 10, True)]


def test_metadata_null_is_recorded_as_empty_object(conn):
    owner, _, _ = owner_of(conn, STEP)
    assert conn.execute("SELECT tasker_core.transition_step(%s, 'error', NULL)", (owner,)).fetchone()[0] is True
    assert rows(conn, STEP, owner)[-1][5] == {}
    # and the default when omitted
    assert conn.execute("SELECT tasker_core.transition_step(%s, 'pending')", (owner,)).fetchone()[0] is True
    assert rows(conn, STEP, owner)[-1][5] == {}


# ------------------------------------------------------------------------------------------
# guards
# ------------------------------------------------------------------------------------------

def test_step_guard_parents_must_be_complete_or_resolved(conn):
    task_id, (s1, s2, s3, s4, s5, s6) = new_task(conn)
    ev0 = max_event_id(conn)
    # s2's only parent s1 has no transition: pending
    err = fails(conn, STEP, s2, "in_progress")
    assert err.sqlstate == "TK003"
    assert f"step {s2}" in str(err) and "pending" in str(err) and "in_progress" in str(err)
    assert listed_ids(err) == [s1], str(err)
    # every state of the parent that does not satisfy it
    for state, sk in (("in_progress", 10), ("error", 20), ("pending", 30)):
        rails_row(conn, STEP, s1, state, sk)
        assert fails(conn, STEP, s2, "in_progress").sqlstate == "TK003", state
    rails_row(conn, STEP, s1, "cancelled", 40)
    assert fails(conn, STEP, s2, "in_progress").sqlstate == "TK003"
    assert rows(conn, STEP, s2) == [] and events(conn, ev0) == []
    # fan-in: s5 waits for s2, s3, s4; the message names the ones still open
    rails_row(conn, STEP, s2, "complete", 10)
    rails_row(conn, STEP, s3, "resolved_manually", 10)
    rails_row(conn, STEP, s4, "error", 10)
    err = fails(conn, STEP, s5, "in_progress")
    assert err.sqlstate == "TK003", err
    assert listed_ids(err) == [s4], str(err)
    # an older complete row does not count: only the most_recent one does
    rails_row(conn, STEP, s4, "complete", 20)
    rails_row(conn, STEP, s4, "error", 30)
    assert fails(conn, STEP, s5, "in_progress").sqlstate == "TK003"
    assert rows(conn, STEP, s5) == []
    # the guard only applies to -> in_progress
    assert call(conn, STEP, s5, "error") is True
    assert call(conn, STEP, s5, "pending") is True
    # complete + resolved_manually + complete: passes
    rails_row(conn, STEP, s4, "complete", 40)
    assert call(conn, STEP, s5, "in_progress", expected_from="pending") is True
    assert fails(conn, STEP, s6, "in_progress").sqlstate == "TK003"


def test_root_step_has_no_guard(conn):
    _, steps = new_task(conn)
    assert call(conn, STEP, steps[0], "in_progress") is True


def test_task_guard_every_step_complete_or_resolved(conn):
    task_id, steps = new_task(conn)
    rails_row(conn, TASK, task_id, "in_progress", 10)
    ev0 = max_event_id(conn)
    err = fails(conn, TASK, task_id, "complete")
    assert err.sqlstate == "TK003"
    assert f"task {task_id}" in str(err) and "in_progress" in str(err) and "complete" in str(err)
    assert listed_ids(err) == steps, str(err)
    for s in steps[:-1]:
        rails_row(conn, STEP, s, "complete" if s % 2 else "resolved_manually", 10)
    # the last step in each state that does not satisfy the guard
    for state, sk in (("pending", 10), ("in_progress", 20), ("error", 30), ("cancelled", 40)):
        rails_row(conn, STEP, steps[-1], state, sk)
        err = fails(conn, TASK, task_id, "complete")
        assert err.sqlstate == "TK003" and listed_ids(err) == [steps[-1]], (state, str(err))
    assert len(rows(conn, TASK, task_id)) == 1 and events(conn, ev0) == []
    rails_row(conn, STEP, steps[-1], "complete", 50)
    assert call(conn, TASK, task_id, "complete", expected_from="in_progress") is True
    assert rows(conn, TASK, task_id)[-1][1:5] == ("complete", "in_progress", 20, True)
    assert [e[1] for e in events(conn, ev0)] == ["task.completed"]


def test_task_guard_only_on_complete(conn):
    task_id, _ = new_task(conn)
    for to in ("in_progress", "error", "pending", "in_progress", "cancelled"):
        assert call(conn, TASK, task_id, to) is True


def test_task_without_steps_may_complete(conn):
    task_id, steps = new_task(conn)
    conn.execute("DELETE FROM tasker_workflow_step_edges WHERE from_step_id = ANY(%s) OR to_step_id = ANY(%s)",
                 (steps, steps))
    conn.execute("DELETE FROM tasker_workflow_steps WHERE task_id = %s", (task_id,))
    assert call(conn, TASK, task_id, "in_progress") is True
    assert call(conn, TASK, task_id, "complete") is True


# ------------------------------------------------------------------------------------------
# compare-and-swap and no-ops
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["task", "step"])
def test_expected_from(conn, kind):
    k = TASK if kind == "task" else STEP
    owner, _, _ = owner_of(conn, k)
    ev0 = max_event_id(conn)
    # no rows: the owner is pending
    for wrong in ("in_progress", "error", "complete", "cancelled", "resolved_manually"):
        err = fails(conn, k, owner, "in_progress", expected_from=wrong)
        assert err.sqlstate == "TK005", wrong
        msg = str(err)
        assert f"{kind} {owner}" in msg and "pending" in msg and wrong in msg and "in_progress" in msg, msg
    assert rows(conn, k, owner) == [] and events(conn, ev0) == []
    assert call(conn, k, owner, "in_progress", expected_from="pending") is True
    # the second caller with the same expectation loses
    err = fails(conn, k, owner, "error", expected_from="pending")
    assert err.sqlstate == "TK005"
    assert call(conn, k, owner, "error", expected_from="in_progress") is True
    # a matching expectation does not make a forbidden edge allowed
    err = fails(conn, k, owner, "complete", expected_from="error")
    assert err.sqlstate == "TK002"
    # unknown expected state
    assert fails(conn, k, owner, "pending", expected_from="failed").sqlstate == "TK001"
    assert fails(conn, k, owner, "pending", expected_from="").sqlstate == "TK001"
    assert [r[1] for r in rows(conn, k, owner)] == ["in_progress", "error"]
    assert len(events(conn, ev0)) == 2


@pytest.mark.parametrize("kind", ["task", "step"])
def test_noop_returns_false_and_writes_nothing(conn, kind):
    k = TASK if kind == "task" else STEP
    owner, _, _ = owner_of(conn, k)
    # pending with no rows
    ev0 = max_event_id(conn)
    assert call(conn, k, owner, "pending") is False
    assert call(conn, k, owner, "pending", expected_from="pending") is False
    assert rows(conn, k, owner) == [] and events(conn, ev0) == []
    rails_row(conn, k, owner, "error", 10)
    before = rows(conn, k, owner)
    assert call(conn, k, owner, "error", '{"again": true}') is False
    assert call(conn, k, owner, "error", expected_from="error") is False
    # already in the target state: an idempotent no-op even when the expectation is stale
    assert call(conn, k, owner, "error", expected_from="in_progress") is False
    assert rows(conn, k, owner) == before and events(conn, ev0) == []
    # nothing was touched: not even updated_at of the current row
    assert conn.execute(f"SELECT updated_at = created_at FROM {k.table} WHERE {k.key} = %s",
                        (owner,)).fetchone()[0] is True


# ------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------

def snapshot(conn):
    return (conn.execute("SELECT count(*), coalesce(sum(sort_key), 0) FROM tasker_task_transitions").fetchone(),
            conn.execute("SELECT count(*), coalesce(sum(sort_key), 0) FROM tasker_workflow_step_transitions").fetchone(),
            conn.execute("SELECT count(*) FROM tasker_core.events").fetchone())


@pytest.mark.parametrize("kind", ["task", "step"])
def test_argument_errors_change_nothing(conn, kind):
    k = TASK if kind == "task" else STEP
    owner, _, _ = owner_of(conn, k)
    rails_row(conn, k, owner, "pending", 10)
    before = snapshot(conn)
    cases = [
        # (args, sqlstate)
        ((None, "in_progress"), "22004"),
        ((owner, None), "22004"),
        ((None, None), "22004"),
        ((owner, "bogus"), "TK001"),
        ((owner, ""), "TK001"),
        ((owner, "Pending"), "TK001"),
        ((owner, "failed"), "TK001"),
        ((owner, "skipped"), "TK001"),
        ((owner, "in_progress "), "TK001"),
        ((owner, "in_progress", "{}", "nope"), "TK001"),
        ((owner, "in_progress", "[]"), "22023"),
        ((owner, "in_progress", "1"), "22023"),
        ((owner, "in_progress", '"text"'), "22023"),
        ((owner, "in_progress", "null"), "22023"),
        ((owner, "in_progress", "true"), "22023"),
        ((987654321, "in_progress"), "TK004"),
        ((-1, "in_progress"), "TK004"),
        ((0, "in_progress"), "TK004"),
    ]
    for args, code in cases:
        casts = ["%s::bigint", "%s::text", "%s::jsonb", "%s::text"][:len(args)]
        sql = f"SELECT {k.fn}({', '.join(casts)})"
        got = sqlstate_of(conn, sql, args)
        assert got == code, (args, got)
    assert snapshot(conn) == before
    # the message of an unknown state names the id and the value
    err = fails(conn, k, owner, "bogus")
    assert f"{kind} {owner}" in str(err) and "bogus" in str(err)
    err = sqlstate_of(conn, f"SELECT {k.fn}(987654321, 'error')")
    assert err == "TK004"


def test_not_found_message_names_the_id(conn):
    with pytest.raises(psycopg.Error) as info:
        conn.execute("SELECT tasker_core.transition_task(424242, 'in_progress')")
    assert info.value.sqlstate == "TK004" and "task 424242" in str(info.value)
    with pytest.raises(psycopg.Error) as info:
        conn.execute("SELECT tasker_core.transition_step(424242, 'in_progress')")
    assert info.value.sqlstate == "TK004" and "step 424242" in str(info.value)


def test_schema_not_installed_is_TK010(db):
    with db.connect() as c:
        for fn in ("transition_task", "transition_step"):
            assert sqlstate_of(c, f"SELECT tasker_core.{fn}(1, 'in_progress')") == "TK010"
        assert c.execute("SELECT count(*) FROM tasker_core.events").fetchone()[0] == 0


def test_signatures(conn):
    got = dict(conn.execute("""
        SELECT p.proname::text, pg_get_function_arguments(p.oid) || ' -> ' || pg_get_function_result(p.oid)
        FROM pg_proc p WHERE p.pronamespace = 'tasker_core'::regnamespace
          AND p.proname IN ('transition_task', 'transition_step')""").fetchall())
    assert got == {
        "transition_task": "task_id bigint, to_state text, metadata jsonb DEFAULT '{}'::jsonb, "
                           "expected_from text DEFAULT NULL::text -> boolean",
        "transition_step": "step_id bigint, to_state text, metadata jsonb DEFAULT '{}'::jsonb, "
                           "expected_from text DEFAULT NULL::text -> boolean",
    }


def test_error_in_a_transaction_rolls_back_with_it(mdb):
    """A transition and its event live and die with the caller's transaction."""
    with mdb.connect() as c:
        owner, task_id, _ = owner_of(c, STEP)
        ev0 = max_event_id(c)
    with mdb.connect(autocommit=False) as c:
        assert call(c, STEP, owner, "in_progress") is True
        c.rollback()
    with mdb.connect() as c:
        assert rows(c, STEP, owner) == [] and events(c, ev0) == []


# ------------------------------------------------------------------------------------------
# the event catalog
# ------------------------------------------------------------------------------------------

def test_event_catalog(conn):
    cat = conn.execute("SELECT name, event_group, source, description FROM tasker_core.event_catalog()").fetchall()
    names = [r[0] for r in cat]
    assert len(names) == len(set(names)) == 47
    groups = {}
    for name, group, source, description in cat:
        assert name.split(".")[0] == group
        assert source in ("transition", "orchestration", "declared"), name
        assert description
        groups[group] = groups.get(group, 0) + 1
    assert groups == {"task": 8, "step": 12, "workflow": 19, "observability": 8}
    # every event a transition can emit is catalogued as a transition event
    by_name = {r[0]: r[2] for r in cat}
    for kind, allowed in (("task", TASK_ALLOWED), ("step", STEP_ALLOWED)):
        for frm, tos in allowed.items():
            for to in tos:
                assert by_name.get(expected_event(kind, frm, to)) == "transition", (kind, frm, to)
    for name in ("task.before_transition", "step.before_handle", "step.handle", "step.before_transition",
                 "workflow.task_started", "workflow.viable_steps_discovered", "workflow.no_viable_steps",
                 "workflow.steps_execution_completed", "observability.task.enqueue",
                 "observability.step.max_retries_reached", "step.skipped", "step.map_expanded"):
        assert name in by_name, name
