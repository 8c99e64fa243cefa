//! The whole enclave, assembled: what `main.rs` runs and every test harness
//! starts.
//!
//! [`Enclave::start`] binds the secret port (and, when KMS is configured,
//! the load port) first, so a taken or invalid address fails in
//! milliseconds instead of after seconds of key generation; then it makes
//! and attests the recipient key, creates the sealed store, and serves both
//! ports and the periodic re-decrypt in the background. [`Enclave::shutdown`]
//! stops all of them the same way and wipes the store.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use keystore_shared::endpoint::{Endpoint, EndpointError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::audit::{AuditConfig, AuditError, AuditTrail};
use crate::kms::{Kms, KmsConfig, KmsError};
use crate::load::{LoadConfig, LoadError, Loader};
use crate::recipient::{Recipient, RecipientConfig, RecipientError, RecipientHandle};
use crate::server::{SecretPeers, Server, ServerConfig, ServerError};
use crate::service::KeystoreService;
use crate::store::{SealKey, Store, StoreConfig, StoreError};
use keystore_nsm::{Nsm, NsmError};

/// Everything the enclave needs to start.
#[derive(Clone)]
pub struct EnclaveConfig {
    /// Where host apps reach the secret server.
    pub listen: Endpoint,
    /// Where the host's daemon sends `Load` and drains the audit trail.
    pub load_listen: Endpoint,
    /// The NSM: `/dev/nsm` in production, the mock in tests.
    pub nsm: Arc<dyn Nsm>,
    /// How to reach KMS; without it the enclave serves but cannot load.
    pub kms: Option<KmsConfig>,
    /// Recipient key size and refresh.
    pub recipient: RecipientConfig,
    /// Limits of the secret port.
    pub server: ServerConfig,
    /// Concurrency, retries and bounds of a load.
    pub load: LoadConfig,
    /// Re-decrypt the last load this often (zero: never).
    pub reload_every: Duration,
    /// The audit trail's buffer and checkpoint interval.
    pub audit: AuditConfig,
    /// The ring of recent log events the daemon relays (`LogRead`); the
    /// caller installs its `tracing` layer. `None`: `LogRead` is refused.
    pub log_ring: Option<Arc<crate::log_ring::LogRing>>,
}

impl std::fmt::Debug for EnclaveConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnclaveConfig")
            .field("listen", &self.listen)
            .field("load_listen", &self.load_listen)
            .field("kms", &self.kms.as_ref().map(|k| &k.region))
            .field("recipient", &self.recipient)
            .field("server", &self.server)
            .field("load", &self.load)
            .field("reload_every", &self.reload_every)
            .field("audit", &self.audit)
            .finish_non_exhaustive()
    }
}

impl EnclaveConfig {
    /// Defaults for everything but the endpoints and the NSM: no KMS, the
    /// default recipient, server and load settings, hourly re-decrypt.
    pub fn new(listen: Endpoint, load_listen: Endpoint, nsm: Arc<dyn Nsm>) -> Self {
        EnclaveConfig {
            listen,
            load_listen,
            nsm,
            kms: None,
            recipient: RecipientConfig::default(),
            server: ServerConfig::default(),
            load: LoadConfig::default(),
            reload_every: Duration::from_secs(3600),
            audit: AuditConfig::default(),
            log_ring: None,
        }
    }
}

/// Why the enclave could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum EnclaveError {
    /// A listen endpoint could not be bound.
    #[error(transparent)]
    Bind(EndpointError),
    /// A server setting is unusable, or a listener failed for good.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The recipient settings are unusable or the key could not be made.
    #[error("cannot create the recipient key: {0}")]
    Recipient(#[from] RecipientError),
    /// The seal key could not be made.
    #[error("cannot create the seal key: {0}")]
    Seal(#[source] StoreError),
    /// The NSM failed.
    #[error(transparent)]
    Nsm(#[from] NsmError),
    /// The KMS settings are unusable.
    #[error("invalid KMS settings: {0}")]
    Kms(#[from] KmsError),
    /// The load settings are unusable.
    #[error("invalid load settings: {0}")]
    Load(#[from] LoadError),
    /// The audit trail could not start (settings, or its first checkpoint).
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// A background task ended abnormally (a bug).
    #[error("enclave task failed: {0}")]
    Task(String),
}

/// A running enclave.
pub struct Enclave {
    secret_endpoint: Endpoint,
    load_endpoint: Option<Endpoint>,
    service: Arc<KeystoreService>,
    loader: Option<Arc<Loader>>,
    stop: watch::Sender<bool>,
    served: Option<JoinHandle<Result<(), ServerError>>>,
    load_served: Option<JoinHandle<Result<(), ServerError>>>,
    reloads: Option<JoinHandle<()>>,
    checkpoints: Option<JoinHandle<()>>,
    refresher: RecipientHandle,
}

impl std::fmt::Debug for Enclave {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enclave")
            .field("secret_endpoint", &self.secret_endpoint)
            .field("load_endpoint", &self.load_endpoint)
            .finish_non_exhaustive()
    }
}

impl Enclave {
    /// Binds, makes the keys and starts serving; see the module docs.
    pub async fn start(config: EnclaveConfig) -> Result<Enclave, EnclaveError> {
        config.recipient.validate()?;
        config.server.validate()?;
        config.audit.validate()?;
        if config.server.secret_peers == SecretPeers::Any {
            tracing::warn!(
                endpoint = %config.listen,
                "--secret-peers any: the secret port serves every peer; unprivileged peers read \
                 as the identity the kernel reports and may not name a caller (the load port \
                 still serves privileged peers only)"
            );
        }
        let listener = config.listen.bind().await.map_err(EnclaveError::Bind)?;
        let kms = config.kms.map(Kms::new).transpose()?;
        // The audit trail is drained on the load port, so it is bound even
        // without KMS; then (local runs only: production images always
        // have a region) failing to bind it is not fatal.
        let load_listener = match (config.load_listen.bind().await, &kms) {
            (Ok(listener), _) => Some(listener),
            (Err(err), Some(_)) => return Err(EnclaveError::Bind(err)),
            (Err(err), None) => {
                tracing::warn!(
                    error = %err,
                    "no load port: the audit trail cannot be drained (its buffer fills, then a gap is recorded)"
                );
                None
            }
        };
        if kms.is_none() {
            tracing::warn!("no KMS region: this enclave cannot load secrets");
        }
        // The run's first records: `Start`, then a checkpoint over it.
        let audit = Arc::new(AuditTrail::new(config.nsm.clone(), config.audit.clone())?);
        audit.checkpoint().await?;

        tracing::info!(
            bits = config.recipient.bits.bits(),
            "generating the recipient key"
        );
        let (recipient, refresher) = Recipient::start(config.nsm.clone(), config.recipient).await?;
        let seal_key = SealKey::generate(config.nsm.as_ref()).map_err(EnclaveError::Seal)?;
        let store = Arc::new(Store::new(seal_key, StoreConfig::default()));
        let mut service = KeystoreService::new(store, recipient.clone(), config.nsm, audit.clone());
        let loader = match kms {
            Some(kms) => {
                let loader = Arc::new(Loader::new(
                    kms,
                    recipient,
                    service.store().clone(),
                    config.load.clone(),
                )?);
                service = service.with_loader(loader.clone());
                Some(loader)
            }
            None => None,
        };
        if let Some(ring) = config.log_ring {
            service = service.with_log_ring(ring);
        }
        let service = Arc::new(service);

        let (stop, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let secret_peers = config.server.secret_peers;
        let server = Server::from_listener(listener, service.clone(), config.server)?;
        let secret_endpoint = server.local_endpoint().clone();
        let served = tokio::spawn(server.run(stopped(stop_rx.clone())));
        let (load_endpoint, load_served) = match load_listener {
            Some(listener) => {
                let server = Server::from_listener(
                    listener,
                    service.clone(),
                    ServerConfig {
                        // For `Status` only: the load port's own policy is
                        // always privileged peers.
                        secret_peers,
                        ..ServerConfig::for_loading(config.load.max_duration)
                    },
                )?;
                let endpoint = server.local_endpoint().clone();
                tracing::info!(endpoint = %endpoint, "load port ready");
                (
                    Some(endpoint),
                    Some(tokio::spawn(server.run(stopped(stop_rx.clone())))),
                )
            }
            None => (None, None),
        };
        let checkpoints = Some(tokio::spawn(
            audit.checkpoint_periodically(stopped(stop_rx.clone())),
        ));
        // Runs for staleness too when re-decrypting is off.
        let maintained = !config.reload_every.is_zero() || !config.load.max_stale.is_zero();
        let reloads = match &loader {
            Some(loader) if maintained => {
                let loader = loader.clone();
                let stop = stopped(stop_rx.clone());
                let every = config.reload_every;
                Some(tokio::spawn(async move {
                    loader.reload_periodically(every, stop).await;
                }))
            }
            _ => None,
        };
        tracing::info!(endpoint = %secret_endpoint, version = crate::service::VERSION, "ready");
        Ok(Enclave {
            secret_endpoint,
            load_endpoint,
            service,
            loader,
            stop,
            served: Some(served),
            load_served,
            reloads,
            checkpoints,
            refresher,
        })
    }

    /// Where host apps reach the secret server (with the port the OS chose
    /// for `tcp://…:0`).
    pub fn secret_endpoint(&self) -> &Endpoint {
        &self.secret_endpoint
    }

    /// Where the host daemon reaches the load port (`Load`, the audit
    /// trail); `None` only without KMS when it could not be bound.
    pub fn load_endpoint(&self) -> Option<&Endpoint> {
        self.load_endpoint.as_ref()
    }

    /// The service both ports answer from (for tests and status).
    pub fn service(&self) -> &Arc<KeystoreService> {
        &self.service
    }

    /// The loader, when KMS is configured.
    pub fn loader(&self) -> Option<&Arc<Loader>> {
        self.loader.as_ref()
    }

    /// Serves until `stop` completes (a signal), or until the secret port
    /// fails for good; then shuts down as [`Enclave::shutdown`] does.
    pub async fn run_until(mut self, stop: impl Future) -> Result<(), EnclaveError> {
        let Some(served) = self.served.as_mut() else {
            return self.shutdown().await;
        };
        let early = tokio::select! {
            _ = stop => None,
            joined = served => Some(joined),
        };
        match early {
            None => self.shutdown().await,
            Some(joined) => {
                self.served = None;
                let failed = flatten(joined).and(Err(EnclaveError::Task(
                    "the secret port stopped".to_owned(),
                )));
                if let Err(err) = &failed {
                    tracing::error!(error = %err, "the secret server stopped by itself; shutting down");
                }
                self.shutdown().await?;
                failed
            }
        }
    }

    /// Stops both ports (in-flight requests get their grace), the
    /// re-decrypt and the key refresh, and wipes the secrets.
    pub async fn shutdown(self) -> Result<(), EnclaveError> {
        let _ = self.stop.send(true);
        let served = match self.served {
            Some(task) => join(task).await,
            None => Ok(()),
        };
        if let Some(task) = self.load_served
            && let Err(err) = join(task).await
        {
            tracing::warn!(error = %err, "load port stopped with an error");
        }
        if let Some(task) = self.reloads {
            let _ = task.await;
        }
        if let Some(task) = self.checkpoints {
            let _ = task.await;
        }
        // Wipe before anything else can fail.
        self.service.store().clear();
        tracing::info!("secret store wiped");
        if let Err(err) = self.refresher.shutdown().await {
            tracing::warn!(error = %err, "recipient refresher did not stop cleanly");
        }
        served
    }
}

async fn join(task: JoinHandle<Result<(), ServerError>>) -> Result<(), EnclaveError> {
    flatten(task.await)
}

fn flatten(
    joined: Result<Result<(), ServerError>, tokio::task::JoinError>,
) -> Result<(), EnclaveError> {
    match joined {
        Ok(result) => Ok(result?),
        Err(err) => Err(EnclaveError::Task(err.to_string())),
    }
}
