//! The Rails Tasker SQL functions, same names, arguments and rows (the compatibility surface).
//! The readiness, context, dependency-level and DAG functions are computed here in Rust from
//! the maintained step state; the whole-table aggregates live in `sql/compat_aggregates.sql`.

use super::error::{OrRaise, Raised};
use super::srf::{self, RowOut};
use crate::core::context::StepCounts;
use crate::core::dag::Dag;
use crate::core::error::TaskerError;
use crate::core::ident::SchemaName;
use crate::core::readiness::{self, Clock, Readiness, StepFacts};
use crate::store::{self, facts, spare};
use pgrx::datum::AnyNumeric;
use pgrx::prelude::*;
use pgrx::JsonB;
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

/// `timestamp <= now()` exactly as PostgreSQL compares them (session time zone).
struct TxnClock {
    now: pg_sys::Datum,
}

impl TxnClock {
    fn new() -> TxnClock {
        // SAFETY: reading the transaction start time has no preconditions inside a transaction.
        let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
        TxnClock { now: pg_sys::Datum::from(now) }
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

// Every function below that can fail returns a `Result`; the `#[pg_extern]`s raise it in
// their last expression, with nothing of theirs alive (see `api::error`).

fn schema() -> Result<SchemaName, Raised> {
    Ok(store::settings::data_schema()?)
}

/// Readiness rows of the given steps, with parents outside them looked up, in a spare
/// vector (`store::spare`) the caller gives back. The facts are given back here.
fn evaluate(schema: &SchemaName, steps: Vec<StepFacts>) -> Result<Vec<Readiness>, Raised> {
    let outside_ids = readiness::outside_parents(&steps);
    let outside = if outside_ids.is_empty() {
        HashMap::default()
    } else {
        Spi::connect(|c| facts::states_of(c, schema, &outside_ids))?
    };
    let mut rows = spare::take();
    let evaluated = readiness::evaluate_into(&steps, &outside, &TxnClock::new(), &mut rows);
    spare::give_back(steps);
    evaluated?;
    Ok(rows)
}

/// Returns readiness rows from a set-returning call, then keeps their vector for the next.
///
/// # Safety
/// As [`srf::materialize`], for the 16 columns of `get_step_readiness_status`.
unsafe fn return_readiness(fcinfo: pg_sys::FunctionCallInfo, rows: Vec<Readiness>) {
    srf::materialize(fcinfo, 16, rows.iter(), |r, o| fill_readiness(r, o));
    spare::give_back(rows);
}

/// Writes one readiness row (the 16 columns of `get_step_readiness_status`).
fn fill_readiness(r: &Readiness, o: &mut RowOut<'_>) {
    o.i64(0, r.workflow_step_id);
    o.i64(1, r.task_id);
    o.i32(2, r.named_step_id);
    o.text(3, &r.name);
    o.text(4, &r.current_state);
    o.bool(5, r.dependencies_satisfied);
    o.bool(6, r.retry_eligible);
    o.bool(7, r.ready_for_execution);
    o.timestamp(8, r.last_failure_at);
    o.timestamp(9, r.next_retry_at);
    o.i32(10, r.total_parents);
    o.i32(11, r.completed_parents);
    o.i32(12, r.attempts);
    o.i32(13, r.retry_limit);
    o.opt_i32(14, r.backoff_request_seconds);
    o.timestamp(15, r.last_attempted_at);
}

/// Readiness rows of one task, optionally only the steps in `step_ids`.
fn task_readiness(
    task_id: Option<i64>,
    step_ids: Option<Vec<i64>>,
) -> Result<Vec<Readiness>, Raised> {
    let Some(task_id) = task_id else {
        return Ok(Vec::new());
    };
    let schema = schema()?;
    let steps = facts::read(&schema, &[task_id])?;
    let mut rows = evaluate(&schema, steps)?;
    if let Some(ids) = step_ids {
        let wanted: HashSet<i64> = ids.into_iter().collect();
        rows.retain(|r| wanted.contains(&r.workflow_step_id));
    }
    Ok(rows)
}

/// Readiness of each step of a task (optionally only `step_ids`), as the Rails function.
#[pg_extern(sql = r#"
CREATE FUNCTION "get_step_readiness_status"(
    "input_task_id" bigint,
    "step_ids" bigint[] DEFAULT NULL
) RETURNS TABLE (
    "workflow_step_id" bigint, "task_id" bigint, "named_step_id" integer, "name" text,
    "current_state" text, "dependencies_satisfied" boolean, "retry_eligible" boolean,
    "ready_for_execution" boolean, "last_failure_at" timestamp without time zone,
    "next_retry_at" timestamp without time zone, "total_parents" integer,
    "completed_parents" integer, "attempts" integer, "retry_limit" integer,
    "backoff_request_seconds" integer, "last_attempted_at" timestamp without time zone
) STABLE PARALLEL SAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'get_step_readiness_status_wrapper';
"#)]
fn get_step_readiness_status(fcinfo: pg_sys::FunctionCallInfo) {
    // SAFETY: the SQL declaration above fixes the argument and result types.
    let (task_id, step_ids) = unsafe { (srf::arg_i64(fcinfo, 0), srf::arg_i64_array(fcinfo, 1)) };
    let rows = task_readiness(task_id, step_ids).or_raise();
    unsafe { return_readiness(fcinfo, rows) };
}

fn task_id_list(ids: Option<Vec<i64>>) -> Vec<i64> {
    let mut v: Vec<i64> = ids.unwrap_or_default();
    v.sort_unstable();
    v.dedup();
    v
}

/// Readiness rows of every step of the given tasks.
fn tasks_readiness(ids: Vec<i64>) -> Result<Vec<Readiness>, Raised> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let schema = schema()?;
    let steps = facts::read(&schema, &ids)?;
    evaluate(&schema, steps)
}

/// Readiness of every step of several tasks, as the Rails batch function.
#[pg_extern(sql = false)]
fn get_step_readiness_status_batch(fcinfo: pg_sys::FunctionCallInfo) {
    // SAFETY: the SQL declaration (with get_task_execution_context's) fixes the argument and
    // result types.
    let ids = task_id_list(unsafe { srf::arg_i64_array(fcinfo, 0) });
    let rows = tasks_readiness(ids).or_raise();
    unsafe { return_readiness(fcinfo, rows) };
}

/// One task's figures for `get_task_execution_context`.
struct ContextRow {
    head: facts::TaskHead,
    counts: StepCounts,
}

fn fill_context(c: &ContextRow, o: &mut RowOut<'_>) {
    let (execution_status, recommended_action) = c.counts.execution_status();
    o.i64(0, c.head.task_id);
    o.i32(1, c.head.named_task_id);
    o.text(2, c.head.state.as_deref().unwrap_or("pending"));
    o.i64(3, c.counts.total);
    o.i64(4, c.counts.pending);
    o.i64(5, c.counts.in_progress);
    o.i64(6, c.counts.completed);
    o.i64(7, c.counts.failed);
    o.i64(8, c.counts.ready);
    o.text(9, execution_status);
    o.text(10, recommended_action);
    let pct = c
        .counts
        .completion_percentage()
        .parse::<AnyNumeric>()
        .unwrap_or_else(|_| AnyNumeric::from(0));
    o.datum(11, pct.into_datum());
    o.text(12, c.counts.health_status());
}

/// Execution contexts of the tasks listed in `listed` (one row per listed id of an existing
/// task, duplicates repeated), ordered by task id.
fn contexts(listed: Vec<i64>) -> Result<Vec<ContextRow>, Raised> {
    let ids = task_id_list(Some(listed.clone()));
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let schema = schema()?;
    let heads = Spi::connect(|c| facts::task_heads(c, &schema, &ids))?;
    // (a task with several current transitions has several heads: its steps are read once)
    let mut existing: Vec<i64> = heads.iter().map(|h| h.task_id).collect();
    existing.dedup();
    let steps = if existing.is_empty() { Vec::new() } else { facts::read(&schema, &existing)? };
    let mut counts: HashMap<i64, StepCounts> = HashMap::default();
    let rows = evaluate(&schema, steps)?;
    for r in &rows {
        counts.entry(r.task_id).or_default().add(r);
    }
    spare::give_back(rows);
    let by_id: HashMap<i64, &facts::TaskHead> = heads.iter().map(|h| (h.task_id, h)).collect();
    let mut occurrences: Vec<i64> =
        listed.into_iter().filter(|id| by_id.contains_key(id)).collect();
    occurrences.sort_unstable();
    Ok(occurrences
        .into_iter()
        .map(|id| ContextRow {
            head: by_id[&id].clone(),
            counts: counts.get(&id).copied().unwrap_or_default(),
        })
        .collect())
}

/// Step counts, execution status, recommended action and health of one task.
#[pg_extern(requires = [get_step_readiness_status], sql = r#"
CREATE FUNCTION "get_task_execution_context"(
    "input_task_id" bigint
) RETURNS TABLE (
    "task_id" bigint, "named_task_id" integer, "status" text, "total_steps" bigint,
    "pending_steps" bigint, "in_progress_steps" bigint, "completed_steps" bigint,
    "failed_steps" bigint, "ready_steps" bigint, "execution_status" text,
    "recommended_action" text, "completion_percentage" numeric, "health_status" text
) STABLE PARALLEL SAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'get_task_execution_context_wrapper';
-- The batch functions return the rows of the single ones: their result types are read back.
DO $batch$ DECLARE b record; BEGIN
    FOR b IN SELECT * FROM (VALUES ('get_step_readiness_status_batch', 'get_step_readiness_status'),
                                   ('get_task_execution_contexts_batch', 'get_task_execution_context')) v(batch, single) LOOP
        EXECUTE pg_catalog.format('CREATE FUNCTION %I(input_task_ids bigint[]) RETURNS %s STABLE PARALLEL SAFE LANGUAGE c AS %L, %L',
                                  b.batch, pg_catalog.pg_get_function_result(b.single::pg_catalog.regproc),
                                  'MODULE_PATHNAME', b.batch || '_wrapper');
    END LOOP;
END $batch$;
"#)]
fn get_task_execution_context(fcinfo: pg_sys::FunctionCallInfo) {
    // SAFETY: the SQL declaration above fixes the argument and result types.
    let task_id = unsafe { srf::arg_i64(fcinfo, 0) };
    let rows = contexts(task_id.into_iter().collect()).or_raise();
    unsafe { srf::materialize(fcinfo, 13, rows, fill_context) };
}

/// Execution contexts of several tasks: one row per listed id of an existing task.
#[pg_extern(sql = false)]
fn get_task_execution_contexts_batch(fcinfo: pg_sys::FunctionCallInfo) {
    // SAFETY: the SQL declaration (with get_task_execution_context's) fixes the argument and
    // result types.
    let listed = unsafe { srf::arg_i64_array(fcinfo, 0) }.unwrap_or_default();
    let rows = contexts(listed).or_raise();
    unsafe { srf::materialize(fcinfo, 13, rows, fill_context) };
}

/// Longest-path dependency level of each step reachable from a root, ordered by level and id.
/// A cycle reachable from a root raises `TK006` (the Rails recursive query never finishes).
#[pg_extern(stable, parallel_safe)]
fn calculate_dependency_levels(
    input_task_id: Option<i64>,
) -> TableIterator<'static, (name!(workflow_step_id, i64), name!(dependency_level, i32))> {
    TableIterator::new(dependency_levels(input_task_id).or_raise())
}

fn dependency_levels(task_id: Option<i64>) -> Result<Vec<(i64, i32)>, Raised> {
    let Some(task_id) = task_id else {
        return Ok(Vec::new());
    };
    let schema = schema()?;
    let steps = facts::read(&schema, &[task_id])?;
    let dag = Dag::new(
        steps.iter().map(|s| s.workflow_step_id),
        steps.iter().flat_map(|s| s.parent_ids.iter().map(move |&p| (p, s.workflow_step_id))),
    );
    let roots: Vec<usize> =
        steps.iter().enumerate().filter(|(_, s)| s.parent_ids.is_empty()).map(|(i, _)| i).collect();
    let levels = dag.levels_from(&roots).map_err(|steps| TaskerError::CycleDetected { steps })?;
    let mut rows: Vec<(i64, i32)> = steps
        .iter()
        .zip(levels)
        .filter_map(|(s, l)| l.map(|l| (s.workflow_step_id, l as i32)))
        .collect();
    rows.sort_unstable_by_key(|&(id, level)| (level, id));
    Ok(rows)
}

/// Shortest distance from a root (a step without incoming edges, in any task) to each of
/// `steps`, as the view measures it. Parents in other tasks are followed backwards up to the
/// depth cap (further ancestors cannot lead to a depth within it); normally there are none and
/// this reads nothing more.
fn min_depths_with_ancestors(
    schema: &SchemaName,
    steps: &[StepFacts],
) -> Result<Vec<Option<u32>>, Raised> {
    let mut parents: HashMap<i64, Vec<i64>> =
        steps.iter().map(|s| (s.workflow_step_id, s.parent_ids.to_vec())).collect();
    let mut frontier: Vec<i64> = readiness::outside_parents(steps);
    let mut layers = 0;
    while !frontier.is_empty() && layers < MAX_DAG_DEPTH {
        let lists = Spi::connect(|c| facts::parent_lists(c, schema, &frontier))?;
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
        parents.iter().flat_map(|(&child, ps)| ps.iter().map(move |&p| (p, child))),
    );
    let roots: Vec<usize> =
        known.iter().enumerate().filter(|(_, id)| parents[id].is_empty()).map(|(i, _)| i).collect();
    let depths = dag.min_depths_from(&roots);
    Ok(steps.iter().map(|s| dag.position(s.workflow_step_id).and_then(|p| depths[p])).collect())
}

/// Depth cap of the Rails `tasker_step_dag_relationships` view.
const MAX_DAG_DEPTH: u32 = 50;

type DagRow = (i64, i64, i32, JsonB, JsonB, i64, i64, bool, bool, Option<i32>);

#[allow(clippy::type_complexity)]
/// The rows of `tasker_step_dag_relationships` for one task's steps, in O(steps + edges).
#[rustfmt::skip] // the view's columns, as the view lists them
#[pg_extern(stable, parallel_safe)]
fn step_dag_relationships(task_id: Option<i64>) -> TableIterator<'static, (
    name!(workflow_step_id, i64), name!(task_id, i64), name!(named_step_id, i32),
    name!(parent_step_ids, JsonB), name!(child_step_ids, JsonB),
    name!(parent_count, i64), name!(child_count, i64),
    name!(is_root_step, bool), name!(is_leaf_step, bool),
    name!(min_depth_from_root, Option<i32>),
)> {
    TableIterator::new(dag_relationships(task_id).or_raise())
}

fn dag_relationships(task_id: Option<i64>) -> Result<Vec<DagRow>, Raised> {
    let Some(task_id) = task_id else {
        return Ok(Vec::new());
    };
    let schema = schema()?;
    let steps = facts::read(&schema, &[task_id])?;
    let ids: Vec<i64> = steps.iter().map(|s| s.workflow_step_id).collect();
    let out_edges = if ids.is_empty() {
        Vec::new()
    } else {
        Spi::connect(|c| facts::edges_from(c, &schema, &ids))?
    };
    let mut children: HashMap<i64, Vec<i64>> = HashMap::default();
    for (from, to) in out_edges {
        children.entry(from).or_default().push(to);
    }
    let depths = min_depths_with_ancestors(&schema, &steps)?;
    let rows: Vec<DagRow> = steps
        .iter()
        .zip(depths)
        .map(|(s, depth)| {
            let mut parents = s.parent_ids.to_vec();
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
    Ok(rows)
}
