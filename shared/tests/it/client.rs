//! The `Client` against a scripted fake server: it must refuse answers with
//! the wrong id, version or type, map server errors to typed codes, bound
//! every wait, and refuse to reuse a connection left in an unknown state.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use keystore_shared::protocol::{ErrorCode, Request, RequestOp, Response, ResponseBody};
use keystore_shared::{Client, ClientConfig, ClientError, Connection, Endpoint, SecretBytes};

/// Serves one connection: answers each request with `answer(request)`;
/// `None` means "say nothing and keep the connection open".
async fn fake_server(
    answer: impl Fn(&Request) -> Option<Response> + Send + 'static,
) -> (Endpoint, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = Endpoint::unix(dir.path().join("fake.sock"));
    let listener = endpoint.bind().await.unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut conn = Connection::new(stream);
        while let Ok(Some(request)) = conn.read_message::<Request>().await {
            match answer(&request) {
                Some(response) => conn.write_message(&response).await.unwrap(),
                None => tokio::time::sleep(Duration::from_secs(3600)).await,
            }
        }
    });
    (endpoint, dir)
}

fn quick() -> ClientConfig {
    ClientConfig {
        request_timeout: Duration::from_millis(300),
        ..ClientConfig::default()
    }
}

#[tokio::test]
async fn answers_are_checked_and_errors_typed() {
    let (endpoint, _dir) = fake_server(|req| {
        let body = match &req.op {
            RequestOp::Get { name } if name == "ok" => ResponseBody::Secret {
                name: name.clone(),
                value: SecretBytes::new(b"v".to_vec()),
            },
            RequestOp::Get { name } if name == "other" => ResponseBody::Secret {
                name: "swapped".into(),
                value: SecretBytes::new(b"v".to_vec()),
            },
            RequestOp::Get { .. } => ResponseBody::Error {
                code: ErrorCode::NotFound,
                message: "no secret named `x`".into(),
            },
            RequestOp::List => ResponseBody::Status(Default::default()),
            _ => ResponseBody::Names { names: vec![] },
        };
        Some(Response::new(req.id, body))
    })
    .await;
    let mut client = Client::connect_with(&endpoint, quick()).await.unwrap();
    assert_eq!(client.get("ok").await.unwrap().expose(), b"v");
    let err = client.get("x").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    assert!(err.to_string().contains("NotFound"), "{err}");
    // A secret under another name is not what was asked for.
    let err = client.get("other").await.unwrap_err();
    assert!(
        matches!(err, ClientError::UnexpectedResponse { .. }),
        "{err}"
    );
    let err = client.list().await.unwrap_err();
    assert!(
        matches!(err, ClientError::UnexpectedResponse { got: "Status", .. }),
        "{err}"
    );
    // Typed errors leave the connection usable.
    assert_eq!(client.get("ok").await.unwrap().expose(), b"v");
}

#[tokio::test]
async fn a_wrong_id_breaks_the_connection() {
    let (endpoint, _dir) = fake_server(|req| {
        Some(Response::new(
            req.id + 7,
            ResponseBody::Names { names: vec![] },
        ))
    })
    .await;
    let mut client = Client::connect_with(&endpoint, quick()).await.unwrap();
    let err = client.list().await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::IdMismatch {
                expected: 1,
                got: 8,
                ..
            }
        ),
        "{err}"
    );
    assert!(matches!(client.list().await, Err(ClientError::Broken)));
}

#[tokio::test]
async fn a_wrong_version_is_refused() {
    let (endpoint, _dir) = fake_server(|req| {
        let mut response = Response::new(req.id, ResponseBody::Names { names: vec![] });
        response.v = 9;
        Some(response)
    })
    .await;
    let mut client = Client::connect_with(&endpoint, quick()).await.unwrap();
    let err = client.list().await.unwrap_err();
    assert!(matches!(err, ClientError::Version { .. }), "{err}");
    assert!(err.to_string().contains('9'), "{err}");
}

#[tokio::test]
async fn a_silent_server_times_out_and_the_connection_is_not_reused() {
    let (endpoint, _dir) = fake_server(|_| None).await;
    let mut client = Client::connect_with(&endpoint, quick()).await.unwrap();
    let err = client.status().await.unwrap_err();
    assert!(
        matches!(err, ClientError::Timeout { op: "status", .. }),
        "{err}"
    );
    assert!(matches!(client.status().await, Err(ClientError::Broken)));
}

#[tokio::test]
async fn connecting_to_nothing_fails_with_one_message() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = Endpoint::unix(dir.path().join("none.sock"));
    let err = Client::connect(&endpoint).await.unwrap_err();
    assert!(matches!(err, ClientError::Connect(_)), "{err}");
    assert!(std::error::Error::source(&err).is_none());
    assert!(err.to_string().contains("none.sock"), "{err}");
}

/// A connection the server closes before answering anything (as an
/// evicted one is: only while it waits for a request) is asked again once
/// on a new connection; after an answer, a close is an error, never a
/// silent retry.
#[tokio::test]
async fn a_connection_cut_before_its_first_answer_is_asked_again_once() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = Endpoint::unix(dir.path().join("cut.sock"));
    let listener = endpoint.bind().await.unwrap();
    let served = tokio::spawn(async move {
        // The first connection: closed unread (its request pending).
        let (first, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(first);
        // The second: one answer, then closed.
        let (second, _) = listener.accept().await.unwrap();
        let mut conn = Connection::new(second);
        let request = conn.read_message::<Request>().await.unwrap().unwrap();
        let names = ResponseBody::Names { names: vec![] };
        conn.write_message(&Response::new(request.id, names))
            .await
            .unwrap();
        // Wait for the client's next request, then close unanswered.
        let _ = conn.read_message::<Request>().await;
        drop(conn);
        let third = tokio::time::timeout(Duration::from_millis(500), listener.accept()).await;
        third.is_ok()
    });
    let mut client = Client::connect_with(&endpoint, quick()).await.unwrap();
    assert!(client.list().await.unwrap().is_empty());
    let err = client.list().await.unwrap_err();
    assert!(
        matches!(err, ClientError::Closed { .. } | ClientError::Frame { .. }),
        "{err}"
    );
    assert!(
        !served.await.unwrap(),
        "no third connection: no retry after an answer"
    );
}
