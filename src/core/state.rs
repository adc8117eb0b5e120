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
    fn only_complete_and_resolved_satisfy_dependencies() {
        let satisfying: Vec<_> = State::ALL
            .into_iter()
            .filter(|s| s.satisfies_dependency())
            .collect();
        assert_eq!(satisfying, vec![State::Complete, State::ResolvedManually]);
    }
}
