-- tasker_core 0.1.0 -> 0.2.0
--
-- 0.2.0: least privilege (SECURITY DEFINER functions with a pinned search_path, nothing
-- executable by PUBLIC, tasker_core.create_roles()); cancel_task and retry_task find their task;
-- cancel_task and retry_task lock steps before the task (no deadlock with workers);
-- verify() orders parents and children by transition id and accepts tasks not yet started;
-- metrics() counts never-attempted non-retryable steps as ready; tasks carry a W3C traceparent
-- (tasker_core.task_traces) into their events and transitions. Everything else changed in
-- the library, which both versions load.
\echo Use "ALTER EXTENSION tasker_core UPDATE TO '0.2.0'" to load this file. \quit

CREATE FUNCTION tasker_core._lock_task(ds name, task_id bigint) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    locked bigint;
BEGIN
    IF _lock_task.task_id IS NULL THEN
        RAISE EXCEPTION 'task_id must not be null' USING ERRCODE = '22004';
    END IF;
    EXECUTE format('SELECT 1 FROM %I.tasker_workflow_steps WHERE task_id = $1 ORDER BY workflow_step_id
                    FOR NO KEY UPDATE', ds) USING _lock_task.task_id;
    -- (EXECUTE does not set FOUND: the row count tells whether the task exists.)
    EXECUTE format('SELECT 1 FROM %I.tasker_tasks WHERE task_id = $1 FOR NO KEY UPDATE', ds) USING _lock_task.task_id;
    GET DIAGNOSTICS locked = ROW_COUNT;
    IF locked = 0 THEN
        RAISE EXCEPTION 'task % not found', _lock_task.task_id USING ERRCODE = 'TK004';
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION tasker_core.cancel_task(task_id bigint, reason text DEFAULT NULL) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ds name := tasker_core._data_schema();
    meta jsonb := jsonb_build_object('reason', COALESCE(reason, 'cancelled by operator'));
    st text;
    n integer := 0;
    s record;
BEGIN
    PERFORM tasker_core._lock_task(ds, cancel_task.task_id);
    FOR s IN SELECT x.workflow_step_id, x.state FROM tasker_core.step_state x
             WHERE x.task_id = cancel_task.task_id
               AND (x.state IS NULL OR x.state IN ('pending', 'in_progress', 'error'))
             ORDER BY x.workflow_step_id LOOP
        IF s.state = 'error' THEN
            PERFORM tasker_core.transition_step(s.workflow_step_id, 'pending', meta);
        END IF;
        PERFORM tasker_core.transition_step(s.workflow_step_id, 'cancelled', meta);
        n := n + 1;
    END LOOP;
    DELETE FROM tasker_core.step_claims c WHERE c.task_id = cancel_task.task_id;
    EXECUTE format('UPDATE %I.tasker_workflow_steps SET in_process = false WHERE task_id = $1 AND in_process', ds)
        USING cancel_task.task_id;
    EXECUTE format('SELECT to_state::text FROM %I.tasker_task_transitions WHERE task_id = $1 AND most_recent', ds)
        INTO st USING cancel_task.task_id;
    IF st = 'error' THEN
        PERFORM tasker_core.transition_task(cancel_task.task_id, 'pending', meta);
    END IF;
    PERFORM tasker_core.transition_task(cancel_task.task_id, 'cancelled', meta);
    RETURN n;
END;
$$;

CREATE OR REPLACE FUNCTION tasker_core.retry_task(task_id bigint) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ds name := tasker_core._data_schema();
    meta jsonb := jsonb_build_object('reason', 'retried by operator');
    st text;
    n integer := 0;
    s record;
BEGIN
    PERFORM tasker_core._lock_task(ds, retry_task.task_id);
    EXECUTE format('SELECT to_state::text FROM %I.tasker_task_transitions WHERE task_id = $1 AND most_recent', ds)
        INTO st USING retry_task.task_id;
    IF st IN ('complete', 'cancelled', 'resolved_manually') THEN
        RAISE EXCEPTION 'task % cannot be retried: it is %', retry_task.task_id, st USING ERRCODE = 'TK002';
    END IF;
    FOR s IN SELECT x.workflow_step_id FROM tasker_core.step_state x
             WHERE x.task_id = retry_task.task_id AND x.state = 'error'
             ORDER BY x.workflow_step_id LOOP
        EXECUTE format('UPDATE %I.tasker_workflow_steps SET attempts = 0, retryable = true,
                               backoff_request_seconds = NULL, updated_at = (tasker_core.now() AT TIME ZONE ''UTC'')
                        WHERE workflow_step_id = $1', ds) USING s.workflow_step_id;
        PERFORM tasker_core.transition_step(s.workflow_step_id, 'pending', meta);
        n := n + 1;
    END LOOP;
    IF st = 'error' THEN
        PERFORM tasker_core.transition_task(retry_task.task_id, 'pending', meta);
    END IF;
    PERFORM pg_notify('tasker_ready', json_build_object('task_id', retry_task.task_id, 'reason', 'retry')::text);
    RETURN n;
END;
$$;

CREATE OR REPLACE FUNCTION tasker_core.verify()
RETURNS TABLE(check_name text, entity text, id bigint, detail text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ds name := tasker_core._data_schema();
    tracked boolean := EXISTS (SELECT 1 FROM tasker_core.tracking t WHERE t.data_schema = ds);
    oldest_event timestamptz := (SELECT min(e.created_at) FROM tasker_core.events e);
BEGIN
    -- one most_recent transition per owner, and it is the one with the highest sort_key
    RETURN QUERY EXECUTE format($q$
        SELECT 'one_most_recent', 'step', workflow_step_id, count(*) || ' most_recent transitions'
        FROM %1$I.tasker_workflow_step_transitions WHERE most_recent
        GROUP BY workflow_step_id HAVING count(*) > 1
        UNION ALL
        SELECT 'one_most_recent', 'task', task_id, count(*) || ' most_recent transitions'
        FROM %1$I.tasker_task_transitions WHERE most_recent
        GROUP BY task_id HAVING count(*) > 1
        UNION ALL
        SELECT 'sort_key_increasing', 'step', t.workflow_step_id,
               'most_recent sort_key ' || t.sort_key || ' is below ' || m.top
        FROM %1$I.tasker_workflow_step_transitions t
        JOIN (SELECT workflow_step_id, max(sort_key) AS top FROM %1$I.tasker_workflow_step_transitions
              GROUP BY workflow_step_id) m ON m.workflow_step_id = t.workflow_step_id
        WHERE t.most_recent AND t.sort_key < m.top
        UNION ALL
        SELECT 'sort_key_increasing', 'task', t.task_id,
               'most_recent sort_key ' || t.sort_key || ' is below ' || m.top
        FROM %1$I.tasker_task_transitions t
        JOIN (SELECT task_id, max(sort_key) AS top FROM %1$I.tasker_task_transitions GROUP BY task_id) m
          ON m.task_id = t.task_id
        WHERE t.most_recent AND t.sort_key < m.top
        UNION ALL
        -- a child never starts before every parent finished. Compared by transition id, not
        -- time: created_at is the transaction's start, so a claim that began a moment before
        -- the parent's completion committed carries an earlier time; ids are drawn in order.
        SELECT 'parents_before_children', 'step', e.to_step_id,
               'started by transition ' || c.started || ' but parent ' || e.from_step_id ||
               COALESCE(' finished by transition ' || p.finished, ' never finished')
        FROM %1$I.tasker_workflow_step_edges e
        JOIN (SELECT workflow_step_id, min(id) AS started FROM %1$I.tasker_workflow_step_transitions
              WHERE to_state = 'in_progress' GROUP BY workflow_step_id) c ON c.workflow_step_id = e.to_step_id
        LEFT JOIN (SELECT workflow_step_id, min(id) AS finished FROM %1$I.tasker_workflow_step_transitions
                   WHERE to_state IN ('complete', 'resolved_manually') GROUP BY workflow_step_id) p
          ON p.workflow_step_id = e.from_step_id
        WHERE p.finished IS NULL OR p.finished > c.started
        UNION ALL
        -- a complete task has only complete or resolved steps, and its flag says so
        SELECT 'task_state_consistent', 'task', t.task_id,
               CASE WHEN cur.to_state = 'complete' AND t.complete IS NOT TRUE THEN 'state complete but complete = false'
                    WHEN cur.to_state IS DISTINCT FROM 'complete' AND t.complete THEN 'complete = true but state ' || COALESCE(cur.to_state, 'pending')
                    ELSE 'complete with unfinished steps' END
        FROM %1$I.tasker_tasks t
        LEFT JOIN %1$I.tasker_task_transitions cur ON cur.task_id = t.task_id AND cur.most_recent
        WHERE COALESCE(cur.to_state = 'complete', false) IS DISTINCT FROM COALESCE(t.complete, false)
           OR (cur.to_state = 'complete' AND EXISTS (
                 SELECT 1 FROM %1$I.tasker_workflow_steps ws
                 LEFT JOIN %1$I.tasker_workflow_step_transitions sc
                        ON sc.workflow_step_id = ws.workflow_step_id AND sc.most_recent
                 WHERE ws.task_id = t.task_id AND sc.to_state IS DISTINCT FROM 'complete'
                   AND sc.to_state IS DISTINCT FROM 'resolved_manually'))
        UNION ALL
        -- every transition tasker_core wrote (from_state recorded) has its event, while the log
        -- reaches back that far
        SELECT 'transition_has_event', 'step', t.workflow_step_id,
               'transition ' || t.id || ' (' || t.from_state || ' -> ' || t.to_state || ') has no event'
        FROM %1$I.tasker_workflow_step_transitions t
        WHERE t.from_state IS NOT NULL AND $1 IS NOT NULL AND t.created_at >= ($1 AT TIME ZONE 'UTC')
          AND NOT EXISTS (SELECT 1 FROM tasker_core.events ev
                          WHERE ev.step_id = t.workflow_step_id
                            AND (ev.payload ->> 'transition_id')::bigint = t.id)
        UNION ALL
        SELECT 'transition_has_event', 'task', t.task_id,
               'transition ' || t.id || ' (' || t.from_state || ' -> ' || t.to_state || ') has no event'
        FROM %1$I.tasker_task_transitions t
        WHERE t.from_state IS NOT NULL AND $1 IS NOT NULL AND t.created_at >= ($1 AT TIME ZONE 'UTC')
          AND NOT EXISTS (SELECT 1 FROM tasker_core.events ev
                          WHERE ev.task_id = t.task_id AND ev.step_id IS NULL
                            AND (ev.payload ->> 'transition_id')::bigint = t.id)
    $q$, ds) USING oldest_event;
    IF tracked THEN
        -- a step in progress under the worker protocol holds a lease, and a lease belongs to a
        -- step in progress
        RETURN QUERY
        SELECT 'lease_matches_state', 'step', s.workflow_step_id,
               CASE WHEN c.workflow_step_id IS NULL THEN 'in_process without a lease'
                    ELSE 'leased to ' || c.worker_id || ' but ' || COALESCE(s.state, 'pending') END
        FROM tasker_core.step_state s
        FULL JOIN tasker_core.step_claims c ON c.workflow_step_id = s.workflow_step_id
        WHERE (c.workflow_step_id IS NULL AND s.in_process AND s.state = 'in_progress')
           OR (c.workflow_step_id IS NOT NULL AND s.state IS DISTINCT FROM 'in_progress');
        RETURN QUERY
        SELECT 'maintained_state', 'step', k.workflow_step_id, k.problem
        FROM tasker_core.check_tracking() k;
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION tasker_core.metrics() RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ds name := tasker_core._data_schema();
    out text := '';
    r record;
    now_utc timestamp := tasker_core.now() AT TIME ZONE 'UTC';
BEGIN
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
        SELECT tn.name AS ns, count(*) AS n
        FROM tasker_core.step_state s
        JOIN %1$I.tasker_tasks t ON t.task_id = s.task_id
        JOIN %1$I.tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
        JOIN %1$I.tasker_task_namespaces tn ON tn.task_namespace_id = nt.task_namespace_id
        WHERE s.state = 'complete'
        GROUP BY tn.name ORDER BY tn.name$q$, ds) LOOP
        out := out || format(E'tasker_steps_completed_total{namespace="%s"} %s\n',
                             replace(replace(r.ns, '\', '\\'), '"', '\"'), r.n);
    END LOOP;
    RETURN out;
END;
$$;

-- Trace context (W3C traceparent) for tasks.
-- The W3C trace context a task was created in (create_task's `traceparent` option): its
-- events, transitions and claims carry it, so spans made by workers in any language join the
-- caller's trace.
CREATE TABLE tasker_core.task_traces (
    task_id bigint PRIMARY KEY,
    traceparent text NOT NULL CHECK (traceparent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$')
);
SELECT pg_catalog.pg_extension_config_dump('tasker_core.task_traces', '');

-- The traceparent a task was created with, or NULL: for a worker's span of a claimed step.
CREATE FUNCTION tasker_core.task_traceparent(task_id bigint) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT t.traceparent FROM tasker_core.task_traces t WHERE t.task_id = task_traceparent.task_id
$$;

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
              'claim_steps', 'complete_step', 'fail_step', 'heartbeat', 'release_step',
              'events_after', 'event_horizon', 'event_catalog', 'subscribe', 'poll', 'ack', 'unsubscribe',
              'task_traceparent',
              -- reader
              'get_task_template', 'list_task_templates', 'task_graph_dot', 'metrics', 'health',
              'verify', 'check_tracking',
              -- admin
              'register_task_template', 'create_task', 'cancel_task', 'retry_task',
              'resolve_step_manually', 'tick', 'prune_events', 'transition_step', 'transition_task',
              -- triggers
              'track_steps', 'track_named_steps', 'track_edges', 'track_step_transitions', 'track_truncate'])
    LOOP
        EXECUTE pg_catalog.format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = pg_catalog, pg_temp', f);
    END LOOP;
END;
$roles$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA tasker_core FROM PUBLIC;

-- Creates the roles tasker_worker, tasker_reader and tasker_admin (NOLOGIN; existing ones are
-- kept) and grants each exactly its functions:
--   tasker_worker  claim, complete, fail, heartbeat, release; read events; subscriptions;
--                  a task's traceparent
--   tasker_reader  the Rails compatibility functions (and SELECT on the Tasker tables of the
--                  data schema and the maintained state they read), templates, the DAG
--                  picture, metrics, health, verify, events
--   tasker_admin   tasker_reader, plus templates, task creation, cancel, retry, manual
--                  resolution, tick, event pruning, transitions
-- Run it as a role that may create roles and owns the extension (a superuser, usually); run
-- it again after install_schema() into another schema. Returns what it did, one line each.
CREATE FUNCTION tasker_core.create_roles() RETURNS SETOF text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r text;
    ds name := tasker_core._data_schema();
    t record;
    worker_fns text[] := ARRAY['claim_steps', 'complete_step', 'fail_step', 'heartbeat', 'release_step',
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
