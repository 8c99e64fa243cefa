//! `keystore-enclave`: the process that runs inside the Nitro Enclave.
//!
//! Flags only: it disables core dumps before anything else (a core file of
//! this process would hold the seal key and the recipient key), turns the
//! flags into an [`EnclaveConfig`] and runs [`Enclave::start`] until SIGTERM
//! or SIGINT. Once ready it prints the endpoint it listens on, alone on one
//! line of stdout, so scripts and tests can wait for it; logs go to stderr.
#![forbid(unsafe_code)]

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use keystore_enclave::audit::{self, AuditConfig};
use keystore_enclave::enclave::{Enclave, EnclaveConfig};
use keystore_enclave::kms::breaker::{self, BreakerConfig};
use keystore_enclave::kms::{KmsConfig, PinnedKeys};
use keystore_enclave::load::LoadConfig;
use keystore_enclave::log_ring::{self, LogRing};
use keystore_enclave::recipient::{RecipientBits, RecipientConfig};
use keystore_enclave::server::{self, SecretPeers, ServerConfig};
use keystore_nsm::{DeviceNsm, Nsm};
use keystore_shared::Endpoint;
use nix::sys::resource::{Resource, setrlimit};
use tokio::signal::unix::{SignalKind, signal};

/// The nitro-keystore enclave: serves sealed secrets to the parent instance.
#[derive(Debug, Parser)]
#[command(name = "keystore-enclave", version, about)]
struct Args {
    /// Where the secret server listens (vsock://CID:PORT, tcp://HOST:PORT or
    /// unix:///path).
    #[arg(long, default_value = "vsock://ANY:5000")]
    listen: Endpoint,
    /// Where the host proxy's loader sends `Load` bundles (16 MiB frames).
    #[arg(long, default_value = "vsock://ANY:5001")]
    load_listen: Endpoint,
    /// AWS region of the KMS key. Without it the enclave cannot load
    /// secrets. Dockerfile.enclave bakes it into the measured image.
    #[arg(long, env = "KEYSTORE_REGION")]
    region: Option<String>,
    /// The KMS key ARN every `Decrypt` names (repeatable, or comma-separated
    /// in the environment). Answers for any other key are refused; without
    /// one every `Load` is refused. Dockerfile.enclave bakes it into the
    /// measured image. Key ARNs only, not aliases; empty items are ignored
    /// (an image built without keys has an empty variable).
    #[arg(
        long = "kms-key-arn",
        env = "KEYSTORE_KMS_KEY_ARNS",
        value_name = "ARN",
        value_delimiter = ','
    )]
    kms_key_arns: Vec<String>,
    /// KMS host name: TLS server name and SNI (default kms.<region>.amazonaws.com).
    #[arg(long, value_name = "HOST")]
    kms_host: Option<String>,
    /// The host proxy's KMS forwarder, the enclave's only way out (a port
    /// below 1024, which only a privileged process on the parent can bind).
    #[arg(long, default_value = "vsock://3:800")]
    kms_proxy: Endpoint,
    /// The host's credentials service (a port below 1024, like the
    /// forwarder's).
    #[arg(long, default_value = "vsock://3:801")]
    credentials: Endpoint,
    /// Who the secret port serves: `privileged` peers only (the parent from
    /// a source port below 1024, root on a unix socket), or `any` peer,
    /// which then reads as the identity the kernel reports and may not name
    /// another caller. The load port always serves privileged peers only.
    #[arg(long, value_enum, default_value_t = SecretPeers::Privileged)]
    secret_peers: SecretPeers,
    /// Accept a `Load` with no entries (it empties the set); refused by
    /// default, so a stray empty bundle cannot wipe the secrets.
    #[arg(long)]
    allow_empty: bool,
    /// Wipe the secrets once no load or re-decrypt has succeeded for this
    /// long (KMS unreachable): an enclave that cannot ask KMS cannot learn
    /// of a revocation either (`0s` disables).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    max_stale: Duration,
    /// Consecutive KMS service failures (throttling, 5xx, timeouts,
    /// connection errors) that open the circuit breaker; while open, KMS
    /// calls fail fast and the last good set keeps serving (`0` disables).
    #[arg(long, value_name = "N", default_value_t = breaker::DEFAULT_FAILURE_THRESHOLD)]
    breaker_threshold: u32,
    /// First wait before the open breaker lets one probe through; doubles
    /// (jittered) after each failed probe.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    breaker_initial_open: Duration,
    /// Longest wait between two probes of an open breaker.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    breaker_max_open: Duration,
    /// An extra trusted CA (PEM) for KMS TLS; only with `--nsm mock`.
    #[arg(long, value_name = "PEM")]
    kms_ca: Option<PathBuf>,
    /// Decrypt the last bundle again this often, so a revoked key policy
    /// takes effect (`0s` disables).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    reload_every: Duration,
    /// Audit records kept until the host drains them; beyond that they are
    /// dropped (still chained) and a gap record names them.
    #[arg(long, value_name = "N", default_value_t = audit::DEFAULT_BUFFER_RECORDS)]
    audit_buffer: usize,
    /// Bytes of audit records kept until drained.
    #[arg(long, value_name = "BYTES", default_value_t = audit::DEFAULT_BUFFER_BYTES)]
    audit_buffer_bytes: usize,
    /// Time between two attested audit checkpoints.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    audit_checkpoint_interval: Duration,
    /// KMS calls in flight during a load.
    #[arg(long, default_value_t = 8)]
    load_concurrency: usize,
    /// Which NSM to use: the enclave's /dev/nsm, or (builds with feature
    /// `mock` only) a local mock for tests.
    #[arg(long, value_enum, default_value_t = NsmKind::Device)]
    nsm: NsmKind,
    /// Directory of the mock NSM's certificate chain (created on first use);
    /// required with `--nsm mock`.
    #[arg(long, value_name = "DIR", required_if_eq("nsm", "mock"))]
    mock_pki: Option<PathBuf>,
    /// With `--nsm mock`: report all-zero PCRs, as a `--debug-mode`
    /// enclave's NSM does (for tests of what notices one).
    #[cfg_attr(not(feature = "mock"), arg(hide = true))]
    #[arg(long, requires = "mock_pki")]
    mock_debug_pcrs: bool,
    /// With `--nsm mock`: the mock's clock runs this far behind (e.g.
    /// `10m`), so every document looks that old to KMS (for tests of
    /// what notices one).
    #[cfg_attr(not(feature = "mock"), arg(hide = true))]
    #[arg(long, requires = "mock_pki", value_name = "DURATION", value_parser = humantime::parse_duration)]
    mock_clock_behind: Option<Duration>,
    /// RSA recipient key size: 2048, 3072 or 4096.
    #[arg(long, default_value = "4096", value_name = "BITS")]
    recipient_bits: RecipientBits,
    /// Replace the recipient key and document once the document is this old
    /// (e.g. `240s`, `4m`); must stay below KMS's 5-minute limit.
    #[arg(long, default_value = "4m", value_parser = humantime::parse_duration)]
    refresh_after: Duration,
    /// Connections served at once; more wait briefly, then are refused.
    #[arg(long, default_value_t = server::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// How long a connection may take to send each complete request.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// How long answering one request may take.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// How long in-flight requests may run after SIGTERM.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Benchmarks only (`scripts/bench.sh`): record no requests in the
    /// audit trail, to measure what it costs. Exists only in builds with
    /// feature `mock`.
    #[cfg(feature = "mock")]
    #[arg(long, hide = true)]
    bench_without_audit: bool,
    /// Threads serving requests: 1 runs everything on one thread (tokio's
    /// current_thread runtime), more a work-stealing pool of that many. Key
    /// generation and attestation run on a separate blocking pool either
    /// way. The default is the faster on a 2-vCPU enclave by measurement
    /// (BENCHMARKS.md).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_WORKER_THREADS,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    worker_threads: u16,
    /// Log filter: a level (`info`, `debug`, …) or tracing directives
    /// (`keystore_enclave=debug,info`).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Log line format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Recent log events kept for the host daemon to relay into the
    /// parent's journal (`LogRead` on the load port); past it the oldest
    /// are dropped and counted. `0` keeps none (the relay is refused).
    #[arg(long, value_name = "N", default_value_t = log_ring::DEFAULT_CAPACITY)]
    log_ring: usize,
    /// Bytes of log event text the ring keeps.
    #[arg(long, value_name = "BYTES", default_value_t = log_ring::DEFAULT_MAX_BYTES)]
    log_ring_bytes: usize,
    /// Lowest level kept in the ring (`error`, `warn`, `info`, `debug`,
    /// `trace`); events `--log-level` filters out of stderr may still be
    /// kept.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_ring_level: tracing_subscriber::filter::LevelFilter,
}

/// Which NSM implementation to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum NsmKind {
    /// The real Nitro Security Module at /dev/nsm.
    Device,
    /// A local mock signing with the chain in `--mock-pki`.
    #[cfg_attr(not(feature = "mock"), value(hide = true))]
    Mock,
}

/// Why `--nsm mock` fails in a production build. Kept as a (hidden) choice
/// so the refusal says what is wrong rather than "invalid value".
#[cfg(not(feature = "mock"))]
const NO_MOCK: &str =
    "this build has no mock NSM (build keystore-enclave with `--features mock` for local runs)";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `--worker-threads` by default (see its help).
const DEFAULT_WORKER_THREADS: u16 = 2;

fn main() -> ExitCode {
    match start() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: the whole context chain, no backtrace.
            eprintln!("keystore-enclave: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn start() -> anyhow::Result<()> {
    // First thing, before any secret exists in this process.
    disable_core_dumps()?;
    let args = Args::parse();
    let ring = init_tracing(&args)?;
    let mut builder = if args.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(usize::from(args.worker_threads));
        builder
    };
    let runtime = builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(args, ring))
}

/// A core dump of this process would contain the seal key, the recipient
/// key and plaintext in flight; setting both limits to 0 also stops the
/// process from raising the soft limit again later.
fn disable_core_dumps() -> anyhow::Result<()> {
    setrlimit(Resource::RLIMIT_CORE, 0, 0).context("cannot disable core dumps (RLIMIT_CORE)")
}

/// Installs the stderr logger (filtered by `--log-level`) and, unless
/// `--log-ring 0`, the ring the daemon relays (filtered by
/// `--log-ring-level`), which it returns.
fn init_tracing(args: &Args) -> anyhow::Result<Option<Arc<LogRing>>> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .with_context(|| format!("invalid --log-level {:?}", args.log_level))?;
    let ansi = std::io::stderr().is_terminal();
    let stderr = match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    let ring =
        (args.log_ring > 0).then(|| Arc::new(LogRing::new(args.log_ring, args.log_ring_bytes)));
    let ring_layer = ring
        .as_ref()
        .map(|ring| ring.layer().with_filter(args.log_ring_level));
    tracing_subscriber::registry()
        .with(stderr)
        .with(ring_layer)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))?;
    Ok(ring)
}

async fn run(args: Args, ring: Option<Arc<LogRing>>) -> anyhow::Result<()> {
    #[cfg(not(feature = "mock"))]
    if args.nsm == NsmKind::Mock {
        bail!(NO_MOCK);
    }
    if args.nsm == NsmKind::Device && args.mock_pki.is_some() {
        bail!("--mock-pki only makes sense with --nsm mock");
    }
    if args.nsm == NsmKind::Device && args.mock_debug_pcrs {
        bail!("--mock-debug-pcrs only makes sense with --nsm mock");
    }
    if args.nsm == NsmKind::Device && args.mock_clock_behind.is_some() {
        bail!("--mock-clock-behind only makes sense with --nsm mock");
    }
    // Installed before anything slow so a signal during start-up is not
    // the default (immediate) termination.
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;

    let mut config = EnclaveConfig::new(
        args.listen.clone(),
        args.load_listen.clone(),
        open_nsm(&args)?,
    );
    config.kms = kms_config(&args)?;
    config.recipient = RecipientConfig {
        bits: args.recipient_bits,
        refresh_after: args.refresh_after,
        ..RecipientConfig::default()
    };
    config
        .recipient
        .validate()
        .context("invalid --refresh-after")?;
    config.server = ServerConfig {
        max_connections: args.max_connections,
        idle_timeout: args.idle_timeout,
        request_timeout: args.request_timeout,
        shutdown_grace: args.shutdown_grace,
        secret_peers: args.secret_peers,
        ..ServerConfig::default()
    };
    config.load = LoadConfig {
        concurrency: args.load_concurrency,
        allow_empty: args.allow_empty,
        max_stale: args.max_stale,
        ..LoadConfig::default()
    };
    config.reload_every = args.reload_every;
    config.log_ring = ring;
    config.audit = AuditConfig {
        buffer_records: args.audit_buffer,
        buffer_bytes: args.audit_buffer_bytes,
        checkpoint_interval: args.audit_checkpoint_interval,
    };
    config
        .audit
        .validate()
        .context("--audit-buffer, --audit-buffer-bytes, --audit-checkpoint-interval")?;

    let enclave = Enclave::start(config).await?;
    #[cfg(feature = "mock")]
    if args.bench_without_audit {
        tracing::warn!("--bench-without-audit: requests are NOT recorded in the audit trail");
        enclave.service().audit().skip_requests_for_benchmark();
    }
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", enclave.secret_endpoint()).context("cannot write to stdout")?;
    stdout.flush().context("cannot write to stdout")?;
    drop(stdout);

    let signalled = async {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM received"),
            _ = sigint.recv() => tracing::info!("SIGINT received"),
        }
    };
    enclave.run_until(signalled).await?;
    tracing::info!("keystore-enclave stopped");
    Ok(())
}

/// The KMS settings, when `--region` says where KMS is.
fn kms_config(args: &Args) -> anyhow::Result<Option<KmsConfig>> {
    let Some(region) = &args.region else {
        let pins_keys = args.kms_key_arns.iter().any(|k| !k.trim().is_empty());
        if args.kms_ca.is_some() || args.kms_host.is_some() || pins_keys {
            bail!("--kms-host, --kms-ca and --kms-key-arn need --region");
        }
        return Ok(None);
    };
    let pinned = PinnedKeys::parse(&args.kms_key_arns).context("--kms-key-arn")?;
    let mut config = KmsConfig::new(region.clone()).with_pinned_keys(pinned);
    config.transport.proxy = args.kms_proxy.clone();
    if let Some(host) = &args.kms_host {
        config.transport.kms_host = host.clone();
    }
    if let Some(path) = &args.kms_ca {
        let pem = std::fs::read(path)
            .with_context(|| format!("cannot read --kms-ca {}", path.display()))?;
        config.transport.extra_ca_pem = Some(pem);
    }
    config.credentials.endpoint = args.credentials.clone();
    config.breaker = BreakerConfig {
        failure_threshold: args.breaker_threshold,
        initial_open: args.breaker_initial_open,
        max_open: args.breaker_max_open,
    };
    config
        .breaker
        .validate()
        .map_err(|e| anyhow::anyhow!(e))
        .context("--breaker-initial-open/--breaker-max-open")?;
    config
        .check_extra_ca(args.nsm == NsmKind::Mock)
        .context("--kms-ca")?;
    Ok(Some(config))
}

fn open_nsm(args: &Args) -> anyhow::Result<Arc<dyn Nsm>> {
    match args.nsm {
        NsmKind::Device => Ok(Arc::new(DeviceNsm::open()?)),
        // Without feature `mock`, `run` has refused this already.
        NsmKind::Mock => open_mock_nsm(args),
    }
}

#[cfg(feature = "mock")]
fn open_mock_nsm(args: &Args) -> anyhow::Result<Arc<dyn Nsm>> {
    use keystore_nsm::{MockConfig, MockNsm};
    let dir = args
        .mock_pki
        .as_ref()
        .context("--nsm mock needs --mock-pki DIR")?;
    tracing::warn!(pki = %dir.display(), "using the MOCK NSM: attestation documents prove nothing");
    let config = MockConfig {
        clock_behind: args.mock_clock_behind.unwrap_or_default(),
        ..MockConfig::default()
    };
    if !config.clock_behind.is_zero() {
        tracing::warn!(behind = ?config.clock_behind, "the mock NSM's clock runs behind");
    }
    if args.mock_debug_pcrs {
        tracing::warn!("the mock NSM reports all-zero PCRs, as a debug-mode enclave");
        return Ok(Arc::new(MockNsm::open_with_pcr0(
            dir,
            config,
            [0; keystore_nsm::mock::PCR_LEN],
        )?));
    }
    Ok(Arc::new(MockNsm::open(dir, config)?))
}

#[cfg(not(feature = "mock"))]
fn open_mock_nsm(_args: &Args) -> anyhow::Result<Arc<dyn Nsm>> {
    bail!(NO_MOCK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn durations_and_sizes_parse() {
        let args = Args::try_parse_from([
            "keystore-enclave",
            "--refresh-after",
            "240s",
            "--idle-timeout",
            "2m",
            "--recipient-bits",
            "2048",
        ])
        .unwrap();
        assert_eq!(args.refresh_after, Duration::from_secs(240));
        assert_eq!(args.idle_timeout, Duration::from_secs(120));
        assert_eq!(args.recipient_bits, RecipientBits::B2048);
        assert!(Args::try_parse_from(["keystore-enclave", "--recipient-bits", "1024"]).is_err());
        assert!(Args::try_parse_from(["keystore-enclave", "--nsm", "mock"]).is_err());
        let defaults = Args::try_parse_from(["keystore-enclave"]).unwrap();
        assert_eq!(defaults.refresh_after, Duration::from_secs(240));
        assert_eq!(defaults.recipient_bits, RecipientBits::B4096);
        assert_eq!(defaults.listen.to_string(), "vsock://ANY:5000");
        assert_eq!(defaults.kms_proxy.to_string(), "vsock://3:800");
        assert_eq!(defaults.credentials.to_string(), "vsock://3:801");
        assert_eq!(defaults.secret_peers, SecretPeers::Privileged);
        assert!(!defaults.allow_empty);
        assert_eq!(defaults.max_stale, Duration::from_secs(24 * 3600));
        assert_eq!(defaults.audit_buffer, audit::DEFAULT_BUFFER_RECORDS);
        assert_eq!(defaults.audit_checkpoint_interval, Duration::from_secs(300));
        assert_eq!(defaults.log_ring, log_ring::DEFAULT_CAPACITY);
        assert_eq!(
            defaults.log_ring_level,
            tracing_subscriber::filter::LevelFilter::INFO
        );
        let quiet = Args::try_parse_from(["keystore-enclave", "--log-ring-level", "warn"]).unwrap();
        assert_eq!(
            quiet.log_ring_level,
            tracing_subscriber::filter::LevelFilter::WARN
        );
        assert!(Args::try_parse_from(["keystore-enclave", "--log-ring-level", "loud"]).is_err());
        let any = Args::try_parse_from(["keystore-enclave", "--secret-peers", "any"]).unwrap();
        assert_eq!(any.secret_peers, SecretPeers::Any);
        assert!(Args::try_parse_from(["keystore-enclave", "--secret-peers", "all"]).is_err());
    }

    const KEY: &str = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";

    #[test]
    fn breaker_flags_default_and_refuse_a_max_below_the_initial_wait() {
        let args = Args::try_parse_from(["keystore-enclave", "--region", "us-east-1"]).unwrap();
        let config = kms_config(&args).unwrap().unwrap();
        assert_eq!(config.breaker, BreakerConfig::default());
        let args = Args::try_parse_from([
            "keystore-enclave",
            "--region",
            "us-east-1",
            "--breaker-threshold",
            "0",
            "--breaker-initial-open",
            "5s",
            "--breaker-max-open",
            "1s",
        ])
        .unwrap();
        let err = format!("{:#}", kms_config(&args).unwrap_err());
        assert!(err.contains("--breaker-initial-open"), "{err}");
    }

    #[test]
    fn kms_key_arns_repeat_split_on_commas_and_refuse_aliases() {
        let other = KEY.replace("1234abcd-", "9999abcd-");
        let both = format!("{KEY},{other}");
        let args = Args::try_parse_from([
            "keystore-enclave",
            "--region",
            "us-east-1",
            "--kms-key-arn",
            &both,
            "--kms-key-arn",
            KEY,
        ])
        .unwrap();
        let config = kms_config(&args).unwrap().unwrap();
        assert_eq!(config.pinned_keys.len(), 2);
        let args = Args::try_parse_from([
            "keystore-enclave",
            "--region",
            "us-east-1",
            "--kms-key-arn",
            "arn:aws:kms:us-east-1:111122223333:alias/keystore",
        ])
        .unwrap();
        let err = format!("{:#}", kms_config(&args).unwrap_err());
        assert!(err.contains("is an alias"), "{err}");
        // An image built without keys has an empty variable: no key pinned.
        let args = Args::try_parse_from([
            "keystore-enclave",
            "--region",
            "us-east-1",
            "--kms-key-arn",
            "",
        ])
        .unwrap();
        assert!(kms_config(&args).unwrap().unwrap().pinned_keys.is_empty());
        // Without --region the keys are pointless: refused, not ignored.
        let args = Args::try_parse_from(["keystore-enclave", "--kms-key-arn", KEY]).unwrap();
        assert!(kms_config(&args).is_err());
    }

    #[test]
    fn mock_is_offered_only_by_mock_builds() {
        let help = Args::command().render_long_help().to_string();
        assert_eq!(help.contains("mock:"), cfg!(feature = "mock"), "{help}");
    }
}
