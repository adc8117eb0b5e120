//! Task templates in the Rails tables (namespaces, named tasks, dependent systems, named steps,
//! named_tasks_named_steps, the template JSON in `tasker_named_tasks.configuration`), and task
//! creation from them.

use super::events::{self, NewEvent};
use super::plans::{
    with_plan, with_write_plan, BOOLARRAY, INT4, INT4ARRAY, INT8, JSONB, NOW, TEXT, TEXTARRAY,
};
use crate::core::error::TaskerError;
use crate::core::ident::SchemaName;
use crate::core::template::{self, TaskTemplate};
use pgrx::spi::{Spi, SpiClient};
use pgrx::JsonB;
use serde_json::{json, Value};

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
    let names: Vec<String> = t.steps.iter().map(|s| s.name.clone()).collect();
    let systems: Vec<String> = t.steps.iter().map(|s| s.dependent_system.clone()).collect();
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
        with_write_plan(
            client,
            "register_steps",
            schema.as_str(),
            &[INT4, TEXTARRAY, TEXTARRAY, TEXTARRAY, BOOLARRAY, INT4ARRAY, BOOLARRAY],
            || {
                format!(
                    "WITH s AS (
                         SELECT * FROM unnest($2::text[], $3::text[], $4::text[], $5::boolean[], $6::integer[], $7::boolean[])
                             AS s(name, system, description, retryable, retry_limit, skippable)),
                     sys AS (
                         INSERT INTO {q}.tasker_dependent_systems (name, created_at, updated_at)
                         SELECT DISTINCT s.system, {NOW}, {NOW} FROM s
                         ON CONFLICT (name) DO UPDATE SET name = excluded.name
                         RETURNING dependent_system_id, name),
                     steps AS (
                         INSERT INTO {q}.tasker_named_steps (dependent_system_id, name, description, created_at, updated_at)
                         SELECT sys.dependent_system_id, s.name, s.description, {NOW}, {NOW}
                         FROM s JOIN sys ON sys.name = s.system
                         ON CONFLICT (dependent_system_id, name) DO UPDATE SET name = excluded.name
                         RETURNING named_step_id, dependent_system_id, name)
                     INSERT INTO {q}.tasker_named_tasks_named_steps
                         (named_task_id, named_step_id, skippable, default_retryable, default_retry_limit, created_at, updated_at)
                     SELECT $1, steps.named_step_id, s.skippable, s.retryable, s.retry_limit, {NOW}, {NOW}
                     FROM s JOIN sys ON sys.name = s.system
                     JOIN steps ON steps.dependent_system_id = sys.dependent_system_id AND steps.name = s.name
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
                        names.clone().into(),
                        systems.clone().into(),
                        descriptions.clone().into(),
                        retryable.clone().into(),
                        limits.clone().into(),
                        skippable.clone().into(),
                    ],
                )?;
                Ok(())
            },
        )
        .map_err(spi)?;
        // Steps the template no longer declares leave the task's step list.
        with_write_plan(
            client,
            "register_prune_steps",
            schema.as_str(),
            &[INT4, TEXTARRAY, TEXTARRAY],
            || {
                format!(
                    "DELETE FROM {q}.tasker_named_tasks_named_steps x
                     WHERE x.named_task_id = $1
                       AND NOT EXISTS (
                           SELECT 1 FROM unnest($2::text[], $3::text[]) AS s(name, system)
                           JOIN {q}.tasker_dependent_systems ds ON ds.name = s.system
                           JOIN {q}.tasker_named_steps ns
                             ON ns.dependent_system_id = ds.dependent_system_id AND ns.name = s.name
                           WHERE ns.named_step_id = x.named_step_id)"
                )
            },
            |stmt| {
                client.select(
                    stmt,
                    None,
                    &[named_task_id.into(), names.into(), systems.into()],
                )?;
                Ok(())
            },
        )
        .map_err(spi)?;
        Ok(named_task_id)
    })
}

/// A stored template, found by namespace, name and version (latest when `None`).
pub struct Stored {
    pub named_task_id: i32,
    pub version: String,
    pub config: Value,
}

pub fn find(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    namespace: &str,
    name: &str,
    version: Option<&str>,
) -> Result<Stored, TaskerError> {
    let q = schema.quoted();
    let rows: Vec<(i32, String, Option<String>)> = with_plan(
        client,
        "find_templates",
        schema.as_str(),
        &[TEXT, TEXT],
        || {
            format!(
                "SELECT nt.named_task_id, nt.version::text, nt.configuration::text
                 FROM {q}.tasker_named_tasks nt
                 JOIN {q}.tasker_task_namespaces tn ON tn.task_namespace_id = nt.task_namespace_id
                 WHERE tn.name = $1 AND nt.name = $2"
            )
        },
        |stmt| {
            let mut out = Vec::new();
            for row in client.select(stmt, None, &[namespace.into(), name.into()])? {
                out.push((
                    row.get::<i32>(1)?.unwrap_or_default(),
                    row.get::<String>(2)?.unwrap_or_default(),
                    row.get::<String>(3)?,
                ));
            }
            Ok(out)
        },
    )
    .map_err(spi)?;
    let unknown = || TaskerError::UnknownTemplate {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        version: version.map(str::to_owned),
    };
    // Only named tasks registered with step templates are templates (a configuration written
    // by others and nested past the JSON limit is not one: registration refuses those).
    let mut candidates: Vec<(i32, String, Value)> = rows
        .into_iter()
        .filter_map(|(id, v, c)| {
            let c = crate::core::json::parse("configuration", c.as_deref()?).ok()?;
            c.get("step_templates")
                .is_some_and(Value::is_array)
                .then_some((id, v, c))
        })
        .collect();
    let chosen = match version {
        Some(v) => candidates.into_iter().find(|(_, cv, _)| cv == v),
        None => {
            candidates.sort_by_key(|(_, v, _)| template::version_key(v));
            candidates.pop()
        }
    };
    chosen
        .map(|(named_task_id, version, config)| Stored {
            named_task_id,
            version,
            config,
        })
        .ok_or_else(unknown)
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
        let stored = find(client, schema, namespace, name, version)?;
        let t = TaskTemplate::parse_stored(&stored.config).map_err(|e| TaskerError::Internal {
            context: format!(
                "stored template {namespace}.{name}@{} is invalid: {e}",
                stored.version
            ),
        })?;
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
        let names: Vec<String> = t.steps.iter().map(|s| s.name.clone()).collect();
        let systems: Vec<String> = t.steps.iter().map(|s| s.dependent_system.clone()).collect();
        let retryable: Vec<bool> = t.steps.iter().map(|s| s.default_retryable).collect();
        let limits: Vec<i32> = t.steps.iter().map(|s| s.default_retry_limit).collect();
        let skippable: Vec<bool> = t.steps.iter().map(|s| s.skippable).collect();
        let mut from_idx: Vec<i32> = Vec::new();
        let mut to_idx: Vec<i32> = Vec::new();
        let position: std::collections::HashMap<&str, i32> = t
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i as i32 + 1))
            .collect();
        for (i, s) in t.steps.iter().enumerate() {
            for d in &s.depends_on {
                from_idx.push(position[d.as_str()]);
                to_idx.push(i as i32 + 1);
            }
        }
        with_write_plan(
            client,
            "create_steps",
            schema.as_str(),
            &[INT8, TEXTARRAY, TEXTARRAY, BOOLARRAY, INT4ARRAY, BOOLARRAY, JSONB, INT4ARRAY, INT4ARRAY],
            || {
                format!(
                    "WITH s AS (
                         SELECT * FROM unnest($2::text[], $3::text[], $4::boolean[], $5::integer[], $6::boolean[])
                             WITH ORDINALITY AS s(name, system, retryable, retry_limit, skippable, pos)),
                     ins AS (
                         INSERT INTO {q}.tasker_workflow_steps (task_id, named_step_id, retryable, retry_limit,
                             in_process, processed, attempts, inputs, results, skippable, created_at, updated_at)
                         SELECT $1, ns.named_step_id, s.retryable, s.retry_limit, false, false, 0, $7, '{{}}',
                                s.skippable, {NOW}, {NOW}
                         FROM s
                         JOIN {q}.tasker_dependent_systems ds ON ds.name = s.system
                         JOIN {q}.tasker_named_steps ns ON ns.dependent_system_id = ds.dependent_system_id AND ns.name = s.name
                         ORDER BY s.pos
                         RETURNING workflow_step_id, named_step_id),
                     ids AS (
                         SELECT s.pos, ins.workflow_step_id
                         FROM s
                         JOIN {q}.tasker_dependent_systems ds ON ds.name = s.system
                         JOIN {q}.tasker_named_steps ns ON ns.dependent_system_id = ds.dependent_system_id AND ns.name = s.name
                         JOIN ins ON ins.named_step_id = ns.named_step_id)
                     INSERT INTO {q}.tasker_workflow_step_edges (from_step_id, to_step_id, name, created_at, updated_at)
                     SELECT f.workflow_step_id, c.workflow_step_id, 'provides', {NOW}, {NOW}
                     FROM unnest($8::integer[], $9::integer[]) AS e(from_pos, to_pos)
                     JOIN ids f ON f.pos = e.from_pos
                     JOIN ids c ON c.pos = e.to_pos"
                )
            },
            |stmt| {
                client.select(
                    stmt,
                    None,
                    &[
                        task_id.into(),
                        names.clone().into(),
                        systems.clone().into(),
                        retryable.clone().into(),
                        limits.clone().into(),
                        skippable.clone().into(),
                        JsonB(context.clone()).into(),
                        from_idx.clone().into(),
                        to_idx.clone().into(),
                    ],
                )?;
                Ok(())
            },
        )
        .map_err(spi)?;
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
