//! The KMS emulator's SigV4 checks, credential rotation, fault injection,
//! call counters, admin endpoint and robustness against malformed input.

use keystore_tests::fixture as kms_support;

use std::time::{Duration, Instant, SystemTime};

use aws_sdk_kms::config::Credentials;
use aws_sdk_kms::config::retry::RetryConfig;
use aws_sdk_kms::error::SdkError;
use aws_sdk_kms::primitives::Blob;
use keystore_tests::kms::{Credential, Fault, Operation};
use kms_support::{
    ACCESS_KEY_ID, Fixture, SECRET_ACCESS_KEY, encrypt_blob, error_code, error_message,
    raw_request, signed_headers,
};

fn creds(id: &str, secret: &str, token: Option<&str>) -> Credentials {
    Credentials::new(id, secret, token.map(str::to_owned), None, "test")
}

fn fast_retries(attempts: u32) -> RetryConfig {
    RetryConfig::standard()
        .with_max_attempts(attempts)
        .with_initial_backoff(Duration::from_millis(5))
        .with_max_backoff(Duration::from_millis(20))
}

#[tokio::test]
async fn sigv4_wrong_secret_unknown_key_and_skew() {
    let fx = Fixture::start().await;
    let wrong_secret = fx.client_with(
        creds(ACCESS_KEY_ID, "not-the-secret", None),
        RetryConfig::disabled(),
    );
    let err = wrong_secret
        .create_key()
        .send()
        .await
        .expect_err("wrong secret");
    assert_eq!(error_code(&err), "InvalidSignatureException");
    assert!(error_message(&err).contains("signature we calculated does not match"));

    let unknown = fx.client_with(
        creds("AKIAUNKNOWN000000000", SECRET_ACCESS_KEY, None),
        RetryConfig::disabled(),
    );
    let err = unknown.create_key().send().await.expect_err("unknown key");
    assert_eq!(error_code(&err), "UnrecognizedClientException");

    // A session token the credential does not have is refused.
    let stray_token = fx.client_with(
        creds(ACCESS_KEY_ID, SECRET_ACCESS_KEY, Some("tok")),
        RetryConfig::disabled(),
    );
    let err = stray_token
        .create_key()
        .send()
        .await
        .expect_err("stray token");
    assert_eq!(error_code(&err), "UnrecognizedClientException");

    fx.client()
        .create_key()
        .send()
        .await
        .expect("right credentials");

    // 20 minutes of clock skew: the signature is too old.
    fx.kms.advance_clock(Duration::from_secs(20 * 60));
    let err = fx.client().create_key().send().await.expect_err("skewed");
    assert_eq!(error_code(&err), "InvalidSignatureException");
    assert!(
        error_message(&err).contains("Signature expired"),
        "{}",
        error_message(&err)
    );
    fx.kms.reset_clock();
    fx.client().create_key().send().await.expect("clock back");
    // Only the two good requests created keys.
    let c = fx.kms.calls(Operation::CreateKey);
    assert_eq!((c.calls, c.errors), (6, 4));
}

#[tokio::test]
async fn session_tokens_expire() {
    let fx = Fixture::start().await;
    let expires = SystemTime::now() + Duration::from_secs(60);
    fx.kms.add_credential(
        Credential::new("ASIATEMPORARY0000001", "temp-secret")
            .with_session_token("session-1", Some(expires)),
    );
    let temp = fx.client_with(
        creds("ASIATEMPORARY0000001", "temp-secret", Some("session-1")),
        RetryConfig::disabled(),
    );
    temp.create_key().send().await.expect("valid session");

    let wrong_token = fx.client_with(
        creds("ASIATEMPORARY0000001", "temp-secret", Some("session-2")),
        RetryConfig::disabled(),
    );
    let err = wrong_token
        .create_key()
        .send()
        .await
        .expect_err("wrong token");
    assert_eq!(error_code(&err), "UnrecognizedClientException");
    let no_token = fx.client_with(
        creds("ASIATEMPORARY0000001", "temp-secret", None),
        RetryConfig::disabled(),
    );
    let err = no_token.create_key().send().await.expect_err("no token");
    assert_eq!(error_code(&err), "UnrecognizedClientException");

    fx.kms.advance_clock(Duration::from_secs(2 * 60));
    let err = temp.create_key().send().await.expect_err("expired");
    assert_eq!(error_code(&err), "ExpiredTokenException");
    // Long-term credentials are unaffected by the clock.
    fx.client()
        .create_key()
        .send()
        .await
        .expect("long-term key");
}

#[tokio::test]
async fn credentials_rotate_through_the_api_and_the_admin_endpoint() {
    let fx = Fixture::start().await;
    let old = fx.client();
    old.create_key().send().await.expect("old credentials");

    fx.kms
        .set_credentials([Credential::new("AKIAROTATED000000001", "rotated-secret")]);
    let err = old
        .create_key()
        .send()
        .await
        .expect_err("old key after rotation");
    assert_eq!(error_code(&err), "UnrecognizedClientException");
    let new = fx.client_with(
        creds("AKIAROTATED000000001", "rotated-secret", None),
        RetryConfig::disabled(),
    );
    new.create_key().send().await.expect("rotated credentials");

    // Rotate back over the admin endpoint.
    let body = serde_json::json!({
        "replace": true,
        "credentials": [{"access_key_id": ACCESS_KEY_ID, "secret_access_key": SECRET_ACCESS_KEY}]
    })
    .to_string();
    let r = raw_request(
        &fx.kms,
        "POST",
        "/__admin/credentials",
        &[],
        body.as_bytes(),
    )
    .await
    .expect("answer");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    old.create_key().send().await.expect("restored credentials");
    let err = new.create_key().send().await.expect_err("rotated out");
    assert_eq!(error_code(&err), "UnrecognizedClientException");
}

#[tokio::test]
async fn throttling_for_two_calls_then_success_with_sdk_retries() {
    let fx = Fixture::start().await;
    let key_id = fx.kms.create_key(None).expect("key").key_id;
    let blob = encrypt_blob(&fx.client(), &key_id, b"v").await;

    assert!(
        fx.kms
            .inject(Fault::throttle().next(2).on(Operation::Decrypt))
    );
    let retrying = fx.client_with(
        creds(ACCESS_KEY_ID, SECRET_ACCESS_KEY, None),
        fast_retries(3),
    );
    // Encrypt is not affected by a Decrypt fault.
    retrying
        .encrypt()
        .key_id(&key_id)
        .plaintext(Blob::new(b"w".to_vec()))
        .send()
        .await
        .expect("Encrypt");
    let out = retrying
        .decrypt()
        .ciphertext_blob(blob.clone())
        .send()
        .await
        .expect("third attempt succeeds");
    assert_eq!(out.plaintext().expect("plaintext").as_ref(), b"v");
    let d = fx.kms.calls(Operation::Decrypt);
    assert_eq!(
        (d.calls, d.faulted, d.errors, d.plaintext_responses),
        (3, 2, 2, 1)
    );
    assert_eq!(fx.kms.pending_faults(), 0);

    // Without retries the client sees ThrottlingException itself.
    fx.kms.inject(Fault::throttle());
    let err = fx
        .client()
        .decrypt()
        .ciphertext_blob(blob)
        .send()
        .await
        .expect_err("throttled");
    assert_eq!(error_code(&err), "ThrottlingException");
    assert_eq!(err.raw_response().expect("raw").status().as_u16(), 400);
}

#[tokio::test]
async fn internal_errors_dropped_connections_and_latency() {
    let fx = Fixture::start().await;
    let kms = fx.client();

    fx.kms
        .inject(Fault::internal_error().on(Operation::CreateKey));
    let err = kms.create_key().send().await.expect_err("5xx");
    assert_eq!(error_code(&err), "KMSInternalException");
    assert_eq!(err.raw_response().expect("raw").status().as_u16(), 500);
    kms.create_key().send().await.expect("fault consumed");

    fx.kms.inject(Fault::drop_connection());
    let err = kms.create_key().send().await.expect_err("dropped");
    assert!(matches!(err, SdkError::DispatchFailure(_)), "{err:?}");
    kms.create_key().send().await.expect("server still up");
    // With retries the SDK gets through a dropped connection.
    fx.kms.inject(Fault::drop_connection());
    let retrying = fx.client_with(
        creds(ACCESS_KEY_ID, SECRET_ACCESS_KEY, None),
        fast_retries(2),
    );
    retrying
        .create_key()
        .send()
        .await
        .expect("retried after drop");

    fx.kms.inject(Fault::latency(Duration::from_millis(400)));
    let started = Instant::now();
    kms.create_key().send().await.expect("slow");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    let started = Instant::now();
    kms.create_key().send().await.expect("fast again");
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );

    let c = fx.kms.calls(Operation::CreateKey);
    assert_eq!((c.calls, c.faulted, c.errors), (8, 3, 1));
}

#[tokio::test]
async fn fractions_of_calls() {
    let fx = Fixture::start().await;
    let kms = fx.client();
    let key_id = fx.kms.create_key(None).expect("key").key_id;
    fx.kms
        .inject(Fault::throttle().fraction(1.0).on(Operation::Encrypt));
    for _ in 0..3 {
        let err = kms
            .encrypt()
            .key_id(&key_id)
            .plaintext(Blob::new(b"x".to_vec()))
            .send()
            .await
            .expect_err("always throttled");
        assert_eq!(error_code(&err), "ThrottlingException");
    }
    kms.describe_key()
        .key_id(&key_id)
        .send()
        .await
        .expect("other operation");
    assert_eq!(
        fx.kms.pending_faults(),
        1,
        "fraction faults stay until cleared"
    );
    fx.kms.clear_faults();
    kms.encrypt()
        .key_id(&key_id)
        .plaintext(Blob::new(b"x".to_vec()))
        .send()
        .await
        .expect("cleared");
}

#[tokio::test]
async fn admin_endpoint_faults_calls_and_clock() {
    let fx = Fixture::start().await;
    let kms = fx.client();

    let fault = br#"{"kind":"throttle","operation":"CreateKey","next":1}"#;
    let r = raw_request(&fx.kms, "POST", "/__admin/faults", &[], fault)
        .await
        .expect("answer");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["pending"], 1);
    let err = kms.create_key().send().await.expect_err("admin fault");
    assert_eq!(error_code(&err), "ThrottlingException");
    kms.create_key().send().await.expect("consumed");

    for bad in [
        &br#"{"kind":"explode"}"#[..],
        br#"{"kind":"latency"}"#,
        br#"{"kind":"throttle","next":1,"fraction":0.5}"#,
        br#"{"kind":"throttle","operation":"Nope"}"#,
        br#"{"kind":"throttle","fraction":2}"#,
        b"not json",
    ] {
        let r = raw_request(&fx.kms, "POST", "/__admin/faults", &[], bad)
            .await
            .expect("answer");
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(bad));
    }
    assert_eq!(fx.kms.pending_faults(), 0);

    let r = raw_request(
        &fx.kms,
        "POST",
        "/__admin/faults",
        &[],
        br#"{"kind":"latency","latency_ms":50,"fraction":1.0}"#,
    )
    .await
    .expect("answer");
    assert_eq!(r.status, 200);
    let r = raw_request(&fx.kms, "DELETE", "/__admin/faults", &[], b"")
        .await
        .expect("answer");
    assert_eq!(r.json()["pending"], 0);

    let r = raw_request(&fx.kms, "GET", "/__admin/calls", &[], b"")
        .await
        .expect("answer");
    let calls = r.json();
    assert_eq!(calls["CreateKey"]["calls"], 2);
    assert_eq!(calls["CreateKey"]["faulted"], 1);
    assert_eq!(calls["CreateKey"]["with_recipient"], 0);

    // Advance the clock over HTTP: signatures now look 16 minutes old.
    let r = raw_request(
        &fx.kms,
        "POST",
        "/__admin/clock",
        &[],
        br#"{"advance_ms":960000}"#,
    )
    .await
    .expect("answer");
    assert_eq!(r.json()["offset_ms"], 960_000);
    let err = kms.create_key().send().await.expect_err("skew");
    assert_eq!(error_code(&err), "InvalidSignatureException");
    raw_request(&fx.kms, "POST", "/__admin/clock", &[], br#"{"reset":true}"#)
        .await
        .expect("answer");
    kms.create_key().send().await.expect("clock reset");

    let r = raw_request(&fx.kms, "DELETE", "/__admin/calls", &[], b"")
        .await
        .expect("answer");
    assert_eq!(r.status, 200);
    assert_eq!(fx.kms.calls(Operation::CreateKey).calls, 0);
    let r = raw_request(&fx.kms, "GET", "/__admin/nothing", &[], b"")
        .await
        .expect("answer");
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn malformed_requests_get_kms_errors_and_never_crash_the_server() {
    let fx = Fixture::start().await;
    let key_id = fx.kms.create_key(None).expect("key").key_id;

    // No signature at all.
    let r = raw_request(
        &fx.kms,
        "POST",
        "/",
        &[("x-amz-target".into(), "TrentService.CreateKey".into())],
        b"{}",
    )
    .await
    .expect("answer");
    assert_eq!(
        (r.status, r.error_type().as_str()),
        (400, "MissingAuthenticationTokenException")
    );
    // Garbage Authorization header.
    let r = raw_request(
        &fx.kms,
        "POST",
        "/",
        &[
            ("x-amz-target".into(), "TrentService.CreateKey".into()),
            ("authorization".into(), "AWS4-HMAC-SHA256 nonsense".into()),
            ("x-amz-date".into(), "20260101T000000Z".into()),
        ],
        b"{}",
    )
    .await
    .expect("answer");
    assert_eq!(
        (r.status, r.error_type().as_str()),
        (400, "IncompleteSignatureException")
    );
    // Unknown operation.
    let r = raw_request(
        &fx.kms,
        "POST",
        "/",
        &[(
            "x-amz-target".into(),
            "TrentService.DeleteEverything".into(),
        )],
        b"{}",
    )
    .await
    .expect("answer");
    assert_eq!(
        (r.status, r.error_type().as_str()),
        (400, "UnknownOperationException")
    );
    assert!(
        r.head
            .to_ascii_lowercase()
            .contains("x-amzn-errortype: unknownoperationexception")
    );

    // Correctly signed but malformed bodies.
    let decrypt = "TrentService.Decrypt";
    let cases: &[(&str, &[u8], &str)] = &[
        (decrypt, b"not json", "SerializationException"),
        (decrypt, b"[1,2,3]", "SerializationException"),
        (
            decrypt,
            br#"{"CiphertextBlob": "!!!not base64!!!"}"#,
            "SerializationException",
        ),
        (
            decrypt,
            br#"{"CiphertextBlob": 12}"#,
            "SerializationException",
        ),
        (
            decrypt,
            br#"{"CiphertextBlob": "AAAA"}"#,
            "InvalidCiphertextException",
        ),
        (
            decrypt,
            br#"{"CiphertextBlob": "TUtNUwE="}"#,
            "InvalidCiphertextException",
        ),
        (
            decrypt,
            br#"{"CiphertextBlob": "AAAA", "EncryptionContext": {"a": 1}}"#,
            "SerializationException",
        ),
        (
            decrypt,
            br#"{"CiphertextBlob": "AAAA", "Recipient": {"AttestationDocument": "AAAA"}}"#,
            "InvalidCiphertextException",
        ),
        (
            "TrentService.Encrypt",
            br#"{"KeyId": "x"}"#,
            "SerializationException",
        ),
        (
            "TrentService.Encrypt",
            br#"{"KeyId": "alias/none", "Plaintext": "eA=="}"#,
            "NotFoundException",
        ),
        (
            "TrentService.CreateKey",
            br#"{"KeySpec": "RSA_4096"}"#,
            "UnsupportedOperationException",
        ),
        (
            "TrentService.CreateAlias",
            br#"{"AliasName": "alias/aws/x", "TargetKeyId": "k"}"#,
            "InvalidAliasNameException",
        ),
        (
            "TrentService.PutKeyPolicy",
            br#"{"KeyId": "k", "Policy": "{}", "PolicyName": "other"}"#,
            "ValidationException",
        ),
    ];
    for (target, body, expected) in cases {
        let headers = signed_headers(&fx.kms, target, body, SECRET_ACCESS_KEY);
        let r = raw_request(&fx.kms, "POST", "/", &headers, body)
            .await
            .expect("answer");
        assert_eq!(
            (r.status, r.error_type()),
            (400, (*expected).to_owned()),
            "{target} {}",
            String::from_utf8_lossy(body)
        );
    }
    // Recipient with a garbage document on a real blob: ValidationException.
    let blob = encrypt_blob(&fx.client(), &key_id, b"x").await;
    use base64::Engine;
    let body = serde_json::json!({
        "CiphertextBlob": base64::engine::general_purpose::STANDARD.encode(blob.as_ref()),
        "Recipient": {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": "AAAA"}
    })
    .to_string();
    let headers = signed_headers(&fx.kms, decrypt, body.as_bytes(), SECRET_ACCESS_KEY);
    let r = raw_request(&fx.kms, "POST", "/", &headers, body.as_bytes())
        .await
        .expect("answer");
    assert_eq!(
        (r.status, r.error_type().as_str()),
        (400, "ValidationException")
    );
    assert!(r.json().get("Plaintext").is_none());

    // A signed body that was changed after signing.
    let headers = signed_headers(&fx.kms, decrypt, b"{}", SECRET_ACCESS_KEY);
    let r = raw_request(&fx.kms, "POST", "/", &headers, b"{ }")
        .await
        .expect("answer");
    assert_eq!(r.error_type(), "InvalidSignatureException");

    // Oversized body: refused before it is read.
    let huge = vec![b'x'; 2 * 1024 * 1024];
    let r = raw_request(
        &fx.kms,
        "POST",
        "/",
        &[("x-amz-target".into(), decrypt.into())],
        &huge,
    )
    .await
    .expect("answer");
    assert_eq!(
        (r.status, r.error_type().as_str()),
        (400, "ValidationException")
    );
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap_or_default()
            .contains("exceeds")
    );

    // The server is still healthy.
    fx.client()
        .describe_key()
        .key_id(&key_id)
        .send()
        .await
        .expect("alive");
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let fx = Fixture::start().await;
    let kms = fx.client();
    kms.create_key().send().await.expect("up");
    let addr = fx.kms.local_addr();
    let Fixture {
        kms: handle,
        nsm: _nsm,
        dir: _dir,
    } = fx;
    tokio::time::timeout(Duration::from_secs(10), handle.shutdown())
        .await
        .expect("shutdown in time");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "still listening"
    );
}
