-- The whole-table aggregates of the Rails compatibility surface: get_system_health_counts_v01,
-- get_analytics_metrics_v01, get_slowest_steps_v01, get_slowest_tasks_v01.
--
-- These are set-based aggregations over every task and step, which PostgreSQL's executor does
-- best; what makes them fast is reading the maintained step state (one narrow row per step,
-- current state included) instead of joining every step to its transitions. When tracking is
-- not enabled they read the Tasker tables directly. Semantics: docs/compat-semantics.md.

-- The step relation the aggregates read: maintained state when the data schema is tracked,
-- the recomputation from the tables otherwise. Columns: workflow_step_id, task_id, state
-- (most_recent to_state or NULL), state_at, transition_count, attempts, retry_limit,
-- retryable, last_attempted_at, created_at.
CREATE FUNCTION tasker_core._step_source(data_schema name) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN EXISTS (SELECT 1 FROM tasker_core.tracking t WHERE t.data_schema = $1) THEN
        '(SELECT s.workflow_step_id, s.task_id, s.state, s.state_at, s.transition_count, s.attempts,
                 s.retry_limit, s.retryable, s.last_attempted_at, s.created_at
          FROM tasker_core.step_state s)'
    ELSE format(
        '(SELECT ws.workflow_step_id, ws.task_id, cur.to_state::text AS state, cur.created_at AS state_at,
                 (SELECT count(*) FROM %1$I.tasker_workflow_step_transitions x
                   WHERE x.workflow_step_id = ws.workflow_step_id)::integer AS transition_count,
                 ws.attempts, ws.retry_limit, ws.retryable, ws.last_attempted_at, ws.created_at
          FROM %1$I.tasker_workflow_steps ws
          LEFT JOIN %1$I.tasker_workflow_step_transitions cur
                 ON cur.workflow_step_id = ws.workflow_step_id AND cur.most_recent)', $1)
    END
$$;

CREATE FUNCTION tasker_core._data_schema() RETURNS name
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT COALESCE(NULLIF(current_setting('tasker_core.data_schema', true), ''), 'public')::name
$$;

CREATE FUNCTION tasker_core.get_system_health_counts_v01()
RETURNS TABLE(total_tasks bigint, pending_tasks bigint, in_progress_tasks bigint,
              complete_tasks bigint, error_tasks bigint, cancelled_tasks bigint,
              total_steps bigint, pending_steps bigint, in_progress_steps bigint,
              complete_steps bigint, error_steps bigint, retryable_error_steps bigint,
              exhausted_retry_steps bigint, in_backoff_steps bigint,
              active_connections bigint, max_connections bigint)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ds name := tasker_core._data_schema();
BEGIN
    RETURN QUERY EXECUTE format($q$
        WITH tasks AS (
            SELECT count(*) AS total,
                   count(*) FILTER (WHERE tt.to_state = 'pending') AS pending,
                   count(*) FILTER (WHERE tt.to_state = 'in_progress') AS in_progress,
                   count(*) FILTER (WHERE tt.to_state = 'complete') AS complete,
                   count(*) FILTER (WHERE tt.to_state = 'error') AS error,
                   count(*) FILTER (WHERE tt.to_state = 'cancelled') AS cancelled
            FROM %1$I.tasker_tasks t
            LEFT JOIN %1$I.tasker_task_transitions tt ON tt.task_id = t.task_id AND tt.most_recent
        ), steps AS (
            SELECT count(*) AS total,
                   count(*) FILTER (WHERE s.state = 'pending') AS pending,
                   count(*) FILTER (WHERE s.state = 'in_progress') AS in_progress,
                   count(*) FILTER (WHERE s.state = 'complete') AS complete,
                   count(*) FILTER (WHERE s.state = 'error') AS error,
                   count(*) FILTER (WHERE s.state = 'error' AND s.attempts < s.retry_limit
                                      AND COALESCE(s.retryable, true)) AS retryable_error,
                   count(*) FILTER (WHERE s.state = 'error' AND s.attempts >= s.retry_limit) AS exhausted,
                   count(*) FILTER (WHERE s.state = 'error' AND s.attempts < s.retry_limit
                                      AND COALESCE(s.retryable, true)
                                      AND s.last_attempted_at IS NOT NULL) AS in_backoff
            FROM %2$s s
        ), conns AS (
            SELECT count(*) AS active,
                   COALESCE((SELECT setting::bigint FROM pg_catalog.pg_settings
                             WHERE name = 'max_connections'), 0) AS max
            FROM pg_catalog.pg_stat_activity
            WHERE datname = current_database() AND state = 'active'
        )
        SELECT tasks.total, tasks.pending, tasks.in_progress, tasks.complete, tasks.error,
               tasks.cancelled, steps.total, steps.pending, steps.in_progress, steps.complete,
               steps.error, steps.retryable_error, steps.exhausted, steps.in_backoff,
               conns.active, conns.max
        FROM tasks, steps, conns
    $q$, ds, tasker_core._step_source(ds));
END;
$$;

CREATE FUNCTION tasker_core.get_analytics_metrics_v01(since_timestamp timestamptz DEFAULT NULL)
RETURNS TABLE(active_tasks_count bigint, total_namespaces_count bigint,
              unique_task_types_count bigint, system_health_score numeric,
              task_throughput bigint, completion_count bigint, error_count bigint,
              completion_rate numeric, error_rate numeric, avg_task_duration numeric,
              avg_step_duration numeric, step_throughput bigint,
              analysis_period_start timestamptz, calculated_at timestamptz)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ds name := tasker_core._data_schema();
BEGIN
    RETURN QUERY EXECUTE format($q$
        WITH params AS (
            SELECT COALESCE($1, now() - interval '1 hour') AS since
        ), active AS (
            SELECT count(DISTINCT s.task_id) AS n FROM %2$s s
            WHERE s.state NOT IN ('complete', 'error', 'skipped', 'resolved_manually')
        ), namespaces AS (
            SELECT count(DISTINCT tn.name) AS n
            FROM %1$I.tasker_task_namespaces tn
            JOIN %1$I.tasker_named_tasks nt ON nt.task_namespace_id = tn.task_namespace_id
            WHERE EXISTS (SELECT 1 FROM %1$I.tasker_tasks t WHERE t.named_task_id = nt.named_task_id)
        ), task_types AS (
            SELECT count(DISTINCT nt.name) AS n
            FROM %1$I.tasker_named_tasks nt
            WHERE EXISTS (SELECT 1 FROM %1$I.tasker_tasks t WHERE t.named_task_id = nt.named_task_id)
        ), recent AS (
            SELECT count(DISTINCT t.task_id) FILTER (WHERE s.state = 'complete') AS completed,
                   count(DISTINCT t.task_id) FILTER (WHERE s.state = 'error') AS errored
            FROM %1$I.tasker_tasks t
            JOIN %2$s s ON s.task_id = t.task_id
            WHERE t.created_at > now() - interval '1 hour'
        ), period AS (
            SELECT count(DISTINCT t.task_id) AS throughput,
                   count(DISTINCT t.task_id) FILTER (WHERE s.state = 'complete') AS completions,
                   count(DISTINCT t.task_id) FILTER (WHERE s.state = 'error') AS errors,
                   count(DISTINCT s.workflow_step_id) AS step_count,
                   avg(EXTRACT(EPOCH FROM (s.state_at - t.created_at))) FILTER (WHERE s.state = 'complete') AS task_secs,
                   avg(EXTRACT(EPOCH FROM (s.state_at - s.created_at))) FILTER (WHERE s.state = 'complete') AS step_secs
            FROM %1$I.tasker_tasks t
            LEFT JOIN %2$s s ON s.task_id = t.task_id
            WHERE t.created_at > (SELECT since FROM params)
        )
        SELECT active.n, namespaces.n, task_types.n,
               CASE WHEN recent.completed + recent.errored > 0
                    THEN round(recent.completed::numeric / (recent.completed + recent.errored), 3)
                    ELSE 1.0 END,
               period.throughput, period.completions, period.errors,
               CASE WHEN period.throughput > 0
                    THEN round(period.completions::numeric / period.throughput * 100, 2) ELSE 0.0 END,
               CASE WHEN period.throughput > 0
                    THEN round(period.errors::numeric / period.throughput * 100, 2) ELSE 0.0 END,
               round(COALESCE(period.task_secs, 0), 3),
               round(COALESCE(period.step_secs, 0), 3),
               period.step_count,
               (SELECT since FROM params),
               now()
        FROM active, namespaces, task_types, recent, period
    $q$, ds, tasker_core._step_source(ds)) USING since_timestamp;
END;
$$;

CREATE FUNCTION tasker_core.get_slowest_steps_v01(
    since_timestamp timestamptz DEFAULT NULL, limit_count integer DEFAULT 10,
    namespace_filter text DEFAULT NULL, task_name_filter text DEFAULT NULL,
    version_filter text DEFAULT NULL)
RETURNS TABLE(workflow_step_id bigint, task_id bigint, step_name character varying,
              task_name character varying, namespace_name character varying,
              version character varying, duration_seconds numeric, attempts integer,
              created_at timestamptz, completed_at timestamptz, retryable boolean,
              step_status character varying)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ds name := tasker_core._data_schema();
BEGIN
    RETURN QUERY EXECUTE format($q$
        SELECT d.workflow_step_id, d.task_id, d.step_name, d.task_name, d.namespace_name,
               d.version, round(d.secs, 3), d.attempts, d.created_at::timestamptz,
               d.state_at::timestamptz, d.retryable, d.state::character varying
        FROM (
            SELECT ws.workflow_step_id, ws.task_id, ns.name AS step_name, nt.name AS task_name,
                   tn.name AS namespace_name, nt.version, ws.attempts, ws.created_at, ws.retryable,
                   s.state, s.state_at, EXTRACT(EPOCH FROM (s.state_at - ws.created_at)) AS secs
            FROM %2$s s
            JOIN %1$I.tasker_workflow_steps ws ON ws.workflow_step_id = s.workflow_step_id
            JOIN %1$I.tasker_named_steps ns ON ns.named_step_id = ws.named_step_id
            JOIN %1$I.tasker_tasks t ON t.task_id = ws.task_id
            JOIN %1$I.tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
            JOIN %1$I.tasker_task_namespaces tn ON tn.task_namespace_id = nt.task_namespace_id
            WHERE s.state = 'complete'
              AND s.created_at > COALESCE($1, now() - interval '24 hours')
              AND ($3 IS NULL OR tn.name = $3)
              AND ($4 IS NULL OR nt.name = $4)
              AND ($5 IS NULL OR nt.version = $5)
        ) d
        WHERE d.secs > 0
        ORDER BY d.secs DESC
        LIMIT $2
    $q$, ds, tasker_core._step_source(ds))
    USING since_timestamp, limit_count, namespace_filter, task_name_filter, version_filter;
END;
$$;

CREATE FUNCTION tasker_core.get_slowest_tasks_v01(
    since_timestamp timestamptz DEFAULT NULL, limit_count integer DEFAULT 10,
    namespace_filter text DEFAULT NULL, task_name_filter text DEFAULT NULL,
    version_filter text DEFAULT NULL)
RETURNS TABLE(task_id bigint, task_name character varying, namespace_name character varying,
              version character varying, duration_seconds numeric, step_count bigint,
              completed_steps bigint, error_steps bigint, created_at timestamptz,
              completed_at timestamptz, initiator character varying,
              source_system character varying)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ds name := tasker_core._data_schema();
BEGIN
    -- Each step weighs max(1, its number of transitions): the Rails query joins every
    -- transition of every step, which inflates the step counts the same way.
    RETURN QUERY EXECUTE format($q$
        SELECT d.task_id, d.task_name, d.namespace_name, d.version,
               round(EXTRACT(EPOCH FROM (d.done_at - d.created_at)), 3),
               d.step_rows, d.complete_rows, d.error_rows,
               d.created_at::timestamptz, d.done_at::timestamptz, d.initiator, d.source_system
        FROM (
            SELECT t.task_id, nt.name AS task_name, tn.name AS namespace_name, nt.version,
                   t.created_at, t.initiator, t.source_system,
                   max(s.state_at) FILTER (WHERE s.state IN ('complete', 'error')) AS done_at,
                   sum(greatest(s.transition_count, 1))::bigint AS step_rows,
                   COALESCE(sum(greatest(s.transition_count, 1)) FILTER (WHERE s.state = 'complete'), 0)::bigint AS complete_rows,
                   COALESCE(sum(greatest(s.transition_count, 1)) FILTER (WHERE s.state = 'error'), 0)::bigint AS error_rows
            FROM %1$I.tasker_tasks t
            JOIN %1$I.tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
            JOIN %1$I.tasker_task_namespaces tn ON tn.task_namespace_id = nt.task_namespace_id
            JOIN %2$s s ON s.task_id = t.task_id
            WHERE t.created_at > COALESCE($1, now() - interval '24 hours')
              AND ($3 IS NULL OR tn.name = $3)
              AND ($4 IS NULL OR nt.name = $4)
              AND ($5 IS NULL OR nt.version = $5)
            GROUP BY t.task_id, nt.name, tn.name, nt.version, t.created_at, t.initiator, t.source_system
        ) d
        WHERE d.done_at IS NOT NULL
        ORDER BY EXTRACT(EPOCH FROM (d.done_at - d.created_at)) DESC
        LIMIT $2
    $q$, ds, tasker_core._step_source(ds))
    USING since_timestamp, limit_count, namespace_filter, task_name_filter, version_filter;
END;
$$;
