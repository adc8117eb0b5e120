//! Loading the facts readiness is computed from: from the maintained `tasker_core.step_state`
//! when the data schema is tracked, otherwise recomputed from the Tasker tables.

use super::plans::{all_rows, with_plan, INT8, INT8ARRAY, TEXT};
use super::rows::{for_each_row, Col, Interner, Row};
use crate::core::ident::SchemaName;
use crate::core::readiness::{Inputs, SmolStr, StepFacts};
use pgrx::spi::{SpiClient, SpiResult, SpiTupleTable};
use rustc_hash::FxHashMap as HashMap;
use std::rc::Rc;

/// The columns every facts query returns, in order.
const FACT_COLUMNS_TRACKED: &str =
    "s.workflow_step_id, s.task_id, s.named_step_id, s.name, s.state, s.state_at, \
     s.parent_ids, s.retryable, s.retry_limit, s.in_process, s.processed, s.attempts, \
     s.last_attempted_at, s.backoff_request_seconds";

fn recompute_sql(schema: &str, filter: &str) -> String {
    format!(
        "SELECT ws.workflow_step_id, ws.task_id, ws.named_step_id, ns.name::text, cur.to_state::text, cur.created_at, \
                ARRAY(SELECT e.from_step_id FROM {schema}.tasker_workflow_step_edges e \
                      WHERE e.to_step_id = ws.workflow_step_id ORDER BY e.from_step_id), \
                ws.retryable, ws.retry_limit, ws.in_process, ws.processed, ws.attempts, \
                ws.last_attempted_at, ws.backoff_request_seconds \
         FROM {schema}.tasker_workflow_steps ws \
         JOIN {schema}.tasker_named_steps ns ON ns.named_step_id = ws.named_step_id \
         LEFT JOIN {schema}.tasker_workflow_step_transitions cur \
                ON cur.workflow_step_id = ws.workflow_step_id AND cur.most_recent \
         WHERE {filter}"
    )
}

/// The `step_state` columns of the facts, in order (the direct reads look them up by name).
pub(super) const FACT_COLUMNS: [&str; 14] = [
    "workflow_step_id",
    "task_id",
    "named_step_id",
    "name",
    "state",
    "state_at",
    "parent_ids",
    "retryable",
    "retry_limit",
    "in_process",
    "processed",
    "attempts",
    "last_attempted_at",
    "backoff_request_seconds",
];

/// Column types of every facts query, in order.
pub(super) const FACT_TYPES: [Col; 14] = [
    Col::Int8,
    Col::Int8,
    Col::Int4,
    Col::Text,
    Col::Text,
    Col::Timestamp,
    Col::Int8Array,
    Col::Bool,
    Col::Int4,
    Col::Bool,
    Col::Bool,
    Col::Int4,
    Col::Timestamp,
    Col::Int4,
];

/// The facts of one row with the columns of `FACT_COLUMNS`.
pub(super) fn fact_of_row(row: &Row<'_>, names: &mut Interner) -> StepFacts {
    StepFacts {
        workflow_step_id: row.i64(0).unwrap_or_default(),
        task_id: row.i64(1).unwrap_or_default(),
        named_step_id: row.i32(2).unwrap_or_default(),
        // (names differ from step to step: kept inline, not interned)
        name: row.with_text(3, |s| SmolStr::new(s)).unwrap_or_default(),
        state: row.text_interned(4, names),
        state_at: row.i64(5),
        parent_ids: row.i64_array(6),
        retryable: row.bool(7),
        retry_limit: row.i32(8),
        in_process: row.bool(9),
        processed: row.bool(10),
        attempts: row.i32(11),
        last_attempted_at: row.i64(12),
        backoff_request_seconds: row.i32(13),
    }
}

/// One `step_state` row during a direct read (`store::direct::visit`): the fact columns (in
/// `FACT_COLUMNS` order) and then `blocked_parents`, valid only during the visit's callback.
pub struct StateRow<'a>(pub(super) Row<'a>);

/// The column of `blocked_parents` in a [`StateRow`].
pub(super) const BLOCKED_PARENTS: usize = FACT_COLUMNS.len();

impl<'a> StateRow<'a> {
    pub fn workflow_step_id(&self) -> i64 {
        self.0.i64(0).unwrap_or_default()
    }

    pub fn task_id(&self) -> i64 {
        self.0.i64(1).unwrap_or_default()
    }

    pub fn named_step_id(&self) -> i32 {
        self.0.i32(2).unwrap_or_default()
    }

    /// The step's name as stored (server encoding).
    pub fn name(&self) -> &'a [u8] {
        self.0.text_bytes(3).unwrap_or_default()
    }

    /// The current state as stored; `None` when the step has none (pending).
    pub fn state(&self) -> Option<&'a [u8]> {
        self.0.text_bytes(4)
    }

    /// What the readiness rules read. The parents that satisfy the step are counted from the
    /// maintained `blocked_parents` (the parents that do not), which tracking keeps exactly
    /// (`check_tracking` recomputes it; the claims rely on it too), so no parent is looked up.
    pub fn inputs(&self) -> Inputs<'a> {
        let r = &self.0;
        let total = r.i64_array_len(6) as i32;
        let blocked = r.i32(BLOCKED_PARENTS).unwrap_or_default();
        Inputs {
            // (a state that is not UTF-8 is neither pending nor error: the rules need no more)
            state: self.state().map(|b| std::str::from_utf8(b).unwrap_or("")),
            state_at: r.i64(5),
            total_parents: total,
            completed_parents: total - blocked,
            retryable: r.bool(7),
            retry_limit: r.i32(8),
            in_process: r.bool(9),
            processed: r.bool(10),
            attempts: r.i32(11),
            last_attempted_at: r.i64(12),
            backoff_request_seconds: r.i32(13),
        }
    }

    /// The facts of this row, copied out.
    pub fn facts(&self, names: &mut Interner) -> StepFacts {
        fact_of_row(&self.0, names)
    }
}

/// Appends the facts of the SPI result just produced to `out`.
///
/// # Safety
/// Call right after the query, while its result is alive.
unsafe fn append_facts(out: &mut Vec<StepFacts>, names: &mut Interner) -> SpiResult<()> {
    for_each_row(&FACT_TYPES, |row| out.push(fact_of_row(row, names)))
}

/// Reads the facts query result just produced.
fn read_facts(table: SpiTupleTable<'_>) -> SpiResult<Vec<StepFacts>> {
    let mut out = Vec::with_capacity(table.len());
    let mut names = Interner::default();
    // SAFETY: called right after the query, while `table` keeps the result alive.
    unsafe { append_facts(&mut out, &mut names)? };
    Ok(out)
}

/// Rows fetched per cursor round trip when reading many tasks: bounded memory per call, reused
/// from one chunk to the next instead of one allocation of the whole result.
const FETCH_CHUNK: std::ffi::c_long = 2048;

/// Reads a facts query through a cursor, chunk by chunk.
fn read_facts_chunked(mut cursor: pgrx::spi::SpiCursor<'_>) -> SpiResult<Vec<StepFacts>> {
    let mut out = Vec::new();
    let mut names = Interner::default();
    loop {
        let table = cursor.fetch(FETCH_CHUNK)?;
        let n = table.len();
        // SAFETY: right after the fetch, while `table` keeps its result alive; freed after.
        unsafe {
            append_facts(&mut out, &mut names)?;
            pgrx::pg_sys::SPI_freetuptable(pgrx::pg_sys::SPI_tuptable);
            pgrx::pg_sys::SPI_tuptable = std::ptr::null_mut();
        }
        if n < FETCH_CHUNK as usize {
            return Ok(out);
        }
    }
}

/// Whether `schema` is the tracked data schema: read directly (`store::direct`) when it can
/// be, through SPI otherwise. Every claim and outcome asks.
pub fn is_tracked(client: &SpiClient<'_>, schema: &SchemaName) -> SpiResult<bool> {
    if let Some(tracked) = super::direct::is_tracked(schema.as_str()) {
        return Ok(tracked);
    }
    with_plan(
        client,
        "is_tracked",
        "",
        &[TEXT],
        || "SELECT 1 FROM tasker_core.tracking WHERE data_schema = $1".to_owned(),
        |stmt| Ok(client.select(stmt, Some(1), &[schema.as_str().into()])?.len() == 1),
    )
}

/// The facts of the steps of `task_ids` (ascending, each once): read directly when possible
/// (`store::direct`), through SPI otherwise — connecting to SPI only then. The one way in:
/// the SPI reads below do not try the direct read again.
pub fn read(schema: &SchemaName, task_ids: &[i64]) -> SpiResult<Vec<StepFacts>> {
    let mut direct = Vec::new();
    if super::direct::facts_for_tasks(schema.as_str(), task_ids, &mut direct).is_some() {
        return Ok(direct);
    }
    read_through_spi(schema, task_ids)
}

/// [`read`] through SPI only: for a caller whose direct read was not possible.
pub fn read_through_spi(schema: &SchemaName, task_ids: &[i64]) -> SpiResult<Vec<StepFacts>> {
    pgrx::spi::Spi::connect(|c| match task_ids {
        [one] => for_task(c, schema, *one),
        many => for_tasks(c, schema, many),
    })
}

/// [`read`] of one task through SPI, in no particular order.
fn for_task(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    task_id: i64,
) -> SpiResult<Vec<StepFacts>> {
    let q = schema.quoted();
    // The tracked read returns rows only when `schema` is the tracked one.
    let rows = with_plan(
        client,
        "facts_task_tracked",
        schema.as_str(),
        &[INT8, TEXT],
        || {
            format!(
                "SELECT {FACT_COLUMNS_TRACKED} FROM tasker_core.step_state s \
                 WHERE s.task_id = $1 AND EXISTS (SELECT 1 FROM tasker_core.tracking WHERE data_schema = $2)"
            )
        },
        |stmt| read_facts(client.select(stmt, None, &[task_id.into(), schema.as_str().into()])?),
    )?;
    if !rows.is_empty() || is_tracked(client, schema)? {
        return Ok(rows);
    }
    with_plan(
        client,
        "facts_task_recompute",
        schema.as_str(),
        &[INT8],
        || recompute_sql(&q, "ws.task_id = $1"),
        |stmt| read_facts(client.select(stmt, None, &[task_id.into()])?),
    )
}

/// [`read`] of several tasks through SPI, in no particular order.
fn for_tasks(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    task_ids: &[i64],
) -> SpiResult<Vec<StepFacts>> {
    if is_tracked(client, schema)? {
        return with_plan(
            client,
            "facts_tasks_tracked",
            schema.as_str(),
            &[INT8ARRAY],
            || {
                format!(
                    "SELECT {FACT_COLUMNS_TRACKED} FROM tasker_core.step_state s \
                     WHERE s.task_id = ANY($1)"
                )
            },
            |stmt| read_facts_chunked(client.open_cursor(stmt, &[task_ids.to_vec().into()])),
        );
    }
    let q = schema.quoted();
    with_plan(
        client,
        "facts_tasks_recompute",
        schema.as_str(),
        &[INT8ARRAY],
        || recompute_sql(&q, "ws.task_id = ANY($1)"),
        |stmt| read_facts_chunked(client.open_cursor(stmt, &[task_ids.to_vec().into()])),
    )
}

/// Current states (most_recent `to_state`, `None` without one) of the given steps.
pub fn states_of(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    step_ids: &[i64],
) -> SpiResult<HashMap<i64, Option<Rc<str>>>> {
    let mut out = HashMap::default();
    if step_ids.is_empty() {
        return Ok(out);
    }
    let q = schema.quoted();
    with_plan(
        client,
        "states_of",
        schema.as_str(),
        &[INT8ARRAY],
        || {
            format!(
                "SELECT ws.workflow_step_id, cur.to_state::text FROM {q}.tasker_workflow_steps ws \
                 LEFT JOIN {q}.tasker_workflow_step_transitions cur \
                        ON cur.workflow_step_id = ws.workflow_step_id AND cur.most_recent \
                 WHERE ws.workflow_step_id = ANY($1)"
            )
        },
        |stmt| {
            for row in client.select(stmt, None, &[step_ids.to_vec().into()])? {
                out.insert(
                    row.get::<i64>(1)?.unwrap_or_default(),
                    row.get::<String>(2)?.map(Rc::from),
                );
            }
            Ok(())
        },
    )?;
    Ok(out)
}

/// A task's `named_task_id` and current state (most_recent task transition, `None` without).
#[derive(Debug, Clone)]
pub struct TaskHead {
    pub task_id: i64,
    pub named_task_id: i32,
    pub state: Option<String>,
}

/// Heads of the given tasks that exist, ordered by task id.
pub fn task_heads(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    task_ids: &[i64],
) -> SpiResult<Vec<TaskHead>> {
    if let Some(heads) = super::direct::task_heads(schema.as_str(), task_ids) {
        return Ok(heads);
    }
    let q = schema.quoted();
    let sql = || {
        format!(
            "SELECT t.task_id, t.named_task_id, tt.to_state::text FROM {q}.tasker_tasks t \
             LEFT JOIN {q}.tasker_task_transitions tt ON tt.task_id = t.task_id AND tt.most_recent \
             WHERE t.task_id = ANY($1) ORDER BY t.task_id"
        )
    };
    with_plan(client, "task_heads", schema.as_str(), &[INT8ARRAY], sql, |stmt| {
        all_rows(client, stmt, &[task_ids.to_vec().into()], |row| {
            Ok(TaskHead {
                task_id: row.get::<i64>(1)?.unwrap_or_default(),
                named_task_id: row.get::<i32>(2)?.unwrap_or_default(),
                state: row.get::<String>(3)?,
            })
        })
    })
}

/// Edges leaving the given steps, as (from, to).
pub fn edges_from(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    step_ids: &[i64],
) -> SpiResult<Vec<(i64, i64)>> {
    let q = schema.quoted();
    with_plan(
        client,
        "edges_from",
        schema.as_str(),
        &[INT8ARRAY],
        || {
            format!(
                "SELECT e.from_step_id, e.to_step_id FROM {q}.tasker_workflow_step_edges e \
                 WHERE e.from_step_id = ANY($1)"
            )
        },
        |stmt| {
            all_rows(client, stmt, &[step_ids.to_vec().into()], |row| {
                Ok((row.get::<i64>(1)?.unwrap_or_default(), row.get::<i64>(2)?.unwrap_or_default()))
            })
        },
    )
}

/// Parent lists (`from_step_id` of every edge in, ascending) of the given steps.
pub fn parent_lists(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    step_ids: &[i64],
) -> SpiResult<Vec<(i64, Vec<i64>)>> {
    let q = schema.quoted();
    with_plan(
        client,
        "parent_lists",
        schema.as_str(),
        &[INT8ARRAY],
        || {
            format!(
                "SELECT ws.workflow_step_id, ARRAY(SELECT e.from_step_id FROM {q}.tasker_workflow_step_edges e \
                        WHERE e.to_step_id = ws.workflow_step_id ORDER BY e.from_step_id) \
                 FROM {q}.tasker_workflow_steps ws WHERE ws.workflow_step_id = ANY($1)"
            )
        },
        |stmt| {
            all_rows(client, stmt, &[step_ids.to_vec().into()], |row| {
                Ok((
                    row.get::<i64>(1)?.unwrap_or_default(),
                    row.get::<Vec<i64>>(2)?.unwrap_or_default(),
                ))
            })
        },
    )
}
