use super::*;
use serde_json::json;

fn order_schema() -> Value {
    json!({
        "type": "object",
        "required": ["order_id", "items"],
        "properties": {
            "order_id": {"type": "integer", "minimum": 1},
            "items": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["sku"]}},
            "priority": {"enum": ["low", "high"]}
        },
        "additionalProperties": false
    })
}

#[test]
fn accepts_valid_and_lists_violations() {
    let s = order_schema();
    assert!(check_schema(&s).is_ok());
    assert!(validate(&s, &json!({"order_id": 5, "items": [{"sku": "a"}]}), 10).is_empty());
    let errs = validate(&s, &json!({"order_id": 0, "items": [{}], "priority": "mid", "x": 1}), 10);
    assert_eq!(errs.len(), 4, "{errs:?}");
    assert!(errs.iter().any(|e| e.starts_with("/order_id: must be at least 1")));
    assert!(errs.iter().any(|e| e.starts_with("/items/0: missing required property \"sku\"")));
    assert!(errs.iter().any(|e| e.starts_with("/x: not allowed")));
    let errs = validate(&s, &json!([]), 10);
    assert_eq!(errs, vec!["(root): expected \"object\", got an array"]);
}

#[test]
fn refuses_unsupported_keywords() {
    assert!(check_schema(&json!({"type": "object", "properties": {"a": {"$ref": "#/x"}}})).is_err());
    assert!(check_schema(&json!({"pattern": "^a"})).is_err());
    assert!(check_schema(&json!({"type": "nope"})).is_err());
    assert!(check_schema(&json!({"title": "t", "description": "d", "type": ["string", "null"]}))
        .is_ok());
}

#[test]
fn combinators() {
    let s = json!({"anyOf": [{"type": "string"}, {"type": "integer"}]});
    assert!(validate(&s, &json!("a"), 5).is_empty());
    assert_eq!(validate(&s, &json!(1.5), 5).len(), 1);
    let s = json!({"oneOf": [{"minimum": 0}, {"maximum": 10}]});
    assert_eq!(validate(&s, &json!(5), 5).len(), 1);
    assert!(validate(&json!({"not": {"type": "null"}}), &json!(null), 5).len() == 1);
}

#[test]
fn combinators_respect_the_error_limit() {
    // found by the context_validate fuzz target: oneOf added an error over the limit
    let s = json!({"oneOf": [{"enum": [1, 2, 3]}, {"not": {"type": "integer"}}], "minimum": 5});
    assert_eq!(validate(&s, &json!(2.5), 1).len(), 1);
    let s = json!({"anyOf": [{"type": "string"}], "not": {}, "maximum": 0});
    assert_eq!(validate(&s, &json!(3), 2).len(), 2);
}

#[test]
fn numbers_compare_by_value() {
    // jsonb keeps 2.0 as written; JSON Schema says it equals 2
    assert!(validate(&json!({"enum": [1, 2]}), &json!(2.0), 5).is_empty());
    assert!(validate(&json!({"const": {"a": [0]}}), &json!({"a": [0.0]}), 5).is_empty());
    assert_eq!(validate(&json!({"uniqueItems": true}), &json!([1, 1.0]), 5).len(), 1);
    assert_eq!(validate(&json!({"enum": [1]}), &json!(1.5), 5).len(), 1);
    assert_eq!(validate(&json!({"const": -1}), &json!(18446744073709551615u64), 5).len(), 1);
}

fn unique(items: Value) -> Vec<String> {
    validate(&json!({"uniqueItems": true}), &items, 5)
}

#[test]
fn unique_items_is_linear() {
    let mut items: Vec<Value> = (0..100_000).map(|i| json!(i)).collect();
    let started = std::time::Instant::now();
    assert!(unique(Value::Array(items.clone())).is_empty());
    // pairwise comparison took minutes here; hashing takes a fraction of a second
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    items.push(json!(1.0));
    assert_eq!(unique(Value::Array(items)), vec!["(root): items must be unique"]);
    let s = json!({"properties": {"ids": {"uniqueItems": true}}});
    assert_eq!(validate(&s, &json!({"ids": [1, 1.0]}), 5), vec!["/ids: items must be unique"]);
}

#[test]
fn unique_items_compares_by_value() {
    for dup in [
        json!([1, 1.0]),
        json!([0, -0.0]),
        json!([0.5, 0.5]),
        json!([1e300, 1e300]),
        json!(["a", "b", "a"]),
        json!([null, null]),
        json!([[1, 2.0], [1.0, 2]]),
        json!([{"a": 1, "b": 2}, {"b": 2, "a": 1}]),
        json!([{"a": {"x": [1]}}, {"a": {"x": [1.0]}}]),
    ] {
        assert_eq!(unique(dup.clone()).len(), 1, "{dup}");
    }
    for distinct in [
        json!([1, "1", true, null, [1], {"1": 1}, [], {}]),
        json!([0.5, 0.25, 1, 2]),
        json!([[1, 2], [2, 1]]),
        json!([{"a": 1, "b": 2}, {"a": 1, "b": 3}, {"a": 1}]),
        json!([{"ab": "c"}, {"a": "bc"}]),
        json!([["ab", "c"], ["a", "bc"]]),
        json!([false, true]),
    ] {
        assert!(unique(distinct.clone()).is_empty(), "{distinct}");
    }
    // exact values: 2^53 + 1 is not the float next to it, nor 2^64 - 1 the float 2^64
    assert!(unique(json!([9007199254740993u64, 9007199254740992.0])).is_empty());
    assert!(unique(json!([u64::MAX, 2f64.powi(64)])).is_empty());
    assert_eq!(unique(json!([-5, -5.0])).len(), 1);
}
