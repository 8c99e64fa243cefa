//! `keystore-host policy`: measurements in, KMS key policy out.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use keystore_host::policy::{Measurements, PolicySpec, key_policy};

/// nitro-cli's measurements JSON is a few hundred bytes.
const MAX_MEASUREMENTS_FILE: usize = 64 * 1024;

/// Write the KMS key policy that lets only this enclave build decrypt.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// `nitro-cli build-enclave` output (scripts/build-eif.sh saves it).
    #[arg(long, value_name = "FILE")]
    measurements: PathBuf,
    /// A previous release's measurements, still allowed during a rolling deploy.
    #[arg(long, value_name = "FILE")]
    also: Vec<PathBuf>,
    /// IAM role of the parent instance, whose enclave may decrypt (repeatable).
    #[arg(long = "enclave-role", value_name = "ARN", required = true)]
    enclave_roles: Vec<String>,
    /// Key administrator: manages the key, never uses it (repeatable).
    #[arg(long = "admin", value_name = "ARN", required = true)]
    admins: Vec<String>,
    /// Operator allowed to encrypt secrets files (repeatable).
    #[arg(long = "encrypt-principal", value_name = "ARN")]
    encrypt_principals: Vec<String>,
    /// Rotation principal (opt-in, repeatable): may Decrypt and ReEncrypt
    /// without attestation, for `rotate`, `decrypt` and `edit`. Whoever holds
    /// it can read every secret under the key: keep it for break-glass and
    /// rotation. Without it, plaintext is released only to the enclave.
    #[arg(long = "rotator", value_name = "ARN")]
    rotators: Vec<String>,
    /// Also pin PCR N (1, 2, 3 or 8); PCR0 is always pinned.
    #[arg(long = "pcr", value_name = "N")]
    pcrs: Vec<u8>,
    /// Pin PCR3 to this parent-instance role ARN (implies --pcr 3).
    #[arg(long, value_name = "ARN")]
    pcr3_role: Option<String>,
    /// Accept all-zero debug-mode measurements (never in production).
    #[arg(long)]
    allow_debug: bool,
    /// Write the policy here instead of stdout.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// Runs the command.
pub fn run(args: PolicyArgs) -> anyhow::Result<ExitCode> {
    let read = |path: &PathBuf| -> anyhow::Result<Measurements> {
        let bytes = super::attestation::read_bounded(path, MAX_MEASUREMENTS_FILE)?;
        if bytes.len() > MAX_MEASUREMENTS_FILE {
            anyhow::bail!(
                "{} is over {MAX_MEASUREMENTS_FILE} bytes; not a measurements file",
                path.display()
            );
        }
        let text =
            String::from_utf8(bytes).with_context(|| format!("{} is not UTF-8", path.display()))?;
        Measurements::from_json(&text).with_context(|| format!("{}", path.display()))
    };
    let mut current = read(&args.measurements)?;
    let mut also = args
        .also
        .iter()
        .map(read)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut extra_pcrs = args.pcrs;
    if let Some(role) = &args.pcr3_role {
        current = current.with_parent_role(role)?;
        also = also
            .into_iter()
            .map(|m| m.with_parent_role(role))
            .collect::<Result<_, _>>()?;
        if !extra_pcrs.contains(&3) {
            extra_pcrs.push(3);
        }
    }
    let spec = PolicySpec {
        current: Some(current),
        also,
        enclave_principals: args.enclave_roles,
        admin_principals: args.admins,
        encrypt_principals: args.encrypt_principals,
        rotator_principals: args.rotators,
        extra_pcrs,
        allow_debug: args.allow_debug,
    };
    let policy = key_policy(&spec)?;
    if args.allow_debug {
        tracing::warn!("--allow-debug: a debug-mode enclave of any image can satisfy this policy");
    }
    let text = serde_json::to_string_pretty(&policy)? + "\n";
    match &args.out {
        Some(path) => {
            std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?
        }
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}
