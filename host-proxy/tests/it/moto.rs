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
    let file = file.to_str().unwrap();
    cli(peer, &["encrypt", mode.flag(), "--key-id", key_arn, file])
}

/// Runs `keystore-host ARGS...` with `peer` as its KMS and S3 (region,
/// endpoints, test CA) and the peer's credentials, nothing else from the
/// environment.
pub fn cli(peer: &impl AwsPeer, args: &[&str]) -> std::process::Output {
    let endpoint = peer.endpoint_url();
    let ca = peer.ca_pem_path();
    let ca = ca.to_str().unwrap();
    Command::new(env!("CARGO_BIN_EXE_keystore-host"))
        .args(args)
        .args(["--region", REGION, "--endpoint-url", &endpoint])
        .args(["--ca-bundle", ca, "--s3-endpoint-url", &endpoint])
        .args(["--s3-ca-bundle", ca])
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

/// Uploads file `argv[5]` to `argv[3]/argv[4]` (creating the bucket).
const PUT_OBJECT: &str = r#"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], verify=sys.argv[2])
try:
    s3.create_bucket(Bucket=sys.argv[3])
except s3.exceptions.BucketAlreadyOwnedByYou:
    pass
s3.put_object(Bucket=sys.argv[3], Key=sys.argv[4], Body=open(sys.argv[5], "rb").read())
"#;

/// Prints the object's body.
const GET_OBJECT: &str = r#"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], verify=sys.argv[2])
sys.stdout.write(s3.get_object(Bucket=sys.argv[3], Key=sys.argv[4])["Body"].read().decode())
"#;

/// Runs `keystore-host ARGS` against `peer` and returns stdout; panics
/// with stderr and the server's log if it fails.
fn cli_ok(peer: &impl AwsPeer, args: &[&str]) -> String {
    let out = cli(peer, args);
    assert!(
        out.status.success(),
        "keystore-host {args:?} failed:\n{}\n--- server log\n{}",
        String::from_utf8_lossy(&out.stderr),
        peer.log()
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The decoded `keystore:file` record of a `.env` text.
fn record_of(text: &str) -> FileRecord {
    let Envelope::File { record } = Envelope::parse(&value_of(text, FILE_NAME)).unwrap() else {
        panic!("{FILE_NAME} is not a record:\n{text}");
    };
    FileRecord::decode(&record).unwrap()
}

/// Which key `peer` says the record's data key is under (it unwraps it
/// only with the file's context).
fn data_key_owner(peer: &impl AwsPeer, record: &FileRecord) -> String {
    let wrapped = hex::encode(&record.wrapped_key);
    let opened = peer.boto3(DECRYPT_DATA_KEY, &[&wrapped, &record.file_id.to_hex()]);
    let fields: Vec<&str> = opened.split_whitespace().collect();
    assert_eq!((fields.len(), fields[0]), (3, "OK"), "{opened}");
    fields[2].to_owned()
}

#[test]
fn rotate_and_decrypt_against_moto_kms_and_s3() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path());
    rotate_and_decrypt_against_the_peer(&moto, dir.path());
}

/// `rotate` and `decrypt` against `peer`'s KMS and S3: a file with a
/// per-value `kms` secret and file-key secrets decrypts to what was
/// written; `rotate` makes a new data key (new file id, version + 1) that
/// `peer` unwraps under the same key; `rotate --key-id NEW` moves the data
/// key and the `kms` value (the peer's `ReEncrypt`) to the new key; the
/// same file as an object on `peer`'s S3 is rotated in place and decrypted
/// from there, the object untouched by `decrypt`.
pub fn rotate_and_decrypt_against_the_peer(peer: &impl AwsPeer, dir: &std::path::Path) {
    let old_key = create_key(peer);
    let new_key = create_key(peer);
    let file = dir.join("rotate.env");
    let path = file.to_str().unwrap();
    std::fs::write(&file, "# app\nDB_PASSWORD=hunter2\n").unwrap();
    cli_ok(
        peer,
        &["encrypt", "--per-value-kms", "--key-id", &old_key, path],
    );
    // A new value joins with a file key; the `kms` value is named by the
    // record as it is.
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("API_TOKEN='tok with spaces'\nNOTE=caf\u{e9}-\u{1f510}\n");
    std::fs::write(&file, &text).unwrap();
    cli_ok(peer, &["encrypt", "--file-key", "--key-id", &old_key, path]);
    let sealed = std::fs::read_to_string(&file).unwrap();
    assert_eq!(record_of(&sealed).version, 1);
    let plain = [
        ("DB_PASSWORD", "hunter2"),
        ("API_TOKEN", "tok with spaces"),
        ("NOTE", "caf\u{e9}-\u{1f510}"),
    ];

    // decrypt: the file's values in plaintext (the record stays sealed).
    let decrypt = |source: &str| {
        let out = cli_ok(peer, &["decrypt", "--yes-print-secrets", source]);
        assert!(out.starts_with("# app\n"), "{out}");
        for (name, value) in plain {
            assert_eq!(value_of(&out, name), value, "decrypt of {source}:\n{out}");
        }
        assert!(value_of(&out, FILE_NAME).starts_with("ENC[v1:file:"));
    };
    decrypt(path);
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        sealed,
        "decrypt writes nothing"
    );

    // rotate: a new data key under the same KMS key, the values kept.
    let out = cli_ok(peer, &["rotate", path]);
    assert!(
        out.contains("resealed API_TOKEN") && out.contains("resealed NOTE"),
        "{out}"
    );
    let rotated = std::fs::read_to_string(&file).unwrap();
    let record = record_of(&rotated);
    assert_eq!(record.version, 2);
    assert_ne!(record.file_id, record_of(&sealed).file_id);
    assert_eq!(data_key_owner(peer, &record), old_key);
    assert_eq!(
        value_of(&rotated, "DB_PASSWORD"),
        value_of(&sealed, "DB_PASSWORD"),
        "without --key-id the kms value stays"
    );
    decrypt(path);

    // rotate --key-id: the data key and the kms value (ReEncrypt) move.
    let out = cli_ok(peer, &["rotate", "--key-id", &new_key, path]);
    assert!(out.contains("moved DB_PASSWORD (ReEncrypt)"), "{out}");
    let moved = std::fs::read_to_string(&file).unwrap();
    let record = record_of(&moved);
    assert_eq!(record.version, 3);
    assert_eq!(data_key_owner(peer, &record), new_key);
    let blob = hex::encode(
        Envelope::parse(&value_of(&moved, "DB_PASSWORD"))
            .unwrap()
            .ciphertext(),
    );
    assert_eq!(
        peer.boto3(DECRYPT, &[&blob, "DB_PASSWORD"]).trim(),
        format!("OK hunter2 {new_key}")
    );
    decrypt(path);

    // The same file as an object on the peer's S3.
    let url = "s3://keystore-ops/prod/app.env";
    peer.boto3(PUT_OBJECT, &["keystore-ops", "prod/app.env", path]);
    decrypt(url);
    let get = || peer.boto3(GET_OBJECT, &["keystore-ops", "prod/app.env"]);
    assert_eq!(get(), moved, "decrypt leaves the object as it was");
    let out = cli(peer, &["rotate", url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("written (only over the version read)"));
    let object = get();
    let record = record_of(&object);
    assert_eq!(record.version, 4);
    assert_eq!(data_key_owner(peer, &record), new_key);
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        moved,
        "the local file untouched"
    );
    decrypt(url);

    // decrypt -o: a local file, 0600; never the object.
    let out_path = dir.join("plain.env");
    cli_ok(
        peer,
        &[
            "decrypt",
            "--yes-print-secrets",
            "-o",
            out_path.to_str().unwrap(),
            url,
        ],
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&out_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert!(
        std::fs::read_to_string(&out_path)
            .unwrap()
            .contains("DB_PASSWORD=hunter2")
    );
    assert_eq!(get(), object);

    // Plaintext never reached the object or a log.
    for secret in ["hunter2", "tok with spaces"] {
        assert!(!object.contains(secret) && !peer.log().contains(secret));
    }
}
