//! Leases: the locks every call on a claimed step takes, the lease check, heartbeats and
//! giving a step back.

use super::*;

/// Whether the session's login may act on a claim made by another login: a superuser or a
/// member of tasker_admin (SQL over `session_user`, which SET ROLE does not change).
pub(super) const PRIVILEGED: &str =
    "(SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = session_user)
     OR (EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = 'tasker_admin')
         AND pg_catalog.pg_has_role(session_user, 'tasker_admin', 'MEMBER'))";

/// Locks a step's row: the first lock of every call that changes a claimed step, so that
/// workers, operators and lease expiry all lock step, then claim, then task.
pub(super) fn lock_step(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    step_id: i64,
) -> Result<(), TaskerError> {
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
        crate::store::schema::require_installed_cached(client, schema)?;
        if crate::store::facts::is_tracked(client, schema).map_err(spi)? {
            lock_step_and_children(client, schema, step_id)?;
        }
        Ok(())
    })
}

/// Locks a step's rows (with its children's maintained rows when it has children and
/// `with_children`), then runs `body`, the writes to them, in the same (sub)transaction
/// ([`crate::store::locks::with_all_locked`] says why).
pub(super) fn lock_step_rows<T>(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    step_id: i64,
    with_children: bool,
    body: impl FnOnce() -> Result<T, TaskerError>,
) -> Result<T, TaskerError> {
    if with_children {
        let children = children_of(client, &[step_id])?;
        if !children.all.is_empty() {
            return crate::store::locks::lock_step_and_children(
                client, schema, step_id, children, body,
            );
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
pub(super) fn lock_row(
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
pub(super) fn check_lease(
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
        |stmt| one_row(client, stmt, &[step_id.into()], |r| Ok((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<bool>(2)?.unwrap_or(false),
                r.get::<i64>(3)?.unwrap_or_default(),
                r.get::<i32>(4)?.unwrap_or_default(),
                r.get::<bool>(5)?.unwrap_or(false),
                r.get::<String>(6)?.unwrap_or_default(),
            ))),
    )
    .map_err(spi)?;
    let lost =
        |detail: String| TaskerError::LeaseLost { step_id, worker: worker_id.to_owned(), detail };
    match row {
        None => Err(lost(": the step is not claimed".into())),
        Some((holder, same_login, ..)) if holder != worker_id || !same_login => {
            Err(lost(": another worker holds it".into()))
        }
        Some((_, _, _, _, false, at)) => Err(lost(format!(": the lease expired at {at}"))),
        Some((_, _, task_id, secs, true, _)) => Ok((task_id, secs)),
    }
}

/// Step `$1`'s claim dropped and `update` (of that step) run, self-maintained when `direct`.
pub(super) fn with_mirror(direct: bool, update: String) -> String {
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
