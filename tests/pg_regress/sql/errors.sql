-- The error table of the README: each kind of bad call fails with its own SQLSTATE (printed
-- after each failure) and a message that names the values. Nothing here changes any row.
\set VERBOSITY terse
\set SHOW_CONTEXT never
SELECT count(*) AS tasks_before FROM tasker_tasks;

-- 22004: a NULL where a value is required
SELECT * FROM tasker_core.claim_steps(NULL);
\echo :LAST_ERROR_SQLSTATE
SELECT tasker_core.create_task(NULL, 'x', NULL, '{}');
\echo :LAST_ERROR_SQLSTATE
-- 22023: values out of range, malformed arguments
SELECT * FROM tasker_core.claim_steps('w', NULL, 0);
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM tasker_core.claim_steps('', NULL, 1);
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM tasker_core.report_steps('w', '[{"step_id": 1}, {"step_id": 1}]');
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM tasker_core.report_and_claim('w', '[]', NULL, 1001);
\echo :LAST_ERROR_SQLSTATE
SELECT tasker_core.transition_step(1, 'complete', '[1]');
\echo :LAST_ERROR_SQLSTATE
-- TK001: a state that is not one of the six
SELECT tasker_core.transition_step(1, 'finished');
\echo :LAST_ERROR_SQLSTATE
-- TK004: unknown tasks and steps
SELECT tasker_core.cancel_task(999999);
\echo :LAST_ERROR_SQLSTATE
SELECT * FROM tasker_core.task_steps(999999);
\echo :LAST_ERROR_SQLSTATE
SELECT tasker_core.transition_step(999999, 'complete');
\echo :LAST_ERROR_SQLSTATE
-- TK007: no such template
SELECT tasker_core.create_task('nowhere', 'nothing', NULL, '{}');
\echo :LAST_ERROR_SQLSTATE
-- TK026: JSON nested deeper than 100 levels
SELECT tasker_core.create_task('nowhere', 'nothing', NULL,
       (repeat('{"a":', 101) || '1' || repeat('}', 101))::jsonb);
\echo :LAST_ERROR_SQLSTATE
-- TK030: completing a step nobody holds
SELECT tasker_core.complete_step(999999, 'w');
\echo :LAST_ERROR_SQLSTATE
-- 54000: past a limit
SELECT * FROM tasker_core.report_steps('w',
       (SELECT jsonb_agg(jsonb_build_object('step_id', i)) FROM generate_series(1, 1001) i));
\echo :LAST_ERROR_SQLSTATE

SELECT count(*) AS tasks_after FROM tasker_tasks;
