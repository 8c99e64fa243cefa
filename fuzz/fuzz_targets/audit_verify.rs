//! The audit log reader and verifier over hostile files: every byte of a
//! log may come from root on the parent. Reading and verifying must end in
//! a summary or a typed failure, never a panic, and hold no line over the
//! bound.
//!
//! Input: a mode byte, then files separated by NUL bytes. With the mode's
//! low bit set, every record line that parses is first re-chained (its hash
//! recomputed, as a forger who knows SHA-256 would) so the fuzzer reaches
//! the sequence, gap, run and continuation checks behind the hash check.
//! Checkpoint documents are checked against the real AWS root, which no
//! fuzzer input can sign for.
#![no_main]

use keystore_shared::attestation::{Root, Verifier, VerifyAt};
use keystore_shared::audit::{
    AuditEvent, GENESIS_HASH, LineReader, LogLine, LogVerifier, MAX_LINE_LEN, VerifyError,
    chain::next_hash,
};
use libfuzzer_sys::fuzz_target;

/// Most files one input is split into.
const MAX_FILES: usize = 8;

/// Recomputes each record line's hash along the chain the lines describe.
fn rechain(file: &[u8], previous: &mut [u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(file.len());
    let mut reader = LineReader::new(file);
    while let Ok(Some(line)) = reader.next_line() {
        let text = match LogLine::parse(line.text) {
            Ok(LogLine::Record { record, .. }) => {
                let prev = match &record.event {
                    AuditEvent::Start { .. } => GENESIS_HASH,
                    AuditEvent::Gap { resume_hash, .. } => *resume_hash,
                    _ => *previous,
                };
                match next_hash(&prev, &record) {
                    Ok(hash) => {
                        *previous = hash;
                        LogLine::Record { record, hash }.to_json()
                    }
                    Err(_) => line.text.to_owned(),
                }
            }
            _ => line.text.to_owned(),
        };
        out.extend_from_slice(text.as_bytes());
        if line.terminated {
            out.push(b'\n');
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    // Every line handed out is within the bound.
    let mut reader = LineReader::new(rest);
    loop {
        match reader.next_line() {
            Ok(Some(line)) => assert!(line.text.len() <= MAX_LINE_LEN),
            Ok(None) => break,
            Err(_) => {}
        }
    }
    assert_eq!(reader.position(), rest.len() as u64);

    let Ok(root) = Root::aws_nitro_enclaves_g1() else {
        return;
    };
    let checker = Verifier::new(root).at(VerifyAt::Document);
    let mut verifier = LogVerifier::new(checker, mode & 2 != 0);
    let mut previous = GENESIS_HASH;
    for (i, file) in rest.split(|&b| b == 0).take(MAX_FILES).enumerate() {
        let file = if mode & 1 != 0 {
            rechain(file, &mut previous)
        } else {
            file.to_vec()
        };
        match verifier.verify_reader(&format!("f{i}"), file.as_slice()) {
            Ok(()) => {}
            Err(VerifyError::Invalid(failure)) => {
                let _ = failure.to_string();
                return;
            }
            Err(VerifyError::Io { .. }) => unreachable!("a byte slice cannot fail to read"),
        }
    }
    if let Ok(summary) = verifier.finish() {
        assert!(summary.records > 0);
        assert!(summary.uncovered <= summary.records);
        assert_eq!(summary.checkpoints, 0, "no input can sign for the AWS root");
    }
});
