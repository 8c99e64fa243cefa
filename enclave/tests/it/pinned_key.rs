//! The pinned KMS key (issue 12): a value encrypted under any other key is
//! refused at load even when the host's credentials may use that key, and
//! the previous set keeps being served.
//!
//! The second key here has the very same policy as the pinned one (the
//! enclave's PCR0 may decrypt, the test credentials belong to the account),
//! and the value carries the right name context: only the key differs.
#![allow(clippy::unwrap_used, missing_docs)]

use crate::support::emulator as emulator_support;

use std::sync::Arc;
use std::time::Duration;

use emulator_support::{Emulator, PCR0, pcr0_policy};
use keystore_enclave::kms::{Kms, KmsError, KmsErrorCode};
use keystore_enclave::load::{LoadConfig, LoadError, Loader};
use keystore_enclave::store::{SealKey, Store, StoreConfig};
use keystore_shared::envelope::Envelope;
use keystore_shared::protocol::{ErrorCode, LoadEntry};
use keystore_tests::kms::Operation;

struct Pinned {
    e: Emulator,
    /// Same policy as the pinned key, not pinned.
    second: String,
    store: Arc<Store>,
}

impl Pinned {
    async fn start() -> Pinned {
        let e = Emulator::start().await;
        let second = e.fx.kms.create_key(Some(&pcr0_policy(&PCR0))).unwrap().arn;
        let store = Arc::new(Store::new(
            SealKey::from_entropy(&[5; 32], &[6; 32]),
            StoreConfig::default(),
        ));
        Pinned { e, second, store }
    }

    /// One KMS call at a time, so call counts are exact.
    fn loader(&self, kms: Kms) -> Loader {
        let config = LoadConfig {
            concurrency: 1,
            initial_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            ..LoadConfig::default()
        };
        Loader::new(kms, self.e.recipient.clone(), self.store.clone(), config).unwrap()
    }

    async fn entry(&self, key: &str, name: &str, value: &[u8]) -> LoadEntry {
        LoadEntry {
            name: name.to_owned(),
            envelope: Envelope::kms(self.e.encrypt(key, name, value).await)
                .unwrap()
                .to_string(),
        }
    }

    fn decrypts(&self) -> (u64, u64) {
        let stats = self.e.fx.kms.calls(Operation::Decrypt);
        (stats.calls, stats.errors)
    }

    /// The store still serves exactly the first load.
    fn assert_previous_set(&self) {
        assert_eq!(self.store.names(), ["API_TOKEN", "DB_PASSWORD"]);
        assert_eq!(self.store.get("DB_PASSWORD").unwrap().as_slice(), b"old-pw");
        assert_eq!(self.store.status().generation, 1);
    }
}

#[tokio::test]
async fn a_value_under_a_second_key_is_refused_and_the_previous_set_is_still_served() {
    let p = Pinned::start().await;
    let loader = p.loader(p.e.kms());
    let pinned = p.e.key_arn.clone();
    loader
        .load(vec![
            p.entry(&pinned, "DB_PASSWORD", b"old-pw").await,
            p.entry(&pinned, "API_TOKEN", b"tok").await,
        ])
        .await
        .unwrap();

    // The host (which holds credentials allowed to use both keys) swaps in
    // a value encrypted under the second key, same name.
    let forged = p.entry(&p.second, "DB_PASSWORD", b"attacker-pw").await;
    p.e.fx.kms.reset_calls();
    let err = loader
        .load(vec![forged, p.entry(&pinned, "API_TOKEN", b"tok").await])
        .await
        .unwrap_err();
    assert_eq!(err.name(), Some("DB_PASSWORD"));
    assert_eq!(err.stage(), "kms");
    assert_eq!(err.code(), ErrorCode::Denied);
    // KMS refused it: the Decrypt named the pinned key.
    let LoadError::Kms { source, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(source.kms_code(), Some(&KmsErrorCode::IncorrectKey));
    let text = err.to_string();
    assert!(text.contains("IncorrectKeyException"), "{text}");
    assert!(
        text.contains(&pinned),
        "the hint names the pinned key: {text}"
    );
    assert!(!text.contains("attacker-pw"));
    assert_eq!(p.decrypts(), (1, 1));
    p.assert_previous_set();
    assert!(
        loader
            .last_error()
            .unwrap()
            .contains("IncorrectKeyException")
    );
}

#[tokio::test]
async fn an_answer_for_an_unpinned_key_is_refused_before_it_is_opened() {
    // A KMS that ignored KeyId (forged, or broken) answers for the
    // ciphertext's own key: the enclave's own check refuses the answer.
    let p = Pinned::start().await;
    let loader = p.loader(p.e.kms());
    let pinned = p.e.key_arn.clone();
    loader
        .load(vec![
            p.entry(&pinned, "DB_PASSWORD", b"old-pw").await,
            p.entry(&pinned, "API_TOKEN", b"tok").await,
        ])
        .await
        .unwrap();
    p.e.fx.kms.set_ignore_key_id(true);
    let forged = p.entry(&p.second, "DB_PASSWORD", b"attacker-pw").await;
    let err = loader.load(vec![forged]).await.unwrap_err();
    let LoadError::Kms { source, .. } = &err else {
        panic!("{err:?}")
    };
    match source {
        KmsError::UnpinnedKey { got, pinned: named } => {
            assert_eq!(got, &p.second);
            assert_eq!(named, &pinned);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(err.stage(), "pinned-key");
    assert_eq!(err.code(), ErrorCode::Denied);
    assert!(!err.is_revocation());
    assert!(!format!("{err} {err:?}").contains("attacker-pw"));
    p.assert_previous_set();
    // The check is on the answer, so a value under the pinned key still loads.
    loader
        .load(vec![
            p.entry(&pinned, "DB_PASSWORD", b"old-pw").await,
            p.entry(&pinned, "API_TOKEN", b"tok").await,
        ])
        .await
        .unwrap();
}

#[tokio::test]
async fn several_pinned_keys_are_each_tried_once_starting_with_the_last_good_one() {
    let p = Pinned::start().await;
    let pinned = p.e.key_arn.clone();
    let third =
        p.e.fx
            .kms
            .create_key(Some(&pcr0_policy(&PCR0)))
            .unwrap()
            .arn;
    // Pins the first and the second key; the third stays unpinned.
    let loader = p.loader(p.e.kms_pinned(&[&pinned, &p.second]));
    assert_eq!(loader.kms().pinned_keys().len(), 2);
    let batch = vec![
        p.entry(&pinned, "A", b"a").await,
        p.entry(&p.second, "B", b"b").await,
        p.entry(&p.second, "C", b"c").await,
    ];
    p.e.fx.kms.reset_calls();
    loader.load(batch).await.unwrap();
    // A: first key (1 call). B: first key refused, second key (2 calls).
    // C: the second key, which succeeded last, first (1 call).
    assert_eq!(p.decrypts(), (4, 1));
    assert_eq!(p.store.get("B").unwrap().as_slice(), b"b");

    let under_third = p.entry(&third, "D", b"d").await;
    p.e.fx.kms.reset_calls();
    let err = loader.load(vec![under_third]).await.unwrap_err();
    // Each pinned key once, then the refusal.
    assert_eq!(p.decrypts(), (2, 2));
    assert!(err.to_string().contains("IncorrectKeyException"), "{err}");
    assert_eq!(p.store.names(), ["A", "B", "C"]);
}

#[tokio::test]
async fn an_enclave_without_a_pinned_key_refuses_every_load() {
    let p = Pinned::start().await;
    let loader = p.loader(p.e.kms_pinned(&[]));
    let entry = p.entry(&p.e.key_arn, "A", b"a").await;
    p.e.fx.kms.reset_calls();
    let err = loader.load(vec![entry]).await.unwrap_err();
    assert!(matches!(err, LoadError::NoPinnedKey(_)), "{err:?}");
    assert_eq!((err.stage(), err.code()), ("config", ErrorCode::Denied));
    assert!(err.to_string().contains("--kms-key-arn"), "{err}");
    assert_eq!(p.decrypts(), (0, 0));
    assert!(p.store.names().is_empty());
}
