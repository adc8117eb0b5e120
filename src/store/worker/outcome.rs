//! Outcomes under a lease: completions, failures and batches of them (with the next claims).

use super::*;

/// Records a step's success: results, processed, `in_progress -> complete`, then finalizes
/// the task and wakes workers for the steps that became ready.
pub fn complete(
    schema: &SchemaName,
    step_id: i64,
    worker_id: &str,
    results: &Value,
) -> Result<(), TaskerError> {
    Spi::connect_mut(|client| {
        require_tracked(client, schema)?;
        lock_step_rows(client, schema, step_id, true, || {
            let task_id = complete_held(client, schema, step_id, worker_id, results)?;
            finalize(client, schema, task_id)?;
            Ok(())
        })
    })
}

/// The step half of [`complete`], its rows locked: checks the lease, records the results and
/// moves the step to complete. Returns its task, for the caller to finalize.
pub(super) fn complete_held(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    step_id: i64,
    worker_id: &str,
    results: &Value,
) -> Result<i64, TaskerError> {
    let (task_id, _) = check_lease(client, step_id, worker_id)?;
    record_results(client, schema, step_id, results)?;
    let meta = JsonB(json!({ "worker_id": worker_id }));
    transition(schema, Step, step_id, State::Complete, &meta, Some(State::InProgress))?;
    Ok(task_id)
}

/// What became of one step of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reported {
    Completed,
    /// Failed; retried after the backoff (seconds), or never (`None`).
    Failed(Option<i64>),
    /// The worker no longer holds the step: nothing was changed for it.
    LeaseLost,
}

/// Records many outcomes of steps held by `worker_id` in one transaction, each with the
/// guarantees of [`complete`] and [`fail`]. The rows of every step (and of the children of
/// completed ones) are locked at once, as a single call locks one step's; steps are then
/// processed in id order and their tasks finalized in id order (so concurrent batches never
/// deadlock). A step the worker no longer holds is reported `LeaseLost` and left as it is; the
/// others are recorded. `outcomes` must name each step once.
pub fn report(
    schema: &SchemaName,
    worker_id: &str,
    outcomes: &[(i64, Outcome)],
) -> Result<Vec<(i64, Reported)>, TaskerError> {
    let mut order: Vec<&(i64, Outcome)> = outcomes.iter().collect();
    order.sort_by_key(|(id, _)| *id);
    Spi::connect_mut(|client| {
        require_tracked(client, schema)?;
        let completing: Vec<i64> = order
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Complete { .. }))
            .map(|(id, _)| *id)
            .collect();
        let reported: Vec<i64> = order.iter().map(|(id, _)| *id).collect();
        let set = children_of(client, &completing)?.lock_set(&completing, &reported);
        crate::store::locks::with_all_locked(client, schema, set, || {
            record_outcomes(client, schema, worker_id, &order)
        })
    })
}

/// The body of [`report`], every row locked: each step's outcome in id order, then their
/// tasks finalized in id order.
pub(super) fn record_outcomes(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    worker_id: &str,
    order: &[&(i64, Outcome)],
) -> Result<Vec<(i64, Reported)>, TaskerError> {
    {
        let mut out = Vec::with_capacity(order.len());
        let mut tasks = BTreeSet::new();
        for (step_id, outcome) in order {
            let done = match outcome {
                Outcome::Complete { results } => {
                    complete_held(client, schema, *step_id, worker_id, results)
                        .map(|task| (task, Reported::Completed))
                }
                Outcome::Fail { error, retryable, retry_after } => {
                    let failure =
                        Failure { error, retryable: *retryable, retry_after: *retry_after };
                    fail_held(client, schema, *step_id, worker_id, failure)
                        .map(|(task, backoff)| (task, Reported::Failed(backoff)))
                }
            };
            match done {
                Ok((task, reported)) => {
                    tasks.insert(task);
                    out.push((*step_id, reported));
                }
                // (check_lease refuses before anything is written for the step)
                Err(TaskerError::LeaseLost { .. }) => out.push((*step_id, Reported::LeaseLost)),
                Err(e) => return Err(e),
            }
        }
        dynamic::advance_and_finalize(client, schema, &tasks, true)?;
        Ok(out)
    }
}

/// What [`report_and_claim`] did: each step's outcome, then the steps it claimed.
pub type ReportedAndClaimed = (Vec<(i64, Reported)>, Vec<Claimed>);

/// [`report`], then [`claim`] of up to `max_steps` steps in the same transaction: a worker
/// that finishes steps takes its next ones with one commit instead of two, and a step its
/// outcomes made ready can start at once. The report holds its rows' locks while the claim
/// takes others, which could close a cycle with another worker's report; so the claim never
/// waits for a lock ([`crate::store::locks::without_waiting`]): if it would, it claims nothing
/// (the outcomes are recorded all the same) and the worker claims on its next turn.
#[allow(clippy::too_many_arguments)]
pub fn report_and_claim(
    schema: &SchemaName,
    worker_id: &str,
    outcomes: &[(i64, Outcome)],
    namespaces: Option<Vec<String>>,
    max_steps: i32,
    lease_seconds: i32,
    traceparent: Option<&str>,
) -> Result<ReportedAndClaimed, TaskerError> {
    let reported = report(schema, worker_id, outcomes)?;
    if max_steps == 0 {
        return Ok((reported, Vec::new()));
    }
    let claimed = crate::store::locks::without_waiting(|| {
        claim(schema, worker_id, namespaces, max_steps, lease_seconds, traceparent)
    })?
    .unwrap_or_default();
    crate::store::wakeups::claimed_by_this_transaction(claimed.iter().map(|c| c.task_id));
    Ok((reported, claimed))
}

/// The children of steps (see [`children_of`]).
#[derive(Debug, Default)]
pub struct Children {
    /// Each child once per edge.
    pub all: Vec<i64>,
    /// The dynamic steps among them not judged yet (`not_before` is `infinity`), and those a
    /// judgement of them may make due in turn (a skip that cascades, an empty map that
    /// completes at once): the unjudged dynamic steps reachable from them through unjudged
    /// dynamic steps. Completing their last parent judges them in the same transaction, so
    /// their own rows are locked with the completion's, before anything is held: a
    /// `cancel_task` locking the task's steps in id order, one of them first, would otherwise
    /// wait for the completion while the completion waited for it.
    pub unjudged: Vec<i64>,
    /// The children of `unjudged` (whose maintained rows a judgement of those writes).
    pub reached: Vec<i64>,
}

impl Children {
    /// What a call that finishes (or judges) `finishing` and writes the rows of `others` takes
    /// at once: those steps' rows, the current transitions and maintained rows of the steps it
    /// finishes, the maintained rows of their children, and every row of the unjudged dynamic
    /// steps it may judge in the same transaction.
    pub fn lock_set(self, finishing: &[i64], others: &[i64]) -> crate::store::locks::LockSet {
        let mut steps = others.to_vec();
        steps.extend(finishing);
        steps.extend(&self.unjudged);
        let mut transitions_of = finishing.to_vec();
        transitions_of.extend(&self.unjudged);
        let mut states = self.all;
        states.extend(finishing);
        states.extend(self.unjudged);
        states.extend(self.reached);
        crate::store::locks::LockSet { steps, transitions_of, states }
    }
}

/// The children of `steps`, from their maintained rows.
pub(super) fn children_of(client: &SpiClient<'_>, steps: &[i64]) -> Result<Children, TaskerError> {
    if steps.is_empty() {
        return Ok(Children::default());
    }
    let dynamic = dynamic::installed();
    let mut children = with_plan(
        client,
        if dynamic { "worker_children_of_dynamic" } else { "worker_children_of" },
        "",
        &[INT8ARRAY],
        || {
            if dynamic {
                "SELECT c.id, COALESCE(k.not_before = 'infinity', false)
                 FROM tasker_core.step_state s
                 CROSS JOIN LATERAL unnest(s.child_ids) AS c(id)
                 LEFT JOIN tasker_core.step_state k ON k.workflow_step_id = c.id
                 WHERE s.workflow_step_id = ANY ($1)"
            } else {
                "SELECT c, false FROM tasker_core.step_state s, unnest(s.child_ids) c
                 WHERE s.workflow_step_id = ANY ($1)"
            }
            .to_owned()
        },
        |stmt| {
            let mut out = Children::default();
            for row in client.select(stmt, None, &[steps.to_vec().into()])? {
                let id = row.get::<i64>(1)?.unwrap_or_default();
                if row.get::<bool>(2)?.unwrap_or_default() {
                    out.unjudged.push(id);
                }
                out.all.push(id);
            }
            Ok(out)
        },
    )
    .map_err(spi)?;
    if !children.unjudged.is_empty() {
        cascade(client, &mut children)?;
    }
    Ok(children)
}

/// Widens `children.unjudged` to every unjudged dynamic step reachable from them through
/// unjudged dynamic steps, and lists their children in `reached` (only for steps with an
/// unjudged dynamic child: no statement otherwise).
fn cascade(client: &SpiClient<'_>, children: &mut Children) -> Result<(), TaskerError> {
    let (unjudged, reached) = with_plan(
        client,
        "worker_children_cascade",
        "",
        &[INT8ARRAY],
        || {
            "WITH RECURSIVE c(id) AS (
                 SELECT unnest($1::bigint[])
                 UNION
                 SELECT k.workflow_step_id
                 FROM c
                 JOIN tasker_core.step_state s ON s.workflow_step_id = c.id
                 CROSS JOIN LATERAL unnest(s.child_ids) AS x(id)
                 JOIN tasker_core.step_state k
                   ON k.workflow_step_id = x.id AND k.not_before = 'infinity')
             SELECT c.id, s.child_ids FROM c
             JOIN tasker_core.step_state s ON s.workflow_step_id = c.id"
                .to_owned()
        },
        |stmt| {
            let (mut unjudged, mut reached) = (Vec::new(), Vec::new());
            for row in client.select(stmt, None, &[children.unjudged.clone().into()])? {
                unjudged.push(row.get::<i64>(1)?.unwrap_or_default());
                reached.extend(row.get::<Vec<i64>>(2)?.unwrap_or_default());
            }
            Ok((unjudged, reached))
        },
    )
    .map_err(spi)?;
    children.unjudged = unjudged;
    children.reached = reached;
    Ok(())
}

/// A step's failure as its worker reports it: the error (stored under `error` in the step's
/// results), whether it may be retried, and the worker's own backoff in seconds.
#[derive(Clone, Copy)]
pub struct Failure<'a> {
    pub error: &'a Value,
    pub retryable: bool,
    pub retry_after: Option<i64>,
}

/// Records a step's failure: error in results, backoff, `in_progress -> error`; a permanent
/// failure marks the step not retryable. Then finalizes the task. Returns the backoff in
/// seconds, or `None` when the step will not be retried.
pub fn fail(
    schema: &SchemaName,
    step_id: i64,
    worker_id: &str,
    failure: Failure<'_>,
) -> Result<Option<i64>, TaskerError> {
    Spi::connect_mut(|client| {
        require_tracked(client, schema)?;
        lock_step(client, schema, step_id)?;
        let (task_id, backoff) = fail_held(client, schema, step_id, worker_id, failure)?;
        finalize(client, schema, task_id)?;
        Ok(backoff)
    })
}

/// The step half of [`fail`], its row locked: checks the lease, records the failure and its
/// backoff, moves the step to error. Returns its task (for the caller to finalize) and the
/// backoff, `None` when the step will not be retried.
pub(super) fn fail_held(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    step_id: i64,
    worker_id: &str,
    failure: Failure<'_>,
) -> Result<(i64, Option<i64>), TaskerError> {
    let Failure { error, retryable, retry_after } = failure;
    let q = schema.quoted();
    let (task_id, _) = check_lease(client, step_id, worker_id)?;
    let (attempts, retry_limit, step_retryable): (i32, i32, bool) = with_write_plan(
        client,
        "step_attempts",
        schema.as_str(),
        &[INT8],
        || {
            format!(
                "SELECT COALESCE(attempts, 0), COALESCE(retry_limit, 3), COALESCE(retryable, true)
                        FROM {q}.tasker_workflow_steps WHERE workflow_step_id = $1"
            )
        },
        |stmt| {
            let t = client.select(stmt, Some(1), &[step_id.into()])?;
            let r = t.first();
            Ok((
                r.get::<i32>(1)?.unwrap_or_default(),
                r.get::<i32>(2)?.unwrap_or(3),
                r.get::<bool>(3)?.unwrap_or(true),
            ))
        },
    )
    .map_err(spi)?;
    let seed = crate::store::settings::jitter_seed(step_id, attempts);
    let backoff_secs = backoff::backoff_seconds(attempts, retry_after, seed);
    // not retried when the worker says so, or the step was declared not retryable
    let will_retry = retryable && step_retryable && attempts < retry_limit;
    step_update(
        client,
        schema,
        maintenance::installed(),
        "fail_step",
        "fail_step_direct",
        &[INT8, JSONB, BOOL, INT4],
        |direct| {
            let update = format!(
                    "UPDATE {q}.tasker_workflow_steps
                        SET results = COALESCE(results, '{{}}'::jsonb) || jsonb_build_object('error', $2::jsonb),
                            processed = false, in_process = false, last_attempted_at = {NOW},
                            backoff_request_seconds = $4,
                            retryable = retryable AND $3, updated_at = {NOW}
                      WHERE workflow_step_id = $1"
                );
            with_mirror(direct, update)
        },
        |stmt| {
            client.select(
                stmt,
                None,
                &[
                    step_id.into(),
                    JsonB(error.clone()).into(),
                    retryable.into(),
                    (backoff_secs as i32).into(),
                ],
            )?;
            Ok(())
        },
    )?;
    let meta = JsonB(json!({
        "worker_id": worker_id, "error": error, "retryable": retryable,
        "backoff_seconds": if will_retry { Some(backoff_secs) } else { None },
    }));
    transition(schema, Step, step_id, State::Error, &meta, Some(State::InProgress))?;
    if will_retry {
        emit(
            client,
            "observability.step.backoff",
            task_id,
            Some(step_id),
            json!({ "backoff_seconds": backoff_secs, "attempt": attempts,
                        "backoff_type": if retry_after.is_some() { "server_requested" } else { "exponential" } }),
        )?;
    } else if retryable {
        emit(
            client,
            "observability.step.max_retries_reached",
            task_id,
            Some(step_id),
            json!({ "attempts": attempts, "retry_limit": retry_limit }),
        )?;
    }
    Ok((task_id, will_retry.then_some(backoff_secs)))
}

/// Records a step's results as its outcome (processed, no longer in process) and drops its
/// claim: the write shared by a worker's completion and an operator's manual resolution.
pub(super) fn record_results(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    step_id: i64,
    results: &Value,
) -> Result<(), TaskerError> {
    let q = schema.quoted();
    step_update(
        client,
        schema,
        maintenance::installed(),
        "record_results",
        "record_results_direct",
        &[INT8, JSONB],
        |direct| {
            let update = format!(
                "UPDATE {q}.tasker_workflow_steps
                    SET results = $2, processed = true, processed_at = {NOW}, in_process = false,
                        updated_at = {NOW}
                  WHERE workflow_step_id = $1"
            );
            with_mirror(direct, update)
        },
        |stmt| {
            client.select(stmt, None, &[step_id.into(), JsonB(results.clone()).into()])?;
            Ok(())
        },
    )
}
