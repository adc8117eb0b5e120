-- tasker_core 0.5.0 -> 0.6.0
-- * report_and_claim(worker_id, outcomes, namespaces, max_steps, lease_seconds, traceparent):
--   report_steps and claim_steps in one transaction (one commit per step for a busy worker;
--   the claim half never waits for a lock).
-- * create_roles() grants it to tasker_worker.
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
