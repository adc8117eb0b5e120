-- tasker_core 0.4.0 -> 0.5.0
--
-- * Self-maintained tracking: the worker path (claims, completions, failures, releases)
--   updates step_state in the statements that make its changes, and the tracking row triggers
--   skip those writes (WHEN NOT tasker_core._self_maintained()); the triggers of a tracked
--   schema are re-attached at the end of this script. Everyone else's writes still fire them.
-- * report_steps(worker_id, outcomes): many claimed steps' outcomes in one transaction.
-- * health() reports how wake-ups are sent (_wakeup_mode(): the notifier background worker
--   when tasker_core is preloaded, else NOTIFY in each transaction).
-- * tasker_core.now() has no SET clause, so the planner inlines it.
-- * install_schema(target_schema, index_profile): 'lean' (the default, from the setting
--   tasker_core.index_profile) creates only the unique indexes and those tasker_core reads;
--   'rails' the Rails engine's exact set. Schemas installed before keep their indexes.
-- * _lock_step_and_children is gone: the library locks a step and its children itself.
-- Until this script runs, the library serves the 0.4.0 SQL as before (the triggers fire for
-- every write: it maintains nothing itself while _self_maintained() does not exist).
\echo Use "ALTER EXTENSION tasker_core UPDATE TO '0.5.0'" to load this file. \quit

CREATE FUNCTION tasker_core."_self_maintained"() RETURNS bool
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'self_maintained_wrapper';
REVOKE ALL ON FUNCTION tasker_core._self_maintained() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION tasker_core._self_maintained() TO PUBLIC;

CREATE FUNCTION tasker_core."_wakeup_mode"() RETURNS TABLE (
	"mode" TEXT,
	"detail" TEXT
)
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'wakeup_mode_wrapper';
REVOKE ALL ON FUNCTION tasker_core._wakeup_mode() FROM PUBLIC;

CREATE FUNCTION tasker_core."report_steps"(
	"worker_id" TEXT,
	"outcomes" jsonb
) RETURNS TABLE (
	"workflow_step_id" bigint,
	"outcome" TEXT,
	"backoff_seconds" INT
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'report_steps_wrapper';
ALTER FUNCTION tasker_core.report_steps(text, jsonb) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE ALL ON FUNCTION tasker_core.report_steps(text, jsonb) FROM PUBLIC;
-- workers of roles created before this version (create_roles() ran in this database) may
-- report batches too
DO $grant$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'tasker_worker')
       AND pg_catalog.has_function_privilege('tasker_worker', 'tasker_core.complete_step(bigint, text, jsonb)',
                                             'EXECUTE') THEN
        GRANT EXECUTE ON FUNCTION tasker_core.report_steps(text, jsonb) TO tasker_worker;
    END IF;
END;
$grant$;

DROP FUNCTION tasker_core._lock_step_and_children(name, bigint);

DROP FUNCTION tasker_core.install_schema(text);
CREATE FUNCTION tasker_core."install_schema"(
	"target_schema" TEXT DEFAULT 'public',
	"index_profile" TEXT DEFAULT NULL
) RETURNS bool
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'install_schema_with_profile_wrapper';
REVOKE ALL ON FUNCTION tasker_core.install_schema(text, text) FROM PUBLIC;

CREATE OR REPLACE FUNCTION tasker_core.now() RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN pg_catalog.current_setting('tasker_core.fake_now', true) OPERATOR(pg_catalog.<>) ''
                THEN pg_catalog.current_setting('tasker_core.fake_now', true)::pg_catalog.timestamptz
                ELSE pg_catalog.now() END
$$;
REVOKE ALL ON FUNCTION tasker_core.now() FROM PUBLIC;

CREATE OR REPLACE FUNCTION tasker_core.health()
RETURNS TABLE(ready boolean, check_name text, ok boolean, detail text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ds name := tasker_core._data_schema();
    installed boolean := to_regclass(format('%I.tasker_workflow_steps', ds)) IS NOT NULL;
    tracked boolean := EXISTS (SELECT 1 FROM tasker_core.tracking t WHERE t.data_schema = ds);
    stale bigint := (SELECT count(*) FROM tasker_core.step_claims c
                     WHERE c.lease_expires_at < tasker_core.now() - interval '1 minute');
BEGIN
    RETURN QUERY
    SELECT bool_and(x.ok) OVER (), x.name, x.ok, x.detail
    FROM (VALUES
        ('schema_installed', installed, format('data schema %s', ds)),
        ('tracking_enabled', tracked, CASE WHEN tracked THEN 'maintained readiness state is on'
                                          ELSE 'run tasker_core.enable_tracking()' END),
        ('timers_running', stale = 0, CASE WHEN stale = 0 THEN 'no lease expired for over a minute'
                                          ELSE stale || ' leases expired over a minute ago: is tick() scheduled?' END),
        -- how wake-ups are sent (a choice, not a fault: always ok)
        ('wakeups', true, (SELECT m.mode || ': ' || m.detail FROM tasker_core._wakeup_mode() m))
    ) AS x(name, ok, detail);
END;
$$;
ALTER FUNCTION tasker_core.health() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE ALL ON FUNCTION tasker_core.health() FROM PUBLIC;

CREATE OR REPLACE FUNCTION tasker_core._create_tracking_triggers(target name) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- The row triggers skip the writes of tasker_core's own worker path, which maintains the
    -- rows itself in the statements that make the changes (tasker_core._self_maintained()).
    EXECUTE format('CREATE TRIGGER tasker_core_track AFTER INSERT OR DELETE
                    OR UPDATE OF workflow_step_id, task_id, named_step_id, retryable, retry_limit, in_process,
                                 processed, attempts, last_attempted_at, backoff_request_seconds, created_at
                    ON %I.tasker_workflow_steps
                    FOR EACH ROW WHEN (NOT tasker_core._self_maintained())
                    EXECUTE FUNCTION tasker_core.track_steps()', target);
    -- only real renames: registration's upsert rewrites every named step with its own name
    EXECUTE format('CREATE TRIGGER tasker_core_track AFTER UPDATE OF name ON %I.tasker_named_steps
                    FOR EACH ROW WHEN (OLD.name IS DISTINCT FROM NEW.name)
                    EXECUTE FUNCTION tasker_core.track_named_steps()', target);
    -- edges: inserts and deletes per statement (transition tables need one event per trigger),
    -- updates of their ends per row
    EXECUTE format('CREATE TRIGGER tasker_core_track AFTER UPDATE OF from_step_id, to_step_id
                    ON %I.tasker_workflow_step_edges
                    FOR EACH ROW EXECUTE FUNCTION tasker_core.track_edges()', target);
    -- (create_task writes a new task's edges with their maintained rows itself)
    EXECUTE format('CREATE TRIGGER tasker_core_track_insert AFTER INSERT ON %I.tasker_workflow_step_edges
                    REFERENCING NEW TABLE AS changed_edges
                    FOR EACH STATEMENT WHEN (NOT tasker_core._self_maintained())
                    EXECUTE FUNCTION tasker_core.track_edges()', target);
    EXECUTE format('CREATE TRIGGER tasker_core_track_delete AFTER DELETE ON %I.tasker_workflow_step_edges
                    REFERENCING OLD TABLE AS changed_edges
                    FOR EACH STATEMENT WHEN (NOT tasker_core._self_maintained())
                    EXECUTE FUNCTION tasker_core.track_edges()', target);
    EXECUTE format('CREATE TRIGGER tasker_core_track AFTER INSERT OR DELETE
                    OR UPDATE OF workflow_step_id, to_state, most_recent, created_at
                    ON %I.tasker_workflow_step_transitions
                    FOR EACH ROW WHEN (NOT tasker_core._self_maintained())
                    EXECUTE FUNCTION tasker_core.track_step_transitions()', target);
    EXECUTE format('CREATE TRIGGER tasker_core_track_truncate AFTER TRUNCATE ON %I.tasker_workflow_steps
                    FOR EACH STATEMENT EXECUTE FUNCTION tasker_core.track_truncate()', target);
    EXECUTE format('CREATE TRIGGER tasker_core_track_truncate AFTER TRUNCATE ON %I.tasker_workflow_step_edges
                    FOR EACH STATEMENT EXECUTE FUNCTION tasker_core.track_truncate()', target);
    EXECUTE format('CREATE TRIGGER tasker_core_track_truncate AFTER TRUNCATE ON %I.tasker_workflow_step_transitions
                    FOR EACH STATEMENT EXECUTE FUNCTION tasker_core.track_truncate()', target);
END;
$$;
REVOKE ALL ON FUNCTION tasker_core._create_tracking_triggers(name) FROM PUBLIC;

CREATE OR REPLACE FUNCTION tasker_core.create_roles() RETURNS SETOF text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r text;
    ds name := tasker_core._data_schema();
    t record;
    worker_fns text[] := ARRAY['claim_steps', 'complete_step', 'fail_step', 'report_steps', 'heartbeat', 'release_step',
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

-- The tracking row triggers skip self-maintained writes now: re-attach the triggers of a
-- tracked schema. The maintained rows are unchanged, so nothing is rebuilt.
DO $reattach$
DECLARE
    tracked name;
BEGIN
    SELECT t.data_schema INTO tracked FROM tasker_core.tracking t;
    IF tracked IS NOT NULL
       AND to_regclass(format('%I.tasker_workflow_steps', tracked)) IS NOT NULL
       AND to_regclass(format('%I.tasker_named_steps', tracked)) IS NOT NULL
       AND to_regclass(format('%I.tasker_workflow_step_edges', tracked)) IS NOT NULL
       AND to_regclass(format('%I.tasker_workflow_step_transitions', tracked)) IS NOT NULL THEN
        PERFORM tasker_core._drop_tracking_triggers(tracked);
        PERFORM tasker_core._create_tracking_triggers(tracked);
    END IF;
END;
$reattach$;
