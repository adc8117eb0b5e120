-- The step and task state machines through transition_step / transition_task: the allowed
-- edges, the guards, compare-and-swap, and each refusal with its SQLSTATE.
\set VERBOSITY terse
\set SHOW_CONTEXT never
SELECT tasker_core.register_task_template('{
  "name": "pair", "namespace_name": "regress_states", "version": "1.0.0",
  "step_templates": [{"name": "first", "handler_class": "F"},
                     {"name": "second", "handler_class": "S", "depends_on_step": "first"}]}') > 0 AS registered;
SELECT tasker_core.create_task('regress_states', 'pair', NULL, '{}') AS task \gset
SELECT workflow_step_id AS first FROM tasker_core.task_steps(:task) WHERE name = 'first' \gset
SELECT workflow_step_id AS second FROM tasker_core.task_steps(:task) WHERE name = 'second' \gset

-- TK003: the second step's parent is not complete
SELECT tasker_core.transition_step(:second, 'in_progress');
\echo :LAST_ERROR_SQLSTATE
-- TK005: compare-and-swap against the wrong state
SELECT tasker_core.transition_step(:first, 'in_progress', '{}', 'error');
\echo :LAST_ERROR_SQLSTATE
SELECT tasker_core.transition_step(:first, 'in_progress', '{}', 'pending') AS moved;
SELECT tasker_core.transition_step(:first, 'in_progress') AS moved_again;   -- already there
SELECT tasker_core.transition_step(:first, 'complete') AS completed;
-- TK002: no edge from complete back to pending
SELECT tasker_core.transition_step(:first, 'pending');
\echo :LAST_ERROR_SQLSTATE
SELECT tasker_core.transition_step(:second, 'in_progress') AS second_started;
SELECT tasker_core.transition_step(:second, 'error', '{"reason": "boom"}') AS second_failed;
SELECT tasker_core.transition_step(:second, 'pending') AS second_retried;

-- the audit trail: every transition of the task's steps, in order
SELECT s.name, t.from_state, t.to_state, t.most_recent
FROM tasker_workflow_step_transitions t
JOIN tasker_workflow_steps ws ON ws.workflow_step_id = t.workflow_step_id
JOIN tasker_named_steps s ON s.named_step_id = ws.named_step_id
WHERE ws.task_id = :task
ORDER BY t.id;
-- and the events they wrote
SELECT name, from_state, to_state FROM tasker_core.events WHERE task_id = :task ORDER BY id;
