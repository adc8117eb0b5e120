-- tasker_core 0.3.0 -> 0.4.0
--
-- * Claims belong to the login that made them (step_claims.login, session_user): only that
--   login, a superuser or a member of tasker_admin may complete, fail, release or heartbeat
--   them. Claims in flight across the update have no login and are checked by worker id alone.
-- * subscribe() checks the owner and writes under one lock, and caps the subscriptions of a
--   login at tasker_core.max_subscriptions_per_login (read through the new
--   _max_subscriptions_per_login(), so the setting is superuser-only).
-- * complete_step, resolve_step_manually and transition_step lock a step and its children's
--   maintained rows all at once or not at all (_lock_step_and_children): an application that
--   writes a child and then its parent no longer deadlocks with them.
-- * Edge inserts and deletes are tracked per statement (linear task creation): the triggers of
--   a tracked schema are re-attached at the end of this script.
-- * cancel_task() leaves finished tasks alone; retry_task() also resets steps whose retries
--   are used up; verify() and metrics() raise TK010 without the Tasker tables; switch_back()
--   without switch_over() raises 55000.
-- Idempotency keys used before this version keep finding their tasks: create_task looks a key
-- up under its old identity too (the key itself was never stored, so identities cannot be
-- recomputed here). Everything else changed in the library, which serves the 0.3.0 SQL (claims
-- without a login) until this script runs.
\echo Use "ALTER EXTENSION tasker_core UPDATE TO '0.4.0'" to load this file. \quit

ALTER TABLE tasker_core.step_claims ADD COLUMN login name;

CREATE FUNCTION tasker_core."_max_subscriptions_per_login"() RETURNS INT /* i32 */
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'max_subscriptions_per_login_wrapper';
REVOKE ALL ON FUNCTION tasker_core._max_subscriptions_per_login() FROM PUBLIC;


CREATE OR REPLACE FUNCTION tasker_core.subscribe(sub_name text, patterns text[] DEFAULT ARRAY['*'])
RETURNS text
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p text;
    result text;
    -- (read through the library, which defines the setting as superuser-only)
    max_subs bigint := tasker_core._max_subscriptions_per_login();
    owned bigint;
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
    -- The login first, then the name, in every call: sessions of one login take turns, and
    -- any two calls for one name take turns. Each statement below reads a fresh snapshot
    -- (READ COMMITTED), so it sees what the previous holder of the lock committed.
    PERFORM pg_advisory_xact_lock(hashtextextended('tasker_core.subscriptions.login:' || session_user, 0));
    PERFORM pg_advisory_xact_lock(hashtextextended('tasker_core.subscriptions.name:' || sub_name, 0));
    PERFORM tasker_core._check_subscription_owner(sub_name);
    IF NOT EXISTS (SELECT 1 FROM tasker_core.subscriptions s WHERE s.name = sub_name) THEN
        SELECT count(*) INTO owned FROM tasker_core.subscriptions s WHERE s.owner = session_user;
        IF owned >= max_subs THEN
            RAISE EXCEPTION 'too many subscriptions for login %: % (the limit is %)', session_user, owned + 1, max_subs
                USING ERRCODE = '54000',
                      HINT = 'unsubscribe those no longer used, or raise tasker_core.max_subscriptions_per_login';
        END IF;
    END IF;
    INSERT INTO tasker_core.subscriptions AS s (name, patterns, cursor_xid, cursor_id, owner)
    VALUES (sub_name, patterns, tasker_core._horizon_xid(), 0, session_user)
    ON CONFLICT (name) DO UPDATE SET patterns = excluded.patterns
    RETURNING s.cursor_xid::text || '/' || s.cursor_id INTO result;
    RETURN result;
END;
$$;
ALTER FUNCTION tasker_core.subscribe(text,text[]) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE OR REPLACE FUNCTION tasker_core.cancel_task(task_id bigint, reason text DEFAULT NULL) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ds name := tasker_core._data_schema();
    meta jsonb := jsonb_build_object('reason', COALESCE(reason, 'cancelled by operator'));
    st text;
    done boolean;
    n integer := 0;
    s record;
BEGIN
    PERFORM tasker_core._lock_task(ds, cancel_task.task_id);
    -- read under the locks: a finalizer or another operator call that finished the task first
    -- has committed by now
    EXECUTE format('SELECT tt.to_state::text, t.complete FROM %1$I.tasker_tasks t
                    LEFT JOIN %1$I.tasker_task_transitions tt ON tt.task_id = t.task_id AND tt.most_recent
                    WHERE t.task_id = $1', ds)
        INTO st, done USING cancel_task.task_id;
    IF done OR st IN ('complete', 'cancelled', 'resolved_manually') THEN
        RETURN 0;
    END IF;
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
    IF st = 'error' THEN
        PERFORM tasker_core.transition_task(cancel_task.task_id, 'pending', meta);
    END IF;
    PERFORM tasker_core.transition_task(cancel_task.task_id, 'cancelled', meta);
    RETURN n;
END;
$$;
ALTER FUNCTION tasker_core.cancel_task(bigint,text) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

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
    FOR s IN SELECT x.workflow_step_id, x.state FROM tasker_core.step_state x
             WHERE x.task_id = retry_task.task_id
               AND (x.state = 'error'
                    OR ((x.state IS NULL OR x.state = 'pending')
                        AND (COALESCE(x.attempts, 0) >= COALESCE(x.retry_limit, 3)
                             OR (NOT COALESCE(x.retryable, true) AND COALESCE(x.attempts, 0) > 0))))
             ORDER BY x.workflow_step_id LOOP
        EXECUTE format('UPDATE %I.tasker_workflow_steps SET attempts = 0, retryable = true,
                               backoff_request_seconds = NULL, updated_at = (tasker_core.now() AT TIME ZONE ''UTC'')
                        WHERE workflow_step_id = $1', ds) USING s.workflow_step_id;
        IF s.state = 'error' THEN
            PERFORM tasker_core.transition_step(s.workflow_step_id, 'pending', meta);
        END IF;
        n := n + 1;
    END LOOP;
    IF st = 'error' THEN
        PERFORM tasker_core.transition_task(retry_task.task_id, 'pending', meta);
    END IF;
    PERFORM pg_notify('tasker_ready', json_build_object('task_id', retry_task.task_id, 'reason', 'retry')::text);
    RETURN n;
END;
$$;
ALTER FUNCTION tasker_core.retry_task(bigint) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE OR REPLACE FUNCTION tasker_core._lock_step_and_children(ds name, step bigint) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    kids bigint[];
    lock_step text := format('SELECT 1 FROM %I.tasker_workflow_steps WHERE workflow_step_id = $1 FOR NO KEY UPDATE', ds);
    lock_current text := format('SELECT 1 FROM %I.tasker_workflow_step_transitions
                                 WHERE workflow_step_id = $1 AND most_recent FOR UPDATE', ds);
    lock_state text := 'SELECT 1 FROM tasker_core.step_state WHERE workflow_step_id = $1 FOR UPDATE';
    w record;
BEGIN
    SELECT s.child_ids INTO kids FROM tasker_core.step_state s WHERE s.workflow_step_id = step;
    IF COALESCE(cardinality(kids), 0) = 0 THEN
        EXECUTE lock_step USING step;
        RETURN;
    END IF;
    LOOP
        BEGIN
            EXECUTE lock_step || ' NOWAIT' USING step;
            EXECUTE lock_current || ' NOWAIT' USING step;
            PERFORM 1 FROM tasker_core.step_state s WHERE s.workflow_step_id = ANY (kids || step)
             ORDER BY s.workflow_step_id FOR UPDATE NOWAIT;
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            NULL;
        END;
        -- wait until each row is free (taking it and letting it go at once), then try again
        FOR w IN SELECT * FROM (VALUES (lock_step, step), (lock_current, step)) v(query, id)
                 UNION ALL SELECT lock_state, k FROM unnest(kids || step) k LOOP
            BEGIN
                EXECUTE w.query USING w.id;
                RAISE EXCEPTION USING ERRCODE = 'TK099';
            EXCEPTION WHEN SQLSTATE 'TK099' THEN
                NULL;
            END;
        END LOOP;
    END LOOP;
END;
$$;
REVOKE ALL ON FUNCTION tasker_core._lock_step_and_children(name,bigint) FROM PUBLIC;

CREATE OR REPLACE FUNCTION tasker_core._require_tables(ds name, tables text[]) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    tbl text;
BEGIN
    FOREACH tbl IN ARRAY tables LOOP
        IF to_regclass(format('%I.%I', ds, tbl)) IS NULL THEN
            RAISE EXCEPTION 'tasker data schema % is not installed: table % is missing (run tasker_core.install_schema(%) or set tasker_core.data_schema)',
                            to_json(ds::text), tbl, to_json(ds::text)
                USING ERRCODE = 'TK010';
        END IF;
    END LOOP;
END;
$$;
REVOKE ALL ON FUNCTION tasker_core._require_tables(name,text[]) FROM PUBLIC;

CREATE OR REPLACE FUNCTION tasker_core.verify()
RETURNS TABLE(check_name text, entity text, id bigint, detail text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ds name := tasker_core._data_schema();
    tracked boolean := EXISTS (SELECT 1 FROM tasker_core.tracking t WHERE t.data_schema = ds);
    oldest_event timestamptz := (SELECT min(e.created_at) FROM tasker_core.events e);
BEGIN
    PERFORM tasker_core._require_tables(ds, ARRAY['tasker_tasks', 'tasker_workflow_steps',
        'tasker_workflow_step_edges', 'tasker_workflow_step_transitions', 'tasker_task_transitions',
        'tasker_named_steps', 'tasker_named_tasks']);
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
ALTER FUNCTION tasker_core.verify() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

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
                             replace(replace(r.ns, '\', '\\'), '"', '\"'), r.n);
    END LOOP;
    RETURN out;
END;
$$;
ALTER FUNCTION tasker_core.metrics() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE OR REPLACE FUNCTION tasker_core.switch_back() RETURNS text
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

CREATE OR REPLACE FUNCTION tasker_core._add_all(arr bigint[], xs bigint[]) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT COALESCE(array_agg(v ORDER BY v), '{}')
    FROM (SELECT unnest(arr) UNION ALL SELECT unnest(xs)) AS d(v)
$$;
REVOKE ALL ON FUNCTION tasker_core._add_all(bigint[],bigint[]) FROM PUBLIC;

CREATE OR REPLACE FUNCTION tasker_core._remove_all(arr bigint[], xs bigint[]) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT COALESCE(array_agg(v ORDER BY v), '{}')
    FROM (SELECT unnest(arr) EXCEPT ALL SELECT unnest(xs)) AS d(v)
$$;
REVOKE ALL ON FUNCTION tasker_core._remove_all(bigint[],bigint[]) FROM PUBLIC;

CREATE OR REPLACE FUNCTION tasker_core.track_edges() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    parent_done boolean;
    r record;
BEGIN
    IF TG_LEVEL = 'STATEMENT' THEN
        FOR r IN SELECT ids.id FROM (SELECT e.from_step_id AS id FROM changed_edges e
                                     UNION SELECT e.to_step_id FROM changed_edges e) ids
                 ORDER BY ids.id LOOP
            PERFORM 1 FROM tasker_core.step_state s WHERE s.workflow_step_id = r.id FOR UPDATE;
        END LOOP;
        -- Read under those locks: a parent that completes concurrently has committed by now,
        -- or waits for this transaction and then sees its new children.
        FOR r IN
            WITH p AS (
                SELECT e.to_step_id AS id, array_agg(e.from_step_id ORDER BY e.from_step_id) AS ids,
                       (count(*) FILTER (WHERE NOT COALESCE(
                           (SELECT tasker_core._satisfies(s.state) FROM tasker_core.step_state s
                            WHERE s.workflow_step_id = e.from_step_id), false)))::integer AS blocked
                FROM changed_edges e GROUP BY e.to_step_id),
            c AS (
                SELECT e.from_step_id AS id, array_agg(e.to_step_id ORDER BY e.to_step_id) AS ids
                FROM changed_edges e GROUP BY e.from_step_id)
            -- a FULL JOIN is hashed or merged, never a nested loop
            SELECT id, p.ids AS parents, p.blocked, c.ids AS children
            FROM p FULL JOIN c USING (id)
        LOOP
            IF TG_OP = 'INSERT' THEN
                -- (the arrays come sorted: a new step's empty arrays take them as they are)
                UPDATE tasker_core.step_state
                   SET parent_ids = CASE WHEN r.parents IS NULL THEN parent_ids
                                         WHEN parent_ids = '{}' THEN r.parents
                                         ELSE tasker_core._add_all(parent_ids, r.parents) END,
                       child_ids = CASE WHEN r.children IS NULL THEN child_ids
                                        WHEN child_ids = '{}' THEN r.children
                                        ELSE tasker_core._add_all(child_ids, r.children) END,
                       blocked_parents = blocked_parents + COALESCE(r.blocked, 0)
                 WHERE workflow_step_id = r.id;
            ELSE
                UPDATE tasker_core.step_state
                   SET parent_ids = CASE WHEN r.parents IS NULL THEN parent_ids
                                         ELSE tasker_core._remove_all(parent_ids, r.parents) END,
                       child_ids = CASE WHEN r.children IS NULL THEN child_ids
                                        ELSE tasker_core._remove_all(child_ids, r.children) END,
                       blocked_parents = blocked_parents - COALESCE(r.blocked, 0)
                 WHERE workflow_step_id = r.id;
            END IF;
        END LOOP;
        RETURN NULL;
    END IF;
    IF TG_OP IN ('DELETE', 'UPDATE') THEN
        PERFORM 1 FROM tasker_core.step_state
         WHERE workflow_step_id IN (OLD.from_step_id, OLD.to_step_id)
         ORDER BY workflow_step_id FOR UPDATE;
        SELECT tasker_core._satisfies(p.state) INTO parent_done
          FROM tasker_core.step_state p WHERE p.workflow_step_id = OLD.from_step_id;
        UPDATE tasker_core.step_state
           SET parent_ids = tasker_core._remove_one(parent_ids, OLD.from_step_id),
               blocked_parents = blocked_parents - CASE WHEN COALESCE(parent_done, false) THEN 0 ELSE 1 END
         WHERE workflow_step_id = OLD.to_step_id;
        UPDATE tasker_core.step_state
           SET child_ids = tasker_core._remove_one(child_ids, OLD.to_step_id)
         WHERE workflow_step_id = OLD.from_step_id;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM 1 FROM tasker_core.step_state
         WHERE workflow_step_id IN (NEW.from_step_id, NEW.to_step_id)
         ORDER BY workflow_step_id FOR UPDATE;
        SELECT tasker_core._satisfies(p.state) INTO parent_done
          FROM tasker_core.step_state p WHERE p.workflow_step_id = NEW.from_step_id;
        UPDATE tasker_core.step_state
           SET parent_ids = tasker_core._insert_sorted(parent_ids, NEW.from_step_id),
               blocked_parents = blocked_parents + CASE WHEN COALESCE(parent_done, false) THEN 0 ELSE 1 END
         WHERE workflow_step_id = NEW.to_step_id;
        UPDATE tasker_core.step_state
           SET child_ids = tasker_core._insert_sorted(child_ids, NEW.to_step_id)
         WHERE workflow_step_id = NEW.from_step_id;
    END IF;
    RETURN NULL;
END;
$$;
ALTER FUNCTION tasker_core.track_edges() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE OR REPLACE FUNCTION tasker_core._create_tracking_triggers(target name) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    EXECUTE format('CREATE TRIGGER tasker_core_track AFTER INSERT OR DELETE
                    OR UPDATE OF workflow_step_id, task_id, named_step_id, retryable, retry_limit, in_process,
                                 processed, attempts, last_attempted_at, backoff_request_seconds, created_at
                    ON %I.tasker_workflow_steps
                    FOR EACH ROW EXECUTE FUNCTION tasker_core.track_steps()', target);
    -- only real renames: registration's upsert rewrites every named step with its own name
    EXECUTE format('CREATE TRIGGER tasker_core_track AFTER UPDATE OF name ON %I.tasker_named_steps
                    FOR EACH ROW WHEN (OLD.name IS DISTINCT FROM NEW.name)
                    EXECUTE FUNCTION tasker_core.track_named_steps()', target);
    -- edges: inserts and deletes per statement (transition tables need one event per trigger),
    -- updates of their ends per row
    EXECUTE format('CREATE TRIGGER tasker_core_track AFTER UPDATE OF from_step_id, to_step_id
                    ON %I.tasker_workflow_step_edges
                    FOR EACH ROW EXECUTE FUNCTION tasker_core.track_edges()', target);
    EXECUTE format('CREATE TRIGGER tasker_core_track_insert AFTER INSERT ON %I.tasker_workflow_step_edges
                    REFERENCING NEW TABLE AS changed_edges
                    FOR EACH STATEMENT EXECUTE FUNCTION tasker_core.track_edges()', target);
    EXECUTE format('CREATE TRIGGER tasker_core_track_delete AFTER DELETE ON %I.tasker_workflow_step_edges
                    REFERENCING OLD TABLE AS changed_edges
                    FOR EACH STATEMENT EXECUTE FUNCTION tasker_core.track_edges()', target);
    EXECUTE format('CREATE TRIGGER tasker_core_track AFTER INSERT OR DELETE
                    OR UPDATE OF workflow_step_id, to_state, most_recent, created_at
                    ON %I.tasker_workflow_step_transitions
                    FOR EACH ROW EXECUTE FUNCTION tasker_core.track_step_transitions()', target);
    EXECUTE format('CREATE TRIGGER tasker_core_track_truncate AFTER TRUNCATE ON %I.tasker_workflow_steps
                    FOR EACH STATEMENT EXECUTE FUNCTION tasker_core.track_truncate()', target);
    EXECUTE format('CREATE TRIGGER tasker_core_track_truncate AFTER TRUNCATE ON %I.tasker_workflow_step_edges
                    FOR EACH STATEMENT EXECUTE FUNCTION tasker_core.track_truncate()', target);
    EXECUTE format('CREATE TRIGGER tasker_core_track_truncate AFTER TRUNCATE ON %I.tasker_workflow_step_transitions
                    FOR EACH STATEMENT EXECUTE FUNCTION tasker_core.track_truncate()', target);
END;
$$;
REVOKE ALL ON FUNCTION tasker_core._create_tracking_triggers(name) FROM PUBLIC;

CREATE OR REPLACE FUNCTION tasker_core._drop_tracking_triggers(target name) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    trg record;
BEGIN
    FOR trg IN
        SELECT t.tgname, c.relname
        FROM pg_trigger t
        JOIN pg_class c ON c.oid = t.tgrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = target
          AND t.tgname IN ('tasker_core_track', 'tasker_core_track_insert', 'tasker_core_track_delete',
                           'tasker_core_track_truncate')
          AND c.relname IN ('tasker_workflow_steps', 'tasker_named_steps',
                            'tasker_workflow_step_edges', 'tasker_workflow_step_transitions')
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %I.%I', trg.tgname, target, trg.relname);
    END LOOP;
END;
$$;

CREATE OR REPLACE FUNCTION tasker_core.enable_tracking() RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    target name := current_setting('tasker_core.data_schema', true);
    current_tracked name;
BEGIN
    target := COALESCE(NULLIF(target, ''), 'public');
    SELECT t.data_schema INTO current_tracked FROM tasker_core.tracking t;
    IF current_tracked IS NOT NULL AND current_tracked <> target THEN
        RAISE EXCEPTION 'tracking is already enabled for schema %, not %', current_tracked, target
            USING ERRCODE = 'TK012',
                  HINT = 'run tasker_core.disable_tracking() first';
    END IF;
    IF to_regclass(format('%I.tasker_workflow_steps', target)) IS NULL THEN
        RAISE EXCEPTION 'tasker data schema % is not installed: table tasker_workflow_steps is missing', target
            USING ERRCODE = 'TK010';
    END IF;
    PERFORM tasker_core._drop_tracking_triggers(target);
    PERFORM tasker_core._create_tracking_triggers(target);
    INSERT INTO tasker_core.tracking (data_schema) VALUES (target) ON CONFLICT (data_schema) DO NOTHING;
    RETURN tasker_core.rebuild_tracking();
END;
$$;

-- Edge inserts and deletes are tracked per statement now (one pass over the statement's edges
-- instead of one trigger call per edge): re-attach the triggers of a tracked schema. The
-- maintained rows are unchanged, so nothing is rebuilt.
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
