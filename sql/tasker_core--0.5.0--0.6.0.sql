-- tasker_core 0.5.0 -> 0.6.0
-- * report_and_claim(worker_id, outcomes, namespaces, max_steps, lease_seconds, traceparent):
--   report_steps and claim_steps in one transaction (one commit per step for a busy worker;
--   the claim half never waits for a lock).
-- * create_roles() grants it to tasker_worker.
-- * Tracking: deletes of steps and step transitions by other writers are tracked once per
--   statement through transition tables, like edges (a statement deleting N rows costs a fixed
--   number of statements of maintenance); inserts and updates stay per row. The triggers of a
--   tracked schema are re-attached at the end of this script; the maintained rows are
--   unchanged, so nothing is rebuilt.
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

CREATE OR REPLACE FUNCTION tasker_core.track_steps() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    step_name text;
    ns bigint;
BEGIN
    -- deletes, once per statement: the statement's rows are in changed_steps
    IF TG_LEVEL = 'STATEMENT' THEN
        DELETE FROM tasker_core.step_state s
         USING changed_steps o WHERE s.workflow_step_id = o.workflow_step_id;
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.workflow_step_id = NEW.workflow_step_id
       AND OLD.named_step_id = NEW.named_step_id THEN
        IF OLD.task_id IS DISTINCT FROM NEW.task_id THEN
            EXECUTE format('SELECT nt.task_namespace_id FROM %1$I.tasker_tasks t
                            JOIN %1$I.tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
                            WHERE t.task_id = $1', TG_TABLE_SCHEMA)
                INTO ns USING NEW.task_id;
        END IF;
        UPDATE tasker_core.step_state SET
            task_id = NEW.task_id,
            retryable = NEW.retryable, retry_limit = NEW.retry_limit,
            in_process = NEW.in_process, processed = NEW.processed,
            attempts = NEW.attempts, last_attempted_at = NEW.last_attempted_at,
            backoff_request_seconds = NEW.backoff_request_seconds, created_at = NEW.created_at,
            namespace_id = CASE WHEN OLD.task_id IS DISTINCT FROM NEW.task_id THEN ns ELSE namespace_id END
        WHERE workflow_step_id = NEW.workflow_step_id;
        RETURN NULL;
    END IF;
    -- the step's name and its task's namespace, in one statement
    EXECUTE format('SELECT (SELECT name::text FROM %1$I.tasker_named_steps WHERE named_step_id = $1),
                           (SELECT nt.task_namespace_id FROM %1$I.tasker_tasks t
                            JOIN %1$I.tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
                            WHERE t.task_id = $2)', TG_TABLE_SCHEMA)
        INTO step_name, ns USING NEW.named_step_id, NEW.task_id;
    IF TG_OP = 'UPDATE' THEN
        UPDATE tasker_core.step_state SET
            workflow_step_id = NEW.workflow_step_id, task_id = NEW.task_id,
            named_step_id = NEW.named_step_id, name = step_name,
            retryable = NEW.retryable, retry_limit = NEW.retry_limit,
            in_process = NEW.in_process, processed = NEW.processed,
            attempts = NEW.attempts, last_attempted_at = NEW.last_attempted_at,
            backoff_request_seconds = NEW.backoff_request_seconds, created_at = NEW.created_at,
            namespace_id = ns
        WHERE workflow_step_id = OLD.workflow_step_id;
        RETURN NULL;
    END IF;
    -- INSERT: a new step has no edges or transitions yet unless they were written first,
    -- which the foreign keys forbid.
    INSERT INTO tasker_core.step_state (
        workflow_step_id, task_id, named_step_id, name, retryable, retry_limit, in_process,
        processed, attempts, last_attempted_at, backoff_request_seconds, created_at, namespace_id)
    VALUES (
        NEW.workflow_step_id, NEW.task_id, NEW.named_step_id, step_name, NEW.retryable,
        NEW.retry_limit, NEW.in_process, NEW.processed, NEW.attempts, NEW.last_attempted_at,
        NEW.backoff_request_seconds, NEW.created_at, ns);
    RETURN NULL;
END;
$$;
ALTER FUNCTION tasker_core.track_steps() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE OR REPLACE FUNCTION tasker_core.track_step_transitions() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    kids bigint[];
    deltas integer[];
BEGIN
    -- Deletes, once per statement (the rows are in changed_transitions): the maintained rows
    -- of the steps concerned are locked in id order, each updated once (its current state
    -- cleared when its current transition went, its count), then the children of the steps
    -- that stopped satisfying a dependency, locked in id order too.
    IF TG_LEVEL = 'STATEMENT' THEN
        PERFORM 1 FROM tasker_core.step_state s
         WHERE s.workflow_step_id IN (SELECT c.workflow_step_id FROM changed_transitions c)
         ORDER BY s.workflow_step_id FOR UPDATE;
        WITH per_step AS (
            SELECT c.workflow_step_id AS id, count(*)::integer AS n, array_agg(c.id) AS ids
            FROM changed_transitions c GROUP BY c.workflow_step_id),
        before AS (
            SELECT s.workflow_step_id AS id, s.state, s.child_ids
            FROM tasker_core.step_state s JOIN per_step p ON p.id = s.workflow_step_id),
        after AS (
            UPDATE tasker_core.step_state s
               SET state = CASE WHEN s.state_transition_id = ANY (p.ids) THEN NULL ELSE s.state END,
                   state_at = CASE WHEN s.state_transition_id = ANY (p.ids) THEN NULL ELSE s.state_at END,
                   state_transition_id = CASE WHEN s.state_transition_id = ANY (p.ids) THEN NULL
                                              ELSE s.state_transition_id END,
                   transition_count = s.transition_count - p.n
              FROM per_step p
             WHERE s.workflow_step_id = p.id
            RETURNING s.workflow_step_id AS id, s.state)
        SELECT array_agg(d.child ORDER BY d.child), array_agg(d.delta ORDER BY d.child)
          INTO kids, deltas
          FROM (SELECT k.child, sum(CASE WHEN tasker_core._satisfies(a.state) THEN -1 ELSE 1 END)::integer AS delta
                FROM after a JOIN before b ON b.id = a.id
                CROSS JOIN LATERAL unnest(b.child_ids) AS k(child)
                WHERE tasker_core._satisfies(a.state) <> tasker_core._satisfies(b.state)
                GROUP BY k.child) d;
        IF kids IS NOT NULL THEN
            PERFORM 1 FROM tasker_core.step_state s
             WHERE s.workflow_step_id = ANY (kids) ORDER BY s.workflow_step_id FOR UPDATE;
            UPDATE tasker_core.step_state c
               SET blocked_parents = c.blocked_parents + d.delta
              FROM unnest(kids, deltas) AS d(id, delta)
             WHERE c.workflow_step_id = d.id;
        END IF;
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.workflow_step_id = NEW.workflow_step_id THEN
        IF NEW.most_recent THEN
            PERFORM tasker_core._set_step_state(NEW.workflow_step_id, NEW.to_state, NEW.created_at, NEW.id, NULL, 0);
        ELSE
            PERFORM tasker_core._set_step_state(NEW.workflow_step_id, NULL, NULL, NULL, OLD.id, 0);
        END IF;
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        PERFORM tasker_core._set_step_state(OLD.workflow_step_id, NULL, NULL, NULL, OLD.id, -1);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        IF NEW.most_recent THEN
            PERFORM tasker_core._set_step_state(NEW.workflow_step_id, NEW.to_state, NEW.created_at, NEW.id, NULL, 1);
        ELSE
            PERFORM tasker_core._set_step_state(NEW.workflow_step_id, NULL, NULL, NULL, -1, 1);
        END IF;
    END IF;
    RETURN NULL;
END;
$$;
ALTER FUNCTION tasker_core.track_step_transitions() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE OR REPLACE FUNCTION tasker_core._create_tracking_triggers(target name) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- The row triggers skip the writes of tasker_core's own worker path, which maintains the
    -- rows itself in the statements that make the changes (tasker_core._self_maintained()).
    -- Steps and step transitions: inserts and updates of the columns tracked per row, deletes
    -- per statement (a transition table needs a trigger of its own per event).
    EXECUTE format('CREATE TRIGGER tasker_core_track AFTER INSERT
                    OR UPDATE OF workflow_step_id, task_id, named_step_id, retryable, retry_limit, in_process,
                                 processed, attempts, last_attempted_at, backoff_request_seconds, created_at
                    ON %I.tasker_workflow_steps
                    FOR EACH ROW WHEN (NOT tasker_core._self_maintained())
                    EXECUTE FUNCTION tasker_core.track_steps()', target);
    EXECUTE format('CREATE TRIGGER tasker_core_track_delete AFTER DELETE ON %I.tasker_workflow_steps
                    REFERENCING OLD TABLE AS changed_steps
                    FOR EACH STATEMENT WHEN (NOT tasker_core._self_maintained())
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
    EXECUTE format('CREATE TRIGGER tasker_core_track AFTER INSERT
                    OR UPDATE OF workflow_step_id, to_state, most_recent, created_at
                    ON %I.tasker_workflow_step_transitions
                    FOR EACH ROW WHEN (NOT tasker_core._self_maintained())
                    EXECUTE FUNCTION tasker_core.track_step_transitions()', target);
    EXECUTE format('CREATE TRIGGER tasker_core_track_delete AFTER DELETE ON %I.tasker_workflow_step_transitions
                    REFERENCING OLD TABLE AS changed_transitions
                    FOR EACH STATEMENT WHEN (NOT tasker_core._self_maintained())
                    EXECUTE FUNCTION tasker_core.track_step_transitions()', target);
    EXECUTE format('CREATE TRIGGER tasker_core_track_truncate AFTER TRUNCATE ON %I.tasker_workflow_steps
                    FOR EACH STATEMENT EXECUTE FUNCTION tasker_core.track_truncate()', target);
    EXECUTE format('CREATE TRIGGER tasker_core_track_truncate AFTER TRUNCATE ON %I.tasker_workflow_step_edges
                    FOR EACH STATEMENT EXECUTE FUNCTION tasker_core.track_truncate()', target);
    EXECUTE format('CREATE TRIGGER tasker_core_track_truncate AFTER TRUNCATE ON %I.tasker_workflow_step_transitions
                    FOR EACH STATEMENT EXECUTE FUNCTION tasker_core.track_truncate()', target);
END;
$$;

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
