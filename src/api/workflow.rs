//! Reading a task's workflow: steps, their states and dependencies.

use super::error::OrRaise;
use crate::core::dag::Dag;
use crate::store;
use pgrx::prelude::*;

type TaskStepRow = (i64, String, String, Vec<i64>, Option<i32>);

/// The steps of a task in dependency order: id, name, current state, parent step ids and
/// dependency level (longest path from a root; NULL for every step if the graph has a cycle).
#[allow(clippy::type_complexity)]
#[pg_extern(stable, strict, parallel_safe)]
fn task_steps(
    task_id: i64,
) -> TableIterator<
    'static,
    (
        name!(workflow_step_id, i64),
        name!(name, String),
        name!(current_state, String),
        name!(parent_step_ids, Vec<i64>),
        name!(dependency_level, Option<i32>),
    ),
> {
    let graph = store::settings::data_schema()
        .and_then(|schema| store::workflow::load_task_graph(&schema, task_id))
        .or_raise();
    let dag = Dag::new(graph.steps.iter().map(|s| s.workflow_step_id), graph.edges.iter().copied());
    let levels = dag.levels().ok();
    let mut rows: Vec<TaskStepRow> = graph
        .steps
        .into_iter()
        .enumerate()
        .map(|(pos, step)| {
            let mut parents: Vec<i64> = dag.parent_ids(pos).collect();
            parents.sort_unstable();
            let level = levels.as_ref().map(|l| l[pos] as i32);
            (step.workflow_step_id, step.name, step.current_state, parents, level)
        })
        .collect();
    rows.sort_by_key(|r| (r.4, r.0));
    TableIterator::new(rows)
}
