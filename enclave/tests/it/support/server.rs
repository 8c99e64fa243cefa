//! The enclave running in-process ([`Enclave::start`], as `main.rs` runs
//! it) on a tcp or unix endpoint, with a mock NSM whose PKI lives in a
//! temporary directory, a 2048-bit recipient key and a store the test fills.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use keystore_enclave::audit::AuditConfig;
use keystore_enclave::enclave::{Enclave, EnclaveConfig, EnclaveError};
use keystore_enclave::recipient::{RecipientBits, RecipientConfig};
use keystore_enclave::server::ServerConfig;
use keystore_enclave::service::KeystoreService;
use keystore_nsm::{AttestationRequest, MockConfig, MockNsm, Nsm, NsmError, PcrDescription};
use keystore_shared::attestation::{Root, Verifier};
use keystore_shared::{Client, ClientConfig, Endpoint};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

/// Which transport the server listens on.
#[derive(Debug, Clone, Copy)]
pub enum Transport {
    Tcp,
    Unix,
}

/// The secrets every filled test store holds.
pub fn fixtures() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("db/password", b"hunter2".to_vec()),
        ("api/token", b"tok-\x00\x01\xffbinary".to_vec()),
        // Exactly the 1 MiB value limit: the response frame must carry it.
        (
            "blob/max",
            (0..1024 * 1024).map(|i| (i % 251) as u8).collect(),
        ),
        ("empty", Vec::new()),
    ]
}

/// Delays every attestation, so a request can be caught in flight.
pub struct SlowNsm {
    pub inner: MockNsm,
    pub attest_delay: Duration,
}

impl Nsm for SlowNsm {
    fn attest(&self, req: &AttestationRequest) -> Result<Vec<u8>, NsmError> {
        if req.nonce.is_some() {
            std::thread::sleep(self.attest_delay);
        }
        self.inner.attest(req)
    }
    fn fill_random(&self, buf: &mut [u8]) -> Result<(), NsmError> {
        self.inner.fill_random(buf)
    }
    fn describe_pcr(&self, index: u16) -> Result<PcrDescription, NsmError> {
        self.inner.describe_pcr(index)
    }
}

pub struct Options {
    pub transport: Transport,
    pub config: ServerConfig,
    pub refresh_after: Duration,
    pub fill: bool,
    /// Delay added to caller-requested attestations.
    pub attest_delay: Option<Duration>,
    /// The audit trail's buffer and checkpoint interval.
    pub audit: AuditConfig,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            transport: Transport::Unix,
            config: ServerConfig::default(),
            refresh_after: Duration::from_secs(200),
            fill: true,
            attest_delay: None,
            audit: AuditConfig::default(),
        }
    }
}

pub struct Harness {
    pub endpoint: Endpoint,
    /// The load port (unix socket: root is privileged there).
    pub load_endpoint: Endpoint,
    pub service: Arc<KeystoreService>,
    pub pki: TempDir,
    /// The enclave, running until [`Harness::begin_shutdown`].
    pub task: JoinHandle<Result<(), EnclaveError>>,
    shutdown: Option<oneshot::Sender<()>>,
    _sockets: TempDir,
}

impl Harness {
    /// Starts the enclave the way `main.rs` does ([`Enclave::start`]),
    /// without KMS, then fills its store.
    pub async fn start(options: Options) -> Harness {
        let pki = tempfile::tempdir().unwrap();
        let sockets = tempfile::tempdir().unwrap();
        let mock = MockNsm::open(pki.path(), MockConfig::default()).unwrap();
        let nsm: Arc<dyn Nsm> = match options.attest_delay {
            Some(delay) => Arc::new(SlowNsm {
                inner: mock,
                attest_delay: delay,
            }),
            None => Arc::new(mock),
        };
        let endpoint = match options.transport {
            Transport::Tcp => Endpoint::tcp("127.0.0.1", 0),
            Transport::Unix => Endpoint::unix(sockets.path().join("enclave.sock")),
        };
        let mut config = EnclaveConfig::new(
            endpoint,
            Endpoint::unix(sockets.path().join("load.sock")),
            nsm,
        );
        config.recipient = RecipientConfig {
            bits: RecipientBits::B2048,
            refresh_after: options.refresh_after,
            ..RecipientConfig::default()
        };
        config.server = options.config;
        config.audit = options.audit;
        let enclave = Enclave::start(config).await.unwrap();
        let service = enclave.service().clone();
        if options.fill {
            let store = service.store();
            let mut builder = store.builder();
            for (name, value) in fixtures() {
                builder.insert(name, Zeroizing::new(value)).unwrap();
            }
            store.replace(builder.build());
        }
        let endpoint = enclave.secret_endpoint().clone();
        let load_endpoint = enclave.load_endpoint().unwrap().clone();
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(enclave.run_until(async move {
            let _ = stop.await;
        }));
        Harness {
            endpoint,
            load_endpoint,
            service,
            pki,
            task,
            shutdown: Some(shutdown),
            _sockets: sockets,
        }
    }

    /// A client with generous bounds (the machine is shared and slow).
    pub async fn client(&self) -> Client {
        Client::connect_with(&self.endpoint, patient())
            .await
            .unwrap()
    }

    /// A verifier trusting this harness's mock root.
    pub fn verifier(&self) -> Verifier {
        let pem = std::fs::read_to_string(self.pki.path().join("root.pem")).unwrap();
        Verifier::new(Root::from_pem(&pem).unwrap())
    }

    /// Starts the graceful shutdown without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Asserts the enclave is still serving, then shuts it down and
    /// returns its result.
    pub async fn stop(mut self) -> Result<(), EnclaveError> {
        assert!(
            !self.task.is_finished(),
            "the enclave stopped before it was asked to"
        );
        self.begin_shutdown();
        tokio::time::timeout(Duration::from_secs(60), &mut self.task)
            .await
            .expect("the enclave did not shut down within 60 s")
            .expect("enclave task panicked")
    }
}

pub fn patient() -> ClientConfig {
    ClientConfig {
        connect_timeout: Duration::from_secs(30),
        request_timeout: Duration::from_secs(60),
        // The enclave's ports serve privileged peers only.
        privileged: true,
        ..ClientConfig::default()
    }
}
