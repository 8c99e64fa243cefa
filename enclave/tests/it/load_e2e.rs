//! The real load path end to end, in process: mock NSM + `Recipient` +
//! the enclave's `Kms` client (own TLS connector through a tcp "proxy"
//! endpoint, credentials from a local credentials service) + the KMS
//! emulator enforcing a key policy that pins PCR0 → `Loader` fills the
//! sealed store.
#![allow(clippy::unwrap_used, missing_docs)]

use crate::support::emulator as emulator_support;

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_kms::primitives::Blob;
use emulator_support::{Emulator, PCR0, pcr0_policy};
use keystore_enclave::load::{LoadConfig, LoadError, Loader};
use keystore_enclave::store::{SealKey, Store, StoreConfig};
use keystore_shared::envelope::{Envelope, NAME_CONTEXT_KEY};
use keystore_tests::kms::{Fault, Operation};

struct E2e {
    em: Emulator,
    store: Arc<Store>,
    loader: Arc<Loader>,
}

// The emulator, its NSM and the recipient read as fields of the test.
impl std::ops::Deref for E2e {
    type Target = Emulator;
    fn deref(&self) -> &Emulator {
        &self.em
    }
}

async fn start(config: LoadConfig) -> E2e {
    let em = Emulator::start().await;
    let store = Arc::new(Store::new(
        SealKey::from_entropy(&[3; 32], &[4; 32]),
        StoreConfig::default(),
    ));
    let loader =
        Arc::new(Loader::new(em.kms(), em.recipient.clone(), store.clone(), config).unwrap());
    E2e { em, store, loader }
}

/// [`start`], with a second key the loader also pins; returns its ARN.
async fn start_with_second_key(config: LoadConfig) -> (E2e, String) {
    let em = Emulator::start().await;
    let second = em.key(&PCR0);
    let store = Arc::new(Store::new(
        SealKey::from_entropy(&[3; 32], &[4; 32]),
        StoreConfig::default(),
    ));
    let kms = em.kms_pinned(&[&em.key_arn, &second]);
    let loader = Arc::new(Loader::new(kms, em.recipient.clone(), store.clone(), config).unwrap());
    (E2e { em, store, loader }, second)
}

fn fast() -> LoadConfig {
    LoadConfig {
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        ..LoadConfig::default()
    }
}

impl E2e {
    /// The operator side: `Encrypt` with the name-binding context.
    async fn entry(
        &self,
        key: &str,
        name: &str,
        value: &[u8],
    ) -> keystore_shared::protocol::LoadEntry {
        let out = self
            .fx
            .client()
            .encrypt()
            .key_id(key)
            .plaintext(Blob::new(value))
            .encryption_context(NAME_CONTEXT_KEY, name)
            .send()
            .await
            .unwrap();
        keystore_shared::protocol::LoadEntry {
            name: name.to_owned(),
            envelope: Envelope::kms(out.ciphertext_blob.unwrap().into_inner())
                .unwrap()
                .to_string(),
        }
    }

    async fn entries(
        &self,
        key: &str,
        prefix: &str,
        n: usize,
    ) -> Vec<keystore_shared::protocol::LoadEntry> {
        let mut out = Vec::new();
        for i in 0..n {
            out.push(
                self.entry(
                    key,
                    &format!("{prefix}{i}"),
                    format!("value-{prefix}{i}").as_bytes(),
                )
                .await,
            );
        }
        out
    }
}

#[tokio::test]
async fn load_fills_the_store_through_the_emulator() {
    let e = start(fast()).await;
    let key = e.key_arn.clone();
    let entries = e.entries(&key, "S", 20).await;
    e.fx.kms.reset_calls();
    let report = e.loader.load(entries).await.unwrap();
    assert_eq!(
        (report.count, report.kms_calls, report.retries),
        (20, 20, 0)
    );
    for i in 0..20 {
        assert_eq!(
            e.store.get(&format!("S{i}")).unwrap().as_slice(),
            format!("value-S{i}").as_bytes()
        );
    }
    let decrypts = e.fx.kms.calls(Operation::Decrypt);
    assert_eq!(decrypts.calls, 20);
    assert_eq!(decrypts.with_recipient, 20);
    assert_eq!(decrypts.plaintext_responses, 0);
    // Keep-alive: at most one TLS handshake per worker, not one per value.
    let stats = e.loader.kms().stats();
    assert!(stats.transport.tls_handshakes <= 8, "{stats:?}");
    assert_eq!(stats.credential_fetches, 1);
    eprintln!(
        "20 values: {} KMS calls over {} TLS handshakes in {:?}",
        report.kms_calls, stats.transport.tls_handshakes, report.duration
    );
}

#[tokio::test]
async fn a_policy_pinning_another_pcr0_fails_with_the_hint_and_keeps_the_old_set() {
    let mut e = start(fast()).await;
    let good = e.key_arn.clone();
    // Both keys pinned: KMS itself refuses the other one (its policy).
    let other = e.key(&[0x11; 48]);
    let kms = e.kms_pinned(&[&good, &other]);
    e.loader = Arc::new(Loader::new(kms, e.recipient.clone(), e.store.clone(), fast()).unwrap());
    e.loader
        .load(vec![e.entry(&good, "OLD", b"old").await])
        .await
        .unwrap();
    let mut batch = e.entries(&good, "N", 3).await;
    batch.push(e.entry(&other, "PINNED_ELSEWHERE", b"x").await);
    let err = e.loader.load(batch).await.unwrap_err();
    assert_eq!(err.name(), Some("PINNED_ELSEWHERE"));
    // A periodic re-decrypt ending like this wipes the secrets.
    assert!(err.is_revocation(), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("AccessDeniedException"), "{text}");
    assert!(
        text.contains(&format!(
            "the key policy does not allow this enclave: PCR0 = {}",
            hex::encode(PCR0)
        )),
        "{text}"
    );
    assert_eq!(e.store.names(), ["OLD"]);
    assert_eq!(e.store.get("OLD").unwrap().as_slice(), b"old");
    assert!(
        e.loader
            .last_error()
            .unwrap()
            .contains("AccessDeniedException")
    );
}

#[tokio::test]
async fn a_stale_document_is_replaced_once_and_the_load_succeeds() {
    let e = start(LoadConfig {
        concurrency: 4,
        ..fast()
    })
    .await;
    let key = e.key_arn.clone();
    let entries = e.entries(&key, "T", 6).await;
    let generation = e.recipient.current().generation();
    // The emulator now sees the published document as six minutes old;
    // documents made from now on carry the emulator's time.
    e.age_documents(6 * 60);
    e.fx.kms.reset_calls();
    let report = e.loader.load(entries).await.unwrap();
    assert_eq!(report.count, 6);
    assert_eq!(e.recipient.current().generation(), generation + 1);
    assert!((1..=4).contains(&report.invalidations), "{report:?}");
    let decrypts = e.fx.kms.calls(Operation::Decrypt);
    assert_eq!(decrypts.calls, 6 + report.invalidations);
    assert_eq!(decrypts.errors, report.invalidations);
}

#[tokio::test]
async fn throttling_5xx_and_dropped_connections_are_retried_within_bounds() {
    let e = start(LoadConfig {
        concurrency: 1,
        ..fast()
    })
    .await;
    let key = e.key_arn.clone();
    let entries = e.entries(&key, "R", 3).await;
    e.fx.kms.reset_calls();
    assert!(
        e.fx.kms
            .inject(Fault::throttle().next(2).on(Operation::Decrypt))
    );
    assert!(
        e.fx.kms
            .inject(Fault::internal_error().next(1).on(Operation::Decrypt))
    );
    assert!(
        e.fx.kms
            .inject(Fault::drop_connection().next(1).on(Operation::Decrypt))
    );
    let report = e.loader.load(entries).await.unwrap();
    assert_eq!(report.count, 3);
    assert_eq!(report.retries, 4);
    assert_eq!(report.kms_calls, 7);
    let decrypts = e.fx.kms.calls(Operation::Decrypt);
    assert_eq!(decrypts.calls, 7);
    assert_eq!(decrypts.faulted, 4);
    assert_eq!(e.fx.kms.pending_faults(), 0);

    // Throttled beyond the attempt budget: the load fails, bounded.
    let e = start(LoadConfig {
        concurrency: 1,
        max_attempts: 3,
        ..fast()
    })
    .await;
    let key = e.key_arn.clone();
    let entry = e.entry(&key, "ONLY", b"v").await;
    e.fx.kms.reset_calls();
    assert!(
        e.fx.kms
            .inject(Fault::throttle().next(10).on(Operation::Decrypt))
    );
    let err = e.loader.load(vec![entry]).await.unwrap_err();
    assert!(matches!(err, LoadError::Kms { attempts: 3, .. }), "{err:?}");
    // Throttling is not a revocation: the current secrets would stay.
    assert!(!err.is_revocation());
    assert!(err.to_string().contains("ThrottlingException"), "{err}");
    assert_eq!(e.fx.kms.calls(Operation::Decrypt).calls, 3);
    assert!(e.store.is_empty());
}

#[tokio::test]
async fn a_ciphertext_moved_under_another_name_is_refused() {
    let e = start(fast()).await;
    let key = e.key_arn.clone();
    let guest = e.entry(&key, "GUEST_TOKEN", b"guest").await;
    let moved = keystore_shared::protocol::LoadEntry {
        name: "ADMIN_TOKEN".to_owned(),
        envelope: guest.envelope,
    };
    let err = e.loader.load(vec![moved]).await.unwrap_err();
    assert_eq!(err.name(), Some("ADMIN_TOKEN"));
    assert_eq!(err.stage(), "name-binding");
    assert!(
        err.to_string().contains("InvalidCiphertextException"),
        "{err}"
    );
    assert!(e.store.is_empty());
}

/// Runs `loader.reload_periodically` every 100 ms until the returned sender
/// is dropped or fires.
fn reload_every_100ms(e: &E2e) -> tokio::sync::oneshot::Sender<()> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let loader = e.loader.clone();
    tokio::spawn(async move {
        loader
            .reload_periodically(Duration::from_millis(100), async move {
                let _ = stopped.await;
            })
            .await;
    });
    stop
}

/// Waits (bounded) until `done` holds.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not happen within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_periodic_re_decrypt_wipes_the_secrets_once_the_key_policy_is_revoked() {
    let e = start(fast()).await;
    let key = e.key_arn.clone();
    e.loader.load(e.entries(&key, "R", 3).await).await.unwrap();
    let _stop = reload_every_100ms(&e);
    // Re-decrypts succeed while the policy allows this enclave.
    e.fx.kms.reset_calls();
    eventually("a successful re-decrypt", || {
        e.fx.kms.calls(Operation::Decrypt).calls >= 3
    })
    .await;
    assert_eq!(e.store.names(), ["R0", "R1", "R2"]);

    // The operator revokes: the policy now pins another image.
    e.fx.client()
        .put_key_policy()
        .key_id(&key)
        .policy_name("default")
        .policy(pcr0_policy(&[0x11; 48]))
        .send()
        .await
        .unwrap();
    eventually("the revocation wipe", || e.store.names().is_empty()).await;
    assert!(e.store.get("R0").is_err());
    let last = e.loader.last_error().unwrap();
    assert!(last.contains("AccessDeniedException"), "{last}");
}

#[tokio::test]
async fn the_periodic_re_decrypt_keeps_the_secrets_when_kms_is_only_unavailable() {
    let e = start(LoadConfig {
        max_attempts: 2,
        ..fast()
    })
    .await;
    let key = e.key_arn.clone();
    e.loader.load(e.entries(&key, "U", 2).await).await.unwrap();
    // Every Decrypt now fails with a KMS-side error (HTTP 500).
    e.fx.kms
        .inject(Fault::internal_error().fraction(1.0).on(Operation::Decrypt));
    let _stop = reload_every_100ms(&e);
    eventually("a failed re-decrypt", || e.loader.last_error().is_some()).await;
    let last = e.loader.last_error().unwrap();
    assert!(last.contains("KMSInternalException"), "{last}");
    // Not a revocation: the set keeps being served.
    assert_eq!(e.store.names(), ["U0", "U1"]);
    assert_eq!(e.store.get("U1").unwrap().as_slice(), b"value-U1");
}

#[tokio::test]
async fn an_empty_load_is_refused_unless_the_enclave_allows_it() {
    let e = start(fast()).await;
    let key = e.key_arn.clone();
    e.loader.load(e.entries(&key, "K", 2).await).await.unwrap();
    let err = e.loader.load(Vec::new()).await.unwrap_err();
    assert!(matches!(err, LoadError::Empty), "{err:?}");
    assert_eq!(err.code(), keystore_shared::protocol::ErrorCode::BadRequest);
    assert!(err.to_string().contains("--allow-empty"), "{err}");
    // Nothing was wiped.
    assert_eq!(e.store.names(), ["K0", "K1"]);

    let e = start(LoadConfig {
        allow_empty: true,
        ..fast()
    })
    .await;
    let key = e.key_arn.clone();
    e.loader.load(e.entries(&key, "K", 2).await).await.unwrap();
    assert_eq!(e.loader.load(Vec::new()).await.unwrap().count, 0);
    assert!(e.store.names().is_empty());
}

/// Makes the next `n` Decrypts take `delay`, then returns once the
/// emulator has seen the first of them (so it is in flight).
async fn slow_decrypts(e: &E2e, n: u32, delay: Duration) -> impl Fn() -> bool + '_ {
    e.fx.kms.reset_calls();
    assert!(
        e.fx.kms
            .inject(Fault::latency(delay).next(n).on(Operation::Decrypt))
    );
    move || e.fx.kms.calls(Operation::Decrypt).calls >= 1
}

#[tokio::test]
async fn a_load_during_a_revoked_re_decrypt_runs_after_the_wipe_and_is_kept() {
    let (e, new_key) = start_with_second_key(fast()).await;
    let old_key = e.key_arn.clone();
    e.loader
        .load(e.entries(&old_key, "OLD", 3).await)
        .await
        .unwrap();
    let fresh = e.entries(&new_key, "NEW", 2).await;
    // The operator revokes the old key; its re-decrypt will be refused,
    // slowly enough for a new Load to arrive meanwhile.
    e.fx.client()
        .put_key_policy()
        .key_id(&old_key)
        .policy_name("default")
        .policy(pcr0_policy(&[0x11; 48]))
        .send()
        .await
        .unwrap();
    let in_flight = slow_decrypts(&e, 3, Duration::from_millis(500)).await;
    let maintenance = {
        let loader = e.loader.clone();
        tokio::spawn(async move { loader.maintain(true).await })
    };
    eventually("the re-decrypt to reach KMS", in_flight).await;
    let loaded = e.loader.load(fresh).await.unwrap();
    let wiped = maintenance.await.unwrap();
    assert!(
        matches!(
            wiped,
            keystore_enclave::load::Maintenance::Wiped(
                keystore_enclave::load::WipeReason::Revoked(_)
            )
        ),
        "{wiped:?}"
    );
    // The wipe came first; the new set, published after it, is served.
    assert_eq!(e.store.names(), ["NEW0", "NEW1"]);
    assert_eq!(loaded.generation, e.store.status().generation);
    assert!(e.loader.decrypt_age().is_some());
}

#[tokio::test]
async fn a_re_decrypt_queued_behind_a_load_decrypts_the_new_entries() {
    let e = start(fast()).await;
    let key = e.key_arn.clone();
    e.loader
        .load(e.entries(&key, "OLD", 3).await)
        .await
        .unwrap();
    let fresh = e.entries(&key, "NEW", 2).await;
    let in_flight = slow_decrypts(&e, 2, Duration::from_millis(500)).await;
    let loading = {
        let loader = e.loader.clone();
        tokio::spawn(async move { loader.load(fresh).await })
    };
    eventually("the load to reach KMS", in_flight).await;
    let refreshed = e.loader.maintain(true).await;
    loading.await.unwrap().unwrap();
    match refreshed {
        // It re-decrypted the two new entries, not the three old ones.
        keystore_enclave::load::Maintenance::Refreshed(report) => assert_eq!(report.count, 2),
        other => panic!("expected a refresh, got {other:?}"),
    }
    assert_eq!(e.store.names(), ["NEW0", "NEW1"]);
    assert_eq!(e.fx.kms.calls(Operation::Decrypt).calls, 4);
}

#[tokio::test]
async fn an_enclave_cut_off_from_kms_for_max_stale_wipes_its_secrets() {
    let e = start(LoadConfig {
        max_attempts: 1,
        max_stale: Duration::from_secs(1),
        ..fast()
    })
    .await;
    let key = e.key_arn.clone();
    e.loader.load(e.entries(&key, "S", 2).await).await.unwrap();
    assert!(e.loader.decrypt_age().is_some());
    // KMS unreachable from now on (HTTP 500 on every Decrypt).
    e.fx.kms
        .inject(Fault::internal_error().fraction(1.0).on(Operation::Decrypt));
    let _stop = reload_every_100ms(&e);
    // Failures alone keep the set (not a revocation) ...
    eventually("a failed re-decrypt", || e.loader.last_error().is_some()).await;
    // ... until none has succeeded for max_stale.
    eventually("the staleness wipe", || e.store.names().is_empty()).await;
    let last = e.loader.last_error().unwrap();
    assert!(last.contains("--max-stale"), "{last}");
    assert_eq!(e.loader.decrypt_age(), None);
}
