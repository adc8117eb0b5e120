//! Reads and writes of the Tasker tables through SPI. This is the only module that knows
//! table and column names.

pub mod direct;
pub mod events;
pub mod facts;
pub mod locks;
pub mod maintenance;
pub mod plans;
pub mod rows;
pub mod schema;
pub mod settings;
pub mod templates;
pub mod transitions;
pub mod wakeups;
pub mod worker;
pub mod workflow;

use crate::core::error::TaskerError;

/// An SPI failure (a bug or a broken database, never bad input: that has its own errors) as
/// the store reports it: `XX000` with SPI's message. The one conversion every store module
/// uses (`.map_err(spi)`).
/// An internal error: something tasker_core wrote itself is not as it left it.
pub(crate) fn internal(context: impl Into<String>) -> TaskerError {
    TaskerError::Internal { context: context.into() }
}

pub(crate) fn spi(e: pgrx::spi::Error) -> TaskerError {
    TaskerError::Internal { context: format!("SPI failure: {e}") }
}
