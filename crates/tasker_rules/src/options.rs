//! The options of `create_task`, parsed into a typed struct (serde), then checked: strings of
//! bounded length, arrays where arrays belong, no unknown key.

use super::error::TaskerError;
use serde::Deserialize;
use serde_json::Value;

/// `create_task`'s options as a caller writes them: every key optional, `null` the same as
/// absent.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    initiator: Option<String>,
    source_system: Option<String>,
    reason: Option<String>,
    tags: Option<Vec<Value>>,
    bypass_steps: Option<Vec<Value>>,
    idempotency_key: Option<String>,
    traceparent: Option<String>,
}

/// The checked options (the trace context's W3C syntax is checked by the caller).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CreateOptions {
    pub initiator: Option<String>,
    pub source_system: Option<String>,
    pub reason: Option<String>,
    pub tags: Vec<Value>,
    pub bypass_steps: Vec<Value>,
    pub idempotency_key: Option<String>,
    pub traceparent: Option<String>,
}

fn invalid(reason: String) -> TaskerError {
    TaskerError::InvalidArgument { argument: "options", reason }
}

/// A string option of 1 to `max` characters.
fn bounded(key: &str, v: Option<String>, max: usize) -> Result<Option<String>, TaskerError> {
    match v {
        Some(s) if s.is_empty() || s.chars().count() > max => {
            Err(invalid(format!("{key} must be a string of 1 to {max} characters")))
        }
        v => Ok(v),
    }
}

/// Parses a JSON object of options; `22023` naming what is wrong otherwise.
pub fn parse(v: &Value) -> Result<CreateOptions, TaskerError> {
    if !v.is_object() {
        return Err(invalid("expected a JSON object".into()));
    }
    let raw = Raw::deserialize(v).map_err(|e| invalid(e.to_string()))?;
    Ok(CreateOptions {
        initiator: bounded("initiator", raw.initiator, 128)?,
        source_system: bounded("source_system", raw.source_system, 128)?,
        reason: bounded("reason", raw.reason, 128)?,
        tags: raw.tags.unwrap_or_default(),
        bypass_steps: raw.bypass_steps.unwrap_or_default(),
        idempotency_key: bounded("idempotency_key", raw.idempotency_key, 255)?,
        traceparent: bounded("traceparent", raw.traceparent, 55)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reason(v: Value) -> String {
        match parse(&v) {
            Err(TaskerError::InvalidArgument { reason, .. }) => reason,
            other => panic!("expected an invalid argument, got {other:?}"),
        }
    }

    #[test]
    fn every_option_and_nulls() {
        let o = parse(&json!({
            "initiator": "me", "source_system": "shop", "reason": "r", "tags": ["a", 1],
            "bypass_steps": ["x"], "idempotency_key": "k", "traceparent": null
        }))
        .unwrap();
        assert_eq!(o.initiator.as_deref(), Some("me"));
        assert_eq!(o.tags, vec![json!("a"), json!(1)]);
        assert_eq!(o.bypass_steps, vec![json!("x")]);
        assert_eq!(o.traceparent, None);
        assert_eq!(parse(&json!({})).unwrap(), CreateOptions::default());
    }

    #[test]
    fn each_defect_is_named() {
        assert!(reason(json!({"priority": 1})).contains("unknown field `priority`"));
        assert!(reason(json!({"initiator": 5})).contains("invalid type"));
        assert!(reason(json!({"tags": "a"})).contains("invalid type"));
        assert_eq!(
            reason(json!({"initiator": ""})),
            "initiator must be a string of 1 to 128 characters"
        );
        assert_eq!(
            reason(json!({"idempotency_key": "k".repeat(256)})),
            "idempotency_key must be a string of 1 to 255 characters"
        );
        assert_eq!(reason(json!([1])), "expected a JSON object");
    }
}
