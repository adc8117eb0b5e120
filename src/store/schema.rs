//! Creating the Tasker data schema (`tasker_core.install_schema`).

use crate::core::error::TaskerError;
use crate::core::ident::SchemaName;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

const TABLES_SQL: &str = include_str!("../../sql/schema/tables.sql");
const VIEWS_SQL: &str = include_str!("../../sql/schema/views.sql");
const RAILS_INDEXES_SQL: &str = include_str!("../../sql/schema/rails_indexes.sql");

/// Which of the Rails engine's indexes `install_schema` creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexProfile {
    /// The unique indexes and those tasker_core's statements and documented queries read.
    Lean,
    /// Exactly the Rails engine's set.
    Rails,
}

impl IndexProfile {
    pub fn parse(raw: &str) -> Option<IndexProfile> {
        match raw {
            "lean" => Some(IndexProfile::Lean),
            "rails" => Some(IndexProfile::Rails),
            _ => None,
        }
    }
}

/// The tables every tasker_core function needs in the data schema.
pub const REQUIRED_TABLES: [&str; 7] = [
    "tasker_tasks",
    "tasker_workflow_steps",
    "tasker_workflow_step_edges",
    "tasker_workflow_step_transitions",
    "tasker_task_transitions",
    "tasker_named_steps",
    "tasker_named_tasks",
];

fn count_relations(client: &SpiClient<'_>, schema: &SchemaName) -> Result<i64, pgrx::spi::Error> {
    Ok(client
        .select(
            "SELECT count(*) FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname LIKE 'tasker\\_%'",
            Some(1),
            &[schema.as_str().into()],
        )?
        .first()
        .get_one::<i64>()?
        .unwrap_or(0))
}

/// Creates every missing table, sequence, index, constraint and view of the Tasker schema in
/// `schema` (creating the schema too). Returns whether anything was created.
pub fn install_schema(schema: &SchemaName, profile: IndexProfile) -> bool {
    let quoted = schema.quoted();
    Spi::connect_mut(|client| {
        let before = count_relations(client, schema)?;
        // "already exists, skipping" notices are noise for an idempotent call.
        let previous = client
            .update(
                "SELECT current_setting('client_min_messages'), set_config('client_min_messages', 'warning', true)",
                Some(1),
                &[],
            )?
            .first()
            .get_one::<String>()?
            .unwrap_or_else(|| "notice".to_owned());
        client.update(format!("CREATE SCHEMA IF NOT EXISTS {quoted}").as_str(), None, &[])?;
        client.update(TABLES_SQL.replace("@schema@", &quoted).as_str(), None, &[])?;
        if profile == IndexProfile::Rails {
            client.update(RAILS_INDEXES_SQL.replace("@schema@", &quoted).as_str(), None, &[])?;
        }
        let view_exists = client
            .select(
                "SELECT to_regclass($1) IS NOT NULL",
                Some(1),
                &[format!("{quoted}.tasker_step_dag_relationships").into()],
            )?
            .first()
            .get_one::<bool>()?
            .unwrap_or(false);
        if !view_exists {
            client.update(VIEWS_SQL.replace("@schema@", &quoted).as_str(), None, &[])?;
        }
        client.update(
            "SELECT set_config('client_min_messages', $1, true)",
            None,
            &[previous.into()],
        )?;
        let after = count_relations(client, schema)?;
        Ok::<bool, pgrx::spi::Error>(after > before)
    })
    .unwrap_or_else(|e| pgrx::error!("install_schema failed: {e}"))
}

thread_local! {
    /// Data schemas this backend has already found installed.
    static INSTALLED: std::cell::RefCell<std::collections::HashSet<String>> =
        std::cell::RefCell::new(std::collections::HashSet::new());
}

/// Like [`require_installed`], checked once per backend and schema (a schema dropped later
/// surfaces as PostgreSQL's own undefined-table error).
pub fn require_installed_cached(
    client: &SpiClient<'_>,
    schema: &SchemaName,
) -> Result<(), TaskerError> {
    if INSTALLED.with(|s| s.borrow().contains(schema.as_str())) {
        return Ok(());
    }
    require_installed(client, schema)?;
    INSTALLED.with(|s| s.borrow_mut().insert(schema.as_str().to_owned()));
    Ok(())
}

/// Fails with [`TaskerError::SchemaNotInstalled`] unless every required table exists in `schema`.
pub fn require_installed(client: &SpiClient<'_>, schema: &SchemaName) -> Result<(), TaskerError> {
    let quoted = schema.quoted();
    for table in REQUIRED_TABLES {
        let present = client
            .select(
                "SELECT to_regclass($1) IS NOT NULL",
                Some(1),
                &[format!("{quoted}.{table}").into()],
            )
            .and_then(|t| t.first().get_one::<bool>())
            .ok()
            .flatten()
            .unwrap_or(false);
        if !present {
            return Err(TaskerError::SchemaNotInstalled {
                schema: schema.as_str().to_owned(),
                table,
            });
        }
    }
    Ok(())
}
