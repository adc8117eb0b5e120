//! Task and step transitions: lock the owner, validate against the state machine, flip
//! `most_recent`, insert the transition row, record the event — in one transaction.
//!
//! Safe with Rails writing the same rows concurrently without taking our locks: the current
//! transition row is flipped by id (a concurrent change makes the flip miss), and the new row
//! is inserted with `ON CONFLICT DO NOTHING` against the two unique indexes (a concurrent
//! insert makes it miss). Either miss means "someone else moved first": re-read and decide
//! again, so a unique violation never reaches the caller.

use super::events::{self, NewEvent};
use super::maintenance;
use super::plans::{with_keyed_plan, INT4, INT8, INT8ARRAY, JSONB, TEXT};
use super::spi;
use crate::core::error::TaskerError;
use crate::core::ident::SchemaName;
use crate::core::state::{Entity, State};
use pgrx::spi::{SpiClient, SpiResult};
use pgrx::JsonB;

/// How often a transition re-reads after losing a race before giving up.
const MAX_ATTEMPTS: u32 = 8;

/// Table and column names of one state machine's owner and transitions.
struct Tables {
    owner: &'static str,
    owner_key: &'static str,
    transitions: &'static str,
}

const fn tables(entity: Entity) -> Tables {
    match entity {
        Entity::Task => Tables {
            owner: "tasker_tasks",
            owner_key: "task_id",
            transitions: "tasker_task_transitions",
        },
        Entity::Step => Tables {
            owner: "tasker_workflow_steps",
            owner_key: "workflow_step_id",
            transitions: "tasker_workflow_step_transitions",
        },
    }
}

/// The owner row, locked, with its current transition.
struct Current {
    task_id: i64,
    transition_id: Option<i64>,
    state: Option<String>,
    max_sort_key: Option<i32>,
}

fn lock_current(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    entity: Entity,
    id: i64,
) -> SpiResult<Option<Current>> {
    let t = tables(entity);
    let q = schema.quoted();
    let task_col = "o.task_id";
    let key = match entity {
        Entity::Task => "lock_task",
        Entity::Step => "lock_step",
    };
    with_keyed_plan(
        client,
        key,
        schema.as_str(),
        &[INT8],
        || {
            format!(
                // The owner's highest sort_key, read from the (owner, sort_key) index at and
                // above the most_recent row's (one entry when the history is in order). A bare
                // max(sort_key) may be planned as a backward walk of the table-wide sort_key
                // index until a row of this owner turns up — past every transition of every
                // other owner with a higher sort_key, the whole index for a new task (seen:
                // 50 ms a call); `+ 0` keeps the planner off that path.
                "SELECT {task_col}, cur.id, cur.to_state::text, \
                        (SELECT max(x.sort_key + 0) FROM {q}.{tr} x \
                          WHERE x.{k} = o.{k} AND x.sort_key >= COALESCE(cur.sort_key, -2147483648)) \
                 FROM {q}.{owner} o \
                 LEFT JOIN {q}.{tr} cur ON cur.{k} = o.{k} AND cur.most_recent \
                 WHERE o.{k} = $1 FOR NO KEY UPDATE OF o",
                tr = t.transitions,
                k = t.owner_key,
                owner = t.owner,
            )
        },
        |stmt| {
            let table = client.select(stmt, Some(1), &[id.into()])?;
            if table.is_empty() {
                return Ok(None);
            }
            let row = table.first();
            Ok(Some(Current {
                task_id: row.get::<i64>(1)?.unwrap_or_default(),
                transition_id: row.get::<i64>(2)?,
                state: row.get::<String>(3)?,
                max_sort_key: row.get::<i32>(4)?,
            }))
        },
    )
}

/// Why a guard refuses, or `None` when it allows.
fn guard(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    entity: Entity,
    id: i64,
    to: State,
) -> SpiResult<Option<String>> {
    // (key, rows to look at, how they join `$1`, the step column)
    let (key, from, on, step) = match (entity, to) {
        (Entity::Step, State::InProgress) => {
            ("guard_step_parents", "tasker_workflow_step_edges e", "e.to_step_id", "e.from_step_id")
        }
        (Entity::Task, State::Complete) => {
            ("guard_task_steps", "tasker_workflow_steps ws", "ws.task_id", "ws.workflow_step_id")
        }
        _ => return Ok(None),
    };
    let mut open = unfinished_steps(client, key, schema, (from, on, step), id)?;
    if entity == Entity::Step {
        open.dedup();
        let parents: Vec<String> = open.iter().map(i64::to_string).collect();
        return Ok((!open.is_empty())
            .then(|| format!("parents not complete or resolved: steps {}", parents.join(", "))));
    }
    Ok((!open.is_empty()).then(|| {
        let shown: Vec<String> = open.iter().take(10).map(i64::to_string).collect();
        let more =
            if open.len() > 10 { format!(" and {} more", open.len() - 10) } else { String::new() };
        format!("steps not complete or resolved: {}{more}", shown.join(", "))
    }))
}

/// The steps (column `step` of `from`, joined to `$1` by `on`) that are neither complete nor
/// resolved_manually, in id order.
fn unfinished_steps(
    client: &SpiClient<'_>,
    key: &'static str,
    schema: &SchemaName,
    (from, on, step): (&str, &str, &str),
    id: i64,
) -> SpiResult<Vec<i64>> {
    let q = schema.quoted();
    let sql = || {
        format!(
            "SELECT {step} FROM {q}.{from} \
             LEFT JOIN {q}.tasker_workflow_step_transitions cur \
                    ON cur.workflow_step_id = {step} AND cur.most_recent \
             WHERE {on} = $1 \
               AND (cur.to_state IS NULL OR cur.to_state NOT IN ('complete', 'resolved_manually')) \
             ORDER BY 1"
        )
    };
    with_keyed_plan(client, key, schema.as_str(), &[INT8], sql, |stmt| {
        client
            .select(stmt, None, &[id.into()])?
            .map(|row| row.get::<i64>(1).map(Option::unwrap_or_default))
            .collect()
    })
}

/// Clears `most_recent` on the transition the caller read as current. False when it is no
/// longer current (someone else moved first).
fn flip(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    entity: Entity,
    transition_id: i64,
    direct: bool,
) -> SpiResult<bool> {
    // (self-maintained: the insert that follows sets the step's maintained state; should it
    // not happen, `clear_flipped` does what the trigger would have done)
    let _direct = direct.then(maintenance::Direct::begin);
    let (q, tr) = (schema.quoted(), tables(entity).transitions);
    let sql = || {
        format!(
            "UPDATE {q}.{tr} SET most_recent = false, \
                    updated_at = (tasker_core.now() AT TIME ZONE 'UTC') \
             WHERE id = $1 AND most_recent RETURNING id"
        )
    };
    let key = if entity == Entity::Task { "flip_task" } else { "flip_step" };
    with_keyed_plan(client, key, schema.as_str(), &[INT8], sql, |stmt| {
        Ok(client.select(stmt, None, &[transition_id.into()])?.len() == 1)
    })
}

/// Inserts the new current transition; `None` when a concurrent writer took the sort key or
/// the most_recent slot first. With `direct` (a step's, in the tracked schema), the same
/// statement sets the step's maintained state and returns its children.
#[allow(clippy::too_many_arguments)]
fn insert(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    entity: Entity,
    id: i64,
    to: State,
    from: &str,
    metadata: &JsonB,
    sort_key: i32,
    direct: bool,
) -> SpiResult<Option<(i64, Vec<i64>)>> {
    let t = tables(entity);
    let q = schema.quoted();
    let traced = super::events::traces_installed();
    let key = match (entity, traced, direct) {
        (Entity::Task, true, _) => "insert_task_transition_traced",
        (Entity::Step, true, false) => "insert_step_transition_traced",
        (Entity::Task, false, _) => "insert_task_transition",
        (Entity::Step, false, false) => "insert_step_transition",
        (Entity::Step, true, true) => "insert_step_transition_traced_direct",
        (Entity::Step, false, true) => "insert_step_transition_direct",
    };
    let _direct = direct.then(maintenance::Direct::begin);
    with_keyed_plan(
        client,
        key,
        schema.as_str(),
        &[INT8, TEXT, TEXT, JSONB, INT4],
        || {
            // the transition of a traced task carries its traceparent in its metadata
            let task = match entity {
                Entity::Task => "$1".to_owned(),
                Entity::Step => {
                    format!("(SELECT ws.task_id FROM {q}.tasker_workflow_steps ws WHERE ws.workflow_step_id = $1)")
                }
            };
            let metadata = if traced {
                format!(
                    "$4 || COALESCE((SELECT jsonb_build_object('traceparent', tt.traceparent) \
                                     FROM tasker_core.task_traces tt WHERE tt.task_id = {task}), '{{}}')"
                )
            } else {
                "$4".to_owned()
            };
            let insert = format!(
                "INSERT INTO {q}.{tr} (to_state, from_state, metadata, sort_key, most_recent, {k}, created_at, updated_at) \
                 VALUES ($2, $3, {metadata}, \
                         $5, true, $1, (tasker_core.now() AT TIME ZONE 'UTC'), (tasker_core.now() AT TIME ZONE 'UTC')) \
                 ON CONFLICT DO NOTHING RETURNING id",
                tr = t.transitions,
                k = t.owner_key
            );
            if !direct {
                return format!("{insert}, NULL::bigint[]");
            }
            // The new current transition and, in the same statement, the step's maintained
            // state (what the row trigger's _set_step_state does): its children come back for
            // the caller to move their blocked counts when the step starts or stops satisfying
            // them.
            format!(
                "WITH ins AS ({insert}, created_at), \
                 st AS (UPDATE tasker_core.step_state s \
                        SET state = $2, state_at = ins.created_at, state_transition_id = ins.id, \
                            transition_count = s.transition_count + 1 \
                        FROM ins WHERE s.workflow_step_id = $1 RETURNING s.child_ids) \
                 SELECT ins.id, (SELECT st.child_ids FROM st) FROM ins"
            )
        },
        |stmt| {
            let table = client.select(
                stmt,
                None,
                &[
                    id.into(),
                    to.as_str().into(),
                    from.into(),
                    JsonB(metadata.0.clone()).into(),
                    sort_key.into(),
                ],
            )?;
            if table.is_empty() {
                return Ok(None);
            }
            let row = table.first();
            Ok(row
                .get::<i64>(1)?
                .map(|id| (id, row.get::<Vec<i64>>(2).ok().flatten().unwrap_or_default())))
        },
    )
}

/// Moves the blocked counts of a step's children by one per edge (children locked in id
/// order first, as the trigger does): down when the step now satisfies them, up when it no
/// longer does. A dynamic child (not judged yet) whose last parent this was is noted for the
/// finalizer ([`crate::store::worker::dynamic::note_due`]).
fn move_children(client: &SpiClient<'_>, children: Vec<i64>, now_done: bool) -> SpiResult<()> {
    if children.is_empty() {
        return Ok(());
    }
    let dynamic = crate::store::worker::dynamic::installed();
    with_keyed_plan(
        client,
        if dynamic { "direct_move_children_dynamic" } else { "direct_move_children" },
        "",
        &[INT8ARRAY, INT4],
        || {
            let due = if dynamic {
                " RETURNING c.blocked_parents = 0 AND c.not_before = 'infinity'"
            } else {
                ""
            };
            format!(
                "WITH locked AS MATERIALIZED (SELECT c.workflow_step_id FROM tasker_core.step_state c \
                                               WHERE c.workflow_step_id = ANY ($1) \
                                               ORDER BY c.workflow_step_id FOR UPDATE), \
                      d AS (SELECT x AS id, count(*)::integer AS n FROM unnest($1) AS x GROUP BY x) \
                 UPDATE tasker_core.step_state c SET blocked_parents = c.blocked_parents + d.n * $2 \
                 FROM d WHERE c.workflow_step_id = d.id \
                   AND c.workflow_step_id IN (SELECT l.workflow_step_id FROM locked l){due}"
            )
        },
        |stmt| {
            let rows = client.select(
                stmt,
                None,
                &[children.into(), (if now_done { -1 } else { 1 }).into()],
            )?;
            if dynamic {
                for row in rows {
                    if row.get::<bool>(1)?.unwrap_or_default() {
                        crate::store::worker::dynamic::note_due();
                    }
                }
            }
            Ok(())
        },
    )
}

/// A self-maintained flip whose insert did not happen: what the trigger would have done
/// (clear the step's state if the flipped transition was its current one).
fn clear_flipped(client: &SpiClient<'_>, step_id: i64, flipped: i64) -> SpiResult<()> {
    with_keyed_plan(
        client,
        "direct_clear_flipped",
        "",
        &[INT8, INT8],
        || "SELECT tasker_core._set_step_state($1, NULL, NULL, NULL, $2, 0)".to_owned(),
        |stmt| {
            client.select(stmt, None, &[step_id.into(), flipped.into()])?;
            Ok(())
        },
    )
}

/// Moves `entity` `id` to `to`. Returns false when it is already there (a no-op). Errors name
/// the id and both states.
pub fn transition(
    schema: &SchemaName,
    entity: Entity,
    id: i64,
    to: State,
    metadata: &JsonB,
    expected_from: Option<State>,
) -> Result<bool, TaskerError> {
    transition_guarded(schema, (entity, id), to, metadata, expected_from, true)
}

/// [`transition`] for a caller that has just established, under the locks it holds, what the
/// transition's guard checks (the finalizer counted every step of the task complete).
pub fn transition_without_guard(
    schema: &SchemaName,
    entity: Entity,
    id: i64,
    to: State,
    metadata: &JsonB,
) -> Result<bool, TaskerError> {
    transition_guarded(schema, (entity, id), to, metadata, None, false)
}

fn transition_guarded(
    schema: &SchemaName,
    (entity, id): (Entity, i64),
    to: State,
    metadata: &JsonB,
    expected_from: Option<State>,
    check_guard: bool,
) -> Result<bool, TaskerError> {
    pgrx::spi::Spi::connect_mut(|client| {
        super::schema::require_installed_cached(client, schema)?;
        // A step's maintained state written by these statements themselves (the tracked
        // schema only: step_state rows are those of its steps).
        let direct = entity == Entity::Step
            && maintenance::installed()
            && super::facts::is_tracked(client, schema).map_err(spi)?;
        for _ in 0..MAX_ATTEMPTS {
            let cur = lock_current(client, schema, entity, id)
                .map_err(spi)?
                .ok_or(TaskerError::NotFound { entity: entity.as_str(), id })?;
            let from_str = cur.state.clone().unwrap_or_else(|| State::Pending.as_str().to_owned());
            if from_str == to.as_str() {
                return Ok(false);
            }
            if let Some(expected) = expected_from {
                if expected.as_str() != from_str {
                    return Err(TaskerError::ExpectedFromMismatch {
                        entity: entity.as_str(),
                        id,
                        expected: expected.to_string(),
                        actual: from_str,
                        to: to.to_string(),
                    });
                }
            }
            let from = match State::parse(&from_str) {
                Some(f) if entity.allows(f, to) => f,
                _ => {
                    return Err(TaskerError::TransitionNotAllowed {
                        entity: entity.as_str(),
                        id,
                        from: from_str,
                        to: to.to_string(),
                    })
                }
            };
            let refused = if check_guard {
                guard(client, schema, entity, id, to).map_err(spi)?
            } else {
                None
            };
            if let Some(reason) = refused {
                return Err(TaskerError::GuardFailed {
                    entity: entity.as_str(),
                    id,
                    from: from_str,
                    to: to.to_string(),
                    reason,
                });
            }
            if let Some(current) = cur.transition_id {
                if !flip(client, schema, entity, current, direct).map_err(spi)? {
                    continue;
                }
            }
            let sort_key = cur.max_sort_key.map_or(10, |k| k.saturating_add(10));
            let Some((transition_id, children)) =
                insert(client, schema, entity, id, to, &from_str, metadata, sort_key, direct)
                    .map_err(spi)?
            else {
                if let (true, Some(flipped)) = (direct, cur.transition_id) {
                    clear_flipped(client, id, flipped).map_err(spi)?;
                }
                continue;
            };
            // (the state before this call: a flipped-but-not-replaced transition cleared it,
            // and the trigger then moved the children as from no state)
            if direct && from.satisfies_dependency() != to.satisfies_dependency() {
                move_children(client, children, to.satisfies_dependency()).map_err(spi)?;
            }
            let (task_id, step_id) = match entity {
                Entity::Task => (Some(id), None),
                Entity::Step => (Some(cur.task_id), Some(id)),
            };
            events::emit(
                client,
                &NewEvent {
                    name: entity.transition_event(from, to),
                    task_id,
                    step_id,
                    from_state: Some(from.as_str()),
                    to_state: Some(to.as_str()),
                    payload: serde_json::json!({ "transition_id": transition_id, "sort_key": sort_key }),
                },
            )
            .map_err(spi)?;
            return Ok(true);
        }
        Err(TaskerError::TransitionConflict {
            entity: entity.as_str(),
            id,
            to: to.to_string(),
            attempts: MAX_ATTEMPTS,
        })
    })
}
