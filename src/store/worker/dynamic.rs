//! Dynamic steps (conditions, maps, skips that cascade) at run time: a dynamic step stays out
//! of the ready queue (`step_state.not_before` is `infinity`) until every parent has finished;
//! then [`advance`], which runs in the transaction that finished the last parent (from the
//! finalizer, and at creation for root steps), judges it by its rule
//! ([`crate::core::dynamic::StepRule::decide`]): it becomes an ordinary step, is skipped
//! (`resolved_manually`, `"skipped": true`), fails (a map whose input is unusable), or — a map
//! step — expands into one step per element, which it waits for like parents; when they have
//! all finished it completes with their results in element order.
//!
//! `tasker_core.dynamic_steps` holds one row per dynamic step: its rule and its phase
//! (`waiting` to be judged, `mapped` waiting for its instances, `done`).

use super::*;
use crate::core::dynamic::{Decision, Parent, Reads, StepRule};
use crate::store::locks::try_all_locked;

/// Whether the SQL has dynamic steps (0.9.0 on).
pub fn installed() -> bool {
    super::events::own_relation(c"dynamic_steps").is_some()
}

thread_local! {
    /// Whether this transaction made a dynamic step due (its last parent finished) since the
    /// finalizer last looked: without it the finalizer does not look (no statement for tasks
    /// without dynamic steps). Writes that do not go through the library (an application's
    /// own SQL) leave it to `tick()`.
    static DUE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Notes that a dynamic step became due in this transaction (see [`advance`]).
pub fn note_due() {
    DUE.with(|d| d.set(true));
}

/// Judges the dynamic steps of `tasks` (ascending, each once), all of them before any task's
/// lock is taken (see [`super::finalize`]), then finalizes the tasks in that order. `due`:
/// only when this transaction made a dynamic step due (the worker protocol), else always.
pub(super) fn advance_and_finalize(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    tasks: &BTreeSet<i64>,
    due: bool,
) -> Result<(), TaskerError> {
    if (!due && installed()) || take_due() {
        for &task_id in tasks {
            advance(client, schema, task_id)?;
        }
    }
    for &task_id in tasks {
        super::finalize(client, schema, task_id)?;
    }
    Ok(())
}

/// Whether this transaction made a dynamic step due since [`advance`] last ran; forgets it.
pub fn take_due() -> bool {
    DUE.with(|d| d.replace(false))
}

/// [`advance`] when this transaction made a dynamic step due since it last ran (else nothing,
/// and no statement). The step is of this task: callers that finish steps of several tasks
/// advance each of them first ([`take_due`], then [`advance`]).
pub fn advance_if_due(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    task_id: i64,
) -> Result<usize, TaskerError> {
    if !take_due() {
        return Ok(0);
    }
    advance(client, schema, task_id)
}

/// Records the dynamic steps of a task being created (`steps`: each step's id and rule) and
/// keeps them out of the ready queue until they are judged.
pub(crate) fn record(
    client: &SpiClient<'_>,
    task_id: i64,
    steps: &[(i64, &StepRule)],
) -> Result<(), TaskerError> {
    let ids: Vec<i64> = steps.iter().map(|(id, _)| *id).collect();
    let rules: Vec<String> = steps.iter().map(|(_, r)| r.to_json().to_string()).collect();
    with_write_plan(
        client,
        "dynamic_record",
        "",
        &[INT8, INT8ARRAY, TEXTARRAY],
        || {
            "WITH d AS (
                 INSERT INTO tasker_core.dynamic_steps (workflow_step_id, task_id, rule)
                 SELECT r.id, $1, r.rule::jsonb FROM unnest($2::bigint[], $3::text[]) AS r(id, rule))
             UPDATE tasker_core.step_state SET not_before = 'infinity'
             WHERE workflow_step_id = ANY ($2)"
                .to_owned()
        },
        |stmt| {
            client.select(stmt, None, &[task_id.into(), ids.clone().into(), rules.clone().into()])?;
            Ok(())
        },
    )
    .map_err(spi)
}

/// Judges (or, for expanded maps, completes) every dynamic step of the task whose parents have
/// all finished, again until none is left: a skip or a completion can make further ones due.
/// Returns how many it looked at. (Callers that know a step may be due without this
/// transaction having made it so — creation, `tick()`, `retry_task()` — call it directly; the
/// finalizer calls [`advance_if_due`].)
/// Each step is handled with its rows, its children's and those of every step a cascade from
/// it may reach locked at once ([`crate::store::locks`]), never waiting for them: the callers
/// hold rows already (the step a worker finished; every step of the task in `retry_task()`;
/// steps whose leases `tick()` expired), and a wait while holding rows could close a cycle. A
/// step whose rows another transaction holds is left to `tick()`. The steps this transaction
/// made due are never left so: their rows were taken with the rows of the step that finished
/// their last parent. (A step made due by other writes may be, and the other transaction may
/// be a completion waiting for rows this one holds.) Creation's rows are new: nobody else
/// holds them.
pub fn advance(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    task_id: i64,
) -> Result<usize, TaskerError> {
    let mut judged = 0;
    // A step is due at most twice: to be judged, and (a map step) when its instances have
    // finished. A step listed again after that was left as it was by another transaction
    // (its rows read again under the locks), or its rows were another's: it is not looked
    // at again here.
    let mut visits: std::collections::HashMap<i64, u8> = std::collections::HashMap::new();
    loop {
        // (what the judgements below make due, the next round finds)
        take_due();
        let due: Vec<i64> = due_steps(client, task_id)?
            .into_iter()
            .filter(|id| {
                let n = visits.entry(*id).or_default();
                *n = n.saturating_add(1);
                *n <= 2
            })
            .collect();
        if due.is_empty() {
            return Ok(judged);
        }
        judged += due.len();
        for step_id in due {
            // (a cascade's steps of a later round are among these rows: taken again, they are
            // this transaction's already)
            let set = children_of(client, &[step_id])?.lock_set(&[step_id], &[]);
            if try_all_locked(client, schema, set, || judge(client, schema, (task_id, step_id)))?
                .is_none()
            {
                visits.insert(step_id, u8::MAX);
            }
        }
    }
}

/// Whether dynamic step `d` (its maintained row `s`) is due: not done, every parent finished,
/// and still pending (a step an operator resolved or cancelled is left alone).
const DUE_SQL: &str =
    "d.phase <> 'done' AND s.blocked_parents = 0 AND (s.state IS NULL OR s.state = 'pending')";

/// The task's dynamic steps not done whose parents have all finished, in id order.
fn due_steps(client: &SpiClient<'_>, task_id: i64) -> Result<Vec<i64>, TaskerError> {
    with_write_plan(
        client,
        "dynamic_due",
        "",
        &[INT8],
        || {
            format!(
                "SELECT d.workflow_step_id FROM tasker_core.dynamic_steps d
                 JOIN tasker_core.step_state s ON s.workflow_step_id = d.workflow_step_id
                 WHERE d.task_id = $1 AND {DUE_SQL}
                 ORDER BY d.workflow_step_id"
            )
        },
        |stmt| {
            all_rows(client, stmt, &[task_id.into()], |r| Ok(r.get::<i64>(1)?.unwrap_or_default()))
        },
    )
    .map_err(spi)
}

/// Runs kept statement `key` of the data schema (`sql` gets its quoted name) with the step id
/// as `$1`, and `read` on its rows.
fn per_step<R>(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    (key, step_id): (&'static str, i64),
    sql: impl FnOnce(&str) -> String,
    read: impl FnOnce(&pgrx::spi::OwnedPreparedStatement, i64) -> SpiResult<R>,
) -> Result<R, TaskerError> {
    let q = schema.quoted();
    with_write_plan(client, key, schema.as_str(), &[INT8], || sql(&q), |stmt| read(stmt, step_id))
        .map_err(spi)
}

/// One due step, its rows locked: read again (another transaction may have judged it since
/// it was listed), then judged.
fn judge(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    (task_id, step_id): (i64, i64),
) -> Result<(), TaskerError> {
    let row: Option<(Value, String, bool)> = per_step(
        client,
        schema,
        ("dynamic_judge", step_id),
        |q| {
            format!(
                "SELECT d.rule, d.phase,
                        -- (judged before and run by a worker: retry_task sent it back)
                        EXISTS (SELECT 1 FROM {q}.tasker_workflow_step_transitions tr
                                WHERE tr.workflow_step_id = d.workflow_step_id
                                  AND tr.to_state = 'in_progress')
                 FROM tasker_core.dynamic_steps d
                 JOIN tasker_core.step_state s ON s.workflow_step_id = d.workflow_step_id
                 WHERE d.workflow_step_id = $1 AND {DUE_SQL}
                 FOR UPDATE OF d"
            )
        },
        |stmt, id| {
            one_row(client, stmt, &[id.into()], |r| {
                Ok((
                    r.get::<JsonB>(1)?.map(|j| j.0).unwrap_or_default(),
                    r.get::<String>(2)?.unwrap_or_default(),
                    r.get::<bool>(3)?.unwrap_or_default(),
                ))
            })
        },
    )?;
    let Some((rule, phase, ran)) = row else {
        return Ok(());
    };
    if phase == "mapped" {
        return complete_map(client, schema, step_id);
    }
    if ran {
        // retry_task sends every failed dynamic step back to be judged, for the steps that
        // failed when they were judged (which go pending -> error, never in_progress); one that
        // was judged to run and failed in a worker's hands runs again, as a retried ordinary
        // step does (its condition is not judged a second time). (A step an application moved
        // to in_progress itself before it was judged is taken as run the same way.)
        return finish(client, step_id, false);
    }
    let rule = StepRule::from_json(&rule)?;
    let (context, parents) = match read_inputs(client, schema, (task_id, step_id), &rule)? {
        Ok(inputs) => inputs,
        Err(message) => return fail_judged(client, schema, step_id, &message, "TK026"),
    };
    let views: Vec<Parent<'_>> = parents
        .iter()
        .map(|(name, results, skipped)| Parent {
            name,
            results: results.as_ref(),
            skipped: *skipped,
        })
        .collect();
    let max = crate::store::settings::MAX_MAP_ELEMENTS.get().max(0) as usize;
    match rule.decide(&context, &views, max) {
        Decision::Run => finish(client, step_id, false),
        Decision::Skip(reason) => {
            let meta = JsonB(json!({ "skipped": true, "reason": reason }));
            transition(
                schema,
                Step,
                step_id,
                State::ResolvedManually,
                &meta,
                Some(State::Pending),
            )?;
            record_results(client, schema, step_id, &Value::Null)?;
            finish(client, step_id, true)?;
            emit(client, "step.skipped", task_id, Some(step_id), json!({ "reason": reason }))
        }
        Decision::Expand([]) => complete_map(client, schema, step_id),
        Decision::Expand(items) => expand(client, schema, task_id, step_id, items),
        Decision::Fail { message, limit } => {
            fail_judged(client, schema, step_id, &message, if limit { "54000" } else { "TK025" })
        }
    }
}

/// A finished parent: its name, its results (read only when the rule reads them) and whether
/// it was skipped.
type ParentInputs = Vec<(String, Option<Value>, bool)>;

/// The expression of `doc` trimmed to what a rule reads: all of it when `$whole` (or it is no
/// object), else an object of just the members named in `keys` it has.
fn trimmed(doc: &str, whole: &str, keys: &str) -> String {
    format!(
        "CASE WHEN {doc} IS NULL OR {whole} OR jsonb_typeof({doc}) <> 'object' THEN {doc}
              ELSE COALESCE((SELECT jsonb_object_agg(k.k, {doc} -> k.k) FROM ({keys}) AS k(k)
                             WHERE {doc} ? k.k), '{{}}') END"
    )
}

/// What the rule of a step reads, and only that: the task context trimmed to the members its
/// paths start with (`null` when none is read), and every parent with its results trimmed the
/// same way (none for a parent not read). The documents come as text and are parsed here: a
/// member serde cannot hold (nested past 128 levels, a number beyond `f64`: an application may
/// have stored one) is the inner `Err`, saying which and why — never a panic; members the rule
/// does not read may hold anything.
fn read_inputs(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    (task_id, step_id): (i64, i64),
    rule: &StepRule,
) -> Result<Result<(Value, ParentInputs), String>, TaskerError> {
    let reads = rule.reads();
    let context = match &reads.context {
        None => None,
        Some(m) => {
            let (whole, keys) = (m.whole, m.keys.clone());
            let q = schema.quoted();
            let text = with_write_plan(
                client,
                "dynamic_context",
                schema.as_str(),
                &[INT8, BOOL, TEXTARRAY],
                || {
                    let doc = trimmed("t.context", "$2", "SELECT unnest($3::text[])");
                    format!("SELECT ({doc})::text FROM {q}.tasker_tasks t WHERE t.task_id = $1")
                },
                |stmt| {
                    one_value::<String>(client, stmt, &[task_id.into(), whole.into(), keys.into()])
                },
            )
            .map_err(spi)?;
            Some(text.unwrap_or_else(|| "null".to_owned()))
        }
    };
    let parents = parent_outcomes(client, schema, step_id, &reads)?;
    let parse = |what: &str, text: &str| {
        serde_json::from_str::<Value>(text).map_err(|e| format!("{what} cannot be read: {e}"))
    };
    let parsed = || -> Result<(Value, ParentInputs), String> {
        let context = context.map_or(Ok(Value::Null), |t| parse("the task context", &t))?;
        let parents = parents
            .into_iter()
            .map(|(name, text, skipped)| {
                let results =
                    text.map(|t| parse(&format!("the results of {name}"), &t)).transpose()?;
                Ok((name, results, skipped))
            })
            .collect::<Result<_, String>>()?;
        Ok((context, parents))
    };
    Ok(parsed())
}

/// The step's parents: name, results as text trimmed to what `reads` reads of them (none for
/// a parent not read, skipped, or without results) and whether it was skipped.
fn parent_outcomes(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    step_id: i64,
    reads: &Reads,
) -> Result<Vec<(String, Option<String>, bool)>, TaskerError> {
    let whole: Vec<String> =
        reads.parents.iter().filter(|(_, m)| m.whole).map(|(n, _)| n.clone()).collect();
    let (mut names, mut keys) = (Vec::new(), Vec::new());
    for (name, m) in &reads.parents {
        for k in &m.keys {
            names.push(name.clone());
            keys.push(k.clone());
        }
    }
    let q = schema.quoted();
    with_write_plan(
        client,
        "dynamic_parents",
        schema.as_str(),
        &[INT8, TEXTARRAY, TEXTARRAY, TEXTARRAY],
        || {
            let doc = trimmed(
                "ws.results",
                "ns.name::text = ANY ($2)",
                "SELECT r.k FROM unnest($3::text[], $4::text[]) AS r(n, k) WHERE r.n = ns.name::text",
            );
            format!(
                "SELECT ns.name::text,
                        CASE WHEN NOT COALESCE(d.skipped, false)
                              AND (ns.name::text = ANY ($2) OR ns.name::text = ANY ($3))
                             THEN ({doc})::text END,
                        COALESCE(d.skipped, false)
                 FROM tasker_core.step_state s
                 CROSS JOIN LATERAL unnest(s.parent_ids) AS p(id)
                 JOIN {q}.tasker_workflow_steps ws ON ws.workflow_step_id = p.id
                 JOIN {q}.tasker_named_steps ns ON ns.named_step_id = ws.named_step_id
                 LEFT JOIN tasker_core.dynamic_steps d ON d.workflow_step_id = p.id
                 WHERE s.workflow_step_id = $1"
            )
        },
        |stmt| {
            let args = [step_id.into(), whole.clone().into(), names.clone().into(), keys.clone().into()];
            all_rows(client, stmt, &args, |r| {
                Ok((
                    r.get::<String>(1)?.unwrap_or_default(),
                    r.get::<String>(2)?,
                    r.get::<bool>(3)?.unwrap_or_default(),
                ))
            })
        },
    )
    .map_err(spi)
}

/// When a root step of task `task` (an SQL expression) may start: its task's later start, NULL
/// when it has none or it has passed (what a root's `not_before` holds once claims promoted it).
fn start_of(task: &str) -> String {
    format!(
        "(SELECT CASE WHEN o.run_at > {NOW} THEN o.run_at END
          FROM tasker_core.task_options o WHERE o.task_id = {task})"
    )
}

/// Marks a judged step done (and `skipped`) and lets the claims see it: its `not_before` goes
/// back to what an ordinary step has (a root of a task scheduled for later keeps its start).
fn finish(client: &SpiClient<'_>, step_id: i64, skipped: bool) -> Result<(), TaskerError> {
    with_write_plan(
        client,
        "dynamic_finish",
        "",
        &[INT8, BOOL],
        || {
            let start = start_of("s.task_id");
            format!(
                "WITH d AS (UPDATE tasker_core.dynamic_steps SET phase = 'done', skipped = $2
                            WHERE workflow_step_id = $1)
                 UPDATE tasker_core.step_state s
                    SET not_before = CASE WHEN cardinality(s.parent_ids) = 0 THEN {start} END
                  WHERE s.workflow_step_id = $1"
            )
        },
        |stmt| {
            client.select(stmt, None, &[step_id.into(), skipped.into()])?;
            Ok(())
        },
    )
    .map_err(spi)
}

/// Expands a map step into one step per element (in element order, ids ascending with it):
/// each a root step of the map's named step with `{"element": e, "index": i}` as its inputs and
/// an edge into the map step, which waits for them as for parents. One statement, linear in
/// the element count; the maintained rows are written with the steps (`store::maintenance`).
fn expand(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    task_id: i64,
    step_id: i64,
    items: &[Value],
) -> Result<(), TaskerError> {
    let q = schema.quoted();
    let next_id = crate::store::templates::next_step_id(schema);
    let _direct = crate::store::maintenance::Direct::begin();
    with_write_plan(
        client,
        "dynamic_expand",
        schema.as_str(),
        &[INT8, INT8, JSONB],
        || {
            let start = start_of("$1");
            format!(
                "WITH i AS MATERIALIZED (
                     SELECT {next_id} AS id,
                            e.elem, (e.ord - 1)::integer AS idx
                     -- (ids drawn in element order: the fan-in orders the results by id)
                     FROM (SELECT elem, ord FROM jsonb_array_elements($3) WITH ORDINALITY AS a(elem, ord)
                           ORDER BY ord) AS e),
                 -- (the instances' retry policy is the template's: the map step's own may
                 -- have been changed by its failure and a retry_task)
                 m AS (SELECT ws.named_step_id,
                              COALESCE(nts.default_retryable, ws.retryable) AS retryable,
                              COALESCE(nts.default_retry_limit, ws.retry_limit) AS retry_limit,
                              ws.skippable, s.name, s.namespace_id, s.priority
                       FROM {q}.tasker_workflow_steps ws
                       JOIN tasker_core.step_state s ON s.workflow_step_id = ws.workflow_step_id
                       JOIN {q}.tasker_tasks t ON t.task_id = ws.task_id
                       LEFT JOIN {q}.tasker_named_tasks_named_steps nts
                         ON nts.named_task_id = t.named_task_id AND nts.named_step_id = ws.named_step_id
                       WHERE ws.workflow_step_id = $2),
                 steps AS (
                     INSERT INTO {q}.tasker_workflow_steps (workflow_step_id, task_id, named_step_id,
                         retryable, retry_limit, in_process, processed, attempts, inputs, results,
                         skippable, created_at, updated_at)
                     SELECT i.id, $1, m.named_step_id, m.retryable, m.retry_limit, false, false, 0,
                            jsonb_build_object('element', i.elem, 'index', i.idx), '{{}}', m.skippable,
                            {NOW}, {NOW}
                     FROM i, m ORDER BY i.id),
                 states AS (
                     INSERT INTO tasker_core.step_state (workflow_step_id, task_id, named_step_id, name,
                         transition_count, parent_ids, child_ids, blocked_parents, retryable,
                         retry_limit, in_process, processed, attempts, created_at, namespace_id, priority,
                         not_before)
                     SELECT i.id, $1, m.named_step_id, m.name, 0, '{{}}', ARRAY[$2::bigint], 0,
                            m.retryable, m.retry_limit, false, false, 0, {NOW}, m.namespace_id, m.priority,
                            -- (root steps: a root map of a task scheduled for later expands at
                            -- creation, and its instances wait for the start like other roots)
                            {start}
                     FROM i, m),
                 edges AS (
                     INSERT INTO {q}.tasker_workflow_step_edges (from_step_id, to_step_id, name, created_at, updated_at)
                     SELECT i.id, $2, 'map_instance', {NOW}, {NOW} FROM i),
                 map AS (
                     UPDATE tasker_core.step_state s
                        SET parent_ids = s.parent_ids || (SELECT array_agg(i.id ORDER BY i.id) FROM i),
                            blocked_parents = s.blocked_parents + (SELECT count(*) FROM i)::integer
                      WHERE s.workflow_step_id = $2)
                 UPDATE tasker_core.dynamic_steps SET phase = 'mapped' WHERE workflow_step_id = $2"
            )
        },
        |stmt| {
            client.select(
                stmt,
                None,
                &[task_id.into(), step_id.into(), JsonB(Value::Array(items.to_vec())).into()],
            )?;
            Ok(())
        },
    )
    .map_err(spi)?;
    emit(client, "step.map_expanded", task_id, Some(step_id), json!({ "instances": items.len() }))
}

/// Completes a map step: `pending -> in_progress -> complete`, as a step a worker ran, its
/// results the array of its instances' results in element order (ids ascend with it; `[]`
/// without instances), gathered and written by one statement. The caller holds the step's rows
/// and has read its blocked count 0 under them: every instance has finished, which is what the
/// guard of `-> in_progress` would check edge by edge.
fn complete_map(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    step_id: i64,
) -> Result<(), TaskerError> {
    let start = JsonB(json!({ "map": "completing" }));
    transitions::transition_without_guard(schema, Step, step_id, State::InProgress, &start)?;
    let q = schema.quoted();
    let n = step_update(
        client,
        schema,
        true,
        "dynamic_collect",
        "dynamic_collect",
        &[INT8],
        |_| {
            let update = format!(
                "UPDATE {q}.tasker_workflow_steps w
                    SET results = r.results, processed = true, processed_at = {NOW},
                        in_process = false, updated_at = {NOW}
                   FROM r WHERE w.workflow_step_id = $1"
            );
            format!(
                "WITH r AS (
                     SELECT COALESCE(jsonb_agg(COALESCE(ws.results, 'null'::jsonb)
                                               ORDER BY ws.workflow_step_id), '[]') AS results,
                            count(ws.workflow_step_id) AS n
                     FROM {q}.tasker_workflow_steps m
                     JOIN {q}.tasker_workflow_steps ws
                       ON ws.task_id = m.task_id AND ws.named_step_id = m.named_step_id
                      AND ws.workflow_step_id <> m.workflow_step_id
                     WHERE m.workflow_step_id = $1),
                 {}
                 SELECT (SELECT r.n FROM r)",
                mirrored(&update, "")
            )
        },
        |stmt| one_value::<i64>(client, stmt, &[step_id.into()]),
    )?
    .unwrap_or_default();
    let meta = JsonB(json!({ "map": { "instances": n } }));
    transition(schema, Step, step_id, State::Complete, &meta, Some(State::InProgress))?;
    finish(client, step_id, false)
}

/// Fails a dynamic step that cannot be judged, for good: not retryable, the error in its
/// results — `code` 54000 for a map with too many elements, TK025 for a map with no array,
/// TK026 for a document its rule reads that cannot be read. `retry_task` judges it again.
fn fail_judged(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    step_id: i64,
    message: &str,
    code: &str,
) -> Result<(), TaskerError> {
    let q = schema.quoted();
    let error = json!({ "message": message, "code": code });
    step_update(
        client,
        schema,
        true,
        "dynamic_fail",
        "dynamic_fail",
        &[INT8, JSONB],
        |_| {
            let update = format!(
                "UPDATE {q}.tasker_workflow_steps
                    SET results = jsonb_build_object('error', $2::jsonb), retryable = false,
                        attempts = COALESCE(attempts, 0) + 1, last_attempted_at = {NOW},
                        updated_at = {NOW}
                  WHERE workflow_step_id = $1"
            );
            format!("WITH {} SELECT 1", mirrored(&update, ""))
        },
        |stmt| {
            client.select(stmt, None, &[step_id.into(), JsonB(error.clone()).into()])?;
            Ok(())
        },
    )?;
    let meta = JsonB(json!({ "error": error, "retryable": false }));
    transition(schema, Step, step_id, State::Error, &meta, Some(State::Pending))?;
    finish(client, step_id, false)
}
