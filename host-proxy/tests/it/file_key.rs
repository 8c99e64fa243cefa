//! `keystore-host encrypt --file-key` against the KMS emulator: one
//! `GenerateDataKey` per file, values sealed as `ENC[v1:fk:...]`, the
//! `keystore:file` record naming every envelope the loader will send, and
//! the rule for files that already have a data key.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use aws_sdk_kms::primitives::Blob;
use keystore_host::secrets_file::dotenv::DotEnv;
use keystore_host::secrets_file::encrypt::{EncryptError, EncryptReport, Selection};
use keystore_host::secrets_file::file_key::{FileKeyEncryptError, KeyMode, encrypt};
use keystore_host::secrets_file::{Format, entries as load_entries};
use keystore_shared::access::AccessRules;
use keystore_shared::envelope::{Envelope, NAME_CONTEXT_KEY};
use keystore_shared::file_record::{FileKey, FileRecord};
use keystore_shared::name::FILE_NAME;
use keystore_tests::kms::{Credential, MockKms, MockKmsConfig, MockKmsHandle, Operation};

use crate::support::ops::sdk_client;

const ACCESS_KEY_ID: &str = "AKIAHOSTFILEKEYTEST1";
const SECRET_ACCESS_KEY: &str = "host-file-key-test-secret";

struct Kms {
    kms: MockKmsHandle,
    client: aws_sdk_kms::Client,
    key_id: String,
}

async fn start(dir: &Path) -> Kms {
    let config = MockKmsConfig::new(
        dir.join("tls"),
        vec![Credential::new(ACCESS_KEY_ID, SECRET_ACCESS_KEY)],
    );
    let kms = MockKms::start(config).await.unwrap();
    let client = sdk_client(&kms, (ACCESS_KEY_ID, SECRET_ACCESS_KEY));
    // The default policy lets this caller decrypt without attestation, so
    // the test can check what the enclave would see.
    let key_id = kms.create_key(None).unwrap().key_id;
    Kms {
        kms,
        client,
        key_id,
    }
}

impl Kms {
    /// `encrypt` of the `.env` file at `path`, every value, under the key.
    async fn encrypt_env(
        &self,
        path: &Path,
        rules: Option<&AccessRules>,
        mode: KeyMode,
    ) -> Result<EncryptReport, EncryptError> {
        encrypt(
            &self.client,
            &self.key_id,
            path,
            Format::Env,
            &Selection::all(),
            rules,
            mode,
        )
        .await
    }
}

/// The record of the file at `path` and its keys, unwrapped the way the
/// enclave does (here without attestation, which this key allows).
async fn open_file(kms: &Kms, path: &Path) -> (DotEnv, FileRecord, FileKey) {
    let file = DotEnv::parse(&std::fs::read(path).unwrap()).unwrap();
    let envelope = Envelope::parse(file.get(FILE_NAME).unwrap()).unwrap();
    let record = FileRecord::decode(envelope.ciphertext()).unwrap();
    let mut request = kms
        .client
        .decrypt()
        .ciphertext_blob(Blob::new(record.wrapped_key.clone()));
    for (k, v) in record.file_id.context() {
        request = request.encryption_context(k, v);
    }
    let data_key = request
        .send()
        .await
        .unwrap()
        .plaintext
        .unwrap()
        .into_inner();
    let key = FileKey::derive(&data_key, record.file_id).unwrap();
    key.verify(&record).unwrap();
    (file, record, key)
}

fn open(key: &FileKey, file: &DotEnv, name: &str) -> Vec<u8> {
    key.open(name, &Envelope::parse(file.get(name).unwrap()).unwrap())
        .unwrap()
        .to_vec()
}

/// The record names exactly what the daemon's loader sends.
fn record_matches_the_load(path: &Path, record: &FileRecord) {
    let bytes = std::fs::read(path).unwrap();
    let entries = load_entries(&bytes, Format::Env).unwrap();
    let parsed: Vec<(String, Envelope)> = entries
        .iter()
        .filter(|e| e.name != FILE_NAME)
        .map(|e| (e.name.clone(), Envelope::parse(&e.envelope).unwrap()))
        .collect();
    record
        .check_entries(parsed.iter().map(|(n, e)| (n.as_str(), e)))
        .unwrap();
}

const SAMPLE: &str = "# app settings\n\
DB_PASSWORD='p@ss word #1'   # trailing comment\n\
API_KEY=\"multi\\nline\"\n\
EMPTY=\n\
\n\
# end\n";

fn cli(kms: &Kms, dir: &Path, args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keystore-host"))
        .args(["encrypt", "--key-id", &kms.key_id])
        .args(args)
        .args([
            "--region",
            kms.kms.region(),
            "--endpoint-url",
            kms.kms.endpoint_url(),
        ])
        .arg("--ca-bundle")
        .arg(kms.kms.ca_pem_path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
        .env("AWS_CONFIG_FILE", dir.join("no-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.join("no-credentials"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_file_gets_a_file_key_by_default_with_one_kms_call() {
    let dir = tempfile::tempdir().unwrap();
    let kms = start(dir.path()).await;
    let path = dir.path().join(".env");
    std::fs::write(&path, SAMPLE).unwrap();

    let out = tokio::task::block_in_place(|| cli(&kms, dir.path(), &[path.as_os_str()]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains("p@ss"), "{stdout}");
    assert!(stdout.contains("version 1, 2 entries"), "{stdout}");
    assert_eq!(kms.kms.calls(Operation::GenerateDataKey).calls, 1);
    assert_eq!(kms.kms.calls(Operation::Encrypt).calls, 0);

    let text = std::fs::read_to_string(&path).unwrap();
    // Layout kept, values sealed in place, the record appended.
    assert!(
        text.starts_with("# app settings\nDB_PASSWORD='ENC[v1:fk:"),
        "{text}"
    );
    assert!(
        text.contains("]'   # trailing comment\nAPI_KEY=\"ENC[v1:fk:"),
        "{text}"
    );
    assert!(text.contains("\nEMPTY=\n\n# end\n"), "{text}");
    assert!(
        text.contains("\n# file key record: written by `keystore-host encrypt`; do not edit\nkeystore:file=ENC[v1:file:"),
        "{text}"
    );
    let (file, record, key) = open_file(&kms, &path).await;
    assert_eq!(record.version, 1);
    assert_eq!(open(&key, &file, "DB_PASSWORD"), b"p@ss word #1");
    assert_eq!(open(&key, &file, "API_KEY"), b"multi\nline");
    record_matches_the_load(&path, &record);

    // Idempotent: nothing to seal, nothing written, no KMS call.
    kms.kms.reset_calls();
    let out = tokio::task::block_in_place(|| cli(&kms, dir.path(), &[path.as_os_str()]));
    assert!(out.status.success());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    assert_eq!(kms.kms.calls(Operation::GenerateDataKey).calls, 0);
    kms.kms.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_over_4_kib_and_rules_are_sealed_under_the_file_key() {
    let dir = tempfile::tempdir().unwrap();
    let kms = start(dir.path()).await;
    let path = dir.path().join("big.env");
    let big = "b".repeat(200_000);
    std::fs::write(&path, format!("CERT={big}\nSMALL=s\n")).unwrap();
    let rules = keystore_host::secrets_file::rules::parse_rules(
        b"rules:\n  - who: { uid: 1000 }\n    read: [SMALL]\n",
    )
    .unwrap();
    let report = kms
        .encrypt_env(&path, Some(&rules), KeyMode::Auto)
        .await
        .unwrap();
    assert_eq!(report.encrypted, ["CERT", "SMALL"]);
    assert_eq!(report.file_key.as_ref().unwrap().entries, 3);
    let (file, record, key) = open_file(&kms, &path).await;
    assert_eq!(open(&key, &file, "CERT"), big.as_bytes());
    assert_eq!(open(&key, &file, "keystore:rules"), rules.to_json());
    record_matches_the_load(&path, &record);
    kms.kms.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_with_fk_values_takes_no_new_value_and_no_per_value_kms() {
    let dir = tempfile::tempdir().unwrap();
    let kms = start(dir.path()).await;
    let path = dir.path().join(".env");
    std::fs::write(&path, "A=1\nB=2\n").unwrap();
    kms.encrypt_env(&path, None, KeyMode::Auto).await.unwrap();
    let sealed = std::fs::read_to_string(&path).unwrap();

    // A new plain value cannot join without the current data key.
    let before = format!("{sealed}C=new-secret\n");
    std::fs::write(&path, &before).unwrap();
    kms.kms.reset_calls();
    let err = kms
        .encrypt_env(&path, None, KeyMode::Auto)
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            EncryptError::FileKey(FileKeyEncryptError::SealedUnderOldKey { name, line: 1, count: 2 }) if name == "A"
        ),
        "{err}"
    );
    assert!(err.to_string().contains("rotate"), "{err}");
    assert!(!err.to_string().contains("new-secret"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
    assert_eq!(kms.kms.calls(Operation::GenerateDataKey).calls, 0);

    // Nor as a per-value KMS envelope the record would not name.
    let err = kms
        .encrypt_env(&path, None, KeyMode::PerValueKms)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            EncryptError::FileKey(FileKeyEncryptError::PerValueOnFileKeyFile { line: 4 })
        ),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
    assert_eq!(kms.kms.calls(Operation::Encrypt).calls, 0);
    kms.kms.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_value_files_stay_per_value_unless_asked_and_then_get_a_record_whose_version_grows() {
    let dir = tempfile::tempdir().unwrap();
    let kms = start(dir.path()).await;
    let path = dir.path().join(".env");
    let out = kms
        .client
        .encrypt()
        .key_id(&kms.key_id)
        .plaintext(Blob::new("kms-value"))
        .encryption_context(NAME_CONTEXT_KEY, "K")
        .send()
        .await
        .unwrap();
    let k = Envelope::kms(out.ciphertext_blob.unwrap().into_inner())
        .unwrap()
        .to_string();

    // Auto on a file with kms values: one Encrypt per value, as before.
    std::fs::write(&path, format!("K={k}\nP=plain\n")).unwrap();
    let report = kms.encrypt_env(&path, None, KeyMode::Auto).await.unwrap();
    assert_eq!(
        (report.encrypted.as_slice(), &report.file_key),
        (&["P".to_owned()][..], &None)
    );
    assert!(
        std::fs::read_to_string(&path)
            .unwrap()
            .contains("P=ENC[v1:kms:")
    );

    // --file-key on a kms-only file: a record naming its kms values.
    std::fs::write(&path, format!("K={k}\n")).unwrap();
    let report = kms
        .encrypt_env(&path, None, KeyMode::FileKey)
        .await
        .unwrap();
    assert!(report.encrypted.is_empty());
    let (file, record, _) = open_file(&kms, &path).await;
    assert_eq!((record.version, record.manifest.len()), (1, 1));
    assert_eq!(file.get("K"), Some(k.as_str()));
    let first_id = record.file_id;

    // A value added later (Auto: the record makes it a file-key file): a
    // new data key and file id, the version goes on, the record is
    // replaced in place.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}NEW=later\n")).unwrap();
    kms.encrypt_env(&path, None, KeyMode::Auto).await.unwrap();
    let (file, record, key) = open_file(&kms, &path).await;
    assert_eq!(record.version, 2);
    assert_ne!(record.file_id, first_id);
    assert_eq!(open(&key, &file, "NEW"), b"later");
    let names: Vec<_> = file.entries().map(|e| e.name).collect();
    assert_eq!(names, ["K", FILE_NAME, "NEW"]);
    record_matches_the_load(&path, &record);
    kms.kms.shutdown().await;
}
