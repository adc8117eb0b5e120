-- Lifecycle events: the durable event log, its cursor, subscriptions, and the clock.
--
-- NOTIFY is only a wake-up; this log is the data. Every event is one row, written in the same
-- transaction as the change it describes, so it commits or rolls back with it.
--
-- The cursor. Event ids come from a sequence, and sequence values are taken before commit, so a
-- reader that remembers "the last id I saw" can skip a smaller id that commits later. Each row
-- therefore also records the id of the transaction that wrote it (xid8), and readers only
-- consume rows whose transaction is older than every transaction of this database still
-- running in their snapshot (_horizon_xid), in (xid, id) order. No transaction that is still
-- running can later add a row before that point, so a position (xid, id) is never skipped.
-- Positions are written as text 'xid/id'; NULL or '0/0' is the beginning.

-- The one clock: the transaction timestamp, or tasker_core.fake_now when a test sets it.
-- No SET clause, so the planner inlines it into the statements that call it (a SET clause
-- made it a function call of its own, about 20 per claimed and completed step); every name
-- in it is schema-qualified, so the caller's search_path cannot change what it calls.
CREATE FUNCTION tasker_core.now() RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN pg_catalog.current_setting('tasker_core.fake_now', true) OPERATOR(pg_catalog.<>) ''
                THEN pg_catalog.current_setting('tasker_core.fake_now', true)::pg_catalog.timestamptz
                ELSE pg_catalog.now() END
$$;

CREATE TABLE tasker_core.events (
    id bigint GENERATED ALWAYS AS IDENTITY,
    xid xid8 NOT NULL DEFAULT pg_catalog.pg_current_xact_id(),
    name text NOT NULL,
    task_id bigint,
    step_id bigint,
    from_state text,
    to_state text,
    payload jsonb NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT tasker_core.now(),
    PRIMARY KEY (xid, id)
);
CREATE INDEX events_created_at_idx ON tasker_core.events (created_at);
CREATE INDEX events_task_idx ON tasker_core.events (task_id, id) WHERE task_id IS NOT NULL;

CREATE TABLE tasker_core.subscriptions (
    name text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$'),
    patterns text[] NOT NULL,
    cursor_xid xid8 NOT NULL,
    cursor_id bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT tasker_core.now(),
    acked_at timestamptz,
    -- the login that subscribed (NULL: made before 0.3.0, shared)
    owner name
);

-- The W3C trace context of a task: create_task's `traceparent` option, or the trace of the
-- first worker that claimed one of its steps with a `traceparent`. Its events, transitions and
-- claims carry it, so spans made by workers in any language join one trace.
CREATE TABLE tasker_core.task_traces (
    task_id bigint PRIMARY KEY,
    traceparent text NOT NULL CHECK (traceparent ~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$')
);

-- The traceparent of a task's trace, or NULL: for a worker's span of a claimed step.
-- VOLATILE, so that each call reads a fresh snapshot: called in the statement of a claim, it
-- sees a trace that claim recorded, and a task committed after the statement began (which the
-- claim, reading fresh snapshots too, may have claimed).
CREATE FUNCTION tasker_core.task_traceparent(task_id bigint) RETURNS text
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
    SELECT t.traceparent FROM tasker_core.task_traces t WHERE t.task_id = task_traceparent.task_id
$$;

SELECT pg_catalog.pg_extension_config_dump('tasker_core.events', '');
SELECT pg_catalog.pg_extension_config_dump('tasker_core.task_traces', '');
SELECT pg_catalog.pg_extension_config_dump('tasker_core.subscriptions', '');


-- Parses a position 'xid/id' (NULL means the beginning).
CREATE FUNCTION tasker_core._parse_cursor(cursor text, OUT xid xid8, OUT id bigint)
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF cursor IS NULL OR cursor = '' THEN
        xid := '0'::xid8; id := 0;
        RETURN;
    END IF;
    IF cursor !~ '^[0-9]{1,20}/[0-9]{1,19}$'
       OR split_part(cursor, '/', 1)::numeric > 18446744073709551615
       OR split_part(cursor, '/', 2)::numeric > 9223372036854775807 THEN
        RAISE EXCEPTION 'invalid event cursor "%": expected ''xid/id'' as returned by events_after or poll', left(cursor, 60)
            USING ERRCODE = '22P02';
    END IF;
    xid := split_part(cursor, '/', 1)::xid8;
    id := split_part(cursor, '/', 2)::bigint;
END;
$$;

-- The transaction id below which no running transaction of THIS database can still write:
-- the oldest transaction in progress in the current snapshot, ignoring those seen running in
-- other databases (they cannot write our events). A transaction that finished since the
-- snapshot was taken still counts, so nothing it wrote is ever skipped.
CREATE FUNCTION tasker_core._horizon_xid() RETURNS xid8
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

-- The position every reader may safely advance to.
CREATE FUNCTION tasker_core.event_horizon() RETURNS text
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
    SELECT tasker_core._horizon_xid()::text || '/0'
$$;

-- Events after `after_cursor` (exclusive), oldest first, at most `max_events`, only those no running
-- transaction can still precede.
CREATE FUNCTION tasker_core.events_after(after_cursor text DEFAULT NULL, max_events integer DEFAULT 100)
RETURNS TABLE(cursor text, id bigint, name text, task_id bigint, step_id bigint,
              from_state text, to_state text, payload jsonb, created_at timestamptz)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    c record;
    horizon xid8;
BEGIN
    IF max_events IS NULL OR max_events < 1 OR max_events > 10000 THEN
        RAISE EXCEPTION 'invalid max_events %: expected 1 to 10000', max_events USING ERRCODE = '22023';
    END IF;
    c := tasker_core._parse_cursor(after_cursor);
    horizon := tasker_core._horizon_xid();
    RETURN QUERY
    SELECT e.xid::text || '/' || e.id, e.id, e.name, e.task_id, e.step_id, e.from_state,
           e.to_state, e.payload, e.created_at
    FROM tasker_core.events e
    WHERE (e.xid, e.id) > (c.xid, c.id)
      AND e.xid < horizon
    ORDER BY e.xid, e.id
    LIMIT max_events;
END;
$$;

-- Deletes events older than `older_than` that every subscription has acknowledged; returns
-- how many. Events a subscriber has not acked yet are kept whatever their age.
CREATE FUNCTION tasker_core.prune_events(older_than interval) RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    IF older_than IS NULL OR older_than < interval '0' THEN
        RAISE EXCEPTION 'invalid older_than %: expected a non-negative interval', older_than USING ERRCODE = '22023';
    END IF;
    DELETE FROM tasker_core.events e
    WHERE e.created_at < tasker_core.now() - older_than
      AND NOT EXISTS (SELECT 1 FROM tasker_core.subscriptions s
                      WHERE (s.cursor_xid, s.cursor_id) < (e.xid, e.id));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END;
$$;

-- Glob patterns ('task.*', 'step.completed', '*') as LIKE patterns.
CREATE FUNCTION tasker_core._like_patterns(patterns text[]) RETURNS text[]
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT array_agg(replace(replace(replace(replace(p, '\', '\\'), '%', '\%'), '_', '\_'), '*', '%'))
    FROM unnest($1) AS p
$$;

CREATE FUNCTION tasker_core._check_subscription_name(sub_name text) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF sub_name IS NULL OR sub_name !~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$' THEN
        RAISE EXCEPTION 'invalid subscription name "%": use 1 to 128 letters, digits, and _ . : -', left(sub_name, 60)
            USING ERRCODE = '42602';
    END IF;
END;
$$;

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
-- The owner check and the write happen under one lock on the name (a transaction-level
-- advisory lock), so two logins creating the same new name at once cannot both pass the
-- check: the second waits, then sees the first one's subscription (42501). A login holds at
-- most tasker_core.max_subscriptions_per_login subscriptions (default 1000; 54000 beyond):
-- each one holds back prune_events. The count is taken under a lock on the login, so
-- concurrent sessions of one login cannot overshoot it.
CREATE FUNCTION tasker_core.subscribe(sub_name text, patterns text[] DEFAULT ARRAY['*'])
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

-- The next events of a subscription after its acknowledged position (at-least-once: the same
-- events come back until they are acked).
CREATE FUNCTION tasker_core.poll(sub_name text, max_events integer DEFAULT 100)
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
CREATE FUNCTION tasker_core.ack(sub_name text, acked_cursor text) RETURNS boolean
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

CREATE FUNCTION tasker_core.unsubscribe(sub_name text) RETURNS boolean
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM tasker_core._check_subscription_name(sub_name);
    PERFORM tasker_core._check_subscription_owner(sub_name);
    DELETE FROM tasker_core.subscriptions s WHERE s.name = sub_name;
    RETURN FOUND;
END;
$$;
