-- tasker_reference.sql: the PL/pgSQL reference implementation ("oracle") of the Tasker SQL
-- functions, in schema tasker_ref.
--
-- Written by the tasker_core project from docs/compat-semantics.md (the contract, quirks
-- included), not copied from the Rails engine. Tests compare tasker_core.* with tasker_ref.*
-- row for row, and the benchmarks use these functions as the baseline; the extension never
-- loads this file.
--
-- Table names are unqualified on purpose: they resolve through the caller's search_path, so the
-- same functions serve whichever schema holds the tasker_* tables. Column references are always
-- qualified, and every PL/pgSQL body starts with `#variable_conflict use_column`, so OUT
-- columns such as task_id, name or attempts never capture a table column.
--
-- Load with: psql -v ON_ERROR_STOP=1 -f sql/reference/tasker_reference.sql

CREATE SCHEMA IF NOT EXISTS tasker_ref;

-- ---------------------------------------------------------------------------------------------
-- 1. get_step_readiness_status: one row per step of a task (optionally only some steps).
-- One flat join of each step to its named step, its current transition, its incoming edges
-- and their parents' current transitions, grouped by step (so the plan stays a chain of
-- index lookups, linear in steps + edges, whatever the parameter estimates).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION tasker_ref.get_step_readiness_status(input_task_id bigint, step_ids bigint[] DEFAULT NULL)
RETURNS TABLE(workflow_step_id bigint, task_id bigint, named_step_id integer, name text,
              current_state text, dependencies_satisfied boolean, retry_eligible boolean,
              ready_for_execution boolean, last_failure_at timestamp, next_retry_at timestamp,
              total_parents integer, completed_parents integer, attempts integer,
              retry_limit integer, backoff_request_seconds integer, last_attempted_at timestamp)
LANGUAGE plpgsql STABLE
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT g.workflow_step_id, g.task_id, g.named_step_id, g.step_name, g.state,
           (g.total = 0 OR g.done = g.total),
           (COALESCE(g.attempts, 0) < COALESCE(g.retry_limit, 3)),
           (g.state IN ('pending', 'error')
            AND COALESCE(g.processed, false) = false
            AND (g.total = 0 OR g.done = g.total)
            AND COALESCE(g.attempts, 0) < COALESCE(g.retry_limit, 3)
            AND COALESCE(g.retryable, true)
            AND COALESCE(g.in_process, false) = false
            AND (g.backoff_request_seconds IS NULL OR g.last_attempted_at IS NULL
                 OR g.last_attempted_at + g.backoff_request_seconds * interval '1 second' <= now())
            AND (g.failed_at IS NULL
                 OR g.failed_at + LEAST(power(2::double precision, COALESCE(g.attempts, 1)::double precision)
                                            * interval '1 second', interval '30 seconds') <= now())),
           g.failed_at,
           CASE WHEN g.backoff_request_seconds IS NOT NULL AND g.last_attempted_at IS NOT NULL
                THEN g.last_attempted_at + g.backoff_request_seconds * interval '1 second'
                WHEN g.failed_at IS NOT NULL
                THEN g.failed_at + LEAST(power(2::double precision, COALESCE(g.attempts, 1)::double precision)
                                             * interval '1 second', interval '30 seconds')
           END,
           g.total::integer,
           g.done::integer,
           COALESCE(g.attempts, 0),
           COALESCE(g.retry_limit, 3),
           g.backoff_request_seconds,
           g.last_attempted_at
    FROM (
        SELECT ws.workflow_step_id, ws.task_id, ws.named_step_id, ns.name::text AS step_name,
               COALESCE(cur.to_state, 'pending')::text AS state,
               CASE WHEN cur.to_state = 'error' THEN cur.created_at END AS failed_at,
               ws.attempts, ws.retry_limit, ws.retryable, ws.processed, ws.in_process,
               ws.backoff_request_seconds, ws.last_attempted_at,
               count(e.from_step_id) AS total,
               count(e.from_step_id) FILTER (WHERE pcur.to_state IN ('complete', 'resolved_manually')) AS done
        FROM tasker_workflow_steps ws
        JOIN tasker_named_steps ns ON ns.named_step_id = ws.named_step_id
        LEFT JOIN tasker_workflow_step_transitions cur
               ON cur.workflow_step_id = ws.workflow_step_id AND cur.most_recent = true
        LEFT JOIN tasker_workflow_step_edges e ON e.to_step_id = ws.workflow_step_id
        LEFT JOIN tasker_workflow_step_transitions pcur
               ON pcur.workflow_step_id = e.from_step_id AND pcur.most_recent = true
        WHERE ws.task_id = input_task_id
          AND (step_ids IS NULL OR ws.workflow_step_id = ANY (step_ids))
        GROUP BY ws.workflow_step_id, ns.name, cur.to_state, cur.created_at
    ) g;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- 2. get_step_readiness_status_batch: the same rows for every step of several tasks.
-- One flat join of each step to its named step, its current transition, its incoming edges
-- and their parents' current transitions, grouped by step (so the plan stays a chain of
-- index lookups, linear in steps + edges, whatever the parameter estimates).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION tasker_ref.get_step_readiness_status_batch(input_task_ids bigint[])
RETURNS TABLE(workflow_step_id bigint, task_id bigint, named_step_id integer, name text,
              current_state text, dependencies_satisfied boolean, retry_eligible boolean,
              ready_for_execution boolean, last_failure_at timestamp, next_retry_at timestamp,
              total_parents integer, completed_parents integer, attempts integer,
              retry_limit integer, backoff_request_seconds integer, last_attempted_at timestamp)
LANGUAGE plpgsql STABLE
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    SELECT g.workflow_step_id, g.task_id, g.named_step_id, g.step_name, g.state,
           (g.total = 0 OR g.done = g.total),
           (COALESCE(g.attempts, 0) < COALESCE(g.retry_limit, 3)),
           (g.state IN ('pending', 'error')
            AND COALESCE(g.processed, false) = false
            AND (g.total = 0 OR g.done = g.total)
            AND COALESCE(g.attempts, 0) < COALESCE(g.retry_limit, 3)
            AND COALESCE(g.retryable, true)
            AND COALESCE(g.in_process, false) = false
            AND (g.backoff_request_seconds IS NULL OR g.last_attempted_at IS NULL
                 OR g.last_attempted_at + g.backoff_request_seconds * interval '1 second' <= now())
            AND (g.failed_at IS NULL
                 OR g.failed_at + LEAST(power(2::double precision, COALESCE(g.attempts, 1)::double precision)
                                            * interval '1 second', interval '30 seconds') <= now())),
           g.failed_at,
           CASE WHEN g.backoff_request_seconds IS NOT NULL AND g.last_attempted_at IS NOT NULL
                THEN g.last_attempted_at + g.backoff_request_seconds * interval '1 second'
                WHEN g.failed_at IS NOT NULL
                THEN g.failed_at + LEAST(power(2::double precision, COALESCE(g.attempts, 1)::double precision)
                                             * interval '1 second', interval '30 seconds')
           END,
           g.total::integer,
           g.done::integer,
           COALESCE(g.attempts, 0),
           COALESCE(g.retry_limit, 3),
           g.backoff_request_seconds,
           g.last_attempted_at
    FROM (
        SELECT ws.workflow_step_id, ws.task_id, ws.named_step_id, ns.name::text AS step_name,
               COALESCE(cur.to_state, 'pending')::text AS state,
               CASE WHEN cur.to_state = 'error' THEN cur.created_at END AS failed_at,
               ws.attempts, ws.retry_limit, ws.retryable, ws.processed, ws.in_process,
               ws.backoff_request_seconds, ws.last_attempted_at,
               count(e.from_step_id) AS total,
               count(e.from_step_id) FILTER (WHERE pcur.to_state IN ('complete', 'resolved_manually')) AS done
        FROM tasker_workflow_steps ws
        JOIN tasker_named_steps ns ON ns.named_step_id = ws.named_step_id
        LEFT JOIN tasker_workflow_step_transitions cur
               ON cur.workflow_step_id = ws.workflow_step_id AND cur.most_recent = true
        LEFT JOIN tasker_workflow_step_edges e ON e.to_step_id = ws.workflow_step_id
        LEFT JOIN tasker_workflow_step_transitions pcur
               ON pcur.workflow_step_id = e.from_step_id AND pcur.most_recent = true
        WHERE ws.task_id = ANY (input_task_ids)
        GROUP BY ws.workflow_step_id, ns.name, cur.to_state, cur.created_at
    ) g;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- 3. get_task_execution_context: one summary row for a task (none if the task does not exist).
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION tasker_ref.get_task_execution_context(input_task_id bigint)
RETURNS TABLE(task_id bigint, named_task_id integer, status text, total_steps bigint,
              pending_steps bigint, in_progress_steps bigint, completed_steps bigint,
              failed_steps bigint, ready_steps bigint, execution_status text,
              recommended_action text, completion_percentage numeric, health_status text)
LANGUAGE plpgsql STABLE
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH stats AS (
        SELECT count(*) AS total,
               count(*) FILTER (WHERE r.current_state = 'pending') AS pending,
               count(*) FILTER (WHERE r.current_state = 'in_progress') AS in_progress,
               count(*) FILTER (WHERE r.current_state IN ('complete', 'resolved_manually')) AS completed,
               count(*) FILTER (WHERE r.current_state = 'error') AS failed,
               count(*) FILTER (WHERE r.ready_for_execution) AS ready,
               count(*) FILTER (WHERE r.current_state = 'error'
                                  AND r.attempts >= r.retry_limit) AS blocked
        FROM tasker_ref.get_step_readiness_status(input_task_id, NULL) r
    ),
    summary AS (
        SELECT t.task_id AS tid, t.named_task_id AS ntid,
               COALESCE(tcur.to_state, 'pending')::text AS task_state,
               s.total, s.pending, s.in_progress, s.completed, s.failed, s.ready, s.blocked
        FROM tasker_tasks t
        LEFT JOIN tasker_task_transitions tcur
               ON tcur.task_id = t.task_id AND tcur.most_recent = true
        CROSS JOIN stats s
        WHERE t.task_id = input_task_id
    )
    SELECT m.tid, m.ntid, m.task_state,
           m.total, m.pending, m.in_progress, m.completed, m.failed, m.ready,
           CASE WHEN m.ready > 0 THEN 'has_ready_steps'
                WHEN m.in_progress > 0 THEN 'processing'
                WHEN m.blocked > 0 AND m.ready = 0 THEN 'blocked_by_failures'
                WHEN m.completed = m.total AND m.total > 0 THEN 'all_complete'
                ELSE 'waiting_for_dependencies'
           END,
           CASE WHEN m.ready > 0 THEN 'execute_ready_steps'
                WHEN m.in_progress > 0 THEN 'wait_for_completion'
                WHEN m.blocked > 0 AND m.ready = 0 THEN 'handle_failures'
                WHEN m.completed = m.total AND m.total > 0 THEN 'finalize_task'
                ELSE 'wait_for_dependencies'
           END,
           CASE WHEN m.total = 0 THEN 0.0
                ELSE round(m.completed::numeric / m.total * 100, 2)
           END,
           CASE WHEN m.failed = 0 THEN 'healthy'
                WHEN m.failed > 0 AND m.ready > 0 THEN 'recovering'
                WHEN m.blocked > 0 AND m.ready = 0 THEN 'blocked'
                WHEN m.failed > 0 AND m.blocked = 0 AND m.ready = 0 THEN 'recovering'
                ELSE 'unknown'
           END
    FROM summary m;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- 4. get_task_execution_contexts_batch: one row per requested id naming an existing task.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION tasker_ref.get_task_execution_contexts_batch(input_task_ids bigint[])
RETURNS TABLE(task_id bigint, named_task_id integer, status text, total_steps bigint,
              pending_steps bigint, in_progress_steps bigint, completed_steps bigint,
              failed_steps bigint, ready_steps bigint, execution_status text,
              recommended_action text, completion_percentage numeric, health_status text)
LANGUAGE plpgsql STABLE
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH stats AS (
        SELECT r.task_id AS tid,
               count(*) AS total,
               count(*) FILTER (WHERE r.current_state = 'pending') AS pending,
               count(*) FILTER (WHERE r.current_state = 'in_progress') AS in_progress,
               count(*) FILTER (WHERE r.current_state IN ('complete', 'resolved_manually')) AS completed,
               count(*) FILTER (WHERE r.current_state = 'error') AS failed,
               count(*) FILTER (WHERE r.ready_for_execution) AS ready,
               count(*) FILTER (WHERE r.current_state = 'error'
                                  AND r.attempts >= r.retry_limit) AS blocked
        FROM tasker_ref.get_step_readiness_status_batch(input_task_ids) r
        GROUP BY r.task_id
    ),
    summary AS (
        -- one row per array element: duplicates repeat, NULLs and unknown ids drop out
        SELECT t.task_id AS tid, t.named_task_id AS ntid,
               COALESCE(tcur.to_state, 'pending')::text AS task_state,
               COALESCE(s.total, 0) AS total,
               COALESCE(s.pending, 0) AS pending,
               COALESCE(s.in_progress, 0) AS in_progress,
               COALESCE(s.completed, 0) AS completed,
               COALESCE(s.failed, 0) AS failed,
               COALESCE(s.ready, 0) AS ready,
               COALESCE(s.blocked, 0) AS blocked
        FROM unnest(input_task_ids) AS req(id)
        JOIN tasker_tasks t ON t.task_id = req.id
        LEFT JOIN tasker_task_transitions tcur
               ON tcur.task_id = t.task_id AND tcur.most_recent = true
        LEFT JOIN stats s ON s.tid = t.task_id
    )
    SELECT m.tid, m.ntid, m.task_state,
           m.total, m.pending, m.in_progress, m.completed, m.failed, m.ready,
           CASE WHEN m.ready > 0 THEN 'has_ready_steps'
                WHEN m.in_progress > 0 THEN 'processing'
                WHEN m.blocked > 0 AND m.ready = 0 THEN 'blocked_by_failures'
                WHEN m.completed = m.total AND m.total > 0 THEN 'all_complete'
                ELSE 'waiting_for_dependencies'
           END,
           CASE WHEN m.ready > 0 THEN 'execute_ready_steps'
                WHEN m.in_progress > 0 THEN 'wait_for_completion'
                WHEN m.blocked > 0 AND m.ready = 0 THEN 'handle_failures'
                WHEN m.completed = m.total AND m.total > 0 THEN 'finalize_task'
                ELSE 'wait_for_dependencies'
           END,
           CASE WHEN m.total = 0 THEN 0.0
                ELSE round(m.completed::numeric / m.total * 100, 2)
           END,
           CASE WHEN m.failed = 0 THEN 'healthy'
                WHEN m.failed > 0 AND m.ready > 0 THEN 'recovering'
                WHEN m.blocked > 0 AND m.ready = 0 THEN 'blocked'
                WHEN m.failed > 0 AND m.blocked = 0 AND m.ready = 0 THEN 'recovering'
                ELSE 'unknown'
           END
    FROM summary m
    ORDER BY m.tid;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- 5. calculate_dependency_levels: longest distance from a root, per step of a task.
--    Roots are task steps with no incoming edge from anywhere; the walk follows edges whose
--    child is a step of the task. UNION keeps one row per (step, level), so the walk is
--    bounded by steps x levels rather than by the number of paths. On a DAG no level reaches
--    the task's step count; a level that does proves a reachable cycle, which raises TK006
--    (tasker_core's cycle_detected) instead of recursing forever.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION tasker_ref.calculate_dependency_levels(input_task_id bigint)
RETURNS TABLE(workflow_step_id bigint, dependency_level integer)
LANGUAGE plpgsql STABLE
AS $$
#variable_conflict use_column
DECLARE
    n_steps integer;
    step_list bigint[];
    level_list integer[];
BEGIN
    SELECT count(*)::integer INTO n_steps
    FROM tasker_workflow_steps ws
    WHERE ws.task_id = input_task_id;

    WITH RECURSIVE task_steps AS (
        SELECT ws.workflow_step_id AS sid
        FROM tasker_workflow_steps ws
        WHERE ws.task_id = input_task_id
    ),
    walk(sid, lvl) AS (
        SELECT ts.sid, 0
        FROM task_steps ts
        WHERE NOT EXISTS (SELECT 1 FROM tasker_workflow_step_edges e WHERE e.to_step_id = ts.sid)
      UNION
        SELECT e.to_step_id, w.lvl + 1
        FROM walk w
        JOIN tasker_workflow_step_edges e ON e.from_step_id = w.sid
        JOIN task_steps child ON child.sid = e.to_step_id
        WHERE w.lvl < n_steps
    ),
    levels AS (
        SELECT w.sid, max(w.lvl) AS lvl
        FROM walk w
        GROUP BY w.sid
    )
    SELECT array_agg(l.sid ORDER BY l.lvl, l.sid), array_agg(l.lvl ORDER BY l.lvl, l.sid)
    INTO step_list, level_list
    FROM levels l;

    IF level_list IS NOT NULL AND level_list[array_upper(level_list, 1)] >= n_steps THEN
        RAISE EXCEPTION 'dependency cycle among steps of task %', input_task_id
            USING ERRCODE = 'TK006';
    END IF;

    RETURN QUERY
    SELECT u.sid, u.lvl
    FROM unnest(step_list, level_list) WITH ORDINALITY AS u(sid, lvl, ord)
    ORDER BY u.ord;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- 6. get_system_health_counts_v01: whole-table task and step counts plus connection figures.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION tasker_ref.get_system_health_counts_v01()
RETURNS TABLE(total_tasks bigint, pending_tasks bigint, in_progress_tasks bigint,
              complete_tasks bigint, error_tasks bigint, cancelled_tasks bigint,
              total_steps bigint, pending_steps bigint, in_progress_steps bigint,
              complete_steps bigint, error_steps bigint, retryable_error_steps bigint,
              exhausted_retry_steps bigint, in_backoff_steps bigint,
              active_connections bigint, max_connections bigint)
LANGUAGE plpgsql STABLE
AS $$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH task_counts AS (
        SELECT count(*) AS total,
               count(*) FILTER (WHERE tcur.to_state = 'pending') AS pending,
               count(*) FILTER (WHERE tcur.to_state = 'in_progress') AS in_progress,
               count(*) FILTER (WHERE tcur.to_state = 'complete') AS complete,
               count(*) FILTER (WHERE tcur.to_state = 'error') AS error,
               count(*) FILTER (WHERE tcur.to_state = 'cancelled') AS cancelled
        FROM tasker_tasks t
        LEFT JOIN tasker_task_transitions tcur
               ON tcur.task_id = t.task_id AND tcur.most_recent = true
    ),
    step_counts AS (
        SELECT count(*) AS total,
               count(*) FILTER (WHERE cur.to_state = 'pending') AS pending,
               count(*) FILTER (WHERE cur.to_state = 'in_progress') AS in_progress,
               count(*) FILTER (WHERE cur.to_state = 'complete') AS complete,
               count(*) FILTER (WHERE cur.to_state = 'error') AS error,
               -- raw attempts / retry_limit: a NULL in either never qualifies
               count(*) FILTER (WHERE cur.to_state = 'error'
                                  AND ws.attempts < ws.retry_limit
                                  AND COALESCE(ws.retryable, true)) AS retryable_error,
               count(*) FILTER (WHERE cur.to_state = 'error'
                                  AND ws.attempts >= ws.retry_limit) AS exhausted,
               count(*) FILTER (WHERE cur.to_state = 'error'
                                  AND ws.attempts < ws.retry_limit
                                  AND COALESCE(ws.retryable, true)
                                  AND ws.last_attempted_at IS NOT NULL) AS in_backoff
        FROM tasker_workflow_steps ws
        LEFT JOIN tasker_workflow_step_transitions cur
               ON cur.workflow_step_id = ws.workflow_step_id AND cur.most_recent = true
    ),
    conn AS (
        SELECT count(*) AS active
        FROM pg_stat_activity a
        WHERE a.datname = current_database() AND a.state = 'active'
    )
    SELECT tc.total, tc.pending, tc.in_progress, tc.complete, tc.error, tc.cancelled,
           sc.total, sc.pending, sc.in_progress, sc.complete, sc.error,
           sc.retryable_error, sc.exhausted, sc.in_backoff,
           c.active,
           current_setting('max_connections')::bigint
    FROM task_counts tc CROSS JOIN step_counts sc CROSS JOIN conn c;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- 7. get_analytics_metrics_v01: one row of system-wide and per-period metrics.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION tasker_ref.get_analytics_metrics_v01(
    since_timestamp timestamptz DEFAULT NULL)
RETURNS TABLE(active_tasks_count bigint, total_namespaces_count bigint,
              unique_task_types_count bigint, system_health_score numeric,
              task_throughput bigint, completion_count bigint, error_count bigint,
              completion_rate numeric, error_rate numeric, avg_task_duration numeric,
              avg_step_duration numeric, step_throughput bigint,
              analysis_period_start timestamptz, calculated_at timestamptz)
LANGUAGE plpgsql STABLE
AS $$
#variable_conflict use_column
DECLARE
    analysis_start timestamptz := COALESCE(since_timestamp, now() - interval '1 hour');
BEGIN
    RETURN QUERY
    WITH active AS (
        SELECT count(DISTINCT ws.task_id) AS n
        FROM tasker_workflow_steps ws
        JOIN tasker_workflow_step_transitions cur
          ON cur.workflow_step_id = ws.workflow_step_id AND cur.most_recent = true
        WHERE cur.to_state NOT IN ('complete', 'error', 'skipped', 'resolved_manually')
    ),
    catalogue AS (
        SELECT count(DISTINCT tn.name) AS namespaces, count(DISTINCT nt.name) AS task_types
        FROM tasker_tasks t
        JOIN tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
        JOIN tasker_task_namespaces tn ON tn.task_namespace_id = nt.task_namespace_id
    ),
    -- health always looks at the last hour, whatever since_timestamp says
    health AS (
        SELECT count(DISTINCT t.task_id) FILTER (WHERE cur.to_state = 'complete') AS c,
               count(DISTINCT t.task_id) FILTER (WHERE cur.to_state = 'error') AS e
        FROM tasker_tasks t
        JOIN tasker_workflow_steps ws ON ws.task_id = t.task_id
        JOIN tasker_workflow_step_transitions cur
          ON cur.workflow_step_id = ws.workflow_step_id AND cur.most_recent = true
        WHERE t.created_at > now() - interval '1 hour'
    ),
    period_tasks AS (
        SELECT t.task_id AS tid, t.created_at AS task_created
        FROM tasker_tasks t
        WHERE t.created_at > analysis_start
    ),
    period_steps AS (
        SELECT count(DISTINCT pt.tid) FILTER (WHERE cur.to_state = 'complete') AS completions,
               count(DISTINCT pt.tid) FILTER (WHERE cur.to_state = 'error') AS errors,
               count(ws.workflow_step_id) AS steps,
               avg(EXTRACT(EPOCH FROM (cur.created_at - pt.task_created)))
                   FILTER (WHERE cur.to_state = 'complete') AS avg_task,
               avg(EXTRACT(EPOCH FROM (cur.created_at - ws.created_at)))
                   FILTER (WHERE cur.to_state = 'complete') AS avg_step
        FROM period_tasks pt
        JOIN tasker_workflow_steps ws ON ws.task_id = pt.tid
        LEFT JOIN tasker_workflow_step_transitions cur
               ON cur.workflow_step_id = ws.workflow_step_id AND cur.most_recent = true
    ),
    throughput AS (
        SELECT count(*) AS n FROM period_tasks
    )
    SELECT a.n,
           cat.namespaces,
           cat.task_types,
           CASE WHEN h.c + h.e > 0 THEN round(h.c::numeric / (h.c + h.e), 3) ELSE 1.0 END,
           tp.n,
           ps.completions,
           ps.errors,
           CASE WHEN tp.n > 0 THEN round(ps.completions::numeric / tp.n * 100, 2) ELSE 0.0 END,
           CASE WHEN tp.n > 0 THEN round(ps.errors::numeric / tp.n * 100, 2) ELSE 0.0 END,
           round(COALESCE(ps.avg_task, 0), 3),
           round(COALESCE(ps.avg_step, 0), 3),
           ps.steps,
           analysis_start,
           now()
    FROM active a
    CROSS JOIN catalogue cat
    CROSS JOIN health h
    CROSS JOIN period_steps ps
    CROSS JOIN throughput tp;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- 8. get_slowest_steps_v01: the slowest recently completed steps.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION tasker_ref.get_slowest_steps_v01(
    since_timestamp timestamptz DEFAULT NULL,
    limit_count integer DEFAULT 10,
    namespace_filter text DEFAULT NULL,
    task_name_filter text DEFAULT NULL,
    version_filter text DEFAULT NULL)
RETURNS TABLE(workflow_step_id bigint, task_id bigint, step_name character varying,
              task_name character varying, namespace_name character varying,
              version character varying, duration_seconds numeric, attempts integer,
              created_at timestamptz, completed_at timestamptz, retryable boolean,
              step_status character varying)
LANGUAGE plpgsql STABLE
AS $$
#variable_conflict use_column
DECLARE
    analysis_start timestamptz := COALESCE(since_timestamp, now() - interval '24 hours');
BEGIN
    RETURN QUERY
    SELECT d.sid, d.tid, d.step_name, d.task_name, d.namespace_name, d.task_version,
           round(d.duration, 3), d.step_attempts, d.step_created::timestamptz,
           d.step_completed::timestamptz, d.step_retryable, d.state
    FROM (
        SELECT ws.workflow_step_id AS sid, ws.task_id AS tid,
               ns.name AS step_name, nt.name AS task_name, tn.name AS namespace_name,
               nt.version AS task_version,
               EXTRACT(EPOCH FROM (cur.created_at - ws.created_at)) AS duration,
               ws.attempts AS step_attempts, ws.created_at AS step_created,
               cur.created_at AS step_completed, ws.retryable AS step_retryable,
               cur.to_state AS state
        FROM tasker_workflow_steps ws
        JOIN tasker_workflow_step_transitions cur
          ON cur.workflow_step_id = ws.workflow_step_id AND cur.most_recent = true
        JOIN tasker_named_steps ns ON ns.named_step_id = ws.named_step_id
        JOIN tasker_tasks t ON t.task_id = ws.task_id
        JOIN tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
        JOIN tasker_task_namespaces tn ON tn.task_namespace_id = nt.task_namespace_id
        WHERE ws.created_at > analysis_start
          AND cur.to_state = 'complete'
          AND (namespace_filter IS NULL OR tn.name = namespace_filter)
          AND (task_name_filter IS NULL OR nt.name = task_name_filter)
          AND (version_filter IS NULL OR nt.version = version_filter)
    ) d
    WHERE d.duration > 0
    ORDER BY d.duration DESC, d.sid
    LIMIT limit_count;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- 9. get_slowest_tasks_v01: the slowest recent tasks that have a finished (complete or error)
--    step. Counts reproduce the Rails fan-out: every step is joined to all of its transitions,
--    so it counts max(1, number of its transitions) times.
-- ---------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION tasker_ref.get_slowest_tasks_v01(
    since_timestamp timestamptz DEFAULT NULL,
    limit_count integer DEFAULT 10,
    namespace_filter text DEFAULT NULL,
    task_name_filter text DEFAULT NULL,
    version_filter text DEFAULT NULL)
RETURNS TABLE(task_id bigint, task_name character varying, namespace_name character varying,
              version character varying, duration_seconds numeric, step_count bigint,
              completed_steps bigint, error_steps bigint, created_at timestamptz,
              completed_at timestamptz, initiator character varying,
              source_system character varying)
LANGUAGE plpgsql STABLE
AS $$
#variable_conflict use_column
DECLARE
    analysis_start timestamptz := COALESCE(since_timestamp, now() - interval '24 hours');
BEGIN
    RETURN QUERY
    SELECT g.tid, g.task_name, g.namespace_name, g.task_version,
           round(EXTRACT(EPOCH FROM (g.finished - g.task_created)), 3),
           g.n_steps, g.n_complete, g.n_error,
           g.task_created::timestamptz, g.finished::timestamptz,
           g.task_initiator, g.task_source
    FROM (
        SELECT t.task_id AS tid, nt.name AS task_name, tn.name AS namespace_name,
               nt.version AS task_version, t.created_at AS task_created,
               t.initiator AS task_initiator, t.source_system AS task_source,
               count(*) AS n_steps,
               count(*) FILTER (WHERE cur.to_state = 'complete') AS n_complete,
               count(*) FILTER (WHERE cur.to_state = 'error') AS n_error,
               max(cur.created_at) FILTER (WHERE cur.to_state IN ('complete', 'error')) AS finished
        FROM tasker_tasks t
        JOIN tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
        JOIN tasker_task_namespaces tn ON tn.task_namespace_id = nt.task_namespace_id
        JOIN tasker_workflow_steps ws ON ws.task_id = t.task_id
        LEFT JOIN tasker_workflow_step_transitions anytr
               ON anytr.workflow_step_id = ws.workflow_step_id
        LEFT JOIN tasker_workflow_step_transitions cur
               ON cur.workflow_step_id = ws.workflow_step_id AND cur.most_recent = true
        WHERE t.created_at > analysis_start
          AND (namespace_filter IS NULL OR tn.name = namespace_filter)
          AND (task_name_filter IS NULL OR nt.name = task_name_filter)
          AND (version_filter IS NULL OR nt.version = version_filter)
        GROUP BY t.task_id, nt.name, tn.name, nt.version, t.created_at, t.initiator,
                 t.source_system
    ) g
    WHERE g.finished IS NOT NULL
    ORDER BY EXTRACT(EPOCH FROM (g.finished - g.task_created)) DESC, g.tid
    LIMIT limit_count;
END;
$$;

-- ---------------------------------------------------------------------------------------------
-- 10. step_dag_relationships: the tasker_step_dag_relationships rows of one task's steps.
--
-- LANGUAGE sql, not plpgsql: the documented signature has an argument named task_id and an
-- output column named task_id, which PostgreSQL accepts for SQL functions but PL/pgSQL
-- rejects ("parameter name used more than once"). The argument is read as $1 (in a SQL
-- function body a bare task_id would mean the column). STRICT keeps the function from being
-- inlined into the caller's query, like the PL/pgSQL functions above; a NULL id has no steps.
-- Body checking is switched off while it is created so that, like the PL/pgSQL functions, it
-- can be loaded before (or without) the tasker_* tables being on the search_path.
--
-- Same values as the view: parents and children are edges from/to any task, and the depth is
-- the shortest distance from any step without incoming edges, capped at 50. The depth walk is
-- confined to the ancestors of the task's steps (every path from a root to one of them lies
-- among them), so it does not walk the whole graph; UNION keeps one row per (step, depth).
-- ---------------------------------------------------------------------------------------------
SET check_function_bodies = off;

CREATE OR REPLACE FUNCTION tasker_ref.step_dag_relationships(task_id bigint)
RETURNS TABLE(workflow_step_id bigint, task_id bigint, named_step_id integer,
              parent_step_ids jsonb, child_step_ids jsonb, parent_count bigint,
              child_count bigint, is_root_step boolean, is_leaf_step boolean,
              min_depth_from_root integer)
LANGUAGE sql STABLE STRICT
AS $$
    WITH RECURSIVE task_steps AS (
        SELECT ws.workflow_step_id AS sid, ws.task_id AS tid, ws.named_step_id AS nsid
        FROM tasker_workflow_steps ws
        WHERE ws.task_id = $1
    ),
    ancestors(sid) AS (
        SELECT ts.sid FROM task_steps ts
      UNION
        SELECT e.from_step_id
        FROM ancestors a
        JOIN tasker_workflow_step_edges e ON e.to_step_id = a.sid
    ),
    walk(sid, depth) AS (
        SELECT a.sid, 0
        FROM ancestors a
        WHERE NOT EXISTS (SELECT 1 FROM tasker_workflow_step_edges e WHERE e.to_step_id = a.sid)
      UNION
        SELECT e.to_step_id, w.depth + 1
        FROM walk w
        JOIN tasker_workflow_step_edges e ON e.from_step_id = w.sid
        JOIN ancestors a ON a.sid = e.to_step_id
        WHERE w.depth < 50
    ),
    depths AS (
        SELECT w.sid, min(w.depth) AS depth
        FROM walk w
        GROUP BY w.sid
    ),
    parents AS (
        SELECT e.to_step_id AS sid, jsonb_agg(e.from_step_id ORDER BY e.from_step_id) AS ids,
               count(*) AS n
        FROM task_steps ts
        JOIN tasker_workflow_step_edges e ON e.to_step_id = ts.sid
        GROUP BY e.to_step_id
    ),
    children AS (
        SELECT e.from_step_id AS sid, jsonb_agg(e.to_step_id ORDER BY e.to_step_id) AS ids,
               count(*) AS n
        FROM task_steps ts
        JOIN tasker_workflow_step_edges e ON e.from_step_id = ts.sid
        GROUP BY e.from_step_id
    )
    SELECT ts.sid,
           ts.tid,
           ts.nsid,
           COALESCE(p.ids, '[]'::jsonb),
           COALESCE(c.ids, '[]'::jsonb),
           COALESCE(p.n, 0::bigint),
           COALESCE(c.n, 0::bigint),
           COALESCE(p.n, 0::bigint) = 0,
           COALESCE(c.n, 0::bigint) = 0,
           d.depth
    FROM task_steps ts
    LEFT JOIN parents p ON p.sid = ts.sid
    LEFT JOIN children c ON c.sid = ts.sid
    LEFT JOIN depths d ON d.sid = ts.sid;
$$;

RESET check_function_bodies;
