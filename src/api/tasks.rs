//! Starting tasks: `create_task` and its options.

use super::args::{required, valid_traceparent};
use super::error::{attempt, OrRaise};
use super::json::JsonbText;
use crate::core::error::TaskerError;
use crate::store::{self, templates};
use pgrx::prelude::*;
use serde_json::Value;

fn string_option(
    options: &serde_json::Map<String, Value>,
    key: &'static str,
    max: usize,
) -> Result<Option<String>, TaskerError> {
    match options.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() && s.chars().count() <= max => Ok(Some(s.clone())),
        Some(_) => Err(TaskerError::InvalidArgument {
            argument: "options",
            reason: format!("{key} must be a string of 1 to {max} characters"),
        }),
    }
}

fn parse_options(raw: Option<JsonbText>) -> Result<templates::TaskOptions, TaskerError> {
    let v = JsonbText::parse_or_empty(raw, "options")?;
    let Value::Object(o) = v else {
        return Err(TaskerError::InvalidArgument {
            argument: "options",
            reason: "expected a JSON object".into(),
        });
    };
    const KNOWN: [&str; 7] = [
        "initiator",
        "source_system",
        "reason",
        "tags",
        "bypass_steps",
        "idempotency_key",
        "traceparent",
    ];
    if let Some(k) = o.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(TaskerError::InvalidArgument {
            argument: "options",
            reason: format!("unknown option {k:?} (known: {})", KNOWN.join(", ")),
        });
    }
    let array = |key: &'static str| -> Result<Value, TaskerError> {
        match o.get(key) {
            None | Some(Value::Null) => Ok(Value::Array(vec![])),
            Some(a @ Value::Array(_)) => Ok(a.clone()),
            Some(_) => Err(TaskerError::InvalidArgument {
                argument: "options",
                reason: format!("{key} must be an array"),
            }),
        }
    };
    Ok(templates::TaskOptions {
        initiator: string_option(&o, "initiator", 128)?,
        source_system: string_option(&o, "source_system", 128)?,
        reason: string_option(&o, "reason", 128)?,
        tags: array("tags")?,
        bypass_steps: array("bypass_steps")?,
        idempotency_key: string_option(&o, "idempotency_key", 255)?,
        traceparent: string_option(&o, "traceparent", 55)?
            .map(|t| valid_traceparent("options", t))
            .transpose()?,
    })
}

/// Creates a task of a registered template — the task, its steps and edges — and wakes
/// workers. `version` NULL means the latest. The context is validated against the template's
/// JSON schema. `options`: initiator, source_system, reason, tags, bypass_steps,
/// idempotency_key (a key used before returns that task's id and creates nothing).
#[pg_extern(volatile, parallel_unsafe)]
fn create_task(
    namespace: Option<String>,
    name: Option<String>,
    version: Option<String>,
    context: Option<JsonbText>,
    options: default!(Option<JsonbText>, "'{}'"),
) -> i64 {
    attempt(move || {
        let ns = required(namespace, "namespace")?;
        let name = required(name, "name")?;
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
        templates::create_task(&schema, &ns, &name, version.as_deref(), &context, &options)
            .map(|(id, _)| id)
    })
    .or_raise()
}
