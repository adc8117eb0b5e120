-- Switch a Rails Tasker database over to tasker_core (reversible: see the .down.sql file).
-- Needs the extension (CREATE EXTENSION requires a superuser once); the rest runs as the
-- owner of the Tasker tables and functions.
--
-- What it does, in one transaction:
--  * saves the current definitions of the nine Rails functions and of the
--    tasker_step_dag_relationships view in tasker_core.switchover;
--  * installs the maintained readiness state: triggers on tasker_workflow_steps,
--    tasker_named_steps, tasker_workflow_step_edges and tasker_workflow_step_transitions, and a
--    backfill of tasker_core.step_state for every step already there;
--  * replaces the nine functions with wrappers of the Rust-backed tasker_core functions (same
--    names, arguments and result columns) and the view with one over
--    tasker_core.step_dag_relationships.
BEGIN;
CREATE EXTENSION IF NOT EXISTS tasker_core;
SELECT tasker_core.switch_over();
COMMIT;
