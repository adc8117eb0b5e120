//! Taking a step's rows and its children's all at once or not at all (a PL/pgSQL function
//! did it before 0.5.0 and re-planned its dynamic statements on every call).
//!
//! Completing a step writes its row, its current transition, its maintained row and its
//! children's maintained rows (their blocked counts). Others take these rows in other orders:
//! an application writes a child and then its parent (or the reverse), Statesman writes a
//! step's transitions and its trigger then takes the maintained rows. Holding one while
//! waiting for another would deadlock with one of those orders, so either every row is taken
//! at once (NOWAIT, in a subtransaction), or none is held: the caller waits for each holder in
//! turn, holding nothing, and tries again.

use super::plans::{with_write_plan, INT8, INT8ARRAY};
use crate::core::error::TaskerError;
use crate::core::ident::SchemaName;
use pgrx::pg_sys;
use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::PgTryBuilder;
use pgrx::spi::{SpiClient, SpiResult};

fn spi(e: pgrx::spi::Error) -> TaskerError {
    TaskerError::Internal {
        context: format!("SPI failure while locking a step: {e}"),
    }
}

/// The three kinds of row, each a kept statement of one step (or array of steps) parameter.
#[derive(Clone, Copy)]
enum Rows {
    Step,
    CurrentTransition,
    States,
}

fn lock(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    rows: Rows,
    step: i64,
    states: &[i64],
    nowait: bool,
) -> SpiResult<()> {
    let q = schema.quoted();
    let wait = if nowait { " NOWAIT" } else { "" };
    let (key, arg_type) = match (rows, nowait) {
        (Rows::Step, true) => ("lock_rows_step_nowait", INT8),
        (Rows::Step, false) => ("lock_rows_step", INT8),
        (Rows::CurrentTransition, true) => ("lock_rows_current_nowait", INT8),
        (Rows::CurrentTransition, false) => ("lock_rows_current", INT8),
        (Rows::States, true) => ("lock_rows_states_nowait", INT8ARRAY),
        (Rows::States, false) => ("lock_rows_states", INT8ARRAY),
    };
    // (step_state is the extension's own table: one plan for every data schema)
    let schema_key = if matches!(rows, Rows::States) {
        ""
    } else {
        schema.as_str()
    };
    with_write_plan(
        client,
        key,
        schema_key,
        &[arg_type],
        || {
            match rows {
            Rows::Step => format!(
                "SELECT 1 FROM {q}.tasker_workflow_steps WHERE workflow_step_id = $1 FOR NO KEY UPDATE{wait}"
            ),
            Rows::CurrentTransition => format!(
                "SELECT 1 FROM {q}.tasker_workflow_step_transitions
                 WHERE workflow_step_id = $1 AND most_recent FOR UPDATE{wait}"
            ),
            Rows::States => format!(
                "SELECT 1 FROM tasker_core.step_state s WHERE s.workflow_step_id = ANY ($1)
                 ORDER BY s.workflow_step_id FOR UPDATE{wait}"
            ),
        }
        },
        |stmt| {
            let arg = match rows {
                Rows::States => states.to_vec().into(),
                _ => step.into(),
            };
            client.select(stmt, None, &[arg])?;
            Ok(())
        },
    )
}

/// Runs `f` in a subtransaction: kept (`Ok(true)`) when it succeeds, rolled back — releasing
/// every lock it took — when `f` asks for it (`Ok(false)`) or when it fails with
/// `lock_not_available` (`Ok(false)` too). Any other error is raised after the rollback.
fn in_subtransaction(f: impl FnOnce() -> SpiResult<bool>) -> Result<bool, TaskerError> {
    // SAFETY: the PL/pgSQL exception-block protocol: remember the memory context and resource
    // owner, begin an internal subtransaction, and whatever happens end it (release or roll
    // back) and restore both before returning or raising. PostgreSQL errors raised inside
    // unwind to the PgTryBuilder as Rust panics; SPI's state of the enclosing connection is
    // cleaned up by the subtransaction's abort, as for PL/pgSQL.
    unsafe {
        let cxt = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(cxt);
        let outcome = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| Some(f())))
            .catch_when(PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE, |_| None)
            .catch_others(|e| {
                pg_sys::RollbackAndReleaseCurrentSubTransaction();
                pg_sys::MemoryContextSwitchTo(cxt);
                pg_sys::CurrentResourceOwner = owner;
                e.rethrow()
            })
            .execute();
        let keep = matches!(outcome, Some(Ok(true)));
        if keep {
            pg_sys::ReleaseCurrentSubTransaction();
        } else {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(cxt);
        pg_sys::CurrentResourceOwner = owner;
        match outcome {
            Some(Err(e)) => Err(spi(e)),
            _ => Ok(keep),
        }
    }
}

/// Locks step `step` (its row, its current transition, its maintained row) and the maintained
/// rows of `children` (non-empty) all at once, waiting for holders without holding anything.
pub fn lock_step_and_children(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    step: i64,
    children: &[i64],
) -> Result<(), TaskerError> {
    let mut states = children.to_vec();
    states.push(step);
    loop {
        let taken = in_subtransaction(|| {
            lock(client, schema, Rows::Step, step, &[], true)?;
            lock(client, schema, Rows::CurrentTransition, step, &[], true)?;
            lock(client, schema, Rows::States, step, &states, true)?;
            Ok(true)
        })?;
        if taken {
            return Ok(());
        }
        // wait until each row is free (taking it and letting it go at once), then try again
        for rows in [Rows::Step, Rows::CurrentTransition] {
            in_subtransaction(|| lock(client, schema, rows, step, &[], false).map(|_| false))?;
        }
        for &id in &states {
            in_subtransaction(|| {
                lock(client, schema, Rows::States, id, &[id], false).map(|_| false)
            })?;
        }
    }
}
