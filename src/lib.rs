//! tasker_core: the core of the Tasker workflow engine inside PostgreSQL.
//!
//! Layers (see `docs/architecture.md` and the README):
//! - [`core`]: pure Rust rules — DAGs, states, identifiers, error classes. No pgrx types.
//! - [`store`]: the only code that knows table and column names; reads and writes through SPI.
//! - [`api`]: the SQL-facing `#[pg_extern]` functions; converts arguments and raises errors.

use pgrx::prelude::*;

pub mod api;
/// The pure rules (the `tasker_rules` crate of this workspace: no PostgreSQL, no pgrx).
pub use tasker_rules as core;
pub mod store;

::pgrx::pg_module_magic!(name, version);

// Bootstrap: the extension-owned objects that are plain SQL.
::pgrx::extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
// Maintained readiness state: tables, triggers and their management functions.
::pgrx::extension_sql_file!("../sql/tracking.sql", name = "tracking", requires = ["bootstrap"]);
// The whole-table aggregates of the Rails compatibility surface (set-based SQL over that state).
::pgrx::extension_sql_file!(
    "../sql/compat_aggregates.sql",
    name = "compat_aggregates",
    requires = ["tracking"]
);
// The durable event log, its cursor and subscriptions, and the clock.
::pgrx::extension_sql_file!("../sql/events.sql", name = "events", requires = ["bootstrap"]);
// The worker protocol's leases, timers, operator functions and DAG picture.
::pgrx::extension_sql_file!(
    "../sql/worker.sql",
    name = "worker",
    requires = ["events", "compat_aggregates"]
);
// Operations: verify(), metrics(), health().
::pgrx::extension_sql_file!("../sql/ops.sql", name = "ops", requires = ["worker"]);
// Retention: archive_tasks() deletes finished tasks in committed batches.
::pgrx::extension_sql_file!("../sql/retention.sql", name = "retention", requires = ["ops"]);
// "Why is this step not running?": explain_task() and explain_step().
::pgrx::extension_sql_file!("../sql/explain.sql", name = "explain", requires = ["worker"]);
// Pointing a Rails database's public functions at tasker_core, and back.
::pgrx::extension_sql_file!(
    "../sql/switchover.sql",
    name = "switchover",
    requires = ["compat_aggregates"]
);

// Least privilege: who runs as whom, and tasker_core.create_roles(). Last, over every function.
::pgrx::extension_sql_file!("../sql/roles.sql", name = "roles", finalize);

/// Called by PostgreSQL when the library is loaded: sets the interrupt hook of `core`, registers
/// the settings, and — when loaded through `shared_preload_libraries` — the timer background
/// worker.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    crate::core::interrupt::set_hook(interrupt_hook);
    store::settings::register_gucs();
    store::events::register_callbacks();
    store::wakeups::register_callbacks();
    store::maintenance::register_callbacks();
    store::direct::register_callbacks();
    // SAFETY: a plain global flag PostgreSQL sets while preloading libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        store::settings::register_preload_gucs();
        api::timer::register_background_workers();
    }
}

/// The hook of [`crate::core::interrupt`]: lets the loops of `core` over caller data stop at a
/// cancel request, a statement timeout or a terminate (raised as PostgreSQL's usual error).
fn interrupt_hook() {
    pgrx::check_for_interrupts!();
}

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
