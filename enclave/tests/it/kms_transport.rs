//! The enclave's KMS transport against the KMS emulator's TLS server,
//! reached through a local TCP relay standing in for the proxy: the
//! connector dials `tcp://127.0.0.1:PORT` while SNI and certificate
//! verification use the KMS host name (`localhost`, which the emulator's
//! certificate covers).
#![allow(clippy::unwrap_used, missing_docs)]

use crate::support::emulator as emulator_support;

use bytes::Bytes;
use emulator_support::*;
use keystore_enclave::kms::KmsError;
use keystore_enclave::kms::transport::{KmsTransport, TransportConfig, TransportError};
use keystore_shared::endpoint::Endpoint;

/// The emulator behind a relay that records SNI and counts connections.
struct Server {
    fx: Fixture,
    relay: Relay,
}

impl Server {
    async fn start() -> Server {
        let fx = Fixture::start().await;
        let relay = Relay::start(fx.kms.local_addr()).await;
        Server { fx, relay }
    }

    fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.fx.kms.ca_pem_path()).unwrap()
    }

    fn transport(&self, host: &str, trust_ca: bool) -> KmsTransport {
        let mut config = TransportConfig::new(self.relay.endpoint(), host);
        config.extra_ca_pem = trust_ca.then(|| self.ca_pem());
        KmsTransport::new(&config).unwrap()
    }
}

/// The emulator's admin `DELETE faults` answers 200 `{"pending":0}`, a
/// cheap request with a known answer.
fn request(host: &str) -> http::Request<Bytes> {
    http::Request::delete(format!("https://{host}/__admin/faults"))
        .header("host", host)
        .body(Bytes::new())
        .unwrap()
}

const ANSWER: &[u8] = br#"{"pending":0}"#;

#[tokio::test]
async fn works_with_the_extra_ca_and_names_the_kms_host_in_sni() {
    let s = Server::start().await;
    let t = s.transport(KMS_HOST, true);
    let response = t.send(request(KMS_HOST)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.body().as_ref(), ANSWER);
    // SNI is the KMS host, never the proxy's address.
    assert_eq!(s.relay.snis(), [Some(KMS_HOST.to_owned())]);
    assert_eq!(t.stats().requests, 1);
}

#[tokio::test]
async fn refuses_an_untrusted_certificate_at_the_tls_stage() {
    let s = Server::start().await;
    let t = s.transport(KMS_HOST, false);
    let err = t.send(request(KMS_HOST)).await.unwrap_err();
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
    // The connection reached the server but no request was sent on it.
    assert_eq!(s.relay.accepted(), 1);
    assert_eq!(t.stats().tls_handshakes, 0);
}

#[tokio::test]
async fn refuses_a_certificate_for_another_name() {
    // The emulator's certificate covers localhost and 127.0.0.1 only.
    let s = Server::start().await;
    let t = s.transport("kms.test.local", true);
    let err = t.send(request("kms.test.local")).await.unwrap_err();
    match &err {
        TransportError::Tls { reason, .. } => {
            assert!(reason.contains("not valid for name"), "{reason}")
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
    assert_eq!(s.relay.snis(), [Some("kms.test.local".to_owned())]);
    assert_eq!(t.stats().tls_handshakes, 0);
}

#[tokio::test]
async fn keep_alive_reuses_one_connection() {
    let s = Server::start().await;
    let t = s.transport(KMS_HOST, true);
    const CALLS: usize = 10;
    for _ in 0..CALLS {
        let response = t.send(request(KMS_HOST)).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.body().as_ref(), ANSWER);
    }
    assert_eq!(s.relay.accepted(), 1);
    let stats = t.stats();
    assert_eq!(stats.connections_opened, 1);
    assert_eq!(stats.tls_handshakes, 1);
    assert_eq!(stats.requests, CALLS as u64);
}

#[tokio::test]
async fn concurrent_calls_open_a_bounded_number_of_connections() {
    let s = Server::start().await;
    let t = s.transport(KMS_HOST, true);
    // Four rounds of four concurrent calls: later rounds reuse the pooled
    // connections of the first, so connections stay at most 4 for 16 calls.
    for _ in 0..4 {
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let t = t.clone();
            calls.spawn(async move { t.send(request(KMS_HOST)).await });
        }
        while let Some(r) = calls.join_next().await {
            assert_eq!(r.unwrap().unwrap().status(), 200);
        }
    }
    let accepted = s.relay.accepted();
    assert!((1..=4).contains(&accepted), "{accepted} connections");
    assert_eq!(t.stats().requests, 16);
}

#[tokio::test]
async fn an_unreachable_proxy_is_a_proxy_connect_error() {
    let port = dead_port();
    let config = TransportConfig::new(Endpoint::tcp("127.0.0.1", port), KMS_HOST);
    let t = KmsTransport::new(&config).unwrap();
    let err = t.send(request(KMS_HOST)).await.unwrap_err();
    assert!(err.is_proxy_connect(), "{err:?}");
    assert!(err.is_retryable());
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

#[tokio::test]
async fn refuses_requests_for_another_host_without_dialing() {
    let s = Server::start().await;
    let t = s.transport(KMS_HOST, true);
    for uri in [
        "https://evil.example/",
        "http://localhost/",
        "https://localhost:8443/",
    ] {
        let req = http::Request::post(uri).body(Bytes::new()).unwrap();
        let err = t.send(req).await.unwrap_err();
        assert!(matches!(err, TransportError::Refused(_)), "{uri}: {err:?}");
    }
    assert_eq!(s.relay.accepted(), 0);
}

#[tokio::test]
async fn bounds_the_response_size() {
    let s = Server::start().await;
    let mut config = TransportConfig::new(s.relay.endpoint(), KMS_HOST);
    config.extra_ca_pem = Some(s.ca_pem());
    // Smaller than the emulator's answer.
    config.max_response_len = ANSWER.len() - 1;
    let t = KmsTransport::new(&config).unwrap();
    let err = t.send(request(KMS_HOST)).await.unwrap_err();
    let max = ANSWER.len() - 1;
    assert!(
        matches!(err, TransportError::ResponseTooLarge { max: m, .. } if m == max),
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
    assert_eq!(config.transport.proxy, Endpoint::vsock(3, 800));
    assert_eq!(config.credentials.endpoint, Endpoint::vsock(3, 801));
    config.check_extra_ca(false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki = keystore_tests::tls::TestPki::create(dir.path()).unwrap();
    config.transport.extra_ca_pem = Some(std::fs::read(pki.ca_pem_path()).unwrap());
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
    // A pinned key of another region could only ever fail.
    let key_elsewhere = keystore_enclave::kms::KmsConfig::new("us-east-1").with_pinned_keys(
        keystore_enclave::kms::PinnedKeys::parse([
            "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        ])
        .unwrap(),
    );
    let err = keystore_enclave::kms::Kms::new(key_elsewhere.clone()).unwrap_err();
    assert!(err.to_string().contains("is in region eu-west-1"), "{err}");
    for config in [bad_region, bad_ca, key_elsewhere] {
        let err = keystore_enclave::kms::Kms::new(config).unwrap_err();
        assert_eq!(err.stage(), "config", "{err:?}");
    }
}
