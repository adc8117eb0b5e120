//! A JSON Schema validator for task contexts: the draft-07 validation keywords a task schema
//! uses in practice. Schemas using keywords outside this set are refused when the template is
//! registered, so nothing is silently left unchecked.
//!
//! Supported: `type`, `enum`, `const`, `required`, `properties`, `additionalProperties`,
//! `items`, `minItems`, `maxItems`, `uniqueItems`, `minLength`, `maxLength`, `minimum`,
//! `maximum`, `exclusiveMinimum`, `exclusiveMaximum`, `multipleOf`, `minProperties`,
//! `maxProperties`, `allOf`, `anyOf`, `oneOf`, `not`; annotations (`title`, `description`,
//! `default`, `examples`, `format`, `$schema`, `$id`, `$comment`, ...) are accepted and ignored.

use super::interrupt;
use rustc_hash::FxHashMap;
use serde_json::{Number, Value};
use std::collections::hash_map::{Entry, RandomState};
use std::hash::BuildHasher;

const SUPPORTED: &[&str] = &[
    "type",
    "enum",
    "const",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minProperties",
    "maxProperties",
    "allOf",
    "anyOf",
    "oneOf",
    "not",
];
const ANNOTATIONS: &[&str] = &[
    "$schema",
    "$id",
    "$comment",
    "title",
    "description",
    "default",
    "examples",
    "format",
    "readOnly",
    "writeOnly",
    "deprecated",
];
const TYPES: &[&str] = &["null", "boolean", "object", "array", "number", "integer", "string"];

/// Checks that `schema` only uses supported keywords, with values of the right shape.
pub fn check_schema(schema: &Value) -> Result<(), String> {
    check_at(schema, "#")
}

fn check_at(schema: &Value, at: &str) -> Result<(), String> {
    interrupt::check();
    let obj = match schema {
        Value::Bool(_) => return Ok(()),
        Value::Object(o) => o,
        _ => return Err(format!("{at} must be a schema object or a boolean")),
    };
    for (k, v) in obj {
        if ANNOTATIONS.contains(&k.as_str()) {
            continue;
        }
        if !SUPPORTED.contains(&k.as_str()) {
            return Err(format!("{at}: unsupported keyword {k:?}"));
        }
        let here = format!("{at}/{k}");
        match k.as_str() {
            "type" => {
                let ok = match v {
                    Value::String(t) => TYPES.contains(&t.as_str()),
                    Value::Array(ts) => {
                        ts.iter().all(|t| t.as_str().is_some_and(|t| TYPES.contains(&t)))
                    }
                    _ => false,
                };
                if !ok {
                    return Err(format!("{here} must name JSON types"));
                }
            }
            "enum" if !v.is_array() => return Err(format!("{here} must be an array")),
            "required" if !v.as_array().is_some_and(|a| a.iter().all(Value::is_string)) => {
                return Err(format!("{here} must be an array of property names"))
            }
            "properties" => match v {
                Value::Object(props) => {
                    for (name, sub) in props {
                        check_at(sub, &format!("{here}/{name}"))?;
                    }
                }
                _ => return Err(format!("{here} must be an object")),
            },
            "additionalProperties" | "items" | "not" => check_at(v, &here)?,
            "allOf" | "anyOf" | "oneOf" => match v {
                Value::Array(subs) if !subs.is_empty() => {
                    for (i, sub) in subs.iter().enumerate() {
                        check_at(sub, &format!("{here}/{i}"))?;
                    }
                }
                _ => return Err(format!("{here} must be a non-empty array of schemas")),
            },
            "minItems" | "maxItems" | "minLength" | "maxLength" | "minProperties"
            | "maxProperties"
                if v.as_u64().is_none() =>
            {
                return Err(format!("{here} must be a non-negative integer"))
            }
            "minimum" | "maximum" | "exclusiveMinimum" | "exclusiveMaximum" if !v.is_number() => {
                return Err(format!("{here} must be a number"))
            }
            "multipleOf" if !v.as_f64().is_some_and(|m| m > 0.0) => {
                return Err(format!("{here} must be a positive number"))
            }
            "uniqueItems" if !v.is_boolean() => return Err(format!("{here} must be a boolean")),
            _ => {}
        }
    }
    Ok(())
}

fn type_matches(t: &str, v: &Value) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "number" => v.is_number(),
        "integer" => v.as_f64().is_some_and(|f| f.fract() == 0.0),
        "string" => v.is_string(),
        _ => false,
    }
}

/// Validates `instance` against `schema` (already checked); returns the violations, each
/// with its JSON pointer, at most `limit` of them.
pub fn validate(schema: &Value, instance: &Value, limit: usize) -> Vec<String> {
    let mut errors = Vec::new();
    validate_at(schema, instance, "", &mut errors, limit);
    errors
}

fn validate_at(schema: &Value, v: &Value, at: &str, errors: &mut Vec<String>, limit: usize) {
    // every item and property of the instance passes here
    interrupt::check();
    if errors.len() >= limit {
        return;
    }
    let obj = match schema {
        Value::Bool(true) => return,
        Value::Bool(false) => {
            errors.push(format!("{}: not allowed", path(at)));
            return;
        }
        Value::Object(o) => o,
        _ => return,
    };
    if let Some(t) = obj.get("type") {
        let ok = match t {
            Value::String(t) => type_matches(t, v),
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).any(|t| type_matches(t, v)),
            _ => true,
        };
        if !ok {
            push(errors, limit, at, format!("expected {}, got {}", t, super::template::kind(v)));
            return;
        }
    }
    if let Some(Value::Array(options)) = obj.get("enum") {
        if !options.iter().any(|o| same(o, v)) {
            push(errors, limit, at, format!("must be one of {}", Value::Array(options.clone())));
        }
    }
    if let Some(c) = obj.get("const") {
        if !same(c, v) {
            push(errors, limit, at, format!("must be {c}"));
        }
    }
    if let Some(n) = v.as_f64() {
        let num = |k: &str| obj.get(k).and_then(Value::as_f64);
        if let Some(m) = num("minimum") {
            if n < m {
                push(errors, limit, at, format!("must be at least {m}"));
            }
        }
        if let Some(m) = num("maximum") {
            if n > m {
                push(errors, limit, at, format!("must be at most {m}"));
            }
        }
        if let Some(m) = num("exclusiveMinimum") {
            if n <= m {
                push(errors, limit, at, format!("must be greater than {m}"));
            }
        }
        if let Some(m) = num("exclusiveMaximum") {
            if n >= m {
                push(errors, limit, at, format!("must be less than {m}"));
            }
        }
        if let Some(m) = num("multipleOf") {
            let q = n / m;
            if (q - q.round()).abs() > 1e-9 {
                push(errors, limit, at, format!("must be a multiple of {m}"));
            }
        }
    }
    if let Some(s) = v.as_str() {
        let len = s.chars().count() as u64;
        if let Some(m) = obj.get("minLength").and_then(Value::as_u64) {
            if len < m {
                push(errors, limit, at, format!("must be at least {m} characters"));
            }
        }
        if let Some(m) = obj.get("maxLength").and_then(Value::as_u64) {
            if len > m {
                push(errors, limit, at, format!("must be at most {m} characters"));
            }
        }
    }
    if let Some(items) = v.as_array() {
        let n = items.len() as u64;
        if let Some(m) = obj.get("minItems").and_then(Value::as_u64) {
            if n < m {
                push(errors, limit, at, format!("must have at least {m} items"));
            }
        }
        if let Some(m) = obj.get("maxItems").and_then(Value::as_u64) {
            if n > m {
                push(errors, limit, at, format!("must have at most {m} items"));
            }
        }
        if obj.get("uniqueItems") == Some(&Value::Bool(true)) && has_duplicate(items) {
            push(errors, limit, at, "items must be unique".to_owned());
        }
        if let Some(item_schema) = obj.get("items") {
            for (i, item) in items.iter().enumerate() {
                validate_at(item_schema, item, &format!("{at}/{i}"), errors, limit);
            }
        }
    }
    if let Some(props) = v.as_object() {
        let n = props.len() as u64;
        if let Some(m) = obj.get("minProperties").and_then(Value::as_u64) {
            if n < m {
                push(errors, limit, at, format!("must have at least {m} properties"));
            }
        }
        if let Some(m) = obj.get("maxProperties").and_then(Value::as_u64) {
            if n > m {
                push(errors, limit, at, format!("must have at most {m} properties"));
            }
        }
        if let Some(Value::Array(required)) = obj.get("required") {
            for r in required.iter().filter_map(Value::as_str) {
                if !props.contains_key(r) {
                    push(errors, limit, at, format!("missing required property {r:?}"));
                }
            }
        }
        let declared = obj.get("properties").and_then(Value::as_object);
        for (k, val) in props {
            let child = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
            match declared.and_then(|d| d.get(k)) {
                Some(sub) => validate_at(sub, val, &child, errors, limit),
                None => {
                    if let Some(extra) = obj.get("additionalProperties") {
                        validate_at(extra, val, &child, errors, limit)
                    }
                }
            }
        }
    }
    if let Some(Value::Array(all)) = obj.get("allOf") {
        for s in all {
            validate_at(s, v, at, errors, limit);
        }
    }
    if let Some(Value::Array(any)) = obj.get("anyOf") {
        if !any.iter().any(|s| validate(s, v, 1).is_empty()) {
            push(errors, limit, at, "does not match any schema of anyOf".to_owned());
        }
    }
    if let Some(Value::Array(one)) = obj.get("oneOf") {
        let matching = one.iter().filter(|s| validate(s, v, 1).is_empty()).count();
        if matching != 1 {
            push(
                errors,
                limit,
                at,
                format!("matches {matching} schemas of oneOf, expected exactly 1"),
            );
        }
    }
    if let Some(not) = obj.get("not") {
        if validate(not, v, 1).is_empty() {
            push(errors, limit, at, "must not match the schema of not".to_owned());
        }
    }
}

/// JSON Schema equality (`enum`, `const`, `uniqueItems`): numbers are equal when their values
/// are, so `2.0` (as jsonb keeps it) equals `2`; arrays and objects compare member by member
/// (objects whatever the order of their keys).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => number_value(x) == number_value(y),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

/// The value of a JSON number, one form per value: integers as `i128` however they are
/// written (`2`, `2.0`, `2e0`), other numbers as their `f64`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum NumberValue {
    Integer(i128),
    Fraction(f64),
}

fn number_value(n: &Number) -> NumberValue {
    if let Some(i) = n.as_i64() {
        return NumberValue::Integer(i.into());
    }
    if let Some(u) = n.as_u64() {
        return NumberValue::Integer(u.into());
    }
    let f = n.as_f64().unwrap_or(f64::NAN);
    // an integral f64 below 2^127 converts to i128 exactly (-0.0 becomes 0)
    if f.fract() == 0.0 && f.abs() < i128::MAX as f64 {
        NumberValue::Integer(f as i128)
    } else {
        NumberValue::Fraction(f)
    }
}

/// Appends the canonical encoding of `v` to `out`: two values have the same encoding exactly
/// when [`same`] holds (numbers by value, objects whatever their key order). Every part is
/// tagged and every string and container carries its length, so the encoding is unambiguous.
fn canonical(v: &Value, out: &mut Vec<u8>) {
    fn counted(len: usize, out: &mut Vec<u8>) {
        out.extend_from_slice(&(len as u64).to_le_bytes());
    }
    fn text(s: &str, out: &mut Vec<u8>) {
        counted(s.len(), out);
        out.extend_from_slice(s.as_bytes());
    }
    match v {
        Value::Null => out.push(b'n'),
        Value::Bool(b) => out.push(if *b { b't' } else { b'f' }),
        Value::Number(n) => match number_value(n) {
            NumberValue::Integer(i) => {
                out.push(b'i');
                out.extend_from_slice(&i.to_le_bytes());
            }
            NumberValue::Fraction(f) => {
                out.push(b'd');
                out.extend_from_slice(&f.to_bits().to_le_bytes());
            }
        },
        Value::String(s) => {
            out.push(b's');
            text(s, out);
        }
        Value::Array(items) => {
            out.push(b'a');
            counted(items.len(), out);
            for item in items {
                canonical(item, out);
            }
        }
        Value::Object(members) => {
            out.push(b'o');
            counted(members.len(), out);
            let mut sorted: Vec<(&String, &Value)> = members.iter().collect();
            sorted.sort_unstable_by_key(|&(k, _)| k);
            for (k, member) in sorted {
                text(k, out);
                canonical(member, out);
            }
        }
    }
}

/// Whether two of `items` are equal ([`same`]), in linear time: the canonical encoding of
/// each item is hashed with a random key (so no input can be made to degrade the table), and
/// only items with the same hash are compared.
fn has_duplicate(items: &[Value]) -> bool {
    let keyed = RandomState::new();
    let mut first: FxHashMap<u64, usize> = FxHashMap::default();
    first.reserve(items.len());
    // distinct items whose hash an earlier item already had (a 64-bit collision)
    let mut collided: Vec<(u64, usize)> = Vec::new();
    let mut encoding = Vec::new();
    for (i, item) in items.iter().enumerate() {
        interrupt::check();
        encoding.clear();
        canonical(item, &mut encoding);
        let hash = keyed.hash_one(encoding.as_slice());
        match first.entry(hash) {
            Entry::Vacant(slot) => {
                slot.insert(i);
            }
            Entry::Occupied(slot) => {
                let mut earlier = std::iter::once(*slot.get())
                    .chain(collided.iter().filter(|&&(h, _)| h == hash).map(|&(_, j)| j));
                if earlier.any(|j| same(item, &items[j])) {
                    return true;
                }
                collided.push((hash, i));
            }
        }
    }
    false
}

fn push(errors: &mut Vec<String>, limit: usize, at: &str, msg: String) {
    if errors.len() < limit {
        errors.push(format!("{}: {msg}", path(at)));
    }
}

fn path(at: &str) -> &str {
    if at.is_empty() {
        "(root)"
    } else {
        at
    }
}

#[cfg(test)]
mod tests;
