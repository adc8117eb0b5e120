//! The worker protocol: claim steps under a lease, record their outcomes (one at a time or in
//! batches, with the next claims), heartbeat, give steps back.

use super::args::{bounded, required, valid_traceparent, worker_id};
use super::error::{attempt, OrRaise};
use super::json::JsonbText;
use crate::core::error::TaskerError;
use crate::store::{self, worker};
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

/// Declares items with the rows of a claim, spelt out once here: the `claim_steps` functions
/// (pgrx reads a `#[pg_extern]` signature from its tokens, so each must carry the columns
/// themselves) and the `ClaimRow` and `ClaimRows` types.
macro_rules! with_claim_columns {
    (@emit $cols:tt; type $row:ident, $rows:ident) => {
        type $row = $cols;
        type $rows = TableIterator<'static, $row>;
    };
    (@emit $cols:tt; $(#[$attr:meta])* fn $name:ident($($params:tt)*) $body:block) => {
        $(#[$attr])*
        #[allow(clippy::type_complexity)]
        fn $name($($params)*) -> TableIterator<'static, $cols> $body
    };
    ($($item:tt)*) => {
        with_claim_columns!(@emit (
            name!(task_id, i64),
            name!(workflow_step_id, i64),
            name!(step_name, String),
            name!(namespace, String),
            name!(task_name, String),
            name!(handler_class, Option<String>),
            name!(handler_config, Option<JsonbText>),
            name!(inputs, Option<JsonbText>),
            name!(parent_results, JsonbText),
            name!(attempt, i32),
            name!(lease_expires_at, Option<TimestampWithTimeZone>),
        ); $($item)*);
    };
}

with_claim_columns!(type ClaimRow, ClaimRows);

with_claim_columns!(
    /// Claims up to `max_steps` ready steps (of `namespaces`, all when NULL) for `worker_id`,
    /// leasing each for `lease_seconds`. Concurrent claimers never get the same step. Each row
    /// has what the worker needs: ids, names, handler class and config, inputs, the results of
    /// the step's parents by name, the attempt number and the lease deadline (the task's W3C
    /// `traceparent`, if any, comes from `task_traceparent(task_id)`). A worker's own
    /// `traceparent` joins each claimed task that has none to the worker's trace: from this
    /// claim on, the task's transitions and events carry it.
    #[pg_extern(volatile, parallel_unsafe, name = "claim_steps")]
    fn claim_steps_traced(
        worker_id: Option<String>,
        namespaces: default!(Option<Vec<Option<String>>>, "NULL"),
        max_steps: default!(Option<i32>, "1"),
        lease_seconds: default!(Option<i32>, "60"),
        traceparent: default!(Option<String>, "NULL"),
    ) {
        claim_rows(worker_id, namespaces, max_steps, lease_seconds, traceparent)
    }
);

with_claim_columns!(
    /// `claim_steps` as the SQL of 0.1.0 and 0.2.0 declares it (no traceparent): the library
    /// serves a database whose SQL objects are not updated yet.
    #[pg_extern(volatile, parallel_unsafe, sql = false)]
    fn claim_steps(
        worker_id: Option<String>,
        namespaces: Option<Vec<Option<String>>>,
        max_steps: Option<i32>,
        lease_seconds: Option<i32>,
    ) {
        claim_rows(worker_id, namespaces, max_steps, lease_seconds, None)
    }
);

fn claim_rows(
    worker_id: Option<String>,
    namespaces: Option<Vec<Option<String>>>,
    max_steps: Option<i32>,
    lease_seconds: Option<i32>,
    traceparent: Option<String>,
) -> ClaimRows {
    let claimed = attempt(move || {
        let a = claim_args(worker_id, namespaces, max_steps, 1, lease_seconds, traceparent)?;
        worker::claim(
            &store::settings::data_schema()?,
            &a.worker,
            a.namespaces,
            a.max_steps,
            a.lease_seconds,
            a.traceparent.as_deref(),
        )
    })
    .or_raise();
    let rows: Vec<ClaimRow> = claimed.into_iter().map(claim_row).collect();
    TableIterator::new(rows)
}

fn claim_row(c: worker::Claimed) -> ClaimRow {
    (
        c.task_id,
        c.workflow_step_id,
        c.step_name,
        c.namespace,
        c.task_name,
        c.handler_class,
        c.handler_config.map(JsonbText),
        c.inputs.map(JsonbText),
        JsonbText(c.parent_results),
        c.attempt,
        TimestampWithTimeZone::try_from(c.lease_expires_at).ok(),
    )
}

/// The checked arguments of a claim: worker, namespaces, step count (from `min_steps` up),
/// lease and trace.
struct ClaimArgs {
    worker: String,
    namespaces: Option<Vec<String>>,
    max_steps: i32,
    lease_seconds: i32,
    traceparent: Option<String>,
}

fn claim_args(
    worker_id: Option<String>,
    namespaces: Option<Vec<Option<String>>>,
    max_steps: Option<i32>,
    min_steps: i32,
    lease_seconds: Option<i32>,
    traceparent: Option<String>,
) -> Result<ClaimArgs, TaskerError> {
    Ok(ClaimArgs {
        worker: self::worker_id(worker_id)?,
        max_steps: bounded("max_steps", required(max_steps, "max_steps")?, min_steps, 1000)?,
        lease_seconds: bounded(
            "lease_seconds",
            required(lease_seconds, "lease_seconds")?,
            1,
            86_400,
        )?,
        traceparent: traceparent.map(|t| valid_traceparent("traceparent", t)).transpose()?,
        namespaces: namespaces.map(|v| v.into_iter().flatten().collect()),
    })
}

/// Records the success of a claimed step, finalizes its task, and wakes workers for the steps
/// that became ready. Fails with TK030 unless `worker_id` holds the step's lease.
#[pg_extern(volatile, parallel_unsafe)]
fn complete_step(
    step_id: Option<i64>,
    worker_id: Option<String>,
    results: default!(Option<JsonbText>, "'{}'"),
) -> bool {
    attempt(move || {
        let step = required(step_id, "step_id")?;
        let w = self::worker_id(worker_id)?;
        let results = JsonbText::parse_or_empty(results, "results")?;
        store::settings::check_payload("bytes of results", &results)?;
        worker::complete(&store::settings::data_schema()?, step, &w, &results).map(|_| true)
    })
    .or_raise()
}

/// Records the failure of a claimed step. Retryable failures back off (the server's
/// `retry_after_seconds` when given, capped at 300 s; else exponential with jitter) and are
/// claimed again; a permanent failure (`retryable` false) or exhausted retries block the step.
/// Returns the backoff in seconds, or NULL when the step will not be retried.
#[pg_extern(volatile, parallel_unsafe)]
fn fail_step(
    step_id: Option<i64>,
    worker_id: Option<String>,
    error: Option<JsonbText>,
    retryable: default!(Option<bool>, "true"),
    retry_after_seconds: default!(Option<i32>, "NULL"),
) -> Option<i32> {
    attempt(move || {
        let step = required(step_id, "step_id")?;
        let w = self::worker_id(worker_id)?;
        // any JSON value; stored under "error" in the step's results
        let error = required(error, "error")?.parse("error")?;
        if error.is_null() {
            return Err(TaskerError::NullArgument { argument: "error" });
        }
        store::settings::check_payload("bytes of error", &error)?;
        let retryable = retryable.unwrap_or(true);
        if let Some(r) = retry_after_seconds {
            bounded("retry_after_seconds", r, 0, i32::MAX)?;
        }
        let failure = worker::Failure {
            error: &error,
            retryable,
            retry_after: retry_after_seconds.map(i64::from),
        };
        worker::fail(&store::settings::data_schema()?, step, &w, failure)
            .map(|b| b.map(|s| s as i32))
    })
    .or_raise()
}

/// Records the outcomes of many claimed steps in one transaction (a worker's batch of finished
/// handlers): `outcomes` is a JSON array of `{"step_id": n, "results": {...}}` (success) and
/// `{"step_id": n, "error": ..., "retryable": bool, "retry_after_seconds": n}` (failure)
/// objects. Each step gets the guarantees of `complete_step` / `fail_step`; a step the worker
/// no longer holds is reported `lease_lost` and left unchanged while the others are recorded.
/// One row per step, in step id order: `completed`, `failed` (with the backoff, NULL when it
/// will not be retried) or `lease_lost`. A malformed batch changes nothing (22023; 54000 past
/// 1,000 outcomes).
#[pg_extern(volatile, parallel_unsafe)]
fn report_steps(
    worker_id: Option<String>,
    outcomes: Option<JsonbText>,
) -> TableIterator<
    'static,
    (name!(workflow_step_id, i64), name!(outcome, String), name!(backoff_seconds, Option<i32>)),
> {
    let rows = attempt(move || {
        let w = self::worker_id(worker_id)?;
        let batch = required(outcomes, "outcomes")?.parse("outcomes")?;
        store::settings::check_payload("bytes of outcomes", &batch)?;
        let parsed = crate::core::outcomes::parse(&batch)?;
        worker::report(&store::settings::data_schema()?, &w, &parsed)
    })
    .or_raise();
    TableIterator::new(rows.into_iter().map(|(step, reported)| {
        let (outcome, backoff) = reported_row(reported);
        (step, outcome, backoff)
    }))
}

/// `report_steps`, then `claim_steps` in the same transaction: a worker records what it
/// finished and takes up to `max_steps` next steps (0: none) with one commit, and a step its
/// outcomes made ready can be among them. One row per reported step first (`completed`,
/// `failed` with its backoff, or `lease_lost`; the claim columns NULL), in step id order, then
/// one `claimed` row per claimed step with the columns of `claim_steps`. The claim half never
/// waits for a lock (20 ms at most): when it would, the outcomes are recorded and nothing is
/// claimed. Bad input changes nothing, as for `report_steps` and `claim_steps`.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_unsafe)]
fn report_and_claim(
    worker_id: Option<String>,
    outcomes: Option<JsonbText>,
    namespaces: default!(Option<Vec<Option<String>>>, "NULL"),
    max_steps: default!(Option<i32>, "1"),
    lease_seconds: default!(Option<i32>, "60"),
    traceparent: default!(Option<String>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(outcome, String),
        name!(workflow_step_id, i64),
        name!(backoff_seconds, Option<i32>),
        name!(task_id, Option<i64>),
        name!(step_name, Option<String>),
        name!(namespace, Option<String>),
        name!(task_name, Option<String>),
        name!(handler_class, Option<String>),
        name!(handler_config, Option<JsonbText>),
        name!(inputs, Option<JsonbText>),
        name!(parent_results, Option<JsonbText>),
        name!(attempt, Option<i32>),
        name!(lease_expires_at, Option<TimestampWithTimeZone>),
    ),
> {
    let (reported, claimed) = attempt(move || {
        let a = claim_args(worker_id, namespaces, max_steps, 0, lease_seconds, traceparent)?;
        let batch = required(outcomes, "outcomes")?.parse("outcomes")?;
        store::settings::check_payload("bytes of outcomes", &batch)?;
        let parsed = crate::core::outcomes::parse(&batch)?;
        worker::report_and_claim(
            &store::settings::data_schema()?,
            &a.worker,
            &parsed,
            a.namespaces,
            a.max_steps,
            a.lease_seconds,
            a.traceparent.as_deref(),
        )
    })
    .or_raise();
    let reported = reported.into_iter().map(|(step, r)| {
        let (outcome, backoff) = reported_row(r);
        (outcome, step, backoff, None, None, None, None, None, None, None, None, None, None)
    });
    let claimed = claimed.into_iter().map(|c| {
        let (task, step, name, ns, task_name, class, config, inputs, parents, attempt, lease) =
            claim_row(c);
        (
            "claimed".to_owned(),
            step,
            None,
            Some(task),
            Some(name),
            Some(ns),
            Some(task_name),
            class,
            config,
            inputs,
            Some(parents),
            Some(attempt),
            lease,
        )
    });
    TableIterator::new(reported.chain(claimed).collect::<Vec<_>>())
}

/// A reported step's outcome and backoff as `report_steps` spells them.
fn reported_row(r: worker::Reported) -> (String, Option<i32>) {
    match r {
        worker::Reported::Completed => ("completed".to_owned(), None),
        worker::Reported::Failed(backoff) => ("failed".to_owned(), backoff.map(|s| s as i32)),
        worker::Reported::LeaseLost => ("lease_lost".to_owned(), None),
    }
}

/// Gives a claimed step back without counting the attempt (a worker shutting down before it
/// ran the handler); the step can be claimed again at once. TK030 unless `worker_id` holds it.
#[pg_extern(volatile, parallel_unsafe)]
fn release_step(step_id: Option<i64>, worker_id: Option<String>) -> bool {
    attempt(move || {
        let step = required(step_id, "step_id")?;
        let w = self::worker_id(worker_id)?;
        worker::release_claim(&store::settings::data_schema()?, step, &w).map(|_| true)
    })
    .or_raise()
}

/// Extends the lease of a claimed step by its lease length; returns the new deadline.
#[pg_extern(volatile, parallel_unsafe)]
fn heartbeat(step_id: Option<i64>, worker_id: Option<String>) -> Option<TimestampWithTimeZone> {
    attempt(move || {
        let step = required(step_id, "step_id")?;
        let w = self::worker_id(worker_id)?;
        worker::heartbeat(step, &w)
    })
    .map(|t| TimestampWithTimeZone::try_from(t).ok())
    .or_raise()
}
