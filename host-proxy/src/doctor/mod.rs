//! `keystore-host doctor` (issue 16): the checks an operator runs when
//! something does not work, in the order a deployment depends on them.
//!
//! Each check says what it saw, whether that is fine ([`Outcome`]) and,
//! when it is not, what to do (the hint). A check that needs what an
//! earlier one failed to get is reported as [`Outcome::Skip`] with the
//! reason instead of failing a second time for the same cause. Every
//! network wait is bounded by [`Config::timeout`].
//!
//! The checks, by group (one module each):
//! 1. [`enclave`]: the enclave's secret port answers `Status` to a
//!    privileged peer;
//! 2. [`network`]: the daemon is up (its `/health`), its forwarder
//!    allowlist holds the KMS endpoint, the KMS host resolves, and a TLS
//!    handshake with it succeeds from the parent;
//! 3. [`imds`]: instance credentials (IMDSv2 token, role, expiry);
//! 4. [`attestation`]: the enclave's PCRs against the key policy, and the
//!    attestation document's age and certificate lifetime;
//! 5. [`state`]: the pinned key and region, loads, breaker, staleness and
//!    the audit drain.

pub mod attestation;
pub mod enclave;
pub mod imds;
pub mod network;
pub mod state;

use std::path::PathBuf;
use std::time::Duration;

use keystore_shared::Endpoint;
use keystore_shared::attestation::Root;
use serde::Serialize;

/// Default bound on each network wait.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How one check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Fine.
    Ok,
    /// Works now, but worth a look (the exit code stays 0).
    Warn,
    /// Broken: the exit code is 1.
    Fail,
    /// Not run: an earlier check failed, or there was nothing to check.
    Skip,
}

impl Outcome {
    /// The lower-case name, as in the JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Warn => "warn",
            Outcome::Fail => "fail",
            Outcome::Skip => "skip",
        }
    }
}

/// One check's result. The JSON field names are stable (README,
/// "Troubleshooting with doctor").
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The check's name (e.g. `enclave`, `tls`, `pcrs`).
    pub check: &'static str,
    /// How it ended.
    pub status: Outcome,
    /// What it saw (for a failure: the cause).
    pub saw: String,
    /// What to do; `None` when there is nothing to do.
    pub hint: Option<String>,
}

impl Finding {
    /// A passed check.
    pub fn ok(check: &'static str, saw: impl Into<String>) -> Finding {
        Finding {
            check,
            status: Outcome::Ok,
            saw: saw.into(),
            hint: None,
        }
    }

    /// A check that passed with something worth a look.
    pub fn warn(check: &'static str, saw: impl Into<String>, hint: impl Into<String>) -> Finding {
        Finding {
            check,
            status: Outcome::Warn,
            saw: saw.into(),
            hint: Some(hint.into()),
        }
    }

    /// A failed check: `saw` names the cause, `hint` what to do.
    pub fn fail(check: &'static str, saw: impl Into<String>, hint: impl Into<String>) -> Finding {
        Finding {
            check,
            status: Outcome::Fail,
            saw: saw.into(),
            hint: Some(hint.into()),
        }
    }

    /// A check not run, and why.
    pub fn skip(check: &'static str, why: impl Into<String>) -> Finding {
        Finding {
            check,
            status: Outcome::Skip,
            saw: why.into(),
            hint: None,
        }
    }
}

/// Where the key policy the PCRs are compared with comes from.
#[derive(Debug, Clone)]
pub enum PolicySource {
    /// Not given: only debug mode is detected.
    None,
    /// A file holding the policy JSON (e.g. `aws kms get-key-policy` output,
    /// or `keystore-host policy` output).
    File(PathBuf),
    /// `GetKeyPolicy` on this key, with the instance's credentials.
    KeyId(String),
}

/// What `doctor` checks and where.
#[derive(Debug, Clone)]
pub struct Config {
    /// The enclave's secret port.
    pub enclave: Endpoint,
    /// The daemon's metrics endpoint (which also serves `/health`).
    pub daemon: Endpoint,
    /// The AWS region, when the daemon cannot say.
    pub region: Option<String>,
    /// Where the parent reaches KMS (`HOST:PORT`), if not the daemon's KMS
    /// route.
    pub kms_endpoint: Option<String>,
    /// The name KMS's certificate must be valid for, if not the endpoint's
    /// host.
    pub kms_host: Option<String>,
    /// PEM roots for the TLS check and `GetKeyPolicy` instead of the ones
    /// the enclave trusts.
    pub ca_pem: Option<Vec<u8>>,
    /// A KMS endpoint URL for `GetKeyPolicy` (a test or VPC endpoint).
    pub kms_endpoint_url: Option<String>,
    /// IMDS base URL; `None` skips the credentials check.
    pub imds: Option<String>,
    /// The trusted root of attestation documents.
    pub root: Root,
    /// The key policy to compare PCRs with.
    pub policy: PolicySource,
    /// The key the secrets are sealed with (compared with the pinned keys).
    pub key_id: Option<String>,
    /// Bound on each network wait.
    pub timeout: Duration,
    /// Audit records buffered in the enclave past which the drain counts as
    /// lagging.
    pub max_audit_buffered: u64,
}

/// Runs every check in order.
pub async fn run(config: &Config) -> Vec<Finding> {
    let mut findings = Vec::new();
    let (finding, status) = enclave::check(&config.enclave, config.timeout).await;
    findings.push(finding);
    let (finding, daemon) = network::check_daemon(&config.daemon, config.timeout).await;
    findings.push(finding);
    let kms = network::kms_endpoint(config, daemon.as_ref());
    findings.push(network::check_allowlist(daemon.as_ref(), kms.as_ref()));
    let (finding, addrs) = network::check_dns(kms.as_ref(), config.timeout).await;
    findings.push(finding);
    findings.push(network::check_tls(config, kms.as_ref(), &addrs).await);
    findings.push(match &config.imds {
        Some(url) => imds::check(url, config.timeout).await,
        None => Finding::skip(
            imds::CHECK,
            "--no-imds: the daemon's credentials come from elsewhere (environment, profile)",
        ),
    });
    let document = match &status {
        Some(_) => Some(attestation::fetch(&config.enclave, config.timeout).await),
        None => None,
    };
    findings.push(attestation::check_pcrs(config, document.as_ref()).await);
    findings.push(state::check_pinned_key(
        status.as_ref(),
        daemon.as_ref(),
        config,
    ));
    findings.push(attestation::check_document(
        status.as_ref(),
        document.as_ref(),
    ));
    findings.push(state::check_loads(status.as_ref()));
    findings.push(state::check_audit(
        status.as_ref(),
        daemon.as_ref(),
        config.max_audit_buffered,
    ));
    findings
}

/// Whether the run passed: no check failed.
pub fn passed(findings: &[Finding]) -> bool {
    findings.iter().all(|f| f.status != Outcome::Fail)
}

/// Why dependent checks are skipped when the enclave did not answer.
pub(crate) const NO_ENCLAVE: &str = "skipped: the enclave did not answer (see `enclave`)";
