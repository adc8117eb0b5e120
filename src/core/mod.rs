//! Pure Rust rules of the Tasker workflow engine. Nothing in here touches PostgreSQL or pgrx,
//! so every rule can be tested with plain `#[test]`s.

pub mod dag;
pub mod error;
pub mod ident;
pub mod state;
