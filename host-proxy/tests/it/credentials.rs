//! The credentials service over a local socket with injected providers.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, future};
use keystore_host::proxy::credentials::{CredentialCache, CredentialsService, ServiceLimits};
use keystore_shared::endpoint::{Endpoint, Stream};
use keystore_shared::frame::Connection;
use keystore_shared::protocol::{ErrorCode, Request, RequestOp, Response, ResponseBody};
use tokio::io::AsyncWriteExt;

const ACCESS_KEY: &str = "AKIDEXAMPLEACCESS";
const SECRET_KEY: &str = "wJalrXUtnFEMI-very-secret";
const TOKEN: &str = "session-token-secret-material";
const WAIT: Duration = Duration::from_secs(10);

/// 2033-05-18T03:33:20Z.
fn far_expiry() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(2_000_000_000)
}

async fn start(cache: CredentialCache) -> Endpoint {
    let listener = Endpoint::tcp("127.0.0.1", 0).bind().await.unwrap();
    let at = listener.local_endpoint().clone();
    let service = CredentialsService::new(cache, ServiceLimits::default());
    tokio::spawn(service.serve(listener, std::future::pending()));
    at
}

async fn ask(conn: &mut Connection<Stream>, id: u64, op: RequestOp) -> Response {
    tokio::time::timeout(WAIT, async {
        conn.write_message(&Request::new(id, op)).await.unwrap();
        conn.read_message::<Response>().await.unwrap().unwrap()
    })
    .await
    .expect("answer in time")
}

fn static_creds(expiry: Option<SystemTime>) -> aws_credential_types::Credentials {
    aws_credential_types::Credentials::new(
        ACCESS_KEY,
        SECRET_KEY,
        Some(TOKEN.to_owned()),
        expiry,
        "test",
    )
}

#[tokio::test]
async fn a_client_gets_the_static_credentials_and_debug_hides_them() {
    let at = start(CredentialCache::new(static_creds(Some(far_expiry())))).await;
    let mut conn = Connection::new(at.connect().await.unwrap());
    let response = ask(&mut conn, 7, RequestOp::GetCredentials).await;
    assert_eq!(response.id, 7);
    let debug = format!("{response:?}");
    let ResponseBody::Credentials(creds) = response.result else {
        panic!("expected credentials, got {debug}");
    };
    assert_eq!(creds.access_key_id.expose(), ACCESS_KEY);
    assert_eq!(creds.secret_access_key.expose(), SECRET_KEY);
    assert_eq!(creds.session_token.as_ref().unwrap().expose(), TOKEN);
    assert_eq!(creds.expires_at, Some(2_000_000_000));
    for secret in [ACCESS_KEY, SECRET_KEY, TOKEN, "2000000000"] {
        assert!(!debug.contains(secret), "Debug shows {secret}: {debug}");
    }
    let cache_debug = format!(
        "{:?}",
        CredentialCache::new(static_creds(Some(far_expiry())))
    );
    assert!(!cache_debug.contains(SECRET_KEY), "{cache_debug}");

    // Long-term credentials have no token or expiry.
    let at = start(CredentialCache::new(
        aws_credential_types::Credentials::new(ACCESS_KEY, SECRET_KEY, None, None, "test"),
    ))
    .await;
    let mut conn = Connection::new(at.connect().await.unwrap());
    let ResponseBody::Credentials(creds) =
        ask(&mut conn, 1, RequestOp::GetCredentials).await.result
    else {
        panic!("expected credentials");
    };
    assert!(creds.session_token.is_none() && creds.expires_at.is_none());
}

#[tokio::test]
async fn other_operations_are_refused_and_the_connection_stays_usable() {
    let at = start(CredentialCache::new(static_creds(None))).await;
    let mut conn = Connection::new(at.connect().await.unwrap());
    for op in [
        RequestOp::List,
        RequestOp::Get { name: "X".into() },
        RequestOp::Load { entries: vec![] },
    ] {
        let response = ask(&mut conn, 3, op).await;
        assert!(
            matches!(
                &response.result,
                ResponseBody::Error { code: ErrorCode::BadRequest, message } if message.contains("only GetCredentials")
            ),
            "{response:?}"
        );
    }
    // Another protocol version is refused too.
    conn.write_message(&Request {
        id: 4,
        v: 99,
        op: RequestOp::GetCredentials,
        caller: None,
    })
    .await
    .unwrap();
    let response: Response = conn.read_message().await.unwrap().unwrap();
    assert!(matches!(
        response.result,
        ResponseBody::Error {
            code: ErrorCode::BadRequest,
            ..
        }
    ));
    // A body that is not a request: answered, and the next frame still works.
    let stream = conn.get_mut();
    stream.write_all(&[0, 0, 0, 2, 0xa0, 0xff]).await.unwrap();
    let response: Response = conn.read_message().await.unwrap().unwrap();
    assert!(matches!(
        response.result,
        ResponseBody::Error {
            code: ErrorCode::BadRequest,
            ..
        }
    ));
    let response = ask(&mut conn, 5, RequestOp::GetCredentials).await;
    assert!(matches!(response.result, ResponseBody::Credentials(_)));
}

/// A provider that counts calls and answers from a closure.
struct Scripted<F> {
    calls: Arc<AtomicUsize>,
    answer: F,
}

impl<F> std::fmt::Debug for Scripted<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scripted")
    }
}

impl<F> ProvideCredentials for Scripted<F>
where
    F: Fn(usize) -> Result<aws_credential_types::Credentials, CredentialsError> + Send + Sync,
{
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        future::ProvideCredentials::ready((self.answer)(n))
    }
}

#[tokio::test]
async fn provider_errors_are_unavailable_without_details() {
    let calls = Arc::new(AtomicUsize::new(0));
    let provider = Scripted {
        calls: calls.clone(),
        answer: |_| {
            Err(CredentialsError::not_loaded(format!(
                "secret detail {SECRET_KEY}"
            )))
        },
    };
    let at = start(CredentialCache::new(provider)).await;
    let mut conn = Connection::new(at.connect().await.unwrap());
    let response = ask(&mut conn, 9, RequestOp::GetCredentials).await;
    let ResponseBody::Error { code, message } = &response.result else {
        panic!("expected an error, got {response:?}");
    };
    assert_eq!(*code, ErrorCode::Unavailable);
    assert!(message.contains("no AWS credentials found"), "{message}");
    assert!(!message.contains(SECRET_KEY), "{message}");
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let provider = Scripted {
        calls: Arc::new(AtomicUsize::new(0)),
        answer: |_| Err(CredentialsError::provider_error("IMDS unreachable")),
    };
    let at = start(CredentialCache::new(provider)).await;
    let mut conn = Connection::new(at.connect().await.unwrap());
    let response = ask(&mut conn, 1, RequestOp::GetCredentials).await;
    assert!(
        matches!(&response.result, ResponseBody::Error { code: ErrorCode::Unavailable, message } if message.contains("provider failed")),
        "{response:?}"
    );
}

#[tokio::test]
async fn credentials_near_expiry_are_refreshed_and_fresh_ones_cached() {
    // Expiring within the refresh margin: every request fetches anew, and
    // each answer carries the newest credentials.
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = CredentialCache::new(Scripted {
        calls: calls.clone(),
        answer: |n| {
            Ok(aws_credential_types::Credentials::new(
                format!("AKID{n}"),
                SECRET_KEY,
                None,
                Some(SystemTime::now() + Duration::from_secs(60)),
                "test",
            ))
        },
    });
    assert_eq!(cache.get().await.unwrap().access_key_id(), "AKID0");
    assert_eq!(cache.get().await.unwrap().access_key_id(), "AKID1");
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // Far from expiry: fetched once.
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = CredentialCache::new(Scripted {
        calls: calls.clone(),
        answer: |_| {
            Ok(static_creds(Some(
                SystemTime::now() + Duration::from_secs(3600),
            )))
        },
    });
    for _ in 0..3 {
        cache.get().await.unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // A failed refresh while the cached ones are still valid serves those.
    let calls = Arc::new(AtomicUsize::new(0));
    let cache = CredentialCache::new(Scripted {
        calls: calls.clone(),
        answer: |n| {
            if n == 0 {
                Ok(static_creds(Some(
                    SystemTime::now() + Duration::from_secs(120),
                )))
            } else {
                Err(CredentialsError::provider_error("IMDS down"))
            }
        },
    });
    cache.get().await.unwrap();
    assert_eq!(cache.get().await.unwrap().access_key_id(), ACCESS_KEY);
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // Expired and failing: unavailable.
    let cache = CredentialCache::new(Scripted {
        calls: Arc::new(AtomicUsize::new(0)),
        answer: |n| {
            if n == 0 {
                Ok(static_creds(Some(
                    SystemTime::now() - Duration::from_secs(1),
                )))
            } else {
                Err(CredentialsError::provider_error("IMDS down"))
            }
        },
    });
    cache.get().await.unwrap();
    assert!(cache.get().await.is_err());
}

#[tokio::test]
async fn a_hanging_provider_is_bounded() {
    #[derive(Debug)]
    struct Hang;
    impl ProvideCredentials for Hang {
        fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            future::ProvideCredentials::new(std::future::pending())
        }
    }
    let cache = CredentialCache::new(Hang).fetch_timeout(Duration::from_millis(100));
    let err = tokio::time::timeout(WAIT, cache.get())
        .await
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("did not answer"), "{err}");
}
