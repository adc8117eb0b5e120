//! Letting loops over caller data stop when PostgreSQL asks them to (a cancel request, a
//! statement timeout, a terminate). The rules in `core` know nothing of PostgreSQL: the
//! extension sets a hook when the library is loaded (pgrx's `check_for_interrupts!()`), and
//! every loop over caller data calls [`check`]. In plain Rust (unit tests, fuzzing) no hook is
//! set and [`check`] does nothing.

use std::sync::OnceLock;

static HOOK: OnceLock<fn()> = OnceLock::new();

/// Sets the process-wide hook [`check`] calls. The first hook set stays; later calls change
/// nothing (the extension sets it once, when the library is loaded).
pub fn set_hook(f: fn()) {
    let _ = HOOK.set(f);
}

/// Calls the hook, if one is set: in a backend, raises the pending cancel or timeout as an
/// error. Cheap enough for every iteration: one atomic load, and the hook's own flag test.
#[inline]
pub fn check() {
    if let Some(f) = HOOK.get() {
        f();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static CALLS: AtomicUsize = AtomicUsize::new(0);

    fn count() {
        CALLS.fetch_add(1, Ordering::Relaxed);
    }

    #[test]
    fn check_calls_the_hook_once_set() {
        // Process-wide: other tests may call `check` too, so only a lower bound is certain.
        // The hook only counts, so it changes nothing for them.
        set_hook(count);
        let before = CALLS.load(Ordering::Relaxed);
        check();
        check();
        assert!(CALLS.load(Ordering::Relaxed) >= before + 2);
        // the first hook stays
        set_hook(|| panic!("a second hook must not replace the first"));
        check();
    }
}
