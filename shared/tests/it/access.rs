//! Access rules: who matches, name globs, the default, reserved names, and
//! the bounds and errors of decoding.

use keystore_shared::Caller;
use keystore_shared::access::{
    AccessRules, MAX_PATTERN_LEN, MAX_PATTERNS_PER_RULE, MAX_RULES, MAX_RULES_LEN, NamePattern,
    RULES_NAME, Rule, RulesError, Who, glob_match,
};

fn caller(uid: u32) -> Caller {
    Caller {
        uid: Some(uid),
        ..Caller::default()
    }
}

fn api() -> Caller {
    Caller {
        uid: Some(1000),
        user: Some("api".into()),
        gid: Some(1000),
        groups: vec![1000, 2000],
        group_names: vec!["api".into(), "web".into()],
        unit: Some("api.service".into()),
        token: None,
    }
}

fn rules(json: &str) -> Result<AccessRules, RulesError> {
    AccessRules::from_json(json.as_bytes())
}

fn one_rule(who: &str) -> AccessRules {
    rules(&format!(
        r#"{{"rules":[{{"who":{who},"read":["DB_*","API_TOKEN"]}}]}}"#
    ))
    .unwrap()
}

#[test]
fn each_who_kind_matches_its_caller_and_nobody_else() {
    let web_token = Caller {
        token: Some("ci".into()),
        ..Caller::default()
    };
    for (who, matching, expected) in [
        (r#"{"user":"api"}"#, api(), true),
        (r#"{"user":"apix"}"#, api(), false),
        (r#"{"uid":1000}"#, api(), true),
        (r#"{"uid":1001}"#, api(), false),
        (r#"{"group":"web"}"#, api(), true),
        (r#"{"group":"db"}"#, api(), false),
        (r#"{"gid":2000}"#, api(), true),
        (r#"{"gid":1000}"#, api(), true),
        (r#"{"gid":3000}"#, api(), false),
        (r#"{"unit":"api.service"}"#, api(), true),
        (r#"{"unit":"api"}"#, api(), false),
        (r#"{"token":"ci"}"#, web_token.clone(), true),
        (r#"{"token":"ci"}"#, api(), false),
        (r#""any""#, Caller::default(), true),
        (r#""any""#, api(), true),
    ] {
        let r = one_rule(who);
        assert_eq!(
            r.allows(&matching, "DB_PASSWORD"),
            expected,
            "{who} for {matching}"
        );
        // Nothing outside the granted patterns, whoever asks.
        assert!(!r.allows(&matching, "OTHER"), "{who}");
        // The anonymous caller matches only `any`.
        assert_eq!(
            r.allows(&Caller::default(), "API_TOKEN"),
            who == r#""any""#,
            "{who}"
        );
    }
}

#[test]
fn several_rules_add_up_and_root_gets_only_what_is_granted() {
    let r = rules(
        r#"{"rules":[
            {"who":{"user":"api"},"read":["DB_*"]},
            {"who":{"group":"web"},"read":["WEB_?"]},
            {"who":{"uid":0},"read":["ROOT_ONLY"]}
        ]}"#,
    )
    .unwrap();
    assert_eq!(r.rules().len(), 3);
    let a = api();
    assert!(r.allows(&a, "DB_URL") && r.allows(&a, "WEB_1"));
    assert!(!r.allows(&a, "WEB_12") && !r.allows(&a, "ROOT_ONLY"));
    let root = Caller::root();
    assert!(r.allows(&root, "ROOT_ONLY"));
    // With rules, root reads what they grant it and nothing more.
    assert!(!r.allows(&root, "DB_URL"));
}

#[test]
fn without_rules_only_uid_0_reads() {
    let default = AccessRules::default();
    assert_eq!(default, AccessRules::root_only());
    assert!(default.allows(&Caller::root(), "DB_PASSWORD"));
    assert!(default.allows(&caller(0), "anything/at/all"));
    assert!(!default.allows(&caller(1000), "DB_PASSWORD"));
    assert!(!default.allows(&api(), "DB_PASSWORD"));
    assert!(!default.allows(&Caller::default(), "DB_PASSWORD"));
    // A user *named* root is not uid 0.
    let named_root = Caller {
        uid: Some(1000),
        user: Some("root".into()),
        ..Caller::default()
    };
    assert!(!default.allows(&named_root, "DB_PASSWORD"));
}

#[test]
fn reserved_names_are_never_granted() {
    for r in [AccessRules::root_only(), one_rule(r#""any""#)] {
        assert!(!r.allows(&Caller::root(), RULES_NAME));
        assert!(!r.allows(&Caller::default(), RULES_NAME));
        assert!(!r.allows(&Caller::root(), "keystore:file"));
    }
    let err = rules(r#"{"rules":[{"who":"any","read":["keystore:*"]}]}"#).unwrap_err();
    assert!(
        matches!(&err, RulesError::Pattern { rule: 1, pattern, .. } if pattern == "keystore:*"),
        "{err:?}"
    );
}

#[test]
fn the_canonical_json_round_trips() {
    let r = AccessRules::new(vec![
        Rule {
            who: Who::User("api".into()),
            read: vec![NamePattern::new("DB_*").unwrap()],
        },
        Rule {
            who: Who::Any,
            read: vec![NamePattern::new("PUBLIC").unwrap()],
        },
        Rule {
            who: Who::Gid(7),
            read: vec![
                NamePattern::new("a?").unwrap(),
                NamePattern::new("b").unwrap(),
            ],
        },
    ])
    .unwrap();
    let json = r.to_json();
    assert_eq!(
        std::str::from_utf8(&json).unwrap(),
        r#"{"rules":[{"who":{"user":"api"},"read":["DB_*"]},{"who":"any","read":["PUBLIC"]},{"who":{"gid":7},"read":["a?","b"]}]}"#
    );
    assert_eq!(AccessRules::from_json(&json).unwrap(), r);
}

#[test]
fn hostile_patterns_match_correctly() {
    // Naive recursive matching is exponential on these; the answers must
    // still be right (the cost is bounded by construction, never timed).
    let name = "a".repeat(256);
    let pattern = "*a".repeat(100) + "b";
    assert!(!glob_match(&pattern, &name));
    let pattern = "*a".repeat(128);
    assert!(glob_match(&pattern, &name));
    assert!(!glob_match(&"*a".repeat(129), &"a".repeat(128)));
    assert!(glob_match(&"?".repeat(256), &name));
    assert!(!glob_match(&"?".repeat(255), &name));
    let r = rules(&format!(
        r#"{{"rules":[{{"who":"any","read":["{}"]}}]}}"#,
        "*a".repeat(127) + "*"
    ))
    .unwrap();
    assert!(r.allows(&Caller::default(), &name));
    assert!(!r.allows(&Caller::default(), &"b".repeat(256)));
}

#[test]
fn decoding_refuses_what_is_wrong_with_the_rule_number() {
    let cases: Vec<(String, RulesError)> = vec![
        (
            r#"{"rules":[{"who":"any","read":["A"]},{"who":{"user":"x"},"read":[]}]}"#.into(),
            RulesError::NoPatterns { rule: 2 },
        ),
        (
            r#"{"rules":[{"who":{"user":""},"read":["A"]}]}"#.into(),
            RulesError::Who {
                rule: 1,
                kind: "user",
                name: String::new(),
                reason: "empty",
            },
        ),
        (
            format!(
                r#"{{"rules":[{{"who":{{"unit":"{}"}},"read":["A"]}}]}}"#,
                "u".repeat(257)
            ),
            RulesError::Who {
                rule: 1,
                kind: "unit",
                name: "u".repeat(64),
                reason: "longer than 256 bytes",
            },
        ),
        (
            r#"{"rules":[{"who":{"token":"a\nb"},"read":["A"]}]}"#.into(),
            RulesError::Who {
                rule: 1,
                kind: "token",
                name: "a\nb".into(),
                reason: "control characters are not allowed",
            },
        ),
        (
            format!(
                r#"{{"rules":[{{"who":"any","read":["{}"]}}]}}"#,
                "p".repeat(MAX_PATTERN_LEN + 1)
            ),
            RulesError::Pattern {
                rule: 1,
                pattern: "p".repeat(64),
                reason: "longer than 256 bytes",
            },
        ),
        (
            r#"{"rules":[{"who":"any","read":[""]}]}"#.into(),
            RulesError::Pattern {
                rule: 1,
                pattern: String::new(),
                reason: "empty",
            },
        ),
        (
            r#"{"rules":[{"who":"any","read":["caf\u00e9"]}]}"#.into(),
            RulesError::Pattern {
                rule: 1,
                pattern: "caf\u{e9}".into(),
                reason: "only printable ASCII is allowed, as in names",
            },
        ),
        (
            r#"{"rules":[{"who":"any","read":[" A"]}]}"#.into(),
            RulesError::Pattern {
                rule: 1,
                pattern: " A".into(),
                reason: "leading or trailing space (no name has one)",
            },
        ),
    ];
    for (json, expected) in cases {
        assert_eq!(rules(&json).unwrap_err(), expected, "{json}");
    }
}

#[test]
fn unknown_fields_and_malformed_who_are_syntax_errors() {
    for (json, needle) in [
        (
            r#"{"rules":[{"who":"any","read":["A"],"write":["A"]}]}"#,
            "unknown field `write`",
        ),
        (r#"{"rules":[],"version":2}"#, "unknown field `version`"),
        (
            r#"{"rules":[{"who":{"usr":"a"},"read":["A"]}]}"#,
            "unknown variant `usr`",
        ),
        (
            r#"{"rules":[{"who":{"user":"a","uid":1},"read":["A"]}]}"#,
            "exactly one identity",
        ),
        (r#"{"rules":[{"who":{},"read":["A"]}]}"#, "invalid length 0"),
        (
            r#"{"rules":[{"who":"anyone","read":["A"]}]}"#,
            "invalid value",
        ),
        (r#"{"rules":[{"who":{"uid":-1},"read":["A"]}]}"#, ""),
        (r#"{"rules":[{"read":["A"]}]}"#, "missing field `who`"),
        (r#"{"rules":[{"who":"any"}]}"#, "missing field `read`"),
        (r#"{}"#, "missing field `rules`"),
        (r#"{"rules":{}}"#, ""),
        ("not json", ""),
    ] {
        match rules(json) {
            Err(RulesError::Syntax(message)) => {
                assert!(message.contains(needle), "{json}: {message}")
            }
            other => panic!("{json}: expected a syntax error, got {other:?}"),
        }
    }
    // No rules at all is a valid (if locked-down) document: nobody reads.
    let empty = rules(r#"{"rules":[]}"#).unwrap();
    assert!(!empty.allows(&Caller::root(), "A"));
}

#[test]
fn counts_are_bounded_while_decoding() {
    let rule = r#"{"who":"any","read":["A"]}"#;
    let at_max = format!(r#"{{"rules":[{}]}}"#, vec![rule; MAX_RULES].join(","));
    assert_eq!(rules(&at_max).unwrap().rules().len(), MAX_RULES);
    let over = format!(r#"{{"rules":[{}]}}"#, vec![rule; MAX_RULES + 5].join(","));
    assert_eq!(
        rules(&over).unwrap_err(),
        RulesError::TooManyRules {
            count: MAX_RULES + 5,
            max: MAX_RULES
        }
    );

    let patterns = |n: usize| vec![r#""A""#; n].join(",");
    let ok = format!(
        r#"{{"rules":[{rule},{{"who":"any","read":[{}]}}]}}"#,
        patterns(MAX_PATTERNS_PER_RULE)
    );
    assert_eq!(
        rules(&ok).unwrap().rules()[1].read.len(),
        MAX_PATTERNS_PER_RULE
    );
    let over = format!(
        r#"{{"rules":[{rule},{{"who":"any","read":[{}]}}]}}"#,
        patterns(MAX_PATTERNS_PER_RULE + 1)
    );
    assert_eq!(
        rules(&over).unwrap_err(),
        RulesError::TooManyPatterns {
            rule: 2,
            count: MAX_PATTERNS_PER_RULE + 1,
            max: MAX_PATTERNS_PER_RULE
        }
    );

    // Over the byte bound: refused before parsing.
    let huge = vec![b' '; MAX_RULES_LEN + 1];
    assert_eq!(
        AccessRules::from_json(&huge).unwrap_err(),
        RulesError::TooLarge {
            len: MAX_RULES_LEN + 1,
            max: MAX_RULES_LEN
        }
    );

    // The checked constructor applies the same bounds.
    let many = vec![
        Rule {
            who: Who::Any,
            read: vec![NamePattern::new("A").unwrap()],
        };
        MAX_RULES + 1
    ];
    assert!(matches!(
        AccessRules::new(many),
        Err(RulesError::TooManyRules { .. })
    ));
    assert_eq!(
        AccessRules::new(vec![Rule {
            who: Who::User(String::new()),
            read: vec![NamePattern::new("A").unwrap()],
        }])
        .unwrap_err(),
        RulesError::Who {
            rule: 1,
            kind: "user",
            name: String::new(),
            reason: "empty"
        }
    );
}

#[test]
fn errors_are_short_and_readable() {
    let err = rules(&format!(
        r#"{{"rules":[{{"who":"any","read":["{}"]}}]}}"#,
        "p".repeat(10_000)
    ))
    .unwrap_err();
    assert!(err.to_string().starts_with("rule 1: name pattern"), "{err}");
    assert!(err.to_string().len() < 200, "{err}");
}

/// A reference matcher: the textbook dynamic programme over every
/// (pattern, name) prefix pair, obviously right and fine for short inputs.
fn reference_match(pattern: &[u8], name: &[u8]) -> bool {
    let mut table = vec![vec![false; name.len() + 1]; pattern.len() + 1];
    table[0][0] = true;
    for i in 1..=pattern.len() {
        for j in 0..=name.len() {
            table[i][j] = match pattern[i - 1] {
                b'*' => table[i - 1][j] || (j > 0 && table[i][j - 1]),
                b'?' => j > 0 && table[i - 1][j - 1],
                c => j > 0 && name[j - 1] == c && table[i - 1][j - 1],
            };
        }
    }
    table[pattern.len()][name.len()]
}

proptest::proptest! {
    #[test]
    fn glob_match_agrees_with_the_reference(pattern in "[ab*?]{0,12}", name in "[ab]{0,14}") {
        proptest::prop_assert_eq!(
            glob_match(&pattern, &name),
            reference_match(pattern.as_bytes(), name.as_bytes())
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
        let _ = AccessRules::from_json(&bytes);
    }

    #[test]
    fn checked_rules_round_trip(users in proptest::collection::vec("[a-z]{1,8}", 1..5),
                                patterns in proptest::collection::vec("[A-Z_*?]{1,10}", 1..5)) {
        let rules: Vec<Rule> = users
            .iter()
            .map(|u| Rule {
                who: Who::User(u.clone()),
                read: patterns.iter().map(|p| NamePattern::new(p).unwrap()).collect(),
            })
            .collect();
        let rules = AccessRules::new(rules).unwrap();
        proptest::prop_assert_eq!(AccessRules::from_json(&rules.to_json()).unwrap(), rules);
    }
}
