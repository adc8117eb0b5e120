"""The worker clients end to end (W1, W2) and task creation, against floors measured in the
same run on the same database:

- W1: 2,000 five-step "diamond" tasks (a -> b, c -> d -> e), no-op handlers, 8 worker processes
  of each client (Python, Node, Ruby; 4 steps in flight each): steps per second against
  pgbench -N transactions per second / 2 (a step needs a claim and an outcome), with wake-ups
  on and off (`tasker_core.notify = off` for the database: the workers then find work when a
  step of theirs finishes, or by their poll).
- W2: a parent's handler ends -> its dependent's handler starts, through each client: p50 and
  p99 with the workers idle, and at half load (diamond tasks created at half the client's W1
  rate while the chains run).
- Task creation: create_task of the 5-step template, one per transaction from 8 pgbench
  clients, against pgbench -N.

Runs on the bench cluster of `make bench` (fsync on, tasker_core preloaded: the notifier serves
this database). Prints ratios, never asserts.
"""
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from worker import DB, connect, pgbench, settle, wait_for_notifier  # noqa: E402

ROOT = Path(os.environ.get("TASKER_ROOT", Path(__file__).resolve().parents[1]))
HERE = Path(__file__).resolve().parent / "clients"
WORKERS = 8
TASKS = int(os.environ.get("TASKER_BENCH_CLIENT_TASKS", "2000"))
CHAINS = int(os.environ.get("TASKER_BENCH_CLIENT_CHAINS", "100"))

DIAMOND = """{"name": "diamond", "namespace_name": "clients", "version": "1.0.0",
  "step_templates": [
    {"name": "a", "handler_class": "Noop"},
    {"name": "b", "handler_class": "Noop", "depends_on_step": "a"},
    {"name": "c", "handler_class": "Noop", "depends_on_step": "a"},
    {"name": "d", "handler_class": "Noop", "depends_on_steps": ["b", "c"]},
    {"name": "e", "handler_class": "Noop", "depends_on_step": "d"}]}"""
CHAIN = """{"name": "chain", "namespace_name": "clients", "version": "1.0.0",
  "step_templates": [{"name": "first", "handler_class": "Stamp"},
                     {"name": "second", "handler_class": "Measure", "depends_on_step": "first"}]}"""


def commands():
    node_path = str(ROOT / "target" / "node" / "node_modules")
    py_env = {"PYTHONPATH": str(ROOT / "clients" / "python")}
    out = {"python": ([sys.executable, str(HERE / "py_worker.py")], py_env)}
    if shutil.which("node") and Path(node_path).is_dir():
        out["node"] = (["node", str(HERE / "node_worker.js")], {"NODE_PATH": node_path})
    if shutil.which("ruby"):
        out["ruby"] = (["ruby", str(HERE / "rb_worker.rb")], {})
    return out


def setup():
    with connect("postgres") as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {DB}")
    with connect() as conn:
        conn.execute("CREATE EXTENSION tasker_core")
        conn.execute("SELECT tasker_core.install_schema()")
        conn.execute("SELECT tasker_core.enable_tracking()")
        conn.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (DIAMOND,))
        conn.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (CHAIN,))
    subprocess.run(["pgbench", "-i", "-q", "-s", "8", DB], capture_output=True, check=True)
    wait_for_notifier()


def create_diamonds(n):
    with connect() as conn:
        conn.execute("SET tasker_core.notify = off")
        conn.execute("SELECT tasker_core.create_task('clients', 'diamond', NULL, jsonb_build_object('i', i)) "
                     "FROM generate_series(1, %s) i", (n,))
        conn.execute("VACUUM ANALYZE")
    settle()


def processed(conn):
    return conn.execute("SELECT count(*) FROM tasker_core.step_state WHERE state = 'complete'").fetchone()[0]


def start_workers(cmd, env):
    procs = []
    for i in range(WORKERS):
        p = subprocess.Popen(cmd + [f"bench-{i}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, env=dict(os.environ, PGDATABASE=DB, **env))
        procs.append(p)
    for p in procs:
        line = p.stdout.readline()
        if "ready" not in line:
            sys.exit(f"a worker did not start: {cmd}")
    return procs


def stop_workers(procs):
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def drain_rate(total):
    """Steps per second while the backlog drains: from the first completed step to 90 %."""
    with connect() as conn:
        base = processed(conn)
        t0 = c0 = None
        deadline = time.time() + 600
        while time.time() < deadline:
            n = processed(conn) - base
            now = time.time()
            if t0 is None and n > 0:
                t0, c0 = now, n
            if n >= total * 0.9:
                return (n - c0) / (now - t0)
            time.sleep(0.1)
    return float("nan")


def chain_latencies(conn, count, spacing=0.0):
    """Creates `count` chain tasks (one every `spacing` seconds, or each after the previous
    finished) and returns the dependents' measured latencies in ms."""
    ids = []
    for _ in range(count):
        ids.append(conn.execute("SELECT tasker_core.create_task('clients', 'chain', NULL, '{}')").fetchone()[0])
        if spacing:
            time.sleep(spacing)
        else:
            wait_done(conn, [ids[-1]])
    wait_done(conn, ids)
    rows = conn.execute("""SELECT (ws.results ->> 'latency_ms')::float FROM tasker_workflow_steps ws
                           JOIN tasker_named_steps ns USING (named_step_id)
                           WHERE ws.task_id = ANY (%s) AND ns.name = 'second'""", (ids,)).fetchall()
    return [r[0] for r in rows if r[0] is not None]


def wait_done(conn, ids, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        left = conn.execute("SELECT count(*) FROM tasker_tasks WHERE task_id = ANY (%s) AND complete IS NOT TRUE",
                            (ids,)).fetchone()[0]
        if left == 0:
            return
        time.sleep(0.005)
    sys.exit(f"tasks did not finish: {ids[:5]}...")


def pct(xs, p):
    xs = sorted(xs)
    return xs[max(0, int(round(len(xs) * p)) - 1)] if xs else float("nan")


def creation_tps():
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write("SELECT tasker_core.create_task('clients', 'diamond', NULL, '{}');\n")
        path = f.name
    os.chmod(path, 0o644)
    tps, _ = pgbench(["-n", "-c", str(WORKERS), "-j", "2", "-T", "5", "-f", path], DB)
    os.unlink(path)
    with connect() as conn:
        # time in the server per call (EXPLAIN ANALYZE's execution time), one connection alone
        times = []
        for _ in range(100):
            plan = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) "
                                "SELECT tasker_core.create_task('clients', 'diamond', NULL, '{}')").fetchone()[0]
            times.append(plan[0]["Execution Time"])
        per_call = statistics.median(times)
    return tps, per_call


def set_notify(on):
    with connect() as conn:
        conn.execute(f"ALTER DATABASE {DB} SET tasker_core.notify = {'on' if on else 'off'}")


def unfinished(conn):
    return [r[0] for r in conn.execute("SELECT task_id FROM tasker_tasks WHERE complete IS NOT TRUE").fetchall()]


def w1(cmd, env, notify):
    """Steps per second of 8 worker processes draining TASKS diamond tasks."""
    set_notify(notify)
    create_diamonds(TASKS)
    procs = start_workers(cmd, env)
    try:
        rate = drain_rate(TASKS * 5)
        with connect() as conn:
            wait_done(conn, unfinished(conn), 300)
    finally:
        stop_workers(procs)
        set_notify(True)
    return rate


def half_load(rate, stop):
    """Creates diamond tasks at half of `rate` steps per second until `stop` is set."""
    per_second = max(rate / 2 / 5, 1.0)
    with connect() as conn:
        conn.execute("SET tasker_core.notify = on")
        t = time.time()
        while not stop.is_set():
            conn.execute("SELECT tasker_core.create_task('clients', 'diamond', NULL, '{}')")
            t += 1 / per_second
            time.sleep(max(0.0, t - time.time()))


def w2(cmd, env, rate):
    procs = start_workers(cmd, env)
    try:
        with connect() as conn:
            idle = chain_latencies(conn, CHAINS)
            stop = threading.Event()
            producer = threading.Thread(target=half_load, args=(rate, stop))
            producer.start()
            try:
                time.sleep(1.0)
                loaded = chain_latencies(conn, CHAINS // 2, spacing=0.1)
            finally:
                stop.set()
                producer.join()
            wait_done(conn, unfinished(conn), 300)
    finally:
        stop_workers(procs)
    return idle, loaded


def main():
    setup()
    floor, _ = pgbench(["-n", "-N", "-c", str(WORKERS), "-j", "2", "-T", "5"], DB)
    rows = []
    for lang, (cmd, env) in commands().items():
        rate = w1(cmd, env, notify=True)
        rate_off = w1(cmd, env, notify=False)
        idle, loaded = w2(cmd, env, rate)
        rows.append((lang, rate, rate_off, idle, loaded))
    created_tps, create_ms = creation_tps()
    with connect() as conn:
        settings = dict(conn.execute("SELECT name, setting FROM pg_settings WHERE name IN "
                                     "('fsync', 'synchronous_commit', 'autovacuum_naptime')").fetchall())
        mode = conn.execute("SELECT detail FROM tasker_core.health() WHERE check_name = 'wakeups'").fetchone()[0]
        problems = conn.execute("SELECT count(*) FROM tasker_core.verify()").fetchone()[0]
        drift = conn.execute("SELECT count(*) FROM tasker_core.check_tracking()").fetchone()[0]
    print(f"\n**W1: the clients, {WORKERS} worker processes each (4 steps in flight per process), "
          f"{TASKS:,} five-step diamond tasks, no-op handlers; fsync={settings['fsync']}, "
          f"synchronous_commit={settings['synchronous_commit']}, autovacuum_naptime={settings['autovacuum_naptime']} s, wake-ups: {mode.split(':')[0]}**\n")
    print("| client | floor: pgbench -N tps ÷ 2 | steps/s, wake-ups on | vs floor | wake-ups off | vs floor | on ÷ off |")
    print("|---|---|---|---|---|---|---|")
    for lang, rate, off, _, _ in rows:
        print(f"| {lang} | {floor / 2:,.0f} | {rate:,.0f} | **{rate / (floor / 2):.2f}** | {off:,.0f} | "
              f"{off / (floor / 2):.2f} | {rate / off:.2f} |")
    print("\n**W2: a parent's handler ends → its dependent's handler starts, through each client**\n")
    print("| client | idle p50 | idle p99 | half load p50 | p99 |")
    print("|---|---|---|---|---|")
    for lang, _, _, idle, loaded in rows:
        print(f"| {lang} | **{statistics.median(idle):.1f} ms** | {pct(idle, 0.99):.1f} ms | "
              f"{statistics.median(loaded):.1f} ms | {pct(loaded, 0.99):.1f} ms |")
    print(f"\n**task creation** (the 5-step diamond, one create_task per transaction, {WORKERS} pgbench clients)\n")
    print("| floor: pgbench -N tps | create_task per s | vs floor | in the server, per call (median) |")
    print("|---|---|---|---|")
    print(f"| {floor:,.0f} | {created_tps:,.0f} | **{created_tps / floor:.2f}** | {create_ms:.2f} ms |")
    print(f"\nafter the runs: verify() {problems} rows, check_tracking() {drift} rows")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
