//! Finding a stored template: the version chosen, its configuration read, and the backend's
//! cache of parsed templates for task creation.

use crate::core::error::TaskerError;
use crate::core::ident::SchemaName;
use crate::core::template::{self, TaskTemplate};
use crate::store::plans::{all_rows, one_value, with_plan, INT4, TEXT};
use crate::store::spi;
use pgrx::spi::SpiClient;
use serde_json::Value;
use std::collections::HashMap;

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

/// A template as callers name it: namespace, name and version (`None`: the latest).
#[derive(Clone, Copy, Debug)]
pub struct TemplateRef<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub version: Option<&'a str>,
}

/// The version asked for, or the highest one (by [`template::version_key`]) when `version` is
/// `None`; TK007 when there is none. Only named tasks registered with step templates are
/// templates. No configuration is read: a configuration written by others past the JSON
/// nesting limit is an error (TK026) once its version is chosen, never a reason to pick
/// another version.
fn registered(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    wanted: TemplateRef<'_>,
) -> Result<Registered, TaskerError> {
    let TemplateRef { namespace, name, version } = wanted;
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
            all_rows(client, stmt, &[namespace.into(), name.into()], |row| {
                Ok(Registered {
                    named_task_id: row.get::<i32>(1)?.unwrap_or_default(),
                    version: row.get::<String>(2)?.unwrap_or_default(),
                    namespace_id: row.get::<i64>(3)?.unwrap_or_default(),
                    row_version: row.get::<String>(4)?.unwrap_or_default(),
                })
            })
        },
    )
    .map_err(spi)?;
    let chosen = match version {
        Some(v) => rows.into_iter().find(|r| r.version == v),
        None => rows.into_iter().max_by_key(|r| template::version_key(&r.version)),
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
        |stmt| one_value::<String>(client, stmt, &[named_task_id.into()]),
    )
    .map_err(spi)?;
    crate::core::json::parse("stored template configuration", raw.as_deref().unwrap_or("{}"))
}

pub fn find(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    wanted: TemplateRef<'_>,
) -> Result<Stored, TaskerError> {
    let Registered { named_task_id, version, .. } = registered(client, schema, wanted)?;
    Ok(Stored { named_task_id, config: configuration(client, schema, named_task_id)?, version })
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
    wanted: TemplateRef<'_>,
) -> Result<ForCreation, TaskerError> {
    let chosen = registered(client, schema, wanted)?;
    let key = (schema.as_str().to_owned(), chosen.named_task_id);
    let cached = PARSED.with(|c| {
        c.borrow().get(&key).filter(|(v, _)| *v == chosen.row_version).map(|(_, t)| t.clone())
    });
    let template = match cached {
        Some(t) => t,
        None => {
            let config = configuration(client, schema, chosen.named_task_id)?;
            let parsed =
                TaskTemplate::parse_stored(&config).map_err(|e| TaskerError::Internal {
                    context: format!(
                        "stored template {}.{}@{} is invalid: {e}",
                        wanted.namespace, wanted.name, chosen.version
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
