//! Handling a `Load` (DESIGN.md, "The enclave's life", steps 2 and 5).
//!
//! A `Load` carries a whole secrets file as `ENC[...]` envelopes. Each value
//! is decrypted by KMS for the enclave's attested key with the encryption
//! context `{"keystore:name": <name>}` — the name binding: KMS refuses a
//! ciphertext presented under another name — and sealed into a new
//! [`SecretSetBuilder`](crate::store::SecretSetBuilder) the moment it
//! arrives. Only a complete success swaps the new set in; any failure leaves
//! the previous set serving and reports the entry (by name, never value) and
//! the stage that failed.
//!
//! Calls run with bounded concurrency. Retryable failures (throttling, 5xx,
//! dropped connections, timeouts) are retried with exponential backoff and
//! full jitter, bounded in attempts and in total time. If KMS refuses the
//! attestation document, the recipient pair is invalidated once (the
//! [`Recipient`] makes that single-flight across workers) and the call
//! retried with the new pair.
//!
//! [`Loader::reload_periodically`] decrypts the last good load again on a
//! timer and wipes the store when KMS says the enclave may no longer
//! decrypt (revocation), or when no (re-)decrypt has succeeded for
//! [`LoadConfig::max_stale`] (an enclave cut off from KMS cannot learn of a
//! revocation, so it does not serve forever).
//!
//! One lock serializes loads, re-decrypts and those wipes: a `Load` that
//! arrives during a re-decrypt runs after it (and after its wipe, if any),
//! and a re-decrypt queued behind a `Load` re-decrypts that load's entries,
//! so neither can overwrite the other with older state.
//!
//! An empty `Load` is refused unless [`LoadConfig::allow_empty`]: it would
//! wipe the set, which is never what a well-behaved loader means.
//!
//! A `Load` carrying the reserved `keystore:file` record is a file-key file
//! ([`crate::file_key`]): its data key is unwrapped with exactly one
//! `Decrypt` (retried like any value), the record's MAC, manifest and
//! version are checked before any value is opened, and its `fk` values are
//! opened locally; `kms` values in the same load still cost one `Decrypt`
//! each. The highest file version served is kept for the life of the
//! process (wipes included), so neither an older file nor a file without a
//! record is accepted after it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use std::collections::BTreeMap;

use keystore_shared::envelope::{Envelope, EnvelopeError, encryption_context};
use keystore_shared::file_record::FileKey;
use keystore_shared::name::{FILE_NAME, NameError};
use keystore_shared::protocol::{ErrorCode, LoadEntry};
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinSet;
use zeroize::Zeroizing;

use crate::file_key::{self, FileKeyError};
use crate::kms::{Kms, KmsError, KmsErrorCode};
use crate::recipient::{Recipient, RecipientError};
use crate::store::{Store, StoreError, validate_name};

/// Default number of KMS calls in flight during a load.
pub const DEFAULT_CONCURRENCY: usize = 8;
/// Default largest number of entries in one load.
pub const DEFAULT_MAX_ENTRIES: usize = keystore_shared::protocol::MAX_LOAD_ENTRIES;
/// Default attempts per value (first call included) on retryable failures.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
/// Default first backoff ceiling (the delay is uniform in `0..=ceiling`).
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Default largest backoff ceiling.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Default bound on a whole load.
pub const DEFAULT_MAX_DURATION: Duration = Duration::from_secs(120);
/// Default time without a successful (re-)decrypt after which the set is
/// wiped.
pub const DEFAULT_MAX_STALE: Duration = Duration::from_secs(24 * 3600);

/// Limits and retry policy of a load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadConfig {
    /// KMS calls in flight at once (at least 1).
    pub concurrency: usize,
    /// Most entries accepted in one load.
    pub max_entries: usize,
    /// Attempts per value on retryable failures (at least 1).
    pub max_attempts: u32,
    /// Backoff ceiling after the first failure; doubles per failure.
    pub initial_backoff: Duration,
    /// Largest backoff ceiling.
    pub max_backoff: Duration,
    /// Bound on the whole load, retries included.
    pub max_duration: Duration,
    /// Accept a `Load` with no entries (which empties the set).
    pub allow_empty: bool,
    /// Wipe the set once no load or re-decrypt has succeeded for this long
    /// (zero: never). Checked by [`Loader::reload_periodically`].
    pub max_stale: Duration,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            concurrency: DEFAULT_CONCURRENCY,
            max_entries: DEFAULT_MAX_ENTRIES,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            max_duration: DEFAULT_MAX_DURATION,
            allow_empty: false,
            max_stale: DEFAULT_MAX_STALE,
        }
    }
}

impl LoadConfig {
    /// Refuses values that would stall or spin a load.
    pub fn validate(&self) -> Result<(), LoadError> {
        let bad = |what: &'static str| Err(LoadError::Config(what));
        if self.concurrency == 0 {
            return bad("concurrency must be at least 1");
        }
        if self.max_attempts == 0 {
            return bad("max_attempts must be at least 1");
        }
        if self.max_backoff < self.initial_backoff {
            return bad("max_backoff must be >= initial_backoff");
        }
        if self.max_duration.is_zero() {
            return bad("max_duration must be > 0");
        }
        Ok(())
    }
}

/// What a successful load did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadReport {
    /// Secrets now loaded.
    pub count: usize,
    /// KMS `Decrypt` calls made (retries included).
    pub kms_calls: u64,
    /// Calls repeated after a retryable failure.
    pub retries: u64,
    /// Recipient pairs invalidated because KMS refused the document.
    pub invalidations: u64,
    /// Wall time of the load.
    pub duration: Duration,
    /// The store generation the load published.
    pub generation: u64,
}

/// Why a load failed. Names the entry (never its value) and the stage.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The loader's configuration is unusable.
    #[error("load configuration: {0}")]
    Config(&'static str),
    /// A `Load` with no entries, which would wipe the set.
    #[error(
        "load refused: the bundle has no entries and would wipe every secret; \
         start the enclave with --allow-empty if that is intended"
    )]
    Empty,
    /// More entries than allowed.
    #[error("load refused: {count} entries; at most {max} are accepted")]
    TooManyEntries {
        /// Entries in the request.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The same name twice.
    #[error("load refused: secret `{name}` appears more than once")]
    DuplicateName {
        /// The repeated name.
        name: String,
    },
    /// A name the store does not accept.
    #[error("load refused: {0}")]
    InvalidName(#[source] StoreError),
    /// An envelope that does not parse.
    #[error("secret `{name}`: envelope: {source}")]
    Envelope {
        /// The entry.
        name: String,
        /// Why.
        #[source]
        source: EnvelopeError,
    },
    /// KMS (or the way to it) failed for this entry.
    #[error("secret `{name}`: {source} (after {attempts} attempt(s))")]
    Kms {
        /// The entry.
        name: String,
        /// The last failure.
        #[source]
        source: KmsError,
        /// Calls made for this entry.
        attempts: u32,
    },
    /// The recipient pair could not be regenerated after KMS refused the
    /// attestation document.
    #[error("secret `{name}`: NSM: cannot regenerate the recipient pair: {source}")]
    Recipient {
        /// The entry.
        name: String,
        /// Why.
        #[source]
        source: RecipientError,
    },
    /// The decrypted value could not be stored (too large, ...).
    #[error("secret `{name}`: store: {source}")]
    Store {
        /// The entry.
        name: String,
        /// Why.
        #[source]
        source: StoreError,
    },
    /// The file record refused the load (MAC, manifest, version), or an
    /// `fk` value did not open.
    #[error("load refused: {0}")]
    FileKey(#[source] FileKeyError),
    /// The whole load took longer than allowed.
    #[error("load did not finish within {after:?}")]
    Deadline {
        /// The configured limit.
        after: Duration,
    },
    /// No KMS key is pinned in this enclave, so no load is accepted.
    #[error("load refused: {0}")]
    NoPinnedKey(#[source] KmsError),
    /// `reload` was asked before any load succeeded.
    #[error("nothing to re-decrypt: no load has succeeded yet")]
    NothingToReload,
    /// A worker task failed unexpectedly.
    #[error("load worker failed: {0}")]
    Internal(String),
}

impl LoadError {
    /// The entry that failed, if the failure is about one entry.
    pub fn name(&self) -> Option<&str> {
        match self {
            LoadError::DuplicateName { name }
            | LoadError::Envelope { name, .. }
            | LoadError::Kms { name, .. }
            | LoadError::Recipient { name, .. }
            | LoadError::Store { name, .. } => Some(name),
            LoadError::InvalidName(StoreError::InvalidName(NameError { name, .. })) => Some(name),
            LoadError::FileKey(err) => err.name(),
            _ => None,
        }
    }

    /// The stage that failed, as one word: `request`, `envelope`,
    /// `name-binding`, `nsm`, `store`, `deadline`, `internal`, or the KMS
    /// client's stage (`proxy-connect`, `tls`, `credentials`, `kms`, `cms`,
    /// `transport`).
    pub fn stage(&self) -> &'static str {
        match self {
            LoadError::Config(_) | LoadError::NoPinnedKey(_) => "config",
            LoadError::Empty
            | LoadError::TooManyEntries { .. }
            | LoadError::DuplicateName { .. }
            | LoadError::InvalidName(_) => "request",
            LoadError::Envelope { .. } => "envelope",
            LoadError::Kms { source, .. } => {
                if source.kms_code() == Some(&KmsErrorCode::InvalidCiphertext) {
                    "name-binding"
                } else {
                    source.stage()
                }
            }
            LoadError::Recipient { .. } => "nsm",
            LoadError::Store { .. } => "store",
            LoadError::FileKey(_) => "file-key",
            LoadError::Deadline { .. } => "deadline",
            LoadError::NothingToReload => "request",
            LoadError::Internal(_) => "internal",
        }
    }

    /// Whether KMS said this enclave may no longer decrypt: the key policy
    /// refuses it, or the key is disabled, pending deletion or gone. A
    /// periodic re-decrypt that ends this way must stop serving the secrets,
    /// or revoking the policy would never take effect.
    pub fn is_revocation(&self) -> bool {
        match self {
            LoadError::Kms { source, .. } => {
                source.kms_code().is_some_and(KmsErrorCode::is_revocation)
            }
            _ => false,
        }
    }

    /// The protocol error code to answer the `Load` with.
    pub fn code(&self) -> ErrorCode {
        match self {
            LoadError::TooManyEntries { .. } => ErrorCode::TooLarge,
            LoadError::Empty
            | LoadError::DuplicateName { .. }
            | LoadError::InvalidName(_)
            | LoadError::Envelope { .. }
            | LoadError::NothingToReload => ErrorCode::BadRequest,
            LoadError::Store {
                source: StoreError::ValueTooLarge { .. },
                ..
            } => ErrorCode::TooLarge,
            LoadError::Kms { source, .. }
                if source.is_retryable() || matches!(source, KmsError::BreakerOpen { .. }) =>
            {
                ErrorCode::Unavailable
            }
            LoadError::Kms {
                source: KmsError::Service { .. } | KmsError::UnpinnedKey { .. },
                ..
            }
            | LoadError::NoPinnedKey(_) => ErrorCode::Denied,
            LoadError::FileKey(err) if err.is_refusal() => ErrorCode::Denied,
            LoadError::FileKey(_) => ErrorCode::BadRequest,
            LoadError::Deadline { .. } => ErrorCode::Unavailable,
            _ => ErrorCode::Internal,
        }
    }
}

/// How a finished load ended, for `Status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadOutcome {
    /// The new set is in place.
    Loaded(LoadReport),
    /// The previous set stayed in place.
    Failed {
        /// [`LoadError::stage`].
        stage: &'static str,
        /// [`LoadError::name`].
        name: Option<String>,
        /// The error's message (no secret material).
        message: String,
    },
}

/// The last load's outcome and when it finished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastLoad {
    /// When the load finished.
    pub finished_at: SystemTime,
    /// How it ended.
    pub outcome: LoadOutcome,
}

/// Decrypts `Load` requests into the store. Loads are serialized, so a
/// slower earlier load can never overwrite a newer one.
pub struct Loader {
    kms: Kms,
    recipient: Recipient,
    store: Arc<Store>,
    config: LoadConfig,
    /// Held for the whole load, re-decrypt or wipe; also keeps the last
    /// good entries for [`Loader::reload`].
    running: Mutex<Option<Arc<Vec<LoadEntry>>>>,
    last: ArcSwapOption<LastLoad>,
    /// When a load or re-decrypt last succeeded (`None` before the first,
    /// and after a wipe).
    decrypted_at: std::sync::Mutex<Option<Instant>>,
    /// When a `Load` last succeeded (wall clock, for `status`).
    loaded_at: std::sync::Mutex<Option<SystemTime>>,
    /// The highest file-key version published since start (never lowered,
    /// not even by a wipe): the rollback bound.
    served_version: std::sync::Mutex<Option<u64>>,
}

/// What one periodic re-decrypt did.
#[derive(Debug)]
pub enum Maintenance {
    /// Nothing was loaded, so there was nothing to do.
    Idle,
    /// The set was decrypted again.
    Refreshed(LoadReport),
    /// The re-decrypt failed; the set stays (it is not stale yet).
    Kept(LoadError),
    /// The set was wiped, for this reason.
    Wiped(WipeReason),
}

/// Why the periodic maintenance wiped the set.
#[derive(Debug)]
pub enum WipeReason {
    /// KMS said the enclave may no longer decrypt.
    Revoked(LoadError),
    /// No (re-)decrypt succeeded for longer than [`LoadConfig::max_stale`].
    Stale {
        /// How long it had been.
        since: Duration,
        /// The last failure.
        last: Option<LoadError>,
    },
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("config", &self.config)
            .field("last", &self.last.load_full())
            .finish_non_exhaustive()
    }
}

/// Counters shared by the workers of one load.
#[derive(Default)]
struct Counters {
    kms_calls: AtomicU64,
    retries: AtomicU64,
    invalidations: AtomicU64,
}

/// One load's work, shared by its workers.
struct Job {
    kms: Kms,
    recipient: Recipient,
    config: LoadConfig,
    items: Vec<(String, Envelope)>,
    /// The file's keys once the record checked out (file-key loads only).
    file_key: std::sync::OnceLock<FileKey>,
    next: AtomicUsize,
    failed: AtomicBool,
    counters: Counters,
    deadline: Instant,
}

type WorkerResult = Result<(usize, Zeroizing<Vec<u8>>), LoadError>;

impl Loader {
    /// A loader publishing into `store`.
    pub fn new(
        kms: Kms,
        recipient: Recipient,
        store: Arc<Store>,
        config: LoadConfig,
    ) -> Result<Loader, LoadError> {
        config.validate()?;
        Ok(Loader {
            kms,
            recipient,
            store,
            config,
            running: Mutex::new(None),
            last: ArcSwapOption::empty(),
            decrypted_at: std::sync::Mutex::new(None),
            loaded_at: std::sync::Mutex::new(None),
            served_version: std::sync::Mutex::new(None),
        })
    }

    /// Time since a load or re-decrypt last succeeded, if one did since
    /// start (or since the last wipe).
    pub fn decrypt_age(&self) -> Option<Duration> {
        self.decrypted_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .map(|at| at.elapsed())
    }

    /// When a `Load` last succeeded (not reset by a wipe: it says when the
    /// host last delivered a good set).
    pub fn last_good_load(&self) -> Option<SystemTime> {
        *self
            .loaded_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The configured staleness bound (zero: none).
    pub fn max_stale(&self) -> Duration {
        self.config.max_stale
    }

    /// The highest file-key version this enclave has published, if any.
    pub fn served_version(&self) -> Option<u64> {
        *self
            .served_version
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn raise_served_version(&self, version: u64) {
        let mut served = self
            .served_version
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *served = Some(served.map_or(version, |v| v.max(version)));
    }

    fn set_decrypted_at(&self, at: Option<Instant>) {
        *self
            .decrypted_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = at;
    }

    /// The last load's outcome, if any load has finished.
    pub fn last_load(&self) -> Option<Arc<LastLoad>> {
        self.last.load_full()
    }

    /// The last load's error message if it failed (for `Status.last_error`).
    pub fn last_error(&self) -> Option<String> {
        match &self.last.load().as_deref()?.outcome {
            LoadOutcome::Failed { message, .. } => Some(message.clone()),
            LoadOutcome::Loaded(_) => None,
        }
    }

    /// The KMS client (for status counters).
    pub fn kms(&self) -> &Kms {
        &self.kms
    }

    /// Decrypts every entry and, only if all succeed, replaces the store's
    /// set. On failure the previous set stays.
    pub async fn load(&self, entries: Vec<LoadEntry>) -> Result<LoadReport, LoadError> {
        if entries.is_empty() && !self.config.allow_empty {
            let result = Err(LoadError::Empty);
            self.record(&result);
            return result;
        }
        let mut running = self.running.lock().await;
        let entries = Arc::new(entries);
        let result = self.run(&entries).await;
        if result.is_ok() {
            *running = Some(entries);
            self.set_decrypted_at(Some(Instant::now()));
            *self
                .loaded_at
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(SystemTime::now());
        }
        self.record(&result);
        result
    }

    /// Re-decrypts the last successfully loaded entries (the TTL refresh of
    /// step 5, so a revoked key policy takes effect).
    pub async fn reload(&self) -> Result<LoadReport, LoadError> {
        let running = self.running.lock().await;
        let result = match running.as_ref() {
            Some(entries) => self.run(entries).await,
            None => Err(LoadError::NothingToReload),
        };
        if result.is_ok() {
            self.set_decrypted_at(Some(Instant::now()));
        }
        self.record(&result);
        result
    }

    /// One periodic step, under the load lock from start to end: re-decrypt
    /// the last good load (when `redecrypt`), then wipe the set if KMS
    /// revoked this enclave or if nothing succeeded for
    /// [`LoadConfig::max_stale`]. Holding the lock through the wipe means a
    /// `Load` that arrived meanwhile is applied after it, never wiped.
    pub async fn maintain(&self, redecrypt: bool) -> Maintenance {
        let mut running = self.running.lock().await;
        let Some(entries) = running.clone() else {
            return Maintenance::Idle;
        };
        let failure = if redecrypt {
            let result = self.run(&entries).await;
            self.record(&result);
            match result {
                Ok(report) => {
                    self.set_decrypted_at(Some(Instant::now()));
                    return Maintenance::Refreshed(report);
                }
                Err(err) if err.is_revocation() => {
                    self.wipe(&mut running);
                    return Maintenance::Wiped(WipeReason::Revoked(err));
                }
                Err(err) => Some(err),
            }
        } else {
            None
        };
        let since = self.decrypt_age();
        let stale = !self.config.max_stale.is_zero()
            && since.is_none_or(|age| age >= self.config.max_stale);
        if stale {
            self.wipe(&mut running);
            return Maintenance::Wiped(WipeReason::Stale {
                since: since.unwrap_or_default(),
                last: failure,
            });
        }
        match failure {
            Some(err) => Maintenance::Kept(err),
            None => Maintenance::Idle,
        }
    }

    /// Empties the store and forgets the entries (a later re-decrypt must
    /// not bring them back; the host's loader sends a fresh `Load`).
    fn wipe(&self, running: &mut Option<Arc<Vec<LoadEntry>>>) {
        self.store.clear();
        *running = None;
        self.set_decrypted_at(None);
    }

    /// Re-decrypts the last good load every `every` until `stop`
    /// completes, so a revoked key policy stops the enclave serving within
    /// one period: when KMS refuses ([`LoadError::is_revocation`]), the
    /// store is wiped. Any other failure (KMS unreachable, throttled) keeps
    /// the current secrets until none has succeeded for
    /// [`LoadConfig::max_stale`]; all of it is reported in `Status`.
    ///
    /// With `every` zero there is no re-decrypt, but staleness is still
    /// checked (every quarter of `max_stale`, at least once a second).
    /// Each step is [`Loader::maintain`].
    pub async fn reload_periodically(&self, every: Duration, stop: impl Future<Output = ()>) {
        let redecrypt = !every.is_zero();
        let period = if redecrypt {
            every
        } else if self.config.max_stale.is_zero() {
            // Nothing to do at all.
            stop.await;
            return;
        } else {
            (self.config.max_stale / 4).max(Duration::from_secs(1))
        };
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await; // the first tick is immediate
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = ticks.tick() => {}
            }
            match self.maintain(redecrypt).await {
                Maintenance::Idle => {}
                Maintenance::Refreshed(report) => {
                    tracing::info!(count = report.count, "periodic re-decrypt succeeded")
                }
                Maintenance::Kept(err) => {
                    tracing::warn!(error = %err, "periodic re-decrypt failed; keeping the current secrets")
                }
                Maintenance::Wiped(WipeReason::Revoked(err)) => {
                    tracing::error!(error = %err, "KMS no longer allows this enclave: secrets wiped");
                }
                Maintenance::Wiped(WipeReason::Stale { since, last }) => {
                    let message = format!(
                        "no load or re-decrypt succeeded for {} s (--max-stale {} s): secrets wiped",
                        since.as_secs(),
                        self.config.max_stale.as_secs()
                    );
                    tracing::error!(
                        last_error = last.as_ref().map(ToString::to_string),
                        "{message}"
                    );
                    self.last.store(Some(Arc::new(LastLoad {
                        finished_at: SystemTime::now(),
                        outcome: LoadOutcome::Failed {
                            stage: "stale",
                            name: None,
                            message,
                        },
                    })));
                }
            }
        }
    }

    fn record(&self, result: &Result<LoadReport, LoadError>) {
        let outcome = match result {
            Ok(report) => {
                tracing::info!(
                    count = report.count,
                    kms_calls = report.kms_calls,
                    retries = report.retries,
                    invalidations = report.invalidations,
                    duration_ms = u64::try_from(report.duration.as_millis()).unwrap_or(u64::MAX),
                    generation = report.generation,
                    "secrets loaded"
                );
                LoadOutcome::Loaded(report.clone())
            }
            Err(e) => {
                tracing::warn!(stage = e.stage(), name = e.name(), error = %e, "load failed; the previous secrets stay in place");
                LoadOutcome::Failed {
                    stage: e.stage(),
                    name: e.name().map(str::to_owned),
                    message: e.to_string(),
                }
            }
        };
        self.last.store(Some(Arc::new(LastLoad {
            finished_at: SystemTime::now(),
            outcome,
        })));
    }

    async fn run(&self, entries: &[LoadEntry]) -> Result<LoadReport, LoadError> {
        let started = Instant::now();
        // Before anything else: an enclave without a pinned key would
        // otherwise report the first entry as failing.
        if self.kms.pinned_keys().is_empty() {
            return Err(LoadError::NoPinnedKey(KmsError::NoPinnedKey));
        }
        let mut items = self.check(entries)?;
        let record = file_key::split(&mut items).map_err(LoadError::FileKey)?;
        let served = self.served_version();
        if record.is_none() {
            file_key::check_without_record(served).map_err(LoadError::FileKey)?;
        }
        let count = items.len();
        let job = Arc::new(Job {
            kms: self.kms.clone(),
            recipient: self.recipient.clone(),
            config: self.config.clone(),
            items,
            file_key: std::sync::OnceLock::new(),
            next: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            counters: Counters::default(),
            deadline: started + self.config.max_duration,
        });
        // Boxed: the nested futures of the server would otherwise exceed
        // the compiler's layout depth.
        let work = Box::pin(async {
            if let Some(record) = &record {
                // The one KMS call of a file-key file.
                let data_key = decrypt_blob(
                    &job,
                    FILE_NAME,
                    &record.wrapped_key,
                    &record.file_id.context(),
                )
                .await?;
                let key = FileKey::derive(&data_key, record.file_id)
                    .map_err(|e| LoadError::FileKey(FileKeyError::Record(e)))?;
                drop(data_key);
                file_key::check(&key, record, &job.items, served).map_err(LoadError::FileKey)?;
                if job.file_key.set(key).is_err() {
                    return Err(LoadError::Internal("file key set twice".into()));
                }
            }
            self.decrypt_all(&job).await
        });
        let set = tokio::time::timeout(self.config.max_duration, work)
            .await
            .map_err(|_| LoadError::Deadline {
                after: self.config.max_duration,
            })??;
        let generation = self.store.replace(set);
        if let Some(record) = &record {
            self.raise_served_version(record.version);
        }
        Ok(LoadReport {
            count,
            kms_calls: job.counters.kms_calls.load(Ordering::Relaxed),
            retries: job.counters.retries.load(Ordering::Relaxed),
            invalidations: job.counters.invalidations.load(Ordering::Relaxed),
            duration: started.elapsed(),
            generation,
        })
    }

    /// Limits, names, duplicates and envelopes, all before any KMS call.
    fn check(&self, entries: &[LoadEntry]) -> Result<Vec<(String, Envelope)>, LoadError> {
        if entries.len() > self.config.max_entries {
            return Err(LoadError::TooManyEntries {
                count: entries.len(),
                max: self.config.max_entries,
            });
        }
        let mut seen = std::collections::HashSet::with_capacity(entries.len());
        let mut items = Vec::with_capacity(entries.len());
        for entry in entries {
            validate_name(&entry.name).map_err(LoadError::InvalidName)?;
            if !seen.insert(entry.name.as_str()) {
                return Err(LoadError::DuplicateName {
                    name: entry.name.clone(),
                });
            }
            let envelope =
                Envelope::parse(&entry.envelope).map_err(|source| LoadError::Envelope {
                    name: entry.name.clone(),
                    source,
                })?;
            items.push((entry.name.clone(), envelope));
        }
        Ok(items)
    }

    async fn decrypt_all(&self, job: &Arc<Job>) -> Result<crate::store::SecretSet, LoadError> {
        let count = job.items.len();
        let workers = self.config.concurrency.min(count);
        let mut builder = self.store.builder();
        if count == 0 {
            return Ok(builder.build());
        }
        let (tx, mut rx) = mpsc::channel::<WorkerResult>(workers.max(1) * 2);
        let mut tasks = JoinSet::new();
        for _ in 0..workers {
            tasks.spawn(worker(job.clone(), tx.clone()));
        }
        drop(tx);
        // Dropping `tasks` on an early return aborts the other workers.
        while let Some(result) = rx.recv().await {
            let (index, value) = match result {
                Ok(done) => done,
                Err(e) => {
                    job.failed.store(true, Ordering::Relaxed);
                    if matches!(
                        e,
                        LoadError::Kms {
                            source: KmsError::BreakerOpen { .. },
                            ..
                        }
                    ) {
                        // Another worker's call may be the breaker's
                        // half-open probe: aborting it would leave the
                        // breaker open for good whenever loads are all
                        // the traffic (each load's probe cancelled by its
                        // own fast failures). Let in-flight calls end
                        // (`failed` stops retries and new entries; each
                        // call is bounded by the KMS timeouts).
                        drop(rx);
                        while tasks.join_next().await.is_some() {}
                    }
                    return Err(e);
                }
            };
            let name = job
                .items
                .get(index)
                .map(|(name, _)| name.clone())
                .ok_or_else(|| LoadError::Internal("worker returned an unknown entry".into()))?;
            builder
                .insert(name.clone(), value)
                .map_err(|source| LoadError::Store { name, source })?;
        }
        while let Some(joined) = tasks.join_next().await {
            joined.map_err(|e| LoadError::Internal(e.to_string()))?;
        }
        if builder.len() != count {
            return Err(LoadError::Internal(format!(
                "{} of {count} values decrypted",
                builder.len()
            )));
        }
        Ok(builder.build())
    }
}

/// Takes entries until none are left or the load failed, sending each
/// result to the collector.
async fn worker(job: Arc<Job>, tx: mpsc::Sender<WorkerResult>) {
    loop {
        if job.failed.load(Ordering::Relaxed) {
            return;
        }
        let index = job.next.fetch_add(1, Ordering::Relaxed);
        let Some((name, envelope)) = job.items.get(index) else {
            return;
        };
        let result = decrypt_entry(&job, name, envelope).await;
        let failed = result.is_err();
        if tx.send(result.map(|value| (index, value))).await.is_err() || failed {
            return;
        }
    }
}

/// One value: `fk` values open under the file key; `kms` values go to KMS.
async fn decrypt_entry(
    job: &Job,
    name: &str,
    envelope: &Envelope,
) -> Result<Zeroizing<Vec<u8>>, LoadError> {
    match envelope {
        Envelope::Kms { ciphertext } => {
            decrypt_blob(job, name, ciphertext, &encryption_context(name)).await
        }
        Envelope::Fk { .. } => {
            let key = job.file_key.get().ok_or_else(|| {
                LoadError::FileKey(FileKeyError::NoRecord {
                    name: name.to_owned(),
                })
            })?;
            key.open(name, envelope)
                .map_err(|e| LoadError::FileKey(FileKeyError::Open(e)))
        }
        Envelope::File { .. } => Err(LoadError::FileKey(FileKeyError::MisplacedRecord {
            name: name.to_owned(),
        })),
    }
}

/// One KMS `Decrypt` of `ciphertext` with `context`, for the entry `name`:
/// retries on retryable failures, one invalidation on an attestation
/// refusal.
async fn decrypt_blob(
    job: &Job,
    name: &str,
    ciphertext: &[u8],
    context: &BTreeMap<String, String>,
) -> Result<Zeroizing<Vec<u8>>, LoadError> {
    let mut attempts: u32 = 0;
    let mut invalidated = false;
    let mut ceiling = job.config.initial_backoff;
    loop {
        let pair = job.recipient.current();
        attempts += 1;
        job.counters.kms_calls.fetch_add(1, Ordering::Relaxed);
        let error = match job
            .kms
            .decrypt_for_recipient(ciphertext, context, &pair)
            .await
        {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        if error.is_attestation_refusal() && !invalidated {
            invalidated = true;
            job.counters.invalidations.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(name, generation = pair.generation(), error = %error, "KMS refused the attestation document; regenerating the recipient pair");
            job.recipient
                .invalidate(&pair)
                .await
                .map_err(|source| LoadError::Recipient {
                    name: name.to_owned(),
                    source,
                })?;
            continue;
        }
        let delay = full_jitter(ceiling);
        let in_time = Instant::now()
            .checked_add(delay)
            .is_some_and(|at| at < job.deadline);
        if !error.is_retryable()
            || attempts >= job.config.max_attempts
            || !in_time
            || job.failed.load(Ordering::Relaxed)
        {
            return Err(LoadError::Kms {
                name: name.to_owned(),
                source: error,
                attempts,
            });
        }
        job.counters.retries.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(name, attempts, delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), error = %error, "retrying KMS Decrypt");
        tokio::time::sleep(delay).await;
        ceiling = ceiling.saturating_mul(2).min(job.config.max_backoff);
    }
}

/// "Full jitter": uniform in `0..=ceiling`, so many workers hitting the same
/// throttle spread out instead of retrying in lock-step.
fn full_jitter(ceiling: Duration) -> Duration {
    let micros = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
    Duration::from_micros(rand::random_range(0..=micros))
}
