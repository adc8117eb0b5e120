"""How template registration and task creation scale with the number of steps: a chain, a
fan-out (one root, every other step its child) and a fan-in (every step but one a parent of
the last) of 1,250 to 10,000 steps, with tracking on; milliseconds per call and per step. Linear
means the time per step stays flat as the template grows (the last column: the time per step
against the smallest size's).

Run by `make bench`; prints, never asserts.
"""
import os
import statistics
import time

import psycopg

DB = "tasker_bench_creation"
SIZES = [int(s) for s in os.environ.get("TASKER_BENCH_CREATION_SIZES", "1250,2500,5000,10000").split(",")]
RUNS = int(os.environ.get("TASKER_BENCH_CREATION_RUNS", "3"))


def template(shape, n):
    steps = []
    for i in range(1, n + 1):
        s = {"name": f"s{i}", "handler_class": "H"}
        if shape == "chain" and i > 1:
            s["depends_on_step"] = f"s{i - 1}"
        elif shape == "fan_out" and i > 1:
            s["depends_on_step"] = "s1"
        elif shape == "fan_in" and i == n:
            s["depends_on_steps"] = [f"s{j}" for j in range(1, n)]
        steps.append(s)
    return {"name": f"{shape}_{n}", "namespace_name": "creation", "version": "1.0.0", "step_templates": steps}


def timed(conn, sql, args, runs=RUNS):
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        conn.execute(sql, args)
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def main():
    with psycopg.connect(dbname="postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {DB}")
    import json
    with psycopg.connect(dbname=DB, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION tasker_core")
        conn.execute("SELECT tasker_core.install_schema()")
        conn.execute("SELECT tasker_core.enable_tracking()")
        conn.execute("SET tasker_core.max_template_steps = %s" % max(SIZES))
        conn.execute("SET tasker_core.notify = off")
        print(f"\n**creation: registration and create_task as templates grow** (tracking on, median of {RUNS})\n")
        print("| shape | steps | register ms | µs/step | create_task ms | µs/step | µs/step vs smallest |")
        print("|---|---|---|---|---|---|---|")
        for shape in ("chain", "fan_out", "fan_in"):
            base = None
            for n in SIZES:
                t = json.dumps(template(shape, n))
                # registering again replaces the same template: every run does the same work
                reg = timed(conn, "SELECT tasker_core.register_task_template(%s::jsonb)", (t,))
                create = timed(conn, "SELECT tasker_core.create_task('creation', %s, NULL, '{}')", (f"{shape}_{n}",))
                per = create * 1000 / n
                base = base or per
                print(f"| {shape} | {n:,} | {reg:,.0f} | {reg * 1000 / n:,.0f} | {create:,.0f} | {per:,.0f} | "
                      f"**{per / base:.2f}** |", flush=True)


if __name__ == "__main__":
    main()
