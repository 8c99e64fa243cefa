//! What the enclave answers, independent of how requests arrive.
//!
//! [`KeystoreService`] bundles the state every connection shares — the
//! sealed [`Store`], the [`Recipient`] lifecycle, the [`Nsm`], the start time
//! and the build version — and turns each operation into a typed result or a
//! [`ServiceError`] that already knows its wire [`ErrorCode`]. The server
//! (framing, timeouts, connection limits) lives in [`crate::server`]; keeping
//! the two apart lets the answers be tested without sockets and the transport
//! without secrets.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keystore_shared::Caller;
use keystore_shared::attestation::{MAX_ATTEST_USER_DATA, attest_user_data};
use keystore_shared::name::is_reserved;
use keystore_shared::protocol::{BreakerStatus, ErrorCode, KmsPins, LoadEntry, StatusReport};
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use crate::audit::AuditTrail;
use crate::load::Loader;
use crate::log_ring::LogRing;
use crate::recipient::Recipient;
use crate::store::{Store, StoreError, validate_name};
use keystore_nsm::{AttestationRequest, MAX_ATTESTATION_FIELD, Nsm};

/// How many NSM attestation calls may run at once. Each occupies a thread of
/// the blocking pool; a burst of `Attest` requests must not starve the
/// recipient refresher or fill the pool, so extra callers queue here (and
/// their wait is bounded by the server's request timeout).
pub const MAX_CONCURRENT_ATTESTATIONS: usize = 8;

/// The enclave build's version, reported by `Status`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why an operation failed. Every message is safe to send to a client and to
/// log: it may name a secret (names are not secret) but never carries a
/// value or key material.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Nothing has been loaded yet, so no `Get` can succeed.
    #[error("no secrets loaded yet; the host proxy has not sent a bundle")]
    NotReady,
    /// No secret by that name.
    #[error("{0}")]
    NotFound(String),
    /// The caller may not read this; the message names the secret and the
    /// caller, never the value.
    #[error("{0}")]
    Denied(String),
    /// The request's arguments are unacceptable.
    #[error("{0}")]
    BadRequest(String),
    /// The operation exists but this server does not serve it.
    #[error("{0}")]
    Unsupported(String),
    /// A dependency (the NSM) failed; the caller may retry.
    #[error("{0}")]
    Unavailable(String),
    /// An unexpected failure inside the enclave.
    #[error("{0}")]
    Internal(String),
    /// A failure that already knows its wire code (e.g. a failed load,
    /// whose message names the stage and the secret, never its value).
    #[error("{message}")]
    Failed {
        /// The code to answer with.
        code: ErrorCode,
        /// What went wrong.
        message: String,
    },
}

impl ServiceError {
    /// The wire code this error is answered with.
    pub fn code(&self) -> ErrorCode {
        match self {
            ServiceError::NotReady => ErrorCode::NotReady,
            ServiceError::NotFound(_) => ErrorCode::NotFound,
            ServiceError::Denied(_) => ErrorCode::Denied,
            ServiceError::BadRequest(_) | ServiceError::Unsupported(_) => ErrorCode::BadRequest,
            ServiceError::Unavailable(_) => ErrorCode::Unavailable,
            ServiceError::Internal(_) => ErrorCode::Internal,
            ServiceError::Failed { code, .. } => *code,
        }
    }
}

/// The state shared by every connection of the secret server. Cheap to share
/// behind an `Arc`; all methods take `&self`.
pub struct KeystoreService {
    store: Arc<Store>,
    recipient: Recipient,
    nsm: Arc<dyn Nsm>,
    started: Instant,
    version: String,
    attestations: Semaphore,
    loader: Option<Arc<Loader>>,
    audit: Arc<AuditTrail>,
    logs: Option<Arc<LogRing>>,
}

impl std::fmt::Debug for KeystoreService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The store's and recipient's own Debug impls print no secrets.
        f.debug_struct("KeystoreService")
            .field("store", &self.store)
            .field("recipient", &self.recipient)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl KeystoreService {
    /// Bundles the enclave's state; the uptime clock starts now. Every
    /// request the servers answer is recorded in `audit`.
    pub fn new(
        store: Arc<Store>,
        recipient: Recipient,
        nsm: Arc<dyn Nsm>,
        audit: Arc<AuditTrail>,
    ) -> Self {
        KeystoreService {
            store,
            recipient,
            nsm,
            started: Instant::now(),
            version: VERSION.to_owned(),
            attestations: Semaphore::new(MAX_CONCURRENT_ATTESTATIONS),
            loader: None,
            audit,
            logs: None,
        }
    }

    /// Serves `LogRead` from `ring` (the enclave's recent log events).
    pub fn with_log_ring(mut self, ring: Arc<LogRing>) -> Self {
        self.logs = Some(ring);
        self
    }

    /// The log ring `LogRead` reads, if the enclave keeps one.
    pub fn log_ring(&self) -> Option<&Arc<LogRing>> {
        self.logs.as_ref()
    }

    /// The audit trail every request is recorded in.
    pub fn audit(&self) -> &Arc<AuditTrail> {
        &self.audit
    }

    /// Lets `Load` decrypt bundles through KMS with `loader`. Without one
    /// (no `--region`), `Load` is answered `Unavailable`.
    pub fn with_loader(mut self, loader: Arc<Loader>) -> Self {
        self.loader = Some(loader);
        self
    }

    /// Decrypts a bundle through KMS and swaps it in whole; on failure the
    /// previous secrets stay. Returns how many secrets are now loaded.
    pub async fn load(&self, entries: Vec<LoadEntry>) -> Result<u64, ServiceError> {
        let loader = self.loader.as_ref().ok_or_else(|| {
            ServiceError::Unavailable(
                "this enclave was started without --region, so it cannot reach KMS to load secrets"
                    .to_owned(),
            )
        })?;
        match loader.load(entries).await {
            Ok(report) => {
                tracing::info!(access = %self.store.snapshot().access(), "access policy in force");
                tracing::info!(
                    count = report.count,
                    kms_calls = report.kms_calls,
                    retries = report.retries,
                    invalidations = report.invalidations,
                    duration_ms = millis(report.duration),
                    "secrets loaded"
                );
                Ok(u64::try_from(report.count).unwrap_or(u64::MAX))
            }
            Err(err) => {
                tracing::warn!(error = %err, "load failed; the previous secrets stay");
                Err(ServiceError::Failed {
                    code: err.code(),
                    message: err.to_string(),
                })
            }
        }
    }

    /// The sealed store (the loader replaces its set; shutdown wipes it).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The recipient key lifecycle.
    pub fn recipient(&self) -> &Recipient {
        &self.recipient
    }

    /// Whether anything was ever loaded: before the first load the store is
    /// empty because nothing arrived yet, not because the bundle is empty,
    /// and clients should hear `NotReady` rather than `NotFound`.
    pub fn is_ready(&self) -> bool {
        self.store.status().generation > 0
    }

    /// One secret's plaintext, in a buffer wiped on drop, if `caller` may
    /// read it.
    ///
    /// The access check comes before the lookup and uses the same snapshot,
    /// so the rules that decide are those loaded with the value, and a
    /// caller refused a name learns nothing about whether it exists. The
    /// reserved `keystore:` entries are refused to everyone.
    pub fn get(&self, name: &str, caller: &Caller) -> Result<Zeroizing<Vec<u8>>, ServiceError> {
        validate_name(name).map_err(|e| ServiceError::BadRequest(e.to_string()))?;
        if !self.is_ready() {
            return Err(ServiceError::NotReady);
        }
        let set = self.store.snapshot();
        set.access().check(caller, name).map_err(|denied| {
            tracing::debug!(name, caller = %caller, "read denied");
            ServiceError::Denied(denied.to_string())
        })?;
        set.get(name).map_err(|err| match err {
            StoreError::NotFound { .. } => ServiceError::NotFound(err.to_string()),
            // A sealed value that fails to open means tampering or a bug;
            // the message names the secret only.
            other => ServiceError::Internal(other.to_string()),
        })
    }

    /// The names of the loaded secrets `caller` may read, sorted (never a
    /// reserved `keystore:` entry). Listing is allowed before the first load
    /// (the answer is simply empty), so a host can poll it.
    pub fn list(&self, caller: &Caller) -> Result<Vec<String>, ServiceError> {
        let set = self.store.snapshot();
        let access = set.access();
        let mut names = set.names();
        names.retain(|name| !is_reserved(name) && access.allows(caller, name));
        Ok(names)
    }

    /// Health and freshness.
    pub fn status(&self) -> StatusReport {
        let store = self.store.status();
        let recipient = self.recipient.status();
        StatusReport {
            ready: store.generation > 0,
            secret_count: u64::try_from(store.len).unwrap_or(u64::MAX),
            document_age_ms: Some(millis(recipient.document_age)),
            uptime_ms: millis(self.started.elapsed()),
            version: self.version.clone(),
            recipient_key_bits: u32::try_from(recipient.bits.bits()).ok(),
            refresh_count: recipient.refreshes,
            // A failed load matters more to an operator than a retried
            // key refresh, so it is reported first.
            last_error: self
                .loader
                .as_ref()
                .and_then(|loader| loader.last_error())
                .or(recipient.last_error),
            // The server fills this in: it knows its own peer policy.
            secret_peers: None,
            last_decrypt_age_ms: self
                .loader
                .as_ref()
                .and_then(|loader| loader.decrypt_age())
                .map(millis),
            audit: Some(self.audit.status()),
            last_good_load_unix_ms: self
                .loader
                .as_ref()
                .and_then(|loader| loader.last_good_load())
                .and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
                .map(millis),
            max_stale_ms: self
                .loader
                .as_ref()
                .map(|loader| millis(loader.max_stale())),
            breaker: self.loader.as_ref().map(|loader| {
                let b = loader.kms().breaker();
                BreakerStatus {
                    state: b.state.as_str().to_owned(),
                    consecutive_failures: u64::from(b.consecutive_failures),
                    next_probe_in_ms: b.next_probe_in.map(millis),
                    opened: b.opened,
                    last_failure: loader.kms().last_fault(),
                }
            }),
            kms_pins: self.loader.as_ref().map(|loader| {
                let kms = loader.kms();
                Box::new(KmsPins {
                    region: kms.region().unwrap_or_default(),
                    key_arns: kms
                        .pinned_keys()
                        .keys()
                        .iter()
                        .map(|key| key.as_str().to_owned())
                        .collect(),
                })
            }),
            kms: self.loader.as_ref().map(|loader| loader.kms().call_stats()),
            logs: self.logs.as_ref().map(|ring| ring.status()),
        }
    }

    /// A fresh attestation document binding the caller's `nonce` and
    /// `user_data`, and the current recipient public key (so a host app can
    /// also see which key KMS will encrypt to).
    ///
    /// The document's `user_data` is always
    /// [`ATTEST_USER_DATA_TAG`](keystore_shared::attestation::ATTEST_USER_DATA_TAG)
    /// followed by the caller's bytes (none: the tag alone), so a caller
    /// cannot make the enclave sign data another protocol would take for its
    /// own. The tag counts toward the NSM's field limit: a caller may send
    /// at most [`MAX_ATTEST_USER_DATA`] bytes.
    ///
    /// The NSM call blocks, so it runs on the blocking pool, at most
    /// [`MAX_CONCURRENT_ATTESTATIONS`] at a time.
    pub async fn attest(
        &self,
        nonce: Vec<u8>,
        user_data: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, ServiceError> {
        check_field("nonce", &nonce)?;
        if nonce.is_empty() {
            return Err(ServiceError::BadRequest(
                "nonce must not be empty: it is what proves the document is fresh".to_owned(),
            ));
        }
        if let Some(data) = &user_data
            && data.len() > MAX_ATTEST_USER_DATA
        {
            return Err(ServiceError::BadRequest(format!(
                "user_data is {} bytes; at most {MAX_ATTEST_USER_DATA} are allowed \
                 (the NSM's {MAX_ATTESTATION_FIELD} less the enclave's domain tag)",
                data.len()
            )));
        }
        let _permit =
            self.attestations.acquire().await.map_err(|_| {
                ServiceError::Unavailable("attestation is shutting down".to_owned())
            })?;
        let request = AttestationRequest {
            public_key: Some(self.recipient.current().spki_der().to_vec()),
            user_data: Some(attest_user_data(user_data.as_deref())),
            nonce: Some(nonce),
        };
        let nsm = self.nsm.clone();
        tokio::task::spawn_blocking(move || nsm.attest(&request))
            .await
            .map_err(|e| ServiceError::Internal(format!("attestation task failed: {e}")))?
            .map_err(|e| ServiceError::Unavailable(format!("attestation failed: {e}")))
    }
}

// The tagged `user_data` of the largest accepted caller data must still
// fit the NSM's field.
const _: () = assert!(
    MAX_ATTEST_USER_DATA + keystore_shared::attestation::ATTEST_USER_DATA_TAG.len()
        <= MAX_ATTESTATION_FIELD
);

/// Refuses attestation fields the NSM would refuse, before any NSM call.
fn check_field(field: &str, value: &[u8]) -> Result<(), ServiceError> {
    if value.len() > MAX_ATTESTATION_FIELD {
        return Err(ServiceError::BadRequest(format!(
            "{field} is {} bytes; at most {MAX_ATTESTATION_FIELD} are allowed",
            value.len()
        )));
    }
    Ok(())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
