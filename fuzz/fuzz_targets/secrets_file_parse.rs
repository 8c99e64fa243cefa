//! The three secrets-file readers (`.env`, JSON, YAML) and their writer:
//! the file comes from the operator's repository or an S3 object, so every
//! byte is hostile to the host that reads it. Parsing must return a typed
//! error, never panic; a file that parses renders back to itself byte for
//! byte (so parse(render(parse(x))) == parse(x)); a value replaced through
//! `set_value`, or a reserved entry appended, either is refused or renders
//! to text that reads back to exactly the intended values, in the same
//! order, with nothing else changed.
//!
//! Input: one byte choosing the format, then the file; if the rest holds a
//! 0xFF byte (never valid UTF-8), what precedes it is the replacement
//! value and what follows it the file.
//!
//! The readers are compiled from keystore-host's own source files (not
//! the crate, which would link the AWS SDK into this build): they depend
//! only on keystore-shared, zeroize and saphyr-parser.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code, unused_imports)]
#[path = "../../host-proxy/src/secrets_file"]
mod secrets_file {
    pub mod dotenv;
    pub mod format;
    pub mod json;
    pub mod yaml;
}

use secrets_file::format::{Format, SecretsFile};

/// What a file reads as: (name, value, is a string) in file order.
fn read(file: &SecretsFile) -> Vec<(String, String, bool)> {
    file.values()
        .map(|v| (v.name.to_owned(), v.value.to_owned(), v.is_string))
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let format = [Format::Env, Format::Json, Format::Yaml][usize::from(selector % 3)];
    let (value, bytes) = match rest.iter().position(|&b| b == 0xFF) {
        Some(at) => match std::str::from_utf8(&rest[..at]) {
            Ok(value) => (value, &rest[at + 1..]),
            Err(_) => return,
        },
        None => ("ENC[v1:kms:QUJD]", rest),
    };
    let Ok(file) = SecretsFile::parse(bytes, format) else {
        return;
    };
    let before = read(&file);

    // Unchanged, it renders to the very bytes read.
    let text = file.render().expect("a file that parses renders");
    assert_eq!(text.as_bytes(), bytes);
    let again = SecretsFile::parse(text.as_bytes(), format).expect("renders to a valid file");
    assert_eq!(read(&again), before);

    // Every string value replaced (the way `encrypt` does): refused, or
    // read back exactly.
    let mut changed = SecretsFile::parse(bytes, format).expect("parsed once");
    let mut want = before.clone();
    for (index, entry) in want.iter_mut().enumerate() {
        if entry.2 && changed.set_value(index, value).is_ok() {
            entry.1 = value.to_owned();
        }
    }
    if let Ok(text) = changed.render() {
        let again = SecretsFile::parse(text.as_bytes(), format).expect("renders to a valid file");
        assert_eq!(read(&again), want);
    }

    // The rules entry appended (or refused): everything else unchanged,
    // the new entry last.
    let mut appended = SecretsFile::parse(bytes, format).expect("parsed once");
    if appended
        .append(Some("access rules"), "keystore:rules", "ENC[v1:kms:QUJD]")
        .is_ok()
        && let Ok(text) = appended.render()
    {
        let again = SecretsFile::parse(text.as_bytes(), format).expect("renders to a valid file");
        let mut want = before;
        want.push(("keystore:rules".to_owned(), "ENC[v1:kms:QUJD]".to_owned(), true));
        assert_eq!(read(&again), want);
    }
});
