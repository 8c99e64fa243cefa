//! `keystore-host attestation ...`: decode and verify NSM attestation
//! documents from the command line.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context;
use clap::{Args, Subcommand};
use keystore_shared::attestation::{
    AttestationDocument, AttestationError, Expectations, MAX_DOCUMENT_SIZE, Root, Verifier,
    VerifyAt, rfc3339,
};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Exit code for a document that failed verification (2 is for usage and
/// I/O errors, as clap does).
pub(crate) const EXIT_INVALID: u8 = 1;

/// Subcommands of `attestation`.
#[derive(Debug, Subcommand)]
pub enum AttestationCommand {
    /// Decode an attestation document and verify its signature, certificate
    /// chain and optional expectations. Exits 0 only when valid.
    Verify(VerifyArgs),
}

/// Arguments of `attestation verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// File holding the raw COSE_Sign1 bytes from the NSM.
    pub file: PathBuf,
    /// Trusted root: `aws` (the embedded AWS Nitro Enclaves Root G1) or a
    /// path to a PEM or DER certificate (e.g. a mock NSM's root).
    #[arg(long, default_value = "aws")]
    pub root: String,
    /// When certificates must be valid: `doc` (the document's timestamp),
    /// `now`, or an RFC 3339 time.
    #[arg(long, default_value = "now", value_parser = parse_at)]
    pub at: At,
    /// Expected PCR value, `INDEX=HEX`; repeatable.
    #[arg(long = "pcr", value_name = "N=HEX", value_parser = parse_pcr)]
    pub pcrs: Vec<(u16, Vec<u8>)>,
    /// Expected nonce, hex.
    #[arg(long, value_name = "HEX", value_parser = parse_hex_arg)]
    pub nonce: Option<HexArg>,
    /// Expected public_key, hex.
    #[arg(long, value_name = "HEX", value_parser = parse_hex_arg)]
    pub public_key: Option<HexArg>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A hex command-line value (a newtype so clap treats it as one value,
/// not a list of bytes).
#[derive(Debug, Clone)]
pub struct HexArg(pub Vec<u8>);

fn parse_hex_arg(s: &str) -> Result<HexArg, String> {
    parse_hex(s).map(HexArg)
}

/// The `--at` choice.
#[derive(Debug, Clone, Copy)]
pub enum At {
    /// The document's own timestamp.
    Doc,
    /// The wall clock.
    Now,
    /// A fixed time.
    Time(SystemTime),
}

pub(crate) fn parse_at(s: &str) -> Result<At, String> {
    match s {
        "doc" => Ok(At::Doc),
        "now" => Ok(At::Now),
        other => parse_time(other).map(At::Time),
    }
}

/// Parses an RFC 3339 time (`2024-09-07T14:37:39Z`, any offset, optional
/// fraction). Only years from 1970 are accepted: certificates cannot be
/// older.
fn parse_time(s: &str) -> Result<SystemTime, String> {
    let bad = || format!("{s:?} is not an RFC 3339 time like 2024-09-07T14:37:39Z");
    let time = OffsetDateTime::parse(s, &Rfc3339).map_err(|_| bad())?;
    if time.year() < 1970 {
        return Err(bad());
    }
    Ok(time.into())
}

fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    let s = s.strip_prefix("0x").unwrap_or(s);
    hex::decode(s).map_err(|e| format!("not hex: {e}"))
}

pub(crate) fn parse_pcr(s: &str) -> Result<(u16, Vec<u8>), String> {
    let (index, value) = s.split_once('=').ok_or("expected N=HEX")?;
    let index: u16 = index
        .trim_start_matches("PCR")
        .parse()
        .map_err(|_| format!("{index:?} is not a PCR index"))?;
    if index >= 32 {
        return Err(format!("PCR index {index} must be below 32"));
    }
    Ok((index, parse_hex(value)?))
}

/// Runs a subcommand of `attestation`.
pub fn run(cmd: AttestationCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AttestationCommand::Verify(args) => verify(&args),
    }
}

pub(crate) fn load_root(spec: &str) -> anyhow::Result<Root> {
    if spec == "aws" {
        return Ok(Root::aws_nitro_enclaves_g1()?);
    }
    let bytes = read_bounded(&PathBuf::from(spec), 64 * 1024)
        .with_context(|| format!("reading root {spec}"))?;
    let root =
        if bytes.starts_with(b"-----BEGIN") || bytes.first().is_some_and(u8::is_ascii_whitespace) {
            let text = std::str::from_utf8(&bytes).context("PEM root is not UTF-8")?;
            Root::from_pem(text)
        } else {
            Root::from_der(&bytes)
        };
    root.with_context(|| format!("loading root {spec}"))
}

/// Reads at most `max + 1` bytes so an oversized file is detected without
/// being read whole.
pub(crate) fn read_bounded(path: &PathBuf, max: usize) -> anyhow::Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = Vec::new();
    file.take(max as u64 + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(buf)
}

fn verify(args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let root = load_root(&args.root)?;
    let bytes = read_bounded(&args.file, MAX_DOCUMENT_SIZE)?;
    let parsed = AttestationDocument::parse_unverified(&bytes);
    let at = match args.at {
        At::Doc => VerifyAt::Document,
        // Fix "now" once so the printed time is the one checked.
        At::Now => VerifyAt::Time(SystemTime::now()),
        At::Time(t) => VerifyAt::Time(t),
    };
    let checked_at = match (at, &parsed) {
        (VerifyAt::Time(t), _) => Some(t),
        (_, Ok(doc)) => doc.time(),
        _ => None,
    };
    let expectations = Expectations {
        pcrs: args.pcrs.iter().cloned().collect::<BTreeMap<_, _>>(),
        nonce: args.nonce.clone().map(|h| h.0),
        public_key: args.public_key.clone().map(|h| h.0),
    };
    tracing::debug!(file = %args.file.display(), len = bytes.len(), root = %root.subject(), "verifying");
    let result = Verifier::new(root.clone())
        .at(at)
        .with_expectations(expectations)
        .verify(&bytes);

    let report = Report {
        file: args.file.display().to_string(),
        size: bytes.len(),
        root: &root,
        checked_at,
        parsed: &parsed,
        result: result.as_ref().map(|_| ()).map_err(Clone::clone),
    };
    if args.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.text());
    }
    match result {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("invalid: {e}");
            Ok(ExitCode::from(EXIT_INVALID))
        }
    }
}

struct Report<'a> {
    file: String,
    size: usize,
    root: &'a Root,
    checked_at: Option<SystemTime>,
    parsed: &'a Result<AttestationDocument, AttestationError>,
    result: Result<(), AttestationError>,
}

fn is_zero(v: &[u8]) -> bool {
    v.iter().all(|&b| b == 0)
}

fn field_json(v: Option<&Vec<u8>>) -> Value {
    v.map_or(
        Value::Null,
        |b| json!({ "len": b.len(), "hex": hex::encode(b) }),
    )
}

impl Report<'_> {
    fn json(&self) -> Value {
        let document = match self.parsed {
            Ok(doc) => {
                let pcrs: serde_json::Map<String, Value> = doc
                    .pcrs
                    .iter()
                    .filter(|(_, v)| !is_zero(v))
                    .map(|(i, v)| (i.to_string(), json!(hex::encode(v))))
                    .collect();
                let certificates = doc.certificate_chain().ok().map(|chain| {
                    chain
                        .iter()
                        .map(|c| {
                            json!({
                                "depth": c.depth,
                                "subject": c.subject,
                                "issuer": c.issuer,
                                "not_before": rfc3339(&c.not_before),
                                "not_after": rfc3339(&c.not_after),
                                "is_ca": c.is_ca,
                            })
                        })
                        .collect::<Vec<_>>()
                });
                json!({
                    "module_id": doc.module_id,
                    "timestamp_ms": doc.timestamp,
                    "timestamp": doc.time().map(|t| rfc3339(&t)),
                    "digest": doc.digest,
                    "pcrs": pcrs,
                    "pcr_count": doc.pcrs.len(),
                    "zero_pcr_count": doc.pcrs.values().filter(|v| is_zero(v)).count(),
                    "certificates": certificates,
                    "public_key": field_json(doc.public_key.as_ref()),
                    "user_data": field_json(doc.user_data.as_ref()),
                    "nonce": field_json(doc.nonce.as_ref()),
                })
            }
            Err(_) => Value::Null,
        };
        let (error, error_kind) = match &self.result {
            Ok(()) => (Value::Null, Value::Null),
            Err(e) => (json!(e.to_string()), json!(e.kind())),
        };
        json!({
            "valid": self.result.is_ok(),
            "error": error,
            "error_kind": error_kind,
            "file": self.file,
            "size": self.size,
            "checked_at": self.checked_at.map(|t| rfc3339(&t)),
            "root": {
                "subject": self.root.subject(),
                "sha256": hex::encode(self.root.fingerprint_sha256()),
            },
            "document": document,
        })
    }

    fn text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let mut line = |k: &str, v: &dyn std::fmt::Display| {
            let _ = writeln!(out, "{k:<12} {v}");
        };
        line("file:", &format!("{} ({} bytes)", self.file, self.size));
        if let Ok(doc) = self.parsed {
            line("module_id:", &doc.module_id);
            let ts = doc.time().map(|t| rfc3339(&t)).unwrap_or_default();
            line("timestamp:", &format!("{ts} ({} ms)", doc.timestamp));
            line("digest:", &doc.digest);
            let zero = doc.pcrs.values().filter(|v| is_zero(v)).count();
            line(
                "pcrs:",
                &format!("{} ({zero} all-zero, not shown)", doc.pcrs.len()),
            );
            for (i, v) in doc.pcrs.iter().filter(|(_, v)| !is_zero(v)) {
                line(&format!("  PCR{i}"), &hex::encode(v));
            }
            match doc.certificate_chain() {
                Ok(chain) => {
                    line("certificates:", &"leaf first");
                    for c in chain {
                        line(
                            &format!("  [{}]", c.depth),
                            &format!(
                                "{}  valid {}..{}{}",
                                c.subject,
                                rfc3339(&c.not_before),
                                rfc3339(&c.not_after),
                                if c.is_ca { "  CA" } else { "" }
                            ),
                        );
                    }
                }
                Err(e) => line("certificates:", &format!("unreadable: {e}")),
            }
            for (name, v) in [
                ("public_key:", &doc.public_key),
                ("user_data:", &doc.user_data),
                ("nonce:", &doc.nonce),
            ] {
                line(name, &describe_bytes(v.as_deref()));
            }
        }
        line(
            "root:",
            &format!(
                "{} (sha256 {})",
                self.root.subject(),
                hex::encode(self.root.fingerprint_sha256())
            ),
        );
        if let Some(t) = self.checked_at {
            line("checked at:", &rfc3339(&t));
        }
        match &self.result {
            Ok(()) => line("result:", &"valid"),
            Err(e) => line("result:", &format!("INVALID: {e}")),
        }
        out
    }
}

/// Length and hex, cut at 64 bytes so 1 KiB fields stay readable.
fn describe_bytes(v: Option<&[u8]>) -> String {
    const SHOW: usize = 64;
    match v {
        None => "absent".to_owned(),
        Some(b) if b.len() > SHOW => format!(
            "{} bytes {}… (first {SHOW} shown)",
            b.len(),
            hex::encode(b.get(..SHOW).unwrap_or(b))
        ),
        Some(b) => format!("{} bytes {}", b.len(), hex::encode(b)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcr_arguments() {
        assert_eq!(parse_pcr("0=00ff"), Ok((0, vec![0, 0xff])));
        assert_eq!(parse_pcr("PCR8=0x01"), Ok((8, vec![1])));
        assert!(parse_pcr("32=00").is_err());
        assert!(parse_pcr("0").is_err());
        assert!(parse_pcr("x=00").is_err());
        assert!(parse_pcr("1=zz").is_err());
    }

    #[test]
    fn at_arguments() {
        assert!(matches!(parse_at("doc"), Ok(At::Doc)));
        assert!(matches!(parse_at("now"), Ok(At::Now)));
        assert!(matches!(parse_at("2024-09-07T14:37:39Z"), Ok(At::Time(_))));
        assert!(parse_at("yesterday").is_err());
    }

    #[test]
    fn times_round_trip_with_the_formatter() {
        use std::time::{Duration, UNIX_EPOCH};
        // Formatting comes from der::DateTime, an independent implementation.
        for ms in [
            0u64,
            951_782_400_000,   // 2000-02-29
            1_725_719_859_545, // 2024-09-07T14:37:39.545Z
            4_107_542_400_000, // 2100-03-01 (2100 is not a leap year)
            253_402_300_799_000,
        ] {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            assert_eq!(parse_time(&rfc3339(&t)), Ok(t), "{}", rfc3339(&t));
        }
    }

    #[test]
    fn times_take_offsets_and_fractions() {
        use std::time::Duration;
        let z = parse_time("2024-09-07T14:37:39Z").unwrap();
        assert_eq!(parse_time("2024-09-07T16:37:39+02:00"), Ok(z));
        assert_eq!(parse_time("2024-09-07 09:37:39-05:00"), Ok(z));
        assert_eq!(
            parse_time("2024-09-07T14:37:39.5Z"),
            Ok(z + Duration::from_millis(500))
        );
        assert_eq!(
            parse_time("2024-09-07T14:37:39.123456789123Z"),
            Ok(z + Duration::from_nanos(123_456_789))
        );
    }

    #[test]
    fn times_refuse_nonsense() {
        for s in [
            "",
            "now",
            "2024-09-07",
            "2024-09-07T14:37:39",
            "2024-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-09-07T24:00:00Z",
            "2024-09-07T14:37:39.Z",
            "2024-09-07T14:37:39+2:00",
            "1969-12-31T23:59:59Z",
            "2024-09-07T14:37:39Zjunk",
            "２０２４-09-07T14:37:39Z",
        ] {
            let err = parse_time(s).unwrap_err();
            assert!(err.contains("not an RFC 3339 time"), "{s}: {err}");
        }
    }

    #[test]
    fn long_fields_are_cut() {
        assert_eq!(describe_bytes(None), "absent");
        assert_eq!(describe_bytes(Some(&[1, 2])), "2 bytes 0102");
        let long = describe_bytes(Some(&[0xab; 100]));
        assert!(long.starts_with("100 bytes abab"), "{long}");
        assert!(long.ends_with("(first 64 shown)"), "{long}");
    }
}
