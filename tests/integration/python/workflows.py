"""A seeded generator of Tasker workflow data, for the differential tests.

Everything here writes the `tasker_*` tables with plain SQL, the way a Rails app (ActiveRecord
and Statesman) or a bulk loader would: single-row INSERTs, multi-row INSERTs, COPY, UPDATEs
and DELETEs. Every random choice comes from the `random.Random` handed in, so a seed replays
the same data (ids included, on a fresh database and the same sequence of batches).

Timestamps are `timestamp without time zone` values computed from `now()::timestamp` of the
transaction that writes them, so the boundary cases (a backoff expiring exactly at now(), one
microsecond before or after) only hold inside that transaction.

Shapes: chain, fan-out/fan-in, diamond lattice, random DAG (edges only from a lower to a
higher index), tree, forest, single step, empty task (no steps), and big tasks of 50-200 steps.
All edges go from a lower to a higher workflow_step_id, across tasks too, so no cycle is ever
generated here (see `add_cycles` for the one place that makes them on purpose).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

US = timedelta(microseconds=1)
SEC = timedelta(seconds=1)

STEP_STATES = ("pending", "in_progress", "complete", "error", "cancelled", "resolved_manually")
TASK_STATES = STEP_STATES
# "any string, returned as is": a few steps end in states Tasker does not define.
ODD_STEP_STATES = ("skipped", "retrying")

NAMESPACES = ("default", "payments", "inventory", "notifications", "reporting", "archived")
# (namespace, name, version, gets tasks)
NAMED_TASKS = (
    ("default", "process_order", "0.1.0", True),
    ("default", "process_order", "1.0.0", True),
    ("default", "send_email", "0.1.0", True),
    ("default", "legacy_import", "0.0.1", False),
    ("payments", "process_order", "0.1.0", True),
    ("payments", "refund_payment", "1.0.0", True),
    ("payments", "refund_payment", "2.1.3", True),
    ("inventory", "sync_inventory", "0.1.0", True),
    ("inventory", "process_order", "2.1.3", True),
    ("notifications", "send_email", "1.0.0", True),
    ("notifications", "send_sms", "0.1.0", True),
    ("reporting", "nightly_report", "0.1.0", False),
)
SYSTEMS = ("api", "database", "queue", "smtp")
STEP_NAMES = ("validate", "fetch", "reserve", "charge", "pack", "ship", "notify", "audit",
              "transform", "load", "cleanup", "archive")

# Values for the slowest_* filters: names that exist (some in several namespaces or versions),
# names that match nothing, and the empty string (given, so it matches nothing).
NAMESPACE_FILTERS = (None, "default", "payments", "notifications", "reporting", "no_such_ns", "")
TASK_NAME_FILTERS = (None, "process_order", "send_email", "refund_payment", "legacy_import", "no_such_task", "")
VERSION_FILTERS = (None, "0.1.0", "1.0.0", "2.1.3", "9.9.9", "")

HUGE_ID = 9223372036854775807
WRITE_MODES = ("rails", "bulk", "rows", "copy")


def load_reference(conn, path):
    """Run a SQL file with one execute (no parameters, several statements)."""
    text = Path(path).read_text()
    conn.execute(text)


def seq_ids(conn, table, column, n):
    """n fresh ids from a table's serial sequence, ascending."""
    if n <= 0:
        return []
    rows = conn.execute(
        "SELECT nextval(pg_get_serial_sequence(%s, %s)) FROM generate_series(1, %s)",
        (table, column, n)).fetchall()
    return sorted(r[0] for r in rows)


# --------------------------------------------------------------------------------------------
# The catalog: namespaces, dependent systems, named tasks, named steps (committed once).
# --------------------------------------------------------------------------------------------

@dataclass
class Catalog:
    namespace_ids: dict = field(default_factory=dict)
    named_tasks: list = field(default_factory=list)       # (id, ns, name, version)
    usable_named_task_ids: list = field(default_factory=list)
    named_step_ids: list = field(default_factory=list)

    @classmethod
    def install(cls, conn, base):
        """Insert the catalog row by row, Rails style (RETURNING the serial id)."""
        cat = cls()
        for name in NAMESPACES:
            cat.namespace_ids[name] = conn.execute(
                "INSERT INTO tasker_task_namespaces (name, description, created_at, updated_at) "
                "VALUES (%s, %s, %s, %s) RETURNING task_namespace_id",
                (name, None if name == "archived" else f"{name} workflows", base, base)).fetchone()[0]
        for ns, name, version, usable in NAMED_TASKS:
            ntid = conn.execute(
                "INSERT INTO tasker_named_tasks (name, description, created_at, updated_at, "
                "task_namespace_id, version, configuration) VALUES (%s, %s, %s, %s, %s, %s, %s::jsonb) "
                "RETURNING named_task_id",
                (name, None, base, base, cat.namespace_ids[ns], version,
                 json.dumps({"concurrent": True}) if usable else None)).fetchone()[0]
            cat.named_tasks.append((ntid, ns, name, version))
            if usable:
                cat.usable_named_task_ids.append(ntid)
        system_ids = []
        for name in SYSTEMS:
            system_ids.append(conn.execute(
                "INSERT INTO tasker_dependent_systems (name, description, created_at, updated_at) "
                "VALUES (%s, %s, %s, %s) RETURNING dependent_system_id",
                (name, f"the {name}", base, base)).fetchone()[0])
        for sid in system_ids:
            for name in STEP_NAMES:
                cat.named_step_ids.append(conn.execute(
                    "INSERT INTO tasker_named_steps (dependent_system_id, name, description, created_at, updated_at) "
                    "VALUES (%s, %s, %s, %s, %s) RETURNING named_step_id",
                    (sid, name, None, base, base)).fetchone()[0])
        # Template rows Rails keeps (not read by the functions, written for realism).
        for ntid in cat.usable_named_task_ids[:3]:
            for nsid in cat.named_step_ids[:3]:
                conn.execute(
                    "INSERT INTO tasker_named_tasks_named_steps (named_task_id, named_step_id, skippable, "
                    "default_retryable, default_retry_limit, created_at, updated_at) VALUES (%s, %s, false, true, 3, %s, %s)",
                    (ntid, nsid, base, base))
        return cat


# --------------------------------------------------------------------------------------------
# Specs (Python-side rows before they are written)
# --------------------------------------------------------------------------------------------

@dataclass
class Transition:
    to_state: str
    from_state: str | None
    sort_key: int
    most_recent: bool
    created_at: datetime
    metadata: str | None = None
    id: int | None = None


@dataclass
class Step:
    named_step_id: int
    created_at: datetime
    retryable: bool = True
    retry_limit: int | None = 3
    in_process: bool = False
    processed: bool = False
    processed_at: datetime | None = None
    attempts: int | None = None
    last_attempted_at: datetime | None = None
    backoff_request_seconds: int | None = None
    inputs: str | None = None
    results: str | None = None
    skippable: bool = False
    transitions: list = field(default_factory=list)
    id: int | None = None
    task_id: int | None = None


@dataclass
class Task:
    named_task_id: int
    created_at: datetime
    shape: str
    steps: list = field(default_factory=list)
    edges: list = field(default_factory=list)       # (local from, local to)
    extra_edges: list = field(default_factory=list)  # (global from id, local to) cross-task
    back_edges: list = field(default_factory=list)   # (local from, local to) closing a cycle
    transitions: list = field(default_factory=list)
    initiator: str | None = None
    source_system: str | None = None
    reason: str | None = None
    tags: str | None = None
    context: str | None = None
    complete: bool = False
    protected: bool = False   # boundary tasks: mutations leave them alone
    id: int | None = None


@dataclass
class BoundaryCase:
    """A root step whose readiness hinges on a backoff expiring at now() (+ offset)."""
    task_index: int
    step_index: int
    kind: str                      # explicit | failure | both
    explicit_offset: timedelta | None
    failure_offset: timedelta | None
    backoff_seconds: int | None
    attempts: int | None
    retry_limit: int | None
    failure_via: str = "update"    # update the current error transition | add a new one
    step_id: int | None = None

    def expected(self, now):
        """(ready_for_execution, next_retry_at) as the spec defines them."""
        ready = True
        if self.explicit_offset is not None:
            ready = ready and self.explicit_offset <= timedelta(0)
        if self.failure_offset is not None:
            ready = ready and self.failure_offset <= timedelta(0)
        if self.explicit_offset is not None:
            nra = now + self.explicit_offset
        elif self.failure_offset is not None:
            nra = now + self.failure_offset
        else:
            nra = None
        return ready, nra


# --------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------

OFFSETS = (-US, timedelta(0), US, -2 * SEC, 3 * SEC)


class DurationPool:
    """Distinct step durations (in ms, even, so a +0.5 ms variant never rounds onto another)."""

    def __init__(self):
        self.used = set()

    def take(self, rng, max_us):
        hi = max(4, max_us // 1000)
        for _ in range(50):
            ms = rng.randrange(2, hi + 2, 2)
            if ms not in self.used:
                self.used.add(ms)
                # A quarter of them end in exactly half a millisecond: ROUND(x, 3) must round
                # half away from zero, as numeric does (a float would often round down).
                return timedelta(microseconds=ms * 1000 + (500 if rng.random() < 0.25 else 0))
        ms = max(self.used) + 2
        self.used.add(ms)
        return timedelta(microseconds=ms * 1000 + 123)


class Generator:
    def __init__(self, rng, catalog, now, durations):
        self.rng = rng
        self.cat = catalog
        self.now = now
        self.durations = durations

    # ---- shapes ---------------------------------------------------------------------------

    def shape(self, big=False):
        """(name, number of steps, local edges)."""
        r = self.rng
        if big:
            kind = r.choice(("chain", "lattice", "random", "chain_branches"))
            if kind == "chain":
                n = r.randint(55, 200)
                return kind, n, [(i, i + 1) for i in range(n - 1)]
            if kind == "lattice":
                w, d = r.randint(2, 5), r.randint(12, 40)
                return "lattice", *self.lattice(w, d, r.random() < 0.5)
            if kind == "random":
                n = r.randint(50, 200)
                return kind, n, self.random_dag(n, min(0.5, 2.0 / n))
            n = r.randint(52, 120)
            edges = [(i, i + 1) for i in range(n - 1)]
            for _ in range(n // 4):
                a = r.randrange(n - 1)
                b = r.randrange(a + 1, n)
                edges.append((a, b))
            return "chain_branches", n, edges
        x = r.random()
        if x < 0.05:
            return "empty", 0, []
        if x < 0.14:
            return "single", 1, []
        if x < 0.28:
            n = r.randint(2, 12)
            return "chain", n, [(i, i + 1) for i in range(n - 1)]
        if x < 0.42:
            k = r.randint(1, 9)
            edges = [(0, i) for i in range(1, k + 1)]
            if r.random() < 0.8:     # fan-in
                edges += [(i, k + 1) for i in range(1, k + 1)]
                return "fan_out_in", k + 2, edges
            return "fan_out", k + 1, edges
        if x < 0.56:
            w, d = r.randint(1, 3), r.randint(1, 4)
            return "lattice", *self.lattice(w, d, r.random() < 0.6)
        if x < 0.84:
            n = r.randint(2, 12)
            return "random", n, self.random_dag(n, r.choice((0.15, 0.3, 0.5, 0.8)))
        if x < 0.92:
            n = r.randint(2, 12)
            return "tree", n, [(r.randrange(i), i) for i in range(1, n)]
        n = r.randint(3, 12)     # forest: several chains and isolated steps
        edges = [(i, i + 1) for i in range(n - 1) if r.random() < 0.5]
        return "forest", n, edges

    def lattice(self, w, d, caps):
        """d layers of w steps, every step linked to every step of the next layer; optionally a
        single root before and a single sink after (a diamond)."""
        layers, n = [], 0
        if caps:
            layers.append([0])
            n = 1
        for _ in range(d):
            layers.append(list(range(n, n + w)))
            n += w
        if caps:
            layers.append([n])
            n += 1
        edges = [(a, b) for l1, l2 in zip(layers, layers[1:]) for a in l1 for b in l2]
        return n, edges

    def random_dag(self, n, p):
        return [(i, j) for j in range(1, n) for i in range(j) if self.rng.random() < p]

    # ---- rows -----------------------------------------------------------------------------

    def task_created_at(self):
        r = self.rng
        x = r.random()
        if x < 0.04:        # a little in the future (clock skew)
            secs = -r.uniform(0, 300)
        elif x < 0.30:      # inside the default analytics hour
            secs = r.uniform(0, 3600)
        elif x < 0.65:      # inside the default 24 h slowest window
            secs = r.uniform(3600, 86400)
        else:               # outside it, within two days
            secs = r.uniform(86400, 172800)
        return self.now - timedelta(microseconds=int(secs * 1_000_000))

    def history(self, final, t0):
        """Statesman-style transitions ending in `final` (None: no transition at all)."""
        r = self.rng
        if final is None:
            return []
        path = []
        if r.random() < 0.6:
            path.append("pending")
        for _ in range(r.choice((0, 0, 0, 1, 2))):
            path += ["in_progress", "error"] + (["pending"] if r.random() < 0.5 else [])
        tail = {
            "pending": ["pending"],
            "in_progress": ["in_progress"],
            "complete": ["in_progress", "complete"],
            "error": ["in_progress", "error"],
            "cancelled": ["cancelled"],
            "resolved_manually": ["error", "resolved_manually"],
        }.get(final, [final])
        if r.random() < 0.15:
            tail = tail[-1:]
        path += tail
        # Collapse immediate repeats (pending -> pending) most of the time.
        if len(path) > 1 and path[-1] == path[-2] and r.random() < 0.8:
            path.pop()
        # Times: the final one decides durations (complete) and failure backoff (error).
        age = self.now - t0
        age_us = max(0, int(age.total_seconds() * 1_000_000))
        if final == "complete":
            x = r.random()
            if x < 0.04:
                tf = t0                                   # zero duration: excluded
            elif x < 0.07:
                tf = t0 - timedelta(milliseconds=r.randint(1, 5000))  # negative
            else:
                tf = t0 + self.durations.take(r, age_us if r.random() < 0.95 else age_us * 2)
        elif final == "error" and r.random() < 0.4:
            # Recent failure: some still in failure backoff.
            tf = self.now - timedelta(microseconds=r.randint(0, 40_000_000))
        else:
            tf = t0 + timedelta(microseconds=r.randint(0, max(1, age_us)))
        times = sorted(t0 + (tf - t0) * r.random() for _ in range(len(path) - 1)) + [tf]
        sk = r.choice((0, 10))
        out = []
        prev = None
        for i, (st, at) in enumerate(zip(path, times)):
            if i == 0:
                frm = None if r.random() < 0.7 else "pending"
            else:
                frm = prev if r.random() < 0.9 else None
            meta = None if r.random() < 0.2 else json.dumps({"event": st, "n": i})
            out.append(Transition(st, frm, sk, False, at, meta))
            sk += 10
            prev = st
        if r.random() < 0.95:
            out[-1].most_recent = True
        # else: every transition most_recent = false (current state falls back to pending)
        return out

    def step_final_state(self):
        r = self.rng
        x = r.random()
        if x < 0.10:
            return None
        if x < 0.13:
            return r.choice(ODD_STEP_STATES)
        return r.choice(STEP_STATES + ("complete", "complete", "error", "pending"))

    def make_step(self, t_created):
        r = self.rng
        created = t_created + timedelta(microseconds=r.choice((0, r.randint(1, 5_000_000))))
        final = self.step_final_state()
        s = Step(named_step_id=r.choice(self.cat.named_step_ids), created_at=created)
        s.attempts = r.choice((None, 0, 0, 1, 1, 2, 3, 4, 5))
        s.retry_limit = r.choice((None, 0, 1, 2, 3, 3, 3, 4))
        s.retryable = r.random() < 0.85
        s.processed = r.random() < (0.7 if final in ("complete", "resolved_manually") else 0.08)
        s.in_process = r.random() < (0.5 if final == "in_progress" else 0.05)
        if s.processed and r.random() < 0.8:
            s.processed_at = created + timedelta(seconds=r.uniform(0, 600))
        if r.random() < 0.5:
            s.last_attempted_at = self.now - timedelta(microseconds=r.randint(0, 7_200_000_000))
        if r.random() < 0.4:
            s.backoff_request_seconds = r.choice((0, 1, 2, 5, 30, 60, 300, 3600))
        if r.random() < 0.05 and s.last_attempted_at is not None:
            # Explicit backoff still running (or just expired) relative to now.
            s.last_attempted_at = self.now - timedelta(microseconds=r.randint(0, 20_000_000))
            s.backoff_request_seconds = r.choice((5, 10, 30))
        s.inputs = None if r.random() < 0.3 else json.dumps({"n": r.randint(0, 99)})
        s.results = None if r.random() < 0.6 else json.dumps({"ok": r.random() < 0.5})
        s.skippable = r.random() < 0.1
        s.transitions = self.history(final, created)
        return s

    def task_transitions(self, created):
        r = self.rng
        if r.random() < 0.15:
            return []
        final = r.choice(TASK_STATES)
        return self.history(final, created)

    def make_task(self, big=False, created=None):
        r = self.rng
        shape, n, edges = self.shape(big)
        created = created or self.task_created_at()
        t = Task(named_task_id=r.choice(self.cat.usable_named_task_ids), created_at=created, shape=shape)
        t.steps = [self.make_step(created) for _ in range(n)]
        t.edges = list(edges)
        if edges and r.random() < 0.08:          # duplicate edges
            for _ in range(r.randint(1, 2)):
                t.edges.append(r.choice(edges))
        r.shuffle(t.edges)
        t.transitions = self.task_transitions(created)
        t.initiator = r.choice((None, "user@example.com", "scheduler", "api"))
        t.source_system = r.choice((None, "web", "cron", "batch"))
        t.reason = r.choice((None, "test", "retry"))
        t.tags = r.choice((None, '["urgent"]', '["a", "b"]'))
        t.context = None if r.random() < 0.2 else json.dumps({"order_id": r.randint(1, 10**6)})
        t.complete = bool(t.transitions) and t.transitions[-1].to_state == "complete"
        return t

    def window_tasks(self):
        """Tasks (and their steps) created exactly at the edges of the analytics and slowest
        windows: now - {30 min, 1 h, 6 h, 24 h} + {-1 us, 0, +1 us}."""
        out = []
        for w in (timedelta(minutes=30), timedelta(hours=1), timedelta(hours=6), timedelta(hours=24)):
            for off in (-US, timedelta(0), US):
                created = self.now - w + off
                t = Task(named_task_id=self.rng.choice(self.cat.usable_named_task_ids),
                         created_at=created, shape="window")
                for final in ("complete", "error"):
                    s = Step(named_step_id=self.rng.choice(self.cat.named_step_ids), created_at=created)
                    s.attempts = self.rng.choice((None, 1))
                    dur = self.durations.take(self.rng, int(w.total_seconds() * 1_000_000) // 2)
                    s.transitions = [Transition("in_progress", None, 0, False, created + dur / 2),
                                     Transition(final, "in_progress", 10, True, created + dur)]
                    t.steps.append(s)
                t.initiator = "window"
                out.append(t)
        return out

    def boundary_tasks(self, count):
        """Tasks of 1-3 root steps whose readiness depends only on a backoff boundary, plus
        sometimes a child. Written neutral here; `apply_boundaries` sets the boundary values
        after every other write of the batch."""
        r = self.rng
        tasks, cases = [], []
        for _ in range(count):
            t = Task(named_task_id=r.choice(self.cat.usable_named_task_ids),
                     created_at=self.now - timedelta(minutes=r.randint(1, 600)), shape="boundary",
                     protected=True)
            nroots = r.randint(1, 3)
            for i in range(nroots):
                kind = r.choice(("explicit", "failure", "both"))
                attempts = r.choice((None, 0, 1, 2, 3, 4, 5))
                retry_limit = None if (attempts is None or attempts < 3) and r.random() < 0.3 \
                    else (attempts or 0) + r.randint(1, 2)
                s = Step(named_step_id=r.choice(self.cat.named_step_ids),
                         created_at=t.created_at, attempts=attempts, retry_limit=retry_limit)
                s.retryable = True
                case = BoundaryCase(len(tasks), i, kind, None, None, None, attempts, retry_limit)
                if kind in ("explicit", "both"):
                    case.explicit_offset = r.choice(OFFSETS)
                    case.backoff_seconds = r.choice((0, 1, 2, 7, 30, 45, 3600))
                    # neutral values for now; the boundary phase sets them
                    s.backoff_request_seconds = 10
                    s.last_attempted_at = self.now - timedelta(days=1)
                else:
                    # explicit backoff must not apply: one of the two columns NULL
                    if r.random() < 0.5:
                        s.backoff_request_seconds = None
                        s.last_attempted_at = self.now - timedelta(hours=r.randint(1, 9))
                    else:
                        s.backoff_request_seconds = r.choice((1, 60))
                        s.last_attempted_at = None
                if kind in ("failure", "both"):
                    case.failure_offset = r.choice(OFFSETS)
                    case.failure_via = r.choice(("update", "insert"))
                    s.transitions = [Transition("in_progress", None, 0, False, t.created_at),
                                     Transition("error", "in_progress", 10, True, t.created_at + SEC)]
                else:
                    s.transitions = r.choice((
                        [],
                        [Transition("pending", None, r.choice((0, 10)), True, t.created_at)],
                        [Transition("error", None, 0, False, t.created_at),
                         Transition("pending", "error", 10, True, t.created_at + SEC)],
                    ))
                t.steps.append(s)
                cases.append(case)
            if r.random() < 0.5:     # a child waiting on the boundary steps
                t.steps.append(self.make_step(t.created_at))
                t.steps[-1].transitions = []
                t.edges = [(i, nroots) for i in range(nroots)]
            tasks.append(t)
        return tasks, cases


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

TASK_COLS = ("task_id", "named_task_id", "complete", "requested_at", "initiator", "source_system",
             "reason", "bypass_steps", "tags", "context", "identity_hash", "created_at", "updated_at")
TASK_TYPES = ("bigint", "integer", "boolean", "timestamp", "varchar", "varchar", "varchar", "json",
              "jsonb", "jsonb", "varchar", "timestamp", "timestamp")
STEP_COLS = ("workflow_step_id", "task_id", "named_step_id", "retryable", "retry_limit", "in_process",
             "processed", "processed_at", "attempts", "last_attempted_at", "backoff_request_seconds",
             "inputs", "results", "created_at", "updated_at", "skippable")
STEP_TYPES = ("bigint", "bigint", "integer", "boolean", "integer", "boolean", "boolean", "timestamp",
              "integer", "timestamp", "integer", "jsonb", "jsonb", "timestamp", "timestamp", "boolean")
EDGE_COLS = ("from_step_id", "to_step_id", "name", "created_at", "updated_at")
EDGE_TYPES = ("bigint", "bigint", "varchar", "timestamp", "timestamp")
STR_COLS = ("id", "to_state", "from_state", "metadata", "sort_key", "most_recent", "workflow_step_id",
            "created_at", "updated_at")
STR_TYPES = ("bigint", "varchar", "varchar", "jsonb", "integer", "boolean", "bigint", "timestamp", "timestamp")
TTR_COLS = ("id", "to_state", "from_state", "metadata", "sort_key", "most_recent", "task_id",
            "created_at", "updated_at")
TTR_TYPES = STR_TYPES


def insert(conn, table, cols, types, rows, mode):
    """Write rows with one of: 'rows' (one INSERT per row), 'bulk' (one multi-row INSERT ...
    SELECT FROM unnest), 'copy' (COPY FROM STDIN)."""
    if not rows:
        return
    collist = ", ".join(cols)
    if mode == "bulk":
        arrays = [list(c) for c in zip(*rows)]
        unn = ", ".join(f"%s::text[]::{t}[]" if t in ("jsonb", "json") else f"%s::{t}[]" for t in types)
        conn.execute(f"INSERT INTO {table} ({collist}) SELECT * FROM unnest({unn})", arrays)
    elif mode == "copy":
        with conn.cursor().copy(f"COPY {table} ({collist}) FROM STDIN") as cp:
            for row in rows:
                cp.write_row(row)
    else:
        vals = ", ".join(f"%s::{t}" for t in types)
        conn.cursor().executemany(f"INSERT INTO {table} ({collist}) VALUES ({vals})", rows)


def assign_ids(conn, tasks):
    """Fresh ids, ascending in creation order (so every edge goes from a lower to a higher id)."""
    task_ids = seq_ids(conn, "tasker_tasks", "task_id", len(tasks))
    step_ids = iter(seq_ids(conn, "tasker_workflow_steps", "workflow_step_id",
                            sum(len(t.steps) for t in tasks)))
    str_ids = iter(seq_ids(conn, "tasker_workflow_step_transitions", "id",
                           sum(len(s.transitions) for t in tasks for s in t.steps)))
    ttr_ids = iter(seq_ids(conn, "tasker_task_transitions", "id", sum(len(t.transitions) for t in tasks)))
    for t, tid in zip(tasks, task_ids):
        t.id = tid
        for s in t.steps:
            s.id = next(step_ids)
            s.task_id = tid
            for tr in s.transitions:
                tr.id = next(str_ids)
        for tr in t.transitions:
            tr.id = next(ttr_ids)


def add_cross_task_edges(rng, tasks, prior_step_ids):
    """A few edges from a step of an earlier task (lower id) into a later task's step."""
    pool = list(prior_step_ids)
    for t in tasks:
        if not t.protected and t.steps and pool and rng.random() < 0.04:
            t.extra_edges.append((rng.choice(pool), rng.randrange(len(t.steps))))
        if not t.protected:
            pool.extend(s.id for s in t.steps)
            if len(pool) > 5000:
                pool = pool[-5000:]


def task_rows(tasks):
    return [(t.id, t.named_task_id, t.complete, t.created_at - timedelta(seconds=1), t.initiator,
             t.source_system, t.reason, None, t.tags, t.context, f"h{t.id:x}-{t.named_task_id}",
             t.created_at, t.created_at) for t in tasks]


def step_rows(tasks):
    return [(s.id, s.task_id, s.named_step_id, s.retryable, s.retry_limit, s.in_process, s.processed,
             s.processed_at, s.attempts, s.last_attempted_at, s.backoff_request_seconds, s.inputs,
             s.results, s.created_at, s.created_at, s.skippable) for t in tasks for s in t.steps]


def edge_rows(tasks):
    rows = []
    for t in tasks:
        for a, b in t.edges:
            rows.append((t.steps[a].id, t.steps[b].id, "provides", t.steps[b].created_at, t.steps[b].created_at))
        for gid, b in t.extra_edges:
            rows.append((gid, t.steps[b].id, "provides", t.steps[b].created_at, t.steps[b].created_at))
    return rows


def str_rows(tasks):
    return [(tr.id, tr.to_state, tr.from_state, tr.metadata, tr.sort_key, tr.most_recent, s.id,
             tr.created_at, tr.created_at) for t in tasks for s in t.steps for tr in s.transitions]


def ttr_rows(tasks):
    return [(tr.id, tr.to_state, tr.from_state, tr.metadata, tr.sort_key, tr.most_recent, t.id,
             tr.created_at, tr.created_at) for t in tasks for tr in t.transitions]


def write_tasks(conn, rng, tasks, mode):
    """Write tasks with their steps, edges and transitions.

    mode 'rails': task by task, Statesman transitions one at a time (flip the previous
    most_recent to false, then insert the new one), pipelined. Other modes write table by
    table with `insert` in a random order of edges / transitions.
    """
    if mode == "rails":
        write_rails(conn, rng, tasks)
        return
    insert(conn, "tasker_tasks", TASK_COLS, TASK_TYPES, task_rows(tasks), mode)
    insert(conn, "tasker_workflow_steps", STEP_COLS, STEP_TYPES, step_rows(tasks), mode)
    parts = [
        lambda: insert(conn, "tasker_workflow_step_edges", EDGE_COLS, EDGE_TYPES, edge_rows(tasks), mode),
        lambda: insert(conn, "tasker_workflow_step_transitions", STR_COLS, STR_TYPES, str_rows(tasks), mode),
        lambda: insert(conn, "tasker_task_transitions", TTR_COLS, TTR_TYPES, ttr_rows(tasks), mode),
    ]
    rng.shuffle(parts)
    for p in parts:
        p()


def _vals(types):
    return ", ".join(f"%s::{t}" for t in types)


def write_rails(conn, rng, tasks):
    ins_task = f"INSERT INTO tasker_tasks ({', '.join(TASK_COLS)}) VALUES ({_vals(TASK_TYPES)})"
    ins_step = f"INSERT INTO tasker_workflow_steps ({', '.join(STEP_COLS)}) VALUES ({_vals(STEP_TYPES)})"
    ins_edge = f"INSERT INTO tasker_workflow_step_edges ({', '.join(EDGE_COLS)}) VALUES ({_vals(EDGE_TYPES)})"
    ins_str = f"INSERT INTO tasker_workflow_step_transitions ({', '.join(STR_COLS)}) VALUES ({_vals(STR_TYPES)})"
    ins_ttr = f"INSERT INTO tasker_task_transitions ({', '.join(TTR_COLS)}) VALUES ({_vals(TTR_TYPES)})"
    flip_str = ("UPDATE tasker_workflow_step_transitions SET most_recent = false, updated_at = %s "
                "WHERE workflow_step_id = %s AND most_recent = true")
    flip_ttr = ("UPDATE tasker_task_transitions SET most_recent = false, updated_at = %s "
                "WHERE task_id = %s AND most_recent = true")
    with conn.pipeline():
        for t in tasks:
            conn.execute(ins_task, task_rows([t])[0])
            for row in step_rows([t]):
                conn.execute(ins_step, row)
            edges = edge_rows([t])
            trs = [(s, tr) for s in t.steps for tr in s.transitions]
            trs.sort(key=lambda x: (x[1].created_at, x[1].sort_key))
            # Edges before or after the transitions, as an app may add dependencies late.
            early = rng.random() < 0.7
            if early:
                for row in edges:
                    conn.execute(ins_edge, row)
            for s, tr in trs:
                conn.execute(flip_str, (tr.created_at, s.id))
                conn.execute(ins_str, (tr.id, tr.to_state, tr.from_state, tr.metadata, tr.sort_key, True,
                                       s.id, tr.created_at, tr.created_at))
            for s in t.steps:
                if s.transitions and not s.transitions[-1].most_recent:
                    conn.execute(flip_str, (s.transitions[-1].created_at, s.id))
            if not early:
                for row in edges:
                    conn.execute(ins_edge, row)
            for tr in t.transitions:
                conn.execute(flip_ttr, (tr.created_at, t.id))
                conn.execute(ins_ttr, (tr.id, tr.to_state, tr.from_state, tr.metadata, tr.sort_key, True,
                                       t.id, tr.created_at, tr.created_at))
            if t.transitions and not t.transitions[-1].most_recent:
                conn.execute(flip_ttr, (t.transitions[-1].created_at, t.id))


# --------------------------------------------------------------------------------------------
# Mutations after creation
# --------------------------------------------------------------------------------------------

class Mutator:
    """Random writes on what is in the tables (this batch's rows and committed earlier ones):
    step UPDATEs, transitions added Statesman style (both variants), transitions deleted or
    rewritten, edges added, duplicated, moved and deleted, steps renamed or moved to another
    task, task transitions, whole tasks deleted. Protected (boundary) tasks are left alone."""

    def __init__(self, conn, rng, now, durations, protected_task_ids, catalog):
        self.conn = conn
        self.catalog = catalog
        self.rng = rng
        self.now = now
        self.durations = durations
        self.protected = set(protected_task_ids)
        self.log = {}

    def count(self, what, n=1):
        self.log[what] = self.log.get(what, 0) + n

    def run(self, scale):
        c, r = self.conn, self.rng
        steps = [row for row in c.execute(
            "SELECT workflow_step_id, task_id, created_at FROM tasker_workflow_steps ORDER BY 1").fetchall()
            if row[1] not in self.protected]
        if not steps:
            return self.log
        step_ids = [s[0] for s in steps]
        step_set = set(step_ids)
        created = {s[0]: s[2] for s in steps}
        by_task = {}
        for sid, tid, _ in steps:
            by_task.setdefault(tid, []).append(sid)
        tasks = sorted(by_task)
        all_tasks = [row[0] for row in c.execute("SELECT task_id FROM tasker_tasks ORDER BY 1").fetchall()
                     if row[0] not in self.protected]

        sample = r.sample(step_ids, min(len(step_ids), scale * 6))
        trs = {}
        for tid, sid, sk, mr, st in c.execute(
                "SELECT id, workflow_step_id, sort_key, most_recent, to_state FROM tasker_workflow_step_transitions "
                "WHERE workflow_step_id = ANY(%s) ORDER BY id", (sample,)).fetchall():
            trs.setdefault(sid, []).append([tid, sk, mr, st])
        pools = [sample[i::6] for i in range(6)]

        # 1. step UPDATEs, one row at a time (Rails save) and in bulk
        upd = ("UPDATE tasker_workflow_steps SET attempts = %s, retry_limit = %s, last_attempted_at = %s, "
               "backoff_request_seconds = %s, in_process = %s, processed = %s, processed_at = %s, "
               "retryable = %s, results = %s::jsonb, updated_at = %s WHERE workflow_step_id = %s")
        rows = []
        for sid in pools[0]:
            processed = r.random() < 0.3
            rows.append((r.choice((None, 0, 1, 2, 3, 4, 5)), r.choice((None, 0, 1, 2, 3, 4)),
                         r.choice((None, self.now - timedelta(seconds=r.randint(0, 90)))),
                         r.choice((None, None, 0, 1, 5, 30, 60)), r.random() < 0.1, processed,
                         self.now if processed and r.random() < 0.7 else None, r.random() < 0.85,
                         r.choice((None, '{"ok": true}')), self.now, sid))
        if rows:
            c.cursor().executemany(upd, rows)
            self.count("step updates", len(rows))
        for sid in pools[0][:3]:
            c.execute("UPDATE tasker_workflow_steps SET created_at = created_at - %s WHERE workflow_step_id = %s",
                      (timedelta(microseconds=r.randint(1, 9_000_000)), sid))
            self.count("step created_at rewritten")
        if len(pools[0]) > 3:
            c.execute("UPDATE tasker_workflow_steps SET attempts = COALESCE(attempts, 0) + 1, "
                      "last_attempted_at = %s, updated_at = %s WHERE workflow_step_id = ANY(%s)",
                      (self.now - timedelta(seconds=r.randint(0, 30)), self.now, pools[0][::3]))
            c.execute("UPDATE tasker_workflow_steps SET processed = NOT processed, in_process = false "
                      "WHERE workflow_step_id = ANY(%s)", (pools[0][1::4],))
            self.count("bulk step updates", 2)

        # 2. transitions added to existing steps (Statesman: previous most_recent flipped first,
        #    or inserted with most_recent = false, then the old one flipped off and the new one on)
        new_ids = iter(seq_ids(c, "tasker_workflow_step_transitions", "id", len(pools[1])))
        with c.pipeline():
            for sid in pools[1]:
                lst = trs.setdefault(sid, [])
                sk = max((x[1] for x in lst), default=r.choice((-10, 0))) + 10
                state = r.choice(STEP_STATES + ("complete", "error"))
                if state == "complete" and r.random() < 0.8:
                    at = created[sid] + self.durations.take(r, max(0, int((self.now - created[sid]).total_seconds() * 1e6)))
                elif state == "error" and r.random() < 0.5:
                    at = self.now - timedelta(microseconds=r.randint(0, 35_000_000))
                else:
                    at = self.now - timedelta(microseconds=r.randint(0, 3_600_000_000))
                prev = next((x[3] for x in lst if x[2]), None)
                nid = next(new_ids)
                if r.random() < 0.7:
                    c.execute("UPDATE tasker_workflow_step_transitions SET most_recent = false, updated_at = %s "
                              "WHERE workflow_step_id = %s AND most_recent = true", (self.now, sid))
                    c.execute("INSERT INTO tasker_workflow_step_transitions (id, to_state, from_state, metadata, "
                              "sort_key, most_recent, workflow_step_id, created_at, updated_at) "
                              "VALUES (%s, %s, %s, '{}'::jsonb, %s, true, %s, %s, %s)",
                              (nid, state, prev, sk, sid, at, at))
                else:
                    c.execute("INSERT INTO tasker_workflow_step_transitions (id, to_state, from_state, metadata, "
                              "sort_key, most_recent, workflow_step_id, created_at, updated_at) "
                              "VALUES (%s, %s, %s, '{}'::jsonb, %s, false, %s, %s, %s)",
                              (nid, state, prev, sk, sid, at, at))
                    c.execute("UPDATE tasker_workflow_step_transitions SET most_recent = false, updated_at = %s "
                              "WHERE workflow_step_id = %s AND most_recent = true", (self.now, sid))
                    c.execute("UPDATE tasker_workflow_step_transitions SET most_recent = true, updated_at = %s "
                              "WHERE id = %s", (self.now, nid))
                for x in lst:
                    x[2] = False
                lst.append([nid, sk, True, state])
        self.count("transitions added", len(pools[1]))

        # 3. transitions deleted: an old one, or the current one (then sometimes the previous
        #    one is made current again, sometimes the step is left without a current one)
        for sid in pools[2]:
            lst = trs.get(sid)
            if not lst:
                continue
            victim = r.choice(lst)
            c.execute("DELETE FROM tasker_workflow_step_transitions WHERE id = %s", (victim[0],))
            lst.remove(victim)
            self.count("transitions deleted")
            if victim[2] and lst and r.random() < 0.6:
                newest = max(lst, key=lambda x: x[1])
                c.execute("UPDATE tasker_workflow_step_transitions SET most_recent = true WHERE id = %s",
                          (newest[0],))
                newest[2] = True

        # 4. transitions rewritten in place (a data fix): state, timestamp, or most_recent off
        for sid in pools[3]:
            lst = trs.get(sid)
            if not lst:
                continue
            x = r.choice(lst)
            what = r.random()
            if what < 0.4:
                x[3] = r.choice(STEP_STATES)
                c.execute("UPDATE tasker_workflow_step_transitions SET to_state = %s WHERE id = %s", (x[3], x[0]))
            elif what < 0.7:
                c.execute("UPDATE tasker_workflow_step_transitions SET created_at = %s WHERE id = %s",
                          (self.now - timedelta(microseconds=r.randint(0, 50_000_000)), x[0]))
            elif x[2]:
                c.execute("UPDATE tasker_workflow_step_transitions SET most_recent = false WHERE id = %s", (x[0],))
                x[2] = False
            self.count("transitions rewritten")

        # 4b. transitions moved to another step (workflow_step_id rewritten); a current one stays
        #     current only if the target step has none
        for sid, target in zip(pools[3][::2], pools[5]):
            lst, tlst = trs.get(sid), trs.setdefault(target, [])
            if not lst or sid == target:
                continue
            x = r.choice(lst)
            sk = max((y[1] for y in tlst), default=0) + 10
            mr = x[2] and not any(y[2] for y in tlst)
            c.execute("UPDATE tasker_workflow_step_transitions SET workflow_step_id = %s, sort_key = %s, "
                      "most_recent = %s WHERE id = %s", (target, sk, mr, x[0]))
            lst.remove(x)
            tlst.append([x[0], sk, mr, x[3]])
            self.count("transitions moved to another step")

        # 5. edges deleted (including one of a duplicate pair)
        edges = [row for row in c.execute(
            "SELECT id, from_step_id, to_step_id FROM tasker_workflow_step_edges ORDER BY id").fetchall()
            if row[2] in step_set]
        if edges:
            victims = r.sample(edges, min(len(edges), max(1, scale // 2)))
            c.execute("DELETE FROM tasker_workflow_step_edges WHERE id = ANY(%s)", ([v[0] for v in victims],))
            self.count("edges deleted", len(victims))
            victims = set(victims)
            edges = [e for e in edges if e not in victims]

        # 6. edges added later: inside a task (lower id -> higher id), sometimes across tasks,
        #    sometimes a duplicate of an existing edge
        add = []
        for _ in range(max(1, scale // 2)):
            x = r.random()
            if x < 0.2 and edges:
                e = r.choice(edges)
                add.append((e[1], e[2]))
            elif x < 0.3:
                a, b = sorted(r.sample(step_ids, 2))
                add.append((a, b))
            else:
                tid = r.choice(tasks)
                ids = by_task[tid]
                if len(ids) >= 2:
                    a, b = sorted(r.sample(ids, 2))
                    add.append((a, b))
        rows = [(a, b, "provides", self.now, self.now) for a, b in add]
        if rows:
            insert(c, "tasker_workflow_step_edges", EDGE_COLS, EDGE_TYPES, rows, r.choice(("rows", "bulk")))
            self.count("edges added", len(rows))

        # 7. edges moved (to_step_id rewritten, still lower id -> higher id, same task)
        task_of = {sid: tid for sid, tid, _ in steps}
        for eid, a, b in r.sample(edges, min(len(edges), max(1, scale // 10))):
            cands = [s for s in by_task.get(task_of.get(b), []) if s > a and s != b]
            if cands:
                c.execute("UPDATE tasker_workflow_step_edges SET to_step_id = %s, updated_at = %s WHERE id = %s",
                          (r.choice(cands), self.now, eid))
                self.count("edges moved")

        # 8. steps renamed (named_step_id) and, rarely, moved to another task
        for sid in pools[4][: max(1, scale // 10)]:
            c.execute("UPDATE tasker_workflow_steps SET named_step_id = %s, updated_at = %s WHERE workflow_step_id = %s",
                      (r.choice(self.catalog.named_step_ids), self.now, sid))
            self.count("steps renamed")
        for sid in pools[4][-2:]:
            if len(all_tasks) > 1:
                c.execute("UPDATE tasker_workflow_steps SET task_id = %s WHERE workflow_step_id = %s",
                          (r.choice(all_tasks), sid))
                self.count("steps moved to another task")

        # 8b. a step template renamed (tasker_named_steps.name), and a step with neither edges
        #     nor transitions renumbered (its primary key rewritten)
        nsid = r.choice(self.catalog.named_step_ids)
        c.execute("UPDATE tasker_named_steps SET name = left(name, 100) || '_r' || %s, updated_at = %s "
                  "WHERE named_step_id = %s", (r.randint(0, 999), self.now, nsid))
        self.count("named steps renamed")
        lonely = c.execute(
            "SELECT ws.workflow_step_id FROM tasker_workflow_steps ws WHERE NOT ws.task_id = ANY(%s) "
            "AND NOT EXISTS (SELECT 1 FROM tasker_workflow_step_edges e WHERE e.from_step_id = ws.workflow_step_id "
            "OR e.to_step_id = ws.workflow_step_id) AND NOT EXISTS (SELECT 1 FROM tasker_workflow_step_transitions t "
            "WHERE t.workflow_step_id = ws.workflow_step_id) ORDER BY 1 DESC LIMIT 3", (list(self.protected),)).fetchall()
        for (sid,) in lonely:
            c.execute("UPDATE tasker_workflow_steps SET workflow_step_id = "
                      "nextval(pg_get_serial_sequence('tasker_workflow_steps', 'workflow_step_id')) "
                      "WHERE workflow_step_id = %s", (sid,))
            self.count("steps renumbered")

        # 9. task transitions: added (flip then insert) and deleted
        ttasks = r.sample(all_tasks, min(len(all_tasks), max(1, scale // 3)))
        cur = {row[0]: row[1:] for row in c.execute(
            "SELECT task_id, max(sort_key), max(id) FILTER (WHERE most_recent) FROM tasker_task_transitions "
            "WHERE task_id = ANY(%s) GROUP BY task_id", (ttasks,)).fetchall()}
        new_ids = iter(seq_ids(c, "tasker_task_transitions", "id", len(ttasks)))
        for tid in ttasks:
            mx, mr = cur.get(tid, (None, None))
            if mr is not None and r.random() < 0.3:
                c.execute("DELETE FROM tasker_task_transitions WHERE id = %s", (mr,))
                self.count("task transitions deleted")
                continue
            state = r.choice(TASK_STATES)
            at = self.now - timedelta(seconds=r.randint(0, 3600))
            c.execute("UPDATE tasker_task_transitions SET most_recent = false, updated_at = %s "
                      "WHERE task_id = %s AND most_recent = true", (at, tid))
            c.execute("INSERT INTO tasker_task_transitions (id, to_state, from_state, metadata, sort_key, "
                      "most_recent, task_id, created_at, updated_at) VALUES (%s, %s, NULL, '{}'::jsonb, %s, true, %s, %s, %s)",
                      (next(new_ids), state, (mx if mx is not None else 0) + 10, tid, at, at))
            c.execute("UPDATE tasker_tasks SET complete = %s, updated_at = %s WHERE task_id = %s",
                      (state == "complete", at, tid))
            self.count("task transitions added")

        # 10. whole tasks deleted (Rails destroy: transitions, edges both ways, steps, task)
        for tid in r.sample(all_tasks, min(len(all_tasks), max(1, scale // 40))):
            delete_task(c, tid)
            self.count("tasks deleted")
        return self.log


def delete_task(c, tid):
    c.execute("DELETE FROM tasker_workflow_step_transitions WHERE workflow_step_id IN "
              "(SELECT workflow_step_id FROM tasker_workflow_steps WHERE task_id = %s)", (tid,))
    c.execute("DELETE FROM tasker_workflow_step_edges WHERE from_step_id IN "
              "(SELECT workflow_step_id FROM tasker_workflow_steps WHERE task_id = %s) OR to_step_id IN "
              "(SELECT workflow_step_id FROM tasker_workflow_steps WHERE task_id = %s)", (tid, tid))
    c.execute("DELETE FROM tasker_workflow_steps WHERE task_id = %s", (tid,))
    c.execute("DELETE FROM tasker_task_transitions WHERE task_id = %s", (tid,))
    c.execute("DELETE FROM tasker_tasks WHERE task_id = %s", (tid,))


# --------------------------------------------------------------------------------------------
# Boundary phase
# --------------------------------------------------------------------------------------------

def apply_boundaries(conn, rng, boundary_tasks, cases):
    """Set the backoff columns of the boundary steps relative to now() of this transaction:
    explicit: last_attempted_at = now()::timestamp - make_interval(secs => backoff) + offset;
    failure: the current error transition's created_at = now()::timestamp
             - LEAST(2^COALESCE(attempts, 1) s, 30 s) + offset (updated in place, or a new
             error transition added Statesman style)."""
    new_ids = iter(seq_ids(conn, "tasker_workflow_step_transitions", "id", len(cases)))
    for case in cases:
        step = boundary_tasks[case.task_index].steps[case.step_index]
        case.step_id = step.id
        conn.execute("UPDATE tasker_workflow_steps SET attempts = %s, retry_limit = %s, processed = false, "
                     "in_process = false, retryable = true WHERE workflow_step_id = %s",
                     (case.attempts, case.retry_limit, step.id))
        if case.explicit_offset is not None:
            conn.execute(
                "UPDATE tasker_workflow_steps SET backoff_request_seconds = %s, "
                "last_attempted_at = now()::timestamp - make_interval(secs => %s) + %s::interval "
                "WHERE workflow_step_id = %s",
                (case.backoff_seconds, case.backoff_seconds, case.explicit_offset, step.id))
        if case.failure_offset is not None:
            until = ("now()::timestamp - LEAST(power(2, COALESCE(ws.attempts, 1)) * interval '1 second', "
                     "interval '30 seconds') + %s::interval")
            if case.failure_via == "update":
                conn.execute(
                    f"UPDATE tasker_workflow_step_transitions tr SET created_at = {until}, updated_at = now()::timestamp "
                    "FROM tasker_workflow_steps ws WHERE ws.workflow_step_id = tr.workflow_step_id "
                    "AND tr.workflow_step_id = %s AND tr.most_recent = true",
                    (case.failure_offset, step.id))
            else:
                nid = next(new_ids)
                conn.execute("UPDATE tasker_workflow_step_transitions SET most_recent = false "
                             "WHERE workflow_step_id = %s AND most_recent = true", (step.id,))
                conn.execute(
                    "INSERT INTO tasker_workflow_step_transitions (id, to_state, from_state, metadata, sort_key, "
                    "most_recent, workflow_step_id, created_at, updated_at) "
                    f"SELECT %s, 'error', 'in_progress', '{{}}'::jsonb, 20, true, ws.workflow_step_id, {until}, now() "
                    "FROM tasker_workflow_steps ws WHERE ws.workflow_step_id = %s",
                    (nid, case.failure_offset, step.id))


# --------------------------------------------------------------------------------------------
# Cycles (for the one test that makes them on purpose)
# --------------------------------------------------------------------------------------------

def cycle_tasks(gen):
    """Tasks whose edges form a cycle: (task, reachable from a root?)."""
    out = []
    for reachable in (True, True, False, False):
        t = gen.make_task()
        while len(t.steps) < 3:
            t = gen.make_task()
        n = len(t.steps)
        t.edges = [(i, i + 1) for i in range(n - 1)]
        if reachable:
            # root 0 -> ... -> n-1 -> 1 : cycle 1..n-1 reachable from root 0
            t.back_edges = [(n - 1, 1)]
        else:
            # n-1 -> 0 closes the whole chain: no root at all
            t.back_edges = [(n - 1, 0)]
        t.shape = "cycle_reachable" if reachable else "cycle_unreachable"
        out.append((t, reachable))
    t = gen.make_task()
    while len(t.steps) < 2:
        t = gen.make_task()
    t.edges = []
    t.back_edges = [(1, 1)]            # a self-loop, not reachable from root 0
    t.shape = "self_loop"
    out.append((t, False))
    t = gen.make_task()
    while len(t.steps) < 2:
        t = gen.make_task()
    t.edges = [(0, 1)]
    t.back_edges = [(1, 1)]            # a self-loop reachable from root 0
    t.shape = "self_loop_reachable"
    out.append((t, True))
    return out


def write_back_edges(conn, tasks):
    rows = []
    for t in tasks:
        for a, b in t.back_edges:
            rows.append((t.steps[a].id, t.steps[b].id, "provides", t.created_at, t.created_at))
    insert(conn, "tasker_workflow_step_edges", EDGE_COLS, EDGE_TYPES, rows, "rows")
