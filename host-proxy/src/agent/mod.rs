//! The agent: how applications on the parent instance read secrets
//! (DESIGN §3). It runs inside the host daemon (`keystore-host proxy`) or
//! alone (`keystore-host agent`), and is privileged: it connects to the
//! enclave's secret port from a port below 1024 and asserts, with each
//! `Get`/`List`, who the caller is. The enclave checks that caller against
//! the operator's rules.
//!
//! Two fronts, both served by `shared::serve`:
//! - a unix socket ([`unix`], default [`DEFAULT_SOCKET`], mode 0666) speaking
//!   the enclave's framed protocol; the caller is who `SO_PEERCRED` says
//!   ([`identity`]);
//! - HTTP on `127.0.0.1:2773` ([`http`]), compatible with the AWS Secrets
//!   Manager Agent; the caller is the identity of the presented token
//!   ([`token`]).
//!
//! Both forward through one bounded [`pool::Pool`] of privileged
//! connections. No plaintext is cached on the host: every read goes to the
//! enclave, values stay in `SecretBytes` and each answer is dropped once
//! written.

pub mod http;
pub mod identity;
pub mod pool;
pub mod query;
pub mod token;
pub mod unix;

use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use keystore_shared::endpoint::{Endpoint, EndpointError, Listener};
use keystore_shared::serve::{ServeConfig, ServeError, serve};

use pool::{Pool, PoolConfig};
use token::Tokens;

/// The default unix socket.
pub const DEFAULT_SOCKET: &str = "/run/nitro-keystore/agent.sock";
/// The default unix endpoint, as clients name it.
pub const DEFAULT_SOCKET_ENDPOINT: &str = "unix:///run/nitro-keystore/agent.sock";
/// The enclave's secret port the agent forwards to by default.
pub const DEFAULT_ENCLAVE: &str = "vsock://16:5000";
/// Connections each front serves at once.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// A connection with no byte moving for this long is closed.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// No connection lives longer than this.
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(3600);

/// What the agent serves and where it forwards.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The unix socket, if served.
    pub socket: Option<PathBuf>,
    /// The HTTP listener (`tcp://127.0.0.1:2773`), if served; a tcp address
    /// must be a loopback one.
    pub http: Option<Endpoint>,
    /// The token directory for HTTP; without one, every HTTP read is
    /// refused.
    pub tokens: Option<PathBuf>,
    /// How often the token directory is re-read (it is also re-read on
    /// SIGHUP).
    pub token_reload: Duration,
    /// The pool of privileged connections to the enclave.
    pub pool: PoolConfig,
    /// Connections each front serves at once.
    pub max_connections: usize,
    /// Idle bound of a client connection.
    pub idle_timeout: Duration,
}

impl AgentConfig {
    /// Defaults: both fronts, tokens from [`token::DEFAULT_TOKEN_DIR`],
    /// forwarding to `enclave`.
    pub fn new(enclave: Endpoint) -> Self {
        AgentConfig {
            socket: Some(PathBuf::from(DEFAULT_SOCKET)),
            http: Some(Endpoint::tcp("127.0.0.1", 2773)),
            tokens: Some(PathBuf::from(token::DEFAULT_TOKEN_DIR)),
            token_reload: token::DEFAULT_RELOAD_INTERVAL,
            pool: PoolConfig::new(enclave),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Why the agent could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Binding a listener failed.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// A listener failed for good.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// Preparing the socket's directory or mode failed.
    #[error("{path}: {source}")]
    Socket {
        /// The path.
        path: PathBuf,
        /// The I/O error (in the message, not chained, so it is said once).
        source: std::io::Error,
    },
    /// The configuration cannot be served safely.
    #[error("{0}")]
    Config(String),
}

/// An agent whose listeners are bound.
#[derive(Debug)]
pub struct Agent {
    unix: Option<Listener>,
    http: Option<Listener>,
    pool: Arc<Pool>,
    tokens: Arc<Tokens>,
    config: AgentConfig,
}

impl Agent {
    /// Binds the configured listeners: the socket's directory is created
    /// (0755) if missing and the socket made 0666, so every local user can
    /// connect (what each may read is decided by the enclave's rules).
    pub async fn bind(config: AgentConfig) -> Result<Agent, AgentError> {
        if let Some(Endpoint::Tcp { host, .. }) = &config.http {
            let loopback = host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                return Err(AgentError::Config(format!(
                    "the agent's HTTP front listens on loopback addresses only, not {host}"
                )));
            }
        }
        let unix = match &config.socket {
            Some(path) => Some(bind_socket(path).await?),
            None => None,
        };
        let http = match &config.http {
            Some(endpoint) => Some(endpoint.bind().await?),
            None => None,
        };
        let tokens = Arc::new(Tokens::new(config.tokens.clone()));
        if config.http.is_some() && tokens.is_empty() {
            tracing::warn!(dir = ?config.tokens, "no HTTP tokens loaded: every HTTP read will be refused until one is added");
        }
        Ok(Agent {
            unix,
            http,
            pool: Arc::new(Pool::new(config.pool.clone())),
            tokens,
            config,
        })
    }

    /// The unix socket endpoint, if bound.
    pub fn socket_endpoint(&self) -> Option<&Endpoint> {
        self.unix.as_ref().map(Listener::local_endpoint)
    }

    /// The HTTP endpoint, if bound (the real port when 0 was asked).
    pub fn http_endpoint(&self) -> Option<&Endpoint> {
        self.http.as_ref().map(Listener::local_endpoint)
    }

    /// Serves until `shutdown` completes (then drains), or a listener fails
    /// for good.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), AgentError> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let wait = move || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            }
        };
        let reloader = self.tokens.spawn_reloader(self.config.token_reload);
        let serve_config = |name| ServeConfig {
            max_connections: self.config.max_connections.max(1),
            idle_timeout: self.config.idle_timeout,
            max_lifetime: Some(DEFAULT_MAX_LIFETIME),
            // Every local user may connect: sockets that ask nothing give
            // way to a newcomer, the busiest user's first (issue 15).
            evict_idle: true,
            ..ServeConfig::named(name)
        };
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(listener) = self.unix {
            tracing::info!(endpoint = %listener.local_endpoint(), enclave = %self.pool.enclave(), "agent socket");
            let handler = Arc::new(unix::UnixHandler::new(
                self.pool.clone(),
                self.config.idle_timeout,
            ));
            tasks.spawn(serve(
                listener,
                handler,
                Arc::new(unix::IdentifiedUnixPeers),
                serve_config("agent socket"),
                wait(),
            ));
        }
        if let Some(listener) = self.http {
            tracing::info!(endpoint = %listener.local_endpoint(), tokens = self.tokens.len(), "agent HTTP");
            let handler = Arc::new(http::HttpHandler::new(
                self.pool.clone(),
                self.tokens.clone(),
            ));
            tasks.spawn(serve(
                listener,
                handler,
                Arc::new(http::LocalPeers),
                serve_config("agent HTTP"),
                wait(),
            ));
        }
        let outcome = tokio::select! {
            () = shutdown => Ok(()),
            Some(joined) = tasks.join_next() => match joined {
                Ok(Ok(())) => Ok(()),
                Ok(Err(err)) => Err(AgentError::Serve(err)),
                Err(err) => Err(AgentError::Config(format!("an agent front stopped: {err}"))),
            },
        };
        stop.send_replace(true);
        while tasks.join_next().await.is_some() {}
        reloader.abort();
        outcome
    }
}

/// Binds the unix socket: parent directory created 0755 if missing, socket
/// file 0666.
async fn bind_socket(path: &std::path::Path) -> Result<Listener, AgentError> {
    let io = |source| AgentError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|source| AgentError::Socket {
                path: dir.to_owned(),
                source,
            })?;
    }
    let listener = Endpoint::unix(path).bind().await?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(io)?;
    Ok(listener)
}
