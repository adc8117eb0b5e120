-- A worker written only in SQL: a procedure that claims steps, runs their "handlers" (here,
-- a CASE on handler_class) and completes or fails them, committing after each step, until
-- no task of its namespace is left unfinished. Started by scripts/demo.sh in two psql
-- sessions at once.
CREATE SCHEMA IF NOT EXISTS demo;

CREATE OR REPLACE PROCEDURE demo.run_worker(worker text, namespace text DEFAULT 'shop')
LANGUAGE plpgsql AS $$
DECLARE
    claimed jsonb;
    s jsonb;
    idle integer := 0;
BEGIN
    LOOP
        SELECT COALESCE(jsonb_agg(to_jsonb(c)), '[]') INTO claimed
          FROM tasker_core.claim_steps(worker, ARRAY[namespace], 2, 30) c;
        COMMIT;                                   -- the claims (and their leases) are visible now
        IF jsonb_array_length(claimed) = 0 THEN
            EXIT WHEN NOT EXISTS (SELECT 1 FROM tasker_tasks WHERE NOT complete);
            idle := idle + 1;
            EXIT WHEN idle > 150;                 -- 30 s without work: give up
            PERFORM pg_sleep(0.2);
            CONTINUE;
        END IF;
        idle := 0;
        FOR s IN SELECT * FROM jsonb_array_elements(claimed) LOOP
            PERFORM pg_sleep(0.05 + random() * 0.1);   -- the "work"
            IF (s -> 'handler_config' ->> 'fail_first_attempt')::boolean AND (s ->> 'attempt')::int = 1 THEN
                PERFORM tasker_core.fail_step((s ->> 'workflow_step_id')::bigint, worker,
                        jsonb_build_object('message', 'payment gateway timed out', 'worker', worker),
                        true, 1);                 -- retryable, the gateway asked for 1 s
            ELSE
                PERFORM tasker_core.complete_step((s ->> 'workflow_step_id')::bigint, worker,
                        jsonb_build_object('handled_by', worker, 'handler', s ->> 'handler_class',
                                           'order_id', s -> 'inputs' -> 'order_id',
                                           -- a map step's instance (pack_item) gets its element
                                           'element', s -> 'inputs' -> 'element',
                                           'from_parents', s -> 'parent_results'));
            END IF;
            COMMIT;
        END LOOP;
    END LOOP;
END;
$$;
