//! The Rails Tasker SQL functions, same names, arguments and rows (the compatibility surface).
//! The readiness, context, dependency-level and DAG functions are computed here in Rust from
//! the maintained step state; the whole-table aggregates live in `sql/compat_aggregates.sql`.

use super::error::{OrRaise, Raised};
use super::srf::{self, Materializer, RowOut};
use crate::core::context::StepCounts;
use crate::core::dag::Dag;
use crate::core::error::TaskerError;
use crate::core::ident::SchemaName;
use crate::core::readiness::{self, Clock, Inputs, StepFacts, Verdict};
use crate::store::{self, direct, facts};
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

/// One readiness row, borrowed: the step's identity, name and state as stored, what the
/// rules read and what they decided.
struct Judged<'a> {
    workflow_step_id: i64,
    task_id: i64,
    named_step_id: i32,
    name: &'a [u8],
    inputs: Inputs<'a>,
    verdict: Verdict,
}

/// Judges the steps of `task_ids` (ascending, each once) — only those in `wanted` when given
/// — calling `each` with every row. The maintained rows are read and judged one by one, each
/// handed on before the next is read (`store::direct::visit`); when a direct read is not
/// possible, they are read through SPI first.
fn judge_steps(
    schema: &SchemaName,
    task_ids: &[i64],
    wanted: Option<&HashSet<i64>>,
    mut each: impl FnMut(&Judged<'_>),
) -> Result<(), Raised> {
    let clock = TxnClock::new();
    let skip = |id: i64| wanted.is_some_and(|w| !w.contains(&id));
    let mut failed = None;
    let direct = direct::visit(schema.as_str(), task_ids, |row| {
        let workflow_step_id = row.workflow_step_id();
        if skip(workflow_step_id) {
            return true;
        }
        let inputs = row.inputs();
        match readiness::judge(&inputs, &clock) {
            Ok(verdict) => {
                let (task_id, named_step_id, name) =
                    (row.task_id(), row.named_step_id(), row.name());
                each(&Judged { workflow_step_id, task_id, named_step_id, name, inputs, verdict });
                true
            }
            Err(e) => {
                failed = Some(e);
                false
            }
        }
    });
    if direct.is_some() {
        return failed.map_or(Ok(()), |e| Err(e.into()));
    }
    let steps = facts::read_through_spi(schema, task_ids)?;
    let outside_ids = readiness::outside_parents(&steps);
    let outside = if outside_ids.is_empty() {
        HashMap::default()
    } else {
        Spi::connect(|c| facts::states_of(c, schema, &outside_ids))?
    };
    let parents = readiness::ParentStates::new(&steps, &outside);
    for s in steps.iter().filter(|s| !skip(s.workflow_step_id)) {
        let inputs = s.inputs(parents.completed(s));
        let verdict = readiness::judge(&inputs, &clock)?;
        each(&Judged {
            workflow_step_id: s.workflow_step_id,
            task_id: s.task_id,
            named_step_id: s.named_step_id,
            name: s.name.as_bytes(),
            inputs,
            verdict,
        });
    }
    Ok(())
}

/// Writes one readiness row (the 16 columns of `get_step_readiness_status`).
fn fill_readiness(r: &Judged<'_>, o: &mut RowOut<'_>) {
    let (i, v) = (&r.inputs, &r.verdict);
    o.i64(0, r.workflow_step_id);
    o.i64(1, r.task_id);
    o.i32(2, r.named_step_id);
    o.text_bytes(3, r.name);
    o.text(4, i.current_state());
    o.bool(5, v.dependencies_satisfied);
    o.bool(6, v.retry_eligible);
    o.bool(7, v.ready_for_execution);
    o.timestamp(8, v.last_failure_at);
    o.timestamp(9, v.next_retry_at);
    o.i32(10, i.total_parents);
    o.i32(11, i.completed_parents);
    o.i32(12, v.attempts);
    o.i32(13, v.retry_limit);
    o.opt_i32(14, i.backoff_request_seconds);
    o.timestamp(15, i.last_attempted_at);
}

/// Readiness rows of the tasks `task_ids` (ascending, each once), only of `wanted` steps
/// when given, written to `out` as they are judged.
fn readiness_rows(
    out: &mut Materializer,
    task_ids: &[i64],
    wanted: Option<&HashSet<i64>>,
) -> Result<(), Raised> {
    if task_ids.is_empty() {
        return Ok(());
    }
    judge_steps(&schema()?, task_ids, wanted, |r| out.row(|o| fill_readiness(r, o)))
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
    let wanted: Option<HashSet<i64>> = step_ids.map(|ids| ids.into_iter().collect());
    // SAFETY: as above; `out` lives only during this call.
    let mut out = unsafe { Materializer::begin(fcinfo, 16) };
    let done = readiness_rows(&mut out, task_id.as_slice(), wanted.as_ref());
    drop((out, wanted));
    done.or_raise();
}

fn task_id_list(ids: Option<Vec<i64>>) -> Vec<i64> {
    let mut v: Vec<i64> = ids.unwrap_or_default();
    v.sort_unstable();
    v.dedup();
    v
}

/// Readiness of every step of several tasks, as the Rails batch function.
#[pg_extern(sql = false)]
fn get_step_readiness_status_batch(fcinfo: pg_sys::FunctionCallInfo) {
    // SAFETY: the SQL declaration (with get_task_execution_context's) fixes the argument and
    // result types.
    let ids = task_id_list(unsafe { srf::arg_i64_array(fcinfo, 0) });
    // SAFETY: as above; `out` lives only during this call.
    let mut out = unsafe { Materializer::begin(fcinfo, 16) };
    let done = readiness_rows(&mut out, &ids, None);
    drop((out, ids));
    done.or_raise();
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
    let mut counts: HashMap<i64, StepCounts> = HashMap::default();
    if !existing.is_empty() {
        judge_steps(&schema, &existing, None, |r| {
            let (i, v) = (&r.inputs, &r.verdict);
            counts.entry(r.task_id).or_default().add_step(
                i.current_state(),
                v.attempts,
                v.retry_limit,
                v.ready_for_execution,
            );
        })?;
    }
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
