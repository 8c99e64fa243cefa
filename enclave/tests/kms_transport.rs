//! The enclave's KMS transport against a local TLS server: the connector
//! dials `tcp://127.0.0.1:PORT` (standing in for the proxy) while SNI and
//! certificate verification use the KMS host name.
#![allow(clippy::unwrap_used, missing_docs)]

mod kms_support;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use keystore_enclave::kms::KmsError;
use keystore_enclave::kms::transport::{KmsTransport, TransportConfig, TransportError};
use keystore_shared::endpoint::Endpoint;
use kms_support::*;

fn ok_handler() -> Handler {
    Arc::new(|_| (200, b"{}".to_vec()))
}

fn transport(server: &HttpsServer, host: &str, ca: Option<&str>) -> KmsTransport {
    let mut config = TransportConfig::new(server.endpoint(), host);
    config.extra_ca_pem = ca.map(|p| p.as_bytes().to_vec());
    KmsTransport::new(&config).unwrap()
}

fn post(host: &str) -> http::Request<Bytes> {
    http::Request::post(format!("https://{host}/"))
        .header("host", host)
        .body(Bytes::from_static(b"{}"))
        .unwrap()
}

#[tokio::test]
async fn works_with_the_extra_ca_and_names_the_kms_host_in_sni() {
    let tls = TestTls::new(&[KMS_HOST]);
    let server = HttpsServer::start(tls.server.clone(), ok_handler()).await;
    let t = transport(&server, KMS_HOST, Some(&tls.ca_pem));
    let response = t.send(post(KMS_HOST)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.body().as_ref(), b"{}");
    let seen = server.requests();
    assert_eq!(seen.len(), 1);
    // SNI is the KMS host, never the proxy's address.
    assert_eq!(seen[0].sni.as_deref(), Some(KMS_HOST));
    assert_eq!(seen[0].host.as_deref(), Some(KMS_HOST));
}

#[tokio::test]
async fn refuses_an_untrusted_certificate_at_the_tls_stage() {
    let tls = TestTls::new(&[KMS_HOST]);
    let server = HttpsServer::start(tls.server.clone(), ok_handler()).await;
    let t = transport(&server, KMS_HOST, None);
    let err = t.send(post(KMS_HOST)).await.unwrap_err();
    match &err {
        TransportError::Tls {
            host,
            reason,
            certificate_or_protocol,
        } => {
            assert_eq!(host, KMS_HOST);
            assert!(reason.contains("UnknownIssuer"), "{reason}");
            assert!(certificate_or_protocol);
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
    assert!(err.is_tls() && !err.is_retryable());
    assert!(err.to_string().starts_with("TLS: "), "{err}");
    assert!(server.requests().is_empty());
    assert_eq!(t.stats().tls_handshakes, 0);
}

#[tokio::test]
async fn refuses_a_certificate_for_another_name() {
    let tls = TestTls::new(&["other.test.local"]);
    let server = HttpsServer::start(tls.server.clone(), ok_handler()).await;
    let t = transport(&server, KMS_HOST, Some(&tls.ca_pem));
    let err = t.send(post(KMS_HOST)).await.unwrap_err();
    match &err {
        TransportError::Tls { reason, .. } => {
            assert!(reason.contains("not valid for name"), "{reason}")
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
    assert!(server.requests().is_empty());
}

#[tokio::test]
async fn keep_alive_reuses_one_connection() {
    let tls = TestTls::new(&[KMS_HOST]);
    let server = HttpsServer::start(tls.server.clone(), ok_handler()).await;
    let t = transport(&server, KMS_HOST, Some(&tls.ca_pem));
    const CALLS: usize = 10;
    for _ in 0..CALLS {
        assert_eq!(t.send(post(KMS_HOST)).await.unwrap().status(), 200);
    }
    assert_eq!(server.requests().len(), CALLS);
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    let stats = t.stats();
    assert_eq!(stats.connections_opened, 1);
    assert_eq!(stats.tls_handshakes, 1);
    assert_eq!(stats.requests, CALLS as u64);
}

#[tokio::test]
async fn concurrent_calls_open_a_bounded_number_of_connections() {
    let tls = TestTls::new(&[KMS_HOST]);
    let server = HttpsServer::start(tls.server.clone(), ok_handler()).await;
    let t = transport(&server, KMS_HOST, Some(&tls.ca_pem));
    // Four rounds of four concurrent calls: later rounds reuse the pooled
    // connections of the first, so connections stay at most 4 for 16 calls.
    for _ in 0..4 {
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let t = t.clone();
            calls.spawn(async move { t.send(post(KMS_HOST)).await });
        }
        while let Some(r) = calls.join_next().await {
            assert_eq!(r.unwrap().unwrap().status(), 200);
        }
    }
    let accepted = server.accepted.load(Ordering::SeqCst);
    assert!((1..=4).contains(&accepted), "{accepted} connections");
    assert_eq!(server.requests().len(), 16);
}

#[tokio::test]
async fn an_unreachable_proxy_is_a_proxy_connect_error() {
    // Bind and drop to get a port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = TransportConfig::new(Endpoint::tcp("127.0.0.1", port), KMS_HOST);
    let t = KmsTransport::new(&config).unwrap();
    let err = t.send(post(KMS_HOST)).await.unwrap_err();
    assert!(err.is_proxy_connect(), "{err:?}");
    assert!(err.is_retryable());
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

#[tokio::test]
async fn refuses_requests_for_another_host_without_dialing() {
    let tls = TestTls::new(&[KMS_HOST]);
    let server = HttpsServer::start(tls.server.clone(), ok_handler()).await;
    let t = transport(&server, KMS_HOST, Some(&tls.ca_pem));
    for uri in [
        "https://evil.example/",
        "http://kms.test.local/",
        "https://kms.test.local:8443/",
    ] {
        let req = http::Request::post(uri).body(Bytes::new()).unwrap();
        let err = t.send(req).await.unwrap_err();
        assert!(matches!(err, TransportError::Refused(_)), "{uri}: {err:?}");
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn bounds_the_response_size() {
    let tls = TestTls::new(&[KMS_HOST]);
    let server = HttpsServer::start(
        tls.server.clone(),
        Arc::new(|_| (200, vec![b'x'; 64 * 1024])),
    )
    .await;
    let mut config = TransportConfig::new(server.endpoint(), KMS_HOST);
    config.extra_ca_pem = Some(tls.ca_pem.as_bytes().to_vec());
    config.max_response_len = 4096;
    let t = KmsTransport::new(&config).unwrap();
    let err = t.send(post(KMS_HOST)).await.unwrap_err();
    assert!(
        matches!(err, TransportError::ResponseTooLarge { max: 4096, .. }),
        "{err:?}"
    );
}

#[test]
fn refuses_bad_configuration() {
    let proxy = Endpoint::tcp("127.0.0.1", 1);
    for host in ["", "https://kms.test.local", "kms.test.local:443", "kms/x"] {
        let config = TransportConfig::new(proxy.clone(), host);
        assert!(
            matches!(KmsTransport::new(&config), Err(TransportError::Config(_))),
            "{host:?}"
        );
    }
    let mut config = TransportConfig::new(proxy, KMS_HOST);
    config.extra_ca_pem = Some(b"not a certificate".to_vec());
    assert!(matches!(
        KmsTransport::new(&config),
        Err(TransportError::Config(_))
    ));
}

#[test]
fn an_extra_ca_is_refused_unless_the_nsm_is_the_mock() {
    let mut config = keystore_enclave::kms::KmsConfig::new("us-east-1");
    assert_eq!(config.transport.kms_host, "kms.us-east-1.amazonaws.com");
    assert_eq!(config.transport.proxy, Endpoint::vsock(3, 8000));
    assert_eq!(config.credentials.endpoint, Endpoint::vsock(3, 8001));
    config.check_extra_ca(false).unwrap();
    config.transport.extra_ca_pem = Some(TestTls::new(&[KMS_HOST]).ca_pem.into_bytes());
    assert!(matches!(
        config.check_extra_ca(false),
        Err(KmsError::Config(_))
    ));
    config.check_extra_ca(true).unwrap();

    // Kms::new reports unusable settings as the config stage.
    let mut bad_region = keystore_enclave::kms::KmsConfig::new("us-east-1");
    bad_region.region = "US EAST".into();
    let mut bad_ca = keystore_enclave::kms::KmsConfig::new("us-east-1");
    bad_ca.transport.extra_ca_pem = Some(b"garbage".to_vec());
    for config in [bad_region, bad_ca] {
        let err = keystore_enclave::kms::Kms::new(config).unwrap_err();
        assert_eq!(err.stage(), "config", "{err:?}");
    }
}
