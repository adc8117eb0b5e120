//! Every error a caller can branch on, each with its own SQLSTATE.
//!
//! Standard SQLSTATEs are used where PostgreSQL has one for the condition; domain errors use
//! the custom class `TK` (documented in the README). Messages are lower case and name the
//! entity and the values involved.

use thiserror::Error;

/// An error raised by tasker_core to a SQL caller.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TaskerError {
    /// A caller-supplied identifier cannot be used.
    #[error("invalid {what} name {name:?}: {reason}")]
    InvalidName { what: &'static str, name: String, reason: &'static str },
    /// A required argument was NULL or empty.
    #[error("{argument} must not be null")]
    NullArgument { argument: &'static str },
    /// The Tasker tables were not found in the configured data schema.
    #[error("tasker data schema {schema:?} is not installed: table {table} is missing (run tasker_core.install_schema({schema:?}) or set tasker_core.data_schema)")]
    SchemaNotInstalled { schema: String, table: &'static str },
    /// A task or step does not exist.
    #[error("{entity} {id} not found")]
    NotFound { entity: &'static str, id: i64 },
    /// The dependency graph of a task contains a cycle.
    #[error("dependency cycle among steps {}", format_ids(.steps))]
    CycleDetected { steps: Vec<i64> },
    /// A state name that is not one of the six.
    #[error("unknown {entity} state {state:?} for {entity} {id} (states: pending, in_progress, complete, error, cancelled, resolved_manually)")]
    UnknownState { entity: &'static str, id: i64, state: String },
    /// The state machine has no such edge.
    #[error("{entity} {id} cannot go from {from} to {to}")]
    TransitionNotAllowed { entity: &'static str, id: i64, from: String, to: String },
    /// The edge exists but its guard refuses it now.
    #[error("{entity} {id} cannot go from {from} to {to}: {reason}")]
    GuardFailed { entity: &'static str, id: i64, from: String, to: String, reason: String },
    /// Compare-and-swap failed: the owner is not in the expected state.
    #[error("{entity} {id} is in state {actual}, not {expected}, so it cannot go to {to}")]
    ExpectedFromMismatch {
        entity: &'static str,
        id: i64,
        expected: String,
        actual: String,
        to: String,
    },
    /// Concurrent writers kept winning the race for the same owner.
    #[error("{entity} {id} changed concurrently {attempts} times while going to {to}; try again")]
    TransitionConflict { entity: &'static str, id: i64, to: String, attempts: u32 },
    /// An argument has the right type but an unusable value.
    #[error("invalid {argument}: {reason}")]
    InvalidArgument { argument: &'static str, reason: String },
    /// A template that is not a valid task template.
    #[error("invalid task template: {reason}")]
    InvalidTemplate { reason: String },
    /// Two steps of a template share a name.
    #[error("invalid task template: step name {name:?} is used twice")]
    DuplicateStepName { name: String },
    /// A step depends on a step the template does not declare.
    #[error("invalid task template: step {step:?} depends on unknown step {dependency:?}")]
    UnknownDependency { step: String, dependency: String },
    /// The dependencies of a template form a cycle.
    #[error("invalid task template: dependency cycle {}", .steps.join(" -> "))]
    TemplateCycle { steps: Vec<String> },
    /// A version that is not MAJOR.MINOR.PATCH.
    #[error("invalid task template: version {version:?} is not MAJOR.MINOR.PATCH")]
    MalformedVersion { version: String },
    /// A step without a handler class.
    #[error("invalid task template: step {step:?} has no handler_class")]
    MissingHandlerClass { step: String },
    /// No template registered under that name.
    #[error("no task template {namespace}.{name}{}", .version.as_ref().map(|v| format!("@{v}")).unwrap_or_default())]
    UnknownTemplate { namespace: String, name: String, version: Option<String> },
    /// The task context does not satisfy the template's JSON schema.
    #[error("task context does not match the schema of {template}: {}", .violations.join("; "))]
    ContextInvalid { template: String, violations: Vec<String> },
    /// A configured limit was exceeded.
    #[error("too many {what}: {actual} (the limit is {limit})")]
    LimitExceeded { what: &'static str, limit: i64, actual: i64 },
    /// A worker acted on a step it does not (or no longer) hold the lease of. The message
    /// names the caller's worker id, never the holder's: another login must not learn it.
    #[error("step {step_id} is not leased to worker {worker:?}{}", .detail)]
    LeaseLost { step_id: i64, worker: String, detail: String },
    /// An operator call on a step of a task that is finished (complete, cancelled or
    /// resolved): a finished task is final.
    #[error("step {step_id} cannot be resolved manually: task {task_id} is {state}, and a finished task is final")]
    TaskFinished { step_id: i64, task_id: i64, state: String },
    /// A JSON argument nested deeper than tasker_core accepts.
    #[error("{argument} is nested {depth} levels deep (the limit is {limit})")]
    JsonTooDeep { argument: &'static str, depth: usize, limit: usize },
    /// The maintained state the native surface reads is not enabled for the data schema.
    #[error(
        "tracking is not enabled for data schema {schema:?}: run tasker_core.enable_tracking()"
    )]
    TrackingDisabled { schema: String },
    /// A failure inside tasker_core that no input should cause.
    #[error("tasker_core internal error: {context}")]
    Internal { context: String },
    /// A named entity (a subscription, a template) does not exist.
    #[error("{entity} {name:?} not found")]
    NamedNotFound { entity: &'static str, name: String },
}

fn format_ids(ids: &[i64]) -> String {
    ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" -> ")
}

impl TaskerError {
    /// The five-character SQLSTATE of this error.
    pub const fn sqlstate(&self) -> &'static str {
        match self {
            TaskerError::InvalidName { .. } => "42602", // invalid_name
            TaskerError::NullArgument { .. } => "22004", // null_value_not_allowed
            TaskerError::SchemaNotInstalled { .. } => "TK010",
            TaskerError::NotFound { .. } => "TK004",
            TaskerError::CycleDetected { .. } => "TK006",
            TaskerError::UnknownState { .. } => "TK001",
            TaskerError::TransitionNotAllowed { .. } => "TK002",
            TaskerError::GuardFailed { .. } => "TK003",
            TaskerError::ExpectedFromMismatch { .. } => "TK005",
            TaskerError::TransitionConflict { .. } => "TK013",
            TaskerError::InvalidArgument { .. } => "22023", // invalid_parameter_value
            TaskerError::NamedNotFound { .. } => "TK004",
            TaskerError::Internal { .. } => "XX000",
            TaskerError::InvalidTemplate { .. } => "TK020",
            TaskerError::DuplicateStepName { .. } => "TK021",
            TaskerError::UnknownDependency { .. } => "TK022",
            TaskerError::TemplateCycle { .. } => "TK006",
            TaskerError::MalformedVersion { .. } => "TK023",
            TaskerError::MissingHandlerClass { .. } => "TK024",
            TaskerError::UnknownTemplate { .. } => "TK007",
            TaskerError::ContextInvalid { .. } => "TK025",
            TaskerError::LimitExceeded { .. } => "54000", // program_limit_exceeded
            TaskerError::LeaseLost { .. } => "TK030",
            TaskerError::TrackingDisabled { .. } => "TK011",
            TaskerError::JsonTooDeep { .. } => "TK026",
            TaskerError::TaskFinished { .. } => "TK002",
        }
    }
}

/// The custom SQLSTATEs of class `TK`, with their condition names, for documentation and tests.
pub const CUSTOM_SQLSTATES: &[(&str, &str)] = &[
    ("TK001", "unknown_state"),
    ("TK002", "transition_not_allowed"),
    ("TK003", "guard_failed"),
    ("TK004", "entity_not_found"),
    ("TK005", "expected_from_mismatch"),
    ("TK006", "cycle_detected"),
    ("TK007", "unknown_template"),
    ("TK010", "schema_not_installed"),
    ("TK011", "tracking_not_enabled"),
    ("TK012", "tracking_conflict"),
    ("TK013", "transition_conflict"),
    ("TK020", "invalid_template"),
    ("TK021", "duplicate_step_name"),
    ("TK022", "unknown_dependency"),
    ("TK023", "malformed_version"),
    ("TK024", "missing_handler_class"),
    ("TK025", "context_invalid"),
    ("TK026", "json_too_deep"),
    ("TK030", "lease_lost"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_are_five_uppercase_alphanumerics() {
        let errors = [
            TaskerError::InvalidName { what: "schema", name: "x".into(), reason: "r" },
            TaskerError::NullArgument { argument: "a" },
            TaskerError::SchemaNotInstalled { schema: "s".into(), table: "t" },
            TaskerError::NotFound { entity: "task", id: 1 },
            TaskerError::CycleDetected { steps: vec![1, 2] },
        ];
        for e in errors {
            let code = e.sqlstate();
            assert_eq!(code.len(), 5);
            assert!(code.chars().all(|c| c.is_ascii_digit() || c.is_ascii_uppercase()));
        }
    }

    #[test]
    fn custom_codes_are_unique_and_in_class_tk() {
        let mut seen = std::collections::HashSet::new();
        for (code, _) in CUSTOM_SQLSTATES {
            assert!(code.starts_with("TK"));
            assert!(seen.insert(code), "duplicate {code}");
        }
    }

    #[test]
    fn messages_name_the_values() {
        let e = TaskerError::CycleDetected { steps: vec![3, 5, 3] };
        assert_eq!(e.to_string(), "dependency cycle among steps 3 -> 5 -> 3");
        let e = TaskerError::NotFound { entity: "task", id: 42 };
        assert_eq!(e.to_string(), "task 42 not found");
    }
}
