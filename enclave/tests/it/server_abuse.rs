//! Hostile peers: a frame announcing 4 GiB, random garbage, a half-written
//! frame followed by silence, and 300 idle connections (more than the 256
//! slots). While all of that is going on, a well-behaved client must still
//! get correct answers within a bounded wait, and the server must still be
//! running at the end.

// Helpers outside `#[test]` functions aren't covered by clippy.toml's
// allow-unwrap-in-tests; a panic is the right failure in test code.
#![allow(clippy::unwrap_used)]

use crate::support::server as server_support;

use std::time::Duration;

use keystore_enclave::server::{DEFAULT_MAX_CONNECTIONS, ServerConfig};
use keystore_shared::frame::{Connection, decode_frame};
use keystore_shared::protocol::{ErrorCode, Response, ResponseBody};
use keystore_shared::{Endpoint, Stream};
use server_support::{Harness, Options, Transport, fixtures, patient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every bounded wait in this test.
const BOUND: Duration = Duration::from_secs(60);

/// Reads frames until the server closes; returns the error codes seen.
/// Fails if the server sends anything but error frames or never closes.
async fn drain_errors(stream: Stream) -> Vec<ErrorCode> {
    let mut conn = Connection::new(stream);
    let mut codes = Vec::new();
    loop {
        match tokio::time::timeout(BOUND, conn.read_message::<Response>())
            .await
            .expect("the server neither answered nor closed")
        {
            Ok(Some(Response {
                result: ResponseBody::Error { code, .. },
                ..
            })) => codes.push(code),
            Ok(Some(other)) => panic!("garbage got a non-error answer: {other:?}"),
            Ok(None) | Err(_) => return codes,
        }
    }
}

async fn four_gib_frame(endpoint: &Endpoint) -> Vec<ErrorCode> {
    let mut stream = endpoint.connect_privileged().await.unwrap();
    stream.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    // Some of the promised body, which the server must not wait for.
    let _ = stream.write_all(&[0x42; 4096]).await;
    drain_errors(stream).await
}

async fn random_garbage(endpoint: &Endpoint, len: usize) -> Vec<ErrorCode> {
    let mut garbage = vec![0u8; len];
    rand::fill(&mut garbage[..]);
    let mut stream = endpoint.connect_privileged().await.unwrap();
    let _ = stream.write_all(&garbage).await;
    let _ = stream.shutdown().await;
    drain_errors(stream).await
}

/// A length prefix for 100 bytes, 10 of them, then nothing: the server
/// must drop the connection after its idle timeout.
async fn half_frame_then_silence(endpoint: &Endpoint) {
    let mut stream = endpoint.connect_privileged().await.unwrap();
    stream.write_all(&100u32.to_be_bytes()).await.unwrap();
    stream.write_all(&[0xa3; 10]).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(BOUND, stream.read_to_end(&mut buf))
        .await
        .expect("a stalled half frame was never dropped");
    assert!(read.is_ok() || buf.is_empty());
    assert!(buf.is_empty(), "the server answered a frame it never got");
}

async fn well_behaved(harness: &Harness, rounds: usize) {
    let verifier = harness.verifier();
    let mut client = keystore_shared::Client::connect_with(&harness.endpoint, patient())
        .await
        .unwrap();
    for round in 0..rounds {
        for (name, value) in fixtures().into_iter().take(2) {
            assert_eq!(client.get(name).await.unwrap().expose(), value.as_slice());
        }
        assert_eq!(client.list().await.unwrap().len(), fixtures().len());
        assert!(client.status().await.unwrap().ready);
        let nonce = format!("round {round}").into_bytes();
        let document = client.attest(&nonce, None).await.unwrap();
        verifier
            .clone()
            .expect_nonce(nonce)
            .verify(&document)
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_do_not_stop_a_well_behaved_client() {
    let harness = Harness::start(Options {
        transport: Transport::Tcp,
        config: ServerConfig {
            // Short enough that squatters are evicted during the test, and
            // shorter than the admission wait so queued connections get in.
            idle_timeout: Duration::from_secs(2),
            admission_wait: Duration::from_secs(20),
            ..ServerConfig::default()
        },
        ..Options::default()
    })
    .await;
    let endpoint = harness.endpoint.clone();
    assert_eq!(DEFAULT_MAX_CONNECTIONS, 256);

    // While the server has free slots, each attack gets its precise answer.
    assert_eq!(four_gib_frame(&endpoint).await, vec![ErrorCode::TooLarge]);
    for len in [3, 64, 4096, 70_000] {
        let codes = random_garbage(&endpoint, len).await;
        assert!(
            codes
                .iter()
                .all(|c| matches!(c, ErrorCode::BadRequest | ErrorCode::TooLarge)),
            "{codes:?}"
        );
    }

    // Now everything at once: a stalled half frame, 300 idle connections,
    // more garbage, and a client that just wants its secrets.
    let stalled = tokio::spawn({
        let endpoint = endpoint.clone();
        async move { half_frame_then_silence(&endpoint).await }
    });
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(endpoint.connect_privileged().await.unwrap());
    }
    let mut attackers = tokio::task::JoinSet::new();
    for i in 0..20 {
        let endpoint = endpoint.clone();
        attackers.spawn(async move {
            // Under load these may be refused as busy instead; either way
            // only error frames may come back, and the connection must end.
            let codes = if i % 2 == 0 {
                four_gib_frame(&endpoint).await
            } else {
                random_garbage(&endpoint, 512).await
            };
            assert!(codes.iter().all(|c| matches!(
                c,
                ErrorCode::BadRequest | ErrorCode::TooLarge | ErrorCode::Unavailable
            )));
        });
    }
    tokio::time::timeout(Duration::from_secs(120), well_behaved(&harness, 3))
        .await
        .expect("the well-behaved client was not served within 120 s");

    tokio::time::timeout(BOUND, stalled).await.unwrap().unwrap();
    while let Some(joined) = attackers.join_next().await {
        joined.unwrap();
    }
    // The idle connections were all dropped by the server.
    for mut stream in idle {
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(BOUND, stream.read_to_end(&mut buf))
            .await
            .expect("an idle connection was never dropped");
        // Nothing, or (if it waited too long for a slot) one busy refusal.
        if !buf.is_empty() {
            let (response, _) = decode_frame::<Response>(&buf, 64 * 1024).unwrap().unwrap();
            assert!(matches!(
                response.result,
                ResponseBody::Error {
                    code: ErrorCode::Unavailable,
                    ..
                }
            ));
        }
    }
    // And the server still serves afterwards.
    well_behaved(&harness, 1).await;
    harness.stop().await.unwrap();
}
