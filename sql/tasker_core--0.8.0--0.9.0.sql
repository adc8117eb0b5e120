-- tasker_core 0.8.0 -> 0.9.0
-- * Dynamic workflows: a template step may carry a condition, a map over an array (in the
--   task context or a dependency's results) and skip_with. tasker_core.dynamic_steps holds the
--   dynamic steps of each task; the finalizer (in the library) judges them when their parents
--   have finished; tick() judges those whose parents finished by other writes; retry_task()
--   judges a failed map step again.
-- * check_tracking() / rebuild_tracking() know that a dynamic step not yet judged is kept out
--   of the ready queue; explain shows the codes dynamic and skipped; task_graph_dot() draws map
--   instances grouped under their map step and skipped steps dashed; archive_tasks() deletes
--   the dynamic steps of the tasks it deletes; verify() checks them.
-- * events_after() and event_horizon() on a hot standby: the horizon is the snapshot's xmin
--   there (a standby's snapshot lists the primary's running transactions as subtransactions,
--   which the horizon did not see: a consumer polling a standby could skip events).
\echo Use "ALTER EXTENSION tasker_core UPDATE TO '0.9.0'" to load this file. \quit

-- The dynamic steps of tasks (a template step with a condition, a map or skip_with): one row
-- per such step, with its rule as the template declared it and its phase: `waiting` for its
-- parents to finish and to be judged, `mapped` (a map step) waiting for its instances, `done`.
-- While a step is not done its step_state.not_before is 'infinity': no claim takes it. A map
-- step's instances are ordinary steps (of the map's named step) and have no row here.
CREATE TABLE tasker_core.dynamic_steps (
    workflow_step_id bigint PRIMARY KEY,
    task_id bigint NOT NULL,
    rule jsonb NOT NULL,
    phase text NOT NULL DEFAULT 'waiting' CHECK (phase IN ('waiting', 'mapped', 'done')),
    -- judged and skipped (its transition to resolved_manually says "skipped": true)
    skipped boolean NOT NULL DEFAULT false
);
CREATE INDEX dynamic_steps_task_idx ON tasker_core.dynamic_steps (task_id);
-- the steps still to be judged or completed, for the finalizer (per task) and tick() (all)
CREATE INDEX dynamic_steps_open_idx ON tasker_core.dynamic_steps (task_id) WHERE phase <> 'done';
SELECT pg_catalog.pg_extension_config_dump('tasker_core.dynamic_steps', '');

CREATE FUNCTION tasker_core."_advance_tasks"(
	"task_ids" bigint[] /* alloc::vec::Vec<core::option::Option<i64>> */
) RETURNS INT /* i32 */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'advance_tasks_wrapper';
REVOKE ALL ON FUNCTION tasker_core._advance_tasks(bigint[]) FROM PUBLIC;

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
               CASE WHEN d.phase IN ('waiting', 'mapped') THEN 'infinity'::timestamp
                    WHEN pe.to_step_id IS NULL AND o.run_at > (tasker_core.now() AT TIME ZONE 'UTC')
                    THEN o.run_at END
        FROM %1$I.tasker_workflow_steps ws
        LEFT JOIN tasker_core.task_options o ON o.task_id = ws.task_id
        LEFT JOIN tasker_core.dynamic_steps d ON d.workflow_step_id = ws.workflow_step_id
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

CREATE OR REPLACE FUNCTION tasker_core.task_graph_dot(task_id bigint) RETURNS text
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

CREATE OR REPLACE FUNCTION tasker_core._explain(tid bigint, only_step bigint)
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
                   CASE WHEN s.state = 'cancelled' AND $4 = 'cancelled' THEN 'task_cancelled'
                        WHEN d.skipped THEN 'skipped' ELSE 'finished' END,
                   CASE WHEN s.state = 'cancelled' AND $4 = 'cancelled' THEN 'its task was cancelled'
                        WHEN d.skipped THEN 'it was skipped (its condition was false, or a dependency in skip_with was)'
                        ELSE format('it is %%s', s.state) END,
                   NULL, s.state_at
            FROM s LEFT JOIN tasker_core.dynamic_steps d ON d.workflow_step_id = s.workflow_step_id
            WHERE s.state IN ('complete', 'resolved_manually', 'cancelled')
          UNION ALL
            SELECT s.workflow_step_id, 'dynamic',
                   CASE WHEN d.phase = 'mapped'
                        THEN 'a map step: it completes with its instances'' results when they have all finished'
                        WHEN s.blocked_parents > 0
                        THEN 'a conditional or map step: judged when its last parent finishes'
                        ELSE 'a conditional or map step whose parents finished without judging it: '
                             'the next step finished in its task, or tick(), judges it' END,
                   NULL, NULL
            FROM s JOIN tasker_core.dynamic_steps d ON d.workflow_step_id = s.workflow_step_id
            WHERE d.phase <> 'done' AND (s.state IS NULL OR s.state = 'pending')
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
            FROM s WHERE s.not_before > $5 AND s.not_before < 'infinity')
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

CREATE OR REPLACE FUNCTION tasker_core._archive_batch(finished_before interval, batch_size integer) RETURNS integer
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
    DELETE FROM tasker_core.dynamic_steps d WHERE d.task_id = ANY (ids);
    DELETE FROM tasker_core.events e
    WHERE e.task_id = ANY (ids)
      AND NOT EXISTS (SELECT 1 FROM tasker_core.subscriptions s
                      WHERE (s.cursor_xid, s.cursor_id) < (e.xid, e.id));
    RETURN cardinality(ids);
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
        -- dynamic steps: a skipped step is resolved_manually; a step whose parents have all
        -- finished has been judged; a map step that completed holds one result per instance
        RETURN QUERY EXECUTE format($q$
            SELECT 'dynamic_steps', 'step', d.workflow_step_id,
                   CASE WHEN s.workflow_step_id IS NULL THEN 'a dynamic step without its step'
                        WHEN d.skipped THEN 'skipped but ' || COALESCE(s.state, 'pending')
                        WHEN d.phase = 'waiting'
                        THEN 'its parents have finished but it was not judged (tick() judges it)'
                        WHEN d.phase = 'mapped' THEN 'its instances have finished but it was not completed (tick() does it)'
                        ELSE 'a map step with ' || jsonb_array_length(ws.results) || ' results for '
                             || i.n || ' instances' END
            FROM tasker_core.dynamic_steps d
            LEFT JOIN tasker_core.step_state s ON s.workflow_step_id = d.workflow_step_id
            LEFT JOIN %1$I.tasker_workflow_steps ws ON ws.workflow_step_id = d.workflow_step_id
            LEFT JOIN LATERAL (
                SELECT count(*) AS n FROM %1$I.tasker_workflow_steps x
                WHERE x.task_id = ws.task_id AND x.named_step_id = ws.named_step_id
                  AND x.workflow_step_id <> ws.workflow_step_id) i ON d.rule ? 'map' AND s.state = 'complete'
            WHERE s.workflow_step_id IS NULL
               OR (d.skipped AND s.state IS DISTINCT FROM 'resolved_manually')
               OR (d.phase <> 'done' AND s.blocked_parents = 0 AND (s.state IS NULL OR s.state = 'pending'))
               OR (i.n IS NOT NULL AND jsonb_typeof(ws.results) = 'array' AND jsonb_array_length(ws.results) <> i.n)
        $q$, ds);
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION tasker_core._horizon_xid() RETURNS xid8
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
    WITH s AS (SELECT pg_current_snapshot() AS snap)
    SELECT CASE WHEN pg_is_in_recovery()
        -- On a hot standby a snapshot holds the primary's running transactions among its
        -- subtransactions (a standby cannot tell them apart), which pg_snapshot_xip does not
        -- return: its xmin is the horizon there (held back by every database's transactions).
        THEN (SELECT pg_snapshot_xmin(s.snap) FROM s)
        ELSE COALESCE(
            (SELECT min(x) FROM s, pg_snapshot_xip(s.snap) AS x
              WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                                 WHERE a.backend_xid = xid(x) AND a.datid IS NOT NULL
                                   AND a.datname IS DISTINCT FROM current_database())),
            (SELECT pg_snapshot_xmax(s.snap) FROM s)) END
$$;

DO $secdef$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY['tasker_core.tick()', 'tasker_core.retry_task(bigint)',
                             'tasker_core.task_graph_dot(bigint)',
                             'tasker_core._archive_batch(interval,integer)', 'tasker_core.verify()'] LOOP
        EXECUTE pg_catalog.format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = pg_catalog, pg_temp', f);
    END LOOP;
END;
$secdef$;
