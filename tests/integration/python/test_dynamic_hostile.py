"""Dynamic workflows under hostile use (maps, conditions, skip_with cascades): operator calls
on dynamic steps, retries of failed maps, races between real concurrent connections, tracking
rebuilds and retention, and documents an application wrote that serde cannot hold."""
import json
import threading

import pytest

from conftest import sqlstate_of
# (conn: test_dynamic's fixture, a database with tracking on and its two templates)
from test_dynamic import (assert_consistent, claim, complete, conn, create, register,  # noqa: F401
                          states, task_state)


def ids_of(c, task):
    """{name: [step ids in id order]}"""
    out = {}
    for name, sid in c.execute("SELECT name, workflow_step_id FROM tasker_core.step_state "
                               "WHERE task_id = %s ORDER BY workflow_step_id", (task,)):
        out.setdefault(name, []).append(sid)
    return out


def step_transitions(c, step):
    return [r[0] for r in c.execute(
        "SELECT to_state FROM tasker_workflow_step_transitions WHERE workflow_step_id = %s "
        "ORDER BY sort_key, id", (step,))]


def events(c, task, names=("step.map_expanded", "step.skipped")):
    return c.execute("SELECT name, step_id, payload FROM tasker_core.events WHERE task_id = %s "
                     "AND name = ANY (%s) ORDER BY id", (task, list(names))).fetchall()


def results_of(c, step):
    return c.execute("SELECT results FROM tasker_workflow_steps WHERE workflow_step_id = %s",
                     (step,)).fetchone()[0]


def drain(c, handler=lambda name, inputs, parents: {}, worker="w", rounds=200):
    for _ in range(rounds):
        rows = claim(c, 20, worker)
        if not rows:
            return
        for step, name, inputs, parents in rows:
            complete(c, step, handler(name, inputs, parents), worker)


# ---------------------------------------------------------------------------------------
# 1. retry_task of a task whose map step failed when it was judged


def test_retry_after_tk025_with_fixed_parent_results_expands_and_finishes(conn):
    task = create(conn, "order", {"gift": False})
    (fetch, *_), = claim(conn)
    complete(conn, fetch, {"lines": "nope", "total": 1})
    ids = ids_of(conn, task)
    charge = ids["charge"][0]
    assert results_of(conn, charge)["error"]["code"] == "TK025"
    assert task_state(conn, task) == "error"
    assert_consistent(conn)
    conn.execute("UPDATE tasker_workflow_steps SET results = %s::jsonb WHERE workflow_step_id = %s",
                 (json.dumps({"lines": [{"sku": "a"}, {"sku": "b"}], "total": 1}), fetch))
    conn.execute("SELECT tasker_core.retry_task(%s)", (task,))
    assert_consistent(conn)
    s = states(conn, task)
    assert s["charge"] == ["pending"] * 3, s
    rows = claim(conn)
    assert sorted(r[2]["element"]["sku"] for r in rows) == ["a", "b"]
    for step, name, inputs, _ in rows:
        complete(conn, step, {"c": inputs["element"]["sku"]})
    (ship, name, _, parents), = claim(conn)
    assert name == "ship" and parents["charge"] == [{"c": "a"}, {"c": "b"}]
    complete(conn, ship, {})
    assert task_state(conn, task) == "complete"
    assert step_transitions(conn, charge) == ["error", "pending", "in_progress", "complete"]
    ev = [(n, p) for n, _, p in events(conn, task, ("step.map_expanded",))]
    assert ev == [("step.map_expanded", {"instances": 2})]
    assert_consistent(conn)


def test_retry_after_54000_with_raised_limit_runs_to_completion(conn):
    conn.execute("SET tasker_core.max_map_elements = 2")
    task = create(conn, "order", {"gift": False})
    (fetch, *_), = claim(conn)
    complete(conn, fetch, {"lines": [1, 2, 3], "total": 1})
    charge = ids_of(conn, task)["charge"][0]
    assert results_of(conn, charge)["error"]["code"] == "54000"
    # still too many: judged again, fails again (not stuck, not expanded)
    assert conn.execute("SELECT tasker_core.retry_task(%s)", (task,)).fetchone()[0] == 1
    assert results_of(conn, charge)["error"]["code"] == "54000"
    assert task_state(conn, task) == "error"
    assert_consistent(conn)
    conn.execute("SET tasker_core.max_map_elements = 3")
    conn.execute("SELECT tasker_core.retry_task(%s)", (task,))
    drain(conn)
    assert task_state(conn, task) == "complete"
    assert results_of(conn, charge) == [{}, {}, {}]
    assert_consistent(conn)


def test_retry_of_failed_map_with_a_conditional_sibling_rejudged(conn):
    """A task whose map failed and whose other dynamic step was judged Run and ran: the retry
    must not re-judge (re-run) what already ran."""
    task = create(conn, "order", {"gift": True})
    (fetch, *_), = claim(conn)
    complete(conn, fetch, {"lines": None, "total": 500})
    names = sorted(r[1] for r in claim(conn))
    assert names == ["gift_note"]
    note = ids_of(conn, task)["gift_note"][0]
    # the note fails for good too (retries used up)
    conn.execute("SELECT tasker_core.fail_step(%s, 'w', '\"x\"'::jsonb, false)", (note,))
    assert task_state(conn, task) == "error"
    conn.execute("UPDATE tasker_workflow_steps SET results = %s::jsonb WHERE workflow_step_id = %s",
                 (json.dumps({"lines": [1], "total": 500}), ids_of(conn, task)["fetch"][0]))
    conn.execute("SELECT tasker_core.retry_task(%s)", (task,))
    assert_consistent(conn)
    drain(conn)
    assert task_state(conn, task) == "complete"
    assert_consistent(conn)


# ---------------------------------------------------------------------------------------
# 2. operator calls on dynamic steps


def test_resolve_a_mapped_map_step_while_instances_run(conn):
    task = create(conn, "items", {"items": [1, 2, 3]})
    (fetch, *_), = claim(conn)
    complete(conn, fetch, {})
    held = claim(conn)
    assert len(held) == 3
    map_step = ids_of(conn, task)["double"][0]
    complete(conn, held[0][0], {"i": 0})
    conn.execute("SELECT tasker_core.resolve_step_manually(%s, '{\"by\": \"op\"}')", (map_step,))
    assert_consistent(conn)
    # the dependent is ready now and sees the operator's results
    rows = claim(conn)
    assert [(r[1], r[3]) for r in rows] == [("total", {"double": {"by": "op"}})]
    complete(conn, rows[0][0], {})
    # the instances still held finish; the task ends complete, the map step untouched
    for step, *_ in held[1:]:
        complete(conn, step, {"late": True})
    assert task_state(conn, task) == "complete"
    assert results_of(conn, map_step) == {"by": "op"}
    assert_consistent(conn)


def test_resolve_an_unjudged_conditional_then_its_parent_completes(conn):
    task = create(conn, "order", {"gift": True})
    ids = ids_of(conn, task)
    conn.execute("SELECT tasker_core.resolve_step_manually(%s, '{\"note\": \"op\"}')", (ids["gift_note"][0],))
    assert_consistent(conn)
    # wrap depended only on the (resolved, not skipped) note: it is ready with fetch
    rows = claim(conn)
    assert sorted(r[1] for r in rows) == ["fetch", "wrap"]
    for step, name, _, parents in rows:
        complete(conn, step, {"lines": [1], "total": 500} if name == "fetch" else {"p": parents})
    assert_consistent(conn)
    drain(conn, lambda n, i, p: {"p": p} if n == "wrap" else {})
    s = states(conn, task)
    assert s["gift_note"] == ["resolved_manually"] and s["wrap"] == ["complete"], s
    assert task_state(conn, task) == "complete"
    assert_consistent(conn)


def test_resolve_an_instance_that_is_claimed(conn):
    task = create(conn, "items", {"items": ["a", "b"]})
    (fetch, *_), = claim(conn)
    complete(conn, fetch, {})
    (a, *_), (b, *_) = claim(conn)
    complete(conn, a, {"x": "a"})
    conn.execute("SELECT tasker_core.resolve_step_manually(%s, '{\"x\": \"op\"}')", (b,))
    assert_consistent(conn)
    (total, name, _, parents), = claim(conn)
    assert parents == {"double": [{"x": "a"}, {"x": "op"}]}
    # the worker holding b reports late: lease lost, nothing changes
    assert sqlstate_of(conn, "SELECT tasker_core.complete_step(%s, 'w', '{}')", (b,)) == "TK030"
    complete(conn, total, {})
    assert task_state(conn, task) == "complete"
    assert_consistent(conn)


def test_cancel_while_instances_claimed_then_batch_reports_lease_lost(conn):
    task = create(conn, "items", {"items": list(range(6))})
    (fetch, *_), = claim(conn)
    complete(conn, fetch, {})
    held = claim(conn)
    before = conn.execute("SELECT count(*) FROM tasker_workflow_step_transitions").fetchone()[0]
    assert conn.execute("SELECT tasker_core.cancel_task(%s)", (task,)).fetchone()[0] == 8
    mid = conn.execute("SELECT count(*) FROM tasker_workflow_step_transitions").fetchone()[0]
    outcomes = [{"step_id": s, "results": {}} for s, *_ in held[:3]] + \
               [{"step_id": s, "error": "x", "retryable": False} for s, *_ in held[3:]]
    rows = conn.execute("SELECT workflow_step_id, outcome FROM tasker_core.report_steps('w', %s::jsonb)",
                        (json.dumps(outcomes),)).fetchall()
    assert {o for _, o in rows} == {"lease_lost"}
    assert conn.execute("SELECT count(*) FROM tasker_workflow_step_transitions").fetchone()[0] == mid > before
    assert task_state(conn, task) == "cancelled"
    assert sqlstate_of(conn, "SELECT tasker_core.retry_task(%s)", (task,)) == "TK002"
    conn.execute("SELECT tasker_core.tick()")
    assert task_state(conn, task) == "cancelled"
    assert_consistent(conn)


# ---------------------------------------------------------------------------------------
# 3. concurrency

RACE = {"name": "race", "namespace_name": "dyn", "version": "1.0.0",
        "step_templates": [
            {"name": "p", "handler_class": "P"},
            {"name": "b", "handler_class": "B"},
            {"name": "a", "handler_class": "A", "depends_on_step": "p",
             "condition": {"path": "/context/go", "eq": True}},
            {"name": "c", "handler_class": "C", "depends_on_steps": ["a", "b"], "skip_with": ["a"]},
            {"name": "m", "handler_class": "M", "depends_on_steps": ["a", "b"], "skip_with": ["a"],
             "map": {"over": "/parents/b/items"}},
            {"name": "d", "handler_class": "D", "depends_on_steps": ["c", "m"]}]}


def run_concurrently(db, jobs):
    """Runs each job(conn) in its own thread and connection at once; returns the errors."""
    errors = []
    barrier = threading.Barrier(len(jobs))

    def run(job):
        try:
            with db.connect() as c:
                barrier.wait(10)
                job(c)
        except Exception as e:  # reported by the caller
            errors.append(repr(e) + " " + str(getattr(e, "sqlstate", "")))

    threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


@pytest.mark.parametrize("go", [False, True])
def test_skip_cascade_races_the_other_parents_completion(conn, go):
    register(conn, RACE)
    for k in range(15):
        task = create(conn, "race", {"go": go})
        ids = ids_of(conn, task)
        rows = conn.execute("SELECT workflow_step_id, worker_id FROM tasker_core.step_claims").fetchall()
        assert rows == []
        got = {r[1]: r[0] for r in claim(conn, 10, "w")}
        assert set(got) == {"p", "b"}
        errors = run_concurrently(conn.db, [
            lambda c: complete(c, got["p"], {}),
            lambda c: complete(c, got["b"], {"items": [1, 2]}),
        ])
        assert errors == [], errors
        s = states(conn, task)
        if not go:
            assert s["a"] == ["resolved_manually"] and s["c"] == ["resolved_manually"], (k, s)
            assert s["m"] == ["resolved_manually"], (k, s)
            for name in ("a", "c", "m"):
                assert step_transitions(conn, ids[name][0]) == ["resolved_manually"], (k, name)
            skipped = [e for e in events(conn, task, ("step.skipped",))]
            assert len(skipped) == 3, (k, skipped)
        else:
            # a is ready; c and m still wait for it
            assert s["a"] == ["pending"] and s["c"] == ["pending"], (k, s)
        drain(conn)
        assert task_state(conn, task) == "complete", (k, states(conn, task))
        if go:
            assert len(events(conn, task, ("step.map_expanded",))) == 1
    assert_consistent(conn)


SEVERAL = {"name": "several", "namespace_name": "dyn", "version": "1.0.0",
           "step_templates": [
               {"name": "fetch", "handler_class": "F"},
               {"name": "m1", "handler_class": "M1", "map": {"over": "/context/xs"}},
               {"name": "m2", "handler_class": "M2", "depends_on_step": "fetch", "map": {"over": "/context/ys"}},
               {"name": "m3", "handler_class": "M3", "depends_on_step": "fetch",
                "map": {"over": "/parents/fetch/zs"}},
               {"name": "end", "handler_class": "E", "depends_on_steps": ["m1", "m2", "m3"]}]}


def test_batches_mixing_instances_of_several_maps_and_failures(conn):
    import random
    register(conn, SEVERAL)
    n = 60
    tasks = [create(conn, "several", {"xs": list(range(n)), "ys": list(range(n))}) for _ in range(2)]
    lock = threading.Lock()
    ran = []
    fan_in = []
    failed_once = set()

    def handler(name, inputs):
        if name == "fetch":
            return {"zs": list(range(n))}
        if name == "end":
            return {}
        return {"name": name, "i": inputs["index"]}

    def worker(k):
        def job(c):
            rng = random.Random(k)
            idle = 0
            pending = []
            while idle < 60:
                rows = c.execute(
                    "SELECT outcome, workflow_step_id, step_name, inputs, parent_results FROM "
                    "tasker_core.report_and_claim(%s, %s::jsonb, NULL, 7, 60)",
                    (f"w{k}", json.dumps(pending))).fetchall()
                pending = []
                got = [r for r in rows if r[0] == "claimed"]
                bad = [r for r in rows if r[0] not in ("claimed", "completed", "failed")]
                assert not bad, bad
                if not got:
                    if all(c.execute("SELECT complete FROM tasker_tasks WHERE task_id = %s", (t,)).fetchone()[0]
                           for t in tasks):
                        return
                    idle += 1
                    c.execute("SELECT pg_sleep(0.02)")
                    continue
                idle = 0
                for _, step, name, inputs, parents in got:
                    if name == "end":
                        with lock:
                            fan_in.append(parents)
                    if name != "end" and step not in failed_once and rng.random() < 0.15:
                        with lock:
                            failed_once.add(step)
                        pending.append({"step_id": step, "error": "flaky", "retryable": True,
                                        "retry_after_seconds": 0})
                    else:
                        with lock:
                            ran.append(step)
                        pending.append({"step_id": step, "results": handler(name, inputs)})
                rng.shuffle(pending)
        return job

    errors = run_concurrently(conn.db, [worker(k) for k in range(6)])
    assert errors == [], errors[:3]
    for t in tasks:
        assert task_state(conn, t) == "complete", states(conn, t)
    assert len(ran) == len(set(ran))
    assert len(fan_in) == 2
    for parents in fan_in:
        for m in ("m1", "m2", "m3"):
            assert parents[m] == [{"name": m, "i": i} for i in range(n)]
    assert_consistent(conn)


# ---------------------------------------------------------------------------------------
# 4. rebuild_tracking mid-map, archive_tasks


def test_rebuild_tracking_mid_map_equals_the_maintained_state(conn):
    task = create(conn, "order", {"gift": True})
    (fetch, *_), = claim(conn)
    # an unjudged dynamic step (wrap waits for gift_note), a mapped map with some instances done
    complete(conn, fetch, {"lines": [1, 2, 3, 4], "total": 500})
    rows = claim(conn)
    inst = [r for r in rows if r[1] == "charge"]
    complete(conn, inst[0][0], {"k": 0})
    complete(conn, inst[2][0], {"k": 2})
    conn.execute("SELECT tasker_core.fail_step(%s, 'w', '\"x\"'::jsonb, true, 0)", (inst[1][0],))
    assert_consistent(conn)
    before = conn.execute("SELECT to_jsonb(s) FROM tasker_core.step_state s WHERE task_id = %s "
                          "ORDER BY workflow_step_id", (task,)).fetchall()
    conn.execute("SELECT tasker_core.rebuild_tracking()")
    after = conn.execute("SELECT to_jsonb(s) FROM tasker_core.step_state s WHERE task_id = %s "
                         "ORDER BY workflow_step_id", (task,)).fetchall()
    assert before == after
    assert_consistent(conn)
    for step, name, inputs, _ in rows:
        if step not in (inst[0][0], inst[1][0], inst[2][0]):
            complete(conn, step, {"k": inputs["index"]} if name == "charge" else {})
    drain(conn, lambda n, i, p: {"k": i["index"]} if n == "charge" else {})
    assert task_state(conn, task) == "complete", states(conn, task)
    assert results_of(conn, ids_of(conn, task)["charge"][0]) == [{"k": i} for i in range(4)]
    assert_consistent(conn)


def test_archive_finished_dynamic_tasks(conn):
    t1 = create(conn, "order", {"gift": False})
    t2 = create(conn, "items", {"items": [1, 2]})
    t3 = create(conn, "items", {"items": [1, 2, 3]})
    drain(conn, lambda n, i, p: {"lines": [1, 2], "total": 1} if n == "fetch" else {})
    assert task_state(conn, t1) == task_state(conn, t2) == "complete"
    # t3 cancelled mid-run (created after; drained too) -> create another, cancel it mid-map
    t4 = create(conn, "items", {"items": [1, 2, 3]})
    (f, *_), = claim(conn)
    complete(conn, f, {})
    claim(conn, 1)
    conn.execute("SELECT tasker_core.cancel_task(%s)", (t4,))
    conn.execute("CALL tasker_core.archive_tasks(interval '0', 100)")
    left = conn.execute("SELECT count(*) FROM tasker_tasks").fetchone()[0]
    assert left == 0, left
    for table in ("tasker_core.dynamic_steps", "tasker_core.step_state", "tasker_core.step_claims",
                  "tasker_workflow_steps", "tasker_workflow_step_edges"):
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0, table
    assert_consistent(conn)


# ---------------------------------------------------------------------------------------
# 5. odd JSON: what the judge reads (task context, parents' results) when it was written by
# something other than the worker protocol (Rails, an application, an operator's UPDATE)

TWO = {"name": "two", "namespace_name": "dyn", "version": "1.0.0",
       "step_templates": [
           {"name": "p1", "handler_class": "P"},
           {"name": "p2", "handler_class": "P"},
           {"name": "c", "handler_class": "C", "depends_on_steps": ["p1", "p2"],
            "condition": {"path": "/parents/p2/ok", "eq": True}},
           {"name": "after", "handler_class": "A", "depends_on_step": "c"}]}


def deep(n):
    return "[" * n + "1" + "]" * n


def finish_outside_the_protocol(c, step, results_sql):
    """What an application does: writes the step's results and transitions itself."""
    c.execute("SELECT tasker_core.release_step(%s, 'w')", (step,))
    c.execute(f"UPDATE tasker_workflow_steps SET results = {results_sql} WHERE workflow_step_id = %s", (step,))
    c.execute("SELECT tasker_core.transition_step(%s, 'pending')", (step,))
    c.execute("SELECT tasker_core.transition_step(%s, 'in_progress')", (step,))
    c.execute("SELECT tasker_core.transition_step(%s, 'complete')", (step,))


@pytest.mark.parametrize("results_sql", [
    f"'{{\"deep\": {deep(200)}}}'::jsonb",      # deeper than serde's 128 levels
    "'{\"big\": 1e400}'::jsonb",                   # a number serde_json cannot hold
], ids=["deep", "big_number"])
def test_a_parent_written_by_the_application_does_not_break_the_other_parents_completion(conn, results_sql):
    """p1 finished by the application with a document jsonb accepts; a worker then completes
    p2, which judges c (reading every parent's results). Expected: p2's completion succeeds
    (or a documented error), never an internal error (XX000, a Rust panic)."""
    register(conn, TWO)
    task = create(conn, "two", {})
    got = {r[1]: r[0] for r in claim(conn)}
    finish_outside_the_protocol(conn, got["p1"], results_sql)
    state = sqlstate_of(conn, "SELECT tasker_core.complete_step(%s, 'w', '{\"ok\": true}')", (got["p2"],))
    assert state is None, f"complete_step raised {state}"
    assert states(conn, task)["c"] == ["pending"]
    assert [r[1] for r in claim(conn)] == ["c"]


@pytest.mark.parametrize("results_sql", [
    f"'{{\"lines\": [1], \"deep\": {deep(200)}}}'::jsonb",
    "'{\"lines\": [1], \"big\": 1e400}'::jsonb",
], ids=["deep", "big_number"])
def test_tick_judging_a_step_whose_parent_holds_an_odd_document(conn, results_sql):
    """fetch finished by the application (tick() judges its dependents). tick() is global: if
    judging one task raises, no lease expires and no backoff is announced for any task."""
    other = create(conn, "items", {"items": [1]})
    task = create(conn, "order", {"gift": True})
    # a step of another task whose lease expires: tick() fails it so it can be claimed again
    (held, *_), = conn.execute("SELECT workflow_step_id FROM tasker_core.claim_steps('w2', NULL, 1, 1)").fetchall()
    assert held in ids_of(conn, other)["fetch"]
    (fetch, *_), = claim(conn)
    assert fetch in ids_of(conn, task)["fetch"]
    finish_outside_the_protocol(conn, fetch, results_sql)
    conn.execute("SELECT pg_sleep(1.2)")
    state = sqlstate_of(conn, "SELECT tasker_core.tick()")
    expired = conn.execute("SELECT state FROM tasker_core.step_state WHERE workflow_step_id = %s",
                           (held,)).fetchone()[0]
    assert state is None, f"tick() raised {state}; the other task's expired lease: step {expired}"
    assert "charge" in {r[1] for r in claim(conn)}


def test_a_context_updated_by_the_application_with_a_big_number(conn):
    """The judge reads the whole task context (for any dynamic step, whatever its condition
    reads): a context jsonb accepts but serde_json cannot hold (1e400) makes the completion of
    the parent fail."""
    task = create(conn, "order", {"gift": False})
    conn.execute("UPDATE tasker_tasks SET context = context || '{\"big\": 1e400}' WHERE task_id = %s", (task,))
    (fetch, *_), = claim(conn)
    state = sqlstate_of(conn, "SELECT tasker_core.complete_step(%s, 'w', '{\"lines\": [1], \"total\": 1}')",
                        (fetch,))
    assert state is None, f"complete_step raised {state}"


# ---------------------------------------------------------------------------------------
# more races


def test_resolving_an_instance_races_the_last_other_instance(conn):
    for k in range(12):
        task = create(conn, "items", {"items": ["a", "b"]})
        ids = ids_of(conn, task)
        (fetch, *_), = [r for r in claim(conn) if r[0] == ids["fetch"][0]]
        complete(conn, fetch, {})
        (a, *_), (b, *_) = claim(conn)
        errors = run_concurrently(conn.db, [
            lambda c: complete(c, a, {"x": "a"}),
            lambda c: c.execute("SELECT tasker_core.resolve_step_manually(%s, '{\"x\": \"op\"}')", (b,)),
        ])
        assert errors == [], (k, errors)
        m = ids_of(conn, task)["double"][0]
        assert step_transitions(conn, m) == ["in_progress", "complete"], (k, step_transitions(conn, m))
        assert results_of(conn, m) == [{"x": "a"}, {"x": "op"}]
        drain(conn)
        assert task_state(conn, task) == "complete"
    assert_consistent(conn)


def test_cancel_races_many_workers_on_a_map(conn):
    for k in range(4):
        task = create(conn, "items", {"items": list(range(200))})
        (fetch, *_), = [r for r in claim(conn) if r[1] == "fetch"]
        complete(conn, fetch, {})
        stop = threading.Event()

        def worker(i):
            def job(c):
                while not stop.is_set():
                    rows = claim(c, 4, f"w{i}")
                    if not rows:
                        return
                    outcomes = [{"step_id": s, "results": {"i": inp["index"]}} for s, n, inp, _ in rows]
                    got = c.execute("SELECT outcome FROM tasker_core.report_steps(%s, %s::jsonb)",
                                    (f"w{i}", json.dumps(outcomes))).fetchall()
                    assert {g[0] for g in got} <= {"completed", "lease_lost"}, got
            return job

        def canceller(c):
            c.execute("SELECT pg_sleep(0.05 * %s)", (k,))
            c.execute("SELECT tasker_core.cancel_task(%s)", (task,))

        errors = run_concurrently(conn.db, [worker(i) for i in range(6)] + [canceller])
        stop.set()
        assert errors == [], errors[:3]
        assert task_state(conn, task) in ("cancelled", "complete")
        conn.execute("SELECT tasker_core.tick()")
        assert claim(conn) == []
        assert_consistent(conn)


def test_retry_task_reruns_a_conditional_step_that_ran_and_failed(conn):
    """README: retry_task puts every step in error back to pending (retried), and judges again
    "a failed map step". A conditional step that was judged, ran and failed is an ordinary
    failed step by then: retried, not judged a second time (which may skip it instead)."""
    task = create(conn, "order", {"gift": True})
    (fetch, *_), = claim(conn)
    complete(conn, fetch, {"lines": [], "total": 500})
    (note, name, *_), = claim(conn)
    assert name == "gift_note"
    conn.execute("SELECT tasker_core.fail_step(%s, 'w', '\"x\"'::jsonb, false)", (note,))
    assert task_state(conn, task) == "error"
    # the context changes after the step ran (an application's update)
    conn.execute("UPDATE tasker_tasks SET context = '{\"gift\": false}' WHERE task_id = %s", (task,))
    conn.execute("SELECT tasker_core.retry_task(%s)", (task,))
    s = states(conn, task)
    assert s["gift_note"] == ["pending"], s
    assert [r[1] for r in claim(conn)] == ["gift_note"]


ODD = {"name": "odd", "namespace_name": "dyn", "version": "1.0.0",
       "step_templates": [
           {"name": "p", "handler_class": "P"},
           {"name": "eq_big", "handler_class": "X", "depends_on_step": "p",
            "condition": {"path": "/parents/p/id", "eq": 9007199254740993}},
           {"name": "str_num", "handler_class": "X", "depends_on_step": "p",
            "condition": {"path": "/parents/p/n", "gt": 1}},
           {"name": "on_null", "handler_class": "X", "depends_on_step": "p",
            "condition": {"path": "/parents/p/nothing/deeper", "exists": False}},
           {"name": "arr_idx", "handler_class": "X", "depends_on_step": "p",
            "condition": {"path": "/parents/p/arr/1", "eq": "b"}},
           {"name": "in_obj", "handler_class": "X", "depends_on_step": "p",
            "condition": {"path": "/parents/p/obj", "in": [{"a": 1.0}]}},
           {"name": "whole", "handler_class": "X", "depends_on_step": "p",
            "condition": {"path": "/parents/p", "eq": None}},
           {"name": "map_null", "handler_class": "X", "depends_on_step": "p",
            "map": {"over": "/parents/p/nothing"}}]}


def test_conditions_on_odd_json(conn):
    register(conn, ODD)
    task = create(conn, "odd", {})
    (p, *_), = claim(conn)
    complete(conn, p, {"id": 9007199254740992, "n": "5", "nothing": None, "arr": ["a", "b"],
                       "obj": {"a": 1}})
    s = states(conn, task)
    # 9007199254740992 is not 9007199254740993
    got = {n: s[n][0] for n in ("eq_big", "str_num", "on_null", "arr_idx", "in_obj", "whole")}
    assert got == {"eq_big": "resolved_manually", "str_num": "resolved_manually", "on_null": "pending",
                   "arr_idx": "pending", "in_obj": "pending", "whole": "resolved_manually"}, got
    err = results_of(conn, ids_of(conn, task)["map_null"][0])
    assert err["error"]["code"] == "TK025" and "null" in err["error"]["message"]


NORETRY = {"name": "noretry", "namespace_name": "dyn", "version": "1.0.0",
           "step_templates": [
               {"name": "fetch", "handler_class": "F"},
               {"name": "each", "handler_class": "E", "depends_on_step": "fetch", "default_retryable": False,
                "default_retry_limit": 1, "map": {"over": "/parents/fetch/xs"}}]}


def test_instances_after_retry_of_a_failed_map_keep_the_templates_retry_policy(conn):
    """The instances copy the map step's retryable and retry_limit. fail_map marks the map step
    not retryable and retry_task makes it retryable again: the instances of the second
    expansion should still have the template's policy (as those of a first expansion do)."""
    register(conn, NORETRY)
    ok = create(conn, "noretry", {})
    (f, *_), = claim(conn)
    complete(conn, f, {"xs": [1]})
    normal = conn.execute("SELECT DISTINCT retryable, retry_limit FROM tasker_workflow_steps "
                          "WHERE task_id = %s AND inputs ? 'element'", (ok,)).fetchall()
    assert normal == [(False, 1)]
    drain(conn)
    task = create(conn, "noretry", {})
    (f, *_), = claim(conn)
    complete(conn, f, {"xs": "no"})
    conn.execute("UPDATE tasker_workflow_steps SET results = '{\"xs\": [1, 2]}' WHERE workflow_step_id = %s", (f,))
    conn.execute("SELECT tasker_core.retry_task(%s)", (task,))
    after = conn.execute("SELECT DISTINCT retryable, retry_limit FROM tasker_workflow_steps "
                         "WHERE task_id = %s AND inputs ? 'element'", (task,)).fetchall()
    assert after == normal


def test_resolving_a_failed_map_step_lets_the_task_finish(conn):
    task = create(conn, "order", {"gift": False})
    (fetch, *_), = claim(conn)
    complete(conn, fetch, {"lines": 7, "total": 1})
    charge = ids_of(conn, task)["charge"][0]
    assert task_state(conn, task) == "error"
    conn.execute("SELECT tasker_core.resolve_step_manually(%s, '[\"by op\"]')", (charge,))
    (ship, name, _, parents), = claim(conn)
    assert name == "ship" and parents["charge"] == ["by op"]
    complete(conn, ship, {})
    assert task_state(conn, task) == "complete"
    assert_consistent(conn)


def test_a_map_over_a_skipped_parent_not_in_skip_with(conn):
    register(conn, {"name": "mapskip", "namespace_name": "dyn", "version": "1.0.0",
                    "step_templates": [
                        {"name": "maybe", "handler_class": "M", "condition": {"path": "/context/go", "eq": True}},
                        {"name": "each", "handler_class": "E", "depends_on_step": "maybe",
                         "map": {"over": "/parents/maybe/xs"}},
                        {"name": "end", "handler_class": "E", "depends_on_step": "each"}]})
    task = create(conn, "mapskip", {"go": False})
    s = states(conn, task)
    # skipped (not TK025), with a reason naming the step; end runs (each not in its skip_with)
    assert s["each"] == ["resolved_manually"], s
    reasons = [p["reason"] for _, _, p in events(conn, task, ("step.skipped",))]
    assert reasons[-1] == "the step it maps over (maybe) was skipped"
    (end, name, _, parents), = claim(conn)
    assert parents == {"each": None}
    complete(conn, end, {})
    assert task_state(conn, task) == "complete"
    assert_consistent(conn)


def test_one_batch_finishing_both_parents_of_a_skip_cascade(conn):
    register(conn, RACE)
    task = create(conn, "race", {"go": False})
    got = {r[1]: r[0] for r in claim(conn)}
    rows = conn.execute("SELECT workflow_step_id, outcome FROM tasker_core.report_steps('w', %s::jsonb)",
                        (json.dumps([{"step_id": got["b"], "results": {"items": [1]}},
                                     {"step_id": got["p"], "results": {}}]),)).fetchall()
    assert {o for _, o in rows} == {"completed"}
    s = states(conn, task)
    assert s["a"] == s["c"] == s["m"] == ["resolved_manually"], s
    drain(conn)
    assert task_state(conn, task) == "complete"
    assert_consistent(conn)


CROSS = {"name": "cross", "namespace_name": "dyn", "version": "1.0.0",
         "step_templates": [
             {"name": "papp", "handler_class": "P"},
             {"name": "x", "handler_class": "X"},
             {"name": "y", "handler_class": "Y"},
             # judged when papp finishes: papp is finished by the application (tick() judges d)
             {"name": "d", "handler_class": "D", "depends_on_step": "papp",
              "condition": {"path": "/context/go", "eq": True}},
             {"name": "e", "handler_class": "E", "depends_on_step": "x",
              "condition": {"path": "/context/go", "eq": True}},
             {"name": "g", "handler_class": "G", "depends_on_step": "y",
              "condition": {"path": "/context/go", "eq": True}},
             {"name": "k", "handler_class": "K", "depends_on_steps": ["x", "d"]},
             {"name": "f", "handler_class": "F", "depends_on_steps": ["y", "d"], "skip_with": ["d"]}]}


def test_two_completions_judging_a_step_left_due_by_the_application(conn):
    """d was made due by an application's transition_step (left for tick()). Two workers
    complete x and y at once; each completion makes a dynamic step due (e, g), so each
    finalizer judges every due step of the task, d included, locking d's rows and its
    children's (k, held by x's completion; f, held by y's) while holding its own. Expected:
    both completions succeed (no 40P01 reaching a worker)."""
    register(conn, CROSS)
    failures = []
    for k in range(8):
        task = create(conn, "cross", {"go": True})
        got = {r[1]: r[0] for r in claim(conn)}
        assert set(got) == {"papp", "x", "y"}
        finish_outside_the_protocol(conn, got["papp"], "'{}'::jsonb")
        errors = run_concurrently(conn.db, [
            lambda c: complete(c, got["x"], {}),
            lambda c: complete(c, got["y"], {}),
        ])
        failures += errors
        conn.execute("SELECT tasker_core.tick()")
        drain(conn)
        conn.execute("SELECT tasker_core.tick()")
        drain(conn)
    assert failures == [], failures


def test_a_root_map_over_the_context_with_a_condition_and_no_array(conn):
    """A map step with a condition may never run, so create_task does not require its input
    (README): the task is created, and the map step fails when it is judged (TK025)."""
    register(conn, {"name": "rootcond", "namespace_name": "dyn", "version": "1.0.0",
                    "step_templates": [{"name": "each", "handler_class": "E", "map": {"over": "/context/xs"},
                                        "condition": {"path": "/context/go", "eq": True}}]})
    skipped = create(conn, "rootcond", {"go": False, "xs": "no"})
    assert states(conn, skipped)["each"] == ["resolved_manually"]
    assert task_state(conn, skipped) == "complete"
    task = create(conn, "rootcond", {"go": True, "xs": "no"})
    (each,) = ids_of(conn, task)["each"]
    assert results_of(conn, each)["error"]["code"] == "TK025"
    assert task_state(conn, task) == "error"
    assert_consistent(conn)


@pytest.mark.parametrize("member_sql", [f"'{deep(200)}'::jsonb", "'1e400'::jsonb"], ids=["deep", "big_number"])
def test_a_member_the_rule_reads_that_cannot_be_read_fails_the_step(conn, member_sql):
    """The member a condition reads was written by the application and serde cannot hold it:
    the step fails for good with TK026 naming the document (no internal error, nothing stuck),
    and retry_task judges it again once the document is fixed."""
    task = create(conn, "order", {"gift": True})
    (fetch, *_), = claim(conn)
    finish_outside_the_protocol(conn, fetch, f"jsonb_build_object('lines', '[]'::jsonb, 'total', {member_sql})")
    conn.execute("SELECT tasker_core.tick()")
    note = ids_of(conn, task)["gift_note"][0]
    error = results_of(conn, note)["error"]
    assert error["code"] == "TK026" and error["message"].startswith("the results of fetch cannot be read")
    assert task_state(conn, task) == "error"
    assert_consistent(conn)
    conn.execute("UPDATE tasker_workflow_steps SET results = '{\"lines\": [], \"total\": 500}' "
                 "WHERE workflow_step_id = %s", (fetch,))
    conn.execute("SELECT tasker_core.retry_task(%s)", (task,))
    drain(conn)
    assert states(conn, task)["gift_note"] == ["complete"]
    assert task_state(conn, task) == "complete"
    assert_consistent(conn)
