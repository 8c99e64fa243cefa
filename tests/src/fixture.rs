//! The fixture every test of the emulator starts from, in this crate's tests
//! and the enclave's: an emulator trusting a mock NSM's root, and real
//! `aws-sdk-kms` clients pointed at it.

use std::time::Duration;

use crate::kms::{Credential, MockKms, MockKmsConfig, MockKmsHandle};
use aws_sdk_kms::config::retry::RetryConfig;
use aws_sdk_kms::config::timeout::TimeoutConfig;
use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
use aws_smithy_http_client::tls::rustls_provider::CryptoMode;
use aws_smithy_http_client::tls::{Provider, TlsContext, TrustStore};
use keystore_nsm::{AttestationRequest, MockConfig, MockNsm};
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
    /// The emulator.
    pub kms: MockKmsHandle,
    /// The mock NSM whose root the emulator trusts.
    pub nsm: MockNsm,
    /// Holds the NSM's PKI and the emulator's TLS files.
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
        use keystore_nsm::Nsm;
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
    client_for(
        kms.endpoint_url(),
        kms.ca_pem_path(),
        kms.region(),
        credentials,
        retry,
    )
}

/// A real `aws-sdk-kms` client for the emulator at `endpoint_url`, trusting
/// only the CA in `ca_pem_path`.
pub fn client_for(
    endpoint_url: &str,
    ca_pem_path: &std::path::Path,
    region: &str,
    credentials: Credentials,
    retry: RetryConfig,
) -> aws_sdk_kms::Client {
    let ca = std::fs::read(ca_pem_path).expect("read CA");
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
        .region(Region::new(region.to_owned()))
        .endpoint_url(endpoint_url)
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

/// `Encrypt` of `plaintext` under `key_id` with the real client; the blob.
pub async fn encrypt_blob(
    kms: &aws_sdk_kms::Client,
    key_id: &str,
    plaintext: &[u8],
) -> aws_sdk_kms::primitives::Blob {
    kms.encrypt()
        .key_id(key_id)
        .plaintext(aws_sdk_kms::primitives::Blob::new(plaintext.to_vec()))
        .send()
        .await
        .expect("Encrypt")
        .ciphertext_blob()
        .expect("blob")
        .clone()
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

/// A raw HTTP response.
#[derive(Debug)]
pub struct RawResponse {
    /// The HTTP status.
    pub status: u16,
    /// The status line and headers, as text.
    pub head: String,
    /// The body.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// `__type` of a KMS error body.
    pub fn error_type(&self) -> String {
        self.json()["__type"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

/// Sends one HTTP/1.1 request over TLS (trusting the emulator's CA) with
/// `Connection: close`, and reads the whole answer. `None` if the server
/// closed the connection without answering.
pub async fn raw_request(
    kms: &MockKmsHandle,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Option<RawResponse> {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let ca = std::fs::read(kms.ca_pem_path()).expect("read CA");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.expect("CA PEM")).expect("add CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(kms.local_addr())
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("TLS handshake");

    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\nconnection: close\r\n",
        kms.local_addr(),
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    tls.write_all(request.as_bytes()).await.expect("write head");
    // The server may answer (and close) before reading an oversized body.
    let _ = tls.write_all(body).await;
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    if answer.is_empty() {
        return None;
    }
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of head");
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    Some(RawResponse {
        status,
        head,
        body: answer[split + 4..].to_vec(),
    })
}

/// Headers of a KMS request for `target` with `body`, SigV4-signed now with
/// the fixture credential (or `secret`).
pub fn signed_headers(
    kms: &MockKmsHandle,
    target: &str,
    body: &[u8],
    secret: &str,
) -> Vec<(String, String)> {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    use aws_sigv4::sign::v4;

    let host = kms.local_addr().to_string();
    let identity = Credentials::new(ACCESS_KEY_ID, secret, None, None, "test").into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(kms.region())
        .name("kms")
        .time(std::time::SystemTime::now())
        .settings(SigningSettings::default())
        .build()
        .expect("params")
        .into();
    let mut headers = vec![
        ("host".to_owned(), host.clone()),
        (
            "content-type".to_owned(),
            "application/x-amz-json-1.1".to_owned(),
        ),
        ("x-amz-target".to_owned(), target.to_owned()),
    ];
    let signable = SignableRequest::new(
        "POST",
        format!("https://{host}/"),
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        SignableBody::Bytes(body),
    )
    .expect("signable");
    let (instructions, _) = sign(signable, &params).expect("sign").into_parts();
    for (name, value) in instructions.headers() {
        headers.push((name.to_owned(), value.to_owned()));
    }
    // `host` is written by raw_request itself.
    headers.retain(|(k, _)| k != "host");
    headers
}
