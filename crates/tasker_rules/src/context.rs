//! Task execution context: step counts and the first-match decision tables of the Rails
//! `get_task_execution_context`.

use super::interrupt;
use super::readiness::Readiness;

/// Step counts of one task, from its readiness rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepCounts {
    pub total: i64,
    pub pending: i64,
    pub in_progress: i64,
    pub completed: i64,
    pub failed: i64,
    pub ready: i64,
    /// In error with `attempts >= retry_limit` (the Rails rule: non-retryable errors are not
    /// counted here).
    pub permanently_blocked: i64,
}

impl StepCounts {
    /// Adds one readiness row.
    pub fn add(&mut self, r: &Readiness) {
        self.add_step(&r.current_state, r.attempts, r.retry_limit, r.ready_for_execution);
    }

    /// Adds one step: its current state, attempts and retry limit (as readiness reports
    /// them), and whether it is ready for execution.
    pub fn add_step(&mut self, state: &str, attempts: i32, retry_limit: i32, ready: bool) {
        self.total += 1;
        match state {
            "pending" => self.pending += 1,
            "in_progress" => self.in_progress += 1,
            "complete" | "resolved_manually" => self.completed += 1,
            "error" => {
                self.failed += 1;
                if attempts >= retry_limit {
                    self.permanently_blocked += 1;
                }
            }
            _ => {}
        }
        if ready {
            self.ready += 1;
        }
    }

    /// Counts of a whole set of readiness rows.
    pub fn of<'a>(rows: impl IntoIterator<Item = &'a Readiness>) -> StepCounts {
        let mut c = StepCounts::default();
        for r in rows {
            interrupt::check();
            c.add(r);
        }
        c
    }

    /// `(execution_status, recommended_action)`, first match wins.
    pub fn execution_status(&self) -> (&'static str, &'static str) {
        if self.ready > 0 {
            ("has_ready_steps", "execute_ready_steps")
        } else if self.in_progress > 0 {
            ("processing", "wait_for_completion")
        } else if self.permanently_blocked > 0 {
            ("blocked_by_failures", "handle_failures")
        } else if self.completed == self.total && self.total > 0 {
            ("all_complete", "finalize_task")
        } else {
            ("waiting_for_dependencies", "wait_for_dependencies")
        }
    }

    /// `health_status`, first match wins.
    pub fn health_status(&self) -> &'static str {
        if self.failed == 0 {
            "healthy"
        } else if self.ready > 0 {
            "recovering"
        } else if self.permanently_blocked > 0 {
            "blocked"
        } else {
            // failed > 0, nothing permanently blocked, nothing ready
            "recovering"
        }
    }

    /// `completion_percentage` as numeric text: `0.0` without steps, else
    /// `ROUND(completed / total * 100, 2)` (half away from zero, two decimals).
    pub fn completion_percentage(&self) -> String {
        if self.total == 0 {
            return "0.0".to_owned();
        }
        let (c, t) = (self.completed as i128, self.total as i128);
        // hundredths of a percent, rounded half up (all values are non-negative)
        let hundredths = (2 * c * 10_000 + t) / (2 * t);
        format!("{}.{:02}", hundredths / 100, hundredths % 100)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(total: i64, f: impl FnOnce(&mut StepCounts)) -> StepCounts {
        let mut c = StepCounts { total, ..Default::default() };
        f(&mut c);
        c
    }

    #[test]
    fn decision_table_first_match_wins() {
        let c = counts(3, |c| {
            c.ready = 1;
            c.in_progress = 1;
            c.permanently_blocked = 1;
        });
        assert_eq!(c.execution_status().0, "has_ready_steps");
        let c = counts(3, |c| {
            c.in_progress = 1;
            c.permanently_blocked = 1;
        });
        assert_eq!(c.execution_status(), ("processing", "wait_for_completion"));
        let c = counts(3, |c| c.permanently_blocked = 1);
        assert_eq!(c.execution_status(), ("blocked_by_failures", "handle_failures"));
        let c = counts(3, |c| c.completed = 3);
        assert_eq!(c.execution_status(), ("all_complete", "finalize_task"));
        assert_eq!(
            StepCounts::default().execution_status(),
            ("waiting_for_dependencies", "wait_for_dependencies")
        );
    }

    #[test]
    fn health_table() {
        assert_eq!(counts(2, |_| {}).health_status(), "healthy");
        assert_eq!(
            counts(2, |c| {
                c.failed = 1;
                c.ready = 1;
            })
            .health_status(),
            "recovering"
        );
        assert_eq!(
            counts(2, |c| {
                c.failed = 1;
                c.permanently_blocked = 1;
            })
            .health_status(),
            "blocked"
        );
        assert_eq!(counts(2, |c| c.failed = 1).health_status(), "recovering");
    }

    #[test]
    fn completion_percentage_rounds_like_numeric() {
        assert_eq!(StepCounts::default().completion_percentage(), "0.0");
        assert_eq!(counts(3, |c| c.completed = 1).completion_percentage(), "33.33");
        assert_eq!(counts(3, |c| c.completed = 2).completion_percentage(), "66.67");
        assert_eq!(counts(8, |c| c.completed = 1).completion_percentage(), "12.50");
        assert_eq!(counts(1, |c| c.completed = 1).completion_percentage(), "100.00");
        assert_eq!(counts(7, |c| c.completed = 0).completion_percentage(), "0.00");
        // 1/1600 = 0.0625 % -> 0.06; 1/800 = 0.125 % -> 0.13 (half up)
        assert_eq!(counts(1600, |c| c.completed = 1).completion_percentage(), "0.06");
        assert_eq!(counts(800, |c| c.completed = 1).completion_percentage(), "0.13");
    }
}
