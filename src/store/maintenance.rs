//! Maintenance of `tasker_core.step_state` by tasker_core's own writes.
//!
//! The tracking triggers keep the maintained rows exact under anyone's writes, at the price of
//! a PL/pgSQL call (and its statements) per written row. tasker_core's worker path knows what
//! it changes, so its statements update the maintained row themselves, in the same statement
//! or right after it, while [`Direct`] is alive; the row triggers on steps and step transitions
//! carry `WHEN (NOT tasker_core._self_maintained())` and do not fire for those writes. Every
//! other writer (Rails, psql, the operator functions written in SQL) still fires them.

use pgrx::pg_sys;
use std::cell::Cell;

thread_local! {
    static DIRECT: Cell<bool> = const { Cell::new(false) };
}

/// While alive, the tracking row triggers skip this backend's writes: the caller maintains
/// `step_state` itself. Dropped at the end of the statement it covers, and on unwinding.
pub struct Direct(bool);

impl Direct {
    pub fn begin() -> Direct {
        Direct(DIRECT.with(|d| d.replace(true)))
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        DIRECT.with(|d| d.set(self.0));
    }
}

/// What the trigger condition reads.
pub fn active() -> bool {
    DIRECT.with(Cell::get)
}

/// Forgets a flag a transaction left set (an error raised past a [`Direct`] whose frame was
/// not unwound): the next transaction starts with every trigger firing.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn reset_at_transaction_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    if matches!(event, XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_COMMIT) {
        DIRECT.with(|d| d.set(false));
    }
}

/// Registers the transaction callback (once per backend, from `_PG_init`).
pub fn register_callbacks() {
    // SAFETY: registers a static function with no argument; PostgreSQL calls it on the
    // backend's main thread.
    unsafe { pg_sys::RegisterXactCallback(Some(reset_at_transaction_end), std::ptr::null_mut()) }
}

/// Whether the tracking triggers in place skip self-maintained writes: the SQL of 0.5.0 on
/// (function `tasker_core._self_maintained()` exists; its upgrade script recreates the
/// triggers with their condition). Until then every write fires them, as before.
pub fn installed() -> bool {
    // SAFETY: catalog cache lookups by name with an empty argument vector; nothing is raised
    // when the function or the schema is missing.
    unsafe {
        let ns = pg_sys::get_namespace_oid(c"tasker_core".as_ptr(), true);
        if ns == pg_sys::InvalidOid {
            return false;
        }
        let args = pg_sys::buildoidvector(std::ptr::null(), 0);
        let oid = pg_sys::GetSysCacheOid(
            pg_sys::SysCacheIdentifier::PROCNAMEARGSNSP as _,
            pg_sys::Anum_pg_proc_oid as _,
            pg_sys::Datum::from(c"_self_maintained".as_ptr()),
            pg_sys::Datum::from(args),
            pg_sys::Datum::from(ns),
            pg_sys::Datum::from(0),
        );
        pg_sys::pfree(args.cast());
        oid != pg_sys::InvalidOid
    }
}
