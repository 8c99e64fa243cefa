//! Recipient key lifecycle tests against a fake NSM that echoes the public
//! key into its "document", counts calls and can be told to fail.
// Helpers outside `#[test]` functions aren't covered by clippy.toml's
// allow-unwrap-in-tests; a panic is the right failure in test code.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keystore_enclave::recipient::{
    MAX_DOCUMENT_AGE, Recipient, RecipientBits, RecipientConfig, RecipientError, RecipientPair,
    generate_recipient_key,
};
use keystore_nsm::{AttestationRequest, Nsm, NsmError, PcrDescription};
use rsa::pkcs8::{DecodePublicKey, EncodePublicKey};
use rsa::traits::{PrivateKeyParts, PublicKeyParts};
use rsa::{Oaep, PublicKey};

const MARKER: &[u8] = b"FAKE-ATTESTATION-DOC:";

#[derive(Default)]
struct FakeNsm {
    attest_calls: AtomicUsize,
    random_calls: AtomicUsize,
    fail_attest: AtomicBool,
    fail_random: AtomicBool,
    /// Slows `fill_random` (and so every key generation) down.
    random_delay_ms: AtomicU64,
    last_request: Mutex<Option<AttestationRequest>>,
    /// Every public key asked for, including failed attempts.
    attempted: Mutex<Vec<Vec<u8>>>,
}

impl Nsm for FakeNsm {
    fn attest(&self, req: &AttestationRequest) -> Result<Vec<u8>, NsmError> {
        self.attempted
            .lock()
            .unwrap()
            .push(req.public_key.clone().unwrap_or_default());
        if self.fail_attest.load(Ordering::SeqCst) {
            return Err(NsmError::Rejected("fake NSM attestation outage".into()));
        }
        req.check_sizes()?;
        self.attest_calls.fetch_add(1, Ordering::SeqCst);
        *self.last_request.lock().unwrap() = Some(req.clone());
        let mut doc = MARKER.to_vec();
        doc.extend_from_slice(req.public_key.as_deref().unwrap_or_default());
        Ok(doc)
    }

    fn fill_random(&self, buf: &mut [u8]) -> Result<(), NsmError> {
        if self.fail_random.load(Ordering::SeqCst) {
            return Err(NsmError::Rejected("fake NSM RNG outage".into()));
        }
        std::thread::sleep(Duration::from_millis(
            self.random_delay_ms.load(Ordering::SeqCst),
        ));
        let n = self.random_calls.fetch_add(1, Ordering::SeqCst);
        buf.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i * 31 + n) as u8);
        Ok(())
    }

    fn describe_pcr(&self, index: u16) -> Result<PcrDescription, NsmError> {
        Err(NsmError::BadPcrIndex(index))
    }
}

fn config(refresh_after: Duration) -> RecipientConfig {
    RecipientConfig {
        bits: RecipientBits::B2048,
        refresh_after,
        retry_initial: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
    }
}

/// A config whose refresher won't fire during a test.
fn quiet() -> RecipientConfig {
    config(Duration::from_secs(290))
}

/// The snapshot's key, SPKI and document all describe the same key.
fn assert_consistent(pair: &RecipientPair) {
    let der = pair
        .key()
        .to_public_key()
        .to_public_key_der()
        .unwrap()
        .into_vec();
    assert_eq!(
        der,
        pair.spki_der(),
        "key does not match SPKI (gen {})",
        pair.generation()
    );
    assert_eq!(
        pair.document(),
        [MARKER, pair.spki_der()].concat(),
        "document does not carry the SPKI (gen {})",
        pair.generation()
    );
}

/// What KMS does: encrypt to the SPKI in the document; we open with the key.
fn assert_opens(pair: &RecipientPair) {
    let public = PublicKey::from_public_key_der(&pair.document()[MARKER.len()..]).unwrap();
    let msg = b"32-byte content encryption key!!";
    let ct = public
        .encrypt(&mut rand::rng(), Oaep::<sha2::Sha256>::new(), msg)
        .unwrap();
    let pt = pair
        .key()
        .decrypt(Oaep::<sha2::Sha256>::new(), &ct)
        .unwrap();
    assert_eq!(pt, msg);
}

async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_publishes_an_attested_pair() {
    let nsm = Arc::new(FakeNsm::default());
    let (recipient, handle) = Recipient::start(nsm.clone(), quiet()).await.unwrap();
    let pair = recipient.current();
    assert_eq!(pair.generation(), 1);
    assert_eq!(pair.bits(), RecipientBits::B2048);
    assert_consistent(&pair);
    assert_opens(&pair);
    let public = PublicKey::from_public_key_der(pair.spki_der()).unwrap();
    assert_eq!(public.n().bit_width(), 2048);
    assert_eq!(nsm.attest_calls.load(Ordering::SeqCst), 1);
    let req = nsm.last_request.lock().unwrap().clone().unwrap();
    assert_eq!(req.public_key.as_deref(), Some(pair.spki_der()));
    assert_eq!((req.nonce, req.user_data), (None, None));
    assert!(
        nsm.random_calls.load(Ordering::SeqCst) >= 1,
        "NSM randomness not used"
    );
    assert!(pair.document_age() < Duration::from_secs(60));

    let status = recipient.status();
    assert_eq!(
        (status.generation, status.refreshes, status.failures),
        (1, 0, 0)
    );
    assert_eq!(status.last_error, None);
    assert!(status.last_keygen.is_some());
    handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_config_generates_4096_bit_keys() {
    let nsm = Arc::new(FakeNsm::default());
    let started = Instant::now();
    let (recipient, handle) = Recipient::start(nsm.clone(), RecipientConfig::default())
        .await
        .unwrap();
    let startup = started.elapsed();
    let pair = recipient.current();
    assert_eq!(pair.bits(), RecipientBits::B4096);
    assert_eq!(recipient.config().refresh_after, Duration::from_secs(240));
    let public = PublicKey::from_public_key_der(pair.spki_der()).unwrap();
    assert_eq!(public.n().bit_width(), 4096);
    assert!(pair.spki_der().len() <= keystore_nsm::MAX_ATTESTATION_FIELD);
    assert_consistent(&pair);
    assert_opens(&pair);
    // Keygen samples: the first key, then each successor generated in the
    // background after an invalidate.
    let mut samples = vec![recipient.status().last_keygen.unwrap()];
    let mut pair = pair;
    let mut invalidate = Vec::new();
    for round in 1..=2u64 {
        wait_for(
            "the prepared 4096-bit key",
            Duration::from_secs(300),
            || recipient.status().next_key_ready,
        )
        .await;
        samples.push(recipient.status().last_keygen.unwrap());
        let started = Instant::now();
        let next = recipient.invalidate(&pair).await.unwrap();
        invalidate.push(started.elapsed());
        assert_eq!(next.bits(), RecipientBits::B4096);
        assert_consistent(&next);
        assert_eq!(recipient.status().prepared_keys_used, round);
        pair = next;
    }
    eprintln!(
        "4096-bit: startup {startup:?}; keygen median {:?} (samples {samples:?}); \
         invalidate with prepared key {invalidate:?}",
        median(&samples)
    );
    handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_refresh_rotates_keys_and_snapshots_stay_consistent() {
    let nsm = Arc::new(FakeNsm::default());
    let (recipient, handle) = Recipient::start(nsm.clone(), config(Duration::from_millis(300)))
        .await
        .unwrap();
    let first = recipient.current();

    let reader = {
        let recipient = recipient.clone();
        tokio::spawn(async move {
            // generation -> SPKI, and how many snapshots were checked
            let mut seen: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            let mut checks = 0usize;
            while recipient.current().generation() < 4 {
                let pair = recipient.current();
                assert_consistent(&pair);
                let spki = seen
                    .entry(pair.generation())
                    .or_insert_with(|| pair.spki_der().to_vec());
                assert_eq!(spki.as_slice(), pair.spki_der(), "a generation changed key");
                checks += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (seen, checks)
        })
    };
    let (seen, checks) = tokio::time::timeout(Duration::from_secs(120), reader)
        .await
        .expect("no rotations within 120 s")
        .unwrap();
    let distinct_keys: BTreeSet<_> = seen.values().collect();
    eprintln!(
        "reader checked {checks} snapshots across generations {:?}",
        seen.keys()
    );
    assert!(seen.len() >= 2, "reader saw a single generation");
    assert_eq!(
        distinct_keys.len(),
        seen.len(),
        "a new generation reused a key"
    );
    let status = recipient.status();
    assert!(status.refreshes >= 3, "{status:?}");
    assert_eq!(status.last_error, None);
    assert!(nsm.attest_calls.load(Ordering::SeqCst) >= 4);

    // A call that took its snapshot before the rotations can still open
    // what KMS encrypted to it.
    assert_ne!(recipient.current().spki_der(), first.spki_der());
    assert_consistent(&first);
    assert_opens(&first);
    handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_invalidate_regenerates_once() {
    let nsm = Arc::new(FakeNsm::default());
    let (recipient, handle) = Recipient::start(nsm.clone(), quiet()).await.unwrap();
    let rejected = recipient.current();
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let recipient = recipient.clone();
            let rejected = rejected.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                recipient.invalidate(&rejected).await
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap().unwrap());
    }
    for pair in &results {
        assert_eq!(pair.generation(), 2);
        assert!(
            Arc::ptr_eq(pair, &results[0]),
            "callers got different pairs"
        );
    }
    assert_ne!(results[0].spki_der(), rejected.spki_der());
    assert_consistent(&results[0]);
    let status = recipient.status();
    assert_eq!(status.refreshes, 1, "{status:?}");
    assert_eq!(nsm.attest_calls.load(Ordering::SeqCst), 2);

    // A late caller still holding the old pair doesn't rotate again.
    let again = recipient.invalidate(&rejected).await.unwrap();
    assert!(Arc::ptr_eq(&again, &results[0]));
    assert_eq!(recipient.status().refreshes, 1);
    handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_uses_the_prepared_key() {
    const ROUNDS: usize = 5;
    let nsm = Arc::new(FakeNsm::default());

    let mut keygen = Vec::new();
    for _ in 0..ROUNDS {
        let nsm = nsm.clone();
        keygen.push(
            tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                generate_recipient_key(nsm.as_ref(), RecipientBits::B2048).unwrap();
                started.elapsed()
            })
            .await
            .unwrap(),
        );
    }

    let (recipient, handle) = Recipient::start(nsm.clone(), quiet()).await.unwrap();
    let mut invalidate = Vec::new();
    for round in 0..ROUNDS {
        wait_for("the prepared key", Duration::from_secs(120), || {
            recipient.status().next_key_ready
        })
        .await;
        let before = recipient.current();
        let started = Instant::now();
        let after = recipient.invalidate(&before).await.unwrap();
        invalidate.push(started.elapsed());
        assert_eq!(after.generation(), before.generation() + 1);
        assert_consistent(&after);
        let status = recipient.status();
        assert_eq!(status.prepared_keys_used, round as u64 + 1, "{status:?}");
        assert_eq!(status.keygen_waits, 0, "{status:?}");
    }
    eprintln!(
        "2048-bit keygen median {:?} (samples {keygen:?}); invalidate median {:?} (samples {invalidate:?})",
        median(&keygen),
        median(&invalidate)
    );
    handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidate_before_the_next_key_is_ready_waits_for_it() {
    let nsm = Arc::new(FakeNsm::default());
    // Every key generation now takes at least a second, so straight after
    // start the successor is certainly still being generated.
    nsm.random_delay_ms.store(1000, Ordering::SeqCst);
    let (recipient, handle) = Recipient::start(nsm.clone(), quiet()).await.unwrap();
    let first = recipient.current();
    assert!(!recipient.status().next_key_ready);
    let second = recipient.invalidate(&first).await.unwrap();
    assert_eq!(second.generation(), 2);
    assert_ne!(second.spki_der(), first.spki_der());
    assert_consistent(&second);
    let status = recipient.status();
    assert_eq!(
        (status.prepared_keys_used, status.keygen_waits),
        (0, 1),
        "{status:?}"
    );
    // Each published pair starts its successor: 2 published + 1 preparing.
    wait_for("the third key", Duration::from_secs(120), || {
        recipient.status().keys_generated >= 3
    })
    .await;
    handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attestation_keeps_the_old_pair_and_records_the_error() {
    let nsm = Arc::new(FakeNsm::default());
    let (recipient, handle) = Recipient::start(nsm.clone(), quiet()).await.unwrap();
    let first = recipient.current();
    nsm.fail_attest.store(true, Ordering::SeqCst);
    match recipient.invalidate(&first).await {
        Err(RecipientError::Attestation(NsmError::Rejected(m))) => assert!(m.contains("outage")),
        other => panic!("expected an attestation error, got {other:?}"),
    }
    assert!(Arc::ptr_eq(&recipient.current(), &first));
    let status = recipient.status();
    assert_eq!(
        (status.generation, status.refreshes, status.failures),
        (1, 0, 1)
    );
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap_or_default()
            .contains("outage"),
        "{status:?}"
    );

    // The key prepared for the failed attempt is kept for the retry.
    let failed_spki = nsm.attempted.lock().unwrap().last().cloned().unwrap();
    assert_ne!(failed_spki, first.spki_der());
    nsm.fail_attest.store(false, Ordering::SeqCst);
    let second = recipient.invalidate(&first).await.unwrap();
    assert_eq!(second.generation(), 2);
    assert_consistent(&second);
    assert_eq!(
        second.spki_der(),
        failed_spki,
        "the retry did not reuse the prepared key"
    );
    assert_eq!(recipient.status().last_error, None);
    handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresher_retries_nsm_failures_and_recovers() {
    let nsm = Arc::new(FakeNsm::default());
    let (recipient, handle) = Recipient::start(nsm.clone(), config(Duration::from_millis(300)))
        .await
        .unwrap();
    let first = recipient.current();
    nsm.fail_attest.store(true, Ordering::SeqCst);
    wait_for("three failed refreshes", Duration::from_secs(120), || {
        recipient.status().failures >= 3
    })
    .await;
    let status = recipient.status();
    assert!(
        Arc::ptr_eq(&recipient.current(), &first),
        "a failed refresh replaced the pair"
    );
    assert_eq!(status.generation, 1);
    assert!(status.last_error.is_some(), "{status:?}");
    assert!(status.document_age >= Duration::from_millis(300));

    nsm.fail_attest.store(false, Ordering::SeqCst);
    wait_for("recovery", Duration::from_secs(120), || {
        recipient.status().generation >= 2
    })
    .await;
    assert_eq!(recipient.status().last_error, None);
    assert_consistent(&recipient.current());
    handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_fails_cleanly_when_the_nsm_fails() {
    let nsm = Arc::new(FakeNsm::default());
    nsm.fail_random.store(true, Ordering::SeqCst);
    match Recipient::start(nsm.clone(), quiet()).await {
        Err(RecipientError::Entropy(_)) => {}
        other => panic!("expected an entropy error, got {:?}", other.map(|(r, _)| r)),
    }
    nsm.fail_random.store(false, Ordering::SeqCst);
    nsm.fail_attest.store(true, Ordering::SeqCst);
    match Recipient::start(nsm.clone(), quiet()).await {
        Err(RecipientError::Attestation(_)) => {}
        other => panic!(
            "expected an attestation error, got {:?}",
            other.map(|(r, _)| r)
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_and_dropping_the_handle_stop_refreshing() {
    for drop_it in [false, true] {
        let nsm = Arc::new(FakeNsm::default());
        let (recipient, handle) = Recipient::start(nsm.clone(), config(Duration::from_millis(100)))
            .await
            .unwrap();
        if drop_it {
            drop(handle);
        } else {
            handle.shutdown().await.unwrap();
        }
        // Give a would-be refresher time to fire several times.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(recipient.current().generation(), 1, "drop_it = {drop_it}");
        assert_eq!(nsm.attest_calls.load(Ordering::SeqCst), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_output_carries_no_private_key_material() {
    let nsm = Arc::new(FakeNsm::default());
    let (recipient, handle) = Recipient::start(nsm, quiet()).await.unwrap();
    let pair = recipient.current();
    let secrets: Vec<String> = std::iter::once(pair.key().d())
        .chain(pair.key().primes().iter().map(|p| p.as_ref()))
        .map(|n| hex::encode(n.to_be_bytes()))
        .collect();
    for text in [
        format!("{pair:?}"),
        format!("{recipient:?}"),
        format!("{:?}", recipient.status()),
        format!("{handle:?}"),
    ] {
        assert!(
            text.contains("generation") || text.starts_with("RecipientHandle"),
            "{text}"
        );
        for s in &secrets {
            let s = s.trim_start_matches('0');
            assert!(
                !text.to_lowercase().contains(&s[..32]),
                "private key in {text}"
            );
        }
        assert!(
            !text.contains("primes") && !text.contains("precomputed"),
            "{text}"
        );
    }
    handle.shutdown().await.unwrap();
}

#[test]
fn bits_and_config_are_validated() {
    assert_eq!(
        "2048".parse::<RecipientBits>().unwrap(),
        RecipientBits::B2048
    );
    assert_eq!("3072".parse::<RecipientBits>().unwrap().bits(), 3072);
    assert_eq!(
        RecipientBits::try_from(4096).unwrap(),
        RecipientBits::default()
    );
    for bad in ["1024", "4095", "8192", "abc", ""] {
        let err = bad.parse::<RecipientBits>().unwrap_err();
        assert!(
            matches!(err, RecipientError::UnsupportedBits(_)),
            "{bad}: {err}"
        );
    }
    assert!(RecipientConfig::default().validate().is_ok());
    for bad in [
        config(Duration::ZERO),
        config(MAX_DOCUMENT_AGE),
        RecipientConfig {
            retry_initial: Duration::ZERO,
            ..quiet()
        },
        RecipientConfig {
            retry_max: Duration::from_millis(1),
            ..quiet()
        },
    ] {
        assert!(
            matches!(bad.validate(), Err(RecipientError::InvalidConfig(_))),
            "{bad:?}"
        );
    }
}
