-- The worker protocol's own state (leases) and the functions written in SQL: timers
-- (tick), operator functions (cancel, retry, resolve) and the DAG picture.

-- One row per claimed step: who holds it and until when. `login` is the session_user that
-- claimed it: only that login (or a superuser, or a member of tasker_admin) may complete,
-- fail, release or heartbeat it. Claims made before 0.4.0 have none and are checked by
-- worker id alone.
CREATE TABLE tasker_core.step_claims (
    workflow_step_id bigint PRIMARY KEY,
    task_id bigint NOT NULL,
    worker_id text NOT NULL,
    lease_seconds integer NOT NULL CHECK (lease_seconds > 0),
    lease_expires_at timestamptz NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT tasker_core.now(),
    heartbeat_at timestamptz,
    login name
);
CREATE INDEX step_claims_expiry_idx ON tasker_core.step_claims (lease_expires_at);
SELECT pg_catalog.pg_extension_config_dump('tasker_core.step_claims', '');

-- When tick() last ran: steps whose backoff ended since then are announced.
CREATE TABLE tasker_core.tick_state (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_tick_at timestamptz NOT NULL
);
SELECT pg_catalog.pg_extension_config_dump('tasker_core.tick_state', '');

-- Promotes up to max_steps root steps of scheduled tasks that are due into the ready queue
-- (rows another transaction holds are left to it); returns how many. Claims and tick() call it.
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

-- Timers, without clients polling the tables: fails steps whose lease expired (so they can be
-- claimed again) and wakes workers (NOTIFY tasker_ready) when a backoff ended or a lease
-- expired since the last tick, and when a scheduled task became due. Run it every second or so: from pg_cron
-- (SELECT cron.schedule('tasker-tick', '1 second', 'SELECT tasker_core.tick()')), from the
-- background worker (tasker_core in shared_preload_libraries), or from any client.
-- Returns the number of steps it made claimable or announced.
CREATE FUNCTION tasker_core.tick() RETURNS integer
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
    -- dynamic steps whose parents finished by writes that did not judge them (an application
    -- writing transitions itself, transition_step): judged now, before any task is locked
    SELECT COALESCE(tasker_core._advance_tasks(array_agg(x.task_id)), 0) INTO woke
    FROM (SELECT DISTINCT d.task_id FROM tasker_core.dynamic_steps d
          JOIN tasker_core.step_state s ON s.workflow_step_id = d.workflow_step_id
          WHERE d.phase <> 'done' AND s.blocked_parents = 0 AND (s.state IS NULL OR s.state = 'pending')
          ORDER BY d.task_id LIMIT 100) x;
    expired := tasker_core._expire_leases(1000) + tasker_core._promote_scheduled(1000);
    -- failed steps whose backoff ended since the last tick (readiness as the claims see it)
    EXECUTE format($q$SELECT $3 + count(*) FROM tasker_core.step_state s
                      WHERE %1$s AND s.state = 'error' AND %2$s > $1 AND %2$s <= $2$q$,
                   tasker_core._readiness_sql('eligible'), tasker_core._readiness_sql('backoff_until'))
      INTO woke USING since AT TIME ZONE 'UTC', now_ts AT TIME ZONE 'UTC', woke;
    IF expired + woke > 0 AND current_setting('tasker_core.notify', true) IS DISTINCT FROM 'off' THEN
        PERFORM pg_notify('tasker_ready', json_build_object('reason', 'tick', 'steps', expired + woke)::text);
    END IF;
    RETURN expired + woke;
END;
$$;

-- Locks a task for an operator call: its steps, then the task — the order claims and
-- completions take them in (step, then task on finalizing), so an operator call never
-- deadlocks a worker. TK004 when the task does not exist, 22004 for NULL.
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

-- Cancels a task and, atomically, every step of it that is not finished. Returns the number
-- of steps cancelled. A finished task (complete, cancelled or resolved_manually, or flagged
-- complete) is final: cancelling it changes nothing and returns 0.
CREATE FUNCTION tasker_core.cancel_task(task_id bigint, reason text DEFAULT NULL) RETURNS integer
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

-- Retries a task: every step in error goes back to pending with its attempts reset (and is
-- made retryable again), and so does every pending step whose retries are used up (attempts
-- at its retry_limit, or not retryable after an attempt), which could otherwise never be
-- claimed; the task goes from error back to pending, and workers are woken.
-- Returns the number of steps reset.
CREATE FUNCTION tasker_core.retry_task(task_id bigint) RETURNS integer
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
        -- a dynamic step that failed when it was judged (a map whose input was unusable) is
        -- judged again, not claimed as an ordinary step
        WITH d AS (UPDATE tasker_core.dynamic_steps d SET phase = 'waiting'
                   WHERE d.workflow_step_id = s.workflow_step_id AND d.phase = 'done' AND NOT d.skipped
                   RETURNING d.workflow_step_id)
        UPDATE tasker_core.step_state x SET not_before = 'infinity' FROM d
        WHERE x.workflow_step_id = d.workflow_step_id;
        n := n + 1;
    END LOOP;
    IF st = 'error' THEN
        PERFORM tasker_core.transition_task(retry_task.task_id, 'pending', meta);
    END IF;
    IF EXISTS (SELECT 1 FROM tasker_core.dynamic_steps d WHERE d.task_id = retry_task.task_id) THEN
        PERFORM tasker_core._advance_tasks(ARRAY[retry_task.task_id]);
    END IF;
    PERFORM pg_notify('tasker_ready', json_build_object('task_id', retry_task.task_id, 'reason', 'retry')::text);
    RETURN n;
END;
$$;

-- A Graphviz DOT picture of a task's DAG: nodes coloured by state, ready steps outlined,
-- skipped steps dashed and grey, the instances of each map step in a box labelled with it.
CREATE FUNCTION tasker_core.task_graph_dot(task_id bigint) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    out text;
BEGIN
    IF task_graph_dot.task_id IS NULL THEN
        RAISE EXCEPTION 'task_id must not be null' USING ERRCODE = '22004';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM tasker_core.task_steps(task_graph_dot.task_id)) THEN
        RETURN format('digraph task_%s {}', task_graph_dot.task_id);
    END IF;
    WITH maps AS (
        -- each map step and its instances (the other steps of its named step in the task)
        SELECT m.workflow_step_id AS map_id, m.name, i.workflow_step_id AS step_id
        FROM tasker_core.dynamic_steps d
        JOIN tasker_core.step_state m ON m.workflow_step_id = d.workflow_step_id
        JOIN tasker_core.step_state i ON i.task_id = m.task_id AND i.named_step_id = m.named_step_id
                                      AND i.workflow_step_id <> m.workflow_step_id
        WHERE d.task_id = task_graph_dot.task_id AND d.rule ? 'map'),
    nodes AS (
        SELECT r.workflow_step_id,
               format('s%s [label="%s\n%s", fillcolor="%s"%s];',
                      r.workflow_step_id, replace(r.name, '"', ''''),
                      CASE WHEN d.skipped THEN 'skipped' ELSE r.current_state END,
                      CASE WHEN d.skipped THEN '#eeeeee' ELSE
                      CASE r.current_state
                          WHEN 'complete' THEN '#9be39b' WHEN 'resolved_manually' THEN '#c8e6c9'
                          WHEN 'in_progress' THEN '#8ec5ff' WHEN 'error' THEN '#ff9e9e'
                          WHEN 'cancelled' THEN '#d0d0d0' ELSE '#ffffff' END END,
                      CASE WHEN d.skipped THEN ', style="rounded,filled,dashed", fontcolor="#777777"'
                           WHEN r.ready_for_execution THEN ', penwidth=3, color="#1f6feb"' ELSE '' END) AS line
        FROM tasker_core.get_step_readiness_status(task_graph_dot.task_id) r
        LEFT JOIN tasker_core.dynamic_steps d ON d.workflow_step_id = r.workflow_step_id)
    SELECT format(E'digraph task_%s {\n  rankdir=LR;\n  node [shape=box, style="rounded,filled", fontname="Helvetica"];\n%s\n%s\n%s\n}',
                  task_graph_dot.task_id,
                  COALESCE((SELECT string_agg('  ' || n.line, E'\n' ORDER BY n.workflow_step_id) FROM nodes n
                            WHERE n.workflow_step_id NOT IN (SELECT m.step_id FROM maps m)), ''),
                  COALESCE((SELECT string_agg(format(E'  subgraph cluster_map_%s {\n    label="%s (map, %s)";\n    style=dashed;\n    %s\n  }',
                                                     g.map_id, replace(g.name, '"', ''''), g.n, g.lines),
                                              E'\n' ORDER BY g.map_id)
                            FROM (SELECT m.map_id, m.name, count(*) AS n,
                                         string_agg(n.line, E'\n    ' ORDER BY n.workflow_step_id) AS lines
                                  FROM maps m JOIN nodes n ON n.workflow_step_id = m.step_id
                                  GROUP BY m.map_id, m.name) g), ''),
                  COALESCE((SELECT string_agg(format('  s%s -> s%s;', p, t.workflow_step_id), E'\n' ORDER BY p, t.workflow_step_id)
                            FROM tasker_core.task_steps(task_graph_dot.task_id) t, unnest(t.parent_step_ids) p), ''))
      INTO out;
    RETURN out;
END;
$$;
