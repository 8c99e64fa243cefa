//! A small bounded pool of privileged connections to the enclave's secret
//! port, shared by every agent front.
//!
//! Each connection is made from a port below 1024
//! ([`ClientConfig::privileged`]), which the enclave's peer policy requires
//! before it believes the caller a request names. At most
//! [`PoolConfig::size`] requests are in flight to the enclave at once; a
//! request beyond that waits up to [`PoolConfig::wait`] for a turn and is
//! then answered `Unavailable`. A connection that failed in any way other
//! than a clean error answer is dropped and the next request reconnects; a
//! pooled connection found closed (the enclave restarted) is replaced at
//! once and the read asked again on the new one.
//! Nothing is cached: every read goes to the enclave.

use std::sync::Mutex;
use std::time::Duration;

use keystore_shared::FrameError;
use keystore_shared::protocol::{ErrorCode, RequestOp, ResponseBody};
use keystore_shared::{Caller, Client, ClientConfig, ClientError, Endpoint};
use tokio::sync::Semaphore;

/// Default number of connections (and requests in flight) to the enclave.
pub const DEFAULT_POOL_SIZE: usize = 8;
/// Default wait for a free connection.
pub const DEFAULT_POOL_WAIT: Duration = Duration::from_secs(5);

/// How the pool connects and how much it holds.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The enclave's secret port.
    pub enclave: Endpoint,
    /// Connections kept and requests in flight at once.
    pub size: usize,
    /// How long a request waits for a free connection.
    pub wait: Duration,
    /// Connection settings; `privileged` is forced on.
    pub client: ClientConfig,
    /// Where each request is counted, if metrics are on.
    pub metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

impl PoolConfig {
    /// Defaults for `enclave`.
    pub fn new(enclave: Endpoint) -> Self {
        PoolConfig {
            enclave,
            size: DEFAULT_POOL_SIZE,
            wait: DEFAULT_POOL_WAIT,
            client: ClientConfig {
                privileged: true,
                ..ClientConfig::default()
            },
            metrics: None,
        }
    }
}

/// Why the pool could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Every connection stayed busy for the whole wait.
    #[error("the agent is busy: all {size} connections to the enclave stayed in use for {} ms", .wait.as_millis())]
    Busy {
        /// The pool size.
        size: usize,
        /// The wait that elapsed.
        wait: Duration,
    },
    /// The enclave answered with an error, or could not be reached.
    #[error(transparent)]
    Client(#[from] ClientError),
}

impl PoolError {
    /// The protocol error code to pass on to the agent's caller.
    pub fn code(&self) -> ErrorCode {
        match self {
            PoolError::Busy { .. } => ErrorCode::Unavailable,
            PoolError::Client(err) => err.code().unwrap_or(ErrorCode::Unavailable),
        }
    }

    /// A message for the agent's caller (no secret material: the enclave's
    /// messages never carry any, and connection errors name endpoints).
    pub fn message(&self) -> String {
        match self {
            PoolError::Client(ClientError::Server { message, .. }) => message.clone(),
            other => other.to_string(),
        }
    }
}

/// The pool; share it in an `Arc`.
#[derive(Debug)]
pub struct Pool {
    config: PoolConfig,
    turns: Semaphore,
    idle: Mutex<Vec<Client>>,
}

impl Pool {
    /// A pool that connects lazily.
    pub fn new(mut config: PoolConfig) -> Self {
        config.size = config.size.max(1);
        config.client.privileged = true;
        Pool {
            turns: Semaphore::new(config.size),
            idle: Mutex::new(Vec::with_capacity(config.size)),
            config,
        }
    }

    /// The enclave endpoint.
    pub fn enclave(&self) -> &Endpoint {
        &self.config.enclave
    }

    /// Sends `op` on behalf of `caller` and returns the enclave's success
    /// answer (already checked to be the kind `op` expects).
    pub async fn call(
        &self,
        op: RequestOp,
        caller: Option<Caller>,
    ) -> Result<ResponseBody, PoolError> {
        let Some(metrics) = &self.config.metrics else {
            return self.forward(op, caller).await;
        };
        let start = std::time::Instant::now();
        let name = op.kind();
        let uid = caller.as_ref().and_then(|caller| caller.uid);
        let answer = self.forward(op, caller).await;
        let error = answer.as_ref().err().map(PoolError::code);
        metrics.agent_request(name, error, uid, start.elapsed());
        answer
    }

    async fn forward(
        &self,
        op: RequestOp,
        caller: Option<Caller>,
    ) -> Result<ResponseBody, PoolError> {
        let busy = || PoolError::Busy {
            size: self.config.size,
            wait: self.config.wait,
        };
        let _turn = tokio::time::timeout(self.config.wait, self.turns.acquire())
            .await
            .map_err(|_| busy())?
            .map_err(|_| busy())?;
        if let Some(mut client) = self.take_idle() {
            let answer = client.call_as(op.clone(), caller.clone()).await;
            // An idle connection the enclave has since closed (restart,
            // idle timeout) fails before any answer; every forwarded
            // operation is a read, so it is asked again on a new one.
            if !went_stale(&answer) {
                if keeps_connection(&answer) {
                    self.put_idle(client);
                }
                return Ok(answer?);
            }
            tracing::debug!(enclave = %self.config.enclave, "pooled connection was closed; reconnecting");
        }
        let mut client =
            Client::connect_with(&self.config.enclave, self.config.client.clone()).await?;
        let answer = client.call_as(op, caller).await;
        if keeps_connection(&answer) {
            self.put_idle(client);
        }
        Ok(answer?)
    }

    fn take_idle(&self) -> Option<Client> {
        self.idle.lock().ok().and_then(|mut idle| idle.pop())
    }

    fn put_idle(&self, client: Client) {
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < self.config.size
        {
            idle.push(client);
        }
    }
}

/// Whether a reused connection turned out closed before answering.
fn went_stale(answer: &Result<ResponseBody, ClientError>) -> bool {
    matches!(
        answer,
        Err(ClientError::Closed { .. }
            | ClientError::Frame {
                source: FrameError::Io(_) | FrameError::Truncated { .. },
                ..
            })
    )
}

/// Whether a connection is still good after this answer: yes after a
/// success or an error about the request itself; no after anything that
/// may have left it half-read, or a refusal the server closes after.
fn keeps_connection(answer: &Result<ResponseBody, ClientError>) -> bool {
    match answer {
        Ok(_) => true,
        Err(ClientError::Server { code, .. }) => matches!(
            code,
            ErrorCode::NotFound | ErrorCode::Denied | ErrorCode::NotReady
        ),
        Err(_) => false,
    }
}
