//! The operator path and the enclave against moto's KMS, an implementation
//! nobody on this project wrote: `keystore-host encrypt` writes envelopes
//! moto itself opens (only with the `keystore:name` context), and an
//! enclave pointed at moto refuses its `Plaintext` answer to a `Recipient`
//! request, serving nothing.

use std::process::Command;

use keystore_host::secrets_file::dotenv::DotEnv;
use keystore_shared::envelope::{Envelope, NAME_CONTEXT_KEY};

use crate::support::moto::{ACCESS_KEY, Moto, REGION, SECRET_KEY};
use crate::support::stack::{KmsUpstream, Stack};

/// Creates a key in moto; prints its ARN.
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

fn create_key(moto: &Moto) -> String {
    moto.boto3(CREATE_KEY, &[]).trim().to_owned()
}

/// Runs `keystore-host encrypt` against moto.
fn encrypt(moto: &Moto, key_arn: &str, file: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_keystore-host"))
        // One KMS `Encrypt` per value: what this test checks moto opens.
        .args([
            "encrypt",
            "--per-value-kms",
            "--key-id",
            key_arn,
            "--region",
            REGION,
        ])
        .args(["--endpoint-url", &moto.endpoint_url()])
        .arg("--ca-bundle")
        .arg(moto.ca_pem_path())
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
    let key_arn = create_key(&moto);
    let file = dir.path().join("app.env");
    std::fs::write(
        &file,
        "# app\nDB_PASSWORD=hunter2\nAPI_TOKEN='tok with spaces'\n",
    )
    .unwrap();

    let out = encrypt(&moto, &key_arn, &file);
    assert!(
        out.status.success(),
        "encrypt failed:\n{}\n--- moto log\n{}",
        String::from_utf8_lossy(&out.stderr),
        moto.log()
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("# app\n"), "layout kept:\n{text}");
    assert!(!text.contains("hunter2") && !text.contains("tok with spaces"));

    for (name, plain) in [("DB_PASSWORD", "hunter2"), ("API_TOKEN", "tok with spaces")] {
        let envelope = Envelope::parse(&value_of(&text, name)).unwrap();
        let blob = hex::encode(envelope.ciphertext());
        // moto opens it with the context encrypt bound...
        let opened = moto.boto3(DECRYPT, &[&blob, name]);
        assert_eq!(
            opened.trim(),
            format!("OK {plain} {key_arn}"),
            "{NAME_CONTEXT_KEY} = {name}"
        );
        // ...and refuses it under another name: a value moved to another
        // entry does not decrypt.
        let moved = moto.boto3(DECRYPT, &[&blob, "SOMETHING_ELSE"]);
        assert_eq!(moved.trim(), "ERR InvalidCiphertextException");
    }

    // Idempotent: a second run leaves the envelopes alone.
    let out = encrypt(&moto, &key_arn, &file);
    assert!(out.status.success());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enclave_pointed_at_moto_refuses_its_plaintext_answer() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start(dir.path());
    let key_arn = create_key(&moto);
    let file = dir.path().join("secrets.env");
    std::fs::write(&file, "DB_PASSWORD=hunter2\n").unwrap();
    let out = encrypt(&moto, &key_arn, &file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut stack = Stack::new(dir.path());
    stack.start_enclave(&KmsUpstream {
        port: moto.port(),
        ca_pem: moto.ca_pem_path(),
        key_arn: key_arn.clone(),
        mock_pki: dir.path().join("pki"),
    });
    stack.start_proxy(
        moto.port(),
        file.to_str().unwrap(),
        &[],
        (ACCESS_KEY, SECRET_KEY),
    );

    let refused = "carries Plaintext instead of CiphertextForRecipient";
    stack
        .until("the enclave to refuse moto's Plaintext answer", || async {
            stack
                .status()
                .await
                .and_then(|s| s.last_error)
                .is_some_and(|e| e.contains(refused))
        })
        .await;
    // moto did get the Decrypt (it answered it): the refusal is the
    // enclave's, not a transport failure.
    assert!(
        moto.log()
            .lines()
            .any(|line| line.contains("POST / HTTP/1.1") && line.contains(" 200 ")),
        "{}",
        moto.log()
    );
    let status = stack.status().await.unwrap();
    assert!(!status.ready, "{status:?}");
    assert_eq!(status.secret_count, 0);
    assert_eq!(stack.get("DB_PASSWORD").await, None);
    assert!(!stack.logs().contains("hunter2"));
}
