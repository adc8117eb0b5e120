-- tasker_core 0.7.0 -> 0.8.0
-- * Priorities and scheduled starts (create_task options priority, run_at, delay_seconds):
--   tasker_core.task_options holds them; step_state gains priority and not_before; the
--   claimable index is ordered by priority (rebuilt here: on a large step_state this takes
--   a while and blocks writes to it); a scheduled index; claims and tick() promote due steps.
-- * Concurrency limits per key (a template's "concurrency" key pointer and limit):
--   task_options records each task's key; claims take turns on tasker_core.concurrency_gates.
-- * explain_task(task_id) and explain_step(step_id): why a step is not running (readers).
-- * CALL archive_tasks(finished_before, max_tasks): retention of finished tasks (admins).
-- * create_roles() grants them to tasker_reader; where it ran before, tasker_reader gets them here.
-- The readiness functions' library changes (rows judged as they are read) need no SQL.
\echo Use "ALTER EXTENSION tasker_core UPDATE TO '0.8.0'" to load this file. \quit

ALTER TABLE tasker_core.step_state
    ADD COLUMN priority integer NOT NULL DEFAULT 0,
    ADD COLUMN not_before timestamp without time zone;
DROP INDEX tasker_core.step_state_claimable_ns_idx;
-- The steps a worker could claim (unblocked, unprocessed, pending or in error, not scheduled
-- for later), per namespace: a claim walks the ready queue of each namespace it works on,
-- highest priority first and within a priority oldest first, and never the ready steps of
-- other namespaces.
CREATE INDEX step_state_claimable_ns_idx
    ON tasker_core.step_state (namespace_id, priority DESC, workflow_step_id)
    WHERE blocked_parents = 0 AND processed IS NOT TRUE AND in_process IS NOT TRUE
      AND (state IS NULL OR state IN ('pending', 'error')) AND not_before IS NULL;
-- Root steps of tasks scheduled to start later, by start time: claims and tick() promote the
-- due ones into the ready queue.
CREATE INDEX step_state_scheduled_idx ON tasker_core.step_state (not_before)
    WHERE not_before IS NOT NULL;

-- Options of tasks created through create_task that differ from the defaults: the source of
-- step_state.priority and step_state.not_before (a rebuild of the maintained state reads
-- them here). run_at is UTC.
CREATE TABLE tasker_core.task_options (
    task_id bigint PRIMARY KEY,
    priority integer NOT NULL DEFAULT 0 CHECK (priority BETWEEN -1000 AND 1000),
    run_at timestamp without time zone,
    -- the template's concurrency key ("namespace.name:" and the context's value at its
    -- pointer) and limit: at most that many steps of tasks with the key in progress at once
    concurrency_key text,
    concurrency_limit integer CHECK (concurrency_limit > 0)
);
CREATE INDEX task_options_concurrency_key_idx ON tasker_core.task_options (concurrency_key)
    WHERE concurrency_key IS NOT NULL;

-- One row per concurrency key in use: claims of a key's steps take turns on it (a claimer
-- that finds it held skips the key's steps), so the count of its live leases they read is
-- exact; `claims` moves with every claim, so a claimer under REPEATABLE READ that could miss
-- another's claim fails to serialize instead.
CREATE TABLE tasker_core.concurrency_gates (
    key text PRIMARY KEY,
    claims bigint NOT NULL DEFAULT 0
);
SELECT pg_catalog.pg_extension_config_dump('tasker_core.task_options', '');
SELECT pg_catalog.pg_extension_config_dump('tasker_core.concurrency_gates', '');

CREATE FUNCTION tasker_core._task_priority(task bigint) RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT COALESCE((SELECT o.priority FROM tasker_core.task_options o WHERE o.task_id = task), 0)
$$;

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
            namespace_id = CASE WHEN OLD.task_id IS DISTINCT FROM NEW.task_id THEN ns ELSE namespace_id END,
            priority = CASE WHEN OLD.task_id IS DISTINCT FROM NEW.task_id
                            THEN tasker_core._task_priority(NEW.task_id) ELSE priority END
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
            namespace_id = ns, priority = tasker_core._task_priority(NEW.task_id)
        WHERE workflow_step_id = OLD.workflow_step_id;
        RETURN NULL;
    END IF;
    -- INSERT: a new step has no edges or transitions yet unless they were written first,
    -- which the foreign keys forbid.
    INSERT INTO tasker_core.step_state (
        workflow_step_id, task_id, named_step_id, name, retryable, retry_limit, in_process,
        processed, attempts, last_attempted_at, backoff_request_seconds, created_at, namespace_id,
        priority)
    VALUES (
        NEW.workflow_step_id, NEW.task_id, NEW.named_step_id, step_name, NEW.retryable,
        NEW.retry_limit, NEW.in_process, NEW.processed, NEW.attempts, NEW.last_attempted_at,
        NEW.backoff_request_seconds, NEW.created_at, ns, tasker_core._task_priority(NEW.task_id));
    RETURN NULL;
END;
$$;

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
               nt.task_namespace_id, COALESCE(o.priority, 0),
               CASE WHEN pe.to_step_id IS NULL AND o.run_at > (tasker_core.now() AT TIME ZONE 'UTC')
                    THEN o.run_at END
        FROM %1$I.tasker_workflow_steps ws
        LEFT JOIN tasker_core.task_options o ON o.task_id = ws.task_id
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

CREATE OR REPLACE FUNCTION tasker_core.check_tracking()
RETURNS TABLE(workflow_step_id bigint, problem text, maintained text, recomputed text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    tracked name;
BEGIN
    SELECT t.data_schema INTO tracked FROM tasker_core.tracking t;
    IF tracked IS NULL THEN
        RAISE EXCEPTION 'tracking is not enabled: run tasker_core.enable_tracking()'
            USING ERRCODE = 'TK011';
    END IF;
    RETURN QUERY
    SELECT COALESCE(m.workflow_step_id, r.workflow_step_id),
           CASE WHEN m.workflow_step_id IS NULL THEN 'missing'
                WHEN r.workflow_step_id IS NULL THEN 'extra'
                ELSE 'differs' END,
           to_jsonb(m)::text, to_jsonb(r)::text
    FROM tasker_core.step_state m
    FULL JOIN tasker_core._recomputed_step_state(tracked) r USING (workflow_step_id)
    -- a scheduled step that is due may wait for a claim or tick() to promote it: the same
    WHERE (to_jsonb(m) - 'not_before') IS DISTINCT FROM (to_jsonb(r) - 'not_before')
       OR (CASE WHEN m.not_before > (tasker_core.now() AT TIME ZONE 'UTC') THEN m.not_before END)
          IS DISTINCT FROM r.not_before
    ORDER BY 1;
END;
$$;

CREATE FUNCTION tasker_core._promote_scheduled(max_steps integer) RETURNS integer
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    WITH due AS (
        SELECT s.workflow_step_id FROM tasker_core.step_state s
        WHERE s.not_before IS NOT NULL AND s.not_before <= (tasker_core.now() AT TIME ZONE 'UTC')
        ORDER BY s.not_before LIMIT max_steps
        FOR UPDATE SKIP LOCKED),
    promoted AS (
        UPDATE tasker_core.step_state s SET not_before = NULL FROM due
        WHERE s.workflow_step_id = due.workflow_step_id RETURNING 1)
    SELECT count(*)::integer FROM promoted
$$;

CREATE OR REPLACE FUNCTION tasker_core.tick() RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ds name := tasker_core._data_schema();
    since timestamptz;
    now_ts timestamptz := tasker_core.now();
    expired integer := 0;
    woke integer := 0;
    r record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM tasker_core.tracking t WHERE t.data_schema = ds) THEN
        RETURN 0;
    END IF;
    INSERT INTO tasker_core.tick_state AS t (last_tick_at) VALUES (now_ts)
    ON CONFLICT (singleton) DO UPDATE SET last_tick_at = excluded.last_tick_at
    RETURNING (SELECT last_tick_at FROM tasker_core.tick_state) INTO since;
    since := COALESCE(since, now_ts - interval '1 hour');
    expired := tasker_core._expire_leases(1000) + tasker_core._promote_scheduled(1000);
    -- failed steps whose backoff ended since the last tick (readiness as the claims see it)
    EXECUTE format($q$SELECT count(*) FROM tasker_core.step_state s
                      WHERE %1$s AND s.state = 'error' AND %2$s > $1 AND %2$s <= $2$q$,
                   tasker_core._readiness_sql('eligible'), tasker_core._readiness_sql('backoff_until'))
      INTO woke USING since AT TIME ZONE 'UTC', now_ts AT TIME ZONE 'UTC';
    IF expired + woke > 0 AND current_setting('tasker_core.notify', true) IS DISTINCT FROM 'off' THEN
        PERFORM pg_notify('tasker_ready', json_build_object('reason', 'tick', 'steps', expired + woke)::text);
    END IF;
    RETURN expired + woke;
END;
$$;

-- "Why is this step not running?" in SQL.
--
-- explain_task(task_id) returns one row per reason a step of the task is not being worked on
-- right now — in words (reason) and as a code — and, for a step a claim would take, one row
-- with the code 'ready' and since when. Every condition a claim checks has its own code, so a
-- step without any other row is exactly a step claim_steps would take (the test proves it):
--
--   code               the step is not claimed because …
--   task_complete      its task is flagged complete
--   task_cancelled     its task was cancelled (the step with it)
--   finished           it is complete, resolved_manually or cancelled
--   processed          it is marked processed
--   leased             a worker holds it: lease of worker W until T
--   lease_expired      the lease of worker W ended at T: the next claim or tick() fails it
--                      and, retries permitting, it is claimed again
--   in_process         it is marked in process without a lease (written by an application)
--   in_progress        its current state is in_progress without a lease
--   unknown_state      its current state is none the claims know
--   waiting_for_parent parent P (name) is in state S — one row per unfinished parent
--   retries_exhausted  attempts reached the retry limit (N of N)
--   not_retryable      it failed and is not retryable
--   backoff            it waits out its backoff until T
--   scheduled          its task is scheduled to start at T (a root step; claims and tick()
--                      start it when T has passed)
--   concurrency_limit  its task's concurrency key K is full (N of N in progress)
--   tracking           the maintained state disagrees with the tables (run check_tracking())
--   ready              none of the above: claimable since T
--
-- `related_step_id` is the parent of a waiting_for_parent row; `at` is the time a reason names
-- (the end of a lease or backoff, when the step finished, since when it is ready).
-- TK004 when the task (or step) does not exist, 22004 for NULL, TK011 without tracking.
CREATE FUNCTION tasker_core.explain_task(task_id bigint)
RETURNS TABLE (workflow_step_id bigint, step_name text, code text, reason text,
               related_step_id bigint, at timestamptz)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF explain_task.task_id IS NULL THEN
        RAISE EXCEPTION 'task_id must not be null' USING ERRCODE = '22004';
    END IF;
    RETURN QUERY SELECT * FROM tasker_core._explain(explain_task.task_id, NULL);
END;
$$;

-- The reasons of one step (see explain_task).
CREATE FUNCTION tasker_core.explain_step(step_id bigint)
RETURNS TABLE (workflow_step_id bigint, step_name text, code text, reason text,
               related_step_id bigint, at timestamptz)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    tid bigint;
BEGIN
    IF explain_step.step_id IS NULL THEN
        RAISE EXCEPTION 'step_id must not be null' USING ERRCODE = '22004';
    END IF;
    EXECUTE format('SELECT task_id FROM %I.tasker_workflow_steps WHERE workflow_step_id = $1',
                   tasker_core._data_schema())
        INTO tid USING explain_step.step_id;
    IF tid IS NULL THEN
        RAISE EXCEPTION 'step % not found', explain_step.step_id USING ERRCODE = 'TK004';
    END IF;
    RETURN QUERY SELECT * FROM tasker_core._explain(tid, explain_step.step_id);
END;
$$;

CREATE FUNCTION tasker_core._explain(tid bigint, only_step bigint)
RETURNS TABLE (workflow_step_id bigint, step_name text, code text, reason text,
               related_step_id bigint, at timestamptz)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ds name := tasker_core._data_schema();
    now_utc timestamp := tasker_core.now() AT TIME ZONE 'UTC';
    task_state text;
    task_done boolean;
    task_ns bigint;
    found_task integer;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM tasker_core.tracking t WHERE t.data_schema = ds) THEN
        RAISE EXCEPTION 'tracking is not enabled for schema %: run tasker_core.enable_tracking()', ds
            USING ERRCODE = 'TK011';
    END IF;
    EXECUTE format('SELECT tt.to_state::text, t.complete, nt.task_namespace_id
                    FROM %1$I.tasker_tasks t
                    LEFT JOIN %1$I.tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
                    LEFT JOIN %1$I.tasker_task_transitions tt ON tt.task_id = t.task_id AND tt.most_recent
                    WHERE t.task_id = $1', ds)
        INTO task_state, task_done, task_ns USING tid;
    GET DIAGNOSTICS found_task = ROW_COUNT;
    IF found_task = 0 THEN
        RAISE EXCEPTION 'task % not found', tid USING ERRCODE = 'TK004';
    END IF;
    RETURN QUERY EXECUTE format($q$
        WITH s AS (
            SELECT s.*, %1$s AS backoff_until,
                   (SELECT o.run_at FROM tasker_core.task_options o
                    WHERE o.task_id = s.task_id AND cardinality(s.parent_ids) = 0) AS run_at,
                   k.concurrency_key, k.concurrency_limit, k.live
            FROM tasker_core.step_state s
            LEFT JOIN LATERAL (
                SELECT o.concurrency_key, o.concurrency_limit,
                       (SELECT count(*) FROM tasker_core.step_claims c
                        JOIN tasker_core.task_options o2 ON o2.task_id = c.task_id
                        WHERE o2.concurrency_key = o.concurrency_key
                          AND c.lease_expires_at > $5 AT TIME ZONE 'UTC') AS live
                FROM tasker_core.task_options o
                WHERE o.task_id = s.task_id AND o.concurrency_key IS NOT NULL) k ON true
            WHERE s.task_id = $1 AND ($2::bigint IS NULL OR s.workflow_step_id = $2)),
        why AS (
            SELECT s.workflow_step_id, 'task_complete' AS code, 'its task is flagged complete' AS reason,
                   NULL::bigint AS related, NULL::timestamp AS at
            FROM s WHERE $3
          UNION ALL
            SELECT s.workflow_step_id,
                   CASE WHEN s.state = 'cancelled' AND $4 = 'cancelled' THEN 'task_cancelled' ELSE 'finished' END,
                   CASE WHEN s.state = 'cancelled' AND $4 = 'cancelled' THEN 'its task was cancelled'
                        ELSE format('it is %%s', s.state) END,
                   NULL, s.state_at
            FROM s WHERE s.state IN ('complete', 'resolved_manually', 'cancelled')
          UNION ALL
            SELECT s.workflow_step_id, 'unknown_state', format('its current state is %%s', s.state), NULL, s.state_at
            FROM s WHERE s.state IS NOT NULL
              AND s.state NOT IN ('pending', 'error', 'in_progress', 'complete', 'resolved_manually', 'cancelled')
          UNION ALL
            SELECT s.workflow_step_id, 'processed', 'it is marked processed', NULL, NULL
            FROM s WHERE s.processed
          UNION ALL
            SELECT s.workflow_step_id,
                   CASE WHEN c.workflow_step_id IS NULL AND s.in_process THEN 'in_process'
                        WHEN c.workflow_step_id IS NULL THEN 'in_progress'
                        WHEN c.lease_expires_at > $5 AT TIME ZONE 'UTC' THEN 'leased'
                        ELSE 'lease_expired' END,
                   CASE WHEN c.workflow_step_id IS NULL AND s.in_process
                            THEN 'it is marked in process without a lease'
                        WHEN c.workflow_step_id IS NULL THEN 'its state is in_progress without a lease'
                        WHEN c.lease_expires_at > $5 AT TIME ZONE 'UTC'
                            THEN format('lease held by worker %%s until %%s', c.worker_id, c.lease_expires_at)
                        ELSE format('the lease of worker %%s ended at %%s: the next claim or tick() fails it '
                                    'and, retries permitting, it is claimed again', c.worker_id, c.lease_expires_at) END,
                   NULL, (c.lease_expires_at AT TIME ZONE 'UTC')
            FROM s LEFT JOIN tasker_core.step_claims c ON c.workflow_step_id = s.workflow_step_id
            WHERE s.in_process OR (s.state = 'in_progress' AND NOT COALESCE(s.processed, false))
          UNION ALL
            SELECT s.workflow_step_id, 'waiting_for_parent',
                   format('parent %%s (%%s) is %%s', p.workflow_step_id, p.name, COALESCE(p.state, 'pending')),
                   p.workflow_step_id, NULL
            FROM s CROSS JOIN LATERAL unnest(s.parent_ids) AS e(parent_id)
            JOIN tasker_core.step_state p ON p.workflow_step_id = e.parent_id
            WHERE s.blocked_parents > 0 AND NOT tasker_core._satisfies(p.state)
          UNION ALL
            SELECT s.workflow_step_id, 'tracking',
                   format('the maintained state counts %%s unfinished parents (blocked_parents) but they '
                          'are not all there: run tasker_core.check_tracking()', s.blocked_parents), NULL, NULL
            FROM s WHERE s.blocked_parents > 0 AND NOT EXISTS (
                SELECT 1 FROM unnest(s.parent_ids) AS e(parent_id)
                JOIN tasker_core.step_state p ON p.workflow_step_id = e.parent_id
                WHERE NOT tasker_core._satisfies(p.state))
          UNION ALL
            SELECT s.workflow_step_id, 'tracking',
                   'the maintained namespace of the step is not its task''s: run tasker_core.check_tracking()',
                   NULL, NULL
            FROM s WHERE s.namespace_id IS DISTINCT FROM $6
          UNION ALL
            SELECT s.workflow_step_id, 'retries_exhausted',
                   format('retries exhausted (%%s of %%s)', COALESCE(s.attempts, 0), COALESCE(s.retry_limit, 3)),
                   NULL, NULL
            FROM s WHERE COALESCE(s.attempts, 0) >= COALESCE(s.retry_limit, 3)
          UNION ALL
            SELECT s.workflow_step_id, 'not_retryable', 'it failed and is not retryable', NULL, NULL
            FROM s WHERE NOT COALESCE(s.retryable, true) AND COALESCE(s.attempts, 0) > 0
          UNION ALL
            SELECT s.workflow_step_id, 'backoff', format('backoff until %%s', s.backoff_until AT TIME ZONE 'UTC'),
                   NULL, s.backoff_until
            FROM s WHERE s.backoff_until > $5
          UNION ALL
            SELECT s.workflow_step_id, 'concurrency_limit',
                   format('concurrency key %%s is full (%%s of %%s in progress)', s.concurrency_key, s.live,
                          s.concurrency_limit), NULL, NULL
            FROM s WHERE s.live >= s.concurrency_limit AND s.in_process IS NOT TRUE
          UNION ALL
            SELECT s.workflow_step_id, 'scheduled', format('its task is scheduled for %%s', s.not_before AT TIME ZONE 'UTC'),
                   NULL, s.not_before
            FROM s WHERE s.not_before > $5)
        SELECT s.workflow_step_id, s.name, w.code, w.reason, w.related, w.at AT TIME ZONE 'UTC'
        FROM why w JOIN s USING (workflow_step_id)
      UNION ALL
        SELECT s.workflow_step_id, s.name, 'ready',
               format('ready since %%s', r.since AT TIME ZONE 'UTC'), NULL, r.since AT TIME ZONE 'UTC'
        FROM s CROSS JOIN LATERAL (
            SELECT GREATEST(s.created_at, s.state_at, s.backoff_until, s.run_at,
                            (SELECT max(p.state_at) FROM unnest(s.parent_ids) AS e(parent_id)
                             JOIN tasker_core.step_state p ON p.workflow_step_id = e.parent_id)) AS since) r
        WHERE NOT EXISTS (SELECT 1 FROM why w WHERE w.workflow_step_id = s.workflow_step_id)
        ORDER BY 1, 3, 5
    $q$, tasker_core._readiness_sql('backoff_until'))
    USING tid, only_step, COALESCE(task_done, false), task_state, now_utc, task_ns;
END;
$$;

-- Retention: finished tasks leave the tables.
--
-- CALL tasker_core.archive_tasks(finished_before, max_tasks [, batch_size]) deletes up to
-- max_tasks tasks that are finished — their current state complete, cancelled or
-- resolved_manually, or flagged complete — and whose last task transition is older than
-- finished_before, with everything of theirs: steps, edges, step and task transitions,
-- annotations, claims, maintained state (the tracking triggers), options, traces, and the
-- events of the tasks that every subscription has acknowledged (the others stay until
-- prune_events). Batches of batch_size tasks, each its own transaction (COMMIT after each):
-- CALL it outside a transaction block, as pg_cron does. Safe while workers work: a finished
-- task is final, nothing can claim its steps, and each batch locks a task's steps and then
-- the task — the order workers take them in — skipping tasks another transaction holds.
-- Decision: deleted, not moved to archive tables: the event log (with a subscription) or a
-- dump before the nightly run is the archive for those who need one. Returns how many tasks
-- it deleted (the INOUT `archived`).

-- One batch (the procedure's unit of work; runs as the extension's owner).
CREATE FUNCTION tasker_core._archive_batch(finished_before interval, batch_size integer) RETURNS integer
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ds name := tasker_core._data_schema();
    cutoff timestamp := (tasker_core.now() - finished_before) AT TIME ZONE 'UTC';
    candidates bigint[];
    ids bigint[] := '{}';
    steps bigint[];
    tid bigint;
    held bigint;
    locked bigint;
    total bigint;
BEGIN
    PERFORM tasker_core._require_tables(ds, ARRAY['tasker_tasks', 'tasker_task_transitions',
        'tasker_workflow_steps', 'tasker_workflow_step_edges', 'tasker_workflow_step_transitions',
        'tasker_task_annotations']);
    -- oldest first, by the task's primary key: a batch reads little more than what it deletes
    EXECUTE format($q$
        SELECT array_agg(x.task_id ORDER BY x.task_id) FROM (
            SELECT t.task_id FROM %1$I.tasker_tasks t
            LEFT JOIN %1$I.tasker_task_transitions tt ON tt.task_id = t.task_id AND tt.most_recent
            WHERE (tt.to_state IN ('complete', 'cancelled', 'resolved_manually') OR t.complete)
              AND COALESCE(tt.created_at, t.updated_at) < $1
            ORDER BY t.task_id LIMIT $2) x$q$, ds)
        INTO candidates USING cutoff, batch_size;
    IF candidates IS NULL THEN
        RETURN 0;
    END IF;
    -- each task's steps, then the task (the workers' order), skipping a task of which another
    -- transaction holds anything; the task is read again under the locks (finished is final,
    -- but it may be gone)
    FOREACH tid IN ARRAY candidates LOOP
        EXECUTE format('SELECT (SELECT count(*) FROM (SELECT 1 FROM %1$I.tasker_workflow_steps WHERE task_id = $1
                                                      ORDER BY workflow_step_id FOR UPDATE SKIP LOCKED) x),
                               (SELECT count(*) FROM %1$I.tasker_workflow_steps WHERE task_id = $1)', ds)
            INTO locked, total USING tid;
        CONTINUE WHEN locked < total;
        EXECUTE format($q$SELECT t.task_id FROM %1$I.tasker_tasks t
                          LEFT JOIN %1$I.tasker_task_transitions tt ON tt.task_id = t.task_id AND tt.most_recent
                          WHERE t.task_id = $1
                            AND (tt.to_state IN ('complete', 'cancelled', 'resolved_manually') OR t.complete)
                          FOR UPDATE OF t SKIP LOCKED$q$, ds)
            INTO held USING tid;
        IF held IS NOT NULL THEN
            ids := ids || held;
        END IF;
    END LOOP;
    IF cardinality(ids) = 0 THEN
        RETURN 0;
    END IF;
    EXECUTE format('SELECT COALESCE(array_agg(workflow_step_id), ''{}'') FROM %I.tasker_workflow_steps
                    WHERE task_id = ANY ($1)', ds) INTO steps USING ids;
    DELETE FROM tasker_core.step_claims c WHERE c.task_id = ANY (ids);
    EXECUTE format('DELETE FROM %I.tasker_workflow_step_transitions WHERE workflow_step_id = ANY ($1)', ds) USING steps;
    EXECUTE format('DELETE FROM %I.tasker_workflow_step_edges WHERE from_step_id = ANY ($1) OR to_step_id = ANY ($1)', ds)
        USING steps;
    EXECUTE format('DELETE FROM %I.tasker_workflow_steps WHERE task_id = ANY ($1)', ds) USING ids;
    EXECUTE format('DELETE FROM %I.tasker_task_transitions WHERE task_id = ANY ($1)', ds) USING ids;
    EXECUTE format('DELETE FROM %I.tasker_task_annotations WHERE task_id = ANY ($1)', ds) USING ids;
    EXECUTE format('DELETE FROM %I.tasker_tasks WHERE task_id = ANY ($1)', ds) USING ids;
    DELETE FROM tasker_core.task_options o WHERE o.task_id = ANY (ids);
    DELETE FROM tasker_core.task_traces tr WHERE tr.task_id = ANY (ids);
    DELETE FROM tasker_core.events e
    WHERE e.task_id = ANY (ids)
      AND NOT EXISTS (SELECT 1 FROM tasker_core.subscriptions s
                      WHERE (s.cursor_xid, s.cursor_id) < (e.xid, e.id));
    RETURN cardinality(ids);
END;
$$;

-- (A procedure, so that each batch commits; no SET clause and not SECURITY DEFINER, which
-- would forbid the COMMIT: every name in it is qualified, and the batches run as the owner.)
CREATE PROCEDURE tasker_core.archive_tasks(finished_before interval, max_tasks integer,
                                           batch_size integer DEFAULT 100, INOUT archived bigint DEFAULT 0)
LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    IF finished_before IS NULL OR max_tasks IS NULL OR batch_size IS NULL THEN
        RAISE EXCEPTION 'finished_before, max_tasks and batch_size must not be null' USING ERRCODE = '22004';
    END IF;
    IF finished_before < interval '0' THEN
        RAISE EXCEPTION 'invalid finished_before %: expected a non-negative interval', finished_before
            USING ERRCODE = '22023';
    END IF;
    IF max_tasks < 1 OR batch_size < 1 OR batch_size > 10000 THEN
        RAISE EXCEPTION 'invalid max_tasks % or batch_size %: max_tasks at least 1, batch_size 1 to 10000',
            max_tasks, batch_size USING ERRCODE = '22023';
    END IF;
    archived := 0;
    LOOP
        n := tasker_core._archive_batch(finished_before, LEAST(batch_size, max_tasks - archived)::integer);
        archived := archived + n;
        COMMIT;
        EXIT WHEN n = 0 OR archived >= max_tasks;
    END LOOP;
END;
$$;

DO $secdef$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY['tasker_core.track_steps()', 'tasker_core.check_tracking()', 'tasker_core.tick()',
                             'tasker_core.explain_task(bigint)', 'tasker_core.explain_step(bigint)',
                             'tasker_core._archive_batch(interval,integer)'] LOOP
        EXECUTE pg_catalog.format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = pg_catalog, pg_temp', f);
    END LOOP;
END;
$secdef$;
REVOKE ALL ON FUNCTION tasker_core.explain_task(bigint), tasker_core.explain_step(bigint),
    tasker_core._explain(bigint, bigint), tasker_core._task_priority(bigint),
    tasker_core._promote_scheduled(integer), tasker_core._archive_batch(interval, integer) FROM PUBLIC;
REVOKE ALL ON PROCEDURE tasker_core.archive_tasks(interval, integer, integer, bigint) FROM PUBLIC;

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

DO $grant$
BEGIN
    -- only where create_roles() ran in this database (the roles themselves are cluster-wide)
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'tasker_reader')
       AND pg_catalog.has_function_privilege('tasker_reader', 'tasker_core.task_graph_dot(bigint)', 'EXECUTE') THEN
        GRANT EXECUTE ON FUNCTION tasker_core.explain_task(bigint), tasker_core.explain_step(bigint)
            TO tasker_reader;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'tasker_admin')
       AND pg_catalog.has_function_privilege('tasker_admin', 'tasker_core.cancel_task(bigint,text)', 'EXECUTE') THEN
        GRANT EXECUTE ON ROUTINE tasker_core.archive_tasks(interval, integer, integer, bigint),
            tasker_core._archive_batch(interval, integer) TO tasker_admin;
    END IF;
END;
$grant$;
