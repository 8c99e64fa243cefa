//! A KMS emulator that speaks the real KMS JSON protocol over HTTPS, so the
//! real `aws-sdk-kms` client can talk to it on a laptop.
//!
//! [`MockKms::start`] binds, writes a test CA into the TLS directory and
//! serves until [`MockKmsHandle::shutdown`] (or the handle is dropped).
//! Every KMS request must carry a valid SigV4 signature from one of the
//! configured [`Credential`]s. `Decrypt` and `GenerateDataKey` accept a
//! `Recipient` (a Nitro attestation document): the document is verified
//! against the configured root and the key policy's
//! `kms:RecipientAttestation:*` conditions, and the answer comes back as a
//! BER `CiphertextForRecipient` instead of `Plaintext`. Tests can inject
//! [`Fault`]s, read per-operation [`CallStats`], advance the clock and
//! rotate credentials, through this API or the admin endpoint
//! (`/__admin/...`, see [`server`]).

pub mod ciphertext;
pub mod clock;
pub mod faults;
pub mod keys;
pub mod policy;
pub mod protocol;
pub mod recipient;
pub mod server;
pub mod service;
pub mod sigv4;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use keystore_shared::Endpoint;
use keystore_shared::attestation::{AttestationError, Root};
use keystore_shared::serve::{AnyPeer, serve};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::info;

pub use faults::{CallStats, Fault, FaultKind, Trigger};
pub use protocol::{ErrorKind, KeyMetadata, KmsError, Operation};
pub use sigv4::Credential;

use crate::tls::{TestPki, TlsError};
use clock::Clock;
use faults::{CallCounter, Faults};
use protocol::CreateKeyRequest;
use recipient::AttestationRoot;
use server::Shared;
use service::Kms;
use sigv4::CredentialStore;

/// Default region.
pub const DEFAULT_REGION: &str = "us-east-1";
/// Default account id (the one AWS documentation uses).
pub const DEFAULT_ACCOUNT: &str = "111122223333";
/// Default request body limit: far above any KMS request (an attestation
/// document is a few KiB, a policy at most 32 KiB).
pub const DEFAULT_MAX_BODY: usize = 256 * 1024;

/// How to start the emulator.
#[derive(Clone, Debug)]
pub struct MockKmsConfig {
    /// Address to bind (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Directory for the test CA and server certificate (PEM).
    pub tls_dir: PathBuf,
    /// Root certificate (PEM) attestation documents must chain to, for
    /// example the mock NSM's `<pki dir>/root.pem`. Without it, requests
    /// with a `Recipient` are refused.
    pub attestation_root_pem: Option<PathBuf>,
    /// Region of keys and of SigV4 scopes.
    pub region: String,
    /// The one account id.
    pub account: String,
    /// Accepted access keys.
    pub credentials: Vec<Credential>,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
}

impl MockKmsConfig {
    /// Defaults: `127.0.0.1:0`, [`DEFAULT_REGION`], [`DEFAULT_ACCOUNT`], no
    /// attestation root, `credentials` as given.
    pub fn new(tls_dir: impl Into<PathBuf>, credentials: Vec<Credential>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls_dir: tls_dir.into(),
            attestation_root_pem: None,
            region: DEFAULT_REGION.to_owned(),
            account: DEFAULT_ACCOUNT.to_owned(),
            credentials,
            max_body_bytes: DEFAULT_MAX_BODY,
        }
    }

    /// Sets the attestation root (PEM file).
    #[must_use]
    pub fn with_attestation_root(mut self, pem: impl Into<PathBuf>) -> Self {
        self.attestation_root_pem = Some(pem.into());
        self
    }
}

/// Why the emulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The test PKI could not be created.
    #[error("test PKI: {0}")]
    Tls(#[from] TlsError),
    /// Binding the listener failed (the endpoint error names the address).
    #[error(transparent)]
    Bind(keystore_shared::EndpointError),
    /// The attestation root could not be read.
    #[error("attestation root {path}: {source}")]
    RootFile {
        /// The PEM path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The attestation root is not a usable certificate.
    #[error("attestation root {path}: {source}")]
    Root {
        /// The PEM path.
        path: PathBuf,
        /// Why it was refused.
        source: AttestationError,
    },
}

/// The emulator (see the module documentation).
#[derive(Debug)]
pub struct MockKms;

impl MockKms {
    /// Creates the test PKI, binds `config.listen` and starts serving on
    /// the current tokio runtime.
    ///
    /// # Errors
    /// [`StartError`] if the PKI, the root or the listener fails.
    pub async fn start(config: MockKmsConfig) -> Result<MockKmsHandle, StartError> {
        let root = match &config.attestation_root_pem {
            None => AttestationRoot::none(),
            // Not created yet (the mock NSM makes it on first use): read it
            // when the first Recipient arrives.
            Some(path) if !path.exists() => AttestationRoot::later(path.clone()),
            Some(path) => {
                let pem = tokio::fs::read_to_string(path).await.map_err(|source| {
                    StartError::RootFile {
                        path: path.clone(),
                        source,
                    }
                })?;
                AttestationRoot::loaded(Root::from_pem(&pem).map_err(|source| {
                    StartError::Root {
                        path: path.clone(),
                        source,
                    }
                })?)
            }
        };
        let tls_dir = config.tls_dir.clone();
        let pki = tokio::task::spawn_blocking(move || TestPki::create(tls_dir))
            .await
            .map_err(|e| {
                StartError::Tls(TlsError::Io {
                    path: config.tls_dir.clone(),
                    source: std::io::Error::other(e.to_string()),
                })
            })??;
        let acceptor = TlsAcceptor::from(pki.server_config()?);

        let listen = Endpoint::tcp(config.listen.ip().to_string(), config.listen.port());
        let listener = listen.bind().await.map_err(StartError::Bind)?;
        let local_addr = match listener.local_endpoint() {
            Endpoint::Tcp { host, port } => host
                .parse::<std::net::IpAddr>()
                .map(|ip| SocketAddr::new(ip, *port))
                .unwrap_or(config.listen),
            _ => config.listen,
        };

        let clock = Arc::new(Clock::default());
        let shared = Arc::new(Shared {
            kms: Kms::new(&config.region, &config.account, root, Arc::clone(&clock)),
            credentials: CredentialStore::new(config.credentials),
            faults: Faults::default(),
            calls: CallCounter::default(),
            clock,
            region: config.region.clone(),
            max_body: config.max_body_bytes,
        });
        let (shutdown_tx, mut shutdown_rx) = watch::channel(false);
        let handler = Arc::new(server::KmsHandler {
            acceptor,
            shared: Arc::clone(&shared),
        });
        let stopped = async move {
            let _ = shutdown_rx.wait_for(|stop| *stop).await;
        };
        let task = tokio::spawn(async move {
            let served = serve(
                listener,
                handler,
                Arc::new(AnyPeer),
                server::serve_config(),
                stopped,
            )
            .await;
            if let Err(err) = served {
                tracing::error!(error = %err, "mock-kms stopped");
            }
        });
        let host = if local_addr.ip().is_unspecified() {
            "127.0.0.1".to_owned()
        } else if local_addr.is_ipv6() {
            format!("[{}]", local_addr.ip())
        } else {
            local_addr.ip().to_string()
        };
        let endpoint_url = format!("https://{host}:{}", local_addr.port());
        info!(%endpoint_url, region = %config.region, "mock-kms listening");
        Ok(MockKmsHandle {
            local_addr,
            endpoint_url,
            ca_pem_path: pki.ca_pem_path(),
            shared,
            shutdown: shutdown_tx,
            task: Some(task),
        })
    }
}

/// A running emulator. Dropping it stops the server (without waiting);
/// [`MockKmsHandle::shutdown`] stops it and waits.
#[derive(Debug)]
pub struct MockKmsHandle {
    local_addr: SocketAddr,
    endpoint_url: String,
    ca_pem_path: PathBuf,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl MockKmsHandle {
    /// `https://127.0.0.1:<port>`: the SDK's endpoint URL.
    pub fn endpoint_url(&self) -> &str {
        &self.endpoint_url
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The test CA (PEM) clients must trust.
    pub fn ca_pem_path(&self) -> &std::path::Path {
        &self.ca_pem_path
    }

    /// The region.
    pub fn region(&self) -> &str {
        &self.shared.region
    }

    /// The account id.
    pub fn account(&self) -> String {
        self.shared.kms.account()
    }

    /// Counters of `operation`.
    pub fn calls(&self, operation: Operation) -> CallStats {
        self.shared.calls.get(operation)
    }

    /// Counters of every operation called so far.
    pub fn all_calls(&self) -> BTreeMap<Operation, CallStats> {
        self.shared.calls.all()
    }

    /// Zeroes the counters.
    pub fn reset_calls(&self) {
        self.shared.calls.reset();
    }

    /// Injects `fault`; false if too many are pending.
    pub fn inject(&self, fault: Fault) -> bool {
        self.shared.faults.inject(fault)
    }

    /// Removes every pending fault.
    pub fn clear_faults(&self) {
        self.shared.faults.clear();
    }

    /// Faults still pending.
    pub fn pending_faults(&self) -> usize {
        self.shared.faults.pending()
    }

    /// Moves the emulator's clock forward by `by` (documents and
    /// signatures then look that much older).
    pub fn advance_clock(&self, by: Duration) {
        self.shared.clock.advance(by);
    }

    /// Puts the clock back on the wall clock.
    pub fn reset_clock(&self) {
        self.shared.clock.reset();
    }

    /// The emulator's current time.
    pub fn now(&self) -> SystemTime {
        self.shared.clock.now()
    }

    /// Replaces every accepted credential (rotation).
    pub fn set_credentials(&self, credentials: impl IntoIterator<Item = Credential>) {
        self.shared.credentials.replace(credentials);
    }

    /// Adds (or replaces, by access key id) one credential.
    pub fn add_credential(&self, credential: Credential) {
        self.shared.credentials.insert(credential);
    }

    /// Removes the credential with `access_key_id`; true if it existed.
    pub fn remove_credential(&self, access_key_id: &str) -> bool {
        self.shared.credentials.remove(access_key_id)
    }

    /// With `true`, `Decrypt` no longer checks that the request's `KeyId`
    /// names the ciphertext's key and answers for the ciphertext's own key,
    /// as a forged or broken KMS would (see [`service::Kms::set_ignore_key_id`]).
    pub fn set_ignore_key_id(&self, ignore: bool) {
        self.shared.kms.set_ignore_key_id(ignore);
    }

    /// Creates a key directly (no SigV4), with `policy` or the default one.
    ///
    /// # Errors
    /// `MalformedPolicyDocumentException` for a bad policy.
    pub fn create_key(&self, policy: Option<&str>) -> Result<KeyMetadata, KmsError> {
        let request = CreateKeyRequest {
            policy: policy.map(str::to_owned),
            ..CreateKeyRequest::default()
        };
        Ok(self.shared.kms.create_key(&request)?.key_metadata)
    }

    /// The metadata of the key `key_id` (id, ARN or alias) names.
    ///
    /// # Errors
    /// `NotFoundException`.
    pub fn describe_key(&self, key_id: &str) -> Result<KeyMetadata, KmsError> {
        self.shared.kms.key_metadata(key_id)
    }

    /// Stops accepting, lets requests in flight finish (bounded), and waits.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MockKmsHandle {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}
