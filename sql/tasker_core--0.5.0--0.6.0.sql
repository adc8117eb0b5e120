-- tasker_core 0.5.0 -> 0.6.0
-- * report_and_claim(worker_id, outcomes, namespaces, max_steps, lease_seconds, traceparent):
--   report_steps and claim_steps in one transaction (one commit per step for a busy worker;
--   the claim half never waits for a lock).
-- * create_roles() grants it to tasker_worker.
-- * metrics() escapes newlines in label values (Prometheus' text format), as it did
--   backslashes and double quotes.
-- Nothing else changes: the library serves the 0.5.0 SQL as before until this script runs.
\echo Use "ALTER EXTENSION tasker_core UPDATE TO '0.6.0'" to load this file. \quit

CREATE FUNCTION tasker_core."report_and_claim"(
	"worker_id" TEXT,
	"outcomes" jsonb,
	"namespaces" TEXT[] DEFAULT NULL,
	"max_steps" INT DEFAULT 1,
	"lease_seconds" INT DEFAULT 60,
	"traceparent" TEXT DEFAULT NULL
) RETURNS TABLE (
	"outcome" TEXT,
	"workflow_step_id" bigint,
	"backoff_seconds" INT,
	"task_id" bigint,
	"step_name" TEXT,
	"namespace" TEXT,
	"task_name" TEXT,
	"handler_class" TEXT,
	"handler_config" jsonb,
	"inputs" jsonb,
	"parent_results" jsonb,
	"attempt" INT,
	"lease_expires_at" timestamp with time zone
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'report_and_claim_wrapper';
ALTER FUNCTION tasker_core.report_and_claim(text, jsonb, text[], integer, integer, text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE ALL ON FUNCTION tasker_core.report_and_claim(text, jsonb, text[], integer, integer, text) FROM PUBLIC;
-- workers of roles created before this version (create_roles() ran in this database) may
-- report and claim in one call too
DO $grant$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'tasker_worker')
       AND pg_catalog.has_function_privilege('tasker_worker', 'tasker_core.report_steps(text, jsonb)',
                                             'EXECUTE') THEN
        GRANT EXECUTE ON FUNCTION tasker_core.report_and_claim(text, jsonb, text[], integer, integer, text) TO tasker_worker;
    END IF;
END;
$grant$;

CREATE OR REPLACE FUNCTION tasker_core.create_roles() RETURNS SETOF text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r text;
    ds name := tasker_core._data_schema();
    t record;
    worker_fns text[] := ARRAY['claim_steps', 'complete_step', 'fail_step', 'report_steps', 'report_and_claim', 'heartbeat', 'release_step',
                               'events_after', 'event_horizon', 'event_catalog', 'subscribe', 'poll',
                               'ack', 'unsubscribe', 'backoff_seconds', 'task_traceparent'];
    reader_fns text[] := ARRAY['get_step_readiness_status', 'get_step_readiness_status_batch',
                               'get_task_execution_context', 'get_task_execution_contexts_batch',
                               'calculate_dependency_levels', 'get_system_health_counts_v01',
                               'get_analytics_metrics_v01', 'get_slowest_steps_v01', 'get_slowest_tasks_v01',
                               'step_dag_relationships', 'task_steps', 'data_schema', 'now',
                               '_data_schema', '_step_source',
                               'get_task_template', 'list_task_templates', 'task_graph_dot', 'metrics',
                               'health', 'verify', 'check_tracking', 'events_after', 'event_horizon',
                               'event_catalog', 'backoff_seconds', 'task_traceparent'];
    admin_fns text[] := ARRAY['register_task_template', 'create_task', 'cancel_task', 'retry_task',
                              'resolve_step_manually', 'tick', 'prune_events', 'transition_step',
                              'transition_task'];
    grants record;
BEGIN
    FOREACH r IN ARRAY ARRAY['tasker_worker', 'tasker_reader', 'tasker_admin'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            RETURN NEXT format('created role %s', r);
        END IF;
        EXECUTE format('GRANT USAGE ON SCHEMA tasker_core TO %I', r);
    END LOOP;
    EXECUTE 'GRANT tasker_reader TO tasker_admin';
    FOR grants IN
        SELECT g.role, p.oid::regprocedure AS fn
        FROM (VALUES ('tasker_worker', worker_fns), ('tasker_reader', reader_fns),
                     ('tasker_admin', admin_fns)) AS g(role, fns)
        JOIN pg_proc p ON p.pronamespace = 'tasker_core'::regnamespace AND p.proname = ANY (g.fns)
        ORDER BY 1, 2::text
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %I', grants.fn, grants.role);
    END LOOP;
    -- The compatibility functions run as their caller and read the maintained state.
    GRANT SELECT ON tasker_core.step_state, tasker_core.tracking TO tasker_reader;
    FOR t IN
        SELECT c.oid::regclass AS rel FROM pg_class c
        WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = ds)
          AND c.relkind IN ('r', 'v', 'p') AND c.relname LIKE 'tasker\_%'
        ORDER BY 1::text
    LOOP
        EXECUTE format('GRANT SELECT ON %s TO tasker_reader', t.rel);
    END LOOP;
    RETURN NEXT format('granted tasker_worker %s functions, tasker_reader %s, tasker_admin %s (and tasker_reader); tasker_reader may read the tables of schema %s',
                       cardinality(worker_fns), cardinality(reader_fns), cardinality(admin_fns), ds);
END;
$$;
REVOKE ALL ON FUNCTION tasker_core.create_roles() FROM PUBLIC;

CREATE OR REPLACE FUNCTION tasker_core.metrics() RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ds name := tasker_core._data_schema();
    out text := '';
    r record;
    now_utc timestamp := tasker_core.now() AT TIME ZONE 'UTC';
BEGIN
    PERFORM tasker_core._require_tables(ds, ARRAY['tasker_tasks', 'tasker_workflow_steps',
        'tasker_workflow_step_edges', 'tasker_workflow_step_transitions', 'tasker_task_transitions',
        'tasker_named_steps', 'tasker_named_tasks', 'tasker_task_namespaces']);
    out := out || E'# HELP tasker_tasks Tasks by current state.\n# TYPE tasker_tasks gauge\n';
    FOR r IN EXECUTE format($q$
        SELECT s.state, count(t.task_id) AS n
        FROM unnest(ARRAY['pending','in_progress','complete','error','cancelled','resolved_manually']) AS s(state)
        LEFT JOIN (SELECT t.task_id, COALESCE(tt.to_state, 'pending') AS state
                   FROM %1$I.tasker_tasks t
                   LEFT JOIN %1$I.tasker_task_transitions tt ON tt.task_id = t.task_id AND tt.most_recent) t
               ON t.state = s.state
        GROUP BY s.state ORDER BY s.state$q$, ds) LOOP
        out := out || format(E'tasker_tasks{state="%s"} %s\n', r.state, r.n);
    END LOOP;
    out := out || E'# HELP tasker_steps Workflow steps by current state.\n# TYPE tasker_steps gauge\n';
    FOR r IN
        SELECT s.state, count(x.workflow_step_id) AS n
        FROM unnest(ARRAY['pending','in_progress','complete','error','cancelled','resolved_manually']) AS s(state)
        LEFT JOIN tasker_core.step_state x ON COALESCE(x.state, 'pending') = s.state
        GROUP BY s.state ORDER BY s.state LOOP
        out := out || format(E'tasker_steps{state="%s"} %s\n', r.state, r.n);
    END LOOP;
    SELECT count(*) FILTER (WHERE ready) AS ready,
           count(*) FILTER (WHERE waiting) AS backoff,
           EXTRACT(EPOCH FROM now_utc - min(since) FILTER (WHERE ready)) AS oldest
      INTO r
      FROM (SELECT (s.last_attempted_at IS NULL OR s.backoff_request_seconds IS NULL
                    OR s.last_attempted_at + s.backoff_request_seconds * interval '1 second' <= now_utc) AS ready,
                   (s.last_attempted_at IS NOT NULL AND s.backoff_request_seconds IS NOT NULL
                    AND s.last_attempted_at + s.backoff_request_seconds * interval '1 second' > now_utc) AS waiting,
                   COALESCE(s.last_attempted_at + s.backoff_request_seconds * interval '1 second',
                            s.state_at, s.created_at) AS since
            FROM tasker_core.step_state s
            WHERE s.blocked_parents = 0 AND s.processed IS NOT TRUE AND s.in_process IS NOT TRUE
              AND (s.state IS NULL OR s.state IN ('pending', 'error'))
              AND COALESCE(s.attempts, 0) < COALESCE(s.retry_limit, 3)
              AND (COALESCE(s.retryable, true) OR COALESCE(s.attempts, 0) = 0)) c;
    out := out || E'# HELP tasker_steps_ready Steps a worker could claim now.\n# TYPE tasker_steps_ready gauge\n'
               || format(E'tasker_steps_ready %s\n', r.ready)
               || E'# HELP tasker_steps_in_backoff Failed steps waiting out their retry backoff.\n# TYPE tasker_steps_in_backoff gauge\n'
               || format(E'tasker_steps_in_backoff %s\n', r.backoff)
               || E'# HELP tasker_oldest_ready_step_age_seconds How long the oldest claimable step has waited.\n# TYPE tasker_oldest_ready_step_age_seconds gauge\n'
               || format(E'tasker_oldest_ready_step_age_seconds %s\n', COALESCE(round(r.oldest, 3), 0));
    out := out || E'# HELP tasker_leases Step leases held by workers, and those past their deadline.\n# TYPE tasker_leases gauge\n'
               || (SELECT format(E'tasker_leases{status="active"} %s\ntasker_leases{status="expired"} %s\n',
                                 count(*) FILTER (WHERE c.lease_expires_at > tasker_core.now()),
                                 count(*) FILTER (WHERE c.lease_expires_at <= tasker_core.now()))
                   FROM tasker_core.step_claims c);
    out := out || E'# HELP tasker_events_written_total Lifecycle events recorded in the log.\n# TYPE tasker_events_written_total counter\n'
               || format(E'tasker_events_written_total %s\n',
                         COALESCE((SELECT last_value FROM tasker_core.events_id_seq WHERE is_called), 0));
    out := out || E'# HELP tasker_steps_completed_total Steps completed, by namespace.\n# TYPE tasker_steps_completed_total counter\n';
    FOR r IN EXECUTE format($q$
        SELECT tn.name AS ns, sum(c.n) AS n
        FROM (SELECT s.namespace_id, count(*) AS n FROM tasker_core.step_state s
              WHERE s.state = 'complete' GROUP BY s.namespace_id) c
        JOIN %1$I.tasker_task_namespaces tn ON tn.task_namespace_id = c.namespace_id
        GROUP BY tn.name ORDER BY tn.name$q$, ds) LOOP
        out := out || format(E'tasker_steps_completed_total{namespace="%s"} %s\n',
                             replace(replace(replace(r.ns, '\', '\\'), '"', '\"'), E'\n', '\n'), r.n);
    END LOOP;
    RETURN out;
END;
$$;
ALTER FUNCTION tasker_core.metrics() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
