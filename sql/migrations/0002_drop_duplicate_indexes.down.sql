-- Recreates the indexes 0002_drop_duplicate_indexes.up.sql dropped, as the Rails engine
-- defines them.
BEGIN;
-- tasker_workflow_steps
CREATE INDEX IF NOT EXISTS index_workflow_steps_task_and_id ON tasker_workflow_steps USING btree (task_id, workflow_step_id);
CREATE INDEX IF NOT EXISTS index_workflow_steps_task_and_step_id ON tasker_workflow_steps USING btree (task_id, workflow_step_id);
CREATE INDEX IF NOT EXISTS index_workflow_steps_by_task ON tasker_workflow_steps USING btree (task_id);
CREATE INDEX IF NOT EXISTS workflow_steps_task_id_index ON tasker_workflow_steps USING btree (task_id);
-- tasker_workflow_step_edges
CREATE INDEX IF NOT EXISTS index_step_edges_from_to_composite ON tasker_workflow_step_edges USING btree (from_step_id, to_step_id);
CREATE INDEX IF NOT EXISTS idx_workflow_step_edges_dependency_lookup ON tasker_workflow_step_edges USING btree (to_step_id, from_step_id);
CREATE INDEX IF NOT EXISTS index_step_edges_dependency_pair ON tasker_workflow_step_edges USING btree (to_step_id, from_step_id);
CREATE INDEX IF NOT EXISTS index_step_edges_to_from_composite ON tasker_workflow_step_edges USING btree (to_step_id, from_step_id);
CREATE INDEX IF NOT EXISTS index_workflow_step_edges_dependency_lookup ON tasker_workflow_step_edges USING btree (to_step_id, from_step_id);
CREATE INDEX IF NOT EXISTS index_step_edges_from_step_for_children ON tasker_workflow_step_edges USING btree (from_step_id);
CREATE INDEX IF NOT EXISTS index_step_edges_parent_lookup ON tasker_workflow_step_edges USING btree (from_step_id);
CREATE INDEX IF NOT EXISTS index_tasker_workflow_step_edges_on_from_step_id ON tasker_workflow_step_edges USING btree (from_step_id);
CREATE INDEX IF NOT EXISTS index_step_edges_child_lookup ON tasker_workflow_step_edges USING btree (to_step_id);
CREATE INDEX IF NOT EXISTS index_step_edges_to_step_for_parents ON tasker_workflow_step_edges USING btree (to_step_id);
CREATE INDEX IF NOT EXISTS index_tasker_workflow_step_edges_on_to_step_id ON tasker_workflow_step_edges USING btree (to_step_id);
-- tasker_workflow_step_transitions
CREATE INDEX IF NOT EXISTS idx_step_transitions_most_recent ON tasker_workflow_step_transitions USING btree (workflow_step_id, most_recent) WHERE (most_recent = true);
CREATE INDEX IF NOT EXISTS index_step_transitions_current_state_optimized ON tasker_workflow_step_transitions USING btree (workflow_step_id, most_recent) WHERE (most_recent = true);
CREATE INDEX IF NOT EXISTS index_tasker_workflow_step_transitions_on_workflow_step_id ON tasker_workflow_step_transitions USING btree (workflow_step_id);
-- tasker_task_transitions
CREATE INDEX IF NOT EXISTS idx_task_transitions_most_recent ON tasker_task_transitions USING btree (task_id, most_recent) WHERE (most_recent = true);
CREATE INDEX IF NOT EXISTS index_task_transitions_current_state_optimized ON tasker_task_transitions USING btree (task_id, most_recent) WHERE (most_recent = true);
CREATE INDEX IF NOT EXISTS index_tasker_task_transitions_on_task_id ON tasker_task_transitions USING btree (task_id);
-- tasker_tasks
CREATE INDEX IF NOT EXISTS tasks_identity_hash_index ON tasker_tasks USING btree (identity_hash);
-- tasker_task_namespaces
CREATE INDEX IF NOT EXISTS task_namespaces_name_index ON tasker_task_namespaces USING btree (name);
-- tasker_dependent_systems
CREATE INDEX IF NOT EXISTS dependent_systems_name_index ON tasker_dependent_systems USING btree (name);
-- tasker_annotation_types
CREATE INDEX IF NOT EXISTS annotation_types_name_index ON tasker_annotation_types USING btree (name);
-- tasker_named_tasks
CREATE INDEX IF NOT EXISTS named_tasks_task_namespace_id_index ON tasker_named_tasks USING btree (task_namespace_id);
-- tasker_named_tasks_named_steps
CREATE INDEX IF NOT EXISTS named_tasks_named_steps_named_task_id_index ON tasker_named_tasks_named_steps USING btree (named_task_id);
-- tasker_dependent_system_object_maps
CREATE INDEX IF NOT EXISTS dependent_system_object_maps_dependent_system_one_id_index ON tasker_dependent_system_object_maps USING btree (dependent_system_one_id);
-- tasker_named_steps
CREATE INDEX IF NOT EXISTS named_steps_dependent_system_id_index ON tasker_named_steps USING btree (dependent_system_id);
COMMIT;
