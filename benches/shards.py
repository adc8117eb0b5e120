"""Sharding by task with PL/Proxy (docs/scaling.md): steps per second through the router with
1, 2 and 4 partitions, against the same workload on one plain tasker_core database without a
router (the baseline, so the router's own cost shows).

Every cluster is started by scripts/shards.sh in a directory of its own, durable as users run
it (fsync = on, synchronous_commit = on), partitions with tasker_core preloaded (the notifier
sends wake-ups after commit, the timer runs tick()). The router and all partitions share this
machine's cores: read the figures as the cost of the router and of N PostgreSQL instances on
one machine, not as what N machines would do (docs/scaling.md says what 2 cores can show).

Workers are pgbench clients (CLIENTS of them), each step in two transactions (claim_steps,
then complete_step) or in one (report_and_claim of the step it holds, claiming the next), the
loops of benches/worker.py unchanged: through the router they run against PL/Proxy functions
of the same names. Template: a -> (b, c) -> d. Tasks are created on each partition directly
(setup, not measured).

Run: target/venv/bin/python benches/shards.py   (about 3.5 minutes; `make bench-shards`, and `make bench`)
Prints the table, never asserts.
"""
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from worker import COMBINED_SCRIPT, TEMPLATE, WORKER_SCRIPT  # benches/worker.py (its directory is on the path)

ROOT = Path(os.environ.get("TASKER_ROOT", Path(__file__).resolve().parents[1]))
SHARDS = ROOT / "scripts" / "shards.sh"
SETS = [int(n) for n in os.environ.get("TASKER_BENCH_SHARDS_SETS", "1,2,4").split(",")]
CLIENTS = int(os.environ.get("TASKER_BENCH_SHARDS_CLIENTS", "8"))
SECONDS = int(os.environ.get("TASKER_BENCH_SHARDS_SECONDS", "5"))
REPEATS = int(os.environ.get("TASKER_BENCH_SHARDS_REPEATS", "3"))
TASKS_PER_RUN = int(os.environ.get("TASKER_BENCH_SHARDS_TASKS", "1500"))
PG_OPTS = "-c fsync=on -c synchronous_commit=on -c full_page_writes=on -c autovacuum_naptime=10s"

# the workload and the loops of benches/worker.py (claim + complete; report_and_claim of one)
SCRIPTS = {"claim + complete": WORKER_SCRIPT, "report_and_claim": COMBINED_SCRIPT.format(n=1)}


class Set:
    def __init__(self, n):
        self.n = n
        self.env = dict(os.environ, TASKER_SHARDS_DIR=str(ROOT / "target" / f"bench-shards-{n}"),
                        TASKER_PG_OPTS=PG_OPTS, TASKER_ROUTER_PG_OPTS=PG_OPTS)

    def shards(self, *args):
        p = subprocess.run([str(SHARDS), *args], env=self.env, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit(f"shards.sh {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
        return p.stdout

    def start(self):
        self.shards("clean")
        out = self.shards("start", str(self.n))
        exports = dict(line.split(" ", 1)[1].split("=", 1) for line in out.splitlines()
                       if line.startswith("export TASKER_"))
        self.router = exports["TASKER_ROUTER"].strip("'")
        self.partitions = [exports[f"TASKER_PARTITION_{k}"].strip("'") for k in range(self.n)]

    def processed(self):
        total = 0
        for c in self.partitions:
            with psycopg.connect(c, autocommit=True) as conn:
                total += conn.execute("SELECT count(*) FROM tasker_workflow_steps WHERE processed").fetchone()[0]
        return total


def libpq_env(conninfo):
    kv = dict(item.split("=", 1) for item in conninfo.split())
    return dict(os.environ, PGHOST=kv["host"], PGPORT=kv["port"], PGUSER=kv["user"], PGDATABASE=kv["dbname"])


def pgbench(conninfo, script, seconds):
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    os.chmod(f.name, 0o644)
    try:
        out = subprocess.run(["pgbench", "-n", "-c", str(CLIENTS), "-j", "2", "-T", str(seconds), "-D", "held=[]",
                              "-f", f.name], env=libpq_env(conninfo), capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if not re.search(r"tps = ([0-9.]+)", out.stdout):
        sys.exit(f"pgbench failed:\n{out.stdout}\n{out.stderr}")


def setup(s, tasks):
    """The template through the router (it lands on every partition), then tasks/N tasks created
    on each partition directly, a VACUUM ANALYZE and a checkpoint; waits for the notifiers."""
    with psycopg.connect(s.router, autocommit=True) as r:
        r.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (TEMPLATE,))
    for c in s.partitions:
        with psycopg.connect(c, autocommit=True) as p:
            deadline = time.time() + 20
            while time.time() < deadline:
                mode = p.execute("SELECT detail FROM tasker_core.health() WHERE check_name = 'wakeups'").fetchone()[0]
                if mode.startswith("notifier"):
                    break
                time.sleep(0.2)
            else:
                print(f"(partition {c}: wake-ups not served by the notifier: {mode})")
            p.execute("SET tasker_core.notify = off")   # the setup's own transaction only
            p.execute("SELECT tasker_core.create_task('bench', 'bench_flow', NULL, jsonb_build_object('n', i)) "
                      "FROM generate_series(1, %s) i", (tasks // s.n,))
            p.execute("VACUUM ANALYZE")
            p.execute("CHECKPOINT")


def rate(s, conninfo, script):
    before = s.processed()
    start = time.time()
    pgbench(conninfo, script, SECONDS)
    return (s.processed() - before) / (time.time() - start)


def empty_claim_ms(conninfo, calls=300):
    """Median latency of a claim that finds nothing (a namespace without tasks), one client."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            conn.execute("SELECT * FROM tasker_core.claim_steps('idle', ARRAY['nothing'], 1, 60)").fetchall()
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def fmt(rates):
    """The median, and the range of the repeats."""
    return f"{statistics.median(rates):,.0f} ({min(rates):,.0f}–{max(rates):,.0f})"


def main():
    print(f"\n**sharding with PL/Proxy: steps per second through the router** ({os.cpu_count()} cores, "
          f"{CLIENTS} pgbench workers, median of {REPEATS} runs of {SECONDS} s, fsync = on, "
          f"synchronous_commit = on; router and partitions on this one machine)\n", flush=True)
    results = {}
    for n in SETS:
        s = Set(n)
        s.start()
        try:
            targets = {"router": s.router}
            if n == 1:   # the baseline: the same workload on the partition itself, no router
                targets = {"baseline": s.partitions[0], "router": s.router}
            setup(s, TASKS_PER_RUN * (REPEATS * len(SCRIPTS) * len(targets) + 1))
            pgbench(s.router, SCRIPTS["claim + complete"], 2)   # warm-up: plans, PL/Proxy connections
            rates = {t: {name: [] for name in SCRIPTS} for t in targets}
            for _ in range(REPEATS):   # interleaved, so that drift hits every column alike
                for name, script in SCRIPTS.items():
                    for t, conninfo in targets.items():
                        rates[t][name].append(rate(s, conninfo, script))
            for t, conninfo in targets.items():
                rates[t]["empty claim ms"] = empty_claim_ms(conninfo)
            results[n] = rates["router"]
            if n == 1:
                results["baseline"] = rates["baseline"]
        finally:
            s.shards("clean")
    base = results.get("baseline")
    med = lambda r, k: statistics.median(r[k])  # noqa: E731
    print("| configuration | claim + complete, steps/s | vs baseline | report_and_claim, steps/s | vs baseline "
          "| empty claim, ms |")
    print("|---|---|---|---|---|---|")
    if base:
        print(f"| one database, no router (baseline) | {fmt(base['claim + complete'])} | 1.00× | "
              f"{fmt(base['report_and_claim'])} | 1.00× | {base['empty claim ms']:.2f} |")
    for n in SETS:
        r = results[n]
        vs = lambda k: f"{med(r, k) / med(base, k):.2f}×" if base else "–"  # noqa: E731
        print(f"| router + {n} partition{'s' if n > 1 else ''} | {fmt(r['claim + complete'])} | "
              f"{vs('claim + complete')} | {fmt(r['report_and_claim'])} | {vs('report_and_claim')} | "
              f"{r['empty claim ms']:.2f} |")
    if 1 in results and len(SETS) > 1:
        one = results[1]
        print("\nthrough the router, vs 1 partition: " + "; ".join(
            f"{n} partitions {med(results[n], 'claim + complete') / med(one, 'claim + complete'):.2f}× "
            f"(claim + complete), {med(results[n], 'report_and_claim') / med(one, 'report_and_claim'):.2f}× "
            f"(report_and_claim)" for n in SETS if n != 1))


if __name__ == "__main__":
    main()
