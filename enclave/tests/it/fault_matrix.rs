//! The fault matrix's in-process case (issue 15; the others run the real
//! processes in `host-proxy/tests/it/fault_matrix.rs`): temporary
//! credentials expiring while a load is in flight. The credentials service
//! here hands out whichever generation the test says, so "KMS now refuses
//! the cached token" and "new credentials are available" can be set apart.
#![allow(clippy::unwrap_used, missing_docs)]

use crate::support::emulator::{
    Emulator, SECRET_KEY, SESSION_TOKEN, Serving, credentials, kms_config, pinned,
};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use crate::support::emulator::CredentialsService;
use keystore_enclave::kms::Kms;
use keystore_enclave::kms::breaker::BreakerConfig;
use keystore_enclave::load::Loader;
use keystore_enclave::service::KeystoreService;
use keystore_enclave::store::Store;
use keystore_shared::envelope::Envelope;
use keystore_shared::protocol::LoadEntry;
use keystore_tests::kms::{Credential, Fault, Operation};

/// The access key of credentials generation `n`.
fn access_key(n: usize) -> String {
    format!("ASIAFAULTMATRIXGEN{n:02}")
}

struct Setup {
    em: Emulator,
    /// Which generation the credentials service hands out.
    generation: Arc<AtomicUsize>,
    creds: CredentialsService,
    store: Arc<Store>,
    loader: Arc<Loader>,
    service: KeystoreService,
}

async fn start() -> Setup {
    start_with(1, BreakerConfig::default()).await
}

/// `concurrency` KMS calls at once during a load, `breaker` around them.
async fn start_with(concurrency: usize, breaker: BreakerConfig) -> Setup {
    let em = Emulator::start().await;
    let generation = Arc::new(AtomicUsize::new(0));
    let current = generation.clone();
    let creds = CredentialsService::start(Arc::new(move |_| {
        Some(credentials(
            &access_key(current.load(Ordering::SeqCst)),
            Some(3600),
        ))
    }))
    .await;
    em.fx.kms.add_credential(
        Credential::new(access_key(0), SECRET_KEY).with_session_token(SESSION_TOKEN, None),
    );
    let mut config = kms_config(
        em.fx.kms.region(),
        em.relay.endpoint(),
        Some(em.ca_pem()),
        creds.endpoint.clone(),
    );
    config.pinned_keys = pinned(&[&em.key_arn]);
    config.breaker = breaker;
    let kms = Kms::new(config).unwrap();
    // One call at a time (by default): the expiry lands between two calls
    // of one load.
    let Serving {
        store,
        loader,
        service,
    } = em.serving(kms, concurrency);
    Setup {
        em,
        generation,
        creds,
        store,
        loader,
        service,
    }
}

impl Setup {
    async fn entries(&self, prefix: &str) -> Vec<LoadEntry> {
        let mut out = Vec::new();
        for name in ["A", "B", "C", "D"] {
            let value = format!("{prefix}-{name}");
            let blob = self
                .em
                .encrypt(&self.em.key_arn, name, value.as_bytes())
                .await;
            out.push(LoadEntry {
                name: name.to_owned(),
                envelope: Envelope::kms(blob).unwrap().to_string(),
            });
        }
        out
    }

    /// Every name holds its `prefix` value: one whole set.
    fn assert_set(&self, prefix: &str) {
        assert_eq!(self.store.names(), ["A", "B", "C", "D"]);
        for name in ["A", "B", "C", "D"] {
            assert_eq!(
                self.store.get(name).unwrap().as_slice(),
                format!("{prefix}-{name}").as_bytes(),
                "{name}"
            );
        }
    }

    /// KMS now refuses generation `n` (its token expired at KMS's clock).
    fn expire(&self, n: usize) {
        assert!(self.em.fx.kms.remove_credential(&access_key(n)));
        self.em.fx.kms.add_credential(
            Credential::new(access_key(n), SECRET_KEY).with_session_token(
                SESSION_TOKEN,
                Some(SystemTime::now() - Duration::from_secs(60)),
            ),
        );
    }

    /// KMS accepts generation `n` and the credentials service hands it out.
    fn issue(&self, n: usize) {
        self.em.fx.kms.add_credential(
            Credential::new(access_key(n), SECRET_KEY).with_session_token(SESSION_TOKEN, None),
        );
        self.generation.store(n, Ordering::SeqCst);
    }

    /// Starts loading `entries` with every `Decrypt` held 300 ms, and
    /// returns once the first of them has reached KMS (signed with the
    /// cached credentials).
    async fn load_in_flight(
        &self,
        entries: Vec<LoadEntry>,
    ) -> tokio::task::JoinHandle<Result<usize, String>> {
        let before = self.em.fx.kms.calls(Operation::Decrypt).calls;
        assert!(
            self.em.fx.kms.inject(
                Fault::latency(Duration::from_millis(300))
                    .fraction(1.0)
                    .on(Operation::Decrypt)
            )
        );
        let loader = self.loader.clone();
        let load = tokio::spawn(async move {
            loader
                .load(entries)
                .await
                .map(|r| r.count)
                .map_err(|e| e.to_string())
        });
        for _ in 0..500 {
            if self.em.fx.kms.calls(Operation::Decrypt).calls > before {
                return load;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no Decrypt reached KMS");
    }
}

/// The token expires mid-load and the host already has new credentials:
/// the enclave fetches them once and the load completes, whole.
#[tokio::test]
async fn credentials_expiring_mid_load_are_replaced_and_the_load_completes() {
    let s = start().await;
    s.loader.load(s.entries("old").await).await.unwrap();
    assert_eq!(s.creds.requests.load(Ordering::SeqCst), 1);
    let new = s.entries("new").await;

    let load = s.load_in_flight(new).await;
    s.expire(0);
    s.issue(1);
    let count = load.await.unwrap().unwrap();
    assert_eq!(count, 4);
    s.assert_set("new");
    // The expired token was refused once, then the cache was refreshed.
    assert!(s.em.fx.kms.calls(Operation::Decrypt).errors >= 1);
    assert_eq!(s.creds.requests.load(Ordering::SeqCst), 2);
    let status = s.service.status();
    assert!(status.last_error.is_none(), "{status:?}");
    assert_eq!(status.breaker.unwrap().state, "closed");
}

/// The token expires mid-load before the host has new credentials: the
/// load fails naming the expiry, the old set stays whole, the breaker
/// stays closed (a refusal is an answer); once new credentials are out the
/// next load (the daemon's retry) succeeds.
#[tokio::test]
async fn credentials_expiring_mid_load_without_new_ones_keep_the_old_set() {
    let s = start().await;
    s.loader.load(s.entries("old").await).await.unwrap();
    let before = s.service.status();
    let new = s.entries("new").await;

    let load = s.load_in_flight(new.clone()).await;
    s.expire(0);
    let err = load.await.unwrap().unwrap_err();
    assert!(err.contains("ExpiredTokenException"), "{err}");
    s.assert_set("old");
    let status = s.service.status();
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("ExpiredTokenException")),
        "{status:?}"
    );
    assert_eq!(status.breaker.as_ref().unwrap().state, "closed");
    assert_eq!(status.last_good_load_unix_ms, before.last_good_load_unix_ms);
    assert_eq!(status.secret_count, 4);

    s.em.fx.kms.clear_faults();
    s.issue(1);
    assert_eq!(s.loader.load(new).await.unwrap().count, 4);
    s.assert_set("new");
    let status = s.service.status();
    assert!(status.last_error.is_none(), "{status:?}");
    assert!(status.last_good_load_unix_ms >= before.last_good_load_unix_ms);
}

/// A regression found by the fault matrix: a load of several values with
/// concurrent calls against an open breaker. One call becomes the
/// half-open probe, the others fail fast at once; the load used to abort
/// the probe with them, so with loads as the only traffic the breaker
/// never closed again, whatever KMS did. Now the probe finishes, its
/// answer closes the breaker, and a retried load lands (bounded loop).
#[tokio::test]
async fn an_open_breaker_closes_again_under_concurrent_loads() {
    let s = start_with(
        4,
        BreakerConfig {
            failure_threshold: 2,
            initial_open: Duration::from_millis(50),
            max_open: Duration::from_millis(100),
        },
    )
    .await;
    s.loader.load(s.entries("old").await).await.unwrap();
    let new = s.entries("new").await;
    assert!(
        s.em.fx
            .kms
            .inject(Fault::internal_error().fraction(1.0).on(Operation::Decrypt))
    );
    let mut opened = false;
    for _ in 0..20 {
        let err = s.loader.load(new.clone()).await.unwrap_err().to_string();
        opened |= err.contains("circuit breaker open");
        s.assert_set("old");
        if opened {
            break;
        }
    }
    assert!(opened, "the breaker never opened");
    let status = s.service.status();
    // While open, status still names the cause behind the breaker.
    let error = status.last_error.unwrap();
    assert!(
        error.contains("last failure: KMS refused: KMSInternalException"),
        "{error}"
    );

    s.em.fx.kms.clear_faults();
    let mut loaded = false;
    for _ in 0..100 {
        if s.loader.load(new.clone()).await.is_ok() {
            loaded = true;
            break;
        }
        s.assert_set("old");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        loaded,
        "the breaker never let a load through after KMS healed"
    );
    s.assert_set("new");
    assert_eq!(s.service.status().breaker.unwrap().state, "closed");
}
