"""Dynamic workflows: map steps, conditional steps and skips that cascade, through the SQL
surface on a real cluster with real concurrent workers."""
import collections
import json
import threading

import psycopg
import pytest

from conftest import sqlstate_of

ITEMS = {"name": "items", "namespace_name": "dyn", "version": "1.0.0",
         "step_templates": [
             {"name": "fetch", "handler_class": "Fetch"},
             {"name": "double", "handler_class": "Double", "depends_on_step": "fetch",
              "map": {"over": "/context/items"}},
             {"name": "total", "handler_class": "Total", "depends_on_step": "double"}]}

ORDER = {"name": "order", "namespace_name": "dyn", "version": "1.0.0",
         "step_templates": [
             {"name": "fetch", "handler_class": "Fetch"},
             {"name": "charge", "handler_class": "Charge", "depends_on_step": "fetch",
              "map": {"over": "/parents/fetch/lines"}},
             {"name": "gift_note", "handler_class": "Note", "depends_on_step": "fetch",
              "condition": {"all": [{"path": "/context/gift", "eq": True},
                                    {"path": "/parents/fetch/total", "gt": 100}]}},
             # skipped with the note
             {"name": "wrap", "handler_class": "Wrap", "depends_on_step": "gift_note",
              "skip_with": ["gift_note"]},
             # runs anyway: a skipped dependency not in skip_with counts as satisfied
             {"name": "ship", "handler_class": "Ship", "depends_on_steps": ["charge", "wrap"]}]}


@pytest.fixture
def conn(tasker_db):
    with tasker_db.connect() as c:
        c.execute("SELECT tasker_core.enable_tracking()")
        for t in (ITEMS, ORDER):
            register(c, t)
        c.db = tasker_db
        yield c


def register(c, t):
    c.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (json.dumps(t),))


def create(c, name, context, namespace="dyn", options=None):
    return c.execute("SELECT tasker_core.create_task(%s, %s, NULL, %s::jsonb, %s::jsonb)",
                     (namespace, name, json.dumps(context), json.dumps(options or {}))).fetchone()[0]


def claim(c, n=10, worker="w"):
    """(step id, step name, inputs, parent_results) of the steps claimed."""
    return c.execute("SELECT workflow_step_id, step_name, inputs, parent_results "
                     "FROM tasker_core.claim_steps(%s, NULL, %s, 60)", (worker, n)).fetchall()


def complete(c, step, results, worker="w"):
    c.execute("SELECT tasker_core.complete_step(%s, %s, %s::jsonb)", (step, worker, json.dumps(results)))


def states(c, task):
    """{name: [state, ...]} of the task's steps, in id order."""
    out = collections.defaultdict(list)
    for name, state in c.execute(
            "SELECT name, COALESCE(state, 'pending') FROM tasker_core.step_state WHERE task_id = %s "
            "ORDER BY workflow_step_id", (task,)):
        out[name].append(state)
    return dict(out)


def task_state(c, task):
    return c.execute("SELECT to_state FROM tasker_task_transitions WHERE task_id = %s AND most_recent",
                     (task,)).fetchone()[0]


def assert_consistent(c):
    assert c.execute("SELECT * FROM tasker_core.verify()").fetchall() == []
    assert c.execute("SELECT * FROM tasker_core.check_tracking()").fetchall() == []


def run_task(c, handlers, worker="w"):
    """Claims and completes steps until none is ready; `handlers[name](inputs, parents)` gives
    each step's results."""
    while True:
        rows = claim(c, 10, worker)
        if not rows:
            return
        for step, name, inputs, parents in rows:
            complete(c, step, handlers[name](inputs, parents), worker)


def test_map_over_1000_elements_with_8_workers(conn):
    items = list(range(1000))
    task = create(conn, "items", {"items": items})
    ran = collections.Counter()
    fan_in = []
    lock = threading.Lock()
    errors = []

    def worker(k):
        try:
            with conn.db.connect() as c:
                idle = 0
                while idle < 50:
                    rows = claim(c, 5, f"w{k}")
                    if not rows:
                        done = c.execute("SELECT complete FROM tasker_tasks WHERE task_id = %s",
                                         (task,)).fetchone()[0]
                        if done:
                            return
                        idle += 1
                        c.execute("SELECT pg_sleep(0.02)")
                        continue
                    idle = 0
                    for step, name, inputs, parents in rows:
                        with lock:
                            ran[step] += 1
                        if name == "double":
                            results = {"doubled": inputs["element"] * 2, "index": inputs["index"]}
                        elif name == "total":
                            with lock:
                                fan_in.append(parents["double"])
                            results = {"n": len(parents["double"])}
                        else:
                            results = {}
                        complete(c, step, results, f"w{k}")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert task_state(conn, task) == "complete"
    s = states(conn, task)
    # the map step and one instance per element, each run exactly once (the map step itself
    # is never handed to a worker)
    assert len(s["double"]) == 1001 and set(s["double"]) == {"complete"}
    map_step, instances = conn.execute(
        "SELECT min(workflow_step_id), array_agg(workflow_step_id ORDER BY workflow_step_id) "
        "FILTER (WHERE inputs ? 'element') FROM tasker_workflow_steps WHERE task_id = %s "
        "AND named_step_id = (SELECT named_step_id FROM tasker_core.step_state WHERE task_id = %s "
        "AND name = 'double' LIMIT 1)", (task, task)).fetchone()
    assert map_step not in ran
    assert all(ran[i] == 1 for i in instances) and len(instances) == 1000
    assert conn.execute("SELECT count(*) FROM tasker_workflow_step_transitions t "
                        "WHERE t.workflow_step_id = ANY (%s) AND to_state = 'in_progress'",
                        (instances,)).fetchone()[0] == 1000
    # the fan-in ran once and saw 1,000 results in element order
    assert len(fan_in) == 1
    assert fan_in[0] == [{"doubled": 2 * i, "index": i} for i in items]
    assert_consistent(conn)


def test_failing_instance_is_retried_while_others_succeed(conn):
    task = create(conn, "items", {"items": ["a", "b", "c", "d"]})
    (fetch,), = [(r[0],) for r in claim(conn)]
    complete(conn, fetch, {})
    rows = claim(conn)
    assert sorted(r[2]["element"] for r in rows) == ["a", "b", "c", "d"]
    failed = None
    for step, name, inputs, _ in rows:
        if inputs["element"] == "c":
            failed = step
            conn.execute("SELECT tasker_core.fail_step(%s, 'w', '{\"boom\": 1}'::jsonb, true, 0)", (step,))
        else:
            complete(conn, step, {"got": inputs["element"]})
    # the map step waits for the failed instance; the others are done
    assert states(conn, task)["double"].count("complete") == 3
    assert task_state(conn, task) == "in_progress"
    (step, name, inputs, _), = claim(conn)
    assert (step, inputs) == (failed, {"element": "c", "index": 2})
    complete(conn, step, {"got": "c", "attempt": 2})
    (total, name, _, parents), = claim(conn)
    assert name == "total"
    assert parents["double"] == [{"got": "a"}, {"got": "b"}, {"got": "c", "attempt": 2}, {"got": "d"}]
    complete(conn, total, {})
    assert task_state(conn, task) == "complete"
    assert conn.execute("SELECT attempts FROM tasker_workflow_steps WHERE workflow_step_id = %s",
                        (failed,)).fetchone()[0] == 2
    assert_consistent(conn)


def test_permanent_failure_of_an_instance_fails_the_task(conn):
    task = create(conn, "items", {"items": [1, 2]})
    (fetch, *_), = claim(conn)
    complete(conn, fetch, {})
    (a, *_), (b, *_) = claim(conn)
    complete(conn, a, {})
    conn.execute("SELECT tasker_core.fail_step(%s, 'w', '\"bad\"'::jsonb, false)", (b,))
    assert task_state(conn, task) == "error"
    assert claim(conn) == []
    assert_consistent(conn)


def order_handlers(total):
    return {"fetch": lambda i, p: {"lines": [{"sku": "x"}, {"sku": "y"}], "total": total},
            "charge": lambda i, p: {"charged": i["element"]["sku"]},
            "gift_note": lambda i, p: {"note": True},
            "wrap": lambda i, p: {"wrapped": True},
            "ship": lambda i, p: {"shipped": p}}


def test_condition_skips_a_branch_and_its_dependents(conn):
    task = create(conn, "order", {"gift": True})
    run_task(conn, order_handlers(total=50))  # the note needs total > 100: skipped
    assert task_state(conn, task) == "complete"
    s = states(conn, task)
    assert s["gift_note"] == ["resolved_manually"] and s["wrap"] == ["resolved_manually"]
    assert s["ship"] == ["complete"] and s["charge"] == ["complete"] * 3
    meta = conn.execute(
        "SELECT ns.name, t.metadata FROM tasker_workflow_step_transitions t "
        "JOIN tasker_workflow_steps ws USING (workflow_step_id) "
        "JOIN tasker_named_steps ns USING (named_step_id) "
        "WHERE ws.task_id = %s AND t.to_state = 'resolved_manually' ORDER BY ns.name", (task,)).fetchall()
    assert [(n, m["skipped"]) for n, m in meta] == [("gift_note", True), ("wrap", True)]
    assert meta[0][1]["reason"] == "its condition is false"
    assert "gift_note" in meta[1][1]["reason"]
    events = conn.execute("SELECT name, payload FROM tasker_core.events WHERE task_id = %s "
                          "AND name IN ('step.skipped', 'step.map_expanded') ORDER BY id", (task,)).fetchall()
    assert [e[0] for e in events] == ["step.map_expanded", "step.skipped", "step.skipped"]
    assert events[0][1]["instances"] == 2
    # ship saw the charges and a skipped wrap (null results)
    ship_results = conn.execute(
        "SELECT ws.results FROM tasker_workflow_steps ws JOIN tasker_named_steps ns USING (named_step_id) "
        "WHERE ws.task_id = %s AND ns.name = 'ship'", (task,)).fetchone()[0]
    assert ship_results["shipped"] == {"charge": [{"charged": "x"}, {"charged": "y"}], "wrap": None}
    # Rails readers see valid states: every step done, none ready
    rows = conn.execute("SELECT name, current_state, ready_for_execution FROM "
                        "tasker_core.get_step_readiness_status(%s::bigint) ORDER BY workflow_step_id", (task,)).fetchall()
    assert {r[1] for r in rows} <= {"complete", "resolved_manually"} and not any(r[2] for r in rows)
    codes = {r[0]: r[1] for r in conn.execute(
        "SELECT step_name, code FROM tasker_core.explain_task(%s) WHERE code IN ('skipped', 'finished')",
        (task,))}
    assert codes["gift_note"] == "skipped" and codes["ship"] == "finished"
    assert_consistent(conn)


def test_condition_true_runs_the_branch(conn):
    task = create(conn, "order", {"gift": True})
    run_task(conn, order_handlers(total=150))
    s = states(conn, task)
    assert s["gift_note"] == ["complete"] and s["wrap"] == ["complete"]
    assert task_state(conn, task) == "complete"
    assert conn.execute("SELECT count(*) FROM tasker_core.events WHERE task_id = %s AND name = 'step.skipped'",
                        (task,)).fetchone()[0] == 0
    assert_consistent(conn)


def test_cancellation_in_the_middle_of_a_map(conn):
    task = create(conn, "items", {"items": list(range(20))})
    (fetch, *_), = claim(conn)
    complete(conn, fetch, {})
    held = claim(conn, 8)
    for step, *_ in held[:5]:
        complete(conn, step, {})
    assert conn.execute("SELECT tasker_core.cancel_task(%s)", (task,)).fetchone()[0] > 0
    assert task_state(conn, task) == "cancelled"
    s = states(conn, task)
    assert s["double"].count("complete") == 5
    assert set(s["double"]) == {"complete", "cancelled"} and s["total"] == ["cancelled"]
    assert claim(conn) == []
    # a late completion of a step that was held is refused and changes nothing
    assert sqlstate_of(conn, "SELECT tasker_core.complete_step(%s, 'w', '{}')", (held[6][0],)) == "TK030"
    conn.execute("SELECT tasker_core.tick()")
    assert claim(conn) == [] and task_state(conn, task) == "cancelled"
    assert_consistent(conn)


def test_empty_map_completes_at_once(conn):
    task = create(conn, "items", {"items": []})
    (fetch, *_), = claim(conn)
    complete(conn, fetch, {})
    (total, name, _, parents), = claim(conn)
    assert name == "total" and parents == {"double": []}
    complete(conn, total, {})
    assert task_state(conn, task) == "complete"
    assert_consistent(conn)


def test_a_root_map_and_a_root_condition_are_judged_at_creation(conn):
    register(conn, {"name": "roots", "namespace_name": "dyn", "version": "1.0.0",
                    "step_templates": [
                        {"name": "each", "handler_class": "E", "map": {"over": "/context/xs"}},
                        {"name": "maybe", "handler_class": "M",
                         "condition": {"path": "/context/go", "eq": True}},
                        {"name": "after", "handler_class": "A", "depends_on_steps": ["each", "maybe"],
                         "skip_with": ["maybe"]}]})
    task = create(conn, "roots", {"xs": [1, 2, 3], "go": False}, options={})
    s = states(conn, task)
    assert s["maybe"] == ["resolved_manually"] and s["each"] == ["pending"] * 4
    rows = claim(conn)
    assert sorted(r[2]["element"] for r in rows) == [1, 2, 3]
    for step, *_ in rows:
        complete(conn, step, {})
    # after was skipped with maybe, once each finished; the task is complete
    assert states(conn, task)["after"] == ["resolved_manually"]
    assert task_state(conn, task) == "complete"
    assert_consistent(conn)


def test_a_map_over_a_maps_results(conn):
    register(conn, {"name": "chain", "namespace_name": "dyn", "version": "1.0.0",
                    "step_templates": [
                        {"name": "first", "handler_class": "F", "map": {"over": "/context/xs"}},
                        {"name": "second", "handler_class": "S", "depends_on_step": "first",
                         "map": {"over": "/parents/first"}},
                        {"name": "end", "handler_class": "E", "depends_on_step": "second"}]})
    task = create(conn, "chain", {"xs": [1, 2]})
    seen = []

    def handler(name):
        def h(inputs, parents):
            seen.append((name, inputs.get("element") if isinstance(inputs, dict) else None))
            if name == "first":
                return {"x": inputs["element"] * 10}
            if name == "second":
                return {"y": inputs["element"]["x"] + 1}
            return {"all": parents["second"]}
        return h

    run_task(conn, {n: handler(n) for n in ("first", "second", "end")})
    assert task_state(conn, task) == "complete"
    end = conn.execute("SELECT ws.results FROM tasker_workflow_steps ws JOIN tasker_named_steps ns "
                       "USING (named_step_id) WHERE ws.task_id = %s AND ns.name = 'end'", (task,)).fetchone()[0]
    assert end == {"all": [{"y": 11}, {"y": 21}]}
    assert_consistent(conn)


def test_limits_and_bad_inputs(conn):
    before = conn.execute("SELECT count(*) FROM tasker_tasks").fetchone()[0]
    conn.execute("SET tasker_core.max_map_elements = 3")
    # a map over the context is checked when the task is created, and nothing is created
    assert sqlstate_of(conn, "SELECT tasker_core.create_task('dyn', 'items', NULL, %s::jsonb)",
                       (json.dumps({"items": [1, 2, 3, 4]}),)) == "54000"
    assert sqlstate_of(conn, "SELECT tasker_core.create_task('dyn', 'items', NULL, %s::jsonb)",
                       (json.dumps({"items": "no"}),)) == "TK025"
    assert sqlstate_of(conn, "SELECT tasker_core.create_task('dyn', 'items', NULL, '{}')") == "TK025"
    assert conn.execute("SELECT count(*) FROM tasker_tasks").fetchone()[0] == before
    # a map over a parent's results: the map step fails for good, and so does the task
    task = create(conn, "order", {"gift": False})
    (fetch, *_), = claim(conn)
    complete(conn, fetch, {"lines": [1, 2, 3, 4], "total": 1})
    charge = conn.execute(
        "SELECT s.state, ws.results, ws.retryable FROM tasker_core.step_state s "
        "JOIN tasker_workflow_steps ws USING (workflow_step_id) WHERE s.task_id = %s AND s.name = 'charge'",
        (task,)).fetchone()
    assert charge[0] == "error" and charge[1]["error"]["code"] == "54000" and charge[2] is False
    assert claim(conn) == []
    assert task_state(conn, task) == "error"
    assert_consistent(conn)
    # retry_task judges it again: with a higher limit it expands
    conn.execute("SET tasker_core.max_map_elements = 10")
    conn.execute("SELECT tasker_core.retry_task(%s)", (task,))
    assert len(claim(conn)) == 4
    # not an array: TK025 in the step's error
    task2 = create(conn, "order", {"gift": False})
    (fetch, *_), = claim(conn)
    complete(conn, fetch, {"lines": {"a": 1}})
    err = conn.execute("SELECT ws.results FROM tasker_core.step_state s JOIN tasker_workflow_steps ws "
                       "USING (workflow_step_id) WHERE s.task_id = %s AND s.name = 'charge'", (task2,)).fetchone()[0]
    assert err["error"]["code"] == "TK025" and "found an object" in err["error"]["message"]


@pytest.mark.parametrize("step, message", [
    ({"name": "b", "handler_class": "B", "depends_on_step": "a",
      "condition": {"path": "/parents/zz/x", "eq": 1}}, "not one of its dependencies"),
    ({"name": "b", "handler_class": "B", "condition": {"path": "/ctx/x", "eq": 1}}, "must start with"),
    ({"name": "b", "handler_class": "B", "map": {"over": "/parents/a/x"}}, "not one of its dependencies"),
    ({"name": "b", "handler_class": "B", "map": "/context/x"}, "map must be an object"),
    ({"name": "b", "handler_class": "B", "depends_on_step": "a", "skip_with": ["c"]}, "skip_with names"),
    ({"name": "b", "handler_class": "B", "condition": {"path": "/context/x", "like": 1}}, "unknown field"),
])
def test_registration_refuses_bad_rules(conn, step, message):
    t = {"name": "bad", "namespace_name": "dyn", "version": "1.0.0",
         "step_templates": [{"name": "a", "handler_class": "A"}, step]}
    with pytest.raises(psycopg.Error) as e:
        register(conn, t)
    assert e.value.sqlstate == "TK020" and message in str(e.value)
    assert conn.execute("SELECT count(*) FROM tasker_named_tasks WHERE name = 'bad'").fetchone()[0] == 0


def test_a_step_finished_outside_the_worker_protocol_is_judged_by_tick(conn):
    task = create(conn, "order", {"gift": True})
    (fetch, *_), = claim(conn)
    # an operator moves fetch through transition_step: nothing judges the dependents there
    conn.execute("SELECT tasker_core.release_step(%s, 'w')", (fetch,))
    conn.execute("UPDATE tasker_workflow_steps SET results = %s::jsonb WHERE workflow_step_id = %s",
                 (json.dumps({"lines": [1], "total": 500}), fetch))
    conn.execute("SELECT tasker_core.transition_step(%s, 'pending')", (fetch,))
    conn.execute("SELECT tasker_core.transition_step(%s, 'in_progress')", (fetch,))
    conn.execute("SELECT tasker_core.transition_step(%s, 'complete')", (fetch,))
    assert claim(conn) == []
    codes = {r[0] for r in conn.execute("SELECT code FROM tasker_core.explain_task(%s) "
                                        "WHERE step_name IN ('charge', 'gift_note')", (task,))}
    assert "dynamic" in codes and "ready" not in codes
    # verify() names the two steps left unjudged, and nothing once tick() judged them
    unjudged = conn.execute("SELECT id, detail FROM tasker_core.verify() "
                            "WHERE check_name = 'dynamic_steps' ORDER BY id").fetchall()
    assert len(unjudged) == 2 and all("not judged" in p for _, p in unjudged)
    conn.execute("SELECT tasker_core.tick()")
    assert_consistent(conn)
    names = sorted(r[1] for r in claim(conn))
    assert names == ["charge", "gift_note"]


def test_verify_reports_a_broken_skip_and_a_map_short_of_results(conn):
    """verify() knows the dynamic rules: a skipped step must be resolved_manually, and a map
    step that completed holds one result per instance."""
    task = create(conn, "order", {"gift": False})
    run_task(conn, order_handlers(total=10))
    assert_consistent(conn)
    ids = dict(conn.execute("SELECT name, min(workflow_step_id) FROM tasker_core.step_state "
                            "WHERE task_id = %s GROUP BY name", (task,)).fetchall())
    conn.execute("UPDATE tasker_workflow_steps SET results = '[{}]' WHERE workflow_step_id = %s",
                 (ids["charge"],))
    conn.execute("UPDATE tasker_core.dynamic_steps SET skipped = true WHERE workflow_step_id = %s",
                 (ids["charge"],))
    problems = dict(conn.execute("SELECT id, detail FROM tasker_core.verify() "
                                 "WHERE check_name = 'dynamic_steps'").fetchall())
    assert problems == {ids["charge"]: "skipped but complete"}
    conn.execute("UPDATE tasker_core.dynamic_steps SET skipped = false WHERE workflow_step_id = %s",
                 (ids["charge"],))
    problems = dict(conn.execute("SELECT id, detail FROM tasker_core.verify() "
                                 "WHERE check_name = 'dynamic_steps'").fetchall())
    assert problems == {ids["charge"]: "a map step with 1 results for 2 instances"}


def test_dot_groups_instances_and_marks_skips(conn):
    task = create(conn, "order", {"gift": False})
    run_task(conn, order_handlers(total=10))
    dot = conn.execute("SELECT tasker_core.task_graph_dot(%s)", (task,)).fetchone()[0]
    assert "subgraph cluster_map_" in dot and 'label="charge (map, 2)"' in dot
    assert 'gift_note\\nskipped' in dot and "dashed" in dot


def test_a_scheduled_task_keeps_its_judged_root_for_later(conn):
    register(conn, {"name": "later", "namespace_name": "dyn", "version": "1.0.0",
                    "step_templates": [{"name": "go", "handler_class": "G",
                                        "condition": {"path": "/context/go", "eq": True}}]})
    task = create(conn, "later", {"go": True}, options={"delay_seconds": 3600})
    assert claim(conn) == []
    codes = {r[0] for r in conn.execute("SELECT code FROM tasker_core.explain_task(%s)", (task,))}
    assert "scheduled" in codes and "dynamic" not in codes
    assert_consistent(conn)


def random_template(rng, k):
    """A random template of up to 6 steps with maps, conditions and skip_with (the shapes the
    core property test draws)."""
    steps = []
    for i in range(rng.randint(1, 6)):
        deps = sorted({f"s{d}" for d in rng.sample(range(i), min(i, rng.randint(0, 2)))})
        s = {"name": f"s{i}", "handler_class": "H", "depends_on_steps": deps}
        cond, mapped = rng.randint(0, 3), rng.randint(0, 3)
        if cond == 1:
            s["condition"] = {"path": "/context/flag", "eq": True}
        elif cond == 2 and deps:
            s["condition"] = {"path": f"/parents/{deps[0]}/ok", "eq": True}
        if mapped == 1:
            s["map"] = {"over": "/context/items"}
        elif mapped == 2 and deps:
            s["map"] = {"over": f"/parents/{deps[-1]}/items"}
        if deps and rng.random() < 0.4:
            s["skip_with"] = True
        steps.append(s)
    return {"name": f"rnd{k}", "namespace_name": "rnd", "version": "1.0.0", "step_templates": steps}


def test_random_dynamic_tasks_end_complete_or_in_error_never_stuck(conn):
    import random
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for k in range(25):
        t = random_template(rng, k)
        register(conn, t)
        task = create(conn, t["name"], {"flag": rng.random() < 0.5,
                                        "items": list(range(rng.randint(0, 5)))}, namespace="rnd")
        failed_for_good = False
        for _ in range(500):
            rows = claim(conn, 3)
            if not rows:
                conn.execute("SELECT tasker_core.tick()")
                rows = claim(conn, 3)
                if not rows:
                    break
            for step, name, inputs, parents in rows:
                r = rng.random()
                if r < 0.1:
                    conn.execute("SELECT tasker_core.fail_step(%s, 'w', '\"no\"'::jsonb, false)", (step,))
                    failed_for_good = True
                elif r < 0.25:
                    conn.execute("SELECT tasker_core.fail_step(%s, 'w', '\"again\"'::jsonb, true, 0)", (step,))
                else:
                    complete(conn, step, {"ok": rng.random() < 0.7,
                                          "items": list(range(rng.randint(0, 3)))})
        state = task_state(conn, task)
        context = f"seed {seed}, template {json.dumps(t)}"
        assert state in ("complete", "error"), f"stuck in {state}: {context}"
        if state == "complete":
            assert set(sum(states(conn, task).values(), [])) <= {"complete", "resolved_manually"}, context
        else:
            assert failed_for_good or conn.execute(
                "SELECT count(*) FROM tasker_core.step_state WHERE task_id = %s AND state = 'error'",
                (task,)).fetchone()[0] > 0, context
        assert_consistent(conn)


def test_rails_functions_read_an_expanded_task_as_the_reference_does(conn):
    """The instances are ordinary steps and edges: the Rails functions (tasker_core's, from the
    maintained state) return the rows the PL/pgSQL reference computes from the tables, at every
    point of a run with a map, a skip and a retry."""
    from pathlib import Path
    conn.execute(Path(__file__).resolve().parents[3].joinpath("sql/reference/tasker_reference.sql").read_text())
    task = create(conn, "order", {"gift": True})

    # every Rails function and the DAG relationships, as rows of text ({s}: the schema); the
    # slowest lists with a limit above their candidates (ties cut alike: exact equality)
    calls = [f"{{s}}.{fn}(%(t)s::bigint)" for fn in (
                 "get_step_readiness_status", "get_task_execution_context", "calculate_dependency_levels",
                 "step_dag_relationships")] + [
             "{s}.get_step_readiness_status_batch(ARRAY[%(t)s::bigint])",
             "{s}.get_task_execution_contexts_batch(ARRAY[%(t)s::bigint])",
             "{s}.get_system_health_counts_v01()",
             "{s}.get_analytics_metrics_v01()",
             "{s}.get_analytics_metrics_v01(now() - interval '1 hour')",
             "{s}.get_slowest_steps_v01(NULL, 1000)",
             "{s}.get_slowest_tasks_v01(NULL, 1000)"]

    def same():
        for call in calls:
            impl, ref = call.format(s="tasker_core"), call.format(s="tasker_ref")
            differing = conn.execute(
                f"SELECT count(*) FROM ((SELECT r::text FROM {impl} r EXCEPT ALL SELECT r::text FROM {ref} r) "
                f"UNION ALL (SELECT r::text FROM {ref} r EXCEPT ALL SELECT r::text FROM {impl} r)) x",
                {"t": task}).fetchone()[0]
            assert differing == 0, call

    same()
    (fetch, *_), = claim(conn)
    complete(conn, fetch, {"lines": ["a", "b", "c"], "total": 5})  # expands; gift_note skipped
    same()
    rows = claim(conn)
    assert len(rows) == 3
    conn.execute("SELECT tasker_core.fail_step(%s, 'w', '\"x\"'::jsonb, true, 0)", (rows[0][0],))
    complete(conn, rows[1][0], {})
    same()
    complete(conn, rows[2][0], {})
    (again, *_), = claim(conn)
    complete(conn, again, {})
    same()
    run_task(conn, order_handlers(total=5))
    assert task_state(conn, task) == "complete"
    same()


def completion_beside_a_canceller(conn, first, step, results):
    """Completes `step` while a canceller, locking the task's steps in id order as cancel_task
    does, holds step `first` (a row the completion writes) and then takes `step`: the
    completion waits for `first` holding nothing, so `step` is free (a completion holding
    `step` while waiting for `first` would deadlock with the canceller, one of the two getting
    40P01). Returns the SQLSTATEs the completion raised."""
    errors = []
    lock = "SELECT 1 FROM tasker_workflow_steps WHERE workflow_step_id = %s FOR NO KEY UPDATE"
    with conn.db.connect(autocommit=False) as canceller:
        canceller.execute(lock, (first,))

        def completion():
            try:
                with conn.db.connect() as c:
                    complete(c, step, results)
            except psycopg.Error as e:
                errors.append(e.sqlstate)

        t = threading.Thread(target=completion)
        t.start()
        for _ in range(200):
            waiting = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                   "AND wait_event_type = 'Lock'").fetchone()[0]
            if waiting:
                break
            conn.execute("SELECT pg_sleep(0.02)")
        assert waiting, "the completion waits for the canceller"
        canceller.execute("SET lock_timeout = '5s'")
        canceller.execute(lock, (step,))
        canceller.rollback()
        t.join(30)
    return errors


def test_the_last_instance_and_a_canceller_never_deadlock(conn):
    """A canceller locks a task's steps in id order, the map step before its instances. The
    completion of the last instance judges the map step, writing its rows: it takes them with
    its own, all at once, so it never holds the instance while waiting for the map step."""
    task = create(conn, "items", {"items": [1, 2]})
    (fetch, *_), = claim(conn)
    complete(conn, fetch, {})
    (a, *_), (b, *_) = claim(conn)
    complete(conn, a, {})
    map_step = conn.execute("SELECT workflow_step_id FROM tasker_core.step_state WHERE task_id = %s "
                            "AND name = 'double' ORDER BY workflow_step_id LIMIT 1", (task,)).fetchone()[0]
    assert completion_beside_a_canceller(conn, map_step, b, {"last": True}) == []
    assert states(conn, task)["double"] == ["complete"] * 3
    (total, name, _, parents), = claim(conn)
    assert name == "total" and parents["double"] == [{}, {"last": True}]
    assert_consistent(conn)


def test_a_cascade_of_skips_and_a_canceller_never_deadlock(conn):
    """Step ids follow the template's order, which need not be the graph's: here the skipped
    step's dependent has the lowest id. Completing `fetch` skips `gift_note`, which skips `wrap`
    in the same transaction. The canceller takes `wrap` first and then `fetch`: the completion
    takes `wrap`'s rows with its own, all at once, so it never holds `fetch` while waiting for
    `wrap`."""
    register(conn, {"name": "backwards", "namespace_name": "dyn", "version": "1.0.0",
                    "step_templates": [
                        {"name": "wrap", "handler_class": "Wrap", "depends_on_step": "gift_note",
                         "skip_with": True},
                        {"name": "fetch", "handler_class": "Fetch"},
                        {"name": "gift_note", "handler_class": "Note", "depends_on_step": "fetch",
                         "condition": {"path": "/context/gift", "eq": True}}]})
    task = create(conn, "backwards", {"gift": False})
    ids = dict(conn.execute("SELECT name, workflow_step_id FROM tasker_core.step_state "
                            "WHERE task_id = %s", (task,)).fetchall())
    assert ids["wrap"] < ids["fetch"] < ids["gift_note"]
    (fetch, *_), = claim(conn)
    assert completion_beside_a_canceller(conn, ids["wrap"], fetch, {}) == []
    assert states(conn, task) == {"wrap": ["resolved_manually"], "fetch": ["complete"],
                                  "gift_note": ["resolved_manually"]}
    assert task_state(conn, task) == "complete"
    assert_consistent(conn)


def test_a_scheduled_task_keeps_its_root_maps_instances_for_later(conn):
    """A root map over the context expands at creation; its instances are root steps and wait
    for the task's start like any root (they were claimable at once before)."""
    register(conn, {"name": "later_map", "namespace_name": "dyn", "version": "1.0.0",
                    "step_templates": [{"name": "each", "handler_class": "E",
                                        "map": {"over": "/context/items"}},
                                       {"name": "after", "handler_class": "A", "depends_on_step": "each"}]})
    task = create(conn, "later_map", {"items": [1, 2, 3]}, options={"delay_seconds": 3600})
    assert states(conn, task)["each"] == ["pending"] * 4
    assert claim(conn) == []
    scheduled = conn.execute("SELECT count(*) FROM tasker_core.explain_task(%s) WHERE code = 'scheduled'",
                             (task,)).fetchone()[0]
    assert scheduled == 3
    assert_consistent(conn)
    # once the start has come (moved to now), the claims promote and take the three instances
    conn.execute("UPDATE tasker_core.task_options SET run_at = now() AT TIME ZONE 'UTC' - interval '1 second' "
                 "WHERE task_id = %s", (task,))
    conn.execute("UPDATE tasker_core.step_state SET not_before = now() AT TIME ZONE 'UTC' - interval '1 second' "
                 "WHERE task_id = %s AND not_before < 'infinity'", (task,))
    rows = claim(conn)
    assert sorted(r[2]["index"] for r in rows) == [0, 1, 2]


def test_skippable_and_bypass_steps_keep_their_rails_meaning(conn):
    """Stored as Rails stores them, acted on by nothing (as in Rails): a skippable step whose
    condition holds runs, a map step named in bypass_steps still expands and runs, and its
    instances copy its skippable flag."""
    register(conn, {"name": "flags", "namespace_name": "dyn", "version": "1.0.0",
                    "step_templates": [
                        {"name": "each", "handler_class": "E", "skippable": True,
                         "map": {"over": "/context/items"}},
                        {"name": "maybe", "handler_class": "M", "skippable": True,
                         "condition": {"path": "/context/go", "eq": True}},
                        {"name": "last", "handler_class": "L", "depends_on_steps": ["each", "maybe"]}]})
    task = create(conn, "flags", {"items": [1, 2], "go": True}, options={"bypass_steps": ["each", "maybe"]})
    assert conn.execute("SELECT bypass_steps::jsonb FROM tasker_tasks WHERE task_id = %s",
                        (task,)).fetchone()[0] == ["each", "maybe"]
    skippable = conn.execute("SELECT array_agg(ws.skippable ORDER BY ws.workflow_step_id) "
                             "FROM tasker_workflow_steps ws JOIN tasker_named_steps ns USING (named_step_id) "
                             "WHERE ws.task_id = %s AND ns.name = 'each'", (task,)).fetchone()[0]
    assert skippable == [True, True, True]
    ran = []

    def handler(name):
        return lambda inputs, parents: ran.append(name) or {"name": name}

    run_task(conn, {n: handler(n) for n in ("each", "maybe", "last")})
    assert sorted(ran) == ["each", "each", "last", "maybe"]
    assert task_state(conn, task) == "complete"
    assert_consistent(conn)
