//! Property tests of `core`: random DAGs, backoffs, state-machine walks, and arbitrary JSON fed
//! to the template parser and the JSON Schema checker (which must reject, never panic).

use super::backoff::{self, MAX_BACKOFF_SECONDS};
use super::dag::Dag;
use super::error::TaskerError;
use super::jsonschema;
use super::state::{Entity, State};
use super::template::TaskTemplate;
use proptest::prelude::*;
use serde_json::{json, Value};

/// A random DAG: `n` steps with shuffled ids; edges only from an earlier to a later step of a
/// hidden order, so the graph is acyclic. Duplicate edges are allowed (Rails keeps them).
fn dag_strategy() -> impl Strategy<Value = (Vec<i64>, Vec<(i64, i64)>)> {
    (1usize..40)
        .prop_flat_map(|n| {
            let ids = Just((1..=n as i64).map(|i| i * 7 + 3).collect::<Vec<_>>()).prop_shuffle();
            let edges = prop::collection::vec((0..n, 0..n), 0..(n * 3));
            (ids, edges)
        })
        .prop_map(|(ids, pairs)| {
            let edges = pairs
                .into_iter()
                .filter(|(a, b)| a != b)
                .map(|(a, b)| (ids[a.min(b)], ids[a.max(b)]))
                .collect();
            (ids, edges)
        })
}

/// Arbitrary JSON, nested a few levels.
fn json_strategy() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        "[a-z_]{0,12}".prop_map(Value::from),
        prop_oneof![
            Just("name"),
            Just("namespace_name"),
            Just("version"),
            Just("1.0.0"),
            Just("step_templates"),
            Just("handler_class"),
            Just("depends_on_step"),
            Just("depends_on_steps"),
            Just("type"),
            Just("object"),
            Just("required"),
            Just("properties")
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    "[a-z_]{1,10}",
                    Just("name".to_owned()),
                    Just("namespace_name".to_owned()),
                    Just("version".to_owned()),
                    Just("step_templates".to_owned()),
                    Just("handler_class".to_owned()),
                    Just("depends_on_step".to_owned()),
                    Just("depends_on_steps".to_owned()),
                    Just("schema".to_owned()),
                    Just("type".to_owned()),
                    Just("items".to_owned()),
                    Just("properties".to_owned()),
                    Just("required".to_owned())
                ],
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn template_json(ids: &[i64], edges: &[(i64, i64)]) -> Value {
    let steps: Vec<Value> = ids
        .iter()
        .map(|id| {
            let parents: Vec<String> = edges
                .iter()
                .filter(|(_, to)| to == id)
                .map(|(from, _)| format!("s{from}"))
                .collect();
            json!({ "name": format!("s{id}"), "handler_class": "H", "depends_on_steps": parents })
        })
        .collect();
    json!({ "name": "t", "namespace_name": "ns", "version": "1.2.3", "step_templates": steps })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn topological_order_and_levels_respect_every_edge((ids, edges) in dag_strategy()) {
        let dag = Dag::new(ids.iter().copied(), edges.iter().copied());
        let order = dag.topological_order().expect("acyclic by construction");
        prop_assert_eq!(order.len(), ids.len());
        let mut rank = vec![0; ids.len()];
        for (i, &pos) in order.iter().enumerate() {
            rank[pos] = i;
        }
        let levels = dag.levels().expect("acyclic");
        let depths = dag.min_depths();
        for &(from, to) in &edges {
            let (f, t) = (dag.position(from).unwrap(), dag.position(to).unwrap());
            prop_assert!(rank[f] < rank[t]);
            prop_assert!(levels[t] > levels[f]);
            prop_assert!(depths[t].unwrap() <= depths[f].unwrap() + 1);
        }
        for pos in 0..ids.len() {
            let is_root = dag.parent_ids(pos).next().is_none();
            prop_assert_eq!(levels[pos] == 0, is_root);
            prop_assert_eq!(depths[pos] == Some(0), is_root);
        }
    }

    #[test]
    fn a_back_edge_on_a_path_is_a_cycle((ids, edges) in dag_strategy(), pick in any::<prop::sample::Index>()) {
        prop_assume!(!edges.is_empty());
        let (from, to) = edges[pick.index(edges.len())];
        let mut with_back = edges.clone();
        with_back.push((to, from));
        let dag = Dag::new(ids.iter().copied(), with_back.iter().copied());
        let cycle = dag.topological_order().expect_err("a back edge closes a cycle");
        prop_assert!(cycle.contains(&from) && cycle.contains(&to), "{:?}", cycle);
        prop_assert!(dag.levels().is_err());
        // the cycle named is a real one: it closes, and each step of it is an edge
        prop_assert_eq!(cycle.first(), cycle.last());
        for pair in cycle.windows(2) {
            prop_assert!(with_back.contains(&(pair[0], pair[1])), "{:?} is not an edge", pair);
        }
    }

    #[test]
    fn levels_and_depths_equal_a_naive_fixpoint((ids, edges) in dag_strategy()) {
        // The graph analyses (petgraph's topological sort, breadth-first walks) against the
        // definitions computed the slow way: relax every edge once per step.
        let dag = Dag::new(ids.iter().copied(), edges.iter().copied());
        let n = ids.len();
        let pos = |id: i64| dag.position(id).unwrap();
        let mut longest = vec![0u32; n];
        let mut shortest: Vec<Option<u32>> = (0..n)
            .map(|p| dag.parent_ids(p).next().is_none().then_some(0))
            .collect();
        for _ in 0..n {
            for &(f, t) in &edges {
                longest[pos(t)] = longest[pos(t)].max(longest[pos(f)] + 1);
                if let Some(df) = shortest[pos(f)] {
                    shortest[pos(t)] = Some(shortest[pos(t)].map_or(df + 1, |d| d.min(df + 1)));
                }
            }
        }
        prop_assert_eq!(dag.levels().unwrap(), longest.clone());
        prop_assert_eq!(dag.min_depths(), shortest);
        let roots: Vec<usize> = (0..n).filter(|&p| dag.parent_ids(p).next().is_none()).collect();
        let from_roots: Vec<Option<u32>> = longest.iter().map(|&l| Some(l)).collect();
        prop_assert_eq!(dag.levels_from(&roots).unwrap(), from_roots);
    }

    #[test]
    fn templates_of_random_dags_parse_and_cycles_are_refused((ids, edges) in dag_strategy()) {
        let t = TaskTemplate::parse(&template_json(&ids, &edges), 10_000).expect("a valid template");
        prop_assert_eq!(t.steps.len(), ids.len());
        if let Some(&(from, to)) = edges.first() {
            let mut back = edges.clone();
            back.push((to, from));
            let err = TaskTemplate::parse(&template_json(&ids, &back), 10_000).unwrap_err();
            prop_assert!(matches!(err, TaskerError::TemplateCycle { .. }), "{:?}", err);
        }
        if ids.len() > 1 {
            let err = TaskTemplate::parse(&template_json(&ids, &edges), ids.len() - 1).unwrap_err();
            prop_assert_eq!(err.sqlstate(), "54000");
        }
    }

    #[test]
    fn the_template_parser_rejects_arbitrary_json_without_panicking(v in json_strategy()) {
        if let Err(e) = TaskTemplate::parse(&v, 100) {
            prop_assert!(e.sqlstate().len() == 5);
            prop_assert!(!e.to_string().is_empty());
        }
        let _ = jsonschema::check_schema(&v);
        if jsonschema::check_schema(&v).is_ok() {
            let _ = jsonschema::validate(&v, &v, 10);
        }
    }

    #[test]
    fn backoff_stays_in_bounds(attempt in any::<i32>(), seed in any::<u64>(), retry_after in any::<i64>()) {
        let plain = backoff::backoff_seconds(attempt, None, None);
        prop_assert!((1..=MAX_BACKOFF_SECONDS).contains(&plain));
        let jittered = backoff::backoff_seconds(attempt, None, Some(seed));
        let amplitude = (plain as f64 * 0.1).round() as i64;
        prop_assert!((jittered - plain).abs() <= amplitude, "{} vs {}", jittered, plain);
        prop_assert!(jittered >= 1);
        prop_assert_eq!(jittered, backoff::backoff_seconds(attempt, None, Some(seed)));
        let server = backoff::backoff_seconds(attempt, Some(retry_after), Some(seed));
        prop_assert_eq!(server, retry_after.clamp(0, MAX_BACKOFF_SECONDS));
    }

    #[test]
    fn backoff_never_shrinks_with_attempts(attempt in 1i32..10_000) {
        prop_assert!(backoff::backoff_seconds(attempt + 1, None, None) >= backoff::backoff_seconds(attempt, None, None));
    }

    #[test]
    fn state_machine_walks_stop_only_in_terminal_states(
        task in any::<bool>(),
        choices in prop::collection::vec(any::<prop::sample::Index>(), 0..60),
    ) {
        let entity = if task { Entity::Task } else { Entity::Step };
        let mut state = State::Pending;
        for c in choices {
            let next = entity.successors(state);
            if next.is_empty() {
                // terminal: nothing may follow, for either machine
                prop_assert!(State::ALL.iter().all(|&to| !entity.allows(state, to)));
                break;
            }
            let to = next[c.index(next.len())];
            prop_assert!(entity.allows(state, to));
            prop_assert_ne!(to, state);
            let event = entity.transition_event(state, to);
            prop_assert!(event.starts_with(entity.as_str()));
            prop_assert!(super::events::is_catalogued(event), "{}", event);
            state = to;
        }
    }
}
