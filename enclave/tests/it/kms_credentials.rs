//! The credentials-service client against a scripted credentials service
//! (the protocol peer): fetch over `frame::Connection`, cache
//! until shortly before expiry, refresh, and stage-named errors.
#![allow(clippy::unwrap_used, missing_docs)]

use crate::support::emulator as emulator_support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use aws_credential_types::provider::ProvideCredentials;
use emulator_support::*;
use keystore_enclave::kms::credentials::{
    CredentialsConfig, CredentialsError, CredentialsProvider,
};
use keystore_shared::endpoint::Endpoint;
use keystore_shared::protocol::{ErrorCode, ResponseBody};

fn provider(service: &CredentialsService) -> CredentialsProvider {
    CredentialsProvider::new(CredentialsConfig::new(service.endpoint.clone()))
}

#[tokio::test]
async fn fetches_once_and_caches_until_near_expiry() {
    let service = CredentialsService::fixed().await;
    let p = provider(&service);
    for _ in 0..3 {
        let c = p.credentials().await.unwrap();
        assert_eq!(c.access_key_id(), ACCESS_KEY);
        assert_eq!(c.secret_access_key(), SECRET_KEY);
        assert_eq!(c.session_token(), Some("session-token"));
        assert!(c.expiry().is_some());
    }
    // Through the SDK's trait too.
    let c = p.provide_credentials().await.unwrap();
    assert_eq!(c.access_key_id(), ACCESS_KEY);
    assert_eq!(service.requests.load(Ordering::SeqCst), 1);
    assert_eq!(p.fetches(), 1);
}

#[tokio::test]
async fn refreshes_credentials_inside_the_refresh_window() {
    // Credentials expire in 10 minutes; with a 15-minute refresh margin each
    // use refreshes, and picks up the rotated key.
    let service = CredentialsService::start(Arc::new(|n| {
        Some(credentials(&format!("AKIDROTATED{n}"), Some(600)))
    }))
    .await;
    let mut config = CredentialsConfig::new(service.endpoint.clone());
    config.refresh_before = Duration::from_secs(15 * 60);
    let p = CredentialsProvider::new(config);
    assert_eq!(
        p.credentials().await.unwrap().access_key_id(),
        "AKIDROTATED0"
    );
    assert_eq!(
        p.credentials().await.unwrap().access_key_id(),
        "AKIDROTATED1"
    );
    assert_eq!(service.requests.load(Ordering::SeqCst), 2);

    // With the default 5-minute margin the same credentials are cached.
    let p = provider(&service);
    let first = p.credentials().await.unwrap();
    let second = p.credentials().await.unwrap();
    assert_eq!(first.access_key_id(), second.access_key_id());
    assert_eq!(service.requests.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_failed_refresh_keeps_unexpired_credentials() {
    let service = CredentialsService::start(Arc::new(|n| {
        if n == 0 {
            Some(credentials(ACCESS_KEY, Some(600)))
        } else {
            Some(refusal(ErrorCode::Unavailable, "IMDS unreachable"))
        }
    }))
    .await;
    let mut config = CredentialsConfig::new(service.endpoint.clone());
    config.refresh_before = Duration::from_secs(15 * 60);
    let p = CredentialsProvider::new(config);
    p.credentials().await.unwrap();
    let again = p.credentials().await.unwrap();
    assert_eq!(again.access_key_id(), ACCESS_KEY);
    assert_eq!(service.requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_error_answer_names_the_credentials_stage() {
    let service = CredentialsService::start(Arc::new(|_| {
        Some(refusal(ErrorCode::Unavailable, "IMDS unreachable"))
    }))
    .await;
    let err = provider(&service).credentials().await.unwrap_err();
    match &err {
        CredentialsError::Refused { code, message } => {
            assert_eq!(*code, ErrorCode::Unavailable);
            assert_eq!(message, "IMDS unreachable");
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    assert!(err.is_retryable());
    assert!(err.to_string().starts_with("credentials: "), "{err}");

    let service = CredentialsService::start(Arc::new(|_| {
        Some(refusal(ErrorCode::Denied, "no instance role"))
    }))
    .await;
    let err = provider(&service).credentials().await.unwrap_err();
    assert!(!err.is_retryable(), "{err}");
}

#[tokio::test]
async fn refuses_unusable_credentials_without_echoing_them() {
    let expired =
        CredentialsService::start(Arc::new(|_| Some(credentials(ACCESS_KEY, Some(-60))))).await;
    let err = provider(&expired).credentials().await.unwrap_err();
    assert!(matches!(err, CredentialsError::Invalid(_)), "{err:?}");

    let bad = CredentialsService::start(Arc::new(|_| {
        let ResponseBody::Credentials(mut c) = credentials(ACCESS_KEY, None) else {
            unreachable!()
        };
        c.expires_at = Some(u64::MAX);
        Some(ResponseBody::Credentials(c))
    }))
    .await;
    let err = provider(&bad).credentials().await.unwrap_err();
    assert!(matches!(err, CredentialsError::Invalid(_)), "{err:?}");
    let text = format!("{err} {err:?}");
    assert!(!text.contains(SECRET_KEY), "{text}");

    let wrong =
        CredentialsService::start(Arc::new(|_| Some(ResponseBody::Loaded { count: 1 }))).await;
    let err = provider(&wrong).credentials().await.unwrap_err();
    assert!(matches!(err, CredentialsError::Unexpected(_)), "{err:?}");
}

#[tokio::test]
async fn unreachable_and_silent_services_fail_in_bounded_time() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let endpoint = Endpoint::tcp("127.0.0.1", port);
    let err = CredentialsProvider::new(CredentialsConfig::new(endpoint))
        .credentials()
        .await
        .unwrap_err();
    assert!(matches!(err, CredentialsError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains(&port.to_string()));
    assert!(err.is_retryable());

    let silent = CredentialsService::start(Arc::new(|_| None)).await;
    let mut config = CredentialsConfig::new(silent.endpoint.clone());
    config.fetch_timeout = Duration::from_millis(300);
    let err = CredentialsProvider::new(config)
        .credentials()
        .await
        .unwrap_err();
    assert!(matches!(err, CredentialsError::Timeout { .. }), "{err:?}");
}

#[tokio::test]
async fn debug_output_never_shows_credentials() {
    let service = CredentialsService::fixed().await;
    let p = provider(&service);
    let c = p.credentials().await.unwrap();
    let text = format!("{p:?} {c:?}");
    assert!(!text.contains(SECRET_KEY), "{text}");
    assert!(!text.contains("session-token"), "{text}");
}
