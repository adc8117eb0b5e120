//! The optional timer background worker: with tasker_core in `shared_preload_libraries`, it
//! runs `tasker_core.tick()` every `tasker_core.tick_interval_ms` in the database named by
//! `tasker_core.tick_database`, so expired backoffs and leases wake workers without anyone
//! polling. Without it, schedule `SELECT tasker_core.tick()` with pg_cron or any client.

use crate::store::settings::{TICK_DATABASE, TICK_INTERVAL_MS};
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use std::time::Duration;

/// Registers the worker (from `_PG_init` while libraries are preloaded).
pub fn register_background_worker() {
    if TICK_INTERVAL_MS.get() <= 0 {
        return;
    }
    BackgroundWorkerBuilder::new("tasker_core timer")
        .set_type("tasker_core timer")
        .set_function("tasker_core_timer_main")
        .set_library("tasker_core")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

/// Entry point of the timer background worker.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn tasker_core_timer_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = TICK_DATABASE
        .get()
        .and_then(|c| c.into_string().ok())
        .unwrap_or_else(|| "postgres".to_owned());
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    log!("tasker_core timer: running tasker_core.tick() in database {database:?}");
    loop {
        let interval = Duration::from_millis(TICK_INTERVAL_MS.get().max(10) as u64);
        if !BackgroundWorker::wait_latch(Some(interval)) {
            break;
        }
        BackgroundWorker::transaction(|| {
            let installed = Spi::get_one::<bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'tasker_core')",
            )
            .ok()
            .flatten()
            .unwrap_or(false);
            if installed {
                if let Err(e) = Spi::run("SELECT tasker_core.tick()") {
                    warning!("tasker_core timer: tick failed: {e}");
                }
            }
        });
    }
    log!("tasker_core timer: exiting");
    // Exit code 1 asks the postmaster to start the worker again (after 5 s) when it was
    // terminated while the server keeps running — by DROP DATABASE ... WITH (FORCE), say.
    // SAFETY: proc_exit runs PostgreSQL's exit callbacks and never returns.
    unsafe { pg_sys::proc_exit(1) }
}
