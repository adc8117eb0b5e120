//! Raising [`TaskerError`]s to SQL callers with their own SQLSTATE.
//!
//! pgrx's `ErrorReport` can only carry the SQLSTATEs PostgreSQL itself defines, so errors of
//! our custom class `TK` are raised here with PostgreSQL's `ereport` primitives. `raise` is
//! only called from the outermost frame of a `#[pg_extern]` function, after every Rust value
//! that needs dropping is gone, so the non-local exit skips nothing that matters.

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

/// Raises `err` as an ERROR with its SQLSTATE. Never returns.
pub fn raise(err: TaskerError) -> ! {
    let code = err.sqlstate();
    let message = err.to_string();
    drop(err);
    raise_with(code, message)
}

/// Raises an ERROR with the given SQLSTATE and message. Never returns.
pub fn raise_with(sqlstate: &'static str, message: String) -> ! {
    let code = make_sqlstate(sqlstate);
    // Copy the message into PostgreSQL memory so nothing Rust-owned outlives the jump.
    let message = message.replace('\0', " ");
    // SAFETY: the current memory context is valid inside a function call; the copy is freed
    // with it when the transaction aborts.
    let msg_ptr = unsafe { pgrx::PgMemoryContexts::CurrentMemoryContext.pstrdup(&message) };
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

/// Unwraps a result, raising the error to the SQL caller.
pub trait OrRaise<T> {
    /// The value, or the error raised with its SQLSTATE.
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T, TaskerError> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => raise(e),
        }
    }
}

impl<T> OrRaise<T> for Result<T, crate::core::readiness::TimeError> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => raise_with(e.sqlstate(), e.to_string()),
        }
    }
}

impl<T> OrRaise<T> for Result<T, pgrx::spi::Error> {
    fn or_raise(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => raise_with("XX000", format!("tasker_core: SPI failure: {e}")),
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
