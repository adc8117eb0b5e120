-- Retention: finished tasks leave the tables.
--
-- CALL tasker_core.archive_tasks(finished_before, max_tasks [, batch_size]) deletes up to
-- max_tasks tasks that are finished — their current state complete, cancelled or
-- resolved_manually, or flagged complete — and whose last task transition is older than
-- finished_before, with everything of theirs: steps, edges, step and task transitions,
-- annotations, claims, maintained state (the tracking triggers), options, traces, dynamic
-- steps, and the
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
    DELETE FROM tasker_core.dynamic_steps d WHERE d.task_id = ANY (ids);
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
