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
use super::spi;
use crate::core::error::TaskerError;
use crate::core::ident::SchemaName;
use pgrx::pg_sys;
use pgrx::pg_sys::errcodes::PgSqlErrorCode;
use pgrx::pg_sys::PgTryBuilder;
use pgrx::spi::{SpiClient, SpiResult};
use std::cell::Cell;
use std::ffi::CStr;

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
    let schema_key = if matches!(rows, Rows::States) { "" } else { schema.as_str() };
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

/// Runs `f` in a subtransaction: kept when it returns `Ok(Some(_))`, rolled back — releasing
/// every lock it took — when it returns `Ok(None)` or fails with `lock_not_available` while
/// `retry_on_lock` says so (both `Ok(None)`). Any other error is returned or raised after the
/// rollback. With a `lock_timeout`, no lock inside is waited for longer than that (the setting
/// is restored when the subtransaction ends either way).
fn subtransaction<T>(
    lock_timeout: Option<&CStr>,
    retry_on_lock: &Cell<bool>,
    f: impl FnOnce() -> Result<Option<T>, TaskerError>,
) -> Result<Option<T>, TaskerError> {
    // SAFETY: the PL/pgSQL exception-block protocol: remember the memory context and resource
    // owner, begin an internal subtransaction, and whatever happens end it (release or roll
    // back) and restore both before returning or raising. PostgreSQL errors raised inside
    // unwind to the PgTryBuilder as Rust panics; SPI's state of the enclosing connection is
    // cleaned up by the subtransaction's abort, as for PL/pgSQL. The setting is changed the
    // way a function's SET clause changes it: at a GUC nest level of its own, popped on
    // success, and popped by the subtransaction's abort otherwise.
    unsafe {
        let cxt = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(cxt);
        let nest = lock_timeout.map(|value| {
            let level = pg_sys::NewGUCNestLevel();
            pg_sys::set_config_option(
                c"lock_timeout".as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
            level
        });
        let rollback = || {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(cxt);
            pg_sys::CurrentResourceOwner = owner;
        };
        // (only read after the unwind: the flag is set before anything it guards can fail)
        let retry = std::panic::AssertUnwindSafe(retry_on_lock);
        let outcome = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| Some(f())))
            .catch_when(PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE, |e| {
                if retry.get() {
                    return None;
                }
                rollback();
                e.rethrow()
            })
            .catch_others(|e| {
                rollback();
                e.rethrow()
            })
            .execute();
        let keep = matches!(outcome, Some(Ok(Some(_))));
        if keep {
            if let Some(level) = nest {
                pg_sys::AtEOXact_GUC(true, level);
            }
            pg_sys::ReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(cxt);
            pg_sys::CurrentResourceOwner = owner;
        } else {
            rollback();
        }
        match outcome {
            Some(Err(e)) => Err(e),
            Some(Ok(kept)) => Ok(kept),
            None => Ok(None),
        }
    }
}

/// [`subtransaction`] for a locking statement: whether it was kept.
fn in_subtransaction(f: impl FnOnce() -> SpiResult<bool>) -> Result<bool, TaskerError> {
    subtransaction(None, &Cell::new(true), || f().map(|keep| keep.then_some(())).map_err(spi))
        .map(|k| k.is_some())
}

/// How long the second half of a combined call may wait for one lock before it gives up.
const PATIENCE: &CStr = c"20ms";

/// Runs `f` (work that takes locks after the caller already holds others) so that it never
/// takes part in a deadlock: in a subtransaction where no lock is waited for longer than
/// 20 ms. If one would be, everything `f` did is rolled back and the answer is `None`; what
/// the caller did before stays. 20 ms is a few commits of whoever holds the lock, and far
/// below `deadlock_timeout` (1 s by default), so a cycle through this transaction is broken
/// by this side giving up before PostgreSQL's detector would cancel anyone.
pub fn without_waiting<T>(
    f: impl FnOnce() -> Result<T, TaskerError>,
) -> Result<Option<T>, TaskerError> {
    subtransaction(Some(PATIENCE), &Cell::new(true), || f().map(Some))
}

/// What a call is about to write: the rows of `steps`, the current transitions of
/// `transitions_of` and the maintained rows `states` (of steps and their children).
#[derive(Debug, Default)]
pub struct LockSet {
    pub steps: Vec<i64>,
    pub transitions_of: Vec<i64>,
    pub states: Vec<i64>,
}

/// Locks every row of `set` at once, waiting for holders without holding anything, then runs
/// `body` — the writes to those rows — in the same subtransaction. A row locked by one
/// (sub)transaction id and then written by another of the same transaction gets a MultiXact
/// (both must be remembered in case one rolls back): that cost every completion several
/// MultiXacts, and every later reader of those rows a lookup in the MultiXact SLRU. Locked and
/// written by one subtransaction, the rows need none. A `lock_not_available` from `body` (the
/// caller's `lock_timeout`) is raised, not retried.
pub fn with_all_locked<T>(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    set: LockSet,
    body: impl FnOnce() -> Result<T, TaskerError>,
) -> Result<T, TaskerError> {
    let set = set.sorted();
    let mut body = Some(body);
    loop {
        if let Some(out) = attempt(client, schema, &set, &mut body)? {
            return Ok(out);
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

/// [`with_all_locked`] for a caller that already holds rows, which must not wait while it
/// holds them: when any row of `set` is another transaction's, nothing is taken, `body` does
/// not run and the answer is `None`. (Rows the caller holds are taken at once.)
pub fn try_all_locked<T>(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    set: LockSet,
    body: impl FnOnce() -> Result<T, TaskerError>,
) -> Result<Option<T>, TaskerError> {
    attempt(client, schema, &set.sorted(), &mut Some(body))
}

impl LockSet {
    /// Each list in id order, once per id (the order every locker takes rows in).
    fn sorted(mut self) -> LockSet {
        for ids in [&mut self.steps, &mut self.transitions_of, &mut self.states] {
            ids.sort_unstable();
            ids.dedup();
        }
        self
    }
}

/// One try of [`with_all_locked`]: every row of `set` at once (NOWAIT) and then `body`, in one
/// subtransaction; `None`, with nothing taken and `body` kept, when a row is held elsewhere.
fn attempt<T, F: FnOnce() -> Result<T, TaskerError>>(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    set: &LockSet,
    body: &mut Option<F>,
) -> Result<Option<T>, TaskerError> {
    let locking = Cell::new(true);
    subtransaction(None, &locking, || {
        lock(client, schema, Rows::Steps, &set.steps, true).map_err(spi)?;
        lock(client, schema, Rows::CurrentTransitions, &set.transitions_of, true).map_err(spi)?;
        lock(client, schema, Rows::States, &set.states, true).map_err(spi)?;
        locking.set(false);
        match body.take() {
            Some(body) => body().map(Some),
            None => Err(TaskerError::Internal { context: "the locked body ran twice".into() }),
        }
    })
}

/// Locks step `step` (its row, its current transition, its maintained row), the maintained
/// rows of its `children` and the rows of the unjudged dynamic steps its completion may judge
/// ([`crate::store::worker::Children::lock_set`]) all at once, then runs `body`
/// ([`with_all_locked`]).
pub fn lock_step_and_children<T>(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    step: i64,
    children: crate::store::worker::Children,
    body: impl FnOnce() -> Result<T, TaskerError>,
) -> Result<T, TaskerError> {
    with_all_locked(client, schema, children.lock_set(&[step], &[]), body)
}
