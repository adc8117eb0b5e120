-- Switch-over for a Rails Tasker database: point the public function names (and the
-- tasker_step_dag_relationships view) at tasker_core, and back.
--
--   SELECT tasker_core.switch_over();   -- save the current definitions, enable tracking
--                                       -- (triggers + backfill), install the wrappers
--   SELECT tasker_core.switch_back();   -- restore the saved definitions, remove the
--                                       -- triggers and the maintained state
--
-- Both act on the data schema (tasker_core.data_schema, default public) and are
-- transactional. switch_over() is idempotent; switch_back() without a switch-over to undo
-- raises 55000 (object_not_in_prerequisite_state) and changes nothing. The wrappers are
-- plain LANGUAGE sql functions that PostgreSQL inlines into the caller's query, so
-- `SELECT * FROM get_step_readiness_status($1, $2)` runs the Rust function directly; they
-- need no superuser to create.

CREATE TABLE tasker_core.switchover (
    data_schema name NOT NULL,
    object_kind text NOT NULL CHECK (object_kind IN ('function', 'view')),
    object_name text NOT NULL,
    -- the definition that was there before the switch-over; NULL when there was none
    previous_definition text,
    switched_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (data_schema, object_kind, object_name)
);
SELECT pg_catalog.pg_extension_config_dump('tasker_core.switchover', '');

-- The Rails functions: name, identity arguments, full argument list, result columns.
CREATE FUNCTION tasker_core._compat_functions()
RETURNS TABLE(fname text, identity_args text, args text, result text)
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    VALUES
    ('get_step_readiness_status', 'bigint, bigint[]',
     'input_task_id bigint, step_ids bigint[] DEFAULT NULL::bigint[]',
     'TABLE(workflow_step_id bigint, task_id bigint, named_step_id integer, name text, current_state text, dependencies_satisfied boolean, retry_eligible boolean, ready_for_execution boolean, last_failure_at timestamp without time zone, next_retry_at timestamp without time zone, total_parents integer, completed_parents integer, attempts integer, retry_limit integer, backoff_request_seconds integer, last_attempted_at timestamp without time zone)'),
    ('get_step_readiness_status_batch', 'bigint[]',
     'input_task_ids bigint[]',
     'TABLE(workflow_step_id bigint, task_id bigint, named_step_id integer, name text, current_state text, dependencies_satisfied boolean, retry_eligible boolean, ready_for_execution boolean, last_failure_at timestamp without time zone, next_retry_at timestamp without time zone, total_parents integer, completed_parents integer, attempts integer, retry_limit integer, backoff_request_seconds integer, last_attempted_at timestamp without time zone)'),
    ('get_task_execution_context', 'bigint',
     'input_task_id bigint',
     'TABLE(task_id bigint, named_task_id integer, status text, total_steps bigint, pending_steps bigint, in_progress_steps bigint, completed_steps bigint, failed_steps bigint, ready_steps bigint, execution_status text, recommended_action text, completion_percentage numeric, health_status text)'),
    ('get_task_execution_contexts_batch', 'bigint[]',
     'input_task_ids bigint[]',
     'TABLE(task_id bigint, named_task_id integer, status text, total_steps bigint, pending_steps bigint, in_progress_steps bigint, completed_steps bigint, failed_steps bigint, ready_steps bigint, execution_status text, recommended_action text, completion_percentage numeric, health_status text)'),
    ('calculate_dependency_levels', 'bigint',
     'input_task_id bigint',
     'TABLE(workflow_step_id bigint, dependency_level integer)'),
    ('get_system_health_counts_v01', '',
     '',
     'TABLE(total_tasks bigint, pending_tasks bigint, in_progress_tasks bigint, complete_tasks bigint, error_tasks bigint, cancelled_tasks bigint, total_steps bigint, pending_steps bigint, in_progress_steps bigint, complete_steps bigint, error_steps bigint, retryable_error_steps bigint, exhausted_retry_steps bigint, in_backoff_steps bigint, active_connections bigint, max_connections bigint)'),
    ('get_analytics_metrics_v01', 'timestamp with time zone',
     'since_timestamp timestamp with time zone DEFAULT NULL::timestamp with time zone',
     'TABLE(active_tasks_count bigint, total_namespaces_count bigint, unique_task_types_count bigint, system_health_score numeric, task_throughput bigint, completion_count bigint, error_count bigint, completion_rate numeric, error_rate numeric, avg_task_duration numeric, avg_step_duration numeric, step_throughput bigint, analysis_period_start timestamp with time zone, calculated_at timestamp with time zone)'),
    ('get_slowest_steps_v01', 'timestamp with time zone, integer, text, text, text',
     'since_timestamp timestamp with time zone DEFAULT NULL::timestamp with time zone, limit_count integer DEFAULT 10, namespace_filter text DEFAULT NULL::text, task_name_filter text DEFAULT NULL::text, version_filter text DEFAULT NULL::text',
     'TABLE(workflow_step_id bigint, task_id bigint, step_name character varying, task_name character varying, namespace_name character varying, version character varying, duration_seconds numeric, attempts integer, created_at timestamp with time zone, completed_at timestamp with time zone, retryable boolean, step_status character varying)'),
    ('get_slowest_tasks_v01', 'timestamp with time zone, integer, text, text, text',
     'since_timestamp timestamp with time zone DEFAULT NULL::timestamp with time zone, limit_count integer DEFAULT 10, namespace_filter text DEFAULT NULL::text, task_name_filter text DEFAULT NULL::text, version_filter text DEFAULT NULL::text',
     'TABLE(task_id bigint, task_name character varying, namespace_name character varying, version character varying, duration_seconds numeric, step_count bigint, completed_steps bigint, error_steps bigint, created_at timestamp with time zone, completed_at timestamp with time zone, initiator character varying, source_system character varying)')
$$;

CREATE FUNCTION tasker_core.switch_over() RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ds name := tasker_core._data_schema();
    f record;
    existing oid;
    call_args text;
    view_name text := 'tasker_step_dag_relationships';
BEGIN
    IF to_regclass(format('%I.tasker_workflow_steps', ds)) IS NULL THEN
        RAISE EXCEPTION 'tasker data schema % is not installed: table tasker_workflow_steps is missing', ds
            USING ERRCODE = 'TK010';
    END IF;
    PERFORM tasker_core.enable_tracking();
    FOR f IN SELECT * FROM tasker_core._compat_functions() LOOP
        existing := to_regprocedure(format('%I.%I(%s)', ds, f.fname, f.identity_args));
        INSERT INTO tasker_core.switchover (data_schema, object_kind, object_name, previous_definition)
        VALUES (ds, 'function', f.fname,
                CASE WHEN existing IS NULL THEN NULL ELSE pg_get_functiondef(existing) END)
        ON CONFLICT (data_schema, object_kind, object_name) DO NOTHING;
        IF existing IS NOT NULL THEN
            EXECUTE format('DROP FUNCTION %s', existing::regprocedure);
        END IF;
        SELECT string_agg(format('%I', split_part(trim(a), ' ', 1)), ', ')
          INTO call_args
          FROM unnest(string_to_array(NULLIF(f.args, ''), ',')) AS a
         WHERE trim(a) ~ '^[a-z_]+ ';
        EXECUTE format(
            'CREATE FUNCTION %I.%I(%s) RETURNS %s LANGUAGE sql STABLE AS %L',
            ds, f.fname, f.args, f.result,
            format('SELECT * FROM tasker_core.%I(%s)', f.fname, COALESCE(call_args, '')));
        EXECUTE format('COMMENT ON FUNCTION %I.%I(%s) IS %L', ds, f.fname, f.identity_args,
                       'tasker_core: Rust-backed replacement of the Rails function (tasker_core.switch_back() restores it)');
    END LOOP;
    INSERT INTO tasker_core.switchover (data_schema, object_kind, object_name, previous_definition)
    VALUES (ds, 'view', view_name,
            CASE WHEN to_regclass(format('%I.%I', ds, view_name)) IS NULL THEN NULL
                 ELSE pg_get_viewdef(format('%I.%I', ds, view_name)::regclass) END)
    ON CONFLICT (data_schema, object_kind, object_name) DO NOTHING;
    EXECUTE format(
        'CREATE OR REPLACE VIEW %1$I.%2$I AS
         SELECT r.workflow_step_id, t.task_id, r.named_step_id, r.parent_step_ids, r.child_step_ids,
                r.parent_count, r.child_count, r.is_root_step, r.is_leaf_step, r.min_depth_from_root
         FROM %1$I.tasker_tasks t
         CROSS JOIN LATERAL tasker_core.step_dag_relationships(t.task_id) r', ds, view_name);
    RETURN format('switched schema %s over to tasker_core', ds);
END;
$$;

CREATE FUNCTION tasker_core.switch_back() RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ds name := tasker_core._data_schema();
    f record;
    saved record;
    existing oid;
BEGIN
    -- switch_over() saved what it replaced in tasker_core.switchover; without those rows there
    -- is nothing to restore, and removing the triggers would still change the database
    IF NOT EXISTS (SELECT 1 FROM tasker_core.switchover s WHERE s.data_schema = ds) THEN
        RAISE EXCEPTION 'tasker_core is not switched over'
            USING ERRCODE = '55000',
                  DETAIL = format('tasker_core.switch_over() has not been run for schema %s (or switch_back() already ran).', ds),
                  HINT = 'to remove the maintained readiness state alone, run tasker_core.disable_tracking()';
    END IF;
    FOR f IN SELECT * FROM tasker_core._compat_functions() LOOP
        SELECT * INTO saved FROM tasker_core.switchover s
         WHERE s.data_schema = ds AND s.object_kind = 'function' AND s.object_name = f.fname;
        IF NOT FOUND THEN
            CONTINUE;
        END IF;
        existing := to_regprocedure(format('%I.%I(%s)', ds, f.fname, f.identity_args));
        IF existing IS NOT NULL THEN
            EXECUTE format('DROP FUNCTION %s', existing::regprocedure);
        END IF;
        IF saved.previous_definition IS NOT NULL THEN
            EXECUTE saved.previous_definition;
        END IF;
    END LOOP;
    SELECT * INTO saved FROM tasker_core.switchover s
     WHERE s.data_schema = ds AND s.object_kind = 'view';
    IF FOUND THEN
        IF saved.previous_definition IS NULL THEN
            EXECUTE format('DROP VIEW IF EXISTS %I.tasker_step_dag_relationships', ds);
        ELSE
            EXECUTE format('CREATE OR REPLACE VIEW %I.tasker_step_dag_relationships AS %s',
                           ds, saved.previous_definition);
        END IF;
    END IF;
    DELETE FROM tasker_core.switchover s WHERE s.data_schema = ds;
    PERFORM tasker_core.disable_tracking();
    RETURN format('switched schema %s back', ds);
END;
$$;
