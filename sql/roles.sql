-- Least privilege.
--
-- Three kinds of function, three rules:
-- * The Rails compatibility functions (the nine, step_dag_relationships, task_steps) run as
--   their caller (SECURITY INVOKER): they read only what the caller may read, like the PL/pgSQL
--   functions they replace.
-- * Everything a worker, reader or operator calls runs as the extension's owner (SECURITY
--   DEFINER) with a pinned search_path, so those roles need no privilege on any table: a worker
--   can claim and complete steps and can not UPDATE a step directly.
-- * Maintenance that creates or drops objects (install_schema, enable/disable/rebuild_tracking,
--   switch_over/back) stays with the owner.
-- Nobody but the owner may execute anything until tasker_core.create_roles() grants it.
-- The trigger functions also run as the owner, so any role allowed to write the Tasker tables
-- keeps tasker_core.step_state up to date without privileges on it.

DO $roles$
DECLARE
    f regprocedure;
BEGIN
    FOR f IN
        SELECT p.oid::regprocedure FROM pg_catalog.pg_proc p
        WHERE p.pronamespace = 'tasker_core'::regnamespace
          AND p.proname = ANY (ARRAY[
              -- worker
              'claim_steps', 'complete_step', 'fail_step', 'report_steps', 'report_and_claim', 'heartbeat', 'release_step',
              'events_after', 'event_horizon', 'event_catalog', 'subscribe', 'poll', 'ack', 'unsubscribe',
              'task_traceparent',
              -- reader
              'get_task_template', 'list_task_templates', 'task_graph_dot', 'metrics', 'health',
              'verify', 'check_tracking', 'explain_task', 'explain_step',
              -- admin
              'register_task_template', 'create_task', 'cancel_task', 'retry_task',
              'resolve_step_manually', 'tick', 'prune_events', 'transition_step', 'transition_task',
              '_archive_batch',
              -- triggers
              'track_steps', 'track_named_steps', 'track_edges', 'track_step_transitions', 'track_truncate'])
    LOOP
        EXECUTE pg_catalog.format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = pg_catalog, pg_temp', f);
    END LOOP;
END;
$roles$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA tasker_core FROM PUBLIC;
REVOKE ALL ON ALL PROCEDURES IN SCHEMA tasker_core FROM PUBLIC;
-- The condition of the tracking row triggers runs as whichever role writes the Tasker tables.
GRANT EXECUTE ON FUNCTION tasker_core._self_maintained() TO PUBLIC;

-- Creates the roles tasker_worker, tasker_reader and tasker_admin (NOLOGIN; existing ones are
-- kept) and grants each exactly its functions:
--   tasker_worker  claim, complete, fail, heartbeat, release; read events; subscriptions;
--                  a task's traceparent
--   tasker_reader  the Rails compatibility functions (and SELECT on the Tasker tables of the
--                  data schema and the maintained state they read), templates, the DAG
--                  picture, metrics, health, verify, events, explain
--   tasker_admin   tasker_reader, plus templates, task creation, cancel, retry, manual
--                  resolution, tick, event pruning, transitions, archive_tasks
-- Run it as a role that may create roles and owns the extension (a superuser, usually); run
-- it again after install_schema() into another schema. Returns what it did, one line each.
CREATE FUNCTION tasker_core.create_roles() RETURNS SETOF text
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
                               'event_catalog', 'backoff_seconds', 'task_traceparent', 'explain_task',
                               'explain_step'];
    admin_fns text[] := ARRAY['register_task_template', 'create_task', 'cancel_task', 'retry_task',
                              'resolve_step_manually', 'tick', 'prune_events', 'transition_step',
                              'transition_task', 'archive_tasks', '_archive_batch'];
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
        EXECUTE format('GRANT EXECUTE ON ROUTINE %s TO %I', grants.fn, grants.role);
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
