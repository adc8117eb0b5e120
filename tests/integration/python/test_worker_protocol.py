"""The FFI-free orchestration path (issue 5): templates in the Rails tables, create_task, and the
worker protocol — claim_steps / complete_step / fail_step / heartbeat with leases, backoff and
finalization — plus tick(), the operator functions and task_graph_dot, over real connections
with committed transactions.

Every error is checked by its SQLSTATE, and a failed call is checked to change nothing (a
fingerprint of every row of the Tasker tables and of tasker_core's own tables before and after).
Time is moved with `tasker_core.fake_now` (per session), so backoff and lease tests are exact
and fast. The expectations (backoff table, state sequences, event names, SQLSTATEs) are written
out here from the issue and the README, not read from the extension.

The last test is the concurrency proof: 8 claimer threads, each on its own connection, run 500
fan-out/fan-in tasks to completion (failing some steps once), and the claims they recorded and
the transitions in the database show that no step was ever held by two workers at once.
"""
import collections
import contextlib
import json
import re
import shutil
import subprocess
import threading
import time
import zlib
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
NS = "fulfilment"

# validate -> (reserve || charge) -> ship -> notify; with the optional fields of a Rails template.
ORDER = {
    "name": "process_order",
    "namespace_name": NS,
    "version": "1.0.0",
    "description": "order fulfilment",
    "schema": {
        "type": "object",
        "required": ["order_id"],
        "properties": {"order_id": {"type": "integer", "minimum": 1}},
    },
    "step_templates": [
        {"name": "validate", "handler_class": "Orders::Validate", "dependent_system": "orders",
         "description": "validate the order"},
        {"name": "reserve", "handler_class": "Inventory::Reserve", "dependent_system": "inventory",
         "depends_on_step": "validate"},
        {"name": "charge", "handler_class": "Payments::Charge", "dependent_system": "payments",
         "depends_on_step": "validate", "handler_config": {"gateway": "test", "timeout": 5},
         "default_retry_limit": 5},
        {"name": "ship", "handler_class": "Shipping::Ship", "depends_on_steps": ["reserve", "charge"],
         "skippable": True},
        {"name": "notify", "handler_class": "Notify", "depends_on_step": "ship",
         "default_retry_limit": 1},
    ],
}
ORDER_EDGES = {("validate", "reserve"), ("validate", "charge"), ("reserve", "ship"),
               ("charge", "ship"), ("ship", "notify")}


def template(name, steps, ns=NS, version="1.0.0", **extra):
    """A template of `steps`: (name, [parents], {extra step fields})."""
    out = {"name": name, "namespace_name": ns, "version": version, "step_templates": []}
    for s in steps:
        sname, parents, fields = s if len(s) == 3 else (*s, {})
        st = {"name": sname, "handler_class": f"H::{sname}", "depends_on_steps": list(parents)}
        st.update(fields)
        out["step_templates"].append(st)
    out.update(extra)
    return out


SINGLE = template("single", [("only", [])])
SPLIT = template("split", [("root", []), ("left", ["root"]), ("right", ["root"])])


# ----------------------------------------------------------------------------------- helpers

@pytest.fixture
def wdb(tasker_db):
    """A fresh database with the Tasker schema and tracking enabled (claims need it)."""
    tasker_db.scalar("SELECT tasker_core.enable_tracking()")
    return tasker_db


@contextlib.contextmanager
def raises(code, match=None):
    with pytest.raises(psycopg.Error) as ei:
        yield ei
    assert ei.value.sqlstate == code, f"expected SQLSTATE {code}, got {ei.value.sqlstate}: {ei.value}"
    if match:
        assert re.search(match, str(ei.value)), str(ei.value)


def fingerprint(conn):
    """Row count and digest of every Tasker table and every tasker_core table."""
    tables = conn.execute(
        """SELECT format('%I.%I', schemaname, tablename) FROM pg_tables
           WHERE (schemaname = 'public' AND tablename LIKE 'tasker\\_%') OR schemaname = 'tasker_core'
           ORDER BY 1""").fetchall()
    return {t: conn.execute(
        f"SELECT count(*), md5(COALESCE(string_agg(x::text, '|' ORDER BY x::text), '')) FROM {t} x"
    ).fetchone() for (t,) in tables}


@contextlib.contextmanager
def unchanged(db):
    with db.connect() as c:
        before = fingerprint(c)
    yield
    with db.connect() as c:
        after = fingerprint(c)
    changed = [t for t in before if before[t] != after.get(t)] + [t for t in after if t not in before]
    assert not changed, f"a failed call changed {changed}"


def fake(conn, ts):
    conn.execute("SELECT set_config('tasker_core.fake_now', %s, false)", (ts.isoformat(),))


def register(conn, tmpl):
    return conn.execute("SELECT tasker_core.register_task_template(%s)", (Jsonb(tmpl),)).fetchone()[0]


def create(conn, tmpl_or_name, context=None, options=None, ns=NS, version=None):
    name = tmpl_or_name["name"] if isinstance(tmpl_or_name, dict) else tmpl_or_name
    if isinstance(tmpl_or_name, dict):
        ns = tmpl_or_name["namespace_name"]
    return conn.execute("SELECT tasker_core.create_task(%s, %s, %s, %s, %s)",
                        (ns, name, version, Jsonb(context if context is not None else {"order_id": 1}),
                         Jsonb(options or {}))).fetchone()[0]


def step_ids(conn, task_id):
    return dict(conn.execute(
        """SELECT ns.name::text, ws.workflow_step_id FROM tasker_workflow_steps ws
           JOIN tasker_named_steps ns USING (named_step_id) WHERE ws.task_id = %s""", (task_id,)).fetchall())


def step_state(conn, step_id):
    row = conn.execute("SELECT to_state FROM tasker_workflow_step_transitions WHERE workflow_step_id = %s AND most_recent",
                       (step_id,)).fetchone()
    return row[0] if row else "pending"


def task_state(conn, task_id):
    row = conn.execute("SELECT to_state FROM tasker_task_transitions WHERE task_id = %s AND most_recent",
                       (task_id,)).fetchone()
    return row[0] if row else "pending"


def step_transitions(conn, step_id):
    return conn.execute(
        """SELECT from_state, to_state, metadata FROM tasker_workflow_step_transitions
           WHERE workflow_step_id = %s ORDER BY sort_key""", (step_id,)).fetchall()


def task_transitions(conn, task_id):
    return [(f, t) for f, t in conn.execute(
        "SELECT from_state, to_state FROM tasker_task_transitions WHERE task_id = %s ORDER BY sort_key",
        (task_id,)).fetchall()]


def events(conn, task_id, step_id=None):
    if step_id is None:
        return [r[0] for r in conn.execute(
            "SELECT name FROM tasker_core.events WHERE task_id = %s ORDER BY id", (task_id,)).fetchall()]
    return [r[0] for r in conn.execute(
        "SELECT name FROM tasker_core.events WHERE step_id = %s ORDER BY id", (step_id,)).fetchall()]


class Worker:
    """A worker: its own connection (autocommit unless told), its id, an optional fake clock."""

    def __init__(self, db, worker_id, now=None, autocommit=True):
        self.conn = db.connect(autocommit=autocommit)
        self.id = worker_id
        self.conn.execute("SET tasker_core.backoff_jitter = off")
        if now is not None:
            self.at(now)
        if not autocommit:
            self.conn.commit()

    def at(self, ts):
        fake(self.conn, ts)

    def claim(self, namespaces=None, max_steps=1, lease=60):
        cur = self.conn.cursor(row_factory=dict_row)
        return cur.execute("SELECT * FROM tasker_core.claim_steps(%s, %s::text[], %s, %s)",
                           (self.id, namespaces, max_steps, lease)).fetchall()

    def complete(self, step_id, results=None):
        return self.conn.execute("SELECT tasker_core.complete_step(%s, %s, %s)",
                                 (step_id, self.id, Jsonb(results if results is not None else {}))).fetchone()[0]

    def fail(self, step_id, error=None, retryable=True, retry_after=None):
        return self.conn.execute("SELECT tasker_core.fail_step(%s, %s, %s, %s, %s)",
                                 (step_id, self.id, Jsonb(error or {"message": "boom"}), retryable,
                                  retry_after)).fetchone()[0]

    def heartbeat(self, step_id):
        return self.conn.execute("SELECT tasker_core.heartbeat(%s, %s)", (step_id, self.id)).fetchone()[0]

    def close(self):
        self.conn.close()


def in_thread(fn, *args):
    """Runs fn in a thread; returns (thread, box) where box gets 'value' or 'error'."""
    box = {}

    def run():
        try:
            box["value"] = fn(*args)
        except Exception as e:  # noqa: BLE001 - reported by the caller
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def run_order_to(conn, w, task_id, names):
    """Completes the named steps of a task, in order, claiming them (and whatever else is ready
    then) when the worker does not hold them yet."""
    ids = step_ids(conn, task_id)
    for n in names:
        holder = conn.execute("SELECT worker_id FROM tasker_core.step_claims WHERE workflow_step_id = %s",
                              (ids[n],)).fetchone()
        if holder is None:
            got = [r["workflow_step_id"] for r in w.claim(max_steps=100)]
            assert ids[n] in got, f"step {n} was not claimable"
        else:
            assert holder[0] == w.id
        w.complete(ids[n], {"done": n})


# ----------------------------------------------------------------------------------- templates

def test_claims_walk_per_namespace_ready_queues_in_global_age_order(wdb):
    with wdb.connect() as c:
        register(c, template("busy", [("x", [])], ns="busy"))
        register(c, template("quiet", [("y", [])], ns="quiet"))
        busy = [create(c, "busy", {}, ns="busy") for _ in range(60)]
        quiet = [create(c, "quiet", {}, ns="quiet") for _ in range(3)]
        busy += [create(c, "busy", {}, ns="busy") for _ in range(5)]
        assert c.execute("SELECT count(*) FROM tasker_core.step_state WHERE namespace_id IS NULL").fetchone()[0] == 0
        assert c.execute("SELECT * FROM tasker_core.check_tracking()").fetchall() == []
    w = Worker(wdb, "w1")
    try:
        # a quiet namespace's worker gets its steps behind the other namespace's backlog
        assert sorted(r["task_id"] for r in w.claim(namespaces=["quiet"], max_steps=10)) == quiet
        # without a filter, and with several namespaces: oldest first across namespaces
        assert [r["task_id"] for r in w.claim(max_steps=4)] == busy[:4]
        got = [r["task_id"] for r in w.claim(namespaces=["quiet", "busy", "nobody"], max_steps=100)]
        assert got == busy[4:]
        assert w.claim(namespaces=["quiet", "busy"]) == [] and w.claim() == []
    finally:
        w.close()


def test_a_task_moved_to_another_namespace_is_not_claimed_by_the_old_one(wdb):
    """Tracking keeps a step's namespace from its task when the step is written; a task moved
    to a named task of another namespace (Rails never does this) is checked at claim time and
    reported by check_tracking until rebuild_tracking."""
    with wdb.connect() as c:
        register(c, template("from", [("x", [])], ns="ns_a"))
        register(c, template("to", [("x", [])], ns="ns_b"))
        moved = create(c, "from", {}, ns="ns_a")
        c.execute("""UPDATE tasker_tasks SET named_task_id = (SELECT named_task_id FROM tasker_named_tasks
                     WHERE name = 'to') WHERE task_id = %s""", (moved,))
        assert [r[1] for r in c.execute("SELECT * FROM tasker_core.check_tracking()").fetchall()] == ["differs"]
    w = Worker(wdb, "w1")
    try:
        assert w.claim(namespaces=["ns_a"]) == []
        with wdb.connect() as c:
            c.execute("SELECT tasker_core.rebuild_tracking()")
            assert c.execute("SELECT * FROM tasker_core.check_tracking()").fetchall() == []
        (r,) = w.claim(namespaces=["ns_b"])
        assert (r["task_id"], r["namespace"]) == (moved, "ns_b")
    finally:
        w.close()


def test_a_step_moved_to_a_task_of_another_namespace_follows_it(wdb):
    with wdb.connect() as c:
        register(c, template("from", [("x", [])], ns="ns_a"))
        register(c, template("to", [("x", [])], ns="ns_b"))
        a = create(c, "from", {}, ns="ns_a")
        b = create(c, "to", {}, ns="ns_b")
        c.execute("UPDATE tasker_workflow_steps SET task_id = %s WHERE task_id = %s", (b, a))
        assert c.execute("SELECT * FROM tasker_core.check_tracking()").fetchall() == []
    w = Worker(wdb, "w1")
    try:
        assert w.claim(namespaces=["ns_a"]) == []
        assert [r["task_id"] for r in w.claim(namespaces=["ns_b"], max_steps=5)] == [b, b]
    finally:
        w.close()


def test_register_stores_the_template_in_the_rails_tables(wdb):
    with wdb.connect() as c:
        named_task_id = register(c, ORDER)
        assert isinstance(named_task_id, int)
        row = c.execute(
            """SELECT nt.name, nt.version, nt.description, tn.name, nt.configuration
               FROM tasker_named_tasks nt JOIN tasker_task_namespaces tn USING (task_namespace_id)
               WHERE nt.named_task_id = %s""", (named_task_id,)).fetchone()
        assert row[:4] == ("process_order", "1.0.0", "order fulfilment", NS)
        config = row[4]
        assert [s["name"] for s in config["step_templates"]] == [s["name"] for s in ORDER["step_templates"]]
        assert config["schema"] == ORDER["schema"]
        assert config["step_templates"][2]["handler_config"] == {"gateway": "test", "timeout": 5}
        # named steps under their dependent systems (default "unknown"), and the join rows with
        # the template's defaults (Rails: skippable false, retryable true, retry limit 3)
        rows = c.execute(
            """SELECT ns.name, ds.name, ns.description, x.skippable, x.default_retryable, x.default_retry_limit
               FROM tasker_named_tasks_named_steps x
               JOIN tasker_named_steps ns USING (named_step_id)
               JOIN tasker_dependent_systems ds USING (dependent_system_id)
               WHERE x.named_task_id = %s ORDER BY ns.name""", (named_task_id,)).fetchall()
        assert rows == [
            ("charge", "payments", None, False, True, 5),
            ("notify", "unknown", None, False, True, 1),
            ("reserve", "inventory", None, False, True, 3),
            ("ship", "unknown", None, True, True, 3),
            ("validate", "orders", "validate the order", False, True, 3),
        ]
        # the same call again replaces the registration, not duplicates it
        changed = dict(ORDER, description="order fulfilment v2")
        assert register(c, changed) == named_task_id
        assert c.execute("SELECT count(*) FROM tasker_named_tasks").fetchone()[0] == 1
        assert c.execute("SELECT count(*) FROM tasker_named_tasks_named_steps").fetchone()[0] == 5
        assert c.execute("SELECT count(*) FROM tasker_named_steps").fetchone()[0] == 5
        assert c.execute("SELECT description FROM tasker_named_tasks").fetchone()[0] == "order fulfilment v2"
        # Rails defaults for what a template leaves out
        t = {"name": "bare", "step_templates": [{"name": "x", "handler_class": "X"}]}
        bare = register(c, t)
        assert c.execute(
            """SELECT tn.name, nt.version FROM tasker_named_tasks nt JOIN tasker_task_namespaces tn
               USING (task_namespace_id) WHERE named_task_id = %s""", (bare,)).fetchone() == ("default", "0.1.0")


def test_reregistration_replaces_the_step_list_in_the_rails_tables(wdb):
    """Regression: registering the same namespace/name/version again with a step removed
    leaves the removed step's tasker_named_tasks_named_steps row, so a Rails app still sees it."""
    with wdb.connect() as c:
        ntid = register(c, SPLIT)
        register(c, template("split", [("root", []), ("left", ["root"])]))
        names = sorted(r[0] for r in c.execute(
            """SELECT ns.name FROM tasker_named_tasks_named_steps x JOIN tasker_named_steps ns USING (named_step_id)
               WHERE x.named_task_id = %s""", (ntid,)).fetchall())
        assert names == ["left", "root"]


def test_lookup_by_version_or_latest_and_listing(wdb):
    with wdb.connect() as c:
        ids = {v: register(c, template("flow", [("s1", []), ("s2", ["s1"])] if v != "1.9.0" else [("s1", [])],
                                       version=v, description=f"v{v}"))
               for v in ("1.2.0", "1.10.0", "1.9.0")}
        register(c, template("other", [("x", [])], ns="elsewhere"))
        latest = c.execute("SELECT tasker_core.get_task_template(%s, 'flow')", (NS,)).fetchone()[0]
        assert latest["version"] == "1.10.0", "latest is by numeric version, not text"
        v19 = c.execute("SELECT tasker_core.get_task_template(%s, 'flow', '1.9.0')", (NS,)).fetchone()[0]
        assert v19["version"] == "1.9.0" and [s["name"] for s in v19["step_templates"]] == ["s1"]
        assert v19["description"] == "v1.9.0"
        # create_task with NULL version takes the latest; with a version, that one
        t_latest = create(c, "flow", {}, version=None)
        t_19 = create(c, "flow", {}, version="1.9.0")
        assert c.execute("SELECT named_task_id FROM tasker_tasks WHERE task_id = %s", (t_latest,)).fetchone()[0] == ids["1.10.0"]
        assert c.execute("SELECT named_task_id FROM tasker_tasks WHERE task_id = %s", (t_19,)).fetchone()[0] == ids["1.9.0"]
        assert set(step_ids(c, t_19)) == {"s1"} and set(step_ids(c, t_latest)) == {"s1", "s2"}
        listed = c.execute("SELECT namespace, name, version, description, step_count FROM tasker_core.list_task_templates()").fetchall()
        assert listed == [("elsewhere", "other", "1.0.0", None, 1),
                          (NS, "flow", "1.2.0", "v1.2.0", 2),
                          (NS, "flow", "1.9.0", "v1.9.0", 1),
                          (NS, "flow", "1.10.0", "v1.10.0", 2)]
        assert c.execute("SELECT count(*) FROM tasker_core.list_task_templates(%s)", (NS,)).fetchone()[0] == 3
        assert c.execute("SELECT count(*) FROM tasker_core.list_task_templates('nope')").fetchone()[0] == 0
    with unchanged(wdb), wdb.connect() as c:
        for args in [(NS, "flow", "2.0.0"), (NS, "nope", None), ("nope", "flow", None)]:
            with raises("TK007"):
                c.execute("SELECT tasker_core.get_task_template(%s, %s, %s)", args)
        for args in [(None, "flow", None), (NS, None, None)]:
            with raises("22004"):
                c.execute("SELECT tasker_core.get_task_template(%s, %s, %s)", args)


def _bad(mutate):
    t = json.loads(json.dumps(ORDER))
    mutate(t)
    return t


def _set_step(i, **kw):
    def m(t):
        t["step_templates"][i].update(kw)
    return m


def _del_step_key(i, key):
    def m(t):
        del t["step_templates"][i][key]
    return m


BAD_TEMPLATES = [
    ("unknown dependency", _bad(_set_step(3, depends_on_steps=["reserve", "nope"])), "TK022", r'"nope"'),
    ("duplicate step name", _bad(_set_step(1, name="validate")), "TK021", r'"validate"'),
    ("cycle", _bad(_set_step(0, depends_on_step="ship")), "TK006", r"validate.*ship|ship.*validate"),
    ("two-step cycle", template("c2", [("a", ["b"]), ("b", ["a"]), ("c", [])]), "TK006", r"\ba\b.*\bb\b|\bb\b.*\ba\b"),
    ("self loop", template("c1", [("a", ["a"])]), "TK006", r"\ba\b"),
    ("version 1.0", _bad(lambda t: t.update(version="1.0")), "TK023", None),
    ("version v1.0.0", _bad(lambda t: t.update(version="v1.0.0")), "TK023", None),
    ("version 1.0.0.0", _bad(lambda t: t.update(version="1.0.0.0")), "TK023", None),
    ("version number", _bad(lambda t: t.update(version=1)), "TK023", None),
    ("missing handler_class", _bad(_del_step_key(2, "handler_class")), "TK024", r'"charge"'),
    ("empty handler_class", _bad(_set_step(2, handler_class="  ")), "TK024", r'"charge"'),
    ("not an object", [1, 2], "TK020", None),
    ("no name", _bad(lambda t: t.pop("name")), "TK020", None),
    ("no steps", _bad(lambda t: t.update(step_templates=[])), "TK020", None),
    ("step not an object", _bad(lambda t: t["step_templates"].append("x")), "TK020", None),
    ("retry limit a string", _bad(_set_step(0, default_retry_limit="3")), "TK020", None),
    ("negative retry limit", _bad(_set_step(0, default_retry_limit=-1)), "TK020", None),
    ("handler_config not an object", _bad(_set_step(0, handler_config=[1])), "TK020", None),
    ("schema keyword unsupported", _bad(lambda t: t.update(schema={"type": "object", "patternProperties": {}})), "TK020", None),
    ("named_steps whitelist", _bad(lambda t: t.update(named_steps=["validate"])), "TK020", None),
]


@pytest.mark.parametrize("case,tmpl,code,message", BAD_TEMPLATES, ids=[b[0] for b in BAD_TEMPLATES])
def test_register_rejects_bad_templates_and_changes_nothing(wdb, case, tmpl, code, message):
    with wdb.connect() as c:
        register(c, SINGLE)          # something already there, which must stay as it is
    with unchanged(wdb), wdb.connect() as c:
        with raises(code, message):
            register(c, tmpl)


def test_register_null_and_step_limit(wdb):
    with unchanged(wdb), wdb.connect() as c:
        with raises("22004"):
            c.execute("SELECT tasker_core.register_task_template(NULL)")
        c.execute("SET tasker_core.max_template_steps = 4")
        with raises("54000"):
            register(c, ORDER)       # five steps
    with wdb.connect() as c:
        c.execute("SET tasker_core.max_template_steps = 5")
        register(c, ORDER)


def test_version_the_validator_accepts_fits_the_rails_column(wdb):
    """Regression: the validator accepts up to five digits per part (17 characters) but
    tasker_named_tasks.version is varchar(16), so such a version fails with PostgreSQL's 22001
    instead of being stored or refused as TK023."""
    with wdb.connect() as c:
        try:
            register(c, dict(SINGLE, version="10000.10000.10000"))
        except psycopg.Error as e:
            assert e.sqlstate == "TK023", f"expected success or TK023, got {e.sqlstate}: {e}"


# ----------------------------------------------------------------------------------- create_task

def test_create_task_writes_task_steps_and_edges_in_one_call(wdb):
    with wdb.connect() as c:
        ntid = register(c, ORDER)
        opts = {"initiator": "alice", "source_system": "shop", "reason": "checkout",
                "tags": ["web", "eu"], "bypass_steps": []}
        tid = create(c, ORDER, {"order_id": 42}, opts)
        row = c.execute(
            """SELECT named_task_id, complete, initiator, source_system, reason, tags, context, identity_hash
               FROM tasker_tasks WHERE task_id = %s""", (tid,)).fetchone()
        assert row[:7] == (ntid, False, "alice", "shop", "checkout", ["web", "eu"], {"order_id": 42})
        assert row[7]
        ids = step_ids(c, tid)
        assert set(ids) == {s["name"] for s in ORDER["step_templates"]}
        steps = {r[0]: r[1:] for r in c.execute(
            """SELECT ns.name::text, ws.retry_limit, ws.retryable, ws.skippable, ws.attempts, ws.processed,
                      ws.in_process, ws.inputs FROM tasker_workflow_steps ws JOIN tasker_named_steps ns USING (named_step_id)
               WHERE task_id = %s""", (tid,)).fetchall()}
        assert steps["charge"][:5] == (5, True, False, 0, False)
        assert steps["notify"][:2] == (1, True)
        assert steps["ship"][2] is True
        assert all(s[6] == {"order_id": 42} for s in steps.values()), "inputs are the task context"
        edges = {(r[0], r[1]) for r in c.execute(
            """SELECT pn.name::text, cn.name::text FROM tasker_workflow_step_edges e
               JOIN tasker_workflow_steps p ON p.workflow_step_id = e.from_step_id
               JOIN tasker_named_steps pn ON pn.named_step_id = p.named_step_id
               JOIN tasker_workflow_steps ch ON ch.workflow_step_id = e.to_step_id
               JOIN tasker_named_steps cn ON cn.named_step_id = ch.named_step_id
               WHERE p.task_id = %s""", (tid,)).fetchall()}
        assert edges == ORDER_EDGES
        assert c.execute("SELECT count(*) FROM tasker_workflow_step_edges").fetchone()[0] == len(ORDER_EDGES)
        assert task_state(c, tid) == "pending"
        assert "task.initialize_requested" in events(c, tid)
        # a second task gets its own steps
        tid2 = create(c, ORDER, {"order_id": 43})
        assert tid2 != tid and len(step_ids(c, tid2)) == 5
        assert c.execute("SELECT count(DISTINCT identity_hash) FROM tasker_tasks").fetchone()[0] == 2
        # defaults of the options
        assert c.execute("SELECT initiator, tags FROM tasker_tasks WHERE task_id = %s", (tid2,)).fetchone() == ("unknown", [])


BAD_CREATES = [
    ("unknown template", (NS, "nope", None, {"order_id": 1}, {}), "TK007"),
    ("unknown namespace", ("nope", "process_order", None, {"order_id": 1}, {}), "TK007"),
    ("unknown version", (NS, "process_order", "9.9.9", {"order_id": 1}, {}), "TK007"),
    ("null namespace", (None, "process_order", None, {"order_id": 1}, {}), "22004"),
    ("null name", (NS, None, None, {"order_id": 1}, {}), "22004"),
    ("null context", (NS, "process_order", None, None, {}), "22004"),
    ("context an array", (NS, "process_order", None, [1], {}), "22023"),
    ("context misses a required key", (NS, "process_order", None, {"x": 1}, {}), "TK025"),
    ("context of the wrong type", (NS, "process_order", None, {"order_id": "7"}, {}), "TK025"),
    ("context below the minimum", (NS, "process_order", None, {"order_id": 0}, {}), "TK025"),
    ("unknown option", (NS, "process_order", None, {"order_id": 1}, {"priorty": 1}), "22023"),
    ("options an array", (NS, "process_order", None, {"order_id": 1}, [1]), "22023"),
    ("initiator a number", (NS, "process_order", None, {"order_id": 1}, {"initiator": 5}), "22023"),
    ("empty idempotency key", (NS, "process_order", None, {"order_id": 1}, {"idempotency_key": ""}), "22023"),
    ("tags not an array", (NS, "process_order", None, {"order_id": 1}, {"tags": "x"}), "22023"),
]


@pytest.mark.parametrize("case,args,code", BAD_CREATES, ids=[b[0] for b in BAD_CREATES])
def test_create_task_bad_input_changes_nothing(wdb, case, args, code):
    with wdb.connect() as c:
        register(c, ORDER)
        create(c, ORDER, {"order_id": 1})
    ns, name, version, context, options = args
    with unchanged(wdb), wdb.connect() as c:
        with raises(code):
            c.execute("SELECT tasker_core.create_task(%s, %s, %s, %s, %s)",
                      (ns, name, version, None if context is None else Jsonb(context), Jsonb(options)))


def test_idempotent_create(wdb):
    with wdb.connect() as c:
        register(c, ORDER)
        first = create(c, ORDER, {"order_id": 1}, {"idempotency_key": "order-1"})
    with unchanged(wdb), wdb.connect() as c:
        again = create(c, ORDER, {"order_id": 1}, {"idempotency_key": "order-1"})
        assert again == first
        # even with another context: the key decides
        assert create(c, ORDER, {"order_id": 2}, {"idempotency_key": "order-1"}) == first
    with wdb.connect() as c:
        other = create(c, ORDER, {"order_id": 1}, {"idempotency_key": "order-2"})
        assert other != first
        assert c.execute("SELECT count(*) FROM tasker_tasks").fetchone()[0] == 2
        assert c.execute("SELECT count(*) FROM tasker_workflow_steps").fetchone()[0] == 10


@pytest.mark.parametrize("first_commits", [True, False], ids=["first-commits", "first-rolls-back"])
def test_concurrent_create_waits_for_the_first_with_the_same_key(wdb, first_commits):
    """Regression: first-commits failed with XX000 "SpiTupleTable positioned before the start or
    after the end": the second create_task waits on the unique identity_hash, its INSERT ... ON
    CONFLICT DO NOTHING then inserts nothing, and the follow-up SELECT of the existing task runs
    as a read-only SPI plan on the statement's old snapshot, so it cannot see the task that was
    committed meanwhile."""
    with wdb.connect() as c:
        register(c, ORDER)
    c1 = wdb.connect(autocommit=False)
    c2 = wdb.connect()
    try:
        id1 = create(c1, ORDER, {"order_id": 1}, {"idempotency_key": "k"})
        t, box = in_thread(create, c2, ORDER, {"order_id": 1}, {"idempotency_key": "k"})
        t.join(0.5)
        assert t.is_alive(), "the second create should wait for the first one's commit"
        c1.commit() if first_commits else c1.rollback()
        t.join(10)
        assert "value" in box, box
        if first_commits:
            assert box["value"] == id1
    finally:
        c1.close()
        c2.close()
    with wdb.connect() as c:
        assert c.execute("SELECT count(*) FROM tasker_tasks").fetchone()[0] == 1
        assert c.execute("SELECT count(*) FROM tasker_workflow_steps").fetchone()[0] == 5


def test_concurrent_creates_with_one_key_make_one_task(wdb):
    with wdb.connect() as c:
        register(c, ORDER)
    # eight connections released at once with the same key
    conns = [wdb.connect() for _ in range(8)]
    barrier = threading.Barrier(8)
    got, errors = [], []

    def go(conn):
        barrier.wait()
        try:
            got.append(create(conn, ORDER, {"order_id": 3}, {"idempotency_key": "k3"}))
        except psycopg.Error as e:
            errors.append(f"{e.sqlstate}: {e}")

    threads = [threading.Thread(target=go, args=(cn,)) for cn in conns]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    for cn in conns:
        cn.close()
    assert not errors and len(got) == 8 and len(set(got)) == 1, (got, errors)
    with wdb.connect() as c:
        assert c.execute("SELECT count(*) FROM tasker_tasks").fetchone()[0] == 1
        assert c.execute("SELECT count(*) FROM tasker_workflow_steps").fetchone()[0] == 5
        assert c.execute("SELECT count(*) FROM tasker_workflow_step_edges").fetchone()[0] == 5


# ----------------------------------------------------------------------------------- claims

def test_claim_returns_what_a_worker_needs(wdb):
    with wdb.connect() as c:
        register(c, ORDER)
        register(c, template("elsewhere", [("x", [])], ns="other"))
        tid = create(c, ORDER, {"order_id": 42})
        other = create(c, "elsewhere", {}, ns="other")
        ids = step_ids(c, tid)
    w = Worker(wdb, "w1", now=T0)
    try:
        assert w.claim(namespaces=["nobody"]) == []
        (r,) = w.claim(namespaces=[NS], max_steps=10, lease=30)
        assert r["task_id"] == tid and r["workflow_step_id"] == ids["validate"]
        assert (r["step_name"], r["namespace"], r["task_name"]) == ("validate", NS, "process_order")
        assert r["handler_class"] == "Orders::Validate" and r["handler_config"] is None
        assert r["inputs"] == {"order_id": 42}
        assert r["parent_results"] == {}
        assert r["attempt"] == 1
        assert r["lease_expires_at"] == T0 + timedelta(seconds=30)
        with wdb.connect() as c:
            assert step_state(c, ids["validate"]) == "in_progress"
            assert task_state(c, tid) == "in_progress"
            assert c.execute("SELECT worker_id FROM tasker_core.step_claims WHERE workflow_step_id = %s",
                             (ids["validate"],)).fetchone()[0] == "w1"
        # nothing else of this namespace is ready; the other namespace's step is
        assert w.claim(namespaces=[NS]) == []
        (o,) = w.claim(namespaces=["other", NS])
        assert o["task_id"] == other
        assert w.complete(o["workflow_step_id"]) is True
        assert w.complete(ids["validate"], {"valid": True, "total": 10}) is True
        # two children ready; max_steps honoured
        (first,) = w.claim(max_steps=1)
        (second,) = w.claim(max_steps=5)
        got = {first["step_name"]: first, second["step_name"]: second}
        assert set(got) == {"reserve", "charge"}
        assert got["charge"]["handler_class"] == "Payments::Charge"
        assert got["charge"]["handler_config"] == {"gateway": "test", "timeout": 5}
        for g in got.values():
            assert g["parent_results"] == {"validate": {"valid": True, "total": 10}}
        w.complete(ids["reserve"], {"reserved": [1, 2]})
        assert w.claim() == [], "ship waits for charge"
        w.complete(ids["charge"], {"charged": 10})
        (ship,) = w.claim()
        assert ship["step_name"] == "ship"
        assert ship["parent_results"] == {"reserve": {"reserved": [1, 2]}, "charge": {"charged": 10}}
    finally:
        w.close()


BAD_CLAIMS = [
    ("null worker", (None, None, 1, 60), "22004"),
    ("empty worker", ("", None, 1, 60), "22023"),
    ("control character", ("w\n1", None, 1, 60), "22023"),
    ("worker id too long", ("w" * 201, None, 1, 60), "22023"),
    ("max_steps 0", ("w", None, 0, 60), "22023"),
    ("max_steps 1001", ("w", None, 1001, 60), "22023"),
    ("null max_steps", ("w", None, None, 60), "22004"),
    ("lease 0", ("w", None, 1, 0), "22023"),
    ("lease negative", ("w", None, 1, -5), "22023"),
    ("lease over a day", ("w", None, 1, 86401), "22023"),
    ("null lease", ("w", None, 1, None), "22004"),
]


@pytest.mark.parametrize("case,args,code", BAD_CLAIMS, ids=[b[0] for b in BAD_CLAIMS])
def test_claim_bad_input_changes_nothing(wdb, case, args, code):
    with wdb.connect() as c:
        register(c, ORDER)
        create(c, ORDER)
    with unchanged(wdb), wdb.connect() as c:
        with raises(code):
            c.execute("SELECT * FROM tasker_core.claim_steps(%s, %s::text[], %s, %s)", args)


def test_worker_calls_need_tracking(tasker_db):
    with tasker_db.connect() as c:
        register(c, ORDER)
        tid = create(c, ORDER)
        sid = step_ids(c, tid)["validate"]
    with unchanged(tasker_db), tasker_db.connect() as c:
        with raises("TK011"):
            c.execute("SELECT * FROM tasker_core.claim_steps('w')")
        with raises("TK011"):
            c.execute("SELECT tasker_core.complete_step(%s, 'w')", (sid,))
        with raises("TK011"):
            c.execute("SELECT tasker_core.fail_step(%s, 'w', '{}')", (sid,))
        with raises("TK011"):
            c.execute("SELECT tasker_core.resolve_step_manually(%s)", (sid,))
        assert c.execute("SELECT tasker_core.tick()").fetchone()[0] == 0


def test_complete_fail_heartbeat_bad_input_change_nothing(wdb):
    with wdb.connect() as c:
        register(c, ORDER)
        tid = create(c, ORDER)
        ids = step_ids(c, tid)
    w = Worker(wdb, "w1", now=T0)
    try:
        w.claim()
        held, unclaimed = ids["validate"], ids["notify"]
        with unchanged(wdb), wdb.connect() as c:
            for fn, extra in [("complete_step", ", '{}'"), ("fail_step", ", '{}'"), ("heartbeat", "")]:
                with raises("22004"):
                    c.execute(f"SELECT tasker_core.{fn}(NULL, 'w1'{extra})")
                with raises("22004"):
                    c.execute(f"SELECT tasker_core.{fn}(%s, NULL{extra})", (held,))
                with raises("22023"):
                    c.execute(f"SELECT tasker_core.{fn}(%s, ''{extra})", (held,))
                with raises("TK030", r"not claimed"):
                    c.execute(f"SELECT tasker_core.{fn}(%s, 'w1'{extra})", (unclaimed,))
                with raises("TK030", r"not claimed"):
                    c.execute(f"SELECT tasker_core.{fn}(%s, 'w1'{extra})", (10 ** 12,))
                with raises("TK030", r"another worker holds it"):
                    c.execute(f"SELECT tasker_core.{fn}(%s, 'intruder'{extra})", (held,))
            with raises("22023"):
                c.execute("SELECT tasker_core.fail_step(%s, 'w1', '{}', true, -1)", (held,))
        assert w.complete(held) is True
        with unchanged(wdb):
            with raises("TK030"):
                w.complete(held)              # twice
            with raises("TK030"):
                w.fail(held)
    finally:
        w.close()


# ----------------------------------------------------------------------------------- leases

def test_lease_expiry_then_reclaim_by_another_worker(wdb):
    with wdb.connect() as c:
        register(c, ORDER)
        tid = create(c, ORDER)
        sid = step_ids(c, tid)["validate"]
    w1, w2 = Worker(wdb, "w1", now=T0), Worker(wdb, "w2", now=T0)
    try:
        (r,) = w1.claim(lease=30)
        assert r["attempt"] == 1
        w2.at(T0 + timedelta(seconds=29))
        assert w2.claim() == [], "the lease still holds"
        w2.at(T0 + timedelta(seconds=31))
        (r2,) = w2.claim(lease=30)
        assert r2["workflow_step_id"] == sid and r2["attempt"] == 2
        assert r2["lease_expires_at"] == T0 + timedelta(seconds=61)
        # the old worker lost it: every call is refused, nothing changes
        w1.at(T0 + timedelta(seconds=32))
        with unchanged(wdb):
            with raises("TK030", r"another worker holds it"):
                w1.complete(sid, {"stale": True})
            with raises("TK030"):
                w1.fail(sid)
            with raises("TK030"):
                w1.heartbeat(sid)
        w2.at(T0 + timedelta(seconds=32))
        assert w2.complete(sid, {"by": "w2"}) is True
        with wdb.connect() as c:
            ts = step_transitions(c, sid)
            assert [(f, t) for f, t, _ in ts] == [("pending", "in_progress"), ("in_progress", "error"),
                                                  ("error", "pending"), ("pending", "in_progress"),
                                                  ("in_progress", "complete")]
            assert ts[0][2]["worker_id"] == "w1" and ts[3][2]["worker_id"] == "w2"
            assert ts[1][2]["reason"] == "lease_expired"
            assert c.execute("SELECT results, attempts FROM tasker_workflow_steps WHERE workflow_step_id = %s",
                             (sid,)).fetchone() == ({"by": "w2"}, 2)
            assert events(c, tid, sid) == ["step.execution_requested", "step.failed", "step.retry_requested",
                                           "step.execution_requested", "step.completed"]
    finally:
        w1.close()
        w2.close()


def test_lease_expiry_on_the_real_clock(wdb):
    with wdb.connect() as c:
        register(c, SINGLE)
        create(c, SINGLE)
    w1, w2 = Worker(wdb, "w1"), Worker(wdb, "w2")
    try:
        (r,) = w1.claim(lease=1)
        assert w2.claim() == []
        time.sleep(1.1)
        (r2,) = w2.claim()
        assert r2["workflow_step_id"] == r["workflow_step_id"] and r2["attempt"] == 2
        with raises("TK030"):
            w1.complete(r["workflow_step_id"])
        assert w2.complete(r["workflow_step_id"])
    finally:
        w1.close()
        w2.close()


def test_an_expired_lease_is_refused_even_before_a_reclaim(wdb):
    with wdb.connect() as c:
        register(c, SINGLE)
        create(c, SINGLE)
    w = Worker(wdb, "w1", now=T0)
    try:
        (r,) = w.claim(lease=10)
        w.at(T0 + timedelta(seconds=10))
        with unchanged(wdb):
            with raises("TK030", r"expired"):
                w.complete(r["workflow_step_id"])
            with raises("TK030", r"expired"):
                w.heartbeat(r["workflow_step_id"])
    finally:
        w.close()


def test_a_vanished_worker_s_step_is_claimable_once_its_lease_expires_after_an_earlier_backoff(wdb):
    """Regression: when a lease expires, the step keeps the backoff_request_seconds of its
    previous failure and gets last_attempted_at = the expiry time, so a step that once backed off
    for 120 s is claimable only 120 s after its vanished worker's lease expired, not "once its
    lease expires" (the issue)."""
    with wdb.connect() as c:
        register(c, template("slow", [("only", [], {"default_retry_limit": 5})]))
        tid = create(c, "slow", {})
        sid = step_ids(c, tid)["only"]
    w1, w2 = Worker(wdb, "w1", now=T0), Worker(wdb, "w2")
    try:
        w1.claim()
        assert w1.fail(sid, {"status": 503}, True, 120) == 120
        w1.at(T0 + timedelta(seconds=120))
        (r,) = w1.claim(lease=10)              # attempt 2; then w1 vanishes
        assert r["attempt"] == 2
        w2.at(T0 + timedelta(seconds=131))
        got = w2.claim()
        assert [(x["workflow_step_id"], x["attempt"]) for x in got] == [(sid, 3)]
    finally:
        w1.close()
        w2.close()


def test_heartbeat_extends_the_lease(wdb):
    with wdb.connect() as c:
        register(c, SINGLE)
        create(c, SINGLE)
    w1, w2 = Worker(wdb, "w1", now=T0), Worker(wdb, "w2")
    try:
        (r,) = w1.claim(lease=60)
        sid = r["workflow_step_id"]
        w1.at(T0 + timedelta(seconds=50))
        assert w1.heartbeat(sid) == T0 + timedelta(seconds=110)
        with wdb.connect() as c:
            assert c.execute("SELECT lease_expires_at, heartbeat_at FROM tasker_core.step_claims WHERE workflow_step_id = %s",
                             (sid,)).fetchone() == (T0 + timedelta(seconds=110), T0 + timedelta(seconds=50))
        w2.at(T0 + timedelta(seconds=100))
        assert w2.claim() == [], "the heartbeat kept the step"
        w1.at(T0 + timedelta(seconds=100))
        assert w1.heartbeat(sid) == T0 + timedelta(seconds=160)
        with unchanged(wdb):
            with raises("TK030"):
                w2.heartbeat(sid)
        w2.at(T0 + timedelta(seconds=161))
        (r2,) = w2.claim()
        assert r2["workflow_step_id"] == sid
    finally:
        w1.close()
        w2.close()


# ----------------------------------------------------------------------------------- backoff

def _backoff(c, *args):
    ph = ", ".join(["%s"] * len(args))
    return c.execute(f"SELECT tasker_core.backoff_seconds({ph})", args).fetchone()[0]


def test_backoff_table_cap_retry_after_and_jitter(db):
    with db.connect() as c:
        got = [_backoff(c, a) for a in range(1, 22)]
        assert got == [1, 2, 4, 8, 16, 32, 49, 64, 81, 100, 121, 144, 169, 196, 225, 256, 289, 300, 300, 300, 300]
        assert _backoff(c, 2 ** 31 - 1) == 300
        assert _backoff(c, 0) == 1 and _backoff(c, -5) == 1
        assert _backoff(c, 1, 7) == 7 and _backoff(c, 9, 7) == 7, "Retry-After wins"
        assert _backoff(c, 1, 300) == 300 and _backoff(c, 1, 301) == 300 and _backoff(c, 1, 3600) == 300
        assert _backoff(c, 1, 0) == 0
        assert _backoff(c, 1, 3600, 42) == 300, "Retry-After is not jittered"
        # jitter: within +-10 % of the base, never below 1, the same for the same seed
        rows = c.execute(
            """SELECT a, s, tasker_core.backoff_seconds(a, NULL, s), tasker_core.backoff_seconds(a, NULL, s),
                      tasker_core.backoff_seconds(a)
               FROM generate_series(1, 30) a, generate_series(0, 60) s""").fetchall()
        for a, s, j1, j2, base in rows:
            assert j1 == j2, f"seed {s} attempt {a}: {j1} then {j2}"
            assert base * 0.9 - 0.5 <= j1 <= base * 1.1 + 0.5 and j1 >= 1, (a, s, j1, base)
        assert len({r[2] for r in rows if r[0] == 20}) > 10, "the jitter varies with the seed"
        assert {r[2] for r in rows if r[0] == 20} - {300}, "jitter applies to capped values too"


def test_backoff_seconds_null_attempt(db):
    """Regression: backoff_seconds(NULL) raises XX000 ("argument 0 must not be null")
    instead of the documented 22004 (or returning NULL as a STRICT function would)."""
    with db.connect() as c:
        try:
            v = c.execute("SELECT tasker_core.backoff_seconds(NULL)").fetchone()[0]
            assert v is None
        except psycopg.Error as e:
            assert e.sqlstate == "22004", f"expected 22004, got {e.sqlstate}: {e}"


def test_backoff_timing_with_the_clock_overridden_and_the_retry_path(wdb):
    with wdb.connect() as c:
        register(c, template("flaky", [("call", [], {"default_retry_limit": 5}), ("after", ["call"])]))
        tid = create(c, "flaky", {})
        sid = step_ids(c, tid)["call"]
    w = Worker(wdb, "w1", now=T0)
    try:
        t = T0
        for attempt, expected in [(1, 1), (2, 2), (3, 4), (4, 8)]:
            w.at(t)
            (r,) = w.claim()
            assert (r["workflow_step_id"], r["attempt"]) == (sid, attempt)
            assert w.fail(sid, {"message": f"attempt {attempt}"}) == expected
            with wdb.connect() as c:
                # waiting: a step in backoff keeps the task in progress
                assert task_state(c, tid) == "in_progress"
                assert step_state(c, sid) == "error"
                assert c.execute("SELECT backoff_request_seconds, results -> 'error' FROM tasker_workflow_steps WHERE workflow_step_id = %s",
                                 (sid,)).fetchone() == (expected, {"message": f"attempt {attempt}"})
            w.at(t + timedelta(seconds=expected) - timedelta(milliseconds=1))
            assert w.claim() == [], f"claimable before its {expected} s backoff passed"
            t = t + timedelta(seconds=expected)
        w.at(t)
        (r,) = w.claim()
        assert r["attempt"] == 5
        w.complete(sid, {"ok": True})
        (after,) = w.claim()
        assert after["step_name"] == "after" and after["parent_results"] == {"call": {"ok": True}}
        with wdb.connect() as c:
            trans = [(f, t_) for f, t_, _ in step_transitions(c, sid)]
            assert trans == [("pending", "in_progress")] + \
                [("in_progress", "error"), ("error", "pending"), ("pending", "in_progress")] * 4 + \
                [("in_progress", "complete")]
            evs = events(c, tid, sid)
            assert evs.count("step.retry_requested") == 4
            assert evs.count("observability.step.backoff") == 4
            assert evs.count("step.failed") == 4 and evs.count("step.completed") == 1
            payloads = [r[0] for r in c.execute(
                "SELECT payload FROM tasker_core.events WHERE step_id = %s AND name = 'observability.step.backoff' ORDER BY id",
                (sid,)).fetchall()]
            assert [p["backoff_seconds"] for p in payloads] == [1, 2, 4, 8]
            assert "task.failed" not in events(c, tid)
    finally:
        w.close()


def test_retry_after_is_honoured_and_capped(wdb):
    with wdb.connect() as c:
        register(c, template("remote", [("call", [], {"default_retry_limit": 10})]))
        tid = create(c, "remote", {})
        sid = step_ids(c, tid)["call"]
    w = Worker(wdb, "w1", now=T0)
    try:
        t = T0
        (r,) = w.claim()
        for asked, honoured in [(120, 120), (3600, 300), (0, 0)]:
            assert w.fail(sid, {"status": 429}, True, asked) == honoured
            if honoured:
                w.at(t + timedelta(seconds=honoured - 1))
                assert w.claim() == []
            t = t + timedelta(seconds=honoured)
            w.at(t)
            assert [x["workflow_step_id"] for x in w.claim()] == [sid]
        assert w.complete(sid)
        with wdb.connect() as c:
            payloads = [r[0] for r in c.execute(
                "SELECT payload FROM tasker_core.events WHERE step_id = %s AND name = 'observability.step.backoff' ORDER BY id",
                (sid,)).fetchall()]
            assert [(p["backoff_seconds"], p["backoff_type"]) for p in payloads][:3] == \
                [(120, "server_requested"), (300, "server_requested"), (0, "server_requested")]
    finally:
        w.close()


def test_fail_step_jitter_is_bounded_and_deterministic_with_a_seed(wdb):
    with wdb.connect() as c:
        register(c, template("jit", [("call", [], {"default_retry_limit": 10})]))
        tid = create(c, "jit", {})
        sid = step_ids(c, tid)["call"]
    w = Worker(wdb, "w1", now=T0, autocommit=False)
    try:
        w.conn.execute("SET tasker_core.jitter_seed = 7")
        w.conn.execute("SET tasker_core.backoff_jitter = on")
        w.conn.commit()
        t = T0
        base = {1: 1, 2: 2, 3: 4, 4: 8, 5: 16, 6: 32, 7: 49}
        for attempt in range(1, 8):
            w.at(t)
            (r,) = w.claim()
            w.conn.commit()
            assert r["attempt"] == attempt
            first = w.fail(sid)
            w.conn.rollback()            # the same failure again: the same jitter
            w.at(t)
            second = w.fail(sid)
            w.conn.commit()
            assert first == second, f"attempt {attempt}: {first} then {second} with the same seed"
            b = base[attempt]
            assert b - round(b * 0.1) <= first <= b + round(b * 0.1), (attempt, first)
            w.at(t + timedelta(seconds=first) - timedelta(milliseconds=1))
            assert w.claim() == [], "not claimable before its jittered backoff"
            w.conn.rollback()
            t = t + timedelta(seconds=first)
    finally:
        w.close()


# ----------------------------------------------------------------------------------- finalization

def test_finalization_complete(wdb):
    with wdb.connect() as c:
        register(c, ORDER)
        tid = create(c, ORDER)
    w = Worker(wdb, "w1", now=T0)
    try:
        run_order_to(w.conn, w, tid, ["validate", "reserve", "charge", "ship"])
        with wdb.connect() as c:
            assert task_state(c, tid) == "in_progress"
            assert c.execute("SELECT complete FROM tasker_tasks WHERE task_id = %s", (tid,)).fetchone()[0] is False
        run_order_to(w.conn, w, tid, ["notify"])
        with wdb.connect() as c:
            assert task_state(c, tid) == "complete"
            assert task_transitions(c, tid) == [("pending", "in_progress"), ("in_progress", "complete")]
            assert c.execute("SELECT complete FROM tasker_tasks WHERE task_id = %s", (tid,)).fetchone()[0] is True
            evs = events(c, tid)
            assert evs.count("task.completed") == 1 and evs.count("task.start_requested") == 1
            assert evs.count("step.completed") == 5 and evs.count("step.execution_requested") == 5
            assert "task.failed" not in evs
            # events are never duplicated: one per (name, step, from, to)
            dups = c.execute(
                """SELECT name, step_id, from_state, to_state, count(*) FROM tasker_core.events
                   WHERE task_id = %s AND name NOT LIKE 'workflow.%%' AND name NOT LIKE 'observability.%%'
                   GROUP BY 1, 2, 3, 4 HAVING count(*) > 1""", (tid,)).fetchall()
            assert dups == []
            assert c.execute("SELECT count(*) FROM tasker_core.step_claims").fetchone()[0] == 0
            assert c.execute("SELECT count(*) FROM tasker_workflow_steps WHERE task_id = %s AND processed AND NOT in_process",
                             (tid,)).fetchone()[0] == 5
        assert w.claim() == []
    finally:
        w.close()


def test_finalization_blocked_by_a_permanent_failure(wdb):
    with wdb.connect() as c:
        register(c, ORDER)
        tid = create(c, ORDER)
        ids = step_ids(c, tid)
    w = Worker(wdb, "w1", now=T0)
    try:
        run_order_to(w.conn, w, tid, ["validate"])
        rows = w.claim(max_steps=2)
        assert {r["step_name"] for r in rows} == {"reserve", "charge"}
        assert w.fail(ids["charge"], {"message": "card declined"}, retryable=False) is None
        with wdb.connect() as c:
            assert task_state(c, tid) == "in_progress", "reserve is still running"
            assert c.execute("SELECT retryable FROM tasker_workflow_steps WHERE workflow_step_id = %s",
                             (ids["charge"],)).fetchone()[0] is False
        w.complete(ids["reserve"])
        with wdb.connect() as c:
            assert task_state(c, tid) == "error"
            assert task_transitions(c, tid)[-1] == ("in_progress", "error")
            assert events(c, tid).count("task.failed") == 1
            assert c.execute("SELECT complete FROM tasker_tasks WHERE task_id = %s", (tid,)).fetchone()[0] is False
        w.at(T0 + timedelta(hours=1))
        assert w.claim(max_steps=10) == [], "a permanent failure is never retried and blocks its children"
    finally:
        w.close()


def test_finalization_blocked_by_exhausted_retries(wdb):
    with wdb.connect() as c:
        register(c, template("twice", [("call", [], {"default_retry_limit": 2}), ("after", ["call"])]))
        tid = create(c, "twice", {})
        sid = step_ids(c, tid)["call"]
    w = Worker(wdb, "w1", now=T0)
    try:
        w.claim()
        assert w.fail(sid) == 1
        with wdb.connect() as c:
            assert task_state(c, tid) == "in_progress"
        w.at(T0 + timedelta(seconds=1))
        (r,) = w.claim()
        assert r["attempt"] == 2
        assert w.fail(sid) is None, "the last attempt is not retried"
        with wdb.connect() as c:
            assert task_state(c, tid) == "error"
            evs = events(c, tid)
            assert evs.count("task.failed") == 1
            assert evs.count("observability.step.max_retries_reached") == 1
        w.at(T0 + timedelta(hours=1))
        assert w.claim(max_steps=10) == []
    finally:
        w.close()


@pytest.mark.parametrize("outcome", ["complete", "fail"])
def test_a_step_with_default_retryable_false_runs_once(wdb, outcome):
    """Regression: a step whose template says default_retryable: false is never claimed
    (claim_steps requires retryable, the Rails readiness quirk), so it never runs even once and
    its task waits in_progress forever. Not retryable must mean "no retry after a failure"."""
    with wdb.connect() as c:
        register(c, template("once", [("charge", [], {"default_retryable": False}), ("after", ["charge"])]))
        assert c.execute("SELECT default_retryable FROM tasker_named_tasks_named_steps x JOIN tasker_named_steps ns "
                         "USING (named_step_id) WHERE ns.name = 'charge'").fetchone()[0] is False
        tid = create(c, "once", {})
        sid = step_ids(c, tid)["charge"]
    w = Worker(wdb, "w1", now=T0)
    try:
        got = w.claim()
        assert [(r["workflow_step_id"], r["attempt"]) for r in got] == [(sid, 1)], "the first attempt must run"
        if outcome == "complete":
            w.complete(sid)
            assert [r["step_name"] for r in w.claim()] == ["after"]
        else:
            assert w.fail(sid) is None, "a non-retryable step is not retried"
            w.at(T0 + timedelta(hours=1))
            assert w.claim() == []
            with wdb.connect() as c:
                assert task_state(c, tid) == "error"
    finally:
        w.close()


@pytest.mark.parametrize("via", ["tick", "claim"])
def test_lease_expiry_of_the_last_attempt_fails_the_task(wdb, via):
    """Regression: when a lease expires on a step's last permitted attempt, the step goes
    to error (exhausted) but the task is never finalized: it stays in_progress with no
    task.failed event, although nothing can ever run again (fail_step would have failed it)."""
    with wdb.connect() as c:
        register(c, template("once", [("only", [], {"default_retry_limit": 1})]))
        tid = create(c, "once", {})
        sid = step_ids(c, tid)["only"]
    w1, w2 = Worker(wdb, "w1", now=T0), Worker(wdb, "w2", now=T0 + timedelta(seconds=11))
    try:
        w1.claim(lease=10)
        if via == "tick":
            w2.conn.execute("SELECT tasker_core.tick()")
        else:
            assert w2.claim() == []
        with wdb.connect() as c:
            assert step_state(c, sid) == "error"
            assert (task_state(c, tid), events(c, tid).count("task.failed")) == ("error", 1)
    finally:
        w1.close()
        w2.close()


def test_concurrent_completion_of_the_last_steps_finalizes_the_task(wdb):
    """Regression: two workers finishing the last two (parallel) steps of a task in
    concurrent transactions each see the other's step still in progress, so neither finalizes:
    every step is complete but the task stays in_progress with tasks.complete = false forever."""
    with wdb.connect() as c:
        register(c, SPLIT)
        tid = create(c, SPLIT, {})
        ids = step_ids(c, tid)
    w1 = Worker(wdb, "w1", autocommit=False)
    w2 = Worker(wdb, "w2", autocommit=False)
    try:
        w1.claim()
        w1.complete(ids["root"])
        w1.conn.commit()
        w1.claim()
        w1.conn.commit()
        w2.claim()
        w2.conn.commit()
        held = {w1.id: None, w2.id: None}
        with wdb.connect() as c:
            for wid, sid in c.execute("SELECT worker_id, workflow_step_id FROM tasker_core.step_claims").fetchall():
                held[wid] = sid
        assert set(held.values()) == {ids["left"], ids["right"]}
        w1.complete(held["w1"])                       # not committed yet
        t, box = in_thread(w2.complete, held["w2"])   # concurrently
        t.join(2)
        w1.conn.commit()
        t.join(10)
        assert "error" not in box, box
        w2.conn.commit()
        with wdb.connect() as c:
            assert [step_state(c, s) for s in ids.values()] == ["complete"] * 3
            assert (task_state(c, tid),
                    c.execute("SELECT complete FROM tasker_tasks WHERE task_id = %s", (tid,)).fetchone()[0]) == ("complete", True)
    finally:
        w1.close()
        w2.close()


def test_cancel_task_cancels_every_unfinished_step_atomically(wdb):
    with wdb.connect() as c:
        register(c, ORDER)
        tid = create(c, ORDER)
        bystander = create(c, ORDER, {"order_id": 2})
        ids = step_ids(c, tid)
    w = Worker(wdb, "w1", now=T0)
    try:
        run_order_to(w.conn, w, tid, ["validate"])
        w.claim(max_steps=2)                              # reserve and charge in progress
        w.fail(ids["charge"])                             # charge in error, backing off
        w.at(T0 + timedelta(minutes=1))
        # inside an open transaction, the cancellation is invisible and its steps are skipped
        op = wdb.connect(autocommit=False)
        try:
            fake(op, T0 + timedelta(minutes=1))
            assert op.execute("SELECT tasker_core.cancel_task(%s, 'customer asked')", (tid,)).fetchone()[0] == 4
            t, box = in_thread(w.claim, None, 100)
            t.join(10)
            assert not t.is_alive(), "a claim must not wait for the cancelling transaction"
            got = box["value"]
            assert {r["task_id"] for r in got} == {bystander}, got
            with wdb.connect() as c:
                assert step_state(c, ids["reserve"]) == "in_progress" and task_state(c, tid) == "in_progress"
            op.commit()
        finally:
            op.close()
        with wdb.connect() as c:
            states = {n: step_state(c, s) for n, s in ids.items()}
            assert states == {"validate": "complete", "reserve": "cancelled", "charge": "cancelled",
                              "ship": "cancelled", "notify": "cancelled"}
            assert task_state(c, tid) == "cancelled"
            assert events(c, tid).count("task.cancelled") == 1
            assert c.execute("SELECT count(*) FROM tasker_core.step_claims WHERE task_id = %s", (tid,)).fetchone()[0] == 0
            assert c.execute("SELECT count(*) FROM tasker_workflow_steps WHERE task_id = %s AND in_process",
                             (tid,)).fetchone()[0] == 0
            meta = c.execute("""SELECT metadata FROM tasker_workflow_step_transitions WHERE workflow_step_id = %s
                                AND most_recent""", (ids["ship"],)).fetchone()[0]
            assert meta.get("reason") == "customer asked"
        with unchanged(wdb):
            with raises("TK030"):
                w.complete(ids["reserve"])
            assert [r for r in w.claim(max_steps=100) if r["task_id"] == tid] == []
        with wdb.connect() as c:
            assert c.execute("SELECT tasker_core.cancel_task(%s)", (tid,)).fetchone()[0] == 0
        with unchanged(wdb), wdb.connect() as c:
            with raises("22004"):
                c.execute("SELECT tasker_core.cancel_task(NULL)")
            with raises("TK004"):
                c.execute("SELECT tasker_core.cancel_task(999999)")
    finally:
        w.close()


def test_retry_task(wdb):
    with wdb.connect() as c:
        register(c, SPLIT)
        tid = create(c, SPLIT, {})
        ids = step_ids(c, tid)
    w = Worker(wdb, "w1", now=T0)
    try:
        w.claim()
        w.complete(ids["root"])
        w.claim(max_steps=2)
        w.complete(ids["left"])
        assert w.fail(ids["right"], {"message": "fatal"}, retryable=False) is None
        with wdb.connect() as c:
            assert task_state(c, tid) == "error"
            assert c.execute("SELECT tasker_core.retry_task(%s)", (tid,)).fetchone()[0] == 1
            assert task_state(c, tid) == "pending"
            assert step_state(c, ids["right"]) == "pending"
            assert c.execute("SELECT attempts, retryable, backoff_request_seconds FROM tasker_workflow_steps WHERE workflow_step_id = %s",
                             (ids["right"],)).fetchone() == (0, True, None)
            assert "task.retry_requested" in events(c, tid)
        (r,) = w.claim()
        assert (r["workflow_step_id"], r["attempt"]) == (ids["right"], 1)
        assert r["parent_results"] == {"root": {}}
        w.complete(ids["right"])
        with wdb.connect() as c:
            assert task_state(c, tid) == "complete"
            assert task_transitions(c, tid) == [("pending", "in_progress"), ("in_progress", "error"),
                                                ("error", "pending"), ("pending", "in_progress"),
                                                ("in_progress", "complete")]
        with unchanged(wdb), wdb.connect() as c:
            with raises("TK002"):
                c.execute("SELECT tasker_core.retry_task(%s)", (tid,))
            with raises("22004"):
                c.execute("SELECT tasker_core.retry_task(NULL)")
            with raises("TK004"):
                c.execute("SELECT tasker_core.retry_task(999999)")
    finally:
        w.close()


def test_resolve_step_manually_unblocks_children(wdb):
    with wdb.connect() as c:
        register(c, ORDER)
        failed_task = create(c, ORDER, {"order_id": 1})
        running_task = create(c, ORDER, {"order_id": 2})
        f_ids, r_ids = step_ids(c, failed_task), step_ids(c, running_task)
    w = Worker(wdb, "w1", now=T0)
    try:
        # (1) a permanently failed step, task in error
        run_order_to(w.conn, w, failed_task, ["validate", "reserve", "charge", "ship"])
        (n,) = w.claim()
        assert n["workflow_step_id"] == f_ids["notify"]
        w.fail(f_ids["notify"], retryable=False)
        with wdb.connect() as c:
            assert task_state(c, failed_task) == "error"
            assert c.execute("SELECT tasker_core.resolve_step_manually(%s, %s)",
                             (f_ids["notify"], Jsonb({"sent": "by hand"}))).fetchone()[0] is True
            assert step_state(c, f_ids["notify"]) == "resolved_manually"
            assert c.execute("SELECT results FROM tasker_workflow_steps WHERE workflow_step_id = %s",
                             (f_ids["notify"],)).fetchone()[0] == {"sent": "by hand"}
            assert task_state(c, failed_task) == "complete", "every step done: the task completes"
            assert events(c, failed_task).count("task.completed") == 1
        # (2) an in-progress step: its worker loses it, its children become claimable
        run_order_to(w.conn, w, running_task, ["validate"])
        w.claim(max_steps=2)
        with wdb.connect() as c:
            assert c.execute("SELECT tasker_core.resolve_step_manually(%s, %s)",
                             (r_ids["charge"], Jsonb({"charged": "offline"}))).fetchone()[0] is True
            assert [(f, t) for f, t, _ in step_transitions(c, r_ids["charge"])][-2:] == \
                [("in_progress", "error"), ("error", "resolved_manually")]
            assert c.execute("SELECT count(*) FROM tasker_core.step_claims WHERE workflow_step_id = %s",
                             (r_ids["charge"],)).fetchone()[0] == 0
        with unchanged(wdb):
            with raises("TK030"):
                w.complete(r_ids["charge"])
        w.complete(r_ids["reserve"], {"reserved": 1})
        (ship,) = w.claim()
        assert ship["step_name"] == "ship"
        assert ship["parent_results"] == {"charge": {"charged": "offline"}, "reserve": {"reserved": 1}}
        # (3) a pending step whose parent is not done
        with wdb.connect() as c:
            assert c.execute("SELECT tasker_core.resolve_step_manually(%s)", (r_ids["notify"],)).fetchone()[0] is True
            assert c.execute("SELECT results FROM tasker_workflow_steps WHERE workflow_step_id = %s",
                             (r_ids["notify"],)).fetchone()[0] == {}
        w.complete(ship["workflow_step_id"])
        with wdb.connect() as c:
            assert task_state(c, running_task) == "complete"
        with unchanged(wdb), wdb.connect() as c:
            with raises("22004"):
                c.execute("SELECT tasker_core.resolve_step_manually(NULL)")
            with raises("TK004"):
                c.execute("SELECT tasker_core.resolve_step_manually(999999)")
            with raises("TK002"):
                c.execute("SELECT tasker_core.resolve_step_manually(%s)", (r_ids["validate"],))
    finally:
        w.close()


# ----------------------------------------------------------------------------------- dot, tick

def test_task_graph_dot(wdb):
    with wdb.connect() as c:
        register(c, ORDER)
        tid = create(c, ORDER)
        ids = step_ids(c, tid)
    w = Worker(wdb, "w1", now=T0)
    try:
        run_order_to(w.conn, w, tid, ["validate"])
        w.claim()                                   # one of reserve/charge in progress
        with wdb.connect() as c:
            dot = c.execute("SELECT tasker_core.task_graph_dot(%s)", (tid,)).fetchone()[0]
            states = {n: step_state(c, s) for n, s in ids.items()}
    finally:
        w.close()
    assert re.match(rf"^\s*digraph\s+\S*{tid}\S*\s*\{{", dot), dot
    assert dot.rstrip().endswith("}")
    node_lines = {}
    for name, sid in ids.items():
        lines = [ln for ln in dot.splitlines() if re.search(rf"\b{name}\b", ln)]
        assert lines, f"step {name} is not in the picture:\n{dot}"
        node_lines[name] = lines[0]
        assert states[name] in lines[0], f"{name} should show state {states[name]}: {lines[0]}"
    # coloured by state: one colour per state, different states different colours
    colours = collections.defaultdict(set)
    for name, line in node_lines.items():
        colours[states[name]].add(re.search(r'fillcolor="([^"]+)"', line).group(1))
    assert set(colours) == {"complete", "in_progress", "pending"}
    assert all(len(v) == 1 for v in colours.values()) and len(set.union(*colours.values())) == 3, colours
    # the ready step (the other of reserve/charge) is marked, the blocked ones are not
    ready = "charge" if states["reserve"] == "in_progress" else "reserve"
    assert "penwidth" in node_lines[ready] and "penwidth" not in node_lines["ship"]
    node_ids = {name: re.match(r"\s*(\S+)\s*\[", node_lines[name]).group(1) for name in ids}
    for a, b in ORDER_EDGES:
        assert re.search(rf"{re.escape(node_ids[a])}\s*->\s*{re.escape(node_ids[b])}\b", dot), (a, b, dot)
    assert dot.count("->") == len(ORDER_EDGES)
    if shutil.which("dot"):
        out = subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
    with unchanged(wdb), wdb.connect() as c:
        with raises("22004"):
            c.execute("SELECT tasker_core.task_graph_dot(NULL)")
        with raises("TK004"):
            c.execute("SELECT tasker_core.task_graph_dot(999999)")


def _notes(listener, timeout=0.5):
    return [json.loads(n.payload) for n in listener.notifies(timeout=timeout) if n.channel == "tasker_ready"]


def test_tick_fails_expired_leases_and_wakes_workers(wdb):
    with wdb.connect() as c:
        register(c, SINGLE)
        leased_task, backoff_task = create(c, SINGLE, {}), create(c, SINGLE, {})
        leased, backing_off = step_ids(c, leased_task)["only"], step_ids(c, backoff_task)["only"]
    w = Worker(wdb, "w1", now=T0)
    listener = wdb.connect()
    ticker = wdb.connect()
    try:
        listener.execute("LISTEN tasker_ready")
        rows = w.claim(max_steps=2, lease=10)
        assert [r["workflow_step_id"] for r in rows] == [leased, backing_off]
        assert w.fail(backing_off) == 1                      # ready again at T0 + 1 s
        _notes(listener, 0.2)
        fake(ticker, T0 + timedelta(milliseconds=500))
        assert ticker.execute("SELECT tasker_core.tick()").fetchone()[0] == 0
        assert _notes(listener, 0.3) == [], "nothing happened, nobody is woken"
        fake(ticker, T0 + timedelta(seconds=20))
        assert ticker.execute("SELECT tasker_core.tick()").fetchone()[0] == 2   # one lease, one backoff
        got = _notes(listener, 2)
        # tick's own wake-up; finalizing the task whose lease expired may also wake its namespace
        assert [n for n in got if n.get("reason") == "tick"] == [{"reason": "tick", "steps": 2}], got
        assert all(n.get("reason") == "tick" or n.get("task_id") == leased_task for n in got), got
        with wdb.connect() as c:
            assert step_state(c, leased) == "error"
            assert step_transitions(c, leased)[-1][2]["reason"] == "lease_expired"
            assert c.execute("SELECT count(*) FROM tasker_core.step_claims").fetchone()[0] == 0
        fake(ticker, T0 + timedelta(seconds=21))
        assert ticker.execute("SELECT tasker_core.tick()").fetchone()[0] == 0
        assert _notes(listener, 0.3) == []
        w.at(T0 + timedelta(seconds=21))
        (r,) = [x for x in w.claim(max_steps=5) if x["workflow_step_id"] == leased]
        assert r["attempt"] == 2
        # completing a step that readies another one wakes workers too
        with wdb.connect() as c:
            register(c, SPLIT)
            tid = create(c, SPLIT, {})
        assert any(n.get("task_id") == tid for n in _notes(listener, 1)), "create_task wakes workers"
        (root,) = [x for x in w.claim(max_steps=5) if x["task_id"] == tid]
        _notes(listener, 0.2)
        w.complete(root["workflow_step_id"])
        assert any(n.get("task_id") == tid for n in _notes(listener, 1))
    finally:
        w.close()
        listener.close()
        ticker.close()


# ----------------------------------------------------------------------------------- concurrency

N_WORKERS = 8
N_TASKS = 500
FANIN = template("fanin", [("start", []), ("left", ["start"]), ("right", ["start"]), ("join", ["left", "right"])],
                 ns="race")
PARENTS = {"start": set(), "left": {"start"}, "right": {"start"}, "join": {"left", "right"}}


def _fails_once(step_id):
    return zlib.crc32(str(step_id).encode()) % 6 == 0


def test_eight_concurrent_claimers_over_500_tasks(wdb):
    with wdb.connect() as c:
        register(c, FANIN)
        c.execute("SELECT tasker_core.create_task('race', 'fanin', NULL, jsonb_build_object('n', g)) FROM generate_series(1, %s) g",
                  (N_TASKS,))
        assert c.execute("SELECT count(*) FROM tasker_workflow_steps").fetchone()[0] == 4 * N_TASKS
    claims = []          # (step_id, worker, attempt, t_claimed)
    releases = []        # (step_id, worker, t_released, how)
    problems = []
    lock = threading.Lock()
    done = threading.Event()
    start_at = time.monotonic()
    deadline = start_at + 75

    def worker(i):
        wid = f"worker-{i}"
        try:
            conn = wdb.connect()
            conn.execute("SET deadlock_timeout = '100ms'")
            idle = 0
            while not done.is_set() and time.monotonic() < deadline:
                rows = conn.execute(
                    """SELECT workflow_step_id, task_id, step_name, attempt, parent_results
                       FROM tasker_core.claim_steps(%s, ARRAY['race'], 3, 60)""", (wid,)).fetchall()
                t_claimed = time.monotonic()
                if not rows:
                    idle += 1
                    if idle % 5 == 0 and conn.execute(
                            "SELECT NOT EXISTS (SELECT 1 FROM tasker_tasks WHERE NOT complete)").fetchone()[0]:
                        done.set()
                    time.sleep(0.003)
                    continue
                idle = 0
                with lock:
                    claims.extend((sid, wid, att, t_claimed) for sid, _, _, att, _ in rows)
                for sid, tid, name, att, parents in rows:
                    if set(parents) != PARENTS[name] or any(p != {"task": tid, "step": k} for k, p in parents.items()):
                        with lock:
                            problems.append(f"{wid}: step {sid} ({name}) got parent results {parents}")
                    t_rel = time.monotonic()
                    if att == 1 and _fails_once(sid):
                        conn.execute("SELECT tasker_core.fail_step(%s, %s, %s, true, 0)",
                                     (sid, wid, Jsonb({"message": "transient"})))
                        how = "fail"
                    else:
                        conn.execute("SELECT tasker_core.complete_step(%s, %s, %s)",
                                     (sid, wid, Jsonb({"task": tid, "step": name})))
                        how = "complete"
                    with lock:
                        releases.append((sid, wid, t_rel, how))
            conn.close()
        except Exception as e:  # noqa: BLE001 - reported below
            with lock:
                problems.append(f"{wid}: {type(e).__name__} {getattr(e, 'sqlstate', '')}: {e}")
            done.set()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(N_WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    elapsed = time.monotonic() - start_at
    assert not problems, problems[:10]
    assert done.is_set(), f"not finished in {elapsed:.0f} s"
    print(f"\n{N_TASKS} tasks, {len(claims)} claims by {N_WORKERS} workers in {elapsed:.1f} s")

    # what the workers saw: no step held by two workers at once
    held = collections.defaultdict(list)
    rel = collections.defaultdict(list)
    for sid, wid, att, t in claims:
        held[sid].append((t, wid, att))
    for sid, wid, t, how in releases:
        rel[sid].append((t, wid, how))
    with wdb.connect() as c:
        all_steps = {r[0]: r[1:] for r in c.execute(
            """SELECT ws.workflow_step_id, ws.attempts, ws.retry_limit, ws.results, ns.name::text, ws.task_id
               FROM tasker_workflow_steps ws JOIN tasker_named_steps ns USING (named_step_id)""").fetchall()}
        trans = collections.defaultdict(list)
        for sid, frm, to, meta, at in c.execute(
                """SELECT workflow_step_id, from_state, to_state, metadata, created_at
                   FROM tasker_workflow_step_transitions ORDER BY workflow_step_id, sort_key"""):
            trans[sid].append((frm, to, meta, at))
        incomplete = c.execute("SELECT count(*) FROM tasker_tasks WHERE NOT complete").fetchone()[0]
        task_states = collections.Counter(r[0] for r in c.execute(
            "SELECT to_state FROM tasker_task_transitions WHERE most_recent").fetchall())
        completed_events = c.execute(
            "SELECT count(*), count(DISTINCT task_id) FROM tasker_core.events WHERE name = 'task.completed'").fetchone()
        step_completed = c.execute(
            "SELECT count(*), count(DISTINCT step_id) FROM tasker_core.events WHERE name = 'step.completed'").fetchone()
        leftover_claims = c.execute("SELECT count(*) FROM tasker_core.step_claims").fetchone()[0]
        drift = c.execute("SELECT count(*) FROM tasker_core.check_tracking()").fetchone()[0]

    assert set(held) == set(all_steps), "every step was claimed"
    for sid, hs in held.items():
        hs.sort()
        rs = sorted(rel[sid])
        assert len(hs) == len(rs), (sid, hs, rs)
        for k, ((t_c, w_c, att), (t_r, w_r, how)) in enumerate(zip(hs, rs)):
            assert w_c == w_r and att == k + 1, f"step {sid}: claims {hs} releases {rs}"
            assert t_c <= t_r
            if k + 1 < len(hs):
                assert t_r <= hs[k + 1][0], f"step {sid} claimed by {hs[k + 1][1]} while {w_c} held it"
        assert [h for _, _, h in rs] == ["fail"] * (len(rs) - 1) + ["complete"], (sid, rs)
        assert len(rs) == (2 if _fails_once(sid) else 1), (sid, rs)

    # what the database recorded
    assert incomplete == 0
    assert task_states == {"complete": N_TASKS}, task_states
    assert completed_events == (N_TASKS, N_TASKS)
    assert step_completed == (4 * N_TASKS, 4 * N_TASKS)
    assert leftover_claims == 0
    assert drift == 0, "the maintained state disagrees with a recomputation"
    for sid, (attempts, retry_limit, results, name, tid) in all_steps.items():
        ts = trans[sid]
        assert ts[0][0] == "pending" and all(ts[k][0] == ts[k - 1][1] for k in range(1, len(ts))), (sid, ts)
        into = [k for k, t in enumerate(ts) if t[1] == "in_progress"]
        assert len(into) == attempts == len(held[sid]), (sid, attempts, ts)
        assert attempts <= retry_limit
        assert [(f, t) for f, t, _, _ in ts].count(("in_progress", "complete")) == 1
        assert ts[-1][1] == "complete"
        # in_progress periods: each ends (by the next transition) before the next one begins
        periods = [(ts[k][3], ts[k + 1][3]) for k in into]
        for (a0, a1), (b0, _) in zip(periods, periods[1:]):
            assert a0 <= a1 <= b0, (sid, periods)
        assert [ts[k][2].get("worker_id") for k in into] == [w for _, w, _ in held[sid]]
        assert results == {"task": tid, "step": name}


# ----------------------------------------------------------------------------------- issue 11

def _rails_move(c, step_id, to_state):
    """What the application may do to a step a worker holds, the Rails way: a Statesman
    transition and in_process cleared, without telling tasker_core."""
    c.execute("UPDATE tasker_workflow_step_transitions SET most_recent = false WHERE workflow_step_id = %s AND most_recent",
              (step_id,))
    c.execute("""INSERT INTO tasker_workflow_step_transitions (to_state, metadata, sort_key, most_recent,
                     workflow_step_id, created_at, updated_at)
                 SELECT %s, '{}', max(sort_key) + 10, true, %s, now(), now()
                 FROM tasker_workflow_step_transitions WHERE workflow_step_id = %s""", (to_state, step_id, step_id))
    c.execute("UPDATE tasker_workflow_steps SET in_process = false WHERE workflow_step_id = %s", (step_id,))


@pytest.mark.parametrize("to_state", ["error", "pending"])
def test_a_stale_claim_row_is_replaced_by_the_next_claim(wdb, to_state):
    """Item 5: the application moves a held step back to error/pending itself; its
    step_claims row stays. The next claim takes the step (replacing the stale row), claims of
    the namespace go on, and the old holder can no longer finish it."""
    with wdb.connect() as c:
        register(c, SINGLE)
        tid = create(c, SINGLE, {})
        sid = step_ids(c, tid)["only"]
    w1, w2 = Worker(wdb, "w1", now=T0), Worker(wdb, "w2", now=T0 + timedelta(seconds=1))
    try:
        (r,) = w1.claim(lease=600)
        assert r["workflow_step_id"] == sid
        with wdb.connect() as c:
            _rails_move(c, sid, to_state)
            other = create(c, SINGLE, {})
        got = w2.claim(max_steps=10, lease=60)
        assert sorted((x["task_id"], x["attempt"]) for x in got) == [(tid, 2), (other, 1)], got
        with wdb.connect() as c:
            assert c.execute("SELECT worker_id, lease_expires_at FROM tasker_core.step_claims WHERE workflow_step_id = %s",
                             (sid,)).fetchall() == [("w2", T0 + timedelta(seconds=61))]
        with unchanged(wdb):
            with raises("TK030"):
                w1.complete(sid, {"by": "w1"})
        assert w2.complete(sid, {"by": "w2"}) is True
        with wdb.connect() as c:
            assert step_state(c, sid) == "complete"
            assert c.execute("SELECT * FROM tasker_core.check_tracking()").fetchall() == []
    finally:
        w1.close()
        w2.close()


def test_retry_task_also_resets_steps_whose_retries_are_used_up(wdb):
    """Item 11: a pending step whose attempts reached its retry limit (an operator moved it back
    from error) is reset by retry_task like the steps in error, instead of the task waiting
    forever in pending."""
    with wdb.connect() as c:
        register(c, template("once", [("x", [], {"default_retry_limit": 1}), ("y", ["x"])]))
        tid = create(c, "once", {})
        ids = step_ids(c, tid)
    w = Worker(wdb, "w1", now=T0)
    try:
        w.claim()
        assert w.fail(ids["x"], {"message": "flaky"}) is None, "the only attempt is used up"
        with wdb.connect() as c:
            assert task_state(c, tid) == "error"
            assert c.execute("SELECT tasker_core.transition_step(%s, 'pending')", (ids["x"],)).fetchone()[0] is True
            assert c.execute("SELECT tasker_core.retry_task(%s)", (tid,)).fetchone()[0] == 1
            assert task_state(c, tid) == "pending"
            assert c.execute("SELECT attempts FROM tasker_workflow_steps WHERE workflow_step_id = %s",
                             (ids["x"],)).fetchone()[0] == 0
            assert c.execute("SELECT COALESCE(attempts, 0) FROM tasker_workflow_steps WHERE workflow_step_id = %s",
                             (ids["y"],)).fetchone()[0] == 0
        w.at(T0 + timedelta(minutes=10))
        got = w.claim()
        assert [(r["workflow_step_id"], r["attempt"]) for r in got] == [(ids["x"], 1)], "the task has no way forward"
        w.complete(ids["x"])
        (r,) = w.claim()
        w.complete(r["workflow_step_id"])
        with wdb.connect() as c:
            assert task_state(c, tid) == "complete"
    finally:
        w.close()


def test_cancel_task_on_a_finished_task_changes_nothing(wdb):
    """Item 10: complete and resolved_manually tasks are final for cancel_task: 0, nothing
    changed (it used to move a complete task to cancelled with complete = true)."""
    with wdb.connect() as c:
        register(c, SINGLE)
        done_task, resolved_task = create(c, SINGLE, {}), create(c, SINGLE, {})
        done_step, resolved_step = step_ids(c, done_task)["only"], step_ids(c, resolved_task)["only"]
    w = Worker(wdb, "w1", now=T0)
    try:
        w.claim(max_steps=2)
        w.complete(done_step)
        assert w.fail(resolved_step, retryable=False) is None
        with wdb.connect() as c:
            assert task_state(c, done_task) == "complete" and task_state(c, resolved_task) == "error"
            assert c.execute("SELECT tasker_core.transition_task(%s, 'resolved_manually')", (resolved_task,)).fetchone()[0]
        for tid, state in [(done_task, "complete"), (resolved_task, "resolved_manually")]:
            with unchanged(wdb), wdb.connect() as c:
                assert c.execute("SELECT tasker_core.cancel_task(%s)", (tid,)).fetchone()[0] == 0
            with wdb.connect() as c:
                assert task_state(c, tid) == state
        with wdb.connect() as c:
            assert c.execute("SELECT * FROM tasker_core.verify()").fetchall() == []
    finally:
        w.close()


@pytest.mark.parametrize("finish", ["cancelled", "resolved_manually"])
def test_resolve_step_manually_on_a_step_of_a_finished_task_is_refused(wdb, finish):
    """Item 10: a step of a cancelled or manually resolved task (moved there without touching
    its steps, as Rails does) can not be resolved: TK002 naming the task's state, nothing
    changed."""
    with wdb.connect() as c:
        register(c, SPLIT)
        tid = create(c, SPLIT, {})
        ids = step_ids(c, tid)
    w = Worker(wdb, "w1", now=T0)
    try:
        w.claim()
        assert w.fail(ids["root"], retryable=False) is None
        with wdb.connect() as c:
            assert task_state(c, tid) == "error"
            if finish == "cancelled":
                c.execute("SELECT tasker_core.transition_task(%s, 'pending')", (tid,))
            assert c.execute("SELECT tasker_core.transition_task(%s, %s)", (tid, finish)).fetchone()[0]
        for step in (ids["root"], ids["left"]):               # in error, pending
            with unchanged(wdb), wdb.connect() as c:
                with raises("TK002", rf"{tid}[\s\S]*{finish}|{finish}[\s\S]*{tid}"):
                    c.execute("SELECT tasker_core.resolve_step_manually(%s, '{\"by\": \"hand\"}')", (step,))
    finally:
        w.close()


CONTROL_NAMES = [("namespace", {"namespace_name": "a\x1fb"}), ("name", {"name": "b\x1fc"}),
                 ("step", "x\ny"), ("tab", {"name": "t\tab"}), ("delete", {"namespace_name": "del\x7f"})]


@pytest.mark.parametrize("case,change", CONTROL_NAMES, ids=[c[0] for c in CONTROL_NAMES])
def test_names_with_control_characters_are_refused(wdb, case, change):
    """Item 9: the idempotency identity used to join namespace, name and key with \\x1f, which
    names could contain; control characters are now refused in names."""
    tmpl = json.loads(json.dumps(SINGLE))
    if isinstance(change, dict):
        tmpl.update(change)
    else:
        tmpl["step_templates"][0]["name"] = change
    with unchanged(wdb), wdb.connect() as c:
        with raises("TK020"):
            register(c, tmpl)


def test_idempotency_keys_are_per_template_and_names_with_control_characters_are_refused(wdb):
    """Item 9: the identity is the SHA-256 of the namespace and the name, each prefixed by its
    length in bytes, then the key: unambiguous whatever the names hold, and a key still spans
    the versions of one template. create_task refuses names with control characters (22023)
    instead of looking them up."""
    with wdb.connect() as c:
        register(c, dict(SINGLE, name="a:b", namespace_name="n"))
        register(c, dict(SINGLE, name="b", namespace_name="n:a"))
        register(c, dict(SINGLE, name="b", namespace_name="n"))
        ta = create(c, "a:b", {}, {"idempotency_key": "k:1"}, ns="n")
        tb = create(c, "b", {}, {"idempotency_key": "k:1"}, ns="n:a")
        tc = create(c, "b", {}, {"idempotency_key": "k:1"}, ns="n")
        assert len({ta, tb, tc}) == 3
        for tid, ns, name in [(ta, "n", "a:b"), (tb, "n:a", "b"), (tc, "n", "b")]:
            stored = c.execute("SELECT identity_hash FROM tasker_tasks WHERE task_id = %s", (tid,)).fetchone()[0]
            encoded = f"{len(ns.encode())}:{ns}{len(name.encode())}:{name}k:1"
            digest = c.execute("SELECT encode(sha256(convert_to(%s, 'UTF8')), 'hex')", (encoded,)).fetchone()[0]
            assert stored == f"idempotency:{digest}", (stored, digest)
        # a new version of the template: the key still finds its task
        register(c, dict(SINGLE, name="b", namespace_name="n", version="2.0.0"))
        assert create(c, "b", {}, {"idempotency_key": "k:1"}, ns="n") == tc
    # as Rails could: names with control characters written directly into the tables
    with wdb.connect() as c:
        c.execute("UPDATE tasker_task_namespaces SET name = 'x' || chr(31) || 'y' WHERE name = 'n'")
    with unchanged(wdb), wdb.connect() as c:
        for ns, name in [("x\x1fy", "a"), ("n", "a\x1fb"), ("n\n", "a"), ("n", "a\t")]:
            with raises("22023"):
                c.execute("SELECT tasker_core.create_task(%s, %s, NULL, '{}', '{\"idempotency_key\": \"k:1\"}')", (ns, name))


@pytest.mark.parametrize("version", ["01.0.0", "1.00.0", "1.0.01", "00.1.0"])
def test_versions_with_leading_zeros_are_refused(wdb, version):
    """Item 13: 01.0.0 beside 1.0.0 made "the latest version" ambiguous."""
    with wdb.connect() as c:
        register(c, SINGLE)
    with unchanged(wdb), wdb.connect() as c:
        with raises("TK023"):
            register(c, dict(SINGLE, version=version))
    with wdb.connect() as c:
        for ok in ["0.0.0", "10.0.0", "1.10.100"]:
            register(c, dict(SINGLE, version=ok))


def test_backoff_seconds_refuses_a_negative_retry_after(db):
    """Item 13: fail_step refuses retry_after_seconds -1 (22023); backoff_seconds agrees."""
    with db.connect() as c:
        for args in [(3, -1), (1, -300), (1, -2 ** 31)]:
            with raises("22023"):
                _backoff(c, *args)
        assert _backoff(c, 3, 0) == 0


def test_fail_step_needs_an_error_and_documents_follow_one_rule(wdb):
    """Item 13: fail_step(step, worker, NULL) is 22004 (it stored a null error); results are any
    JSON value, an error any non-null JSON value (stored under "error"), metadata an object."""
    with wdb.connect() as c:
        register(c, SPLIT)
        tid = create(c, SPLIT, {})
        ids = step_ids(c, tid)
    w = Worker(wdb, "w1", now=T0)
    try:
        w.claim()
        with unchanged(wdb):
            with raises("22004"):
                w.conn.execute("SELECT tasker_core.fail_step(%s, 'w1', NULL)", (ids["root"],))
            with raises("22004"):
                w.conn.execute("SELECT tasker_core.fail_step(%s, 'w1', NULL, false, 5)", (ids["root"],))
        assert w.conn.execute("SELECT tasker_core.complete_step(%s, 'w1', '[1, 2]')", (ids["root"],)).fetchone()[0]
        got = {r["step_name"]: r for r in w.claim(max_steps=2)}
        assert got["left"]["parent_results"] == {"root": [1, 2]}
        assert w.conn.execute("SELECT tasker_core.fail_step(%s, 'w1', '\"boom\"', false)", (ids["left"],)).fetchone()[0] is None
        assert w.conn.execute("SELECT tasker_core.complete_step(%s, 'w1', '\"text\"')", (ids["right"],)).fetchone()[0]
        with wdb.connect() as c:
            assert c.execute("SELECT results FROM tasker_workflow_steps WHERE workflow_step_id = %s",
                             (ids["left"],)).fetchone()[0] == {"error": "boom"}
            assert c.execute("SELECT results FROM tasker_workflow_steps WHERE workflow_step_id = %s",
                             (ids["right"],)).fetchone()[0] == "text"
        with unchanged(wdb), wdb.connect() as c:
            for meta in ['"text"', "[1]", "1", "null"]:
                with raises("22023"):
                    c.execute("SELECT tasker_core.transition_task(%s, 'pending', %s::jsonb)", (tid, meta))
    finally:
        w.close()
