//! Step readiness: the rules of the Rails `get_step_readiness_status` (v02), exactly.
//!
//! Timestamps are PostgreSQL's internal representation: microseconds since 2000-01-01,
//! `i64::MIN` / `i64::MAX` for -infinity / infinity. Arithmetic follows PostgreSQL's own
//! (`power`, `interval * float8`, `timestamp + interval`), including its range errors, so the
//! results — and the failures — are the ones the Rails SQL gives.

use super::interrupt;
use super::state::State;
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
pub use smallvec::SmallVec;
pub use smol_str::SmolStr;
use std::rc::Rc;
use thiserror::Error;

/// Default `retry_limit` when the column is NULL.
pub const DEFAULT_RETRY_LIMIT: i32 = 3;
/// Cap of the failure backoff, in seconds.
pub const FAILURE_BACKOFF_CAP_SECONDS: i64 = 30;

/// PostgreSQL's MIN_TIMESTAMP (4714-11-24 BC) in microseconds since 2000-01-01.
const MIN_TIMESTAMP: i64 = -211_813_488_000_000_000;
/// PostgreSQL's END_TIMESTAMP (294277-01-01), exclusive.
const END_TIMESTAMP: i64 = 9_223_371_331_200_000_000;

/// A PostgreSQL arithmetic error the Rails SQL would raise for the same data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TimeError {
    #[error("value out of range: overflow")]
    FloatOverflow,
    #[error("value out of range: underflow")]
    FloatUnderflow,
    #[error("interval out of range")]
    IntervalOutOfRange,
    #[error("timestamp out of range")]
    TimestampOutOfRange,
}

impl TimeError {
    /// The SQLSTATE PostgreSQL raises for this error.
    pub const fn sqlstate(self) -> &'static str {
        match self {
            TimeError::FloatOverflow | TimeError::FloatUnderflow => "22003",
            TimeError::IntervalOutOfRange | TimeError::TimestampOutOfRange => "22008",
        }
    }
}

/// A step's parent ids: most steps have a few, kept inline without an allocation.
pub type ParentIds = SmallVec<[i64; 4]>;

/// What is stored about one step: its own columns, its current state and its parents.
#[derive(Debug, Clone, PartialEq)]
pub struct StepFacts {
    pub workflow_step_id: i64,
    pub task_id: i64,
    pub named_step_id: i32,
    /// Names are short: kept inline, no allocation per step (the hot read makes thousands).
    pub name: SmolStr,
    /// `to_state` of the most_recent transition; `None` when there is none.
    pub state: Option<Rc<str>>,
    /// `created_at` of the most_recent transition.
    pub state_at: Option<i64>,
    /// `from_step_id` of every edge into the step (duplicates kept).
    pub parent_ids: ParentIds,
    pub retryable: Option<bool>,
    pub retry_limit: Option<i32>,
    pub in_process: Option<bool>,
    pub processed: Option<bool>,
    pub attempts: Option<i32>,
    pub last_attempted_at: Option<i64>,
    pub backoff_request_seconds: Option<i32>,
}

impl StepFacts {
    /// `COALESCE(state, 'pending')`.
    pub fn current_state(&self) -> &str {
        self.inputs(0).current_state()
    }

    /// `COALESCE(state, 'pending')`, shared.
    fn current_state_rc(&self) -> Rc<str> {
        match &self.state {
            Some(s) => s.clone(),
            None => PENDING.with(Rc::clone),
        }
    }

    /// Whether this step, as a parent, satisfies its children.
    pub fn satisfies_children(&self) -> bool {
        state_satisfies(self.state.as_deref())
    }

    /// `created_at` of the current transition when the step is currently in error.
    pub fn last_failure_at(&self) -> Option<i64> {
        self.inputs(0).last_failure_at()
    }
}

thread_local! {
    static PENDING: Rc<str> = Rc::from(State::Pending.as_str());
}

/// Whether a most-recent `to_state` satisfies a dependency.
pub fn state_satisfies(state: Option<&str>) -> bool {
    state.and_then(State::parse).is_some_and(State::satisfies_dependency)
}

/// One row of `get_step_readiness_status`.
#[derive(Debug, Clone, PartialEq)]
pub struct Readiness {
    pub workflow_step_id: i64,
    pub task_id: i64,
    pub named_step_id: i32,
    pub name: SmolStr,
    pub current_state: Rc<str>,
    pub dependencies_satisfied: bool,
    pub retry_eligible: bool,
    pub ready_for_execution: bool,
    pub last_failure_at: Option<i64>,
    pub next_retry_at: Option<i64>,
    pub total_parents: i32,
    pub completed_parents: i32,
    pub attempts: i32,
    pub retry_limit: i32,
    pub backoff_request_seconds: Option<i32>,
    pub last_attempted_at: Option<i64>,
}

/// The comparison `timestamp <= now()`, which PostgreSQL performs after converting the
/// timestamp to timestamptz in the session time zone. Supplied by the caller.
pub trait Clock {
    fn is_at_or_before_now(&self, timestamp: i64) -> bool;
}

/// `rint(span_usecs * factor)` as `interval * float8` computes it for a pure-time interval.
fn interval_mul(span_usecs: i64, factor: f64) -> Result<i64, TimeError> {
    let r = (span_usecs as f64 * factor).round_ties_even();
    // FLOAT8_FITS_IN_INT64: -2^63 <= r < 2^63
    if r.is_nan() || !(-9_223_372_036_854_775_808.0..9_223_372_036_854_775_808.0).contains(&r) {
        return Err(TimeError::IntervalOutOfRange);
    }
    Ok(r as i64)
}

/// `power(2::float8, exponent::float8)` with PostgreSQL's overflow/underflow errors.
fn pow2(exponent: i32) -> Result<f64, TimeError> {
    let r = 2f64.powi(exponent);
    if r.is_infinite() {
        Err(TimeError::FloatOverflow)
    } else if r == 0.0 {
        Err(TimeError::FloatUnderflow)
    } else {
        Ok(r)
    }
}

/// `timestamp + interval` for a pure-time interval (infinite timestamps stay infinite).
pub fn timestamp_plus(ts: i64, usecs: i64) -> Result<i64, TimeError> {
    if ts == i64::MIN || ts == i64::MAX {
        return Ok(ts);
    }
    match ts.checked_add(usecs) {
        Some(r) if (MIN_TIMESTAMP..END_TIMESTAMP).contains(&r) => Ok(r),
        _ => Err(TimeError::TimestampOutOfRange),
    }
}

/// `LEAST(power(2, COALESCE(attempts, 1)) * interval '1 second', interval '30 seconds')` in µs.
pub fn failure_backoff_usecs(attempts: Option<i32>) -> Result<i64, TimeError> {
    let span = interval_mul(1_000_000, pow2(attempts.unwrap_or(1))?)?;
    Ok(span.min(FAILURE_BACKOFF_CAP_SECONDS * 1_000_000))
}

/// What the rules read of one step: its own facts, borrowed, and how many of its parents
/// there are and satisfy it. Built from [`StepFacts`] or straight from a stored row.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// `to_state` of the most_recent transition; `None` when there is none.
    pub state: Option<&'a str>,
    pub state_at: Option<i64>,
    pub total_parents: i32,
    pub completed_parents: i32,
    pub retryable: Option<bool>,
    pub retry_limit: Option<i32>,
    pub in_process: Option<bool>,
    pub processed: Option<bool>,
    pub attempts: Option<i32>,
    pub last_attempted_at: Option<i64>,
    pub backoff_request_seconds: Option<i32>,
}

impl<'a> Inputs<'a> {
    /// `COALESCE(state, 'pending')`.
    pub fn current_state(&self) -> &'a str {
        self.state.unwrap_or(State::Pending.as_str())
    }

    /// `created_at` of the current transition when the step is currently in error.
    pub fn last_failure_at(&self) -> Option<i64> {
        match self.state {
            Some("error") => self.state_at,
            _ => None,
        }
    }
}

impl StepFacts {
    /// The rules' inputs for this step, `completed` of its parents satisfying it.
    pub fn inputs(&self, completed: i32) -> Inputs<'_> {
        Inputs {
            state: self.state.as_deref(),
            state_at: self.state_at,
            total_parents: self.parent_ids.len() as i32,
            completed_parents: completed,
            retryable: self.retryable,
            retry_limit: self.retry_limit,
            in_process: self.in_process,
            processed: self.processed,
            attempts: self.attempts,
            last_attempted_at: self.last_attempted_at,
            backoff_request_seconds: self.backoff_request_seconds,
        }
    }
}

/// What the rules decide for one step (the computed columns of a readiness row).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Verdict {
    pub dependencies_satisfied: bool,
    pub retry_eligible: bool,
    pub ready_for_execution: bool,
    pub last_failure_at: Option<i64>,
    pub next_retry_at: Option<i64>,
    pub attempts: i32,
    pub retry_limit: i32,
}

/// When an explicit backoff applies: `last_attempted_at + backoff_request_seconds * 1s`.
pub fn explicit_backoff_until(step: &Inputs<'_>) -> Result<Option<i64>, TimeError> {
    match (step.backoff_request_seconds, step.last_attempted_at) {
        (Some(secs), Some(at)) => {
            let span = interval_mul(1_000_000, secs as f64)?;
            timestamp_plus(at, span).map(Some)
        }
        _ => Ok(None),
    }
}

/// When a failure backoff applies: `last_failure_at + failure backoff`.
pub fn failure_backoff_until(step: &Inputs<'_>) -> Result<Option<i64>, TimeError> {
    match step.last_failure_at() {
        Some(at) => timestamp_plus(at, failure_backoff_usecs(step.attempts)?).map(Some),
        None => Ok(None),
    }
}

/// Counts a step's parents that satisfy it. `parent_satisfied` answers for a parent id;
/// parents it does not know count as unsatisfied.
pub fn completed_parents(step: &StepFacts, parent_satisfied: impl Fn(i64) -> bool) -> i32 {
    step.parent_ids.iter().filter(|&&p| parent_satisfied(p)).count() as i32
}

/// Judges one step: the rules of the Rails function. The order of evaluation follows the
/// Rails SQL, so a step whose arithmetic overflows fails where the Rails function would fail.
pub fn judge(step: &Inputs<'_>, clock: &dyn Clock) -> Result<Verdict, TimeError> {
    let (total, completed) = (step.total_parents, step.completed_parents);
    let current_state = step.current_state();
    let dependencies_satisfied = total == 0 || completed == total;
    let attempts = step.attempts.unwrap_or(0);
    let retry_limit = step.retry_limit.unwrap_or(DEFAULT_RETRY_LIMIT);
    let retry_eligible = attempts < retry_limit;
    let last_failure_at = step.last_failure_at();

    // ready_for_execution: a left-to-right AND that stops at the first false.
    let ready_for_execution = (current_state == "pending" || current_state == "error")
        && step.processed != Some(true)
        && dependencies_satisfied
        && retry_eligible
        && step.retryable.unwrap_or(true)
        && step.in_process != Some(true)
        && match explicit_backoff_until(step)? {
            Some(until) => clock.is_at_or_before_now(until),
            None => true,
        }
        && match failure_backoff_until(step)? {
            Some(until) => clock.is_at_or_before_now(until),
            None => true,
        };

    let next_retry_at = match explicit_backoff_until(step)? {
        Some(until) => Some(until),
        None => failure_backoff_until(step)?,
    };

    Ok(Verdict {
        dependencies_satisfied,
        retry_eligible,
        ready_for_execution,
        last_failure_at,
        next_retry_at,
        attempts,
        retry_limit,
    })
}

/// Evaluates one step into its readiness row ([`judge`] with the step's identity).
pub fn evaluate(
    step: &StepFacts,
    completed: i32,
    clock: &dyn Clock,
) -> Result<Readiness, TimeError> {
    let v = judge(&step.inputs(completed), clock)?;
    Ok(Readiness {
        workflow_step_id: step.workflow_step_id,
        task_id: step.task_id,
        named_step_id: step.named_step_id,
        name: step.name.clone(),
        current_state: step.current_state_rc(),
        dependencies_satisfied: v.dependencies_satisfied,
        retry_eligible: v.retry_eligible,
        ready_for_execution: v.ready_for_execution,
        last_failure_at: v.last_failure_at,
        next_retry_at: v.next_retry_at,
        total_parents: step.parent_ids.len() as i32,
        completed_parents: completed,
        attempts: v.attempts,
        retry_limit: v.retry_limit,
        backoff_request_seconds: step.backoff_request_seconds,
        last_attempted_at: step.last_attempted_at,
    })
}

/// Whether each parent satisfies its children: the states of `steps` first, then of
/// `outside` (states of parents that belong to other tasks).
pub struct ParentStates<'a> {
    satisfied: HashMap<i64, bool>,
    outside: &'a HashMap<i64, Option<Rc<str>>>,
}

impl<'a> ParentStates<'a> {
    pub fn new(steps: &[StepFacts], outside: &'a HashMap<i64, Option<Rc<str>>>) -> Self {
        let satisfied =
            steps.iter().map(|s| (s.workflow_step_id, s.satisfies_children())).collect();
        ParentStates { satisfied, outside }
    }

    /// How many of `step`'s parents satisfy it (parents known to neither count as not).
    pub fn completed(&self, step: &StepFacts) -> i32 {
        completed_parents(step, |id| match self.satisfied.get(&id) {
            Some(&b) => b,
            None => self.outside.get(&id).is_some_and(|st| state_satisfies(st.as_deref())),
        })
    }
}

/// Evaluates every step in `steps`. Parents are looked up among `steps` first, then in
/// `outside` (states of parents that belong to other tasks).
pub fn evaluate_all(
    steps: &[StepFacts],
    outside: &HashMap<i64, Option<Rc<str>>>,
    clock: &dyn Clock,
) -> Result<Vec<Readiness>, TimeError> {
    let parents = ParentStates::new(steps, outside);
    steps
        .iter()
        .map(|s| {
            interrupt::check();
            evaluate(s, parents.completed(s), clock)
        })
        .collect()
}

/// Parent ids that are not among `steps` (their states must be fetched separately).
pub fn outside_parents(steps: &[StepFacts]) -> Vec<i64> {
    let own: HashSet<i64> = steps.iter().map(|s| s.workflow_step_id).collect();
    let mut ids: Vec<i64> = steps
        .iter()
        .flat_map(|s| s.parent_ids.iter().copied())
        .filter(|p| !own.contains(p))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock in UTC at a fixed instant.
    struct At(i64);
    impl Clock for At {
        fn is_at_or_before_now(&self, timestamp: i64) -> bool {
            timestamp <= self.0
        }
    }

    const NOW: i64 = 800_000_000_000_000; // 2025-05-07 in µs since 2000
    const SEC: i64 = 1_000_000;

    fn step(id: i64) -> StepFacts {
        StepFacts {
            workflow_step_id: id,
            task_id: 1,
            named_step_id: 1,
            name: format!("s{id}").into(),
            state: None,
            state_at: None,
            parent_ids: ParentIds::new(),
            retryable: Some(true),
            retry_limit: Some(3),
            in_process: Some(false),
            processed: Some(false),
            attempts: Some(0),
            last_attempted_at: None,
            backoff_request_seconds: None,
        }
    }

    fn eval(s: &StepFacts, completed: i32) -> Readiness {
        evaluate(s, completed, &At(NOW)).unwrap()
    }

    #[test]
    fn a_fresh_root_is_ready() {
        let r = eval(&step(1), 0);
        assert!(r.ready_for_execution && r.dependencies_satisfied && r.retry_eligible);
        assert_eq!(&*r.current_state, "pending");
        assert_eq!((r.next_retry_at, r.last_failure_at), (None, None));
    }

    #[test]
    fn children_wait_for_every_parent() {
        let mut s = step(2);
        s.parent_ids = ParentIds::from_slice(&[1, 1, 3]);
        assert!(!eval(&s, 2).ready_for_execution);
        let r = eval(&s, 3);
        assert!(r.ready_for_execution);
        assert_eq!((r.total_parents, r.completed_parents), (3, 3));
    }

    #[test]
    fn nulls_take_the_rails_defaults() {
        let mut s = step(1);
        s.attempts = None;
        s.retry_limit = None;
        s.retryable = None;
        s.in_process = None;
        s.processed = None;
        let r = eval(&s, 0);
        assert_eq!((r.attempts, r.retry_limit), (0, 3));
        assert!(r.ready_for_execution);
    }

    #[test]
    fn not_retryable_blocks_even_a_fresh_step() {
        let mut s = step(1);
        s.retryable = Some(false);
        let r = eval(&s, 0);
        assert!(r.retry_eligible && !r.ready_for_execution);
    }

    #[test]
    fn exhausted_retries_block() {
        let mut s = step(1);
        s.attempts = Some(3);
        let r = eval(&s, 0);
        assert!(!r.retry_eligible && !r.ready_for_execution);
    }

    #[test]
    fn only_pending_and_error_can_be_ready() {
        for st in State::ALL {
            let mut s = step(1);
            s.state = Some(Rc::from(st.as_str()));
            s.state_at = Some(NOW - 60 * SEC);
            let ready = eval(&s, 0).ready_for_execution;
            assert_eq!(ready, matches!(st, State::Pending | State::Error), "{st}");
        }
    }

    #[test]
    fn failure_backoff_is_two_to_the_attempts_capped_at_thirty() {
        assert_eq!(failure_backoff_usecs(None).unwrap(), 2 * SEC);
        assert_eq!(failure_backoff_usecs(Some(0)).unwrap(), SEC);
        assert_eq!(failure_backoff_usecs(Some(4)).unwrap(), 16 * SEC);
        assert_eq!(failure_backoff_usecs(Some(5)).unwrap(), 30 * SEC);
        assert_eq!(failure_backoff_usecs(Some(43)).unwrap(), 30 * SEC);
        assert_eq!(failure_backoff_usecs(Some(-1)).unwrap(), SEC / 2);
        assert_eq!(failure_backoff_usecs(Some(44)), Err(TimeError::IntervalOutOfRange));
        assert_eq!(failure_backoff_usecs(Some(1024)), Err(TimeError::FloatOverflow));
        assert_eq!(failure_backoff_usecs(Some(-1075)), Err(TimeError::FloatUnderflow));
    }

    #[test]
    fn failure_backoff_boundary_is_inclusive() {
        let mut s = step(1);
        s.state = Some("error".into());
        s.attempts = Some(1);
        for (offset, ready) in [(-1, true), (0, true), (1, false)] {
            s.state_at = Some(NOW - 2 * SEC + offset);
            let r = eval(&s, 0);
            assert_eq!(r.ready_for_execution, ready, "offset {offset}");
            assert_eq!(r.next_retry_at, Some(NOW + offset));
            assert_eq!(r.last_failure_at, s.state_at);
        }
    }

    #[test]
    fn both_backoffs_must_expire_and_explicit_wins_next_retry_at() {
        let mut s = step(1);
        s.state = Some("error".into());
        s.state_at = Some(NOW - 60 * SEC); // failure backoff long over
        s.attempts = Some(1);
        s.backoff_request_seconds = Some(10);
        s.last_attempted_at = Some(NOW - 5 * SEC); // explicit backoff still running
        let r = eval(&s, 0);
        assert!(!r.ready_for_execution);
        assert_eq!(r.next_retry_at, Some(NOW + 5 * SEC));
        s.last_attempted_at = Some(NOW - 10 * SEC);
        assert!(eval(&s, 0).ready_for_execution);
        // explicit backoff needs both columns
        s.last_attempted_at = None;
        assert_eq!(eval(&s, 0).next_retry_at, Some(NOW - 58 * SEC));
    }

    #[test]
    fn infinite_timestamps_stay_infinite() {
        assert_eq!(timestamp_plus(i64::MAX, SEC), Ok(i64::MAX));
        assert_eq!(timestamp_plus(i64::MIN, SEC), Ok(i64::MIN));
        assert_eq!(timestamp_plus(END_TIMESTAMP - 1, SEC), Err(TimeError::TimestampOutOfRange));
    }

    #[test]
    fn overflow_surfaces_only_where_rails_evaluates_it() {
        // Not in error: no failure backoff is computed at all.
        let mut s = step(1);
        s.attempts = Some(2000);
        assert!(evaluate(&s, 0, &At(NOW)).is_ok());
        // In error, next_retry_at is computed and overflows.
        s.state = Some("error".into());
        s.state_at = Some(NOW);
        assert_eq!(evaluate(&s, 0, &At(NOW)), Err(TimeError::FloatOverflow));
    }

    #[test]
    fn parents_outside_the_task_are_looked_up() {
        let mut child = step(2);
        child.parent_ids = ParentIds::from_slice(&[1, 99]);
        let mut parent = step(1);
        parent.state = Some("complete".into());
        let steps = vec![parent, child];
        assert_eq!(outside_parents(&steps), vec![99]);
        let mut outside = HashMap::default();
        outside.insert(99, Some(Rc::from("resolved_manually")));
        let rows = evaluate_all(&steps, &outside, &At(NOW)).unwrap();
        assert_eq!(rows[1].completed_parents, 2);
        assert!(rows[1].ready_for_execution);
        let rows = evaluate_all(&steps, &HashMap::default(), &At(NOW)).unwrap();
        assert_eq!(rows[1].completed_parents, 1);
    }
}
