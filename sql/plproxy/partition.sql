-- One partition of a sharded tasker_core (docs/scaling.md, "Sharding by task with PL/Proxy").
-- Not part of the extension: scripts/shards.sh runs it on each partition's database with
--
--   psql -v partition=K -v partitions=N -f sql/plproxy/partition.sql
--
-- A partition is an ordinary tasker_core database. The one thing that makes it a partition is
-- its ids: task ids and step ids come from sequences that start at K + 1 and step by N, so
-- (id - 1) % N is the partition that owns the task or step, and the router routes a call that
-- names only a step id. Idempotent: a partition already striped this way is left as it is.
\set ON_ERROR_STOP 1
SET client_min_messages = warning;

CREATE EXTENSION IF NOT EXISTS tasker_core;
SELECT tasker_core.install_schema();
SELECT tasker_core.enable_tracking();

SELECT set_config('tasker_shard.partition', :'partition', false),
       set_config('tasker_shard.partitions', :'partitions', false);

DO $$
DECLARE
    k bigint := current_setting('tasker_shard.partition')::bigint;
    n bigint := current_setting('tasker_shard.partitions')::bigint;
    ds name := tasker_core.data_schema();
    tbl text;
    col text;
    seq regclass;
    inc bigint;
    first bigint;
    last bigint;
    stray bigint;
    top bigint;
    restart bigint;
BEGIN
    IF n < 1 OR n & (n - 1) <> 0 OR k < 0 OR k >= n THEN
        RAISE EXCEPTION 'partition % of %: the count must be a power of two and the partition 0..count-1', k, n
            USING ERRCODE = '22023';
    END IF;
    FOR tbl, col IN VALUES ('tasker_tasks', 'task_id'), ('tasker_workflow_steps', 'workflow_step_id') LOOP
        seq := pg_get_serial_sequence(format('%I.%I', ds, tbl), col)::regclass;
        SELECT s.increment_by, s.start_value, s.last_value INTO inc, first, last
        FROM pg_sequences s
        WHERE format('%I.%I', s.schemaname, s.sequencename)::regclass = seq;
        IF inc = n AND first = k + 1 THEN
            CONTINUE;   -- already striped for this partition
        END IF;
        -- ids made before the stripe must already be this partition's, or routing would miss them
        EXECUTE format('SELECT min(%1$I) FROM %2$I.%3$I WHERE (%1$I - 1) %% $1 <> $2', col, ds, tbl)
            INTO stray USING n, k;
        IF stray IS NOT NULL THEN
            RAISE EXCEPTION '%.% holds id % that is not partition %''s (ids of partition % of % are % + 1, % + 1 + %, ...)',
                ds, tbl, stray, k, k, n, k, k, n
                USING ERRCODE = '55000',
                      HINT = 'set up partitions on empty databases, or move their rows first';
        END IF;
        EXECUTE format('SELECT max(%I) FROM %I.%I', col, ds, tbl) INTO top;
        top := greatest(coalesce(top, 0), coalesce(last, 0));
        -- the first value above everything used whose (value - 1) % n is k
        restart := top + 1 + (((k - top) % n) + n) % n;
        EXECUTE format('ALTER SEQUENCE %s INCREMENT BY %s MINVALUE 1 START WITH %s RESTART WITH %s',
                       seq, n, k + 1, restart);
    END LOOP;
END $$;

RESET tasker_shard.partition;
RESET tasker_shard.partitions;
