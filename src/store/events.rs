//! Writing lifecycle events: one row in `tasker_core.events` per event, and a NOTIFY wake-up.

use super::plans::{with_write_plan, INT8, JSONB, TEXT};
use pgrx::pg_sys;
use pgrx::spi::{SpiClient, SpiResult};
use pgrx::JsonB;
use std::cell::Cell;

/// The channel every event wakes. Payloads are small JSON objects naming the event, its ids
/// and its log position; the log is the data.
pub const EVENTS_CHANNEL: &str = "tasker_events";

/// An event to record.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    pub name: &'a str,
    pub task_id: Option<i64>,
    pub step_id: Option<i64>,
    pub from_state: Option<&'a str>,
    pub to_state: Option<&'a str>,
    pub payload: serde_json::Value,
}

/// Where a recorded event sits in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub id: i64,
    pub position: String,
}

/// The channel that wakes workers when steps may have become claimable. Payload:
/// `{"task_id": ..., "namespace": ...}` of the first such task in the transaction.
pub const READY_CHANNEL: &str = "tasker_ready";

thread_local! {
    /// The top-level transaction ids that already sent their NOTIFY, per channel.
    static NOTIFIED_EVENTS: Cell<u32> = const { Cell::new(0) };
    static NOTIFIED_READY: Cell<u32> = const { Cell::new(0) };
}

/// Records `event` and, once per transaction, sends a NOTIFY naming it (each as the settings
/// `tasker_core.event_log` and `tasker_core.notify` allow). `None` when the log is off.
pub fn emit(client: &SpiClient<'_>, event: &NewEvent<'_>) -> SpiResult<Option<Recorded>> {
    if !super::settings::EVENT_LOG.get() {
        return Ok(None);
    }
    let traced = traces_installed();
    let recorded = with_write_plan(
        client,
        if traced { "emit_event_traced" } else { "emit_event" },
        "",
        &[TEXT, INT8, INT8, TEXT, TEXT, JSONB],
        || {
            if traced {
                // an event of a traced task carries its traceparent
                "INSERT INTO tasker_core.events (name, task_id, step_id, from_state, to_state, payload) \
                 SELECT $1, $2, $3, $4, $5, \
                        CASE WHEN tt.traceparent IS NULL THEN $6 \
                             ELSE $6 || jsonb_build_object('traceparent', tt.traceparent) END \
                 FROM (SELECT) AS one LEFT JOIN tasker_core.task_traces tt ON tt.task_id = $2 \
                 RETURNING id, xid::text"
                    .to_owned()
            } else {
                "INSERT INTO tasker_core.events (name, task_id, step_id, from_state, to_state, payload) \
                 VALUES ($1, $2, $3, $4, $5, $6) RETURNING id, xid::text"
                    .to_owned()
            }
        },
        |stmt| {
            let row = client
                .select(
                    stmt,
                    None,
                    &[
                        event.name.into(),
                        event.task_id.into(),
                        event.step_id.into(),
                        event.from_state.into(),
                        event.to_state.into(),
                        JsonB(event.payload.clone()).into(),
                    ],
                )?
                .first()
                .get_two::<i64, String>()?;
            let id = row.0.unwrap_or_default();
            Ok(Recorded { id, position: format!("{}/{}", row.1.unwrap_or_default(), id) })
        },
    )?;
    notify_once(client, event, &recorded)?;
    Ok(Some(recorded))
}

/// Puts task `task_id` in the trace of `traceparent` unless it already has one (needs
/// `traces_installed()`).
pub fn record_trace(client: &SpiClient<'_>, task_id: i64, traceparent: &str) -> SpiResult<()> {
    with_write_plan(
        client,
        "record_trace",
        "",
        &[INT8, TEXT],
        || {
            "INSERT INTO tasker_core.task_traces (task_id, traceparent) VALUES ($1, $2) \
             ON CONFLICT (task_id) DO NOTHING"
                .to_owned()
        },
        |stmt| {
            client.select(stmt, None, &[task_id.into(), traceparent.into()])?;
            Ok(())
        },
    )
}

/// The oid of relation `tasker_core.<name>`, if it exists (catalog cache lookups by name).
pub(super) fn own_relation(name: &std::ffi::CStr) -> Option<pg_sys::Oid> {
    // SAFETY: catalog cache lookups by name; missing_ok, so no error is raised.
    unsafe {
        let ns = pg_sys::get_namespace_oid(c"tasker_core".as_ptr(), true);
        if ns == pg_sys::InvalidOid {
            return None;
        }
        let rel = pg_sys::get_relname_relid(name.as_ptr(), ns);
        (rel != pg_sys::InvalidOid).then_some(rel)
    }
}

/// Whether `tasker_core.task_traces` exists. The library of a new version runs against the SQL
/// objects of the previous one until `ALTER EXTENSION tasker_core UPDATE`: until then it
/// neither reads nor records trace context (two catalog cache lookups per call).
pub fn traces_installed() -> bool {
    own_relation(c"task_traces").is_some()
}

/// Whether relation `tasker_core.<rel>` has column `column` (three catalog cache lookups).
pub(super) fn own_column(rel: &std::ffi::CStr, column: &std::ffi::CStr) -> bool {
    own_relation(rel).is_some_and(|rel| {
        // SAFETY: a catalog cache lookup by name; a missing column gives InvalidAttrNumber.
        unsafe { pg_sys::get_attnum(rel, column.as_ptr()) != pg_sys::InvalidAttrNumber as i16 }
    })
}

/// Whether `tasker_core.step_state` has its `namespace_id` column (the SQL of 0.3.0 on): until
/// then claims read the single ready queue of earlier versions.
pub fn step_namespaces_installed() -> bool {
    own_column(c"step_state", c"namespace_id")
}

/// Whether `tasker_core.step_claims` records the login of a claim (the SQL of 0.4.0 on): until
/// then claims are checked by worker id alone, as before.
pub fn claim_logins_installed() -> bool {
    own_column(c"step_claims", c"login")
}

/// Sends the wake-up for the first event of the current transaction only: listeners read the
/// log from their position, which gives them every event of the transaction.
fn notify_once(client: &SpiClient<'_>, event: &NewEvent<'_>, at: &Recorded) -> SpiResult<()> {
    let payload = serde_json::json!({
        "event": event.name,
        "task_id": event.task_id,
        "step_id": event.step_id,
        "position": at.position,
    });
    notify_channel_once(client, EVENTS_CHANNEL, "", &payload)
}

/// Forgets which transaction already notified: a NOTIFY queued in a subtransaction that rolls
/// back is discarded, so the next event must send its own.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn forget_on_subxact_abort(
    event: pg_sys::SubXactEvent::Type,
    _my: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        NOTIFIED_EVENTS.with(|c| c.set(0));
        NOTIFIED_READY.with(|c| c.set(0));
    }
}

/// Registers the subtransaction callback (once per backend, from `_PG_init`).
pub fn register_callbacks() {
    // SAFETY: registers a static function with no argument; PostgreSQL calls it on the
    // backend's main thread.
    unsafe { pg_sys::RegisterSubXactCallback(Some(forget_on_subxact_abort), std::ptr::null_mut()) }
}

/// NOTIFY `channel` with `payload` unless this transaction already did (or NOTIFY is off).
/// Where the notifier serves this database, the wake-up waits for commit instead, and it is
/// sent once per `key` (a namespace: every namespace the transaction readied is woken).
pub fn notify_channel_once(
    client: &SpiClient<'_>,
    channel: &'static str,
    key: &str,
    payload: &serde_json::Value,
) -> SpiResult<()> {
    if !super::settings::NOTIFY.get() {
        return Ok(());
    }
    let which = if channel == READY_CHANNEL {
        super::wakeups::Channel::Ready
    } else {
        super::wakeups::Channel::Events
    };
    if super::wakeups::defer(which, key, payload) {
        return Ok(());
    }
    let slot = if channel == READY_CHANNEL { &NOTIFIED_READY } else { &NOTIFIED_EVENTS };
    // SAFETY: asks for (and if needed assigns) the current top-level transaction id.
    let xid = unsafe { pg_sys::GetTopTransactionId() }.into_inner();
    if slot.with(Cell::get) == xid {
        return Ok(());
    }
    let text = payload.to_string();
    with_write_plan(
        client,
        "notify",
        "",
        &[TEXT, TEXT],
        || "SELECT pg_notify($1, $2)".to_owned(),
        |stmt| {
            client.select(stmt, None, &[channel.into(), text.as_str().into()])?;
            Ok(())
        },
    )?;
    slot.with(|c| c.set(xid));
    Ok(())
}
