-- Drops the indexes of the Rails engine's schema that another index already covers: exact
-- duplicates (same table, columns and predicate) and single-column indexes that lead a kept
-- index. Every query keeps an index it can use; every write of a step, an edge or a transition
-- updates fewer of them. Optional and reversible (the .down.sql file recreates them); the
-- gain is in the README ("Index profiles"). Runs against the search_path's Tasker tables.
--
-- DROP INDEX takes an exclusive lock on its table for a moment: run it when the tables are
-- quiet, or drop the indexes one by one with DROP INDEX CONCURRENTLY outside a transaction.
BEGIN;
-- tasker_workflow_steps
DROP INDEX IF EXISTS index_workflow_steps_task_and_id;
DROP INDEX IF EXISTS index_workflow_steps_task_and_step_id;
DROP INDEX IF EXISTS index_workflow_steps_by_task;
DROP INDEX IF EXISTS workflow_steps_task_id_index;
-- tasker_workflow_step_edges
DROP INDEX IF EXISTS index_step_edges_from_to_composite;
DROP INDEX IF EXISTS idx_workflow_step_edges_dependency_lookup;
DROP INDEX IF EXISTS index_step_edges_dependency_pair;
DROP INDEX IF EXISTS index_step_edges_to_from_composite;
DROP INDEX IF EXISTS index_workflow_step_edges_dependency_lookup;
DROP INDEX IF EXISTS index_step_edges_from_step_for_children;
DROP INDEX IF EXISTS index_step_edges_parent_lookup;
DROP INDEX IF EXISTS index_tasker_workflow_step_edges_on_from_step_id;
DROP INDEX IF EXISTS index_step_edges_child_lookup;
DROP INDEX IF EXISTS index_step_edges_to_step_for_parents;
DROP INDEX IF EXISTS index_tasker_workflow_step_edges_on_to_step_id;
-- tasker_workflow_step_transitions
DROP INDEX IF EXISTS idx_step_transitions_most_recent;
DROP INDEX IF EXISTS index_step_transitions_current_state_optimized;
DROP INDEX IF EXISTS index_tasker_workflow_step_transitions_on_workflow_step_id;
-- tasker_task_transitions
DROP INDEX IF EXISTS idx_task_transitions_most_recent;
DROP INDEX IF EXISTS index_task_transitions_current_state_optimized;
DROP INDEX IF EXISTS index_tasker_task_transitions_on_task_id;
-- tasker_tasks
DROP INDEX IF EXISTS tasks_identity_hash_index;
-- tasker_task_namespaces
DROP INDEX IF EXISTS task_namespaces_name_index;
-- tasker_dependent_systems
DROP INDEX IF EXISTS dependent_systems_name_index;
-- tasker_annotation_types
DROP INDEX IF EXISTS annotation_types_name_index;
-- tasker_named_tasks
DROP INDEX IF EXISTS named_tasks_task_namespace_id_index;
-- tasker_named_tasks_named_steps
DROP INDEX IF EXISTS named_tasks_named_steps_named_task_id_index;
-- tasker_dependent_system_object_maps
DROP INDEX IF EXISTS dependent_system_object_maps_dependent_system_one_id_index;
-- tasker_named_steps
DROP INDEX IF EXISTS named_steps_dependent_system_id_index;
COMMIT;
