//! `mock-kms`: the KMS emulator as a process, for scripts and demos.
//!
//! Serves HTTPS on `--listen` (127.0.0.1 only by default), writes its test
//! CA to `--tls-dir/ca.pem`, writes the endpoint URL to `--ready-file` once
//! listening, and runs until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use clap::Parser;
use keystore_tests::kms::{Credential, DEFAULT_ACCOUNT, DEFAULT_REGION, MockKms, MockKmsConfig};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

/// Command line of `mock-kms`.
#[derive(Debug, Parser)]
#[command(
    name = "mock-kms",
    about = "KMS emulator speaking the real KMS JSON protocol over HTTPS"
)]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Directory for the test CA (`ca.pem`) and server certificate.
    #[arg(long)]
    tls_dir: PathBuf,
    /// Root certificate (PEM) attestation documents must chain to, such as
    /// the mock NSM's `<pki dir>/root.pem`.
    #[arg(long)]
    attestation_root: Option<PathBuf>,
    /// Region of keys and SigV4 scopes.
    #[arg(long, default_value = DEFAULT_REGION)]
    region: String,
    /// Account id.
    #[arg(long, default_value = DEFAULT_ACCOUNT)]
    account: String,
    /// Accepted access key id (with --secret-access-key).
    #[arg(long, env = "MOCK_KMS_ACCESS_KEY_ID", requires = "secret_access_key")]
    access_key_id: Option<String>,
    /// Secret of --access-key-id.
    #[arg(
        long,
        env = "MOCK_KMS_SECRET_ACCESS_KEY",
        hide_env_values = true,
        requires = "access_key_id"
    )]
    secret_access_key: Option<String>,
    /// Session token required with --access-key-id.
    #[arg(
        long,
        env = "MOCK_KMS_SESSION_TOKEN",
        hide_env_values = true,
        requires = "access_key_id"
    )]
    session_token: Option<String>,
    /// Seconds until --session-token expires.
    #[arg(long, requires = "session_token")]
    session_token_ttl: Option<u64>,
    /// JSON file with a list of credentials:
    /// `[{"access_key_id", "secret_access_key", "session_token"?, "expires_at"?}]`.
    #[arg(long)]
    credentials_file: Option<PathBuf>,
    /// Write the endpoint URL here once listening (and once every
    /// `--key-policy` key exists).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Create a key with this key policy (JSON) at start, so scripts need no
    /// KMS client of their own; its ARN goes to `--key-id-file`.
    #[arg(long, requires = "key_id_file")]
    key_policy: Option<PathBuf>,
    /// Where to write the ARN of the `--key-policy` key: usable wherever KMS
    /// takes a `KeyId`, and what an enclave pins (`--kms-key-arn`).
    #[arg(long, requires = "key_policy")]
    key_id_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();

    let mut credentials = Vec::new();
    if let (Some(id), Some(secret)) = (&args.access_key_id, &args.secret_access_key) {
        let mut credential = Credential::new(id, secret);
        if let Some(token) = &args.session_token {
            let expires = args
                .session_token_ttl
                .map(|ttl| SystemTime::now() + Duration::from_secs(ttl));
            credential = credential.with_session_token(token, expires);
        }
        credentials.push(credential);
    }
    if let Some(path) = &args.credentials_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let list: Vec<Credential> =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        credentials.extend(list);
    }
    if credentials.is_empty() {
        bail!("no credentials: give --access-key-id/--secret-access-key or --credentials-file");
    }

    let mut config = MockKmsConfig::new(&args.tls_dir, credentials);
    config.listen = args.listen;
    config.region = args.region;
    config.account = args.account;
    config.attestation_root_pem = args.attestation_root;
    let handle = MockKms::start(config).await.context("starting mock-kms")?;

    if let (Some(policy), Some(id_file)) = (&args.key_policy, &args.key_id_file) {
        let text = std::fs::read_to_string(policy)
            .with_context(|| format!("reading {}", policy.display()))?;
        let key = handle
            .create_key(Some(&text))
            .map_err(|e| anyhow::anyhow!("creating the --key-policy key: {e}"))?;
        write_atomically(id_file, &format!("{}\n", key.arn))?;
        info!(key_arn = %key.arn, "created key from {}", policy.display());
    }
    if let Some(path) = &args.ready_file {
        write_atomically(path, &format!("{}\n", handle.endpoint_url()))?;
    }
    info!(
        endpoint = handle.endpoint_url(),
        ca = %handle.ca_pem_path().display(),
        "ready"
    );

    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
    handle.shutdown().await;
    Ok(())
}

/// Writes `text` so that a reader polling `path` never sees half of it.
fn write_atomically(path: &std::path::Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}
