//! The fuzz seed corpora in `fuzz/seeds/` stay valid inputs of the parsers
//! they seed: a seed the parser refuses only teaches the fuzzer the error
//! path, so a protocol change that outdates them fails here (regenerate
//! `frame_decode` with `python3 fuzz/seeds/gen_frame_seeds.py`).

use std::path::PathBuf;

use keystore_shared::AccessRules;
use keystore_shared::audit::AuditRecord;
use keystore_shared::envelope::Envelope;
use keystore_shared::file_record::FileRecord;
use keystore_shared::frame::decode_body;
use keystore_shared::protocol::{Request, Response, ResponseBody};

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

#[test]
fn frame_seeds_cover_every_request_and_response_variant() {
    let mut ops = Vec::new();
    let mut answers = Vec::new();
    for (name, body) in seeds("frame_decode") {
        if let Some(rest) = name.strip_prefix("req-") {
            if rest == "header-only" {
                assert!(decode_body::<Request>(&body).is_err());
                continue;
            }
            let request: Request = decode_body(&body).unwrap_or_else(|e| panic!("{name}: {e}"));
            ops.push(request.op.kind());
        } else {
            let response: Response = decode_body(&body).unwrap_or_else(|e| panic!("{name}: {e}"));
            if let ResponseBody::AuditRecords(batch) = &response.result {
                for entry in &batch.entries {
                    let record = AuditRecord::decode(&entry.record).unwrap();
                    assert_eq!(record.canonical_bytes().unwrap(), entry.record);
                }
            }
            if let ResponseBody::Status(status) = &response.result {
                // Every optional part present, so the fuzzer mutates each
                // (a misspelt key would silently decode as absent).
                assert!(
                    status.audit.is_some()
                        && status.breaker.is_some()
                        && status.kms_pins.is_some()
                        && status.kms.is_some()
                        && status.logs.is_some(),
                    "{name}: {status:?}"
                );
            }
            if let ResponseBody::LogRecords(batch) = &response.result {
                assert!(batch.entries.iter().any(|e| !e.fields.is_empty()), "{name}");
            }
            answers.push(response.result.kind());
        }
    }
    ops.sort_unstable();
    ops.dedup();
    answers.sort_unstable();
    answers.dedup();
    assert_eq!(
        ops,
        [
            "attest",
            "audit_checkpoint",
            "audit_read",
            "get",
            "get_credentials",
            "list",
            "load",
            "log_read",
            "status"
        ]
    );
    assert_eq!(
        answers,
        [
            "Attestation",
            "AuditCheckpointed",
            "AuditRecords",
            "Credentials",
            "Error",
            "Loaded",
            "LogRecords",
            "Names",
            "Secret",
            "Status"
        ]
    );
}

#[test]
fn json_rules_seeds_parse() {
    for (name, bytes) in seeds("rules_parse") {
        let text = bytes.split(|&b| b == 0xFF).next().unwrap();
        let parsed = AccessRules::from_json(text);
        match name.as_str() {
            "json" | "json-probe" => assert!(parsed.is_ok(), "{name}: {parsed:?}"),
            "two-whos" => assert!(parsed.is_err()),
            _ => {}
        }
    }
}

#[test]
fn envelope_seeds_parse() {
    for (name, bytes) in seeds("envelope_parse") {
        if name == "file-record" {
            let record = FileRecord::decode(&bytes).unwrap();
            assert_eq!(record.encode(), bytes);
        } else {
            let text = std::str::from_utf8(&bytes).unwrap();
            Envelope::parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}
