//! Verifying an audit log offline: the chain across files, every
//! checkpoint's attestation document, and what is left unprotected.
//!
//! [`LogVerifier`] reads the files oldest first, one line at a time (never
//! a whole file), and stops at the first problem, naming the file, line and
//! sequence number. For each line it checks, in order:
//!
//! - it is a whole line (a newline ends it) of at most
//!   [`super::MAX_LINE_LEN`] bytes of UTF-8 that parses as a [`LogLine`];
//! - it is byte for byte what [`LogLine::to_json`] writes for what was
//!   parsed: an edit the hash would not cover (spacing, key order, hex case,
//!   an unknown field inside `caller`) is still an edit;
//! - its sequence number follows the one before (a `start` begins a run at
//!   0 on [`GENESIS_HASH`]; a `gap` jumps by its count and chains onto its
//!   `resume_hash`); a jump is a dropped record, unless the next line holds
//!   the missing number, which makes it a reordering;
//! - `SHA-256(previous hash ‖ canonical record)` equals the line's hash;
//! - a checkpoint's document verifies (signature, chain to the root, time,
//!   PCRs) and its claim names this run, the previous record's sequence
//!   number and the chain hash after it.
//!
//! The chain is a plain hash, so anyone can extend it: only a checkpoint
//! proves records came from the enclave. Records after a run's last
//! checkpoint are reported as not covered ([`RunSummary::uncovered`]);
//! `strict` makes any such record a failure.

use std::collections::HashSet;
use std::io::Read;

use serde::Serialize;

use crate::attestation::{AttestationError, Verifier};

use super::chain::{ChainHash, GENESIS_HASH, next_hash};
use super::checkpoint::CheckpointClaim;
use super::line::LogLine;
use super::reader::{LineReader, ReadError};
use super::record::{AuditEvent, AuditRecord, RecordError, RunId};

/// Most enclave runs one verification follows (each costs a few hundred
/// bytes of memory; a real log has a handful).
pub const MAX_RUNS: usize = 100_000;

/// Why a log does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The file ends inside a line: it was cut short.
    #[error("the file ends inside a line (no newline): truncated")]
    Truncated,
    /// A line over [`super::MAX_LINE_LEN`].
    #[error("line longer than {} bytes", super::MAX_LINE_LEN)]
    LineTooLong,
    /// A line that is not UTF-8.
    #[error("line is not UTF-8")]
    NotUtf8,
    /// Not a record or continuation line.
    #[error("not an audit log line: {0}")]
    Malformed(String),
    /// The line is not the canonical text of what it holds.
    #[error(
        "record edited: the line differs from the canonical form of its record (spacing, order, case or an extra field)"
    )]
    NotCanonical,
    /// The recomputed chain hash differs from the line's.
    #[error(
        "record edited or forged: it does not hash to its chain hash (computed {computed}, line says {stated})"
    )]
    HashMismatch {
        /// `SHA-256(previous hash ‖ record)`, hex.
        computed: String,
        /// The hash the line carries, hex.
        stated: String,
    },
    /// Sequence numbers skip: records are missing.
    #[error("record #{expected} dropped: the next record is #{found}")]
    Dropped {
        /// The sequence number due.
        expected: u64,
        /// The one found.
        found: u64,
    },
    /// A record stands where another belongs.
    #[error("records reordered or duplicated: #{found} stands where #{expected} belongs")]
    Reordered {
        /// The sequence number due.
        expected: u64,
        /// The one found.
        found: u64,
    },
    /// The log's first record neither starts a run nor continues a chain.
    #[error("the log begins with record #{found}, not a start record or a continuation head")]
    NoStart {
        /// Its sequence number.
        found: u64,
    },
    /// A start record whose sequence number is not 0.
    #[error("a start record must carry #0, not #{found}")]
    BadStart {
        /// Its sequence number.
        found: u64,
    },
    /// A file's continuation head does not match the previous file's end.
    #[error("continuation head says the previous file ended at {stated}, but it ended at {actual}")]
    BrokenContinuation {
        /// What the head says (`#seq hash`).
        stated: String,
        /// What the previous file ended with.
        actual: String,
    },
    /// A continuation head that is not a file's first line.
    #[error("a continuation head may only be a file's first line")]
    MisplacedContinuation,
    /// A gap record that does not add up.
    #[error("gap record is inconsistent: {0}")]
    BadGap(&'static str),
    /// A record whose fields are over their bounds.
    #[error("record cannot be encoded: {0}")]
    BadRecord(RecordError),
    /// A checkpoint document that does not verify: another enclave (PCRs),
    /// a bad signature, another root, a certificate not valid at the time.
    #[error("checkpoint document invalid ({kind}): {0}", kind = .0.kind())]
    CheckpointInvalid(AttestationError),
    /// A valid document whose `user_data` is not a checkpoint claim.
    #[error("checkpoint document's user_data is not an audit checkpoint claim: {0}")]
    CheckpointClaim(RecordError),
    /// A valid checkpoint that vouches for something else than the log holds.
    #[error("checkpoint vouches for {field} {claimed}, but the log has {actual}")]
    CheckpointMismatch {
        /// `run`, `seq` or `hash`.
        field: &'static str,
        /// What the document says.
        claimed: String,
        /// What the log holds.
        actual: String,
    },
    /// With `strict`: records no checkpoint covers.
    #[error("{count} record(s) from here to the end of the run are not covered by a checkpoint")]
    Uncovered {
        /// How many.
        count: u64,
    },
    /// A run id seen before: a copy of an earlier run replayed as a
    /// restart.
    #[error("run {0} already appeared earlier in the log: replayed records")]
    ReplayedRun(String),
    /// More than [`MAX_RUNS`] runs.
    #[error("more than {MAX_RUNS} enclave runs")]
    TooManyRuns,
    /// Not a single record.
    #[error("no audit records")]
    Empty,
    /// The verifier was used again after it had reported a problem.
    #[error("verification already stopped at an earlier problem")]
    Stopped,
}

impl Problem {
    /// A stable name for scripts (`--json`).
    pub fn kind(&self) -> &'static str {
        match self {
            Problem::Truncated => "truncated",
            Problem::LineTooLong => "line_too_long",
            Problem::NotUtf8 => "not_utf8",
            Problem::Malformed(_) => "malformed",
            Problem::NotCanonical => "edited",
            Problem::HashMismatch { .. } => "hash_mismatch",
            Problem::Dropped { .. } => "dropped",
            Problem::Reordered { .. } => "reordered",
            Problem::NoStart { .. } => "no_start",
            Problem::BadStart { .. } => "bad_start",
            Problem::BrokenContinuation { .. } => "broken_continuation",
            Problem::MisplacedContinuation => "misplaced_continuation",
            Problem::BadGap(_) => "bad_gap",
            Problem::BadRecord(_) => "bad_record",
            Problem::CheckpointInvalid(_) => "checkpoint_invalid",
            Problem::CheckpointClaim(_) => "checkpoint_claim",
            Problem::CheckpointMismatch { .. } => "checkpoint_mismatch",
            Problem::Uncovered { .. } => "uncovered",
            Problem::ReplayedRun(_) => "replayed_run",
            Problem::TooManyRuns => "too_many_runs",
            Problem::Empty => "empty",
            Problem::Stopped => "stopped",
        }
    }
}

/// Where verification stopped and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {}{problem}", seq_prefix(*seq))]
pub struct Failure {
    /// The file, as it was named to [`LogVerifier::verify_reader`].
    pub file: String,
    /// 1-based line (0: the problem is not one line's, e.g. an empty log).
    pub line: u64,
    /// The first bad sequence number, when one is known.
    pub seq: Option<u64>,
    /// What is wrong.
    pub problem: Problem,
}

fn seq_prefix(seq: Option<u64>) -> String {
    seq.map(|s| format!("#{s}: ")).unwrap_or_default()
}

/// Why [`LogVerifier`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A file could not be read (not a verdict on the log).
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The log is invalid.
    #[error("{0}")]
    Invalid(Box<Failure>),
}

/// One enclave run as found in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunSummary {
    /// The run id (hex), from its start record or its first checkpoint;
    /// `None` if neither was seen.
    pub run: Option<String>,
    /// Whether the run's start record is in the log (`false`: the log
    /// begins mid-run, or the start was lost in a gap).
    pub started: bool,
    /// Where it begins (`file:line`).
    pub begins_at: String,
    /// First and last sequence numbers read.
    pub first_seq: u64,
    /// Last sequence number read.
    pub last_seq: u64,
    /// Records read.
    pub records: u64,
    /// Checkpoints verified.
    pub checkpoints: u64,
    /// Gap records.
    pub gaps: u64,
    /// Records the gaps say were dropped.
    pub dropped: u64,
    /// Sequence number of the last checkpoint record, if any.
    pub last_checkpoint: Option<u64>,
    /// Records after the last checkpoint: **not protected** (anyone could
    /// have written, edited or cut them).
    pub uncovered: u64,
    /// The first of those.
    pub first_uncovered: Option<u64>,
}

/// What a valid log holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Files read.
    pub files: usize,
    /// Records read.
    pub records: u64,
    /// Checkpoints verified.
    pub checkpoints: u64,
    /// Gap records.
    pub gaps: u64,
    /// Enclave restarts (runs after the first).
    pub restarts: u64,
    /// The sequence number before the first record, when the log began
    /// with a continuation head (earlier files missing: not checked).
    pub began_after: Option<u64>,
    /// Records not covered by a checkpoint, over all runs.
    pub uncovered: u64,
    /// The runs, oldest first.
    pub runs: Vec<RunSummary>,
}

/// A sequence jump waiting for the next line, which tells a dropped record
/// from a reordered one.
#[derive(Debug)]
struct Jump {
    file: String,
    line: u64,
    expected: u64,
    found: u64,
}

#[derive(Debug)]
struct Run {
    id: Option<RunId>,
    summary: RunSummary,
    first_uncovered_at: (String, u64),
}

/// Verifies an audit log fed to it file by file, oldest first.
#[derive(Debug)]
pub struct LogVerifier {
    checkpoints: Verifier,
    strict: bool,
    files: usize,
    file: String,
    /// The last record (or continuation point): sequence number and hash.
    last: Option<(u64, ChainHash)>,
    run: Option<Run>,
    runs: Vec<Run>,
    began_after: Option<u64>,
    seen_runs: HashSet<RunId>,
    jump: Option<Jump>,
    failed: bool,
}

impl LogVerifier {
    /// A verifier that checks checkpoint documents with `checkpoints` (its
    /// root, time and PCR expectations). With `strict`, records no
    /// checkpoint covers are a failure.
    pub fn new(checkpoints: Verifier, strict: bool) -> Self {
        LogVerifier {
            checkpoints,
            strict,
            files: 0,
            file: String::new(),
            last: None,
            run: None,
            runs: Vec::new(),
            began_after: None,
            seen_runs: HashSet::new(),
            jump: None,
            failed: false,
        }
    }

    /// Reads the next file, named `name` in reports.
    pub fn verify_reader(&mut self, name: &str, reader: impl Read) -> Result<(), VerifyError> {
        if self.failed {
            return Err(self.invalid(0, None, Problem::Stopped));
        }
        self.files += 1;
        self.file = name.to_owned();
        let mut lines = LineReader::new(reader);
        loop {
            let line = match lines.next_line() {
                Ok(Some(line)) => line,
                Ok(None) => return Ok(()),
                Err(ReadError::Io(source)) => {
                    self.failed = true;
                    return Err(VerifyError::Io {
                        file: self.file.clone(),
                        source,
                    });
                }
                Err(ReadError::TooLong { line }) => {
                    return Err(self.fail(line, self.next_seq(), Problem::LineTooLong));
                }
                Err(ReadError::NotUtf8 { line }) => {
                    return Err(self.fail(line, self.next_seq(), Problem::NotUtf8));
                }
            };
            if !line.terminated {
                return Err(self.fail(line.number, self.next_seq(), Problem::Truncated));
            }
            if let Err(e) = self.line(line.number, line.text) {
                self.failed = true;
                return Err(e);
            }
        }
    }

    /// Ends verification: the summary, or the problem the end reveals.
    pub fn finish(mut self) -> Result<Summary, VerifyError> {
        if self.failed {
            return Err(self.invalid(0, None, Problem::Stopped));
        }
        if let Some(jump) = self.jump.take() {
            return Err(jump_failure(jump, false));
        }
        if let Some(run) = self.run.take() {
            self.runs.push(run);
        }
        if self.strict
            && let Some(run) = self.runs.iter().find(|run| run.summary.uncovered > 0)
        {
            let (file, line) = run.first_uncovered_at.clone();
            return Err(VerifyError::Invalid(Box::new(Failure {
                file,
                line,
                seq: run.summary.first_uncovered,
                problem: Problem::Uncovered {
                    count: run.summary.uncovered,
                },
            })));
        }
        let runs: Vec<RunSummary> = self.runs.into_iter().map(|run| run.summary).collect();
        let records: u64 = runs.iter().map(|r| r.records).sum();
        if records == 0 {
            return Err(VerifyError::Invalid(Box::new(Failure {
                file: self.file,
                line: 0,
                seq: None,
                problem: Problem::Empty,
            })));
        }
        Ok(Summary {
            files: self.files,
            records,
            checkpoints: runs.iter().map(|r| r.checkpoints).sum(),
            gaps: runs.iter().map(|r| r.gaps).sum(),
            restarts: u64::try_from(runs.len().saturating_sub(1)).unwrap_or(u64::MAX),
            began_after: self.began_after,
            uncovered: runs.iter().map(|r| r.uncovered).sum(),
            runs,
        })
    }

    fn next_seq(&self) -> Option<u64> {
        self.last.and_then(|(seq, _)| seq.checked_add(1))
    }

    fn invalid(&self, line: u64, seq: Option<u64>, problem: Problem) -> VerifyError {
        VerifyError::Invalid(Box::new(Failure {
            file: self.file.clone(),
            line,
            seq,
            problem,
        }))
    }

    /// A failure at `line`, unless an earlier sequence jump is the first
    /// problem.
    fn fail(&mut self, line: u64, seq: Option<u64>, problem: Problem) -> VerifyError {
        self.failed = true;
        match self.jump.take() {
            Some(jump) => jump_failure(jump, false),
            None => self.invalid(line, seq, problem),
        }
    }

    fn line(&mut self, number: u64, text: &str) -> Result<(), VerifyError> {
        let parsed = LogLine::parse(text);
        if let Some(jump) = self.jump.take() {
            let reordered = matches!(&parsed, Ok(LogLine::Record { record, .. }) if record.seq == jump.expected);
            return Err(jump_failure(jump, reordered));
        }
        let parsed = parsed.map_err(|e| {
            self.invalid(number, self.next_seq(), Problem::Malformed(e.to_string()))
        })?;
        if parsed.to_json() != text {
            let seq = match &parsed {
                LogLine::Record { record, .. } => Some(record.seq),
                LogLine::Continues { .. } => None,
            };
            return Err(self.invalid(number, seq, Problem::NotCanonical));
        }
        match parsed {
            LogLine::Continues { seq, hash } => self.continues(number, seq, hash),
            LogLine::Record { record, hash } => self.record(number, &record, hash),
        }
    }

    fn continues(&mut self, number: u64, seq: u64, hash: ChainHash) -> Result<(), VerifyError> {
        if number != 1 {
            return Err(self.invalid(number, None, Problem::MisplacedContinuation));
        }
        match self.last {
            None => {
                // The log begins mid-chain: earlier files are gone. What
                // follows is checked from here on; the first checkpoint
                // names the run.
                self.last = Some((seq, hash));
                self.began_after = Some(seq);
                let first = seq.saturating_add(1);
                self.run = Some(self.new_run(number, None, false, first));
                Ok(())
            }
            Some((last_seq, last_hash)) if last_seq == seq && last_hash == hash => Ok(()),
            Some((last_seq, last_hash)) => Err(self.invalid(
                number,
                self.next_seq(),
                Problem::BrokenContinuation {
                    stated: format!("#{seq} {}", hex::encode(hash)),
                    actual: format!("#{last_seq} {}", hex::encode(last_hash)),
                },
            )),
        }
    }

    fn new_run(&self, number: u64, id: Option<RunId>, started: bool, first_seq: u64) -> Run {
        Run {
            id,
            summary: RunSummary {
                run: id.map(|id| hex::encode(id.0)),
                started,
                begins_at: format!("{}:{number}", self.file),
                first_seq,
                last_seq: first_seq,
                records: 0,
                checkpoints: 0,
                gaps: 0,
                dropped: 0,
                last_checkpoint: None,
                uncovered: 0,
                first_uncovered: None,
            },
            first_uncovered_at: (String::new(), 0),
        }
    }

    /// Closes the current run and opens another.
    fn begin_run(
        &mut self,
        number: u64,
        id: Option<RunId>,
        started: bool,
        first_seq: u64,
    ) -> Result<(), VerifyError> {
        if self.runs.len() >= MAX_RUNS {
            return Err(self.invalid(number, Some(first_seq), Problem::TooManyRuns));
        }
        if let Some(id) = id {
            self.see_run(number, first_seq, id)?;
        }
        let run = self.new_run(number, id, started, first_seq);
        if let Some(old) = self.run.replace(run) {
            self.runs.push(old);
        }
        Ok(())
    }

    /// A run id may appear once: a second start (or first checkpoint) of
    /// the same run is a replayed copy.
    fn see_run(&mut self, number: u64, seq: u64, id: RunId) -> Result<(), VerifyError> {
        if !self.seen_runs.insert(id) {
            return Err(self.invalid(number, Some(seq), Problem::ReplayedRun(hex::encode(id.0))));
        }
        Ok(())
    }

    /// Checks that `found` is the sequence number due; a forward jump is
    /// held until the next line says whether it is a reordering.
    fn expect_seq(&mut self, number: u64, found: u64) -> Result<bool, VerifyError> {
        let Some((last_seq, _)) = self.last else {
            return Err(self.invalid(number, Some(found), Problem::NoStart { found }));
        };
        let Some(expected) = last_seq.checked_add(1) else {
            return Err(self.invalid(
                number,
                Some(found),
                Problem::Malformed("sequence number overflows".to_owned()),
            ));
        };
        if found > expected {
            self.jump = Some(Jump {
                file: self.file.clone(),
                line: number,
                expected,
                found,
            });
            return Ok(false);
        }
        if found < expected {
            return Err(self.invalid(number, Some(found), Problem::Reordered { expected, found }));
        }
        Ok(true)
    }

    fn record(
        &mut self,
        number: u64,
        record: &AuditRecord,
        hash: ChainHash,
    ) -> Result<(), VerifyError> {
        let seq = record.seq;
        let previous = match &record.event {
            AuditEvent::Start { run } => {
                if seq != 0 {
                    return Err(self.invalid(number, Some(seq), Problem::BadStart { found: seq }));
                }
                self.begin_run(number, Some(*run), true, 0)?;
                GENESIS_HASH
            }
            AuditEvent::Gap {
                first_seq,
                count,
                resume_hash,
            } => {
                let bad = |problem| Err(self.invalid(number, Some(seq), Problem::BadGap(problem)));
                if *count == 0 {
                    return bad("it drops no records");
                }
                if first_seq.checked_add(*count) != Some(seq) {
                    return bad("its sequence number is not first_seq + count");
                }
                if *first_seq == 0 {
                    // A run whose start record was lost in the gap.
                    self.begin_run(number, None, false, 0)?;
                } else if !self.expect_seq(number, *first_seq)? {
                    return Ok(());
                }
                *resume_hash
            }
            AuditEvent::Request { .. } | AuditEvent::Checkpoint { .. } => {
                if !self.expect_seq(number, seq)? {
                    return Ok(());
                }
                match self.last {
                    Some((_, hash)) => hash,
                    None => GENESIS_HASH,
                }
            }
        };
        let computed = next_hash(&previous, record)
            .map_err(|e| self.invalid(number, Some(seq), Problem::BadRecord(e)))?;
        if computed != hash {
            return Err(self.invalid(
                number,
                Some(seq),
                Problem::HashMismatch {
                    computed: hex::encode(computed),
                    stated: hex::encode(hash),
                },
            ));
        }
        if let AuditEvent::Checkpoint { document } = &record.event {
            self.checkpoint(number, seq, document)?;
        }
        let file = self.file.clone();
        let Some(run) = self.run.as_mut() else {
            return Err(self.invalid(number, Some(seq), Problem::NoStart { found: seq }));
        };
        let s = &mut run.summary;
        if s.records == 0 {
            s.first_seq = seq;
        }
        s.records += 1;
        s.last_seq = seq;
        match &record.event {
            AuditEvent::Checkpoint { .. } => {
                s.checkpoints += 1;
                s.last_checkpoint = Some(seq);
                s.uncovered = 0;
                s.first_uncovered = None;
            }
            event => {
                if let AuditEvent::Gap { count, .. } = event {
                    s.gaps += 1;
                    s.dropped = s.dropped.saturating_add(*count);
                }
                if s.uncovered == 0 {
                    s.first_uncovered = Some(seq);
                    run.first_uncovered_at = (file, number);
                }
                s.uncovered += 1;
            }
        }
        self.last = Some((seq, hash));
        Ok(())
    }

    /// A checkpoint at `seq` must vouch for the record before it.
    fn checkpoint(&mut self, number: u64, seq: u64, document: &[u8]) -> Result<(), VerifyError> {
        let doc = self
            .checkpoints
            .verify(document)
            .map_err(|e| self.invalid(number, Some(seq), Problem::CheckpointInvalid(e)))?;
        let claim = CheckpointClaim::from_user_data(doc.user_data.as_deref().unwrap_or_default())
            .map_err(|e| self.invalid(number, Some(seq), Problem::CheckpointClaim(e)))?;
        let mismatch = |field, claimed: String, actual: String| {
            Err(self.invalid(
                number,
                Some(seq),
                Problem::CheckpointMismatch {
                    field,
                    claimed,
                    actual,
                },
            ))
        };
        let run_id = self.run.as_ref().and_then(|run| run.id);
        if let Some(id) = run_id
            && id != claim.run
        {
            return mismatch("run", hex::encode(claim.run.0), hex::encode(id.0));
        }
        let Some((last_seq, last_hash)) = self.last else {
            return mismatch("seq", format!("#{}", claim.seq), "nothing before it".into());
        };
        if claim.seq != last_seq {
            return mismatch("seq", format!("#{}", claim.seq), format!("#{last_seq}"));
        }
        if claim.hash != last_hash {
            return mismatch("hash", hex::encode(claim.hash), hex::encode(last_hash));
        }
        if run_id.is_none() {
            self.see_run(number, seq, claim.run)?;
        }
        if let Some(run) = self.run.as_mut()
            && run.id.is_none()
        {
            // The log began mid-run (or after a gap): the first checkpoint
            // names the run, and it covers the chain it was checked against.
            run.id = Some(claim.run);
            run.summary.run = Some(hex::encode(claim.run.0));
        }
        Ok(())
    }
}

fn jump_failure(jump: Jump, reordered: bool) -> VerifyError {
    let problem = if reordered {
        Problem::Reordered {
            expected: jump.expected,
            found: jump.found,
        }
    } else {
        Problem::Dropped {
            expected: jump.expected,
            found: jump.found,
        }
    };
    VerifyError::Invalid(Box::new(Failure {
        file: jump.file,
        line: jump.line,
        seq: Some(jump.expected),
        problem,
    }))
}
