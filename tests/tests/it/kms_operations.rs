//! The KMS emulator driven by the real `aws-sdk-kms` client over HTTPS:
//! key management, encryption round trips, encryption context, data keys,
//! re-encryption, key policies, and `Recipient` with mock NSM documents.

use keystore_tests::fixture as kms_support;

use std::time::Duration;

use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{DataKeySpec, KeyEncryptionMechanism, RecipientInfo};
use keystore_nsm::{MockConfig, MockNsm};
use keystore_tests::kms::Operation;
use kms_support::{Fixture, PCR0, encrypt_blob, error_code, error_message, rsa_2048};

#[tokio::test]
async fn create_alias_and_describe_key() {
    let fx = Fixture::start().await;
    let kms = fx.client();
    let created = kms
        .create_key()
        .description("test key")
        .send()
        .await
        .expect("CreateKey");
    let meta = created.key_metadata().expect("metadata");
    let key_id = meta.key_id().to_owned();
    assert!(uuid::Uuid::parse_str(&key_id).is_ok(), "{key_id}");
    let arn = meta.arn().expect("arn").to_owned();
    assert_eq!(
        arn,
        format!("arn:aws:kms:us-east-1:111122223333:key/{key_id}")
    );
    assert_eq!(meta.description(), Some("test key"));
    assert!(meta.enabled());

    kms.create_alias()
        .alias_name("alias/app-secrets")
        .target_key_id(&key_id)
        .send()
        .await
        .expect("CreateAlias");
    let again = kms
        .create_alias()
        .alias_name("alias/app-secrets")
        .target_key_id(&key_id)
        .send()
        .await
        .expect_err("duplicate alias");
    assert_eq!(error_code(&again), "AlreadyExistsException");

    for name in [key_id.as_str(), arn.as_str(), "alias/app-secrets"] {
        let described = kms
            .describe_key()
            .key_id(name)
            .send()
            .await
            .unwrap_or_else(|e| panic!("DescribeKey {name}: {e:?}"));
        assert_eq!(described.key_metadata().expect("metadata").key_id(), key_id);
    }
    let alias_arn = "arn:aws:kms:us-east-1:111122223333:alias/app-secrets";
    let described = kms
        .describe_key()
        .key_id(alias_arn)
        .send()
        .await
        .expect("alias ARN");
    assert_eq!(described.key_metadata().expect("metadata").key_id(), key_id);

    for missing in [
        "alias/nope",
        "00000000-0000-4000-8000-000000000000",
        "not-a-key",
        "arn:aws:kms:eu-west-1:111122223333:key/00000000-0000-4000-8000-000000000000",
    ] {
        let err = kms
            .describe_key()
            .key_id(missing)
            .send()
            .await
            .expect_err("missing key");
        assert_eq!(error_code(&err), "NotFoundException", "{missing}");
    }
    assert_eq!(fx.kms.calls(Operation::CreateKey).calls, 1);
    assert_eq!(fx.kms.calls(Operation::DescribeKey).calls, 8);
    assert_eq!(fx.kms.calls(Operation::DescribeKey).errors, 4);
}

#[tokio::test]
async fn encrypt_decrypt_round_trip_with_and_without_key_id() {
    let fx = Fixture::start().await;
    let kms = fx.client();
    let key = kms.create_key().send().await.expect("CreateKey");
    let key_id = key.key_metadata().expect("metadata").key_id().to_owned();
    let other = kms.create_key().send().await.expect("CreateKey");
    let other_id = other.key_metadata().expect("metadata").key_id().to_owned();

    let encrypted = kms
        .encrypt()
        .key_id(&key_id)
        .plaintext(Blob::new(b"database password".to_vec()))
        .send()
        .await
        .expect("Encrypt");
    let blob = encrypted.ciphertext_blob().expect("blob").clone();
    assert!(encrypted.key_id().expect("key id").ends_with(&key_id));
    assert!(
        !blob.as_ref().windows(8).any(|w| w == b"database"),
        "ciphertext leaks plaintext"
    );

    let without = kms
        .decrypt()
        .ciphertext_blob(blob.clone())
        .send()
        .await
        .expect("Decrypt without KeyId");
    assert_eq!(
        without.plaintext().expect("plaintext").as_ref(),
        b"database password"
    );
    assert!(without.key_id().expect("key id").ends_with(&key_id));
    assert!(without.ciphertext_for_recipient().is_none());

    let with = kms
        .decrypt()
        .ciphertext_blob(blob.clone())
        .key_id(&key_id)
        .send()
        .await
        .expect("Decrypt with KeyId");
    assert_eq!(
        with.plaintext().expect("plaintext").as_ref(),
        b"database password"
    );

    let wrong = kms
        .decrypt()
        .ciphertext_blob(blob.clone())
        .key_id(&other_id)
        .send()
        .await
        .expect_err("other KeyId");
    assert_eq!(error_code(&wrong), "IncorrectKeyException");
    // As real KMS: the answer's KeyId is the key ARN, whatever KeyId named.
    let key_arn = format!("arn:aws:kms:us-east-1:111122223333:key/{key_id}");
    assert_eq!(with.key_id(), Some(key_arn.as_str()));
    let other_arn = other.key_metadata().expect("metadata").arn().expect("arn");
    let by_arn = kms
        .decrypt()
        .ciphertext_blob(blob.clone())
        .key_id(&key_arn)
        .send()
        .await
        .expect("Decrypt with the key ARN");
    assert_eq!(by_arn.key_id(), Some(key_arn.as_str()));
    let err = kms
        .decrypt()
        .ciphertext_blob(blob.clone())
        .key_id(other_arn)
        .send()
        .await
        .expect_err("other key ARN");
    assert_eq!(error_code(&err), "IncorrectKeyException");
    // The misbehaving mode tests use to check a client's own KeyId check:
    // the answer then names the ciphertext's key, not the one asked for.
    fx.kms.set_ignore_key_id(true);
    let ignored = kms
        .decrypt()
        .ciphertext_blob(blob.clone())
        .key_id(other_arn)
        .send()
        .await
        .expect("KeyId ignored");
    assert_eq!(ignored.key_id(), Some(key_arn.as_str()));
    fx.kms.set_ignore_key_id(false);

    let mut tampered = blob.clone().into_inner();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let err = kms
        .decrypt()
        .ciphertext_blob(Blob::new(tampered))
        .send()
        .await
        .expect_err("tampered");
    assert_eq!(error_code(&err), "InvalidCiphertextException");
    let err = kms
        .decrypt()
        .ciphertext_blob(Blob::new(b"garbage".to_vec()))
        .send()
        .await
        .expect_err("garbage");
    assert_eq!(error_code(&err), "InvalidCiphertextException");

    let err = kms
        .encrypt()
        .key_id(&key_id)
        .plaintext(Blob::new(vec![0u8; 4097]))
        .send()
        .await
        .expect_err("too large");
    assert_eq!(error_code(&err), "ValidationException");

    let stats = fx.kms.calls(Operation::Decrypt);
    assert_eq!(
        (stats.calls, stats.plaintext_responses, stats.errors),
        (8, 4, 4)
    );
}

#[tokio::test]
async fn encryption_context_is_bound() {
    let fx = Fixture::start().await;
    let kms = fx.client();
    let key_id = fx.kms.create_key(None).expect("key").key_id;
    let encrypted = kms
        .encrypt()
        .key_id(&key_id)
        .plaintext(Blob::new(b"s3cret".to_vec()))
        .encryption_context("keystore:name", "DB_PASSWORD")
        .encryption_context("env", "prod")
        .send()
        .await
        .expect("Encrypt");
    let blob = encrypted.ciphertext_blob().expect("blob").clone();

    // Same context, other insertion order: fine.
    let ok = kms
        .decrypt()
        .ciphertext_blob(blob.clone())
        .encryption_context("env", "prod")
        .encryption_context("keystore:name", "DB_PASSWORD")
        .send()
        .await
        .expect("Decrypt");
    assert_eq!(ok.plaintext().expect("plaintext").as_ref(), b"s3cret");

    for (k, v) in [("keystore:name", "API_KEY"), ("env", "dev")] {
        let err = kms
            .decrypt()
            .ciphertext_blob(blob.clone())
            .encryption_context("keystore:name", "DB_PASSWORD")
            .encryption_context("env", "prod")
            .encryption_context(k, v)
            .send()
            .await
            .expect_err("mismatched context");
        assert_eq!(error_code(&err), "InvalidCiphertextException");
    }
    let err = kms
        .decrypt()
        .ciphertext_blob(blob.clone())
        .send()
        .await
        .expect_err("missing context");
    assert_eq!(error_code(&err), "InvalidCiphertextException");
}

#[tokio::test]
async fn generate_data_key_and_re_encrypt() {
    let fx = Fixture::start().await;
    let kms = fx.client();
    let a = fx.kms.create_key(None).expect("key").key_id;
    let b = fx.kms.create_key(None).expect("key").key_id;

    let dk = kms
        .generate_data_key()
        .key_id(&a)
        .key_spec(DataKeySpec::Aes256)
        .encryption_context("file", "secrets.env")
        .send()
        .await
        .expect("GenerateDataKey");
    let plaintext = dk.plaintext().expect("plaintext").as_ref().to_vec();
    assert_eq!(plaintext.len(), 32);
    let wrapped = dk.ciphertext_blob().expect("blob").clone();

    let n = kms
        .generate_data_key()
        .key_id(&a)
        .number_of_bytes(64)
        .send()
        .await
        .expect("NumberOfBytes");
    assert_eq!(n.plaintext().expect("plaintext").as_ref().len(), 64);
    let err = kms
        .generate_data_key()
        .key_id(&a)
        .send()
        .await
        .expect_err("neither KeySpec nor NumberOfBytes");
    assert_eq!(error_code(&err), "ValidationException");

    let unwrapped = kms
        .decrypt()
        .ciphertext_blob(wrapped.clone())
        .encryption_context("file", "secrets.env")
        .send()
        .await
        .expect("Decrypt data key");
    assert_eq!(
        unwrapped.plaintext().expect("plaintext").as_ref(),
        plaintext
    );

    let re = kms
        .re_encrypt()
        .ciphertext_blob(wrapped.clone())
        .source_encryption_context("file", "secrets.env")
        .destination_key_id(&b)
        .destination_encryption_context("file", "rotated.env")
        .send()
        .await
        .expect("ReEncrypt");
    assert!(re.source_key_id().expect("source").ends_with(&a));
    assert!(re.key_id().expect("destination").ends_with(&b));
    let moved = re.ciphertext_blob().expect("blob").clone();
    let opened = kms
        .decrypt()
        .ciphertext_blob(moved.clone())
        .key_id(&b)
        .encryption_context("file", "rotated.env")
        .send()
        .await
        .expect("Decrypt re-encrypted");
    assert_eq!(opened.plaintext().expect("plaintext").as_ref(), plaintext);
    let err = kms
        .decrypt()
        .ciphertext_blob(moved)
        .key_id(&a)
        .encryption_context("file", "rotated.env")
        .send()
        .await
        .expect_err("old key");
    assert_eq!(error_code(&err), "IncorrectKeyException");

    let err = kms
        .re_encrypt()
        .ciphertext_blob(wrapped)
        .destination_key_id(&b)
        .send()
        .await
        .expect_err("ReEncrypt without source context");
    assert_eq!(error_code(&err), "InvalidCiphertextException");
}

#[tokio::test]
async fn key_policies_allow_deny_and_reject_malformed_documents() {
    let fx = Fixture::start().await;
    let kms = fx.client();
    let key_id = fx.kms.create_key(None).expect("key").key_id;
    let default = kms
        .get_key_policy()
        .key_id(&key_id)
        .policy_name("default")
        .send()
        .await
        .expect("GetKeyPolicy");
    assert!(
        default
            .policy()
            .expect("policy")
            .contains("arn:aws:iam::111122223333:root")
    );

    let deny_encrypt = r#"{"Version":"2012-10-17","Statement":[
        {"Sid":"All","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::111122223333:root"},"Action":"kms:*","Resource":"*"},
        {"Sid":"NoEncrypt","Effect":"Deny","Principal":"*","Action":"kms:Encrypt","Resource":"*"}]}"#;
    kms.put_key_policy()
        .key_id(&key_id)
        .policy_name("default")
        .policy(deny_encrypt)
        .send()
        .await
        .expect("PutKeyPolicy");
    let err = kms
        .encrypt()
        .key_id(&key_id)
        .plaintext(Blob::new(b"x".to_vec()))
        .send()
        .await
        .expect_err("denied");
    assert_eq!(error_code(&err), "AccessDeniedException");
    assert!(
        error_message(&err).contains("explicit deny"),
        "{}",
        error_message(&err)
    );
    kms.describe_key()
        .key_id(&key_id)
        .send()
        .await
        .expect("still allowed");

    for bad in ["{not json", r#"{"Statement":[{"Effect":"Allow"}]}"#] {
        let err = kms
            .put_key_policy()
            .key_id(&key_id)
            .policy_name("default")
            .policy(bad)
            .send()
            .await
            .expect_err("malformed policy");
        assert_eq!(
            error_code(&err),
            "MalformedPolicyDocumentException",
            "{bad}"
        );
    }
    let err = kms
        .create_key()
        .policy("[]")
        .send()
        .await
        .expect_err("malformed CreateKey policy");
    assert_eq!(error_code(&err), "MalformedPolicyDocumentException");

    // A policy that names another account allows nothing to us.
    let foreign = r#"{"Statement":[{"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::999999999999:root"},"Action":"kms:*","Resource":"*"}]}"#;
    let created = kms
        .create_key()
        .policy(foreign)
        .send()
        .await
        .expect("CreateKey");
    let foreign_id = created
        .key_metadata()
        .expect("metadata")
        .key_id()
        .to_owned();
    let err = kms
        .describe_key()
        .key_id(&foreign_id)
        .send()
        .await
        .expect_err("not allowed");
    assert_eq!(error_code(&err), "AccessDeniedException");
    assert!(
        error_message(&err).contains("no resource-based policy allows the kms:DescribeKey action"),
        "{}",
        error_message(&err)
    );
}

fn pcr0_policy(pcr0_hex: &str) -> String {
    format!(
        r#"{{"Version":"2012-10-17","Statement":[
        {{"Sid":"Admin","Effect":"Allow","Principal":{{"AWS":"arn:aws:iam::111122223333:root"}},
          "Action":["kms:Encrypt","kms:DescribeKey","kms:PutKeyPolicy","kms:GetKeyPolicy"],"Resource":"*"}},
        {{"Sid":"EnclaveOnly","Effect":"Allow","Principal":{{"AWS":"arn:aws:iam::111122223333:root"}},
          "Action":["kms:Decrypt","kms:GenerateDataKey"],"Resource":"*",
          "Condition":{{"StringEqualsIgnoreCase":{{"kms:RecipientAttestation:ImageSha384":"{pcr0_hex}"}}}}}}]}}"#
    )
}

fn recipient(document: Vec<u8>) -> RecipientInfo {
    RecipientInfo::builder()
        .key_encryption_algorithm(KeyEncryptionMechanism::RsaesOaepSha256)
        .attestation_document(Blob::new(document))
        .build()
}

#[tokio::test]
async fn decrypt_with_recipient_returns_ciphertext_for_recipient() {
    let fx = Fixture::start().await;
    let kms = fx.client();
    // Upper-case hex in the policy: StringEqualsIgnoreCase must still match.
    let key_id = fx
        .kms
        .create_key(Some(&pcr0_policy(&hex::encode_upper(PCR0))))
        .expect("key")
        .key_id;
    let blob = kms
        .encrypt()
        .key_id(&key_id)
        .plaintext(Blob::new(b"enclave-only secret".to_vec()))
        .encryption_context("keystore:name", "TOKEN")
        .send()
        .await
        .expect("Encrypt")
        .ciphertext_blob()
        .expect("blob")
        .clone();

    let key = rsa_2048();
    let answer = kms
        .decrypt()
        .ciphertext_blob(blob.clone())
        .encryption_context("keystore:name", "TOKEN")
        .recipient(recipient(fx.attest(&key)))
        .send()
        .await
        .expect("Decrypt with Recipient");
    assert!(answer.plaintext().is_none(), "Plaintext must be absent");
    let cms = answer
        .ciphertext_for_recipient()
        .expect("CiphertextForRecipient");
    // Indefinite-length BER like real KMS.
    assert_eq!(&cms.as_ref()[..2], &[0x30, 0x80]);
    let opened = keystore_cms::open(cms.as_ref(), &key).expect("open CMS");
    assert_eq!(opened.as_slice(), b"enclave-only secret");
    // Another key cannot open it.
    assert!(keystore_cms::open(cms.as_ref(), &rsa_2048()).is_err());

    // Without a Recipient the PCR0 condition cannot hold.
    let err = kms
        .decrypt()
        .ciphertext_blob(blob.clone())
        .encryption_context("keystore:name", "TOKEN")
        .send()
        .await
        .expect_err("no Recipient");
    assert_eq!(error_code(&err), "AccessDeniedException");
    assert!(
        error_message(&err).contains("kms:RecipientAttestation:ImageSha384"),
        "{}",
        error_message(&err)
    );

    // GenerateDataKey with a Recipient.
    let dk = kms
        .generate_data_key()
        .key_id(&key_id)
        .key_spec(DataKeySpec::Aes256)
        .recipient(recipient(fx.attest(&key)))
        .send()
        .await
        .expect("GenerateDataKey with Recipient");
    assert!(dk.plaintext().is_none());
    let data_key = keystore_cms::open(
        dk.ciphertext_for_recipient()
            .expect("CiphertextForRecipient")
            .as_ref(),
        &key,
    )
    .expect("open data key");
    assert_eq!(data_key.len(), 32);

    let d = fx.kms.calls(Operation::Decrypt);
    assert_eq!(
        (d.calls, d.with_recipient, d.plaintext_responses),
        (2, 1, 0)
    );
    let g = fx.kms.calls(Operation::GenerateDataKey);
    assert_eq!(
        (g.calls, g.with_recipient, g.plaintext_responses),
        (1, 1, 0)
    );
}

#[tokio::test]
async fn recipient_policy_pinned_to_another_pcr0_is_denied() {
    let fx = Fixture::start().await;
    let kms = fx.client();
    let other_pcr0 = hex::encode([0x11u8; 48]);
    let key_id = fx
        .kms
        .create_key(Some(&pcr0_policy(&other_pcr0)))
        .expect("key")
        .key_id;
    let blob = encrypt_blob(&kms, &key_id, b"x").await;
    let key = rsa_2048();
    let err = kms
        .decrypt()
        .ciphertext_blob(blob.clone())
        .recipient(recipient(fx.attest(&key)))
        .send()
        .await
        .expect_err("wrong PCR0");
    assert_eq!(error_code(&err), "AccessDeniedException");
    let message = error_message(&err);
    assert!(
        message.contains("kms:RecipientAttestation:ImageSha384"),
        "{message}"
    );
    assert!(message.contains("StringEqualsIgnoreCase"), "{message}");
    assert!(message.contains(&hex::encode(PCR0)), "{message}");
    assert!(message.contains("EnclaveOnly"), "{message}");

    // Fix the policy through the API and the same request succeeds.
    kms.put_key_policy()
        .key_id(&key_id)
        .policy(pcr0_policy(&hex::encode(PCR0)))
        .send()
        .await
        .expect("PutKeyPolicy");
    kms.decrypt()
        .ciphertext_blob(blob)
        .recipient(recipient(fx.attest(&key)))
        .send()
        .await
        .expect("allowed after policy update");
}

#[tokio::test]
async fn pcr_n_conditions_are_enforced() {
    let fx = Fixture::start().await;
    let kms = fx.client();
    let policy = |pcr8: &str| {
        format!(
            r#"{{"Statement":[{{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*",
            "Condition":{{"StringEqualsIgnoreCase":{{"kms:RecipientAttestation:PCR8":"{pcr8}",
                                                   "kms:RecipientAttestation:PCR0":"{}"}}}}}}]}}"#,
            hex::encode(PCR0)
        )
    };
    // The mock NSM's PCR8 is all zeros by default.
    let good = fx
        .kms
        .create_key(Some(&policy(&hex::encode([0u8; 48]))))
        .expect("key")
        .key_id;
    let bad = fx
        .kms
        .create_key(Some(&policy(&hex::encode([1u8; 48]))))
        .expect("key")
        .key_id;
    let key = rsa_2048();
    for (key_id, allowed) in [(good, true), (bad, false)] {
        let result = kms
            .generate_data_key()
            .key_id(&key_id)
            .number_of_bytes(16)
            .recipient(recipient(fx.attest(&key)))
            .send()
            .await;
        match (result, allowed) {
            (Ok(r), true) => assert!(r.ciphertext_for_recipient().is_some()),
            (Err(e), false) => {
                assert_eq!(error_code(&e), "AccessDeniedException");
                assert!(error_message(&e).contains("kms:RecipientAttestation:PCR8"));
            }
            (other, _) => panic!("allowed={allowed}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn stale_and_foreign_documents_are_refused() {
    let fx = Fixture::start().await;
    let kms = fx.client();
    let key_id = fx
        .kms
        .create_key(Some(&pcr0_policy(&hex::encode(PCR0))))
        .expect("key")
        .key_id;
    let blob = encrypt_blob(&kms, &key_id, b"x").await;
    let key = rsa_2048();
    let document = fx.attest(&key);

    // A document signed under another mock NSM's root.
    let foreign_dir = tempfile::tempdir().expect("tempdir");
    let foreign = MockNsm::open_with_pcr0(foreign_dir.path(), MockConfig::default(), PCR0)
        .expect("foreign NSM");
    let spki = {
        use rsa::pkcs8::EncodePublicKey;
        key.to_public_key()
            .to_public_key_der()
            .expect("spki")
            .as_bytes()
            .to_vec()
    };
    let foreign_doc = {
        use keystore_nsm::{AttestationRequest, Nsm};
        foreign
            .attest(&AttestationRequest {
                public_key: Some(spki),
                ..Default::default()
            })
            .expect("attest")
    };
    let err = kms
        .decrypt()
        .ciphertext_blob(blob.clone())
        .recipient(recipient(foreign_doc))
        .send()
        .await
        .expect_err("foreign root");
    assert_eq!(error_code(&err), "ValidationException");
    assert!(
        error_message(&err).contains("attestation document is invalid"),
        "{}",
        error_message(&err)
    );

    let mut tampered = document.clone();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 0x01;
    let err = kms
        .decrypt()
        .ciphertext_blob(blob.clone())
        .recipient(recipient(tampered))
        .send()
        .await
        .expect_err("tampered document");
    assert_eq!(error_code(&err), "ValidationException");

    let err = kms
        .decrypt()
        .ciphertext_blob(blob.clone())
        .recipient(recipient(b"not cose".to_vec()))
        .send()
        .await
        .expect_err("garbage document");
    assert_eq!(error_code(&err), "ValidationException");

    // Fresh document: fine. Six minutes later: refused as stale.
    kms.decrypt()
        .ciphertext_blob(blob.clone())
        .recipient(recipient(document.clone()))
        .send()
        .await
        .expect("fresh document");
    fx.kms.advance_clock(Duration::from_secs(6 * 60));
    let err = kms
        .decrypt()
        .ciphertext_blob(blob.clone())
        .recipient(recipient(document))
        .send()
        .await
        .expect_err("stale document");
    assert_eq!(error_code(&err), "ValidationException");
    assert!(
        error_message(&err).contains("older than 300 s"),
        "{}",
        error_message(&err)
    );
    // No answer ever carried plaintext.
    assert_eq!(fx.kms.calls(Operation::Decrypt).plaintext_responses, 0);
    assert_eq!(fx.kms.calls(Operation::Decrypt).with_recipient, 5);
}
