//! Wake-ups off the commit path.
//!
//! A transaction that sends NOTIFY takes a cluster-wide lock in its commit and holds it through
//! its WAL flush, so notifying commits run one at a time however many cores there are. With
//! tasker_core in `shared_preload_libraries`, the notifier background worker sends them
//! instead: a backend keeps the wake-ups of its transaction in memory, hands them over in
//! shared memory when the transaction commits (nothing when it aborts) and sets the notifier's
//! latch; the notifier sends one NOTIFY per channel and namespace for everything handed over
//! since its last round, in one short transaction of its own. Channel names and payloads are
//! those of in-transaction NOTIFY. Without preload, or in a database the notifier does not
//! serve, the backend sends its NOTIFY in the transaction as before.
//!
//! What is handed over is a hint, never data (the event log and the tables are the data): a
//! wake-up whose subtransaction rolled back is sent anyway (a worker then finds nothing to
//! claim), and when the shared table is full, one wake-up without a namespace stands for all
//! that did not fit.

use pgrx::prelude::*;
use pgrx::{PGRXSharedMemory, PgLwLock};
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};

/// Distinct (channel, namespace) wake-ups the notifier coalesces per round.
const SLOTS: usize = 64;
/// Longest namespace name a slot holds (longer ones are sent as a wake-up of every namespace).
const KEY_MAX: usize = 64;
/// Longest payload a slot holds (the documented payloads are far shorter).
const PAYLOAD_MAX: usize = 256;

/// The two channels (see `events::READY_CHANNEL` and `events::EVENTS_CHANNEL`).
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Channel {
    Events = 0,
    Ready = 1,
}

impl Channel {
    pub fn name(self) -> &'static str {
        match self {
            Channel::Events => super::events::EVENTS_CHANNEL,
            Channel::Ready => super::events::READY_CHANNEL,
        }
    }
}

#[derive(Copy, Clone)]
#[repr(C)]
struct Slot {
    channel: u8,
    key_len: u8,
    payload_len: u16,
    key: [u8; KEY_MAX],
    payload: [u8; PAYLOAD_MAX],
}

const EMPTY_SLOT: Slot =
    Slot { channel: 0, key_len: 0, payload_len: 0, key: [0; KEY_MAX], payload: [0; PAYLOAD_MAX] };

/// The shared state: who the notifier is and what it has yet to send.
#[derive(Copy, Clone)]
#[repr(C)]
pub struct Shared {
    /// The notifier's pid, 0 when none runs.
    notifier_pid: i32,
    /// The database it serves.
    database: u32,
    /// Its latch (a `*mut pg_sys::Latch` in shared memory, valid in every backend).
    latch: usize,
    len: u32,
    /// Wake-ups that did not fit, per channel: one without a namespace stands for them.
    overflow: [bool; 2],
    slots: [Slot; SLOTS],
    /// Wake-ups handed over and NOTIFY statements sent since the server started.
    handed_over: u64,
    sent: u64,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            notifier_pid: 0,
            database: 0,
            latch: 0,
            len: 0,
            overflow: [false; 2],
            slots: [EMPTY_SLOT; SLOTS],
            handed_over: 0,
            sent: 0,
        }
    }
}

// SAFETY: plain old data (integers and byte arrays, no pointers into a process's own memory:
// `latch` points into shared memory), the same in every backend.
unsafe impl PGRXSharedMemory for Shared {}

static SHARED: PgLwLock<Shared> = unsafe { PgLwLock::new(c"tasker_core_wakeups") };

/// Set in the postmaster when the library is preloaded and the shared state exists; backends
/// inherit it.
static PRELOADED: AtomicBool = AtomicBool::new(false);

/// Reserves the shared state (from `_PG_init` while libraries are preloaded).
pub fn init_shared_memory() {
    pgrx::pg_shmem_init!(SHARED);
    PRELOADED.store(true, Ordering::Relaxed);
}

/// What the current transaction will hand over at commit.
#[derive(Default)]
struct Pending {
    wakeups: Vec<(Channel, String, String)>,
    /// Ready wake-ups that the transaction may still take back: a task's steps that became
    /// ready and that the same transaction then claimed itself need no worker woken.
    retractable: Vec<ReadyTask>,
}

/// A task whose steps became ready in this transaction: its namespace, the payload of its
/// wake-up and how many of its ready steps no claim of this transaction has taken yet.
struct ReadyTask {
    task_id: i64,
    namespace: String,
    payload: String,
    unclaimed: i64,
}

thread_local! {
    static PENDING: RefCell<Pending> = RefCell::new(Pending::default());
}

fn my_database() -> u32 {
    // SAFETY: a plain global set once the backend is connected to a database.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// Whether the notifier serves this backend's database, so that wake-ups can wait for commit.
pub fn notifier_serves_this_database() -> bool {
    if !PRELOADED.load(Ordering::Relaxed) {
        return false;
    }
    let s = SHARED.share();
    s.notifier_pid != 0 && s.database == my_database()
}

/// Keeps a wake-up for the notifier, sent after this transaction commits: the first payload
/// per (channel, key) of the transaction (later ones are neither checked nor serialized again).
/// Returns false when the notifier does not serve this database (the caller then sends its
/// NOTIFY in the transaction).
pub fn defer(channel: Channel, key: &str, payload: &serde_json::Value) -> bool {
    let kept =
        PENDING.with(|p| p.borrow().wakeups.iter().any(|(c, k, _)| *c == channel && k == key));
    if kept {
        return true;
    }
    if !notifier_serves_this_database() {
        return false;
    }
    PENDING.with(|p| p.borrow_mut().wakeups.push((channel, key.to_owned(), payload.to_string())));
    true
}

/// Keeps the wake-up of a task that has `ready` steps ready now, to be sent after commit unless
/// this transaction claims them all first ([`claimed_by_this_transaction`]). The latest count
/// of a task replaces the earlier one (it already leaves out what was claimed in between).
/// Returns false when the notifier does not serve this database (the caller then sends its
/// NOTIFY in the transaction, which cannot be taken back).
pub fn defer_ready(namespace: &str, task_id: i64, ready: i64, payload: &serde_json::Value) -> bool {
    if !notifier_serves_this_database() {
        return false;
    }
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        if let Some(t) = p.retractable.iter_mut().find(|t| t.task_id == task_id) {
            t.unclaimed = ready;
        } else {
            p.retractable.push(ReadyTask {
                task_id,
                namespace: namespace.to_owned(),
                payload: payload.to_string(),
                unclaimed: ready,
            });
        }
    });
    true
}

/// Counts steps that this transaction claimed against the ready steps of their tasks (one
/// task id per claimed step). A task whose ready steps were all claimed here wakes no one.
pub fn claimed_by_this_transaction(task_ids: impl IntoIterator<Item = i64>) {
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        if p.retractable.is_empty() {
            return;
        }
        for task_id in task_ids {
            if let Some(t) = p.retractable.iter_mut().find(|t| t.task_id == task_id) {
                t.unclaimed -= 1;
            }
        }
    });
}

/// The transaction's wake-ups as they stand at commit: those kept by [`defer`], then one per
/// namespace of the tasks that still have unclaimed ready steps.
fn take_pending() -> Vec<(Channel, String, String)> {
    PENDING.with(|p| {
        let mut p = p.borrow_mut();
        let mut wakeups = std::mem::take(&mut p.wakeups);
        for t in std::mem::take(&mut p.retractable) {
            let sent = wakeups.iter().any(|(c, k, _)| *c == Channel::Ready && *k == t.namespace);
            if t.unclaimed > 0 && !sent {
                wakeups.push((Channel::Ready, t.namespace, t.payload));
            }
        }
        wakeups
    })
}

/// Hands the transaction's wake-ups to the notifier (at commit) or forgets them (at abort).
#[pg_guard]
unsafe extern "C-unwind" fn at_transaction_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    let handover = match event {
        // (PostgreSQL refuses PREPARE after NOTIFY; a prepared transaction's wake-ups go out at
        // PREPARE, early rather than never: a worker woken early finds nothing and sleeps on)
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT | XACT_EVENT_PREPARE => true,
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => false,
        _ => return,
    };
    let wakeups = take_pending();
    if handover && !wakeups.is_empty() {
        hand_over(&wakeups);
    }
}

/// Registers the transaction callback (once per backend, from `_PG_init`).
pub fn register_callbacks() {
    // SAFETY: registers a static function with no argument; PostgreSQL calls it on the
    // backend's main thread.
    unsafe { pg_sys::RegisterXactCallback(Some(at_transaction_end), std::ptr::null_mut()) }
}

fn hand_over(wakeups: &[(Channel, String, String)]) {
    if !PRELOADED.load(Ordering::Relaxed) {
        return;
    }
    let latch = {
        let mut s = SHARED.exclusive();
        for (channel, key, payload) in wakeups {
            s.handed_over += 1;
            let c = *channel as u8;
            let len = s.len as usize;
            if s.slots[..len]
                .iter()
                .any(|x| x.channel == c && &x.key[..x.key_len as usize] == key.as_bytes())
            {
                continue;
            }
            if len == SLOTS || key.len() > KEY_MAX || payload.len() > PAYLOAD_MAX {
                s.overflow[c as usize] = true;
                continue;
            }
            let slot = &mut s.slots[len];
            slot.channel = c;
            slot.key_len = key.len() as u8;
            slot.key[..key.len()].copy_from_slice(key.as_bytes());
            slot.payload_len = payload.len() as u16;
            slot.payload[..payload.len()].copy_from_slice(payload.as_bytes());
            s.len += 1;
        }
        s.latch
    };
    if latch != 0 {
        // SAFETY: the latch of a PGPROC in shared memory (the notifier's, or that of whichever
        // process took its slot since: a spurious wake-up for it).
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) }
    }
}

/// What the notifier takes in one round: (channel, payload) pairs to NOTIFY.
pub fn take_round() -> Vec<(Channel, String)> {
    let mut s = SHARED.exclusive();
    let mut out = Vec::with_capacity(s.len as usize + 2);
    for slot in &s.slots[..s.len as usize] {
        let channel =
            if slot.channel == Channel::Ready as u8 { Channel::Ready } else { Channel::Events };
        let payload = String::from_utf8_lossy(&slot.payload[..slot.payload_len as usize]);
        out.push((channel, payload.into_owned()));
    }
    for channel in [Channel::Events, Channel::Ready] {
        if std::mem::take(&mut s.overflow[channel as usize]) {
            out.push((channel, r#"{"reason": "coalesced"}"#.to_owned()));
        }
    }
    s.len = 0;
    s.sent += out.len() as u64;
    out
}

/// Registers the calling background worker as the notifier of its database, with a wake-up
/// of every namespace for its first round (whatever a previous notifier left unsent).
pub fn become_notifier() {
    let mut s = SHARED.exclusive();
    // SAFETY: plain globals of this process, set before a background worker's main runs.
    unsafe {
        s.notifier_pid = pg_sys::MyProcPid;
        s.latch = pg_sys::MyLatch as usize;
    }
    s.database = my_database();
    s.overflow[Channel::Ready as usize] = true;
}

/// Unregisters the notifier (when it exits).
pub fn stop_notifying() {
    let mut s = SHARED.exclusive();
    // SAFETY: a plain global of this process.
    if s.notifier_pid == unsafe { pg_sys::MyProcPid } {
        s.notifier_pid = 0;
        s.latch = 0;
    }
}

/// How wake-ups are sent in this backend's database: `notifier`, `in_transaction` (no
/// preload, or the notifier serves another database or is not running) or `off`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mode {
    pub mode: &'static str,
    pub detail: String,
}

pub fn mode() -> Mode {
    if !super::settings::NOTIFY.get() {
        return Mode { mode: "off", detail: "tasker_core.notify is off: workers must poll".into() };
    }
    if !PRELOADED.load(Ordering::Relaxed) {
        return Mode {
            mode: "in_transaction",
            detail: "tasker_core is not in shared_preload_libraries: each transaction sends its own NOTIFY".into(),
        };
    }
    let (pid, database, handed_over, sent) = {
        let s = SHARED.share();
        (s.notifier_pid, s.database, s.handed_over, s.sent)
    };
    if pid == 0 {
        return Mode {
            mode: "in_transaction",
            detail: "the notifier background worker is not running: each transaction sends its own NOTIFY".into(),
        };
    }
    if database != my_database() {
        return Mode {
            mode: "in_transaction",
            detail: "the notifier serves another database (tasker_core.tick_database): each transaction sends its own NOTIFY".into(),
        };
    }
    Mode {
        mode: "notifier",
        detail: format!(
            "notifier pid {pid}: {handed_over} wake-ups handed over, {sent} NOTIFY sent since start"
        ),
    }
}
