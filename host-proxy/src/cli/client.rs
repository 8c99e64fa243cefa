//! `keystore-host get | list | status | attest`: what host applications and
//! operators on the parent instance ask the enclave, over the same
//! [`keystore_shared::Client`] a Rust host app would use.
//!
//! By default they go through the agent's unix socket, which asks the
//! enclave on the caller's behalf (the caller is who the kernel says runs
//! the command). `--enclave ENDPOINT` talks to the enclave's secret port
//! directly from a privileged source port: that works as root (the
//! operator), and the enclave reads it as root.
//!
//! Output is made for scripts: `get` writes the secret's bytes to stdout and
//! nothing else (no newline, no framing), `list` one name per line, and
//! `status`/`attest` text or one JSON object. Every failure is one line on
//! stderr and a non-zero exit.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context;
use clap::{Args, Subcommand};
use keystore_shared::attestation::{AttestationDocument, Verifier, VerifyAt, rfc3339};
use keystore_shared::{Client, ClientConfig, Endpoint, StatusReport};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::attestation::{self, EXIT_INVALID};

/// Bytes of the random nonce `attest` sends.
pub const NONCE_LEN: usize = 32;

/// Commands that talk to the enclave's secret server.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Print one secret's value to stdout, byte for byte, nothing else.
    Get(GetArgs),
    /// List the names of the loaded secrets, one per line.
    List,
    /// Show the enclave's health: readiness, secret count, key freshness.
    Status(StatusArgs),
    /// Ask the enclave for a fresh attestation document bound to a random
    /// nonce, verify it and print its PCRs. Exits 1 if it does not verify.
    Attest(AttestArgs),
}

/// Arguments of `get`.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// The secret's name (key path).
    pub name: String,
}

/// Arguments of `status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `attest`.
#[derive(Debug, Args)]
pub struct AttestArgs {
    /// Expected PCR value, `INDEX=HEX`; repeatable.
    #[arg(long = "pcr", value_name = "N=HEX", value_parser = attestation::parse_pcr)]
    pub pcrs: Vec<(u16, Vec<u8>)>,
    /// Trusted root: `aws` (the AWS Nitro Enclaves Root G1) or a path to a
    /// PEM or DER certificate (e.g. a mock NSM's root.pem).
    #[arg(long, default_value = "aws")]
    pub root: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Where a client command goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// The agent (default): reads as the caller the kernel reports.
    Agent(Endpoint),
    /// The enclave's secret port, from a privileged source port.
    Enclave(Endpoint),
}

/// Runs one client command against `target`.
pub fn run(target: &Target, cmd: ClientCommand) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        match cmd {
            ClientCommand::Get(args) => get(target, &args).await,
            ClientCommand::List => list(target).await,
            ClientCommand::Status(args) => status(target, &args).await,
            ClientCommand::Attest(args) => attest(target, &args).await,
        }
    })
}

async fn connect(target: &Target) -> anyhow::Result<Client> {
    Ok(match target {
        Target::Agent(agent) => Client::connect(agent).await?,
        Target::Enclave(enclave) => {
            let config = ClientConfig {
                privileged: true,
                ..ClientConfig::default()
            };
            Client::connect_with(enclave, config).await?
        }
    })
}

async fn get(target: &Target, args: &GetArgs) -> anyhow::Result<ExitCode> {
    let value = connect(target).await?.get(&args.name).await?;
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(value.expose())
        .and_then(|()| stdout.flush())
        .context("cannot write the value to stdout")?;
    Ok(ExitCode::SUCCESS)
}

async fn list(target: &Target) -> anyhow::Result<ExitCode> {
    let names = connect(target).await?.list().await?;
    let mut stdout = std::io::stdout().lock();
    for name in names {
        writeln!(stdout, "{name}").context("cannot write to stdout")?;
    }
    stdout.flush().context("cannot write to stdout")?;
    Ok(ExitCode::SUCCESS)
}

async fn status(target: &Target, args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let report = connect(target).await?.status().await?;
    if args.json {
        println!("{}", status_json(&report));
    } else {
        print!("{}", status_text(&report));
    }
    Ok(ExitCode::SUCCESS)
}

fn status_json(report: &StatusReport) -> serde_json::Value {
    json!({
        "ready": report.ready,
        "secret_count": report.secret_count,
        "document_age_ms": report.document_age_ms,
        "uptime_ms": report.uptime_ms,
        "version": report.version,
        "recipient_key_bits": report.recipient_key_bits,
        "refresh_count": report.refresh_count,
        "last_error": report.last_error,
        "secret_peers": report.secret_peers,
        "last_decrypt_age_ms": report.last_decrypt_age_ms,
        "audit": report.audit.as_ref().map(|audit| json!({
            "last_seq": audit.last_seq,
            "buffered": audit.buffered,
            "dropped": audit.dropped,
            "gaps": audit.gaps,
            "dropping": audit.dropping,
        })),
        "last_good_load_unix_ms": report.last_good_load_unix_ms,
        "max_stale_ms": report.max_stale_ms,
        "breaker": report.breaker.as_ref().map(|b| json!({
            "state": b.state,
            "consecutive_failures": b.consecutive_failures,
            "next_probe_in_ms": b.next_probe_in_ms,
            "opened": b.opened,
        })),
    })
}

fn status_text(report: &StatusReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut line = |k: &str, v: &dyn std::fmt::Display| {
        let _ = writeln!(out, "{k:<20} {v}");
    };
    line("ready:", &report.ready);
    line("secrets:", &report.secret_count);
    line(
        "document age:",
        &report
            .document_age_ms
            .map_or_else(|| "none".to_owned(), |ms| format!("{} s", ms / 1000)),
    );
    line("uptime:", &format!("{} s", report.uptime_ms / 1000));
    line("version:", &report.version);
    line(
        "recipient key:",
        &report
            .recipient_key_bits
            .map_or_else(|| "none".to_owned(), |b| format!("RSA-{b}")),
    );
    line("refreshes:", &report.refresh_count);
    line(
        "last error:",
        &report.last_error.as_deref().unwrap_or("none"),
    );
    line(
        "secret peers:",
        &report.secret_peers.as_deref().unwrap_or("unknown"),
    );
    line(
        "last decrypt:",
        &format!(
            "{}{}",
            report
                .last_decrypt_age_ms
                .map_or_else(|| "none".to_owned(), |ms| format!("{} s ago", ms / 1000)),
            match report.max_stale_ms {
                Some(0) => " (no --max-stale bound)".to_owned(),
                Some(ms) => format!(" (wiped at --max-stale {} s)", ms / 1000),
                None => String::new(),
            }
        ),
    );
    line(
        "last good load:",
        &report.last_good_load_unix_ms.map_or_else(
            || "none".to_owned(),
            |at| {
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                format!("{} s ago (unix ms {at})", now.saturating_sub(at) / 1000)
            },
        ),
    );
    line(
        "kms breaker:",
        &report.breaker.as_ref().map_or_else(
            || "unknown".to_owned(),
            |b| {
                let mut text = format!(
                    "{}, {} failure(s) in a row, opened {} time(s)",
                    b.state, b.consecutive_failures, b.opened
                );
                if let Some(ms) = b.next_probe_in_ms {
                    let _ = write!(text, ", next probe in {ms} ms");
                }
                text
            },
        ),
    );
    line(
        "audit:",
        &report.audit.as_ref().map_or_else(
            || "unknown".to_owned(),
            |audit| {
                format!(
                    "last seq {}, {} buffered, {} dropped in {} gap(s){}",
                    audit
                        .last_seq
                        .map_or_else(|| "none".to_owned(), |seq| seq.to_string()),
                    audit.buffered,
                    audit.dropped,
                    audit.gaps,
                    if audit.dropping {
                        ", DROPPING NOW (is the daemon draining?)"
                    } else {
                        ""
                    }
                )
            },
        ),
    );
    out
}

async fn attest(target: &Target, args: &AttestArgs) -> anyhow::Result<ExitCode> {
    let root = attestation::load_root(&args.root)?;
    let mut nonce = [0u8; NONCE_LEN];
    rand::fill(&mut nonce);
    let document = connect(target).await?.attest(&nonce, None).await?;
    // Fix "now" once so the printed time is the one checked.
    let checked_at = SystemTime::now();
    let mut verifier = Verifier::new(root)
        .at(VerifyAt::Time(checked_at))
        .expect_nonce(nonce.to_vec());
    for (index, value) in &args.pcrs {
        verifier = verifier.expect_pcr(*index, value.clone());
    }
    let verified = match verifier.verify(&document) {
        Ok(doc) => doc,
        Err(err) => {
            eprintln!("attestation invalid: {err}");
            return Ok(ExitCode::from(EXIT_INVALID));
        }
    };
    if args.json {
        println!("{}", attest_json(&verified, &nonce, checked_at));
    } else {
        print!("{}", attest_text(&verified, checked_at));
    }
    Ok(ExitCode::SUCCESS)
}

/// PCRs that are not all zero (unused registers are zero on real NSMs).
fn set_pcrs(doc: &AttestationDocument) -> BTreeMap<u16, String> {
    doc.pcrs
        .iter()
        .filter(|(_, v)| v.iter().any(|&b| b != 0))
        .map(|(i, v)| (*i, hex::encode(v)))
        .collect()
}

fn key_fingerprint(doc: &AttestationDocument) -> Option<String> {
    doc.public_key
        .as_ref()
        .map(|key| hex::encode(Sha256::digest(key)))
}

fn attest_json(
    doc: &AttestationDocument,
    nonce: &[u8],
    checked_at: SystemTime,
) -> serde_json::Value {
    let pcrs: serde_json::Map<String, serde_json::Value> = set_pcrs(doc)
        .into_iter()
        .map(|(i, v)| (i.to_string(), json!(v)))
        .collect();
    json!({
        "valid": true,
        "module_id": doc.module_id,
        "timestamp": doc.time().map(|t| rfc3339(&t)),
        "checked_at": rfc3339(&checked_at),
        "nonce": hex::encode(nonce),
        "pcrs": pcrs,
        "public_key_sha256": key_fingerprint(doc),
    })
}

fn attest_text(doc: &AttestationDocument, checked_at: SystemTime) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut line = |k: &str, v: &dyn std::fmt::Display| {
        let _ = writeln!(out, "{k:<18} {v}");
    };
    line("module_id:", &doc.module_id);
    line(
        "timestamp:",
        &doc.time().map(|t| rfc3339(&t)).unwrap_or_default(),
    );
    let pcrs = set_pcrs(doc);
    line(
        "pcrs:",
        &format!(
            "{} set, {} all-zero not shown",
            pcrs.len(),
            doc.pcrs.len() - pcrs.len()
        ),
    );
    for (index, value) in &pcrs {
        line(&format!("  PCR{index}"), value);
    }
    line(
        "public key sha256:",
        &key_fingerprint(doc).unwrap_or_else(|| "absent".to_owned()),
    );
    line("checked at:", &rfc3339(&checked_at));
    line(
        "result:",
        &"valid (signature, chain, nonce and expected PCRs)",
    );
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use keystore_shared::protocol::BreakerStatus;

    #[test]
    fn status_prints_the_breaker_last_good_load_and_the_stale_bound() {
        let report = StatusReport {
            last_decrypt_age_ms: Some(42_000),
            max_stale_ms: Some(86_400_000),
            last_good_load_unix_ms: Some(1_000),
            breaker: Some(BreakerStatus {
                state: "open".into(),
                consecutive_failures: 5,
                next_probe_in_ms: Some(1730),
                opened: 2,
                last_failure: None,
            }),
            ..StatusReport::default()
        };
        let text = status_text(&report);
        assert!(
            text.contains("last decrypt:        42 s ago (wiped at --max-stale 86400 s)"),
            "{text}"
        );
        assert!(
            text.contains(
                "kms breaker:         open, 5 failure(s) in a row, opened 2 time(s), next probe in 1730 ms"
            ),
            "{text}"
        );
        assert!(text.contains("(unix ms 1000)"), "{text}");
        let json = status_json(&report);
        assert_eq!(json["breaker"]["state"], "open");
        assert_eq!(json["max_stale_ms"], 86_400_000);
        // An old enclave says nothing: printed as unknown, not as closed.
        let old = status_text(&StatusReport::default());
        assert!(old.contains("kms breaker:         unknown"), "{old}");
        assert!(old.contains("last good load:      none"), "{old}");
    }
}
