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
    with_keyed_plan, with_plan, with_write_plan, BOOL, INT4, INT8, INT8ARRAY, JSONB, NOW, TEXT,
    TEXTARRAY,
};
use super::transitions;
use crate::core::backoff;
use crate::core::error::TaskerError;
use crate::core::finalize::{Finalization, TaskCounts};
use crate::core::ident::SchemaName;
use crate::core::outcomes::Outcome;
use crate::core::state::{Entity, State};
use pgrx::spi::{Spi, SpiClient, SpiResult};
use pgrx::JsonB;
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// Native readiness of a `tasker_core.step_state` row `s` (see the module comment).
const CLAIMABLE: &str =
    "s.blocked_parents = 0 AND s.processed IS NOT TRUE AND s.in_process IS NOT TRUE
    AND (s.state IS NULL OR s.state IN ('pending', 'error'))
    AND COALESCE(s.attempts, 0) < COALESCE(s.retry_limit, 3)
    AND (COALESCE(s.retryable, true) OR COALESCE(s.attempts, 0) = 0)
    AND (s.backoff_request_seconds IS NULL OR s.last_attempted_at IS NULL
         OR s.last_attempted_at + s.backoff_request_seconds * interval '1 second'
            <= (tasker_core.now() AT TIME ZONE 'UTC'))";

/// The columns of a step that `step_state` mirrors and the worker protocol changes: the
/// RETURNING list of a self-maintained update of `tasker_workflow_steps` (see
/// `store::maintenance`).
const MIRRORED: &str =
    "workflow_step_id, retryable, retry_limit, in_process, processed, attempts, \
                        last_attempted_at, backoff_request_seconds";

/// The CTEs `upd` — `update` (of steps), returning `extra` and the [`MIRRORED`] columns — and
/// `mirror`, which copies those columns into the steps' maintained rows: what the row trigger
/// does, in the statement that made the change.
fn mirrored(update: &str, extra: &str) -> String {
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
fn step_update<R>(
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

fn spi(e: pgrx::spi::Error) -> TaskerError {
    TaskerError::Internal {
        context: format!("SPI failure in the worker protocol: {e}"),
    }
}

fn require_tracked(client: &SpiClient<'_>, schema: &SchemaName) -> Result<(), TaskerError> {
    super::schema::require_installed_cached(client, schema)?;
    if super::facts::is_tracked(client, schema).map_err(spi)? {
        Ok(())
    } else {
        Err(TaskerError::TrackingDisabled {
            schema: schema.as_str().to_owned(),
        })
    }
}

/// Wakes workers (NOTIFY on `tasker_ready`, once per transaction).
pub fn wake(client: &SpiClient<'_>, task_id: i64, namespace: &str) -> SpiResult<()> {
    events::notify_channel_once(
        client,
        READY_CHANNEL,
        namespace,
        &json!({ "task_id": task_id, "namespace": namespace }),
    )
}

fn emit(
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

/// One claimed step, with what its worker needs.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub task_id: i64,
    pub workflow_step_id: i64,
    pub step_name: String,
    pub namespace: String,
    pub task_name: String,
    pub handler_class: Option<String>,
    /// The stored documents as jsonb text: handed on, never parsed (any depth).
    pub handler_config: Option<String>,
    pub inputs: Option<String>,
    pub parent_results: String,
    pub attempt: i32,
    pub lease_expires_at: i64,
}

/// Fails the in-progress steps whose lease expired (at most `limit`), so that they can be
/// claimed again, and finalizes their tasks. Returns the steps' ids.
pub fn expire_leases(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    limit: i32,
) -> Result<Vec<i64>, TaskerError> {
    let (ids, tasks) = release_expired(client, schema, limit)?;
    for task_id in tasks {
        // The lost attempt may have been the last one: the task may now have failed.
        finalize(client, schema, task_id)?;
    }
    Ok(ids)
}

/// The step half of [`expire_leases`]: fails the steps whose lease expired and returns their
/// ids and their tasks, in ascending order — the order in which the caller must finalize them
/// (a task is locked until commit: two expirers that took them in deadline order deadlocked).
fn release_expired(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    limit: i32,
) -> Result<(Vec<i64>, BTreeSet<i64>), TaskerError> {
    let q = schema.quoted();
    let expired: Vec<(i64, String)> = with_write_plan(
        client,
        "expired_leases",
        schema.as_str(),
        &[INT4],
        || {
            format!(
                "SELECT c.workflow_step_id, c.worker_id FROM tasker_core.step_claims c
                 JOIN {q}.tasker_workflow_steps ws ON ws.workflow_step_id = c.workflow_step_id
                 WHERE c.lease_expires_at <= tasker_core.now()
                 ORDER BY c.lease_expires_at
                 LIMIT $1
                 FOR NO KEY UPDATE OF ws SKIP LOCKED"
            )
        },
        |stmt| {
            let mut out = Vec::new();
            for row in client.select(stmt, None, &[limit.into()])? {
                out.push((
                    row.get::<i64>(1)?.unwrap_or_default(),
                    row.get::<String>(2)?.unwrap_or_default(),
                ));
            }
            Ok(out)
        },
    )
    .map_err(spi)?;
    let mut ids = Vec::with_capacity(expired.len());
    let mut tasks = BTreeSet::new();
    for (step_id, worker) in expired {
        // A heartbeat that committed since the scan extended the lease: the step stays held.
        let Some(task_id) = release(client, schema, step_id, "lease_expired", &worker, true)?
        else {
            continue;
        };
        tasks.insert(task_id);
        ids.push(step_id);
    }
    Ok((ids, tasks))
}

/// Drops a step's claim and fails it (`in_progress -> error`) with `reason`, counting the
/// attempt, so it can be retried at once (a previous backoff no longer applies). Returns the
/// step's task, or `None` when there was nothing to release: with `only_expired`, a claim is
/// dropped only if its lease is still expired when its row is locked (a heartbeat that
/// committed in between wins). The caller holds the step's row lock.
fn release(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    step_id: i64,
    reason: &str,
    worker: &str,
    only_expired: bool,
) -> Result<Option<i64>, TaskerError> {
    let q = schema.quoted();
    let task_id = step_update(
        client,
        schema,
        maintenance::installed(),
        "release_step",
        "release_step_direct",
        &[INT8, BOOL],
        |direct| {
            let update = format!(
                "UPDATE {q}.tasker_workflow_steps SET in_process = false, last_attempted_at = {NOW},
                        backoff_request_seconds = NULL, updated_at = {NOW}
                 WHERE workflow_step_id = (SELECT gone.workflow_step_id FROM gone)"
            );
            let gone = "WITH gone AS (
                     DELETE FROM tasker_core.step_claims
                     WHERE workflow_step_id = $1 AND (NOT $2 OR lease_expires_at <= tasker_core.now())
                     RETURNING workflow_step_id)";
            if direct {
                format!(
                    "{gone}, {} SELECT upd.task_id FROM upd",
                    mirrored(&update, "task_id, ")
                )
            } else {
                format!("{gone} {update} RETURNING task_id")
            }
        },
        |stmt| {
            let t = client.select(stmt, Some(1), &[step_id.into(), only_expired.into()])?;
            if t.is_empty() {
                Ok(None)
            } else {
                t.first().get_one::<i64>()
            }
        },
    )?;
    let Some(task_id) = task_id else {
        return Ok(None);
    };
    let metadata = JsonB(json!({ "reason": reason, "worker_id": worker }));
    match transitions::transition(
        schema,
        Entity::Step,
        step_id,
        State::Error,
        &metadata,
        Some(State::InProgress),
    ) {
        Ok(_) | Err(TaskerError::ExpectedFromMismatch { .. }) => Ok(Some(task_id)),
        Err(e) => Err(e),
    }
}

/// Claims up to `max_steps` ready steps of the given namespaces (all when `None`) for
/// `worker_id`, under a lease of `lease_seconds`. With a `traceparent`, each claimed task that
/// has no trace of its own joins the worker's.
pub fn claim(
    schema: &SchemaName,
    worker_id: &str,
    namespaces: Option<Vec<String>>,
    max_steps: i32,
    lease_seconds: i32,
    traceparent: Option<&str>,
) -> Result<Vec<Claimed>, TaskerError> {
    let q = schema.quoted();
    Spi::connect_mut(|client| {
        require_tracked(client, schema)?;
        // the tasks of expired leases are finalized with the started ones below, in task order
        let (_, expired_tasks) = release_expired(client, schema, max_steps)?;
        // Candidates: more than asked for (concurrent claimers hold some of the first ones),
        // then locked by id (an index probe each: a join there let the generic plan merge-join
        // the whole step table to reach them).
        let per_namespace = events::step_namespaces_installed();
        let candidates: Vec<(i64, i64, Option<String>)> = with_write_plan(
            client,
            if per_namespace {
                "claim_candidates_ns"
            } else {
                "claim_candidates"
            },
            schema.as_str(),
            &[INT4, TEXTARRAY],
            || {
                let ready = if per_namespace {
                    // the first ready steps of each namespace (step_state_claimable_ns_idx),
                    // then the first of those: workers of one namespace never walk another's
                    // backlog. The join re-checks the namespace in case a task changed named
                    // task (which tracking does not follow; check_tracking reports it).
                    format!(
                        "SELECT x.workflow_step_id
                         FROM {q}.tasker_task_namespaces tn
                         CROSS JOIN LATERAL (
                             SELECT s.workflow_step_id
                             FROM tasker_core.step_state s
                             JOIN {q}.tasker_tasks t ON t.task_id = s.task_id
                             JOIN {q}.tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
                             WHERE s.namespace_id = tn.task_namespace_id
                               AND nt.task_namespace_id = tn.task_namespace_id
                               AND {CLAIMABLE}
                               AND t.complete IS NOT TRUE
                             ORDER BY s.namespace_id, s.workflow_step_id
                             LIMIT $1 + 32) x
                         WHERE ($2::text[] IS NULL OR tn.name = ANY ($2))
                         ORDER BY x.workflow_step_id
                         LIMIT $1 + 32"
                    )
                } else {
                    // the SQL of 0.2.0 and before: one ready queue for all namespaces
                    format!(
                        "SELECT s.workflow_step_id
                         FROM tasker_core.step_state s
                         JOIN {q}.tasker_tasks t ON t.task_id = s.task_id
                         JOIN {q}.tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
                         JOIN {q}.tasker_task_namespaces tn ON tn.task_namespace_id = nt.task_namespace_id
                         WHERE {CLAIMABLE}
                           AND t.complete IS NOT TRUE
                           AND ($2::text[] IS NULL OR tn.name = ANY ($2))
                         ORDER BY s.workflow_step_id
                         LIMIT $1 + 32"
                    )
                };
                format!(
                    "WITH c AS MATERIALIZED ({ready})
                     SELECT ws.workflow_step_id, ws.task_id, NULL::text
                     FROM {q}.tasker_workflow_steps ws
                     WHERE ws.workflow_step_id = ANY (ARRAY(SELECT c.workflow_step_id FROM c))
                     ORDER BY ws.workflow_step_id
                     LIMIT $1
                     FOR NO KEY UPDATE OF ws SKIP LOCKED"
                )
            },
            |stmt| {
                let mut out = Vec::new();
                for row in client.select(stmt, None, &[max_steps.into(), namespaces.clone().into()])? {
                    out.push((
                        row.get::<i64>(1)?.unwrap_or_default(),
                        row.get::<i64>(2)?.unwrap_or_default(),
                        row.get::<String>(3)?,
                    ));
                }
                Ok(out)
            },
        )
        .map_err(spi)?;
        // The scan's snapshot may be older than a locked row: another worker may have claimed
        // and failed the step in between. Holding the lock now, read the rows again.
        let candidates = recheck_claimable(client, candidates)?;
        // the worker's trace, if it has one, before the transitions that should carry it
        let traceparent = traceparent.filter(|_| events::traces_installed());
        let mut traced = BTreeSet::new();
        let mut claimed_ids = Vec::new();
        let mut tasks_started = BTreeSet::new();
        for (step_id, task_id, state) in candidates {
            if let Some(tp) = traceparent {
                if traced.insert(task_id) {
                    events::record_trace(client, task_id, tp).map_err(spi)?;
                }
            }
            // The locked row may have moved on since the scan read it: the transitions
            // re-validate against the current state and skip the step if it is not claimable.
            if state.as_deref() == Some("error") {
                let retry = JsonB(json!({ "reason": "retry", "worker_id": worker_id }));
                match transitions::transition(
                    schema,
                    Entity::Step,
                    step_id,
                    State::Pending,
                    &retry,
                    Some(State::Error),
                ) {
                    Ok(_) => {}
                    Err(TaskerError::ExpectedFromMismatch { .. })
                    | Err(TaskerError::TransitionNotAllowed { .. }) => continue,
                    Err(e) => return Err(e),
                }
            }
            let meta = JsonB(json!({ "worker_id": worker_id }));
            match transitions::transition(
                schema,
                Entity::Step,
                step_id,
                State::InProgress,
                &meta,
                Some(State::Pending),
            ) {
                Ok(true) => {
                    claimed_ids.push(step_id);
                    tasks_started.insert(task_id);
                }
                Ok(false)
                | Err(TaskerError::ExpectedFromMismatch { .. })
                | Err(TaskerError::TransitionNotAllowed { .. })
                | Err(TaskerError::GuardFailed { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        // Tasks are locked until commit, so every claim takes them in one ascending pass.
        for &task_id in expired_tasks.union(&tasks_started) {
            if expired_tasks.contains(&task_id) {
                // the lost attempt may have been the last one: the task may have failed
                finalize(client, schema, task_id)?;
            }
            if tasks_started.contains(&task_id) {
                start_task(client, schema, task_id)?;
            }
        }
        if claimed_ids.is_empty() {
            return Ok(Vec::new());
        }
        let logins = events::claim_logins_installed();
        // (self-maintained needs the SQL of 0.5.0, which has the login column too)
        let direct = logins && maintenance::installed();
        step_update(
            client,
            schema,
            direct,
            if logins {
                "claim_record"
            } else {
                "claim_record_0_3"
            },
            "claim_record_direct",
            &[INT8ARRAY, TEXT, INT4],
            |direct| {
                // (the SQL of 0.3.0 and before has no login column: the claim is not tied to one)
                let (login_col, login_val, login_set) = if logins {
                    (", login", ", session_user", ", login = excluded.login")
                } else {
                    ("", "", "")
                };
                let update = format!(
                    "UPDATE {q}.tasker_workflow_steps
                        SET in_process = true, attempts = COALESCE(attempts, 0) + 1,
                            last_attempted_at = {NOW}, updated_at = {NOW}
                      WHERE workflow_step_id = ANY ($1)"
                );
                let updated = if direct {
                    mirrored(&update, "task_id, ")
                } else {
                    format!("upd AS ({update} RETURNING workflow_step_id, task_id)")
                };
                format!(
                    "WITH {updated}
                     INSERT INTO tasker_core.step_claims AS c
                            (workflow_step_id, task_id, worker_id, lease_seconds, lease_expires_at{login_col})
                     SELECT upd.workflow_step_id, upd.task_id, $2, $3,
                            tasker_core.now() + $3 * interval '1 second'{login_val}
                     FROM upd
                     -- a stale claim (the application moved the step out of progress the
                     -- Rails way, clearing in_process) is replaced, never a unique violation
                     ON CONFLICT (workflow_step_id) DO UPDATE
                        SET task_id = excluded.task_id, worker_id = excluded.worker_id,
                            lease_seconds = excluded.lease_seconds,
                            lease_expires_at = excluded.lease_expires_at{login_set},
                            claimed_at = tasker_core.now(), heartbeat_at = NULL"
                )
            },
            |stmt| {
                client.select(
                    stmt,
                    None,
                    &[
                        claimed_ids.clone().into(),
                        worker_id.into(),
                        lease_seconds.into(),
                    ],
                )?;
                Ok(())
            },
        )?;
        claimed_rows(client, schema, &claimed_ids)
    })
}

/// The candidates (locked by this transaction) that are still claimable by a fresh read.
fn recheck_claimable(
    client: &SpiClient<'_>,
    candidates: Vec<(i64, i64, Option<String>)>,
) -> Result<Vec<(i64, i64, Option<String>)>, TaskerError> {
    if candidates.is_empty() {
        return Ok(candidates);
    }
    let ids: Vec<i64> = candidates.iter().map(|c| c.0).collect();
    let still: std::collections::HashMap<i64, Option<String>> = with_write_plan(
        client,
        "claim_recheck",
        "",
        &[INT8ARRAY],
        || {
            // The candidates by primary key, readiness evaluated on each: with the readiness
            // predicate in the WHERE clause, the generic plan on never-analysed tables walked
            // the whole ready index (its predicate matched) and filtered it by id — 4,000 rows
            // read per claim with 2,000 tasks queued.
            format!(
                "SELECT s.workflow_step_id, s.state, COALESCE({CLAIMABLE}, false)
                 FROM tasker_core.step_state s WHERE s.workflow_step_id = ANY ($1)"
            )
        },
        |stmt| {
            let mut out = std::collections::HashMap::new();
            for row in client.select(stmt, None, &[ids.into()])? {
                if row.get::<bool>(3)?.unwrap_or(false) {
                    out.insert(
                        row.get::<i64>(1)?.unwrap_or_default(),
                        row.get::<String>(2)?,
                    );
                }
            }
            Ok(out)
        },
    )
    .map_err(spi)?;
    Ok(candidates
        .into_iter()
        .filter_map(|(id, task, _)| still.get(&id).map(|state| (id, task, state.clone())))
        .collect())
}

/// Moves a task to in_progress when a step of it starts (from pending, or error via pending).
fn start_task(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    task_id: i64,
) -> Result<(), TaskerError> {
    let empty = JsonB(json!({}));
    match task_state(client, schema, task_id)?.as_deref() {
        Some("in_progress") => return Ok(()),
        Some("error") => {
            transitions::transition(
                schema,
                Entity::Task,
                task_id,
                State::Pending,
                &empty,
                Some(State::Error),
            )?;
        }
        Some("complete") | Some("cancelled") | Some("resolved_manually") => return Ok(()),
        _ => {}
    }
    match transitions::transition(
        schema,
        Entity::Task,
        task_id,
        State::InProgress,
        &empty,
        None,
    ) {
        Ok(_) | Err(TaskerError::TransitionNotAllowed { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

fn task_state(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    task_id: i64,
) -> Result<Option<String>, TaskerError> {
    let q = schema.quoted();
    // a fresh snapshot: the state another finalizer committed while this one waited
    with_keyed_plan(
        client,
        "task_state",
        schema.as_str(),
        &[INT8],
        || format!("SELECT to_state::text FROM {q}.tasker_task_transitions WHERE task_id = $1 AND most_recent"),
        |stmt| {
            let t = client.select(stmt, Some(1), &[task_id.into()])?;
            if t.is_empty() {
                Ok(None)
            } else {
                t.first().get_one::<String>()
            }
        },
    )
    .map_err(spi)
}

fn claimed_rows(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    ids: &[i64],
) -> Result<Vec<Claimed>, TaskerError> {
    let q = schema.quoted();
    with_plan(
        client,
        "claimed_rows",
        schema.as_str(),
        &[INT8ARRAY],
        || {
            format!(
                "SELECT ws.task_id, ws.workflow_step_id, ns.name::text, tn.name::text, nt.name::text,
                        st ->> 'handler_class', (st -> 'handler_config')::text, ws.inputs::text,
                        COALESCE((SELECT jsonb_object_agg(pns.name, COALESCE(pws.results, 'null'::jsonb))
                                  FROM {q}.tasker_workflow_step_edges e
                                  JOIN {q}.tasker_workflow_steps pws ON pws.workflow_step_id = e.from_step_id
                                  JOIN {q}.tasker_named_steps pns ON pns.named_step_id = pws.named_step_id
                                  WHERE e.to_step_id = ws.workflow_step_id), '{{}}'::jsonb)::text,
                        ws.attempts,
                        c.lease_expires_at
                 FROM {q}.tasker_workflow_steps ws
                 JOIN tasker_core.step_claims c ON c.workflow_step_id = ws.workflow_step_id
                 JOIN {q}.tasker_named_steps ns ON ns.named_step_id = ws.named_step_id
                 JOIN {q}.tasker_tasks t ON t.task_id = ws.task_id
                 JOIN {q}.tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
                 JOIN {q}.tasker_task_namespaces tn ON tn.task_namespace_id = nt.task_namespace_id
                 LEFT JOIN LATERAL (
                     SELECT x AS st FROM jsonb_array_elements(
                         CASE WHEN jsonb_typeof(nt.configuration -> 'step_templates') = 'array'
                              THEN nt.configuration -> 'step_templates' ELSE '[]'::jsonb END) x
                     WHERE x ->> 'name' = ns.name::text LIMIT 1) tmpl ON true
                 WHERE ws.workflow_step_id = ANY ($1)
                 ORDER BY ws.workflow_step_id"
            )
        },
        |stmt| {
            let mut out = Vec::new();
            for row in client.select(stmt, None, &[ids.to_vec().into()])? {
                out.push(Claimed {
                    task_id: row.get::<i64>(1)?.unwrap_or_default(),
                    workflow_step_id: row.get::<i64>(2)?.unwrap_or_default(),
                    step_name: row.get::<String>(3)?.unwrap_or_default(),
                    namespace: row.get::<String>(4)?.unwrap_or_default(),
                    task_name: row.get::<String>(5)?.unwrap_or_default(),
                    handler_class: row.get::<String>(6)?,
                    handler_config: row.get::<String>(7)?,
                    inputs: row.get::<String>(8)?,
                    parent_results: row.get::<String>(9)?.unwrap_or_else(|| "{}".into()),
                    attempt: row.get::<i32>(10)?.unwrap_or_default(),
                    lease_expires_at: row
                        .get::<pgrx::datum::TimestampWithTimeZone>(11)?
                        .map(pgrx::pg_sys::TimestampTz::from)
                        .unwrap_or_default(),
                });
            }
            Ok(out)
        },
    )
    .map_err(spi)
}

/// Whether the session's login may act on a claim made by another login: a superuser or a
/// member of tasker_admin (SQL over `session_user`, which SET ROLE does not change).
const PRIVILEGED: &str =
    "(SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = session_user)
     OR (EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = 'tasker_admin')
         AND pg_catalog.pg_has_role(session_user, 'tasker_admin', 'MEMBER'))";

/// Locks a step's row: the first lock of every call that changes a claimed step, so that
/// workers, operators and lease expiry all lock step, then claim, then task.
fn lock_step(client: &SpiClient<'_>, schema: &SchemaName, step_id: i64) -> Result<(), TaskerError> {
    lock_step_rows(client, schema, step_id, false, || Ok(()))
}

/// Locks a step that is about to satisfy its dependents, with its maintained row and its
/// children's, all at once or not at all (`store::locks`): an
/// application writing a child and its parent in either order never deadlocks with it.
pub fn lock_step_and_children(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    step_id: i64,
) -> Result<(), TaskerError> {
    lock_step_rows(client, schema, step_id, true, || Ok(()))
}

/// [`lock_step_and_children`] in a call of its own, for `transition_step` to a state that
/// satisfies dependents (where tracking is on: otherwise no child row is maintained).
pub fn lock_before_satisfying(schema: &SchemaName, step_id: i64) -> Result<(), TaskerError> {
    Spi::connect_mut(|client| {
        super::schema::require_installed_cached(client, schema)?;
        if super::facts::is_tracked(client, schema).map_err(spi)? {
            lock_step_and_children(client, schema, step_id)?;
        }
        Ok(())
    })
}

/// Locks a step's rows (with its children's maintained rows when it has children and
/// `with_children`), then runs `body`, the writes to them, in the same (sub)transaction
/// ([`super::locks::with_all_locked`] says why).
fn lock_step_rows<T>(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    step_id: i64,
    with_children: bool,
    body: impl FnOnce() -> Result<T, TaskerError>,
) -> Result<T, TaskerError> {
    if with_children {
        let children = children_of(client, &[step_id])?;
        if !children.is_empty() {
            return super::locks::lock_step_and_children(client, schema, step_id, &children, body);
        }
    }
    let q = schema.quoted();
    lock_row(client, "worker_lock_step", schema, step_id, || {
        format!(
            "SELECT 1 FROM {q}.tasker_workflow_steps WHERE workflow_step_id = $1 FOR NO KEY UPDATE"
        )
    })?;
    body()
}

/// Runs a kept locking statement of one `bigint` parameter (a row by its id).
fn lock_row(
    client: &SpiClient<'_>,
    key: &'static str,
    schema: &SchemaName,
    id: i64,
    sql: impl FnOnce() -> String,
) -> Result<(), TaskerError> {
    with_keyed_plan(client, key, schema.as_str(), &[INT8], sql, |stmt| {
        client.select(stmt, None, &[id.into()])?;
        Ok(())
    })
    .map_err(spi)
}

/// The claim of a step, checked for `worker_id` and the session's login (the claim's login,
/// a superuser or a member of tasker_admin), locked: `(task_id, lease_seconds)`. TK030
/// otherwise, without naming the holder.
fn check_lease(
    client: &SpiClient<'_>,
    step_id: i64,
    worker_id: &str,
) -> Result<(i64, i32), TaskerError> {
    let logins = events::claim_logins_installed();
    let row: Option<(String, bool, i64, i32, bool, String)> = with_keyed_plan(
        client,
        if logins { "check_lease" } else { "check_lease_0_3" },
        "",
        &[INT8],
        || {
            let same_login = if logins {
                format!("login IS NULL OR login = session_user OR COALESCE({PRIVILEGED}, false)")
            } else {
                "true".to_owned()
            };
            format!(
                "SELECT worker_id, {same_login},
                        task_id, lease_seconds, lease_expires_at > tasker_core.now(), lease_expires_at::text
                 FROM tasker_core.step_claims WHERE workflow_step_id = $1 FOR UPDATE"
            )
        },
        |stmt| {
            let t = client.select(stmt, Some(1), &[step_id.into()])?;
            if t.is_empty() {
                return Ok(None);
            }
            let r = t.first();
            Ok(Some((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<bool>(2)?.unwrap_or(false),
                r.get::<i64>(3)?.unwrap_or_default(),
                r.get::<i32>(4)?.unwrap_or_default(),
                r.get::<bool>(5)?.unwrap_or(false),
                r.get::<String>(6)?.unwrap_or_default(),
            )))
        },
    )
    .map_err(spi)?;
    let lost = |detail: String| TaskerError::LeaseLost {
        step_id,
        worker: worker_id.to_owned(),
        detail,
    };
    match row {
        None => Err(lost(": the step is not claimed".into())),
        Some((holder, same_login, ..)) if holder != worker_id || !same_login => {
            Err(lost(": another worker holds it".into()))
        }
        Some((_, _, _, _, false, at)) => Err(lost(format!(": the lease expired at {at}"))),
        Some((_, _, task_id, secs, true, _)) => Ok((task_id, secs)),
    }
}

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
fn complete_held(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    step_id: i64,
    worker_id: &str,
    results: &Value,
) -> Result<i64, TaskerError> {
    let (task_id, _) = check_lease(client, step_id, worker_id)?;
    record_results(client, schema, step_id, results)?;
    let meta = JsonB(json!({ "worker_id": worker_id }));
    transitions::transition(
        schema,
        Entity::Step,
        step_id,
        State::Complete,
        &meta,
        Some(State::InProgress),
    )?;
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
        let mut states = children_of(client, &completing)?;
        states.extend(&completing);
        let set = super::locks::LockSet {
            steps: order.iter().map(|(id, _)| *id).collect(),
            transitions_of: completing,
            states,
        };
        super::locks::with_all_locked(client, schema, set, || {
            record_outcomes(client, schema, worker_id, &order)
        })
    })
}

/// The body of [`report`], every row locked: each step's outcome in id order, then their
/// tasks finalized in id order.
fn record_outcomes(
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
                Outcome::Fail {
                    error,
                    retryable,
                    retry_after,
                } => fail_held(
                    client,
                    schema,
                    *step_id,
                    worker_id,
                    error,
                    *retryable,
                    *retry_after,
                )
                .map(|(task, backoff)| (task, Reported::Failed(backoff))),
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
        for task_id in tasks {
            finalize(client, schema, task_id)?;
        }
        Ok(out)
    }
}

/// What [`report_and_claim`] did: each step's outcome, then the steps it claimed.
pub type ReportedAndClaimed = (Vec<(i64, Reported)>, Vec<Claimed>);

/// [`report`], then [`claim`] of up to `max_steps` steps in the same transaction: a worker
/// that finishes steps takes its next ones with one commit instead of two, and a step its
/// outcomes made ready can start at once. The report holds its rows' locks while the claim
/// takes others, which could close a cycle with another worker's report; so the claim never
/// waits for a lock ([`super::locks::without_waiting`]): if it would, it claims nothing
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
    let claimed = super::locks::without_waiting(|| {
        claim(
            schema,
            worker_id,
            namespaces,
            max_steps,
            lease_seconds,
            traceparent,
        )
    })?;
    Ok((reported, claimed.unwrap_or_default()))
}

/// The children of `steps` (each child once per edge), from their maintained rows.
fn children_of(client: &SpiClient<'_>, steps: &[i64]) -> Result<Vec<i64>, TaskerError> {
    if steps.is_empty() {
        return Ok(Vec::new());
    }
    with_plan(
        client,
        "worker_children_of",
        "",
        &[INT8ARRAY],
        || {
            "SELECT c FROM tasker_core.step_state s, unnest(s.child_ids) c
             WHERE s.workflow_step_id = ANY ($1)"
                .to_owned()
        },
        |stmt| {
            let mut out = Vec::new();
            for row in client.select(stmt, None, &[steps.to_vec().into()])? {
                out.push(row.get::<i64>(1)?.unwrap_or_default());
            }
            Ok(out)
        },
    )
    .map_err(spi)
}

/// Records a step's failure: error in results, backoff, `in_progress -> error`; a permanent
/// failure marks the step not retryable. Then finalizes the task. Returns the backoff in
/// seconds, or `None` when the step will not be retried.
pub fn fail(
    schema: &SchemaName,
    step_id: i64,
    worker_id: &str,
    error: &Value,
    retryable: bool,
    retry_after: Option<i64>,
) -> Result<Option<i64>, TaskerError> {
    Spi::connect_mut(|client| {
        require_tracked(client, schema)?;
        lock_step(client, schema, step_id)?;
        let (task_id, backoff) = fail_held(
            client,
            schema,
            step_id,
            worker_id,
            error,
            retryable,
            retry_after,
        )?;
        finalize(client, schema, task_id)?;
        Ok(backoff)
    })
}

/// The step half of [`fail`], its row locked: checks the lease, records the failure and its
/// backoff, moves the step to error. Returns its task (for the caller to finalize) and the
/// backoff, `None` when the step will not be retried.
fn fail_held(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    step_id: i64,
    worker_id: &str,
    error: &Value,
    retryable: bool,
    retry_after: Option<i64>,
) -> Result<(i64, Option<i64>), TaskerError> {
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
    let seed = super::settings::jitter_seed(step_id, attempts);
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
    transitions::transition(
        schema,
        Entity::Step,
        step_id,
        State::Error,
        &meta,
        Some(State::InProgress),
    )?;
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
fn record_results(
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

/// Step `$1`'s claim dropped and `update` (of that step) run, self-maintained when `direct`.
fn with_mirror(direct: bool, update: String) -> String {
    let gone = "WITH gone AS (DELETE FROM tasker_core.step_claims WHERE workflow_step_id = $1)";
    if direct {
        format!("{gone}, {} SELECT count(*) FROM upd", mirrored(&update, ""))
    } else {
        format!("{gone} {update}")
    }
}

/// Gives a claimed step back (a worker shutting down): `in_progress -> error` with reason
/// `released`, the attempt not counted and no backoff, so the next claim takes it at once.
pub fn release_claim(
    schema: &SchemaName,
    step_id: i64,
    worker_id: &str,
) -> Result<(), TaskerError> {
    let q = schema.quoted();
    Spi::connect_mut(|client| {
        require_tracked(client, schema)?;
        lock_step(client, schema, step_id)?;
        check_lease(client, step_id, worker_id)?;
        let Some(task_id) = release(client, schema, step_id, "released", worker_id, false)? else {
            return Ok(());
        };
        step_update(
            client,
            schema,
            maintenance::installed(),
            "release_uncount",
            "release_uncount_direct",
            &[INT8],
            |direct| {
                let update = format!(
                    "UPDATE {q}.tasker_workflow_steps
                        SET attempts = GREATEST(COALESCE(attempts, 1) - 1, 0), backoff_request_seconds = NULL
                      WHERE workflow_step_id = $1"
                );
                if direct {
                    format!("WITH {} SELECT count(*) FROM upd", mirrored(&update, ""))
                } else {
                    update
                }
            },
            |stmt| {
                client.select(stmt, None, &[step_id.into()])?;
                Ok(())
            },
        )?;
        finalize(client, schema, task_id)?;
        Ok(())
    })
}

/// Extends a step's lease by its lease length; returns the new deadline.
pub fn heartbeat(step_id: i64, worker_id: &str) -> Result<i64, TaskerError> {
    Spi::connect_mut(|client| {
        check_lease(client, step_id, worker_id)?;
        with_write_plan(
            client,
            "heartbeat",
            "",
            &[INT8],
            || {
                "UPDATE tasker_core.step_claims
                    SET lease_expires_at = tasker_core.now() + lease_seconds * interval '1 second',
                        heartbeat_at = tasker_core.now()
                  WHERE workflow_step_id = $1 RETURNING lease_expires_at"
                    .to_owned()
            },
            |stmt| {
                Ok(client
                    .select(stmt, Some(1), &[step_id.into()])?
                    .first()
                    .get_one::<pgrx::datum::TimestampWithTimeZone>()?
                    .map(pgrx::pg_sys::TimestampTz::from)
                    .unwrap_or_default())
            },
        )
        .map_err(spi)
    })
}

fn lock_task(client: &SpiClient<'_>, schema: &SchemaName, task_id: i64) -> Result<(), TaskerError> {
    let q = schema.quoted();
    lock_row(client, "finalize_lock_task", schema, task_id, || {
        format!("SELECT 1 FROM {q}.tasker_tasks WHERE task_id = $1 FOR NO KEY UPDATE")
    })
}

/// (A write plan, though it only reads: it must take a fresh snapshot, see [`finalize`].)
fn native_counts(client: &SpiClient<'_>, task_id: i64) -> Result<TaskCounts, TaskerError> {
    with_write_plan(
        client,
        "native_counts",
        "",
        &[INT8],
        || {
            format!(
                "SELECT count(*),
                        count(*) FILTER (WHERE s.state IN ('complete', 'resolved_manually')),
                        count(*) FILTER (WHERE s.state = 'in_progress'),
                        count(*) FILTER (WHERE {CLAIMABLE}),
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
                    transitions::transition(
                        schema,
                        Entity::Task,
                        task_id,
                        State::Pending,
                        &empty,
                        None,
                    )?;
                }
                transitions::transition(
                    schema,
                    Entity::Task,
                    task_id,
                    State::InProgress,
                    &empty,
                    None,
                )?;
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
            let meta = JsonB(
                json!({ "execution_status": status, "error_message": "steps_in_error_state",
                                          "failed_steps_count": c.blocked }),
            );
            match transitions::transition(schema, Entity::Task, task_id, State::Error, &meta, None)
            {
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
            wake(client, task_id, &ns).map_err(spi)?;
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

fn task_namespace(
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
                let t = client.select(stmt, Some(1), &[step_id.into()])?;
                if t.is_empty() {
                    return Ok(None);
                }
                let r = t.first();
                Ok(Some((
                    r.get::<i64>(1)?.unwrap_or_default(),
                    r.get::<String>(2)?,
                )))
            },
        )
        .map_err(spi)?;
        let (task_id, state) = row.ok_or(TaskerError::NotFound {
            entity: "step",
            id: step_id,
        })?;
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
            |stmt| {
                let t = client.select(stmt, Some(1), &[task_id.into()])?;
                if t.is_empty() {
                    Ok(None)
                } else {
                    t.first().get_one::<String>()
                }
            },
        )
        .map_err(spi)?;
        if let Some(state) = finished {
            return Err(TaskerError::TaskFinished {
                step_id,
                task_id,
                state,
            });
        }
        let meta = JsonB(json!({ "reason": "resolved by operator" }));
        if state.as_deref() == Some("in_progress") {
            transitions::transition(
                schema,
                Entity::Step,
                step_id,
                State::Error,
                &meta,
                Some(State::InProgress),
            )?;
        }
        let changed = transitions::transition(
            schema,
            Entity::Step,
            step_id,
            State::ResolvedManually,
            &meta,
            None,
        )?;
        record_results(client, schema, step_id, results)?;
        finalize(client, schema, task_id)?;
        Ok(changed)
    })
}
