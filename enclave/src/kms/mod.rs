//! The enclave's KMS client (DESIGN.md, "The enclave's KMS transport" and
//! "The enclave's life", step 2).
//!
//! [`Kms`] is `aws-sdk-kms` with the enclave's own pieces plugged in: the
//! HTTP connector of [`transport`] (TLS inside the enclave, over the host
//! proxy) and the credentials of [`credentials`] (from the host's
//! credentials service). Its one operation, [`Kms::decrypt_for_recipient`],
//! asks KMS to re-encrypt a value for the enclave's attested RSA key and
//! opens the answer locally, so the plaintext never crosses the host.
//!
//! Every `Decrypt` names a [pinned](pinned) key as `KeyId`, and an answer
//! for any other key is refused ([`KmsError::UnpinnedKey`]) before the
//! value is opened. With several pinned keys the envelope does not say which
//! one encrypted it, so the keys are tried in turn, moving to the next only
//! on `IncorrectKeyException` (at most one call per pinned key), starting
//! with the key that last succeeded.
//!
//! The SDK's own retries are disabled: the loader retries with its own
//! bounded backoff and counts every call, and an attestation refusal needs a
//! new recipient pair (which the SDK cannot produce) before a retry makes
//! sense. Every failure is a [`KmsError`] naming its stage.

pub mod breaker;
pub mod calls;
pub mod credentials;
pub mod error_code;
pub mod pinned;
pub mod transport;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aws_sdk_kms::config::{BehaviorVersion, IdentityCache, Region, StalledStreamProtectionConfig};
use aws_sdk_kms::error::SdkError;
use aws_sdk_kms::operation::decrypt::DecryptError;
use aws_sdk_kms::types::{KeyEncryptionMechanism, RecipientInfo};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_types::Blob;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use keystore_shared::attestation::AttestationDocument;
use keystore_shared::endpoint::{Endpoint, VSOCK_CID_PARENT};
use zeroize::Zeroizing;

use breaker::{Breaker, BreakerConfig, BreakerSnapshot, Outcome};
use calls::{KmsCalls, KmsOperation};

use crate::recipient::{RecipientError, RecipientPair};
use credentials::{CredentialsConfig, CredentialsError, CredentialsProvider};
pub use error_code::KmsErrorCode;
use keystore_cms::{self as cms, CmsError};
pub use pinned::{KeyArn, KeyArnError, PinnedKeys, PinnedKeysError};
use transport::{KmsTransport, TransportConfig, TransportError, TransportStats};

/// Default vsock port of the host proxy's KMS forwarder.
pub const DEFAULT_PROXY_PORT: u32 = 800;
/// Default bound on one whole KMS operation as the SDK sees it (signing,
/// the call, parsing).
pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(45);
/// Longest KMS error message kept (KMS's are short; an untrusted peer's
/// may not be).
const MAX_KMS_MESSAGE: usize = 512;

/// Everything the KMS client needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KmsConfig {
    /// AWS region, e.g. `us-east-1` (SigV4 scope).
    pub region: String,
    /// How KMS is reached (proxy, host name, TLS, timeouts, pool).
    pub transport: TransportConfig,
    /// Where credentials come from.
    pub credentials: CredentialsConfig,
    /// Bound on one whole SDK operation.
    pub operation_timeout: Duration,
    /// The only KMS keys `Decrypt` may use. Empty: every decrypt is refused
    /// ([`KmsError::NoPinnedKey`]).
    pub pinned_keys: PinnedKeys,
    /// When repeated service failures stop calls ([`breaker`]).
    pub breaker: BreakerConfig,
}

impl KmsConfig {
    /// Production defaults for `region`: KMS host
    /// `kms.<region>.amazonaws.com` through the proxy at vsock://3:800,
    /// credentials from vsock://3:801, no extra CA, no pinned key yet.
    pub fn new(region: impl Into<String>) -> KmsConfig {
        let region = region.into();
        let host = format!("kms.{region}.amazonaws.com");
        KmsConfig {
            transport: TransportConfig::new(
                Endpoint::vsock(VSOCK_CID_PARENT, DEFAULT_PROXY_PORT),
                host,
            ),
            credentials: CredentialsConfig::default(),
            operation_timeout: DEFAULT_OPERATION_TIMEOUT,
            pinned_keys: PinnedKeys::default(),
            breaker: BreakerConfig::default(),
            region,
        }
    }

    /// The same settings with `keys` pinned.
    #[must_use]
    pub fn with_pinned_keys(mut self, keys: PinnedKeys) -> KmsConfig {
        self.pinned_keys = keys;
        self
    }

    /// Whether an extra trusted CA is configured.
    pub fn has_extra_ca(&self) -> bool {
        self.transport.extra_ca_pem.is_some()
    }

    /// Refuses an extra CA unless the NSM is the mock (DESIGN.md, "Security
    /// rules": an extra CA is accepted only in mock mode). A real enclave
    /// trusting an operator-supplied CA would let the host impersonate KMS.
    pub fn check_extra_ca(&self, nsm_is_mock: bool) -> Result<(), KmsError> {
        if self.has_extra_ca() && !nsm_is_mock {
            return Err(KmsError::Config(
                "an extra trusted CA is only accepted with the mock NSM; a real enclave trusts the webpki roots only"
                    .to_owned(),
            ));
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), KmsError> {
        let region_ok = !self.region.is_empty()
            && self.region.len() <= 32
            && self
                .region
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !region_ok {
            return Err(KmsError::Config(format!(
                "region {:?} is not an AWS region name",
                self.region.chars().take(32).collect::<String>()
            )));
        }
        self.breaker.validate().map_err(KmsError::Config)?;
        transport::check_kms_host(&self.transport.kms_host)
            .map_err(|e| KmsError::Config(e.to_string()))?;
        // A key is only usable through its own region's KMS: a key of
        // another region would fail every load with NotFound.
        if let Some(key) = self
            .pinned_keys
            .keys()
            .iter()
            .find(|k| k.region() != self.region)
        {
            return Err(KmsError::Config(format!(
                "pinned KMS key {key} is in region {}, but this enclave calls KMS in {}",
                key.region(),
                self.region
            )));
        }
        Ok(())
    }
}

/// Why a KMS call failed, by stage. Never carries plaintext, credentials or
/// key material.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    /// The client configuration is unusable.
    #[error("KMS client configuration: {0}")]
    Config(String),
    /// The NSM could not produce a new recipient pair (after KMS refused
    /// the document).
    #[error("NSM: cannot refresh the recipient key and attestation document: {0}")]
    Nsm(#[source] RecipientError),
    /// The host proxy could not be reached.
    #[error("{0}")]
    ProxyConnect(TransportError),
    /// TLS with KMS failed (untrusted or misnamed certificate, or the
    /// connection closed during the handshake).
    #[error("{0}")]
    Tls(TransportError),
    /// The HTTP exchange failed after TLS: dropped connection, timeout,
    /// oversize or malformed response.
    #[error("KMS transport: {0}")]
    Transport(TransportError),
    /// No usable credentials.
    #[error("{0}")]
    Credentials(#[source] CredentialsError),
    /// KMS answered with an error.
    #[error("KMS refused: {code} (HTTP {status}): {message}{}", hint_text(.hint))]
    Service {
        /// The `__type` KMS returned, e.g. `AccessDeniedException`.
        code: KmsErrorCode,
        /// KMS's message.
        message: String,
        /// The HTTP status.
        status: u16,
        /// What it most likely means for this enclave.
        hint: Option<String>,
    },
    /// The SDK's whole-operation timeout fired.
    #[error("KMS: the Decrypt operation timed out: {0}")]
    Timeout(String),
    /// KMS answered 2xx but the answer could not be read.
    #[error("KMS: unreadable response: {0}")]
    Response(String),
    /// KMS answered with `Plaintext` although a `Recipient` was sent: the
    /// value crossed the host in the clear (only TLS protected it). Refused;
    /// the plaintext was wiped unused.
    #[error(
        "KMS response refused: it carries Plaintext instead of CiphertextForRecipient, so the value was not sealed for this enclave"
    )]
    PlaintextInResponse,
    /// KMS answered without `CiphertextForRecipient`.
    #[error("KMS response refused: no CiphertextForRecipient")]
    MissingCiphertextForRecipient,
    /// No KMS key is pinned in this enclave, so nothing may be decrypted.
    #[error(
        "no KMS key is pinned in this enclave: build the image with `scripts/build-eif.sh --kms-key-arn ARN` (or run keystore-enclave with --kms-key-arn ARN)"
    )]
    NoPinnedKey,
    /// KMS answered for a key that is not the pinned key asked for. The
    /// answer was dropped unopened.
    #[error("KMS answered for key {got}, which is not the pinned key {pinned}; refused")]
    UnpinnedKey {
        /// The `KeyId` of the answer (`(none)` if it had none; truncated).
        got: String,
        /// The pinned key the request named.
        pinned: String,
    },
    /// `CiphertextForRecipient` could not be opened with the pair's key.
    #[error("CMS: cannot open CiphertextForRecipient: {0}")]
    Cms(#[source] CmsError),
    /// The circuit breaker is open after repeated service failures: the
    /// call was not made. Names the last failure, so `status` keeps saying
    /// why KMS is being spared.
    #[error(
        "KMS calls paused after repeated failures (circuit breaker open; last failure: {last_failure}); next try in {retry_in:?}"
    )]
    BreakerOpen {
        /// When a call may go again.
        retry_in: Duration,
        /// The last service failure seen (a KMS error code or transport
        /// failure; never secret material).
        last_failure: String,
    },
    /// Any other SDK failure (request construction).
    #[error("KMS client: {0}")]
    Other(String),
}

fn hint_text(hint: &Option<String>) -> String {
    match hint {
        Some(h) => format!(" ({h})"),
        None => String::new(),
    }
}

impl KmsError {
    /// The stage that failed, as one word for logs and status.
    pub fn stage(&self) -> &'static str {
        match self {
            KmsError::Config(_) | KmsError::NoPinnedKey => "config",
            KmsError::UnpinnedKey { .. } => "pinned-key",
            KmsError::Nsm(_) => "nsm",
            KmsError::ProxyConnect(_) => "proxy-connect",
            KmsError::Tls(_) => "tls",
            KmsError::Transport(_) | KmsError::Timeout(_) => "transport",
            KmsError::Credentials(_) => "credentials",
            KmsError::Service { .. }
            | KmsError::Response(_)
            | KmsError::PlaintextInResponse
            | KmsError::MissingCiphertextForRecipient
            | KmsError::Other(_) => "kms",
            KmsError::Cms(_) => "cms",
            KmsError::BreakerOpen { .. } => "breaker",
        }
    }

    /// The `__type` KMS returned, if KMS answered with an error.
    pub fn kms_code(&self) -> Option<&KmsErrorCode> {
        match self {
            KmsError::Service { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether retrying the same call later can succeed: throttling, KMS
    /// 5xx, dropped connections and timeouts.
    pub fn is_retryable(&self) -> bool {
        match self {
            KmsError::ProxyConnect(e) | KmsError::Tls(e) | KmsError::Transport(e) => {
                e.is_retryable()
            }
            KmsError::Timeout(_) => true,
            KmsError::Credentials(e) => e.is_retryable(),
            KmsError::Service { code, status, .. } => {
                *status >= 500 || *status == 429 || code.is_transient()
            }
            _ => false,
        }
    }

    /// Whether the failure is the service's fault (throttling, 5xx,
    /// timeouts, connection errors), which is what the breaker counts.
    /// A refusal is an answer; a credentials-service failure says nothing
    /// about KMS.
    pub fn is_service_fault(&self) -> bool {
        !matches!(self, KmsError::Credentials(_)) && self.is_retryable()
    }

    /// Whether KMS refused the credentials themselves (unknown key id, bad
    /// signature, expired session token): fetching new ones may help.
    pub fn is_credentials_rejection(&self) -> bool {
        matches!(self, KmsError::Service { code, .. } if code.is_credentials_rejection())
    }

    /// Whether KMS refused the attestation document itself (stale, not
    /// verifiable): the caller should invalidate the recipient pair and
    /// retry once with a fresh one. A key-policy refusal
    /// (`AccessDeniedException`) is not one: a new document carries the same
    /// PCRs.
    pub fn is_attestation_refusal(&self) -> bool {
        match self {
            KmsError::Service { code, message, .. } => {
                matches!(
                    code,
                    KmsErrorCode::Validation | KmsErrorCode::InvalidRequest
                ) && message.to_ascii_lowercase().contains("attestation")
            }
            _ => false,
        }
    }
}

/// Counters of the KMS client.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KmsStats {
    /// Transport counters (connections, handshakes, requests).
    pub transport: TransportStats,
    /// Calls to the credentials service.
    pub credential_fetches: u64,
}

/// The enclave's KMS client. Cheap to clone; clones share the connection
/// pool and the credentials cache.
#[derive(Clone)]
pub struct Kms {
    client: aws_sdk_kms::Client,
    transport: KmsTransport,
    credentials: CredentialsProvider,
    pinned: PinnedKeys,
    /// Index of the pinned key that last decrypted a value: tried first.
    preferred: Arc<AtomicUsize>,
    /// Shared by every clone: one view of KMS's health.
    breaker: Arc<Breaker>,
    /// Calls by operation and outcome, shared by every clone.
    calls: Arc<KmsCalls>,
    /// The last service failure (shared by every clone), named while the
    /// breaker is open.
    last_fault: Arc<std::sync::Mutex<Option<String>>>,
}

impl fmt::Debug for Kms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kms")
            .field("transport", &self.transport)
            .field("credentials", &self.credentials)
            .field("pinned", &self.pinned)
            .finish_non_exhaustive()
    }
}

impl Kms {
    /// Builds the client. Nothing is dialed until the first call.
    pub fn new(config: KmsConfig) -> Result<Kms, KmsError> {
        config.validate()?;
        let transport =
            KmsTransport::new(&config.transport).map_err(|e| KmsError::Config(e.to_string()))?;
        let credentials = CredentialsProvider::new(config.credentials.clone());
        let sdk_config = aws_sdk_kms::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .endpoint_url(format!("https://{}", config.transport.kms_host))
            .credentials_provider(credentials.clone())
            // Our provider caches; a second cache would hide its refreshes.
            .identity_cache(IdentityCache::no_cache())
            .http_client(transport.clone())
            .retry_config(RetryConfig::disabled())
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_timeout(config.operation_timeout)
                    .build(),
            )
            .build();
        if config.pinned_keys.is_empty() {
            tracing::warn!("no KMS key is pinned: every Load will be refused");
        } else {
            tracing::info!(keys = %config.pinned_keys, "KMS keys pinned");
        }
        Ok(Kms {
            client: aws_sdk_kms::Client::from_conf(sdk_config),
            transport,
            credentials,
            pinned: config.pinned_keys,
            preferred: Arc::new(AtomicUsize::new(0)),
            breaker: Arc::new(Breaker::new(config.breaker)),
            calls: Arc::new(KmsCalls::default()),
            last_fault: Arc::new(std::sync::Mutex::new(None)),
        })
    }

    /// The region KMS calls are signed for and sent to.
    pub fn region(&self) -> Option<String> {
        self.client.config().region().map(ToString::to_string)
    }

    /// The keys `Decrypt` may use.
    pub fn pinned_keys(&self) -> &PinnedKeys {
        &self.pinned
    }

    /// Connection and credentials counters.
    pub fn stats(&self) -> KmsStats {
        KmsStats {
            transport: self.transport.stats(),
            credential_fetches: self.credentials.fetches(),
        }
    }

    /// The circuit breaker's state, for `status`.
    pub fn breaker(&self) -> BreakerSnapshot {
        self.breaker.snapshot()
    }

    /// The last KMS service failure (what opened the breaker, while it is
    /// open), for `status`.
    pub fn last_fault(&self) -> Option<String> {
        self.last_fault
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// KMS calls since start by operation and outcome, for `status`.
    pub fn call_stats(&self) -> keystore_shared::protocol::KmsCallStats {
        self.calls.snapshot()
    }

    /// The credentials provider (shared with the SDK).
    pub fn credentials(&self) -> &CredentialsProvider {
        &self.credentials
    }

    /// `Decrypt` with `KeyId` = a pinned key, `EncryptionContext =
    /// context` and `Recipient` = the pair's attestation document, then
    /// opens `CiphertextForRecipient` with the pair's key.
    ///
    /// The encryption context is the name binding: KMS refuses a ciphertext
    /// presented under a context it was not encrypted with. `KeyId` is the
    /// key binding: KMS refuses (`IncorrectKeyException`) a ciphertext of
    /// another key, and an answer naming another key is refused here
    /// ([`KmsError::UnpinnedKey`]). With several pinned keys each is tried
    /// once, in turn, while KMS says `IncorrectKeyException`. An answer with
    /// `Plaintext` is refused ([`KmsError::PlaintextInResponse`]).
    pub async fn decrypt_for_recipient(
        &self,
        ciphertext: &[u8],
        context: &BTreeMap<String, String>,
        pair: &RecipientPair,
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let keys = self.pinned.keys();
        if keys.is_empty() {
            return Err(KmsError::NoPinnedKey);
        }
        let first = self.preferred.load(Ordering::Relaxed) % keys.len();
        let mut last = KmsError::NoPinnedKey;
        for offset in 0..keys.len() {
            let index = (first + offset) % keys.len();
            let Some(key) = keys.get(index) else { break };
            match self.decrypt_with(key, ciphertext, context, pair).await {
                Ok(value) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok(value);
                }
                Err(err) if err.kms_code() == Some(&KmsErrorCode::IncorrectKey) => {
                    tracing::debug!(key = %key, "not encrypted under this pinned key; trying the next");
                    last = err;
                }
                Err(err) => return Err(err),
            }
        }
        Err(last)
    }

    /// One pinned key: the call (with one credentials refresh) and the
    /// checks of the answer.
    async fn decrypt_with(
        &self,
        key: &KeyArn,
        ciphertext: &[u8],
        context: &BTreeMap<String, String>,
        pair: &RecipientPair,
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        // Credentials rotated on the host: KMS rejects the cached ones once,
        // they are dropped, and the call is made again with fresh ones.
        let mut fresh_credentials = false;
        let output = loop {
            // Resolve credentials first so a failure there is reported as
            // the credentials stage, not buried in the SDK's error chain.
            // The SDK then gets the same (cached) credentials.
            if let Err(err) = self.credentials.credentials().await {
                let err = KmsError::Credentials(err);
                self.calls
                    .count(KmsOperation::Decrypt, calls::outcome_of(&err));
                return Err(err);
            }
            let recipient = RecipientInfo::builder()
                .key_encryption_algorithm(KeyEncryptionMechanism::RsaesOaepSha256)
                .attestation_document(Blob::new(pair.document().to_vec()))
                .build();
            let mut request = self
                .client
                .decrypt()
                .key_id(key.as_str())
                .ciphertext_blob(Blob::new(ciphertext.to_vec()))
                .recipient(recipient);
            for (key, value) in context {
                request = request.encryption_context(key, value);
            }
            // Checked per HTTP call, so neither the loader's retries nor
            // the credentials retry can call an open breaker's KMS.
            let permit = match self.breaker.admit() {
                Ok(permit) => permit,
                Err(refused) => {
                    self.calls.count(KmsOperation::Decrypt, "breaker_open");
                    return Err(KmsError::BreakerOpen {
                        retry_in: refused.retry_in,
                        last_failure: self.last_fault().unwrap_or_else(|| "unknown".to_owned()),
                    });
                }
            };
            match request.send().await {
                Ok(output) => {
                    permit.finish(Outcome::Answered);
                    self.calls.count(KmsOperation::Decrypt, "ok");
                    break output;
                }
                Err(err) => {
                    let err = classify(err, context, pair, &self.pinned);
                    self.calls
                        .count(KmsOperation::Decrypt, calls::outcome_of(&err));
                    if err.is_service_fault() {
                        *self
                            .last_fault
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner) =
                            Some(err.to_string());
                    }
                    permit.finish(if err.is_service_fault() {
                        Outcome::Fault
                    } else if matches!(err, KmsError::Credentials(_) | KmsError::Other(_)) {
                        Outcome::Neutral
                    } else {
                        Outcome::Answered
                    });
                    if err.is_credentials_rejection() && !fresh_credentials {
                        tracing::info!(error = %err, "KMS rejected the cached credentials; fetching new ones");
                        self.credentials.invalidate().await;
                        fresh_credentials = true;
                        continue;
                    }
                    return Err(err);
                }
            }
        };
        if let Some(plaintext) = output.plaintext {
            // Wipe it; it must not be used.
            drop(Zeroizing::new(plaintext.into_inner()));
            tracing::error!("KMS answered a Recipient request with Plaintext; refused");
            return Err(KmsError::PlaintextInResponse);
        }
        // Checked before the value is opened: an answer for another key is
        // never decrypted, let alone stored.
        match output.key_id.as_deref() {
            Some(got) if key.matches(got) => {}
            got => {
                let got: String = got
                    .unwrap_or("(none)")
                    .chars()
                    .take(MAX_KMS_MESSAGE)
                    .collect();
                tracing::error!(got = %got, pinned = %key, "KMS answered for a key that is not pinned; refused");
                return Err(KmsError::UnpinnedKey {
                    got,
                    pinned: key.to_string(),
                });
            }
        }
        let sealed = output
            .ciphertext_for_recipient
            .ok_or(KmsError::MissingCiphertextForRecipient)?;
        cms::open(sealed.as_ref(), pair.key()).map_err(KmsError::Cms)
    }
}

/// Turns the SDK's error into a stage-named [`KmsError`].
fn classify(
    err: SdkError<DecryptError, HttpResponse>,
    context: &BTreeMap<String, String>,
    pair: &RecipientPair,
    pinned: &PinnedKeys,
) -> KmsError {
    if let Some(service) = err.as_service_error() {
        let status = err.raw_response().map_or(0, |r| r.status().as_u16());
        let code = KmsErrorCode::parse(service.code(), status);
        let message: String = service
            .message()
            .unwrap_or("")
            .chars()
            .take(MAX_KMS_MESSAGE)
            .collect();
        let hint = hint_for(&code, &message, status, context, pair, pinned);
        return KmsError::Service {
            code,
            message,
            status,
            hint,
        };
    }
    let source: &(dyn std::error::Error + 'static) = &err;
    if let Some(t) = transport::find_source::<TransportError>(source) {
        return if t.is_proxy_connect() {
            KmsError::ProxyConnect(t.clone())
        } else if t.is_tls() {
            KmsError::Tls(t.clone())
        } else {
            KmsError::Transport(t.clone())
        };
    }
    if let Some(c) = transport::find_source::<CredentialsError>(source) {
        return KmsError::Credentials(c.clone());
    }
    let text = transport::error_chain(source);
    match err {
        SdkError::TimeoutError(_) => KmsError::Timeout(text),
        SdkError::ResponseError(_) => KmsError::Response(text),
        _ => KmsError::Other(text),
    }
}

/// What a KMS refusal most likely means for this enclave.
fn hint_for(
    code: &KmsErrorCode,
    message: &str,
    status: u16,
    context: &BTreeMap<String, String>,
    pair: &RecipientPair,
    pinned: &PinnedKeys,
) -> Option<String> {
    match code {
        KmsErrorCode::AccessDenied => {
            let pcr0 = AttestationDocument::parse_unverified(pair.document())
                .ok()
                .and_then(|doc| doc.pcrs.get(&0).map(hex::encode))
                .unwrap_or_else(|| "<unreadable>".to_owned());
            Some(format!(
                "the key policy does not allow this enclave: PCR0 = {pcr0}"
            ))
        }
        KmsErrorCode::InvalidCiphertext => {
            let bound = context
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ");
            Some(format!(
                "the ciphertext was not encrypted under this encryption context ({bound}): moved under another name, or corrupted"
            ))
        }
        KmsErrorCode::Throttling => Some("KMS is throttling; retried with backoff".to_owned()),
        KmsErrorCode::IncorrectKey => Some(format!(
            "the value was not encrypted under a KMS key this enclave pins ({pinned}): encrypted under another key or account, or the image pins the wrong key"
        )),
        KmsErrorCode::NotFound
        | KmsErrorCode::Disabled
        | KmsErrorCode::InvalidState => {
            Some("the KMS key is missing, disabled or not usable for Decrypt".to_owned())
        }
        code if code.is_credentials_rejection() => {
            Some("KMS rejected the credentials from the credentials service".to_owned())
        }
        _ if message.to_ascii_lowercase().contains("attestation") => Some(
            "KMS refused the attestation document (stale or not verifiable); the recipient pair is regenerated once"
                .to_owned(),
        ),
        _ if status >= 500 => Some("KMS-side failure; retried with backoff".to_owned()),
        _ => None,
    }
}
