//! Shared fixture for the KMS emulator tests: an emulator trusting a mock
//! NSM's root, and real `aws-sdk-kms` clients pointed at it.

#![allow(dead_code)]

use std::time::Duration;

use aws_sdk_kms::config::retry::RetryConfig;
use aws_sdk_kms::config::timeout::TimeoutConfig;
use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
use aws_smithy_http_client::tls::rustls_provider::CryptoMode;
use aws_smithy_http_client::tls::{Provider, TlsContext, TrustStore};
use keystore_enclave::nsm::{AttestationRequest, MockConfig, MockNsm};
use keystore_tests::kms::{Credential, MockKms, MockKmsConfig, MockKmsHandle};
use rsa::pkcs8::EncodePublicKey;
use tempfile::TempDir;

/// Access key the fixture's emulator accepts.
pub const ACCESS_KEY_ID: &str = "AKIAMOCKKMSTEST00001";
/// Its secret.
pub const SECRET_ACCESS_KEY: &str = "mock-kms-test-secret-0001";
/// PCR0 of the fixture's mock NSM.
pub const PCR0: [u8; 48] = [0x5a; 48];

/// A running emulator, the mock NSM whose root it trusts, and their files.
pub struct Fixture {
    pub kms: MockKmsHandle,
    pub nsm: MockNsm,
    pub dir: TempDir,
}

impl Fixture {
    /// Starts an emulator with the fixture credential and the mock NSM root.
    pub async fn start() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let nsm = MockNsm::open_with_pcr0(dir.path().join("nsm"), MockConfig::default(), PCR0)
            .expect("mock NSM");
        let config = MockKmsConfig::new(
            dir.path().join("tls"),
            vec![Credential::new(ACCESS_KEY_ID, SECRET_ACCESS_KEY)],
        )
        .with_attestation_root(nsm.pki().root_pem_path());
        let kms = MockKms::start(config).await.expect("start mock-kms");
        Fixture { kms, nsm, dir }
    }

    /// A client with the fixture credential and no retries.
    pub fn client(&self) -> aws_sdk_kms::Client {
        self.client_with(
            Credentials::new(ACCESS_KEY_ID, SECRET_ACCESS_KEY, None, None, "test"),
            RetryConfig::disabled(),
        )
    }

    /// A client with `credentials` and `retry`.
    pub fn client_with(&self, credentials: Credentials, retry: RetryConfig) -> aws_sdk_kms::Client {
        client(&self.kms, credentials, retry)
    }

    /// An attestation document from the mock NSM binding `key`'s SPKI.
    pub fn attest(&self, key: &rsa::PrivateKey) -> Vec<u8> {
        let spki = key
            .to_public_key()
            .to_public_key_der()
            .expect("SPKI")
            .as_bytes()
            .to_vec();
        use keystore_enclave::nsm::Nsm;
        self.nsm
            .attest(&AttestationRequest {
                public_key: Some(spki),
                ..Default::default()
            })
            .expect("attest")
    }
}

/// A real `aws-sdk-kms` client for `kms`: static credentials, the
/// emulator's region and endpoint, rustls (ring) trusting only its test CA.
pub fn client(
    kms: &MockKmsHandle,
    credentials: Credentials,
    retry: RetryConfig,
) -> aws_sdk_kms::Client {
    let ca = std::fs::read(kms.ca_pem_path()).expect("read CA");
    let tls = TlsContext::builder()
        .with_trust_store(TrustStore::empty().with_pem_certificate(ca))
        .build()
        .expect("TLS context");
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .tls_context(tls)
        .build_https();
    let config = aws_sdk_kms::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(kms.region().to_owned()))
        .endpoint_url(kms.endpoint_url())
        .credentials_provider(credentials)
        .http_client(http)
        .retry_config(retry)
        .timeout_config(
            TimeoutConfig::builder()
                .operation_attempt_timeout(Duration::from_secs(20))
                .build(),
        )
        .build();
    aws_sdk_kms::Client::from_conf(config)
}

/// A fresh RSA-2048 recipient key.
pub fn rsa_2048() -> rsa::PrivateKey {
    rsa::PrivateKey::new(&mut rand::rng(), 2048).expect("RSA keygen")
}

/// The `__type` code of an SDK error (`NotFoundException`, ...).
pub fn error_code<E, R>(err: &aws_sdk_kms::error::SdkError<E, R>) -> String
where
    E: aws_sdk_kms::error::ProvideErrorMetadata,
{
    use aws_sdk_kms::error::ProvideErrorMetadata;
    err.code().unwrap_or("<no code>").to_owned()
}

/// The message of an SDK error.
pub fn error_message<E, R>(err: &aws_sdk_kms::error::SdkError<E, R>) -> String
where
    E: aws_sdk_kms::error::ProvideErrorMetadata,
{
    use aws_sdk_kms::error::ProvideErrorMetadata;
    err.message().unwrap_or_default().to_owned()
}
