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
--   dynamic            a conditional or map step not judged yet (judged when its last parent
--                      finishes), or a map step waiting for its instances
--   skipped            it was skipped (its condition was false, or a dependency in skip_with
--                      was skipped)
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
