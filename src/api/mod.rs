//! SQL-facing functions, grouped by area. Each converts between SQL and `core`/`store` and
//! raises errors with their SQLSTATE; none holds logic of its own.

pub mod args;
pub mod compat;
pub mod error;
pub mod json;
pub mod ops;
pub mod schema;
pub mod srf;
pub mod tasks;
pub mod templates;
pub mod timer;
pub mod transitions;
pub mod worker;
pub mod workflow;
