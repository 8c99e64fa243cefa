//! The KMS emulator as the full-stack tests start it: a test CA, one pair
//! of credentials, attestation checked against the mock NSM's root in the
//! test's dir, one key, and an SDK client that seals values for that key
//! as `keystore-host encrypt` does.

use std::path::{Path, PathBuf};

use aws_sdk_kms::config::Credentials;
use aws_sdk_kms::primitives::Blob;
use keystore_shared::envelope::{Envelope, NAME_CONTEXT_KEY};
use keystore_tests::kms::{Credential, MockKms, MockKmsConfig, MockKmsHandle};

use super::stack::KmsUpstream;

pub struct Emulator {
    /// The running emulator (faults, clock, call counts).
    pub kms: MockKmsHandle,
    /// The key values are sealed under (the default policy lets the
    /// credentials decrypt for an attested enclave).
    pub key_arn: String,
    client: aws_sdk_kms::Client,
    mock_pki: PathBuf,
}

impl Emulator {
    /// Starts it in `dir` (the mock NSM's PKI goes to `dir/pki`).
    pub async fn start(dir: &Path, (access_key, secret_key): (&str, &str)) -> Emulator {
        let mock_pki = dir.join("pki");
        let kms = MockKms::start(
            MockKmsConfig::new(
                dir.join("kms-tls"),
                vec![Credential::new(access_key, secret_key)],
            )
            .with_attestation_root(mock_pki.join("root.pem")),
        )
        .await
        .unwrap();
        let key_arn = kms.create_key(None).unwrap().arn;
        let sdk = keystore_host::aws::sdk_config(
            Some(kms.region().to_owned()),
            Some(kms.endpoint_url().to_owned()),
            Some(std::fs::read(kms.ca_pem_path()).unwrap()),
        )
        .await
        .unwrap();
        let client = aws_sdk_kms::Client::from_conf(
            aws_sdk_kms::config::Builder::from(&sdk)
                .credentials_provider(Credentials::new(
                    access_key, secret_key, None, None, "emulator",
                ))
                .build(),
        );
        Emulator {
            kms,
            key_arn,
            client,
            mock_pki,
        }
    }

    /// `value` encrypted for `name` under the key: the `ENC[...]` text a
    /// secrets file holds.
    pub async fn seal(&self, name: &str, value: &str) -> String {
        let out = self
            .client
            .encrypt()
            .key_id(&self.key_arn)
            .plaintext(Blob::new(value.as_bytes().to_vec()))
            .encryption_context(NAME_CONTEXT_KEY, name)
            .send()
            .await
            .unwrap();
        Envelope::kms(out.ciphertext_blob().unwrap().as_ref().to_vec())
            .unwrap()
            .to_string()
    }

    /// The emulator as the enclave of a [`super::stack::Stack`] reaches it.
    pub fn upstream(&self) -> KmsUpstream {
        KmsUpstream {
            port: self.kms.local_addr().port(),
            ca_pem: self.kms.ca_pem_path().to_owned(),
            key_arn: self.key_arn.clone(),
            mock_pki: self.mock_pki.clone(),
        }
    }
}
