//! Conditions of conditional steps. A condition is JSON — no SQL from users, nothing evaluated as code —
//! parsed once and evaluated against the task context and the parents' results:
//!
//! ```json
//! {"path": "/context/payment/status", "eq": "cleared"}
//! {"path": "/parents/charge/amount", "gt": 100}
//! {"path": "/context/express", "exists": true}
//! {"all": [ ... ]}   {"any": [ ... ]}   {"not": { ... }}
//! ```
//!
//! A path is a JSON pointer into `{"context": <task context>, "parents": {<name>: <results>}}`.
//! Comparisons: `eq` and `ne` (any JSON value, equal as JSON: `1` and `1.0` are equal numbers),
//! `lt` `le` `gt` `ge` (a number with a number, a string with a string by bytes; anything else
//! is false), `in` (an array of values), `exists` (true or false). A path with nothing there is
//! false for every comparison but `ne` and `exists: false`. `all` of nothing is true, `any` of
//! nothing false.

use super::error::TaskerError;
use serde_json::{Map, Number, Value};
use std::cmp::Ordering;

/// The most nodes (comparisons and combinators) a condition may have.
pub const MAX_NODES: usize = 256;
/// The deepest nesting of combinators.
pub const MAX_DEPTH: usize = 16;
/// The longest path, in bytes.
pub const MAX_PATH: usize = 256;

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
    Exists,
}

const OPS: [(&str, Op); 8] = [
    ("eq", Op::Eq),
    ("ne", Op::Ne),
    ("lt", Op::Lt),
    ("le", Op::Le),
    ("gt", Op::Gt),
    ("ge", Op::Ge),
    ("in", Op::In),
    ("exists", Op::Exists),
];

/// A parsed condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    Compare { path: String, op: Op, value: Value },
    All(Vec<Condition>),
    Any(Vec<Condition>),
    Not(Box<Condition>),
}

fn invalid(reason: impl Into<String>) -> TaskerError {
    TaskerError::InvalidTemplate { reason: format!("condition: {}", reason.into()) }
}

fn kind(v: &Value) -> &'static str {
    super::template::kind(v)
}

impl Condition {
    /// Parses a condition; `TK020` naming what is wrong otherwise.
    pub fn parse(v: &Value) -> Result<Condition, TaskerError> {
        let mut nodes = 0;
        Self::parse_at(v, 0, &mut nodes)
    }

    fn parse_at(v: &Value, depth: usize, nodes: &mut usize) -> Result<Condition, TaskerError> {
        *nodes += 1;
        if *nodes > MAX_NODES {
            return Err(invalid(format!("more than {MAX_NODES} nodes")));
        }
        if depth > MAX_DEPTH {
            return Err(invalid(format!("nested deeper than {MAX_DEPTH}")));
        }
        let obj = v
            .as_object()
            .ok_or_else(|| invalid(format!("a condition is an object, not {}", kind(v))))?;
        let list = |items: &Value, nodes: &mut usize| -> Result<Vec<Condition>, TaskerError> {
            match items {
                Value::Array(items) => {
                    items.iter().map(|i| Self::parse_at(i, depth + 1, nodes)).collect()
                }
                other => Err(invalid(format!("all and any take an array, not {}", kind(other)))),
            }
        };
        match (obj.len(), obj.iter().next()) {
            (1, Some((k, items))) if k == "all" => return Ok(Condition::All(list(items, nodes)?)),
            (1, Some((k, items))) if k == "any" => return Ok(Condition::Any(list(items, nodes)?)),
            (1, Some((k, c))) if k == "not" => {
                return Ok(Condition::Not(Box::new(Self::parse_at(c, depth + 1, nodes)?)))
            }
            _ => {}
        }
        Self::comparison(obj)
    }

    fn comparison(obj: &Map<String, Value>) -> Result<Condition, TaskerError> {
        let path = match obj.get("path") {
            Some(Value::String(p)) if p.starts_with('/') && p.len() <= MAX_PATH => p.clone(),
            _ => {
                return Err(invalid(format!(
                    "a comparison needs a path: a JSON pointer of at most {MAX_PATH} bytes \
                     (\"/context/...\" or \"/parents/<step>/...\")"
                )))
            }
        };
        if !(path == "/context" || path.starts_with("/context/") || path.starts_with("/parents/")) {
            return Err(invalid(format!(
                "path {:?} must start with /context or /parents/<step>",
                path.chars().take(60).collect::<String>()
            )));
        }
        let mut found = None;
        for (k, v) in obj.iter().filter(|(k, _)| *k != "path") {
            let op = OPS
                .iter()
                .find(|(name, _)| name == k)
                .map(|(_, op)| *op)
                .ok_or_else(|| {
                    invalid(format!(
                        "unknown field {:?} (all, any, not, or path with one of eq, ne, lt, le, gt, ge, in, exists)",
                        k.chars().take(40).collect::<String>()
                    ))
                })?;
            if found.is_some() {
                return Err(invalid("a comparison has one operator"));
            }
            match (op, v) {
                (Op::In, Value::Array(_)) | (Op::Exists, Value::Bool(_)) => {}
                (Op::In, other) => {
                    return Err(invalid(format!("in takes an array, not {}", kind(other))))
                }
                (Op::Exists, other) => {
                    return Err(invalid(format!("exists takes true or false, not {}", kind(other))))
                }
                (Op::Lt | Op::Le | Op::Gt | Op::Ge, Value::Number(_) | Value::String(_)) => {}
                (Op::Lt | Op::Le | Op::Gt | Op::Ge, other) => {
                    return Err(invalid(format!(
                        "{k} compares with a number or a string, not {}",
                        kind(other)
                    )))
                }
                _ => {}
            }
            found = Some((op, v.clone()));
        }
        let (op, value) = found.ok_or_else(|| invalid("a comparison needs an operator"))?;
        Ok(Condition::Compare { path, op, value })
    }

    /// Evaluates the condition on `input`: `{"context": ..., "parents": {...}}`.
    pub fn eval(&self, input: &Value) -> bool {
        self.eval_by(&|path| input.pointer(path))
    }

    /// Evaluates the condition with `lookup` resolving each path (what
    /// [`Condition::eval`] finds at the path in its input), so that the caller need not build
    /// one document of the context and every parent's results.
    pub fn eval_by<'a>(&self, lookup: &impl Fn(&str) -> Option<&'a Value>) -> bool {
        match self {
            Condition::All(cs) => cs.iter().all(|c| c.eval_by(lookup)),
            Condition::Any(cs) => cs.iter().any(|c| c.eval_by(lookup)),
            Condition::Not(c) => !c.eval_by(lookup),
            Condition::Compare { path, op, value } => compare(lookup(path), *op, value),
        }
    }

    /// The condition as JSON (what [`Condition::parse`] reads back to the same condition).
    pub fn to_json(&self) -> Value {
        let list = |cs: &[Condition]| Value::Array(cs.iter().map(Condition::to_json).collect());
        let mut out = Map::new();
        match self {
            Condition::All(cs) => {
                out.insert("all".into(), list(cs));
            }
            Condition::Any(cs) => {
                out.insert("any".into(), list(cs));
            }
            Condition::Not(c) => {
                out.insert("not".into(), c.to_json());
            }
            Condition::Compare { path, op, value } => {
                out.insert("path".into(), Value::String(path.clone()));
                let name = OPS.iter().find(|(_, o)| o == op).map_or("eq", |(n, _)| n);
                out.insert(name.into(), value.clone());
            }
        }
        Value::Object(out)
    }

    /// Every path the condition reads, in order.
    pub fn paths(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.collect_paths(&mut out);
        out
    }

    fn collect_paths<'s>(&'s self, out: &mut Vec<&'s str>) {
        match self {
            Condition::All(cs) | Condition::Any(cs) => cs.iter().for_each(|c| c.collect_paths(out)),
            Condition::Not(c) => c.collect_paths(out),
            Condition::Compare { path, .. } => out.push(path),
        }
    }
}

/// Where a path points: into the task context, or into the results of the parent named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source<'p> {
    /// `/context...`: the pointer into the context (`""` for all of it).
    Context(&'p str),
    /// `/parents/<step>...`: the step's name (pointer escapes undone) and the pointer into
    /// its results.
    Parent(String, &'p str),
}

/// Splits a path into its [`Source`]; `None` when it starts with neither `/context` nor
/// `/parents/<step>`.
pub fn source(path: &str) -> Option<Source<'_>> {
    if path == "/context" || path.starts_with("/context/") {
        return Some(Source::Context(&path["/context".len()..]));
    }
    let rest = path.strip_prefix("/parents/")?;
    let (token, pointer) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if token.is_empty() {
        return None;
    }
    Some(Source::Parent(unescape(token), pointer))
}

/// A JSON pointer's reference token with its escapes undone (`~1` is `/`, `~0` is `~`).
pub fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// Two JSON numbers by value (`1` equals `1.0`), integers exactly however large (as `f64`,
/// 2^53 + 1 would equal 2^53). An integer against a float: exactly when the float is a whole
/// number an `i128` holds (every float from 2^53 up is one), else as floats, which then cannot
/// misorder them (a float with a fraction is below 2^53 in size).
fn num_cmp(x: &Number, y: &Number) -> Option<Ordering> {
    fn int(n: &Number) -> Option<i128> {
        n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from))
    }
    fn whole(f: f64) -> Option<i128> {
        (f.fract() == 0.0 && f.abs() < 1e38).then_some(f as i128)
    }
    match (int(x), int(y)) {
        (Some(a), Some(b)) => Some(a.cmp(&b)),
        (Some(a), None) => {
            let f = y.as_f64()?;
            whole(f).map_or_else(|| (a as f64).partial_cmp(&f), |b| Some(a.cmp(&b)))
        }
        (None, Some(_)) => num_cmp(y, x).map(Ordering::reverse),
        (None, None) => x.as_f64()?.partial_cmp(&y.as_f64()?),
    }
}

/// JSON equality, numbers by value (`1` equals `1.0`, see [`num_cmp`]).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => num_cmp(x, y) == Some(Ordering::Equal),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

fn order(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => num_cmp(x, y),
        (Value::String(x), Value::String(y)) => Some(x.as_bytes().cmp(y.as_bytes())),
        _ => None,
    }
}

fn compare(found: Option<&Value>, op: Op, value: &Value) -> bool {
    let Some(found) = found else {
        return matches!((op, value), (Op::Ne, _) | (Op::Exists, Value::Bool(false)));
    };
    match op {
        Op::Exists => value == &Value::Bool(true),
        Op::Eq => json_eq(found, value),
        Op::Ne => !json_eq(found, value),
        Op::In => value.as_array().is_some_and(|vs| vs.iter().any(|v| json_eq(found, v))),
        Op::Lt => order(found, value) == Some(Ordering::Less),
        Op::Le => matches!(order(found, value), Some(Ordering::Less | Ordering::Equal)),
        Op::Gt => order(found, value) == Some(Ordering::Greater),
        Op::Ge => matches!(order(found, value), Some(Ordering::Greater | Ordering::Equal)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn input() -> Value {
        json!({"context": {"payment": {"status": "cleared", "amount": 120}, "express": false,
                           "tags": ["gift"]},
               "parents": {"charge": {"amount": 120.0, "currency": "EUR"}}})
    }

    fn holds(c: Value) -> bool {
        Condition::parse(&c).unwrap().eval(&input())
    }

    fn reason(c: Value) -> String {
        match Condition::parse(&c) {
            Err(TaskerError::InvalidTemplate { reason }) => reason,
            other => panic!("expected an invalid condition, got {other:?}"),
        }
    }

    #[test]
    fn comparisons() {
        assert!(holds(json!({"path": "/context/payment/status", "eq": "cleared"})));
        assert!(holds(json!({"path": "/parents/charge/amount", "eq": 120}))); // 120.0 == 120
        assert!(holds(json!({"path": "/parents/charge/amount", "gt": 100})));
        assert!(!holds(json!({"path": "/parents/charge/amount", "lt": 100})));
        assert!(holds(json!({"path": "/context/payment/amount", "le": 120})));
        assert!(holds(json!({"path": "/parents/charge/currency", "ge": "EUR"})));
        assert!(holds(json!({"path": "/parents/charge/currency", "in": ["USD", "EUR"]})));
        assert!(holds(json!({"path": "/context/tags", "eq": ["gift"]})));
        assert!(holds(json!({"path": "/context/express", "exists": true})));
        assert!(holds(json!({"path": "/context/express", "ne": true})));
        // a number is not ordered against a string
        assert!(!holds(json!({"path": "/context/payment/status", "gt": 1})));
    }

    #[test]
    fn numbers_compare_exactly() {
        let at = |v: Value, c: Value| {
            Condition::parse(&c).unwrap().eval(&json!({"context": {"n": v}, "parents": {}}))
        };
        let (big, next) = (json!(9_007_199_254_740_992_i64), 9_007_199_254_740_993_i64);
        assert!(!at(big.clone(), json!({"path": "/context/n", "eq": next})));
        assert!(at(big.clone(), json!({"path": "/context/n", "lt": next})));
        assert!(at(big.clone(), json!({"path": "/context/n", "ne": next})));
        assert!(at(big, json!({"path": "/context/n", "eq": 9_007_199_254_740_992.0})));
        let top = json!(u64::MAX);
        assert!(at(top.clone(), json!({"path": "/context/n", "gt": i64::MAX})));
        assert!(!at(top, json!({"path": "/context/n", "eq": i64::MAX})));
        assert!(at(json!(2.5), json!({"path": "/context/n", "gt": 2})));
        assert!(at(json!(-3), json!({"path": "/context/n", "lt": -2.5})));
        assert!(at(json!(1e300), json!({"path": "/context/n", "gt": u64::MAX})));
        assert!(at(json!(1), json!({"path": "/context/n", "in": [0.5, 1.0]})));
    }

    #[test]
    fn missing_paths() {
        let missing = "/context/nope";
        for (op, v, expected) in [
            ("eq", json!(null), false),
            ("ne", json!(1), true),
            ("gt", json!(1), false),
            ("in", json!([null]), false),
            ("exists", json!(true), false),
            ("exists", json!(false), true),
        ] {
            let mut c = json!({"path": missing});
            c[op] = v;
            assert_eq!(holds(c), expected, "{op}");
        }
    }

    #[test]
    fn sources_of_paths() {
        assert_eq!(source("/context"), Some(Source::Context("")));
        assert_eq!(source("/context/a/b"), Some(Source::Context("/a/b")));
        assert_eq!(source("/parents/charge"), Some(Source::Parent("charge".into(), "")));
        assert_eq!(source("/parents/a~1b~0c/x"), Some(Source::Parent("a/b~c".into(), "/x")));
        assert_eq!(source("/parents/"), None);
        assert_eq!(source("/contextual"), None);
        let c = Condition::parse(&json!({"all": [{"path": "/context/a", "eq": 1},
                                                 {"not": {"path": "/parents/p/q", "exists": true}}]}))
        .unwrap();
        assert_eq!(c.paths(), vec!["/context/a", "/parents/p/q"]);
    }

    #[test]
    fn combinators() {
        let yes = json!({"path": "/context/express", "eq": false});
        let no = json!({"path": "/context/express", "eq": true});
        assert!(holds(json!({"all": [yes, yes]})));
        assert!(!holds(json!({"all": [yes, no]})));
        assert!(holds(json!({"any": [no, yes]})));
        assert!(holds(json!({"not": no})));
        assert!(holds(json!({"all": []})));
        assert!(!holds(json!({"any": []})));
    }

    #[test]
    fn each_defect_is_named() {
        assert!(reason(json!("x")).contains("is an object"));
        assert!(reason(json!({"path": "context/x", "eq": 1})).contains("JSON pointer"));
        assert!(reason(json!({"path": "/task/x", "eq": 1})).contains("must start with /context"));
        assert!(reason(json!({"path": "/context/x"})).contains("needs an operator"));
        assert!(reason(json!({"path": "/context/x", "eq": 1, "ne": 2})).contains("one operator"));
        assert!(
            reason(json!({"path": "/context/x", "like": "a%"})).contains("unknown field \"like\"")
        );
        assert!(reason(json!({"path": "/context/x", "in": 1})).contains("in takes an array"));
        assert!(reason(json!({"path": "/context/x", "gt": [1]})).contains("gt compares with"));
        assert!(reason(json!({"path": "/context/x", "exists": 1})).contains("true or false"));
        assert!(reason(json!({"all": {}})).contains("take an array"));
        let mut deep = json!({"path": "/context/x", "eq": 1});
        for _ in 0..=MAX_DEPTH {
            deep = json!({"not": deep});
        }
        assert!(reason(deep).contains("nested deeper"));
        let wide = json!({"any": vec![json!({"path": "/context/x", "eq": 1}); MAX_NODES]});
        assert!(reason(wide).contains("more than"));
    }

    fn leaf() -> impl Strategy<Value = Value> {
        (
            prop::sample::select(vec!["/context/a", "/context/b", "/parents/p/c", "/context/none"]),
            prop::sample::select(vec!["eq", "ne", "lt", "ge", "exists"]),
            -3i64..3,
        )
            .prop_map(|(path, op, n)| {
                let value = if op == "exists" { json!(n > 0) } else { json!(n) };
                let mut c = json!({"path": path});
                c[op] = value;
                c
            })
    }

    fn tree() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(|v| json!({"all": v})),
                prop::collection::vec(inner.clone(), 0..4).prop_map(|v| json!({"any": v})),
                inner.prop_map(|c| json!({"not": c})),
            ]
        })
    }

    proptest! {
        /// not, all and any obey the laws of boolean logic (De Morgan, double negation).
        #[test]
        fn boolean_laws(a in tree(), b in tree(), x in -3i64..3, y in -3i64..3, z in -3i64..3) {
            let input = json!({"context": {"a": x, "b": y}, "parents": {"p": {"c": z}}});
            let ev = |c: &Value| Condition::parse(c).unwrap().eval(&input);
            prop_assert_eq!(ev(&json!({"not": {"not": a}})), ev(&a));
            prop_assert_eq!(ev(&json!({"not": {"all": [a, b]}})),
                            ev(&json!({"any": [{"not": a}, {"not": b}]})));
            prop_assert_eq!(ev(&json!({"all": [a, b]})), ev(&a) && ev(&b));
            prop_assert_eq!(ev(&json!({"any": [a, b]})), ev(&a) || ev(&b));
            // what to_json writes parses back to the same condition
            let c = Condition::parse(&a).unwrap();
            prop_assert_eq!(Condition::parse(&c.to_json()).unwrap(), c);
        }
    }
}
