//! Listing the registered templates.

use crate::core::error::TaskerError;
use crate::core::ident::SchemaName;
use crate::core::template;
use crate::store::plans::{all_rows, with_plan, TEXT};
use crate::store::spi;
use pgrx::spi::Spi;

/// One template in a listing.
pub struct Listed {
    pub namespace: String,
    pub name: String,
    pub version: String,
    pub description: Option<String>,
    pub step_count: i32,
}

pub fn list(schema: &SchemaName, namespace: Option<&str>) -> Result<Vec<Listed>, TaskerError> {
    let q = schema.quoted();
    Spi::connect(|client| {
        with_plan(
            client,
            "list_templates",
            schema.as_str(),
            &[TEXT],
            || {
                format!(
                    "SELECT tn.name::text, nt.name::text, nt.version::text, nt.description::text,
                            jsonb_array_length(nt.configuration -> 'step_templates')
                     FROM {q}.tasker_named_tasks nt
                     JOIN {q}.tasker_task_namespaces tn ON tn.task_namespace_id = nt.task_namespace_id
                     WHERE ($1::text IS NULL OR tn.name = $1)
                       AND jsonb_typeof(nt.configuration -> 'step_templates') = 'array'
                     ORDER BY 1, 2, 3"
                )
            },
            |stmt| all_rows(client, stmt, &[namespace.into()], |row| Ok(Listed {
                        namespace: row.get::<String>(1)?.unwrap_or_default(),
                        name: row.get::<String>(2)?.unwrap_or_default(),
                        version: row.get::<String>(3)?.unwrap_or_default(),
                        description: row.get::<String>(4)?,
                        step_count: row.get::<i32>(5)?.unwrap_or_default(),
                    })),
        )
        .map_err(spi)
    })
    .map(|mut v: Vec<Listed>| {
        v.sort_by(|a, b| {
            (a.namespace.as_str(), a.name.as_str(), template::version_key(&a.version))
                .cmp(&(b.namespace.as_str(), b.name.as_str(), template::version_key(&b.version)))
        });
        v
    })
}
