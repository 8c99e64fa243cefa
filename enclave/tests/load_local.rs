//! `Loader` against the local KMS fake: all-or-nothing replacement, limits,
//! retries with backoff, one invalidation on an attestation refusal.
#![allow(clippy::unwrap_used, missing_docs)]

mod kms_support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keystore_enclave::load::{LoadConfig, LoadError, LoadOutcome, Loader};
use keystore_enclave::store::{SealKey, Store, StoreConfig};
use keystore_shared::envelope::Envelope;
use keystore_shared::protocol::LoadEntry;
use kms_support::*;

struct Fixture {
    _dir: tempfile::TempDir,
    _handle: keystore_enclave::recipient::RecipientHandle,
    recipient: keystore_enclave::recipient::Recipient,
    _server: HttpsServer,
    _creds: CredentialsService,
    store: Arc<Store>,
    loader: Loader,
}

async fn fixture(handler: Handler, config: LoadConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (_nsm, recipient, handle) = recipient(dir.path()).await;
    let tls = TestTls::new(&[KMS_HOST]);
    let server = HttpsServer::start(tls.server.clone(), handler).await;
    let creds = CredentialsService::fixed().await;
    let kms = kms(kms_config(
        server.endpoint(),
        KMS_HOST,
        Some(&tls.ca_pem),
        creds.endpoint.clone(),
    ));
    let store = Arc::new(Store::new(
        SealKey::from_entropy(&[1; 32], &[2; 32]),
        StoreConfig::default(),
    ));
    let loader = Loader::new(kms, recipient.clone(), store.clone(), config).unwrap();
    Fixture {
        _dir: dir,
        _handle: handle,
        recipient,
        _server: server,
        _creds: creds,
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

fn entry(name: &str, value: &[u8]) -> LoadEntry {
    LoadEntry {
        name: name.to_owned(),
        envelope: Envelope::kms(fake_ciphertext(name, value))
            .unwrap()
            .to_string(),
    }
}

fn entries(n: usize) -> Vec<LoadEntry> {
    (0..n)
        .map(|i| entry(&format!("SECRET_{i}"), format!("value-{i}").as_bytes()))
        .collect()
}

#[tokio::test]
async fn loads_every_value_and_reuses_connections() {
    let f = fixture(Arc::new(|s| fake_decrypt(s, false)), fast()).await;
    let report = f.loader.load(entries(40)).await.unwrap();
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
    // At most one connection per worker, not one per value.
    let stats = f.loader.kms().stats();
    assert!(stats.transport.tls_handshakes <= 8, "{stats:?}");
    assert_eq!(stats.transport.requests, 40);
    assert!(matches!(
        f.loader.last_load().unwrap().outcome,
        LoadOutcome::Loaded(_)
    ));
    assert_eq!(f.loader.last_error(), None);
}

#[tokio::test]
async fn a_failure_keeps_the_previous_set_and_names_the_entry() {
    // The fake refuses one particular name with AccessDenied.
    let f = fixture(
        Arc::new(|s| {
            if String::from_utf8_lossy(&s.body).contains("\"BAD\"") {
                kms_error(400, "AccessDeniedException", "not authorized")
            } else {
                fake_decrypt(s, false)
            }
        }),
        fast(),
    )
    .await;
    f.loader.load(vec![entry("OLD", b"old")]).await.unwrap();
    let mut batch = entries(10);
    batch.push(entry("BAD", b"x"));
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
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let config = LoadConfig {
        max_entries: 5,
        ..fast()
    };
    let f = fixture(
        Arc::new(move |s| {
            c.fetch_add(1, Ordering::SeqCst);
            fake_decrypt(s, false)
        }),
        config,
    )
    .await;
    let err = f
        .loader
        .load(vec![entry("A", b"1"), entry("A", b"2")])
        .await
        .unwrap_err();
    assert!(
        matches!(err, LoadError::DuplicateName { ref name } if name == "A"),
        "{err:?}"
    );
    let err = f.loader.load(entries(6)).await.unwrap_err();
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
        .load(vec![entry("A", b"1"), bad])
        .await
        .unwrap_err();
    assert_eq!((err.name(), err.stage()), (Some("B"), "envelope"));
    let err = f
        .loader
        .load(vec![entry("bad\nname", b"1")])
        .await
        .unwrap_err();
    assert_eq!(err.stage(), "request");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_ciphertext_moved_under_another_name_fails_the_name_binding() {
    let f = fixture(Arc::new(|s| fake_decrypt(s, false)), fast()).await;
    let moved = LoadEntry {
        name: "ADMIN_TOKEN".into(),
        envelope: entry("GUEST_TOKEN", b"guest").envelope,
    };
    let err = f.loader.load(vec![moved]).await.unwrap_err();
    assert_eq!(err.name(), Some("ADMIN_TOKEN"));
    assert_eq!(err.stage(), "name-binding");
    assert!(f.store.is_empty());
}

#[tokio::test]
async fn retries_throttling_and_server_errors_with_bounded_attempts() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    // The first three calls fail (throttling, 500, throttling).
    let f = fixture(
        Arc::new(move |s| match c.fetch_add(1, Ordering::SeqCst) {
            0 | 2 => kms_error(400, "ThrottlingException", "Rate exceeded"),
            1 => kms_error(500, "KMSInternalException", "internal"),
            _ => fake_decrypt(s, false),
        }),
        LoadConfig {
            concurrency: 1,
            ..fast()
        },
    )
    .await;
    let report = f.loader.load(entries(3)).await.unwrap();
    assert_eq!(report.count, 3);
    assert_eq!(report.retries, 3);
    assert_eq!(report.kms_calls, 6);
    assert_eq!(calls.load(Ordering::SeqCst), 6);

    // Throttled forever: gives up after max_attempts calls for the entry.
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let f = fixture(
        Arc::new(move |_| {
            c.fetch_add(1, Ordering::SeqCst);
            kms_error(400, "ThrottlingException", "Rate exceeded")
        }),
        LoadConfig {
            concurrency: 1,
            max_attempts: 4,
            ..fast()
        },
    )
    .await;
    let err = f.loader.load(vec![entry("ONLY", b"v")]).await.unwrap_err();
    assert!(
        matches!(err, LoadError::Kms { attempts: 4, ref name, .. } if name == "ONLY"),
        "{err:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn an_attestation_refusal_invalidates_the_pair_once_and_retries() {
    // The fake refuses the first document it sees as stale, accepts others.
    let refused: Arc<Mutex<Option<Vec<u8>>>> = Arc::new(Mutex::new(None));
    let r = refused.clone();
    let f = fixture(
        Arc::new(move |s| {
            let body: serde_json::Value = serde_json::from_slice(&s.body).unwrap();
            let doc = body["Recipient"]["AttestationDocument"]
                .as_str()
                .unwrap()
                .as_bytes()
                .to_vec();
            let mut first = r.lock().unwrap();
            if first.is_none() {
                *first = Some(doc.clone());
            }
            if first.as_deref() == Some(doc.as_slice()) {
                kms_error(
                    400,
                    "ValidationException",
                    "the attestation document is 361 s old",
                )
            } else {
                fake_decrypt(s, false)
            }
        }),
        fast(),
    )
    .await;
    let before = f.recipient.current().generation();
    let report = f.loader.load(entries(12)).await.unwrap();
    assert_eq!(report.count, 12);
    // Several workers may have seen the refusal, but the pair rotated once.
    assert_eq!(f.recipient.current().generation(), before + 1);
    assert!(report.invalidations >= 1);
    assert_eq!(report.kms_calls, 12 + report.invalidations);

    // A refusal that persists with the new pair fails after one invalidation.
    let f = fixture(
        Arc::new(|_| {
            kms_error(
                400,
                "ValidationException",
                "attestation document signature invalid",
            )
        }),
        LoadConfig {
            concurrency: 1,
            ..fast()
        },
    )
    .await;
    let before = f.recipient.current().generation();
    let err = f.loader.load(vec![entry("A", b"v")]).await.unwrap_err();
    assert!(matches!(err, LoadError::Kms { attempts: 2, .. }), "{err:?}");
    assert_eq!(f.recipient.current().generation(), before + 1);
}

#[tokio::test]
async fn reload_re_decrypts_the_last_good_entries() {
    let f = fixture(Arc::new(|s| fake_decrypt(s, false)), fast()).await;
    assert!(matches!(
        f.loader.reload().await,
        Err(LoadError::NothingToReload)
    ));
    f.loader.load(entries(3)).await.unwrap();
    let report = f.loader.reload().await.unwrap();
    assert_eq!(report.count, 3);
    assert_eq!(report.generation, 2);
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
