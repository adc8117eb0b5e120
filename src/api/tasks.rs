//! Starting tasks: `create_task` and its options.

use super::args::{required, template_name, valid_traceparent};
use super::error::{attempt, OrRaise};
use super::json::JsonbText;
use crate::core::error::TaskerError;
use crate::store::{self, templates};
use pgrx::prelude::*;
use serde_json::Value;

/// The options, parsed and checked by the rules crate; the trace context's syntax here.
fn parse_options(raw: Option<JsonbText>) -> Result<templates::TaskOptions, TaskerError> {
    let o = crate::core::options::parse(&JsonbText::parse_or_empty(raw, "options")?)?;
    Ok(templates::TaskOptions {
        initiator: o.initiator,
        source_system: o.source_system,
        reason: o.reason,
        tags: Value::Array(o.tags),
        bypass_steps: Value::Array(o.bypass_steps),
        idempotency_key: o.idempotency_key,
        traceparent: o.traceparent.map(|t| valid_traceparent("options", t)).transpose()?,
        priority: o.priority,
        start: o.start,
    })
}

/// Creates a task of a registered template — the task, its steps and edges — and wakes
/// workers. `version` NULL means the latest. The context is validated against the template's
/// JSON schema. `options`: initiator, source_system, reason, tags, bypass_steps,
/// idempotency_key (a key used before returns that task's id and creates nothing), priority
/// (-1000 to 1000, higher first), run_at (a timestamptz) or delay_seconds (a later start).
#[pg_extern(volatile, parallel_unsafe)]
fn create_task(
    namespace: Option<String>,
    name: Option<String>,
    version: Option<String>,
    context: Option<JsonbText>,
    options: default!(Option<JsonbText>, "'{}'"),
) -> i64 {
    attempt(move || {
        let (namespace, name) = template_name(namespace, name)?;
        let context = required(context, "context")?.parse("context")?;
        store::settings::check_payload("bytes of context", &context)?;
        if !context.is_object() {
            return Err(TaskerError::InvalidArgument {
                argument: "context",
                reason: format!(
                    "expected a JSON object, got {}",
                    crate::core::template::kind(&context)
                ),
            });
        }
        let options = parse_options(options)?;
        let schema = store::settings::data_schema()?;
        let wanted = templates::TemplateRef {
            namespace: &namespace,
            name: &name,
            version: version.as_deref(),
        };
        templates::create_task(&schema, wanted, &context, &options).map(|(id, _)| id)
    })
    .or_raise()
}
