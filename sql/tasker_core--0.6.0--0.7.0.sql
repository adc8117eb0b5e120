-- tasker_core 0.6.0 -> 0.7.0
-- * Native readiness is written once, in the library: metrics() and tick() build their
--   statements with tasker_core._readiness_sql(part), the text the claims use.
-- * get_step_readiness_status_batch and get_task_execution_contexts_batch are declared with
--   the result type of get_step_readiness_status and get_task_execution_context (the same
--   columns as before: nothing to change here).
-- * _direct_reads(): how many readiness reads this backend made without SPI (tests).
-- * tasker_core.step_state is vacuumed after 5,000 dead rows, unthrottled (the head of the
--   claimable index fills with the entries of claimed steps until a vacuum).
-- Nothing else changes: the library serves the 0.6.0 SQL as before until this script runs.
\echo Use "ALTER EXTENSION tasker_core UPDATE TO '0.7.0'" to load this file. \quit

ALTER TABLE tasker_core.step_state SET (autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 5000, autovacuum_vacuum_cost_delay = 0);

CREATE FUNCTION tasker_core."_readiness_sql"(
	"part" TEXT
) RETURNS TEXT
IMMUTABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'readiness_sql_wrapper';
REVOKE ALL ON FUNCTION tasker_core._readiness_sql(text) FROM PUBLIC;

CREATE FUNCTION tasker_core."_direct_reads"() RETURNS bigint
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'direct_reads_wrapper';
REVOKE ALL ON FUNCTION tasker_core._direct_reads() FROM PUBLIC;

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
    expired := tasker_core._expire_leases(1000);
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

-- CREATE OR REPLACE reset what roles.sql set on them
ALTER FUNCTION tasker_core.metrics() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION tasker_core.tick() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
