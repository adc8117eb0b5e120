//! Finalization (the task's fate after one of its steps finished) and manual resolution.

use super::*;

pub(super) fn lock_task(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    task_id: i64,
) -> Result<(), TaskerError> {
    let q = schema.quoted();
    lock_row(client, "finalize_lock_task", schema, task_id, || {
        format!("SELECT 1 FROM {q}.tasker_tasks WHERE task_id = $1 FOR NO KEY UPDATE")
    })
}

/// (A write plan, though it only reads: it must take a fresh snapshot, see [`finalize`].)
pub(super) fn native_counts(
    client: &SpiClient<'_>,
    task_id: i64,
) -> Result<TaskCounts, TaskerError> {
    let (claimable, scheduling) = super::claimable();
    with_write_plan(
        client,
        if scheduling { "native_counts" } else { "native_counts_07" },
        "",
        &[INT8],
        || {
            format!(
                "SELECT count(*),
                        count(*) FILTER (WHERE s.state IN ('complete', 'resolved_manually')),
                        count(*) FILTER (WHERE s.state = 'in_progress'),
                        count(*) FILTER (WHERE {claimable}),
                        count(*) FILTER (WHERE s.state = 'error' AND COALESCE(s.attempts, 0) < COALESCE(s.retry_limit, 3)
                                           AND COALESCE(s.retryable, true)),
                        count(*) FILTER (WHERE s.state = 'error' AND (COALESCE(s.attempts, 0) >= COALESCE(s.retry_limit, 3)
                                           OR NOT COALESCE(s.retryable, true)))
                 FROM tasker_core.step_state s WHERE s.task_id = $1"
            )
        },
        |stmt| {
            let t = client.select(stmt, Some(1), &[task_id.into()])?;
            let r = t.first();
            Ok(TaskCounts {
                total: r.get::<i64>(1)?.unwrap_or_default(),
                done: r.get::<i64>(2)?.unwrap_or_default(),
                in_progress: r.get::<i64>(3)?.unwrap_or_default(),
                ready: r.get::<i64>(4)?.unwrap_or_default(),
                waiting: r.get::<i64>(5)?.unwrap_or_default(),
                blocked: r.get::<i64>(6)?.unwrap_or_default(),
            })
        },
    )
    .map_err(spi)
}

/// The finalizer's decision table (Rails §4.4, first match), applied to a task after one of
/// its steps finished: all steps done -> complete; ready steps -> in_progress and wake
/// workers; steps still running or waiting out a backoff -> unchanged; otherwise a permanent
/// failure -> error. Returns the execution status it decided on.
pub fn finalize(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    task_id: i64,
) -> Result<&'static str, TaskerError> {
    // Dynamic steps whose parents have all finished are judged first, before the task's
    // lock is taken (judging one locks step rows, whose holders may wait for that lock).
    dynamic::advance_if_due(client, schema, task_id)?;
    // Finalizers of one task take turns, and each counts with a snapshot taken after its
    // turn came: two workers finishing the last two steps at once cannot both see the
    // other's step still running.
    lock_task(client, schema, task_id)?;
    let c = native_counts(client, task_id)?;
    let empty = JsonB(json!({}));
    let decision = Finalization::decide(&c);
    let status = decision.as_str();
    match decision {
        Finalization::AllComplete => {
            let q = schema.quoted();
            let state = task_state(client, schema, task_id)?;
            if matches!(state.as_deref(), None | Some("pending") | Some("error")) {
                if state.as_deref() == Some("error") {
                    transition(schema, Task, task_id, State::Pending, &empty, None)?;
                }
                transition(schema, Task, task_id, State::InProgress, &empty, None)?;
            }
            with_write_plan(
                client,
                "task_complete_flag",
                schema.as_str(),
                &[INT8],
                || format!("UPDATE {q}.tasker_tasks SET complete = true, updated_at = {NOW} WHERE task_id = $1"),
                |stmt| {
                    client.select(stmt, None, &[task_id.into()])?;
                    Ok(())
                },
            )
            .map_err(spi)?;
            let meta = JsonB(json!({ "execution_status": status, "total_steps": c.total }));
            // (the guard re-read every step's current transition: the counts, taken under the
            // task's lock, have just shown them all complete or resolved)
            transitions::transition_without_guard(
                schema,
                Entity::Task,
                task_id,
                State::Complete,
                &meta,
            )?;
            emit(
                client,
                "workflow.task_finalization_completed",
                task_id,
                None,
                json!({ "execution_status": status, "final_status": "complete" }),
            )?;
        }
        Finalization::BlockedByFailures
            if task_state(client, schema, task_id)?.as_deref() != Some("error") =>
        {
            let meta =
                JsonB(json!({ "execution_status": status, "error_message": "steps_in_error_state",
                                          "failed_steps_count": c.blocked }));
            match transition(schema, Task, task_id, State::Error, &meta, None) {
                Ok(_) | Err(TaskerError::TransitionNotAllowed { .. }) => {}
                Err(e) => return Err(e),
            }
            emit(
                client,
                "workflow.task_finalization_completed",
                task_id,
                None,
                json!({ "execution_status": status, "final_status": "error" }),
            )?;
        }
        Finalization::HasReadySteps => {
            let ns = task_namespace(client, schema, task_id)?;
            wake(client, task_id, &ns, Some(c.ready)).map_err(spi)?;
            emit(
                client,
                "workflow.viable_steps_discovered",
                task_id,
                None,
                json!({ "step_count": c.ready }),
            )?;
        }
        Finalization::BlockedByFailures
        | Finalization::Processing
        | Finalization::WaitingForDependencies => {}
    }
    Ok(status)
}

pub(super) fn task_namespace(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    task_id: i64,
) -> Result<String, TaskerError> {
    let q = schema.quoted();
    with_plan(
        client,
        "task_namespace",
        schema.as_str(),
        &[INT8],
        || {
            format!(
                "SELECT tn.name::text FROM {q}.tasker_tasks t
                 JOIN {q}.tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
                 JOIN {q}.tasker_task_namespaces tn ON tn.task_namespace_id = nt.task_namespace_id
                 WHERE t.task_id = $1"
            )
        },
        |stmt| {
            Ok(client
                .select(stmt, Some(1), &[task_id.into()])?
                .first()
                .get_one::<String>()?
                .unwrap_or_default())
        },
    )
    .map_err(spi)
}

/// Runs the finalizer for a task (operator functions use it after they change steps).
pub fn finalize_task(schema: &SchemaName, task_id: i64) -> Result<&'static str, TaskerError> {
    Spi::connect_mut(|client| finalize(client, schema, task_id))
}

/// Judges the dynamic steps of `tasks` whose parents have all finished, all of them before any
/// task's lock is taken (see [`finalize`]), then finalizes the tasks in id order. Returns how
/// many it finalized.
pub fn advance_tasks(schema: &SchemaName, tasks: Vec<i64>) -> Result<i32, TaskerError> {
    let tasks: BTreeSet<i64> = tasks.into_iter().collect();
    Spi::connect_mut(|client| {
        require_tracked(client, schema)?;
        dynamic::advance_and_finalize(client, schema, &tasks, false)?;
        Ok(tasks.len() as i32)
    })
}

/// Marks a step `resolved_manually` with `results` (an in-progress step is failed first, since
/// the state machine has no direct edge), releases its lease and finalizes its task.
pub fn resolve_manually(
    schema: &SchemaName,
    step_id: i64,
    results: &Value,
) -> Result<bool, TaskerError> {
    let q = schema.quoted();
    Spi::connect_mut(|client| {
        require_tracked(client, schema)?;
        lock_step_and_children(client, schema, step_id)?;
        let row: Option<(i64, Option<String>)> = with_write_plan(
            client,
            "resolve_lock",
            schema.as_str(),
            &[INT8],
            || {
                format!(
                    "SELECT ws.task_id, s.state FROM {q}.tasker_workflow_steps ws
                     LEFT JOIN tasker_core.step_state s ON s.workflow_step_id = ws.workflow_step_id
                     WHERE ws.workflow_step_id = $1 FOR NO KEY UPDATE OF ws"
                )
            },
            |stmt| {
                one_row(client, stmt, &[step_id.into()], |r| {
                    Ok((r.get::<i64>(1)?.unwrap_or_default(), r.get::<String>(2)?))
                })
            },
        )
        .map_err(spi)?;
        let (task_id, state) = row.ok_or(TaskerError::NotFound { entity: "step", id: step_id })?;
        // A finished task is final (cancel_task leaves one alone too). Read after the step's
        // lock: a cancel_task that locked the task's steps first has committed by now.
        let finished: Option<String> = with_write_plan(
            client,
            "resolve_task_state",
            schema.as_str(),
            &[INT8],
            || {
                format!(
                    "SELECT CASE WHEN tt.to_state IN ('complete', 'cancelled', 'resolved_manually')
                                 THEN tt.to_state::text
                                 WHEN t.complete THEN 'complete' END
                     FROM {q}.tasker_tasks t
                     LEFT JOIN {q}.tasker_task_transitions tt ON tt.task_id = t.task_id AND tt.most_recent
                     WHERE t.task_id = $1"
                )
            },
            |stmt| one_value::<String>(client, stmt, &[task_id.into()]),
        )
        .map_err(spi)?;
        if let Some(state) = finished {
            return Err(TaskerError::TaskFinished { step_id, task_id, state });
        }
        let meta = JsonB(json!({ "reason": "resolved by operator" }));
        if state.as_deref() == Some("in_progress") {
            transition(schema, Step, step_id, State::Error, &meta, Some(State::InProgress))?;
        }
        let changed = transition(schema, Step, step_id, State::ResolvedManually, &meta, None)?;
        record_results(client, schema, step_id, results)?;
        finalize(client, schema, task_id)?;
        Ok(changed)
    })
}
