//! File-key loads end to end against the KMS emulator: one `Decrypt` per
//! file however many values, and every way the host could tamper with a
//! file (add, drop, move, swap, roll back a value or the whole file, edit
//! the record, drop the record) refused with the entry named while the
//! previous set keeps being served.
#![allow(clippy::unwrap_used, missing_docs)]

use crate::support::emulator as emulator_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_kms::types::DataKeySpec;
use emulator_support::Emulator;
use keystore_enclave::load::{LoadConfig, LoadError, Loader, Maintenance};
use keystore_enclave::store::{SealKey, Store, StoreConfig};
use keystore_shared::envelope::Envelope;
use keystore_shared::file_record::{FILE_CONTEXT_KEY, FileId, FileKey, FileRecord};
use keystore_shared::name::FILE_NAME;
use keystore_shared::protocol::{DEFAULT_MAX_SECRET_VALUE, LoadEntry, MAX_LOAD_SECRETS};
use keystore_tests::kms::Operation;

struct E2e {
    em: Emulator,
    store: Arc<Store>,
    loader: Arc<Loader>,
}

async fn start() -> E2e {
    let em = Emulator::start().await;
    let store = Arc::new(Store::new(
        SealKey::from_entropy(&[3; 32], &[4; 32]),
        StoreConfig::default(),
    ));
    let config = LoadConfig {
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        ..LoadConfig::default()
    };
    let loader =
        Arc::new(Loader::new(em.kms(), em.recipient.clone(), store.clone(), config).unwrap());
    E2e { em, store, loader }
}

/// What the operator holds while writing one file: its id, the wrapped
/// data key and the derived keys.
struct OperatorFile {
    id: FileId,
    wrapped: Vec<u8>,
    key: FileKey,
}

impl E2e {
    /// `GenerateDataKey` under the pinned key with the file-id context, as
    /// `keystore-host encrypt --file-key` does.
    async fn new_file(&self) -> OperatorFile {
        let id = FileId(rand::random());
        let out = self
            .em
            .fx
            .client()
            .generate_data_key()
            .key_id(&self.em.key_arn)
            .key_spec(DataKeySpec::Aes256)
            .encryption_context(FILE_CONTEXT_KEY, id.to_hex())
            .send()
            .await
            .unwrap();
        let plaintext = out.plaintext.unwrap().into_inner();
        OperatorFile {
            id,
            wrapped: out.ciphertext_blob.unwrap().into_inner(),
            key: FileKey::derive(&plaintext, id).unwrap(),
        }
    }

    async fn kms_value(&self, name: &str, value: &[u8]) -> Envelope {
        Envelope::kms(self.em.encrypt(&self.em.key_arn, name, value).await).unwrap()
    }

    fn get(&self, name: &str) -> Vec<u8> {
        self.store.get(name).unwrap().to_vec()
    }
}

impl OperatorFile {
    fn seal(&self, name: &str, value: &[u8]) -> Envelope {
        self.key.seal(name, value, rand::random()).unwrap()
    }

    /// The entries of the file at `version`: `values` plus the signed record.
    fn load(&self, version: u64, values: &[(String, Envelope)]) -> Vec<LoadEntry> {
        let mut record = FileRecord::new(
            self.id,
            version,
            self.wrapped.clone(),
            values.iter().map(|(n, e)| (n.as_str(), e)),
        )
        .unwrap();
        self.key.sign(&mut record).unwrap();
        let mut entries = entries(values);
        entries.push(LoadEntry {
            name: FILE_NAME.to_owned(),
            envelope: record.to_envelope().unwrap().to_string(),
        });
        entries
    }
}

fn entries(values: &[(String, Envelope)]) -> Vec<LoadEntry> {
    values
        .iter()
        .map(|(name, envelope)| LoadEntry {
            name: name.clone(),
            envelope: envelope.to_string(),
        })
        .collect()
}

fn set_envelope(entries: &mut [LoadEntry], name: &str, envelope: String) {
    entries
        .iter_mut()
        .find(|e| e.name == name)
        .unwrap()
        .envelope = envelope;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_file_key_secrets_load_with_exactly_one_decrypt() {
    let e = start().await;
    let file = e.new_file().await;
    let values: Vec<(String, Envelope)> = (0..MAX_LOAD_SECRETS)
        .map(|i| {
            let name = format!("SECRET_{i:05}");
            let value = file.seal(&name, format!("value-{i}").as_bytes());
            (name, value)
        })
        .collect();
    let load = file.load(1, &values);
    e.em.fx.kms.reset_calls();
    let started = Instant::now();
    let report = e.loader.load(load).await.unwrap();
    let elapsed = started.elapsed();
    let decrypts = e.em.fx.kms.calls(Operation::Decrypt);
    assert_eq!(decrypts.calls, 1);
    assert_eq!(decrypts.with_recipient, 1);
    assert_eq!(decrypts.plaintext_responses, 0);
    assert_eq!((report.count, report.kms_calls), (MAX_LOAD_SECRETS, 1));
    assert_eq!(e.store.len(), MAX_LOAD_SECRETS);
    for i in [0, 1, 4_999, MAX_LOAD_SECRETS - 1] {
        assert_eq!(
            e.get(&format!("SECRET_{i:05}")),
            format!("value-{i}").as_bytes()
        );
    }
    eprintln!(
        "{MAX_LOAD_SECRETS} file-key secrets: {} KMS Decrypt, loaded in {elapsed:?}",
        decrypts.calls
    );

    // The periodic re-decrypt of a file-key file is one Decrypt as well.
    e.em.fx.kms.reset_calls();
    assert!(matches!(
        e.loader.maintain(true).await,
        Maintenance::Refreshed(_)
    ));
    assert_eq!(e.em.fx.kms.calls(Operation::Decrypt).calls, 1);
    assert_eq!(e.store.len(), MAX_LOAD_SECRETS);
}

#[tokio::test]
async fn a_one_mib_value_round_trips() {
    let e = start().await;
    let file = e.new_file().await;
    let big: Vec<u8> = (0..DEFAULT_MAX_SECRET_VALUE)
        .map(|i| (i % 251) as u8)
        .collect();
    let values = vec![("BIG".to_owned(), file.seal("BIG", &big))];
    e.loader.load(file.load(1, &values)).await.unwrap();
    assert_eq!(e.get("BIG"), big);
}

#[tokio::test]
async fn fk_kms_and_fk_rules_values_mix_in_one_file() {
    let e = start().await;
    let file = e.new_file().await;
    let rules = br#"{"rules":[{"who":{"uid":1000},"read":["A"]}]}"#;
    let values = vec![
        ("A".to_owned(), file.seal("A", b"fk-a")),
        ("B".to_owned(), file.seal("B", b"fk-b")),
        ("K".to_owned(), e.kms_value("K", b"kms-k").await),
        (
            "keystore:rules".to_owned(),
            file.seal("keystore:rules", rules),
        ),
    ];
    e.em.fx.kms.reset_calls();
    let report = e.loader.load(file.load(1, &values)).await.unwrap();
    // One Decrypt for the data key, one for the kms value.
    assert_eq!(e.em.fx.kms.calls(Operation::Decrypt).calls, 2);
    assert_eq!(report.kms_calls, 2);
    assert_eq!(e.get("A"), b"fk-a");
    assert_eq!(e.get("K"), b"kms-k");
    assert_eq!(e.store.names(), ["A", "B", "K"]);
    assert_eq!(
        e.store.snapshot().access().to_string(),
        "1 access rule(s) from keystore:rules"
    );
    assert_eq!(e.loader.served_version(), Some(1));
}

/// A served file (version 5): fk values A, B, C and the kms value K.
async fn served() -> (E2e, OperatorFile, Vec<(String, Envelope)>) {
    let e = start().await;
    let file = e.new_file().await;
    let values = vec![
        ("A".to_owned(), file.seal("A", b"a-v5")),
        ("B".to_owned(), file.seal("B", b"b-v5")),
        ("C".to_owned(), file.seal("C", b"c-v5")),
        ("K".to_owned(), e.kms_value("K", b"k-v5").await),
    ];
    e.loader.load(file.load(5, &values)).await.unwrap();
    (e, file, values)
}

/// The load is refused naming `name` (and `what` in the message), and the
/// version-5 set is still served.
async fn refused(e: &E2e, entries: Vec<LoadEntry>, name: &str, what: &str) -> LoadError {
    let err = e.loader.load(entries).await.unwrap_err();
    assert_eq!(err.name(), Some(name), "{err}");
    assert!(err.to_string().contains(what), "{err}");
    assert_eq!(e.get("A"), b"a-v5");
    assert_eq!(e.get("K"), b"k-v5");
    assert_eq!(e.store.names(), ["A", "B", "C", "K"]);
    assert_eq!(e.loader.served_version(), Some(5));
    err
}

#[tokio::test]
async fn a_swapped_fk_value_is_refused_naming_it() {
    let (e, file, values) = served().await;
    let mut load = file.load(5, &values);
    let (a, b) = (values[0].1.to_string(), values[1].1.to_string());
    set_envelope(&mut load, "A", b);
    set_envelope(&mut load, "B", a);
    let err = refused(&e, load, "A", "swapped").await;
    assert_eq!(err.stage(), "file-key");
    assert_eq!(err.code(), keystore_shared::protocol::ErrorCode::Denied);
}

#[tokio::test]
async fn a_dropped_value_is_refused_naming_it() {
    let (e, file, values) = served().await;
    let mut load = file.load(5, &values);
    load.retain(|entry| entry.name != "B");
    refused(&e, load, "B", "dropped").await;
    // A kms value dropped is caught the same way.
    let mut load = file.load(5, &values);
    load.retain(|entry| entry.name != "K");
    refused(&e, load, "K", "dropped").await;
}

#[tokio::test]
async fn an_added_value_is_refused_naming_it() {
    let (e, file, values) = served().await;
    let mut load = file.load(5, &values);
    // Sealed under the right key for its name, but not in the record.
    load.push(LoadEntry {
        name: "D".into(),
        envelope: file.seal("D", b"injected").to_string(),
    });
    refused(&e, load, "D", "added").await;
    // A kms value the operator encrypted for another file, added here.
    let mut load = file.load(5, &values);
    load.push(LoadEntry {
        name: "L".into(),
        envelope: e.kms_value("L", b"other").await.to_string(),
    });
    refused(&e, load, "L", "added").await;
}

#[tokio::test]
async fn a_moved_value_is_refused_naming_it() {
    let (e, file, values) = served().await;
    let mut load = file.load(5, &values);
    // C's envelope moved under the name B (C dropped).
    let c = values[2].1.to_string();
    load.retain(|entry| entry.name != "C");
    set_envelope(&mut load, "B", c);
    refused(&e, load, "B", "not the value").await;
}

#[tokio::test]
async fn a_rolled_back_value_is_refused_naming_it() {
    let (e, file, values) = served().await;
    // Older, valid envelopes of the same names: an fk one under the same
    // file key, and a kms one KMS would happily decrypt for K.
    let old_a = file.seal("A", b"a-v4").to_string();
    let mut load = file.load(5, &values);
    set_envelope(&mut load, "A", old_a);
    refused(&e, load, "A", "rolled back").await;
    let old_k = e.kms_value("K", b"k-v4").await.to_string();
    let mut load = file.load(5, &values);
    set_envelope(&mut load, "K", old_k);
    refused(&e, load, "K", "rolled back").await;
}

#[tokio::test]
async fn an_older_file_version_is_refused_and_a_reload_of_the_same_is_not() {
    let (e, file, values) = served().await;
    // A whole, valid file of an older version (its own MAC is right).
    refused(&e, file.load(4, &values), FILE_NAME, "no rollback").await;
    // The same version again is a reload.
    e.loader.load(file.load(5, &values)).await.unwrap();
    // A newer version is taken, and then the old one is refused.
    let newer = vec![("A".to_owned(), file.seal("A", b"a-v6"))];
    e.loader.load(file.load(6, &newer)).await.unwrap();
    assert_eq!(e.get("A"), b"a-v6");
    let err = e.loader.load(file.load(5, &values)).await.unwrap_err();
    assert!(err.to_string().contains("no rollback"), "{err}");
    assert_eq!(e.get("A"), b"a-v6");
    // Even after a wipe the bound stays: the set is gone, not the bound.
    e.store.clear();
    assert!(e.loader.load(file.load(5, &values)).await.is_err());
    assert_eq!(e.loader.served_version(), Some(6));
}

#[tokio::test]
async fn a_file_of_another_data_key_is_refused_and_a_new_key_may_continue_the_versions() {
    let (e, _file, values) = served().await;
    // The operator re-keys: a new data key and file id, the version goes on.
    let rekeyed = e.new_file().await;
    let fresh: Vec<_> = values
        .iter()
        .map(|(n, env)| match env {
            Envelope::Fk { .. } => (n.clone(), rekeyed.seal(n, b"rekeyed")),
            _ => (n.clone(), env.clone()),
        })
        .collect();
    // A lower version under the new key is still a rollback.
    refused(&e, rekeyed.load(3, &fresh), FILE_NAME, "no rollback").await;
    // Old fk values under a record of the new key (even one naming them)
    // do not open: the AAD binds them to the old file id and key.
    refused(&e, rekeyed.load(7, &values), "A", "does not authenticate").await;
    e.loader.load(rekeyed.load(7, &fresh)).await.unwrap();
    assert_eq!(e.get("A"), b"rekeyed");
}

#[tokio::test]
async fn an_edited_record_is_refused_by_its_mac() {
    let (e, file, values) = served().await;
    let mut load = file.load(5, &values);
    // The host bumps the version (or edits the manifest) without the key.
    let record_entry = load.iter_mut().find(|e| e.name == FILE_NAME).unwrap();
    let envelope = Envelope::parse(&record_entry.envelope).unwrap();
    let mut record = FileRecord::decode(envelope.ciphertext()).unwrap();
    record.version = 99;
    record_entry.envelope = record.to_envelope().unwrap().to_string();
    refused(&e, load, FILE_NAME, "MAC mismatch").await;
}

#[tokio::test]
async fn a_load_without_the_record_is_refused_once_a_file_key_file_was_served() {
    let (e, file, values) = served().await;
    // fk values without their record cannot be opened or checked.
    let mut load = file.load(5, &values);
    load.retain(|entry| entry.name != FILE_NAME);
    refused(&e, load, "A", "has no `keystore:file` record").await;
    // A kms-only file would dodge the version check: refused too.
    let kms_only = vec![LoadEntry {
        name: "K".into(),
        envelope: values[3].1.to_string(),
    }];
    refused(&e, kms_only, FILE_NAME, "cannot be checked for rollback").await;
}

#[tokio::test]
async fn an_fk_value_sealed_for_another_name_fails_even_when_the_record_names_it() {
    // The operator's own record names A with B's envelope (not an attack on
    // the record, so the MAC is fine): the AAD still binds the value to B.
    let e = start().await;
    let file = e.new_file().await;
    let values = vec![("A".to_owned(), file.seal("B", b"meant for B"))];
    let err = e.loader.load(file.load(1, &values)).await.unwrap_err();
    assert_eq!(err.name(), Some("A"));
    assert!(err.to_string().contains("does not authenticate"), "{err}");
    assert!(e.store.is_empty());
    assert_eq!(e.loader.served_version(), None);
}

#[tokio::test]
async fn a_wrapped_key_bound_to_another_file_id_is_refused_by_kms() {
    // The record's file id must match the data key's encryption context:
    // a record claiming another id cannot unwrap the key.
    let e = start().await;
    let file = e.new_file().await;
    let values = vec![("A".to_owned(), file.seal("A", b"a"))];
    let other_id = FileId([0x55; 16]);
    let other_key = FileKey::derive(&[1; 32], other_id).unwrap();
    let mut record = FileRecord::new(
        other_id,
        1,
        file.wrapped.clone(),
        values.iter().map(|(n, env)| (n.as_str(), env)),
    )
    .unwrap();
    other_key.sign(&mut record).unwrap();
    let mut load = entries(&values);
    load.push(LoadEntry {
        name: FILE_NAME.into(),
        envelope: record.to_envelope().unwrap().to_string(),
    });
    let err = e.loader.load(load).await.unwrap_err();
    assert_eq!(err.name(), Some(FILE_NAME), "{err}");
    assert_eq!(err.stage(), "name-binding", "{err}");
    assert!(e.store.is_empty());
}
