"""Template registration and create_task do work linear in the number of steps (issue 11,
item 8), measured without timing: the tuples PostgreSQL reads from the Tasker tables and
tasker_core.step_state during one call, from the cumulative statistics (seq_tup_read +
idx_tup_fetch of pg_stat_user_tables).

A chain, a fan-out (one root, every other step its child) and a fan-in (every step a parent of
the last) of 500 and of 2,000 steps are registered and created with tracking on, each shape in
its own database. Four times the steps must read at most about four times the tuples (the
bound is 6×). The statements of 0.3.0 looked the template's named steps up per step through
the index on their dependent system alone, reading the system's named steps up to the match:
about 16× (registration's prune and create_task's step insert). A control lookup that does
the same shows the meter sees that ~16×.

What the counters cannot see: work that reads no table tuple (CTE and function scans
rescanned in nested loops, hash and sort work, array rebuilding in a trigger, row versions an
index scan walks and skips as invisible) only shows in time, which tests do not assert;
`make bench` prints those figures. 0.3.0's per-edge tracking trigger and the CTE nested loops
of its create statement were quadratic that way.
"""
import pytest
from psycopg.types.json import Jsonb

SIZES = (500, 2000)
SHAPES = ("chain", "fan_out", "fan_in")
# linear work reads 4× the tuples for 4× the steps, quadratic work 16×
MAX_GROWTH = 6.0

# the tables the calls read: the Tasker tables of the data schema and the tracking rows
TABLES = """(schemaname = 'public' AND relname LIKE 'tasker\\_%')
            OR (schemaname = 'tasker_core' AND relname = 'step_state')"""


def template(shape, n):
    """A template of n steps; names and the dependent system are its own, so that no other
    template's named steps are read by lookups of this one's (whatever the access path)."""
    tag = f"{shape}_{n}"
    steps = []
    for i in range(1, n + 1):
        s = {"name": f"{tag}_s{i}", "handler_class": "H"}
        if shape == "chain" and i > 1:
            s["depends_on_step"] = f"{tag}_s{i - 1}"
        elif shape == "fan_out" and i > 1:
            s["depends_on_step"] = f"{tag}_s1"
        elif shape == "fan_in" and i == n:
            s["depends_on_steps"] = [f"{tag}_s{j}" for j in range(1, n)]
        steps.append(s)
    return {"name": tag, "namespace_name": "linear", "version": "1.0.0",
            "default_dependent_system": f"sys_{tag}", "step_templates": steps}


class Meter:
    """Tuples read from the measured tables by the calls of one working session. The session
    flushes its pending statistics (pg_stat_force_next_flush: they are written when it goes
    idle, before the client gets its answer); a second session reads the view from a fresh
    snapshot (pg_stat_clear_snapshot)."""

    def __init__(self, work, reader):
        self.work, self.reader = work, reader

    def snapshot(self):
        self.work.execute("SELECT pg_stat_force_next_flush()")
        self.reader.execute("SELECT pg_stat_clear_snapshot()")
        rows = self.reader.execute(
            f"""SELECT schemaname || '.' || relname, COALESCE(seq_tup_read, 0), COALESCE(idx_tup_fetch, 0)
                FROM pg_stat_user_tables WHERE {TABLES}""").fetchall()
        return {name: (seq, idx) for name, seq, idx in rows}

    def reads(self, sql, params=None):
        """(total tuples read, per table {name: (seq, idx)}, first value of the answer) of one
        statement of the working session."""
        before = self.snapshot()
        result = self.work.execute(sql, params).fetchone()[0]
        after = self.snapshot()
        per_table = {t: (after[t][0] - before.get(t, (0, 0))[0], after[t][1] - before.get(t, (0, 0))[1])
                     for t in after}
        per_table = {t: d for t, d in per_table.items() if d != (0, 0)}
        return sum(s + i for s, i in per_table.values()), per_table, result


@pytest.mark.parametrize("shape", SHAPES)
def test_registration_and_creation_read_tuples_linear_in_the_steps(tasker_db, shape):
    # a database per shape: create_task's statements may scan tables whose size includes the
    # other templates of the database; here they hold only this shape's, smaller one first
    with tasker_db.connect() as work, tasker_db.connect() as reader:
        work.execute("SELECT tasker_core.enable_tracking()")
        # no autovacuum or autoanalyze: nothing else reads these tables, and no new statistics
        # change the kept plans between the sizes
        for (table,) in work.execute(
                f"SELECT format('%I.%I', schemaname, relname) FROM pg_stat_user_tables WHERE {TABLES}").fetchall():
            work.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = off)")
        meter = Meter(work, reader)

        seen = {}
        for n in SIZES:
            t = template(shape, n)
            reg, reg_tables, _ = meter.reads("SELECT tasker_core.register_task_template(%s)", (Jsonb(t),))
            create, create_tables, task_id = meter.reads(
                "SELECT tasker_core.create_task('linear', %s, NULL, '{}')", (t["name"],))
            # the calls did their whole work (a cheap no-op would be linear too)...
            assert work.execute(
                """SELECT count(*) FROM tasker_named_tasks_named_steps x
                   JOIN tasker_named_tasks nt USING (named_task_id) WHERE nt.name = %s""",
                (t["name"],)).fetchone()[0] == n
            assert work.execute("SELECT count(*) FROM tasker_workflow_steps WHERE task_id = %s",
                                (task_id,)).fetchone()[0] == n
            assert work.execute(
                """SELECT count(*) FROM tasker_workflow_step_edges e
                   JOIN tasker_workflow_steps s ON s.workflow_step_id = e.to_step_id
                   WHERE s.task_id = %s""", (task_id,)).fetchone()[0] == n - 1
            # ...and the counters moved with it: every step's row is checked or read at least once
            assert reg >= n, f"{shape} {n}: registration read {reg} tuples: {reg_tables}"
            assert create >= n, f"{shape} {n}: create_task read {create} tuples: {create_tables}"
            seen[n] = (reg, reg_tables, create, create_tables)

        # Control: the access path of 0.3.0's statements — the template's named steps looked up
        # per step by their dependent system alone — read through the same meter.
        control = {}
        for n in SIZES:
            names = [f"{shape}_{n}_s{i}" for i in range(1, n + 1)]
            control[n], control_tables, _ = meter.reads(
                """SELECT count(x.named_step_id) FROM unnest(%s::text[]) AS s(name)
                   CROSS JOIN LATERAL (
                       SELECT ns.named_step_id FROM tasker_named_steps ns
                       JOIN tasker_dependent_systems ds USING (dependent_system_id)
                       WHERE ds.name = %s AND ns.name || '' = s.name LIMIT 1) x""",
                (names, f"sys_{shape}_{n}"))
            assert control[n] >= n * n // 2, f"the control read {control[n]} tuples: {control_tables}"

    small, big = SIZES
    print(f"\n{shape}, tuples read for {small} -> {big} steps: "
          f"register {seen[small][0]} -> {seen[big][0]} ({seen[big][0] / seen[small][0]:.2f}x), "
          f"create_task {seen[small][2]} -> {seen[big][2]} ({seen[big][2] / seen[small][2]:.2f}x), "
          f"control {control[small]} -> {control[big]} ({control[big] / control[small]:.2f}x)")
    assert control[big] / control[small] > 12, f"the meter does not see quadratic reads: {control}"
    for what, index in (("register_task_template", 0), ("create_task", 2)):
        a, b = seen[small][index], seen[big][index]
        assert b <= MAX_GROWTH * a, (
            f"{shape}: {what} read {a} tuples for {small} steps and {b} for {big} ({b / a:.1f}x, "
            f"linear is {big / small:.0f}x): {seen[small][index + 1]} -> {seen[big][index + 1]}")
