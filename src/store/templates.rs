//! Task templates in the Rails tables (namespaces, named tasks, dependent systems, named steps,
//! named_tasks_named_steps, the template JSON in `tasker_named_tasks.configuration`), and task
//! creation from them.

use super::events::{self, NewEvent};
use super::plans::{
    with_plan, with_write_plan, BOOLARRAY, INT4, INT4ARRAY, INT8, INT8ARRAY, JSONB, NOW, TEXT,
    TEXTARRAY,
};
use crate::core::error::TaskerError;
use crate::core::ident::SchemaName;
use crate::core::template::{self, TaskTemplate};
use pgrx::spi::{Spi, SpiClient};
use pgrx::JsonB;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};

fn spi(e: pgrx::spi::Error) -> TaskerError {
    TaskerError::Internal {
        context: format!("SPI failure in templates: {e}"),
    }
}

/// The template as stored: the caller's JSON with the normalized fields written over it.
pub fn normalized_json(t: &TaskTemplate, raw: &Value) -> Value {
    let mut out = raw.as_object().cloned().unwrap_or_default();
    out.insert("name".into(), json!(t.name));
    out.insert("namespace_name".into(), json!(t.namespace));
    out.insert("version".into(), json!(t.version));
    out.insert("description".into(), json!(t.description));
    if let Some(s) = &t.schema {
        out.insert("schema".into(), s.clone());
    }
    out.insert(
        "step_templates".into(),
        Value::Array(
            t.steps
                .iter()
                .map(|s| {
                    json!({
                        "name": s.name,
                        "description": s.description,
                        "dependent_system": s.dependent_system,
                        "handler_class": s.handler_class,
                        "handler_config": s.handler_config,
                        "default_retryable": s.default_retryable,
                        "default_retry_limit": s.default_retry_limit,
                        "skippable": s.skippable,
                        "depends_on_steps": s.depends_on,
                    })
                })
                .collect(),
        ),
    );
    Value::Object(out)
}

/// Stores `t` (creating its namespace, dependent systems and named steps as needed, replacing
/// an earlier registration of the same namespace, name and version). Returns the named task id.
pub fn register(schema: &SchemaName, t: &TaskTemplate, raw: &Value) -> Result<i32, TaskerError> {
    let q = schema.quoted();
    let config = normalized_json(t, raw);
    let internal = |what: String| TaskerError::Internal { context: what };
    // the template's dependent systems, each once (an upsert may not touch a row twice)
    let mut systems: Vec<String> = Vec::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for s in &t.steps {
        if seen.insert(s.dependent_system.as_str()) {
            systems.push(s.dependent_system.clone());
        }
    }
    let names: Vec<String> = t.steps.iter().map(|s| s.name.clone()).collect();
    let descriptions: Vec<Option<String>> = t.steps.iter().map(|s| s.description.clone()).collect();
    let retryable: Vec<bool> = t.steps.iter().map(|s| s.default_retryable).collect();
    let limits: Vec<i32> = t.steps.iter().map(|s| s.default_retry_limit).collect();
    let skippable: Vec<bool> = t.steps.iter().map(|s| s.skippable).collect();
    Spi::connect_mut(|client| {
        super::schema::require_installed_cached(client, schema)?;
        let named_task_id = with_write_plan(
            client,
            "register_task",
            schema.as_str(),
            &[TEXT, TEXT, TEXT, TEXT, JSONB],
            || {
                format!(
                    "WITH ns AS (
                         INSERT INTO {q}.tasker_task_namespaces (name, created_at, updated_at)
                         VALUES ($1, {NOW}, {NOW})
                         ON CONFLICT (name) DO UPDATE SET name = excluded.name
                         RETURNING task_namespace_id)
                     INSERT INTO {q}.tasker_named_tasks
                         (name, description, task_namespace_id, version, configuration, created_at, updated_at)
                     SELECT $2, $4, ns.task_namespace_id, $3, $5, {NOW}, {NOW} FROM ns
                     ON CONFLICT (task_namespace_id, name, version) DO UPDATE
                         SET description = excluded.description, configuration = excluded.configuration,
                             updated_at = excluded.updated_at
                     RETURNING named_task_id"
                )
            },
            |stmt| {
                client
                    .select(
                        stmt,
                        None,
                        &[
                            t.namespace.as_str().into(),
                            t.name.as_str().into(),
                            t.version.as_str().into(),
                            t.description.clone().into(),
                            JsonB(config.clone()).into(),
                        ],
                    )?
                    .first()
                    .get_one::<i32>()
            },
        )
        .map_err(spi)?
        .ok_or_else(|| TaskerError::Internal {
            context: "registering a template returned no named task".into(),
        })?;
        // The steps' rows, one statement per table, each an upsert from arrays without a join
        // (a join of two template-sized sets is planned as a nested loop under the generic
        // plans' estimates: quadratic). Names and ids are matched here, in hash maps.
        let system_ids: HashMap<String, i32> = with_write_plan(
            client,
            "register_systems",
            schema.as_str(),
            &[TEXTARRAY],
            || {
                format!(
                    "INSERT INTO {q}.tasker_dependent_systems (name, created_at, updated_at)
                     SELECT s.name, {NOW}, {NOW} FROM unnest($1::text[]) AS s(name)
                     ON CONFLICT (name) DO UPDATE SET name = excluded.name
                     RETURNING name::text, dependent_system_id"
                )
            },
            |stmt| {
                let mut out = HashMap::with_capacity(systems.len());
                for row in client.select(stmt, None, &[systems.clone().into()])? {
                    out.insert(
                        row.get::<String>(1)?.unwrap_or_default(),
                        row.get::<i32>(2)?.unwrap_or_default(),
                    );
                }
                Ok(out)
            },
        )
        .map_err(spi)?;
        let step_systems: Vec<i32> = t
            .steps
            .iter()
            .map(|s| {
                system_ids.get(&s.dependent_system).copied().ok_or_else(|| {
                    internal(format!(
                        "dependent system {:?} was not stored",
                        s.dependent_system
                    ))
                })
            })
            .collect::<Result<_, _>>()?;
        // named step id by dependent system id, then name
        let named_step_ids: HashMap<i32, HashMap<String, i32>> = with_write_plan(
            client,
            "register_named_steps",
            schema.as_str(),
            &[INT4ARRAY, TEXTARRAY, TEXTARRAY],
            || {
                format!(
                    "INSERT INTO {q}.tasker_named_steps (dependent_system_id, name, description, created_at, updated_at)
                     SELECT s.system_id, s.name, s.description, {NOW}, {NOW}
                     FROM unnest($1::integer[], $2::text[], $3::text[]) AS s(system_id, name, description)
                     ON CONFLICT (dependent_system_id, name) DO UPDATE SET name = excluded.name
                     RETURNING dependent_system_id, name::text, named_step_id"
                )
            },
            |stmt| {
                let mut out: HashMap<i32, HashMap<String, i32>> = HashMap::new();
                for row in client.select(
                    stmt,
                    None,
                    &[
                        step_systems.clone().into(),
                        names.clone().into(),
                        descriptions.clone().into(),
                    ],
                )? {
                    out.entry(row.get::<i32>(1)?.unwrap_or_default()).or_default().insert(
                        row.get::<String>(2)?.unwrap_or_default(),
                        row.get::<i32>(3)?.unwrap_or_default(),
                    );
                }
                Ok(out)
            },
        )
        .map_err(spi)?;
        let step_ids: Vec<i32> = t
            .steps
            .iter()
            .zip(&step_systems)
            .map(|(s, system)| {
                named_step_ids
                    .get(system)
                    .and_then(|by_name| by_name.get(s.name.as_str()))
                    .copied()
                    .ok_or_else(|| internal(format!("named step {:?} was not stored", s.name)))
            })
            .collect::<Result<_, _>>()?;
        with_write_plan(
            client,
            "register_task_steps",
            schema.as_str(),
            &[INT4, INT4ARRAY, BOOLARRAY, BOOLARRAY, INT4ARRAY],
            || {
                format!(
                    "INSERT INTO {q}.tasker_named_tasks_named_steps
                         (named_task_id, named_step_id, skippable, default_retryable, default_retry_limit, created_at, updated_at)
                     SELECT $1, s.named_step_id, s.skippable, s.retryable, s.retry_limit, {NOW}, {NOW}
                     FROM unnest($2::integer[], $3::boolean[], $4::boolean[], $5::integer[])
                         AS s(named_step_id, skippable, retryable, retry_limit)
                     ON CONFLICT (named_task_id, named_step_id) DO UPDATE
                         SET skippable = excluded.skippable, default_retryable = excluded.default_retryable,
                             default_retry_limit = excluded.default_retry_limit, updated_at = excluded.updated_at"
                )
            },
            |stmt| {
                client.select(
                    stmt,
                    None,
                    &[
                        named_task_id.into(),
                        step_ids.clone().into(),
                        skippable.clone().into(),
                        retryable.clone().into(),
                        limits.clone().into(),
                    ],
                )?;
                Ok(())
            },
        )
        .map_err(spi)?;
        // Steps the template no longer declares leave the task's step list: the named task's
        // rows are read once and compared in a hash set (the anti-join against the template's
        // names ran as a nested loop: quadratic), then the stale ones deleted by primary key.
        let keep: HashSet<i32> = step_ids.iter().copied().collect();
        let stale: Vec<i32> = with_write_plan(
            client,
            "register_task_step_rows",
            schema.as_str(),
            &[INT4],
            || {
                format!(
                    "SELECT id, named_step_id FROM {q}.tasker_named_tasks_named_steps
                     WHERE named_task_id = $1"
                )
            },
            |stmt| {
                let mut out = Vec::new();
                for row in client.select(stmt, None, &[named_task_id.into()])? {
                    if !keep.contains(&row.get::<i32>(2)?.unwrap_or_default()) {
                        out.push(row.get::<i32>(1)?.unwrap_or_default());
                    }
                }
                Ok(out)
            },
        )
        .map_err(spi)?;
        if !stale.is_empty() {
            with_write_plan(
                client,
                "register_prune_rows",
                schema.as_str(),
                &[INT4ARRAY],
                || {
                    format!(
                        "DELETE FROM {q}.tasker_named_tasks_named_steps WHERE id = ANY ($1::integer[])"
                    )
                },
                |stmt| {
                    client.select(stmt, None, &[stale.clone().into()])?;
                    Ok(())
                },
            )
            .map_err(spi)?;
        }
        Ok(named_task_id)
    })
}

/// A stored template, found by namespace, name and version (latest when `None`).
pub struct Stored {
    pub named_task_id: i32,
    pub version: String,
    pub config: Value,
}

/// One registered version of a template: its named task, namespace and the version of its row
/// (`xmin` and `ctid`: re-registering a template rewrites the row).
struct Registered {
    named_task_id: i32,
    version: String,
    namespace_id: i64,
    row_version: String,
}

/// The version asked for, or the highest one (by [`template::version_key`]) when `version` is
/// `None`; TK007 when there is none. Only named tasks registered with step templates are
/// templates. No configuration is read: a configuration written by others past the JSON
/// nesting limit is an error (TK026) once its version is chosen, never a reason to pick
/// another version.
fn registered(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    namespace: &str,
    name: &str,
    version: Option<&str>,
) -> Result<Registered, TaskerError> {
    let q = schema.quoted();
    let rows: Vec<Registered> = with_plan(
        client,
        "find_template_versions",
        schema.as_str(),
        &[TEXT, TEXT],
        || {
            format!(
                "SELECT nt.named_task_id, nt.version::text, nt.task_namespace_id::bigint,
                        nt.xmin::text || '/' || nt.ctid::text
                 FROM {q}.tasker_named_tasks nt
                 JOIN {q}.tasker_task_namespaces tn ON tn.task_namespace_id = nt.task_namespace_id
                 WHERE tn.name = $1 AND nt.name = $2
                   AND jsonb_typeof(nt.configuration -> 'step_templates') = 'array'"
            )
        },
        |stmt| {
            let mut out = Vec::new();
            for row in client.select(stmt, None, &[namespace.into(), name.into()])? {
                out.push(Registered {
                    named_task_id: row.get::<i32>(1)?.unwrap_or_default(),
                    version: row.get::<String>(2)?.unwrap_or_default(),
                    namespace_id: row.get::<i64>(3)?.unwrap_or_default(),
                    row_version: row.get::<String>(4)?.unwrap_or_default(),
                });
            }
            Ok(out)
        },
    )
    .map_err(spi)?;
    let chosen = match version {
        Some(v) => rows.into_iter().find(|r| r.version == v),
        None => rows
            .into_iter()
            .max_by_key(|r| template::version_key(&r.version)),
    };
    chosen.ok_or_else(|| TaskerError::UnknownTemplate {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        version: version.map(str::to_owned),
    })
}

/// The stored configuration of a named task, parsed (nesting-limited).
fn configuration(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    named_task_id: i32,
) -> Result<Value, TaskerError> {
    let q = schema.quoted();
    let raw: Option<String> = with_plan(
        client,
        "template_configuration",
        schema.as_str(),
        &[INT4],
        || {
            format!(
                "SELECT configuration::text FROM {q}.tasker_named_tasks WHERE named_task_id = $1"
            )
        },
        |stmt| {
            let t = client.select(stmt, Some(1), &[named_task_id.into()])?;
            if t.is_empty() {
                Ok(None)
            } else {
                t.first().get_one::<String>()
            }
        },
    )
    .map_err(spi)?;
    crate::core::json::parse(
        "stored template configuration",
        raw.as_deref().unwrap_or("{}"),
    )
}

pub fn find(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    namespace: &str,
    name: &str,
    version: Option<&str>,
) -> Result<Stored, TaskerError> {
    let chosen = registered(client, schema, namespace, name, version)?;
    Ok(Stored {
        named_task_id: chosen.named_task_id,
        config: configuration(client, schema, chosen.named_task_id)?,
        version: chosen.version,
    })
}

/// Parsed templates by (data schema, named task id), with the version of the row they were
/// parsed from (`xmin` and `ctid`: re-registering a template rewrites its row, so a stale entry
/// is never used).
type ParsedTemplates = HashMap<(String, i32), (String, std::rc::Rc<TaskTemplate>)>;

thread_local! {
    /// This backend's parsed templates.
    static PARSED: std::cell::RefCell<ParsedTemplates> = std::cell::RefCell::new(HashMap::new());
}

/// Most templates a backend keeps parsed (the cache starts over beyond it).
const PARSED_MAX: usize = 256;

/// A template to create tasks from: the named task, its namespace and the parsed template,
/// parsed once per backend and row version (`create_task`'s path: the version is chosen
/// without reading any configuration, then only the chosen one is read and parsed, and only
/// when this backend has not parsed that row version before).
pub struct ForCreation {
    pub named_task_id: i32,
    pub namespace_id: i64,
    pub template: std::rc::Rc<TaskTemplate>,
}

pub fn find_for_creation(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    namespace: &str,
    name: &str,
    version: Option<&str>,
) -> Result<ForCreation, TaskerError> {
    let chosen = registered(client, schema, namespace, name, version)?;
    let key = (schema.as_str().to_owned(), chosen.named_task_id);
    let cached = PARSED.with(|c| {
        c.borrow()
            .get(&key)
            .filter(|(v, _)| *v == chosen.row_version)
            .map(|(_, t)| t.clone())
    });
    let template = match cached {
        Some(t) => t,
        None => {
            let config = configuration(client, schema, chosen.named_task_id)?;
            let parsed =
                TaskTemplate::parse_stored(&config).map_err(|e| TaskerError::Internal {
                    context: format!(
                        "stored template {namespace}.{name}@{} is invalid: {e}",
                        chosen.version
                    ),
                })?;
            let parsed = std::rc::Rc::new(parsed);
            PARSED.with(|c| {
                let mut c = c.borrow_mut();
                if c.len() >= PARSED_MAX {
                    c.clear();
                }
                c.insert(key, (chosen.row_version, parsed.clone()));
            });
            parsed
        }
    };
    Ok(ForCreation {
        named_task_id: chosen.named_task_id,
        namespace_id: chosen.namespace_id,
        template,
    })
}

/// One template in a listing.
pub struct Listed {
    pub namespace: String,
    pub name: String,
    pub version: String,
    pub description: Option<String>,
    pub step_count: i32,
}

pub fn list(schema: &SchemaName, namespace: Option<&str>) -> Result<Vec<Listed>, TaskerError> {
    let q = schema.quoted();
    Spi::connect(|client| {
        with_plan(
            client,
            "list_templates",
            schema.as_str(),
            &[TEXT],
            || {
                format!(
                    "SELECT tn.name::text, nt.name::text, nt.version::text, nt.description::text,
                            jsonb_array_length(nt.configuration -> 'step_templates')
                     FROM {q}.tasker_named_tasks nt
                     JOIN {q}.tasker_task_namespaces tn ON tn.task_namespace_id = nt.task_namespace_id
                     WHERE ($1::text IS NULL OR tn.name = $1)
                       AND jsonb_typeof(nt.configuration -> 'step_templates') = 'array'
                     ORDER BY 1, 2, 3"
                )
            },
            |stmt| {
                let mut out = Vec::new();
                for row in client.select(stmt, None, &[namespace.into()])? {
                    out.push(Listed {
                        namespace: row.get::<String>(1)?.unwrap_or_default(),
                        name: row.get::<String>(2)?.unwrap_or_default(),
                        version: row.get::<String>(3)?.unwrap_or_default(),
                        description: row.get::<String>(4)?,
                        step_count: row.get::<i32>(5)?.unwrap_or_default(),
                    });
                }
                Ok(out)
            },
        )
        .map_err(spi)
    })
    .map(|mut v: Vec<Listed>| {
        v.sort_by(|a, b| {
            (a.namespace.as_str(), a.name.as_str(), template::version_key(&a.version))
                .cmp(&(b.namespace.as_str(), b.name.as_str(), template::version_key(&b.version)))
        });
        v
    })
}

/// Options of a new task.
#[derive(Debug, Default, Clone)]
pub struct TaskOptions {
    pub initiator: Option<String>,
    pub source_system: Option<String>,
    pub reason: Option<String>,
    pub tags: Value,
    pub bypass_steps: Value,
    pub idempotency_key: Option<String>,
    /// W3C `traceparent` of the caller's trace: carried by the task's events, transitions and claims.
    pub traceparent: Option<String>,
}

/// Creates a task from a template: the task, its steps and edges, in one statement per table.
/// Returns `(task_id, created)`; with an idempotency key already used, the existing task.
pub fn create_task(
    schema: &SchemaName,
    namespace: &str,
    name: &str,
    version: Option<&str>,
    context: &Value,
    options: &TaskOptions,
) -> Result<(i64, bool), TaskerError> {
    for (argument, value) in [("namespace", namespace), ("name", name)] {
        if !template::is_printable_name(value) {
            return Err(TaskerError::InvalidArgument {
                argument,
                reason: format!(
                    "{:?} must not contain control characters",
                    value.chars().take(64).collect::<String>()
                ),
            });
        }
    }
    let q = schema.quoted();
    Spi::connect_mut(|client| {
        super::schema::require_installed_cached(client, schema)?;
        let stored = find_for_creation(client, schema, namespace, name, version)?;
        let t = &*stored.template;
        if let Some(s) = &t.schema {
            let violations = crate::core::jsonschema::validate(s, context, 10);
            if !violations.is_empty() {
                return Err(TaskerError::ContextInvalid {
                    template: t.full_name(),
                    violations,
                });
            }
        }
        let key = options.idempotency_key.as_deref();
        // the idempotency identity's input: namespace and name length-prefixed, then the key
        let keyed = key.map(|k| identity_input(namespace, name, k));
        if let Some(k) = key {
            if let Some(existing) =
                legacy_keyed_task(client, schema, stored.named_task_id, namespace, name, k)?
            {
                return Ok((existing, false));
            }
        }
        let created: Option<i64> = with_write_plan(
            client,
            "create_task",
            schema.as_str(),
            &[INT4, TEXT, TEXT, TEXT, JSONB, JSONB, JSONB, TEXT],
            || {
                format!(
                    "INSERT INTO {q}.tasker_tasks (named_task_id, complete, requested_at, initiator, source_system,
                         reason, bypass_steps, tags, context, identity_hash, created_at, updated_at)
                     VALUES ($1, false, {NOW}, $2, $3, $4, $5::json, $6, $7,
                             COALESCE({}, gen_random_uuid()::text), {NOW}, {NOW})
                     ON CONFLICT (identity_hash) DO NOTHING
                     RETURNING task_id",
                    identity_sql("$8")
                )
            },
            |stmt| {
                let table = client.select(
                    stmt,
                    None,
                    &[
                        stored.named_task_id.into(),
                        options.initiator.as_deref().unwrap_or("unknown").into(),
                        options.source_system.as_deref().unwrap_or("unknown").into(),
                        options.reason.as_deref().unwrap_or("unknown").into(),
                        JsonB(options.bypass_steps.clone()).into(),
                        JsonB(options.tags.clone()).into(),
                        JsonB(context.clone()).into(),
                        keyed.as_deref().into(),
                    ],
                )?;
                if table.is_empty() {
                    Ok(None)
                } else {
                    table.first().get_one::<i64>()
                }
            },
        )
        .map_err(spi)?;
        let Some(task_id) = created else {
            // The idempotency key was used before: that task is the answer.
            // a fresh snapshot: the conflicting task may have committed after this statement began
            let existing = with_write_plan(
                client,
                "task_by_identity",
                schema.as_str(),
                &[TEXT],
                || {
                    format!(
                        "SELECT task_id FROM {q}.tasker_tasks WHERE identity_hash = {}",
                        identity_sql("$1")
                    )
                },
                |stmt| {
                    client
                        .select(stmt, Some(1), &[keyed.as_deref().into()])?
                        .first()
                        .get_one::<i64>()
                },
            )
            .map_err(spi)?
            .ok_or_else(|| TaskerError::Internal {
                context: "idempotency key conflicted but no task holds it".into(),
            })?;
            return Ok((existing, false));
        };
        if let Some(traceparent) = &options.traceparent {
            if !super::events::traces_installed() {
                return Err(TaskerError::InvalidArgument {
                    argument: "options",
                    reason: "traceparent needs the SQL of this version: run ALTER EXTENSION tasker_core UPDATE"
                        .into(),
                });
            }
            // first, so that every event and transition of the task carries it
            super::events::record_trace(client, task_id, traceparent).map_err(spi)?;
        }
        // Each template step's named step, by template position: one index look-up per step
        // (a LATERAL with LIMIT 1), whatever the statistics. Joined as sets, the generic plan
        // either walked every named step of the step's system per step (quadratic) or, on
        // never-analysed tables, hashed the whole catalogue of named steps on every call.
        let systems: Vec<String> = t.steps.iter().map(|s| s.dependent_system.clone()).collect();
        let names: Vec<String> = t.steps.iter().map(|s| s.name.clone()).collect();
        let mut named: Vec<Option<i32>> = vec![None; t.steps.len()];
        // a write plan for its fresh snapshot, as the statement it replaces had
        with_write_plan(
            client,
            "template_named_steps",
            schema.as_str(),
            &[TEXTARRAY, TEXTARRAY],
            || {
                format!(
                    "SELECT s.pos::integer, n.named_step_id
                     FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS s(system, name, pos)
                     CROSS JOIN LATERAL (
                         SELECT ns.named_step_id FROM {q}.tasker_dependent_systems ds
                         JOIN {q}.tasker_named_steps ns
                           ON ns.dependent_system_id = ds.dependent_system_id AND ns.name = s.name
                         WHERE ds.name = s.system LIMIT 1) n"
                )
            },
            |stmt| {
                for row in
                    client.select(stmt, None, &[systems.clone().into(), names.clone().into()])?
                {
                    let pos = row.get::<i32>(1)?.unwrap_or_default() as usize;
                    if let Some(slot) = pos.checked_sub(1).and_then(|p| named.get_mut(p)) {
                        *slot = row.get::<i32>(2)?;
                    }
                }
                Ok(())
            },
        )
        .map_err(spi)?;
        // Steps without a named step are left out with their edges, as before.
        let kept: Vec<(usize, i32)> = named
            .iter()
            .enumerate()
            .filter_map(|(i, id)| id.map(|id| (i, id)))
            .collect();
        let named_ids: Vec<i32> = kept.iter().map(|&(_, id)| id).collect();
        let retryable: Vec<bool> = kept
            .iter()
            .map(|&(i, _)| t.steps[i].default_retryable)
            .collect();
        let limits: Vec<i32> = kept
            .iter()
            .map(|&(i, _)| t.steps[i].default_retry_limit)
            .collect();
        let skippable: Vec<bool> = kept.iter().map(|&(i, _)| t.steps[i].skippable).collect();
        let direct = super::maintenance::installed()
            && super::facts::is_tracked(client, schema).map_err(spi)?;
        if direct {
            insert_steps_direct(
                client,
                schema,
                task_id,
                t,
                &kept,
                stored.namespace_id,
                context,
            )?;
        } else {
            // the steps, in template order (ids ascend with it); workflow step id by named step id
            // (a template's steps have distinct named steps: names are unique in a template)
            let by_named: HashMap<i32, i64> = with_write_plan(
                client,
                "create_task_steps",
                schema.as_str(),
                &[INT8, INT4ARRAY, BOOLARRAY, INT4ARRAY, BOOLARRAY, JSONB],
                || {
                    format!(
                        "INSERT INTO {q}.tasker_workflow_steps (task_id, named_step_id, retryable, retry_limit,
                             in_process, processed, attempts, inputs, results, skippable, created_at, updated_at)
                         SELECT $1, s.named_step_id, s.retryable, s.retry_limit, false, false, 0, $6, '{{}}',
                                s.skippable, {NOW}, {NOW}
                         FROM unnest($2::integer[], $3::boolean[], $4::integer[], $5::boolean[]) WITH ORDINALITY
                             AS s(named_step_id, retryable, retry_limit, skippable, pos)
                         ORDER BY s.pos
                         RETURNING named_step_id, workflow_step_id"
                    )
                },
                |stmt| {
                    let mut out = HashMap::with_capacity(named_ids.len());
                    for row in client.select(
                        stmt,
                        None,
                        &[
                            task_id.into(),
                            named_ids.clone().into(),
                            retryable.clone().into(),
                            limits.clone().into(),
                            skippable.clone().into(),
                            JsonB(context.clone()).into(),
                        ],
                    )? {
                        out.insert(
                            row.get::<i32>(1)?.unwrap_or_default(),
                            row.get::<i64>(2)?.unwrap_or_default(),
                        );
                    }
                    Ok(out)
                },
            )
            .map_err(spi)?;
            // workflow step id by template position
            let mut step_ids: Vec<Option<i64>> = vec![None; t.steps.len()];
            for &(i, named_id) in &kept {
                step_ids[i] = by_named.get(&named_id).copied();
            }
            let position: HashMap<&str, usize> = t
                .steps
                .iter()
                .enumerate()
                .map(|(i, s)| (s.name.as_str(), i))
                .collect();
            let mut from_ids: Vec<i64> = Vec::new();
            let mut to_ids: Vec<i64> = Vec::new();
            for (i, s) in t.steps.iter().enumerate() {
                let Some(to) = step_ids[i] else { continue };
                for d in &s.depends_on {
                    if let Some(from) = position.get(d.as_str()).and_then(|&p| step_ids[p]) {
                        from_ids.push(from);
                        to_ids.push(to);
                    }
                }
            }
            if !from_ids.is_empty() {
                with_write_plan(
                    client,
                    "create_task_edges",
                    schema.as_str(),
                    &[INT8ARRAY, INT8ARRAY],
                    || {
                        format!(
                            "INSERT INTO {q}.tasker_workflow_step_edges (from_step_id, to_step_id, name, created_at, updated_at)
                             SELECT e.from_step_id, e.to_step_id, 'provides', {NOW}, {NOW}
                             FROM unnest($1::bigint[], $2::bigint[]) AS e(from_step_id, to_step_id)"
                        )
                    },
                    |stmt| {
                        client.select(stmt, None, &[from_ids.clone().into(), to_ids.clone().into()])?;
                        Ok(())
                    },
                )
                .map_err(spi)?;
            }
        }
        for (event, payload) in [
            (
                "task.initialize_requested",
                json!({ "template": t.full_name(), "step_count": t.steps.len() }),
            ),
            (
                "observability.task.enqueue",
                json!({ "template": t.full_name() }),
            ),
        ] {
            events::emit(
                client,
                &NewEvent {
                    name: event,
                    task_id: Some(task_id),
                    step_id: None,
                    from_state: None,
                    to_state: Some("pending"),
                    payload,
                },
            )
            .map_err(spi)?;
        }
        super::worker::wake(client, task_id, &t.namespace).map_err(spi)?;
        Ok((task_id, true))
    })
}

/// Inserts a new task's steps and edges and their maintained rows (`step_state`), all in one
/// statement, the tracking triggers skipped (`store::maintenance`): the step ids are taken from
/// the steps' sequence first, so each step's parents and children are known before anything is
/// written. `kept` holds (template position, named step id) of the steps to create, in
/// template order. Two statements whatever the number of steps and edges.
fn insert_steps_direct(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    task_id: i64,
    t: &TaskTemplate,
    kept: &[(usize, i32)],
    namespace_id: i64,
    context: &Value,
) -> Result<(), TaskerError> {
    let q = schema.quoted();
    let ids: Vec<i64> = with_write_plan(
        client,
        "create_task_step_ids",
        schema.as_str(),
        &[INT4],
        || {
            format!(
                "SELECT nextval(pg_catalog.pg_get_serial_sequence('{}', 'workflow_step_id'))
                 FROM generate_series(1, $1)",
                format!("{q}.tasker_workflow_steps").replace('\'', "''")
            )
        },
        |stmt| {
            let mut out = Vec::with_capacity(kept.len());
            for row in client.select(stmt, None, &[(kept.len() as i32).into()])? {
                out.push(row.get::<i64>(1)?.unwrap_or_default());
            }
            Ok(out)
        },
    )
    .map_err(spi)?;
    let mut id_at: Vec<Option<i64>> = vec![None; t.steps.len()];
    for (&(i, _), &id) in kept.iter().zip(&ids) {
        id_at[i] = Some(id);
    }
    let position: HashMap<&str, usize> = t
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    let mut parents: Vec<Vec<i64>> = vec![Vec::new(); t.steps.len()];
    let mut children: Vec<Vec<i64>> = vec![Vec::new(); t.steps.len()];
    let (mut from_ids, mut to_ids) = (Vec::new(), Vec::new());
    for (i, s) in t.steps.iter().enumerate() {
        let Some(to) = id_at[i] else { continue };
        for d in &s.depends_on {
            if let Some(&p) = position.get(d.as_str()) {
                if let Some(from) = id_at[p] {
                    from_ids.push(from);
                    to_ids.push(to);
                    parents[i].push(from);
                    children[p].push(to);
                }
            }
        }
    }
    let array = |v: &mut Vec<i64>| {
        v.sort_unstable();
        let items: Vec<String> = v.iter().map(i64::to_string).collect();
        format!("{{{}}}", items.join(","))
    };
    let mut parent_lits = Vec::with_capacity(kept.len());
    let mut child_lits = Vec::with_capacity(kept.len());
    for &(i, _) in kept {
        parent_lits.push(array(&mut parents[i]));
        child_lits.push(array(&mut children[i]));
    }
    let named_ids: Vec<i32> = kept.iter().map(|&(_, id)| id).collect();
    let names: Vec<String> = kept.iter().map(|&(i, _)| t.steps[i].name.clone()).collect();
    let retryable: Vec<bool> = kept
        .iter()
        .map(|&(i, _)| t.steps[i].default_retryable)
        .collect();
    let limits: Vec<i32> = kept
        .iter()
        .map(|&(i, _)| t.steps[i].default_retry_limit)
        .collect();
    let skippable: Vec<bool> = kept.iter().map(|&(i, _)| t.steps[i].skippable).collect();
    let _direct = super::maintenance::Direct::begin();
    with_write_plan(
        client,
        "create_task_steps_direct",
        schema.as_str(),
        &[INT8, INT8ARRAY, INT4ARRAY, BOOLARRAY, INT4ARRAY, BOOLARRAY, JSONB, TEXTARRAY, TEXTARRAY,
          TEXTARRAY, INT8, INT8ARRAY, INT8ARRAY],
        || {
            format!(
                "WITH s AS MATERIALIZED (
                     SELECT * FROM unnest($2::bigint[], $3::integer[], $4::boolean[], $5::integer[],
                                          $6::boolean[], $8::text[], $9::text[], $10::text[])
                         WITH ORDINALITY AS s(id, named_step_id, retryable, retry_limit, skippable,
                                              name, parents, children, pos)),
                 steps AS (
                     INSERT INTO {q}.tasker_workflow_steps (workflow_step_id, task_id, named_step_id,
                         retryable, retry_limit, in_process, processed, attempts, inputs, results,
                         skippable, created_at, updated_at)
                     SELECT s.id, $1, s.named_step_id, s.retryable, s.retry_limit, false, false, 0, $7,
                            '{{}}', s.skippable, {NOW}, {NOW}
                     FROM s ORDER BY s.pos),
                 states AS (
                     INSERT INTO tasker_core.step_state (workflow_step_id, task_id, named_step_id, name,
                         transition_count, parent_ids, child_ids, blocked_parents, retryable,
                         retry_limit, in_process, processed, attempts, created_at, namespace_id)
                     SELECT s.id, $1, s.named_step_id, s.name, 0, s.parents::bigint[],
                            s.children::bigint[], cardinality(s.parents::bigint[]), s.retryable,
                            s.retry_limit, false, false, 0, {NOW}, $11
                     FROM s)
                 INSERT INTO {q}.tasker_workflow_step_edges (from_step_id, to_step_id, name, created_at, updated_at)
                 SELECT e.from_step_id, e.to_step_id, 'provides', {NOW}, {NOW}
                 FROM unnest($12::bigint[], $13::bigint[]) AS e(from_step_id, to_step_id)"
            )
        },
        |stmt| {
            client.select(
                stmt,
                None,
                &[
                    task_id.into(),
                    ids.clone().into(),
                    named_ids.into(),
                    retryable.into(),
                    limits.into(),
                    skippable.into(),
                    JsonB(context.clone()).into(),
                    names.into(),
                    parent_lits.into(),
                    child_lits.into(),
                    namespace_id.into(),
                    from_ids.into(),
                    to_ids.into(),
                ],
            )?;
            Ok(())
        },
    )
    .map_err(spi)
}

/// What a task's idempotency identity hashes: the namespace and the task name, each
/// prefixed by its length in bytes, then the key. Length prefixes make the encoding
/// unambiguous whatever the names hold; keys span the versions of a template, as before.
fn identity_input(namespace: &str, name: &str, key: &str) -> String {
    format!("{}:{namespace}{}:{name}{key}", namespace.len(), name.len())
}

/// The SQL expression of a task's idempotency identity (`tasker_tasks.identity_hash`):
/// `idempotency:` and the hex SHA-256 of [`identity_input`] in UTF-8; NULL for a NULL input.
fn identity_sql(input: &str) -> String {
    format!(
        "('idempotency:' || pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to({input}::text, 'UTF8')), 'hex'))"
    )
}

/// The task that `key` was given to before 0.4.0, if any. Identities then hashed
/// `namespace \x1f name \x1f key` (FNV-1a, 128 bits), which names containing `\x1f` made
/// ambiguous, and the key is not stored, so an upgrade cannot recompute them: create_task
/// looks them up as they are, among the tasks of the same namespace and name only, so a key
/// used before the upgrade still returns its task and no other template's task can answer.
fn legacy_keyed_task(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    named_task_id: i32,
    namespace: &str,
    name: &str,
    key: &str,
) -> Result<Option<i64>, TaskerError> {
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for b in format!("{namespace}\u{1f}{name}\u{1f}{key}").bytes() {
        h ^= b as u128;
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    let legacy = format!("idempotency:{h:032x}");
    let q = schema.quoted();
    with_plan(
        client,
        "task_by_legacy_identity",
        schema.as_str(),
        &[TEXT, INT4],
        || {
            format!(
                "SELECT t.task_id FROM {q}.tasker_tasks t
                 JOIN {q}.tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
                 JOIN {q}.tasker_named_tasks mine ON mine.task_namespace_id = nt.task_namespace_id
                                                 AND mine.name = nt.name
                 WHERE t.identity_hash = $1 AND mine.named_task_id = $2"
            )
        },
        |stmt| {
            let table = client.select(
                stmt,
                Some(1),
                &[legacy.as_str().into(), named_task_id.into()],
            )?;
            if table.is_empty() {
                Ok(None)
            } else {
                table.first().get_one::<i64>()
            }
        },
    )
    .map_err(spi)
}
