//! Malformed rules are refused with an error naming the file, the rule and
//! the key.

use nitrile_monitor::{MAX_RULE_FILE_LEN, Monitor, Problem, RuleError, parse_rules};

const GOOD: &str = r#"
title: Drain
id: 0a7f4c1e-5d7e-4b7e-9b0e-1f2a3b4c5d6e
name: drain
level: low
logsource:
  product: nitrile
  category: record
detection:
  selection:
    operation: host.drain
  condition: selection
"#;

const GOOD_CORRELATION: &str = r#"
title: Many drains
id: 1b8f4c1e-5d7e-4b7e-9b0e-1f2a3b4c5d6e
level: medium
correlation:
  type: event_count
  rules: [drain]
  group-by: [principal]
  timespan: 5m
  condition:
    gte: 3
"#;

/// Parses `text` as file `f.yml`; the error's message and problem.
fn refused(text: &str) -> (String, RuleError) {
    let e = parse_rules("f.yml", text).expect_err("must be refused");
    (e.to_string(), e)
}

fn problem(e: &RuleError) -> &Problem {
    match e {
        RuleError::Invalid { problem, .. } => problem,
        other => panic!("not an invalid-rule error: {other:?}"),
    }
}

#[test]
fn the_good_rules_parse() {
    let mut rules = parse_rules("f.yml", GOOD).unwrap();
    rules.extend(parse_rules("g.yml", GOOD_CORRELATION).unwrap());
    assert_eq!(rules.len(), 2);
    Monitor::new(rules).unwrap();
}

#[test]
fn unknown_modifier_is_named() {
    let (msg, e) = refused(&GOOD.replace("operation: host.drain", "operation|base64: x"));
    assert_eq!(problem(&e), &Problem::UnknownModifier("base64".into()));
    assert!(msg.contains("f.yml"), "{msg}");
    assert!(
        msg.contains("detection.selection.operation|base64"),
        "{msg}"
    );
    assert!(msg.contains("unknown modifier `base64`"), "{msg}");
}

#[test]
fn conflicting_modifiers_are_refused() {
    let (_, e) = refused(&GOOD.replace("operation: host.drain", "operation|contains|re: x"));
    assert!(matches!(problem(&e), Problem::ConflictingModifiers(..)));
}

#[test]
fn unknown_keys_are_named_at_every_level() {
    for (from, to, key) in [
        ("level: low", "level: low\nseverity: high", "severity"),
        (
            "  category: record",
            "  category: record\n  service: x",
            "service",
        ),
        (
            "condition: selection",
            "condition: selection\n  timeframe: 5m",
            "timeframe",
        ),
    ] {
        let (msg, e) = refused(&GOOD.replace(from, to));
        assert!(msg.contains("f.yml") && msg.contains(key), "{msg}");
        let p = problem(&e);
        assert!(
            matches!(p, Problem::UnknownKey(k) if k == key) || matches!(p, Problem::WrongType(_)),
            "{key}: {p:?}"
        );
    }
    let (msg, e) = refused(&GOOD_CORRELATION.replace("type:", "window: x\n  type:"));
    assert_eq!(problem(&e), &Problem::UnknownKey("window".into()));
    assert!(msg.contains("correlation.window"), "{msg}");
}

#[test]
fn unknown_fields_are_refused() {
    let (msg, e) = refused(&GOOD.replace("operation: host.drain", "CommandLine: x"));
    assert_eq!(problem(&e), &Problem::UnknownField("CommandLine".into()));
    assert!(msg.contains("CommandLine"), "{msg}");
    let (_, e) = refused(&GOOD_CORRELATION.replace("[principal]", "[User]"));
    assert_eq!(problem(&e), &Problem::UnknownField("User".into()));
}

#[test]
fn bad_timespans_are_refused() {
    for bad in ["10x", "0m", "m", "30", "8d", "1.5h"] {
        let (msg, e) = refused(&GOOD_CORRELATION.replace("5m", bad));
        assert!(
            matches!(problem(&e), Problem::BadTimespan(t) if t == bad),
            "{bad}"
        );
        assert!(
            msg.contains("correlation.timespan") && msg.contains(bad),
            "{msg}"
        );
    }
}

#[test]
fn bad_conditions_are_refused() {
    let (_, e) = refused(&GOOD.replace("condition: selection", "condition: selection and"));
    assert!(matches!(problem(&e), Problem::Condition { at: 3, .. }));
    let (_, e) = refused(&GOOD.replace("condition: selection", "condition: selection or other"));
    assert_eq!(problem(&e), &Problem::UnknownSelection("other".into()));
    let (_, e) = refused(&GOOD.replace(
        "condition: selection",
        "unused:\n    kind: request\n  condition: selection",
    ));
    assert_eq!(problem(&e), &Problem::UnusedSelection("unused".into()));
    let (_, e) = refused(&GOOD.replace("  condition: selection\n", ""));
    assert_eq!(problem(&e), &Problem::Missing("condition"));
}

#[test]
fn bad_metadata_is_refused() {
    let (_, e) = refused(&GOOD.replace("level: low", "level: severe"));
    assert!(matches!(problem(&e), Problem::NotOneOf { .. }));
    let (_, e) = refused(&GOOD.replace("0a7f4c1e-", "not-a-uuid-"));
    assert!(matches!(problem(&e), Problem::BadId(_)));
    let (_, e) = refused(&GOOD.replace("product: nitrile", "product: windows"));
    assert!(matches!(problem(&e), Problem::NotOneOf { .. }));
    let (_, e) = refused(&GOOD.replace("level: low\n", ""));
    assert_eq!(problem(&e), &Problem::Missing("level"));
}

#[test]
fn correlation_conditions_are_checked() {
    let (_, e) = refused(&GOOD_CORRELATION.replace("gte: 3", "lt: 3"));
    assert!(matches!(problem(&e), Problem::Unsupported(_)));
    let (_, e) = refused(&GOOD_CORRELATION.replace("gte: 3", "gte: 0"));
    assert!(matches!(problem(&e), Problem::BadNumber(_)));
    let (_, e) = refused(&GOOD_CORRELATION.replace("gte: 3", "gte: 1000000"));
    assert!(matches!(problem(&e), Problem::BadNumber(_)));
    let (_, e) = refused(&GOOD_CORRELATION.replace("event_count", "value_count"));
    assert_eq!(problem(&e), &Problem::Missing("field"));
    let (_, e) = refused(&GOOD_CORRELATION.replace("event_count", "temporal"));
    assert!(matches!(problem(&e), Problem::Unsupported(_)));
}

#[test]
fn references_and_duplicates_are_checked_across_rules() {
    let mut rules = parse_rules("f.yml", GOOD).unwrap();
    rules.extend(parse_rules("g.yml", &GOOD_CORRELATION.replace("[drain]", "[drainz]")).unwrap());
    let e = Monitor::new(rules).unwrap_err();
    assert!(matches!(&e, RuleError::UnknownReference { reference, .. } if reference == "drainz"));
    assert!(e.to_string().contains("g.yml"));

    let mut rules = parse_rules("f.yml", GOOD).unwrap();
    rules.extend(parse_rules("g.yml", GOOD).unwrap());
    assert!(matches!(
        Monitor::new(rules),
        Err(RuleError::Duplicate { .. })
    ));

    // A correlation of a correlation is refused.
    let mut rules = parse_rules("f.yml", GOOD).unwrap();
    rules.extend(parse_rules("g.yml", GOOD_CORRELATION).unwrap());
    let chained = GOOD_CORRELATION
        .replace("1b8f4c1e", "2c8f4c1e")
        .replace("[drain]", "[1b8f4c1e-5d7e-4b7e-9b0e-1f2a3b4c5d6e]");
    rules.extend(parse_rules("h.yml", &chained).unwrap());
    assert!(matches!(
        Monitor::new(rules),
        Err(RuleError::UnknownReference { .. })
    ));
}

#[test]
fn yaml_errors_aliases_and_size_are_refused() {
    assert!(matches!(
        parse_rules("f.yml", "title: [unclosed"),
        Err(RuleError::Yaml { .. })
    ));
    let aliased = GOOD.replace("level: low", "level: &l low\ndescription: *l");
    assert!(matches!(
        parse_rules("f.yml", &aliased),
        Err(RuleError::Invalid {
            problem: Problem::Alias,
            ..
        })
    ));
    // Nested aliases would expand exponentially: refused before loading.
    let laughs = "a: &a [x, x]\nb: &b [*a, *a]\nc: &c [*b, *b]\n";
    assert!(parse_rules("f.yml", laughs).is_err());
    let deep = format!("{}{}", "[".repeat(20), "]".repeat(20));
    assert!(matches!(
        parse_rules("f.yml", &deep),
        Err(RuleError::Invalid {
            problem: Problem::TooDeep,
            ..
        })
    ));
    let deeper = format!(
        "{}{}",
        "[".repeat(MAX_RULE_FILE_LEN / 2),
        "]".repeat(MAX_RULE_FILE_LEN / 2)
    );
    assert!(matches!(
        parse_rules("f.yml", &deeper),
        Err(RuleError::Invalid {
            problem: Problem::TooDeep,
            ..
        } | RuleError::Yaml { .. })
    ));
    let big = format!("{GOOD}\ndescription: {}\n", "x".repeat(300 * 1024));
    assert!(matches!(
        parse_rules("f.yml", &big),
        Err(RuleError::TooLarge { .. })
    ));
    // A document that is not a mapping.
    assert!(parse_rules("f.yml", "- a\n- b\n").is_err());
}

#[test]
fn load_names_the_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yml"), GOOD).unwrap();
    std::fs::write(
        dir.path().join("b.yaml"),
        GOOD.replace("0a7f", "9a7f")
            .replace("name: drain", "name: drain2")
            .replace("operation:", "operation|nope:"),
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a rule").unwrap();
    let e = Monitor::load(dir.path()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("b.yaml") && msg.contains("nope"), "{msg}");
    std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
    assert_eq!(Monitor::load(dir.path()).unwrap().rules().count(), 1);
    assert!(matches!(
        Monitor::load(dir.path().join("missing")),
        Err(RuleError::Read { .. })
    ));
}

#[test]
fn rule_files_of_a_bundle_load_in_order_and_within_bounds() {
    let m = Monitor::from_rule_files([
        ("rules/a.yml", GOOD.as_bytes()),
        ("rules/b.yml", GOOD_CORRELATION.as_bytes()),
    ])
    .unwrap();
    assert_eq!(m.rules().count(), 2);
    // A correlation before the rule it refers to is still one set.
    assert!(
        Monitor::from_rule_files([
            ("rules/b.yml", GOOD_CORRELATION.as_bytes()),
            ("rules/a.yml", GOOD.as_bytes()),
        ])
        .is_ok()
    );
    // Duplicates across files, bytes that are not UTF-8, too many files.
    let e = Monitor::from_rule_files([
        ("rules/a.yml", GOOD.as_bytes()),
        ("rules/c.yml", GOOD.as_bytes()),
    ])
    .unwrap_err();
    assert!(
        matches!(e, RuleError::Duplicate { ref file, .. } if file == "rules/c.yml"),
        "{e}"
    );
    let e = Monitor::from_rule_files([("rules/x.yml", &[0xff, 0xfe][..])]).unwrap_err();
    assert!(
        matches!(e, RuleError::Read { ref path, .. } if path == "rules/x.yml"),
        "{e}"
    );
    let many: Vec<(String, &[u8])> = (0..=nitrile_monitor::MAX_RULE_FILES)
        .map(|i| (format!("rules/{i:04}.yml"), GOOD.as_bytes()))
        .collect();
    let e = Monitor::from_rule_files(many.iter().map(|(n, b)| (n.as_str(), *b))).unwrap_err();
    assert!(matches!(e, RuleError::TooLarge { .. }), "{e}");
}
