//! The RSA recipient key and its attestation document (DESIGN.md, "The
//! enclave's life", steps 1 and 4).
//!
//! KMS encrypts `Decrypt` results to the public key inside an attestation
//! document and refuses documents older than five minutes. So the enclave
//! keeps a [`RecipientPair`] (key + SPKI + document) published for lock-free
//! reads, and a background task replaces it before the document turns
//! [`RecipientConfig::refresh_after`] old.
//!
//! RSA key generation takes hundreds of milliseconds to seconds, far too long
//! for a request to wait on. Two things keep it off every request path:
//! - generation runs on the blocking pool (`spawn_blocking`), never on an
//!   async worker;
//! - the *next* key is generated as soon as a pair is published, so a
//!   rotation (scheduled, or forced by [`Recipient::invalidate`]) only has to
//!   ask the NSM for a document, which is fast.
//!
//! Callers take an `Arc<RecipientPair>` snapshot per KMS call and use that
//! same snapshot to open the response, so a rotation in the middle of a call
//! can never leave a response that no key can open. An old key is dropped
//! (and wiped: `rsa`'s private key zeroizes its secret components on drop)
//! when the last call holding it finishes.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use rsa::PrivateKey;
use rsa::pkcs8::EncodePublicKey;
use sha2::{Digest, Sha256};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use keystore_nsm::entropy::{EntropyError, MixedRng};
use keystore_nsm::{AttestationRequest, Nsm, NsmError};

/// The oldest attestation document KMS accepts. A refresh interval at or
/// beyond this would publish documents KMS already refuses.
pub const MAX_DOCUMENT_AGE: Duration = Duration::from_secs(5 * 60);

/// Default age at which the pair is replaced: a minute of margin below
/// [`MAX_DOCUMENT_AGE`] for clock skew and in-flight calls.
pub const DEFAULT_REFRESH_AFTER: Duration = Duration::from_secs(4 * 60);

/// Domain separator for the key-generation RNG seed.
const KEYGEN_RNG_DOMAIN: &[u8] = b"nitro-keystore/recipient/keygen-rng/v1";

/// Allowed RSA modulus sizes for the recipient key.
///
/// KMS accepts 2048-, 3072- and 4096-bit recipient keys; 4096 is the default
/// because the key protects every secret the enclave ever decrypts, and the
/// generation cost is hidden by pre-generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RecipientBits {
    /// 2048-bit modulus (fast; fine for tests).
    B2048,
    /// 3072-bit modulus.
    B3072,
    /// 4096-bit modulus (default).
    #[default]
    B4096,
}

impl RecipientBits {
    /// The modulus size in bits.
    pub fn bits(self) -> usize {
        match self {
            RecipientBits::B2048 => 2048,
            RecipientBits::B3072 => 3072,
            RecipientBits::B4096 => 4096,
        }
    }
}

impl TryFrom<u32> for RecipientBits {
    type Error = RecipientError;

    fn try_from(bits: u32) -> Result<Self, Self::Error> {
        match bits {
            2048 => Ok(RecipientBits::B2048),
            3072 => Ok(RecipientBits::B3072),
            4096 => Ok(RecipientBits::B4096),
            other => Err(RecipientError::UnsupportedBits(other.to_string())),
        }
    }
}

impl FromStr for RecipientBits {
    type Err = RecipientError;

    /// Parses `--recipient-bits 2048|3072|4096`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim()
            .parse::<u32>()
            .map_err(|_| RecipientError::UnsupportedBits(s.chars().take(16).collect()))
            .and_then(RecipientBits::try_from)
    }
}

impl fmt::Display for RecipientBits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.bits())
    }
}

/// Why the recipient key or its document could not be produced.
///
/// None of these carry key material; NSM messages are the device's own.
#[derive(Debug, thiserror::Error)]
pub enum RecipientError {
    /// A modulus size other than 2048, 3072 or 4096.
    #[error("unsupported recipient key size `{0}` (allowed: 2048, 3072, 4096)")]
    UnsupportedBits(String),
    /// A configuration value that would make the refresher misbehave.
    #[error("invalid recipient configuration: {0}")]
    InvalidConfig(&'static str),
    /// The NSM or the OS could not provide randomness for key generation.
    #[error("cannot seed recipient key generation: {0}")]
    Entropy(#[from] EntropyError),
    /// RSA key generation failed.
    #[error("RSA key generation failed: {0}")]
    KeyGeneration(String),
    /// The public key could not be encoded as SubjectPublicKeyInfo.
    #[error("cannot encode the recipient public key: {0}")]
    Encoding(String),
    /// The NSM refused or failed to produce an attestation document.
    #[error("attestation failed: {0}")]
    Attestation(#[source] NsmError),
    /// A blocking task (key generation or attestation) panicked or was
    /// cancelled.
    #[error("background {what} task failed: {reason}")]
    TaskFailed {
        /// Which task.
        what: &'static str,
        /// The join error.
        reason: String,
    },
}

/// How the recipient key is generated and refreshed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecipientConfig {
    /// RSA modulus size.
    pub bits: RecipientBits,
    /// Replace the pair once its document is this old (default 4 minutes;
    /// must be below [`MAX_DOCUMENT_AGE`]).
    pub refresh_after: Duration,
    /// First delay before retrying a failed refresh; doubles per failure.
    pub retry_initial: Duration,
    /// Longest delay between refresh retries.
    pub retry_max: Duration,
}

impl Default for RecipientConfig {
    fn default() -> Self {
        RecipientConfig {
            bits: RecipientBits::default(),
            refresh_after: DEFAULT_REFRESH_AFTER,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
        }
    }
}

impl RecipientConfig {
    /// Rejects values that would spin the refresher or publish documents
    /// KMS refuses.
    pub fn validate(&self) -> Result<(), RecipientError> {
        if self.refresh_after.is_zero() {
            return Err(RecipientError::InvalidConfig("refresh_after must be > 0"));
        }
        if self.refresh_after >= MAX_DOCUMENT_AGE {
            return Err(RecipientError::InvalidConfig(
                "refresh_after must be below KMS's 5-minute document age limit",
            ));
        }
        if self.retry_initial.is_zero() {
            return Err(RecipientError::InvalidConfig("retry_initial must be > 0"));
        }
        if self.retry_max < self.retry_initial {
            return Err(RecipientError::InvalidConfig(
                "retry_max must be >= retry_initial",
            ));
        }
        Ok(())
    }
}

/// Generates a recipient key and its DER SubjectPublicKeyInfo. Blocking and
/// slow (CPU-bound): async code runs it through `spawn_blocking`.
pub fn generate_recipient_key(
    nsm: &dyn Nsm,
    bits: RecipientBits,
) -> Result<KeyAndSpki, RecipientError> {
    // OS bytes XORed with a stream seeded from NSM and OS randomness: a weak
    // source alone does not make the key predictable.
    let mut rng = MixedRng::new(nsm, KEYGEN_RNG_DOMAIN)?;
    let key = PrivateKey::new(&mut rng, bits.bits())
        .map_err(|e| RecipientError::KeyGeneration(e.to_string()))?;
    let spki_der = key
        .to_public_key()
        .to_public_key_der()
        .map_err(|e| RecipientError::Encoding(e.to_string()))?
        .into_vec();
    Ok((key, spki_der))
}

/// A recipient key, its SPKI and the attestation document binding it.
///
/// Immutable once published, so every field always belongs to the same key.
/// Hold the `Arc` for the whole KMS call that used it.
pub struct RecipientPair {
    key: PrivateKey,
    spki_der: Vec<u8>,
    document: Vec<u8>,
    created: Instant,
    created_at: SystemTime,
    bits: RecipientBits,
    generation: u64,
}

impl RecipientPair {
    /// The private key, for opening `CiphertextForRecipient`.
    pub fn key(&self) -> &PrivateKey {
        &self.key
    }

    /// DER SubjectPublicKeyInfo of the key (what the document's
    /// `public_key` carries; its SHA-256 is the CMS subjectKeyIdentifier).
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The raw `COSE_Sign1` attestation document to send as KMS `Recipient`.
    pub fn document(&self) -> &[u8] {
        &self.document
    }

    /// When the document was requested (monotonic). Taken just before the
    /// NSM call so the computed age never understates the real one.
    pub fn created(&self) -> Instant {
        self.created
    }

    /// Wall-clock time matching [`RecipientPair::created`], for status output.
    pub fn created_at(&self) -> SystemTime {
        self.created_at
    }

    /// Age of the attestation document.
    pub fn document_age(&self) -> Duration {
        self.created.elapsed()
    }

    /// The key size.
    pub fn bits(&self) -> RecipientBits {
        self.bits
    }

    /// Publication number: 1 for the first pair, +1 per replacement.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

impl fmt::Debug for RecipientPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let spki_hash = Sha256::digest(&self.spki_der);
        f.debug_struct("RecipientPair")
            .field("generation", &self.generation)
            .field("bits", &self.bits.bits())
            .field("spki_sha256", &hex::encode(spki_hash))
            .field("document_len", &self.document.len())
            .field("document_age", &self.document_age())
            .finish_non_exhaustive()
    }
}

/// A snapshot of the recipient lifecycle for `Status` responses and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecipientStatus {
    /// Generation of the published pair.
    pub generation: u64,
    /// Key size.
    pub bits: RecipientBits,
    /// Age of the published document.
    pub document_age: Duration,
    /// Successful replacements since start (the first pair not counted).
    pub refreshes: u64,
    /// Failed refresh attempts since start.
    pub failures: u64,
    /// The last refresh error, cleared by the next success.
    pub last_error: Option<String>,
    /// Keys generated so far (including the one being prepared, once done).
    pub keys_generated: u64,
    /// Rotations that found the next key already generated.
    pub prepared_keys_used: u64,
    /// Rotations that had to wait for key generation.
    pub keygen_waits: u64,
    /// How long the most recent key generation took.
    pub last_keygen: Option<Duration>,
    /// Whether the next key is generated and waiting (false while a
    /// rotation is using it).
    pub next_key_ready: bool,
}

/// A generated key and its DER SubjectPublicKeyInfo.
type KeyAndSpki = (PrivateKey, Vec<u8>);

/// The next key: generated ahead of time so rotations don't wait for it.
enum NextKey {
    /// Nothing prepared (a previous generation failed).
    Empty,
    /// Being generated on the blocking pool.
    Pending(JoinHandle<Result<KeyAndSpki, RecipientError>>),
    /// Generated and waiting.
    Ready(Box<PrivateKey>, Vec<u8>),
}

#[derive(Default)]
struct Stats {
    refreshes: AtomicU64,
    failures: AtomicU64,
    keys_generated: AtomicU64,
    prepared_keys_used: AtomicU64,
    keygen_waits: AtomicU64,
    last_keygen_micros: AtomicU64,
    last_error: ArcSwapOption<String>,
}

struct Inner {
    nsm: Arc<dyn Nsm>,
    config: RecipientConfig,
    current: ArcSwap<RecipientPair>,
    /// The prepared key. Its lock also makes rotations single-flight.
    next: Mutex<NextKey>,
    /// Announces each newly published generation to the refresher.
    published: watch::Sender<u64>,
    stats: Arc<Stats>,
}

/// The enclave's recipient key lifecycle. Cheap to clone; all clones share
/// the same published pair.
#[derive(Clone)]
pub struct Recipient {
    inner: Arc<Inner>,
}

/// Owns the background refresher. Dropping it, or calling
/// [`RecipientHandle::shutdown`], stops refreshing; the published pair stays
/// readable.
#[must_use = "dropping the handle stops the background refresher"]
pub struct RecipientHandle {
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RecipientHandle {
    /// Stops the refresher and waits for it to exit.
    pub async fn shutdown(self) -> Result<(), RecipientError> {
        self.shutdown.send_replace(true);
        self.task.await.map_err(|e| RecipientError::TaskFailed {
            what: "refresher",
            reason: e.to_string(),
        })
    }
}

impl fmt::Debug for RecipientHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecipientHandle")
            .field("finished", &self.task.is_finished())
            .finish()
    }
}

fn spawn_keygen(
    nsm: Arc<dyn Nsm>,
    bits: RecipientBits,
    stats: Arc<Stats>,
) -> JoinHandle<Result<KeyAndSpki, RecipientError>> {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let result = generate_recipient_key(nsm.as_ref(), bits);
        if result.is_ok() {
            let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            stats.last_keygen_micros.store(micros, Ordering::Relaxed);
            stats.keys_generated.fetch_add(1, Ordering::Relaxed);
        }
        result
    })
}

/// Asks the NSM (on the blocking pool) for a document binding `spki_der`.
async fn attest(nsm: Arc<dyn Nsm>, spki_der: Vec<u8>) -> Result<Vec<u8>, RecipientError> {
    tokio::task::spawn_blocking(move || {
        nsm.attest(&AttestationRequest {
            public_key: Some(spki_der),
            ..Default::default()
        })
    })
    .await
    .map_err(|e| RecipientError::TaskFailed {
        what: "attestation",
        reason: e.to_string(),
    })?
    .map_err(RecipientError::Attestation)
}

fn join_keygen(
    joined: Result<Result<KeyAndSpki, RecipientError>, tokio::task::JoinError>,
) -> Result<KeyAndSpki, RecipientError> {
    joined.map_err(|e| RecipientError::TaskFailed {
        what: "key generation",
        reason: e.to_string(),
    })?
}

impl Recipient {
    /// Generates and attests the first pair (awaited: the enclave cannot
    /// serve before it has one), starts generating its successor, and spawns
    /// the background refresher.
    pub async fn start(
        nsm: Arc<dyn Nsm>,
        config: RecipientConfig,
    ) -> Result<(Recipient, RecipientHandle), RecipientError> {
        config.validate()?;
        let stats = Arc::new(Stats::default());
        let (key, spki_der) =
            join_keygen(spawn_keygen(nsm.clone(), config.bits, stats.clone()).await)?;
        let created = Instant::now();
        let created_at = SystemTime::now();
        let document = attest(nsm.clone(), spki_der.clone()).await?;
        let pair = RecipientPair {
            key,
            spki_der,
            document,
            created,
            created_at,
            bits: config.bits,
            generation: 1,
        };
        tracing::info!(
            generation = 1,
            bits = config.bits.bits(),
            "recipient key published"
        );
        let next = spawn_keygen(nsm.clone(), config.bits, stats.clone());
        let (published, _) = watch::channel(1);
        let inner = Arc::new(Inner {
            nsm,
            config,
            current: ArcSwap::from_pointee(pair),
            next: Mutex::new(NextKey::Pending(next)),
            published,
            stats,
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(refresher(inner.clone(), shutdown_rx));
        Ok((Recipient { inner }, RecipientHandle { shutdown, task }))
    }

    /// The published pair. Lock-free; hold the returned `Arc` for the whole
    /// KMS call that uses it.
    pub fn current(&self) -> Arc<RecipientPair> {
        self.inner.current.load_full()
    }

    /// Forces a new pair because KMS rejected `rejected`'s document.
    ///
    /// Single-flight: if `rejected` is no longer the published pair (another
    /// caller or the refresher already replaced it), the current pair is
    /// returned without another rotation, so N callers that saw the same
    /// rejection cause one regeneration. Uses the pre-generated key, so this
    /// normally costs one NSM call, not a key generation.
    pub async fn invalidate(
        &self,
        rejected: &RecipientPair,
    ) -> Result<Arc<RecipientPair>, RecipientError> {
        self.inner.rotate(rejected.generation).await
    }

    /// Counters, errors and ages for `Status`.
    pub fn status(&self) -> RecipientStatus {
        let pair = self.inner.current.load();
        let stats = &self.inner.stats;
        let micros = stats.last_keygen_micros.load(Ordering::Relaxed);
        let next_key_ready = match self.inner.next.try_lock() {
            Ok(next) => match &*next {
                NextKey::Ready(..) => true,
                NextKey::Pending(handle) => handle.is_finished(),
                NextKey::Empty => false,
            },
            Err(_) => false,
        };
        RecipientStatus {
            generation: pair.generation,
            bits: pair.bits,
            document_age: pair.document_age(),
            refreshes: stats.refreshes.load(Ordering::Relaxed),
            failures: stats.failures.load(Ordering::Relaxed),
            last_error: stats.last_error.load_full().map(|e| (*e).clone()),
            keys_generated: stats.keys_generated.load(Ordering::Relaxed),
            prepared_keys_used: stats.prepared_keys_used.load(Ordering::Relaxed),
            keygen_waits: stats.keygen_waits.load(Ordering::Relaxed),
            last_keygen: (micros > 0).then(|| Duration::from_micros(micros)),
            next_key_ready,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &RecipientConfig {
        &self.inner.config
    }
}

impl fmt::Debug for Recipient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recipient")
            .field("current", &*self.inner.current.load())
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// Replaces the pair if generation `seen` is still published.
    async fn rotate(&self, seen: u64) -> Result<Arc<RecipientPair>, RecipientError> {
        let mut next = self.next.lock().await;
        let current = self.current.load_full();
        if current.generation != seen {
            return Ok(current);
        }
        match self.publish_locked(&mut next, seen + 1).await {
            Ok(pair) => {
                self.stats.refreshes.fetch_add(1, Ordering::Relaxed);
                self.stats.last_error.store(None);
                tracing::info!(
                    generation = pair.generation,
                    bits = pair.bits.bits(),
                    "recipient key rotated"
                );
                Ok(pair)
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                self.stats.last_error.store(Some(Arc::new(e.to_string())));
                tracing::warn!(error = %e, generation = seen, "recipient refresh failed; keeping the current pair");
                Err(e)
            }
        }
    }

    /// Attests the prepared key (generating it first if needed) and publishes
    /// it as `generation`. Called with the `next` lock held.
    ///
    /// Cancellation-safe: the prepared key stays in the slot until the
    /// document is in hand, so a dropped caller or a failed NSM call leaves
    /// it for the next attempt.
    async fn publish_locked(
        &self,
        next: &mut NextKey,
        generation: u64,
    ) -> Result<Arc<RecipientPair>, RecipientError> {
        let was_ready = match &*next {
            NextKey::Ready(..) => true,
            NextKey::Pending(handle) => handle.is_finished(),
            NextKey::Empty => false,
        };
        if was_ready {
            self.stats
                .prepared_keys_used
                .fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.keygen_waits.fetch_add(1, Ordering::Relaxed);
        }
        let spki_der = loop {
            match next {
                NextKey::Ready(_, spki_der) => break spki_der.clone(),
                NextKey::Pending(handle) => {
                    let joined = join_keygen(handle.await);
                    match joined {
                        Ok((key, spki_der)) => *next = NextKey::Ready(Box::new(key), spki_der),
                        Err(e) => {
                            *next = NextKey::Empty;
                            return Err(e);
                        }
                    }
                }
                NextKey::Empty => {
                    *next = NextKey::Pending(spawn_keygen(
                        self.nsm.clone(),
                        self.config.bits,
                        self.stats.clone(),
                    ))
                }
            }
        };
        let created = Instant::now();
        let created_at = SystemTime::now();
        let document = attest(self.nsm.clone(), spki_der).await?;
        let successor = spawn_keygen(self.nsm.clone(), self.config.bits, self.stats.clone());
        let (key, spki_der) = match std::mem::replace(next, NextKey::Pending(successor)) {
            NextKey::Ready(key, spki_der) => (key, spki_der),
            // Unreachable: the loop above only exits on `Ready` and we hold
            // the lock. Handled anyway rather than panicking.
            other => {
                if let NextKey::Pending(successor) = std::mem::replace(next, other) {
                    successor.abort();
                }
                return Err(RecipientError::TaskFailed {
                    what: "key preparation",
                    reason: "prepared key vanished".into(),
                });
            }
        };
        let pair = Arc::new(RecipientPair {
            key: *key,
            spki_der,
            document,
            created,
            created_at,
            bits: self.config.bits,
            generation,
        });
        self.current.store(pair.clone());
        self.published.send_replace(generation);
        Ok(pair)
    }
}

/// Replaces the pair before its document is `refresh_after` old; retries
/// failures with exponential backoff while the old pair stays published.
async fn refresher(inner: Arc<Inner>, mut shutdown: watch::Receiver<bool>) {
    let mut published = inner.published.subscribe();
    let mut backoff = inner.config.retry_initial;
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        let (generation, due) = {
            let pair = inner.current.load();
            (pair.generation, pair.created + inner.config.refresh_after)
        };
        published.borrow_and_update();
        tokio::select! {
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(due)) => {}
            changed = shutdown.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            // Someone else published (e.g. `invalidate`): recompute the due
            // time from the new pair.
            _ = published.changed() => continue,
        }
        match inner.rotate(generation).await {
            Ok(_) => backoff = inner.config.retry_initial,
            Err(_) => {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    changed = shutdown.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                }
                backoff = backoff.saturating_mul(2).min(inner.config.retry_max);
            }
        }
    }
}
