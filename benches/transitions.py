"""Benchmark of transitions and events: transitions per second with 8 concurrent clients
against the floor of the bare UPDATE + INSERT of the same rows (pgbench, same run, same
database), the cost of the durable log and NOTIFY on top, and NOTIFY-to-listener latency.

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
DB = "tasker_bench_tx"
CLIENTS = 8
SECONDS = int(os.environ.get("TASKER_BENCH_TX_SECONDS", "8"))


def connect(dbname=DB, autocommit=True):
    return psycopg.connect(dbname=dbname, autocommit=autocommit)


def setup():
    with connect("postgres") as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {DB}")
    with connect() as conn:
        conn.execute("CREATE EXTENSION tasker_core")
        conn.execute("SELECT tasker_core.install_schema('public', 'rails')")
        conn.execute("SELECT tasker_core.enable_tracking()")
        conn.execute((ROOT / "benches" / "bench_setup.sql").read_text())
        conn.execute("SELECT bench.setup_definitions()")
        # Four sets of 8 tasks (one per client), each task with one root step: the floor, and
        # tasker_core with the log and NOTIFY, with the log only, and with neither.
        # One more set for the latency measurement.
        tasks = [conn.execute("SELECT bench.make_task('chain', 1)").fetchone()[0] for _ in range(5 * CLIENTS)]
        steps = [conn.execute("SELECT min(workflow_step_id) FROM tasker_workflow_steps WHERE task_id = %s",
                              (t,)).fetchone()[0] for t in tasks]
        conn.execute("VACUUM ANALYZE")
    return tasks, steps


def pgbench(script, defines, seconds=SECONDS):
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
        path = f.name
    os.chmod(path, 0o644)
    args = ["pgbench", "-n", "-c", str(CLIENTS), "-j", "2", "-T", str(seconds), "-f", path, "-D", "i=0"]
    for k, v in defines.items():
        args += ["-D", f"{k}={v}"]
    out = subprocess.run(args + [DB], capture_output=True, text=True, env=os.environ)
    os.unlink(path)
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out.stdout)
    if not m:
        sys.exit(f"pgbench failed:\n{out.stdout}\n{out.stderr}")
    lat = re.search(r"latency average = ([0-9.]+) ms", out.stdout)
    return float(m.group(1)), float(lat.group(1)) if lat else None


# Each client owns one task (client_id 0..7 picks base + client_id) and alternates it between
# in_progress and pending — a legal cycle of the task machine — so no two clients touch the
# same rows and every call is a real transition.
FLOOR_TASK = """\\set i :i + 1
\\set t :base + :client_id
BEGIN;
UPDATE tasker_task_transitions SET most_recent = false, updated_at = now() WHERE task_id = :t AND most_recent;
INSERT INTO tasker_task_transitions (to_state, from_state, metadata, sort_key, most_recent, task_id, created_at, updated_at)
VALUES (CASE WHEN :i % 2 = 1 THEN 'in_progress' ELSE 'pending' END, NULL, '{}', :i * 10, true, :t, now(), now());
END;
"""

OURS_TASK = """\\set i :i + 1
\\set t :base + :client_id
SELECT tasker_core.transition_task(:t, CASE WHEN :i % 2 = 1 THEN 'in_progress' ELSE 'pending' END);
"""

# Steps cycle pending -> in_progress -> error -> pending (roots: no parents to wait for).
FLOOR_STEP = """\\set i :i + 1
\\set s :base + :client_id
BEGIN;
UPDATE tasker_workflow_step_transitions SET most_recent = false, updated_at = now() WHERE workflow_step_id = :s AND most_recent;
INSERT INTO tasker_workflow_step_transitions (to_state, from_state, metadata, sort_key, most_recent, workflow_step_id, created_at, updated_at)
VALUES (CASE :i % 3 WHEN 1 THEN 'in_progress' WHEN 2 THEN 'error' ELSE 'pending' END, NULL, '{}', :i * 10, true, :s, now(), now());
END;
"""

OURS_STEP = """\\set i :i + 1
\\set s :base + :client_id
SELECT tasker_core.transition_step(:s, CASE :i % 3 WHEN 1 THEN 'in_progress' WHEN 2 THEN 'error' ELSE 'pending' END);
"""


def settings_script(script, log, notify):
    prefix = f"SET tasker_core.event_log = {'on' if log else 'off'};\nSET tasker_core.notify = {'on' if notify else 'off'};\n"
    # SET once per transaction is part of the script; it costs the same in every variant.
    return script.replace("SELECT tasker_core", prefix + "SELECT tasker_core", 1)


def consecutive(ids):
    return all(b == a + 1 for a, b in zip(ids, ids[1:]))


def throughput(label, floor_script, ours_script, ids):
    sets = [ids[k * CLIENTS:(k + 1) * CLIENTS] for k in range(4)]
    assert all(consecutive(s) for s in sets), "bench needs consecutive ids per set"
    # Fresh statistics before each run, as autovacuum keeps them in a live database: plans are
    # made once per connection and kept.
    analyze = lambda: connect().execute("ANALYZE")  # noqa: E731
    analyze()
    floor, _ = pgbench(floor_script, {"base": sets[0][0]})
    analyze()
    full, lat_full = pgbench(settings_script(ours_script, True, True), {"base": sets[1][0]})
    analyze()
    log_only, _ = pgbench(settings_script(ours_script, True, False), {"base": sets[2][0]})
    analyze()
    bare, lat_bare = pgbench(settings_script(ours_script, False, False), {"base": sets[3][0]})
    return [label, f"{floor:,.0f}", f"{full:,.0f}", f"**{full / floor:.2f}**", f"{bare:,.0f}",
            f"{log_only:,.0f}", f"**{(bare / full - 1) * 100:.0f} %**"]


def notify_latency(step_ids, rate=1000, seconds=5):
    """Median and p99 from a transition call to its NOTIFY reaching a listener.

    Each transition commits on its own, so each sends one NOTIFY; wake-ups are matched to
    commits per step in order (a step's transitions are sequential, NOTIFY keeps commit order).
    """
    listener = connect()
    listener.execute("LISTEN tasker_events")
    sent = {s: [] for s in step_ids}
    received = {s: [] for s in step_ids}
    stop = threading.Event()

    def listen():
        while not stop.is_set():
            for n in listener.notifies(timeout=0.2):
                at = time.perf_counter()
                m = re.search(r'"step_id":(\d+)', n.payload)
                if m and int(m.group(1)) in received:
                    received[int(m.group(1))].append(at)

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    time.sleep(0.3)
    producer = connect()
    cycle = ["in_progress", "error", "pending"]
    start = time.perf_counter()
    n = 0
    while time.perf_counter() - start < seconds:
        target = start + n / rate
        now = time.perf_counter()
        if now < target:
            time.sleep(target - now)
        step = step_ids[n % len(step_ids)]
        state = cycle[(n // len(step_ids)) % 3]
        # Timed from the moment the call is sent (so the figure includes the transition itself
        # and its commit): a conservative bound on commit-to-wake-up latency.
        sent[step].append(time.perf_counter())
        producer.execute("SELECT tasker_core.transition_step(%s, %s)", (step, state))
        n += 1
    achieved = n / (time.perf_counter() - start)
    time.sleep(1.0)
    stop.set()
    thread.join(timeout=5)
    lat = []
    for s in step_ids:
        lat += [(r - c) * 1000 for c, r in zip(sent[s], received[s])]
    lat.sort()
    listener.close()
    producer.close()
    p99 = lat[max(0, int(len(lat) * 0.99) - 1)] if lat else float("nan")
    return achieved, n, len(lat), (statistics.median(lat) if lat else float("nan")), p99


def main():
    tasks, steps = setup()
    rows = [
        throughput("task transitions", FLOOR_TASK, OURS_TASK, tasks),
        throughput("step transitions (tracking triggers on)", FLOOR_STEP, OURS_STEP, steps),
    ]
    print(f"\n**transitions per second, {CLIENTS} clients, {SECONDS} s each (pgbench, same database)**\n")
    print("| transition | floor: bare UPDATE + INSERT | tasker_core (log + NOTIFY) | vs floor | "
          "tasker_core without log or NOTIFY | with log, no NOTIFY | log + NOTIFY cost |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    achieved, sent, got, p50, p99 = notify_latency(steps[4 * CLIENTS:])
    print(f"\n**transition call → NOTIFY at a listener, at {achieved:,.0f} events/s** ({sent} transitions, "
          f"{got} wake-ups matched)\n")
    print("| median | p99 |")
    print("|---|---|")
    print(f"| {p50:.2f} ms | **{p99:.2f} ms** |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
