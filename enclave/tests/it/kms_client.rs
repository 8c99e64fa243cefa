//! `Kms::decrypt_for_recipient` through the real `aws-sdk-kms` client and
//! our transport, against the KMS emulator (real SigV4, key policies,
//! attestation checks, `CiphertextForRecipient`) behind a local relay.
#![allow(clippy::unwrap_used, missing_docs)]

use crate::support::emulator as emulator_support;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use emulator_support::*;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use keystore_enclave::kms::KmsError;
use keystore_tests::kms::{Fault, Operation};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// An HTTPS server answering every request with one fixed `(status, body)`,
/// for answers the emulator never gives (see each use). It uses a test PKI
/// of its own (same names as the emulator's).
struct Canned {
    port: u16,
    ca_pem: Vec<u8>,
    _dir: tempfile::TempDir,
    task: JoinHandle<()>,
}

impl Drop for Canned {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Canned {
    async fn start(status: u16, body: Vec<u8>) -> Canned {
        let dir = tempfile::tempdir().unwrap();
        let pki = keystore_tests::tls::TestPki::create(dir.path()).unwrap();
        let ca_pem = std::fs::read(pki.ca_pem_path()).unwrap();
        let acceptor = TlsAcceptor::from(pki.server_config().unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let body = Bytes::from(body);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, body) = (acceptor.clone(), body.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |_| {
                        let body = body.clone();
                        async move {
                            hyper::Response::builder()
                                .status(status)
                                .header("content-type", "application/x-amz-json-1.1")
                                .body(Full::new(body))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Canned {
            port,
            ca_pem,
            _dir: dir,
            task,
        }
    }

    fn kms(&self, e: &Emulator) -> keystore_enclave::kms::Kms {
        keystore_enclave::kms::Kms::new(e.kms_config(
            keystore_shared::endpoint::Endpoint::tcp("127.0.0.1", self.port),
            Some(self.ca_pem.clone()),
        ))
        .unwrap()
    }
}

fn kms_error(status: u16, code: &str, message: &str) -> (u16, Vec<u8>) {
    (
        status,
        serde_json::json!({"__type": code, "message": message})
            .to_string()
            .into_bytes(),
    )
}

#[tokio::test]
async fn decrypts_for_the_recipient_and_sends_the_real_request_shape() {
    let e = Emulator::start().await;
    let key = e.key_arn.clone();
    let kms = e.kms();
    let pair = e.recipient.current();
    // KMS refuses an empty plaintext at Encrypt, so no empty value here.
    for value in [&b"hunter2"[..], b"\0", &[0u8, 1, 2, 255][..]] {
        let blob = e.encrypt(&key, "DB_PASSWORD", value).await;
        let got = kms
            .decrypt_for_recipient(&blob, &context("DB_PASSWORD"), &pair)
            .await
            .unwrap();
        assert_eq!(got.as_slice(), value);
    }
    // The emulator checked SigV4 (key, region, service, session token), the
    // target, the Recipient's algorithm and document, and the name context.
    let decrypts = e.fx.kms.calls(Operation::Decrypt);
    assert_eq!(decrypts.calls, 3);
    assert_eq!(decrypts.with_recipient, 3);
    assert_eq!((decrypts.errors, decrypts.plaintext_responses), (0, 0));
    // SNI names the KMS host; one connection for all three calls.
    assert_eq!(e.relay.snis(), [Some(KMS_HOST.to_owned())]);
    assert_eq!(e.relay.accepted(), 1);
    // One TLS handshake and one credentials fetch for all three calls.
    let stats = kms.stats();
    assert_eq!(stats.transport.tls_handshakes, 1);
    assert_eq!(stats.credential_fetches, 1);
}

#[tokio::test]
async fn refuses_an_answer_carrying_plaintext() {
    // The emulator answers a Recipient call only with CiphertextForRecipient.
    let e = Emulator::start().await;
    let body = serde_json::json!({"Plaintext": STANDARD.encode(b"hunter2"), "KeyId": "k"});
    let canned = Canned::start(200, body.to_string().into_bytes()).await;
    let err = canned
        .kms(&e)
        .decrypt_for_recipient(b"blob", &context("A"), &e.recipient.current())
        .await
        .unwrap_err();
    assert!(matches!(err, KmsError::PlaintextInResponse), "{err:?}");
    assert!(!err.is_retryable() && !err.is_attestation_refusal());
    assert!(!format!("{err} {err:?}").contains("hunter2"));
}

#[tokio::test]
async fn a_ciphertext_moved_under_another_name_is_refused() {
    let e = Emulator::start().await;
    let blob = e.encrypt(&e.key_arn.clone(), "A", b"v").await;
    let err = e
        .kms()
        .decrypt_for_recipient(&blob, &context("B"), &e.recipient.current())
        .await
        .unwrap_err();
    assert_eq!(
        err.kms_code().map(|c| c.as_str()),
        Some("InvalidCiphertextException")
    );
    assert!(err.to_string().contains("keystore:name=B"), "{err}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn access_denied_names_the_enclaves_pcr0() {
    let e = Emulator::start().await;
    // The key policy pins another image.
    let other = e.key(&[0x11; 48]);
    let blob = e.encrypt(&other, "A", b"v").await;
    let err = e
        .kms_pinned(&[&other])
        .decrypt_for_recipient(&blob, &context("A"), &e.recipient.current())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("AccessDeniedException"), "{text}");
    assert!(text.contains("is not authorized to perform"), "{text}");
    assert!(
        text.contains(&format!(
            "the key policy does not allow this enclave: PCR0 = {}",
            hex::encode(PCR0)
        )),
        "{text}"
    );
    assert_eq!(err.stage(), "kms");
    assert!(!err.is_retryable() && !err.is_attestation_refusal());
}

#[tokio::test]
async fn classifies_throttling_server_errors_and_attestation_refusals() {
    let e = Emulator::start().await;
    let key = e.key_arn.clone();
    let blob = e.encrypt(&key, "A", b"v").await;
    let check = |err: KmsError, retryable: bool, attestation: bool| {
        assert!(matches!(err, KmsError::Service { .. }), "{err:?}");
        assert_eq!(err.is_retryable(), retryable, "{err}");
        assert_eq!(err.is_attestation_refusal(), attestation, "{err}");
        assert!(!err.to_string().contains("non-200"), "{err}");
    };
    // The emulator's faults: ThrottlingException and KMSInternalException.
    for fault in [Fault::throttle(), Fault::internal_error()] {
        assert!(e.fx.kms.inject(fault.next(1).on(Operation::Decrypt)));
        let err = e
            .kms()
            .decrypt_for_recipient(&blob, &context("A"), &e.recipient.current())
            .await
            .unwrap_err();
        check(err, true, false);
    }
    // A document older than five minutes by the emulator's clock.
    e.fx.kms.advance_clock(Duration::from_secs(6 * 60));
    let err = e
        .kms()
        .decrypt_for_recipient(&blob, &context("A"), &e.recipient.current())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("s old"), "{err}");
    check(err, false, true);

    // The emulator never answers HTML, nor a ValidationException that is
    // not about the document for a well-formed request.
    for ((status, body), retryable) in [
        ((503, b"<html>Service Unavailable</html>".to_vec()), true),
        (
            kms_error(400, "ValidationException", "1 validation error"),
            false,
        ),
    ] {
        let canned = Canned::start(status, body).await;
        let err = canned
            .kms(&e)
            .decrypt_for_recipient(&blob, &context("A"), &e.recipient.current())
            .await
            .unwrap_err();
        check(err, retryable, false);
    }
}

#[tokio::test]
async fn stage_of_tls_proxy_and_credentials_failures() {
    let e = Emulator::start().await;
    let blob = e.encrypt(&e.key_arn.clone(), "A", b"v").await;
    let pair = e.recipient.current();

    // No extra CA: the emulator's certificate is untrusted.
    let untrusted =
        keystore_enclave::kms::Kms::new(e.kms_config(e.relay.endpoint(), None)).unwrap();
    let err = untrusted
        .decrypt_for_recipient(&blob, &context("A"), &pair)
        .await
        .unwrap_err();
    assert_eq!(err.stage(), "tls", "{err:?}");
    assert!(!err.is_retryable());

    // Nothing listens where the proxy should be.
    let no_proxy = keystore_enclave::kms::Kms::new(e.kms_config(
        keystore_shared::endpoint::Endpoint::tcp("127.0.0.1", dead_port()),
        Some(e.ca_pem()),
    ))
    .unwrap();
    let err = no_proxy
        .decrypt_for_recipient(&blob, &context("A"), &pair)
        .await
        .unwrap_err();
    assert_eq!(err.stage(), "proxy-connect", "{err:?}");
    assert!(err.is_retryable());

    // The credentials service refuses.
    let refusing = CredentialsService::start(Arc::new(|_| {
        Some(refusal(
            keystore_shared::protocol::ErrorCode::Denied,
            "no role",
        ))
    }))
    .await;
    let mut config = kms_config(
        e.fx.kms.region(),
        e.relay.endpoint(),
        Some(e.ca_pem()),
        refusing.endpoint.clone(),
    );
    config.pinned_keys = pinned(&[&e.key_arn]);
    let no_creds = keystore_enclave::kms::Kms::new(config).unwrap();
    let err = no_creds
        .decrypt_for_recipient(&blob, &context("A"), &pair)
        .await
        .unwrap_err();
    assert_eq!(err.stage(), "credentials", "{err:?}");
    assert!(err.to_string().starts_with("credentials: "), "{err}");
    // None of these reached KMS.
    assert_eq!(e.fx.kms.calls(Operation::Decrypt).calls, 0);
}

#[tokio::test]
async fn a_blob_for_another_key_fails_at_the_cms_stage() {
    // The emulator always seals for the document's key, and always sends
    // CiphertextForRecipient for a Recipient call: both answers are canned.
    let e = Emulator::start().await;
    let other = rsa::PrivateKey::new(&mut rand::rng(), 2048).unwrap();
    let sealed =
        keystore_cms::seal_for_recipient(b"v", &other.to_public_key(), &mut rand::rng()).unwrap();
    let body =
        serde_json::json!({"CiphertextForRecipient": STANDARD.encode(sealed), "KeyId": e.key_arn});
    let canned = Canned::start(200, body.to_string().into_bytes()).await;
    let err = canned
        .kms(&e)
        .decrypt_for_recipient(b"blob", &context("A"), &e.recipient.current())
        .await
        .unwrap_err();
    assert_eq!(err.stage(), "cms", "{err:?}");

    let body = serde_json::json!({ "KeyId": e.key_arn });
    let canned = Canned::start(200, body.to_string().into_bytes()).await;
    let err = canned
        .kms(&e)
        .decrypt_for_recipient(b"blob", &context("A"), &e.recipient.current())
        .await
        .unwrap_err();
    assert!(
        matches!(err, KmsError::MissingCiphertextForRecipient),
        "{err:?}"
    );
}
