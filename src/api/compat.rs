//! The Rails Tasker SQL functions, same names, arguments and rows (the compatibility surface).
//! The readiness, context, dependency-level and DAG functions are computed here in Rust from
//! the maintained step state; the whole-table aggregates live in `sql/compat_aggregates.sql`.

use super::error::OrRaise;
use crate::core::context::StepCounts;
use crate::core::dag::Dag;
use crate::core::error::TaskerError;
use crate::core::ident::SchemaName;
use crate::core::readiness::{self, Clock, Readiness, StepFacts};
use crate::store::{self, facts};
use pgrx::datum::{AnyNumeric, Timestamp};
use pgrx::prelude::*;
use pgrx::JsonB;
use std::collections::{HashMap, HashSet};

/// `timestamp <= now()` exactly as PostgreSQL compares them (session time zone).
struct TxnClock {
    now: pg_sys::Datum,
}

impl TxnClock {
    fn new() -> TxnClock {
        // SAFETY: reading the transaction start time has no preconditions inside a transaction.
        let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
        TxnClock {
            now: pg_sys::Datum::from(now),
        }
    }
}

impl Clock for TxnClock {
    fn is_at_or_before_now(&self, timestamp: i64) -> bool {
        // SAFETY: timestamp_le_timestamptz takes (timestamp, timestamptz), both by value.
        unsafe {
            pgrx::direct_function_call::<bool>(
                pg_sys::timestamp_le_timestamptz,
                &[Some(pg_sys::Datum::from(timestamp)), Some(self.now)],
            )
        }
        .unwrap_or(false)
    }
}

fn schema() -> SchemaName {
    store::settings::data_schema().or_raise()
}

fn to_ts(v: Option<i64>) -> Option<Timestamp> {
    v.and_then(|t| Timestamp::try_from(t).ok())
}

/// Readiness rows of the given steps, with parents outside them looked up.
fn evaluate(schema: &SchemaName, steps: &[StepFacts]) -> Vec<Readiness> {
    let outside_ids = readiness::outside_parents(steps);
    let outside = if outside_ids.is_empty() {
        HashMap::new()
    } else {
        Spi::connect(|c| facts::states_of(c, schema, &outside_ids)).or_raise()
    };
    readiness::evaluate_all(steps, &outside, &TxnClock::new()).or_raise()
}

type ReadinessRow = (
    i64,
    i64,
    i32,
    String,
    String,
    bool,
    bool,
    bool,
    Option<Timestamp>,
    Option<Timestamp>,
    i32,
    i32,
    i32,
    i32,
    Option<i32>,
    Option<Timestamp>,
);

fn readiness_row(r: Readiness) -> ReadinessRow {
    (
        r.workflow_step_id,
        r.task_id,
        r.named_step_id,
        r.name,
        r.current_state,
        r.dependencies_satisfied,
        r.retry_eligible,
        r.ready_for_execution,
        to_ts(r.last_failure_at),
        to_ts(r.next_retry_at),
        r.total_parents,
        r.completed_parents,
        r.attempts,
        r.retry_limit,
        r.backoff_request_seconds,
        to_ts(r.last_attempted_at),
    )
}

#[allow(clippy::type_complexity)]
/// Readiness of each step of a task (optionally only `step_ids`), as the Rails function.
#[pg_extern(stable, parallel_safe)]
fn get_step_readiness_status(
    input_task_id: Option<i64>,
    step_ids: default!(Option<Vec<Option<i64>>>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(workflow_step_id, i64),
        name!(task_id, i64),
        name!(named_step_id, i32),
        name!(name, String),
        name!(current_state, String),
        name!(dependencies_satisfied, bool),
        name!(retry_eligible, bool),
        name!(ready_for_execution, bool),
        name!(last_failure_at, Option<Timestamp>),
        name!(next_retry_at, Option<Timestamp>),
        name!(total_parents, i32),
        name!(completed_parents, i32),
        name!(attempts, i32),
        name!(retry_limit, i32),
        name!(backoff_request_seconds, Option<i32>),
        name!(last_attempted_at, Option<Timestamp>),
    ),
> {
    let Some(task_id) = input_task_id else {
        return TableIterator::new(Vec::new());
    };
    let schema = schema();
    let steps = Spi::connect(|c| facts::for_task(c, &schema, task_id)).or_raise();
    let rows = evaluate(&schema, &steps);
    let rows: Vec<ReadinessRow> = match step_ids {
        None => rows.into_iter().map(readiness_row).collect(),
        Some(ids) => {
            let wanted: HashSet<i64> = ids.into_iter().flatten().collect();
            rows.into_iter()
                .filter(|r| wanted.contains(&r.workflow_step_id))
                .map(readiness_row)
                .collect()
        }
    };
    TableIterator::new(rows)
}

fn task_id_list(ids: Option<Vec<Option<i64>>>) -> Vec<i64> {
    let mut v: Vec<i64> = ids.unwrap_or_default().into_iter().flatten().collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Readiness of every step of several tasks, as the Rails batch function.
#[pg_extern(stable, parallel_safe)]
fn get_step_readiness_status_batch(
    input_task_ids: Option<Vec<Option<i64>>>,
) -> TableIterator<
    'static,
    (
        name!(workflow_step_id, i64),
        name!(task_id, i64),
        name!(named_step_id, i32),
        name!(name, String),
        name!(current_state, String),
        name!(dependencies_satisfied, bool),
        name!(retry_eligible, bool),
        name!(ready_for_execution, bool),
        name!(last_failure_at, Option<Timestamp>),
        name!(next_retry_at, Option<Timestamp>),
        name!(total_parents, i32),
        name!(completed_parents, i32),
        name!(attempts, i32),
        name!(retry_limit, i32),
        name!(backoff_request_seconds, Option<i32>),
        name!(last_attempted_at, Option<Timestamp>),
    ),
> {
    let ids = task_id_list(input_task_ids);
    if ids.is_empty() {
        return TableIterator::new(Vec::new());
    }
    let schema = schema();
    let steps = Spi::connect(|c| facts::for_tasks(c, &schema, &ids)).or_raise();
    let rows: Vec<ReadinessRow> = evaluate(&schema, &steps)
        .into_iter()
        .map(readiness_row)
        .collect();
    TableIterator::new(rows)
}

type ContextRow = (
    i64,
    i32,
    String,
    i64,
    i64,
    i64,
    i64,
    i64,
    i64,
    String,
    String,
    AnyNumeric,
    String,
);

fn context_row(head: &facts::TaskHead, c: &StepCounts) -> ContextRow {
    let (execution_status, recommended_action) = c.execution_status();
    let pct = c
        .completion_percentage()
        .parse::<AnyNumeric>()
        .unwrap_or_else(|_| AnyNumeric::from(0));
    (
        head.task_id,
        head.named_task_id,
        head.state.clone().unwrap_or_else(|| "pending".to_owned()),
        c.total,
        c.pending,
        c.in_progress,
        c.completed,
        c.failed,
        c.ready,
        execution_status.to_owned(),
        recommended_action.to_owned(),
        pct,
        c.health_status().to_owned(),
    )
}

/// Step counts, execution status, recommended action and health of one task.
#[pg_extern(stable, parallel_safe)]
fn get_task_execution_context(
    input_task_id: Option<i64>,
) -> TableIterator<
    'static,
    (
        name!(task_id, i64),
        name!(named_task_id, i32),
        name!(status, String),
        name!(total_steps, i64),
        name!(pending_steps, i64),
        name!(in_progress_steps, i64),
        name!(completed_steps, i64),
        name!(failed_steps, i64),
        name!(ready_steps, i64),
        name!(execution_status, String),
        name!(recommended_action, String),
        name!(completion_percentage, AnyNumeric),
        name!(health_status, String),
    ),
> {
    let Some(task_id) = input_task_id else {
        return TableIterator::new(Vec::new());
    };
    let schema = schema();
    let (heads, steps) = Spi::connect(|c| {
        let heads = facts::task_heads(c, &schema, &[task_id])?;
        let steps = if heads.is_empty() {
            Vec::new()
        } else {
            facts::for_task(c, &schema, task_id)?
        };
        Ok::<_, pgrx::spi::Error>((heads, steps))
    })
    .or_raise();
    let Some(head) = heads.first() else {
        return TableIterator::new(Vec::new());
    };
    let counts = StepCounts::of(&evaluate(&schema, &steps));
    TableIterator::new(vec![context_row(head, &counts)])
}

/// Execution contexts of several tasks: one row per listed id of an existing task.
#[pg_extern(stable, parallel_safe)]
fn get_task_execution_contexts_batch(
    input_task_ids: Option<Vec<Option<i64>>>,
) -> TableIterator<
    'static,
    (
        name!(task_id, i64),
        name!(named_task_id, i32),
        name!(status, String),
        name!(total_steps, i64),
        name!(pending_steps, i64),
        name!(in_progress_steps, i64),
        name!(completed_steps, i64),
        name!(failed_steps, i64),
        name!(ready_steps, i64),
        name!(execution_status, String),
        name!(recommended_action, String),
        name!(completion_percentage, AnyNumeric),
        name!(health_status, String),
    ),
> {
    let listed: Vec<i64> = input_task_ids
        .clone()
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .collect();
    let ids = task_id_list(input_task_ids);
    if ids.is_empty() {
        return TableIterator::new(Vec::new());
    }
    let schema = schema();
    let (heads, steps) = Spi::connect(|c| {
        let heads = facts::task_heads(c, &schema, &ids)?;
        let existing: Vec<i64> = heads.iter().map(|h| h.task_id).collect();
        let steps = if existing.is_empty() {
            Vec::new()
        } else {
            facts::for_tasks(c, &schema, &existing)?
        };
        Ok::<_, pgrx::spi::Error>((heads, steps))
    })
    .or_raise();
    let mut counts: HashMap<i64, StepCounts> = HashMap::new();
    for r in evaluate(&schema, &steps) {
        counts.entry(r.task_id).or_default().add(&r);
    }
    let by_id: HashMap<i64, &facts::TaskHead> = heads.iter().map(|h| (h.task_id, h)).collect();
    let mut occurrences: Vec<i64> = listed
        .into_iter()
        .filter(|id| by_id.contains_key(id))
        .collect();
    occurrences.sort_unstable();
    let empty = StepCounts::default();
    let rows: Vec<ContextRow> = occurrences
        .into_iter()
        .map(|id| context_row(by_id[&id], counts.get(&id).unwrap_or(&empty)))
        .collect();
    TableIterator::new(rows)
}

/// Longest-path dependency level of each step reachable from a root, ordered by level and id.
/// A cycle reachable from a root raises `TK006` (the Rails recursive query never finishes).
#[pg_extern(stable, parallel_safe)]
fn calculate_dependency_levels(
    input_task_id: Option<i64>,
) -> TableIterator<'static, (name!(workflow_step_id, i64), name!(dependency_level, i32))> {
    let Some(task_id) = input_task_id else {
        return TableIterator::new(Vec::new());
    };
    let schema = schema();
    let steps = Spi::connect(|c| facts::for_task(c, &schema, task_id)).or_raise();
    let dag = Dag::new(
        steps.iter().map(|s| s.workflow_step_id),
        steps
            .iter()
            .flat_map(|s| s.parent_ids.iter().map(move |&p| (p, s.workflow_step_id))),
    );
    let roots: Vec<usize> = steps
        .iter()
        .enumerate()
        .filter(|(_, s)| s.parent_ids.is_empty())
        .map(|(i, _)| i)
        .collect();
    let levels = dag
        .levels_from(&roots)
        .map_err(|steps| TaskerError::CycleDetected { steps })
        .or_raise();
    let mut rows: Vec<(i64, i32)> = steps
        .iter()
        .zip(levels)
        .filter_map(|(s, l)| l.map(|l| (s.workflow_step_id, l as i32)))
        .collect();
    rows.sort_unstable_by_key(|&(id, level)| (level, id));
    TableIterator::new(rows)
}

/// Shortest distance from a root (a step without incoming edges, in any task) to each of
/// `steps`, as the view measures it. Parents in other tasks are followed backwards up to the
/// depth cap (further ancestors cannot lead to a depth within it); normally there are none and
/// this reads nothing more.
fn min_depths_with_ancestors(schema: &SchemaName, steps: &[StepFacts]) -> Vec<Option<u32>> {
    let mut parents: HashMap<i64, Vec<i64>> = steps
        .iter()
        .map(|s| (s.workflow_step_id, s.parent_ids.clone()))
        .collect();
    let mut frontier: Vec<i64> = readiness::outside_parents(steps);
    let mut layers = 0;
    while !frontier.is_empty() && layers < MAX_DAG_DEPTH {
        let lists = Spi::connect(|c| facts::parent_lists(c, schema, &frontier)).or_raise();
        let mut next = Vec::new();
        for (id, ps) in lists {
            next.extend(ps.iter().copied().filter(|p| !parents.contains_key(p)));
            parents.insert(id, ps);
        }
        next.sort_unstable();
        next.dedup();
        next.retain(|p| !parents.contains_key(p));
        frontier = next;
        layers += 1;
    }
    // Steps beyond the explored layers are treated as unknown (not roots).
    let known: Vec<i64> = parents.keys().copied().collect();
    let dag = Dag::new(
        known.iter().copied(),
        parents
            .iter()
            .flat_map(|(&child, ps)| ps.iter().map(move |&p| (p, child))),
    );
    let roots: Vec<usize> = known
        .iter()
        .enumerate()
        .filter(|(_, id)| parents[id].is_empty())
        .map(|(i, _)| i)
        .collect();
    let depths = dag.min_depths_from(&roots);
    steps
        .iter()
        .map(|s| dag.position(s.workflow_step_id).and_then(|p| depths[p]))
        .collect()
}

/// Depth cap of the Rails `tasker_step_dag_relationships` view.
const MAX_DAG_DEPTH: u32 = 50;

type DagRow = (
    i64,
    i64,
    i32,
    JsonB,
    JsonB,
    i64,
    i64,
    bool,
    bool,
    Option<i32>,
);

/// The rows of `tasker_step_dag_relationships` for one task's steps, in O(steps + edges).
#[pg_extern(stable, parallel_safe)]
fn step_dag_relationships(
    task_id: Option<i64>,
) -> TableIterator<
    'static,
    (
        name!(workflow_step_id, i64),
        name!(task_id, i64),
        name!(named_step_id, i32),
        name!(parent_step_ids, JsonB),
        name!(child_step_ids, JsonB),
        name!(parent_count, i64),
        name!(child_count, i64),
        name!(is_root_step, bool),
        name!(is_leaf_step, bool),
        name!(min_depth_from_root, Option<i32>),
    ),
> {
    let Some(task_id) = task_id else {
        return TableIterator::new(Vec::new());
    };
    let schema = schema();
    let (steps, out_edges) = Spi::connect(|c| {
        let steps = facts::for_task(c, &schema, task_id)?;
        let ids: Vec<i64> = steps.iter().map(|s| s.workflow_step_id).collect();
        let edges = if ids.is_empty() {
            Vec::new()
        } else {
            facts::edges_from(c, &schema, &ids)?
        };
        Ok::<_, pgrx::spi::Error>((steps, edges))
    })
    .or_raise();
    let mut children: HashMap<i64, Vec<i64>> = HashMap::new();
    for (from, to) in out_edges {
        children.entry(from).or_default().push(to);
    }
    let depths = min_depths_with_ancestors(&schema, &steps);
    let rows: Vec<DagRow> = steps
        .iter()
        .zip(depths)
        .map(|(s, depth)| {
            let mut parents = s.parent_ids.clone();
            parents.sort_unstable();
            let mut kids = children.remove(&s.workflow_step_id).unwrap_or_default();
            kids.sort_unstable();
            let (np, nc) = (parents.len() as i64, kids.len() as i64);
            (
                s.workflow_step_id,
                s.task_id,
                s.named_step_id,
                JsonB(serde_json::Value::from(parents)),
                JsonB(serde_json::Value::from(kids)),
                np,
                nc,
                np == 0,
                nc == 0,
                depth.filter(|&d| d <= MAX_DAG_DEPTH).map(|d| d as i32),
            )
        })
        .collect();
    TableIterator::new(rows)
}
