//! Serve-last-good and the KMS circuit breaker (issue 15), end to end in
//! process: mock NSM + `Recipient` + the enclave's `Kms` client (with its
//! breaker) + the KMS emulator injecting faults + `Loader` + the service's
//! `status`. KMS calls are counted at the emulator.
#![allow(clippy::unwrap_used, missing_docs)]

use crate::support::emulator::{Emulator, Serving};

use std::sync::Arc;
use std::time::Duration;

use keystore_enclave::kms::breaker::{BreakerConfig, BreakerState};
use keystore_enclave::kms::{Kms, KmsError};
use keystore_enclave::load::{LoadError, Loader};
use keystore_enclave::service::KeystoreService;
use keystore_enclave::store::Store;
use keystore_shared::envelope::Envelope;
use keystore_shared::protocol::{ErrorCode, LoadEntry};
use keystore_tests::kms::{Fault, Operation};

const THRESHOLD: u32 = 3;

struct Setup {
    em: Emulator,
    store: Arc<Store>,
    loader: Arc<Loader>,
    service: KeystoreService,
}

async fn start() -> Setup {
    let em = Emulator::start().await;
    let mut config = em.kms_config(em.relay.endpoint(), Some(em.ca_pem()));
    config.breaker = BreakerConfig {
        failure_threshold: THRESHOLD,
        initial_open: Duration::from_millis(200),
        max_open: Duration::from_millis(400),
    };
    let kms = Kms::new(config).unwrap();
    // One call at a time, so "calls before the breaker opens" is exact.
    let Serving {
        store,
        loader,
        service,
    } = em.serving(kms, 1);
    Setup {
        em,
        store,
        loader,
        service,
    }
}

impl Setup {
    async fn entries(&self, prefix: &str, n: usize) -> Vec<LoadEntry> {
        let mut out = Vec::new();
        for i in 0..n {
            let name = format!("{prefix}{i}");
            let blob = self
                .em
                .encrypt(&self.em.key_arn, &name, format!("value-{name}").as_bytes())
                .await;
            out.push(LoadEntry {
                name,
                envelope: Envelope::kms(blob).unwrap().to_string(),
            });
        }
        out
    }

    fn decrypt_calls(&self) -> u64 {
        self.em.fx.kms.calls(Operation::Decrypt).calls
    }

    fn assert_serves_old_set(&self) {
        assert_eq!(self.store.names(), ["OLD0", "OLD1"]);
        assert_eq!(self.store.get("OLD1").unwrap().as_slice(), b"value-OLD1");
    }
}

fn is_breaker_open(err: &LoadError) -> bool {
    matches!(
        err,
        LoadError::Kms {
            source: KmsError::BreakerOpen { .. },
            ..
        }
    )
}

async fn breaker_storm(fault: Fault) {
    let s = start().await;
    s.loader.load(s.entries("OLD", 2).await).await.unwrap();
    let before = s.service.status();
    assert_eq!(before.breaker.as_ref().unwrap().state, "closed");
    assert!(before.last_good_load_unix_ms.is_some());
    let new_entries = s.entries("NEW", 3).await;

    s.em.fx.kms.reset_calls();
    assert!(s.em.fx.kms.inject(fault));
    // A storm of loads and re-decrypts against a failing KMS.
    let mut fast_fails = 0;
    for round in 0..20 {
        let err = if round % 2 == 0 {
            s.loader.reload().await.unwrap_err()
        } else {
            s.loader.load(new_entries.clone()).await.unwrap_err()
        };
        assert!(!err.is_revocation(), "{err}");
        assert_eq!(err.code(), ErrorCode::Unavailable, "{err}");
        if is_breaker_open(&err) {
            fast_fails += 1;
            assert_eq!(err.stage(), "breaker");
        }
        // Never a mixed set: the old one, whole.
        s.assert_serves_old_set();
    }
    let snap = s.loader.kms().breaker();
    assert!(snap.opened >= 1, "{snap:?}");
    assert!(fast_fails >= 1);
    // Every call after the breaker first opened was a (failed) half-open
    // probe, and each failed probe re-opened it: the storm cost exactly
    // the threshold plus the probes, whatever the timing.
    assert_eq!(
        s.decrypt_calls(),
        u64::from(THRESHOLD) + (snap.opened - 1),
        "{snap:?}"
    );
    let status = s.service.status();
    let breaker = status.breaker.unwrap();
    assert_eq!(breaker.state, "open");
    assert!(breaker.consecutive_failures >= u64::from(THRESHOLD));
    assert!(breaker.next_probe_in_ms.is_some());
    // Why it opened (whether or not a load has finished since): the same
    // failure the last load's error names.
    let cause = breaker.last_failure.unwrap_or_default();
    let last_error = status.last_error.clone().unwrap_or_default();
    assert!(
        !cause.is_empty() && last_error.contains(&cause),
        "{cause:?} in {last_error:?}"
    );
    assert_eq!(status.secret_count, 2);
    assert_eq!(status.last_good_load_unix_ms, before.last_good_load_unix_ms);
    assert_eq!(status.max_stale_ms, Some(24 * 3600 * 1000));
    assert!(status.last_decrypt_age_ms.is_some());
    assert!(status.last_error.is_some());

    // The fault clears: a probe goes through (after the jittered wait),
    // closes the breaker, and a new load succeeds. Bounded wait.
    s.em.fx.kms.clear_faults();
    let mut reloaded = false;
    for _ in 0..100 {
        match s.loader.reload().await {
            Ok(_) => {
                reloaded = true;
                break;
            }
            Err(err) => assert!(is_breaker_open(&err), "{err}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "the breaker never let a probe through");
    let snap = s.loader.kms().breaker();
    assert_eq!(snap.state, BreakerState::Closed);
    assert_eq!(snap.consecutive_failures, 0);
    let report = s.loader.load(new_entries).await.unwrap();
    assert_eq!(report.count, 3);
    assert_eq!(s.store.names(), ["NEW0", "NEW1", "NEW2"]);
    let status = s.service.status();
    assert_eq!(status.breaker.unwrap().state, "closed");
    assert!(status.last_good_load_unix_ms >= before.last_good_load_unix_ms);
    assert!(status.last_error.is_none());
}

#[tokio::test]
async fn a_throttling_kms_opens_the_breaker_and_the_old_set_keeps_serving() {
    breaker_storm(Fault::throttle().fraction(1.0).on(Operation::Decrypt)).await;
}

#[tokio::test]
async fn a_failing_kms_opens_the_breaker_and_recovers_when_it_heals() {
    breaker_storm(Fault::internal_error().fraction(1.0).on(Operation::Decrypt)).await;
}

#[tokio::test]
async fn dropped_connections_open_the_breaker() {
    breaker_storm(
        Fault::drop_connection()
            .fraction(1.0)
            .on(Operation::Decrypt),
    )
    .await;
}

#[tokio::test]
async fn refusals_are_answers_and_never_open_the_breaker() {
    let s = start().await;
    s.loader.load(s.entries("OLD", 2).await).await.unwrap();
    // Entries bound to one name presented under another: KMS answers
    // InvalidCiphertextException every time.
    let mut moved = s.entries("X", 1).await;
    moved[0].name = "Y0".to_owned();
    s.em.fx.kms.reset_calls();
    for _ in 0..(THRESHOLD * 3) {
        let err = s.loader.load(moved.clone()).await.unwrap_err();
        assert_eq!(err.stage(), "name-binding", "{err}");
        s.assert_serves_old_set();
    }
    assert_eq!(s.decrypt_calls(), u64::from(THRESHOLD * 3));
    let snap = s.loader.kms().breaker();
    assert_eq!(snap.state, BreakerState::Closed);
    assert_eq!(snap.opened, 0);
}
