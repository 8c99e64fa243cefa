//! `.env` reading and in-place rewriting: layout survives byte for byte.
#![allow(clippy::unwrap_used)]

use keystore_host::secrets_file::dotenv::{DotEnv, DotEnvError, MAX_FILE_SIZE, Quote};

const SAMPLE: &str = "# Database settings\n\
\n\
export DB_HOST=db.internal   # the primary\n\
DB_PASSWORD='s3cr3t #not a comment'\n\
  API_KEY = \"line1\\nline2 \\\"quoted\\\" \\\\ \\$HOME\"\r\n\
\tEMPTY=\n\
PEM=\"-----BEGIN KEY-----\n\
abc\n\
-----END KEY-----\"\n\
TOKEN=ENC[v1:kms:AQID]\n\
HASH=a#b\n\
# trailing comment without newline";

#[test]
fn parses_every_style() {
    let env = DotEnv::parse(SAMPLE.as_bytes()).unwrap();
    let got: Vec<_> = env
        .entries()
        .map(|e| (e.name, e.value, e.line, e.quote))
        .collect();
    assert_eq!(
        got,
        [
            ("DB_HOST", "db.internal", 3, Quote::None),
            ("DB_PASSWORD", "s3cr3t #not a comment", 4, Quote::Single),
            (
                "API_KEY",
                "line1\nline2 \"quoted\" \\ $HOME",
                5,
                Quote::Double
            ),
            ("EMPTY", "", 6, Quote::None),
            (
                "PEM",
                "-----BEGIN KEY-----\nabc\n-----END KEY-----",
                7,
                Quote::Double
            ),
            ("TOKEN", "ENC[v1:kms:AQID]", 10, Quote::None),
            ("HASH", "a#b", 11, Quote::None),
        ]
    );
    assert_eq!(env.get("TOKEN"), Some("ENC[v1:kms:AQID]"));
    assert_eq!(env.get("MISSING"), None);
}

#[test]
fn unchanged_file_round_trips_byte_for_byte() {
    let env = DotEnv::parse(SAMPLE.as_bytes()).unwrap();
    assert_eq!(env.text(), SAMPLE);
}

#[test]
fn rewriting_one_value_changes_only_that_value() {
    let mut env = DotEnv::parse(SAMPLE.as_bytes()).unwrap();
    env.set_value(1, "ENC[v1:kms:BBBB]").unwrap();
    let expected = SAMPLE.replace("'s3cr3t #not a comment'", "'ENC[v1:kms:BBBB]'");
    assert_eq!(env.text(), expected);
    // Positions of later entries follow the change.
    env.set_value(5, "ENC[v1:kms:CCCC]").unwrap();
    let expected = expected.replace("TOKEN=ENC[v1:kms:AQID]", "TOKEN=ENC[v1:kms:CCCC]");
    assert_eq!(env.text(), expected);
    // A multi-line double-quoted value becomes one line; the rest stays.
    env.set_value(4, "ENC[v1:kms:DDDD]").unwrap();
    let expected = expected.replace(
        "\"-----BEGIN KEY-----\nabc\n-----END KEY-----\"",
        "\"ENC[v1:kms:DDDD]\"",
    );
    assert_eq!(env.text(), expected);
    // Re-parsing the result gives the new values and the same lines.
    let again = DotEnv::parse(env.text().as_bytes()).unwrap();
    assert_eq!(again.get("DB_PASSWORD"), Some("ENC[v1:kms:BBBB]"));
    assert_eq!(again.get("DB_HOST"), Some("db.internal"));
    assert_eq!(again.get("HASH"), Some("a#b"));
    assert_eq!(again.len(), 7);
}

#[test]
fn values_a_style_cannot_hold_switch_to_double_quotes() {
    let mut env = DotEnv::parse(b"A=plain # note\nB='x'\n").unwrap();
    env.set_value(0, "has space").unwrap();
    env.set_value(1, "it's").unwrap();
    assert_eq!(env.text(), "A=\"has space\" # note\nB=\"it's\"\n");
    let again = DotEnv::parse(env.text().as_bytes()).unwrap();
    assert_eq!(again.get("A"), Some("has space"));
    assert_eq!(again.get("B"), Some("it's"));
    assert!(matches!(
        env.set_value(9, "x"),
        Err(DotEnvError::NoSuchEntry(9))
    ));
}

#[test]
fn errors_give_line_numbers_never_values() {
    let cases: [(&[u8], usize); 6] = [
        (b"A=1\nnot an assignment hunter2\n", 2),
        (b"A=1\n\nB=\"hunter2\n", 3),
        (b"A='hunter2' trailing\n", 1),
        (b"=hunter2\n", 1),
        (b"A hunter2\n", 1),
        (b"A=1\nB=\xff\xfehunter2\n", 2),
    ];
    for (input, line) in cases {
        let err = DotEnv::parse(input).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with(&format!("line {line}:")), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }
    let dup = DotEnv::parse(b"A=hunter2\n# x\nA=other\n").unwrap_err();
    assert_eq!(
        dup,
        DotEnvError::Duplicate {
            name: "A".into(),
            line: 3,
            first: 1
        }
    );
}

#[test]
fn size_is_bounded() {
    let big = vec![b'#'; MAX_FILE_SIZE + 1];
    assert!(matches!(
        DotEnv::parse(&big),
        Err(DotEnvError::TooLarge { .. })
    ));
}

#[test]
fn debug_shows_names_not_values() {
    let env = DotEnv::parse(b"SECRET=hunter2\n").unwrap();
    let debug = format!("{env:?} {:?}", env.entries().next().unwrap());
    assert!(debug.contains("SECRET"), "{debug}");
    assert!(!debug.contains("hunter2"), "{debug}");
}

proptest::proptest! {
    #[test]
    fn never_panics_and_round_trips(s in "[A-Z_=#'\" \\\\\n\tx$]{0,80}") {
        if let Ok(env) = DotEnv::parse(s.as_bytes()) {
            proptest::prop_assert_eq!(env.text(), s.as_str());
        }
    }
}
