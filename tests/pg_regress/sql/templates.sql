-- Template registration: a good template, then each kind of defect with its SQLSTATE.
\set VERBOSITY terse
\set SHOW_CONTEXT never
SELECT tasker_core.register_task_template('{
  "name": "ship", "namespace_name": "regress_templates", "version": "1.0.0",
  "step_templates": [
    {"name": "validate", "handler_class": "Validate"},
    {"name": "charge", "handler_class": "Charge", "depends_on_step": "validate"},
    {"name": "pack", "handler_class": "Pack", "depends_on_step": "validate"},
    {"name": "ship", "handler_class": "Ship", "depends_on_steps": ["charge", "pack"]}]}') > 0 AS registered;
SELECT namespace, name, version, step_count FROM tasker_core.list_task_templates('regress_templates');

-- TK022: a dependency on a step that does not exist
SELECT tasker_core.register_task_template('{"name": "t", "namespace_name": "regress_templates", "version": "1.0.0",
  "step_templates": [{"name": "a", "handler_class": "A", "depends_on_step": "missing"}]}');
\echo :LAST_ERROR_SQLSTATE
-- TK021: two steps of one name
SELECT tasker_core.register_task_template('{"name": "t", "namespace_name": "regress_templates", "version": "1.0.0",
  "step_templates": [{"name": "a", "handler_class": "A"}, {"name": "a", "handler_class": "A"}]}');
\echo :LAST_ERROR_SQLSTATE
-- TK006: a cycle, named step by step
SELECT tasker_core.register_task_template('{"name": "t", "namespace_name": "regress_templates", "version": "1.0.0",
  "step_templates": [{"name": "a", "handler_class": "A", "depends_on_step": "b"},
                     {"name": "b", "handler_class": "B", "depends_on_step": "a"}]}');
\echo :LAST_ERROR_SQLSTATE
-- TK023: a malformed version
SELECT tasker_core.register_task_template('{"name": "t", "namespace_name": "regress_templates", "version": "01.0.0",
  "step_templates": [{"name": "a", "handler_class": "A"}]}');
\echo :LAST_ERROR_SQLSTATE
-- TK024: a step without a handler class
SELECT tasker_core.register_task_template('{"name": "t", "namespace_name": "regress_templates", "version": "1.0.0",
  "step_templates": [{"name": "a"}]}');
\echo :LAST_ERROR_SQLSTATE
-- TK020: anything else malformed
SELECT tasker_core.register_task_template('{"name": "t", "namespace_name": "regress_templates"}');
\echo :LAST_ERROR_SQLSTATE

-- nothing of the refused templates was written
SELECT namespace, name FROM tasker_core.list_task_templates('regress_templates') ORDER BY 1, 2;
