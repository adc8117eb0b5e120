"""Benchmark of the worker protocol: end-to-end steps per second with 8 SQL workers against
the floor measured in the same run (pgbench -N transactions per second / 2, since a step
needs a claim and a completion), claim and complete latency, and the time from a step's
completion to its dependent's claim by a NOTIFY-driven worker.

Run by `make bench`. Prints ratios, never asserts.
"""
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

ROOT = Path(os.environ.get("TASKER_ROOT", Path(__file__).resolve().parents[1]))
DB = "tasker_bench_worker"
CLIENTS = 8
SECONDS = int(os.environ.get("TASKER_BENCH_WORKER_SECONDS", "8"))

TEMPLATE = """{"name": "bench_flow", "namespace_name": "bench", "version": "1.0.0",
  "step_templates": [
    {"name": "a", "handler_class": "A"},
    {"name": "b", "handler_class": "B", "depends_on_step": "a"},
    {"name": "c", "handler_class": "C", "depends_on_step": "a"},
    {"name": "d", "handler_class": "D", "depends_on_steps": ["b", "c"]}]}"""

CHAIN = """{"name": "bench_chain", "namespace_name": "latency", "version": "1.0.0",
  "step_templates": [{"name": "first", "handler_class": "F"},
                     {"name": "second", "handler_class": "S", "depends_on_step": "first"}]}"""


def connect(dbname=DB):
    return psycopg.connect(dbname=dbname, autocommit=True)


def pgbench(args, dbname):
    out = subprocess.run(["pgbench", *args, dbname], capture_output=True, text=True)
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out.stdout)
    if not m:
        sys.exit(f"pgbench failed:\n{out.stdout}\n{out.stderr}")
    return float(m.group(1)), out.stdout


FAIR = TEMPLATE.replace('"bench_flow"', '"bench_fair"').replace(
    '"version": "1.0.0",', '"version": "1.0.0", "concurrency": {"key": "/customer", "limit": 2},')

PLAIN_TASKS = "SELECT tasker_core.create_task('bench', 'bench_flow', NULL, jsonb_build_object('n', i)) " \
              "FROM generate_series(1, %s) i"


def setup(tasks, profile="lean", migrate=False, create=PLAIN_TASKS):
    with connect("postgres") as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {DB}")
    with connect() as conn:
        conn.execute("CREATE EXTENSION tasker_core")
        conn.execute("SELECT tasker_core.install_schema('public', %s)", (profile,))
        if migrate:  # the Rails app's optional migration: drops the indexes others cover
            conn.execute((ROOT / "sql" / "migrations" / "0002_drop_duplicate_indexes.up.sql").read_text())
        conn.execute("SELECT tasker_core.enable_tracking()")
        conn.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (TEMPLATE,))
        conn.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (CHAIN,))
        conn.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (FAIR,))
        conn.execute("SET tasker_core.notify = off")
        conn.execute(create, (tasks,))
        conn.execute("VACUUM ANALYZE")
    wait_for_notifier()


def wait_for_notifier(seconds=20):
    """With tasker_core preloaded, waits until the notifier serves the (re)created database
    (DROP DATABASE ends it; it is back a second later)."""
    with connect() as conn:
        preloaded = "tasker_core" in conn.execute("SHOW shared_preload_libraries").fetchone()[0]
        deadline = time.time() + seconds
        while preloaded and time.time() < deadline:
            mode = conn.execute("SELECT detail FROM tasker_core.health() WHERE check_name = 'wakeups'").fetchone()[0]
            if mode.startswith("notifier"):
                return
            time.sleep(0.2)


def floor_tps():
    """pgbench -N (the built-in simple update without branches) on its own tables."""
    subprocess.run(["pgbench", "-i", "-q", "-s", "8", DB], capture_output=True, check=True)
    tps, _ = pgbench(["-n", "-N", "-c", str(CLIENTS), "-j", "2", "-T", str(SECONDS)], DB)
    return tps


WORKER_SCRIPT = """SELECT COALESCE((SELECT workflow_step_id FROM tasker_core.claim_steps('w' || :client_id, NULL, 1, 60)), 0) AS s \\gset
SELECT CASE WHEN :s > 0 THEN tasker_core.complete_step(:s, 'w' || :client_id, '{}') END;
"""


# Batched: claim up to 10 steps, then report all their outcomes in one report_steps call.
BATCH_SCRIPT = """SELECT COALESCE(jsonb_agg(jsonb_build_object('step_id', workflow_step_id)), '[]')::text AS batch
  FROM tasker_core.claim_steps('w' || :client_id, NULL, 10, 60) \\gset
SELECT count(*) FROM tasker_core.report_steps('w' || :client_id, ':batch'::jsonb);
"""


# Combined (0.6.0): one report_and_claim per transaction records the previous step(s) and
# claims the next (each client keeps what it holds in :held between transactions).
COMBINED_SCRIPT = """SELECT COALESCE(jsonb_agg(jsonb_build_object('step_id', workflow_step_id))
                         FILTER (WHERE outcome = 'claimed'), '[]')::text AS held
  FROM tasker_core.report_and_claim('w' || :client_id, ':held'::jsonb, NULL, {n}, 60) \\gset
"""

SCRIPTS = {"single": WORKER_SCRIPT, "batched": BATCH_SCRIPT,
           "combined": COMBINED_SCRIPT.format(n=1), "combined10": COMBINED_SCRIPT.format(n=10)}


def throughput(notify=True, batched=False, kind=None):
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        script = SCRIPTS[kind or ("batched" if batched else "single")]
        f.write(script if notify else "SET tasker_core.notify = off;\n" + script)
        path = f.name
    os.chmod(path, 0o644)
    with connect() as conn:
        before = conn.execute("SELECT count(*) FROM tasker_workflow_steps WHERE processed").fetchone()[0]
    start = time.time()
    _, out = pgbench(["-n", "-c", str(CLIENTS), "-j", "2", "-T", str(SECONDS), "-r", "-D", "held=[]",
                      "-f", path], DB)
    elapsed = time.time() - start
    os.unlink(path)
    with connect() as conn:
        after = conn.execute("SELECT count(*) FROM tasker_workflow_steps WHERE processed").fetchone()[0]
        in_flight = conn.execute("SELECT count(*) FROM tasker_core.step_claims").fetchone()[0]
    lat = re.findall(r"^\s+([0-9.]+)\s+\d+\s+SELECT (?:COALESCE|CASE|count)", out, re.M)
    return (after - before) / SECONDS, [float(x) for x in lat], in_flight, elapsed


def latencies(samples=2000):
    """p50/p99 of claim_steps and complete_step calls from one worker, no contention."""
    claim, complete = [], []
    with connect() as conn:
        for _ in range(samples):
            t0 = time.perf_counter()
            row = conn.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('lat', NULL, 1, 60)").fetchone()
            t1 = time.perf_counter()
            if not row:
                break
            conn.execute("SELECT tasker_core.complete_step(%s, 'lat', '{}')", (row[0],))
            t2 = time.perf_counter()
            claim.append((t1 - t0) * 1000)
            complete.append((t2 - t1) * 1000)
    pct = lambda xs, p: sorted(xs)[max(0, int(len(xs) * p) - 1)]  # noqa: E731
    return {k: (statistics.median(v), pct(v, 0.99), len(v)) for k, v in (("claim", claim), ("complete", complete))}


def dependent_claim_latency(rounds=200):
    """From a step's complete_step call to its dependent's claim by a worker blocked in
    LISTEN tasker_ready (no polling)."""
    with connect() as conn:
        conn.execute("SELECT tasker_core.create_task('latency', 'bench_chain', NULL, jsonb_build_object('i', i)) "
                     "FROM generate_series(1, %s) i", (rounds,))
    results = []
    listener = connect()
    listener.execute("LISTEN tasker_ready")
    producer = connect()
    for _ in range(rounds):
        first = producer.execute(
            "SELECT workflow_step_id FROM tasker_core.claim_steps('producer', ARRAY['latency'], 1, 60)").fetchone()
        if not first:
            break
        for _ in listener.notifies(timeout=0):  # drain wake-ups of the claim itself
            pass
        t0 = time.perf_counter()
        producer.execute("SELECT tasker_core.complete_step(%s, 'producer', '{}')", (first[0],))
        got = None
        while got is None:
            for _ in listener.notifies(timeout=1.0, stop_after=1):
                break
            got = listener.execute(
                "SELECT workflow_step_id FROM tasker_core.claim_steps('consumer', ARRAY['latency'], 1, 60)").fetchone()
        results.append((time.perf_counter() - t0) * 1000)
        listener.execute("SELECT tasker_core.complete_step(%s, 'consumer', '{}')", (got[0],))
    listener.close()
    producer.close()
    return statistics.median(results), sorted(results)[int(len(results) * 0.99) - 1], len(results)


def settle():
    """A checkpoint, so that no run pays for the full-page images of the setup's writes (the
    first run after a bulk load was a third slower whichever mode it measured)."""
    with connect() as conn:
        conn.execute("CHECKPOINT")


def main():
    setup(tasks=int(os.environ.get("TASKER_BENCH_WORKER_TASKS", "60000")))
    settle()
    throughput(notify=True)                     # warm-up: plans, caches
    # on and off interleaved, twice each: the median of each mode
    combined = "on, report_and_claim of 1 (one transaction per step)"
    combined10 = "on, batches of 10 (report_and_claim)"
    by_mode = {"on": [], "off": [], "on, batches of 10 (report_steps)": [], combined: [], combined10: []}
    for notify in (True, False, False, True):
        by_mode["on" if notify else "off"].append(throughput(notify=notify))
    for _ in range(2):
        by_mode["on, batches of 10 (report_steps)"].append(throughput(notify=True, batched=True))
        by_mode[combined].append(throughput(kind="combined"))
        by_mode[combined10].append(throughput(kind="combined10"))
    runs = []
    for mode, results in by_mode.items():
        results.sort(key=lambda r: r[0])
        best_two = results[-2:]
        steps = statistics.mean(r[0] for r in best_two)
        lat = [statistics.mean(x) for x in zip(*(r[1] for r in best_two))] if all(r[1] for r in best_two) else []
        runs.append((mode, steps, lat, best_two[-1][2], best_two[-1][3]))
    floor = floor_tps()
    with connect() as conn:
        settings = dict(conn.execute("SELECT name, setting FROM pg_settings WHERE name IN "
                                     "('fsync', 'synchronous_commit', 'shared_preload_libraries', 'autovacuum_naptime')").fetchall())
        mode = conn.execute("SELECT detail FROM tasker_core.health() WHERE check_name = 'wakeups'").fetchone()[0]
    print(f"\n**end-to-end steps per second, {CLIENTS} SQL workers (pgbench: claim_steps then complete_step, "
          f"each its own transaction), {SECONDS} s per run, mean of two runs per mode; "
          f"fsync={settings.get('fsync')}, synchronous_commit={settings.get('synchronous_commit')}, "
          f"autovacuum_naptime={settings.get('autovacuum_naptime')} s; "
          f"wake-ups: {mode.split(':')[0]}**\n")
    print("| tasker_core.notify | floor: pgbench -N tps ÷ 2 | tasker_core steps/s | vs floor | avg claim | avg complete |")
    print("|---|---|---|---|---|---|")
    for notify, steps_per_s, stmt_lat, _, _ in runs:
        claim_avg, complete_avg = (stmt_lat + [float("nan")] * 2)[:2]
        print(f"| {notify} | {floor / 2:,.0f} | {steps_per_s:,.0f} | **{steps_per_s / (floor / 2):.2f}** | "
              f"{claim_avg:.2f} ms | {complete_avg:.2f} ms |")
    lat = latencies()
    print("\n**claim and complete latency, one worker**\n")
    print("| call | p50 | p99 | calls |")
    print("|---|---|---|---|")
    for k, (p50, p99, n) in lat.items():
        print(f"| {k} | {p50:.2f} ms | {p99:.2f} ms | {n} |")
    p50, p99, n = dependent_claim_latency()
    print(f"\n**completion → dependent claimed by a NOTIFY-driven worker** ({n} chains)\n")
    print("| median | p99 |")
    print("|---|---|")
    print(f"| **{p50:.2f} ms** | {p99:.2f} ms |")
    with connect() as conn:
        problems = conn.execute("SELECT count(*) FROM tasker_core.verify()").fetchone()[0]
        drift = conn.execute("SELECT count(*) FROM tasker_core.check_tracking()").fetchone()[0]
    print(f"\nafter the runs: verify() {problems} rows, check_tracking() {drift} rows")
    index_profiles()
    features()
    sys.stdout.flush()


def features():
    """What priorities and concurrency keys cost the worker loop when tasks use them: the same
    loop (8 SQL workers, wake-ups on, one step per transaction) over tasks without options,
    with 10 priorities, with 1,000 concurrency keys (limit 2 each), and with both."""
    tasks = int(os.environ.get("TASKER_BENCH_FEATURE_TASKS", "8000"))
    print(f"\n**the worker loop when tasks use priorities and concurrency keys** (8 SQL workers, "
          f"wake-ups on, {tasks:,} four-step tasks, mean of two runs)\n")
    print("| tasks | steps/s | vs tasks without options |")
    print("|---|---|---|")
    prio = ", jsonb_build_object('priority', i %% 10)"
    cases = (("without options", PLAIN_TASKS),
             ("10 priorities", PLAIN_TASKS.replace("jsonb_build_object('n', i))", "jsonb_build_object('n', i)" + prio + ")")),
             ("1,000 concurrency keys", "SELECT tasker_core.create_task('bench', 'bench_fair', NULL, "
                                        "jsonb_build_object('n', i, 'customer', i %% 1000)) FROM generate_series(1, %s) i"),
             ("both", "SELECT tasker_core.create_task('bench', 'bench_fair', NULL, "
                      "jsonb_build_object('n', i, 'customer', i %% 1000)" + prio + ") FROM generate_series(1, %s) i"))
    base = None
    for label, create in cases:
        setup(tasks, create=create)
        settle()
        throughput(notify=True)
        rate = statistics.mean(throughput(notify=True)[0] for _ in range(2))
        base = base or rate
        print(f"| {label} | {rate:,.0f} | {rate / base:.2f} |")
        sys.stdout.flush()


def index_profiles():
    """The same loop (wake-ups on, one step per claim) on the three index sets a database may
    have: the Rails engine's, the Rails engine's after the optional migration 0002, and the
    lean profile of install_schema()."""
    tasks = int(os.environ.get("TASKER_BENCH_PROFILE_TASKS", "4000"))
    print("\n**the worker loop by index set** (8 SQL workers, wake-ups on, mean of two runs)\n")
    print("| indexes | on the Tasker tables | steps/s | vs the Rails set |")
    print("|---|---|---|---|")
    base = None
    for label, profile, migrate in (("Rails engine's", "rails", False),
                                    ("Rails, after migration 0002", "rails", True),
                                    ("lean (install_schema default)", "lean", False)):
        setup(tasks, profile, migrate)
        settle()
        throughput(notify=True)
        rate = statistics.mean(throughput(notify=True)[0] for _ in range(2))
        with connect() as conn:
            count = conn.execute("SELECT count(*) FROM pg_indexes WHERE schemaname = 'public' "
                                 "AND tablename LIKE 'tasker%'").fetchone()[0]
        base = base or rate
        print(f"| {label} | {count} | {rate:,.0f} | {rate / base:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
