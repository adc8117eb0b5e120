-- get_step_readiness_status and get_task_execution_context rows, as the Rails functions give
-- them, at three moments of one task: created, its root complete, one branch failed.
\set VERBOSITY terse
\set SHOW_CONTEXT never
SELECT tasker_core.register_task_template('{
  "name": "fan", "namespace_name": "regress_readiness", "version": "1.0.0",
  "step_templates": [{"name": "root", "handler_class": "R"},
                     {"name": "left", "handler_class": "L", "depends_on_step": "root"},
                     {"name": "right", "handler_class": "R", "depends_on_step": "root",
                      "default_retry_limit": 1},
                     {"name": "join", "handler_class": "J", "depends_on_steps": ["left", "right"]}]}') > 0 AS registered;
SELECT tasker_core.create_task('regress_readiness', 'fan', NULL, '{}') AS task \gset

SELECT name, current_state, dependencies_satisfied, retry_eligible, ready_for_execution,
       total_parents, completed_parents, attempts, retry_limit
FROM tasker_core.get_step_readiness_status(:task) ORDER BY name;

SELECT workflow_step_id AS root FROM tasker_core.claim_steps('regress', ARRAY['regress_readiness'], 1, 60) \gset
SELECT tasker_core.complete_step(:root, 'regress', '{"ok": true}');
SELECT name, current_state, dependencies_satisfied, ready_for_execution, completed_parents
FROM tasker_core.get_step_readiness_status(:task) ORDER BY name;

SELECT workflow_step_id AS right_step FROM tasker_core.task_steps(:task) WHERE name = 'right' \gset
SELECT count(*) AS claimed FROM tasker_core.claim_steps('regress', ARRAY['regress_readiness'], 2, 60);
SELECT tasker_core.fail_step(:right_step, 'regress', '{"message": "no stock"}', false) AS backoff;
SELECT name, current_state, retry_eligible, ready_for_execution, attempts
FROM tasker_core.get_step_readiness_status(:task) ORDER BY name;

SELECT status, total_steps, pending_steps, in_progress_steps, completed_steps, failed_steps,
       ready_steps, execution_status, recommended_action, completion_percentage, health_status
FROM tasker_core.get_task_execution_context(:task);
SELECT * FROM tasker_core.check_tracking();
