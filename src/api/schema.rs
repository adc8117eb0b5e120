//! Installing and locating the Tasker data schema.

use super::error::OrRaise;
use crate::core::ident::SchemaName;
use crate::store;
use pgrx::prelude::*;

/// Creates the Tasker data tables, indexes, constraints and the `tasker_step_dag_relationships`
/// view in `target_schema` (default `public`), creating the schema if needed. Idempotent:
/// returns true when it created something, false when everything was already there.
/// The tables belong to the caller, never to the extension.
#[pg_extern(volatile, parallel_unsafe)]
fn install_schema(target_schema: default!(Option<String>, "'public'")) -> bool {
    let schema = target_schema
        .ok_or(crate::core::error::TaskerError::NullArgument {
            argument: "target_schema",
        })
        .and_then(|s| SchemaName::parse(&s))
        .or_raise();
    store::schema::install_schema(&schema)
}

/// The schema where tasker_core looks for the Tasker tables (setting `tasker_core.data_schema`).
#[pg_extern(stable, parallel_safe)]
fn data_schema() -> String {
    store::settings::data_schema()
        .or_raise()
        .as_str()
        .to_owned()
}
