"""Differential tests: the Rust functions (tasker_core.<fn>) against the PL/pgSQL reference
(tasker_ref.<fn>, sql/reference/tasker_reference.sql) over thousands of generated workflows.

Each batch is one transaction (now() is the transaction timestamp, so the backoff boundary
cases only hold inside it): generate workflows (workflows.py), mutate them and older committed
ones, set backoffs exactly at now() +- 1 us, check tasker_core.check_tracking() finds nothing,
then compare every function both ways with EXCEPT ALL on the rows' text (so duplicates, NULLs,
numeric scales and timestamps count), then commit or roll back. Batches alternate the session
time zone between UTC and America/New_York and later batches see the rows earlier ones
committed.

Replay a run with TASKER_DIFF_SEED=<seed> (printed at the start, in every test id and in every
failure message).
"""
import os
import random
import sys
import time
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql

from conftest import ROOT, create_database, drop_database
import workflows as wf

IMPL = "tasker_core"
REF = "tasker_ref"
FUNCTIONS = (
    "get_step_readiness_status", "get_step_readiness_status_batch", "get_task_execution_context",
    "get_task_execution_contexts_batch", "calculate_dependency_levels", "get_system_health_counts_v01",
    "get_analytics_metrics_v01", "get_slowest_steps_v01", "get_slowest_tasks_v01", "step_dag_relationships",
)
REFERENCE_SQL = ROOT / "sql" / "reference" / "tasker_reference.sql"

_env_seed = os.environ.get("TASKER_DIFF_SEED", "").strip()
BASE_SEED = int(_env_seed) if _env_seed else random.SystemRandom().randrange(1, 2**31)
TIMEZONES = ("UTC", "America/New_York")
BIG_LIMIT = 1_000_000
SAMPLE_ROWS = 6


@dataclass
class Batch:
    index: int
    tz: str
    commit: bool
    small: int      # ordinary workflows (1-12 steps, a few empty)
    big: int        # 50-200 steps
    boundary: int   # backoff boundary workflows

    @property
    def seed(self):
        return BASE_SEED * 1000 + self.index

    @property
    def label(self):
        return f"seed={BASE_SEED} batch={self.index} tz={self.tz}"


# 8 batches of ~270 workflows, time zones alternating; batches 0, 1, 4, 5 commit (one per time
# zone in each half), the others roll back, so later batches see (and mutate) committed rows
# and the whole-table functions see them too. Fewer, larger batches keep the per-batch
# "every task" comparisons over the accumulated rows cheap.
PLAN = [Batch(i, TIMEZONES[i % 2], i % 4 in (0, 1), small=235, big=3, boundary=16) for i in range(8)]

STATS = {"workflows": 0, "steps": 0, "batches": 0, "boundary_ready": 0, "boundary_not_ready": 0,
         "rows_compared": 0, "checks": 0, "mutations": {}, "shapes": {}, "seconds": {}, "check_seconds": {}}


def seed_note():
    return f"[TASKER_DIFF_SEED={BASE_SEED}]"


def announce(config, text):
    """Print past pytest's capture (the seed must be visible even when everything passes)."""
    capman = config.pluginmanager.getplugin("capturemanager")
    reporter = config.pluginmanager.getplugin("terminalreporter")
    if capman is not None and reporter is not None:
        with capman.global_and_fixture_disabled():
            reporter.write_line(text)
    else:
        print(text, file=sys.stderr)


class Env:
    def __init__(self, db, catalog):
        self.db = db
        self.catalog = catalog
        self.durations = wf.DurationPool()


def prepare(db):
    """Schema, tracking, reference, catalog. Returns (catalog, None) or (None, why it failed)."""
    with db.connect() as conn:
        conn.execute("SELECT tasker_core.install_schema()")
        try:
            conn.execute("SELECT tasker_core.enable_tracking()")
        except psycopg.Error as e:
            return None, f"SELECT tasker_core.enable_tracking() failed ({e.sqlstate}): {str(e).strip()}"
        if not REFERENCE_SQL.exists():
            return None, f"the reference implementation {REFERENCE_SQL} is missing"
        try:
            wf.load_reference(conn, REFERENCE_SQL)
        except psycopg.Error as e:
            return None, f"loading {REFERENCE_SQL} failed ({e.sqlstate}): {str(e).strip()}"
        base = conn.execute("SELECT (now() - interval '30 days')::timestamp").fetchone()[0]
        return wf.Catalog.install(conn, base), None


@pytest.fixture(scope="module")
def env(request):
    """A fresh database: tasker_core, install_schema(), enable_tracking(), the reference
    functions, and the catalog (namespaces, named tasks, dependent systems, named steps).
    TASKER_DIFF_KEEP_DB=1 keeps it afterwards (with the committed batches) for inspection."""
    announce(request.config, f"test_differential: base seed {BASE_SEED} (replay with TASKER_DIFF_SEED={BASE_SEED})")
    db = create_database("diff")
    try:
        catalog, problem = prepare(db)
        if problem:
            pytest.fail(f"{seed_note()} {problem}", pytrace=False)
        yield Env(db, catalog)
    finally:
        if os.environ.get("TASKER_DIFF_KEEP_DB"):
            announce(request.config, f"test_differential: kept database {db.name} (TASKER_DIFF_KEEP_DB)")
        else:
            drop_database(db)


# --------------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------------

class Checker:
    """Runs comparisons inside the batch transaction, each under a savepoint so one failing
    check (an error raised by either side) does not hide the others."""

    def __init__(self, conn, label):
        self.conn = conn
        self.label = label
        self.failures = []

    def fail(self, name, text):
        self.failures.append(f"--- {name} ({self.label}) {seed_note()}\n{text}")

    def guarded(self, name, fn):
        STATS["checks"] += 1
        t0 = time.monotonic()
        try:
            with self.conn.transaction():
                return fn()
        except psycopg.Error as e:
            self.fail(name, f"ERROR {e.sqlstate}: {str(e).strip()}")
            return None
        finally:
            key = name.split(":")[0]
            STATS["check_seconds"][key] = STATS["check_seconds"].get(key, 0.0) + time.monotonic() - t0

    def diff(self, name, template, oneway=False, oracle=None):
        """`template` is a SELECT with {s} where the schema goes; its rows (any columns) must be
        the same multiset for tasker_core and tasker_ref. A (impl, ref) tuple gives the two
        sides different forms; oracle=(label, sql) compares tasker_core with that query instead
        of tasker_ref. oneway: only rows of tasker_core missing from the other side count."""
        if isinstance(template, tuple):
            impl_sql, ref_sql = template[0].format(s=IMPL), template[1].format(s=REF)
        else:
            impl_sql, ref_sql = template.format(s=IMPL), template.format(s=REF)
        other = REF
        if oracle is not None:
            other, ref_sql = oracle
        q = f"""
            WITH i AS MATERIALIZED ({impl_sql}),
                 r AS MATERIALIZED ({ref_sql}),
                 io AS (SELECT * FROM i EXCEPT ALL SELECT * FROM r),
                 ro AS (SELECT * FROM r EXCEPT ALL SELECT * FROM i)
            SELECT (SELECT count(*) FROM i), (SELECT count(*) FROM r),
                   (SELECT count(*) FROM io), (SELECT count(*) FROM ro),
                   ARRAY(SELECT x::text FROM (SELECT * FROM io ORDER BY 1 LIMIT {SAMPLE_ROWS}) x),
                   ARRAY(SELECT x::text FROM (SELECT * FROM ro ORDER BY 1 LIMIT {SAMPLE_ROWS}) x)"""

        def run():
            ni, nr, nio, nro, sio, sro = self.conn.execute(q).fetchone()
            STATS["rows_compared"] += ni
            if nio or (nro and not oneway):
                lines = [f"{IMPL}: {ni} rows, {other}: {nr} rows; only in {IMPL}: {nio}"
                         + ("" if oneway else f", only in {other}: {nro}")]
                lines += [f"  only in {IMPL}: {row}" for row in sio]
                if not oneway:
                    lines += [f"  only in {other}:  {row}" for row in sro]
                lines.append(f"  query ({IMPL} side): {' '.join(impl_sql.split())}")
                self.fail(name, "\n".join(lines))
            return ni, nr
        return self.guarded(name, run)

    def slowest(self, fn):
        """slowest_* over every case of diff_slow. A LIMIT may cut ties in duration differently,
        so: the durations returned must be the same multiset for both; every row tasker_core
        returns must be a row of the reference's untruncated answer for the same arguments; and
        tasker_core's rows must come in descending duration. (Exact equality when the limit
        exceeds the candidates.)"""
        q = f"""
            WITH i AS MATERIALIZED ({slow_calls(fn, IMPL)}),
                 r AS MATERIALIZED ({slow_calls(fn, REF)}),
                 f AS MATERIALIZED (SELECT a.case_id AS k, x::text AS v FROM diff_slow a CROSS JOIN LATERAL
                                    {REF}.{fn}(a.since, {BIG_LIMIT}, a.ns, a.tn, a.ver) x),
                 dio AS (SELECT k, d FROM i EXCEPT ALL SELECT k, d FROM r),
                 dro AS (SELECT k, d FROM r EXCEPT ALL SELECT k, d FROM i),
                 rio AS (SELECT k, v FROM i EXCEPT ALL SELECT k, v FROM f),
                 ord AS (SELECT k, ord, d, lag(d) OVER (PARTITION BY k ORDER BY ord) AS prev FROM i)
            SELECT (SELECT count(*) FROM i), (SELECT count(*) FROM r), (SELECT count(*) FROM f),
                   ARRAY(SELECT x::text FROM (SELECT * FROM dio ORDER BY 1, 2 LIMIT {SAMPLE_ROWS}) x),
                   ARRAY(SELECT x::text FROM (SELECT * FROM dro ORDER BY 1, 2 LIMIT {SAMPLE_ROWS}) x),
                   ARRAY(SELECT x::text FROM (SELECT * FROM rio ORDER BY 1, 2 LIMIT {SAMPLE_ROWS}) x),
                   ARRAY(SELECT x::text FROM (SELECT * FROM ord WHERE d > prev ORDER BY 1, 2 LIMIT {SAMPLE_ROWS}) x)"""

        def run():
            ni, nr, nf, dio, dro, rio, bad = self.conn.execute(q).fetchone()
            STATS["rows_compared"] += ni
            if dio or dro:
                self.fail(f"{fn}: durations (every filter combination, window and limit)",
                          f"{IMPL}: {ni} rows, {REF}: {nr} rows; (case, duration) only in {IMPL}: {dio}; "
                          f"only in {REF}: {dro}\n  cases: SELECT * FROM diff_slow")
            if rio:
                self.fail(f"{fn}: rows",
                          f"rows of {IMPL} (case, row) that {REF} does not return for the same arguments "
                          f"without a limit ({nf} rows in all):\n" + "\n".join(f"  {x}" for x in rio)
                          + "\n  cases: SELECT * FROM diff_slow")
            if bad:
                self.fail(f"{fn}: order", f"rows not in descending duration (case, position, duration, "
                          f"previous): {bad}")
        self.guarded(fn, run)

    def zero_rows(self, name, template):
        """Both sides must return no rows."""
        def run():
            bad = []
            for schema in (IMPL, REF):
                q = template.format(s=schema)
                rows = self.conn.execute(q).fetchall()
                if rows:
                    bad.append(f"{schema} returned {len(rows)} rows, expected none: "
                               + "; ".join(str(r) for r in rows[:SAMPLE_ROWS]) + f"\n  query: {' '.join(q.split())}")
            if bad:
                self.fail(name, "\n".join(bad))
        self.guarded(name, run)

    def check_tracking(self, when):
        def run():
            rows = self.conn.execute("SELECT * FROM tasker_core.check_tracking()").fetchall()
            if rows:
                self.fail(f"check_tracking {when}",
                          f"{len(rows)} disagreements between maintained and recomputed state, e.g.\n"
                          + "\n".join(f"  {r}" for r in rows[:10]))
        self.guarded(f"check_tracking {when}", run)


ARG_TABLES = """
CREATE TEMP TABLE diff_filters (case_id int, task_id bigint, step_ids bigint[]) ON COMMIT DROP;
CREATE TEMP TABLE diff_arrays (case_id int, ids bigint[]) ON COMMIT DROP;
CREATE TEMP TABLE diff_unknown (id bigint) ON COMMIT DROP;
CREATE TEMP TABLE diff_batch_tasks (task_id bigint) ON COMMIT DROP;
CREATE TEMP TABLE diff_since (case_id int, since timestamptz) ON COMMIT DROP;
CREATE TEMP TABLE diff_slow (case_id int, style text, since timestamptz, lim int, ns text, tn text, ver text) ON COMMIT DROP;
"""

SINCE_EXPRS = ("NULL", "now() - interval '30 minutes'", "now() - interval '1 hour'", "now() - interval '6 hours'",
               "now() - interval '24 hours'", "now() - interval '3 days'", "now() + interval '1 hour'",
               "'2000-01-01 00:00:00+00'", "(now()::timestamp - interval '6 hours')::timestamptz")

READINESS_ALL = ("SELECT t.task_id AS k, r::text AS v FROM tasker_tasks t "
                 "CROSS JOIN LATERAL {s}.get_step_readiness_status(t.task_id) r")
CONTEXT_ALL = ("SELECT x.id AS k, r::text AS v FROM (SELECT task_id FROM tasker_tasks) x(id) "
               "CROSS JOIN LATERAL {s}.get_task_execution_context(x.id) r")


# slowest_*: 12 result columns each; where duration_seconds is among them.
SLOWEST = {"get_slowest_steps_v01": 7, "get_slowest_tasks_v01": 5}


def slow_calls(fn, schema):
    """Every slowest_* call of diff_slow, in the call style the row names: (case, row text,
    duration, position in the result)."""
    cols = ", ".join(f"c{i}" for i in range(1, 13))
    row = f"ROW({', '.join(f'r.c{i}' for i in range(1, 13))})::text"
    dur = f"r.c{SLOWEST[fn]}"
    styles = (("positional", "a.since, a.lim, a.ns, a.tn, a.ver"), ("noargs", ""), ("since", "a.since"),
              ("named", "version_filter => a.ver, limit_count => a.lim, since_timestamp => a.since"))
    return " UNION ALL ".join(
        f"SELECT a.case_id AS k, {row} AS v, {dur} AS d, r.ord FROM diff_slow a CROSS JOIN LATERAL "
        f"{schema}.{fn}({args}) WITH ORDINALITY r({cols}, ord) WHERE a.style = '{style}'"
        for style, args in styles)


def fill_args(conn, rng, batch_task_ids, all_task_ids, steps_by_task, other_step_ids):
    """The argument tables for this batch's calls."""
    conn.execute(ARG_TABLES)
    huge = wf.HUGE_ID
    # step_ids filters
    filters = []
    sample = rng.sample(batch_task_ids, min(len(batch_task_ids), 60))
    for tid in sample:
        own = steps_by_task.get(tid, [])
        kinds = ["null", "empty", "subset", "all", "unknown", "others", "nulls", "dupes", "only_null", "mixed"]
        for kind in rng.sample(kinds, 4):
            if kind == "null":
                ids = None
            elif kind == "empty":
                ids = []
            elif kind == "subset":
                ids = rng.sample(own, rng.randint(0, len(own))) if own else []
            elif kind == "all":
                ids = list(own)
            elif kind == "unknown":
                ids = [-1, 0, huge] + own[:1]
            elif kind == "others":
                ids = rng.sample(other_step_ids, min(5, len(other_step_ids)))
            elif kind == "nulls":
                ids = own[:2] + [None] + own[2:3]
            elif kind == "dupes":
                ids = own + own[: rng.randint(1, 3)] if own else [1, 1]
            elif kind == "only_null":
                ids = [None]
            else:
                ids = own[:3] + rng.sample(other_step_ids, min(2, len(other_step_ids))) + [None, -7] + own[:1]
            if ids:
                rng.shuffle(ids)
            filters.append((len(filters), tid, ids))
    filters.append((len(filters), -1, other_step_ids[:5]))       # real steps, unknown task
    filters.append((len(filters), 0, None))
    conn.cursor().executemany("INSERT INTO diff_filters VALUES (%s, %s, %s::bigint[])", filters)

    # task id arrays for the batch functions
    arrays = [[], list(all_task_ids), [None], [-1, 0, huge]]
    for _ in range(40):
        k = rng.randint(1, 30)
        ids = rng.sample(all_task_ids, min(k, len(all_task_ids)))
        x = rng.random()
        if x < 0.3 and ids:
            ids += rng.sample(ids, rng.randint(1, len(ids)))            # duplicates
        if rng.random() < 0.3:
            ids += rng.sample([-1, 0, huge, 10**12], rng.randint(1, 2))   # unknown ids
        if rng.random() < 0.3:
            ids += [None] * rng.randint(1, 2)                           # NULL elements
        rng.shuffle(ids)
        arrays.append(ids)
    conn.cursor().executemany("INSERT INTO diff_arrays VALUES (%s, %s::bigint[])", list(enumerate(arrays)))
    conn.execute("INSERT INTO diff_unknown VALUES (-1), (0), (%s), (NULL)", (huge,))
    conn.execute("INSERT INTO diff_batch_tasks SELECT unnest(%s::bigint[])", (batch_task_ids,))

    conn.execute("INSERT INTO diff_since VALUES " + ", ".join(f"({i}, {e})" for i, e in enumerate(SINCE_EXPRS)))

    # slowest_* cases: every combination of which filters are given (values drawn from names
    # that exist, that match nothing, and ''), several windows and limits, and the default /
    # named-argument call styles.
    rows = []
    since_pool = [0, 1, 3, 3, 4, 5, 6, 8]
    for mask in range(8):
        for _ in range(2):
            ns = rng.choice(wf.NAMESPACE_FILTERS[1:]) if mask & 1 else None
            tn = rng.choice(wf.TASK_NAME_FILTERS[1:]) if mask & 2 else None
            ver = rng.choice(wf.VERSION_FILTERS[1:]) if mask & 4 else None
            lim = rng.choice((0, 1, 2, 3, 5, 10, 25, BIG_LIMIT, None))
            rows.append(("positional", rng.choice(since_pool), lim, ns, tn, ver))
    rows.append(("noargs", 0, 10, None, None, None))
    rows.append(("since", rng.choice(since_pool), 10, None, None, None))
    rows.append(("named", rng.choice(since_pool), rng.choice((3, BIG_LIMIT)), None, None, rng.choice(wf.VERSION_FILTERS)))
    for si in range(len(SINCE_EXPRS)):       # every window, untruncated and unfiltered
        rows.append(("positional", si, BIG_LIMIT, None, None, None))
    for i, (style, si, lim, ns, tn, ver) in enumerate(rows):
        conn.execute(f"INSERT INTO diff_slow VALUES (%s, %s, {SINCE_EXPRS[si]}, %s, %s, %s, %s)",
                     (i, style, lim, ns, tn, ver))


def compare_all(ck, conn):
    """Every comparison of the ten functions, over whatever the tables hold."""
    # 1. readiness for every task (default step_ids), and with step_ids filters
    ck.diff("get_step_readiness_status: every task", READINESS_ALL)
    ck.diff("get_step_readiness_status: step_ids filters",
            "SELECT f.case_id, f.task_id, r::text FROM diff_filters f "
            "CROSS JOIN LATERAL {s}.get_step_readiness_status(f.task_id, f.step_ids) r")
    # 2. batch readiness over subsets (duplicates, unknown ids, NULL elements, empty, all)
    ck.diff("get_step_readiness_status_batch: id arrays",
            "SELECT a.case_id, r::text FROM diff_arrays a "
            "CROSS JOIN LATERAL {s}.get_step_readiness_status_batch(a.ids) r")
    # 3. execution context of every task (empty tasks included)
    ck.diff("get_task_execution_context: every task", CONTEXT_ALL)
    # 4. batch contexts, order included (ordered by task_id)
    ck.diff("get_task_execution_contexts_batch: id arrays (with order)",
            "SELECT a.case_id, r::text FROM diff_arrays a "
            "CROSS JOIN LATERAL {s}.get_task_execution_contexts_batch(a.ids) WITH ORDINALITY r")
    # 5. dependency levels of every task, order included
    ck.diff("calculate_dependency_levels: every task (with order)",
            "SELECT t.task_id, r::text FROM tasker_tasks t "
            "CROSS JOIN LATERAL {s}.calculate_dependency_levels(t.task_id) WITH ORDINALITY r")
    # 10. DAG relationships: every task of the batch against the reference (which costs a few
    # ms a call), and every task against the view itself, which the spec defines them by (one
    # walk of the whole graph)
    ck.diff("step_dag_relationships: every task of the batch",
            "SELECT t.task_id, r::text FROM diff_batch_tasks t "
            "CROSS JOIN LATERAL {s}.step_dag_relationships(t.task_id) r")
    ck.diff("step_dag_relationships: every task against the view tasker_step_dag_relationships",
            "SELECT t.task_id, r::text FROM tasker_tasks t CROSS JOIN LATERAL {s}.step_dag_relationships(t.task_id) r",
            oracle=("the view", "SELECT v.task_id, v::text FROM tasker_step_dag_relationships v"))
    # unknown and NULL task ids: no rows
    for fn in ("get_step_readiness_status", "get_task_execution_context", "calculate_dependency_levels",
               "step_dag_relationships"):
        ck.zero_rows(f"{fn}: unknown task ids (-1, 0, max bigint)",
                     f"SELECT u.id, r::text FROM diff_unknown u CROSS JOIN LATERAL {{s}}.{fn}(u.id) r "
                     f"WHERE u.id IS NOT NULL")
        ck.zero_rows(f"{fn}: NULL task id", f"SELECT r::text FROM {{s}}.{fn}(NULL) r")
    ck.zero_rows("get_step_readiness_status_batch: NULL array",
                 "SELECT r::text FROM {s}.get_step_readiness_status_batch(NULL) r")
    ck.zero_rows("get_task_execution_contexts_batch: NULL array",
                 "SELECT r::text FROM {s}.get_task_execution_contexts_batch(NULL) r")
    # 6. health counts
    ck.diff("get_system_health_counts_v01", "SELECT r::text FROM {s}.get_system_health_counts_v01() r")
    # 7. analytics, default argument and several windows
    ck.diff("get_analytics_metrics_v01",
            "SELECT a.case_id, r::text FROM diff_since a CROSS JOIN LATERAL {s}.get_analytics_metrics_v01(a.since) r "
            "UNION ALL SELECT -1, r::text FROM {s}.get_analytics_metrics_v01() r")
    # 8, 9. slowest steps / tasks. Ties in duration may legitimately be cut differently by a
    # LIMIT, so: the durations returned must be the same multiset, every row tasker_core returns
    # must be a row of the reference's untruncated answer, and tasker_core's rows must come in
    # descending duration. (With a limit above the candidate count this is exact equality.)
    for fn in SLOWEST:
        ck.slowest(fn)


def check_boundaries(ck, conn, now, cases):
    """The boundary steps against the spec itself (both implementations): ready exactly when
    every applicable backoff has expired (until <= now()), next_retry_at = the explicit until,
    else the failure until."""
    ids = [c.step_id for c in cases]
    for schema in (IMPL, REF):
        def run(schema=schema):
            got = {row[0]: row[1:] for row in conn.execute(
                f"SELECT workflow_step_id, ready_for_execution, next_retry_at FROM "
                f"{schema}.get_step_readiness_status_batch(ARRAY(SELECT DISTINCT task_id FROM "
                f"tasker_workflow_steps WHERE workflow_step_id = ANY(%s)))", (ids,)).fetchall()}
            bad = []
            for c in cases:
                want = c.expected(now)
                if got.get(c.step_id) != want:
                    bad.append(f"step {c.step_id} ({c.kind} backoff; explicit: offset {c.explicit_offset}, "
                               f"backoff_request_seconds {c.backoff_seconds}; failure: offset {c.failure_offset} "
                               f"via {c.failure_via}; attempts {c.attempts}, retry_limit {c.retry_limit}): "
                               f"expected (ready, next_retry_at) = {want}, got {got.get(c.step_id)}")
            if bad:
                ck.fail(f"backoff boundaries ({schema})",
                        f"now()::timestamp = {now}\n" + "\n".join("  " + b for b in bad[:10]))
        ck.guarded(f"backoff boundaries ({schema})", run)
    for c in cases:
        if c.expected(now)[0]:
            STATS["boundary_ready"] += 1
        else:
            STATS["boundary_not_ready"] += 1


def set_timezone(conn, tz):
    conn.execute(sql.SQL("SET TIME ZONE {}").format(sql.Literal(tz)))
    conn.execute("SET statement_timeout = '120s'")


def note_time(key, t0):
    STATS["seconds"][key] = STATS["seconds"].get(key, 0.0) + time.monotonic() - t0


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------

def test_signatures(env):
    """The ten functions exist in both schemas with the same arguments (names, types, number
    of defaults) and the same result columns."""
    q = """SELECT n.nspname, p.proname, pg_get_function_identity_arguments(p.oid), p.pronargdefaults,
                  pg_get_function_result(p.oid), p.proretset
           FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
           WHERE n.nspname = ANY(%s) AND p.proname = ANY(%s)"""
    rows = env.db.execute(q, ([IMPL, REF], list(FUNCTIONS)))
    sigs = {}
    for nsp, name, args, ndef, result, retset in rows:
        sigs.setdefault((nsp, name), []).append((args, ndef, result, retset))
    problems = []
    for fn in FUNCTIONS:
        impl, ref = sigs.get((IMPL, fn)), sigs.get((REF, fn))
        if not impl:
            problems.append(f"{IMPL}.{fn} does not exist")
        if not ref:
            problems.append(f"{REF}.{fn} does not exist")
        if impl and ref and sorted(impl) != sorted(ref):
            problems.append(f"{fn}: {IMPL} {impl} != {REF} {ref}")
    assert not problems, f"{seed_note()} signature differences:\n" + "\n".join(problems)


def run_batch(env, batch, conn, ck):
    """One batch: generate, write, mutate, set boundaries, compare; commit or roll back; then
    check the maintained state again. Returns the generated tasks."""
    rng = random.Random(batch.seed)
    with conn.transaction() as tx:
        now = conn.execute("SELECT now()::timestamp").fetchone()[0]
        gen = wf.Generator(rng, env.catalog, now, env.durations)

        # generate and write (two halves, each with its own write style)
        t0 = time.monotonic()
        tasks = [gen.make_task() for _ in range(batch.small)]
        tasks += [gen.make_task(big=True) for _ in range(batch.big)]
        tasks += gen.window_tasks()
        rng.shuffle(tasks)
        btasks, cases = gen.boundary_tasks(batch.boundary)
        tasks += btasks
        wf.assign_ids(conn, tasks)
        prior = [r[0] for r in conn.execute(
            "SELECT workflow_step_id FROM tasker_workflow_steps ORDER BY 1 DESC LIMIT 500").fetchall()]
        wf.add_cross_task_edges(rng, tasks, prior)
        half = len(tasks) // 2
        wf.write_tasks(conn, rng, tasks[:half], rng.choice(wf.WRITE_MODES))
        wf.write_tasks(conn, rng, tasks[half:], rng.choice(wf.WRITE_MODES))
        note_time("write", t0)
        ck.check_tracking("after inserts")

        # mutate this batch's rows and committed ones, then set the boundary values
        t0 = time.monotonic()
        log = wf.Mutator(conn, rng, now, env.durations, [t.id for t in btasks], env.catalog).run(scale=50)
        for k, v in log.items():
            STATS["mutations"][k] = STATS["mutations"].get(k, 0) + v
        wf.apply_boundaries(conn, rng, btasks, cases)
        note_time("mutate", t0)
        ck.check_tracking("after updates and deletes")

        # compare (fresh planner statistics first, as autovacuum would have them: the
        # reference's recursive walks are very slow on plans made for empty tables)
        t0 = time.monotonic()
        conn.execute("ANALYZE tasker_tasks, tasker_workflow_steps, tasker_workflow_step_edges, "
                     "tasker_workflow_step_transitions, tasker_task_transitions")
        all_task_ids = [r[0] for r in conn.execute("SELECT task_id FROM tasker_tasks ORDER BY 1").fetchall()]
        steps_by_task = {}
        for sid, tid in conn.execute("SELECT workflow_step_id, task_id FROM tasker_workflow_steps ORDER BY 1"):
            steps_by_task.setdefault(tid, []).append(sid)
        existing = set(all_task_ids)
        batch_ids = [t.id for t in tasks if t.id in existing]
        other_steps = [s for tid in rng.sample(all_task_ids, min(20, len(all_task_ids)))
                       for s in steps_by_task.get(tid, [])]
        fill_args(conn, rng, batch_ids, all_task_ids, steps_by_task, other_steps or [1])
        check_boundaries(ck, conn, now, cases)
        compare_all(ck, conn)
        note_time("compare", t0)
        if not batch.commit:
            raise psycopg.Rollback(tx)

    # after COMMIT / ROLLBACK the maintained state must match the tables again
    t0 = time.monotonic()
    after = "after commit" if batch.commit else "after rollback"
    with conn.transaction():
        ck.check_tracking(after)
        ck.diff(f"get_step_readiness_status: every task, {after}", READINESS_ALL)
    note_time("after", t0)
    return tasks


@pytest.mark.parametrize("batch", PLAN, ids=[f"seed{BASE_SEED}-b{b.index}-{b.tz.split('/')[-1]}" for b in PLAN])
def test_batch(env, batch):
    t_start = time.monotonic()
    with env.db.connect() as conn:
        set_timezone(conn, batch.tz)
        ck = Checker(conn, batch.label)
        try:
            tasks = run_batch(env, batch, conn, ck)
        except Exception as e:       # a write the triggers refused, a harness error, ...
            raise AssertionError(f"{seed_note()} {batch.label}: the batch stopped with "
                                 f"{type(e).__name__}: {e}\n" + "\n".join(ck.failures)) from e
    STATS["workflows"] += len(tasks)
    for t in tasks:
        STATS["shapes"][t.shape] = STATS["shapes"].get(t.shape, 0) + 1
        STATS["steps"] += len(t.steps)
    STATS["batches"] += 1
    note_time("batches", t_start)
    assert not ck.failures, (f"{seed_note()} {batch.label}: {len(ck.failures)} check(s) failed "
                             f"(replay: TASKER_DIFF_SEED={BASE_SEED})\n" + "\n".join(ck.failures))


def test_cycles(env):
    """Edges forming a cycle. Every function but calculate_dependency_levels must agree (the
    DAG view's walk is capped, readiness does not walk); calculate_dependency_levels must agree
    where no cycle is reachable from a root, and both must raise TK006 where one is (Rails'
    recursive CTE would never terminate there)."""
    seed = BASE_SEED * 1000 + 999
    rng = random.Random(seed)
    label = f"seed={BASE_SEED} cycles"
    with env.db.connect() as conn:
        set_timezone(conn, "UTC")
        ck = Checker(conn, label)
        with conn.transaction() as tx:
            now = conn.execute("SELECT now()::timestamp").fetchone()[0]
            gen = wf.Generator(rng, env.catalog, now, env.durations)
            pairs = wf.cycle_tasks(gen)
            tasks = [t for t, _ in pairs]
            wf.assign_ids(conn, tasks)
            wf.write_tasks(conn, rng, tasks, "rows")
            wf.write_back_edges(conn, tasks)
            ck.check_tracking("with cycles")
            ids = [t.id for t in tasks]
            id_list = ", ".join(str(i) for i in ids)
            ck.diff("get_step_readiness_status: cycle tasks",
                    f"SELECT t.id, r::text FROM unnest(ARRAY[{id_list}]::bigint[]) t(id) "
                    "CROSS JOIN LATERAL {s}.get_step_readiness_status(t.id) r")
            ck.diff("get_task_execution_context: cycle tasks",
                    f"SELECT t.id, r::text FROM unnest(ARRAY[{id_list}]::bigint[]) t(id) "
                    "CROSS JOIN LATERAL {s}.get_task_execution_context(t.id) r")
            ck.diff("step_dag_relationships: cycle tasks",
                    f"SELECT t.id, r::text FROM unnest(ARRAY[{id_list}]::bigint[]) t(id) "
                    "CROSS JOIN LATERAL {s}.step_dag_relationships(t.id) r")
            ck.diff("health, analytics, slowest with cycles present",
                    "SELECT 1, r::text FROM {s}.get_system_health_counts_v01() r UNION ALL "
                    "SELECT 2, r::text FROM {s}.get_analytics_metrics_v01(now() - interval '3 days') r UNION ALL "
                    f"SELECT 3, r::text FROM {{s}}.get_slowest_tasks_v01(now() - interval '3 days', {BIG_LIMIT}) r")
            unreachable = ", ".join(str(t.id) for t, reach in pairs if not reach)
            ck.diff("calculate_dependency_levels: cycles no root reaches",
                    f"SELECT t.id, r::text FROM unnest(ARRAY[{unreachable}]::bigint[]) t(id) "
                    "CROSS JOIN LATERAL {s}.calculate_dependency_levels(t.id) WITH ORDINALITY r")
            for t, reach in pairs:
                if not reach:
                    continue
                for schema in (IMPL, REF):
                    def raises(t=t, schema=schema):
                        try:
                            with conn.transaction():
                                conn.execute("SET LOCAL statement_timeout = '10s'")
                                rows = conn.execute(
                                    f"SELECT * FROM {schema}.calculate_dependency_levels(%s)", (t.id,)).fetchall()
                            ck.fail(f"calculate_dependency_levels: reachable cycle ({schema})",
                                    f"task {t.id} ({t.shape}): expected SQLSTATE TK006, got {len(rows)} rows")
                        except psycopg.Error as e:
                            if e.sqlstate != "TK006":
                                ck.fail(f"calculate_dependency_levels: reachable cycle ({schema})",
                                        f"task {t.id}: expected SQLSTATE TK006, got {e.sqlstate}: {str(e).strip()}")
                    ck.guarded(f"calculate_dependency_levels: reachable cycle ({schema})", raises)
            raise psycopg.Rollback(tx)
    assert not ck.failures, f"{seed_note()} {label}:\n" + "\n".join(ck.failures)


def test_truncate(env):
    """TRUNCATE (as test suites and admins do) keeps the maintained state right: transitions
    only, then edges, then everything; rolled back afterwards."""
    label = f"seed={BASE_SEED} truncate"
    with env.db.connect() as conn:
        set_timezone(conn, "America/New_York")
        ck = Checker(conn, label)
        with conn.transaction() as tx:
            conn.execute("TRUNCATE tasker_workflow_step_transitions")
            ck.check_tracking("after TRUNCATE of step transitions")
            ck.diff("get_step_readiness_status: every task, step transitions truncated", READINESS_ALL)
            conn.execute("TRUNCATE tasker_workflow_step_edges")
            ck.check_tracking("after TRUNCATE of edges")
            ck.diff("get_step_readiness_status: every task, edges truncated", READINESS_ALL)
            ck.diff("get_task_execution_context: every task, edges truncated", CONTEXT_ALL)
            conn.execute("TRUNCATE tasker_workflow_steps, tasker_task_transitions, tasker_tasks CASCADE")
            ck.check_tracking("after TRUNCATE of everything")
            ck.diff("get_system_health_counts_v01: empty tables",
                    "SELECT r::text FROM {s}.get_system_health_counts_v01() r")
            ck.diff("get_analytics_metrics_v01: empty tables",
                    "SELECT r::text FROM {s}.get_analytics_metrics_v01() r")
            raise psycopg.Rollback(tx)
        with conn.transaction():
            ck.check_tracking("after the TRUNCATEs were rolled back")
    assert not ck.failures, f"{seed_note()} {label}:\n" + "\n".join(ck.failures)


def test_summary(request):
    """How much was generated and compared (printed); at least 2,000 workflows when every
    batch ran."""
    s = STATS
    announce(request.config,
             f"test_differential {seed_note()}: {s['workflows']} workflows, {s['steps']} steps in "
             f"{s['batches']} batches; {s['checks']} checks over {s['rows_compared']} rows; boundary steps "
             f"ready/not ready {s['boundary_ready']}/{s['boundary_not_ready']}; shapes {s['shapes']}; "
             f"mutations {s['mutations']}; seconds {({k: round(v, 1) for k, v in s['seconds'].items()})}; "
             f"per check {({k: round(v, 1) for k, v in sorted(s['check_seconds'].items(), key=lambda x: -x[1])})}")
    if s["batches"] == len(PLAN):
        assert s["workflows"] >= 2000, f"{seed_note()} only {s['workflows']} workflows generated"
        assert s["boundary_ready"] > 0 and s["boundary_not_ready"] > 0, f"{seed_note()} boundary cases one-sided"
