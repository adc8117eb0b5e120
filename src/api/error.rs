//! Raising [`TaskerError`]s to SQL callers with their own SQLSTATE.
//!
//! pgrx's `ErrorReport` can only carry the SQLSTATEs PostgreSQL itself defines, so errors of
//! our custom class `TK` are raised here with PostgreSQL's `ereport` primitives, whose ERROR
//! exit is a longjmp: it skips the destructors of every Rust frame it crosses, and whatever
//! those frames own (a `String`, a `Vec`, a map) leaks for the life of the backend.
//!
//! **The rule**: a `#[pg_extern]` computes a `Result` and raises only in its last expression,
//! with nothing of its own alive. Its work runs in [`attempt`] (or a function taking every
//! argument by value), so that when the `Result` comes back every value the work owned —
//! arguments included — is already dropped; `or_raise()` on it is the function's last
//! expression (a set-returning function wraps the `Ok` rows after it). `test_hostile.py`
//! raises 100,000 errors through the SQL surface and checks that the backend's memory stays
//! flat.

use crate::core::error::TaskerError;
use std::ffi::{c_char, c_int, CStr};

unsafe extern "C-unwind" {
    fn errstart(elevel: c_int, domain: *const c_char) -> bool;
    fn errcode(sqlerrcode: c_int) -> c_int;
    fn errmsg(fmt: *const c_char, ...) -> c_int;
    fn errfinish(filename: *const c_char, lineno: c_int, funcname: *const c_char);
}

/// Packs a five-character SQLSTATE the way PostgreSQL's `MAKE_SQLSTATE` does.
pub const fn make_sqlstate(code: &str) -> c_int {
    let b = code.as_bytes();
    let mut out = 0;
    let mut i = 0;
    while i < 5 {
        out += ((b[i].wrapping_sub(b'0') & 0x3F) as c_int) << (6 * i);
        i += 1;
    }
    out
}

/// Raises an ERROR with the given SQLSTATE and message. Never returns.
pub fn raise_with(sqlstate: &'static str, message: String) -> ! {
    let code = make_sqlstate(sqlstate);
    // Copy the message into PostgreSQL memory so nothing Rust-owned outlives the jump: into
    // ErrorContext, which error recovery resets (the current context may live as long as the
    // caller's loop: a PL/pgSQL block catching errors would keep every message).
    let cleaned = message.replace('\0', " ");
    drop(message); // (shadowing would keep it alive, and the jump would leak it)
    let message = cleaned;
    // SAFETY: ErrorContext exists from backend start; errmsg copies the formatted text, and
    // the copy here is freed when the error is flushed.
    let msg_ptr =
        unsafe { pgrx::PgMemoryContexts::For(pgrx::pg_sys::ErrorContext).pstrdup(&message) };
    drop(message);
    const PERCENT_S: &CStr = c"%s";
    const FILE: &CStr = c"tasker_core";
    const FUNC: &CStr = c"tasker_core";
    // SAFETY: these are PostgreSQL's ereport primitives, called in the documented order on the
    // backend's main thread; errfinish at ERROR level jumps to the caller's error handler.
    unsafe {
        if errstart(pgrx::PgLogLevel::ERROR as c_int, std::ptr::null()) {
            errcode(code);
            errmsg(PERCENT_S.as_ptr(), msg_ptr);
            errfinish(FILE.as_ptr(), 0, FUNC.as_ptr());
        }
    }
    unreachable!("an ERROR-level ereport does not return")
}

/// Runs a `#[pg_extern]`'s work and returns its `Result`. `f` is taken by value and called
/// once, so everything it captured (with `move`: the function's arguments) is dropped before
/// this returns, and an error raised from the result crosses no frame that owns anything.
pub fn attempt<T, E>(f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    f()
}

/// An error on its way to the SQL caller, whatever layer it came from: its SQLSTATE and
/// message.
#[derive(Debug)]
pub struct Raised {
    sqlstate: &'static str,
    message: String,
}

impl From<TaskerError> for Raised {
    fn from(e: TaskerError) -> Raised {
        Raised { sqlstate: e.sqlstate(), message: e.to_string() }
    }
}

impl From<crate::core::readiness::TimeError> for Raised {
    fn from(e: crate::core::readiness::TimeError) -> Raised {
        Raised { sqlstate: e.sqlstate(), message: e.to_string() }
    }
}

impl From<pgrx::spi::Error> for Raised {
    fn from(e: pgrx::spi::Error) -> Raised {
        Raised { sqlstate: "XX000", message: format!("tasker_core: SPI failure: {e}") }
    }
}

/// Unwraps a result, raising the error to the SQL caller.
pub trait OrRaise<T> {
    /// The value, or the error raised with its SQLSTATE.
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T, TaskerError> {
    fn or_raise(self) -> T {
        self.map_err(Raised::from).or_raise()
    }
}

impl<T> OrRaise<T> for Result<T, Raised> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(Raised { sqlstate, message }) => raise_with(sqlstate, message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::make_sqlstate;

    #[test]
    fn packs_like_postgres() {
        // ERRCODE_UNIQUE_VIOLATION is MAKE_SQLSTATE('2','3','5','0','5').
        assert_eq!(
            make_sqlstate("23505"),
            pgrx::prelude::PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION as i32
        );
    }
}
