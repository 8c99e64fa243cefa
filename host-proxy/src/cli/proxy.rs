//! `keystore-host proxy`: flags, AWS set-up and signals around
//! [`keystore_host::proxy::Proxy`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use keystore_host::doctor::network::{DaemonInfo, ForwardInfo};
use keystore_host::metrics::Metrics;
use keystore_host::proxy::audit_log::{self, AuditDrain, AuditLogConfig};
use keystore_host::proxy::credentials::{self, CredentialCache, ServiceLimits};
use keystore_host::proxy::enclave_logs::{LogRelay, LogRelayConfig};
use keystore_host::proxy::forwarder::{Forward, ForwarderLimits};
use keystore_host::proxy::loader::{ENCLAVE_CHECK_INTERVAL, LOAD_RETRY_MAX};
use keystore_host::proxy::source::{S3Source, SecretsLocation, SecretsSource};
use keystore_host::proxy::{MetricsService, Proxy, ProxyConfig};
use keystore_shared::Endpoint;

/// Arguments of `proxy`.
#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// AWS region: picks the KMS endpoint of the default route and the
    /// credential chain's region.
    #[arg(long, env = "AWS_REGION")]
    pub region: Option<String>,
    /// An allowlisted route `LISTEN=HOST:PORT`; repeatable. Without any, the
    /// one route is `vsock://ANY:800=kms.<region>.amazonaws.com:443`.
    #[arg(long = "forward", value_name = "LISTEN=HOST:PORT")]
    pub forwards: Vec<Forward>,
    /// The enclave's CID: the only vsock peer the forwarders and the
    /// credentials service serve.
    #[arg(long, value_name = "CID", default_value_t = keystore_host::proxy::DEFAULT_ENCLAVE_CID)]
    pub enclave_cid: u32,
    /// Where the credentials service listens.
    #[arg(long, value_name = "ENDPOINT", default_value = credentials::DEFAULT_LISTEN)]
    pub credentials_listen: Endpoint,
    /// The enclave's load port, where the secrets file is sent (its secret
    /// port, `--enclave`, refuses `Load`).
    #[arg(
        long,
        value_name = "ENDPOINT",
        env = "KEYSTORE_ENCLAVE_LOAD",
        default_value = "vsock://16:5001"
    )]
    pub load_to: Endpoint,
    /// The secrets file to load into the enclave (and reload on change or
    /// SIGHUP): a path, or `s3://BUCKET/KEY` (fetched with the instance
    /// role, polled by ETag); `.json`, `.yaml`/`.yml` by its name, otherwise
    /// `.env`. Without it, no loader runs.
    #[arg(long, value_name = "FILE|s3://BUCKET/KEY")]
    pub secrets: Option<SecretsLocation>,
    /// An S3-compatible endpoint for `--secrets s3://...` (path-style
    /// addressing), e.g. a test server.
    #[arg(long, value_name = "URL")]
    pub s3_endpoint_url: Option<String>,
    /// Extra trusted CA certificates (PEM) for `--s3-endpoint-url`.
    #[arg(long, value_name = "PEM")]
    pub s3_ca_bundle: Option<PathBuf>,
    /// Seconds allowed for one fetch of the S3 object.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub s3_timeout: u64,
    /// Seconds between two checks of the secrets file (an S3 check is one
    /// conditional GetObject).
    #[arg(long, value_name = "SECONDS", default_value_t = 2)]
    pub secrets_poll: u64,
    /// The longest wait, in seconds, between two attempts to load the
    /// secrets after a failure (the first wait is 0.5 s, doubling).
    #[arg(long, value_name = "SECONDS", default_value_t = LOAD_RETRY_MAX.as_secs())]
    pub load_retry_max: u64,
    /// Seconds between two checks that the enclave still holds its
    /// secrets; a restarted enclave is loaded again within this and one
    /// poll.
    #[arg(long, value_name = "SECONDS", default_value_t = ENCLAVE_CHECK_INTERVAL.as_secs())]
    pub enclave_check: u64,
    /// Connections each forwarder serves at once; more wait.
    #[arg(long, default_value_t = 256)]
    pub max_connections: usize,
    /// Seconds allowed to resolve the upstream and to connect to each of
    /// its addresses.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub connect_timeout: u64,
    /// Seconds without a byte in either direction before a forwarded
    /// connection is closed.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub idle_timeout: u64,
    /// The audit log: each record the enclave made (who read which secret,
    /// when, how it ended), one JSON line each, drained over the load port.
    #[arg(long, value_name = "PATH", default_value = audit_log::DEFAULT_AUDIT_LOG)]
    pub audit_log: PathBuf,
    /// Do not drain the enclave's audit trail (it then fills its buffer and
    /// records a gap).
    #[arg(long)]
    pub no_audit_log: bool,
    /// Seconds between two polls of the enclave's audit trail.
    #[arg(long, value_name = "SECONDS", default_value_t = 1)]
    pub audit_poll: u64,
    /// Size in bytes past which the audit log is rotated to PATH.1.
    #[arg(long, value_name = "BYTES", default_value_t = audit_log::DEFAULT_MAX_BYTES)]
    pub audit_max_bytes: u64,
    /// Rotated audit logs kept (PATH.1 … PATH.N).
    #[arg(long, value_name = "N", default_value_t = audit_log::DEFAULT_KEEP)]
    pub audit_keep: usize,
    /// Also write each audit record to the journal (log target
    /// `keystore_audit`).
    #[arg(long)]
    pub audit_journald: bool,
    /// Do not relay the enclave's log events into this daemon's log (they
    /// then stay in the enclave's ring, readable only on its console).
    #[arg(long)]
    pub no_enclave_logs: bool,
    /// Seconds between two reads of the enclave's log ring.
    #[arg(long, value_name = "SECONDS", default_value_t = 2)]
    pub enclave_log_poll: u64,
    /// Where the Prometheus metrics are served (`GET /metrics`); a tcp
    /// address must be a loopback one.
    #[arg(long, value_name = "ENDPOINT", default_value = keystore_host::metrics::DEFAULT_LISTEN)]
    pub metrics_listen: Endpoint,
    /// Serve no metrics (and do not poll the enclave's `Status` for them).
    #[arg(long)]
    pub no_metrics: bool,
    /// Seconds between two `Status` polls relayed into the metrics.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub metrics_status_poll: u64,
    /// Do not run the agent (applications then have no way to read).
    #[arg(long)]
    pub no_agent: bool,
    /// The agent's flags.
    #[command(flatten)]
    pub agent: super::agent::AgentArgs,
}

/// Runs the proxy until SIGTERM or SIGINT.
pub fn run(enclave: Option<&Endpoint>, args: ProxyArgs) -> anyhow::Result<ExitCode> {
    let mut agent_config = (!args.no_agent)
        .then(|| args.agent.config(enclave))
        .transpose()?;
    let metrics = (!args.no_metrics).then(|| Arc::new(Metrics::new()));
    let health = DaemonInfo {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        region: args.region.clone(),
        forwards: Vec::new(),
        audit_log: (!args.no_audit_log).then(|| args.audit_log.display().to_string()),
        load_to: args.load_to.to_string(),
        loads_secrets: args.secrets.is_some(),
    };
    if let (Some(config), Some(metrics)) = (agent_config.as_mut(), &metrics) {
        config.pool.metrics = Some(metrics.clone());
    }
    let forwards = if args.forwards.is_empty() {
        let Some(region) = &args.region else {
            bail!("give --region (or AWS_REGION) or at least one --forward");
        };
        vec![Forward::kms(region)?]
    } else {
        args.forwards
    };
    if let Some(metrics) = &metrics {
        metrics.set_health(&DaemonInfo {
            forwards: forwards
                .iter()
                .map(|f| ForwardInfo {
                    listen: f.listen.to_string(),
                    upstream: f.upstream.to_string(),
                })
                .collect(),
            ..health
        });
    }
    let s3_ca = crate::cli::encrypt::read_ca_bundle(args.s3_ca_bundle.as_deref())?;
    let audit = if args.no_audit_log {
        None
    } else {
        Some(
            AuditDrain::new(AuditLogConfig {
                path: args.audit_log.clone(),
                poll: Duration::from_secs(args.audit_poll.max(1)),
                max_bytes: args.audit_max_bytes,
                keep: args.audit_keep,
                journald: args.audit_journald,
                ..AuditLogConfig::new(args.load_to.clone())
            })
            .context("--audit-log")?,
        )
    };
    let relay = (!args.no_enclave_logs).then(|| {
        LogRelay::new(LogRelayConfig {
            poll: Duration::from_secs(args.enclave_log_poll.max(1)),
            ..LogRelayConfig::new(args.load_to.clone())
        })
    });
    let mut config = ProxyConfig {
        forwards,
        forwarder_limits: ForwarderLimits {
            max_connections: args.max_connections.max(1),
            connect_timeout: Duration::from_secs(args.connect_timeout.max(1)),
            idle_timeout: Duration::from_secs(args.idle_timeout.max(1)),
            ..ForwarderLimits::default()
        },
        credentials_listen: args.credentials_listen,
        credentials_limits: ServiceLimits::default(),
        load_to: args.load_to.clone(),
        secrets: None,
        secrets_poll: Duration::from_secs(args.secrets_poll.max(1)),
        load_retry_max: Duration::from_secs(args.load_retry_max.max(1)),
        enclave_check: Duration::from_secs(args.enclave_check.max(1)),
        enclave_cid: args.enclave_cid,
    };
    let load_to = args.load_to;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let sdk = keystore_host::aws::sdk_config(args.region.clone(), None, None).await?;
        config.secrets = match args.secrets {
            None => None,
            Some(SecretsLocation::File(path)) => Some(SecretsSource::File(path)),
            Some(SecretsLocation::S3(url)) => {
                let client =
                    keystore_host::aws::s3_client(args.region, args.s3_endpoint_url, s3_ca).await?;
                let timeout = Duration::from_secs(args.s3_timeout.max(1));
                Some(SecretsSource::S3(S3Source::new(url, client, timeout)))
            }
        };
        let provider = sdk
            .credentials_provider()
            .context("the AWS SDK configured no credentials provider")?;
        let mut proxy = Proxy::bind(config, CredentialCache::new(provider)).await?;
        if let Some(drain) = audit {
            proxy = proxy.with_audit_drain(drain);
        }
        if let Some(relay) = relay {
            proxy = proxy.with_log_relay(relay);
        }
        if let Some(metrics) = metrics {
            let listener = bind_metrics(&args.metrics_listen).await?;
            tracing::info!(endpoint = %listener.local_endpoint(), "metrics");
            proxy = proxy.with_metrics(MetricsService {
                metrics,
                listener,
                status_from: load_to,
                status_poll: Duration::from_secs(args.metrics_status_poll.max(1)),
            });
        }
        let agent = match agent_config {
            Some(config) => Some(
                keystore_host::agent::Agent::bind(config)
                    .await
                    .context("starting the agent (--no-agent runs the proxy without it)")?,
            ),
            None => None,
        };
        proxy
            .install_signal_handlers()
            .context("installing signal handlers")?;
        super::agent::run_with_proxy(proxy, agent).await?;
        Ok(ExitCode::SUCCESS)
    })
}

/// Binds `--metrics-listen`: a tcp address must be a loopback one (the
/// metrics say how busy and how healthy the keystore is; no one off the
/// host needs that).
async fn bind_metrics(endpoint: &Endpoint) -> anyhow::Result<keystore_shared::Listener> {
    if let Endpoint::Tcp { host, .. } = endpoint {
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            bail!("--metrics-listen must be a loopback address, not {host}");
        }
    }
    endpoint.bind().await.with_context(|| {
        format!("binding --metrics-listen {endpoint} (--no-metrics to go without)")
    })
}
