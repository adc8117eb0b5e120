//! Task templates: registering, reading and listing them.

use super::args::{required, template_name};
use super::error::{attempt, OrRaise};
use super::json::JsonbText;
use crate::core::error::TaskerError;
use crate::core::template::TaskTemplate;
use crate::store::{self, templates};
use pgrx::prelude::*;
use pgrx::JsonB;

/// Registers a task template (the Rails YAML template as JSON) in the Rails tables, replacing
/// an earlier registration of the same namespace, name and version. Returns the named task id.
#[pg_extern(volatile, parallel_unsafe)]
fn register_task_template(template: Option<JsonbText>) -> i32 {
    attempt(move || {
        let raw = required(template, "template")?.parse("template")?;
        let max = store::settings::MAX_TEMPLATE_STEPS.get().max(1) as usize;
        let t = TaskTemplate::parse(&raw, max)?;
        templates::register(&store::settings::data_schema()?, &t, &raw)
    })
    .or_raise()
}

/// A registered template as stored (latest version when `version` is NULL).
#[pg_extern(stable, parallel_safe)]
fn get_task_template(
    namespace: Option<String>,
    name: Option<String>,
    version: default!(Option<String>, "NULL"),
) -> JsonB {
    attempt(move || stored_template(namespace, name, version).map(JsonB)).or_raise()
}

/// The stored document of a template (latest version when `version` is `None`).
fn stored_template(
    namespace: Option<String>,
    name: Option<String>,
    version: Option<String>,
) -> Result<serde_json::Value, TaskerError> {
    let (namespace, name) = template_name(namespace, name)?;
    let schema = store::settings::data_schema()?;
    let version = version.as_deref();
    let wanted = templates::TemplateRef { namespace: &namespace, name: &name, version };
    Spi::connect(|c| templates::find(c, &schema, wanted)).map(|s| s.config)
}

/// Registered templates, optionally of one namespace, ordered by namespace, name, version.
#[rustfmt::skip] // a template's key on one line, what it holds on the next
#[pg_extern(stable, parallel_safe)]
fn list_task_templates(namespace: default!(Option<String>, "NULL")) -> TableIterator<'static, (
    name!(namespace, String), name!(name, String), name!(version, String),
    name!(description, Option<String>), name!(step_count, i32),
)> {
    let rows =
        attempt(move || templates::list(&store::settings::data_schema()?, namespace.as_deref()))
            .or_raise();
    TableIterator::new(
        rows.into_iter().map(|l| (l.namespace, l.name, l.version, l.description, l.step_count)),
    )
}
