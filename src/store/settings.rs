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

/// Registers the extension's settings. Called once per backend from `_PG_init`.
pub fn register_gucs() {
    GucRegistry::define_bool_guc(
        c"tasker_core.notify",
        c"Send NOTIFY wake-ups on channel tasker_events when events are recorded.",
        c"Listeners are woken once per transaction; the event log is the data.",
        &NOTIFY,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"tasker_core.event_log",
        c"Record lifecycle events in tasker_core.events.",
        c"Turning it off loses events for subscribers; meant for bulk loads and benchmarks.",
        &EVENT_LOG,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"tasker_core.data_schema",
        c"Schema holding the Tasker data tables (tasker_tasks, tasker_workflow_steps, ...).",
        c"Rails apps keep them in public; tasker_core.install_schema(target) can put them elsewhere.",
        &DATA_SCHEMA,
        GucContext::Userset,
        GucFlags::default(),
    );
}

/// The configured data schema, validated.
pub fn data_schema() -> Result<SchemaName, TaskerError> {
    let raw = DATA_SCHEMA.get();
    let raw = raw
        .as_ref()
        .and_then(|c| c.to_str().ok())
        .unwrap_or("public");
    SchemaName::parse(raw)
}
