//! The operator path and the enclave against moto's KMS, an implementation
//! nobody on this project wrote: `keystore-host encrypt` writes envelopes
//! moto itself opens (per value: only with the `keystore:name` context;
//! file key: the data key only with the `keystore:file` context, and that
//! key opens every value and the record's MAC), and an enclave pointed at
//! moto refuses its `Plaintext` answer to a `Recipient` request, serving
//! nothing, for a per-value file and for a file-key file alike.

use std::process::Command;

use keystore_host::secrets_file::dotenv::DotEnv;
use keystore_shared::envelope::{Envelope, NAME_CONTEXT_KEY};
use keystore_shared::file_record::{FileKey, FileRecord};
use keystore_shared::name::FILE_NAME;

use crate::support::moto::Moto;
use crate::support::peer::{ACCESS_KEY, AwsPeer, REGION, SECRET_KEY};
use crate::support::stack::{KmsUpstream, Stack};

/// Creates a key; prints its ARN.
const CREATE_KEY: &str = r#"
import sys, boto3
kms = boto3.client("kms", endpoint_url=sys.argv[1], verify=sys.argv[2])
print(kms.create_key(Description="nitro-keystore moto test")["KeyMetadata"]["Arn"])
"#;

/// Decrypts hex ciphertext `argv[3]` with context `keystore:name` =
/// `argv[4]`; prints the plaintext and the key it was under, or the error
/// code.
const DECRYPT: &str = r#"
import sys, binascii, boto3, botocore
kms = boto3.client("kms", endpoint_url=sys.argv[1], verify=sys.argv[2])
try:
    out = kms.decrypt(CiphertextBlob=binascii.unhexlify(sys.argv[3]),
                      EncryptionContext={"keystore:name": sys.argv[4]})
    print("OK", out["Plaintext"].decode(), out["KeyId"])
except botocore.exceptions.ClientError as e:
    print("ERR", e.response["Error"]["Code"])
"#;

/// Decrypts hex ciphertext `argv[3]` with context `keystore:file` =
/// `argv[4]`; prints the plaintext (hex) and the key it was under, or the
/// error code.
const DECRYPT_DATA_KEY: &str = r#"
import sys, binascii, boto3, botocore
kms = boto3.client("kms", endpoint_url=sys.argv[1], verify=sys.argv[2])
try:
    out = kms.decrypt(CiphertextBlob=binascii.unhexlify(sys.argv[3]),
                      EncryptionContext={"keystore:file": sys.argv[4]})
    print("OK", binascii.hexlify(out["Plaintext"]).decode(), out["KeyId"])
except botocore.exceptions.ClientError as e:
    print("ERR", e.response["Error"]["Code"])
"#;

/// How `encrypt` protects the values.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// One KMS `Encrypt` per value (`--per-value-kms`).
    PerValue,
    /// One `GenerateDataKey` for the file (`--file-key`).
    FileKey,
}

impl Mode {
    fn flag(self) -> &'static str {
        match self {
            Mode::PerValue => "--per-value-kms",
            Mode::FileKey => "--file-key",
        }
    }
}

pub fn create_key(peer: &impl AwsPeer) -> String {
    peer.boto3(CREATE_KEY, &[]).trim().to_owned()
}

/// Runs `keystore-host encrypt` against peer.
pub fn encrypt(
    peer: &impl AwsPeer,
    key_arn: &str,
    file: &std::path::Path,
    mode: Mode,
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keystore-host"))
        .args([
            "encrypt",
            mode.flag(),
            "--key-id",
            key_arn,
            "--region",
            REGION,
        ])
        .args(["--endpoint-url", &peer.endpoint_url()])
        .arg("--ca-bundle")
        .arg(peer.ca_pem_path())
        .arg(file)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap()
}

/// The `ENC[...]` value of `name` in a `.env` text.
fn value_of(text: &str, name: &str) -> String {
    let file = DotEnv::parse(text.as_bytes()).unwrap();
    file.entries()
        .find(|entry| entry.name == name)
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .value
        .to_owned()
}

#[test]
fn encrypt_against_moto_kms_is_opened_by_moto_only_with_the_name_context() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path());
    encrypt_per_value_is_opened_only_with_the_name_context(&moto, dir.path());
}

/// `encrypt --per-value-kms` against `peer`'s KMS: `peer` opens each value
/// only with the `keystore:name` context it was bound to; a second run
/// changes nothing.
pub fn encrypt_per_value_is_opened_only_with_the_name_context(
    peer: &impl AwsPeer,
    dir: &std::path::Path,
) {
    let key_arn = create_key(peer);
    let file = dir.join("app.env");
    std::fs::write(
        &file,
        "# app\nDB_PASSWORD=hunter2\nAPI_TOKEN='tok with spaces'\n",
    )
    .unwrap();

    let out = encrypt(peer, &key_arn, &file, Mode::PerValue);
    assert!(
        out.status.success(),
        "encrypt failed:\n{}\n--- server log\n{}",
        String::from_utf8_lossy(&out.stderr),
        peer.log()
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("# app\n"), "layout kept:\n{text}");
    assert!(!text.contains("hunter2") && !text.contains("tok with spaces"));

    for (name, plain) in [("DB_PASSWORD", "hunter2"), ("API_TOKEN", "tok with spaces")] {
        let envelope = Envelope::parse(&value_of(&text, name)).unwrap();
        let blob = hex::encode(envelope.ciphertext());
        // The server opens it with the context encrypt bound...
        let opened = peer.boto3(DECRYPT, &[&blob, name]);
        assert_eq!(
            opened.trim(),
            format!("OK {plain} {key_arn}"),
            "{NAME_CONTEXT_KEY} = {name}"
        );
        // ...and refuses it under another name: a value moved to another
        // entry does not decrypt.
        let moved = peer.boto3(DECRYPT, &[&blob, "SOMETHING_ELSE"]);
        assert_eq!(moved.trim(), "ERR InvalidCiphertextException");
    }

    // Idempotent: a second run leaves the envelopes alone.
    let out = encrypt(peer, &key_arn, &file, Mode::PerValue);
    assert!(out.status.success());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
}

#[test]
fn encrypt_with_a_file_key_against_moto_makes_one_data_key_moto_unwraps_only_for_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path());
    encrypt_file_key_is_unwrapped_only_for_the_file(&moto, dir.path());
}

/// `encrypt --file-key` against `peer`'s KMS: one `GenerateDataKey`;
/// `peer` unwraps the data key only with the `keystore:file` context, and
/// that key verifies the record's MAC and opens every value under its own
/// name; a second run makes no KMS call and changes nothing.
pub fn encrypt_file_key_is_unwrapped_only_for_the_file(peer: &impl AwsPeer, dir: &std::path::Path) {
    let calls_before = peer.kms_requests();
    let key_arn = create_key(peer);
    let file = dir.join("app.env");
    let large = "L".repeat(8 * 1024); // over KMS Encrypt's 4 KiB: only the file key takes it
    std::fs::write(
        &file,
        format!("# app\nDB_PASSWORD=hunter2\nAPI_TOKEN='tok with spaces'\nBIG={large}\n"),
    )
    .unwrap();

    let out = encrypt(peer, &key_arn, &file, Mode::FileKey);
    assert!(
        out.status.success(),
        "encrypt --file-key failed:\n{}\n--- server log\n{}",
        String::from_utf8_lossy(&out.stderr),
        peer.log()
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("# app\n"), "layout kept:\n{text}");
    for plain in ["hunter2", "tok with spaces", &large] {
        assert!(!text.contains(plain), "a plain value is left:\n{text}");
    }
    // Besides CreateKey, one KMS call: the GenerateDataKey.
    assert_eq!(peer.kms_requests() - calls_before, 2, "{}", peer.log());

    let Envelope::File { record } = Envelope::parse(&value_of(&text, FILE_NAME)).unwrap() else {
        panic!("{FILE_NAME} is not a record:\n{text}");
    };
    let record = FileRecord::decode(&record).unwrap();
    assert_eq!(record.version, 1);
    let wrapped = hex::encode(&record.wrapped_key);
    let file_id = record.file_id.to_hex();

    // The server unwraps the data key only with the file's context...
    let other_id = "00".repeat(16);
    let refused = peer.boto3(DECRYPT_DATA_KEY, &[&wrapped, &other_id]);
    assert_eq!(refused.trim(), "ERR InvalidCiphertextException");
    let opened = peer.boto3(DECRYPT_DATA_KEY, &[&wrapped, &file_id]);
    let fields: Vec<&str> = opened.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "{opened}");
    assert_eq!((fields[0], fields[2]), ("OK", key_arn.as_str()));
    // ...and that key verifies the record's MAC and opens every value under
    // its own name only.
    let data_key = hex::decode(fields[1]).unwrap();
    let key = FileKey::derive(&data_key, record.file_id).unwrap();
    key.verify(&record).unwrap();
    let names: Vec<&str> = record.manifest.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["API_TOKEN", "BIG", "DB_PASSWORD"]);
    for (name, plain) in [
        ("DB_PASSWORD", "hunter2"),
        ("API_TOKEN", "tok with spaces"),
        ("BIG", large.as_str()),
    ] {
        let envelope = Envelope::parse(&value_of(&text, name)).unwrap();
        assert_eq!(envelope.kind(), "fk", "{name}");
        assert_eq!(&key.open(name, &envelope).unwrap()[..], plain.as_bytes());
        assert!(key.open("SOMETHING_ELSE", &envelope).is_err(), "{name}");
    }

    // Idempotent: nothing left to seal, no KMS call, the file unchanged.
    let out = encrypt(peer, &key_arn, &file, Mode::FileKey);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
    assert_eq!(
        peer.kms_requests() - calls_before,
        4,
        "two boto3 Decrypts, no new call from encrypt"
    );
}

/// Encrypts one secret under moto's KMS in `mode`, points the real enclave
/// (through the proxy's forwarder) at peer, and checks that the load is
/// refused for moto's `Plaintext` answer and nothing is served.
async fn an_enclave_pointed_at_moto_refuses_its_plaintext_answer(mode: Mode) {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path());
    let refused = "carries Plaintext instead of CiphertextForRecipient";
    an_enclave_pointed_at_the_peer_refuses_the_load(&moto, dir.path(), mode, refused).await;
}

/// Encrypts one secret under `peer`'s KMS in `mode`, points the real
/// enclave (through the proxy's forwarder) at `peer`, and checks that the
/// load is refused with `refused` after `peer` answered the `Decrypt`, and
/// nothing is served.
pub async fn an_enclave_pointed_at_the_peer_refuses_the_load(
    peer: &impl AwsPeer,
    dir: &std::path::Path,
    mode: Mode,
    refused: &str,
) {
    let key_arn = create_key(peer);
    let file = dir.join(format!("secrets-{mode:?}.env"));
    std::fs::write(&file, "DB_PASSWORD=hunter2\n").unwrap();
    let out = encrypt(peer, &key_arn, &file, mode);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&file).unwrap();
    let kind = Envelope::parse(&value_of(&text, "DB_PASSWORD"))
        .unwrap()
        .kind();
    match mode {
        Mode::PerValue => assert_eq!(kind, "kms"),
        Mode::FileKey => {
            assert_eq!(kind, "fk");
            value_of(&text, FILE_NAME);
        }
    }

    let stack_dir = dir.join(format!("stack-{mode:?}"));
    std::fs::create_dir_all(&stack_dir).unwrap();
    let mut stack = Stack::new(&stack_dir);
    stack.start_enclave(&KmsUpstream {
        port: peer.port(),
        ca_pem: peer.ca_pem_path(),
        key_arn: key_arn.clone(),
        mock_pki: dir.join("pki"),
    });
    stack.start_proxy(
        peer.port(),
        file.to_str().unwrap(),
        &[],
        (ACCESS_KEY, SECRET_KEY),
    );

    let requests = peer.kms_requests();
    stack
        .until(
            &format!("the enclave to refuse the load: {refused}"),
            || async {
                stack
                    .status()
                    .await
                    .and_then(|s| s.last_error)
                    .is_some_and(|e| e.contains(refused))
            },
        )
        .await;
    // The server did get the Decrypt (it answered it): the refusal is the
    // enclave's, not a transport failure.
    assert!(peer.kms_requests() > requests, "{}", peer.log());
    let status = stack.status().await.unwrap();
    assert!(!status.ready, "{status:?}");
    assert_eq!(status.secret_count, 0);
    assert_eq!(stack.get("DB_PASSWORD").await, None);
    if let Mode::FileKey = mode {
        // The refused Decrypt was the file's one call, for its record.
        let error = status.last_error.unwrap_or_default();
        assert!(error.contains(FILE_NAME), "{error}");
    }
    assert!(!stack.logs().contains("hunter2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enclave_pointed_at_moto_refuses_its_plaintext_answer_per_value() {
    an_enclave_pointed_at_moto_refuses_its_plaintext_answer(Mode::PerValue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enclave_pointed_at_moto_refuses_its_plaintext_answer_for_a_file_key() {
    an_enclave_pointed_at_moto_refuses_its_plaintext_answer(Mode::FileKey).await;
}
