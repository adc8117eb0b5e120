//! Task templates: the Rails YAML task template as JSON, parsed and validated.

use super::dag::Dag;
use super::dynamic::StepRule;
use super::error::TaskerError;
use super::interrupt;
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};

/// Most steps a template may declare unless the setting `tasker_core.max_template_steps`
/// says otherwise.
pub const DEFAULT_MAX_STEPS: usize = 10_000;

/// One step of a template.
#[derive(Debug, Clone, PartialEq)]
pub struct StepTemplate {
    pub name: String,
    pub description: Option<String>,
    pub dependent_system: String,
    pub handler_class: String,
    pub handler_config: Option<Value>,
    pub default_retryable: bool,
    pub default_retry_limit: i32,
    pub skippable: bool,
    /// Names of the steps this one depends on (`depends_on_step` and `depends_on_steps`,
    /// without duplicates, in declaration order).
    pub depends_on: Vec<String>,
    /// Its `condition`, `map` and `skip_with`, when it has any (a dynamic step).
    pub rule: Option<StepRule>,
}

/// A validated task template.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskTemplate {
    pub name: String,
    pub namespace: String,
    pub version: String,
    pub description: Option<String>,
    /// JSON Schema of the task context, if any (checked when the template is registered).
    pub schema: Option<Value>,
    /// Steps in declaration order.
    pub steps: Vec<StepTemplate>,
    /// At most `limit` steps of this template's tasks with the same value at `key` in their
    /// context in progress at once (`"concurrency": {"key": "/customer_id", "limit": 2}`).
    pub concurrency: Option<Concurrency>,
}

/// A template's concurrency limit per key (see [`TaskTemplate::concurrency`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Concurrency {
    /// A JSON pointer (RFC 6901) into the task context.
    pub key: String,
    pub limit: i32,
}

/// The largest concurrency limit a template may declare.
pub const MAX_CONCURRENCY_LIMIT: i64 = 100_000;

fn concurrency_field(obj: &Map<String, Value>) -> Result<Option<Concurrency>, TaskerError> {
    let c = match obj.get("concurrency") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(c)) => c,
        Some(other) => {
            return Err(invalid(format!("concurrency must be an object, not {}", kind(other))))
        }
    };
    let key = match c.get("key") {
        Some(Value::String(k)) if k.starts_with('/') && k.len() <= 256 => k.clone(),
        _ => {
            return Err(invalid(
                "concurrency.key must be a JSON pointer into the task context (\"/customer_id\"), at most 256 bytes",
            ))
        }
    };
    let limit = match c.get("limit").and_then(Value::as_i64) {
        Some(l) if (1..=MAX_CONCURRENCY_LIMIT).contains(&l) => l as i32,
        _ => {
            return Err(invalid(format!(
                "concurrency.limit must be an integer from 1 to {MAX_CONCURRENCY_LIMIT}"
            )))
        }
    };
    if let Some(extra) = c.keys().find(|k| *k != "key" && *k != "limit") {
        return Err(invalid(format!(
            "concurrency has an unknown field {:?}",
            extra.chars().take(40).collect::<String>()
        )));
    }
    Ok(Some(Concurrency { key, limit }))
}

impl Concurrency {
    /// The key value of a task with `context`: the value at the pointer (a string as it is,
    /// anything else as JSON text), or `None` when the context has nothing there (no limit).
    pub fn value_of(&self, context: &Value) -> Option<String> {
        match context.pointer(&self.key)? {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        }
    }
}

/// Which rules a parse applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rules {
    /// A template being registered: every rule.
    Registration,
    /// A template already stored, perhaps registered under the looser rules of an earlier
    /// version: versions with leading zeros and names with control characters pass.
    Stored,
}

fn invalid(reason: impl Into<String>) -> TaskerError {
    TaskerError::InvalidTemplate { reason: reason.into() }
}

fn string_field(
    obj: &Map<String, Value>,
    key: &str,
    what: &str,
    max_len: usize,
) -> Result<Option<String>, TaskerError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => {
            Err(invalid(format!("{what} {key} must not be empty")))
        }
        Some(Value::String(s)) if s.chars().count() > max_len => {
            Err(invalid(format!("{what} {key} is longer than {max_len} characters")))
        }
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid(format!("{what} {key} must be a string, not {}", kind(other)))),
    }
}

/// A namespace, task or step name: a string field that must not hold control characters
/// (under [`Rules::Registration`]).
fn name_field(
    obj: &Map<String, Value>,
    key: &str,
    what: &str,
    max_len: usize,
    rules: Rules,
) -> Result<Option<String>, TaskerError> {
    let name = string_field(obj, key, what, max_len)?;
    match &name {
        Some(n) if rules == Rules::Registration && !is_printable_name(n) => {
            Err(invalid(format!("{what} {key} {n:?} must not contain control characters")))
        }
        _ => Ok(name),
    }
}

/// Whether `name` may name a namespace, a task or a step: it holds no control characters
/// (which make names that print alike differ, and once made idempotency identities ambiguous).
pub fn is_printable_name(name: &str) -> bool {
    !name.chars().any(char::is_control)
}

fn bool_field(
    obj: &Map<String, Value>,
    key: &str,
    what: &str,
    default: bool,
) -> Result<bool, TaskerError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => {
            Err(invalid(format!("{what} {key} must be true or false, not {}", kind(other))))
        }
    }
}

/// The JSON type name of a value, for messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Whether `v` is a version of the form `MAJOR.MINOR.PATCH`: numbers of digits without
/// leading zeros (`0.10.2`, not `01.0.0`: beside `1.0.0` it would make "latest" ambiguous).
pub fn is_version(v: &str) -> bool {
    is_version_form(v) && v.split('.').all(|p| p == "0" || !p.starts_with('0'))
}

/// `MAJOR.MINOR.PATCH` of digits, leading zeros allowed (as earlier versions registered them).
fn is_version_form(v: &str) -> bool {
    // tasker_named_tasks.version is varchar(16)
    if v.len() > 16 {
        return false;
    }
    let parts: Vec<&str> = v.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// A version as a sortable tuple (for "latest").
pub fn version_key(v: &str) -> (u64, u64, u64) {
    let mut it = v.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0), it.next().unwrap_or(0))
}

impl TaskTemplate {
    /// Parses and validates a template being registered: required fields and their types,
    /// unique step names, known dependencies, no cycle, a `MAJOR.MINOR.PATCH` version without
    /// leading zeros, namespace, task and step names without control characters, a handler
    /// class for every step, at most `max_steps` steps.
    pub fn parse(v: &Value, max_steps: usize) -> Result<TaskTemplate, TaskerError> {
        Self::parse_with(v, max_steps, Rules::Registration)
    }

    /// Parses a template as it was stored when it was registered — perhaps by an earlier
    /// version of tasker_core, which let versions with leading zeros and names with control
    /// characters through: those pass here, so that such templates keep working. Every other
    /// rule of [`TaskTemplate::parse`] applies; there is no step limit.
    pub fn parse_stored(v: &Value) -> Result<TaskTemplate, TaskerError> {
        Self::parse_with(v, usize::MAX, Rules::Stored)
    }

    fn parse_with(v: &Value, max_steps: usize, rules: Rules) -> Result<TaskTemplate, TaskerError> {
        let obj = v
            .as_object()
            .ok_or_else(|| invalid(format!("a template must be a JSON object, not {}", kind(v))))?;
        let name = name_field(obj, "name", "template", 64, rules)?
            .ok_or_else(|| invalid("template name is required"))?;
        let namespace = name_field(obj, "namespace_name", "template", 64, rules)?
            .unwrap_or_else(|| "default".to_owned());
        let version_ok = |s: &str| match rules {
            Rules::Registration => is_version(s),
            Rules::Stored => is_version_form(s),
        };
        let version = match obj.get("version") {
            None | Some(Value::Null) => "0.1.0".to_owned(),
            Some(Value::String(s)) if version_ok(s) => s.clone(),
            Some(Value::String(s)) => {
                return Err(TaskerError::MalformedVersion { version: s.chars().take(40).collect() })
            }
            Some(other) => {
                return Err(TaskerError::MalformedVersion {
                    version: other.to_string().chars().take(40).collect(),
                })
            }
        };
        let description = string_field(obj, "description", "template", 255)?;
        let schema = match obj.get("schema") {
            None | Some(Value::Null) => None,
            Some(s @ Value::Object(_)) => {
                super::jsonschema::check_schema(s).map_err(|e| invalid(format!("schema: {e}")))?;
                Some(s.clone())
            }
            Some(other) => {
                return Err(invalid(format!(
                    "template schema must be an object, not {}",
                    kind(other)
                )))
            }
        };
        let default_system = string_field(obj, "default_dependent_system", "template", 64)?
            .unwrap_or_else(|| "unknown".to_owned());
        let whitelist: Option<HashSet<String>> = match obj.get("named_steps") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|i| match i {
                        Value::String(s) => {
                            interrupt::check();
                            Ok(s.clone())
                        }
                        other => Err(invalid(format!(
                            "named_steps must hold strings, not {}",
                            kind(other)
                        ))),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Some(other) => {
                return Err(invalid(format!("named_steps must be an array, not {}", kind(other))))
            }
        };
        let raw_steps = match obj.get("step_templates") {
            Some(Value::Array(items)) if !items.is_empty() => items,
            Some(Value::Array(_)) => return Err(invalid("step_templates must not be empty")),
            None | Some(Value::Null) => return Err(invalid("step_templates is required")),
            Some(other) => {
                return Err(invalid(format!(
                    "step_templates must be an array, not {}",
                    kind(other)
                )))
            }
        };
        if raw_steps.len() > max_steps {
            return Err(TaskerError::LimitExceeded {
                what: "steps in a template",
                limit: max_steps as i64,
                actual: raw_steps.len() as i64,
            });
        }
        let mut steps = Vec::with_capacity(raw_steps.len());
        let mut index: HashMap<String, usize> = HashMap::new();
        for (i, raw) in raw_steps.iter().enumerate() {
            interrupt::check();
            let s = raw.as_object().ok_or_else(|| {
                invalid(format!("step_templates[{i}] must be an object, not {}", kind(raw)))
            })?;
            let where_ = format!("step_templates[{i}]");
            let step_name = name_field(s, "name", &where_, 128, rules)?
                .ok_or_else(|| invalid(format!("{where_} needs a name")))?;
            if index.insert(step_name.clone(), i).is_some() {
                return Err(TaskerError::DuplicateStepName { name: step_name });
            }
            let handler_class = match s.get("handler_class") {
                Some(Value::String(h)) if !h.trim().is_empty() && h.chars().count() <= 255 => {
                    h.clone()
                }
                Some(Value::String(h)) if !h.trim().is_empty() => {
                    return Err(invalid(format!(
                        "step {step_name:?} handler_class is longer than 255 characters"
                    )))
                }
                _ => return Err(TaskerError::MissingHandlerClass { step: step_name }),
            };
            let handler_config = match s.get("handler_config") {
                None | Some(Value::Null) => None,
                Some(c @ Value::Object(_)) => Some(c.clone()),
                Some(other) => {
                    return Err(invalid(format!(
                        "step {step_name:?} handler_config must be an object, not {}",
                        kind(other)
                    )))
                }
            };
            let retry_limit = match s.get("default_retry_limit") {
                None | Some(Value::Null) => 3,
                Some(Value::Number(n)) => match n.as_i64() {
                    Some(k) if (0..=1000).contains(&k) => k as i32,
                    _ => {
                        return Err(invalid(format!(
                            "step {step_name:?} default_retry_limit must be 0 to 1000"
                        )))
                    }
                },
                Some(other) => {
                    return Err(invalid(format!(
                        "step {step_name:?} default_retry_limit must be a number, not {}",
                        kind(other)
                    )))
                }
            };
            let mut depends_on: Vec<String> = Vec::new();
            // the names in depends_on, to drop repeats in linear time
            let mut listed: HashSet<String> = HashSet::new();
            if let Some(one) =
                string_field(s, "depends_on_step", &format!("step {step_name:?}"), 128)?
            {
                listed.insert(one.clone());
                depends_on.push(one);
            }
            match s.get("depends_on_steps") {
                None | Some(Value::Null) => {}
                Some(Value::Array(items)) => {
                    for d in items {
                        interrupt::check();
                        match d {
                            Value::String(d) => {
                                if listed.insert(d.clone()) {
                                    depends_on.push(d.clone())
                                }
                            }
                            other => {
                                return Err(invalid(format!(
                                "step {step_name:?} depends_on_steps must hold step names, not {}",
                                kind(other)
                            )))
                            }
                        }
                    }
                }
                Some(other) => {
                    return Err(invalid(format!(
                        "step {step_name:?} depends_on_steps must be an array, not {}",
                        kind(other)
                    )))
                }
            }
            let rule = StepRule::parse(&step_name, s, &depends_on)?;
            steps.push(StepTemplate {
                rule,
                description: string_field(s, "description", &format!("step {step_name:?}"), 255)?,
                dependent_system: string_field(
                    s,
                    "dependent_system",
                    &format!("step {step_name:?}"),
                    64,
                )?
                .unwrap_or_else(|| default_system.clone()),
                handler_class,
                handler_config,
                default_retryable: bool_field(
                    s,
                    "default_retryable",
                    &format!("step {step_name:?}"),
                    true,
                )?,
                default_retry_limit: retry_limit,
                skippable: bool_field(s, "skippable", &format!("step {step_name:?}"), false)?,
                depends_on,
                name: step_name,
            });
        }
        for step in &steps {
            interrupt::check();
            for d in &step.depends_on {
                if !index.contains_key(d) {
                    return Err(TaskerError::UnknownDependency {
                        step: step.name.clone(),
                        dependency: d.clone(),
                    });
                }
            }
            if let Some(allowed) = &whitelist {
                for n in std::iter::once(&step.name).chain(step.depends_on.iter()) {
                    if !allowed.contains(n) {
                        return Err(invalid(format!("step {n:?} is not listed in named_steps")));
                    }
                }
            }
        }
        let concurrency = concurrency_field(obj)?;
        let template =
            TaskTemplate { name, namespace, version, description, schema, steps, concurrency };
        if let Err(cycle) = template.dag().topological_order() {
            return Err(TaskerError::TemplateCycle {
                steps: cycle.iter().map(|&i| template.steps[i as usize].name.clone()).collect(),
            });
        }
        Ok(template)
    }

    /// The dependency graph over step positions (ids are positions).
    pub fn dag(&self) -> Dag {
        let index: HashMap<&str, i64> =
            self.steps.iter().enumerate().map(|(i, s)| (s.name.as_str(), i as i64)).collect();
        Dag::new(
            0..self.steps.len() as i64,
            self.steps.iter().enumerate().flat_map(|(i, s)| {
                let index = &index;
                s.depends_on.iter().map(move |d| (index[d.as_str()], i as i64))
            }),
        )
    }

    /// Whether any step is a dynamic step (a condition, a map or `skip_with`).
    pub fn is_dynamic(&self) -> bool {
        self.steps.iter().any(|s| s.rule.is_some())
    }

    /// `namespace.name@version`, as Rails names a template.
    pub fn full_name(&self) -> String {
        format!("{}.{}@{}", self.namespace, self.name, self.version)
    }
}

#[cfg(test)]
mod tests;
