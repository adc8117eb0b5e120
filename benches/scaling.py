"""How claims scale with the number of workers on one PostgreSQL: steps per second (each a
claim_steps and a complete_step transaction, from pgbench clients; and the loop of the clients
since 0.6.0, one report_and_claim transaction per step) as workers grow from 1 to 64, against the floor measured in the same run with the same number of clients (pgbench -N
transactions per second / 2). The figures behind docs/scaling.md.

Run by `make bench`. Prints ratios, never asserts.
"""
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker import SCRIPTS, WORKER_SCRIPT, connect, pgbench, settle, setup  # noqa: E402

DB = "tasker_bench_worker"
SECONDS = int(os.environ.get("TASKER_BENCH_SCALING_SECONDS", "4"))
COUNTS = [1, 2, 4, 8, 16, 32, 64]


def processed():
    with connect(DB) as conn:
        return conn.execute("SELECT count(*) FROM tasker_workflow_steps WHERE processed").fetchone()[0]


def main():
    setup(int(os.environ.get("TASKER_BENCH_SCALING_TASKS", "30000")))
    import subprocess
    subprocess.run(["pgbench", "-i", "-q", "-s", "8", DB], capture_output=True, check=True)
    settle()
    scripts = {}
    for notify in ("on", "off"):
        with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
            f.write(f"SET tasker_core.notify = {notify};\n" + WORKER_SCRIPT)
            scripts[notify] = f.name
        os.chmod(f.name, 0o644)
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(SCRIPTS["combined"])
        scripts["combined"] = f.name
    os.chmod(f.name, 0o644)
    print(f"\n**scaling: steps per second as workers grow** ({os.cpu_count()} cores, {SECONDS} s each)\n")
    print("| workers | floor steps/s (pgbench -N ÷ 2) | steps/s, notify off | vs 1 worker | of floor "
          "| steps/s, notify on | of floor | on ÷ off | report_and_claim, notify on | of floor |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    seen = {"on": {}, "combined": {}}
    base = None
    for n in COUNTS:
        jobs = str(min(n, 2))
        rates = {}
        for notify, script in scripts.items():
            before = processed()
            start = time.time()
            pgbench(["-n", "-c", str(n), "-j", jobs, "-T", str(SECONDS), "-D", "held=[]", "-f", script], DB)
            rates[notify] = (processed() - before) / (time.time() - start)
        floor, _ = pgbench(["-n", "-N", "-c", str(n), "-j", jobs, "-T", str(SECONDS)], DB)
        floor /= 2
        base = base or rates["off"]
        print(f"| {n} | {floor:,.0f} | {rates['off']:,.0f} | {rates['off'] / base:.2f}× | "
              f"**{rates['off'] / floor:.2f}** | {rates['on']:,.0f} | {rates['on'] / floor:.2f} | "
              f"{rates['on'] / rates['off']:.2f} | {rates['combined']:,.0f} | "
              f"{rates['combined'] / floor:.2f} |", flush=True)
        for loop in seen:
            seen[loop][n] = rates[loop]
    for loop, label in (("on", "claim_steps + complete_step"), ("combined", "report_and_claim")):
        best = max(seen[loop], key=seen[loop].get)
        print(f"\n{label}, wake-ups on: 64 workers reach **{seen[loop][64] / seen[loop][best]:.2f}** "
              f"of the best count ({seen[loop][best]:,.0f} steps/s at {best})", end="")
    print()
    for script in scripts.values():
        os.unlink(script)


if __name__ == "__main__":
    main()
