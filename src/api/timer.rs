//! The optional background workers, with tasker_core in `shared_preload_libraries`, both in the
//! database named by `tasker_core.tick_database`:
//! - the timer runs `tasker_core.tick()` every `tasker_core.tick_interval_ms`, so expired
//!   backoffs and leases wake workers without anyone polling (without it, schedule
//!   `SELECT tasker_core.tick()` with pg_cron or any client);
//! - the notifier sends the wake-ups that committed transactions handed over
//!   (`store::wakeups`), so that worker transactions never NOTIFY themselves.

use crate::store::settings::{NOTIFIER, TICK_DATABASE, TICK_INTERVAL_MS};
use crate::store::wakeups;
use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use std::time::Duration;

/// Registers the workers (from `_PG_init` while libraries are preloaded).
pub fn register_background_workers() {
    if NOTIFIER.get() {
        wakeups::init_shared_memory();
        BackgroundWorkerBuilder::new("tasker_core notifier")
            .set_type("tasker_core notifier")
            .set_function("tasker_core_notifier_main")
            .set_library("tasker_core")
            .enable_spi_access()
            .set_restart_time(Some(Duration::from_secs(1)))
            .load();
    }
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

fn database() -> String {
    TICK_DATABASE.get().and_then(|c| c.into_string().ok()).unwrap_or_else(|| "postgres".to_owned())
}

/// The start of both background workers: signal handlers, then a connection to the database
/// they serve (returned by name).
fn connect() -> String {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    database
}

/// The shortest time between two rounds of the notifier.
const ROUND_GAP: Duration = Duration::from_millis(2);

/// Unregisters the notifier when its process exits, however it exits.
#[pg_guard]
unsafe extern "C-unwind" fn notifier_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    wakeups::stop_notifying();
}

/// Entry point of the notifier background worker: waits on its latch, and for each round of
/// handed-over wake-ups runs one transaction of `pg_notify` calls.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn tasker_core_notifier_main(_arg: pg_sys::Datum) {
    let database = connect();
    // SAFETY: registers a static function with no argument, run at this process's exit.
    unsafe { pg_sys::before_shmem_exit(Some(notifier_exit), pg_sys::Datum::from(0)) };
    // A wake-up is not data: its transaction need not wait for its commit record to reach
    // disk (nor take a turn in the WAL flushes of the workers' commits).
    BackgroundWorker::transaction(|| {
        if let Err(e) = Spi::run("SET synchronous_commit = off") {
            warning!("tasker_core notifier: {e}");
        }
    });
    wakeups::become_notifier();
    log!("tasker_core notifier: sending wake-ups of database {database:?}");
    let mut last_round = std::time::Instant::now() - ROUND_GAP;
    loop {
        // At most one round per ROUND_GAP: an idle system's wake-up goes out at once, a busy
        // one's are gathered for up to 2 ms, so that listeners are not woken once per commit.
        let since = last_round.elapsed();
        if since < ROUND_GAP {
            std::thread::sleep(ROUND_GAP - since);
        }
        let round = wakeups::take_round();
        if !round.is_empty() {
            last_round = std::time::Instant::now();
            BackgroundWorker::transaction(|| {
                for (channel, payload) in &round {
                    if let Err(e) = Spi::run_with_args(
                        "SELECT pg_catalog.pg_notify($1, $2)",
                        &[channel.name().into(), payload.as_str().into()],
                    ) {
                        warning!("tasker_core notifier: NOTIFY failed: {e}");
                    }
                }
            });
        }
        // (a hand-over sets the latch; the timeout only bounds a lost wake-up's delay)
        if !BackgroundWorker::wait_latch(Some(Duration::from_secs(1))) {
            break;
        }
    }
    log!("tasker_core notifier: exiting");
    // (exit code 1: restarted after 1 s when terminated while the server keeps running)
    // SAFETY: proc_exit runs PostgreSQL's exit callbacks and never returns.
    unsafe { pg_sys::proc_exit(1) }
}

/// Entry point of the timer background worker.
#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn tasker_core_timer_main(_arg: pg_sys::Datum) {
    let database = connect();
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

/// How this database's wake-ups are sent (`notifier`, `in_transaction` or `off`) and why:
/// one row, for `tasker_core.health()`.
#[pg_extern(stable, parallel_safe, name = "_wakeup_mode")]
fn wakeup_mode() -> TableIterator<'static, (name!(mode, String), name!(detail, String))> {
    let m = wakeups::mode();
    TableIterator::once((m.mode.to_owned(), m.detail))
}
