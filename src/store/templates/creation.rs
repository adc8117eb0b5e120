//! Task creation from a template: the task, its steps and edges, and their events.

use super::idempotency::{identity_input, identity_sql, legacy_keyed_task};
use super::lookup::{find_for_creation, TemplateRef};
use crate::core::dynamic::MapProblem;
use crate::core::error::TaskerError;
use crate::core::ident::SchemaName;
use crate::core::options::Start;
use crate::core::template::{self, TaskTemplate};
use crate::store::events::{self, NewEvent};
use crate::store::plans::{
    all_rows, one_value, with_write_plan, BOOLARRAY, FLOAT8, INT4, INT4ARRAY, INT8, INT8ARRAY,
    JSONB, NOW, TEXT, TEXTARRAY,
};
use crate::store::{internal, spi};
use pgrx::spi::{Spi, SpiClient};
use pgrx::JsonB;
use serde_json::{json, Value};
use std::collections::HashMap;

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
    /// Higher is claimed first; 0 by default.
    pub priority: i32,
    /// When the task's root steps may start; `None`: at once.
    pub start: Option<Start>,
}

/// Creates a task from a template: the task, its steps and edges, in one statement per table.
/// Returns `(task_id, created)`; with an idempotency key already used, the existing task.
pub fn create_task(
    schema: &SchemaName,
    wanted: TemplateRef<'_>,
    context: &Value,
    options: &TaskOptions,
) -> Result<(i64, bool), TaskerError> {
    for (argument, value) in [("namespace", wanted.namespace), ("name", wanted.name)] {
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
        crate::store::schema::require_installed_cached(client, schema)?;
        let stored = find_for_creation(client, schema, wanted)?;
        let t = &*stored.template;
        if let Some(s) = &t.schema {
            let violations = crate::core::jsonschema::validate(s, context, 10);
            if !violations.is_empty() {
                return Err(TaskerError::ContextInvalid { template: t.full_name(), violations });
            }
        }
        if t.is_dynamic() {
            check_dynamic(t, context)?;
        }
        let key = options.idempotency_key.as_deref();
        // the idempotency identity's input: namespace and name length-prefixed, then the key
        let keyed = key.map(|k| identity_input(wanted.namespace, wanted.name, k));
        if let Some(k) = key {
            if let Some(existing) = legacy_keyed_task(
                client,
                schema,
                stored.named_task_id,
                wanted.namespace,
                wanted.name,
                k,
            )? {
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
                one_value::<i64>(
                    client,
                    stmt,
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
                )
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
                |stmt| one_value::<i64>(client, stmt, &[keyed.as_deref().into()]),
            )
            .map_err(spi)?
            .ok_or_else(|| internal("idempotency key conflicted but no task holds it"))?;
            return Ok((existing, false));
        };
        if let Some(traceparent) = &options.traceparent {
            if !crate::store::events::traces_installed() {
                return Err(TaskerError::InvalidArgument {
                    argument: "options",
                    reason: "traceparent needs the SQL of this version: run ALTER EXTENSION tasker_core UPDATE"
                        .into(),
                });
            }
            // first, so that every event and transition of the task carries it
            crate::store::events::record_trace(client, task_id, traceparent).map_err(spi)?;
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
        let kept: Vec<(usize, i32)> =
            named.iter().enumerate().filter_map(|(i, id)| id.map(|id| (i, id))).collect();
        let direct = crate::store::maintenance::installed()
            && crate::store::facts::is_tracked(client, schema).map_err(spi)?;
        if t.is_dynamic() && !direct {
            return Err(TaskerError::TrackingDisabled { schema: schema.as_str().to_owned() });
        }
        let mut id_at: Vec<Option<i64>> = Vec::new();
        if direct {
            id_at = insert_steps_direct(
                client,
                schema,
                task_id,
                t,
                &kept,
                stored.namespace_id,
                context,
            )?;
        } else {
            let StepColumns { named_ids, retryable, limits, skippable, .. } =
                StepColumns::of(t, &kept);
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
                    let args = [
                        task_id.into(),
                        named_ids.into(),
                        retryable.into(),
                        limits.into(),
                        skippable.into(),
                        JsonB(context.clone()).into(),
                    ];
                    all_rows(client, stmt, &args, |row| {
                        let named = row.get::<i32>(1)?.unwrap_or_default();
                        Ok((named, row.get::<i64>(2)?.unwrap_or_default()))
                    })
                },
            )
            .map_err(spi)?;
            // workflow step id by template position
            let mut step_ids: Vec<Option<i64>> = vec![None; t.steps.len()];
            for &(i, named_id) in &kept {
                step_ids[i] = by_named.get(&named_id).copied();
            }
            let (from_ids, to_ids): (Vec<i64>, Vec<i64>) = edge_positions(t, &step_ids)
                .into_iter()
                .filter_map(|(p, c)| Some((step_ids[p]?, step_ids[c]?)))
                .unzip();
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
            ("observability.task.enqueue", json!({ "template": t.full_name() })),
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
        // the template's concurrency key: "namespace.name:" and the context's value there
        let key = t.concurrency.as_ref().and_then(|c| {
            c.value_of(context).map(|v| (format!("{}.{}:{v}", t.namespace, t.name), c.limit))
        });
        let scheduled = if options.priority != 0 || options.start.is_some() || key.is_some() {
            set_options(client, task_id, options, key)?
        } else {
            false
        };
        if t.is_dynamic() {
            use crate::store::worker::dynamic;
            let rules: Vec<(i64, &crate::core::dynamic::StepRule)> = t
                .steps
                .iter()
                .zip(&id_at)
                .filter_map(|(s, id)| Some(((*id)?, s.rule.as_ref()?)))
                .collect();
            dynamic::record(client, task_id, &rules)?;
            // root steps are judged now: a condition on the context, a map over it; when any
            // was, the task may already be finished (every step skipped or an empty map) or
            // failed (a map whose input is unusable)
            if dynamic::advance(client, schema, task_id)? > 0 {
                crate::store::worker::finalize(client, schema, task_id)?;
            }
        }
        if !scheduled {
            crate::store::worker::wake(client, task_id, &t.namespace, None).map_err(spi)?;
        }
        Ok((task_id, true))
    })
}

/// What a template with dynamic steps needs before a task is created from it: the SQL of
/// this version, and an array within the limit for each map over the context (a map step with
/// a condition is checked when it is judged instead: the condition may skip it).
fn check_dynamic(t: &TaskTemplate, context: &Value) -> Result<(), TaskerError> {
    if !crate::store::worker::dynamic::installed() {
        return Err(TaskerError::InvalidArgument {
            argument: "template",
            reason: "conditions, maps and skip_with need the SQL of this version: run ALTER EXTENSION tasker_core UPDATE"
                .into(),
        });
    }
    let max = crate::store::settings::MAX_MAP_ELEMENTS.get().max(0) as usize;
    for s in &t.steps {
        let Some(rule) = s.rule.as_ref().filter(|r| r.condition.is_none()) else {
            continue;
        };
        match rule.check_context(context, max) {
            Ok(()) => {}
            Err(MapProblem::NotAnArray { found }) => {
                return Err(TaskerError::ContextInvalid {
                    template: t.full_name(),
                    violations: vec![format!(
                        "step {:?} maps over {}, which holds {found}, not an array",
                        s.name,
                        rule.map.as_deref().unwrap_or_default()
                    )],
                })
            }
            Err(MapProblem::TooMany { count }) => {
                return Err(TaskerError::LimitExceeded {
                    what: "elements in a map step's input (tasker_core.max_map_elements)",
                    limit: max as i64,
                    actual: count as i64,
                })
            }
        }
    }
    Ok(())
}

/// Records a new task's priority and scheduled start (`tasker_core.task_options`) and gives
/// its maintained rows the priority, and its root steps the start when it is later than now.
/// Returns whether the task is scheduled for later (no worker is woken for it now: claims or
/// `tick()` promote it when it is due). A `run_at` PostgreSQL cannot read as a `timestamptz`
/// raises its own error (`22007`, `22008`), and the whole call changes nothing.
fn set_options(
    client: &SpiClient<'_>,
    task_id: i64,
    options: &TaskOptions,
    key: Option<(String, i32)>,
) -> Result<bool, TaskerError> {
    if !crate::store::worker::scheduling_installed() {
        return Err(TaskerError::InvalidArgument {
            argument: "options",
            reason: "priority, run_at, delay_seconds and templates' concurrency keys need the SQL of this version: run ALTER EXTENSION tasker_core UPDATE".into(),
        });
    }
    let (key, limit) = key.unzip();
    let (at, delay) = match &options.start {
        Some(Start::At(at)) => (Some(at.clone()), None),
        Some(Start::After(d)) => (None, Some(*d)),
        None => (None, None),
    };
    with_write_plan(
        client,
        "create_task_options",
        "",
        &[INT8, INT4, TEXT, FLOAT8, TEXT, INT4],
        || {
            format!(
                "WITH o AS (
                     INSERT INTO tasker_core.task_options (task_id, priority, run_at, concurrency_key, concurrency_limit)
                     VALUES ($1, $2, CASE WHEN $3::text IS NOT NULL THEN $3::text::timestamptz AT TIME ZONE 'UTC'
                                          WHEN $4::float8 IS NOT NULL THEN {NOW} + $4 * interval '1 second' END,
                             $5, $6)
                     RETURNING priority, CASE WHEN run_at > {NOW} THEN run_at END AS not_before),
                 g AS (
                     INSERT INTO tasker_core.concurrency_gates (key) SELECT $5 WHERE $5 IS NOT NULL
                     ON CONFLICT (key) DO NOTHING),
                 s AS (
                     UPDATE tasker_core.step_state s
                        SET priority = o.priority,
                            not_before = CASE WHEN cardinality(s.parent_ids) = 0 THEN o.not_before END
                       FROM o WHERE s.task_id = $1)
                 SELECT o.not_before IS NOT NULL FROM o"
            )
        },
        |stmt| {
            one_value::<bool>(
                client,
                stmt,
                &[
                    task_id.into(),
                    options.priority.into(),
                    at.clone().into(),
                    delay.into(),
                    key.clone().into(),
                    limit.into(),
                ],
            )
        },
    )
    .map(Option::unwrap_or_default)
    .map_err(spi)
}

/// The columns of the steps to create, in template order (`kept`: template position and named
/// step id of each).
struct StepColumns {
    named_ids: Vec<i32>,
    names: Vec<String>,
    retryable: Vec<bool>,
    limits: Vec<i32>,
    skippable: Vec<bool>,
}

impl StepColumns {
    fn of(t: &TaskTemplate, kept: &[(usize, i32)]) -> StepColumns {
        let steps = || kept.iter().map(|&(i, _)| &t.steps[i]);
        StepColumns {
            named_ids: kept.iter().map(|&(_, id)| id).collect(),
            names: steps().map(|s| s.name.clone()).collect(),
            retryable: steps().map(|s| s.default_retryable).collect(),
            limits: steps().map(|s| s.default_retry_limit).collect(),
            skippable: steps().map(|s| s.skippable).collect(),
        }
    }
}

/// The template's dependencies between steps that are created (`id_at` has their ids by
/// template position), as (parent, child) template positions.
fn edge_positions(t: &TaskTemplate, id_at: &[Option<i64>]) -> Vec<(usize, usize)> {
    let position: HashMap<&str, usize> =
        t.steps.iter().enumerate().map(|(i, s)| (s.name.as_str(), i)).collect();
    let mut out = Vec::new();
    for (c, s) in t.steps.iter().enumerate() {
        if id_at[c].is_none() {
            continue;
        }
        for d in &s.depends_on {
            if let Some(&p) = position.get(d.as_str()).filter(|&&p| id_at[p].is_some()) {
                out.push((p, c));
            }
        }
    }
    out
}

/// The SQL expression of a new workflow step id of `schema`, from the steps' own sequence.
pub fn next_step_id(schema: &SchemaName) -> String {
    let steps = format!("{}.tasker_workflow_steps", schema.quoted()).replace('\'', "''");
    format!("nextval(pg_catalog.pg_get_serial_sequence('{steps}', 'workflow_step_id'))")
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
) -> Result<Vec<Option<i64>>, TaskerError> {
    let q = schema.quoted();
    // the step ids first, from the steps' sequence
    let sql = || format!("SELECT {} FROM generate_series(1, $1)", next_step_id(schema));
    let n = kept.len() as i32;
    let ids: Vec<i64> =
        with_write_plan(client, "create_task_step_ids", schema.as_str(), &[INT4], sql, |stmt| {
            all_rows(client, stmt, &[n.into()], |row| Ok(row.get::<i64>(1)?.unwrap_or_default()))
        })
        .map_err(spi)?;
    let mut id_at: Vec<Option<i64>> = vec![None; t.steps.len()];
    for (&(i, _), &id) in kept.iter().zip(&ids) {
        id_at[i] = Some(id);
    }
    let mut parents: Vec<Vec<i64>> = vec![Vec::new(); t.steps.len()];
    let mut children: Vec<Vec<i64>> = vec![Vec::new(); t.steps.len()];
    let (mut from_ids, mut to_ids) = (Vec::new(), Vec::new());
    for (p, c) in edge_positions(t, &id_at) {
        let (Some(from), Some(to)) = (id_at[p], id_at[c]) else {
            continue;
        };
        from_ids.push(from);
        to_ids.push(to);
        parents[c].push(from);
        children[p].push(to);
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
    let StepColumns { named_ids, names, retryable, limits, skippable } = StepColumns::of(t, kept);
    let _direct = crate::store::maintenance::Direct::begin();
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
    .map_err(spi)?;
    Ok(id_at)
}
