//! The credentials service: AWS credentials for the enclave's KMS calls.
//!
//! The enclave cannot reach the instance metadata service, and must not read
//! the parent's `~/.aws`, so it asks this service over vsock with a
//! `GetCredentials` frame. Credentials come from the standard AWS chain on
//! the parent (environment, profile, IMDSv2 on EC2), wrapped in
//! [`CredentialCache`] so every answer is current: credentials within
//! [`DEFAULT_REFRESH_BEFORE`] of their expiry are refreshed first, and
//! concurrent requests share one refresh.
//!
//! Only `GetCredentials` is served; anything else is `BadRequest`. Failures of
//! the chain are answered with `Unavailable` and a reason that never contains
//! credential material.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use keystore_shared::endpoint::{Listener, Stream};
use keystore_shared::frame::{Connection, FrameError, FrameLimits};
use keystore_shared::protocol::{
    Credentials, ErrorCode, Request, RequestOp, Response, ResponseBody, SecretString,
};
use keystore_shared::serve::{
    Accepted, Handler, Refusal, ServeConfig, ServeError, VsockCidPeers, serve,
};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::Mutex;

/// Default listen endpoint of the credentials service: a port below 1024,
/// so no unprivileged process on the parent can bind it first and hand the
/// enclave credentials of its choosing (the enclave's `--credentials`
/// default matches; the old port 8001 still works when both sides are
/// given it).
pub const DEFAULT_LISTEN: &str = "vsock://ANY:801";

/// Credentials this close to expiry are refreshed before being handed out,
/// so the enclave never receives a key that dies mid-load.
pub const DEFAULT_REFRESH_BEFORE: Duration = Duration::from_secs(5 * 60);

/// Requests are tiny; anything bigger is not a `GetCredentials`.
const MAX_REQUEST_FRAME: usize = 4 * 1024;

/// Room for the largest credentials answer (session tokens run to a few KiB).
const MAX_RESPONSE_FRAME: usize = 64 * 1024;

/// No connection lives longer, however busy.
const MAX_CONNECTION_LIFETIME: Duration = Duration::from_secs(3600);

/// Why no credentials could be handed out. Messages never contain
/// credential material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsUnavailable {
    /// The chain found no source of credentials.
    #[error("no AWS credentials found (environment, profile or EC2 instance metadata)")]
    NotFound,
    /// The chain's configuration is invalid.
    #[error("the AWS credential configuration is invalid")]
    InvalidConfiguration,
    /// A provider in the chain failed (e.g. IMDS unreachable).
    #[error("the AWS credential provider failed")]
    ProviderFailed,
    /// A provider in the chain gave up after its own timeout.
    #[error("the AWS credential provider timed out")]
    ProviderTimedOut,
    /// The chain did not answer within our fetch timeout.
    #[error("the AWS credential provider did not answer within {0:?}")]
    Timeout(Duration),
    /// Anything else the SDK reports.
    #[error("unexpected error from the AWS credential provider")]
    Unexpected,
}

impl From<&CredentialsError> for CredentialsUnavailable {
    fn from(err: &CredentialsError) -> Self {
        match err {
            CredentialsError::CredentialsNotLoaded(_) => Self::NotFound,
            CredentialsError::InvalidConfiguration(_) => Self::InvalidConfiguration,
            CredentialsError::ProviderError(_) => Self::ProviderFailed,
            CredentialsError::ProviderTimedOut(_) => Self::ProviderTimedOut,
            _ => Self::Unexpected,
        }
    }
}

/// A credentials provider with a refresh-ahead cache.
///
/// The SDK's identity cache lives inside SDK clients, not providers, so a
/// bare chain would query IMDS on every request; this cache keeps the
/// current credentials and refreshes them once they come within
/// `refresh_before` of expiry. If a refresh fails while the cached
/// credentials are still valid, those are served and the failure is logged.
pub struct CredentialCache {
    provider: SharedCredentialsProvider,
    current: Mutex<Option<aws_credential_types::Credentials>>,
    refresh_before: Duration,
    fetch_timeout: Duration,
}

impl fmt::Debug for CredentialCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialCache")
            .field("refresh_before", &self.refresh_before)
            .field("fetch_timeout", &self.fetch_timeout)
            .finish_non_exhaustive()
    }
}

impl CredentialCache {
    /// Wraps `provider` with [`DEFAULT_REFRESH_BEFORE`] and a 30 s bound on
    /// each fetch.
    pub fn new(provider: impl ProvideCredentials + 'static) -> Self {
        CredentialCache {
            provider: SharedCredentialsProvider::new(provider),
            current: Mutex::new(None),
            refresh_before: DEFAULT_REFRESH_BEFORE,
            fetch_timeout: Duration::from_secs(30),
        }
    }

    /// Sets how long before expiry credentials are refreshed.
    pub fn refresh_before(mut self, margin: Duration) -> Self {
        self.refresh_before = margin;
        self
    }

    /// Sets the bound on one fetch from the provider.
    pub fn fetch_timeout(mut self, timeout: Duration) -> Self {
        self.fetch_timeout = timeout;
        self
    }

    /// Current credentials, refreshed first if they are close to expiry.
    pub async fn get(&self) -> Result<aws_credential_types::Credentials, CredentialsUnavailable> {
        let mut current = self.current.lock().await;
        let now = SystemTime::now();
        if let Some(creds) = current.as_ref()
            && is_fresh(creds, now, self.refresh_before)
        {
            return Ok(creds.clone());
        }
        let fetched =
            tokio::time::timeout(self.fetch_timeout, self.provider.provide_credentials()).await;
        let err = match fetched {
            Ok(Ok(creds)) => {
                tracing::debug!(expires = ?creds.expiry().map(rfc3339), "fetched AWS credentials");
                *current = Some(creds.clone());
                return Ok(creds);
            }
            Ok(Err(err)) => {
                tracing::warn!(
                    error = %aws_smithy_types::error::display::DisplayErrorContext(&err),
                    "fetching AWS credentials failed"
                );
                CredentialsUnavailable::from(&err)
            }
            Err(_) => {
                tracing::warn!(timeout = ?self.fetch_timeout, "fetching AWS credentials timed out");
                CredentialsUnavailable::Timeout(self.fetch_timeout)
            }
        };
        match current.as_ref() {
            Some(creds) if is_fresh(creds, now, Duration::ZERO) => {
                tracing::warn!("serving cached AWS credentials until they expire");
                Ok(creds.clone())
            }
            _ => Err(err),
        }
    }
}

fn is_fresh(creds: &aws_credential_types::Credentials, now: SystemTime, margin: Duration) -> bool {
    creds
        .expiry()
        .is_none_or(|expiry| expiry.duration_since(now).is_ok_and(|left| left > margin))
}

/// RFC 3339 text (`2024-05-01T12:00:00Z`) of `time`, for the log.
fn rfc3339(time: SystemTime) -> String {
    OffsetDateTime::from(time)
        .format(&Rfc3339)
        .unwrap_or_else(|_| "invalid time".to_owned())
}

/// Converts SDK credentials to the wire form (expiry in Unix seconds).
pub fn to_wire(creds: &aws_credential_types::Credentials) -> Credentials {
    Credentials {
        access_key_id: SecretString::new(creds.access_key_id().to_owned()),
        secret_access_key: SecretString::new(creds.secret_access_key().to_owned()),
        session_token: creds
            .session_token()
            .map(|t| SecretString::new(t.to_owned())),
        // An expiry before 1970 is nonsense; 0 makes the enclave refuse it
        // as expired rather than treat it as long-term.
        expires_at: creds
            .expiry()
            .map(|t| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())),
    }
}

/// Limits of the [`CredentialsService`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceLimits {
    /// Connections served at once; more wait up to 30 s for a slot.
    pub max_connections: usize,
    /// A connection with no request for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for ServiceLimits {
    fn default() -> Self {
        ServiceLimits {
            max_connections: 64,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Answers `GetCredentials` frames on a listener.
#[derive(Debug, Clone)]
pub struct CredentialsService {
    cache: Arc<CredentialCache>,
    limits: ServiceLimits,
    peers: VsockCidPeers,
}

impl CredentialsService {
    /// A service handing out credentials from `cache`.
    pub fn new(cache: CredentialCache, limits: ServiceLimits) -> Self {
        CredentialsService {
            cache: Arc::new(cache),
            limits,
            peers: VsockCidPeers {
                cid: super::DEFAULT_ENCLAVE_CID,
            },
        }
    }

    /// Serves only vsock peers with this CID (the enclave's); the default
    /// is [`super::DEFAULT_ENCLAVE_CID`]. The instance's credentials are
    /// for the enclave alone.
    pub fn for_enclave_cid(mut self, cid: u32) -> Self {
        self.peers = VsockCidPeers { cid };
        self
    }

    /// Serves `listener` with [`keystore_shared::serve`] until `shutdown`
    /// completes; connections then stop between requests. Returns an error
    /// only if the listener fails for good.
    pub async fn serve(
        self,
        listener: Listener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let config = ServeConfig {
            max_connections: self.limits.max_connections,
            // The enclave's KMS client would only retry: let it wait.
            admission_wait: Duration::from_secs(30),
            idle_timeout: self.limits.idle_timeout,
            max_lifetime: Some(MAX_CONNECTION_LIFETIME),
            shutdown_grace: Duration::from_secs(2),
            ..ServeConfig::named("credentials service")
        };
        let peers = Arc::new(self.peers);
        serve(listener, Arc::new(self), peers, config, shutdown).await
    }

    /// The answer to one request.
    pub async fn answer(&self, request: &Request) -> Response {
        if let Err(err) = request.check_version() {
            return Response::error(request.id, err.code(), err.to_string());
        }
        match request.op {
            RequestOp::GetCredentials => match self.cache.get().await {
                Ok(creds) => Response::new(request.id, ResponseBody::Credentials(to_wire(&creds))),
                Err(err) => Response::error(request.id, ErrorCode::Unavailable, err.to_string()),
            },
            ref other => Response::error(
                request.id,
                ErrorCode::BadRequest,
                format!(
                    "the credentials service answers only GetCredentials, not {}",
                    other.kind()
                ),
            ),
        }
    }

    async fn serve_connection(&self, accepted: Accepted) {
        let Accepted {
            stream,
            peer,
            mut shutdown,
            ..
        } = accepted;
        let mut conn = Connection::with_limits(
            stream,
            FrameLimits::new(MAX_REQUEST_FRAME, MAX_RESPONSE_FRAME),
        );
        loop {
            let read = tokio::select! {
                // Between requests: nothing is lost by stopping here.
                () = shutdown.wait() => return,
                read = tokio::time::timeout(self.limits.idle_timeout, conn.read_message::<Request>()) => read,
            };
            let response = match read {
                Err(_) => {
                    tracing::debug!(%peer, "idle connection closed");
                    return;
                }
                Ok(Ok(None)) => return,
                Ok(Ok(Some(request))) => {
                    let response = self.answer(&request).await;
                    tracing::info!(
                        %peer,
                        op = request.op.kind(),
                        outcome = outcome(&response),
                        "credentials request"
                    );
                    response
                }
                Ok(Err(err @ FrameError::Decode(_))) => {
                    tracing::warn!(%peer, error = %err, "malformed request");
                    Response::error(0, ErrorCode::BadRequest, err.to_string())
                }
                Ok(Err(err)) => {
                    tracing::warn!(%peer, error = %err, "closing connection");
                    if matches!(err, FrameError::TooLarge { .. }) {
                        let reply = Response::error(0, ErrorCode::TooLarge, err.to_string());
                        let _ = tokio::time::timeout(
                            Duration::from_secs(1),
                            conn.write_message(&reply),
                        )
                        .await;
                    }
                    return;
                }
            };
            let written =
                tokio::time::timeout(self.limits.idle_timeout, conn.write_message(&response)).await;
            if !matches!(written, Ok(Ok(()))) {
                tracing::warn!(%peer, "could not send the response; closing");
                return;
            }
        }
    }
}

impl Handler for CredentialsService {
    async fn handle(&self, conn: Accepted) {
        self.serve_connection(conn).await;
    }

    async fn refuse(&self, stream: &mut Stream, refusal: &Refusal) {
        let code = match refusal {
            Refusal::Busy { .. } => ErrorCode::Unavailable,
            Refusal::Denied(_) => ErrorCode::Denied,
        };
        let mut conn = Connection::with_limits(
            stream,
            FrameLimits::new(MAX_REQUEST_FRAME, MAX_RESPONSE_FRAME),
        );
        let _ = conn
            .write_message(&Response::error(0, code, refusal.to_string()))
            .await;
    }
}

fn outcome(response: &Response) -> &'static str {
    match &response.result {
        ResponseBody::Error { code, .. } => code.as_str(),
        _ => "ok",
    }
}
