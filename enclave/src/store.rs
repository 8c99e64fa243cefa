//! The sealed secret store: plaintext secrets kept encrypted in memory.
//!
//! Decrypted secrets are needed for the whole life of the enclave, but a
//! plaintext copy sitting in the heap is exposed to every memory-disclosure
//! bug for that whole time. So each value is sealed with AES-256-GCM under a
//! per-process [`SealKey`] as soon as it is inserted, and opened only for the
//! duration of one `Get`. The secret's name is the AAD, so a sealed value
//! cannot be moved under another name (mirroring the KMS encryption context
//! binding described in DESIGN.md).
//!
//! The reserved entry `keystore:rules` is not sealed as a value: the builder
//! decodes it into the set's [`AccessPolicy`] as it arrives (refusing the
//! whole set if it does not decode), and it is never served or listed. A set
//! without it carries the default policy (only uid 0 reads).
//!
//! A [`SecretSet`] is immutable once built. The [`Store`] publishes the current
//! set behind an [`ArcSwap`], so readers never block and a load replaces the
//! whole set in one atomic step: readers see the old set or the new one, never
//! a mix, and a load that fails half-way is simply never published.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::fmt;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use aes_gcm::aead::consts::U12;
use aes_gcm::{AeadInOut, Aes256Gcm, Key, KeyInit, Nonce};
use arc_swap::ArcSwap;
use keystore_shared::access::RulesError;
use keystore_shared::name::{NameError, RULES_NAME, SecretName};
use rand::TryRng;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use keystore_nsm::Nsm;
use keystore_nsm::entropy::{self, EntropyError};

use crate::access::AccessPolicy;

/// Largest secret value accepted by default (1 MiB), matching the protocol's
/// default response limit so every stored value can also be served.
pub const DEFAULT_MAX_VALUE_LEN: usize = 1024 * 1024;

pub use keystore_shared::name::MAX_NAME_LEN;

/// Bytes of entropy taken from each source when deriving a [`SealKey`].
pub const SEAL_ENTROPY_LEN: usize = entropy::SEED_LEN;

/// AES-GCM nonce length (96 bits, the size GCM is designed for).
const NONCE_LEN: usize = 12;

/// Domain separator for the seal-key derivation, so these bytes can never
/// collide with another use of the same entropy.
const SEAL_KEY_DOMAIN: &[u8] = b"nitro-keystore/store/seal-key/v1";

/// Why a store operation failed.
///
/// Messages name secrets (names are not secret) but never carry values or key
/// material, so they are safe to log and to send back to clients.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No secret with this name is loaded.
    #[error("no secret named `{name}`")]
    NotFound {
        /// The requested name.
        name: String,
    },
    /// The same name was inserted twice into one set.
    #[error("secret `{name}` appears more than once")]
    DuplicateName {
        /// The repeated name.
        name: String,
    },
    /// The name is empty, too long or contains characters we refuse.
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// The value exceeds the configured size limit.
    #[error("secret `{name}` is {len} bytes; the limit is {max}")]
    ValueTooLarge {
        /// The secret's name.
        name: String,
        /// The value's length.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// The `keystore:rules` entry decrypted but is not a valid rules
    /// document; the whole set is refused.
    #[error("access rules: {0}")]
    Rules(#[source] RulesError),
    /// The NSM or the OS could not provide randomness for the seal key.
    #[error("cannot seed the seal key: {0}")]
    Entropy(#[source] EntropyError),
    /// The operating system RNG failed (drawing a nonce).
    #[error("operating system randomness unavailable: {0}")]
    OsEntropy(String),
    /// Encrypting a value failed (it is then not stored).
    #[error("sealing secret `{name}` failed")]
    Seal {
        /// The secret's name.
        name: String,
    },
    /// A sealed value failed authentication: it was modified, or moved from
    /// another name.
    #[error("sealed value of `{name}` failed authentication (tampered with or moved)")]
    Open {
        /// The secret's name.
        name: String,
    },
}

/// The per-process AES-256-GCM key that seals every stored value.
///
/// It is derived from NSM randomness *and* the OS RNG so that a weakness in
/// either source alone does not make the key predictable. It never leaves the
/// process, is never printed, and its expanded cipher state is wiped on drop.
pub struct SealKey {
    cipher: Aes256Gcm,
}

// The cipher is `ZeroizeOnDrop` (aes-gcm's `zeroize` feature), so the key
// schedule is wiped when the last set holding this key goes away.
impl ZeroizeOnDrop for SealKey {}

impl SealKey {
    /// Derives a fresh key from NSM and OS randomness mixed by
    /// [`keystore_nsm::entropy::seed`].
    pub fn generate(nsm: &dyn Nsm) -> Result<SealKey, StoreError> {
        let seed = entropy::seed(nsm, SEAL_KEY_DOMAIN).map_err(StoreError::Entropy)?;
        Ok(SealKey::from_seed(&seed))
    }

    /// Derives a key from explicit entropy. Deterministic: the same inputs
    /// give the same key, which tests use to reproduce sealed values; in
    /// production use [`SealKey::generate`].
    pub fn from_entropy(
        from_nsm: &[u8; SEAL_ENTROPY_LEN],
        from_os: &[u8; SEAL_ENTROPY_LEN],
    ) -> SealKey {
        SealKey::from_seed(&entropy::mix(SEAL_KEY_DOMAIN, from_nsm, from_os))
    }

    fn from_seed(seed: &[u8; entropy::SEED_LEN]) -> SealKey {
        let mut key = Key::<Aes256Gcm>::from(*seed);
        let cipher = Aes256Gcm::new(&key);
        key.zeroize();
        SealKey { cipher }
    }

    /// Encrypts `value` under a fresh random nonce with `name` as AAD.
    fn seal(&self, name: &str, value: &[u8]) -> Result<SealedValue, StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::SysRng
            .try_fill_bytes(&mut nonce)
            .map_err(|e| StoreError::OsEntropy(e.to_string()))?;
        // Reserve room for the tag up front so the buffer never reallocates
        // (a reallocation would leave a plaintext copy behind, unwiped).
        let mut buf = Zeroizing::new(Vec::with_capacity(value.len() + 16));
        buf.extend_from_slice(value);
        self.cipher
            .encrypt_in_place(&Nonce::<U12>::from(nonce), name.as_bytes(), &mut *buf)
            .map_err(|_| StoreError::Seal {
                name: name.to_owned(),
            })?;
        Ok(SealedValue {
            nonce,
            ciphertext: std::mem::take(&mut *buf),
        })
    }

    /// Decrypts a sealed value, checking that it was sealed under `name`.
    fn open(&self, name: &str, sealed: &SealedValue) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        let mut buf = Zeroizing::new(sealed.ciphertext.clone());
        self.cipher
            .decrypt_in_place(
                &Nonce::<U12>::from(sealed.nonce),
                name.as_bytes(),
                &mut *buf,
            )
            .map_err(|_| StoreError::Open {
                name: name.to_owned(),
            })?;
        Ok(buf)
    }
}

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealKey(..)")
    }
}

/// One sealed value: nonce and ciphertext with its GCM tag appended.
///
/// The ciphertext is wiped on drop too: it is harmless without the key, but
/// wiping costs nothing and leaves no stale copies behind.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
struct SealedValue {
    nonce: [u8; NONCE_LEN],
    ciphertext: Vec<u8>,
}

/// Checks a secret name with the rule both sides share
/// ([`SecretName::check`]).
pub fn validate_name(name: &str) -> Result<(), StoreError> {
    Ok(SecretName::check(name)?)
}

/// An immutable set of sealed secrets, as produced by one load, with the
/// access policy that governs them.
///
/// The set carries the key it was sealed with, so a reader holding an
/// `Arc<SecretSet>` can keep opening values even after the store has moved
/// on to a newer set.
pub struct SecretSet {
    key: Arc<SealKey>,
    values: BTreeMap<String, SealedValue>,
    access: AccessPolicy,
}

impl SecretSet {
    /// An empty set sealed under `key` (what a store serves before any load
    /// and after [`Store::clear`]).
    pub fn empty(key: Arc<SealKey>) -> SecretSet {
        SecretSet {
            key,
            values: BTreeMap::new(),
            access: AccessPolicy::default(),
        }
    }

    /// Who may read what in this set: the operator's rules from its
    /// `keystore:rules` entry, or the default (only uid 0).
    pub fn access(&self) -> &AccessPolicy {
        &self.access
    }

    /// Opens the value stored under `name`. The plaintext is returned in a
    /// buffer that is wiped when dropped.
    pub fn get(&self, name: &str) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        let sealed = self.values.get(name).ok_or_else(|| StoreError::NotFound {
            name: name.to_owned(),
        })?;
        self.key.open(name, sealed)
    }

    /// Whether a secret with this name is present (without opening it).
    pub fn contains(&self, name: &str) -> bool {
        self.values.contains_key(name)
    }

    /// All names, sorted (never the reserved rules entry).
    pub fn names(&self) -> Vec<String> {
        self.values.keys().cloned().collect()
    }

    /// Number of secrets (the rules entry is not one).
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the set holds no secrets.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

impl fmt::Debug for SecretSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretSet")
            .field("len", &self.values.len())
            .field("names", &self.values.keys().collect::<Vec<_>>())
            .field("access", &format_args!("{}", self.access))
            .finish_non_exhaustive()
    }
}

/// Builds a [`SecretSet`], sealing each value the moment it is inserted so
/// plaintext never accumulates while a large bundle is being decrypted.
pub struct SecretSetBuilder {
    key: Arc<SealKey>,
    max_value_len: usize,
    values: BTreeMap<String, SealedValue>,
    access: Option<AccessPolicy>,
}

impl SecretSetBuilder {
    /// A builder sealing under `key` with the default value limit
    /// ([`DEFAULT_MAX_VALUE_LEN`]).
    pub fn new(key: Arc<SealKey>) -> SecretSetBuilder {
        SecretSetBuilder {
            key,
            max_value_len: DEFAULT_MAX_VALUE_LEN,
            values: BTreeMap::new(),
            access: None,
        }
    }

    /// Changes the largest accepted value (bytes).
    pub fn with_max_value_len(mut self, max_value_len: usize) -> SecretSetBuilder {
        self.max_value_len = max_value_len;
        self
    }

    /// Validates, seals and adds one secret. The plaintext is consumed and
    /// wiped whether or not the insert succeeds. On error the builder is left
    /// unchanged, but callers normally abandon the whole load.
    ///
    /// The reserved `keystore:rules` entry is decoded into the set's access
    /// policy instead of being sealed; one that does not decode is an error
    /// ([`StoreError::Rules`]).
    pub fn insert(
        &mut self,
        name: impl Into<String>,
        value: Zeroizing<Vec<u8>>,
    ) -> Result<(), StoreError> {
        let name = name.into();
        validate_name(&name)?;
        if value.len() > self.max_value_len {
            return Err(StoreError::ValueTooLarge {
                name,
                len: value.len(),
                max: self.max_value_len,
            });
        }
        if name == RULES_NAME {
            if self.access.is_some() {
                return Err(StoreError::DuplicateName { name });
            }
            self.access = Some(AccessPolicy::from_entry(&value).map_err(StoreError::Rules)?);
            return Ok(());
        }
        match self.values.entry(name) {
            Entry::Occupied(entry) => Err(StoreError::DuplicateName {
                name: entry.key().clone(),
            }),
            Entry::Vacant(entry) => {
                let sealed = self.key.seal(entry.key(), &value)?;
                entry.insert(sealed);
                Ok(())
            }
        }
    }

    /// Number of entries inserted so far, the rules entry included (the
    /// loader compares it with the number of entries it was sent).
    pub fn len(&self) -> usize {
        self.values.len() + usize::from(self.access.is_some())
    }

    /// Whether nothing has been inserted yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Finishes the set; without a rules entry it gets the default policy.
    pub fn build(self) -> SecretSet {
        SecretSet {
            key: self.key,
            values: self.values,
            access: self.access.unwrap_or_default(),
        }
    }
}

impl fmt::Debug for SecretSetBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretSetBuilder")
            .field("len", &self.values.len())
            .field("names", &self.values.keys().collect::<Vec<_>>())
            .field("max_value_len", &self.max_value_len)
            .field("rules", &self.access.is_some())
            .finish_non_exhaustive()
    }
}

/// Store configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Largest accepted secret value in bytes (default 1 MiB).
    pub max_value_len: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_value_len: DEFAULT_MAX_VALUE_LEN,
        }
    }
}

/// What the store publishes: the set plus when and as which load it arrived,
/// swapped together so status never pairs one load's count with another's
/// generation.
struct Loaded {
    set: Arc<SecretSet>,
    generation: u64,
    loaded_at: Option<SystemTime>,
    loaded_instant: Option<Instant>,
}

/// A point-in-time summary of the store for `Status` responses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreStatus {
    /// Number of secrets in the current set.
    pub len: usize,
    /// Increments on every [`Store::replace`] and [`Store::clear`]; 0 means
    /// nothing was ever loaded.
    pub generation: u64,
    /// Wall-clock time of the last replace or clear, if any.
    pub loaded_at: Option<SystemTime>,
    /// Monotonic time of the last replace or clear, for computing its age.
    pub loaded_instant: Option<Instant>,
}

/// The enclave's secret store: the current [`SecretSet`], replaced atomically.
///
/// Reads are lock-free (`ArcSwap`), so a slow load never stalls `Get`.
pub struct Store {
    key: Arc<SealKey>,
    config: StoreConfig,
    current: ArcSwap<Loaded>,
}

impl Store {
    /// An empty store sealing under `key`.
    pub fn new(key: SealKey, config: StoreConfig) -> Store {
        let key = Arc::new(key);
        let loaded = Loaded {
            set: Arc::new(SecretSet::empty(key.clone())),
            generation: 0,
            loaded_at: None,
            loaded_instant: None,
        };
        Store {
            key,
            config,
            current: ArcSwap::from_pointee(loaded),
        }
    }

    /// A builder that seals under this store's key and limits. Building it
    /// does not touch the store; only [`Store::replace`] publishes it.
    pub fn builder(&self) -> SecretSetBuilder {
        SecretSetBuilder::new(self.key.clone()).with_max_value_len(self.config.max_value_len)
    }

    /// Publishes `set` as the current set in one atomic step and returns the
    /// new load generation. Readers that already hold the old set keep it
    /// until they drop it; its sealed values are wiped then.
    pub fn replace(&self, set: SecretSet) -> u64 {
        self.publish(Arc::new(set))
    }

    /// Drops every secret (shutdown, or an operator wipe). Like a replace with
    /// an empty set, so it also bumps the generation.
    pub fn clear(&self) -> u64 {
        self.publish(Arc::new(SecretSet::empty(self.key.clone())))
    }

    fn publish(&self, set: Arc<SecretSet>) -> u64 {
        let now = SystemTime::now();
        let now_instant = Instant::now();
        // `rcu` retries if another writer raced us, so generations stay
        // strictly increasing without a writer lock.
        let previous = self.current.rcu(|old| Loaded {
            set: set.clone(),
            generation: old.generation + 1,
            loaded_at: Some(now),
            loaded_instant: Some(now_instant),
        });
        previous.generation + 1
    }

    /// The current set, for callers that need several consistent reads.
    pub fn snapshot(&self) -> Arc<SecretSet> {
        self.current.load().set.clone()
    }

    /// Opens the current value of `name`.
    pub fn get(&self, name: &str) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        self.current.load().set.get(name)
    }

    /// Current names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.current.load().set.names()
    }

    /// Number of secrets currently loaded.
    pub fn len(&self) -> usize {
        self.current.load().set.len()
    }

    /// Whether no secrets are loaded.
    pub fn is_empty(&self) -> bool {
        self.current.load().set.is_empty()
    }

    /// Count, generation and load time, read consistently.
    pub fn status(&self) -> StoreStatus {
        let loaded = self.current.load();
        StoreStatus {
            len: loaded.set.len(),
            generation: loaded.generation,
            loaded_at: loaded.loaded_at,
            loaded_instant: loaded.loaded_instant,
        }
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let loaded = self.current.load();
        f.debug_struct("Store")
            .field("generation", &loaded.generation)
            .field("set", &*loaded.set)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keystore_nsm::{AttestationRequest, NsmError, PcrDescription};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// Fills with a recognisable pattern, counts calls, can be told to fail.
    #[derive(Default)]
    struct FakeNsm {
        random_calls: AtomicUsize,
        fail: AtomicBool,
    }

    impl Nsm for FakeNsm {
        fn attest(&self, _req: &AttestationRequest) -> Result<Vec<u8>, NsmError> {
            Err(NsmError::Rejected("not used by the store".into()))
        }
        fn fill_random(&self, buf: &mut [u8]) -> Result<(), NsmError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(NsmError::Rejected("fake NSM told to fail".into()));
            }
            let n = self.random_calls.fetch_add(1, Ordering::SeqCst);
            for (i, b) in buf.iter_mut().enumerate() {
                *b = (i + n) as u8;
            }
            Ok(())
        }
        fn describe_pcr(&self, index: u16) -> Result<PcrDescription, NsmError> {
            Err(NsmError::BadPcrIndex(index))
        }
    }

    fn key(seed: u8) -> Arc<SealKey> {
        Arc::new(SealKey::from_entropy(&[seed; 32], &[seed ^ 0xff; 32]))
    }

    fn secret(v: &[u8]) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(v.to_vec())
    }

    fn set_of(key: &Arc<SealKey>, items: &[(&str, &[u8])]) -> SecretSet {
        let mut b = SecretSetBuilder::new(key.clone());
        for (n, v) in items {
            b.insert(*n, secret(v)).unwrap();
        }
        b.build()
    }

    #[test]
    fn round_trip_through_the_store() {
        let store = Store::new(
            SealKey::from_entropy(&[1; 32], &[2; 32]),
            StoreConfig::default(),
        );
        assert!(store.is_empty());
        assert_eq!(store.status().generation, 0);
        assert_eq!(store.status().loaded_at, None);
        let big = vec![0xa5u8; DEFAULT_MAX_VALUE_LEN];
        let mut b = store.builder();
        b.insert("db/password", secret(b"hunter2")).unwrap();
        b.insert("EMPTY", secret(b"")).unwrap();
        b.insert("binary", secret(&[0, 1, 2, 255])).unwrap();
        b.insert("big", secret(&big)).unwrap();
        assert_eq!(b.len(), 4);
        let generation = store.replace(b.build());
        assert_eq!(generation, 1);
        assert_eq!(store.get("db/password").unwrap().as_slice(), b"hunter2");
        assert_eq!(store.get("EMPTY").unwrap().as_slice(), b"");
        assert_eq!(store.get("binary").unwrap().as_slice(), &[0, 1, 2, 255]);
        assert_eq!(store.get("big").unwrap().as_slice(), big.as_slice());
        assert_eq!(store.names(), ["EMPTY", "big", "binary", "db/password"]);
        assert_eq!(store.len(), 4);
        let status = store.status();
        assert_eq!((status.len, status.generation), (4, 1));
        assert!(status.loaded_at.is_some() && status.loaded_instant.is_some());
        match store.get("missing") {
            Err(StoreError::NotFound { name }) => assert_eq!(name, "missing"),
            other => panic!("expected NotFound, got {other:?}"),
        }
    }

    #[test]
    fn values_are_really_encrypted_with_fresh_nonces() {
        let k = key(3);
        let set = set_of(&k, &[("a", b"same value here"), ("b", b"same value here")]);
        let (a, b) = (&set.values["a"], &set.values["b"]);
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
        for sealed in [a, b] {
            assert_eq!(sealed.ciphertext.len(), b"same value here".len() + 16);
            assert!(
                !sealed
                    .ciphertext
                    .windows(4)
                    .any(|w| b"same value here".windows(4).any(|p| p == w))
            );
        }
    }

    #[test]
    fn generate_mixes_nsm_randomness_and_reports_nsm_failure() {
        let nsm = FakeNsm::default();
        let k1 = Arc::new(SealKey::generate(&nsm).unwrap());
        let k2 = Arc::new(SealKey::generate(&nsm).unwrap());
        assert_eq!(nsm.random_calls.load(Ordering::SeqCst), 2);
        // The fake NSM is predictable, but the OS half differs: two keys
        // generated from the same NSM output must still differ.
        let sealed = set_of(&k1, &[("x", b"v")]);
        let foreign = SecretSet {
            key: k2,
            values: sealed.values.clone(),
            access: AccessPolicy::default(),
        };
        assert!(matches!(foreign.get("x"), Err(StoreError::Open { .. })));

        nsm.fail.store(true, Ordering::SeqCst);
        match SealKey::generate(&nsm) {
            Err(StoreError::Entropy(EntropyError::Nsm(NsmError::Rejected(m)))) => {
                assert!(m.contains("fail"))
            }
            other => panic!("expected an NSM entropy error, got {other:?}"),
        }
    }

    #[test]
    fn both_entropy_sources_change_the_key() {
        let base = Arc::new(SealKey::from_entropy(&[7; 32], &[8; 32]));
        let same = Arc::new(SealKey::from_entropy(&[7; 32], &[8; 32]));
        let other_nsm = Arc::new(SealKey::from_entropy(&[9; 32], &[8; 32]));
        let other_os = Arc::new(SealKey::from_entropy(&[7; 32], &[9; 32]));
        let sealed = set_of(&base, &[("n", b"value")]);
        let under = |k: &Arc<SealKey>| SecretSet {
            key: k.clone(),
            values: sealed.values.clone(),
            access: AccessPolicy::default(),
        };
        assert_eq!(under(&same).get("n").unwrap().as_slice(), b"value");
        assert!(matches!(
            under(&other_nsm).get("n"),
            Err(StoreError::Open { .. })
        ));
        assert!(matches!(
            under(&other_os).get("n"),
            Err(StoreError::Open { .. })
        ));
    }

    #[test]
    fn sealed_values_are_bound_to_their_names() {
        let k = key(4);
        let mut set = set_of(
            &k,
            &[("alpha", b"first secret"), ("beta", b"second secret")],
        );
        // Swap the sealed values between the two names.
        let a = set.values.remove("alpha").unwrap();
        let b = set.values.remove("beta").unwrap();
        set.values.insert("alpha".into(), b);
        set.values.insert("beta".into(), a);
        for name in ["alpha", "beta"] {
            match set.get(name) {
                Err(StoreError::Open { name: n }) => assert_eq!(n, name),
                other => panic!("swapped value under {name} opened: {other:?}"),
            }
        }
    }

    #[test]
    fn tampering_is_detected() {
        let k = key(5);
        let pristine = set_of(&k, &[("s", b"some secret bytes")]);
        let len = pristine.values["s"].ciphertext.len();
        // Flip a bit in the body, in the tag, and in the nonce; truncate.
        type Edit = Box<dyn Fn(&mut SealedValue)>;
        let edits: Vec<Edit> = vec![
            Box::new(|v| v.ciphertext[0] ^= 1),
            Box::new(move |v| v.ciphertext[len - 1] ^= 0x80),
            Box::new(|v| v.nonce[11] ^= 1),
            Box::new(|v| v.ciphertext.truncate(10)),
            Box::new(|v| v.ciphertext.clear()),
        ];
        for (i, edit) in edits.iter().enumerate() {
            let mut values = pristine.values.clone();
            if let Some(v) = values.get_mut("s") {
                edit(v);
            }
            let set = SecretSet {
                key: k.clone(),
                values,
                access: AccessPolicy::default(),
            };
            assert!(
                matches!(set.get("s"), Err(StoreError::Open { .. })),
                "edit {i} went unnoticed"
            );
        }
        assert_eq!(pristine.get("s").unwrap().as_slice(), b"some secret bytes");
    }

    #[test]
    fn name_and_value_limits() {
        let k = key(6);
        let mut b = SecretSetBuilder::new(k.clone()).with_max_value_len(8);
        b.insert("ok", secret(&[1; 8])).unwrap();
        match b.insert("too-big", secret(&[1; 9])) {
            Err(StoreError::ValueTooLarge { name, len, max }) => {
                assert_eq!((name.as_str(), len, max), ("too-big", 9, 8))
            }
            other => panic!("expected ValueTooLarge, got {other:?}"),
        }
        let longest = "n".repeat(MAX_NAME_LEN);
        b.insert(longest.clone(), secret(b"v")).unwrap();
        for bad in [
            String::new(),
            "n".repeat(MAX_NAME_LEN + 1),
            "new\nline".into(),
            "tab\there".into(),
            "nul\0".into(),
            "del\x7f".into(),
            "caf\u{e9}".into(),
            "zero\u{200b}width".into(),
            " leading".into(),
            "trailing ".into(),
        ] {
            assert!(
                matches!(
                    b.insert(bad.clone(), secret(b"v")),
                    Err(StoreError::InvalidName { .. })
                ),
                "{bad:?} was accepted"
            );
        }
        b.insert("inner space ok", secret(b"v")).unwrap();
        match b.insert("ok", secret(b"again")) {
            Err(StoreError::DuplicateName { name }) => assert_eq!(name, "ok"),
            other => panic!("expected DuplicateName, got {other:?}"),
        }
        let set = b.build();
        assert_eq!(set.len(), 3);
        assert_eq!(set.get("ok").unwrap().as_slice(), &[1; 8]);
        assert!(set.contains(&longest) && !set.contains("too-big"));

        // The store's configured limit reaches its builders.
        let store = Store::new(
            SealKey::from_entropy(&[0; 32], &[1; 32]),
            StoreConfig { max_value_len: 4 },
        );
        let mut b = store.builder();
        assert!(b.insert("a", secret(b"1234")).is_ok());
        assert!(matches!(
            b.insert("b", secret(b"12345")),
            Err(StoreError::ValueTooLarge { max: 4, .. })
        ));
    }

    #[test]
    fn the_rules_entry_becomes_the_policy_and_is_never_a_value() {
        use crate::access::PolicySource;
        let k = key(7);
        let mut b = SecretSetBuilder::new(k.clone());
        b.insert("APP_KEY", secret(b"v")).unwrap();
        b.insert(
            RULES_NAME,
            secret(br#"{"rules":[{"who":{"uid":1000},"read":["APP_*"]}]}"#),
        )
        .unwrap();
        // Counted as an entry (the loader checks every entry arrived)...
        assert_eq!(b.len(), 2);
        match b.insert(RULES_NAME, secret(br#"{"rules":[]}"#)) {
            Err(StoreError::DuplicateName { name }) => assert_eq!(name, RULES_NAME),
            other => panic!("expected DuplicateName, got {other:?}"),
        }
        let set = b.build();
        // ... but neither stored, listed nor counted as a secret.
        assert_eq!((set.names(), set.len()), (vec!["APP_KEY".to_owned()], 1));
        assert!(!set.contains(RULES_NAME));
        assert!(matches!(
            set.get(RULES_NAME),
            Err(StoreError::NotFound { .. })
        ));
        assert_eq!(set.access().source(), PolicySource::Operator);
        let app = keystore_shared::Caller {
            uid: Some(1000),
            ..Default::default()
        };
        assert!(set.access().allows(&app, "APP_KEY"));
        assert!(
            !set.access()
                .allows(&keystore_shared::Caller::root(), "APP_KEY")
        );

        // No entry: the default policy.
        let plain = set_of(&k, &[("APP_KEY", b"v")]);
        assert_eq!(plain.access().source(), PolicySource::Default);
        assert!(
            plain
                .access()
                .allows(&keystore_shared::Caller::root(), "APP_KEY")
        );

        // An entry that does not decode refuses the insert.
        let mut b = SecretSetBuilder::new(k);
        match b.insert(RULES_NAME, secret(b"rules: [yaml, not json]")) {
            Err(e @ StoreError::Rules(_)) => assert!(e.to_string().starts_with("access rules: ")),
            other => panic!("expected a rules error, got {other:?}"),
        }
        assert!(b.is_empty());
    }

    #[test]
    fn invalid_name_errors_are_bounded() {
        let huge = "x".repeat(10_000) + "\n";
        match validate_name(&huge) {
            Err(e @ StoreError::InvalidName(_)) => assert!(e.to_string().len() < 200, "{e}"),
            other => panic!("expected InvalidName, got {other:?}"),
        }
    }

    #[test]
    fn a_failed_build_keeps_the_old_set() {
        let store = Store::new(
            SealKey::from_entropy(&[1; 32], &[1; 32]),
            StoreConfig::default(),
        );
        let mut b = store.builder();
        b.insert("keep", secret(b"old value")).unwrap();
        store.replace(b.build());

        let load = || -> Result<SecretSet, StoreError> {
            let mut b = store.builder();
            b.insert("keep", secret(b"new value"))?;
            b.insert("dup", secret(b"1"))?;
            b.insert("dup", secret(b"2"))?;
            Ok(b.build())
        };
        assert!(matches!(load(), Err(StoreError::DuplicateName { .. })));
        assert_eq!(store.get("keep").unwrap().as_slice(), b"old value");
        assert_eq!(store.names(), ["keep"]);
        assert_eq!(store.status().generation, 1);
    }

    #[test]
    fn clear_wipes_the_current_set_but_not_held_snapshots() {
        let store = Store::new(
            SealKey::from_entropy(&[2; 32], &[2; 32]),
            StoreConfig::default(),
        );
        let mut b = store.builder();
        b.insert("a", secret(b"1")).unwrap();
        assert_eq!(store.replace(b.build()), 1);
        let held = store.snapshot();
        assert_eq!(store.clear(), 2);
        assert!(store.is_empty());
        assert!(matches!(store.get("a"), Err(StoreError::NotFound { .. })));
        assert_eq!(store.status().generation, 2);
        // A request that took its snapshot before the wipe finishes normally.
        assert_eq!(held.get("a").unwrap().as_slice(), b"1");
        assert_eq!(Arc::strong_count(&held), 1);
    }

    #[test]
    fn concurrent_readers_never_see_a_mixed_set() {
        const SIZE_A: usize = 10;
        const SIZE_B: usize = 25;
        let store = Arc::new(Store::new(
            SealKey::from_entropy(&[3; 32], &[4; 32]),
            StoreConfig::default(),
        ));
        // Generation g holds set A (odd g) or set B (even g); every value
        // carries its set's letter and the generation's parity.
        let build = |store: &Store, a: bool| {
            let mut b = store.builder();
            let (prefix, size) = if a { ("a", SIZE_A) } else { ("b", SIZE_B) };
            for i in 0..size {
                b.insert(
                    format!("{prefix}{i:02}"),
                    secret(format!("{prefix}-value-{i}").as_bytes()),
                )
                .unwrap();
            }
            b.build()
        };
        store.replace(build(&store, true));
        let stop = Arc::new(AtomicBool::new(false));
        let mut readers = Vec::new();
        for _ in 0..4 {
            let store = store.clone();
            let stop = stop.clone();
            readers.push(std::thread::spawn(move || {
                let mut seen = [0usize; 2];
                while !stop.load(Ordering::Relaxed) {
                    let snap = store.snapshot();
                    let names = snap.names();
                    let is_a = names[0].starts_with('a');
                    let (prefix, size) = if is_a { ('a', SIZE_A) } else { ('b', SIZE_B) };
                    assert_eq!(names.len(), size);
                    for (i, name) in names.iter().enumerate() {
                        assert!(name.starts_with(prefix), "mixed set: {names:?}");
                        let v = snap.get(name).unwrap();
                        assert_eq!(v.as_slice(), format!("{prefix}-value-{i}").as_bytes());
                    }
                    let status = store.status();
                    let expect = if status.generation % 2 == 1 {
                        SIZE_A
                    } else {
                        SIZE_B
                    };
                    assert_eq!(status.len, expect, "status mixes two loads");
                    seen[usize::from(!is_a)] += 1;
                }
                seen
            }));
        }
        for generation in 2..=300u64 {
            let set = build(&store, generation % 2 == 1);
            assert_eq!(store.replace(set), generation);
        }
        stop.store(true, Ordering::Relaxed);
        let mut total = [0usize; 2];
        for r in readers {
            let seen = r.join().unwrap();
            total[0] += seen[0];
            total[1] += seen[1];
        }
        assert!(
            total[0] > 0 && total[1] > 0,
            "readers saw only one set: {total:?}"
        );
    }

    #[test]
    fn debug_and_errors_never_show_secrets() {
        const VALUE: &str = "hunter2-TOP-SECRET-VALUE";
        let nsm_entropy = [0x5a; 32];
        let store = Store::new(
            SealKey::from_entropy(&nsm_entropy, &[0x6b; 32]),
            StoreConfig { max_value_len: 64 },
        );
        let mut b = store.builder();
        b.insert("db/password", secret(VALUE.as_bytes())).unwrap();
        let too_large = b
            .insert("big", secret(format!("{VALUE}{VALUE}{VALUE}").as_bytes()))
            .unwrap_err();
        let dup = b
            .insert("db/password", secret(VALUE.as_bytes()))
            .unwrap_err();
        let builder_dbg = format!("{b:?}");
        let set = b.build();
        let set_dbg = format!("{set:?}");
        let mut tampered = set.values.clone();
        if let Some(v) = tampered.get_mut("db/password") {
            v.ciphertext[0] ^= 1;
        }
        let open_err = SecretSet {
            key: set.key.clone(),
            values: tampered,
            access: AccessPolicy::default(),
        }
        .get("db/password")
        .unwrap_err();
        let key_dbg = format!("{:?}", set.key);
        store.replace(set);
        let store_dbg = format!("{store:?}");
        let not_found = store.get("nope").unwrap_err();

        let texts = [
            builder_dbg.clone(),
            set_dbg.clone(),
            store_dbg.clone(),
            key_dbg,
            format!("{too_large:?} {too_large}"),
            format!("{dup:?} {dup}"),
            format!("{open_err:?} {open_err}"),
            format!("{not_found:?} {not_found}"),
        ];
        let value_bytes_dbg = format!("{:?}", VALUE.as_bytes());
        let entropy_hex = hex::encode(nsm_entropy);
        for t in &texts {
            assert!(!t.contains("hunter2"), "secret in {t}");
            assert!(!t.contains(&value_bytes_dbg[1..20]), "secret bytes in {t}");
            assert!(
                !t.contains(&entropy_hex[..16]) && !t.contains("90, 90, 90"),
                "key in {t}"
            );
        }
        // Debug is still useful: names and counts.
        for t in [&builder_dbg, &set_dbg, &store_dbg] {
            assert!(t.contains("db/password") && t.contains("len: 1"), "{t}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_value_round_trips(value in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
                                 name in "[!-~]([ -~]{0,40}[!-~])?") {
            let k = key(9);
            let mut b = SecretSetBuilder::new(k);
            b.insert(name.clone(), Zeroizing::new(value.clone())).unwrap();
            let set = b.build();
            let opened = set.get(&name).unwrap();
            proptest::prop_assert_eq!(opened.as_slice(), value.as_slice());
        }

        #[test]
        fn names_outside_printable_ascii_are_refused(prefix in "[a-z]{1,5}", c in proptest::prelude::any::<char>()) {
            let name = format!("{prefix}{c}x");
            let printable = (' '..='~').contains(&c);
            proptest::prop_assert_eq!(validate_name(&name).is_ok(), printable);
        }
    }
}
