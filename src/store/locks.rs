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

use super::plans::{with_keyed_plan, INT8ARRAY};
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

/// The three kinds of row, each locked by a kept statement over an array of step ids, in id
/// order.
#[derive(Clone, Copy)]
enum Rows {
    Steps,
    CurrentTransitions,
    States,
}

fn lock(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    rows: Rows,
    ids: &[i64],
    nowait: bool,
) -> SpiResult<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let q = schema.quoted();
    let wait = if nowait { " NOWAIT" } else { "" };
    let key = match (rows, nowait) {
        (Rows::Steps, true) => "lock_rows_steps_nowait",
        (Rows::Steps, false) => "lock_rows_steps",
        (Rows::CurrentTransitions, true) => "lock_rows_current_nowait",
        (Rows::CurrentTransitions, false) => "lock_rows_current",
        (Rows::States, true) => "lock_rows_states_nowait",
        (Rows::States, false) => "lock_rows_states",
    };
    // (step_state is the extension's own table: one plan for every data schema)
    let schema_key = if matches!(rows, Rows::States) {
        ""
    } else {
        schema.as_str()
    };
    with_keyed_plan(
        client,
        key,
        schema_key,
        &[INT8ARRAY],
        || match rows {
            Rows::Steps => format!(
                "SELECT 1 FROM {q}.tasker_workflow_steps WHERE workflow_step_id = ANY ($1)
                 ORDER BY workflow_step_id FOR NO KEY UPDATE{wait}"
            ),
            Rows::CurrentTransitions => format!(
                "SELECT 1 FROM {q}.tasker_workflow_step_transitions
                 WHERE workflow_step_id = ANY ($1) AND most_recent
                 ORDER BY workflow_step_id FOR UPDATE{wait}"
            ),
            Rows::States => format!(
                "SELECT 1 FROM tasker_core.step_state s WHERE s.workflow_step_id = ANY ($1)
                 ORDER BY s.workflow_step_id FOR UPDATE{wait}"
            ),
        },
        |stmt| {
            client.select(stmt, None, &[ids.to_vec().into()])?;
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

/// What a call is about to write: the rows of `steps`, the current transitions of
/// `transitions_of` and the maintained rows `states` (of steps and their children).
#[derive(Debug, Default)]
pub struct LockSet {
    pub steps: Vec<i64>,
    pub transitions_of: Vec<i64>,
    pub states: Vec<i64>,
}

/// Locks every row of `set` at once, waiting for holders without holding anything.
pub fn lock_all(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    set: LockSet,
) -> Result<(), TaskerError> {
    let mut set = set;
    for ids in [&mut set.steps, &mut set.transitions_of, &mut set.states] {
        ids.sort_unstable();
        ids.dedup();
    }
    loop {
        let taken = in_subtransaction(|| {
            lock(client, schema, Rows::Steps, &set.steps, true)?;
            lock(
                client,
                schema,
                Rows::CurrentTransitions,
                &set.transitions_of,
                true,
            )?;
            lock(client, schema, Rows::States, &set.states, true)?;
            Ok(true)
        })?;
        if taken {
            return Ok(());
        }
        // wait until each row is free (taking it and letting it go at once), then try again
        for (rows, ids) in [
            (Rows::Steps, &set.steps),
            (Rows::CurrentTransitions, &set.transitions_of),
            (Rows::States, &set.states),
        ] {
            for &id in ids {
                in_subtransaction(|| lock(client, schema, rows, &[id], false).map(|_| false))?;
            }
        }
    }
}

/// Locks step `step` (its row, its current transition, its maintained row) and the maintained
/// rows of its `children` all at once.
pub fn lock_step_and_children(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    step: i64,
    children: &[i64],
) -> Result<(), TaskerError> {
    let mut states = children.to_vec();
    states.push(step);
    lock_all(
        client,
        schema,
        LockSet {
            steps: vec![step],
            transitions_of: vec![step],
            states,
        },
    )
}
