//! The worker protocol: claim ready steps under a lease, complete or fail them, heartbeat,
//! and finalize the task — each call one transaction.
//!
//! Native readiness (what a claim takes): the step is pending or in error, not processed nor
//! in process, every parent complete or resolved_manually (the maintained blocked count is 0),
//! attempts below the retry limit, retryable (or never attempted: `retryable = false` stops
//! retries, not the first run — unlike the Rails function), and its explicit backoff
//! (`last_attempted_at + backoff_request_seconds`) expired by `tasker_core.now()` (UTC). A
//! step in progress whose lease expired is failed (`lease_expired`) and, retries permitting,
//! claimed again.

use super::events::{self, NewEvent, READY_CHANNEL};
use super::maintenance;
use super::plans::{
    all_rows, one_row, one_value, with_keyed_plan, with_plan, with_write_plan, BOOL, INT4, INT8,
    INT8ARRAY, JSONB, NOW, TEXT, TEXTARRAY,
};
use super::spi;
use super::transitions::{self, transition};
use crate::core::backoff;
use crate::core::error::TaskerError;
use crate::core::finalize::{Finalization, TaskCounts};
use crate::core::ident::SchemaName;
use crate::core::outcomes::Outcome;
use crate::core::state::Entity::{Step, Task};
use crate::core::state::{Entity, State};
use pgrx::spi::{Spi, SpiClient, SpiResult};
use pgrx::JsonB;
use serde_json::{json, Value};
use std::collections::BTreeSet;

mod claim;
pub mod dynamic;
mod finalize;
mod lease;
mod outcome;

pub use claim::*;
pub use finalize::*;
pub use lease::*;
pub use outcome::*;

// Native readiness (see the module comment), written once: the claim and the finalizer use
// CLAIMABLE; metrics() and tick(), in SQL, read the two parts through
// `tasker_core._readiness_sql` and build their statements with them. From the SQL of 0.8.0
// on, a root step of a task scheduled for later is not eligible until it is promoted
// (`not_before` cleared); the SQL of earlier versions has no such column, and a library
// serves it until `ALTER EXTENSION tasker_core UPDATE`: the `_07` texts are for it.
macro_rules! eligible_07 {
    () => {
        "(s.blocked_parents = 0 AND s.processed IS NOT TRUE AND s.in_process IS NOT TRUE
          AND (s.state IS NULL OR s.state IN ('pending', 'error'))
          AND COALESCE(s.attempts, 0) < COALESCE(s.retry_limit, 3)
          AND (COALESCE(s.retryable, true) OR COALESCE(s.attempts, 0) = 0))"
    };
}
macro_rules! eligible {
    () => {
        concat!("(", eligible_07!(), " AND s.not_before IS NULL)")
    };
}
macro_rules! backoff_until {
    () => {
        "(s.last_attempted_at + s.backoff_request_seconds * interval '1 second')"
    };
}
macro_rules! claimable {
    ($eligible:expr) => {
        concat!(
            $eligible,
            " AND (",
            backoff_until!(),
            " IS NULL OR ",
            backoff_until!(),
            " <= (tasker_core.now() AT TIME ZONE 'UTC'))"
        )
    };
}

/// Whether a `tasker_core.step_state` row `s` could be claimed but for its backoff.
const ELIGIBLE: &str = eligible!();
const ELIGIBLE_07: &str = eligible_07!();
/// When the explicit backoff of row `s` ends (UTC), NULL without one.
pub const BACKOFF_UNTIL: &str = backoff_until!();
/// Whether row `s` can be claimed now.
const CLAIMABLE: &str = claimable!(eligible!());
const CLAIMABLE_07: &str = claimable!(eligible_07!());

/// Whether `tasker_core.step_state` has the scheduling columns (`priority`, `not_before`: the
/// SQL of 0.8.0 on).
pub fn scheduling_installed() -> bool {
    super::events::own_column(c"step_state", c"not_before")
}

/// [`ELIGIBLE`] for the installed SQL.
pub fn eligible() -> &'static str {
    if scheduling_installed() {
        ELIGIBLE
    } else {
        ELIGIBLE_07
    }
}

/// [`CLAIMABLE`] for the installed SQL, and whether that SQL has the scheduling columns (the
/// plans built with either text are kept under keys of their own).
pub(super) fn claimable() -> (&'static str, bool) {
    if scheduling_installed() {
        (CLAIMABLE, true)
    } else {
        (CLAIMABLE_07, false)
    }
}

/// The columns of a step that `step_state` mirrors and the worker protocol changes: the
/// RETURNING list of a self-maintained update of `tasker_workflow_steps` (see
/// `store::maintenance`).
pub(super) const MIRRORED: &str =
    "workflow_step_id, retryable, retry_limit, in_process, processed, attempts, \
                        last_attempted_at, backoff_request_seconds";

/// The CTEs `upd` — `update` (of steps), returning `extra` and the [`MIRRORED`] columns — and
/// `mirror`, which copies those columns into the steps' maintained rows: what the row trigger
/// does, in the statement that made the change.
pub(super) fn mirrored(update: &str, extra: &str) -> String {
    format!(
        "upd AS ({update} RETURNING {extra}{MIRRORED}),
         mirror AS (UPDATE tasker_core.step_state s
                    SET retryable = m.retryable, retry_limit = m.retry_limit, in_process = m.in_process,
                        processed = m.processed, attempts = m.attempts,
                        last_attempted_at = m.last_attempted_at,
                        backoff_request_seconds = m.backoff_request_seconds
                    FROM upd m WHERE s.workflow_step_id = m.workflow_step_id)"
    )
}

/// Runs a kept update of steps, self-maintained (`direct`: the caller's schema is tracked and
/// the SQL of 0.5.0 is installed; under its own plan key `key_direct`) or left to the triggers
/// (`key`). `sql(direct)` writes the statement.
#[allow(clippy::too_many_arguments)]
pub(super) fn step_update<R>(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    direct: bool,
    key: &'static str,
    key_direct: &'static str,
    args: &[pgrx::pg_sys::PgOid],
    sql: impl FnOnce(bool) -> String,
    f: impl FnOnce(&pgrx::spi::OwnedPreparedStatement) -> SpiResult<R>,
) -> Result<R, TaskerError> {
    let _direct = direct.then(maintenance::Direct::begin);
    with_write_plan(
        client,
        if direct { key_direct } else { key },
        schema.as_str(),
        args,
        || sql(direct),
        f,
    )
    .map_err(spi)
}

pub(super) fn require_tracked(
    client: &SpiClient<'_>,
    schema: &SchemaName,
) -> Result<(), TaskerError> {
    super::schema::require_installed_cached(client, schema)?;
    if super::facts::is_tracked(client, schema).map_err(spi)? {
        Ok(())
    } else {
        Err(TaskerError::TrackingDisabled { schema: schema.as_str().to_owned() })
    }
}

/// Wakes workers (NOTIFY on `tasker_ready`, once per transaction). With the count of the
/// task's ready steps, the wake-up is taken back when this transaction claims them all itself
/// (`report_and_claim`; only where the notifier sends wake-ups after commit).
pub fn wake(
    client: &SpiClient<'_>,
    task_id: i64,
    namespace: &str,
    ready: Option<i64>,
) -> SpiResult<()> {
    let payload = json!({ "task_id": task_id, "namespace": namespace });
    if let Some(ready) = ready {
        if crate::store::settings::NOTIFY.get()
            && crate::store::wakeups::defer_ready(namespace, task_id, ready, &payload)
        {
            return Ok(());
        }
    }
    events::notify_channel_once(client, READY_CHANNEL, namespace, &payload)
}

pub(super) fn emit(
    client: &SpiClient<'_>,
    name: &str,
    task_id: i64,
    step_id: Option<i64>,
    payload: Value,
) -> Result<(), TaskerError> {
    events::emit(
        client,
        &NewEvent {
            name,
            task_id: Some(task_id),
            step_id,
            from_state: None,
            to_state: None,
            payload,
        },
    )
    .map_err(spi)?;
    Ok(())
}
