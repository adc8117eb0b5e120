use super::*;
use serde_json::json;

fn order_template() -> Value {
    json!({
        "name": "process_order", "namespace_name": "fulfilment", "version": "1.0.0",
        "step_templates": [
            {"name": "validate", "handler_class": "Validate"},
            {"name": "reserve", "handler_class": "Reserve", "depends_on_step": "validate"},
            {"name": "charge", "handler_class": "Charge", "depends_on_step": "validate",
             "default_retry_limit": 5, "handler_config": {"gateway": "test"}},
            {"name": "ship", "handler_class": "Ship", "depends_on_steps": ["reserve", "charge", "reserve"]},
        ]
    })
}

#[test]
fn parses_a_fan_out_fan_in() {
    let t = TaskTemplate::parse(&order_template(), 100).unwrap();
    assert_eq!(t.full_name(), "fulfilment.process_order@1.0.0");
    assert_eq!(t.steps[3].depends_on, vec!["reserve", "charge"]);
    assert_eq!(t.steps[2].default_retry_limit, 5);
    assert_eq!(t.steps[0].dependent_system, "unknown");
    assert_eq!(t.dag().levels().unwrap(), vec![0, 1, 1, 2]);
}

#[test]
fn defaults_follow_rails() {
    let t = TaskTemplate::parse(
        &json!({"name": "x", "step_templates": [{"name": "a", "handler_class": "A"}]}),
        10,
    )
    .unwrap();
    assert_eq!((t.namespace.as_str(), t.version.as_str()), ("default", "0.1.0"));
    let s = &t.steps[0];
    assert!(s.default_retryable && !s.skippable);
    assert_eq!(s.default_retry_limit, 3);
}

fn err(mut v: Value, f: impl FnOnce(&mut Value)) -> TaskerError {
    f(&mut v);
    TaskTemplate::parse(&v, 100).unwrap_err()
}

#[test]
fn each_defect_has_its_own_error() {
    let e = err(order_template(), |v| v["step_templates"][3]["depends_on_steps"] = json!(["nope"]));
    assert_eq!(e.sqlstate(), "TK022");
    assert!(e.to_string().contains("\"nope\""));
    let e = err(order_template(), |v| v["step_templates"][1]["name"] = json!("validate"));
    assert_eq!(e.sqlstate(), "TK021");
    let e = err(order_template(), |v| v["step_templates"][0]["depends_on_step"] = json!("ship"));
    assert_eq!(e.sqlstate(), "TK006");
    let msg = e.to_string();
    for n in ["validate", "reserve", "ship"] {
        assert!(msg.contains(n) || n == "reserve" && msg.contains("charge"), "{msg}");
    }
    let e = err(order_template(), |v| v["version"] = json!("1.0"));
    assert_eq!(e.sqlstate(), "TK023");
    let e = err(order_template(), |v| {
        v["step_templates"][2].as_object_mut().unwrap().remove("handler_class").map(|_| ()).unwrap()
    });
    assert_eq!(e.sqlstate(), "TK024");
    let e = err(order_template(), |v| v["step_templates"][2]["handler_class"] = json!(""));
    assert_eq!(e.sqlstate(), "TK024");
    let e = err(order_template(), |v| v["step_templates"] = json!([]));
    assert_eq!(e.sqlstate(), "TK020");
    let e = err(json!([1]), |_| {});
    assert_eq!(e.sqlstate(), "TK020");
    let e = err(order_template(), |v| v["step_templates"][0]["default_retry_limit"] = json!("3"));
    assert_eq!(e.sqlstate(), "TK020");
}

#[test]
fn too_many_steps_is_a_limit() {
    let steps: Vec<Value> =
        (0..11).map(|i| json!({"name": format!("s{i}"), "handler_class": "H"})).collect();
    let e = TaskTemplate::parse(&json!({"name": "big", "step_templates": steps}), 10).unwrap_err();
    assert_eq!(e.sqlstate(), "54000");
}

#[test]
fn versions() {
    assert!(is_version("0.1.0") && is_version("10.20.30"));
    assert!(is_version("0.0.0") && is_version("1.0.10") && is_version("100.200.300"));
    for bad in ["1.0", "1.0.0.0", "v1.0.0", "1.a.0", "", "1..0"] {
        assert!(!is_version(bad), "{bad}");
    }
    // leading zeros: 01.0.0 beside 1.0.0 would make "latest" ambiguous
    for bad in ["01.0.0", "1.00.0", "1.0.00", "00.1.0", "0.01.0", "1.0.007"] {
        assert!(!is_version(bad), "{bad}");
    }
    assert!(version_key("1.10.0") > version_key("1.9.9"));
}

#[test]
fn versions_with_leading_zeros_are_refused_at_registration_only() {
    for bad in ["01.0.0", "1.00.0"] {
        let e = err(order_template(), |v| v["version"] = json!(bad));
        assert_eq!(e.sqlstate(), "TK023", "{bad}");
        assert!(e.to_string().contains(bad), "{e}");
    }
    let t = TaskTemplate::parse(
        &json!({"name": "x", "version": "0.1.0", "step_templates": [{"name": "a", "handler_class": "A"}]}),
        10,
    )
    .unwrap();
    assert_eq!(t.version, "0.1.0");
    // a template an earlier version stored keeps working
    let mut stored = order_template();
    stored["version"] = json!("01.0.0");
    assert_eq!(TaskTemplate::parse_stored(&stored).unwrap().version, "01.0.0");
    stored["version"] = json!("1.0");
    assert_eq!(TaskTemplate::parse_stored(&stored).unwrap_err().sqlstate(), "TK023");
}

#[test]
fn names_must_not_hold_control_characters() {
    assert!(is_printable_name("fulfilment") && is_printable_name("ünïcode name/with.dots"));
    for bad in ["a\u{1f}b", "tab\there", "new\nline", "nul\0", "del\u{7f}", "c1\u{85}"] {
        assert!(!is_printable_name(bad), "{bad:?}");
    }
    type Edit = fn(&mut Value);
    let cases: [(&str, Edit); 4] = [
        ("namespace_name", |v| v["namespace_name"] = json!("a\u{1f}b")),
        ("name", |v| v["name"] = json!("process\norder")),
        ("step_templates[1] name", |v| {
            v["step_templates"][1]["name"] = json!("re\tserve");
            v["step_templates"][3]["depends_on_steps"] = json!(["re\tserve", "charge"]);
        }),
        ("step_templates[0] name", |v| {
            v["step_templates"][0]["name"] = json!("\u{7f}");
        }),
    ];
    for (what, f) in cases {
        let e = err(order_template(), f);
        assert_eq!(e.sqlstate(), "TK020", "{what}");
        let msg = e.to_string();
        assert!(msg.contains(what) && msg.contains("must not contain control characters"), "{msg}");
    }
    // descriptions may hold line breaks
    let mut v = order_template();
    v["description"] = json!("line one\nline two");
    v["step_templates"][0]["description"] = json!("a\tb");
    assert!(TaskTemplate::parse(&v, 100).is_ok());
    // a template an earlier version stored keeps working
    v["namespace_name"] = json!("a\u{1f}b");
    assert_eq!(TaskTemplate::parse_stored(&v).unwrap().namespace, "a\u{1f}b");
}

#[test]
fn repeated_dependencies_are_dropped_in_order() {
    let mut v = order_template();
    v["step_templates"][3]["depends_on_step"] = json!("charge");
    v["step_templates"][3]["depends_on_steps"] = json!(["reserve", "charge", "reserve"]);
    let t = TaskTemplate::parse(&v, 100).unwrap();
    assert_eq!(t.steps[3].depends_on, vec!["charge", "reserve"]);
}
