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
    priority: Option<i64>,
    run_at: Option<String>,
    delay_seconds: Option<f64>,
}

/// The range of a task's priority: higher is claimed first; 0 without.
pub const PRIORITIES: std::ops::RangeInclusive<i64> = -1000..=1000;
/// The longest `delay_seconds`: ten years.
pub const MAX_DELAY_SECONDS: f64 = 10.0 * 366.0 * 86_400.0;

/// When a task's root steps may start: at a time (a timestamptz literal, which PostgreSQL
/// parses) or after a delay from now.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    At(String),
    After(f64),
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
    /// Higher is claimed first (within a namespace); 0 by default.
    pub priority: i32,
    /// Scheduled start; `None`: at once.
    pub start: Option<Start>,
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
        priority: match raw.priority {
            None => 0,
            Some(p) if PRIORITIES.contains(&p) => p as i32,
            Some(p) => {
                return Err(invalid(format!(
                    "priority must be an integer from {} to {}, got {p}",
                    PRIORITIES.start(),
                    PRIORITIES.end()
                )))
            }
        },
        start: match (bounded("run_at", raw.run_at, 64)?, raw.delay_seconds) {
            (Some(_), Some(_)) => {
                return Err(invalid("give run_at or delay_seconds, not both".into()));
            }
            (Some(at), None) => Some(Start::At(at)),
            (None, Some(d)) if d.is_finite() && (0.0..=MAX_DELAY_SECONDS).contains(&d) => {
                Some(Start::After(d))
            }
            (None, Some(d)) => {
                return Err(invalid(format!(
                    "delay_seconds must be a number from 0 to {MAX_DELAY_SECONDS}, got {d}"
                )))
            }
            (None, None) => None,
        },
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
        assert_eq!((o.priority, o.start), (0, None));
        let o = parse(&json!({"priority": -7, "delay_seconds": 2.5})).unwrap();
        assert_eq!((o.priority, o.start), (-7, Some(Start::After(2.5))));
        let o = parse(&json!({"run_at": "2030-01-01T00:00:00Z"})).unwrap();
        assert_eq!(o.start, Some(Start::At("2030-01-01T00:00:00Z".into())));
        assert_eq!(parse(&json!({})).unwrap(), CreateOptions::default());
    }

    #[test]
    fn each_defect_is_named() {
        assert!(reason(json!({"priorty": 1})).contains("unknown field `priorty`"));
        assert_eq!(
            reason(json!({"priority": 1001})),
            "priority must be an integer from -1000 to 1000, got 1001"
        );
        assert!(reason(json!({"priority": 1.5})).contains("invalid type"));
        assert_eq!(
            reason(json!({"run_at": "2030-01-01", "delay_seconds": 5})),
            "give run_at or delay_seconds, not both"
        );
        assert!(reason(json!({"delay_seconds": -1}))
            .starts_with("delay_seconds must be a number from 0"));
        assert!(reason(json!({"run_at": ""})).contains("run_at must be a string of 1 to 64"));
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
