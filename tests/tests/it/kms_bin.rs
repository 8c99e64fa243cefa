//! The `mock-kms` binary: started as a process with `--ready-file`, used
//! through the real `aws-sdk-kms` client, stopped with SIGTERM.

use keystore_tests::fixture as kms_support;

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_kms::config::Credentials;
use aws_sdk_kms::config::retry::RetryConfig;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{KeyEncryptionMechanism, RecipientInfo};
use keystore_nsm::{AttestationRequest, MockConfig, MockNsm, Nsm};
use kms_support::{PCR0, client_for, encrypt_blob, error_code, rsa_2048};
use rsa::pkcs8::EncodePublicKey;

const BIN: &str = env!("CARGO_BIN_EXE_mock-kms");

/// Kills the child on drop so a failed assertion leaves no process behind.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Process {
    fn terminate(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.0.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "mock-kms ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

async fn wait_for(path: &Path, child: &mut Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(text) = std::fs::read_to_string(path)
            && text.ends_with('\n')
        {
            return text.trim().to_owned();
        }
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("mock-kms exited early: {status}");
        }
        assert!(Instant::now() < deadline, "no ready file after 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn binary_serves_until_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nsm = MockNsm::open_with_pcr0(dir.path().join("nsm"), MockConfig::default(), PCR0)
        .expect("mock NSM");
    let tls_dir = dir.path().join("tls");
    let ready = dir.path().join("ready");
    let mut process = Process(
        Command::new(BIN)
            .args(["--listen", "127.0.0.1:0", "--region", "eu-west-1"])
            .arg("--tls-dir")
            .arg(&tls_dir)
            .arg("--ready-file")
            .arg(&ready)
            .arg("--attestation-root")
            .arg(nsm.pki().root_pem_path())
            .args(["--access-key-id", "AKIABINARY0000000001"])
            .args(["--secret-access-key", "binary-secret"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn mock-kms"),
    );
    let url = wait_for(&ready, &mut process.0).await;
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");

    let kms = client_for(
        &url,
        &tls_dir.join("ca.pem"),
        "eu-west-1",
        Credentials::new("AKIABINARY0000000001", "binary-secret", None, None, "test"),
        RetryConfig::disabled(),
    );
    let key = kms.create_key().send().await.expect("CreateKey");
    let arn = key
        .key_metadata()
        .expect("metadata")
        .arn()
        .expect("arn")
        .to_owned();
    assert!(
        arn.starts_with("arn:aws:kms:eu-west-1:111122223333:key/"),
        "{arn}"
    );
    let blob = encrypt_blob(&kms, &arn, b"from the binary").await;

    let recipient_key = rsa_2048();
    let document = nsm
        .attest(&AttestationRequest {
            public_key: Some(
                recipient_key
                    .to_public_key()
                    .to_public_key_der()
                    .expect("spki")
                    .as_bytes()
                    .to_vec(),
            ),
            ..Default::default()
        })
        .expect("attest");
    let answer = kms
        .decrypt()
        .ciphertext_blob(blob)
        .recipient(
            RecipientInfo::builder()
                .key_encryption_algorithm(KeyEncryptionMechanism::RsaesOaepSha256)
                .attestation_document(Blob::new(document))
                .build(),
        )
        .send()
        .await
        .expect("Decrypt with Recipient");
    assert!(answer.plaintext().is_none());
    let opened = keystore_cms::open(
        answer
            .ciphertext_for_recipient()
            .expect("for recipient")
            .as_ref(),
        &recipient_key,
    )
    .expect("open");
    assert_eq!(opened.as_slice(), b"from the binary");

    let wrong = client_for(
        &url,
        &tls_dir.join("ca.pem"),
        "eu-west-1",
        Credentials::new("AKIABINARY0000000001", "wrong", None, None, "test"),
        RetryConfig::disabled(),
    );
    let err = wrong.create_key().send().await.expect_err("wrong secret");
    assert_eq!(error_code(&err), "InvalidSignatureException");

    let status = process.terminate();
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let err = kms.create_key().send().await.expect_err("stopped");
    assert!(
        matches!(err, aws_sdk_kms::error::SdkError::DispatchFailure(_)),
        "{err:?}"
    );
}

#[test]
fn binary_refuses_to_start_without_credentials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = Command::new(BIN)
        .arg("--tls-dir")
        .arg(dir.path())
        .env_remove("MOCK_KMS_ACCESS_KEY_ID")
        .env_remove("MOCK_KMS_SECRET_ACCESS_KEY")
        .output()
        .expect("run mock-kms");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no credentials"), "{stderr}");
}

#[tokio::test]
async fn binary_creates_a_key_from_a_policy_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nsm = MockNsm::open_with_pcr0(dir.path().join("nsm"), MockConfig::default(), PCR0)
        .expect("mock NSM");
    let policy = serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::111122223333:root"},
             "Action": ["kms:Encrypt", "kms:DescribeKey"], "Resource": "*"},
            {"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::111122223333:role/parent"},
             "Action": "kms:Decrypt", "Resource": "*",
             "Condition": {"StringEqualsIgnoreCase": {
                 "kms:RecipientAttestation:ImageSha384": hex::encode(PCR0)}}}
        ]
    });
    let policy_file = dir.path().join("policy.json");
    std::fs::write(&policy_file, policy.to_string()).expect("write policy");
    let tls_dir = dir.path().join("tls");
    let ready = dir.path().join("ready");
    let key_id_file = dir.path().join("key-id");
    let mut process = Process(
        Command::new(BIN)
            .arg("--tls-dir")
            .arg(&tls_dir)
            .arg("--ready-file")
            .arg(&ready)
            .arg("--attestation-root")
            .arg(nsm.pki().root_pem_path())
            .arg("--key-policy")
            .arg(&policy_file)
            .arg("--key-id-file")
            .arg(&key_id_file)
            .args(["--access-key-id", "AKIABINARY0000000002"])
            .args(["--secret-access-key", "binary-secret"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn mock-kms"),
    );
    let url = wait_for(&ready, &mut process.0).await;
    // The key exists before the ready file does.
    let key_id = std::fs::read_to_string(&key_id_file).expect("key id file");
    let key_id = key_id.trim();
    // The key ARN, as an enclave pins it.
    assert!(
        key_id.starts_with("arn:aws:kms:us-east-1:111122223333:key/"),
        "{key_id}"
    );

    let kms = client_for(
        &url,
        &tls_dir.join("ca.pem"),
        "us-east-1",
        Credentials::new("AKIABINARY0000000002", "binary-secret", None, None, "test"),
        RetryConfig::disabled(),
    );
    let blob = kms
        .encrypt()
        .key_id(key_id)
        .plaintext(Blob::new(b"pinned".to_vec()))
        .send()
        .await
        .expect("Encrypt under the policy key")
        .ciphertext_blob()
        .expect("blob")
        .clone();
    // Without an attestation document the PCR0 condition cannot hold.
    let err = kms
        .decrypt()
        .ciphertext_blob(blob)
        .send()
        .await
        .expect_err("plain Decrypt is refused by the policy");
    assert_eq!(error_code(&err), "AccessDeniedException");

    let status = process.terminate();
    assert!(status.success(), "exit status after SIGTERM: {status}");
}
