//! AWS credentials from the host's credentials service (DESIGN.md, "Wire
//! protocol" and "The enclave's KMS transport").
//!
//! The enclave has no IMDS, no `~/.aws` and no environment worth trusting,
//! so its only source of credentials is the host proxy's credentials service
//! (vsock://3:801), asked with `GetCredentials` over the framed protocol.
//! Credentials are cached until shortly before their expiry so a load
//! of many values asks once, and refreshed single-flight: concurrent KMS
//! calls wait for one fetch instead of each dialing the service.
//!
//! Credentials are secret: they are never logged, never in errors, and the
//! cached copy lives in the SDK's credentials type (which redacts its secret
//! in `Debug`).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_credential_types::Credentials as AwsCredentials;
use aws_credential_types::provider::{self, ProvideCredentials};
use keystore_shared::endpoint::Endpoint;
use keystore_shared::protocol::{Credentials, ErrorCode, RequestOp, ResponseBody};
use keystore_shared::{Client, ClientConfig, ClientError};
use tokio::sync::Mutex;

/// Default address of the credentials service (the parent, port 801).
pub const DEFAULT_CREDENTIALS_PORT: u32 = 801;
/// Default bound on one credentials fetch (dial, request, answer).
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Default margin before `Expiration` at which credentials are refreshed:
/// IMDS rotates role credentials about 5 minutes before they expire, and a
/// KMS call signed just before expiry must still arrive in time.
pub const DEFAULT_REFRESH_BEFORE: Duration = Duration::from_secs(5 * 60);
/// Default lifetime of cached credentials that carry no `Expiration`
/// (long-term keys), so a rotation on the host is still picked up.
pub const DEFAULT_UNEXPIRING_TTL: Duration = Duration::from_secs(15 * 60);
/// Largest credentials frame accepted: a session token is about 1-2 KiB.
pub const MAX_CREDENTIALS_FRAME: usize = 16 * 1024;
/// Name the SDK records as the credentials' origin.
const PROVIDER_NAME: &str = "keystore-credentials-service";

/// Where and how credentials are fetched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialsConfig {
    /// The credentials service.
    pub endpoint: Endpoint,
    /// Bound on one fetch.
    pub fetch_timeout: Duration,
    /// Refresh this long before `Expiration`.
    pub refresh_before: Duration,
    /// Cache lifetime of credentials without `Expiration`.
    pub unexpiring_ttl: Duration,
}

impl Default for CredentialsConfig {
    fn default() -> Self {
        CredentialsConfig::new(Endpoint::vsock(
            keystore_shared::endpoint::VSOCK_CID_PARENT,
            DEFAULT_CREDENTIALS_PORT,
        ))
    }
}

impl CredentialsConfig {
    /// Defaults for the service at `endpoint`.
    pub fn new(endpoint: Endpoint) -> CredentialsConfig {
        CredentialsConfig {
            endpoint,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
            refresh_before: DEFAULT_REFRESH_BEFORE,
            unexpiring_ttl: DEFAULT_UNEXPIRING_TTL,
        }
    }
}

/// Why credentials could not be obtained. Every message starts with the
/// stage (`credentials`) and never contains any part of the credentials.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    /// Dialing the service failed.
    #[error("credentials: cannot reach the credentials service at {endpoint}: {reason}")]
    Connect {
        /// The service endpoint.
        endpoint: String,
        /// The OS error.
        reason: String,
    },
    /// The fetch took longer than allowed.
    #[error("credentials: the credentials service at {endpoint} did not answer within {after:?}")]
    Timeout {
        /// The service endpoint.
        endpoint: String,
        /// The configured limit.
        after: Duration,
    },
    /// The exchange failed at the framing level (dropped connection,
    /// oversize or malformed frame).
    #[error("credentials: exchange with {endpoint} failed: {reason}")]
    Exchange {
        /// The service endpoint.
        endpoint: String,
        /// What failed (no frame content).
        reason: String,
    },
    /// The service answered with an error.
    #[error("credentials: the credentials service refused ({code}): {message}")]
    Refused {
        /// The service's error code.
        code: ErrorCode,
        /// Its message (the service never puts secrets in it).
        message: String,
    },
    /// The service answered something other than credentials.
    #[error("credentials: unexpected answer from the credentials service: {0}")]
    Unexpected(String),
    /// The credentials are unusable (empty fields, an expiry out of range or
    /// past). The values themselves are not shown.
    #[error("credentials: the credentials service sent unusable credentials: {0}")]
    Invalid(&'static str),
}

impl CredentialsError {
    /// Whether asking again can help (the service was unreachable, slow or
    /// said it is temporarily unavailable).
    pub fn is_retryable(&self) -> bool {
        match self {
            CredentialsError::Connect { .. }
            | CredentialsError::Timeout { .. }
            | CredentialsError::Exchange { .. } => true,
            CredentialsError::Refused { code, .. } => {
                matches!(code, ErrorCode::Unavailable | ErrorCode::NotReady)
            }
            CredentialsError::Unexpected(_) | CredentialsError::Invalid(_) => false,
        }
    }
}

struct Cached {
    credentials: AwsCredentials,
    /// When to refresh.
    refresh_at: SystemTime,
    /// When they stop working (`None`: long-term).
    expires_at: Option<SystemTime>,
}

struct Inner {
    config: CredentialsConfig,
    cache: Mutex<Option<Cached>>,
    fetches: AtomicU64,
}

/// The credentials-service client and cache; also the SDK's credentials
/// provider. Cheap to clone; clones share the cache.
#[derive(Clone)]
pub struct CredentialsProvider {
    inner: Arc<Inner>,
}

impl fmt::Debug for CredentialsProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialsProvider")
            .field("endpoint", &self.inner.config.endpoint)
            .field("fetches", &self.fetches())
            .finish_non_exhaustive()
    }
}

impl CredentialsProvider {
    /// A provider asking the service in `config`; nothing is fetched until
    /// credentials are first needed.
    pub fn new(config: CredentialsConfig) -> CredentialsProvider {
        CredentialsProvider {
            inner: Arc::new(Inner {
                config,
                cache: Mutex::new(None),
                fetches: AtomicU64::new(0),
            }),
        }
    }

    /// How many times the service was asked (successfully or not).
    pub fn fetches(&self) -> u64 {
        self.inner.fetches.load(Ordering::Relaxed)
    }

    /// Drops the cached credentials so the next call fetches (for example
    /// after KMS said they are no longer valid).
    pub async fn invalidate(&self) {
        *self.inner.cache.lock().await = None;
    }

    /// Cached credentials, or fresh ones once the cache is within
    /// `refresh_before` of expiry. If a refresh fails while the cached
    /// credentials have not yet expired, those are used (and the failure
    /// logged) rather than failing the KMS call.
    pub async fn credentials(&self) -> Result<AwsCredentials, CredentialsError> {
        let mut cache = self.inner.cache.lock().await;
        let now = SystemTime::now();
        if let Some(cached) = cache.as_ref()
            && now < cached.refresh_at
        {
            return Ok(cached.credentials.clone());
        }
        match self.fetch().await {
            Ok(fresh) => {
                let credentials = fresh.credentials.clone();
                *cache = Some(fresh);
                Ok(credentials)
            }
            Err(e) => match cache.as_ref() {
                Some(cached) if cached.expires_at.is_none_or(|at| now < at) => {
                    tracing::warn!(error = %e, "credentials refresh failed; using the cached credentials until they expire");
                    Ok(cached.credentials.clone())
                }
                _ => Err(e),
            },
        }
    }

    async fn fetch(&self) -> Result<Cached, CredentialsError> {
        let config = &self.inner.config;
        self.inner.fetches.fetch_add(1, Ordering::Relaxed);
        let endpoint = config.endpoint.to_string();
        let client_config = ClientConfig {
            connect_timeout: config.fetch_timeout,
            request_timeout: config.fetch_timeout,
            max_request_frame: MAX_CREDENTIALS_FRAME,
            max_response_frame: MAX_CREDENTIALS_FRAME,
            ..ClientConfig::default()
        };
        let exchange = async {
            let mut client = Client::connect_with(&config.endpoint, client_config).await?;
            client.call(RequestOp::GetCredentials).await
        };
        let answer = tokio::time::timeout(config.fetch_timeout, exchange)
            .await
            .map_err(|_| CredentialsError::Timeout {
                endpoint: endpoint.clone(),
                after: config.fetch_timeout,
            })?
            .map_err(|err| credentials_error(err, &endpoint, config.fetch_timeout))?;
        let ResponseBody::Credentials(credentials) = answer else {
            // `call` has checked the kind; name it, never the content.
            return Err(CredentialsError::Unexpected(format!(
                "a {} response",
                answer.kind()
            )));
        };
        let cached = self.to_cached(credentials)?;
        tracing::debug!(endpoint = %endpoint, "credentials fetched");
        Ok(cached)
    }

    fn to_cached(&self, credentials: Credentials) -> Result<Cached, CredentialsError> {
        let config = &self.inner.config;
        if credentials.access_key_id.is_empty() || credentials.secret_access_key.is_empty() {
            return Err(CredentialsError::Invalid(
                "empty access key id or secret access key",
            ));
        }
        let now = SystemTime::now();
        let expires_at = match credentials.expires_at {
            None => None,
            Some(secs) => Some(
                UNIX_EPOCH
                    .checked_add(Duration::from_secs(secs))
                    .ok_or(CredentialsError::Invalid("the expiry is out of range"))?,
            ),
        };
        let refresh_at = match expires_at {
            Some(at) if at <= now => {
                return Err(CredentialsError::Invalid("the credentials have expired"));
            }
            Some(at) => at
                .checked_sub(config.refresh_before)
                .unwrap_or(now)
                .max(now),
            None => now + config.unexpiring_ttl,
        };
        let credentials = AwsCredentials::new(
            credentials.access_key_id.expose(),
            credentials.secret_access_key.expose(),
            credentials
                .session_token
                .as_ref()
                .map(|t| t.expose().to_owned()),
            expires_at,
            PROVIDER_NAME,
        );
        Ok(Cached {
            credentials,
            refresh_at,
            expires_at,
        })
    }
}

/// The stage-named error for a failed exchange with the service.
fn credentials_error(err: ClientError, endpoint: &str, after: Duration) -> CredentialsError {
    let endpoint = endpoint.to_owned();
    match err {
        ClientError::Connect(e) => CredentialsError::Connect {
            endpoint,
            reason: e.to_string(),
        },
        ClientError::ConnectTimeout { .. } | ClientError::Timeout { .. } => {
            CredentialsError::Timeout { endpoint, after }
        }
        ClientError::Server { code, message, .. } => CredentialsError::Refused {
            code,
            message: message.chars().take(256).collect(),
        },
        ClientError::Closed { .. } => CredentialsError::Exchange {
            endpoint,
            reason: "the service closed the connection without answering".to_owned(),
        },
        ClientError::Frame { source, .. } => CredentialsError::Exchange {
            endpoint,
            reason: source.to_string(),
        },
        other @ (ClientError::Version { .. }
        | ClientError::IdMismatch { .. }
        | ClientError::UnexpectedResponse { .. }
        | ClientError::Broken) => CredentialsError::Unexpected(other.to_string()),
    }
}

impl ProvideCredentials for CredentialsProvider {
    fn provide_credentials<'a>(&'a self) -> provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        provider::future::ProvideCredentials::new(async move {
            self.credentials()
                .await
                .map_err(provider::error::CredentialsError::provider_error)
        })
    }
}
