//! `keystore-enclave`: the process that runs inside the Nitro Enclave.
//!
//! It disables core dumps before anything else (a core file of this process
//! would hold the seal key and the recipient key), opens the NSM, generates
//! and attests the recipient key, creates an empty sealed store and serves it
//! until SIGTERM or SIGINT. With `--region` it also accepts `Load` bundles on
//! the load port and decrypts them through KMS, re-decrypting on a TTL so a
//! revoked key policy takes effect. Once ready it prints the endpoint it listens on,
//! alone on one line of stdout, so scripts and tests can wait for it; logs go
//! to stderr.
#![forbid(unsafe_code)]

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use keystore_enclave::kms::{Kms, KmsConfig};
use keystore_enclave::load::{LoadConfig, Loader};
use keystore_enclave::recipient::{Recipient, RecipientBits, RecipientConfig};
use keystore_enclave::server::{self, Server, ServerConfig};
use keystore_enclave::service::KeystoreService;
use keystore_enclave::store::{SealKey, Store, StoreConfig};
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
    /// KMS host name: TLS server name and SNI (default kms.<region>.amazonaws.com).
    #[arg(long, value_name = "HOST")]
    kms_host: Option<String>,
    /// The host proxy's KMS forwarder, the enclave's only way out.
    #[arg(long, default_value = "vsock://3:8000")]
    kms_proxy: Endpoint,
    /// The host's credentials service.
    #[arg(long, default_value = "vsock://3:8001")]
    credentials: Endpoint,
    /// An extra trusted CA (PEM) for KMS TLS; only with `--nsm mock`.
    #[arg(long, value_name = "PEM")]
    kms_ca: Option<PathBuf>,
    /// Decrypt the last bundle again this often, so a revoked key policy
    /// takes effect (`0s` disables).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    reload_every: Duration,
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
    /// Log filter: a level (`info`, `debug`, …) or tracing directives
    /// (`keystore_enclave=debug,info`).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Log line format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
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
    init_tracing(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(args))
}

/// A core dump of this process would contain the seal key, the recipient
/// key and plaintext in flight; setting both limits to 0 also stops the
/// process from raising the soft limit again later.
fn disable_core_dumps() -> anyhow::Result<()> {
    setrlimit(Resource::RLIMIT_CORE, 0, 0).context("cannot disable core dumps (RLIMIT_CORE)")
}

fn init_tracing(args: &Args) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .with_context(|| format!("invalid --log-level {:?}", args.log_level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    }
    .map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}

async fn run(args: Args) -> anyhow::Result<()> {
    #[cfg(not(feature = "mock"))]
    if args.nsm == NsmKind::Mock {
        bail!(NO_MOCK);
    }
    if args.nsm == NsmKind::Device && args.mock_pki.is_some() {
        bail!("--mock-pki only makes sense with --nsm mock");
    }
    // Installed before anything slow so a signal during start-up is not
    // the default (immediate) termination.
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;

    let recipient_config = RecipientConfig {
        bits: args.recipient_bits,
        refresh_after: args.refresh_after,
        ..RecipientConfig::default()
    };
    recipient_config
        .validate()
        .context("invalid --refresh-after")?;
    let server_config = ServerConfig {
        max_connections: args.max_connections,
        idle_timeout: args.idle_timeout,
        request_timeout: args.request_timeout,
        shutdown_grace: args.shutdown_grace,
        ..ServerConfig::default()
    };
    server_config.validate()?;

    // Bind first: a taken or invalid address fails in milliseconds, not
    // after seconds of key generation. Connections queue in the backlog
    // until the server starts accepting.
    let listener = args.listen.bind().await?;
    let nsm = open_nsm(&args)?;
    let kms = kms_client(&args)?;
    let load_listener = match kms {
        Some(_) => Some(args.load_listen.bind().await?),
        None => {
            tracing::warn!("no --region: this enclave cannot load secrets from KMS");
            None
        }
    };

    tracing::info!(
        bits = args.recipient_bits.bits(),
        "generating the recipient key"
    );
    let (recipient, refresher) = Recipient::start(nsm.clone(), recipient_config)
        .await
        .context("cannot create the recipient key")?;
    let seal_key = SealKey::generate(nsm.as_ref()).context("cannot create the seal key")?;
    let store = Arc::new(Store::new(seal_key, StoreConfig::default()));
    let mut service = KeystoreService::new(store.clone(), recipient.clone(), nsm);
    let mut loader = None;
    if let Some(kms) = kms {
        let load_config = LoadConfig {
            concurrency: args.load_concurrency,
            ..LoadConfig::default()
        };
        let built = Arc::new(
            Loader::new(kms, recipient, store.clone(), load_config)
                .context("invalid load settings")?,
        );
        service = service.with_loader(built.clone());
        loader = Some(built);
    }
    let service = Arc::new(service);
    let server = Server::from_listener(listener, service.clone(), server_config)?;
    let load_server = match load_listener {
        Some(listener) => Some(Server::from_listener(
            listener,
            service,
            ServerConfig::for_loading(LoadConfig::default().max_duration),
        )?),
        None => None,
    };

    let endpoint = server.local_endpoint().clone();
    if let Some(load_server) = &load_server {
        tracing::info!(endpoint = %load_server.local_endpoint(), "load port ready");
    }
    tracing::info!(endpoint = %endpoint, version = keystore_enclave::service::VERSION, "ready");
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{endpoint}").context("cannot write to stdout")?;
    stdout.flush().context("cannot write to stdout")?;
    drop(stdout);

    // One signal stops every listener and the reload task.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let reloads = match (&loader, args.reload_every.is_zero()) {
        (Some(loader), false) => Some(tokio::spawn(reload_periodically(
            loader.clone(),
            store.clone(),
            args.reload_every,
            stopped(stop_rx.clone()),
        ))),
        _ => None,
    };
    let load_served = load_server.map(|s| tokio::spawn(s.run(stopped(stop_rx.clone()))));
    let signals = async move {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM received"),
            _ = sigint.recv() => tracing::info!("SIGINT received"),
        }
        let _ = stop_tx.send(true);
    };
    let (served, ()) = tokio::join!(server.run(stopped(stop_rx.clone())), signals);
    if let Some(task) = load_served {
        match task.await {
            Ok(Err(err)) => tracing::warn!(error = %err, "load port stopped with an error"),
            Err(err) => tracing::warn!(error = %err, "load port task failed"),
            Ok(Ok(())) => {}
        }
    }
    if let Some(task) = reloads {
        let _ = task.await;
    }

    // Wipe before anything else can fail.
    store.clear();
    tracing::info!("secret store wiped");
    if let Err(err) = refresher.shutdown().await {
        tracing::warn!(error = %err, "recipient refresher did not stop cleanly");
    }
    served?;
    tracing::info!("keystore-enclave stopped");
    Ok(())
}

/// The KMS client, when `--region` says where KMS is.
fn kms_client(args: &Args) -> anyhow::Result<Option<Kms>> {
    let Some(region) = &args.region else {
        if args.kms_ca.is_some() || args.kms_host.is_some() {
            bail!("--kms-host and --kms-ca need --region");
        }
        return Ok(None);
    };
    let mut config = KmsConfig::new(region.clone());
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
    config
        .check_extra_ca(args.nsm == NsmKind::Mock)
        .context("--kms-ca")?;
    Ok(Some(Kms::new(config).context("invalid KMS settings")?))
}

/// Decrypts the last good bundle again every `every`, so a revoked key
/// policy stops the enclave serving within one period: when KMS refuses,
/// the secrets are wiped. Any other failure (KMS unreachable, throttled)
/// keeps the current secrets; both are reported in `Status`.
async fn reload_periodically(
    loader: Arc<Loader>,
    store: Arc<Store>,
    every: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = ticks.tick() => {}
        }
        if loader.last_load().is_none() {
            continue; // nothing loaded yet
        }
        match loader.reload().await {
            Ok(report) => tracing::info!(count = report.count, "periodic re-decrypt succeeded"),
            Err(err) if err.is_revocation() => {
                store.clear();
                tracing::error!(error = %err, "KMS no longer allows this enclave: secrets wiped");
            }
            Err(err) => {
                tracing::warn!(error = %err, "periodic re-decrypt failed; keeping the current secrets")
            }
        }
    }
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
    Ok(Arc::new(MockNsm::open(dir, MockConfig::default())?))
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
    }

    #[test]
    fn mock_is_offered_only_by_mock_builds() {
        let help = Args::command().render_long_help().to_string();
        assert_eq!(help.contains("mock:"), cfg!(feature = "mock"), "{help}");
    }
}
