//! The generated key policy's explicit denies, evaluated by the KMS
//! emulator (issue 12). To show they hold on their own, each policy gets an
//! extra `Allow kms:*` for the whole account, standing for what a grant or an
//! IAM policy could allow: the denies must still refuse every `Decrypt`
//! without the enclave's attestation, and every `ReEncrypt` out of the key.

use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{KeyEncryptionMechanism, RecipientInfo};
use keystore_host::policy::{Measurements, PolicySpec, key_policy};
use keystore_tests::fixture::{Fixture, PCR0, error_code, error_message, rsa_2048};
use serde_json::{Value, json};

/// The generated policy for `pcr0`, plus an allow-everything statement;
/// without the `Deny` statements if `denies` is false (the control).
fn policy(pcr0: &[u8], denies: bool) -> String {
    let hex = hex::encode(pcr0);
    let json = format!(r#"{{"PCR0":"{hex}","PCR1":"{hex}","PCR2":"{hex}"}}"#);
    let spec = PolicySpec {
        current: Some(Measurements::from_json(&json).unwrap()),
        enclave_principals: vec!["arn:aws:iam::111122223333:role/parent".into()],
        admin_principals: vec!["arn:aws:iam::111122223333:role/admin".into()],
        encrypt_principals: vec!["arn:aws:iam::111122223333:role/operator".into()],
        ..PolicySpec::default()
    };
    let mut policy = key_policy(&spec).unwrap();
    let statements = policy["Statement"].as_array_mut().unwrap();
    if !denies {
        statements.retain(|s| s["Effect"] != "Deny");
    }
    statements.push(json!({
        "Sid": "AsIfGranted",
        "Effect": "Allow",
        "Principal": {"AWS": "arn:aws:iam::111122223333:root"},
        "Action": "kms:*",
        "Resource": "*",
    }));
    Value::to_string(&policy)
}

async fn encrypt(fx: &Fixture, key: &str) -> Blob {
    fx.client()
        .encrypt()
        .key_id(key)
        .plaintext(Blob::new(b"hunter2".to_vec()))
        .send()
        .await
        .unwrap()
        .ciphertext_blob
        .unwrap()
}

#[tokio::test]
async fn decrypt_without_attestation_or_from_another_image_is_denied_whatever_allows_it() {
    let fx = Fixture::start().await;
    let key = fx.kms.create_key(Some(&policy(&PCR0, true))).unwrap().arn;
    let other = fx.kms.create_key(None).unwrap().arn;
    let blob = encrypt(&fx, &key).await;

    // No attestation document: the Null deny.
    let err = fx
        .client()
        .decrypt()
        .key_id(&key)
        .ciphertext_blob(blob.clone())
        .send()
        .await
        .unwrap_err();
    assert_eq!(error_code(&err), "AccessDeniedException");
    let message = error_message(&err);
    assert!(message.contains("explicit deny"), "{message}");
    assert!(
        message.contains("DenyDecryptWithoutAttestation"),
        "{message}"
    );

    // Moving the value to a key without the conditions: denied too.
    let err = fx
        .client()
        .re_encrypt()
        .ciphertext_blob(blob.clone())
        .destination_key_id(&other)
        .send()
        .await
        .unwrap_err();
    assert_eq!(error_code(&err), "AccessDeniedException");
    assert!(
        error_message(&err).contains("DenyReEncryptFromAndGrants"),
        "{}",
        error_message(&err)
    );

    // The attested enclave image decrypts.
    let recipient_key = rsa_2048();
    let recipient = |document| {
        RecipientInfo::builder()
            .key_encryption_algorithm(KeyEncryptionMechanism::RsaesOaepSha256)
            .attestation_document(Blob::new(document))
            .build()
    };
    let answer = fx
        .client()
        .decrypt()
        .key_id(&key)
        .ciphertext_blob(blob.clone())
        .recipient(recipient(fx.attest(&recipient_key)))
        .send()
        .await
        .unwrap();
    assert!(answer.ciphertext_for_recipient().is_some());
    assert!(answer.plaintext().is_none());

    // A key whose policy pins another image: this (genuine) enclave is
    // refused by the ImageSha384 deny although `kms:*` is allowed.
    let elsewhere = fx
        .kms
        .create_key(Some(&policy(&[0x11; 48], true)))
        .unwrap()
        .arn;
    let blob = encrypt(&fx, &elsewhere).await;
    let err = fx
        .client()
        .decrypt()
        .key_id(&elsewhere)
        .ciphertext_blob(blob)
        .recipient(recipient(fx.attest(&recipient_key)))
        .send()
        .await
        .unwrap_err();
    assert!(
        error_message(&err).contains("DenyDecryptUnlessImageSha384"),
        "{}",
        error_message(&err)
    );
}

#[tokio::test]
async fn without_the_denies_the_same_allow_would_decrypt_in_the_clear() {
    // The control: what the denies above prevent.
    let fx = Fixture::start().await;
    let key = fx.kms.create_key(Some(&policy(&PCR0, false))).unwrap().arn;
    let blob = encrypt(&fx, &key).await;
    let answer = fx
        .client()
        .decrypt()
        .key_id(&key)
        .ciphertext_blob(blob)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.plaintext().unwrap().as_ref(), b"hunter2");
}
