//! Local peers for the KMS client tests: a test CA, an HTTPS server that
//! counts connections and records SNI, a fake KMS `Decrypt` speaking the
//! real JSON shape, and a credentials service on an `Endpoint`.
#![allow(dead_code, clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use keystore_enclave::kms::credentials::CredentialsConfig;
use keystore_enclave::kms::transport::TransportConfig;
use keystore_enclave::kms::{Kms, KmsConfig};
use keystore_enclave::recipient::{Recipient, RecipientBits, RecipientConfig, RecipientHandle};
use keystore_nsm::{MockConfig, MockNsm};
use keystore_shared::attestation::AttestationDocument;
use keystore_shared::endpoint::Endpoint;
use keystore_shared::frame::Connection;
use keystore_shared::protocol::{
    Credentials, ErrorCode, Request, RequestOp, Response, ResponseBody, SecretString,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rsa::pkcs8::DecodePublicKey;
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

pub const KMS_HOST: &str = "kms.test.local";
pub const ACCESS_KEY: &str = "AKIDTESTKEYSTORE0001";
pub const SECRET_KEY: &str = "test-secret-access-key-never-logged";

/// A test CA and a server certificate for `names`, as a rustls server
/// configuration plus the CA's PEM.
pub struct TestTls {
    pub ca_pem: String,
    pub server: Arc<ServerConfig>,
}

impl TestTls {
    pub fn new(names: &[&str]) -> TestTls {
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.distinguished_name
            .push(DnType::CommonName, "keystore kms transport test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let mut leaf =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .unwrap();
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let leaf_key = KeyPair::generate().unwrap();
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
        let chain: Vec<CertificateDer<'static>> =
            vec![leaf_cert.der().clone(), ca_cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let server =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap();
        TestTls {
            ca_pem: ca_cert.pem(),
            server: Arc::new(server),
        }
    }
}

/// What the HTTPS server saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub sni: Option<String>,
    pub host: Option<String>,
    pub target: Option<String>,
    pub authorization: Option<String>,
    pub body: Vec<u8>,
}

pub type Handler = Arc<dyn Fn(&Seen) -> (u16, Vec<u8>) + Send + Sync>;

/// An HTTPS/1.1 server on 127.0.0.1 that counts accepted TCP connections.
pub struct HttpsServer {
    pub port: u16,
    pub accepted: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpsServer {
    pub async fn start(tls: Arc<ServerConfig>, handler: Handler) -> HttpsServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let acceptor = TlsAcceptor::from(tls);
        let (accepted2, seen2) = (accepted.clone(), seen.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                accepted2.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let handler = handler.clone();
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let sni = tls.get_ref().1.server_name().map(str::to_owned);
                    let service =
                        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                            let handler = handler.clone();
                            let seen = seen.clone();
                            let sni = sni.clone();
                            async move {
                                let header = |name: &str| {
                                    req.headers()
                                        .get(name)
                                        .and_then(|v| v.to_str().ok())
                                        .map(str::to_owned)
                                };
                                let host = header("host");
                                let target = header("x-amz-target");
                                let authorization = header("authorization");
                                let body = req.into_body().collect().await?.to_bytes().to_vec();
                                let request = Seen {
                                    sni,
                                    host,
                                    target,
                                    authorization,
                                    body,
                                };
                                let (status, body) = handler(&request);
                                seen.lock().unwrap().push(request);
                                Ok::<_, hyper::Error>(
                                    hyper::Response::builder()
                                        .status(status)
                                        .header("content-type", "application/x-amz-json-1.1")
                                        .body(Full::new(Bytes::from(body)))
                                        .unwrap(),
                                )
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        HttpsServer {
            port,
            accepted,
            seen,
            task,
        }
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint::tcp("127.0.0.1", self.port)
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

pub fn kms_error(status: u16, code: &str, message: &str) -> (u16, Vec<u8>) {
    (
        status,
        serde_json::json!({"__type": code, "message": message})
            .to_string()
            .into_bytes(),
    )
}

/// Fake KMS `Decrypt`: the "ciphertext" is `name \0 value`; the
/// encryption context must name `name` (else `InvalidCiphertextException`,
/// like KMS), and the value comes back sealed for the document's public key
/// as `CiphertextForRecipient` (or as `Plaintext` if `plaintext` is set).
pub fn fake_decrypt(seen: &Seen, plaintext: bool) -> (u16, Vec<u8>) {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(&seen.body) else {
        return kms_error(400, "SerializationException", "bad JSON");
    };
    let blob = STANDARD
        .decode(body["CiphertextBlob"].as_str().unwrap_or_default())
        .unwrap_or_default();
    let Some(split) = blob.iter().position(|b| *b == 0) else {
        return kms_error(400, "InvalidCiphertextException", "");
    };
    let (name, value) = (&blob[..split], &blob[split + 1..]);
    if body["EncryptionContext"]["keystore:name"]
        .as_str()
        .map(str::as_bytes)
        != Some(name)
    {
        return kms_error(400, "InvalidCiphertextException", "");
    }
    if plaintext {
        return (
            200,
            serde_json::json!({"Plaintext": STANDARD.encode(value), "KeyId": "k"})
                .to_string()
                .into_bytes(),
        );
    }
    let document = STANDARD
        .decode(
            body["Recipient"]["AttestationDocument"]
                .as_str()
                .unwrap_or_default(),
        )
        .unwrap_or_default();
    if body["Recipient"]["KeyEncryptionAlgorithm"] != "RSAES_OAEP_SHA_256" {
        return kms_error(400, "ValidationException", "bad KeyEncryptionAlgorithm");
    }
    let Ok(doc) = AttestationDocument::parse_unverified(&document) else {
        return kms_error(400, "ValidationException", "invalid attestation document");
    };
    let key =
        rsa::PublicKey::from_public_key_der(doc.public_key.as_deref().unwrap_or_default()).unwrap();
    let sealed = keystore_cms::seal_for_recipient(value, &key, &mut rand::rng()).unwrap();
    (
        200,
        serde_json::json!({"CiphertextForRecipient": STANDARD.encode(sealed), "KeyId": "k"})
            .to_string()
            .into_bytes(),
    )
}

/// The fake's ciphertext for `value` under `name`.
pub fn fake_ciphertext(name: &str, value: &[u8]) -> Vec<u8> {
    let mut blob = name.as_bytes().to_vec();
    blob.push(0);
    blob.extend_from_slice(value);
    blob
}

pub type CredentialsAnswer = Arc<dyn Fn(usize) -> Option<ResponseBody> + Send + Sync>;

/// A credentials service on 127.0.0.1 answering `GetCredentials` with
/// `answer(n)` for the n-th request (0-based); `None` means hang.
pub struct CredentialsService {
    pub endpoint: Endpoint,
    pub requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for CredentialsService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CredentialsService {
    pub async fn start(answer: CredentialsAnswer) -> CredentialsService {
        let listener = Endpoint::tcp("127.0.0.1", 0).bind().await.unwrap();
        let endpoint = listener.local_endpoint().clone();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let answer = answer.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut conn = Connection::new(stream);
                    while let Ok(Some(req)) = conn.read_message::<Request>().await {
                        assert_eq!(req.op, RequestOp::GetCredentials);
                        let n = counter.fetch_add(1, Ordering::SeqCst);
                        match answer(n) {
                            Some(body) => {
                                if conn
                                    .write_message(&Response::new(req.id, body))
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                            }
                            None => {
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                            }
                        }
                    }
                });
            }
        });
        CredentialsService {
            endpoint,
            requests,
            task,
        }
    }

    /// Always the same credentials, expiring in an hour.
    pub async fn fixed() -> CredentialsService {
        CredentialsService::start(Arc::new(|_| Some(credentials(ACCESS_KEY, Some(3600))))).await
    }
}

/// A `Credentials` answer expiring `expires_in` seconds from now.
pub fn credentials(access_key: &str, expires_in: Option<i64>) -> ResponseBody {
    let expires_at = expires_in.map(|secs| {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        now.checked_add_signed(secs).unwrap()
    });
    ResponseBody::Credentials(Credentials {
        access_key_id: SecretString::new(access_key.to_owned()),
        secret_access_key: SecretString::new(SECRET_KEY.to_owned()),
        session_token: Some(SecretString::new("session-token".to_owned())),
        expires_at,
    })
}

pub fn refusal(code: ErrorCode, message: &str) -> ResponseBody {
    ResponseBody::Error {
        code,
        message: message.to_owned(),
    }
}

/// A KMS client for the fake/test server at `proxy` with `kms_host` as the
/// TLS name, optionally trusting `ca_pem`.
pub fn kms_config(
    proxy: Endpoint,
    kms_host: &str,
    ca_pem: Option<&str>,
    credentials: Endpoint,
) -> KmsConfig {
    let mut transport = TransportConfig::new(proxy, kms_host);
    transport.extra_ca_pem = ca_pem.map(|p| p.as_bytes().to_vec());
    transport.connect_timeout = Duration::from_secs(5);
    transport.call_timeout = Duration::from_secs(20);
    KmsConfig {
        region: "us-east-1".to_owned(),
        transport,
        credentials: CredentialsConfig::new(credentials),
        operation_timeout: Duration::from_secs(30),
    }
}

pub fn kms(config: KmsConfig) -> Kms {
    Kms::new(config).unwrap()
}

/// The PCR0 the test enclave reports.
pub const TEST_PCR0: [u8; 48] = [0x5a; 48];

/// A mock NSM (fixed PCR0) and a started 2048-bit recipient.
pub async fn recipient(dir: &std::path::Path) -> (Arc<MockNsm>, Recipient, RecipientHandle) {
    let nsm = Arc::new(MockNsm::open_with_pcr0(dir, MockConfig::default(), TEST_PCR0).unwrap());
    let config = RecipientConfig {
        bits: RecipientBits::B2048,
        ..RecipientConfig::default()
    };
    let (recipient, handle) = Recipient::start(nsm.clone(), config).await.unwrap();
    (nsm, recipient, handle)
}

pub fn context(name: &str) -> BTreeMap<String, String> {
    keystore_shared::envelope::encryption_context(name)
}
