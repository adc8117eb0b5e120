//! Configuration read by the store: where the Tasker data tables live.

use crate::core::error::TaskerError;
use crate::core::ident::SchemaName;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

/// `tasker_core.data_schema`: the schema holding the `tasker_*` tables (default `public`).
pub static DATA_SCHEMA: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"public"));

/// `tasker_core.notify`: send NOTIFY wake-ups for events (default on). Deployments that
/// only poll can turn it off to spare the commit-time NOTIFY lock.
pub static NOTIFY: GucSetting<bool> = GucSetting::<bool>::new(true);

/// `tasker_core.event_log`: record lifecycle events in tasker_core.events (default on).
/// Off loses events for subscribers; it exists for bulk loads and for measuring its cost.
pub static EVENT_LOG: GucSetting<bool> = GucSetting::<bool>::new(true);

/// `tasker_core.direct_reads`: read the maintained state for the readiness functions straight
/// from its table and index (`store::direct`) instead of through SPI (default on). Off gives
/// the same rows the slower way; it exists to compare the two.
pub static DIRECT_READS: GucSetting<bool> = GucSetting::<bool>::new(true);

/// `tasker_core.backoff_jitter`: add ±10 % jitter to computed backoffs (default on).
pub static BACKOFF_JITTER: GucSetting<bool> = GucSetting::<bool>::new(true);

/// `tasker_core.jitter_seed`: when non-zero, jitter is a function of this seed, the step and
/// the attempt, so tests and replays are deterministic (default 0: varies).
pub static JITTER_SEED: GucSetting<i32> = GucSetting::<i32>::new(0);

/// `tasker_core.max_payload_bytes`: largest JSON a caller may hand in as results, an error,
/// a task context or transition metadata (serialized size).
pub static MAX_PAYLOAD_BYTES: GucSetting<i32> = GucSetting::<i32>::new(8 * 1024 * 1024);

/// `tasker_core.max_subscriptions_per_login`: most event subscriptions one login may own.
pub static MAX_SUBSCRIPTIONS_PER_LOGIN: GucSetting<i32> = GucSetting::<i32>::new(1000);

/// `tasker_core.max_template_steps`: most steps a template may declare.
pub static MAX_TEMPLATE_STEPS: GucSetting<i32> = GucSetting::<i32>::new(10_000);

/// `tasker_core.max_map_elements`: most instances a map step may expand into.
pub static MAX_MAP_ELEMENTS: GucSetting<i32> =
    GucSetting::<i32>::new(crate::core::dynamic::DEFAULT_MAX_MAP_ELEMENTS as i32);

/// `tasker_core.tick_database`: the database the timer background worker runs `tick()` in.
pub static TICK_DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));

/// `tasker_core.index_profile`: the index profile `install_schema()` uses when none is given
/// (`lean` or `rails`).
pub static INDEX_PROFILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"lean"));

/// `tasker_core.notifier`: with tasker_core preloaded, send wake-ups from the notifier
/// background worker after commit instead of NOTIFY in each transaction (default on).
pub static NOTIFIER: GucSetting<bool> = GucSetting::<bool>::new(true);

/// `tasker_core.tick_interval_ms`: how often the timer background worker runs `tick()`
/// (0: no background worker).
pub static TICK_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);

/// The jitter seed of a backoff for `step_id`'s `attempt`, or `None` without jitter.
pub fn jitter_seed(step_id: i64, attempt: i32) -> Option<u64> {
    if !BACKOFF_JITTER.get() {
        return None;
    }
    let base = match JITTER_SEED.get() {
        0 => {
            // SAFETY: reading the statement start time has no preconditions.
            (unsafe { pgrx::pg_sys::GetCurrentStatementStartTimestamp() }) as u64
        }
        seed => seed as u64,
    };
    Some(crate::core::backoff::splitmix64(
        base ^ (step_id as u64).rotate_left(17) ^ (attempt as u64).rotate_left(41),
    ))
}

/// Registers the extension's settings. Called once per backend from `_PG_init`.
pub fn register_gucs() {
    GucRegistry::define_bool_guc(
        c"tasker_core.direct_reads",
        c"Read maintained readiness state without SPI.",
        c"Off reads the same rows through SPI (for comparisons).",
        &DIRECT_READS,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"tasker_core.backoff_jitter",
        c"Add up to 10% jitter to computed retry backoffs.",
        c"Spreads retries of steps that failed together.",
        &BACKOFF_JITTER,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"tasker_core.jitter_seed",
        c"Seed of the backoff jitter; 0 varies it.",
        c"A non-zero seed makes the jitter a function of the seed, the step and the attempt.",
        &JITTER_SEED,
        i32::MIN,
        i32::MAX,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"tasker_core.tick_database",
        c"Database of the background workers: the timer runs tasker_core.tick() there, the notifier serves it.",
        c"Only used when tasker_core is in shared_preload_libraries.",
        &TICK_DATABASE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"tasker_core.tick_interval_ms",
        c"Milliseconds between two tasker_core.tick() runs of the timer background worker.",
        c"0 disables the background worker; tick() can also be scheduled with pg_cron.",
        &TICK_INTERVAL_MS,
        0,
        3_600_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"tasker_core.index_profile",
        c"Indexes install_schema() creates when no profile is given: lean or rails.",
        c"lean: the unique indexes and those tasker_core reads; rails: exactly the Rails engine's set.",
        &INDEX_PROFILE,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"tasker_core.max_template_steps",
        c"Most steps a task template may declare.",
        c"register_task_template refuses larger templates with SQLSTATE 54000.",
        &MAX_TEMPLATE_STEPS,
        1,
        1_000_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"tasker_core.max_map_elements",
        c"Most instances a map step may expand into.",
        c"A larger map input fails the map step (or create_task, for a map over the context) with SQLSTATE 54000.",
        &MAX_MAP_ELEMENTS,
        0,
        10_000_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"tasker_core.max_subscriptions_per_login",
        c"Most event subscriptions one login may own.",
        c"subscribe() refuses a new subscription beyond it with SQLSTATE 54000.",
        &MAX_SUBSCRIPTIONS_PER_LOGIN,
        0,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"tasker_core.max_payload_bytes",
        c"Largest JSON payload (results, errors, contexts, metadata) a call accepts, in bytes.",
        c"Larger payloads are refused with SQLSTATE 54000.",
        &MAX_PAYLOAD_BYTES,
        1024,
        i32::MAX,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"tasker_core.notify",
        c"Send NOTIFY wake-ups on channel tasker_events when events are recorded.",
        c"Listeners are woken once per transaction; the event log is the data.",
        &NOTIFY,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"tasker_core.event_log",
        c"Record lifecycle events in tasker_core.events.",
        c"Turning it off loses events for subscribers; meant for bulk loads and benchmarks.",
        &EVENT_LOG,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"tasker_core.fake_now",
        c"A timestamp tasker_core.now() returns instead of the transaction time.",
        c"For tests and replays; empty means the real clock.",
        &FAKE_NOW,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"tasker_core.data_schema",
        c"Schema holding the Tasker data tables (tasker_tasks, tasker_workflow_steps, ...).",
        c"Rails apps keep them in public; tasker_core.install_schema(target) can put them elsewhere.",
        &DATA_SCHEMA,
        GucContext::Suset,
        GucFlags::default(),
    );
}

/// `tasker_core.fake_now`: a timestamp `tasker_core.now()` returns instead of the
/// transaction time (tests and replays). Superuser-only, like every setting that changes what
/// the SECURITY DEFINER functions do: a worker may not move the clock past its backoff.
pub static FAKE_NOW: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// Registers the settings that only exist when the library is preloaded (PostgreSQL refuses
/// a server-start setting defined later). Called from `_PG_init` while preloading.
pub fn register_preload_gucs() {
    GucRegistry::define_bool_guc(
        c"tasker_core.notifier",
        c"Send wake-ups from the notifier background worker after commit.",
        c"Only used when tasker_core is in shared_preload_libraries; it serves tasker_core.tick_database.",
        &NOTIFIER,
        GucContext::Postmaster,
        GucFlags::default(),
    );
}

/// Refuses a JSON payload larger than `tasker_core.max_payload_bytes` (54000).
pub fn check_payload(what: &'static str, v: &serde_json::Value) -> Result<(), TaskerError> {
    /// Counts the bytes written to it: the serialized size without a copy of the payload.
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let limit = MAX_PAYLOAD_BYTES.get();
    let mut counter = Counter(0);
    let size = serde_json::to_writer(&mut counter, v).map_or(usize::MAX, |_| counter.0);
    if size > limit as usize {
        return Err(TaskerError::LimitExceeded {
            what,
            limit: limit as i64,
            actual: size.min(i64::MAX as usize) as i64,
        });
    }
    Ok(())
}

/// The configured data schema, validated.
pub fn data_schema() -> Result<SchemaName, TaskerError> {
    let raw = DATA_SCHEMA.get();
    let raw = raw.as_ref().and_then(|c| c.to_str().ok()).unwrap_or("public");
    SchemaName::parse(raw)
}
