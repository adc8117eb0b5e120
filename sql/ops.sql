-- Operations: invariant checks, metrics for Prometheus, a health probe.

-- TK010, as the Rust functions raise it (same message), rather than 42P01 when one of the
-- tables a function reads is missing from the data schema.
CREATE FUNCTION tasker_core._require_tables(ds name, tables text[]) RETURNS void
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

-- Every invariant tasker_core relies on, checked against the data; one row per violation
-- (none when all is well). Run it after a crash, a restore, or whenever in doubt.
CREATE FUNCTION tasker_core.verify()
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

-- Prometheus text exposition of the workflow engine's state. Cheap enough to scrape every
-- 15 s: it reads the maintained step state (one narrow row per step) and the task states.
CREATE FUNCTION tasker_core.metrics() RETURNS text
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
    -- native readiness as the claims see it (tasker_core._readiness_sql), split by backoff
    EXECUTE format($q$
        SELECT count(*) FILTER (WHERE ready) AS ready,
               count(*) FILTER (WHERE waiting) AS backoff,
               EXTRACT(EPOCH FROM $1 - min(since) FILTER (WHERE ready)) AS oldest
          FROM (SELECT (%2$s IS NULL OR %2$s <= $1) AS ready, %2$s > $1 AS waiting,
                       COALESCE(%2$s, s.state_at, s.created_at) AS since
                FROM tasker_core.step_state s WHERE %1$s) c$q$,
        tasker_core._readiness_sql('eligible'), tasker_core._readiness_sql('backoff_until'))
      INTO r USING now_utc;
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

-- A readiness probe: the database answers, the data schema is installed and tracked, and no
-- lease has been expired for more than a minute (which would mean no tick() is running).
CREATE FUNCTION tasker_core.health()
RETURNS TABLE(ready boolean, check_name text, ok boolean, detail text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ds name := tasker_core._data_schema();
    installed boolean := to_regclass(format('%I.tasker_workflow_steps', ds)) IS NOT NULL;
    tracked boolean := EXISTS (SELECT 1 FROM tasker_core.tracking t WHERE t.data_schema = ds);
    stale bigint := (SELECT count(*) FROM tasker_core.step_claims c
                     WHERE c.lease_expires_at < tasker_core.now() - interval '1 minute');
BEGIN
    RETURN QUERY
    SELECT bool_and(x.ok) OVER (), x.name, x.ok, x.detail
    FROM (VALUES
        ('schema_installed', installed, format('data schema %s', ds)),
        ('tracking_enabled', tracked, CASE WHEN tracked THEN 'maintained readiness state is on'
                                          ELSE 'run tasker_core.enable_tracking()' END),
        ('timers_running', stale = 0, CASE WHEN stale = 0 THEN 'no lease expired for over a minute'
                                          ELSE stale || ' leases expired over a minute ago: is tick() scheduled?' END),
        -- how wake-ups are sent (a choice, not a fault: always ok)
        ('wakeups', true, (SELECT m.mode || ': ' || m.detail FROM tasker_core._wakeup_mode() m))
    ) AS x(name, ok, detail);
END;
$$;
