//! Vectors kept from one call to the next. A call reading the facts of thousands of steps
//! fills vectors of hundreds of kilobytes; allocated afresh on every call they cost the allocator's
//! growth copies and the kernel's page faults on fresh memory (a fifth of a 1,000-step call
//! under `perf`). Each backend keeps one spare vector per element type: handed out empty,
//! given back after use, and dropped instead of kept when it grew beyond `KEPT`.

use crate::core::readiness::StepFacts;
use std::cell::RefCell;
use std::thread::LocalKey;

/// The most elements a kept vector may hold room for (about 2.5 MB of step facts).
const KEPT: usize = 16_384;

/// An element type with a spare vector per backend.
pub trait Spare: Sized + 'static {
    fn slot() -> &'static LocalKey<RefCell<Vec<Self>>>;
}

thread_local! {
    static FACTS: RefCell<Vec<StepFacts>> = const { RefCell::new(Vec::new()) };
}

impl Spare for StepFacts {
    fn slot() -> &'static LocalKey<RefCell<Vec<Self>>> {
        &FACTS
    }
}

/// The spare vector of `T` (empty, with the room of earlier calls), or a new one.
pub fn take<T: Spare>() -> Vec<T> {
    T::slot().with(|s| s.try_borrow_mut().map(|mut s| std::mem::take(&mut *s)).unwrap_or_default())
}

/// Gives `v` back for the next call, emptied.
pub fn give_back<T: Spare>(mut v: Vec<T>) {
    v.clear();
    if v.capacity() <= KEPT {
        T::slot().with(|s| {
            if let Ok(mut s) = s.try_borrow_mut() {
                if s.capacity() < v.capacity() {
                    *s = v;
                }
            }
        });
    }
}
