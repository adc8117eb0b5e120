use super::*;
use crate::finalize::{Finalization, TaskCounts};
use crate::template::TaskTemplate;
use proptest::prelude::*;
use serde_json::json;

fn rule(step: Value) -> Result<Option<StepRule>, TaskerError> {
    let deps: Vec<String> = step["depends_on_steps"]
        .as_array()
        .map(|a| a.iter().map(|d| d.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default();
    StepRule::parse("s", step.as_object().unwrap(), &deps)
}

fn reason(step: Value) -> String {
    match rule(step) {
        Err(TaskerError::InvalidTemplate { reason }) => reason,
        other => panic!("expected an invalid rule, got {other:?}"),
    }
}

#[test]
fn rules_parse_and_round_trip() {
    assert_eq!(rule(json!({"name": "s"})).unwrap(), None);
    let r = rule(json!({"depends_on_steps": ["a", "b"],
                        "condition": {"path": "/parents/a/ok", "eq": true},
                        "map": {"over": "/parents/b/items"}, "skip_with": ["a", "a"]}))
    .unwrap()
    .unwrap();
    assert_eq!(r.skip_with, vec!["a"]);
    assert_eq!(r.map_parent().as_deref(), Some("b"));
    assert_eq!(StepRule::from_json(&r.to_json()).unwrap(), r);
    let all = rule(json!({"depends_on_steps": ["a", "b"], "skip_with": true})).unwrap().unwrap();
    assert_eq!(all.skip_with, vec!["a", "b"]);
}

#[test]
fn what_a_rule_reads() {
    let r = |v: Value| rule(v).unwrap().unwrap();
    let keys =
        |k: &[&str]| Members { whole: false, keys: k.iter().map(|s| s.to_string()).collect() };
    let plain = r(json!({"depends_on_steps": ["a", "b"], "skip_with": true}));
    assert_eq!(plain.reads(), Reads::default());
    let ctx = r(json!({"map": {"over": "/context/items"}}));
    assert_eq!(ctx.reads(), Reads { context: Some(keys(&["items"])), parents: vec![] });
    let both = r(json!({"depends_on_steps": ["a", "b"],
                        "condition": {"all": [{"path": "/parents/b/ok", "eq": true},
                                              {"path": "/context/x~1y/z", "exists": true},
                                              {"path": "/parents/b/n/0", "gt": 1},
                                              {"path": "/parents/b/ok", "ne": 3}]},
                        "map": {"over": "/parents/a"}}));
    assert_eq!(
        both.reads(),
        Reads {
            context: Some(keys(&["x/y"])),
            parents: vec![
                ("b".into(), keys(&["ok", "n"])),
                ("a".into(), Members { whole: true, keys: vec![] })
            ],
        }
    );
}

#[test]
fn each_defect_is_named() {
    assert!(reason(json!({"condition": {"path": "/parents/x/ok", "eq": 1}}))
        .contains("reads /parents/x, which is not one of its dependencies"));
    assert!(reason(json!({"condition": {"path": "/context/x"}})).contains("needs an operator"));
    assert!(reason(json!({"map": "/context/items"})).contains("map must be an object"));
    assert!(reason(json!({"map": {}})).contains("map needs \"over\""));
    assert!(reason(json!({"map": {"over": "/context/i", "limit": 3}})).contains("unknown field"));
    assert!(reason(json!({"map": {"over": "/task/items"}})).contains("must start with /context"));
    assert!(reason(json!({"map": {"over": "/parents/x/items"}})).contains("not one of its"));
    assert!(reason(json!({"skip_with": ["x"]})).contains("skip_with names \"x\""));
    assert!(reason(json!({"skip_with": "a"})).contains("array of dependencies or true"));
}

#[test]
fn decisions() {
    let ctx = json!({"items": [1, 2, 3], "express": true, "name": "x"});
    let max = 3;
    let r = |v: Value| rule(v).unwrap().unwrap();
    let done = json!({"ok": true, "items": []});
    let a = Parent { name: "a", results: Some(&done), skipped: false };
    let skipped = Parent { name: "a", results: None, skipped: true };
    let map = r(json!({"map": {"over": "/context/items"}}));
    assert_eq!(map.decide(&ctx, &[], max), Decision::Expand(ctx["items"].as_array().unwrap()));
    assert!(matches!(map.decide(&ctx, &[], 2), Decision::Fail { limit: true, .. }));
    let not_array = r(json!({"map": {"over": "/context/name"}}));
    match not_array.decide(&ctx, &[], max) {
        Decision::Fail { message, limit: false } => assert!(message.contains("found a string")),
        other => panic!("{other:?}"),
    }
    let cond =
        r(json!({"depends_on_steps": ["a"], "condition": {"path": "/parents/a/ok", "eq": true}}));
    assert_eq!(cond.decide(&ctx, &[a], max), Decision::Run);
    // a skipped parent has no results: the condition reads nothing there
    assert_eq!(cond.decide(&ctx, &[skipped], max), Decision::Skip("its condition is false".into()));
    let with = r(json!({"depends_on_steps": ["a"], "skip_with": ["a"]}));
    assert_eq!(with.decide(&ctx, &[a], max), Decision::Run);
    assert!(
        matches!(with.decide(&ctx, &[skipped], max), Decision::Skip(why) if why.contains("dependency a"))
    );
    let over_parent = r(json!({"depends_on_steps": ["a"], "map": {"over": "/parents/a/items"}}));
    assert_eq!(over_parent.decide(&ctx, &[a], max), Decision::Expand(&[]));
    assert!(matches!(over_parent.decide(&ctx, &[skipped], max), Decision::Skip(_)));
    assert_eq!(map.check_context(&ctx, 3), Ok(()));
    assert_eq!(map.check_context(&ctx, 2), Err(MapProblem::TooMany { count: 3 }));
    assert_eq!(not_array.check_context(&ctx, 3), Err(MapProblem::NotAnArray { found: "a string" }));
}

// ---- A model of the engine running dynamic templates, for the property test. ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Pending,
    Running,
    Complete,
    Error,
    Skipped,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Plain,
    Waiting,
    Mapped(Vec<usize>),
}

#[derive(Debug, Clone)]
struct Step {
    template: usize,
    parents: Vec<usize>,
    state: St,
    attempts: i32,
    retryable: bool,
    results: Option<Value>,
    /// A map instance's element and position.
    input: Option<Value>,
    /// Whether it expanded (a map step).
    mapped: bool,
    phase: Phase,
}

/// How each run of a step turns out: drawn from `outcomes` in turn.
#[derive(Debug, Clone, Copy)]
enum Run {
    Ok,
    Retryable,
    Permanent,
}

struct Engine<'t> {
    t: &'t TaskTemplate,
    context: Value,
    steps: Vec<Step>,
    outcomes: Vec<Run>,
    turn: usize,
    max: usize,
}

impl Engine<'_> {
    fn satisfied(&self, i: usize) -> bool {
        self.steps[i]
            .parents
            .iter()
            .all(|&p| matches!(self.steps[p].state, St::Complete | St::Skipped))
    }

    /// The store's advance: dynamic steps whose parents have finished are decided or collected.
    fn advance(&mut self) {
        loop {
            let due: Vec<usize> = (0..self.steps.len())
                .filter(|&i| {
                    self.steps[i].phase != Phase::Plain && self.steps[i].state == St::Pending
                })
                .filter(|&i| self.satisfied(i))
                .collect();
            if due.is_empty() {
                return;
            }
            for i in due {
                if let Phase::Mapped(instances) = self.steps[i].phase.clone() {
                    let results: Vec<Value> = instances
                        .iter()
                        .map(|&k| self.steps[k].results.clone().unwrap_or(Value::Null))
                        .collect();
                    self.steps[i].results = Some(Value::Array(results));
                    self.steps[i].state = St::Complete;
                    self.steps[i].phase = Phase::Plain;
                    continue;
                }
                let rule = self.t.steps[self.steps[i].template].rule.clone().unwrap();
                let parents: Vec<(String, Option<Value>, bool)> = self.steps[i]
                    .parents
                    .iter()
                    .map(|&p| {
                        let s = &self.steps[p];
                        (
                            self.t.steps[s.template].name.clone(),
                            s.results.clone(),
                            s.state == St::Skipped,
                        )
                    })
                    .collect();
                let views: Vec<Parent<'_>> = parents
                    .iter()
                    .map(|(n, r, s)| Parent { name: n, results: r.as_ref(), skipped: *s })
                    .collect();
                let context = self.context.clone();
                match rule.decide(&context, &views, self.max) {
                    Decision::Run => self.steps[i].phase = Phase::Plain,
                    Decision::Skip(_) => {
                        self.steps[i].state = St::Skipped;
                        self.steps[i].phase = Phase::Plain;
                    }
                    Decision::Fail { .. } => {
                        self.steps[i].state = St::Error;
                        self.steps[i].retryable = false;
                        self.steps[i].phase = Phase::Plain;
                    }
                    Decision::Expand(items) => {
                        let first = self.steps.len();
                        for (k, e) in items.iter().enumerate() {
                            self.steps.push(Step {
                                template: self.steps[i].template,
                                parents: Vec::new(),
                                state: St::Pending,
                                attempts: 0,
                                retryable: true,
                                results: None,
                                input: Some(json!({"element": e, "index": k})),
                                mapped: false,
                                phase: Phase::Plain,
                            });
                        }
                        let instances: Vec<usize> = (first..self.steps.len()).collect();
                        self.steps[i].parents.extend(&instances);
                        self.steps[i].mapped = true;
                        self.steps[i].phase = Phase::Mapped(instances);
                    }
                }
            }
        }
    }

    fn ready(&self) -> Vec<usize> {
        (0..self.steps.len())
            .filter(|&i| {
                let s = &self.steps[i];
                s.phase == Phase::Plain
                    && matches!(s.state, St::Pending | St::Error)
                    && s.attempts < 3
                    && (s.retryable || s.attempts == 0)
                    && self.satisfied(i)
            })
            .collect()
    }

    fn counts(&self) -> TaskCounts {
        let n = |f: &dyn Fn(&Step) -> bool| self.steps.iter().filter(|s| f(s)).count() as i64;
        TaskCounts {
            total: self.steps.len() as i64,
            done: n(&|s| matches!(s.state, St::Complete | St::Skipped)),
            in_progress: n(&|s| s.state == St::Running),
            ready: self.ready().len() as i64,
            waiting: 0,
            blocked: n(&|s| s.state == St::Error && (s.attempts >= 3 || !s.retryable)),
        }
    }

    /// Runs the task to its end; returns the finalizer's last decision.
    fn run(&mut self) -> Finalization {
        self.advance();
        for _ in 0..10_000 {
            let ready = self.ready();
            let Some(&i) = ready.get(self.turn % ready.len().max(1)) else {
                return Finalization::decide(&self.counts());
            };
            let outcome = self.outcomes[self.turn % self.outcomes.len()];
            self.turn += 1;
            self.steps[i].attempts += 1;
            match outcome {
                Run::Ok => {
                    self.steps[i].state = St::Complete;
                    // results a condition or a map of a dependent can read
                    let items: Vec<Value> = (0..(self.turn % 4)).map(|k| json!(k)).collect();
                    // (an instance's results echo its element and position)
                    let echo = self.steps[i].input.clone();
                    self.steps[i].results =
                        Some(json!({"ok": self.turn % 3 != 0, "items": items, "echo": echo}));
                }
                Run::Retryable => self.steps[i].state = St::Error,
                Run::Permanent => {
                    self.steps[i].state = St::Error;
                    self.steps[i].retryable = false;
                }
            }
            self.advance();
            let end = Finalization::decide(&self.counts());
            if matches!(end, Finalization::AllComplete | Finalization::BlockedByFailures) {
                return end;
            }
        }
        panic!("the task did not end")
    }
}

fn step_json() -> impl Strategy<Value = (Vec<usize>, u8, u8, bool)> {
    (prop::collection::vec(0usize..8, 0..3), 0u8..4, 0u8..4, any::<bool>())
}

fn template_strategy() -> impl Strategy<Value = Value> {
    prop::collection::vec(step_json(), 1..7).prop_map(|raw| {
        let mut steps = Vec::new();
        for (i, (deps, cond, map, skip)) in raw.into_iter().enumerate() {
            let mut deps: Vec<String> =
                deps.into_iter().filter(|&d| d < i).map(|d| format!("s{d}")).collect();
            deps.dedup();
            let mut s =
                json!({"name": format!("s{i}"), "handler_class": "H", "depends_on_steps": deps});
            match (cond, deps.first()) {
                (1, _) => s["condition"] = json!({"path": "/context/flag", "eq": true}),
                (2, Some(p)) => {
                    s["condition"] = json!({"path": format!("/parents/{p}/ok"), "eq": true})
                }
                _ => {}
            }
            match (map, deps.last()) {
                (1, _) => s["map"] = json!({"over": "/context/items"}),
                (2, Some(p)) => s["map"] = json!({"over": format!("/parents/{p}/items")}),
                (3, _) => s["map"] = json!({"over": "/context/flag"}), // not an array: fails
                _ => {}
            }
            if skip && !deps.is_empty() {
                s["skip_with"] = json!(true);
            }
            steps.push(s);
        }
        json!({"name": "t", "step_templates": steps})
    })
}

fn run_strategy() -> impl Strategy<Value = Run> {
    prop_oneof![6 => Just(Run::Ok), 2 => Just(Run::Retryable), 1 => Just(Run::Permanent)]
}

proptest! {
    /// Random templates with maps, conditions and cascading skips, random element counts and
    /// outcomes: every task ends complete, or in error after a permanent failure — never stuck;
    /// a map runs one instance per element and hands on their results in element order.
    #[test]
    fn every_dynamic_task_ends(
        t in template_strategy(),
        n in 0usize..6,
        flag in any::<bool>(),
        outcomes in prop::collection::vec(run_strategy(), 1..12),
    ) {
        let t = TaskTemplate::parse(&t, 100).unwrap();
        let context = json!({"flag": flag, "items": (0..n).collect::<Vec<_>>()});
        let steps = t
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| Step {
                template: i,
                parents: s.depends_on.iter().map(|d| t.steps.iter().position(|x| &x.name == d).unwrap()).collect(),
                state: St::Pending,
                attempts: 0,
                retryable: true,
                results: None,
                input: None,
                mapped: false,
                phase: if s.rule.is_some() { Phase::Waiting } else { Phase::Plain },
            })
            .collect();
        let mut e = Engine { t: &t, context, steps, outcomes, turn: 0, max: 4 };
        let end = e.run();
        let failed = e.steps.iter().any(|s| s.state == St::Error && (s.attempts >= 3 || !s.retryable));
        match end {
            Finalization::AllComplete => {
                prop_assert!(!failed);
                prop_assert!(e.steps.iter().all(|s| matches!(s.state, St::Complete | St::Skipped)));
            }
            Finalization::BlockedByFailures => prop_assert!(failed),
            other => prop_assert!(false, "stuck: {other:?} with {:?}", e.steps),
        }
        // every completed map holds one result per instance, in element order
        for s in e.steps.iter().filter(|s| s.state == St::Complete && s.mapped) {
            let expected = match &e.t.steps[s.template].rule.as_ref().unwrap().map_parent() {
                None => n,
                Some(_) => s.parents.len() - e.t.steps[s.template].depends_on.len(),
            };
            prop_assert_eq!(s.results.as_ref().and_then(Value::as_array).map(Vec::len), Some(expected));
            if let Some(Value::Array(results)) = &s.results {
                for (k, r) in results.iter().enumerate() {
                    prop_assert_eq!(&r["echo"]["index"], &json!(k));
                }
            }
        }
    }
}
