-- Maintained readiness state ("tracking").
--
-- Step readiness is maintained, not recomputed: one narrow row per workflow step in
-- tasker_core.step_state holds everything the readiness functions need — the step's own
-- columns, its current state (from the most_recent transition), the number of transitions,
-- and its parents (one array element per incoming edge). Triggers on the Tasker tables of
-- the tracked data schema keep it exact under any write, including the SQL Rails writes
-- itself. Inserts and deletes of edges, and deletes of steps and step transitions, are tracked
-- per statement, through the statement's transition table: a statement writing N rows costs a
-- fixed number of set-based statements of maintenance (and a statement writing many edges
-- updates each step's row once, whatever the fan-in or fan-out). Inserts of steps and step
-- transitions and all updates are tracked per row, touching only the row of the step they
-- concern: Rails writes those one row per statement, where a row trigger is cheaper than a
-- transition table (measured: a statement trigger made Statesman's transition writes 8 % and
-- single-step inserts 20-40 % slower), and PostgreSQL gives a trigger with a column list no
-- transition table.
--
-- tasker_core.enable_tracking() attaches the triggers to the data schema
-- (tasker_core.data_schema) and backfills; disable_tracking() detaches them; rebuild_tracking()
-- recomputes every row from the tables; check_tracking() lists every disagreement between the
-- maintained rows and a recomputation (none, when all is well).

CREATE TABLE tasker_core.tracking (
    data_schema name PRIMARY KEY,
    enabled_at timestamptz NOT NULL DEFAULT now(),
    -- one tracked schema at a time: step_state is keyed by workflow_step_id
    singleton boolean NOT NULL DEFAULT true UNIQUE CHECK (singleton)
);

CREATE TABLE tasker_core.step_state (
    workflow_step_id bigint PRIMARY KEY,
    task_id bigint NOT NULL,
    named_step_id integer NOT NULL,
    name text,
    -- to_state and created_at of the most_recent transition; NULL when there is none
    state text,
    state_at timestamp without time zone,
    state_transition_id bigint,
    transition_count integer NOT NULL DEFAULT 0,
    -- from_step_id of every edge into this step (duplicates kept), ascending
    parent_ids bigint[] NOT NULL DEFAULT '{}',
    -- to_step_id of every edge out of this step (duplicates kept), ascending
    child_ids bigint[] NOT NULL DEFAULT '{}',
    -- edges into this step whose parent is not (yet) complete or resolved_manually
    blocked_parents integer NOT NULL DEFAULT 0,
    retryable boolean,
    retry_limit integer,
    in_process boolean,
    processed boolean,
    attempts integer,
    last_attempted_at timestamp without time zone,
    backoff_request_seconds integer,
    created_at timestamp without time zone,
    -- task_namespace_id of the step's task (through its named task), for claims filtered by
    -- namespace; set when the step is tracked or moves to another task
    namespace_id bigint,
    -- the task's priority (tasker_core.task_options; 0 without): claims take higher first
    priority integer NOT NULL DEFAULT 0,
    -- a root step of a task scheduled to start later: not claimable before this time (UTC);
    -- NULL once it is due and promoted into the ready queue (by a claim or tick())
    not_before timestamp without time zone
) WITH (fillfactor = 80,
      -- A claim walks the claimable index from the oldest ready step; the entries of steps
      -- claimed since the last vacuum stay at its head (dead, skipped one by one) until a
      -- vacuum removes them. Vacuum after a fixed number of dead rows, not a fifth of the
      -- table, and without throttling (measured: a claim's scan of the ready queue took
      -- 2.3 ms before and 0.14 ms after a vacuum, 60,000 tasks queued).
      autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 5000,
      autovacuum_vacuum_cost_delay = 0);
CREATE INDEX step_state_task_idx ON tasker_core.step_state (task_id, workflow_step_id);
CREATE INDEX step_state_named_step_idx ON tasker_core.step_state (named_step_id);
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

SELECT pg_catalog.pg_extension_config_dump('tasker_core.tracking', '');
SELECT pg_catalog.pg_extension_config_dump('tasker_core.step_state', '');
SELECT pg_catalog.pg_extension_config_dump('tasker_core.task_options', '');
SELECT pg_catalog.pg_extension_config_dump('tasker_core.concurrency_gates', '');
SELECT pg_catalog.pg_extension_config_dump('tasker_core.dynamic_steps', '');

-- A task's priority (tasker_core.task_options), 0 without options.
-- (No SET clause: the tracking triggers inline it; they pin their search_path themselves.)
CREATE FUNCTION tasker_core._task_priority(task bigint) RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT COALESCE((SELECT o.priority FROM tasker_core.task_options o WHERE o.task_id = task), 0)
$$;

-- tasker_workflow_steps: a row per step.
CREATE FUNCTION tasker_core.track_steps() RETURNS trigger
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

-- tasker_named_steps: a renamed step template renames its steps' readiness rows.
CREATE FUNCTION tasker_core.track_named_steps() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE tasker_core.step_state SET name = NEW.name
    WHERE named_step_id = NEW.named_step_id AND name IS DISTINCT FROM NEW.name::text;
    RETURN NULL;
END;
$$;

-- Removes one occurrence of `x` from an ascending array.
CREATE FUNCTION tasker_core._remove_one(arr bigint[], x bigint) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN array_position(arr, x) IS NULL THEN arr
                ELSE arr[:array_position(arr, x) - 1] || arr[array_position(arr, x) + 1:] END
$$;

-- Inserts `x` into an ascending array, keeping it ascending.
CREATE FUNCTION tasker_core._insert_sorted(arr bigint[], x bigint) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT COALESCE(array_agg(v ORDER BY v), '{}') FROM unnest(arr || x) AS v
$$;

-- Adds the elements of `xs` (a multiset) to an ascending array, keeping it ascending.
-- O((n + k) log(n + k)) for n elements and k added, whatever the plan.
CREATE FUNCTION tasker_core._add_all(arr bigint[], xs bigint[]) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT COALESCE(array_agg(v ORDER BY v), '{}')
    FROM (SELECT unnest(arr) UNION ALL SELECT unnest(xs)) AS d(v)
$$;

-- Removes the elements of `xs` (a multiset: one occurrence each) from an ascending array.
-- EXCEPT ALL is a hashed or sorted set operation, never a nested loop.
CREATE FUNCTION tasker_core._remove_all(arr bigint[], xs bigint[]) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT COALESCE(array_agg(v ORDER BY v), '{}')
    FROM (SELECT unnest(arr) EXCEPT ALL SELECT unnest(xs)) AS d(v)
$$;

-- Whether a most_recent to_state satisfies a dependency.
CREATE FUNCTION tasker_core._satisfies(state text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp AS $$
    SELECT COALESCE($1 IN ('complete', 'resolved_manually'), false)
$$;

-- tasker_workflow_step_edges: the child's parents and blocked count, the parent's children.
-- Inserts and deletes fire it once per statement, with the statement's edges in the transition
-- table changed_edges: every step_state row they concern is locked in id order first, then
-- updated once, with all of the statement's edges into and out of that step (a per-row trigger
-- rewrote a step's arrays once per edge and walked the row's versions made earlier in the same
-- transaction: quadratic in a step's fan-in or fan-out). Updates of an edge's ends (rare; Rails
-- never does it) fire it per row: both rows are locked in id order first. Either way concurrent
-- writers cannot deadlock on these rows.
CREATE FUNCTION tasker_core.track_edges() RETURNS trigger
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

-- Sets one step's current state (or, with only_if_tid, clears it only when that transition was
-- the current one) and adds count_delta to its transition count. When the step starts or stops
-- satisfying its children, their blocked_parents counts move with it (children locked in id
-- order).
CREATE FUNCTION tasker_core._set_step_state(step bigint, new_state text, new_at timestamp,
                                            new_tid bigint, only_if_tid bigint, count_delta integer)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    r record;
    now_done boolean;
BEGIN
    SELECT s.state, s.state_transition_id, s.child_ids INTO r
      FROM tasker_core.step_state s WHERE s.workflow_step_id = step FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF only_if_tid IS NOT NULL AND r.state_transition_id IS DISTINCT FROM only_if_tid THEN
        IF count_delta <> 0 THEN
            UPDATE tasker_core.step_state SET transition_count = transition_count + count_delta
             WHERE workflow_step_id = step;
        END IF;
        RETURN;
    END IF;
    UPDATE tasker_core.step_state
       SET state = new_state, state_at = new_at, state_transition_id = new_tid,
           transition_count = transition_count + count_delta
     WHERE workflow_step_id = step;
    now_done := tasker_core._satisfies(new_state);
    IF tasker_core._satisfies(r.state) <> now_done AND cardinality(r.child_ids) > 0 THEN
        PERFORM 1 FROM tasker_core.step_state
         WHERE workflow_step_id = ANY (r.child_ids) ORDER BY workflow_step_id FOR UPDATE;
        UPDATE tasker_core.step_state c
           SET blocked_parents = c.blocked_parents + d.n * CASE WHEN now_done THEN -1 ELSE 1 END
          FROM (SELECT x AS id, count(*)::integer AS n FROM unnest(r.child_ids) AS x GROUP BY x) d
         WHERE c.workflow_step_id = d.id;
    END IF;
END;
$$;

-- tasker_workflow_step_transitions: current state and transition count. At most one row per
-- step is most_recent at any moment (the unique partial index), so the row events replay
-- exactly: a most_recent row appearing sets the state, the current row going away clears it.
CREATE FUNCTION tasker_core.track_step_transitions() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    kids bigint[];
    deltas integer[];
BEGIN
    -- Deletes, once per statement (the rows are in changed_transitions): the maintained rows
    -- of the steps concerned are locked in id order, each updated once (its current state
    -- cleared when its current transition went, its count), then the children of the steps
    -- that stopped satisfying a dependency, locked in id order too.
    IF TG_LEVEL = 'STATEMENT' THEN
        PERFORM 1 FROM tasker_core.step_state s
         WHERE s.workflow_step_id IN (SELECT c.workflow_step_id FROM changed_transitions c)
         ORDER BY s.workflow_step_id FOR UPDATE;
        WITH per_step AS (
            SELECT c.workflow_step_id AS id, count(*)::integer AS n, array_agg(c.id) AS ids
            FROM changed_transitions c GROUP BY c.workflow_step_id),
        before AS (
            SELECT s.workflow_step_id AS id, s.state, s.child_ids
            FROM tasker_core.step_state s JOIN per_step p ON p.id = s.workflow_step_id),
        after AS (
            UPDATE tasker_core.step_state s
               SET state = CASE WHEN s.state_transition_id = ANY (p.ids) THEN NULL ELSE s.state END,
                   state_at = CASE WHEN s.state_transition_id = ANY (p.ids) THEN NULL ELSE s.state_at END,
                   state_transition_id = CASE WHEN s.state_transition_id = ANY (p.ids) THEN NULL
                                              ELSE s.state_transition_id END,
                   transition_count = s.transition_count - p.n
              FROM per_step p
             WHERE s.workflow_step_id = p.id
            RETURNING s.workflow_step_id AS id, s.state)
        SELECT array_agg(d.child ORDER BY d.child), array_agg(d.delta ORDER BY d.child)
          INTO kids, deltas
          FROM (SELECT k.child, sum(CASE WHEN tasker_core._satisfies(a.state) THEN -1 ELSE 1 END)::integer AS delta
                FROM after a JOIN before b ON b.id = a.id
                CROSS JOIN LATERAL unnest(b.child_ids) AS k(child)
                WHERE tasker_core._satisfies(a.state) <> tasker_core._satisfies(b.state)
                GROUP BY k.child) d;
        IF kids IS NOT NULL THEN
            PERFORM 1 FROM tasker_core.step_state s
             WHERE s.workflow_step_id = ANY (kids) ORDER BY s.workflow_step_id FOR UPDATE;
            UPDATE tasker_core.step_state c
               SET blocked_parents = c.blocked_parents + d.delta
              FROM unnest(kids, deltas) AS d(id, delta)
             WHERE c.workflow_step_id = d.id;
        END IF;
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.workflow_step_id = NEW.workflow_step_id THEN
        IF NEW.most_recent THEN
            PERFORM tasker_core._set_step_state(NEW.workflow_step_id, NEW.to_state, NEW.created_at, NEW.id, NULL, 0);
        ELSE
            PERFORM tasker_core._set_step_state(NEW.workflow_step_id, NULL, NULL, NULL, OLD.id, 0);
        END IF;
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        PERFORM tasker_core._set_step_state(OLD.workflow_step_id, NULL, NULL, NULL, OLD.id, -1);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        IF NEW.most_recent THEN
            PERFORM tasker_core._set_step_state(NEW.workflow_step_id, NEW.to_state, NEW.created_at, NEW.id, NULL, 1);
        ELSE
            PERFORM tasker_core._set_step_state(NEW.workflow_step_id, NULL, NULL, NULL, -1, 1);
        END IF;
    END IF;
    RETURN NULL;
END;
$$;

-- TRUNCATE of a tracked table (test suites do it): forget what it held.
CREATE FUNCTION tasker_core.track_truncate() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_TABLE_NAME = 'tasker_workflow_steps' THEN
        DELETE FROM tasker_core.step_state;
    ELSIF TG_TABLE_NAME = 'tasker_workflow_step_edges' THEN
        UPDATE tasker_core.step_state SET parent_ids = '{}', child_ids = '{}', blocked_parents = 0
         WHERE parent_ids <> '{}' OR child_ids <> '{}';
    ELSIF TG_TABLE_NAME = 'tasker_workflow_step_transitions' THEN
        UPDATE tasker_core.step_state
           SET state = NULL, state_at = NULL, state_transition_id = NULL, transition_count = 0,
               blocked_parents = cardinality(parent_ids)
         WHERE transition_count <> 0 OR state_transition_id IS NOT NULL
            OR blocked_parents <> cardinality(parent_ids);
    END IF;
    RETURN NULL;
END;
$$;

-- The recomputation: what step_state should hold for every step of the data schema.
CREATE FUNCTION tasker_core._recomputed_step_state(data_schema name)
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

CREATE FUNCTION tasker_core.rebuild_tracking() RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    tracked name;
    n bigint;
BEGIN
    SELECT t.data_schema INTO tracked FROM tasker_core.tracking t;
    IF tracked IS NULL THEN
        RAISE EXCEPTION 'tracking is not enabled: run tasker_core.enable_tracking()'
            USING ERRCODE = 'TK011';
    END IF;
    LOCK TABLE tasker_core.step_state IN EXCLUSIVE MODE;
    DELETE FROM tasker_core.step_state;
    -- in task order, so each task's rows sit together and a task reads a few pages
    INSERT INTO tasker_core.step_state
    SELECT * FROM tasker_core._recomputed_step_state(tracked) r ORDER BY r.task_id, r.workflow_step_id;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END;
$$;

CREATE FUNCTION tasker_core.check_tracking()
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

CREATE FUNCTION tasker_core.enable_tracking() RETURNS bigint
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

-- Attaches the tracking triggers to the Tasker tables of `target` (which has none of them).
CREATE FUNCTION tasker_core._create_tracking_triggers(target name) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- The row triggers skip the writes of tasker_core's own worker path, which maintains the
    -- rows itself in the statements that make the changes (tasker_core._self_maintained()).
    -- Steps and step transitions: inserts and updates of the columns tracked per row, deletes
    -- per statement (a transition table needs a trigger of its own per event).
    EXECUTE format('CREATE TRIGGER tasker_core_track AFTER INSERT
                    OR UPDATE OF workflow_step_id, task_id, named_step_id, retryable, retry_limit, in_process,
                                 processed, attempts, last_attempted_at, backoff_request_seconds, created_at
                    ON %I.tasker_workflow_steps
                    FOR EACH ROW WHEN (NOT tasker_core._self_maintained())
                    EXECUTE FUNCTION tasker_core.track_steps()', target);
    EXECUTE format('CREATE TRIGGER tasker_core_track_delete AFTER DELETE ON %I.tasker_workflow_steps
                    REFERENCING OLD TABLE AS changed_steps
                    FOR EACH STATEMENT WHEN (NOT tasker_core._self_maintained())
                    EXECUTE FUNCTION tasker_core.track_steps()', target);
    -- only real renames: registration's upsert rewrites every named step with its own name
    EXECUTE format('CREATE TRIGGER tasker_core_track AFTER UPDATE OF name ON %I.tasker_named_steps
                    FOR EACH ROW WHEN (OLD.name IS DISTINCT FROM NEW.name)
                    EXECUTE FUNCTION tasker_core.track_named_steps()', target);
    -- edges: inserts and deletes per statement (transition tables need one event per trigger),
    -- updates of their ends per row
    EXECUTE format('CREATE TRIGGER tasker_core_track AFTER UPDATE OF from_step_id, to_step_id
                    ON %I.tasker_workflow_step_edges
                    FOR EACH ROW EXECUTE FUNCTION tasker_core.track_edges()', target);
    -- (create_task writes a new task's edges with their maintained rows itself)
    EXECUTE format('CREATE TRIGGER tasker_core_track_insert AFTER INSERT ON %I.tasker_workflow_step_edges
                    REFERENCING NEW TABLE AS changed_edges
                    FOR EACH STATEMENT WHEN (NOT tasker_core._self_maintained())
                    EXECUTE FUNCTION tasker_core.track_edges()', target);
    EXECUTE format('CREATE TRIGGER tasker_core_track_delete AFTER DELETE ON %I.tasker_workflow_step_edges
                    REFERENCING OLD TABLE AS changed_edges
                    FOR EACH STATEMENT WHEN (NOT tasker_core._self_maintained())
                    EXECUTE FUNCTION tasker_core.track_edges()', target);
    EXECUTE format('CREATE TRIGGER tasker_core_track AFTER INSERT
                    OR UPDATE OF workflow_step_id, to_state, most_recent, created_at
                    ON %I.tasker_workflow_step_transitions
                    FOR EACH ROW WHEN (NOT tasker_core._self_maintained())
                    EXECUTE FUNCTION tasker_core.track_step_transitions()', target);
    EXECUTE format('CREATE TRIGGER tasker_core_track_delete AFTER DELETE ON %I.tasker_workflow_step_transitions
                    REFERENCING OLD TABLE AS changed_transitions
                    FOR EACH STATEMENT WHEN (NOT tasker_core._self_maintained())
                    EXECUTE FUNCTION tasker_core.track_step_transitions()', target);
    EXECUTE format('CREATE TRIGGER tasker_core_track_truncate AFTER TRUNCATE ON %I.tasker_workflow_steps
                    FOR EACH STATEMENT EXECUTE FUNCTION tasker_core.track_truncate()', target);
    EXECUTE format('CREATE TRIGGER tasker_core_track_truncate AFTER TRUNCATE ON %I.tasker_workflow_step_edges
                    FOR EACH STATEMENT EXECUTE FUNCTION tasker_core.track_truncate()', target);
    EXECUTE format('CREATE TRIGGER tasker_core_track_truncate AFTER TRUNCATE ON %I.tasker_workflow_step_transitions
                    FOR EACH STATEMENT EXECUTE FUNCTION tasker_core.track_truncate()', target);
END;
$$;

CREATE FUNCTION tasker_core._drop_tracking_triggers(target name) RETURNS void
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

CREATE FUNCTION tasker_core.disable_tracking() RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    tracked name;
BEGIN
    SELECT t.data_schema INTO tracked FROM tasker_core.tracking t;
    IF tracked IS NULL THEN
        RETURN false;
    END IF;
    PERFORM tasker_core._drop_tracking_triggers(tracked);
    DELETE FROM tasker_core.step_state;
    DELETE FROM tasker_core.tracking;
    RETURN true;
END;
$$;
