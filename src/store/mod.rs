//! Reads and writes of the Tasker tables through SPI. This is the only module that knows
//! table and column names.

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
