//! `keystore-host audit ...`: verify the audit log the daemon writes, and
//! read it.
//!
//! `verify` is the only command that proves anything; `tail` and `grep`
//! show what the lines say, forged or not.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Args, Subcommand};
use keystore_shared::attestation::{Expectations, Verifier, VerifyAt};
use keystore_shared::audit::{
    AuditEvent, AuditOp, AuditRecord, LineReader, LogLine, LogVerifier, Outcome, Problem,
    ReadError, Summary, VerifyError,
};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::format_description;

use super::attestation::{At, EXIT_INVALID, load_root, parse_at, parse_pcr};

/// Most lines `tail -n` keeps.
const MAX_TAIL_LINES: usize = 100_000;
/// How often `tail -f` looks for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(250);

/// Subcommands of `audit`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify an audit log: the hash chain across files and every attested
    /// checkpoint. Exits 0 when valid, 1 at the first problem (named with
    /// its file, line and sequence number), 2 on usage or I/O errors.
    ///
    /// Give the files oldest first: `audit.jsonl.2 audit.jsonl.1
    /// audit.jsonl`. Records after a run's last checkpoint are reported as
    /// NOT protected: anyone who can write the file could have written,
    /// edited or cut them (`--strict` fails on them).
    Verify(VerifyArgs),
    /// Print the last records, one line each. Does NOT verify anything: a
    /// line shown may be forged; run `audit verify` for that.
    Tail(TailArgs),
    /// Print the records matching every filter given. Does NOT verify
    /// anything: a line shown may be forged; run `audit verify` for that.
    /// Exits 0 when a record matched, 1 when none did.
    Grep(GrepArgs),
}

/// Arguments of `audit verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Log files, oldest first.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Trusted root of the checkpoints' documents: `aws` (the embedded AWS
    /// Nitro Enclaves Root G1) or a path to a PEM or DER certificate.
    #[arg(long, default_value = "aws")]
    pub root: String,
    /// Expected PCR value of the enclave that wrote the checkpoints,
    /// `INDEX=HEX`; repeatable.
    #[arg(long = "pcr", value_name = "N=HEX", value_parser = parse_pcr)]
    pub pcrs: Vec<(u16, Vec<u8>)>,
    /// When certificates must be valid: `doc` (each document's own
    /// timestamp: the default, as a log outlives its certificates), `now`,
    /// or an RFC 3339 time.
    #[arg(long, default_value = "doc", value_parser = parse_at)]
    pub at: At,
    /// Fail when any record is not covered by a checkpoint.
    #[arg(long)]
    pub strict: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `audit tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    /// Log files, oldest first; the last lines of all of them are shown.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// How many records to show.
    #[arg(short = 'n', long = "lines", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(0..=MAX_TAIL_LINES as u64))]
    pub lines: u64,
    /// Keep printing records as they are appended to the last file
    /// (follows rotation by name).
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Print the log lines themselves (JSON) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `audit grep`.
#[derive(Debug, Args)]
pub struct GrepArgs {
    /// Log files, oldest first.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// A secret name or glob (`DB_*`) the record must name.
    #[arg(long, value_name = "GLOB")]
    pub name: Option<String>,
    /// The caller: a user name or a numeric uid.
    #[arg(long, value_name = "USER|UID")]
    pub caller: Option<String>,
    /// The operation: get, list, load, attest, status, audit, connect,
    /// malformed.
    #[arg(long, value_parser = parse_op)]
    pub op: Option<AuditOp>,
    /// The outcome: ok, denied, not_found, error, or an error code.
    #[arg(long)]
    pub outcome: Option<String>,
    /// Print the log lines themselves (JSON) instead of text.
    #[arg(long)]
    pub json: bool,
}

fn parse_op(s: &str) -> Result<AuditOp, String> {
    serde_json::from_value(Value::String(s.to_owned())).map_err(|_| {
        format!(
            "{s:?} is not an operation (get, list, load, attest, status, audit, connect, malformed)"
        )
    })
}

/// Runs a subcommand of `audit`.
pub fn run(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Verify(args) => verify(&args),
        AuditCommand::Tail(args) => tail(&args),
        AuditCommand::Grep(args) => grep(&args),
    }
}

fn verify(args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let root = load_root(&args.root)?;
    let at = match args.at {
        At::Doc => VerifyAt::Document,
        At::Now => VerifyAt::Time(SystemTime::now()),
        At::Time(t) => VerifyAt::Time(t),
    };
    let checker = Verifier::new(root).at(at).with_expectations(Expectations {
        pcrs: args.pcrs.iter().cloned().collect::<BTreeMap<_, _>>(),
        ..Expectations::default()
    });
    let mut verifier = LogVerifier::new(checker, args.strict);
    let mut result = Ok(());
    for path in &args.files {
        let name = path.display().to_string();
        let file = File::open(path).with_context(|| format!("opening {name}"))?;
        result = verifier.verify_reader(&name, file);
        if result.is_err() {
            break;
        }
    }
    let result = result.and_then(|()| verifier.finish());
    match result {
        Ok(summary) => {
            if args.json {
                println!("{}", json!({ "valid": true, "summary": summary }));
            } else {
                print!("{}", summary_text(&summary));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(VerifyError::Io { file, source }) => {
            Err(anyhow::Error::new(source).context(format!("reading {file}")))
        }
        Err(VerifyError::Invalid(failure)) => {
            if args.json {
                let detail = match &failure.problem {
                    Problem::CheckpointInvalid(e) => json!(e.kind()),
                    _ => Value::Null,
                };
                println!(
                    "{}",
                    json!({
                        "valid": false,
                        "file": failure.file,
                        "line": failure.line,
                        "seq": failure.seq,
                        "kind": failure.problem.kind(),
                        "checkpoint_error_kind": detail,
                        "error": failure.problem.to_string(),
                    })
                );
            } else {
                println!("INVALID: {failure}");
            }
            eprintln!("invalid: {failure}");
            Ok(ExitCode::from(EXIT_INVALID))
        }
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn summary_text(s: &Summary) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "valid: {} in {}, {} ({}), {}, {}",
        plural(s.records, "record", "records"),
        plural(s.files as u64, "file", "files"),
        plural(s.runs.len() as u64, "enclave run", "enclave runs"),
        plural(s.restarts, "restart", "restarts"),
        plural(s.checkpoints, "checkpoint", "checkpoints"),
        plural(s.gaps, "gap", "gaps"),
    );
    if let Some(seq) = s.began_after {
        let _ = writeln!(
            out,
            "note: the log begins after #{seq}; earlier files were not given and not checked"
        );
    }
    for (i, run) in s.runs.iter().enumerate() {
        let id = run.run.as_deref().unwrap_or("(unknown)");
        let how = match (i, run.started) {
            (0, true) => "starts",
            (_, true) => "RESTART",
            (_, false) => "continues",
        };
        let _ = writeln!(
            out,
            "run {id}: {how} at {}, #{}..#{}, {}, {}, {}",
            run.begins_at,
            run.first_seq,
            run.last_seq,
            plural(run.records, "record", "records"),
            plural(run.checkpoints, "checkpoint", "checkpoints"),
            if run.gaps == 0 {
                "no gaps".to_owned()
            } else {
                format!(
                    "{} ({} records dropped by the enclave: buffer full)",
                    plural(run.gaps, "gap", "gaps"),
                    run.dropped
                )
            },
        );
        match (run.uncovered, run.first_uncovered) {
            (0, _) | (_, None) => {
                let _ = writeln!(out, "  every record is covered by a checkpoint");
            }
            (n, Some(first)) => {
                let _ = writeln!(
                    out,
                    "  NOT PROTECTED: {} (#{first}..#{}) after the last checkpoint{}: no checkpoint vouches for them",
                    plural(n, "record", "records"),
                    run.last_seq,
                    run.last_checkpoint
                        .map(|c| format!(" (#{c})"))
                        .unwrap_or_else(|| " (the run has none)".to_owned()),
                );
            }
        }
    }
    out
}

/// One line read by `tail`/`grep`: its text and what it holds.
struct Shown {
    text: String,
    line: LogLine,
}

/// Reads every line of `path`, handing each parsed one to `each`; lines
/// that do not parse are reported on stderr and skipped. Returns the
/// position after the last whole line.
fn for_each_line(
    path: &Path,
    reader: impl Read,
    start: u64,
    mut each: impl FnMut(Shown),
) -> anyhow::Result<u64> {
    let name = path.display();
    let mut lines = LineReader::new(reader);
    let mut done = start;
    loop {
        match lines.next_line() {
            Ok(None) => return Ok(done),
            Ok(Some(line)) if !line.terminated => {
                // Cut short, or still being written (tail -f reads it
                // again once complete).
                return Ok(done);
            }
            Ok(Some(line)) => {
                let number = line.number;
                match LogLine::parse(line.text) {
                    Ok(parsed) => each(Shown {
                        text: line.text.to_owned(),
                        line: parsed,
                    }),
                    Err(e) => eprintln!("warning: {name}:{number}: skipped: {e}"),
                }
            }
            Err(ReadError::Io(e)) => {
                return Err(anyhow::Error::new(e).context(format!("reading {name}")));
            }
            Err(e) => eprintln!("warning: {name}: skipped: {e}"),
        }
        done = start.saturating_add(lines.position());
    }
}

fn open(path: &Path) -> anyhow::Result<File> {
    File::open(path).with_context(|| format!("opening {}", path.display()))
}

fn print_shown(out: &mut impl Write, shown: &Shown, raw: bool) -> std::io::Result<()> {
    if raw {
        writeln!(out, "{}", shown.text)
    } else {
        writeln!(out, "{}", human(&shown.line))
    }
}

fn tail(args: &TailArgs) -> anyhow::Result<ExitCode> {
    let keep = usize::try_from(args.lines).unwrap_or(MAX_TAIL_LINES);
    let mut last: VecDeque<Shown> = VecDeque::with_capacity(keep.min(1024));
    let mut end = 0;
    for path in &args.files {
        end = for_each_line(path, open(path)?, 0, |shown| {
            if keep == 0 {
                return;
            }
            if last.len() == keep {
                last.pop_front();
            }
            last.push_back(shown);
        })?;
    }
    let mut out = std::io::stdout().lock();
    for shown in &last {
        print_shown(&mut out, shown, args.json)?;
    }
    out.flush()?;
    drop(out);
    if args.follow
        && let Some(path) = args.files.last()
    {
        follow(path, end, args.json)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Identity of a file, to notice rotation.
fn identity(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

/// Prints lines appended to `path` from `position` on, until killed. A new
/// file at the path (rotation) or a shorter one is read from its start.
fn follow(path: &Path, mut position: u64, raw: bool) -> anyhow::Result<()> {
    let mut id = identity(&open(path)?.metadata()?);
    loop {
        std::thread::sleep(FOLLOW_POLL);
        let Ok(meta) = std::fs::metadata(path) else {
            // Between the rename and the new file: look again.
            continue;
        };
        if identity(&meta) != id || meta.len() < position {
            id = identity(&meta);
            position = 0;
        }
        if meta.len() == position {
            continue;
        }
        let mut file = open(path)?;
        file.seek(SeekFrom::Start(position))?;
        let mut out = std::io::stdout().lock();
        let mut failed = None;
        position = for_each_line(path, file, position, |shown| {
            if failed.is_none()
                && let Err(e) = print_shown(&mut out, &shown, raw)
            {
                failed = Some(e);
            }
        })?;
        out.flush()?;
        if let Some(e) = failed {
            // stdout closed (e.g. piped into head): stop.
            return Err(e.into());
        }
    }
}

/// The filters of `audit grep`.
struct Filter<'a> {
    args: &'a GrepArgs,
}

impl Filter<'_> {
    fn any(&self) -> bool {
        let a = self.args;
        a.name.is_some() || a.caller.is_some() || a.op.is_some() || a.outcome.is_some()
    }

    fn matches(&self, line: &LogLine) -> bool {
        let LogLine::Record { record, .. } = line else {
            return !self.any();
        };
        let AuditEvent::Request {
            op,
            names,
            caller,
            outcome,
            ..
        } = &record.event
        else {
            return !self.any();
        };
        let a = self.args;
        if let Some(pattern) = &a.name
            && !names
                .iter()
                .any(|n| keystore_shared::access::glob_match(pattern, n))
        {
            return false;
        }
        if let Some(who) = &a.caller {
            let Some(caller) = caller else {
                return false;
            };
            let hit = match who.parse::<u32>() {
                Ok(uid) => caller.uid == Some(uid),
                Err(_) => caller.user.as_deref() == Some(who.as_str()),
            };
            if !hit {
                return false;
            }
        }
        if a.op.is_some_and(|want| want != *op) {
            return false;
        }
        if let Some(want) = &a.outcome {
            let hit = match outcome {
                Outcome::Ok => want == "ok",
                Outcome::Denied => want == "denied",
                Outcome::NotFound => want == "not_found",
                Outcome::Error(code) => want == "error" || want == code,
            };
            if !hit {
                return false;
            }
        }
        true
    }
}

fn grep(args: &GrepArgs) -> anyhow::Result<ExitCode> {
    let filter = Filter { args };
    let mut out = std::io::stdout().lock();
    let mut matched = false;
    let mut failed = None;
    for path in &args.files {
        for_each_line(path, open(path)?, 0, |shown| {
            if failed.is_none() && filter.matches(&shown.line) {
                matched = true;
                if let Err(e) = print_shown(&mut out, &shown, args.json) {
                    failed = Some(e);
                }
            }
        })?;
        if let Some(e) = failed.take() {
            return Err(e.into());
        }
    }
    out.flush()?;
    Ok(if matched {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INVALID)
    })
}

/// Text from the log with control characters escaped, so a hostile line
/// cannot drive the terminal.
fn clean(text: &str) -> String {
    if text.chars().any(char::is_control) {
        text.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect()
    } else {
        text.to_owned()
    }
}

/// `2026-11-30T05:23:26.123Z`, or the raw milliseconds if out of range.
fn time_text(ms: u64) -> String {
    let format =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    i128::from(ms)
        .checked_mul(1_000_000)
        .and_then(|ns| OffsetDateTime::from_unix_timestamp_nanos(ns).ok())
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| format!("@{ms}ms"))
}

fn opt(v: Option<&str>) -> String {
    v.map_or_else(|| "-".to_owned(), clean)
}

/// One record as a line for people.
fn human(line: &LogLine) -> String {
    let (record, _) = match line {
        LogLine::Continues { seq, .. } => {
            return format!("-- continues after #{seq} (previous file)");
        }
        LogLine::Record { record, hash } => (record.as_ref(), hash),
    };
    let AuditRecord {
        seq,
        time_ms,
        event,
    } = record;
    let head = format!("{} #{seq}", time_text(*time_ms));
    match event {
        AuditEvent::Start { run } => format!("{head} start run={}", hex::encode(run.0)),
        AuditEvent::Gap {
            first_seq, count, ..
        } => format!(
            "{head} gap: {count} records #{first_seq}..#{} dropped by the enclave (buffer full)",
            first_seq.saturating_add(count.saturating_sub(1))
        ),
        AuditEvent::Checkpoint { document } => format!(
            "{head} checkpoint ({} bytes; not verified here)",
            document.len()
        ),
        AuditEvent::Request {
            op,
            names,
            count,
            caller,
            peer,
            outcome,
        } => {
            let op = serde_json::to_value(op)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let mut text = format!("{head} {op}");
            if names.is_empty() {
                text.push_str(" -");
            } else {
                let names: Vec<String> = names.iter().map(|n| clean(n)).collect();
                text.push(' ');
                text.push_str(&names.join(","));
            }
            if let Some(count) = count {
                text.push_str(&format!(" count={count}"));
            }
            match caller {
                Some(c) => text.push_str(&format!(
                    " user={} uid={} unit={} token={}",
                    opt(c.user.as_deref()),
                    c.uid.map_or_else(|| "-".to_owned(), |u| u.to_string()),
                    opt(c.unit.as_deref()),
                    opt(c.token.as_deref()),
                )),
                None => text.push_str(" caller=-"),
            }
            text.push_str(&format!(" peer={}", clean(peer)));
            let outcome = match outcome {
                Outcome::Ok => "ok".to_owned(),
                Outcome::Denied => "DENIED".to_owned(),
                Outcome::NotFound => "not_found".to_owned(),
                Outcome::Error(code) => format!("error:{}", clean(code)),
            };
            text.push_str(&format!(" -> {outcome}"));
            text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_control_characters() {
        assert_eq!(time_text(1_725_719_859_545), "2024-09-07T14:37:39.545Z");
        assert_eq!(time_text(u64::MAX), format!("@{}ms", u64::MAX));
        assert_eq!(clean("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(clean("plain"), "plain");
    }

    #[test]
    fn operations_parse_by_their_log_names() {
        assert_eq!(parse_op("get"), Ok(AuditOp::Get));
        assert_eq!(parse_op("malformed"), Ok(AuditOp::Malformed));
        assert!(parse_op("Get").is_err());
    }
}
