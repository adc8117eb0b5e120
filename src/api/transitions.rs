//! Task and step state transitions as single SQL calls.

use super::error::OrRaise;
use super::json::JsonbText;
use crate::core::error::TaskerError;
use crate::core::state::{Entity, State};
use crate::store;
use pgrx::prelude::*;
use pgrx::JsonB;

fn parse_state(entity: Entity, id: i64, raw: &str) -> Result<State, TaskerError> {
    State::parse(raw).ok_or_else(|| TaskerError::UnknownState {
        entity: entity.as_str(),
        id,
        state: raw.chars().take(64).collect(),
    })
}

fn transition(
    entity: Entity,
    id: Option<i64>,
    to_state: Option<String>,
    metadata: Option<JsonbText>,
    expected_from: Option<String>,
) -> Result<bool, TaskerError> {
    let id = id.ok_or(TaskerError::NullArgument {
        argument: match entity {
            Entity::Task => "task_id",
            Entity::Step => "step_id",
        },
    })?;
    let to_state = to_state.ok_or(TaskerError::NullArgument { argument: "to_state" })?;
    let to = parse_state(entity, id, &to_state)?;
    let expected = expected_from.map(|raw| parse_state(entity, id, &raw)).transpose()?;
    let metadata = match metadata.map(|m| m.parse("metadata")).transpose()? {
        None => JsonB(serde_json::json!({})),
        Some(v) if v.is_object() => JsonB(v),
        Some(v) => {
            return Err(TaskerError::InvalidArgument {
                argument: "metadata",
                reason: format!("expected a JSON object, got {}", json_kind(&v)),
            })
        }
    };
    store::settings::check_payload("bytes of metadata", &metadata.0)?;
    let schema = store::settings::data_schema()?;
    if entity == Entity::Step && to.satisfies_dependency() {
        // the step and its children's maintained rows first, all or none (see the function)
        store::worker::lock_before_satisfying(&schema, id)?;
    }
    store::transitions::transition(&schema, entity, id, to, &metadata, expected)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Declares the SQL function that moves one kind of entity, its id argument named `$id`.
macro_rules! transition_fn {
    ($(#[$doc:meta])* $name:ident($id:ident) => $entity:expr) => {
        $(#[$doc])*
        #[pg_extern(volatile, parallel_unsafe)]
        fn $name(
            $id: Option<i64>,
            to_state: Option<String>,
            metadata: default!(Option<JsonbText>, "'{}'"),
            expected_from: default!(Option<String>, "NULL"),
        ) -> bool {
            transition($entity, $id, to_state, metadata, expected_from).or_raise()
        }
    };
}

transition_fn!(
    /// Moves a workflow step to `to_state`, recording the transition (with `from_state`) and its
    /// lifecycle event. Returns false when the step is already in `to_state`. With
    /// `expected_from`, fails unless the step is currently in that state (compare-and-swap).
    transition_step(step_id) => Entity::Step
);
transition_fn!(
    /// Moves a task to `to_state`; same contract as `transition_step`.
    transition_task(task_id) => Entity::Task
);

type CatalogRow = (String, String, String, String);

/// The lifecycle event catalog: every event name tasker_core knows, its group, what emits it
/// (`transition`, `orchestration`, or `declared` for names kept for Rails compatibility) and a
/// description.
#[pg_extern(immutable, parallel_safe)]
fn event_catalog() -> TableIterator<
    'static,
    (
        name!(name, String),
        name!(event_group, String),
        name!(source, String),
        name!(description, String),
    ),
> {
    let rows: Vec<CatalogRow> = crate::core::events::CATALOG
        .iter()
        .map(|e| {
            (
                e.name.to_owned(),
                crate::core::events::group(e.name).to_owned(),
                e.source.to_owned(),
                e.description.to_owned(),
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// True while one of tasker_core's own statements maintains `step_state` itself: the condition
/// of the tracking row triggers (`WHEN (NOT tasker_core._self_maintained())`), so that those
/// writes do not run the triggers too. Executable by everyone: the condition is evaluated as
/// whichever role writes the tables.
#[pg_extern(stable, parallel_safe, name = "_self_maintained")]
fn self_maintained() -> bool {
    crate::store::maintenance::active()
}
