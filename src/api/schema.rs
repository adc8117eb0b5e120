//! Installing and locating the Tasker data schema.

use super::error::{attempt, OrRaise};
use crate::core::ident::SchemaName;
use crate::store;
use pgrx::prelude::*;

/// Creates the Tasker data tables, indexes, constraints and the `tasker_step_dag_relationships`
/// view in `target_schema` (default `public`), creating the schema if needed. Idempotent:
/// returns true when it created something, false when everything was already there.
/// The tables belong to the caller, never to the extension. `index_profile` (default: the
/// setting `tasker_core.index_profile`, itself `lean` by default) is `lean` — the unique
/// indexes and those tasker_core reads — or `rails`, exactly the Rails engine's set (running
/// it again with `rails` over a lean install adds the rest).
#[pg_extern(volatile, parallel_unsafe, name = "install_schema")]
fn install_schema_with_profile(
    target_schema: default!(Option<String>, "'public'"),
    index_profile: default!(Option<String>, "NULL"),
) -> bool {
    let (schema, profile) = attempt(move || {
        let schema = target_schema
            .ok_or(crate::core::error::TaskerError::NullArgument { argument: "target_schema" })
            .and_then(|s| SchemaName::parse(&s))?;
        let raw = match index_profile {
            Some(p) => p,
            None => store::settings::INDEX_PROFILE
                .get()
                .and_then(|c| c.into_string().ok())
                .unwrap_or_else(|| "lean".to_owned()),
        };
        let profile = store::schema::IndexProfile::parse(&raw).ok_or_else(|| {
            crate::core::error::TaskerError::InvalidArgument {
                argument: "index_profile",
                reason: format!("{raw:?} is neither 'lean' nor 'rails'"),
            }
        })?;
        Ok::<_, crate::core::error::TaskerError>((schema, profile))
    })
    .or_raise();
    store::schema::install_schema(&schema, profile)
}

/// `install_schema` as the SQL of 0.4.0 and before declares it (no index profile: the setting
/// decides): the library serves a database whose SQL objects are not updated yet.
#[pg_extern(volatile, parallel_unsafe, sql = false)]
fn install_schema(target_schema: Option<String>) -> bool {
    install_schema_with_profile(target_schema, None)
}

/// The schema where tasker_core looks for the Tasker tables (setting `tasker_core.data_schema`).
#[pg_extern(stable, parallel_safe)]
fn data_schema() -> String {
    store::settings::data_schema().or_raise().as_str().to_owned()
}
