//! The secrets loader: keeps the enclave's secret set in step with the
//! secrets file on the parent.
//!
//! The file holds `ENC[...]` envelopes (ciphertext, safe on the parent's
//! disk) next to plain settings. Only the envelopes are sent, as one `Load`
//! frame; the enclave decrypts them and swaps its set atomically, keeping
//! the old set if anything fails. The enclave may start after the proxy or
//! KMS may be briefly unreachable, so a load is retried with capped
//! exponential backoff until the enclave accepts it, each attempt bounded in
//! time. The file is polled (a local file by size and mtime, an S3 object
//! by ETag, see [`super::source`]; then a SHA-256 of the contents) so an
//! edit or upload is picked up without a restart; a [`ReloadTrigger`]
//! (wired to SIGHUP by the proxy) forces a fetch and reload even when the
//! file looks unchanged, e.g. after the enclave restarted.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keystore_shared::endpoint::Endpoint;
use keystore_shared::protocol::{
    DEFAULT_MAX_LOAD_FRAME, DEFAULT_MAX_RESPONSE_FRAME, LoadEntry, RequestOp, ResponseBody,
};
use keystore_shared::{Client, ClientConfig, ClientError};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use zeroize::Zeroizing;

use super::source::{SecretsSource, Seen, SourceError};
use crate::secrets_file::{self, EntriesError, Format};

/// Why one load attempt failed. Messages carry names and line numbers,
/// never values.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The secrets file could not be read or fetched.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The secrets file is not valid in its format, or holds an unreadable
    /// envelope.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong (line and name, never a value).
        #[source]
        source: EntriesError,
    },
    /// The enclave could not be reached, refused the load, or answered
    /// out of protocol.
    #[error(transparent)]
    Enclave(#[from] ClientError),
    /// The attempt did not finish in time.
    #[error("no answer from the enclave within {0:?}")]
    Timeout(Duration),
}

impl LoadError {
    /// The step that failed, as a metrics label: `fetch`, `parse` or
    /// `enclave`.
    pub fn step(&self) -> &'static str {
        match self {
            LoadError::Source(_) => "fetch",
            LoadError::File { .. } => "parse",
            LoadError::Enclave(_) | LoadError::Timeout(_) => "enclave",
        }
    }
}

/// Client settings for the load port: 16 MiB requests, every wait bounded
/// by `timeout`.
fn load_port_client(timeout: Duration) -> ClientConfig {
    ClientConfig {
        connect_timeout: timeout,
        request_timeout: timeout,
        max_request_frame: DEFAULT_MAX_LOAD_FRAME,
        max_response_frame: DEFAULT_MAX_RESPONSE_FRAME,
        // The load port serves only privileged peers: a source port below
        // 1024 (this daemon has CAP_NET_BIND_SERVICE) or root on unix.
        privileged: true,
    }
}

/// Sends one `Load` to the enclave and waits for `Loaded`; returns the
/// number of secrets the enclave now holds.
pub async fn send_load(
    enclave: &Endpoint,
    entries: Vec<LoadEntry>,
    timeout: Duration,
) -> Result<u64, LoadError> {
    let attempt = async {
        let mut client = Client::connect_with(enclave, load_port_client(timeout)).await?;
        match client.call(RequestOp::Load { entries }).await? {
            ResponseBody::Loaded { count } => Ok(count),
            // `call` has checked the answer's kind already.
            other => Err(LoadError::Enclave(ClientError::UnexpectedResponse {
                op: "load",
                got: other.kind(),
            })),
        }
    };
    // Connect and request are bounded separately; this bounds their sum.
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| LoadError::Timeout(timeout))?
}

/// How often an idle loader asks the enclave whether it still holds its
/// secrets by default (restart detection takes at most this long plus one
/// poll).
pub const ENCLAVE_CHECK_INTERVAL: Duration = Duration::from_secs(15);

/// The longest wait between two load attempts after failures, by default.
pub const LOAD_RETRY_MAX: Duration = Duration::from_secs(30);

/// Asks the enclave's load port whether it holds a loaded set. `None` when
/// it cannot say (unreachable, slow, odd answer): only a clear "not ready"
/// triggers a reload, so a down enclave is not hammered.
pub async fn enclave_ready(enclave: &Endpoint, timeout: Duration) -> Option<bool> {
    let ask = async {
        let mut client = Client::connect_with(enclave, load_port_client(timeout))
            .await
            .ok()?;
        client.status().await.ok().map(|report| report.ready)
    };
    tokio::time::timeout(timeout, ask).await.ok().flatten()
}

/// Settings of a [`Loader`].
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// Where the secrets file is read: a local path or an S3 object.
    pub source: SecretsSource,
    /// Its format; `None`: from the file or object name ([`Format::from_path`]).
    pub format: Option<Format>,
    /// The enclave's load port.
    pub load_to: Endpoint,
    /// How often the source is checked for changes.
    pub poll_interval: Duration,
    /// Bound on one load attempt (connect, send, decrypt, answer).
    pub attempt_timeout: Duration,
    /// First retry delay after a failure.
    pub backoff_initial: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
    /// How often an idle loader checks that the enclave still holds its
    /// secrets (each check is one `Status` on the load port).
    pub enclave_check: Duration,
}

impl LoaderConfig {
    /// Defaults: poll every 2 s, 60 s per attempt (the enclave decrypts
    /// every value through KMS before answering), backoff 0.5 s to 30 s,
    /// the enclave checked every 15 s.
    pub fn new(source: impl Into<SecretsSource>, load_to: Endpoint) -> Self {
        LoaderConfig {
            source: source.into(),
            format: None,
            load_to,
            poll_interval: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(500),
            backoff_max: LOAD_RETRY_MAX,
            enclave_check: ENCLAVE_CHECK_INTERVAL,
        }
    }
}

/// Forces the [`Loader`] to reload, even if the file looks unchanged.
#[derive(Debug, Clone)]
pub struct ReloadTrigger(Arc<Notify>);

impl ReloadTrigger {
    /// Asks for a reload; several requests before the loader wakes count as
    /// one.
    pub fn reload(&self) {
        self.0.notify_one();
    }
}

/// The `Load` entries of a secrets file's contents. `origin` (the path or
/// URL it came from) names the file in errors. The one place where bytes
/// become entries.
pub fn entries_from_bytes(
    origin: &Path,
    format: Format,
    bytes: &[u8],
) -> Result<Vec<LoadEntry>, LoadError> {
    secrets_file::entries(bytes, format).map_err(|source| LoadError::File {
        path: origin.to_owned(),
        source,
    })
}

/// Watches the secrets file and loads it into the enclave.
#[derive(Debug)]
pub struct Loader {
    config: LoaderConfig,
    trigger: Arc<Notify>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Loader {
    /// A loader for `config`.
    pub fn new(config: LoaderConfig) -> Self {
        Loader {
            config,
            trigger: Arc::new(Notify::new()),
            metrics: None,
        }
    }

    /// Counts each load (outcome and duration) into `metrics`.
    pub fn set_metrics(&mut self, metrics: Arc<crate::metrics::Metrics>) {
        if let SecretsSource::S3(s3) = &mut self.config.source {
            s3.set_metrics(metrics.clone());
        }
        self.metrics = Some(metrics);
    }

    /// A handle that forces a reload.
    pub fn trigger(&self) -> ReloadTrigger {
        ReloadTrigger(self.trigger.clone())
    }

    /// Reads, checks and sends the file once.
    pub async fn load_once(&mut self) -> Result<(u64, [u8; 32]), LoadError> {
        let bytes = self.config.source.read().await?;
        self.load_bytes(bytes).await
    }

    /// Checks and sends contents already read; returns the enclave's count
    /// and the contents' SHA-256.
    async fn load_bytes(&self, bytes: Zeroizing<Vec<u8>>) -> Result<(u64, [u8; 32]), LoadError> {
        let digest: [u8; 32] = Sha256::digest(&*bytes).into();
        let origin = self.config.source.origin();
        let format = self
            .config
            .format
            .unwrap_or_else(|| Format::from_path(&origin));
        let entries = entries_from_bytes(&origin, format, &bytes)?;
        drop(bytes);
        let count = send_load(&self.config.load_to, entries, self.config.attempt_timeout).await?;
        Ok((count, digest))
    }

    /// Loads the file, then keeps it loaded until `shutdown` completes:
    /// reloads when its contents change or a reload is triggered, and
    /// retries failures with backoff. The enclave keeps its previous set
    /// while a fetch or a reload fails.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut loaded: Option<[u8; 32]> = None;
        let mut seen = Seen::Nothing;
        let mut failing = false;
        let mut forced = true;
        let mut backoff = self.config.backoff_initial;
        let mut last_enclave_check = std::time::Instant::now();
        let source = self.config.source.to_string();
        loop {
            // A restarted enclave comes back empty: give it the file again.
            // Checked on its own, slower clock: each check is a connection
            // the enclave logs.
            let check_enclave = !forced
                && !failing
                && loaded.is_some()
                && last_enclave_check.elapsed() >= self.config.enclave_check;
            if check_enclave {
                last_enclave_check = std::time::Instant::now();
            }
            if check_enclave
                && enclave_ready(&self.config.load_to, self.config.attempt_timeout).await
                    == Some(false)
            {
                tracing::info!(
                    enclave = %self.config.load_to,
                    "the enclave holds no secrets (restarted?); loading again"
                );
                forced = true;
            }
            // A forced or failing round reads the contents whatever was
            // seen; otherwise only a changed stamp or ETag reads them.
            let started = std::time::Instant::now();
            let outcome = match self.config.source.poll(&mut seen, forced || failing).await {
                Ok(None) => Ok(None),
                Ok(Some(bytes)) => {
                    let digest: [u8; 32] = Sha256::digest(&*bytes).into();
                    if !forced && loaded == Some(digest) {
                        // Touched or re-uploaded, same contents.
                        Ok(None)
                    } else {
                        self.load_bytes(bytes).await.map(Some)
                    }
                }
                Err(err) => Err(LoadError::from(err)),
            };
            if let Some(metrics) = &self.metrics {
                match &outcome {
                    Ok(None) => {}
                    Ok(Some(_)) => metrics.load("ok", started.elapsed()),
                    Err(err) => metrics.load(err.step(), started.elapsed()),
                }
            }
            match outcome {
                Ok(None) => failing = false,
                Ok(Some((count, digest))) => {
                    tracing::info!(
                        source = %source,
                        enclave = %self.config.load_to,
                        count,
                        "secrets loaded"
                    );
                    loaded = Some(digest);
                    failing = false;
                    forced = false;
                    backoff = self.config.backoff_initial;
                }
                Err(err) => {
                    tracing::warn!(
                        source = %source,
                        enclave = %self.config.load_to,
                        error = %err,
                        retry_in = ?backoff,
                        "loading secrets failed; the enclave keeps its previous set"
                    );
                    failing = true;
                }
            }
            let wait = if failing {
                let wait = backoff;
                backoff = (backoff * 2).min(self.config.backoff_max);
                wait
            } else {
                self.config.poll_interval
            };
            // A forced reload stays forced until it succeeds: after an
            // enclave restart the same contents must still be sent.
            forced |= tokio::select! {
                () = tokio::time::sleep(wait) => false,
                () = self.trigger.notified() => {
                    tracing::info!(source = %source, "reload requested");
                    backoff = self.config.backoff_initial;
                    true
                },
                () = &mut shutdown => return,
            };
        }
    }
}
