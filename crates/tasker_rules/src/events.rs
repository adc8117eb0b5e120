//! The lifecycle event catalog: the public contract of event names (Rails' `Tasker::Constants`
//! events, grouped as task, step, workflow and observability events).

/// One catalogued event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventSpec {
    pub name: &'static str,
    /// What emits it in tasker_core: `transition` (a state change), `orchestration` (the worker
    /// protocol and finalization), or `declared` (kept in the catalog for compatibility).
    pub source: &'static str,
    pub description: &'static str,
}

const fn ev(name: &'static str, source: &'static str, description: &'static str) -> EventSpec {
    EventSpec { name, source, description }
}

/// Every event name, once.
pub const CATALOG: &[EventSpec] = &[
    // task
    ev("task.initialize_requested", "transition", "a task entered pending (not from error)"),
    ev("task.start_requested", "transition", "a task entered in_progress"),
    ev("task.completed", "transition", "a task entered complete"),
    ev("task.failed", "transition", "a task entered error"),
    ev("task.retry_requested", "transition", "a task went from error back to pending"),
    ev("task.cancelled", "transition", "a task entered cancelled"),
    ev("task.resolved_manually", "transition", "a task was resolved by an operator"),
    ev("task.before_transition", "declared", "before a task transition (Rails in-process hook)"),
    // step
    ev("step.initialize_requested", "transition", "a step entered pending (not from error)"),
    ev("step.execution_requested", "transition", "a step entered in_progress (claimed)"),
    ev("step.before_handle", "declared", "before a handler runs (worker-side)"),
    ev("step.handle", "declared", "a handler ran (worker-side)"),
    ev("step.completed", "transition", "a step entered complete"),
    ev("step.failed", "transition", "a step entered error"),
    ev("step.retry_requested", "transition", "a step went from error back to pending"),
    ev("step.cancelled", "transition", "a step entered cancelled"),
    ev("step.resolved_manually", "transition", "a step was resolved by an operator"),
    ev("step.before_transition", "declared", "before a step transition (Rails in-process hook)"),
    ev(
        "step.skipped",
        "orchestration",
        "a conditional step was skipped (recorded as resolved_manually)",
    ),
    ev("step.map_expanded", "orchestration", "a map step was expanded into one step per element"),
    // workflow
    ev("workflow.task_started", "orchestration", "orchestration of a task began"),
    ev("workflow.task_completed", "declared", "orchestration of a task finished"),
    ev("workflow.task_failed", "declared", "orchestration of a task failed"),
    ev("workflow.step_completed", "declared", "a step finished within orchestration"),
    ev("workflow.step_failed", "declared", "a step failed within orchestration"),
    ev("workflow.viable_steps_discovered", "orchestration", "steps became ready to run"),
    ev("workflow.no_viable_steps", "declared", "no step of a task can run now"),
    ev("workflow.orchestration_requested", "declared", "orchestration was requested"),
    ev("workflow.task_finalization_started", "orchestration", "finalization of a task began"),
    ev("workflow.task_finalization_completed", "orchestration", "finalization of a task decided"),
    ev("workflow.task_reenqueue_started", "declared", "re-enqueueing a task began"),
    ev("workflow.task_reenqueue_requested", "declared", "a task was re-enqueued"),
    ev("workflow.task_reenqueue_failed", "declared", "re-enqueueing a task failed"),
    ev("workflow.task_reenqueue_delayed", "declared", "a task was re-enqueued with a delay"),
    ev("workflow.task_state_unclear", "declared", "a task's state could not be decided"),
    ev("workflow.step_execution_failed", "declared", "a step could not be executed"),
    ev("workflow.viable_steps_batch_ready", "declared", "a batch of ready steps was prepared"),
    ev("workflow.steps_execution_started", "declared", "a batch of steps started"),
    ev("workflow.steps_execution_completed", "declared", "a batch of steps finished"),
    // observability
    ev("observability.task.handle", "declared", "a task was handled"),
    ev("observability.task.enqueue", "orchestration", "a task was created and enqueued"),
    ev("observability.task.finalize", "declared", "a task was finalized"),
    ev("observability.step.handle", "declared", "a step was handled"),
    ev("observability.step.find_viable", "declared", "ready steps were looked up"),
    ev("observability.step.backoff", "orchestration", "a step was put in backoff"),
    ev("observability.step.skip", "declared", "a step was skipped"),
    ev("observability.step.max_retries_reached", "orchestration", "a step used up its retries"),
];

/// Whether `name` is a catalogued event.
pub fn is_catalogued(name: &str) -> bool {
    CATALOG.iter().any(|e| e.name == name)
}

/// The group of an event name (`task`, `step`, `workflow`, `observability`).
pub fn group(name: &str) -> &str {
    name.split('.').next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_grouped() {
        let mut seen = std::collections::HashSet::new();
        for e in CATALOG {
            assert!(seen.insert(e.name), "duplicate {}", e.name);
            assert!(matches!(group(e.name), "task" | "step" | "workflow" | "observability"));
            assert!(matches!(e.source, "transition" | "orchestration" | "declared"));
        }
        let count = |g: &str| CATALOG.iter().filter(|e| group(e.name) == g).count();
        assert_eq!(
            (count("task"), count("step"), count("workflow"), count("observability")),
            (8, 12, 19, 8)
        );
    }
}
