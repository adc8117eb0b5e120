//! Task context validation on arbitrary `[schema, context]` pairs: a schema `check_schema`
//! accepts never makes `validate` panic, and the error list respects its limit.
#![no_main]

use tasker_rules::jsonschema::{check_schema, validate};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(Value::Array(pair)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let [schema, context] = pair.as_slice() else {
        return;
    };
    if check_schema(schema).is_err() {
        return;
    }
    for limit in [1, 3, 100] {
        let errors = validate(schema, context, limit);
        assert!(
            errors.len() <= limit,
            "{} errors over a limit of {limit}",
            errors.len()
        );
    }
    // a value is valid against itself as `const`, whatever its shape
    let own = serde_json::json!({ "const": context });
    if check_schema(&own).is_ok() {
        assert!(validate(&own, context, 10).is_empty());
    }
});
