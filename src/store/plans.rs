//! Prepared statements kept for the life of the backend, one per (query, data schema).

use pgrx::datum::{DatumWithOid, FromDatum, IntoDatum};
use pgrx::pg_sys::{PgBuiltInOids, PgOid};
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiHeapTupleData, SpiResult, SpiTupleTable};
use std::cell::RefCell;
use std::collections::HashMap;

/// Argument types of the kept plans.
pub const BOOL: PgOid = PgOid::BuiltIn(PgBuiltInOids::BOOLOID);
pub const BOOLARRAY: PgOid = PgOid::BuiltIn(PgBuiltInOids::BOOLARRAYOID);
pub const INT4: PgOid = PgOid::BuiltIn(PgBuiltInOids::INT4OID);
pub const INT4ARRAY: PgOid = PgOid::BuiltIn(PgBuiltInOids::INT4ARRAYOID);
pub const INT8: PgOid = PgOid::BuiltIn(PgBuiltInOids::INT8OID);
pub const INT8ARRAY: PgOid = PgOid::BuiltIn(PgBuiltInOids::INT8ARRAYOID);
pub const TEXT: PgOid = PgOid::BuiltIn(PgBuiltInOids::TEXTOID);
pub const TEXTARRAY: PgOid = PgOid::BuiltIn(PgBuiltInOids::TEXTARRAYOID);
pub const JSONB: PgOid = PgOid::BuiltIn(PgBuiltInOids::JSONBOID);
pub const FLOAT8: PgOid = PgOid::BuiltIn(PgBuiltInOids::FLOAT8OID);

/// The statements' clock: `tasker_core.now()` as the UTC timestamp the Rails columns hold.
pub const NOW: &str = "(tasker_core.now() AT TIME ZONE 'UTC')";

/// Makes kept plans run as generic plans while it lives. Left to itself the plan cache may
/// decide a custom plan is cheaper and then re-plan every execution, which costs more than
/// these short, index-driven statements take to run. Restores the setting on drop, including
/// when an error unwinds.
struct GenericPlans(std::ffi::c_int);

impl GenericPlans {
    fn force() -> GenericPlans {
        // SAFETY: plan_cache_mode is a plain int GUC variable of the backend's main thread.
        unsafe {
            let old = pgrx::pg_sys::plan_cache_mode;
            pgrx::pg_sys::plan_cache_mode =
                pgrx::pg_sys::PlanCacheMode::PLAN_CACHE_MODE_FORCE_GENERIC_PLAN as std::ffi::c_int;
            GenericPlans(old)
        }
    }
}

impl Drop for GenericPlans {
    fn drop(&mut self) {
        // SAFETY: as above; restores the caller's value.
        unsafe { pgrx::pg_sys::plan_cache_mode = self.0 }
    }
}

/// Keeps the planner off sequential scans while it lives (`enable_seqscan = off`), for the
/// statements of [`with_keyed_plan`]: each reads a handful of rows through an index, whatever
/// the statistics say. Planned when the tables were small or analysed while empty (a fresh
/// install, the tiny tables autovacuum never analyses), their generic plans otherwise chose
/// sequential scans and kept them while the tables grew: a transition lookup read every
/// transition of the table (seen: 900 full scans of the step transitions for 150 steps).
/// A statement with no index path still scans. Restores the setting on drop.
struct IndexPaths(bool);

impl IndexPaths {
    fn force() -> IndexPaths {
        // SAFETY: enable_seqscan is a plain bool GUC variable of the backend's main thread,
        // read by the planner only.
        unsafe {
            let old = pgrx::pg_sys::enable_seqscan;
            pgrx::pg_sys::enable_seqscan = false;
            IndexPaths(old)
        }
    }
}

impl Drop for IndexPaths {
    fn drop(&mut self) {
        // SAFETY: as above; restores the caller's value.
        unsafe { pgrx::pg_sys::enable_seqscan = self.0 }
    }
}

/// Runs `stmt` for one row: `None` when it returns none, else what `read` takes from it.
pub fn one_row<R>(
    client: &SpiClient<'_>,
    stmt: &OwnedPreparedStatement,
    args: &[DatumWithOid<'_>],
    read: impl FnOnce(&SpiTupleTable<'_>) -> SpiResult<R>,
) -> SpiResult<Option<R>> {
    let t = client.select(stmt, Some(1), args)?;
    if t.is_empty() {
        return Ok(None);
    }
    read(&t.first()).map(Some)
}

/// Every row `stmt` returns for `args`, each made into an `R` by `read`.
pub fn all_rows<R, C: FromIterator<R>>(
    client: &SpiClient<'_>,
    stmt: &OwnedPreparedStatement,
    args: &[DatumWithOid<'_>],
    read: impl FnMut(SpiHeapTupleData<'_>) -> SpiResult<R>,
) -> SpiResult<C> {
    client.select(stmt, None, args)?.map(read).collect()
}

/// The first column of the one row `stmt` returns: `None` without a row or for SQL NULL.
pub fn one_value<T: FromDatum + IntoDatum>(
    client: &SpiClient<'_>,
    stmt: &OwnedPreparedStatement,
    args: &[DatumWithOid<'_>],
) -> SpiResult<Option<T>> {
    one_row(client, stmt, args, |r| r.get::<T>(1)).map(Option::flatten)
}

thread_local! {
    static PLANS: RefCell<HashMap<(&'static str, String), OwnedPreparedStatement>> =
        RefCell::new(HashMap::new());
}

/// Defines a function that runs `f` with the kept plan for `(key, schema)`, preparing `sql()`
/// the first time; the three differ only in how the statement is planned.
macro_rules! kept_plan_runner {
    ($(#[$doc:meta])* $name:ident, mutating: $mutating:expr $(, while: $guard:ident)?) => {
        $(#[$doc])*
        pub fn $name<R>(
            client: &SpiClient<'_>,
            key: &'static str,
            schema: &str,
            arg_types: &[PgOid],
            sql: impl FnOnce() -> String,
            f: impl FnOnce(&OwnedPreparedStatement) -> SpiResult<R>,
        ) -> SpiResult<R> {
            $(let _while = $guard::force();)?
            kept(client, key, schema, arg_types, $mutating, sql, f)
        }
    };
}

kept_plan_runner!(
    /// A read-only statement. PostgreSQL's plan cache revalidates kept plans when the tables
    /// they read change.
    with_plan, mutating: false
);
kept_plan_runner!(
    /// Like [`with_plan`], for a statement that writes or locks rows.
    with_write_plan, mutating: true
);
kept_plan_runner!(
    /// Like [`with_write_plan`], for a statement that reaches a few rows of a table by its key
    /// (a step's or a task's transitions, rows to lock): planned without sequential scans
    /// ([`IndexPaths`]), whatever the statistics say about the table's size.
    with_keyed_plan, mutating: true, while: IndexPaths
);

fn kept<R>(
    client: &SpiClient<'_>,
    key: &'static str,
    schema: &str,
    arg_types: &[PgOid],
    mutating: bool,
    sql: impl FnOnce() -> String,
    f: impl FnOnce(&OwnedPreparedStatement) -> SpiResult<R>,
) -> SpiResult<R> {
    let cache_key = (key, schema.to_owned());
    let missing = PLANS.with(|p| !p.borrow().contains_key(&cache_key));
    if missing {
        let sql = sql();
        let stmt = if mutating {
            client.prepare_mut(sql.as_str(), arg_types)?.keep()
        } else {
            client.prepare(sql.as_str(), arg_types)?.keep()
        };
        PLANS.with(|p| p.borrow_mut().insert(cache_key.clone(), stmt));
    }
    // Take the plan out while it runs so a nested call cannot alias the map borrow.
    let stmt = PLANS.with(|p| p.borrow_mut().remove(&cache_key)).expect("plan was just inserted");
    let result = {
        let _generic = GenericPlans::force();
        f(&stmt)
    };
    PLANS.with(|p| p.borrow_mut().insert(cache_key, stmt));
    result
}
