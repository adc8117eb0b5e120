//! Dynamic steps: conditional steps, map steps and skips that cascade — what a template
//! declares of a step ([`StepRule`]) and what becomes of the step once every parent has
//! finished ([`StepRule::decide`]).
//!
//! In a template a step may carry
//!
//! ```json
//! "condition": {"path": "/context/express", "eq": true},
//! "map": {"over": "/parents/fetch_items/items"},
//! "skip_with": ["fetch_items"]
//! ```
//!
//! - `condition` ([`Condition`]): when it is false the step is **skipped** (recorded as
//!   `resolved_manually` with `"skipped": true` in the transition's metadata).
//! - `map`: the step runs once per element of the array at the path — in the task context
//!   (`/context/...`) or in a dependency's results (`/parents/<step>/...`); its dependents get the
//!   instances' results as one array, in element order.
//! - `skip_with`: the dependencies whose skip skips this step too (`true`: every dependency). A
//!   skipped dependency not listed counts as satisfied, as `resolved_manually` does in Rails.

use super::condition::{self, Condition, Source};
use super::error::TaskerError;
use super::template::kind;
use serde_json::{json, Map, Value};

/// Most instances a map step may expand into unless the setting
/// `tasker_core.max_map_elements` says otherwise.
pub const DEFAULT_MAX_MAP_ELEMENTS: usize = 10_000;

/// What a template declares of a dynamic step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRule {
    pub condition: Option<Condition>,
    /// A map step: the path of its input array.
    pub map: Option<String>,
    /// The dependencies whose skip skips this step.
    pub skip_with: Vec<String>,
}

/// How a finished parent looks to a dynamic step.
#[derive(Debug, Clone, Copy)]
pub struct Parent<'a> {
    pub name: &'a str,
    /// Its results (`None` for none or a skipped step).
    pub results: Option<&'a Value>,
    pub skipped: bool,
}

/// What becomes of a dynamic step whose parents have all finished.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision<'a> {
    /// An ordinary step from now on: workers may claim it.
    Run,
    /// Skipped, for the reason given.
    Skip(String),
    /// A map step: one instance per element.
    Expand(&'a [Value]),
    /// A map step whose input is unusable: it fails for good (`limit`: too many elements).
    Fail { message: String, limit: bool },
}

fn invalid(step: &str, reason: impl std::fmt::Display) -> TaskerError {
    TaskerError::InvalidTemplate { reason: format!("step {step:?} {reason}") }
}

/// Whether `name` may be read or named by the step: one of `deps`, or anything when the
/// dependencies are not checked (`None`: a stored rule, checked when it was registered).
fn is_dependency(deps: Option<&[String]>, name: &String) -> bool {
    deps.is_none_or(|d| d.contains(name))
}

/// Checks that `path` reads the context or one of `deps`.
fn check_source(
    step: &str,
    what: &str,
    path: &str,
    deps: Option<&[String]>,
) -> Result<(), TaskerError> {
    match condition::source(path) {
        Some(Source::Context(_)) => Ok(()),
        Some(Source::Parent(name, _)) if is_dependency(deps, &name) => Ok(()),
        Some(Source::Parent(name, _)) => Err(invalid(
            step,
            format!("{what} reads /parents/{name}, which is not one of its dependencies"),
        )),
        None => {
            Err(invalid(step, format!("{what} path must start with /context or /parents/<step>")))
        }
    }
}

impl StepRule {
    /// The rule of template step `obj` (named `step`, depending on `deps`), `None` when it has
    /// no `condition`, `map` or `skip_with`. `TK020` names each defect: a malformed condition,
    /// a path into a step that is not a dependency, `skip_with` naming a step that is not one.
    pub fn parse(
        step: &str,
        obj: &Map<String, Value>,
        deps: &[String],
    ) -> Result<Option<StepRule>, TaskerError> {
        Self::parse_with(step, obj, Some(deps))
    }

    /// [`StepRule::parse`], the paths and `skip_with` checked against `deps` when given.
    fn parse_with(
        step: &str,
        obj: &Map<String, Value>,
        deps: Option<&[String]>,
    ) -> Result<Option<StepRule>, TaskerError> {
        let condition = match obj.get("condition") {
            None | Some(Value::Null) => None,
            Some(c) => {
                let c = Condition::parse(c).map_err(|e| match e {
                    TaskerError::InvalidTemplate { reason } => invalid(step, reason),
                    other => other,
                })?;
                for p in c.paths() {
                    check_source(step, "condition", p, deps)?;
                }
                Some(c)
            }
        };
        let map = match obj.get("map") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => {
                let over = match m.get("over") {
                    Some(Value::String(p)) if p.len() <= condition::MAX_PATH => p.clone(),
                    _ => {
                        return Err(invalid(
                            step,
                            "map needs \"over\": the path of an array (\"/context/items\" or \"/parents/<step>/items\")",
                        ))
                    }
                };
                if let Some(extra) = m.keys().find(|k| *k != "over") {
                    return Err(invalid(
                        step,
                        format!(
                            "map has an unknown field {:?}",
                            extra.chars().take(40).collect::<String>()
                        ),
                    ));
                }
                check_source(step, "map", &over, deps)?;
                Some(over)
            }
            Some(other) => {
                return Err(invalid(step, format!("map must be an object, not {}", kind(other))))
            }
        };
        let skip_with = match obj.get("skip_with") {
            None | Some(Value::Null) | Some(Value::Bool(false)) => Vec::new(),
            Some(Value::Bool(true)) => deps.unwrap_or_default().to_vec(),
            Some(Value::Array(items)) => {
                let mut names = Vec::with_capacity(items.len());
                for i in items {
                    match i {
                        Value::String(n) if is_dependency(deps, n) => {
                            if !names.contains(n) {
                                names.push(n.clone())
                            }
                        }
                        Value::String(n) => {
                            return Err(invalid(
                                step,
                                format!(
                                    "skip_with names {n:?}, which is not one of its dependencies"
                                ),
                            ))
                        }
                        other => {
                            return Err(invalid(
                                step,
                                format!("skip_with must hold step names, not {}", kind(other)),
                            ))
                        }
                    }
                }
                names
            }
            Some(other) => {
                return Err(invalid(
                    step,
                    format!(
                        "skip_with must be an array of dependencies or true, not {}",
                        kind(other)
                    ),
                ))
            }
        };
        if condition.is_none() && map.is_none() && skip_with.is_empty() {
            return Ok(None);
        }
        Ok(Some(StepRule { condition, map, skip_with }))
    }

    /// The rule as stored with each of its steps (and read back by [`StepRule::from_json`]).
    pub fn to_json(&self) -> Value {
        let mut out = Map::new();
        if let Some(c) = &self.condition {
            out.insert("condition".into(), c.to_json());
        }
        if let Some(m) = &self.map {
            out.insert("map".into(), json!({ "over": m }));
        }
        if !self.skip_with.is_empty() {
            out.insert("skip_with".into(), json!(self.skip_with));
        }
        Value::Object(out)
    }

    /// Reads a stored rule back (its dependencies unchecked: they were checked when the
    /// template was registered).
    pub fn from_json(v: &Value) -> Result<StepRule, TaskerError> {
        let obj = v.as_object().ok_or_else(|| TaskerError::Internal {
            context: format!("a stored step rule is {}, not an object", kind(v)),
        })?;
        Ok(StepRule::parse_with("(stored)", obj, None)?.unwrap_or(StepRule {
            condition: None,
            map: None,
            skip_with: Vec::new(),
        }))
    }

    /// What the rule reads when it is judged: the members of the task context, and of each
    /// dependency's results, that its paths start with (the first step of each path), so that
    /// only those need be fetched and parsed — a document's other members may be anything
    /// PostgreSQL stores (deeper than serde's 128 levels, numbers beyond `f64`). `None` for
    /// the context when no path reads it; dependencies in the order first read.
    pub fn reads(&self) -> Reads {
        let mut paths: Vec<&str> =
            self.condition.as_ref().map(Condition::paths).unwrap_or_default();
        paths.extend(self.map.as_deref());
        let mut out = Reads::default();
        for source in paths.into_iter().filter_map(condition::source) {
            let (members, pointer) = match source {
                Source::Context(p) => (out.context.get_or_insert_with(Members::default), p),
                Source::Parent(name, p) => {
                    let i = match out.parents.iter().position(|(n, _)| *n == name) {
                        Some(i) => i,
                        None => {
                            out.parents.push((name, Members::default()));
                            out.parents.len() - 1
                        }
                    };
                    (&mut out.parents[i].1, p)
                }
            };
            members.add(pointer);
        }
        out
    }

    /// The dependency a map step reads its array from, if it is one.
    pub fn map_parent(&self) -> Option<String> {
        match condition::source(self.map.as_deref()?)? {
            Source::Parent(name, _) => Some(name),
            Source::Context(_) => None,
        }
    }

    /// A map over the context, checked against `context` when its task is created: `TK025`
    /// (as `violation`) when there is no array at its path, `54000` with more than `max`
    /// elements. Nothing to check for other steps.
    pub fn check_context(&self, context: &Value, max: usize) -> Result<(), MapProblem> {
        let Some(Source::Context(p)) = self.map.as_deref().and_then(condition::source) else {
            return Ok(());
        };
        match context.pointer(p) {
            Some(Value::Array(items)) if items.len() > max => {
                Err(MapProblem::TooMany { count: items.len() })
            }
            Some(Value::Array(_)) => Ok(()),
            found => Err(MapProblem::NotAnArray { found: found.map_or("nothing", kind) }),
        }
    }

    /// What becomes of the step now that every parent has finished: skipped when a parent in
    /// `skip_with` was skipped or the condition is false, else a map step expands (or fails on
    /// an unusable input), else it runs.
    pub fn decide<'a>(
        &self,
        context: &'a Value,
        parents: &[Parent<'a>],
        max_elements: usize,
    ) -> Decision<'a> {
        if let Some(p) =
            parents.iter().find(|p| p.skipped && self.skip_with.iter().any(|s| s == p.name))
        {
            return Decision::Skip(format!("dependency {} was skipped", p.name));
        }
        let lookup = |path: &str| -> Option<&'a Value> {
            match condition::source(path)? {
                Source::Context(p) => context.pointer(p),
                Source::Parent(name, p) => parents
                    .iter()
                    .find(|x| x.name == name && !x.skipped)
                    .and_then(|x| x.results)
                    .and_then(|r| r.pointer(p)),
            }
        };
        if let Some(c) = &self.condition {
            if !c.eval_by(&lookup) {
                return Decision::Skip("its condition is false".into());
            }
        }
        let Some(over) = &self.map else {
            return Decision::Run;
        };
        if let Some(source) = self.map_parent() {
            if parents.iter().any(|p| p.name == source && p.skipped) {
                return Decision::Skip(format!("the step it maps over ({source}) was skipped"));
            }
        }
        match lookup(over) {
            Some(Value::Array(items)) if items.len() > max_elements => Decision::Fail {
                message: format!(
                    "map input at {over} has {} elements, more than tasker_core.max_map_elements ({max_elements})",
                    items.len()
                ),
                limit: true,
            },
            Some(Value::Array(items)) => Decision::Expand(items),
            found => Decision::Fail {
                message: format!(
                    "map input at {over} is not an array (found {})",
                    found.map_or("nothing", kind)
                ),
                limit: false,
            },
        }
    }
}

/// What a rule reads (see [`StepRule::reads`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reads {
    pub context: Option<Members>,
    pub parents: Vec<(String, Members)>,
}

/// The part of a JSON document a rule's paths read: all of it (a path to the document
/// itself), or the members named (each path's first step, pointer escapes undone; each once).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Members {
    pub whole: bool,
    pub keys: Vec<String>,
}

impl Members {
    /// Notes the member JSON pointer `pointer` (into the document) starts with.
    fn add(&mut self, pointer: &str) {
        let Some(rest) = pointer.strip_prefix('/') else {
            self.whole = true;
            return;
        };
        let key = condition::unescape(rest.split('/').next().unwrap_or_default());
        if !self.keys.contains(&key) {
            self.keys.push(key);
        }
    }
}

/// Why a map over the context cannot expand (see [`StepRule::check_context`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapProblem {
    NotAnArray { found: &'static str },
    TooMany { count: usize },
}

#[cfg(test)]
mod tests;
