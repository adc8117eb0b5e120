//! Pure Rust rules of the Tasker workflow engine. Nothing in here touches PostgreSQL or pgrx,
//! so every rule can be tested with plain `#[test]`s.

pub mod backoff;
pub mod condition;
pub mod context;
pub mod dag;
pub mod dynamic;
pub mod error;
pub mod events;
pub mod finalize;
pub mod ident;
pub mod interrupt;
pub mod json;
pub mod jsonschema;
pub mod options;
pub mod outcomes;
#[cfg(test)]
mod proptests;
pub mod readiness;
pub mod state;
pub mod template;
