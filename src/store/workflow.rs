//! Reading one task's steps and edges.

use crate::core::error::TaskerError;
use crate::core::ident::SchemaName;
use pgrx::prelude::*;

/// One step of a task, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRow {
    pub workflow_step_id: i64,
    pub name: String,
    pub current_state: String,
}

/// The steps (ordered by id) and the edges between them of one task.
#[derive(Debug, Clone, Default)]
pub struct TaskGraph {
    pub steps: Vec<StepRow>,
    pub edges: Vec<(i64, i64)>,
}

/// Loads the steps and edges of `task_id` from `schema`; `NotFound` when the task does not exist.
pub fn load_task_graph(schema: &SchemaName, task_id: i64) -> Result<TaskGraph, TaskerError> {
    let s = schema.quoted();
    Spi::connect(|client| {
        super::schema::require_installed(client, schema)?;
        let spi =
            |e: pgrx::spi::Error| -> TaskerError { pgrx::error!("reading task {task_id}: {e}") };
        let exists = client
            .select(
                &format!("SELECT 1 FROM {s}.tasker_tasks WHERE task_id = $1"),
                Some(1),
                &[task_id.into()],
            )
            .map_err(spi)?
            .len()
            == 1;
        if !exists {
            return Err(TaskerError::NotFound { entity: "task", id: task_id });
        }
        let mut graph = TaskGraph::default();
        let steps = client
            .select(
                &format!(
                    "SELECT ws.workflow_step_id, ns.name::text, COALESCE(tr.to_state, 'pending')::text \
                     FROM {s}.tasker_workflow_steps ws \
                     JOIN {s}.tasker_named_steps ns ON ns.named_step_id = ws.named_step_id \
                     LEFT JOIN {s}.tasker_workflow_step_transitions tr \
                       ON tr.workflow_step_id = ws.workflow_step_id AND tr.most_recent \
                     WHERE ws.task_id = $1 ORDER BY ws.workflow_step_id"
                ),
                None,
                &[task_id.into()],
            )
            .map_err(spi)?;
        for row in steps {
            graph.steps.push(StepRow {
                workflow_step_id: row.get::<i64>(1).map_err(spi)?.unwrap_or_default(),
                name: row.get::<String>(2).map_err(spi)?.unwrap_or_default(),
                current_state: row.get::<String>(3).map_err(spi)?.unwrap_or_default(),
            });
        }
        let edges = client
            .select(
                &format!(
                    "SELECT e.from_step_id, e.to_step_id FROM {s}.tasker_workflow_step_edges e \
                     JOIN {s}.tasker_workflow_steps ws ON ws.workflow_step_id = e.to_step_id \
                     WHERE ws.task_id = $1 ORDER BY e.id"
                ),
                None,
                &[task_id.into()],
            )
            .map_err(spi)?;
        for row in edges {
            let from = row.get::<i64>(1).map_err(spi)?.unwrap_or_default();
            let to = row.get::<i64>(2).map_err(spi)?.unwrap_or_default();
            graph.edges.push((from, to));
        }
        Ok(graph)
    })
}
