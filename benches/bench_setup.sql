-- Benchmark data and timing loops (loaded by benches/compat.py; never by the extension).
--
-- Timing loops are PL/pgSQL functions running static SQL, so every statement's plan is
-- prepared once and cached, as an application's prepared statements would be; each returns
-- microseconds per call.

CREATE SCHEMA IF NOT EXISTS bench;

-- A task of `n` steps in the given shape; returns its id. Steps are inserted the way Rails
-- does (no transitions = pending); `done` leading steps (in id order) are then completed and
-- one step after them is put in error, so every readiness path is exercised.
CREATE OR REPLACE FUNCTION bench.make_task(shape text, n int, done int DEFAULT 0, seed float8 DEFAULT 0.42)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    tid bigint;
    nt int;
    ns int;
    first_id bigint;
    w int;
BEGIN
    PERFORM setseed(seed);
    SELECT named_task_id INTO nt FROM tasker_named_tasks WHERE name = 'bench_task';
    SELECT min(named_step_id) INTO ns FROM tasker_named_steps WHERE name LIKE 'bench_step_%';
    INSERT INTO tasker_tasks (named_task_id, requested_at, identity_hash, context, created_at, updated_at)
    VALUES (nt, now(), md5(random()::text || clock_timestamp()::text), '{}', now() - interval '1 hour', now())
    RETURNING task_id INTO tid;
    INSERT INTO tasker_workflow_steps (task_id, named_step_id, attempts, retry_limit, created_at, updated_at)
    SELECT tid, ns + (i % 20), 0, 3, now() - interval '1 hour', now() FROM generate_series(0, n - 1) i;
    SELECT min(workflow_step_id) INTO first_id FROM tasker_workflow_steps WHERE task_id = tid;
    IF shape = 'chain' THEN
        INSERT INTO tasker_workflow_step_edges (from_step_id, to_step_id, name, created_at, updated_at)
        SELECT first_id + i, first_id + i + 1, 'provides', now(), now() FROM generate_series(0, n - 2) i;
    ELSIF shape = 'fan' THEN
        -- root -> every middle step -> sink
        INSERT INTO tasker_workflow_step_edges (from_step_id, to_step_id, name, created_at, updated_at)
        SELECT first_id, first_id + i, 'provides', now(), now() FROM generate_series(1, n - 2) i
        UNION ALL
        SELECT first_id + i, first_id + n - 1, 'provides', now(), now() FROM generate_series(1, n - 2) i;
    ELSIF shape LIKE 'lattice%' THEN
        -- layers of width w, each step linked to every step of the next layer
        w := COALESCE(NULLIF(substring(shape FROM 'lattice(\d+)'), '')::int, 4);
        INSERT INTO tasker_workflow_step_edges (from_step_id, to_step_id, name, created_at, updated_at)
        SELECT first_id + a, first_id + b, 'provides', now(), now()
        FROM generate_series(0, n - 1) a
        JOIN generate_series(0, n - 1) b ON b / w = a / w + 1;
    ELSIF shape = 'random' THEN
        -- each step depends on up to three random earlier steps
        INSERT INTO tasker_workflow_step_edges (from_step_id, to_step_id, name, created_at, updated_at)
        SELECT DISTINCT first_id + floor(random() * i)::bigint, first_id + i, 'provides', now(), now()
        FROM generate_series(1, n - 1) i, generate_series(1, 1 + floor(random() * 3)::int) k;
    END IF;
    IF done > 0 THEN
        INSERT INTO tasker_workflow_step_transitions (to_state, from_state, metadata, sort_key, most_recent,
                                                      workflow_step_id, created_at, updated_at)
        SELECT 'complete', NULL, '{}', 10, true, first_id + i, now() - interval '30 minutes', now()
        FROM generate_series(0, least(done, n) - 1) i;
        IF done < n THEN
            INSERT INTO tasker_workflow_step_transitions (to_state, from_state, metadata, sort_key, most_recent,
                                                          workflow_step_id, created_at, updated_at)
            VALUES ('error', NULL, '{}', 10, true, first_id + done, now() - interval '1 second', now());
            UPDATE tasker_workflow_steps SET attempts = 1, last_attempted_at = now()::timestamp
            WHERE workflow_step_id = first_id + done;
        END IF;
    END IF;
    RETURN tid;
END;
$$;

CREATE OR REPLACE FUNCTION bench.setup_definitions() RETURNS void LANGUAGE sql AS $$
    INSERT INTO tasker_task_namespaces (name, created_at, updated_at) VALUES ('bench', now(), now())
    ON CONFLICT DO NOTHING;
    INSERT INTO tasker_dependent_systems (name, created_at, updated_at) VALUES ('bench', now(), now())
    ON CONFLICT DO NOTHING;
    INSERT INTO tasker_named_tasks (name, task_namespace_id, version, created_at, updated_at)
    SELECT 'bench_task', task_namespace_id, '1.0.0', now(), now() FROM tasker_task_namespaces WHERE name = 'bench'
    ON CONFLICT DO NOTHING;
    INSERT INTO tasker_named_steps (dependent_system_id, name, created_at, updated_at)
    SELECT d.dependent_system_id, 'bench_step_' || i, now(), now()
    FROM tasker_dependent_systems d, generate_series(0, 19) i WHERE d.name = 'bench'
    ON CONFLICT DO NOTHING;
$$;

-- Rails' dependency levels as a path-enumerating recursive query (the formulation the Rails
-- function uses; written here for the benchmark baseline).
CREATE OR REPLACE FUNCTION bench.path_enumerating_levels(input_task_id bigint)
RETURNS TABLE(workflow_step_id bigint, dependency_level integer) LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY
    WITH RECURSIVE walk(step_id, lvl) AS (
        SELECT s.workflow_step_id, 0 FROM tasker_workflow_steps s
        WHERE s.task_id = input_task_id
          AND NOT EXISTS (SELECT 1 FROM tasker_workflow_step_edges e WHERE e.to_step_id = s.workflow_step_id)
      UNION ALL
        SELECT e.to_step_id, w.lvl + 1 FROM walk w
        JOIN tasker_workflow_step_edges e ON e.from_step_id = w.step_id
        JOIN tasker_workflow_steps c ON c.workflow_step_id = e.to_step_id AND c.task_id = input_task_id)
    SELECT w.step_id, max(w.lvl)::integer FROM walk w GROUP BY w.step_id ORDER BY 2, 1;
END;
$$;

-- The floor of a recompute-per-call design: the bare indexed reads of the rows readiness
-- needs (the task's steps, their names, current transitions and incoming edges, and the
-- parents' current transitions).
CREATE OR REPLACE FUNCTION bench.floor_base_reads(tid bigint) RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT count(*) FROM tasker_workflow_steps ws
    JOIN tasker_named_steps ns ON ns.named_step_id = ws.named_step_id
    LEFT JOIN tasker_workflow_step_transitions cur ON cur.workflow_step_id = ws.workflow_step_id AND cur.most_recent
    LEFT JOIN tasker_workflow_step_edges e ON e.to_step_id = ws.workflow_step_id
    LEFT JOIN tasker_workflow_step_transitions ps ON ps.workflow_step_id = e.from_step_id AND ps.most_recent
    WHERE ws.task_id = tid
$$;

-- Timing loops: microseconds per call.
CREATE OR REPLACE FUNCTION bench.time_call(what text, arg bigint, n int) RETURNS float8 LANGUAGE plpgsql AS $$
DECLARE
    t0 timestamptz;
    c bigint;
BEGIN
    t0 := clock_timestamp();
    FOR i IN 1..n LOOP
        CASE what
        WHEN 'ready_rust' THEN SELECT count(*) INTO c FROM tasker_core.get_step_readiness_status(arg, NULL);
        WHEN 'ready_ref' THEN SELECT count(*) INTO c FROM tasker_ref.get_step_readiness_status(arg, NULL);
        WHEN 'ctx_rust' THEN SELECT count(*) INTO c FROM tasker_core.get_task_execution_context(arg);
        WHEN 'ctx_ref' THEN SELECT count(*) INTO c FROM tasker_ref.get_task_execution_context(arg);
        WHEN 'levels_rust' THEN SELECT count(*) INTO c FROM tasker_core.calculate_dependency_levels(arg);
        WHEN 'levels_ref' THEN SELECT count(*) INTO c FROM tasker_ref.calculate_dependency_levels(arg);
        WHEN 'levels_paths' THEN SELECT count(*) INTO c FROM bench.path_enumerating_levels(arg);
        WHEN 'dag_rust' THEN SELECT count(*) INTO c FROM tasker_core.step_dag_relationships(arg);
        WHEN 'dag_ref' THEN SELECT count(*) INTO c FROM tasker_ref.step_dag_relationships(arg);
        WHEN 'floor_base' THEN
            -- the same reads as bench.floor_base_reads, as static SQL so its plan is cached
            SELECT count(*) INTO c FROM tasker_workflow_steps ws
            JOIN tasker_named_steps ns ON ns.named_step_id = ws.named_step_id
            LEFT JOIN tasker_workflow_step_transitions cur
                   ON cur.workflow_step_id = ws.workflow_step_id AND cur.most_recent
            LEFT JOIN tasker_workflow_step_edges e ON e.to_step_id = ws.workflow_step_id
            LEFT JOIN tasker_workflow_step_transitions ps
                   ON ps.workflow_step_id = e.from_step_id AND ps.most_recent
            WHERE ws.task_id = arg;
        WHEN 'floor_state' THEN SELECT count(*) INTO c FROM tasker_core.step_state s WHERE s.task_id = arg;
        WHEN 'health_rust' THEN SELECT count(*) INTO c FROM tasker_core.get_system_health_counts_v01();
        WHEN 'health_ref' THEN SELECT count(*) INTO c FROM tasker_ref.get_system_health_counts_v01();
        END CASE;
    END LOOP;
    RETURN extract(epoch FROM clock_timestamp() - t0) * 1e6 / n;
END;
$$;

CREATE OR REPLACE FUNCTION bench.time_batch(what text, ids bigint[], n int) RETURNS float8 LANGUAGE plpgsql AS $$
DECLARE
    t0 timestamptz;
    c bigint;
BEGIN
    t0 := clock_timestamp();
    FOR i IN 1..n LOOP
        CASE what
        WHEN 'ready_rust' THEN SELECT count(*) INTO c FROM tasker_core.get_step_readiness_status_batch(ids);
        WHEN 'ready_ref' THEN SELECT count(*) INTO c FROM tasker_ref.get_step_readiness_status_batch(ids);
        WHEN 'ctx_rust' THEN SELECT count(*) INTO c FROM tasker_core.get_task_execution_contexts_batch(ids);
        WHEN 'ctx_ref' THEN SELECT count(*) INTO c FROM tasker_ref.get_task_execution_contexts_batch(ids);
        WHEN 'floor_state' THEN SELECT count(*) INTO c FROM tasker_core.step_state s WHERE s.task_id = ANY(ids);
        END CASE;
    END LOOP;
    RETURN extract(epoch FROM clock_timestamp() - t0) * 1e6 / n;
END;
$$;
