//! Claims: ready steps taken under a lease, expired leases released, tasks started.

use super::*;
use std::collections::HashMap;

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
    // The lost attempt may have been the last one: the task may now have failed.
    tasks.into_iter().try_for_each(|task_id| finalize(client, schema, task_id).map(drop))?;
    Ok(ids)
}

/// The step half of [`expire_leases`]: fails the steps whose lease expired and returns their
/// ids and their tasks, in ascending order — the order in which the caller must finalize them
/// (a task is locked until commit: two expirers that took them in deadline order deadlocked).
pub(super) fn release_expired(
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
            all_rows(client, stmt, &[limit.into()], |row| {
                Ok((
                    row.get::<i64>(1)?.unwrap_or_default(),
                    row.get::<String>(2)?.unwrap_or_default(),
                ))
            })
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
pub(super) fn release(
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
                format!("{gone}, {} SELECT upd.task_id FROM upd", mirrored(&update, "task_id, "))
            } else {
                format!("{gone} {update} RETURNING task_id")
            }
        },
        |stmt| one_value::<i64>(client, stmt, &[step_id.into(), only_expired.into()]),
    )?;
    let Some(task_id) = task_id else {
        return Ok(None);
    };
    let metadata = JsonB(json!({ "reason": reason, "worker_id": worker }));
    match transition(schema, Step, step_id, State::Error, &metadata, Some(State::InProgress)) {
        Ok(_) | Err(TaskerError::ExpectedFromMismatch { .. }) => Ok(Some(task_id)),
        Err(e) => Err(e),
    }
}

/// Promotes the root steps of scheduled tasks that are due into the ready queue, when there
/// are any (one probe of the scheduled index otherwise: claims do not depend on `tick()`
/// running to start a scheduled task), and tells whether any task has a concurrency key (one
/// probe of its index).
fn claim_prelude(client: &SpiClient<'_>) -> Result<bool, TaskerError> {
    with_write_plan(
        client,
        "claim_prelude",
        "",
        &[],
        || {
            // the heads of the indexes (ORDER BY and LIMIT: an index probe whatever the
            // statistics, never a scan)
            format!(
                "SELECT CASE WHEN (SELECT s.not_before FROM tasker_core.step_state s
                                   WHERE s.not_before IS NOT NULL ORDER BY s.not_before LIMIT 1) <= {NOW}
                             THEN tasker_core._promote_scheduled(1000) ELSE 0 END,
                        EXISTS (SELECT 1 FROM tasker_core.task_options o WHERE o.concurrency_key IS NOT NULL)"
            )
        },
        |stmt| {
            let keyed = one_row(client, stmt, &[], |r| r.get::<bool>(2))?;
            Ok(keyed.flatten().unwrap_or(false))
        },
    )
    .map_err(spi)
}

/// The concurrency keys whose live leases reach their limit: the claim's scan passes over
/// their steps (the in-progress steps are few; their claims are read, not the ready queue).
fn full_keys(client: &SpiClient<'_>) -> Result<Vec<String>, TaskerError> {
    with_write_plan(
        client,
        "claim_full_keys",
        "",
        &[],
        || {
            "SELECT o.concurrency_key
             FROM tasker_core.step_claims c
             JOIN tasker_core.task_options o ON o.task_id = c.task_id
             WHERE o.concurrency_key IS NOT NULL AND c.lease_expires_at > tasker_core.now()
             GROUP BY o.concurrency_key, o.concurrency_limit
             HAVING count(*) >= o.concurrency_limit"
                .to_owned()
        },
        |stmt| all_rows(client, stmt, &[], |row| Ok(row.get::<String>(1)?.unwrap_or_default())),
    )
    .map_err(spi)
}

/// The concurrency key and limit of each of `tasks` that has one.
fn task_keys(
    client: &SpiClient<'_>,
    tasks: Vec<i64>,
) -> Result<HashMap<i64, (String, i32)>, TaskerError> {
    with_write_plan(
        client,
        "claim_task_keys",
        "",
        &[INT8ARRAY],
        || {
            "SELECT o.task_id, o.concurrency_key, o.concurrency_limit FROM tasker_core.task_options o
             WHERE o.task_id = ANY ($1) AND o.concurrency_key IS NOT NULL"
                .to_owned()
        },
        |stmt| {
            all_rows(client, stmt, &[tasks.into()], |row| {
                Ok((
                    row.get::<i64>(1)?.unwrap_or_default(),
                    (row.get::<String>(2)?.unwrap_or_default(), row.get::<i32>(3)?.unwrap_or(1)),
                ))
            })
        },
    )
    .map_err(spi)
}

/// The concurrency gates a claim holds: per key, whether it got the gate, and how many live
/// leases the key has (read under the gate) plus the steps this claim took.
#[derive(Default)]
struct Gates(HashMap<String, Option<i64>>);

impl Gates {
    /// Whether one more step of `key` may start: the gate is taken (or held already) and the
    /// key's live leases are below `limit`. A gate another claimer holds means no.
    fn admits(
        &mut self,
        client: &SpiClient<'_>,
        key: &str,
        limit: i32,
    ) -> Result<bool, TaskerError> {
        if !self.0.contains_key(key) {
            let live = with_write_plan(
                client,
                "claim_gate",
                "",
                &[TEXT],
                || {
                    // Takes the key's gate (skipping it when another claimer holds it) and
                    // moves it, then counts the key's live leases in a statement of its own:
                    // under READ COMMITTED that snapshot sees every claim committed before
                    // the gate was free; under REPEATABLE READ a claim that committed since
                    // the transaction's snapshot moved the gate, and taking it fails to
                    // serialize instead.
                    "WITH g AS (SELECT key FROM tasker_core.concurrency_gates WHERE key = $1
                                FOR UPDATE SKIP LOCKED),
                          u AS (UPDATE tasker_core.concurrency_gates x SET claims = x.claims + 1
                                FROM g WHERE x.key = g.key RETURNING 1)
                     SELECT count(*) FROM u"
                        .to_owned()
                },
                |stmt| one_value::<i64>(client, stmt, &[key.into()]),
            )
            .map_err(spi)?;
            let live = if live.unwrap_or(0) == 0 {
                None
            } else {
                with_write_plan(
                    client,
                    "claim_gate_count",
                    "",
                    &[TEXT],
                    || {
                        "SELECT count(*) FROM tasker_core.step_claims c
                         JOIN tasker_core.task_options o ON o.task_id = c.task_id
                         WHERE o.concurrency_key = $1 AND c.lease_expires_at > tasker_core.now()"
                            .to_owned()
                    },
                    |stmt| one_value::<i64>(client, stmt, &[key.into()]),
                )
                .map_err(spi)?
            };
            self.0.insert(key.to_owned(), live);
        }
        Ok(matches!(self.0.get(key), Some(Some(n)) if *n < i64::from(limit)))
    }

    /// Counts a step of `key` this claim took.
    fn took(&mut self, key: &str) {
        if let Some(Some(n)) = self.0.get_mut(key) {
            *n += 1;
        }
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
        let (claimable, scheduling) = super::claimable();
        let keyed = scheduling && claim_prelude(client)?;
        // steps of keys at their limit are passed over by the scan (the SQL of 0.8.0 on)
        let full: Option<Vec<String>> = if keyed { Some(full_keys(client)?) } else { None };
        let without_full_keys = if scheduling {
            "AND ($3::text[] IS NULL OR NOT EXISTS (
                     SELECT 1 FROM tasker_core.task_options o
                     WHERE o.task_id = s.task_id AND o.concurrency_key = ANY ($3)))"
        } else {
            ""
        };
        // highest priority first, then oldest (the SQL of 0.8.0 on has priorities)
        let order = if scheduling { "s.priority DESC, " } else { "" };
        let outer_order = if scheduling { "x.priority DESC, " } else { "" };
        let candidates: Vec<(i64, i64, Option<String>)> = with_write_plan(
            client,
            match (per_namespace, scheduling) {
                (true, true) => "claim_candidates_ns",
                (true, false) => "claim_candidates_ns_07",
                (false, true) => "claim_candidates",
                (false, false) => "claim_candidates_07",
            },
            schema.as_str(),
            &[INT4, TEXTARRAY, TEXTARRAY],
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
                             SELECT s.workflow_step_id{priority}
                             FROM tasker_core.step_state s
                             JOIN {q}.tasker_tasks t ON t.task_id = s.task_id
                             JOIN {q}.tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
                             WHERE s.namespace_id = tn.task_namespace_id
                               AND nt.task_namespace_id = tn.task_namespace_id
                               AND {claimable}
                               AND t.complete IS NOT TRUE
                               {without_full_keys}
                             ORDER BY s.namespace_id, {order}s.workflow_step_id
                             LIMIT $1 + 32) x
                         WHERE ($2::text[] IS NULL OR tn.name = ANY ($2))
                         ORDER BY {outer_order}x.workflow_step_id
                         LIMIT $1 + 32",
                        priority = if scheduling { ", s.priority" } else { "" },
                    )
                } else {
                    // the SQL of 0.2.0 and before: one ready queue for all namespaces
                    format!(
                        "SELECT s.workflow_step_id
                         FROM tasker_core.step_state s
                         JOIN {q}.tasker_tasks t ON t.task_id = s.task_id
                         JOIN {q}.tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
                         JOIN {q}.tasker_task_namespaces tn ON tn.task_namespace_id = nt.task_namespace_id
                         WHERE {claimable}
                           AND t.complete IS NOT TRUE
                           AND ($2::text[] IS NULL OR tn.name = ANY ($2))
                           {without_full_keys}
                         ORDER BY {order}s.workflow_step_id
                         LIMIT $1 + 32"
                    )
                };
                format!(
                    "WITH c AS MATERIALIZED ({ready}),
                          ids AS MATERIALIZED (SELECT ARRAY(SELECT c.workflow_step_id FROM c) AS a)
                     SELECT ws.workflow_step_id, ws.task_id, NULL::text
                     FROM {q}.tasker_workflow_steps ws, ids
                     WHERE ws.workflow_step_id = ANY (ids.a)
                     ORDER BY {locked_order}
                     LIMIT $1
                     FOR NO KEY UPDATE OF ws SKIP LOCKED",
                    // in the ready queue's order: by priority, then oldest
                    locked_order = if scheduling {
                        "array_position(ids.a, ws.workflow_step_id)"
                    } else {
                        "ws.workflow_step_id"
                    }
                )
            },
            |stmt| all_rows(client, stmt, &[max_steps.into(), namespaces.clone().into(), full.clone().into()], |row| Ok((
                        row.get::<i64>(1)?.unwrap_or_default(),
                        row.get::<i64>(2)?.unwrap_or_default(),
                        row.get::<String>(3)?,
                    ))),
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
        let keys = if keyed {
            task_keys(client, candidates.iter().map(|c| c.1).collect())?
        } else {
            HashMap::new()
        };
        let mut gates = Gates::default();
        for (step_id, task_id, state) in candidates {
            let key = keys.get(&task_id);
            if let Some((k, limit)) = key {
                if !gates.admits(client, k, *limit)? {
                    continue;
                }
            }
            if let Some(tp) = traceparent {
                if traced.insert(task_id) {
                    events::record_trace(client, task_id, tp).map_err(spi)?;
                }
            }
            // The locked row may have moved on since the scan read it: the transitions
            // re-validate against the current state and skip the step if it is not claimable.
            if state.as_deref() == Some("error") {
                let retry = JsonB(json!({ "reason": "retry", "worker_id": worker_id }));
                match transition(schema, Step, step_id, State::Pending, &retry, Some(State::Error))
                {
                    Ok(_) => {}
                    Err(TaskerError::ExpectedFromMismatch { .. })
                    | Err(TaskerError::TransitionNotAllowed { .. }) => continue,
                    Err(e) => return Err(e),
                }
            }
            let meta = JsonB(json!({ "worker_id": worker_id }));
            match transition(schema, Step, step_id, State::InProgress, &meta, Some(State::Pending))
            {
                Ok(true) => {
                    claimed_ids.push(step_id);
                    tasks_started.insert(task_id);
                    if let Some((k, _)) = key {
                        gates.took(k);
                    }
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
            if logins { "claim_record" } else { "claim_record_0_3" },
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
                    &[claimed_ids.clone().into(), worker_id.into(), lease_seconds.into()],
                )?;
                Ok(())
            },
        )?;
        claimed_rows(client, schema, &claimed_ids)
    })
}

/// The candidates (locked by this transaction) that are still claimable by a fresh read.
pub(super) fn recheck_claimable(
    client: &SpiClient<'_>,
    candidates: Vec<(i64, i64, Option<String>)>,
) -> Result<Vec<(i64, i64, Option<String>)>, TaskerError> {
    if candidates.is_empty() {
        return Ok(candidates);
    }
    let ids: Vec<i64> = candidates.iter().map(|c| c.0).collect();
    let (claimable, scheduling) = super::claimable();
    let still: std::collections::HashMap<i64, Option<String>> = with_write_plan(
        client,
        if scheduling { "claim_recheck" } else { "claim_recheck_07" },
        "",
        &[INT8ARRAY],
        || {
            // The candidates by primary key, readiness evaluated on each: with the readiness
            // predicate in the WHERE clause, the generic plan on never-analysed tables walked
            // the whole ready index (its predicate matched) and filtered it by id — 4,000 rows
            // read per claim with 2,000 tasks queued.
            format!(
                "SELECT s.workflow_step_id, s.state, COALESCE({claimable}, false)
                 FROM tasker_core.step_state s WHERE s.workflow_step_id = ANY ($1)"
            )
        },
        |stmt| {
            let mut out = std::collections::HashMap::new();
            for row in client.select(stmt, None, &[ids.into()])? {
                if row.get::<bool>(3)?.unwrap_or(false) {
                    out.insert(row.get::<i64>(1)?.unwrap_or_default(), row.get::<String>(2)?);
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
pub(super) fn start_task(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    task_id: i64,
) -> Result<(), TaskerError> {
    let empty = JsonB(json!({}));
    match task_state(client, schema, task_id)?.as_deref() {
        Some("in_progress") => return Ok(()),
        Some("error") => {
            transition(schema, Task, task_id, State::Pending, &empty, Some(State::Error))?;
        }
        Some("complete") | Some("cancelled") | Some("resolved_manually") => return Ok(()),
        _ => {}
    }
    match transition(schema, Task, task_id, State::InProgress, &empty, None) {
        Ok(_) | Err(TaskerError::TransitionNotAllowed { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

pub(super) fn task_state(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    task_id: i64,
) -> Result<Option<String>, TaskerError> {
    let q = schema.quoted();
    let sql = || {
        format!("SELECT to_state::text FROM {q}.tasker_task_transitions WHERE task_id = $1 AND most_recent")
    };
    // a fresh snapshot: the state another finalizer committed while this one waited
    with_keyed_plan(client, "task_state", schema.as_str(), &[INT8], sql, |stmt| {
        one_value::<String>(client, stmt, &[task_id.into()])
    })
    .map_err(spi)
}

pub(super) fn claimed_rows(
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
        |stmt| all_rows(client, stmt, &[ids.to_vec().into()], |row| Ok(Claimed {
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
                })),
    )
    .map_err(spi)
}
