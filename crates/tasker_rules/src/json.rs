//! JSON documents from callers: a nesting limit checked before anything recursive sees them.
//!
//! serde_json parses recursively and gives up at 128 levels; PostgreSQL's jsonb accepts far
//! deeper values. tasker_core refuses arguments nested deeper than [`MAX_DEPTH`] with TK026,
//! measured by a flat scan of the text, and leaves room below serde's limit for the one or two
//! levels the engine wraps around a caller's document (an error under `"error"`, results under
//! a parent's name). Stored documents the engine only hands on are never parsed.

use super::error::TaskerError;
use serde_json::Value;

/// The deepest nesting of objects and arrays a JSON argument may have.
pub const MAX_DEPTH: usize = 100;

/// The nesting depth of a JSON text: 0 for a scalar, 1 for `{}` or `[1]`, 2 for `[[1]]`.
/// Brackets inside strings do not count. Linear in the length, with no recursion.
pub fn depth(text: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let mut in_string = false;
    let mut escaped = false;
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Parses a caller's JSON text (PostgreSQL's own output of a jsonb, so well formed), refusing
/// it with TK026 when it is nested deeper than [`MAX_DEPTH`].
pub fn parse(argument: &'static str, text: &str) -> Result<Value, TaskerError> {
    let d = depth(text);
    if d > MAX_DEPTH {
        return Err(TaskerError::JsonTooDeep { argument, depth: d, limit: MAX_DEPTH });
    }
    serde_json::from_str(text)
        .map_err(|e| TaskerError::InvalidArgument { argument, reason: format!("not JSON: {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(n: usize) -> String {
        format!("{}1{}", "[".repeat(n), "]".repeat(n))
    }

    #[test]
    fn depth_counts_objects_and_arrays_not_strings() {
        assert_eq!(depth("1"), 0);
        assert_eq!(depth("\"[[[\""), 0);
        assert_eq!(depth("{}"), 1);
        assert_eq!(depth(r#"{"a": [1, {"b": "}]\"["}]}"#), 3);
        assert_eq!(depth(&nested(5000)), 5000);
    }

    #[test]
    fn parse_takes_the_limit_and_refuses_one_more() {
        assert!(parse("results", &nested(MAX_DEPTH)).is_ok());
        // serde itself stops at 128: the limit leaves room for the engine's wrapping
        let wrapped = format!("{{\"error\": {}}}", nested(MAX_DEPTH + 1));
        assert!(serde_json::from_str::<Value>(&wrapped).is_ok());
        match parse("results", &nested(MAX_DEPTH + 1)) {
            Err(e @ TaskerError::JsonTooDeep { depth: 101, .. }) => {
                assert_eq!(e.sqlstate(), "TK026")
            }
            other => panic!("{other:?}"),
        }
        assert!(parse("results", &nested(100_000)).is_err());
    }
}
