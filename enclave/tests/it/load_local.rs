//! `Loader` against the KMS emulator: all-or-nothing replacement, limits,
//! retries with backoff, one invalidation on an attestation refusal.
#![allow(clippy::unwrap_used, missing_docs)]

use crate::support::emulator as emulator_support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use emulator_support::*;
use keystore_enclave::load::{LoadConfig, LoadError, LoadOutcome, Loader};
use keystore_enclave::store::{SealKey, Store, StoreConfig};
use keystore_shared::envelope::Envelope;
use keystore_shared::protocol::LoadEntry;
use keystore_tests::kms::{Fault, Operation};

struct Fixture {
    e: Emulator,
    key: String,
    store: Arc<Store>,
    loader: Loader,
}

async fn fixture(config: LoadConfig) -> Fixture {
    fixture_on(Emulator::start().await, config)
}

fn fixture_on(e: Emulator, config: LoadConfig) -> Fixture {
    let kms = e.kms();
    fixture_with(e, kms, config)
}

/// A fixture whose loader uses `kms` (e.g. pinning more keys).
fn fixture_with(e: Emulator, kms: keystore_enclave::kms::Kms, config: LoadConfig) -> Fixture {
    let key = e.key_arn.clone();
    let store = Arc::new(Store::new(
        SealKey::from_entropy(&[1; 32], &[2; 32]),
        StoreConfig::default(),
    ));
    let loader = Loader::new(kms, e.recipient.clone(), store.clone(), config).unwrap();
    Fixture {
        e,
        key,
        store,
        loader,
    }
}

fn fast() -> LoadConfig {
    LoadConfig {
        initial_backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(20),
        ..LoadConfig::default()
    }
}

impl Fixture {
    /// `value` encrypted under `key` for `name`.
    async fn entry_under(&self, key: &str, name: &str, value: &[u8]) -> LoadEntry {
        LoadEntry {
            name: name.to_owned(),
            envelope: Envelope::kms(self.e.encrypt(key, name, value).await)
                .unwrap()
                .to_string(),
        }
    }

    async fn entry(&self, name: &str, value: &[u8]) -> LoadEntry {
        self.entry_under(&self.key, name, value).await
    }

    async fn entries(&self, n: usize) -> Vec<LoadEntry> {
        let mut out = Vec::new();
        for i in 0..n {
            out.push(
                self.entry(&format!("SECRET_{i}"), format!("value-{i}").as_bytes())
                    .await,
            );
        }
        out
    }

    fn decrypt_calls(&self) -> u64 {
        self.e.fx.kms.calls(Operation::Decrypt).calls
    }
}

#[tokio::test]
async fn loads_every_value_and_reuses_connections() {
    let f = fixture(fast()).await;
    let report = f.loader.load(f.entries(40).await).await.unwrap();
    assert_eq!(report.count, 40);
    assert_eq!(report.kms_calls, 40);
    assert_eq!(report.retries, 0);
    assert_eq!(report.generation, 1);
    for i in 0..40 {
        assert_eq!(
            f.store.get(&format!("SECRET_{i}")).unwrap().as_slice(),
            format!("value-{i}").as_bytes()
        );
    }
    assert_eq!(f.decrypt_calls(), 40);
    // At most one connection per worker, not one per value.
    let stats = f.loader.kms().stats();
    assert!(stats.transport.tls_handshakes <= 8, "{stats:?}");
    assert!(f.e.relay.accepted() <= 8, "{}", f.e.relay.accepted());
    assert_eq!(stats.transport.requests, 40);
    assert!(matches!(
        f.loader.last_load().unwrap().outcome,
        LoadOutcome::Loaded(_)
    ));
    assert_eq!(f.loader.last_error(), None);
}

#[tokio::test]
async fn a_failure_keeps_the_previous_set_and_names_the_entry() {
    // Under a key (pinned too) whose policy pins another image: AccessDenied.
    let e = Emulator::start().await;
    let elsewhere = e.key(&[0x11; 48]);
    let kms = e.kms_pinned(&[&e.key_arn, &elsewhere]);
    let f = fixture_with(e, kms, fast());
    f.loader
        .load(vec![f.entry("OLD", b"old").await])
        .await
        .unwrap();
    let mut batch = f.entries(10).await;
    batch.push(f.entry_under(&elsewhere, "BAD", b"x").await);
    let err = f.loader.load(batch).await.unwrap_err();
    assert_eq!(err.name(), Some("BAD"));
    assert_eq!(err.stage(), "kms");
    assert!(err.to_string().contains("PCR0 = "), "{err}");
    // The old set still serves, and nothing of the failed load leaked in.
    assert_eq!(f.store.names(), ["OLD"]);
    assert_eq!(f.store.status().generation, 1);
    let last = f.loader.last_load().unwrap();
    match &last.outcome {
        LoadOutcome::Failed {
            stage,
            name,
            message,
        } => {
            assert_eq!(*stage, "kms");
            assert_eq!(name.as_deref(), Some("BAD"));
            assert!(message.contains("AccessDeniedException"));
        }
        other => panic!("{other:?}"),
    }
    assert!(f.loader.last_error().is_some());
}

#[tokio::test]
async fn refuses_duplicates_bad_envelopes_and_too_many_entries_before_calling_kms() {
    let f = fixture(LoadConfig {
        max_entries: 5,
        ..fast()
    })
    .await;
    let err = f
        .loader
        .load(vec![f.entry("A", b"1").await, f.entry("A", b"2").await])
        .await
        .unwrap_err();
    assert!(
        matches!(err, LoadError::DuplicateName { ref name } if name == "A"),
        "{err:?}"
    );
    let err = f.loader.load(f.entries(6).await).await.unwrap_err();
    assert!(
        matches!(err, LoadError::TooManyEntries { count: 6, max: 5 }),
        "{err:?}"
    );
    let bad = LoadEntry {
        name: "B".into(),
        envelope: "ENC[v1:kms:not base64!]".into(),
    };
    let err = f
        .loader
        .load(vec![f.entry("A", b"1").await, bad])
        .await
        .unwrap_err();
    assert_eq!((err.name(), err.stage()), (Some("B"), "envelope"));
    let err = f
        .loader
        .load(vec![f.entry("bad\nname", b"1").await])
        .await
        .unwrap_err();
    assert_eq!(err.stage(), "request");
    assert_eq!(f.decrypt_calls(), 0);
}

#[tokio::test]
async fn a_ciphertext_moved_under_another_name_fails_the_name_binding() {
    let f = fixture(fast()).await;
    let moved = LoadEntry {
        name: "ADMIN_TOKEN".into(),
        envelope: f.entry("GUEST_TOKEN", b"guest").await.envelope,
    };
    let err = f.loader.load(vec![moved]).await.unwrap_err();
    assert_eq!(err.name(), Some("ADMIN_TOKEN"));
    assert_eq!(err.stage(), "name-binding");
    assert!(f.store.is_empty());
}

#[tokio::test]
async fn retries_throttling_and_server_errors_with_bounded_attempts() {
    let f = fixture(LoadConfig {
        concurrency: 1,
        ..fast()
    })
    .await;
    let entries = f.entries(3).await;
    // The first three calls fail (throttling, 500, throttling).
    for fault in [
        Fault::throttle(),
        Fault::internal_error(),
        Fault::throttle(),
    ] {
        assert!(f.e.fx.kms.inject(fault.next(1).on(Operation::Decrypt)));
    }
    let report = f.loader.load(entries).await.unwrap();
    assert_eq!(report.count, 3);
    assert_eq!(report.retries, 3);
    assert_eq!(report.kms_calls, 6);
    let decrypts = f.e.fx.kms.calls(Operation::Decrypt);
    assert_eq!((decrypts.calls, decrypts.faulted), (6, 3));

    // Throttled forever: gives up after max_attempts calls for the entry.
    let f = fixture(LoadConfig {
        concurrency: 1,
        max_attempts: 4,
        ..fast()
    })
    .await;
    let only = f.entry("ONLY", b"v").await;
    assert!(
        f.e.fx
            .kms
            .inject(Fault::throttle().next(100).on(Operation::Decrypt))
    );
    let err = f.loader.load(vec![only]).await.unwrap_err();
    assert!(
        matches!(err, LoadError::Kms { attempts: 4, ref name, .. } if name == "ONLY"),
        "{err:?}"
    );
    assert_eq!(f.decrypt_calls(), 4);
}

#[tokio::test]
async fn an_attestation_refusal_invalidates_the_pair_once_and_retries() {
    // The emulator sees the published document as six minutes old and
    // refuses it; documents made afterwards carry its time and pass.
    let f = fixture(fast()).await;
    let entries = f.entries(12).await;
    f.e.age_documents(6 * 60);
    let before = f.recipient().current().generation();
    let report = f.loader.load(entries).await.unwrap();
    assert_eq!(report.count, 12);
    // Several workers may have seen the refusal, but the pair rotated once.
    assert_eq!(f.recipient().current().generation(), before + 1);
    assert!(report.invalidations >= 1);
    assert_eq!(report.kms_calls, 12 + report.invalidations);
    assert_eq!(f.decrypt_calls(), 12 + report.invalidations);

    // A refusal that persists with the new pair (documents from an NSM whose
    // root the emulator does not trust) fails after one invalidation.
    let f = fixture_on(
        Emulator::start_untrusted_nsm().await,
        LoadConfig {
            concurrency: 1,
            ..fast()
        },
    );
    let before = f.recipient().current().generation();
    let err = f
        .loader
        .load(vec![f.entry("A", b"v").await])
        .await
        .unwrap_err();
    assert!(matches!(err, LoadError::Kms { attempts: 2, .. }), "{err:?}");
    assert!(err.to_string().contains("attestation"), "{err}");
    assert_eq!(f.recipient().current().generation(), before + 1);
}

impl Fixture {
    fn recipient(&self) -> &keystore_enclave::recipient::Recipient {
        &self.e.recipient
    }
}

#[tokio::test]
async fn reload_re_decrypts_the_last_good_entries() {
    let f = fixture(fast()).await;
    assert!(matches!(
        f.loader.reload().await,
        Err(LoadError::NothingToReload)
    ));
    f.loader.load(f.entries(3).await).await.unwrap();
    let report = f.loader.reload().await.unwrap();
    assert_eq!(report.count, 3);
    assert_eq!(report.generation, 2);
    assert_eq!(f.decrypt_calls(), 6);
    let names: HashSet<String> = f.store.names().into_iter().collect();
    assert_eq!(names.len(), 3);
}

#[test]
fn refuses_a_config_that_would_stall() {
    for bad in [
        LoadConfig {
            concurrency: 0,
            ..LoadConfig::default()
        },
        LoadConfig {
            max_attempts: 0,
            ..LoadConfig::default()
        },
        LoadConfig {
            max_duration: Duration::ZERO,
            ..LoadConfig::default()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
    LoadConfig::default().validate().unwrap();
}
