//! Reads of the maintained state without SPI: the readiness functions' hot path.
//!
//! Through SPI, a read of `tasker_core.step_state` runs the executor (start-up, plan checks),
//! copies every row into an SPI result and only then hands it over. Here the rows of the
//! requested tasks are read straight from the table through its `(task_id, workflow_step_id)`
//! index with PostgreSQL's index access method, one descent per task, under the snapshot of
//! the calling query, and each row is deformed once into the facts readiness needs.
//!
//! The table, the index and the column numbers are looked up once per backend and forgotten
//! whenever PostgreSQL invalidates any relation cache entry (an `ALTER TABLE`, a `DROP` and
//! `CREATE`, a `REINDEX`, `VACUUM FULL`, the triggers `enable_tracking` creates …): the next
//! read looks them up again. Whenever anything is not as expected — the extension's SQL is
//! older, a column has another type, the index is missing or different, no snapshot is
//! active, the caller may not SELECT from the table or it has row-level security — the caller
//! falls back to its SPI query, so this is only ever a faster way to the same rows, never a
//! way around a privilege. All unsafe code of these reads is in this module.

use super::facts::{StateRow, TaskHead, BLOCKED_PARENTS, FACT_COLUMNS, FACT_TYPES};
use super::rows::{Col, Interner, Row};
use crate::core::readiness::StepFacts;
use pgrx::pg_sys::{self, Datum, Oid};
use std::cell::{Cell, RefCell};
use std::ffi::CString;

/// What a read needs, looked up once (see the module comment).
#[derive(Clone, Copy)]
struct Maintained {
    step_state: Oid,
    /// `step_state_task_idx`: `(task_id, workflow_step_id)`, btree.
    by_task: Oid,
    tracking: Oid,
    /// The `step_state` attribute number of each column of a `StateRow`: the fact columns
    /// in `FACT_COLUMNS` order, then `blocked_parents`.
    columns: [pg_sys::AttrNumber; STATE_COLUMNS],
    /// The attribute number of `tracking.data_schema`.
    data_schema: pg_sys::AttrNumber,
}

/// The data schema's task tables, looked up once per schema (see the module comment).
#[derive(Clone)]
struct TaskTables {
    schema: String,
    tasks: Oid,
    /// `tasker_tasks`: `task_id`, `named_task_id`
    task_cols: [pg_sys::AttrNumber; 2],
    transitions: Oid,
    /// `tasker_task_transitions`: `task_id`, `most_recent`, `to_state`
    transition_cols: [pg_sys::AttrNumber; 3],
}

/// The columns of a `StateRow`.
const STATE_COLUMNS: usize = BLOCKED_PARENTS + 1;

thread_local! {
    static MAINTAINED: Cell<Option<Maintained>> = const { Cell::new(None) };
    static TASK_TABLES: RefCell<Option<TaskTables>> = const { RefCell::new(None) };
    /// Direct reads made by this backend (`tasker_core._direct_reads()`: tests check that the
    /// path they mean to exercise is the one taken).
    static READS: Cell<i64> = const { Cell::new(0) };
}

/// How many direct reads this backend has made.
pub fn reads() -> i64 {
    READS.with(Cell::get)
}

/// Forgets the lookup on any relation cache invalidation (`relid` 0: all of them).
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn forget(_arg: Datum, _relid: Oid) {
    MAINTAINED.with(|m| m.set(None));
    // (try_borrow_mut: never panics, even were a lookup in progress)
    TASK_TABLES.with(|t| {
        if let Ok(mut t) = t.try_borrow_mut() {
            *t = None;
        }
    });
}

/// Registers the invalidation callback (once per backend, from `_PG_init`).
pub fn register_callbacks() {
    // SAFETY: registers a static function that only clears a thread-local cell (it cannot
    // raise); PostgreSQL calls it on the backend's main thread.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(forget), Datum::from(0usize)) }
}

fn relation_oid(namespace: Oid, name: &str) -> Option<Oid> {
    let name = CString::new(name).ok()?;
    // SAFETY: a syscache lookup by name; returns InvalidOid when there is no such relation.
    let oid = unsafe { pg_sys::get_relname_relid(name.as_ptr(), namespace) };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

/// The attribute number of column `name` of `relid` if it has type `type_oid`.
fn column(relid: Oid, name: &str, type_oid: Oid) -> Option<pg_sys::AttrNumber> {
    let name = CString::new(name).ok()?;
    // SAFETY: syscache lookups by relation and name / number; InvalidAttrNumber and
    // InvalidOid stand for "missing" (a dropped column is missing).
    unsafe {
        let attnum = pg_sys::get_attnum(relid, name.as_ptr());
        (attnum > 0 && pg_sys::get_atttype(relid, attnum) == type_oid).then_some(attnum)
    }
}

fn namespace_oid(schema: &str) -> Option<Oid> {
    let schema = CString::new(schema).ok()?;
    // SAFETY: a syscache lookup by name; InvalidOid when the schema does not exist.
    let namespace = unsafe { pg_sys::get_namespace_oid(schema.as_ptr(), true) };
    (namespace != pg_sys::InvalidOid).then_some(namespace)
}

fn look_up_task_tables(schema: &str) -> Option<TaskTables> {
    let namespace = namespace_oid(schema)?;
    let tasks = relation_oid(namespace, "tasker_tasks")?;
    let transitions = relation_oid(namespace, "tasker_task_transitions")?;
    let task_cols = [
        column(tasks, "task_id", pg_sys::INT8OID)?,
        column(tasks, "named_task_id", pg_sys::INT4OID)?,
    ];
    let state = column(transitions, "to_state", pg_sys::VARCHAROID)
        .or_else(|| column(transitions, "to_state", pg_sys::TEXTOID))?;
    let transition_cols = [
        column(transitions, "task_id", pg_sys::INT8OID)?,
        column(transitions, "most_recent", pg_sys::BOOLOID)?,
        state,
    ];
    Some(TaskTables { schema: schema.to_owned(), tasks, task_cols, transitions, transition_cols })
}

fn task_tables(schema: &str) -> Option<TaskTables> {
    if !super::settings::DIRECT_READS.get() {
        return None;
    }
    let cached = TASK_TABLES.with(|t| t.borrow().clone().filter(|t| t.schema == schema));
    if cached.is_some() {
        return cached;
    }
    let found = look_up_task_tables(schema)?;
    TASK_TABLES.with(|t| *t.borrow_mut() = Some(found.clone()));
    Some(found)
}

fn look_up() -> Option<Maintained> {
    let namespace = namespace_oid("tasker_core")?;
    let step_state = relation_oid(namespace, "step_state")?;
    let by_task = relation_oid(namespace, "step_state_task_idx")?;
    let tracking = relation_oid(namespace, "tracking")?;
    let mut columns = [0; STATE_COLUMNS];
    let names = FACT_COLUMNS.iter().chain(&["blocked_parents"]);
    for (slot, (name, col)) in
        columns.iter_mut().zip(names.zip(FACT_TYPES.iter().chain(&[Col::Int4])))
    {
        *slot = column(step_state, name, col.oid())?;
    }
    let data_schema = column(tracking, "data_schema", pg_sys::NAMEOID)?;
    Some(Maintained { step_state, by_task, tracking, columns, data_schema })
}

fn maintained() -> Option<Maintained> {
    if !super::settings::DIRECT_READS.get() {
        return None;
    }
    MAINTAINED.with(|m| {
        if m.get().is_none() {
            m.set(look_up());
        }
        m.get()
    })
}

/// A relation opened (and locked `AccessShareLock` until the transaction ends, as the
/// executor does) for the length of one read.
struct Opened(pg_sys::Relation);

impl Opened {
    /// Opens `relid` if it still exists and is of kind `kind`.
    fn open(relid: Oid, kind: u8) -> Option<Opened> {
        // SAFETY: try_relation_open returns NULL instead of raising when the relation is gone;
        // a non-NULL result is a valid, locked, reference-counted relation until closed.
        unsafe {
            let rel = pg_sys::try_relation_open(relid, pg_sys::AccessShareLock as i32);
            if rel.is_null() {
                return None;
            }
            let opened = Opened(rel);
            ((*(*rel).rd_rel).relkind as u8 == kind).then_some(opened)
        }
    }

    /// Opens table `relid` for a read as the current user would make it through SQL: only
    /// when the user may SELECT from it and it has no row-level security. Otherwise `None`,
    /// and the SPI path runs the query, with PostgreSQL's own checks and errors (the
    /// compatibility functions run as their caller: a direct read must not read what the
    /// caller could not).
    fn open_readable(relid: Oid) -> Option<Opened> {
        // SAFETY: an ACL check by OID for the current user (no lock needed, nothing raised
        // for a missing relation: it reports no privilege).
        let allowed = unsafe {
            pg_sys::pg_class_aclcheck(relid, pg_sys::GetUserId(), pg_sys::ACL_SELECT)
                == pg_sys::AclResult::ACLCHECK_OK
        };
        if !allowed {
            return None;
        }
        let opened = Opened::open(relid, pg_sys::RELKIND_RELATION)?;
        // SAFETY: `rd_rel` of an open relation is its pg_class row.
        let secured = unsafe { (*(*opened.0).rd_rel).relrowsecurity };
        (!secured).then_some(opened)
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        // SAFETY: the relation was opened by `open`; the lock stays until the transaction
        // ends (NoLock releases only the reference).
        unsafe { pg_sys::relation_close(self.0, pg_sys::NoLock as i32) }
    }
}

/// Whether `index` is a valid, plain (not partial, no expression) btree index of `heap` whose
/// first key column is attribute `col` of the heap.
///
/// # Safety
/// Both relations must be open.
unsafe fn usable_index(index: &Opened, heap: &Opened, col: pg_sys::AttrNumber) -> bool {
    let rel = index.0;
    let form = (*rel).rd_index;
    if form.is_null()
        || (*(*rel).rd_rel).relam != pg_sys::BTREE_AM_OID
        || (*form).indrelid != (*heap.0).rd_id
        || !(*form).indisvalid
        || !(*form).indisready
        || (*form).indnkeyatts < 1
    {
        return false;
    }
    // a partial index would not hold every row
    if !pg_sys::RelationGetIndexPredicate(rel).is_null() {
        return false;
    }
    (*form).indkey.values.as_slice(1)[0] == col
}

/// An index of `heap` usable for `col = value` look-ups (see [`usable_index`]), opened.
///
/// # Safety
/// `heap` must be open.
unsafe fn index_on(heap: &Opened, col: pg_sys::AttrNumber) -> Option<Opened> {
    let list = pg_sys::RelationGetIndexList(heap.0);
    if list.is_null() {
        return None;
    }
    for i in 0..(*list).length as usize {
        let oid = (*(*list).elements.add(i)).oid_value;
        if let Some(index) = Opened::open(oid, pg_sys::RELKIND_INDEX) {
            if usable_index(&index, heap, col) {
                return Some(index);
            }
        }
    }
    None
}

/// A scan key on the index's first column (`task_id`): `task_id <op> v`, an int8 btree
/// strategy with its comparison function.
///
/// # Safety
/// The index's first column must be an int8 (`usable_index` checked it is `task_id`).
unsafe fn task_key(key: &mut pg_sys::ScanKeyData, strategy: u32, func: u32, v: i64) {
    let strategy = strategy as pg_sys::StrategyNumber;
    pg_sys::ScanKeyInit(key, 1, strategy, func.into(), Datum::from(v));
}

/// The scan key `task_id = v`.
///
/// # Safety
/// As [`task_key`].
unsafe fn task_eq_key(key: &mut pg_sys::ScanKeyData, v: i64) {
    task_key(key, pg_sys::BTEqualStrategyNumber, pg_sys::F_INT8EQ, v);
}

/// The scan keys `task_id >= first AND task_id <= last`.
///
/// # Safety
/// As [`task_key`].
unsafe fn task_range_keys(keys: &mut [pg_sys::ScanKeyData; 2], first: i64, last: i64) {
    task_key(&mut keys[0], pg_sys::BTGreaterEqualStrategyNumber, pg_sys::F_INT8GE, first);
    task_key(&mut keys[1], pg_sys::BTLessEqualStrategyNumber, pg_sys::F_INT8LE, last);
}

/// The tracked data schema, read from `tasker_core.tracking` (one row at most).
///
/// # Safety
/// `rel` must be the open tracking table; `snapshot` the active snapshot.
unsafe fn tracked_schema(
    rel: &Opened,
    snapshot: pg_sys::Snapshot,
    column: pg_sys::AttrNumber,
) -> Option<String> {
    let scan = pg_sys::systable_beginscan(
        rel.0,
        pg_sys::InvalidOid,
        false,
        snapshot,
        0,
        std::ptr::null_mut(),
    );
    let tuple = pg_sys::systable_getnext(scan);
    let mut found = None;
    if !tuple.is_null() {
        let desc = (*rel.0).rd_att;
        let natts = (*desc).natts as usize;
        let mut values = vec![Datum::from(0usize); natts];
        let mut nulls = vec![true; natts];
        pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        let i = column as usize - 1;
        if !nulls[i] {
            // a `name` is a fixed-size, NUL-terminated buffer inside the tuple
            let name = values[i].cast_mut_ptr::<std::ffi::c_char>();
            found = Some(std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned());
        }
    }
    pg_sys::systable_endscan(scan);
    found
}

/// Whether `schema` is the tracked data schema, read from `tasker_core.tracking` under the
/// active snapshot; `None` when a direct read is not possible (the caller asks SPI).
pub fn is_tracked(schema: &str) -> Option<bool> {
    let m = maintained()?;
    // SAFETY: a read-only scan of the tracking table (opened and locked by `Opened`, closed
    // by its drop) under the calling query's active snapshot.
    unsafe {
        let snapshot = pg_sys::GetActiveSnapshot();
        if snapshot.is_null() {
            return None;
        }
        let tracking = Opened::open_readable(m.tracking)?;
        Some(tracked_schema(&tracking, snapshot, m.data_schema).as_deref() == Some(schema))
    }
}

/// The facts of the steps of `task_ids` (ascending, each id once), read directly from
/// `step_state`, appended to `out` in task and step id order; `None` (and nothing appended)
/// when a direct read is not possible or `schema` is not the tracked schema: the caller then
/// runs its SPI query.
pub fn facts_for_tasks(schema: &str, task_ids: &[i64], out: &mut Vec<StepFacts>) -> Option<()> {
    let mut names = Interner::default();
    visit(schema, task_ids, |row| {
        out.push(row.facts(&mut names));
        true
    })
}

/// Calls `each` with every `step_state` row of the tasks `task_ids` (ascending, each id
/// once) in task and step id order, read directly, until it returns `false`; `None` (and
/// nothing visited) when a direct read is not possible or `schema` is not the tracked
/// schema: the caller then runs its SPI query.
pub fn visit(
    schema: &str,
    task_ids: &[i64],
    mut each: impl FnMut(&StateRow<'_>) -> bool,
) -> Option<()> {
    debug_assert!(task_ids.windows(2).all(|w| w[0] < w[1]), "task ids ascending and distinct");
    if task_ids.is_empty() {
        return Some(());
    }
    let m = maintained()?;
    if is_tracked(schema) != Some(true) {
        return None;
    }
    // SAFETY: a read-only scan under the calling query's active snapshot. Every relation is
    // opened (and locked) before it is read and closed by `Opened`'s drop; the index is
    // checked to be a btree of this table led by task_id; the scan key compares an int8
    // column with int8 equality; slot values are read only up to the attribute numbers looked
    // up (and type-checked) for this very table, and are handed to `each` only while the slot
    // holds its tuple. PostgreSQL errors raised inside (out of memory, a cancel) unwind
    // through pgrx's guards.
    unsafe {
        let snapshot = pg_sys::GetActiveSnapshot();
        if snapshot.is_null() {
            return None;
        }
        let heap = Opened::open_readable(m.step_state)?;
        let index = Opened::open(m.by_task, pg_sys::RELKIND_INDEX)?;
        if !usable_index(&index, &heap, m.columns[1]) {
            return None;
        }
        // Tasks whose ids fill at least half of their range are read in one ordered pass
        // over the range, rows of tasks not asked for skipped; others with one descent per
        // task. (A batch of 1,000 consecutive tasks of 10 steps: 12 % of the call was the
        // descents.)
        let (first, last_id) = (task_ids[0], task_ids[task_ids.len() - 1]);
        let dense = task_ids.len() > 1 && last_id.abs_diff(first) / 2 < task_ids.len() as u64;
        let mut keys: [pg_sys::ScanKeyData; 2] = std::mem::zeroed();
        let nkeys = if dense { 2 } else { 1 };
        let scan = pg_sys::index_beginscan(heap.0, index.0, snapshot, nkeys, 0);
        let slot = pg_sys::table_slot_create(heap.0, std::ptr::null_mut());
        let last = *m.columns.iter().max().unwrap_or(&1) as i32;
        let mut values = [Datum::from(0usize); STATE_COLUMNS];
        let mut nulls = [true; STATE_COLUMNS];
        let mut n = 0u32;
        let ranges: &[i64] = if dense { &task_ids[..1] } else { task_ids };
        // in a pass over the range, the next asked-for task id not yet passed
        let mut wanted = task_ids.iter().peekable();
        'tasks: for &task_id in ranges {
            if dense {
                task_range_keys(&mut keys, first, last_id);
            } else {
                task_key(&mut keys[0], pg_sys::BTEqualStrategyNumber, pg_sys::F_INT8EQ, task_id);
            }
            pg_sys::index_rescan(scan, keys.as_mut_ptr(), nkeys, std::ptr::null_mut(), 0);
            while pg_sys::index_getnext_slot(
                scan,
                pg_sys::ScanDirection::ForwardScanDirection,
                slot,
            ) {
                n += 1;
                if n % 1024 == 0 {
                    pgrx::check_for_interrupts!();
                }
                pg_sys::slot_getsomeattrs(slot, last);
                for (i, &attnum) in m.columns.iter().enumerate() {
                    let a = attnum as usize - 1;
                    values[i] = *(*slot).tts_values.add(a);
                    nulls[i] = *(*slot).tts_isnull.add(a);
                }
                if dense {
                    let row_task = values[1].value() as i64;
                    while wanted.next_if(|&&w| w < row_task).is_some() {}
                    if wanted.peek() != Some(&&row_task) {
                        continue;
                    }
                }
                if !each(&StateRow(Row::new(&values, &nulls))) {
                    break 'tasks;
                }
            }
        }
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::index_endscan(scan);
    }
    READS.with(|r| r.set(r.get() + 1));
    Some(())
}

/// The heads of the tasks `task_ids` (ascending, each once) of data schema `schema` that
/// exist, as `facts::task_heads` returns them — one per `most_recent` task transition, or one
/// without a state when there is none — read directly through an index led by `task_id` of
/// each table; `None` when a direct read is not possible (the caller runs its SPI query).
pub fn task_heads(schema: &str, task_ids: &[i64]) -> Option<Vec<TaskHead>> {
    let t = task_tables(schema)?;
    let mut out = Vec::with_capacity(task_ids.len());
    // SAFETY: as for `facts_for_tasks`: read-only scans under the calling query's snapshot,
    // of relations opened (privileges checked) and closed by `Opened`, through indexes checked
    // to be led by the int8 `task_id` column, reading only the type-checked attributes looked
    // up for these relations, copied out before each slot moves on.
    unsafe {
        let snapshot = pg_sys::GetActiveSnapshot();
        if snapshot.is_null() {
            return None;
        }
        let tasks = Opened::open_readable(t.tasks)?;
        let transitions = Opened::open_readable(t.transitions)?;
        let tasks_index = index_on(&tasks, t.task_cols[0])?;
        let transitions_index = index_on(&transitions, t.transition_cols[0])?;
        let task_scan = pg_sys::index_beginscan(tasks.0, tasks_index.0, snapshot, 1, 0);
        let task_slot = pg_sys::table_slot_create(tasks.0, std::ptr::null_mut());
        let tr_scan = pg_sys::index_beginscan(transitions.0, transitions_index.0, snapshot, 1, 0);
        let tr_slot = pg_sys::table_slot_create(transitions.0, std::ptr::null_mut());
        let task_last = *t.task_cols.iter().max().unwrap_or(&1) as i32;
        let tr_last = *t.transition_cols.iter().max().unwrap_or(&1) as i32;
        let at = |slot: *mut pg_sys::TupleTableSlot, attnum: pg_sys::AttrNumber| {
            let a = attnum as usize - 1;
            (*(*slot).tts_values.add(a), *(*slot).tts_isnull.add(a))
        };
        let forward = pg_sys::ScanDirection::ForwardScanDirection;
        let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
        for &task_id in task_ids {
            task_eq_key(&mut key, task_id);
            pg_sys::index_rescan(task_scan, &mut key, 1, std::ptr::null_mut(), 0);
            while pg_sys::index_getnext_slot(task_scan, forward, task_slot) {
                pg_sys::slot_getsomeattrs(task_slot, task_last);
                let (named, null) = at(task_slot, t.task_cols[1]);
                let named_task_id = if null { 0 } else { named.value() as i32 };
                let before = out.len();
                pg_sys::index_rescan(tr_scan, &mut key, 1, std::ptr::null_mut(), 0);
                while pg_sys::index_getnext_slot(tr_scan, forward, tr_slot) {
                    pg_sys::slot_getsomeattrs(tr_slot, tr_last);
                    let (recent, null) = at(tr_slot, t.transition_cols[1]);
                    if null || recent.value() == 0 {
                        continue;
                    }
                    let (state, null) = at(tr_slot, t.transition_cols[2]);
                    let state = Row::new(&[state], &[null]).text(0);
                    out.push(TaskHead { task_id, named_task_id, state });
                }
                if out.len() == before {
                    out.push(TaskHead { task_id, named_task_id, state: None });
                }
            }
        }
        pg_sys::ExecDropSingleTupleTableSlot(tr_slot);
        pg_sys::index_endscan(tr_scan);
        pg_sys::ExecDropSingleTupleTableSlot(task_slot);
        pg_sys::index_endscan(task_scan);
    }
    READS.with(|r| r.set(r.get() + 1));
    Some(out)
}
