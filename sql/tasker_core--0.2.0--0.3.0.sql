-- tasker_core 0.2.0 -> 0.3.0
--
-- * claim_steps takes the worker's W3C traceparent (a fifth argument, default NULL): a claimed
--   task without a trace of its own joins the worker's. A new argument makes a new function,
--   so the old one is dropped; whoever could execute it can execute the new one.
-- * Per-namespace ready queues: tasker_core.step_state.namespace_id (kept by track_steps,
--   backfilled here) and step_state_claimable_ns_idx replace the one ready index, so a claim
--   filtered by namespace no longer walks other namespaces' ready steps.
-- * metrics() counts completed steps per namespace from the maintained state.
-- * task_traceparent is VOLATILE: it sees what the claim in its own statement saw.
-- * Subscriptions belong to the login that made them (subscriptions.owner); those made
--   before this version have no owner and stay shared.
-- Everything else changed in the library. The 0.2.0 SQL keeps working with the new library
-- (it still exports the four-argument claim_steps) until this script runs.
\echo Use "ALTER EXTENSION tasker_core UPDATE TO '0.3.0'" to load this file. \quit

DO $claim$
DECLARE
    old regprocedure := 'tasker_core.claim_steps(text, text[], integer, integer)';
    new regprocedure;
    grantees name[];
    g name;
BEGIN
    SELECT coalesce(array_agg(DISTINCT pg_catalog.pg_get_userbyid(a.grantee)), '{}') INTO grantees
    FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
    WHERE p.oid = old AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner;
    EXECUTE pg_catalog.format('DROP FUNCTION %s', old);
    CREATE FUNCTION tasker_core.claim_steps(
        "worker_id" TEXT,
        "namespaces" TEXT[] DEFAULT NULL,
        "max_steps" INT DEFAULT 1,
        "lease_seconds" INT DEFAULT 60,
        "traceparent" TEXT DEFAULT NULL
    ) RETURNS TABLE (
        "task_id" bigint,
        "workflow_step_id" bigint,
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
    AS 'MODULE_PATHNAME', 'claim_steps_traced_wrapper';
    new := 'tasker_core.claim_steps(text, text[], integer, integer, text)';
    EXECUTE pg_catalog.format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = pg_catalog, pg_temp', new);
    EXECUTE pg_catalog.format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', new);
    FOREACH g IN ARRAY grantees LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I', new, g);
    END LOOP;
END;
$claim$;

-- task_traceparent reads a fresh snapshot (see events.sql): in the statement of a claim it
-- missed a task committed after the statement began
ALTER FUNCTION tasker_core.task_traceparent(bigint) VOLATILE;

ALTER TABLE tasker_core.subscriptions ADD COLUMN owner name;

-- A subscription belongs to the login that made it (session_user, which SET ROLE does not
-- change): another login may use or change it only as a superuser or a member of
-- tasker_admin (42501). Subscriptions made before 0.3.0 have no owner and stay shared.
CREATE FUNCTION tasker_core._check_subscription_owner(sub_name text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    owned_by name;
BEGIN
    SELECT s.owner INTO owned_by FROM tasker_core.subscriptions s WHERE s.name = sub_name;
    IF owned_by IS NULL OR owned_by = session_user
       OR (SELECT r.rolsuper FROM pg_roles r WHERE r.rolname = session_user)
       OR (EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = 'tasker_admin')
           AND pg_has_role(session_user, 'tasker_admin', 'MEMBER')) THEN
        RETURN;
    END IF;
    RAISE EXCEPTION 'subscription "%" belongs to another login', sub_name
        USING ERRCODE = '42501', HINT = 'each login has its own subscriptions; pick another name';
END;
$$;

-- Registers (or updates the patterns of) a subscription. A new one starts at the current
-- horizon: it receives every event not yet settled when it subscribed, and all later ones.
-- Returns its position.
CREATE OR REPLACE FUNCTION tasker_core.subscribe(sub_name text, patterns text[] DEFAULT ARRAY['*'])
RETURNS text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p text;
    result text;
BEGIN
    PERFORM tasker_core._check_subscription_name(sub_name);
    IF patterns IS NULL OR cardinality(patterns) = 0 OR cardinality(patterns) > 100 THEN
        RAISE EXCEPTION 'invalid patterns for subscription "%": expected 1 to 100 patterns', sub_name
            USING ERRCODE = '22023';
    END IF;
    FOREACH p IN ARRAY patterns LOOP
        IF p IS NULL OR p !~ '^[a-z0-9_.*]{1,200}$' THEN
            RAISE EXCEPTION 'invalid event pattern "%": use event names with * wildcards, like task.* or step.completed', left(p, 60)
                USING ERRCODE = '22023';
        END IF;
    END LOOP;
    PERFORM tasker_core._check_subscription_owner(sub_name);
    INSERT INTO tasker_core.subscriptions AS s (name, patterns, cursor_xid, cursor_id, owner)
    VALUES (sub_name, patterns, tasker_core._horizon_xid(), 0, session_user)
    ON CONFLICT (name) DO UPDATE SET patterns = excluded.patterns
    RETURNING s.cursor_xid::text || '/' || s.cursor_id INTO result;
    RETURN result;
END;
$$;

-- The next events of a subscription after its acknowledged position (at-least-once: the same
-- events come back until they are acked).
CREATE OR REPLACE FUNCTION tasker_core.poll(sub_name text, max_events integer DEFAULT 100)
RETURNS TABLE(cursor text, id bigint, name text, task_id bigint, step_id bigint,
              from_state text, to_state text, payload jsonb, created_at timestamptz)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    s record;
    horizon xid8;
BEGIN
    PERFORM tasker_core._check_subscription_name(sub_name);
    IF max_events IS NULL OR max_events < 1 OR max_events > 10000 THEN
        RAISE EXCEPTION 'invalid max_events %: expected 1 to 10000', max_events USING ERRCODE = '22023';
    END IF;
    SELECT * INTO s FROM tasker_core.subscriptions x WHERE x.name = sub_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'subscription "%" not found', sub_name USING ERRCODE = 'TK004';
    END IF;
    PERFORM tasker_core._check_subscription_owner(sub_name);
    horizon := tasker_core._horizon_xid();
    RETURN QUERY
    SELECT e.xid::text || '/' || e.id, e.id, e.name, e.task_id, e.step_id, e.from_state,
           e.to_state, e.payload, e.created_at
    FROM tasker_core.events e
    WHERE (e.xid, e.id) > (s.cursor_xid, s.cursor_id)
      AND e.xid < horizon
      AND e.name LIKE ANY (tasker_core._like_patterns(s.patterns))
    ORDER BY e.xid, e.id
    LIMIT max_events;
END;
$$;

-- Acknowledges everything up to and including `acked_cursor`; a subscription never moves backwards.
-- Returns whether the position advanced.
CREATE OR REPLACE FUNCTION tasker_core.ack(sub_name text, acked_cursor text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c record;
    moved boolean;
BEGIN
    PERFORM tasker_core._check_subscription_name(sub_name);
    IF acked_cursor IS NULL THEN
        RAISE EXCEPTION 'acked_cursor must not be null' USING ERRCODE = '22004';
    END IF;
    PERFORM tasker_core._check_subscription_owner(sub_name);
    c := tasker_core._parse_cursor(acked_cursor);
    IF c.xid > pg_snapshot_xmax(pg_current_snapshot()) THEN
        RAISE EXCEPTION 'invalid event cursor "%": it is ahead of every event written so far', acked_cursor
            USING ERRCODE = '22023';
    END IF;
    UPDATE tasker_core.subscriptions s
       SET cursor_xid = c.xid, cursor_id = c.id, acked_at = tasker_core.now()
     WHERE s.name = sub_name AND (s.cursor_xid, s.cursor_id) < (c.xid, c.id);
    moved := FOUND;
    IF NOT moved AND NOT EXISTS (SELECT 1 FROM tasker_core.subscriptions s WHERE s.name = sub_name) THEN
        RAISE EXCEPTION 'subscription "%" not found', sub_name USING ERRCODE = 'TK004';
    END IF;
    RETURN moved;
END;
$$;

CREATE OR REPLACE FUNCTION tasker_core.unsubscribe(sub_name text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM tasker_core._check_subscription_name(sub_name);
    PERFORM tasker_core._check_subscription_owner(sub_name);
    DELETE FROM tasker_core.subscriptions s WHERE s.name = sub_name;
    RETURN FOUND;
END;
$$;

-- CREATE OR REPLACE resets what roles.sql set: the definer rights and the pinned path.
ALTER FUNCTION tasker_core.subscribe(text, text[]) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION tasker_core.poll(text, integer) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION tasker_core.ack(text, text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION tasker_core.unsubscribe(text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE ALL ON FUNCTION tasker_core._check_subscription_owner(text) FROM PUBLIC;

-- Per-namespace ready queues.
ALTER TABLE tasker_core.step_state ADD COLUMN namespace_id bigint;
DO $backfill$
DECLARE
    tracked name;
BEGIN
    SELECT t.data_schema INTO tracked FROM tasker_core.tracking t;
    IF tracked IS NOT NULL THEN
        EXECUTE pg_catalog.format(
            'UPDATE tasker_core.step_state s SET namespace_id = nt.task_namespace_id
             FROM %1$I.tasker_tasks t JOIN %1$I.tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
             WHERE t.task_id = s.task_id', tracked);
    END IF;
END;
$backfill$;
DROP INDEX tasker_core.step_state_claimable_idx;
-- The steps a worker could claim (unblocked, unprocessed, pending or in error), per
-- namespace: a claim walks the ready queue of each namespace it works on, oldest first, and
-- never the ready steps of other namespaces.
CREATE INDEX step_state_claimable_ns_idx ON tasker_core.step_state (namespace_id, workflow_step_id)
    WHERE blocked_parents = 0 AND processed IS NOT TRUE AND in_process IS NOT TRUE
      AND (state IS NULL OR state IN ('pending', 'error'));

-- tasker_workflow_steps: a row per step.
CREATE OR REPLACE FUNCTION tasker_core.track_steps() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    step_name text;
    ns bigint;
BEGIN
    IF TG_OP = 'DELETE' THEN
        DELETE FROM tasker_core.step_state WHERE workflow_step_id = OLD.workflow_step_id;
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

-- The recomputation: what step_state should hold for every step of the data schema.
CREATE OR REPLACE FUNCTION tasker_core._recomputed_step_state(data_schema name)
RETURNS SETOF tasker_core.step_state
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN QUERY EXECUTE format($q$
        SELECT ws.workflow_step_id, ws.task_id, ws.named_step_id, ns.name::text,
               cur.to_state::text, cur.created_at, cur.id,
               COALESCE(tc.n, 0)::integer,
               COALESCE(pe.ids, '{}'::bigint[]),
               COALESCE(ce.ids, '{}'::bigint[]),
               COALESCE(pe.blocked, 0)::integer,
               ws.retryable, ws.retry_limit, ws.in_process, ws.processed, ws.attempts,
               ws.last_attempted_at, ws.backoff_request_seconds, ws.created_at,
               nt.task_namespace_id
        FROM %1$I.tasker_workflow_steps ws
        LEFT JOIN %1$I.tasker_named_steps ns ON ns.named_step_id = ws.named_step_id
        LEFT JOIN %1$I.tasker_tasks t ON t.task_id = ws.task_id
        LEFT JOIN %1$I.tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
        LEFT JOIN %1$I.tasker_workflow_step_transitions cur
               ON cur.workflow_step_id = ws.workflow_step_id AND cur.most_recent
        LEFT JOIN (SELECT workflow_step_id, count(*) AS n
                   FROM %1$I.tasker_workflow_step_transitions GROUP BY workflow_step_id) tc
               ON tc.workflow_step_id = ws.workflow_step_id
        LEFT JOIN (SELECT e.to_step_id, array_agg(e.from_step_id ORDER BY e.from_step_id) AS ids,
                          count(*) FILTER (WHERE p.to_state IS NULL
                                           OR p.to_state NOT IN ('complete', 'resolved_manually')) AS blocked
                   FROM %1$I.tasker_workflow_step_edges e
                   LEFT JOIN %1$I.tasker_workflow_step_transitions p
                          ON p.workflow_step_id = e.from_step_id AND p.most_recent
                   GROUP BY e.to_step_id) pe
               ON pe.to_step_id = ws.workflow_step_id
        LEFT JOIN (SELECT from_step_id, array_agg(to_step_id ORDER BY to_step_id) AS ids
                   FROM %1$I.tasker_workflow_step_edges GROUP BY from_step_id) ce
               ON ce.from_step_id = ws.workflow_step_id
    $q$, data_schema);
END;
$$;

ALTER FUNCTION tasker_core.track_steps() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- metrics(): completed steps per namespace from step_state.namespace_id
-- Prometheus text exposition of the workflow engine's state. Cheap enough to scrape every
-- 15 s: it reads the maintained step state (one narrow row per step) and the task states.
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
        SELECT tn.name AS ns, sum(c.n) AS n
        FROM (SELECT s.namespace_id, count(*) AS n FROM tasker_core.step_state s
              WHERE s.state = 'complete' GROUP BY s.namespace_id) c
        JOIN %1$I.tasker_task_namespaces tn ON tn.task_namespace_id = c.namespace_id
        GROUP BY tn.name ORDER BY tn.name$q$, ds) LOOP
        out := out || format(E'tasker_steps_completed_total{namespace="%s"} %s\n',
                             replace(replace(r.ns, '\', '\\'), '"', '\"'), r.n);
    END LOOP;
    RETURN out;
END;
$$;
ALTER FUNCTION tasker_core.metrics() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
