//! Template parsing on arbitrary JSON: `TaskTemplate::parse` never panics, and whatever it
//! accepts is a template the rest of the engine can rely on.
#![no_main]

use tasker_rules::jsonschema::check_schema;
use tasker_rules::template::{is_version, TaskTemplate};
use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;

fuzz_target!(|data: &[u8]| {
    // the first byte picks the step limit, so the limit check is fuzzed too
    let Some((&limit, json)) = data.split_first() else {
        return;
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(json) else {
        return;
    };
    let max_steps = usize::from(limit % 64) + 1;
    let Ok(t) = TaskTemplate::parse(&value, max_steps) else {
        return;
    };

    assert!(!t.steps.is_empty() && t.steps.len() <= max_steps);
    assert!(is_version(&t.version), "accepted version {:?}", t.version);
    if let Some(schema) = &t.schema {
        assert!(
            check_schema(schema).is_ok(),
            "accepted a schema check_schema refuses"
        );
    }
    let names: HashSet<&str> = t.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names.len(), t.steps.len(), "duplicate step names accepted");
    for s in &t.steps {
        assert!(!s.handler_class.is_empty());
        let deps: HashSet<&str> = s.depends_on.iter().map(String::as_str).collect();
        assert_eq!(deps.len(), s.depends_on.len(), "duplicate dependency kept");
        for d in &s.depends_on {
            assert!(
                names.contains(d.as_str()),
                "unknown dependency {d:?} accepted"
            );
            assert_ne!(d, &s.name, "self dependency accepted");
        }
    }

    // acyclic: every step has a place in the order, parents before children
    let dag = t.dag();
    let order = dag.topological_order().expect("accepted a cyclic template");
    assert_eq!(order.len(), t.steps.len());
    let mut place = vec![0; order.len()];
    for (i, &pos) in order.iter().enumerate() {
        place[pos] = i;
    }
    for (pos, s) in t.steps.iter().enumerate() {
        for d in &s.depends_on {
            let parent = t.steps.iter().position(|p| &p.name == d).unwrap();
            assert!(place[parent] < place[pos]);
        }
    }
    let levels = dag.levels().expect("levels of an acyclic template");
    assert_eq!(levels.len(), t.steps.len());

    // the store keeps the template as jsonb and parses it again when a task is created
    let text = serde_json::to_string(&value).unwrap();
    let again: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(TaskTemplate::parse(&again, usize::MAX).as_ref(), Ok(&t));
});
