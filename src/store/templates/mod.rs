//! Task templates in the Rails tables (namespaces, named tasks, dependent systems, named steps,
//! named_tasks_named_steps, the template JSON in `tasker_named_tasks.configuration`), and task
//! creation from them.

mod creation;
mod idempotency;
mod listing;
mod lookup;
mod registration;

pub use creation::{create_task, next_step_id, TaskOptions};
pub use listing::{list, Listed};
pub use lookup::{find, find_for_creation, ForCreation, Stored, TemplateRef};
pub use registration::{normalized_json, register};
