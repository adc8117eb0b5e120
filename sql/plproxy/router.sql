-- The router of a sharded tasker_core (docs/scaling.md, "Sharding by task with PL/Proxy").
--
-- Not part of the extension: the router database has no tasker_core extension and no Tasker
-- tables. Its schema tasker_core holds PL/Proxy functions with the names, arguments, defaults
-- and result columns of the extension's functions that workers and applications call, so the
-- clients (clients/python, clients/node, clients/ruby) work unchanged with a connection to the
-- router. scripts/shards.sh creates the PL/Proxy cluster first, as a SQL/MED server:
--
--   CREATE EXTENSION plproxy;
--   CREATE SERVER tasker_partitions FOREIGN DATA WRAPPER plproxy
--       OPTIONS (p0 'host=... dbname=...', p1 '...', ...);      -- a power of two of them
--   CREATE USER MAPPING FOR PUBLIC SERVER tasker_partitions;
--   GRANT USAGE ON FOREIGN SERVER tasker_partitions TO PUBLIC;
--
-- and then runs this file, after dropping the schema, in the same transaction (the router holds
-- no data; the file itself is idempotent too, but CREATE OR REPLACE cannot change a function's
-- result columns).
--
-- Routing. Partition k of N makes its task and step ids k + 1, k + 1 + N, k + 1 + 2N, ...
-- (sql/plproxy/partition.sql), so (id - 1) % N is a task's or a step's partition. PL/Proxy maps
-- a RUN ON hash h to partition h & (N - 1); the hash of an id is (id - 1) & 0x7fffffff, which
-- PL/Proxy's mask turns into (id - 1) % N for every N up to 2^31.
--
-- PL/Proxy runs every remote call in autocommit mode: each call is one transaction on one
-- partition, committed when it returns. Nothing below is one transaction across partitions.

CREATE SCHEMA IF NOT EXISTS tasker_core;
COMMENT ON SCHEMA tasker_core IS 'tasker_core router: PL/Proxy functions over the partitions of server tasker_partitions';

-- ---------------------------------------------------------------------------------------------
-- Helpers

-- The partition hash of a task or step id. NULL goes to partition 0, whose engine then answers
-- with its own error for the NULL (22004) rather than the router inventing one.
CREATE OR REPLACE FUNCTION tasker_core._id_hash(id bigint) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(((id - 1) & 2147483647)::integer, 0)
$$;

-- The number of partitions: the p0, p1, ... options of the SQL/MED server (PL/pgSQL: its plan
-- is kept for the session, where a SQL function's would be made again at every call).
CREATE OR REPLACE FUNCTION tasker_core._partitions() RETURNS integer
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT count(*)::integer
            FROM pg_catalog.pg_foreign_server s, unnest(s.srvoptions) o
            WHERE s.srvname = 'tasker_partitions' AND o ~ '^p[0-9]+=');
END $$;

CREATE OR REPLACE FUNCTION tasker_core._all_partitions() RETURNS integer[]
LANGUAGE sql STABLE AS $$
    SELECT array(SELECT generate_series(0, tasker_core._partitions() - 1))
$$;

-- Round-robin counters of the router (a sequence is shared by all sessions and never waits).
CREATE SEQUENCE IF NOT EXISTS tasker_core._claim_rotation;
CREATE SEQUENCE IF NOT EXISTS tasker_core._create_rotation;

-- Anyone may call the router's functions; what a login may do is decided by each partition,
-- where PL/Proxy connects as the calling user (tasker_worker, tasker_admin ... as on one database).
GRANT USAGE ON SCHEMA tasker_core TO PUBLIC;
GRANT USAGE ON SEQUENCE tasker_core._claim_rotation, tasker_core._create_rotation TO PUBLIC;

-- Whether an error raised by a PL/Proxy call is PL/Proxy's own failure to reach the partition
-- (XX000 without "REMOTE ERROR": connecting, or the connection lost) rather than an error
-- the partition's engine raised (which keeps its own SQLSTATE and says REMOTE ERROR).
CREATE OR REPLACE FUNCTION tasker_core._unreachable(state text, message text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT state = 'XX000' AND message LIKE 'PL/Proxy function %' AND message NOT LIKE '%REMOTE ERROR%'
$$;

-- ... and, among those, a connection that could not be made: the call never reached the partition.
CREATE OR REPLACE FUNCTION tasker_core._never_connected(state text, message text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT tasker_core._unreachable(state, message)
       AND (message LIKE '%PQconnectPoll%' OR message LIKE '%PQconnectStart%' OR message LIKE '%connect timeout%')
$$;

-- The partition of one element of a report's outcomes (only called on elements that
-- tasker_core._splittable accepted: objects with a positive integer step_id).
CREATE OR REPLACE FUNCTION tasker_core._outcome_hash(outcome jsonb) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT tasker_core._id_hash((outcome ->> 'step_id')::bigint)
$$;

-- Whether a report can be split by owner: an array of at most 1,000 objects whose step_id is a
-- positive integer. Anything else goes whole to one partition, whose engine refuses it with its
-- own SQLSTATE and message and changes nothing (the router judges no outcome itself).
CREATE OR REPLACE FUNCTION tasker_core._splittable(outcomes jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT outcomes IS NOT NULL
       AND jsonb_typeof(outcomes) = 'array'
       AND jsonb_array_length(outcomes) <= 1000
       AND NOT EXISTS (
           SELECT 1 FROM jsonb_array_elements(outcomes) e
           WHERE jsonb_typeof(e) <> 'object'
              OR jsonb_typeof(e -> 'step_id') IS DISTINCT FROM 'number'
              OR (e ->> 'step_id') !~ '^[0-9]{1,18}$'
              OR (e ->> 'step_id')::bigint < 1)
$$;

-- ---------------------------------------------------------------------------------------------
-- Router cursors for the event log. Each partition has its own log and its own 'xid/id'
-- cursors; a router cursor is the list of per-partition positions, 'k:xid/id' joined by commas
-- ('0:750/12,1:744/9'); a partition missing from it is read from its beginning.

CREATE OR REPLACE FUNCTION tasker_core._cursor_positions(cursor text) RETURNS text[]
LANGUAGE plpgsql STABLE AS $$
DECLARE
    n integer := tasker_core._partitions();
    positions text[] := array_fill(NULL::text, ARRAY[n]);
    item text;
    k integer;
BEGIN
    IF cursor IS NULL OR cursor = '' THEN
        RETURN positions;
    END IF;
    FOREACH item IN ARRAY string_to_array(cursor, ',') LOOP
        IF item !~ '^[0-9]{1,4}:[0-9]+/[0-9]+$' THEN
            RAISE EXCEPTION 'invalid router event cursor "%": expected ''k:xid/id'' items joined by commas, as returned by the router''s events_after, poll or event_horizon', cursor
                USING ERRCODE = '22P02';
        END IF;
        k := split_part(item, ':', 1)::integer;
        IF k >= n THEN
            RAISE EXCEPTION 'invalid router event cursor "%": partition % of % partitions', cursor, k, n
                USING ERRCODE = '22P02';
        END IF;
        positions[k + 1] := split_part(item, ':', 2);
    END LOOP;
    RETURN positions;
END $$;

CREATE OR REPLACE FUNCTION tasker_core._cursor_text(positions text[]) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT string_agg((p.k - 1)::text || ':' || p.pos, ',' ORDER BY p.k)
    FROM unnest(positions) WITH ORDINALITY AS p(pos, k)
    WHERE p.pos IS NOT NULL
$$;

-- ---------------------------------------------------------------------------------------------
-- Row types of the per-partition calls

DO $$
BEGIN
    IF to_regtype('tasker_core._claimed') IS NULL THEN
        CREATE TYPE tasker_core._claimed AS (
            task_id bigint, workflow_step_id bigint, step_name text, namespace text, task_name text,
            handler_class text, handler_config jsonb, inputs jsonb, parent_results jsonb,
            attempt integer, lease_expires_at timestamptz);
    END IF;
    IF to_regtype('tasker_core._reported') IS NULL THEN
        CREATE TYPE tasker_core._reported AS (workflow_step_id bigint, outcome text, backoff_seconds integer);
    END IF;
    IF to_regtype('tasker_core._report_claimed') IS NULL THEN
        CREATE TYPE tasker_core._report_claimed AS (
            outcome text, workflow_step_id bigint, backoff_seconds integer, task_id bigint,
            step_name text, namespace text, task_name text, handler_class text,
            handler_config jsonb, inputs jsonb, parent_results jsonb, attempt integer,
            lease_expires_at timestamptz);
    END IF;
    IF to_regtype('tasker_core._event') IS NULL THEN
        CREATE TYPE tasker_core._event AS (
            partition integer, cursor text, id bigint, name text, task_id bigint, step_id bigint,
            from_state text, to_state text, payload jsonb, created_at timestamptz);
    END IF;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Steps: to the partition of the step id

CREATE OR REPLACE FUNCTION tasker_core.complete_step(step_id bigint, worker_id text, results jsonb DEFAULT '{}')
RETURNS boolean LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON tasker_core._id_hash(step_id);
$$;

CREATE OR REPLACE FUNCTION tasker_core.fail_step(step_id bigint, worker_id text, error jsonb,
                                                 retryable boolean DEFAULT true,
                                                 retry_after_seconds integer DEFAULT NULL)
RETURNS integer LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON tasker_core._id_hash(step_id);
$$;

CREATE OR REPLACE FUNCTION tasker_core.heartbeat(step_id bigint, worker_id text)
RETURNS timestamptz LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON tasker_core._id_hash(step_id);
$$;

CREATE OR REPLACE FUNCTION tasker_core.release_step(step_id bigint, worker_id text)
RETURNS boolean LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON tasker_core._id_hash(step_id);
$$;

CREATE OR REPLACE FUNCTION tasker_core.transition_step(step_id bigint, to_state text, metadata jsonb DEFAULT '{}',
                                                       expected_from text DEFAULT NULL)
RETURNS boolean LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON tasker_core._id_hash(step_id);
$$;

CREATE OR REPLACE FUNCTION tasker_core.resolve_step_manually(step_id bigint, results jsonb DEFAULT '{}')
RETURNS boolean LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON tasker_core._id_hash(step_id);
$$;

CREATE OR REPLACE FUNCTION tasker_core.explain_step(step_id bigint)
RETURNS TABLE(workflow_step_id bigint, step_name text, code text, reason text, related_step_id bigint,
              at timestamptz)
LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON tasker_core._id_hash(step_id);
$$;

-- ---------------------------------------------------------------------------------------------
-- Tasks and the per-task readers: to the partition of the task id

-- A task with an idempotency key goes to the partition of the key's hash: a repeated key
-- reaches the partition that holds its task, whose engine returns it.
CREATE OR REPLACE FUNCTION tasker_core._create_task_by_key(idempotency_key text, namespace text, name text,
                                                          version text, context jsonb, options jsonb)
RETURNS bigint LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON hashtext(idempotency_key);
    SELECT tasker_core.create_task(namespace, name, version, context, options) AS task_id;
$$;

CREATE OR REPLACE FUNCTION tasker_core._create_task_on(part integer, namespace text, name text, version text,
                                                      context jsonb, options jsonb)
RETURNS bigint LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON part;
    SELECT tasker_core.create_task(namespace, name, version, context, options) AS task_id;
$$;

-- Without a key, tasks go to the partitions in turn (a rotation shared by every session of the
-- router). A partition that cannot be connected to is passed over with a WARNING (the call
-- never reached it, so nothing was created there); a connection lost during the call is an
-- error, since the task may exist.
CREATE OR REPLACE FUNCTION tasker_core.create_task(namespace text, name text, version text, context jsonb,
                                                   options jsonb DEFAULT '{}')
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n integer := tasker_core._partitions();
    first integer;
    state text;
    message text;
BEGIN
    IF jsonb_typeof(options) = 'object' AND jsonb_typeof(options -> 'idempotency_key') IS DISTINCT FROM 'null'
       AND options ? 'idempotency_key' THEN
        RETURN tasker_core._create_task_by_key(options ->> 'idempotency_key', namespace, name, version, context,
                                               options);
    END IF;
    first := nextval('tasker_core._create_rotation') % n;
    FOR i IN 0 .. n - 1 LOOP
        BEGIN
            RETURN tasker_core._create_task_on((first + i) % n, namespace, name, version, context, options);
        EXCEPTION WHEN internal_error THEN
            GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT;
            IF NOT tasker_core._never_connected(state, message) OR i = n - 1 THEN
                RAISE;
            END IF;
            RAISE WARNING 'create_task: partition % passed over: %', (first + i) % n, message;
        END;
    END LOOP;
END $$;

CREATE OR REPLACE FUNCTION tasker_core.cancel_task(task_id bigint, reason text DEFAULT NULL)
RETURNS integer LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON tasker_core._id_hash(task_id);
$$;

CREATE OR REPLACE FUNCTION tasker_core.retry_task(task_id bigint)
RETURNS integer LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON tasker_core._id_hash(task_id);
$$;

CREATE OR REPLACE FUNCTION tasker_core.transition_task(task_id bigint, to_state text, metadata jsonb DEFAULT '{}',
                                                       expected_from text DEFAULT NULL)
RETURNS boolean LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON tasker_core._id_hash(task_id);
$$;

CREATE OR REPLACE FUNCTION tasker_core.task_traceparent(task_id bigint)
RETURNS text LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON tasker_core._id_hash(task_id);
$$;

CREATE OR REPLACE FUNCTION tasker_core.task_graph_dot(task_id bigint)
RETURNS text LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON tasker_core._id_hash(task_id);
$$;

CREATE OR REPLACE FUNCTION tasker_core.task_steps(task_id bigint)
RETURNS TABLE(workflow_step_id bigint, name text, current_state text, parent_step_ids bigint[],
              dependency_level integer)
LANGUAGE plproxy STRICT AS $$
    CLUSTER 'tasker_partitions';
    RUN ON tasker_core._id_hash(task_id);
$$;

CREATE OR REPLACE FUNCTION tasker_core.explain_task(task_id bigint)
RETURNS TABLE(workflow_step_id bigint, step_name text, code text, reason text, related_step_id bigint,
              at timestamptz)
LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON tasker_core._id_hash(task_id);
$$;

CREATE OR REPLACE FUNCTION tasker_core.get_step_readiness_status(input_task_id bigint, step_ids bigint[] DEFAULT NULL)
RETURNS TABLE(workflow_step_id bigint, task_id bigint, named_step_id integer, name text, current_state text,
              dependencies_satisfied boolean, retry_eligible boolean, ready_for_execution boolean,
              last_failure_at timestamp, next_retry_at timestamp, total_parents integer,
              completed_parents integer, attempts integer, retry_limit integer,
              backoff_request_seconds integer, last_attempted_at timestamp)
LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON tasker_core._id_hash(input_task_id);
$$;

CREATE OR REPLACE FUNCTION tasker_core.get_task_execution_context(input_task_id bigint)
RETURNS TABLE(task_id bigint, named_task_id integer, status text, total_steps bigint, pending_steps bigint,
              in_progress_steps bigint, completed_steps bigint, failed_steps bigint, ready_steps bigint,
              execution_status text, recommended_action text, completion_percentage numeric,
              health_status text)
LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON tasker_core._id_hash(input_task_id);
$$;

CREATE OR REPLACE FUNCTION tasker_core.calculate_dependency_levels(input_task_id bigint)
RETURNS TABLE(workflow_step_id bigint, dependency_level integer)
LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON tasker_core._id_hash(input_task_id);
$$;

CREATE OR REPLACE FUNCTION tasker_core.step_dag_relationships(task_id bigint)
RETURNS TABLE(workflow_step_id bigint, task_id bigint, named_step_id integer, parent_step_ids jsonb,
              child_step_ids jsonb, parent_count bigint, child_count bigint, is_root_step boolean,
              is_leaf_step boolean, min_depth_from_root integer)
LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON tasker_core._id_hash(task_id);
$$;

-- The batch readers: PL/Proxy splits the id array by owner and asks the owners in parallel.
CREATE OR REPLACE FUNCTION tasker_core._get_step_readiness_status_batch(input_task_ids bigint[])
RETURNS TABLE(workflow_step_id bigint, task_id bigint, named_step_id integer, name text, current_state text,
              dependencies_satisfied boolean, retry_eligible boolean, ready_for_execution boolean,
              last_failure_at timestamp, next_retry_at timestamp, total_parents integer,
              completed_parents integer, attempts integer, retry_limit integer,
              backoff_request_seconds integer, last_attempted_at timestamp)
LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    SPLIT input_task_ids;
    RUN ON tasker_core._id_hash(input_task_ids);
    TARGET tasker_core.get_step_readiness_status_batch;
$$;

CREATE OR REPLACE FUNCTION tasker_core.get_step_readiness_status_batch(input_task_ids bigint[])
RETURNS TABLE(workflow_step_id bigint, task_id bigint, named_step_id integer, name text, current_state text,
              dependencies_satisfied boolean, retry_eligible boolean, ready_for_execution boolean,
              last_failure_at timestamp, next_retry_at timestamp, total_parents integer,
              completed_parents integer, attempts integer, retry_limit integer,
              backoff_request_seconds integer, last_attempted_at timestamp)
LANGUAGE sql AS $$
    SELECT * FROM tasker_core._get_step_readiness_status_batch(input_task_ids) r
    ORDER BY r.task_id, r.workflow_step_id
$$;

CREATE OR REPLACE FUNCTION tasker_core._get_task_execution_contexts_batch(input_task_ids bigint[])
RETURNS TABLE(task_id bigint, named_task_id integer, status text, total_steps bigint, pending_steps bigint,
              in_progress_steps bigint, completed_steps bigint, failed_steps bigint, ready_steps bigint,
              execution_status text, recommended_action text, completion_percentage numeric,
              health_status text)
LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    SPLIT input_task_ids;
    RUN ON tasker_core._id_hash(input_task_ids);
    TARGET tasker_core.get_task_execution_contexts_batch;
$$;

CREATE OR REPLACE FUNCTION tasker_core.get_task_execution_contexts_batch(input_task_ids bigint[])
RETURNS TABLE(task_id bigint, named_task_id integer, status text, total_steps bigint, pending_steps bigint,
              in_progress_steps bigint, completed_steps bigint, failed_steps bigint, ready_steps bigint,
              execution_status text, recommended_action text, completion_percentage numeric,
              health_status text)
LANGUAGE sql AS $$
    SELECT * FROM tasker_core._get_task_execution_contexts_batch(input_task_ids) r ORDER BY r.task_id
$$;

-- ---------------------------------------------------------------------------------------------
-- Templates: registered on every partition; read from partition 0

CREATE OR REPLACE FUNCTION tasker_core._register_task_template(parts integer[], template jsonb)
RETURNS TABLE(partition integer, named_task_id integer)
LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    SPLIT parts;
    RUN ON parts;
    SELECT (parts)[1] AS partition, tasker_core.register_task_template(template) AS named_task_id;
$$;

-- Registers (or replaces) the template on every partition at once (RUN ON every partition, in
-- parallel) and returns partition 0's named task id: the ids agree when every registration
-- goes through the router. A partition that fails makes the call fail; registering again is
-- harmless (registration replaces), so a failed call is retried as it is.
CREATE OR REPLACE FUNCTION tasker_core.register_task_template(template jsonb)
RETURNS integer LANGUAGE sql AS $$
    SELECT r.named_task_id
    FROM tasker_core._register_task_template(tasker_core._all_partitions(), template) r
    ORDER BY r.partition
    LIMIT 1
$$;

CREATE OR REPLACE FUNCTION tasker_core.get_task_template(namespace text, name text, version text DEFAULT NULL)
RETURNS jsonb LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON 0;
$$;

CREATE OR REPLACE FUNCTION tasker_core.list_task_templates(namespace text DEFAULT NULL)
RETURNS TABLE(namespace text, name text, version text, description text, step_count integer)
LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON 0;
$$;

CREATE OR REPLACE FUNCTION tasker_core.event_catalog()
RETURNS TABLE(name text, event_group text, source text, description text)
LANGUAGE plproxy STRICT AS $$
    CLUSTER 'tasker_partitions';
    RUN ON 0;
$$;

CREATE OR REPLACE FUNCTION tasker_core.backoff_seconds(attempt integer, retry_after_seconds integer DEFAULT NULL,
                                                       jitter_seed bigint DEFAULT NULL)
RETURNS integer LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON 0;
$$;

-- ---------------------------------------------------------------------------------------------
-- Claims: partitions in turn

CREATE OR REPLACE FUNCTION tasker_core._claim_steps_on(part integer, worker_id text, namespaces text[],
                                                       max_steps integer, lease_seconds integer,
                                                       traceparent text)
RETURNS SETOF tasker_core._claimed
LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON part;
    SELECT c.task_id, c.workflow_step_id, c.step_name, c.namespace, c.task_name, c.handler_class,
           c.handler_config, c.inputs, c.parent_results, c.attempt, c.lease_expires_at
    FROM tasker_core.claim_steps(worker_id, namespaces, max_steps, lease_seconds, traceparent) c;
$$;

-- Asks the partitions one at a time, starting at the next partition of a rotation shared by
-- every session of the router, until it holds max_steps steps or every partition was asked.
-- Each partition's claim is its own transaction there (committed when it returns). The first
-- call gets the arguments as given, so bad input fails with the engine's own error before any
-- partition claimed anything. A partition that cannot be reached is skipped with a WARNING
-- (its tasks wait; the others go on); when none can be reached, the error is raised.
CREATE OR REPLACE FUNCTION tasker_core.claim_steps(worker_id text, namespaces text[] DEFAULT NULL,
                                                   max_steps integer DEFAULT 1,
                                                   lease_seconds integer DEFAULT 60,
                                                   traceparent text DEFAULT NULL)
RETURNS TABLE(task_id bigint, workflow_step_id bigint, step_name text, namespace text, task_name text,
              handler_class text, handler_config jsonb, inputs jsonb, parent_results jsonb,
              attempt integer, lease_expires_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    n integer := tasker_core._partitions();
    first integer := nextval('tasker_core._claim_rotation') % n;
    wanted integer := max_steps;
    got integer;
    answered integer := 0;
    state text;
    message text;
BEGIN
    FOR i IN 0 .. n - 1 LOOP
        BEGIN
            RETURN QUERY SELECT * FROM tasker_core._claim_steps_on((first + i) % n, worker_id, namespaces, wanted,
                                                                   lease_seconds, traceparent);
        EXCEPTION WHEN internal_error THEN
            GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT;
            IF NOT tasker_core._unreachable(state, message) OR (answered = 0 AND i = n - 1) THEN
                RAISE;
            END IF;
            RAISE WARNING 'claim_steps: partition % skipped: %', (first + i) % n, message;
            CONTINUE;
        END;
        answered := answered + 1;
        GET DIAGNOSTICS got = ROW_COUNT;
        wanted := wanted - got;
        EXIT WHEN wanted IS NULL OR wanted <= 0;
    END LOOP;
END $$;

-- ---------------------------------------------------------------------------------------------
-- Reports: outcomes split by owner, each partition's part recorded there in one transaction

CREATE OR REPLACE FUNCTION tasker_core._report_steps_on(part integer, worker_id text, outcomes jsonb)
RETURNS SETOF tasker_core._reported
LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON part;
    SELECT r.workflow_step_id, r.outcome, r.backoff_seconds FROM tasker_core.report_steps(worker_id, outcomes) r;
$$;

-- PL/Proxy splits the outcomes by the owner of each step and records every partition's part
-- there, all partitions in parallel.
CREATE OR REPLACE FUNCTION tasker_core._report_steps_split(worker_id text, outcomes jsonb[])
RETURNS SETOF tasker_core._reported
LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    SPLIT outcomes;
    RUN ON tasker_core._outcome_hash(outcomes);
    SELECT r.workflow_step_id, r.outcome, r.backoff_seconds
    FROM tasker_core.report_steps(worker_id, to_jsonb(outcomes)) r;
$$;

CREATE OR REPLACE FUNCTION tasker_core.report_steps(worker_id text, outcomes jsonb)
RETURNS TABLE(workflow_step_id bigint, outcome text, backoff_seconds integer)
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT tasker_core._splittable(outcomes) OR jsonb_array_length(outcomes) = 0 THEN
        -- nothing to split: partition 0's engine answers (an empty report, or its error)
        RETURN QUERY SELECT * FROM tasker_core._report_steps_on(0, worker_id, outcomes);
        RETURN;
    END IF;
    RETURN QUERY
        SELECT r.* FROM tasker_core._report_steps_split(
            worker_id, array(SELECT e FROM jsonb_array_elements(outcomes) e)) r
        ORDER BY r.workflow_step_id;
END $$;

CREATE OR REPLACE FUNCTION tasker_core._report_and_claim_on(part integer, worker_id text, outcomes jsonb,
                                                            namespaces text[], max_steps integer,
                                                            lease_seconds integer, traceparent text)
RETURNS SETOF tasker_core._report_claimed
LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON part;
    SELECT r.outcome, r.workflow_step_id, r.backoff_seconds, r.task_id, r.step_name, r.namespace,
           r.task_name, r.handler_class, r.handler_config, r.inputs, r.parent_results, r.attempt,
           r.lease_expires_at
    FROM tasker_core.report_and_claim(worker_id, outcomes, namespaces, max_steps, lease_seconds, traceparent) r;
$$;

-- report_steps then claim_steps, split by owner:
--  1. the outcomes of every partition but the lead are recorded first (report_steps there, all
--     in parallel, each partition's part in one transaction);
--  2. the lead — the partition that owns most of the outcomes, or the next of the claim
--     rotation when there are none — records its outcomes and claims up to max_steps in one
--     transaction, as the engine does: a step its outcomes made ready can be among the claimed;
--  3. when fewer than max_steps were claimed, the other partitions are asked in turn as
--     claim_steps does (one that cannot be reached is skipped).
-- Claims come last, so an error in 1 or 2 (a partition refusing its part, or unreachable)
-- fails the call before anything was claimed: no step is leased to a worker that was not told.
-- Rows: the report's, in step id order, then the claimed steps.
CREATE OR REPLACE FUNCTION tasker_core.report_and_claim(worker_id text, outcomes jsonb, namespaces text[] DEFAULT NULL,
                                                        max_steps integer DEFAULT 1,
                                                        lease_seconds integer DEFAULT 60,
                                                        traceparent text DEFAULT NULL)
RETURNS TABLE(outcome text, workflow_step_id bigint, backoff_seconds integer, task_id bigint, step_name text,
              namespace text, task_name text, handler_class text, handler_config jsonb, inputs jsonb,
              parent_results jsonb, attempt integer, lease_expires_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    n integer := tasker_core._partitions();
    first integer := nextval('tasker_core._claim_rotation') % n;
    lead integer;
    lead_outcomes jsonb;
    rest jsonb[];
    wanted integer;
    reported tasker_core._reported[] := '{}';
    claimed tasker_core._report_claimed[] := '{}';
    r tasker_core._report_claimed;
    c tasker_core._claimed;
    p integer;
    state text;
    message text;
BEGIN
    IF NOT tasker_core._splittable(outcomes) THEN
        -- nothing the router can split: partition 0's engine refuses it whole
        RETURN QUERY SELECT * FROM tasker_core._report_and_claim_on(0, worker_id, outcomes, namespaces, max_steps,
                                                                    lease_seconds, traceparent);
        RETURN;
    END IF;
    SELECT g.part, g.items INTO lead, lead_outcomes
    FROM (SELECT ((e ->> 'step_id')::bigint - 1) % n AS part, jsonb_agg(e ORDER BY o) AS items, count(*) AS c
          FROM jsonb_array_elements(outcomes) WITH ORDINALITY AS x(e, o)
          GROUP BY 1) g
    ORDER BY g.c DESC, (g.part - first + n) % n
    LIMIT 1;
    IF lead IS NULL THEN
        lead := first;
        lead_outcomes := '[]';
    END IF;

    -- 1. the other partitions' outcomes
    rest := array(SELECT e FROM jsonb_array_elements(outcomes) e
                  WHERE ((e ->> 'step_id')::bigint - 1) % n <> lead);
    IF cardinality(rest) > 0 THEN
        reported := array(SELECT s FROM tasker_core._report_steps_split(worker_id, rest) s);
    END IF;

    -- 2. the lead: its outcomes and a claim, in one transaction there
    FOR r IN SELECT * FROM tasker_core._report_and_claim_on(lead, worker_id, lead_outcomes, namespaces, max_steps,
                                                            lease_seconds, traceparent) LOOP
        IF r.outcome = 'claimed' THEN
            claimed := claimed || r;
        ELSE
            reported := reported || ROW(r.workflow_step_id, r.outcome, r.backoff_seconds)::tasker_core._reported;
        END IF;
    END LOOP;

    -- 3. the rest of the claim from the other partitions, in turn
    wanted := max_steps - cardinality(claimed);
    IF wanted > 0 THEN
        FOR i IN 0 .. n - 1 LOOP
            p := (first + i) % n;
            CONTINUE WHEN p = lead;   -- it had no more ready steps (or its claim would have waited)
            BEGIN
                FOR c IN SELECT * FROM tasker_core._claim_steps_on(p, worker_id, namespaces, wanted, lease_seconds,
                                                                   traceparent) LOOP
                    claimed := claimed || ROW('claimed', c.workflow_step_id, NULL, c.task_id, c.step_name,
                                              c.namespace, c.task_name, c.handler_class, c.handler_config,
                                              c.inputs, c.parent_results, c.attempt,
                                              c.lease_expires_at)::tasker_core._report_claimed;
                    wanted := wanted - 1;
                END LOOP;
            EXCEPTION WHEN internal_error THEN
                GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT;
                IF NOT tasker_core._unreachable(state, message) THEN
                    RAISE;
                END IF;
                RAISE WARNING 'report_and_claim: partition % skipped: %', p, message;
            END;
            EXIT WHEN wanted <= 0;
        END LOOP;
    END IF;

    RETURN QUERY SELECT s.outcome, s.workflow_step_id, s.backoff_seconds, NULL::bigint, NULL::text, NULL::text,
                        NULL::text, NULL::text, NULL::jsonb, NULL::jsonb, NULL::jsonb, NULL::integer,
                        NULL::timestamptz
                 FROM unnest(reported) s ORDER BY s.workflow_step_id;
    RETURN QUERY SELECT * FROM unnest(claimed);
END $$;

-- ---------------------------------------------------------------------------------------------
-- Events: one log per partition. events_after_on reads one partition's log with its own
-- 'xid/id' cursor; events_after, event_horizon, subscribe, poll, ack and unsubscribe read or
-- act on every partition at once (in parallel) with router cursors.

-- A partition number given by a caller: 0 .. N-1 (PL/Proxy would wrap anything else around).
CREATE OR REPLACE FUNCTION tasker_core._partition_hash(partition integer) RETURNS integer
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF partition IS NULL OR partition < 0 OR partition >= tasker_core._partitions() THEN
        RAISE EXCEPTION 'partition % does not exist: the router has % partitions (0 to %)',
            coalesce(partition::text, 'NULL'), tasker_core._partitions(), tasker_core._partitions() - 1
            USING ERRCODE = '22023';
    END IF;
    RETURN partition;
END $$;

CREATE OR REPLACE FUNCTION tasker_core.events_after_on(partition integer, after_cursor text DEFAULT NULL,
                                                       max_events integer DEFAULT 100)
RETURNS TABLE(cursor text, id bigint, name text, task_id bigint, step_id bigint, from_state text,
              to_state text, payload jsonb, created_at timestamptz)
LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON tasker_core._partition_hash(partition);
    SELECT e.cursor, e.id, e.name, e.task_id, e.step_id, e.from_state, e.to_state, e.payload, e.created_at
    FROM tasker_core.events_after(after_cursor, max_events) e;
$$;

CREATE OR REPLACE FUNCTION tasker_core._events_after_split(parts integer[], cursors text[], max_events integer)
RETURNS SETOF tasker_core._event
LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    SPLIT parts, cursors;
    RUN ON parts;
    SELECT (parts)[1] AS partition, e.cursor, e.id, e.name, e.task_id, e.step_id, e.from_state, e.to_state,
           e.payload, e.created_at
    FROM tasker_core.events_after((cursors)[1], max_events) e;
$$;

CREATE OR REPLACE FUNCTION tasker_core._poll_split(parts integer[], sub_name text, max_events integer)
RETURNS SETOF tasker_core._event
LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    SPLIT parts;
    RUN ON parts;
    SELECT (parts)[1] AS partition, e.cursor, e.id, e.name, e.task_id, e.step_id, e.from_state, e.to_state,
           e.payload, e.created_at
    FROM tasker_core.poll(sub_name, max_events) e;
$$;

CREATE OR REPLACE FUNCTION tasker_core._events_after_one(part integer, after_cursor text, max_events integer)
RETURNS SETOF tasker_core._event
LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON part;
    SELECT part AS partition, e.cursor, e.id, e.name, e.task_id, e.step_id, e.from_state, e.to_state,
           e.payload, e.created_at
    FROM tasker_core.events_after(after_cursor, max_events) e;
$$;

CREATE OR REPLACE FUNCTION tasker_core._poll_one(part integer, sub_name text, max_events integer)
RETURNS SETOF tasker_core._event
LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON part;
    SELECT part AS partition, e.cursor, e.id, e.name, e.task_id, e.step_id, e.from_state, e.to_state,
           e.payload, e.created_at
    FROM tasker_core.poll(sub_name, max_events) e;
$$;

-- The events of every partition after `positions` (events_after) or after the subscription's
-- acknowledged positions (poll): all partitions at once, in parallel. When a partition cannot
-- be reached, the partitions are asked one by one and that one is left out with a WARNING:
-- its position stays where it was, so its events come later, still exactly once.
CREATE OR REPLACE FUNCTION tasker_core._event_batch(from_poll boolean, sub_name text, positions text[],
                                                    max_events integer)
RETURNS tasker_core._event[]
LANGUAGE plpgsql AS $$
DECLARE
    n integer := tasker_core._partitions();
    batch tasker_core._event[] := '{}';
    answered integer := 0;
    state text;
    message text;
BEGIN
    BEGIN
        IF from_poll THEN
            RETURN array(SELECT e FROM tasker_core._poll_split(tasker_core._all_partitions(), sub_name, max_events) e);
        END IF;
        RETURN array(SELECT e FROM tasker_core._events_after_split(tasker_core._all_partitions(), positions,
                                                                   max_events) e);
    EXCEPTION WHEN internal_error THEN
        GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT;
        IF NOT tasker_core._unreachable(state, message) THEN
            RAISE;
        END IF;
    END;
    FOR k IN 0 .. n - 1 LOOP
        BEGIN
            IF from_poll THEN
                batch := batch || array(SELECT e FROM tasker_core._poll_one(k, sub_name, max_events) e);
            ELSE
                batch := batch || array(SELECT e FROM tasker_core._events_after_one(k, positions[k + 1], max_events) e);
            END IF;
            answered := answered + 1;
        EXCEPTION WHEN internal_error THEN
            GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT;
            IF NOT tasker_core._unreachable(state, message) OR (answered = 0 AND k = n - 1) THEN
                RAISE;
            END IF;
            RAISE WARNING '%: partition % skipped: %', CASE WHEN from_poll THEN 'poll' ELSE 'events_after' END,
                k, message;
        END;
    END LOOP;
    RETURN batch;
END $$;

-- Merges the partitions' batches into one of at most max_events rows: each partition's events
-- stay in its log order ((xid, id), as its engine returned them), and the partitions are
-- interleaved by time (the latest created_at seen so far in each partition's order). Each row's
-- cursor is the router cursor after it: `positions` (the caller's, one per partition) with the
-- positions of the rows up to and including this one.
CREATE OR REPLACE FUNCTION tasker_core._merge_events(batch tasker_core._event[], positions text[], max_events integer)
RETURNS TABLE(cursor text, id bigint, name text, task_id bigint, step_id bigint, from_state text,
              to_state text, payload jsonb, created_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    e record;
BEGIN
    FOR e IN
        SELECT b.*
        FROM (SELECT x.*,
                     max(x.created_at) OVER (PARTITION BY x.partition ORDER BY split_part(x.cursor, '/', 1)::numeric,
                                                                              split_part(x.cursor, '/', 2)::bigint) AS seen
              FROM unnest(batch) x) b
        ORDER BY b.seen, b.partition, split_part(b.cursor, '/', 1)::numeric, split_part(b.cursor, '/', 2)::bigint
        LIMIT max_events
    LOOP
        positions[e.partition + 1] := e.cursor;
        cursor := tasker_core._cursor_text(positions);
        id := e.id;
        name := e.name;
        task_id := e.task_id;
        step_id := e.step_id;
        from_state := e.from_state;
        to_state := e.to_state;
        payload := e.payload;
        created_at := e.created_at;
        RETURN NEXT;
    END LOOP;
END $$;

-- The events of every partition after a router cursor (NULL: from the beginning of every log).
-- Each partition gives at most max_events after its own position, with its own horizon (the
-- engine's rule: nothing can later appear before a position once it was returned), so every
-- event of every partition is returned exactly once to a reader that follows the cursors.
CREATE OR REPLACE FUNCTION tasker_core.events_after(after_cursor text DEFAULT NULL, max_events integer DEFAULT 100)
RETURNS TABLE(cursor text, id bigint, name text, task_id bigint, step_id bigint, from_state text,
              to_state text, payload jsonb, created_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    positions text[] := tasker_core._cursor_positions(after_cursor);
BEGIN
    RETURN QUERY SELECT * FROM tasker_core._merge_events(
        tasker_core._event_batch(false, NULL, positions, max_events), positions, max_events);
END $$;

CREATE OR REPLACE FUNCTION tasker_core._event_horizon_split(parts integer[])
RETURNS TABLE(partition integer, horizon text)
LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    SPLIT parts;
    RUN ON parts;
    SELECT (parts)[1] AS partition, tasker_core.event_horizon() AS horizon;
$$;

-- The router cursor of every partition's horizon.
CREATE OR REPLACE FUNCTION tasker_core.event_horizon()
RETURNS text LANGUAGE sql AS $$
    SELECT string_agg(h.partition || ':' || h.horizon, ',' ORDER BY h.partition)
    FROM tasker_core._event_horizon_split(tasker_core._all_partitions()) h
$$;

CREATE OR REPLACE FUNCTION tasker_core._subscribe_split(parts integer[], sub_name text, patterns text[])
RETURNS TABLE(partition integer, start_cursor text)
LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    SPLIT parts;
    RUN ON parts;
    SELECT (parts)[1] AS partition, tasker_core.subscribe(sub_name, patterns) AS start_cursor;
$$;

-- The subscription is made on every partition (each holds its own cursor for it); returns the
-- router cursor of its starting positions.
CREATE OR REPLACE FUNCTION tasker_core.subscribe(sub_name text, patterns text[] DEFAULT ARRAY['*'])
RETURNS text LANGUAGE sql AS $$
    SELECT string_agg(s.partition || ':' || s.start_cursor, ',' ORDER BY s.partition)
    FROM tasker_core._subscribe_split(tasker_core._all_partitions(), sub_name, patterns) s
$$;

-- The events after the subscription's acknowledged position on every partition (the same ones
-- again until they are acked: at-least-once). Each row's cursor names the partitions of the
-- rows up to it; ack it to move those partitions' positions.
CREATE OR REPLACE FUNCTION tasker_core.poll(sub_name text, max_events integer DEFAULT 100)
RETURNS TABLE(cursor text, id bigint, name text, task_id bigint, step_id bigint, from_state text,
              to_state text, payload jsonb, created_at timestamptz)
LANGUAGE sql AS $$
    SELECT * FROM tasker_core._merge_events(
        tasker_core._event_batch(true, sub_name, NULL, max_events),
        array_fill(NULL::text, ARRAY[tasker_core._partitions()]), max_events)
$$;

CREATE OR REPLACE FUNCTION tasker_core._ack_split(parts integer[], sub_name text, cursors text[])
RETURNS TABLE(partition integer, moved boolean)
LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    SPLIT parts, cursors;
    RUN ON parts;
    SELECT (parts)[1] AS partition, tasker_core.ack(sub_name, (cursors)[1]) AS moved;
$$;

-- Moves the subscription forward on each partition the router cursor names (each partition
-- in its own transaction); true when it moved on any of them. A cursor naming no partition
-- goes to partition 0 as it is, whose engine answers (a NULL cursor is its 22004).
CREATE OR REPLACE FUNCTION tasker_core.ack(sub_name text, acked_cursor text)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    positions text[] := tasker_core._cursor_positions(acked_cursor);
    parts integer[];
    cursors text[];
    result boolean;
BEGIN
    SELECT array_agg(p.k - 1 ORDER BY p.k), array_agg(p.pos ORDER BY p.k) INTO parts, cursors
    FROM unnest(positions) WITH ORDINALITY AS p(pos, k) WHERE p.pos IS NOT NULL;
    IF parts IS NULL THEN
        parts := ARRAY[0];
        cursors := ARRAY[acked_cursor];
    END IF;
    SELECT bool_or(a.moved) INTO result FROM tasker_core._ack_split(parts, sub_name, cursors) a;
    RETURN result;
END $$;

CREATE OR REPLACE FUNCTION tasker_core._unsubscribe_split(parts integer[], sub_name text)
RETURNS TABLE(partition integer, removed boolean)
LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    SPLIT parts;
    RUN ON parts;
    SELECT (parts)[1] AS partition, tasker_core.unsubscribe(sub_name) AS removed;
$$;

CREATE OR REPLACE FUNCTION tasker_core.unsubscribe(sub_name text)
RETURNS boolean LANGUAGE sql AS $$
    SELECT bool_or(u.removed) FROM tasker_core._unsubscribe_split(tasker_core._all_partitions(), sub_name) u
$$;

CREATE OR REPLACE FUNCTION tasker_core._prune_events_all(older_than interval)
RETURNS SETOF bigint LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON ALL;
    TARGET tasker_core.prune_events;
$$;

-- Every partition prunes its own log; the total.
CREATE OR REPLACE FUNCTION tasker_core.prune_events(older_than interval)
RETURNS bigint LANGUAGE sql AS $$
    SELECT sum(p)::bigint FROM tasker_core._prune_events_all(older_than) p
$$;

-- ---------------------------------------------------------------------------------------------
-- Timers: tick() on every partition (each partition's own timer does this when tasker_core is
-- preloaded there, as scripts/shards.sh does); the total.

CREATE OR REPLACE FUNCTION tasker_core._tick_all()
RETURNS SETOF integer LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    RUN ON ALL;
    TARGET tasker_core.tick;
$$;

CREATE OR REPLACE FUNCTION tasker_core.tick()
RETURNS integer LANGUAGE sql AS $$
    SELECT sum(t)::integer FROM tasker_core._tick_all() t
$$;

-- ---------------------------------------------------------------------------------------------
-- The set-up check: each partition, reached through the router at its number, must stripe its
-- ids for that number.

CREATE OR REPLACE FUNCTION tasker_core._shard_facts(parts integer[])
RETURNS TABLE(partition integer, version text, task_increment bigint, task_start bigint,
              step_increment bigint, step_start bigint)
LANGUAGE plproxy AS $$
    CLUSTER 'tasker_partitions';
    SPLIT parts;
    RUN ON parts;
    SELECT (parts)[1] AS partition,
           (SELECT x.extversion FROM pg_catalog.pg_extension x WHERE x.extname = 'tasker_core')::text AS version,
           t.increment_by AS task_increment, t.start_value AS task_start,
           s.increment_by AS step_increment, s.start_value AS step_start
    FROM pg_catalog.pg_sequences t, pg_catalog.pg_sequences s
    WHERE format('%I.%I', t.schemaname, t.sequencename)::regclass
              = pg_catalog.pg_get_serial_sequence(format('%I.tasker_tasks', tasker_core.data_schema()), 'task_id')::regclass
      AND format('%I.%I', s.schemaname, s.sequencename)::regclass
              = pg_catalog.pg_get_serial_sequence(format('%I.tasker_workflow_steps', tasker_core.data_schema()),
                                                  'workflow_step_id')::regclass;
$$;

-- One row per partition: its tasker_core version, its id stripes, and what is wrong (NULL when
-- nothing is).
CREATE OR REPLACE FUNCTION tasker_core.shard_check()
RETURNS TABLE(partition integer, version text, task_ids text, step_ids text, problem text)
LANGUAGE sql AS $$
    WITH n AS (SELECT tasker_core._partitions() AS n),
         f AS (SELECT * FROM tasker_core._shard_facts(tasker_core._all_partitions()))
    SELECT g.k, f.version,
           f.task_start || ' + ' || f.task_increment || 'i', f.step_start || ' + ' || f.step_increment || 'i',
           CASE
               WHEN f.partition IS NULL THEN 'no answer'
               WHEN f.task_increment <> n.n OR f.task_start <> g.k + 1 OR f.step_increment <> n.n
                    OR f.step_start <> g.k + 1
                   THEN format('ids are not striped for partition %s of %s (want %s + %si)', g.k, n.n, g.k + 1, n.n)
               WHEN f.version IS DISTINCT FROM (SELECT f0.version FROM f f0 WHERE f0.partition = 0)
                   THEN 'tasker_core version differs from partition 0'
           END
    FROM n, generate_series(0, n.n - 1) g(k) LEFT JOIN f ON f.partition = g.k
    ORDER BY g.k
$$;
