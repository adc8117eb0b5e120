-- The psql worker of the end-to-end test: a procedure run by `psql -c "CALL e2e.psql_worker()"`,
-- committing after each claim and each step, until e2e.control says stop. Handlers as in
-- worker.py, written as a CASE on handler_class.
CREATE SCHEMA IF NOT EXISTS e2e;
CREATE TABLE IF NOT EXISTS e2e.control (stop boolean NOT NULL DEFAULT false);
INSERT INTO e2e.control SELECT WHERE NOT EXISTS (SELECT 1 FROM e2e.control);

CREATE OR REPLACE PROCEDURE e2e.psql_worker(me text DEFAULT 'psql')
LANGUAGE plpgsql AS $$
DECLARE
    claimed jsonb;
    s jsonb;
    step bigint;
    done jsonb;
BEGIN
    LOOP
        EXIT WHEN (SELECT stop FROM e2e.control);
        SELECT COALESCE(jsonb_agg(to_jsonb(c)), '[]') INTO claimed
          FROM tasker_core.claim_steps(me, ARRAY['e2e'], 2, 3) c;
        COMMIT;
        IF jsonb_array_length(claimed) = 0 THEN
            PERFORM pg_sleep(0.2);
            CONTINUE;
        END IF;
        FOR s IN SELECT * FROM jsonb_array_elements(claimed) LOOP
            step := (s ->> 'workflow_step_id')::bigint;
            PERFORM pg_sleep(0.01 + random() * 0.03);
            done := jsonb_build_object('by', me, 'step', s ->> 'step_name', 'n', s -> 'inputs' -> 'n',
                                       'tp', tasker_core.task_traceparent((s ->> 'task_id')::bigint));
            BEGIN
            IF s ->> 'handler_class' = 'E2E::Flaky' AND (s ->> 'attempt')::int = 1 THEN
                PERFORM tasker_core.fail_step(step, me, '{"message": "flaky on its first attempt"}', true, 1);
            ELSIF s ->> 'handler_class' = 'E2E::Fatal' AND (s -> 'inputs' ->> 'doomed')::boolean THEN
                PERFORM tasker_core.fail_step(step, me, '{"message": "this task is doomed"}', false);
            ELSIF s ->> 'handler_class' = 'E2E::Join' THEN
                PERFORM tasker_core.complete_step(step, me, done || jsonb_build_object('parents',
                        (SELECT jsonb_agg(k ORDER BY k) FROM jsonb_object_keys(s -> 'parent_results') k)));
            ELSE
                PERFORM tasker_core.complete_step(step, me, done);
            END IF;
            EXCEPTION WHEN SQLSTATE 'TK030' THEN
                RAISE WARNING 'lost the lease of step %', step;   -- another worker has it now
            END;
            COMMIT;
        END LOOP;
    END LOOP;
END;
$$;
