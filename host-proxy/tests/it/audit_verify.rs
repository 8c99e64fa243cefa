//! `keystore-host audit verify|tail|grep` run as a process on logs built
//! with the real record, chain, line and checkpoint types (see
//! support/audit_log.rs), and the verifier itself under random damage.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use keystore_shared::attestation::{Root, Verifier, VerifyAt};
use keystore_shared::audit::{AuditEvent, LogLine, LogVerifier, Outcome, Problem, VerifyError};
use proptest::prelude::*;
use serde_json::Value;

use crate::support::audit_log::{
    self, LogBuilder, MockEnclave, OTHER_PCR0, PCR0, RUN_A, RUN_B, caller, continues_after,
    index_of, join, standard, write,
};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keystore-host"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn pcr_arg() -> String {
    format!("0={}", hex::encode(PCR0))
}

/// `audit verify --json` over `files`: exit code and the JSON answer.
fn verify(enclave: &MockEnclave, files: &[PathBuf], extra: &[&str]) -> (i32, Value) {
    let root = enclave.root_pem();
    let pcr = pcr_arg();
    let mut args = vec![
        "audit",
        "verify",
        "--root",
        root.to_str().unwrap(),
        "--pcr",
        &pcr,
        "--json",
    ];
    args.extend_from_slice(extra);
    for f in files {
        args.push(f.to_str().unwrap());
    }
    let out = run(&args);
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?} {out:?}"));
    (out.status.code().unwrap(), json)
}

fn verify_text(enclave: &MockEnclave, text: &str, extra: &[&str]) -> (i32, Value) {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "audit.jsonl", text);
    verify(enclave, &[file], extra)
}

/// Asserts the log is refused with `kind` at record `seq`.
fn assert_refused(enclave: &MockEnclave, text: &str, kind: &str, seq: u64) -> Value {
    let (code, json) = verify_text(enclave, text, &[]);
    assert_eq!(code, 1, "{json}");
    assert_eq!(json["valid"], false, "{json}");
    assert_eq!(json["kind"], kind, "{json}");
    assert_eq!(json["seq"], seq, "{json}");
    json
}

#[test]
fn an_untouched_log_verifies_and_names_what_is_not_protected() {
    let enclave = MockEnclave::new(PCR0);
    let log = standard(&enclave);
    let (code, json) = verify_text(&enclave, &log.text(), &[]);
    assert_eq!(code, 0, "{json}");
    let s = &json["summary"];
    assert_eq!(s["records"], 11, "{json}");
    assert_eq!(s["checkpoints"], 2);
    assert_eq!(s["gaps"], 1);
    assert_eq!(s["restarts"], 0);
    assert_eq!(s["uncovered"], 1);
    let first = &s["runs"][0];
    assert_eq!(first["run"], hex::encode(RUN_A.0));
    assert_eq!(first["dropped"], 2);
    assert_eq!(first["last_checkpoint"], 11);
    assert_eq!(first["first_uncovered"], 12);

    // Text: the unprotected tail is spelled out.
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "audit.jsonl", &log.text());
    let root = enclave.root_pem();
    let out = run(&[
        "audit",
        "verify",
        "--root",
        root.to_str().unwrap(),
        file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("valid: 11 records in 1 file"), "{text}");
    assert!(
        text.contains("NOT PROTECTED: 1 record (#12..#12) after the last checkpoint (#11)"),
        "{text}"
    );

    // --strict refuses the uncovered record, by number.
    let (code, json) = verify_text(&enclave, &log.text(), &["--strict"]);
    assert_eq!(code, 1);
    assert_eq!(json["kind"], "uncovered");
    assert_eq!(json["seq"], 12);
    // ...and passes once a checkpoint covers it.
    let mut covered = standard(&enclave);
    covered.checkpoint(&enclave.nsm);
    let (code, json) = verify_text(&enclave, &covered.text(), &["--strict"]);
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["summary"]["uncovered"], 0);
}

#[test]
fn an_edited_record_is_named() {
    let enclave = MockEnclave::new(PCR0);
    let log = standard(&enclave);
    // A field the hash covers: the chain breaks at that record.
    let mut lines = log.lines.clone();
    let i = index_of(&lines, 2);
    lines[i] = lines[i].replace("\"denied\"", "\"ok\"");
    assert_refused(&enclave, &join(&lines), "hash_mismatch", 2);
    // The edit re-hashed: the next record no longer chains onto it.
    let mut lines = log.lines.clone();
    let mut forged = LogBuilder::default();
    forged.start(RUN_A);
    forged.get("DB_PASSWORD", caller("api", 1000), Outcome::Ok);
    forged.get("DB_PASSWORD", caller("web", 1001), Outcome::Ok);
    let i = index_of(&lines, 2);
    lines[i] = forged.lines[2].clone();
    assert_refused(&enclave, &join(&lines), "hash_mismatch", 3);
    // What the hash would not see: an extra field inside `caller`, spacing,
    // upper-case hex.
    for edit in [
        |l: &str| l.replacen("\"caller\":{", "\"caller\":{\"note\":\"x\",", 1),
        |l: &str| l.replacen(",\"hash\"", ", \"hash\"", 1),
        |l: &str| {
            let (head, hash) = l.split_at(l.len() - 66);
            format!("{head}{}", hash.to_uppercase())
        },
    ] {
        let mut lines = log.lines.clone();
        let i = index_of(&lines, 5);
        lines[i] = edit(&lines[i]);
        assert_ne!(lines, log.lines);
        assert_refused(&enclave, &join(&lines), "edited", 5);
    }
}

#[test]
fn a_dropped_record_is_named() {
    let enclave = MockEnclave::new(PCR0);
    let mut lines = standard(&enclave).lines;
    lines.remove(index_of(&lines, 5));
    let json = assert_refused(&enclave, &join(&lines), "dropped", 5);
    assert!(
        json["error"].as_str().unwrap().contains("#5 dropped"),
        "{json}"
    );
    // The last record of the file too: the next file's head says so.
    let enclave_lines = standard(&enclave).lines;
    let dir = tempfile::tempdir().unwrap();
    let first = write(dir.path(), "audit.jsonl.1", &join(&enclave_lines[..5]));
    let head = continues_after(&enclave_lines[5]);
    let mut second = vec![head];
    second.extend_from_slice(&enclave_lines[6..]);
    let second = write(dir.path(), "audit.jsonl", &join(&second));
    let (code, json) = verify(&enclave, &[first, second], &[]);
    assert_eq!(code, 1);
    assert_eq!(json["kind"], "broken_continuation", "{json}");
    assert_eq!(json["seq"], 5);
}

#[test]
fn reordered_records_are_named() {
    let enclave = MockEnclave::new(PCR0);
    let mut lines = standard(&enclave).lines;
    let i = index_of(&lines, 5);
    lines.swap(i, i + 1);
    assert_refused(&enclave, &join(&lines), "reordered", 5);
}

#[test]
fn an_appended_forged_record_is_named() {
    let enclave = MockEnclave::new(PCR0);
    let log = standard(&enclave);
    // A forger who does not bother with the hash.
    let mut lines = log.lines.clone();
    let mut other = LogBuilder::default();
    other.start(RUN_A);
    other.record(
        13,
        AuditEvent::Request {
            op: keystore_shared::audit::AuditOp::Get,
            names: vec!["DB_PASSWORD".into()],
            count: None,
            caller: Some(caller("mallory", 1002)),
            peer: "unix:uid=0".into(),
            outcome: Outcome::Ok,
        },
    );
    lines.push(other.lines[1].clone());
    assert_refused(&enclave, &join(&lines), "hash_mismatch", 13);

    // A forger who chains it properly: the chain holds, but no checkpoint
    // covers it, and the verifier says so by number.
    let mut chained = standard(&enclave);
    chained.get("DB_PASSWORD", caller("mallory", 1002), Outcome::Ok);
    let (code, json) = verify_text(&enclave, &chained.text(), &[]);
    assert_eq!(code, 0);
    assert_eq!(json["summary"]["runs"][0]["uncovered"], 2);
    assert_eq!(json["summary"]["runs"][0]["first_uncovered"], 12);
    let (code, json) = verify_text(&enclave, &chained.text(), &["--strict"]);
    assert_eq!(code, 1);
    assert_eq!(json["kind"], "uncovered");

    // Inserted before a checkpoint and everything after re-chained: the
    // enclave's checkpoint no longer matches.
    let genuine = standard(&enclave);
    let document =
        match keystore_shared::audit::LogLine::parse(&genuine.lines[index_of(&genuine.lines, 11)])
            .unwrap()
        {
            keystore_shared::audit::LogLine::Record { record, .. } => match record.event {
                AuditEvent::Checkpoint { document } => document,
                _ => unreachable!(),
            },
            _ => unreachable!(),
        };
    let mut forged = LogBuilder::default();
    forged.start(RUN_A);
    forged.get("DB_PASSWORD", caller("api", 1000), Outcome::Ok);
    forged.get("DB_PASSWORD", caller("web", 1001), Outcome::Denied);
    forged.list(3);
    forged.checkpoint(&enclave.nsm);
    forged.get("API_TOKEN", caller("api", 1000), Outcome::Ok);
    forged.get("DB_PASSWORD", caller("mallory", 1002), Outcome::Ok);
    forged.event(AuditEvent::Checkpoint { document });
    assert_refused(&enclave, &forged.text(), "checkpoint_mismatch", 7);
}

#[test]
fn a_checkpoint_from_another_enclave_is_named() {
    let enclave = MockEnclave::new(PCR0);
    // Same root, other PCR0: only the expected PCR tells them apart.
    let other = enclave.sibling(OTHER_PCR0);
    let mut log = LogBuilder::default();
    log.start(RUN_A);
    log.get("DB_PASSWORD", caller("api", 1000), Outcome::Ok);
    log.checkpoint(&other);
    let json = assert_refused(&enclave, &log.text(), "checkpoint_invalid", 2);
    assert_eq!(json["checkpoint_error_kind"], "PcrMismatch", "{json}");

    // Another root altogether.
    let stranger = MockEnclave::new(PCR0);
    let mut log = LogBuilder::default();
    log.start(RUN_A);
    log.get("DB_PASSWORD", caller("api", 1000), Outcome::Ok);
    log.checkpoint(&stranger.nsm);
    let json = assert_refused(&enclave, &log.text(), "checkpoint_invalid", 2);
    assert_ne!(json["checkpoint_error_kind"], "PcrMismatch", "{json}");
}

#[test]
fn a_checkpoint_with_a_wrong_hash_seq_or_run_is_named() {
    let enclave = MockEnclave::new(PCR0);
    for (field, tweak) in [
        (
            "hash",
            (|c: &mut keystore_shared::audit::CheckpointClaim| c.hash[0] ^= 1)
                as fn(&mut keystore_shared::audit::CheckpointClaim),
        ),
        ("seq", |c| c.seq -= 1),
        ("run", |c| c.run = RUN_B),
    ] {
        let mut log = LogBuilder::default();
        log.start(RUN_A);
        log.get("DB_PASSWORD", caller("api", 1000), Outcome::Ok);
        log.get("API_TOKEN", caller("api", 1000), Outcome::Ok);
        let mut claim = log.claim();
        tweak(&mut claim);
        log.checkpoint_with(&enclave.nsm, claim);
        let json = assert_refused(&enclave, &log.text(), "checkpoint_mismatch", 3);
        assert!(
            json["error"]
                .as_str()
                .unwrap()
                .starts_with(&format!("checkpoint vouches for {field}")),
            "{json}"
        );
    }
}

#[test]
fn a_truncated_file_is_named() {
    let enclave = MockEnclave::new(PCR0);
    let text = standard(&enclave).text();
    let cut = &text[..text.len() - 20];
    let json = assert_refused(&enclave, cut, "truncated", 12);
    assert_eq!(json["line"], 11);
}

#[test]
fn rotation_keeps_the_chain() {
    let enclave = MockEnclave::new(PCR0);
    let lines = standard(&enclave).lines;
    let dir = tempfile::tempdir().unwrap();
    let split = [3, 7];
    let mut files = Vec::new();
    let mut from = 0;
    for (n, &to) in split.iter().chain([lines.len()].iter()).enumerate() {
        let mut part = Vec::new();
        if from > 0 {
            part.push(continues_after(&lines[from - 1]));
        }
        part.extend_from_slice(&lines[from..to]);
        files.push(write(
            dir.path(),
            &format!("audit.jsonl.{}", split.len() - n),
            &join(&part),
        ));
        from = to;
    }
    let (code, json) = verify(&enclave, &files, &[]);
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["summary"]["files"], 3);
    assert_eq!(json["summary"]["records"], 11);

    // Files given out of order: the heads do not match, or the older file
    // reads as a replay of a run already seen.
    let (code, json) = verify(&enclave, &[files[1].clone(), files[0].clone()], &[]);
    assert_eq!(code, 1);
    assert_eq!(json["kind"], "replayed_run", "{json}");
    let (code, json) = verify(
        &enclave,
        &[files[0].clone(), files[2].clone(), files[1].clone()],
        &[],
    );
    assert_eq!(code, 1);
    assert_eq!(json["kind"], "broken_continuation", "{json}");

    // The oldest file gone: the rest verifies from its head, and the first
    // checkpoint names the run.
    let (code, json) = verify(&enclave, &files[1..], &[]);
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["summary"]["began_after"], 2);
    assert_eq!(json["summary"]["runs"][0]["run"], hex::encode(RUN_A.0));
    assert_eq!(json["summary"]["runs"][0]["started"], false);
}

#[test]
fn a_restart_is_reported_and_a_replayed_run_refused() {
    let enclave = MockEnclave::new(PCR0);
    let mut log = standard(&enclave);
    let first_run = log.lines.clone();
    log.start(RUN_B);
    log.get("DB_PASSWORD", caller("api", 1000), Outcome::Ok);
    log.checkpoint(&enclave.nsm);
    let (code, json) = verify_text(&enclave, &log.text(), &[]);
    assert_eq!(code, 0, "{json}");
    let s = &json["summary"];
    assert_eq!(s["restarts"], 1);
    assert_eq!(s["runs"][1]["run"], hex::encode(RUN_B.0));
    assert_eq!(s["runs"][1]["started"], true);
    assert_eq!(
        s["runs"][1]["begins_at"]
            .as_str()
            .unwrap()
            .split(':')
            .next_back(),
        Some("12")
    );
    assert_eq!(s["runs"][0]["uncovered"], 1);
    assert_eq!(s["runs"][1]["uncovered"], 0);

    // The first run copied after the second, posing as a third.
    let mut lines = log.lines.clone();
    lines.extend(first_run);
    assert_refused(&enclave, &join(&lines), "replayed_run", 0);
}

#[test]
fn a_gap_must_add_up() {
    let enclave = MockEnclave::new(PCR0);
    let log = standard(&enclave);
    let mut lines = log.lines.clone();
    let i = index_of(&lines, 9);
    // A gap that claims to start later than the next record due.
    lines[i] = lines[i].replace("\"first_seq\":7,\"count\":2", "\"first_seq\":8,\"count\":1");
    assert_refused(&enclave, &join(&lines), "dropped", 7);
    let mut lines = log.lines.clone();
    lines[i] = lines[i].replace("\"count\":2", "\"count\":3");
    assert_refused(&enclave, &join(&lines), "bad_gap", 9);
}

#[test]
fn empty_and_garbage_files() {
    let enclave = MockEnclave::new(PCR0);
    let (code, json) = verify_text(&enclave, "", &[]);
    assert_eq!(code, 1);
    assert_eq!(json["kind"], "empty");
    let (code, json) = verify_text(&enclave, "not json\n", &[]);
    assert_eq!(code, 1);
    assert_eq!(json["kind"], "malformed");
    let long = "x".repeat(keystore_shared::audit::MAX_LINE_LEN + 1);
    let (code, json) = verify_text(&enclave, &long, &[]);
    assert_eq!(code, 1);
    assert_eq!(json["kind"], "line_too_long");
    // A missing file is an I/O error, not a verdict.
    let out = run(&["audit", "verify", "/nonexistent/audit.jsonl"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

fn log_file(enclave: &MockEnclave) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "audit.jsonl", &standard(enclave).text());
    (dir, file)
}

fn stdout_lines(out: &Output) -> Vec<String> {
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn grep_finds_reads_by_caller_name_op_and_outcome() {
    let enclave = MockEnclave::new(PCR0);
    let (_dir, file) = log_file(&enclave);
    let f = file.to_str().unwrap();
    let out = run(&["audit", "grep", "--caller", "api", f]);
    assert!(out.status.success(), "{out:?}");
    let lines = stdout_lines(&out);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines.iter().all(|l| l.contains(" user=api uid=1000 ")));
    let out = run(&[
        "audit",
        "grep",
        "--caller",
        "1001",
        "--outcome",
        "denied",
        f,
    ]);
    let lines = stdout_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].ends_with(
            "#2 get DB_PASSWORD user=web uid=1001 unit=web.service token=- peer=unix:uid=0 -> DENIED"
        ),
        "{lines:?}"
    );
    assert!(lines[0].starts_with("2025-11-30T05:20:"), "{lines:?}");
    let out = run(&["audit", "grep", "--name", "API_*", "--op", "get", f]);
    assert_eq!(stdout_lines(&out).len(), 2);
    // --json prints the lines themselves.
    let out = run(&["audit", "grep", "--name", "MISSING", "--json", f]);
    let lines = stdout_lines(&out);
    assert_eq!(lines.len(), 1);
    assert_eq!(audit_log::point(&lines[0]).0, 6);
    // Nothing matches: exit 1.
    let out = run(&["audit", "grep", "--caller", "nobody", f]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    // The help says it does not verify.
    let help = run(&["audit", "grep", "--help"]);
    assert!(
        String::from_utf8(help.stdout)
            .unwrap()
            .contains("Does NOT verify")
    );
}

#[test]
fn tail_shows_the_last_records_across_files_and_follows() {
    let enclave = MockEnclave::new(PCR0);
    let lines = standard(&enclave).lines;
    let dir = tempfile::tempdir().unwrap();
    let old = write(dir.path(), "audit.jsonl.1", &join(&lines[..10]));
    let mut rest = vec![continues_after(&lines[9])];
    rest.push(lines[10].clone());
    let current = write(dir.path(), "audit.jsonl", &join(&rest));
    let out = run(&[
        "audit",
        "tail",
        "-n",
        "3",
        old.to_str().unwrap(),
        current.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    let shown = stdout_lines(&out);
    assert_eq!(shown.len(), 3, "{shown:?}");
    assert!(shown[0].contains(" #11 checkpoint ("), "{shown:?}");
    assert_eq!(shown[1], "-- continues after #11 (previous file)");
    assert!(
        shown[2].contains(" #12 get API_TOKEN user=web"),
        "{shown:?}"
    );

    // -f: a line appended later is printed; a half-written one waits.
    let mut child = Command::new(env!("CARGO_BIN_EXE_keystore-host"))
        .args(["audit", "tail", "-n", "0", "-f", current.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let mut more = standard(&enclave);
    more.get("LATE", caller("api", 1000), Outcome::Ok);
    let late = more.lines.last().unwrap().clone();
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&current)
        .unwrap();
    let (a, b) = late.split_at(40);
    file.write_all(a.as_bytes()).unwrap();
    file.flush().unwrap();
    std::thread::sleep(Duration::from_millis(600));
    file.write_all(format!("{b}\n").as_bytes()).unwrap();
    let got = rx.recv_timeout(Duration::from_secs(20));
    child.kill().unwrap();
    child.wait().unwrap();
    let got = got.expect("tail -f printed the appended record");
    assert!(got.contains(" #13 get LATE user=api"), "{got}");
}

// ---- the verifier under random damage (library, no process) ----

struct Fixture {
    _enclave: MockEnclave,
    pem: String,
    text: String,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let enclave = MockEnclave::new(PCR0);
        let mut log = standard(&enclave);
        log.start(RUN_B);
        log.get("DB_PASSWORD", caller("api", 1000), Outcome::Ok);
        log.checkpoint(&enclave.nsm);
        log.get("API_TOKEN", caller("web", 1001), Outcome::Denied);
        let pem = std::fs::read_to_string(enclave.root_pem()).unwrap();
        Fixture {
            _enclave: enclave,
            pem,
            text: log.text(),
        }
    })
}

fn verify_lib(text: &[u8]) -> Result<keystore_shared::audit::Summary, VerifyError> {
    let f = fixture();
    let checker = Verifier::new(Root::from_pem(&f.pem).unwrap())
        .at(VerifyAt::Document)
        .expect_pcr(0, PCR0.to_vec());
    let mut verifier = LogVerifier::new(checker, false);
    verifier.verify_reader("audit.jsonl", text)?;
    verifier.finish()
}

#[derive(Debug, Clone)]
enum Damage {
    Flip { at: usize, xor: u8 },
    Delete { line: usize },
    Swap { a: usize, b: usize },
    Duplicate { line: usize, to: usize },
    Cut { at: usize },
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, xor)| Damage::Flip { at, xor }),
        any::<usize>().prop_map(|line| Damage::Delete { line }),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Damage::Swap { a, b }),
        (any::<usize>(), any::<usize>()).prop_map(|(line, to)| Damage::Duplicate { line, to }),
        any::<usize>().prop_map(|at| Damage::Cut { at }),
    ]
}

/// Applies `d`; `None` when it is a no-op, or removes the last record of a
/// run (the end of the log, or before a restart). No offline check can
/// see that: nothing after it vouches for it, which is what `uncovered`
/// reports.
fn apply(text: &str, d: &Damage) -> Option<Vec<u8>> {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let n = lines.len();
    let out = match *d {
        Damage::Flip { at, xor } => {
            let mut bytes = text.as_bytes().to_vec();
            let at = at % bytes.len();
            bytes[at] ^= xor;
            bytes
        }
        Damage::Delete { line } => {
            let line = line % n;
            let ends_run = lines.get(line + 1).is_none_or(|next| {
                matches!(
                    LogLine::parse(next),
                    Ok(LogLine::Record { record, .. })
                        if matches!(record.event, AuditEvent::Start { .. })
                )
            });
            if ends_run {
                return None;
            }
            lines.remove(line);
            join(&lines).into_bytes()
        }
        Damage::Swap { a, b } => {
            let (a, b) = (a % n, b % n);
            if lines[a] == lines[b] {
                return None;
            }
            lines.swap(a, b);
            join(&lines).into_bytes()
        }
        Damage::Duplicate { line, to } => {
            let copy = lines[line % n].clone();
            lines.insert(to % (n + 1), copy);
            join(&lines).into_bytes()
        }
        Damage::Cut { at } => {
            let at = at % text.len();
            if at == 0 || text.as_bytes()[at - 1] == b'\n' {
                return None;
            }
            text.as_bytes()[..at].to_vec()
        }
    };
    (out != text.as_bytes()).then_some(out)
}

#[test]
fn the_fixture_verifies() {
    let summary = verify_lib(fixture().text.as_bytes()).unwrap();
    assert_eq!(summary.restarts, 1);
    assert_eq!(summary.checkpoints, 3);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn no_damage_goes_unnoticed(d in damage()) {
        let text = &fixture().text;
        if let Some(damaged) = apply(text, &d) {
            match verify_lib(&damaged) {
                Err(VerifyError::Invalid(failure)) => {
                    // Every report names a line; all but an empty log name
                    // a record too.
                    prop_assert!(failure.line > 0 || failure.problem == Problem::Empty);
                }
                other => prop_assert!(false, "{d:?} passed: {other:?}"),
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = verify_lib(&bytes);
    }
}
