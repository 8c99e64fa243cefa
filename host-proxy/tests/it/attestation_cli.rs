//! `keystore-host attestation verify` run as a process against the real
//! vectors; the JSON output is cross-checked with manifest.json.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Output};

use keystore_shared::attestation::AttestationDocument;
use serde_json::Value;

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/vectors/nitro-kms");
const PRODUCTION: &str = "blocky_2024-09-07_production_max1024.cose";

fn doc_path(name: &str) -> PathBuf {
    PathBuf::from(format!("{VECTORS}/attestation/{name}"))
}

fn manifest() -> Value {
    let text = std::fs::read_to_string(format!("{VECTORS}/manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keystore-host"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn verify(doc: &str, extra: &[&str]) -> Output {
    let path = doc_path(doc);
    let mut args = vec!["attestation", "verify", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    run(&args)
}

fn stderr_line(out: &Output) -> String {
    let err = String::from_utf8(out.stderr.clone()).unwrap();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "exactly one stderr line, got {err:?}");
    lines[0].to_owned()
}

fn json_of(out: &Output) -> Value {
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(
        text.trim_end().lines().count(),
        1,
        "one JSON object: {text}"
    );
    serde_json::from_str(&text).unwrap()
}

fn is_zero_hex(h: &str) -> bool {
    h.bytes().all(|c| c == b'0')
}

#[test]
fn every_real_document_is_valid_at_its_timestamp_and_matches_the_manifest() {
    let manifest = manifest();
    let docs = manifest["attestation"].as_object().unwrap();
    assert_eq!(docs.len(), 6);
    for (name, m) in docs {
        let out = verify(name, &["--at", "doc", "--json"]);
        assert!(out.status.success(), "{name}: {out:?}");
        assert!(
            out.stderr.is_empty(),
            "{name}: nothing on stderr when valid"
        );
        let j = json_of(&out);
        assert_eq!(j["valid"], true);
        assert_eq!(j["error"], Value::Null);
        let d = &j["document"];
        assert_eq!(d["module_id"], m["module_id"], "{name}");
        assert_eq!(d["timestamp_ms"], m["timestamp_ms"], "{name}");
        assert_eq!(d["digest"], m["digest"]);
        assert_eq!(d["pcr_count"], m["pcr_count"]);
        let pcrs = m["pcrs"].as_object().unwrap();
        let nonzero: serde_json::Map<String, Value> = pcrs
            .iter()
            .filter(|(_, v)| !is_zero_hex(v.as_str().unwrap()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(d["pcrs"].as_object().unwrap(), &nonzero, "{name}");
        assert_eq!(d["zero_pcr_count"], pcrs.len() - nonzero.len());
        for field in ["public_key", "user_data", "nonce"] {
            assert_eq!(d[field]["len"], m[format!("{field}_len")], "{name} {field}");
        }
        let certs = d["certificates"].as_array().unwrap();
        assert_eq!(
            certs.len(),
            m["cabundle_len"].as_u64().unwrap() as usize + 1
        );
        let leaf_nb = m["leaf_not_before"]
            .as_str()
            .unwrap()
            .replace("+00:00", "Z");
        let leaf_na = m["leaf_not_after"].as_str().unwrap().replace("+00:00", "Z");
        assert_eq!(certs[0]["not_before"], leaf_nb.as_str(), "{name}");
        assert_eq!(certs[0]["not_after"], leaf_na.as_str(), "{name}");
        assert_eq!(j["checked_at"], d["timestamp"]);
    }
}

#[test]
fn human_output_for_a_valid_document() {
    let out = verify(PRODUCTION, &["--at", "doc"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("module_id:   i-0a22e5c5f24d22174-enc0191cceb4289903f"),
        "{text}"
    );
    assert!(
        text.contains("timestamp:   2024-09-07T14:37:39.545Z"),
        "{text}"
    );
    assert!(text.contains("16 (12 all-zero, not shown)"), "{text}");
    assert!(text.contains("PCR0       e72a46ca"), "{text}");
    assert!(!text.contains("PCR3 "), "zero PCRs are not listed: {text}");
    assert!(
        text.contains("valid 2024-09-07T14:37:36Z..2024-09-07T17:37:39Z"),
        "{text}"
    );
    assert!(text.contains("result:      valid"), "{text}");
}

#[test]
fn now_fails_naming_the_expired_leaf() {
    for json in [false, true] {
        let mut extra = vec!["--at", "now"];
        if json {
            extra.push("--json");
        }
        let out = verify(PRODUCTION, &extra);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let line = stderr_line(&out);
        assert!(
            line.starts_with(
                "invalid: certificate at depth 0 (CN=i-0a22e5c5f24d22174-enc0191cceb4289903f"
            ),
            "{line}"
        );
        assert!(
            line.contains("(valid 2024-09-07T14:37:36Z..2024-09-07T17:37:39Z)"),
            "{line}"
        );
        if json {
            let j = json_of(&out);
            assert_eq!(j["valid"], false);
            assert_eq!(j["error_kind"], "CertificateNotValidAt");
            assert_eq!(format!("invalid: {}", j["error"].as_str().unwrap()), line);
            assert_eq!(
                j["document"]["module_id"],
                "i-0a22e5c5f24d22174-enc0191cceb4289903f"
            );
        }
    }
    // Default --at is now.
    assert_eq!(verify(PRODUCTION, &[]).status.code(), Some(1));
}

#[test]
fn explicit_times_inside_and_outside_the_window() {
    let ok = verify(PRODUCTION, &["--at", "2024-09-07T16:00:00Z"]);
    assert!(ok.status.success(), "{ok:?}");
    let ok = verify(PRODUCTION, &["--at", "2024-09-07T18:00:00+02:00"]);
    assert!(ok.status.success(), "{ok:?}");
    let late = verify(PRODUCTION, &["--at", "2024-09-07T17:37:40Z"]);
    assert_eq!(late.status.code(), Some(1));
    assert!(stderr_line(&late).contains("not valid at 2024-09-07T17:37:40Z"));
    let bad = verify(PRODUCTION, &["--at", "tomorrow"]);
    assert_eq!(bad.status.code(), Some(2), "usage error");
}

#[test]
fn pcr_expectations() {
    let pcr0 = "e72a46ca80a260fb044a125442f0c7e331813bcbaf9724d9f3857758992766f2d65710a27aa94ae3949dd54e7c9fe86a";
    let good = format!("0={pcr0}");
    let out = verify(
        PRODUCTION,
        &[
            "--at",
            "doc",
            "--pcr",
            &good,
            "--pcr",
            &format!("3={}", "00".repeat(48)),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let wrong = format!("0={}", pcr0.replace("e72a", "e72b"));
    let out = verify(PRODUCTION, &["--at", "doc", "--pcr", &wrong]);
    assert_eq!(out.status.code(), Some(1));
    let line = stderr_line(&out);
    assert!(line.starts_with("invalid: PCR0 mismatch"), "{line}");
    let out = verify(PRODUCTION, &["--at", "doc", "--pcr", &format!("20={pcr0}")]);
    assert!(stderr_line(&out).contains("PCR20"));
}

#[test]
fn nonce_and_public_key_expectations() {
    let ones = "01".repeat(1024);
    let out = verify(
        PRODUCTION,
        &["--at", "doc", "--nonce", &ones, "--public-key", &ones],
    );
    assert!(out.status.success(), "{out:?}");
    let out = verify(PRODUCTION, &["--at", "doc", "--nonce", "0102"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr_line(&out),
        "invalid: nonce does not match the expected nonce"
    );
}

#[test]
fn roots_from_files() {
    let pem = format!("{VECTORS}/root/aws_nitro_enclaves_root_g1.pem");
    let der = format!("{VECTORS}/root/aws_nitro_enclaves_root_g1.der");
    for root in [pem.as_str(), der.as_str()] {
        let out = verify(PRODUCTION, &["--at", "doc", "--root", root]);
        assert!(out.status.success(), "{root}: {out:?}");
    }
    // An intermediate of the document itself posing as the root.
    let bytes = std::fs::read(doc_path(PRODUCTION)).unwrap();
    let doc = AttestationDocument::parse_unverified(&bytes).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let foreign = dir.path().join("foreign.der");
    std::fs::write(&foreign, &doc.cabundle[1]).unwrap();
    let out = verify(
        PRODUCTION,
        &["--at", "doc", "--root", foreign.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr_line(&out).starts_with("invalid: chain ends at"),
        "{out:?}"
    );

    let unusable = dir.path().join("unusable.pem");
    std::fs::write(
        &unusable,
        "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let out = verify(
        PRODUCTION,
        &["--at", "doc", "--root", unusable.to_str().unwrap()],
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unusable root is an error, not a verdict"
    );
    assert!(stderr_line(&out).starts_with("error: loading root"));
}

#[test]
fn garbage_is_invalid_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.cose");
    std::fs::write(&path, b"\x84\x01\x02\x03 not a document").unwrap();
    let out = run(&["attestation", "verify", path.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_line(&out).starts_with("invalid: malformed document"));
    let j = json_of(&out);
    assert_eq!(j["valid"], false);
    assert_eq!(j["document"], Value::Null);
    assert_eq!(j["error_kind"], "Malformed");

    let big = dir.path().join("big.cose");
    std::fs::write(&big, vec![0u8; 1 << 20]).unwrap();
    let out = run(&["attestation", "verify", big.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_line(&out)
            .starts_with("invalid: document is 32769 bytes, over the 32768-byte limit")
    );

    let out = run(&["attestation", "verify", "/nonexistent/doc.cose"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_line(&out).starts_with("error: opening /nonexistent/doc.cose"));
}
