//! `keystore-host encrypt` against the KMS emulator: the real CLI and the
//! real `aws-sdk-kms`, over HTTPS with the emulator's test CA.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_kms::primitives::Blob;
use keystore_host::secrets_file::dotenv::DotEnv;
use keystore_host::secrets_file::encrypt::{EncryptError, Selection, encrypt_file};
use keystore_shared::envelope::{Envelope, NAME_CONTEXT_KEY};
use keystore_tests::kms::{Credential, MockKms, MockKmsConfig, MockKmsHandle};

const ACCESS_KEY_ID: &str = "AKIAHOSTENCRYPTTEST1";
const SECRET_ACCESS_KEY: &str = "host-encrypt-test-secret";

async fn emulator(dir: &Path) -> MockKmsHandle {
    let config = MockKmsConfig::new(
        dir.join("tls"),
        vec![Credential::new(ACCESS_KEY_ID, SECRET_ACCESS_KEY)],
    );
    MockKms::start(config).await.unwrap()
}

/// An SDK client for checking results; built the way the CLI builds its own.
async fn client(kms: &MockKmsHandle) -> aws_sdk_kms::Client {
    let ca = std::fs::read(kms.ca_pem_path()).unwrap();
    let http = keystore_host::aws::https_client(Some(ca)).unwrap();
    let config = aws_sdk_kms::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(kms.region().to_owned()))
        .endpoint_url(kms.endpoint_url())
        .credentials_provider(Credentials::new(
            ACCESS_KEY_ID,
            SECRET_ACCESS_KEY,
            None,
            None,
            "test",
        ))
        .http_client(http)
        .build();
    aws_sdk_kms::Client::from_conf(config)
}

async fn decrypt(
    client: &aws_sdk_kms::Client,
    envelope: &str,
    context_name: &str,
) -> Result<Vec<u8>, String> {
    let env = Envelope::parse(envelope).map_err(|e| e.to_string())?;
    client
        .decrypt()
        .ciphertext_blob(Blob::new(env.ciphertext().to_vec()))
        .encryption_context(NAME_CONTEXT_KEY, context_name)
        .send()
        .await
        .map(|out| out.plaintext.unwrap().into_inner())
        .map_err(|e| {
            format!(
                "{}",
                aws_smithy_types::error::display::DisplayErrorContext(&e)
            )
        })
}

const SAMPLE: &str = "# Production settings\n\
# owner: platform team\n\
\n\
export DB_HOST=db.internal   # not secret, but encrypted too (all by default)\n\
DB_PASSWORD='p@ss word #1'\n\
API_KEY=\"multi\\nline\"\n\
EMPTY=\n\
\n\
# end\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_encrypts_every_plain_value_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let kms = emulator(dir.path()).await;
    let client = client(&kms).await;
    let key_id = kms.create_key(None).unwrap().key_id;
    let path = dir.path().join(".env");
    std::fs::write(&path, SAMPLE).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();

    let run = || {
        Command::new(env!("CARGO_BIN_EXE_keystore-host"))
            .args(["encrypt", "--key-id", &key_id])
            .arg(&path)
            .args([
                "--region",
                kms.region(),
                "--endpoint-url",
                kms.endpoint_url(),
            ])
            .arg("--ca-bundle")
            .arg(kms.ca_pem_path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", dir.path())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
            .env("AWS_CONFIG_FILE", dir.path().join("no-config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                dir.path().join("no-credentials"),
            )
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap()
    };
    let out = tokio::task::block_in_place(run);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(!stderr.contains("p@ss word") && !stdout.contains("p@ss word"));

    let text = std::fs::read_to_string(&path).unwrap();
    let file = DotEnv::parse(text.as_bytes()).unwrap();
    // Comments, blank lines, prefixes and trailing comments are untouched.
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| l.is_empty() || l.starts_with('#'))
        .collect();
    assert_eq!(
        kept,
        [
            "# Production settings",
            "# owner: platform team",
            "",
            "",
            "# end"
        ]
    );
    assert!(text.contains("export DB_HOST=ENC[v1:kms:"), "{text}");
    assert!(text.contains("   # not secret, but encrypted too (all by default)\n"));
    assert!(text.contains("DB_PASSWORD='ENC[v1:kms:"), "{text}");
    assert!(text.contains("API_KEY=\"ENC[v1:kms:"), "{text}");
    assert!(text.contains("\nEMPTY=\n"), "{text}");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o640
    );

    for (name, original) in [
        ("DB_HOST", "db.internal"),
        ("DB_PASSWORD", "p@ss word #1"),
        ("API_KEY", "multi\nline"),
    ] {
        let envelope = file.get(name).unwrap();
        let plain = decrypt(&client, envelope, name).await.unwrap();
        assert_eq!(plain, original.as_bytes(), "{name}");
        // Bound to its name: under another name's context it fails.
        let err = decrypt(&client, envelope, "OTHER_NAME").await.unwrap_err();
        assert!(err.contains("InvalidCiphertextException"), "{err}");
    }

    // A second run changes nothing.
    let out = tokio::task::block_in_place(run);
    assert!(out.status.success());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    assert!(String::from_utf8_lossy(&out.stdout).contains("unchanged DB_PASSWORD"));
    kms.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selection_sizes_and_failures_leave_the_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let kms = emulator(dir.path()).await;
    let client = client(&kms).await;
    let key_id = kms.create_key(None).unwrap().key_id;
    let path = dir.path().join("app.env");

    // Only names matching a glob are encrypted.
    std::fs::write(&path, "DB_USER=app\nDB_PASSWORD=hunter2\nLOG=debug\n").unwrap();
    let report = encrypt_file(
        &client,
        &key_id,
        &path,
        &Selection::patterns(vec!["*PASSWORD".into()]),
    )
    .await
    .unwrap();
    assert_eq!(report.encrypted, ["DB_PASSWORD"]);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        text.starts_with("DB_USER=app\nDB_PASSWORD=ENC[v1:kms:"),
        "{text}"
    );
    assert!(text.ends_with("]\nLOG=debug\n"), "{text}");

    // A value over 4 KiB is refused before any KMS call; nothing changes.
    let before = format!("SMALL=x\nBIG={}\n", "a".repeat(4097));
    std::fs::write(&path, &before).unwrap();
    let err = encrypt_file(&client, &key_id, &path, &Selection::all())
        .await
        .unwrap_err();
    assert!(
        matches!(err, EncryptError::TooLarge { len: 4097, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("BIG (line 2)"), "{err}");
    assert!(!err.to_string().contains("aaaa"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), before);

    // KMS refusing (unknown key) leaves the file as it was.
    std::fs::write(&path, "A=1\nB=2\n").unwrap();
    let err = encrypt_file(
        &client,
        "00000000-0000-0000-0000-000000000000",
        &path,
        &Selection::all(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, EncryptError::Kms { .. }), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "A=1\nB=2\n");
    // No temporary files are left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains("keystore-tmp"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
    kms.shutdown().await;
}
