//! Writing a template into the Rails tables: the namespace, named task, dependent systems,
//! named steps and named_tasks_named_steps rows, and the template JSON.

use crate::core::error::TaskerError;
use crate::core::ident::SchemaName;
use crate::core::template::TaskTemplate;
use crate::store::plans::{
    all_rows, with_write_plan, BOOLARRAY, INT4, INT4ARRAY, JSONB, NOW, TEXT, TEXTARRAY,
};
use crate::store::{internal, spi};
use pgrx::spi::Spi;
use pgrx::JsonB;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};

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
                    let mut step = json!({
                        "name": s.name,
                        "description": s.description,
                        "dependent_system": s.dependent_system,
                        "handler_class": s.handler_class,
                        "handler_config": s.handler_config,
                        "default_retryable": s.default_retryable,
                        "default_retry_limit": s.default_retry_limit,
                        "skippable": s.skippable,
                        "depends_on_steps": s.depends_on,
                    });
                    // a dynamic step's condition, map and skip_with, as parsed
                    if let (Some(rule), Value::Object(step)) = (&s.rule, &mut step) {
                        if let Value::Object(fields) = rule.to_json() {
                            step.extend(fields);
                        }
                    }
                    step
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
        crate::store::schema::require_installed_cached(client, schema)?;
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
        .ok_or_else(|| internal("registering a template returned no named task"))?;
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
                all_rows(client, stmt, &[systems.clone().into()], |row| {
                    Ok((
                        row.get::<String>(1)?.unwrap_or_default(),
                        row.get::<i32>(2)?.unwrap_or_default(),
                    ))
                })
            },
        )
        .map_err(spi)?;
        let step_systems: Vec<i32> = t
            .steps
            .iter()
            .map(|s| {
                system_ids.get(&s.dependent_system).copied().ok_or_else(|| {
                    internal(format!("dependent system {:?} was not stored", s.dependent_system))
                })
            })
            .collect::<Result<_, _>>()?;
        // named step id by (dependent system id, name)
        let named_step_ids: HashMap<(i32, String), i32> = with_write_plan(
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
                let args = [step_systems.clone().into(), names.clone().into(), descriptions.clone().into()];
                all_rows(client, stmt, &args, |row| {
                    let system = row.get::<i32>(1)?.unwrap_or_default();
                    let name = row.get::<String>(2)?.unwrap_or_default();
                    Ok(((system, name), row.get::<i32>(3)?.unwrap_or_default()))
                })
            },
        )
        .map_err(spi)?;
        let step_ids: Vec<i32> = t
            .steps
            .iter()
            .zip(&step_systems)
            .map(|(s, system)| {
                named_step_ids
                    .get(&(*system, s.name.clone()))
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
