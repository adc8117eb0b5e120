//! Operator and helper functions of the worker protocol: backoff, manual resolution, lease
//! expiry for `tick()`, settings read through the library.

use super::args::{bounded, required};
use super::error::{attempt, OrRaise};
use super::json::JsonbText;
use crate::core::error::TaskerError;
use crate::store::{self, worker};
use pgrx::prelude::*;

/// The backoff, in seconds, after the `attempt`-th execution of a step failed: Retry-After
/// wins (capped at 300); else 1, 2, 4, 8, 16, 32, then attempt², capped at 300, with ±10 %
/// jitter drawn from `jitter_seed` (none when NULL).
#[pg_extern(immutable, parallel_safe)]
fn backoff_seconds(
    attempt: Option<i32>,
    retry_after_seconds: default!(Option<i32>, "NULL"),
    jitter_seed: default!(Option<i64>, "NULL"),
) -> i32 {
    // (`attempt` is the argument here)
    super::error::attempt(move || {
        let attempt = required(attempt, "attempt")?;
        // the same rule as fail_step's retry_after_seconds
        if let Some(r) = retry_after_seconds {
            bounded("retry_after_seconds", r, 0, i32::MAX)?;
        }
        Ok::<_, TaskerError>(crate::core::backoff::backoff_seconds(
            attempt,
            retry_after_seconds.map(i64::from),
            jitter_seed.map(|s| s as u64),
        ) as i32)
    })
    .or_raise()
}

/// Marks a step resolved by an operator with the given results (failing it first if it is in
/// progress), releases its lease, and finalizes its task.
#[pg_extern(volatile, parallel_unsafe)]
fn resolve_step_manually(
    step_id: Option<i64>,
    results: default!(Option<JsonbText>, "'{}'"),
) -> bool {
    attempt(move || {
        let step = required(step_id, "step_id")?;
        let results = JsonbText::parse_or_empty(results, "results")?;
        store::settings::check_payload("bytes of results", &results)?;
        worker::resolve_manually(&store::settings::data_schema()?, step, &results)
    })
    .or_raise()
}

/// Fails up to `max_steps` in-progress steps whose lease expired (used by `tick()`).
#[pg_extern(volatile, parallel_unsafe, name = "_expire_leases")]
fn expire_leases(max_steps: i32) -> i32 {
    attempt(move || {
        let schema = store::settings::data_schema()?;
        Spi::connect_mut(|c| worker::expire_leases(c, &schema, max_steps.clamp(1, 100_000)))
    })
    .map(|ids| ids.len() as i32)
    .or_raise()
}

/// Judges the dynamic steps of tasks whose parents have all finished, then finalizes the
/// tasks (used by `tick()` and `retry_task()`; the worker protocol does it as steps finish).
/// Returns how many tasks it finalized.
#[pg_extern(volatile, parallel_unsafe, name = "_advance_tasks")]
fn advance_tasks(task_ids: Vec<Option<i64>>) -> i32 {
    attempt(move || {
        let ids: Vec<i64> = task_ids.into_iter().flatten().collect();
        worker::advance_tasks(&store::settings::data_schema()?, ids)
    })
    .or_raise()
}

/// `tasker_core.max_subscriptions_per_login`, for `subscribe()`: read through the library so
/// that the setting is defined (superuser-only) even in a session that loaded nothing else.
#[pg_extern(stable, parallel_safe, name = "_max_subscriptions_per_login")]
fn max_subscriptions_per_login() -> i32 {
    store::settings::MAX_SUBSCRIPTIONS_PER_LOGIN.get()
}

/// A part of native readiness as SQL over a `tasker_core.step_state` row aliased `s`, for the
/// SQL functions that count ready steps (`metrics()`, `tick()`): `eligible` (claimable but
/// for its backoff) or `backoff_until` (when its explicit backoff ends, UTC; NULL without
/// one). The claims use the same text: readiness is written once, in `store::worker`.
#[pg_extern(immutable, parallel_safe, name = "_readiness_sql")]
fn readiness_sql(part: Option<String>) -> &'static str {
    attempt(move || match required(part, "part")?.as_str() {
        "eligible" => Ok(worker::eligible()),
        "backoff_until" => Ok(worker::BACKOFF_UNTIL),
        other => Err(TaskerError::InvalidArgument {
            argument: "part",
            reason: format!(
                "expected eligible or backoff_until, got {:?}",
                other.chars().take(64).collect::<String>()
            ),
        }),
    })
    .or_raise()
}

/// How many reads of the maintained state this backend made without SPI (see
/// `store::direct`); for tests that must know which path a readiness call took.
#[pg_extern(volatile, parallel_safe, name = "_direct_reads")]
fn direct_reads() -> i64 {
    store::direct::reads()
}
