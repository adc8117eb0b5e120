//! A batch of step outcomes (`tasker_core.report_steps`): what a worker says about the steps it
//! ran, checked before anything is written.
//!
//! A batch is a JSON array of objects, one per step:
//! - `{"step_id": 12, "results": {...}}`: the step succeeded (`results` defaults to `{}`);
//! - `{"step_id": 13, "error": ..., "retryable": true, "retry_after_seconds": 5}`: it failed
//!   (`error` any non-null JSON; `retryable` defaults to true; `retry_after_seconds` optional).

use super::error::TaskerError;
use serde_json::Value;

/// Most outcomes one batch may carry.
pub const MAX_BATCH: usize = 1000;

/// What a worker reports for one step.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Complete { results: Value },
    Fail { error: Value, retryable: bool, retry_after: Option<i64> },
}

fn invalid(index: usize, reason: impl std::fmt::Display) -> TaskerError {
    TaskerError::InvalidArgument {
        argument: "outcomes",
        reason: format!("element {index}: {reason}"),
    }
}

/// The outcomes of a batch, in the order given, each step named once; 22023 for anything else
/// (nothing is written), 54000 beyond [`MAX_BATCH`].
pub fn parse(batch: &Value) -> Result<Vec<(i64, Outcome)>, TaskerError> {
    let Value::Array(items) = batch else {
        return Err(TaskerError::InvalidArgument {
            argument: "outcomes",
            reason: "expected a JSON array of objects".into(),
        });
    };
    if items.len() > MAX_BATCH {
        return Err(TaskerError::LimitExceeded {
            what: "outcomes in one batch",
            limit: MAX_BATCH as i64,
            actual: items.len() as i64,
        });
    }
    let mut seen = std::collections::HashSet::with_capacity(items.len());
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::Object(o) = item else {
            return Err(invalid(i, "expected an object"));
        };
        if let Some(k) = o.keys().find(|k| {
            !matches!(
                k.as_str(),
                "step_id" | "results" | "error" | "retryable" | "retry_after_seconds"
            )
        }) {
            return Err(invalid(i, format!("unknown key {k:?}")));
        }
        let step_id = match o.get("step_id").and_then(Value::as_i64) {
            Some(id) if id > 0 => id,
            _ => return Err(invalid(i, "step_id must be a positive integer")),
        };
        if !seen.insert(step_id) {
            return Err(invalid(i, format!("step {step_id} is named twice")));
        }
        let outcome = match o.get("error") {
            None => {
                if o.contains_key("retryable") || o.contains_key("retry_after_seconds") {
                    return Err(invalid(i, "retryable and retry_after_seconds go with an error"));
                }
                Outcome::Complete {
                    results: o
                        .get("results")
                        .cloned()
                        .unwrap_or_else(|| Value::Object(Default::default())),
                }
            }
            Some(Value::Null) => return Err(invalid(i, "error must not be null")),
            Some(error) => {
                if o.contains_key("results") {
                    return Err(invalid(i, "a step has results or an error, not both"));
                }
                let retryable = match o.get("retryable") {
                    None => true,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => return Err(invalid(i, "retryable must be true or false")),
                };
                let retry_after = match o.get("retry_after_seconds") {
                    None | Some(Value::Null) => None,
                    Some(v) => match v.as_i64() {
                        Some(s) if (0..=i64::from(i32::MAX)).contains(&s) => Some(s),
                        _ => {
                            return Err(invalid(
                                i,
                                "retry_after_seconds must be an integer from 0 to 2147483647",
                            ))
                        }
                    },
                };
                Outcome::Fail { error: error.clone(), retryable, retry_after }
            }
        };
        out.push((step_id, outcome));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reason(v: Value) -> String {
        match parse(&v) {
            Err(TaskerError::InvalidArgument { reason, .. }) => reason,
            other => panic!("expected 22023, got {other:?}"),
        }
    }

    #[test]
    fn completions_and_failures() {
        let got = parse(&json!([
            {"step_id": 3},
            {"step_id": 1, "results": {"n": 1}},
            {"step_id": 2, "error": "boom", "retryable": false, "retry_after_seconds": 7},
            {"step_id": 4, "error": {"m": 1}}
        ]))
        .unwrap();
        assert_eq!(
            got,
            vec![
                (3, Outcome::Complete { results: json!({}) }),
                (1, Outcome::Complete { results: json!({"n": 1}) }),
                (2, Outcome::Fail { error: json!("boom"), retryable: false, retry_after: Some(7) }),
                (4, Outcome::Fail { error: json!({"m": 1}), retryable: true, retry_after: None }),
            ]
        );
        assert_eq!(parse(&json!([])).unwrap(), vec![]);
    }

    #[test]
    fn bad_batches_are_refused_with_the_element_named() {
        assert!(matches!(parse(&json!({})), Err(TaskerError::InvalidArgument { .. })));
        assert_eq!(reason(json!([1])), "element 0: expected an object");
        assert_eq!(
            reason(json!([{"step_id": 1}, {"step_id": 1}])),
            "element 1: step 1 is named twice"
        );
        assert_eq!(
            reason(json!([{"step_id": 0}])),
            "element 0: step_id must be a positive integer"
        );
        assert_eq!(
            reason(json!([{"step_id": "1"}])),
            "element 0: step_id must be a positive integer"
        );
        assert_eq!(reason(json!([{"step_id": 1, "eror": 1}])), "element 0: unknown key \"eror\"");
        assert_eq!(
            reason(json!([{"step_id": 1, "error": null}])),
            "element 0: error must not be null"
        );
        assert!(reason(json!([{"step_id": 1, "error": 1, "results": {}}])).contains("not both"));
        assert!(reason(json!([{"step_id": 1, "retryable": false}])).contains("go with an error"));
        assert!(
            reason(json!([{"step_id": 1, "error": 1, "retryable": 1}])).contains("true or false")
        );
        assert!(
            reason(json!([{"step_id": 1, "error": 1, "retry_after_seconds": -1}])).contains("0 to")
        );
    }

    #[test]
    fn batches_are_bounded() {
        let big: Vec<Value> = (1..=MAX_BATCH as i64 + 1).map(|i| json!({"step_id": i})).collect();
        assert!(matches!(parse(&Value::Array(big)), Err(TaskerError::LimitExceeded { .. })));
    }
}
