//! The finalizer's decision: what becomes of a task after one of its steps finished (Rails'
//! decision table, first match wins, with the native rules for counting). The store gathers
//! the counts under the task's lock and applies the decision.

/// Step counts of a task by the native rules: a non-retryable error counts as permanently
/// blocked (the Rails function would wait for it forever).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TaskCounts {
    pub total: i64,
    /// complete or resolved_manually
    pub done: i64,
    pub in_progress: i64,
    /// claimable now (native readiness)
    pub ready: i64,
    /// in error and retryable, waiting out a backoff
    pub waiting: i64,
    /// in error with retries exhausted, or not retryable
    pub blocked: i64,
}

/// What the finalizer does with a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finalization {
    /// Every step is done: the task completes.
    AllComplete,
    /// Steps are ready: the task stays in progress and workers are woken.
    HasReadySteps,
    /// Steps are running: nothing changes.
    Processing,
    /// Nothing can run any more and a step failed for good: the task goes to error.
    BlockedByFailures,
    /// Steps wait for a backoff or their parents: nothing changes.
    WaitingForDependencies,
}

impl Finalization {
    /// The decision for a task with these counts (first match wins). A task without steps
    /// waits: it has nothing to complete.
    pub fn decide(c: &TaskCounts) -> Finalization {
        if c.total > 0 && c.done == c.total {
            Finalization::AllComplete
        } else if c.ready > 0 {
            Finalization::HasReadySteps
        } else if c.in_progress > 0 {
            Finalization::Processing
        } else if c.blocked > 0 {
            Finalization::BlockedByFailures
        } else {
            Finalization::WaitingForDependencies
        }
    }

    /// The `execution_status` word of events and transition metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Finalization::AllComplete => "all_complete",
            Finalization::HasReadySteps => "has_ready_steps",
            Finalization::Processing => "processing",
            Finalization::BlockedByFailures => "blocked_by_failures",
            Finalization::WaitingForDependencies => "waiting_for_dependencies",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(f: impl FnOnce(&mut TaskCounts)) -> TaskCounts {
        let mut c = TaskCounts { total: 4, ..TaskCounts::default() };
        f(&mut c);
        c
    }

    #[test]
    fn every_step_done_completes_the_task() {
        let c = counts(|c| c.done = 4);
        assert_eq!(Finalization::decide(&c), Finalization::AllComplete);
        assert_eq!(Finalization::decide(&c).as_str(), "all_complete");
    }

    #[test]
    fn first_match_wins() {
        // ready beats running, running beats a permanent failure
        let c = counts(|c| {
            c.done = 1;
            c.ready = 1;
            c.in_progress = 1;
            c.blocked = 1;
        });
        assert_eq!(Finalization::decide(&c), Finalization::HasReadySteps);
        let c = counts(|c| {
            c.in_progress = 1;
            c.blocked = 1;
        });
        assert_eq!(Finalization::decide(&c), Finalization::Processing);
        let c = counts(|c| {
            c.done = 3;
            c.blocked = 1;
        });
        assert_eq!(Finalization::decide(&c), Finalization::BlockedByFailures);
        // a failure that will be retried is waiting, not blocked
        let c = counts(|c| {
            c.done = 3;
            c.waiting = 1;
        });
        assert_eq!(Finalization::decide(&c), Finalization::WaitingForDependencies);
    }

    #[test]
    fn a_task_without_steps_waits() {
        assert_eq!(
            Finalization::decide(&TaskCounts::default()),
            Finalization::WaitingForDependencies
        );
    }

    #[test]
    fn the_words_are_the_rails_words() {
        let all = [
            Finalization::AllComplete,
            Finalization::HasReadySteps,
            Finalization::Processing,
            Finalization::BlockedByFailures,
            Finalization::WaitingForDependencies,
        ];
        let words: Vec<&str> = all.iter().map(|f| f.as_str()).collect();
        assert_eq!(
            words,
            [
                "all_complete",
                "has_ready_steps",
                "processing",
                "blocked_by_failures",
                "waiting_for_dependencies"
            ]
        );
    }
}
