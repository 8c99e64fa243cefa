//! The proxy daemon (`keystore-host proxy`): the KMS forwarders
//! ([`forwarder`]), the credentials service ([`credentials`]), the
//! secrets loader ([`loader`]), the audit drain ([`audit_log`]) and the
//! enclave log relay ([`enclave_logs`]), run together on the parent
//! instance.
//!
//! Every listener is bound before anything is served, so a bad address or a
//! port in use fails start-up with a clear error instead of leaving a proxy
//! that is half up. A listener that fails for good stops the whole proxy
//! (a supervisor restarts it); a failing connection never does.

use std::future::Future;
use std::pin::Pin;

use keystore_shared::endpoint::{Endpoint, EndpointError};
use keystore_shared::serve::ServeError;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub mod audit_log;
pub mod credentials;
pub mod enclave_logs;
pub mod forwarder;
pub mod loader;
pub mod outage;
pub mod source;

use audit_log::AuditDrain;
use credentials::{CredentialCache, CredentialsService, ServiceLimits};
use enclave_logs::LogRelay;
use forwarder::{Forward, Forwarder, ForwarderLimits};
use loader::{Loader, LoaderConfig, ReloadTrigger};
use source::SecretsSource;

use crate::metrics::Metrics;

/// The metrics endpoint and the enclave `Status` relay, run by the proxy.
#[derive(Debug)]
pub struct MetricsService {
    /// The registry the parts count into.
    pub metrics: std::sync::Arc<Metrics>,
    /// Where `/metrics` is served (already bound).
    pub listener: keystore_shared::Listener,
    /// The enclave port whose `Status` is relayed (the load port).
    pub status_from: Endpoint,
    /// How often it is asked.
    pub status_poll: std::time::Duration,
}

/// The enclave's CID when `nitro-cli run-enclave --enclave-cid 16` is used,
/// as every default endpoint (`vsock://16:5000`) assumes.
pub const DEFAULT_ENCLAVE_CID: u32 = 16;

/// Everything the proxy runs.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The allowlisted routes, one forwarder each.
    pub forwards: Vec<Forward>,
    /// Limits shared by every forwarder.
    pub forwarder_limits: ForwarderLimits,
    /// Where the credentials service listens.
    pub credentials_listen: Endpoint,
    /// Limits of the credentials service.
    pub credentials_limits: ServiceLimits,
    /// The enclave's load port, where the loader sends the secrets file
    /// (the secret server refuses `Load`).
    pub load_to: Endpoint,
    /// Where the secrets file is read (a path or an S3 object); without
    /// one, no loader runs.
    pub secrets: Option<SecretsSource>,
    /// How often the loader checks the secrets file for changes.
    pub secrets_poll: std::time::Duration,
    /// The longest wait between two load attempts after failures.
    pub load_retry_max: std::time::Duration,
    /// How often the loader checks that the enclave still holds its secrets
    /// (a restarted enclave comes back empty).
    pub enclave_check: std::time::Duration,
    /// The only vsock CID the forwarders and the credentials service serve.
    pub enclave_cid: u32,
}

/// A listener failed for good.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// Binding failed.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// A listener failed for good (or its limits are unusable).
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Stops a running proxy; cloneable so signal handlers and tests can hold
/// one.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(watch::Sender<bool>);

impl ShutdownHandle {
    /// Asks every part of the proxy to stop.
    pub fn shutdown(&self) {
        self.0.send_replace(true);
    }
}

/// A proxy whose listeners are bound and which is ready to [`Proxy::run`].
pub struct Proxy {
    forwarders: Vec<(Forwarder, keystore_shared::Listener)>,
    credentials: (CredentialsService, keystore_shared::Listener),
    loader: Option<Loader>,
    audit: Option<AuditDrain>,
    logs: Option<LogRelay>,
    metrics: Option<MetricsService>,
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("forwarders", &self.forwarders.len())
            .field("loader", &self.loader.is_some())
            .field("audit", &self.audit.is_some())
            .field("logs", &self.logs.is_some())
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Binds every listener. `credentials` is the source of AWS credentials
    /// (the standard chain in production, static ones in tests).
    pub async fn bind(
        config: ProxyConfig,
        credentials: CredentialCache,
    ) -> Result<Self, ProxyError> {
        let mut forwarders = Vec::with_capacity(config.forwards.len());
        for forward in &config.forwards {
            let listener = forward.listen.bind().await?;
            forwarders.push((
                Forwarder::new(forward.upstream.clone(), config.forwarder_limits)
                    .for_enclave_cid(config.enclave_cid),
                listener,
            ));
        }
        let credentials_listener = config.credentials_listen.bind().await?;
        let loader = config.secrets.map(|source| {
            Loader::new(LoaderConfig {
                poll_interval: config.secrets_poll,
                backoff_max: config.load_retry_max,
                enclave_check: config.enclave_check,
                ..LoaderConfig::new(source, config.load_to.clone())
            })
        });
        Ok(Proxy {
            forwarders,
            credentials: (
                CredentialsService::new(credentials, config.credentials_limits)
                    .for_enclave_cid(config.enclave_cid),
                credentials_listener,
            ),
            loader,
            audit: None,
            logs: None,
            metrics: None,
            stop: watch::channel(false).0,
        })
    }

    /// Also drains the enclave's audit trail into a log file.
    pub fn with_audit_drain(mut self, mut drain: AuditDrain) -> Self {
        if let Some(service) = &self.metrics {
            drain.set_metrics(service.metrics.clone());
        }
        self.audit = Some(drain);
        self
    }

    /// Relays the enclave's log events into the daemon's log with `relay`.
    pub fn with_log_relay(mut self, mut relay: LogRelay) -> Self {
        if let Some(service) = &self.metrics {
            relay.set_metrics(service.metrics.clone());
        }
        self.logs = Some(relay);
        self
    }

    /// Also serves `/metrics`, relays the enclave's `Status` into it and
    /// has the forwarders and the loader count into it.
    pub fn with_metrics(mut self, service: MetricsService) -> Self {
        self.forwarders = self
            .forwarders
            .into_iter()
            .map(|(forwarder, listener)| {
                (forwarder.with_metrics(service.metrics.clone()), listener)
            })
            .collect();
        if let Some(loader) = &mut self.loader {
            loader.set_metrics(service.metrics.clone());
        }
        if let Some(drain) = &mut self.audit {
            drain.set_metrics(service.metrics.clone());
        }
        if let Some(relay) = &mut self.logs {
            relay.set_metrics(service.metrics.clone());
        }
        self.metrics = Some(service);
        self
    }

    /// The endpoints actually bound: forwarders in order, then the
    /// credentials service (for port 0 in tests).
    pub fn local_endpoints(&self) -> Vec<Endpoint> {
        self.forwarders
            .iter()
            .map(|(_, l)| l.local_endpoint().clone())
            .chain([self.credentials.1.local_endpoint().clone()])
            .collect()
    }

    /// A handle that stops [`Proxy::run`].
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.stop.clone())
    }

    /// The loader's reload trigger, if a secrets file is configured.
    pub fn reload_trigger(&self) -> Option<ReloadTrigger> {
        self.loader.as_ref().map(Loader::trigger)
    }

    /// Wires process signals: SIGTERM and SIGINT stop the proxy gracefully,
    /// SIGHUP reloads the secrets file. Must be called inside a Tokio
    /// runtime; once installed, these signals no longer kill the process.
    pub fn install_signal_handlers(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let stop = self.shutdown_handle();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            }
            stop.shutdown();
        });
        let trigger = self.reload_trigger();
        let mut stopped = self.stop.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    received = hup.recv() => {
                        if received.is_none() {
                            return;
                        }
                        match &trigger {
                            Some(trigger) => {
                                tracing::info!("SIGHUP: reloading the secrets file");
                                trigger.reload();
                            }
                            None => tracing::info!("SIGHUP ignored: no --secrets file"),
                        }
                    }
                    _ = stopped.wait_for(|stop| *stop) => return,
                }
            }
        });
        Ok(())
    }

    /// Serves until the shutdown handle fires (then drains) or a listener
    /// fails for good.
    pub async fn run(self) -> Result<(), ProxyError> {
        let stopped = |stop: &watch::Sender<bool>| -> Pin<Box<dyn Future<Output = ()> + Send>> {
            let mut rx = stop.subscribe();
            Box::pin(async move {
                let _ = rx.wait_for(|stop| *stop).await;
            })
        };
        let mut tasks: JoinSet<Result<(), ServeError>> = JoinSet::new();
        for (forwarder, listener) in self.forwarders {
            tasks.spawn(forwarder.serve(listener, stopped(&self.stop)));
        }
        let (service, listener) = self.credentials;
        tasks.spawn(service.serve(listener, stopped(&self.stop)));
        if let Some(loader) = self.loader {
            let done = stopped(&self.stop);
            tasks.spawn(async move {
                loader.run(done).await;
                Ok(())
            });
        }
        if let Some(drain) = self.audit {
            let done = stopped(&self.stop);
            tasks.spawn(async move {
                drain.run(done).await;
                Ok(())
            });
        }
        if let Some(relay) = self.logs {
            let done = stopped(&self.stop);
            tasks.spawn(async move {
                relay.run(done).await;
                Ok(())
            });
        }
        if let Some(service) = self.metrics {
            let metrics = service.metrics.clone();
            let done = stopped(&self.stop);
            tasks.spawn(async move {
                metrics
                    .poll_status(service.status_from, service.status_poll, done)
                    .await;
                Ok(())
            });
            tasks.spawn(service.metrics.serve(service.listener, stopped(&self.stop)));
        }
        let mut result = Ok(());
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::error!(error = %err, "listener failed; stopping the proxy");
                    self.stop.send_replace(true);
                    if result.is_ok() {
                        result = Err(err.into());
                    }
                }
                Err(join) => {
                    tracing::error!(error = %join, "proxy task ended abnormally; stopping");
                    self.stop.send_replace(true);
                }
            }
        }
        result
    }
}
