"""Failover with nothing lost (docs/scaling.md): a pg_auto_failover formation on this machine
(monitor, primary, synchronous secondary), tasker_core on it, a Python and a Ruby worker (the
unchanged clients) over a multi-host connection string with target_session_attrs=read-write.
In the middle of the run the primary is killed hard (SIGKILL to its keeper, postgres and every
backend). Afterwards: the secondary was promoted, the same worker processes reconnected by
themselves and finished every task, no completed step was lost, a step ran again only after its
lease expired (the at-least-once contract), verify() and check_tracking() are empty on the new
primary, and every transition has exactly one event.

Run alone: make test-failover (it is also part of make test)."""
import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from formation import Formation  # noqa: E402
from support import wait_until  # noqa: E402

ROOT = Path(os.environ.get("TASKER_ROOT", Path(__file__).resolve().parents[2]))
BASE = ROOT / "target" / "failover"
TASKS = 150
LEASE = 20  # seconds: longer than the failover, so steps in flight keep their leases through it
KILL_AT = 0.3  # the share of steps complete when the primary is killed
TEMPLATE = {"name": "order", "namespace_name": "failover", "version": "1.0.0",
            "step_templates": [
                {"name": "a", "handler_class": "FO::Work", "default_retry_limit": 5},
                {"name": "b", "handler_class": "FO::Work", "depends_on_step": "a", "default_retry_limit": 5},
                {"name": "c", "handler_class": "FO::Work", "depends_on_step": "a", "default_retry_limit": 5},
                {"name": "d", "handler_class": "FO::Work", "depends_on_steps": ["b", "c"], "default_retry_limit": 5}]}
STEPS = TASKS * len(TEMPLATE["step_templates"])
COMPLETE = "SELECT count(*) FROM tasker_workflow_step_transitions WHERE to_state = 'complete'"
TASKS_DONE = ("SELECT count(*) FROM tasker_task_transitions WHERE most_recent AND to_state = 'complete'")


def start_workers(f, runs):
    env = dict(os.environ, FO_LEASE=str(LEASE))
    python = subprocess.Popen([str(ROOT / "target" / "venv" / "bin" / "python"), str(Path(__file__).parent / "failover_worker.py")],
                              env=dict(env, FO_CONNINFO=f.conninfo(), FO_RUNS=str(runs["python"])),
                              stdout=subprocess.DEVNULL, stderr=open(BASE / "python-worker.log", "w"))
    ruby = subprocess.Popen(["ruby", str(Path(__file__).parent / "failover_worker.rb")],
                            env=dict(env, FO_HOSTS="127.0.0.1,127.0.0.1",
                                     FO_PORTS=f"{f.ports['node1']},{f.ports['node2']}", FO_RUNS=str(runs["ruby"])),
                            stdout=subprocess.DEVNULL, stderr=open(BASE / "ruby-worker.log", "w"))
    return {"python": python, "ruby": ruby}


def count_lines(path):
    return sum(1 for _ in open(path)) if path.exists() else 0


def scalar(f, node, sql, args=None):
    try:
        with f.connect(node) as c:
            return c.execute(sql, args).fetchone()[0]
    except Exception:
        return None


@pytest.fixture(scope="module")
def run():
    f = Formation(BASE)
    workers = {}
    try:
        f.create()
        with f.connect("node1") as p:
            # the secondary is synchronous: a commit the primary acknowledged is on it
            assert p.execute("SHOW synchronous_standby_names").fetchone()[0].startswith("ANY 1")
            p.execute("CREATE EXTENSION tasker_core")
            p.execute("SELECT tasker_core.install_schema()")
            p.execute("SELECT tasker_core.enable_tracking()")
            p.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (json.dumps(TEMPLATE),))
            for n in range(TASKS):
                p.execute("SELECT tasker_core.create_task('failover', 'order', NULL, %s::jsonb)", (json.dumps({"n": n}),))
        runs = {w: BASE / f"{w}.runs" for w in ("python", "ruby")}
        workers = start_workers(f, runs)

        def going():
            assert all(w.poll() is None for w in workers.values()), "a worker died:\n" + logs()
            return (scalar(f, "node1", COMPLETE) or 0) >= KILL_AT * STEPS
        wait_until(going, 120, "the workers to get going")
        # still a healthy pair with synchronous replication (a spurious "unhealthy" would not be)
        assert f.states() == {"node1": ("primary", "primary"), "node2": ("secondary", "secondary")}, f.describe()
        at_kill = {w: count_lines(p) for w, p in runs.items()}
        killed = time.time()
        f.kill_hard("node1")
        wait_until(lambda: f.writable("node2"), 120, "node2 to be promoted and writable")
        promoted = time.time() - killed
        first = None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if first is None:
                t = scalar(f, "node2", f"SELECT extract(epoch FROM min(created_at)) FROM tasker_workflow_step_transitions "
                                       f"WHERE to_state = 'complete' AND created_at > to_timestamp({killed})")
                first = None if t is None else float(t) - killed
            if scalar(f, "node2", TASKS_DONE) == TASKS:
                break
            assert all(w.poll() is None for w in workers.values()), "a worker died:\n" + logs()
            time.sleep(0.2)
        finished = time.time() - killed
        alive = {name: w.poll() is None for name, w in workers.items()}
        for w in workers.values():
            w.send_signal(signal.SIGTERM)
        for w in workers.values():
            w.wait(timeout=60)
        with f.connect("node2") as c:
            data = {
                "states": f.states(),
                "tasks_done": c.execute(TASKS_DONE).fetchone()[0],
                "steps": c.execute(
                    "SELECT ws.workflow_step_id, ws.results, "
                    " count(*) FILTER (WHERE t.to_state = 'complete'), "
                    " count(*) FILTER (WHERE t.to_state = 'in_progress'), "
                    " count(*) FILTER (WHERE t.metadata ->> 'reason' = 'lease_expired') "
                    "FROM tasker_workflow_steps ws LEFT JOIN tasker_workflow_step_transitions t USING (workflow_step_id) "
                    "GROUP BY ws.workflow_step_id, ws.results").fetchall(),
                "transitions": {
                    "step": [r[0] for r in c.execute("SELECT id FROM tasker_workflow_step_transitions").fetchall()],
                    "task": [r[0] for r in c.execute("SELECT id FROM tasker_task_transitions").fetchall()]},
                # the events that record a transition (others: wake-ups such as step.ready)
                "events": c.execute("SELECT step_id IS NULL, (payload ->> 'transition_id')::bigint "
                                    "FROM tasker_core.events WHERE payload ? 'transition_id'").fetchall(),
                "verify": c.execute("SELECT * FROM tasker_core.verify()").fetchall(),
                "tracking": c.execute("SELECT * FROM tasker_core.check_tracking()").fetchall(),
            }
        data["runs"] = {w: [tuple(map(int, line.split())) for line in open(p)] for w, p in runs.items()}
        data.update(at_kill=at_kill, promoted=promoted, first=first, finished=finished, alive=alive)
        print(f"\nfailover: promoted {promoted:.1f} s after the kill, first step completed on the new primary "
              f"{first if first is None else round(first, 1)} s after it, all {TASKS} tasks done {finished:.1f} s after it; "
              f"runs at the kill {at_kill}, in all { {w: len(r) for w, r in data['runs'].items()} }")
        yield data
    finally:
        for w in workers.values():
            if w.poll() is None:
                w.kill()
                w.wait()
        f.destroy() if os.environ.get("FO_KEEP") != "1" else None


def logs():
    return "\n".join(f"--- {n}\n" + (BASE / f"{n}-worker.log").read_text()[-3000:]
                     for n in ("python", "ruby") if (BASE / f"{n}-worker.log").exists())


def test_the_secondary_was_promoted_and_the_workers_finished_every_task(run):
    reported, _ = run["states"]["node2"]
    assert reported in ("wait_primary", "primary"), run["states"]
    assert run["tasks_done"] == TASKS, logs()
    # the same processes: they reconnected by themselves, both ran steps after the kill
    assert all(run["alive"].values()), run["alive"]
    for w in ("python", "ruby"):
        assert len(run["runs"][w]) > run["at_kill"][w], (w, logs())
    assert run["first"] is not None


def test_no_completed_step_was_lost(run):
    assert len(run["steps"]) == STEPS
    for step, results, completes, _, _ in run["steps"]:
        assert completes == 1, (step, completes)
        assert results and results.get("by") in ("python", "ruby"), (step, results)


def test_a_step_ran_again_only_after_its_lease_expired(run):
    """At least once: a handler runs once per claim its worker received, and a step is claimed
    again only after its lease expired (a claim whose answer was lost with the connection, or an
    outcome that could not be recorded in time)."""
    ran = collections.Counter(step for rows in run["runs"].values() for step, _ in rows)
    again = []
    for step, _, _, claims, expired in run["steps"]:
        assert 1 <= ran[step] <= claims, (step, ran[step], claims)
        assert claims == 1 + expired, (step, claims, expired)
        if ran[step] > 1:
            again.append(step)
    reclaimed = sum(1 for *_, expired in run["steps"] if expired)
    print(f"steps that ran more than once: {len(again)} of {STEPS}; claimed again after a lease expired: {reclaimed}")


def test_verify_and_check_tracking_are_empty_on_the_new_primary(run):
    assert run["verify"] == []
    assert run["tracking"] == []


def test_every_transition_has_exactly_one_event(run):
    by_kind = collections.Counter(("task" if is_task else "step", tid) for is_task, tid in run["events"])
    assert max(by_kind.values()) == 1
    expected = {("step", t) for t in run["transitions"]["step"]} | {("task", t) for t in run["transitions"]["task"]}
    assert set(by_kind) == expected
