//! Secrets-file formats (JSON, YAML, `.env` through one dispatch): paths,
//! layout kept byte for byte (golden files), errors that name the line and
//! path but never a value, the rules entry, and property tests.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use base64::Engine;
use keystore_host::secrets_file::{self, EntriesError, Format, FormatError, SecretsFile};
use keystore_shared::name::{RULES_NAME, SecretName};

/// A deterministic stand-in for KMS: `ENC[v1:kms:base64(path)]` (a valid
/// envelope shape, so `entries` accepts it).
fn fake_envelope(path: &str) -> String {
    format!(
        "ENC[v1:kms:{}]",
        base64::engine::general_purpose::STANDARD.encode(path)
    )
}

/// Seals every non-empty string value that is not already an envelope,
/// the way `encrypt` does, and renders the file.
fn seal_all(text: &str, format: Format) -> String {
    let mut file = SecretsFile::parse(text.as_bytes(), format).unwrap();
    let todo: Vec<(usize, String)> = file
        .values()
        .enumerate()
        .filter(|(_, v)| v.is_string && !v.value.is_empty() && !v.value.starts_with("ENC["))
        .map(|(i, v)| (i, v.name.to_owned()))
        .collect();
    for (index, name) in todo {
        file.set_value(index, &fake_envelope(&name)).unwrap();
    }
    file.render().unwrap().to_string()
}

fn golden(name: &str) -> (String, String) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/golden");
    (
        std::fs::read_to_string(dir.join(name)).unwrap(),
        std::fs::read_to_string(dir.join(format!("{name}.expected"))).unwrap(),
    )
}

fn names_and_values(text: &str, format: Format) -> Vec<(String, String, bool)> {
    SecretsFile::parse(text.as_bytes(), format)
        .unwrap()
        .values()
        .map(|v| (v.name.to_owned(), v.value.to_owned(), v.is_string))
        .collect()
}

#[test]
fn json_paths_types_and_unicode() {
    let (input, _) = golden("secrets.json");
    let values = names_and_values(&input, Format::Json);
    let get = |name: &str| values.iter().find(|v| v.0 == name).unwrap().clone();
    assert_eq!(values.len(), 15, "{values:?}");
    assert_eq!(get("port"), ("port".into(), "8443".into(), false));
    assert!(!get("debug").2);
    assert!(!get("timeout").2);
    assert_eq!(get("db.pool.max").1, "2.5e1");
    assert_eq!(get("db.password").1, "p@ss \"word\" #1");
    assert_eq!(get("servers.0.token").1, "tok-ü-€-😀");
    assert_eq!(get("servers.1.token").1, "tok\nwith\\escapesA");
    assert_eq!(get("nested.0.0").1, "deep");
    // File order.
    assert_eq!(values.first().unwrap().0, "service");
    assert_eq!(values.last().unwrap().0, "nested.0.0");
    // Every path is a valid secret name.
    for (name, _, _) in &values {
        SecretName::check(name).unwrap();
    }
}

#[test]
fn yaml_paths_types_styles_and_unicode() {
    let (input, _) = golden("secrets.yaml");
    let values = names_and_values(&input, Format::Yaml);
    let get = |name: &str| values.iter().find(|v| v.0 == name).unwrap().clone();
    assert_eq!(get("service").1, "billing");
    assert!(get("service").2);
    for not_string in ["port", "debug", "timeout", "ratio", "db.pool.min", "legacy"] {
        assert!(!get(not_string).2, "{not_string}");
    }
    assert_eq!(get("db.password").1, "p@ss 'word' #1");
    assert_eq!(get("db.user").1, "admin\tx");
    assert_eq!(get("db.pool.label").1, "small");
    assert_eq!(get("servers.0.token").1, "tok-ü-€-😀");
    assert_eq!(get("servers.1.token").1, "tok\nwith\\escapes");
    assert!(
        get("tls.key")
            .1
            .starts_with("-----BEGIN PRIVATE KEY-----\nMIIB")
    );
    assert!(get("tls.key").1.ends_with("-----END PRIVATE KEY-----\n"));
    assert_eq!(get("tls.note").1, "folded text");
    assert_eq!(get("flags.1").1, "b");
    assert_eq!(get("quoted key").1, "value");
    assert_eq!(get("multi").1, "plain continued here");
}

/// The golden files: input, and the exact expected text after sealing
/// every string value with the fake envelope. Only the values change.
#[test]
fn golden_layout_json_and_yaml() {
    for (name, format) in [
        ("secrets.json", Format::Json),
        ("secrets.yaml", Format::Yaml),
    ] {
        let (input, expected) = golden(name);
        let sealed = seal_all(&input, format);
        if std::env::var_os("KEYSTORE_BLESS").is_some() {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/golden");
            std::fs::write(dir.join(format!("{name}.expected")), &sealed).unwrap();
        }
        assert_eq!(sealed, expected, "{name}");
        // Idempotent: a second run changes nothing.
        assert_eq!(seal_all(&sealed, format), sealed, "{name}");
        // The sealed file reads back: the same paths, envelopes where
        // strings were, and the plain settings untouched.
        let before = names_and_values(&input, format);
        let after = names_and_values(&sealed, format);
        assert_eq!(before.len(), after.len());
        for (b, a) in before.iter().zip(&after) {
            assert_eq!(a.0, b.0);
            if b.2 && !b.1.is_empty() {
                assert_eq!(a.1, fake_envelope(&b.0));
            } else {
                assert_eq!(a.1, b.1, "{}", b.0);
            }
        }
        // And the loader's view: one entry per sealed value, named by path.
        let entries = secrets_file::entries(sealed.as_bytes(), format).unwrap();
        let sealed_count = before.iter().filter(|b| b.2 && !b.1.is_empty()).count();
        assert_eq!(entries.len(), sealed_count);
        assert!(entries.iter().any(|e| e.name == "servers.1.token"));
    }
}

#[test]
fn env_goes_through_the_same_dispatch() {
    let text = "# c\nA=one\nexport B='two words'\n";
    let sealed = seal_all(text, Format::Env);
    assert_eq!(
        sealed,
        format!(
            "# c\nA={}\nexport B='{}'\n",
            fake_envelope("A"),
            fake_envelope("B")
        )
    );
    assert_eq!(
        secrets_file::entries(sealed.as_bytes(), Format::Env)
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn format_from_names_and_flags() {
    assert_eq!(
        Format::from_path(Path::new("/a/secrets.json")),
        Format::Json
    );
    assert_eq!(Format::from_path(Path::new("s.YAML")), Format::Yaml);
    assert_eq!(Format::from_path(Path::new("s.yml")), Format::Yaml);
    assert_eq!(Format::from_path(Path::new(".env")), Format::Env);
    assert_eq!(Format::from_path(Path::new("prod.env")), Format::Env);
    assert_eq!(Format::from_path(Path::new("secrets")), Format::Env);
    assert_eq!(Format::from_name("bucket/key/app.json"), Format::Json);
    assert_eq!("yaml".parse::<Format>().unwrap(), Format::Yaml);
    assert!("toml".parse::<Format>().is_err());
}

#[test]
fn rules_entry_is_added_at_the_top_level() {
    let env = fake_envelope(RULES_NAME);
    for (text, format, expected) in [
        (
            "{\n  \"a\": \"x\",\n  \"b\": {\"c\": 1}\n}\n",
            Format::Json,
            format!(
                "{{\n  \"a\": \"x\",\n  \"b\": {{\"c\": 1}},\n  \"keystore:rules\": \"{env}\"\n}}\n"
            ),
        ),
        (
            "{}",
            Format::Json,
            format!("{{\"keystore:rules\": \"{env}\"}}"),
        ),
        (
            "{\"a\":\"x\"}",
            Format::Json,
            format!("{{\"a\":\"x\", \"keystore:rules\": \"{env}\"}}"),
        ),
        (
            "# top\na: x\nb:\n  - 1\n",
            Format::Yaml,
            format!("# top\na: x\nb:\n  - 1\n# rules\nkeystore:rules: {env}\n"),
        ),
        (
            "",
            Format::Yaml,
            format!("# rules\nkeystore:rules: {env}\n"),
        ),
    ] {
        let mut file = SecretsFile::parse(text.as_bytes(), format).unwrap();
        file.append(Some("rules"), RULES_NAME, &env).unwrap();
        let out = file.render().unwrap();
        assert_eq!(out.as_str(), expected, "{text:?}");
        assert_eq!(file.get(RULES_NAME), Some(env.as_str()));
        // The loader sends it like any envelope.
        let entries = secrets_file::entries(out.as_bytes(), format).unwrap();
        assert!(entries.iter().any(|e| e.name == RULES_NAME));
    }
    // A flow mapping at the top cannot take a new line: refused, not
    // guessed at.
    let mut flow = SecretsFile::parse(b"{a: x}\n", Format::Yaml).unwrap();
    assert!(matches!(
        flow.append(None, RULES_NAME, &env),
        Err(FormatError::CannotRewrite { .. })
    ));
}

/// Errors name the line and path and never the value.
#[test]
fn errors_name_line_and_path_never_the_value() {
    let cases: &[(&str, Format, &str)] = &[
        (
            "{\n \"db\": {\"pw\": \"hunter2\",\n  \"pw\": \"hunter3\"}}",
            Format::Json,
            "line 3: db.pw is already defined on line 2",
        ),
        (
            "db:\n  pw: hunter2\n  pw: hunter3\n",
            Format::Yaml,
            "line 3: db.pw is already defined on line 2",
        ),
        (
            "{\"a.b\": \"hunter2\", \"a\": {\"b\": \"hunter3\"}}",
            Format::Json,
            "a.b is already defined on line 1",
        ),
        (
            "{\"a\": \"hunter2\",}",
            Format::Json,
            "line 1: expected a string key",
        ),
        (
            "{\"a\": \"hunter2",
            Format::Json,
            "line 1: unterminated string",
        ),
        ("{\"a\": hunter2}", Format::Json, "line 1: expected a value"),
        (
            "[\"hunter2\"]",
            Format::Json,
            "the top level must be an object",
        ),
        (
            "{} {}",
            Format::Json,
            "unexpected text after the top-level object",
        ),
        (
            "a: &x hunter2\nb: *x\n",
            Format::Yaml,
            "line 1: anchors (at a) are not supported",
        ),
        (
            "a: !!binary aHVudGVyMg==\n",
            Format::Yaml,
            "line 1: tags (at a) are not supported",
        ),
        (
            "a: hunter2\n---\nb: hunter3\n",
            Format::Yaml,
            "several documents",
        ),
        (
            "? [a, b]\n: hunter2\n",
            Format::Yaml,
            "keys that are not scalars",
        ),
        (
            "- hunter2\n",
            Format::Yaml,
            "the top level must be an object",
        ),
        ("a: 'hunter2\n", Format::Yaml, "line "),
        ("a: [hunter2\n", Format::Yaml, "line "),
        (
            "keystore:other: hunter2\n",
            Format::Yaml,
            "names starting with `keystore:` are reserved",
        ),
        (
            "{\"keystore:rules\": {\"x\": \"hunter2\"}}",
            Format::Json,
            "names starting with `keystore:` are reserved",
        ),
        ("{\"\": \"hunter2\"}", Format::Json, "empty key"),
    ];
    for (text, format, needle) in cases {
        let err = SecretsFile::parse(text.as_bytes(), *format)
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{text:?}: {err}");
        assert!(!err.contains("hunter"), "{text:?}: {err}");
    }
    // Bounds: depth, path length, size.
    let deep = format!("{}{}", "{\"a\":".repeat(100), "}".repeat(100));
    assert!(matches!(
        SecretsFile::parse(deep.as_bytes(), Format::Json),
        Err(FormatError::TooDeep { .. })
    ));
    let deep_yaml = format!("a: {}x{}\n", "[".repeat(100), "]".repeat(100));
    assert!(matches!(
        SecretsFile::parse(deep_yaml.as_bytes(), Format::Yaml),
        Err(FormatError::TooDeep { .. })
    ));
    let long = format!(
        "{{\"{}\": {{\"{}\": \"x\"}}}}",
        "k".repeat(200),
        "j".repeat(100)
    );
    assert!(matches!(
        SecretsFile::parse(long.as_bytes(), Format::Json),
        Err(FormatError::PathTooLong { line: 1, .. })
    ));
    let big = vec![b' '; secrets_file::dotenv::MAX_FILE_SIZE + 1];
    for format in [Format::Json, Format::Yaml] {
        assert!(matches!(
            SecretsFile::parse(&big, format),
            Err(FormatError::TooLarge { .. })
        ));
    }
    assert!(matches!(
        SecretsFile::parse(b"{\"a\": \"\xff\"}", Format::Json),
        Err(FormatError::NotUtf8 { line: 1 })
    ));
    // Counts: scalars per file, envelopes per load.
    let many = format!(
        "{{\"a\": [{}0]}}",
        "0,".repeat(secrets_file::format::MAX_VALUES)
    );
    assert!(matches!(
        SecretsFile::parse(many.as_bytes(), Format::Json),
        Err(FormatError::TooManyValues { line: 1 })
    ));
    let max = keystore_shared::protocol::MAX_LOAD_ENTRIES;
    let envelopes = |n: usize| {
        let items: Vec<String> = (0..n).map(|_| "\"ENC[v1:kms:AA==]\"".to_owned()).collect();
        format!("{{\"s\": [{}]}}", items.join(","))
    };
    assert_eq!(
        secrets_file::entries(envelopes(max).as_bytes(), Format::Json)
            .unwrap()
            .len(),
        max
    );
    assert!(matches!(
        secrets_file::entries(envelopes(max + 1).as_bytes(), Format::Json),
        Err(EntriesError::TooMany { count }) if count == max + 1
    ));
    // A broken envelope is named by path and line.
    let err = secrets_file::entries(
        b"{\n\"db\": {\"pw\": \"ENC[v1:kms:hunter2!]\"}}",
        Format::Json,
    )
    .unwrap_err();
    assert!(matches!(err, EntriesError::Envelope { line: 2, .. }));
    assert!(err.to_string().contains("line 2 (db.pw)"), "{err}");
    assert!(!err.to_string().contains("hunter2"), "{err}");
}

#[test]
fn debug_shows_names_not_values() {
    let file = SecretsFile::parse(b"db:\n  pw: hunter2\n", Format::Yaml).unwrap();
    let debug = format!("{file:?} {:?}", file.values().next().unwrap());
    assert!(
        debug.contains("db.pw") && !debug.contains("hunter2"),
        "{debug}"
    );
}

#[test]
fn yaml_block_scalars_and_flow_values_are_rewritten_safely() {
    let text = "a:\n  - |\n    first\n  - x: 1\n  - >\n    after a map\nb: {c: plain, d: 'q'}\n";
    let mut file = SecretsFile::parse(text.as_bytes(), Format::Yaml).unwrap();
    let names: Vec<String> = file.values().map(|v| v.name.to_owned()).collect();
    assert_eq!(names, ["a.0", "a.1.x", "a.2", "b.c", "b.d"]);
    file.set_value(0, "ENC[v1:kms:AA==]").unwrap();
    // After a nested mapping the block header is not located: refused.
    assert!(matches!(
        file.set_value(2, "ENC[v1:kms:AA==]"),
        Err(FormatError::CannotRewrite { .. })
    ));
    file.set_value(3, "ENC[v1:kms:AA==]").unwrap();
    file.set_value(4, "ENC[v1:kms:AA==]").unwrap();
    let out = file.render().unwrap();
    assert_eq!(
        out.as_str(),
        "a:\n  - ENC[v1:kms:AA==]\n  - x: 1\n  - >\n    after a map\nb: {c: \"ENC[v1:kms:AA==]\", d: 'ENC[v1:kms:AA==]'}\n"
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// Arbitrary text never panics any reader, nor `entries`.
    #[test]
    fn readers_never_panic(s in "[ -~\n\t\u{e9}\u{1F600}]{0,120}", which in 0u8..3) {
        let format = [Format::Env, Format::Json, Format::Yaml][usize::from(which)];
        if let Ok(file) = SecretsFile::parse(s.as_bytes(), format) {
            // A file that parses renders back to itself.
            let out = file.render().unwrap();
            proptest::prop_assert_eq!(out.as_str(), s.as_str());
        }
        let _ = secrets_file::entries(s.as_bytes(), format);
    }

    /// Structured-looking text (more likely to parse) never panics either.
    #[test]
    fn structured_text_never_panics(
        s in "[{}\\[\\]\":,a-c0-9 \n\\-|>#'!&*]{0,80}",
        which in 1u8..3,
    ) {
        let format = [Format::Env, Format::Json, Format::Yaml][usize::from(which)];
        if let Ok(file) = SecretsFile::parse(s.as_bytes(), format) {
            let out = file.render().unwrap();
            proptest::prop_assert_eq!(out.as_str(), s.as_str());
        }
    }

    /// Writing any string values and reading the file back returns them,
    /// and leaves the plain settings as they were.
    #[test]
    fn write_then_read_returns_the_values(
        values in proptest::collection::vec("[ -~\n\t\r\u{e9}\u{2028}\u{1F600}\u{0}\u{1b}'\"\\\\]{0,24}", 4),
        which in 0u8..3,
    ) {
        let (format, text) = [
            (Format::Env, "# c\nA=a\nexport B='b'\nC=\"c\" # t\nD=d\n"),
            (
                Format::Json,
                "{\"a\": \"a\", \"n\": 1, \"b\": {\"c\": [\"x\", true]},\n \"d\": \"\\u00e9\"}",
            ),
            (
                Format::Yaml,
                "# c\na: a\nn: 1\nb:\n  c: ['x', \"y\"]\n  k: |\n    block\nd: plain # t\n",
            ),
        ][usize::from(which)];
        let mut file = SecretsFile::parse(text.as_bytes(), format).unwrap();
        let strings: Vec<usize> = file
            .values()
            .enumerate()
            .filter(|(_, v)| v.is_string)
            .map(|(i, _)| i)
            .collect();
        let before: Vec<(String, String)> =
            file.values().map(|v| (v.name.to_owned(), v.value.to_owned())).collect();
        for (index, value) in strings.iter().zip(&values) {
            // `.env` cannot hold every string (e.g. a lone `\r` unquoted);
            // JSON and YAML can.
            if format == Format::Env && value.contains(['\r', '\0']) {
                continue;
            }
            file.set_value(*index, value).unwrap();
        }
        let out = file.render().unwrap();
        let again = SecretsFile::parse(out.as_bytes(), format).unwrap();
        for (i, v) in again.values().enumerate() {
            let written = strings.iter().position(|s| *s == i).and_then(|p| values.get(p));
            match written {
                Some(w) if !(format == Format::Env && w.contains(['\r', '\0'])) => {
                    proptest::prop_assert_eq!(v.value, w.as_str());
                }
                _ => proptest::prop_assert_eq!(v.value, before[i].1.as_str()),
            }
            proptest::prop_assert_eq!(v.name, before[i].0.as_str());
        }
    }
}

/// Odd but valid inputs: every string sealed, the result checked by
/// `render` (layout between values and values read back) and idempotent.
#[test]
fn odd_inputs_seal_and_read_back() {
    for (text, format) in [
        ("\u{feff}a: x\r\nb: 'y'\r\nc: |-\r\n  z\r\n", Format::Yaml),
        ("---\na: x\n...\n", Format::Yaml),
        ("# only a comment\n", Format::Yaml),
        ("---\n", Format::Yaml),
        ("{a: x, b: [y, {c: z}]}\n", Format::Yaml),
        ("a:\n- x\n- 'y'\n-   \"z\"\n", Format::Yaml),
        ("a: |\n  x\n\n\n  y\n\n\nb: 1\n", Format::Yaml),
        ("a: >+\n  kept\n\nb: 2\n", Format::Yaml),
        ("a:\t x\nb : y\n? c\n: w\n", Format::Yaml),
        (
            "a: [0x1F, 0o7, 1e3, -.5, .inf, ~, Off, NULL, 1_0, 0x, x1]\n",
            Format::Yaml,
        ),
        ("a: \"multi\n  line\"\nb: 'also\n\n  this'\n", Format::Yaml),
        ("k: x # c1\n# c2\nl: y#not a comment\n", Format::Yaml),
        ("ключ: значение\n\"日本\": 語\n", Format::Yaml),
        ("\u{feff}{\"a\":\"x\"}", Format::Json),
        (
            "{\r\n\t\"a\" : \"x\" ,\r\n\t\"b\":[ ]\r\n}\r\n",
            Format::Json,
        ),
        ("{\"\\u00e9\\ud83d\\ude00\": \"\\/\"}", Format::Json),
    ] {
        let sealed = seal_all(text, format);
        assert_eq!(seal_all(&sealed, format), sealed, "{text:?}");
        let before = names_and_values(text, format);
        let after = names_and_values(&sealed, format);
        assert_eq!(
            before.iter().map(|b| &b.0).collect::<Vec<_>>(),
            after.iter().map(|a| &a.0).collect::<Vec<_>>(),
            "{text:?}"
        );
    }
    let kinds: Vec<bool> = names_and_values(
        "a: [0x1F, 0o7, 1e3, -.5, .inf, ~, Off, NULL, 1_0, 0x, x1]\n",
        Format::Yaml,
    )
    .iter()
    .map(|v| v.2)
    .collect();
    assert_eq!(
        kinds,
        [
            false, false, false, false, false, false, false, false, true, true, true
        ]
    );
    let v = names_and_values("l: y#not a comment\n", Format::Yaml);
    assert_eq!(v[0].1, "y#not a comment");
}
