//! The six states shared by Tasker tasks and workflow steps.

use std::fmt;

/// A task or step state, as stored in `to_state` / `from_state` of the transition tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Pending,
    InProgress,
    Complete,
    Error,
    Cancelled,
    ResolvedManually,
}

impl State {
    /// Every state, in the order Rails declares them.
    pub const ALL: [State; 6] = [
        State::Pending,
        State::InProgress,
        State::Complete,
        State::Error,
        State::Cancelled,
        State::ResolvedManually,
    ];

    /// The string stored in the database.
    pub const fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::InProgress => "in_progress",
            State::Complete => "complete",
            State::Error => "error",
            State::Cancelled => "cancelled",
            State::ResolvedManually => "resolved_manually",
        }
    }

    /// Parses a stored state string; `None` for anything that is not one of the six.
    pub fn parse(s: &str) -> Option<State> {
        State::ALL.iter().copied().find(|st| st.as_str() == s)
    }

    /// The state of an owner given its most recent transition (no transition means pending).
    pub fn current(most_recent_to_state: Option<&str>) -> Option<State> {
        match most_recent_to_state {
            None => Some(State::Pending),
            Some(s) => State::parse(s),
        }
    }

    /// Whether a step in this state satisfies its children's dependency on it.
    pub const fn satisfies_dependency(self) -> bool {
        matches!(self, State::Complete | State::ResolvedManually)
    }
}

/// What a state machine belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entity {
    Task,
    Step,
}

impl Entity {
    /// `"task"` or `"step"`, as used in messages and event names.
    pub const fn as_str(self) -> &'static str {
        match self {
            Entity::Task => "task",
            Entity::Step => "step",
        }
    }

    /// The states this entity may move to from `from` (Rails' Statesman machines).
    pub const fn successors(self, from: State) -> &'static [State] {
        use State::*;
        match (self, from) {
            (Entity::Task, Pending) => &[InProgress, Cancelled, Error],
            (Entity::Task, InProgress) => &[Complete, Error, Cancelled, Pending],
            (Entity::Task, Error) => &[Pending, ResolvedManually],
            (Entity::Task, Complete) => &[Cancelled],
            (Entity::Task, ResolvedManually) => &[Cancelled],
            (Entity::Task, Cancelled) => &[],
            (Entity::Step, Pending) => &[InProgress, Error, Cancelled, ResolvedManually],
            (Entity::Step, InProgress) => &[Complete, Error, Cancelled],
            (Entity::Step, Error) => &[Pending, ResolvedManually],
            (Entity::Step, Complete | Cancelled | ResolvedManually) => &[],
        }
    }

    /// Whether `from -> to` is an allowed transition.
    pub fn allows(self, from: State, to: State) -> bool {
        self.successors(from).contains(&to)
    }

    /// The lifecycle event of a transition, from-aware: `error -> pending` is a retry.
    pub const fn transition_event(self, from: State, to: State) -> &'static str {
        use State::*;
        match (self, from, to) {
            (Entity::Task, Error, Pending) => "task.retry_requested",
            (Entity::Task, _, Pending) => "task.initialize_requested",
            (Entity::Task, _, InProgress) => "task.start_requested",
            (Entity::Task, _, Complete) => "task.completed",
            (Entity::Task, _, Error) => "task.failed",
            (Entity::Task, _, Cancelled) => "task.cancelled",
            (Entity::Task, _, ResolvedManually) => "task.resolved_manually",
            (Entity::Step, Error, Pending) => "step.retry_requested",
            (Entity::Step, _, Pending) => "step.initialize_requested",
            (Entity::Step, _, InProgress) => "step.execution_requested",
            (Entity::Step, _, Complete) => "step.completed",
            (Entity::Step, _, Error) => "step.failed",
            (Entity::Step, _, Cancelled) => "step.cancelled",
            (Entity::Step, _, ResolvedManually) => "step.resolved_manually",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_state() {
        for st in State::ALL {
            assert_eq!(State::parse(st.as_str()), Some(st));
            assert_eq!(st.to_string(), st.as_str());
        }
    }

    #[test]
    fn rejects_unknown_and_legacy_names() {
        for s in ["", "failed", "skipped", "Pending", "complete "] {
            assert_eq!(State::parse(s), None, "{s:?} must not parse");
        }
    }

    #[test]
    fn no_transition_means_pending() {
        assert_eq!(State::current(None), Some(State::Pending));
        assert_eq!(State::current(Some("error")), Some(State::Error));
        assert_eq!(State::current(Some("bogus")), None);
    }

    #[test]
    fn machines_match_rails() {
        use State::*;
        let step_edges: Vec<(State, State)> = State::ALL
            .iter()
            .flat_map(|&f| State::ALL.iter().map(move |&t| (f, t)))
            .filter(|&(f, t)| Entity::Step.allows(f, t))
            .collect();
        assert_eq!(step_edges.len(), 9);
        assert!(!Entity::Step.allows(Error, InProgress), "a retry goes through pending");
        assert!(Entity::Step.allows(Error, Pending));
        assert!(!Entity::Task.allows(Error, Cancelled));
        assert!(Entity::Task.allows(Complete, Cancelled));
        for terminal in [Complete, Cancelled, ResolvedManually] {
            assert!(Entity::Step.successors(terminal).is_empty());
        }
        assert!(Entity::Task.successors(Cancelled).is_empty());
        let task_edges = State::ALL
            .iter()
            .flat_map(|&f| State::ALL.iter().map(move |&t| (f, t)))
            .filter(|&(f, t)| Entity::Task.allows(f, t))
            .count();
        assert_eq!(task_edges, 11);
    }

    #[test]
    fn events_are_from_aware() {
        use State::*;
        assert_eq!(Entity::Step.transition_event(Error, Pending), "step.retry_requested");
        assert_eq!(Entity::Step.transition_event(Pending, InProgress), "step.execution_requested");
        assert_eq!(Entity::Task.transition_event(InProgress, Pending), "task.initialize_requested");
        assert_eq!(Entity::Task.transition_event(Error, Pending), "task.retry_requested");
        for from in State::ALL {
            for to in State::ALL {
                for entity in [Entity::Task, Entity::Step] {
                    let e = entity.transition_event(from, to);
                    assert!(crate::events::is_catalogued(e), "{e} not in the catalog");
                    assert!(e.starts_with(entity.as_str()));
                }
            }
        }
    }

    #[test]
    fn only_complete_and_resolved_satisfy_dependencies() {
        let satisfying: Vec<_> =
            State::ALL.into_iter().filter(|s| s.satisfies_dependency()).collect();
        assert_eq!(satisfying, vec![State::Complete, State::ResolvedManually]);
    }
}
