//! `keystore-host doctor [--json]`: runs [`keystore_host::doctor`]'s
//! checks and prints, for each, what it saw, ok / warn / fail / skip and
//! what to do. Exit 0 when no check failed, 1 when one did.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use keystore_host::doctor::{self, Finding, Outcome, PolicySource};
use keystore_shared::Endpoint;

use super::attestation::{EXIT_INVALID, load_root, read_bounded};

/// Arguments of `doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The daemon's metrics endpoint (`keystore-host proxy
    /// --metrics-listen`), which also answers `/health`.
    #[arg(long, value_name = "ENDPOINT", default_value = keystore_host::metrics::DEFAULT_LISTEN)]
    pub daemon: Endpoint,
    /// AWS region, when the daemon cannot say (it is down, or has no
    /// --region).
    #[arg(long, env = "AWS_REGION")]
    pub region: Option<String>,
    /// Where the parent reaches KMS, `HOST:PORT` (default: the daemon's
    /// route to kms.REGION.amazonaws.com:443).
    #[arg(long, value_name = "HOST:PORT")]
    pub kms_endpoint: Option<String>,
    /// The name KMS's TLS certificate must be valid for (default: the
    /// endpoint's host; the enclave checks kms.REGION.amazonaws.com or its
    /// --kms-host).
    #[arg(long, value_name = "HOST")]
    pub kms_host: Option<String>,
    /// PEM CA certificates to trust for KMS instead of the public roots the
    /// enclave trusts (a test CA).
    #[arg(long, value_name = "PEM")]
    pub ca_bundle: Option<PathBuf>,
    /// A KMS endpoint URL for `GetKeyPolicy` (a VPC endpoint or a test
    /// server).
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// The instance metadata service.
    #[arg(long, value_name = "URL", default_value = doctor::imds::DEFAULT_IMDS)]
    pub imds: String,
    /// Skip the IMDS credentials check (the daemon's credentials come from
    /// the environment or a profile).
    #[arg(long)]
    pub no_imds: bool,
    /// Trusted root of attestation documents: `aws` or a PEM/DER file (a
    /// mock NSM's root.pem).
    #[arg(long, default_value = "aws")]
    pub root: String,
    /// The KMS key the secrets are sealed with: its policy is read with
    /// `GetKeyPolicy` (unless --policy-file) and it must be one the enclave
    /// pins.
    #[arg(long, value_name = "ARN")]
    pub key_id: Option<String>,
    /// The key policy as a JSON file (when the role may not read it).
    #[arg(long, value_name = "FILE")]
    pub policy_file: Option<PathBuf>,
    /// Seconds each network wait may take.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub timeout: u64,
    /// Audit records waiting in the enclave past which the drain counts
    /// as lagging.
    #[arg(long, value_name = "N", default_value_t = doctor::state::DEFAULT_MAX_AUDIT_BUFFERED)]
    pub max_audit_buffered: u64,
    /// One JSON array, an object per check (`check`, `status`, `saw`,
    /// `hint`).
    #[arg(long)]
    pub json: bool,
}

/// The enclave's secret port when `--enclave` is not given.
pub const DEFAULT_ENCLAVE: &str = "vsock://16:5000";

/// Runs the checks and prints them.
pub fn run(enclave: Option<&Endpoint>, args: DoctorArgs) -> anyhow::Result<ExitCode> {
    if args.timeout == 0 || args.timeout > 300 {
        bail!("--timeout must be 1..=300 seconds");
    }
    let enclave = match enclave {
        Some(endpoint) => endpoint.clone(),
        None => DEFAULT_ENCLAVE
            .parse()
            .context("the default enclave endpoint")?,
    };
    let ca_pem = args
        .ca_bundle
        .as_ref()
        .map(|path| read_bounded(path, 1024 * 1024))
        .transpose()
        .context("--ca-bundle")?;
    let policy = match (&args.policy_file, &args.key_id) {
        (Some(path), _) => PolicySource::File(path.clone()),
        (None, Some(key)) => PolicySource::KeyId(key.clone()),
        (None, None) => PolicySource::None,
    };
    let config = doctor::Config {
        enclave,
        daemon: args.daemon,
        region: args.region,
        kms_endpoint: args.kms_endpoint,
        kms_host: args.kms_host,
        ca_pem,
        kms_endpoint_url: args.endpoint_url,
        imds: (!args.no_imds).then_some(args.imds),
        root: load_root(&args.root)?,
        policy,
        key_id: args.key_id,
        timeout: Duration::from_secs(args.timeout),
        max_audit_buffered: args.max_audit_buffered,
    };
    if let Some(endpoint) = &config.kms_endpoint
        && endpoint
            .parse::<keystore_host::proxy::forwarder::Upstream>()
            .is_err()
    {
        bail!("--kms-endpoint {endpoint:?} is not HOST:PORT");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let findings = runtime.block_on(doctor::run(&config));
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&findings).context("encoding the findings")?
        );
    } else {
        print!("{}", text(&findings, std::io::stdout().is_terminal()));
    }
    Ok(if doctor::passed(&findings) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INVALID)
    })
}

/// The findings as text, coloured only on a terminal.
fn text(findings: &[Finding], colour: bool) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for finding in findings {
        let tag = format!("{:<4}", finding.status.as_str());
        let tag = if colour {
            let code = match finding.status {
                Outcome::Ok => "32",
                Outcome::Warn => "33",
                Outcome::Fail => "31",
                Outcome::Skip => "90",
            };
            format!("\x1b[{code}m{tag}\x1b[0m")
        } else {
            tag
        };
        let _ = writeln!(out, "[{tag}] {:<12} {}", finding.check, finding.saw);
        if let Some(hint) = &finding.hint {
            let _ = writeln!(out, "{:<20}hint: {hint}", "");
        }
    }
    let failed = findings
        .iter()
        .filter(|f| f.status == Outcome::Fail)
        .count();
    let _ = writeln!(
        out,
        "{}",
        if failed == 0 {
            "all checks passed".to_owned()
        } else {
            format!("{failed} check(s) failed")
        }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_colour_only_on_a_terminal() {
        let findings = [
            Finding::ok("enclave", "answers"),
            Finding::fail("tls", "bad name", "fix it"),
        ];
        let plain = text(&findings, false);
        assert!(!plain.contains('\x1b'), "{plain}");
        assert!(plain.contains("[ok  ] enclave      answers\n"), "{plain}");
        assert!(plain.contains("[fail] tls          bad name\n"), "{plain}");
        assert!(plain.contains("hint: fix it\n"), "{plain}");
        assert!(plain.ends_with("1 check(s) failed\n"), "{plain}");
        assert!(text(&findings, true).contains("\x1b[31mfail\x1b[0m"));
    }
}
