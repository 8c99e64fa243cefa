//! Abuse while a normal client works (issue 15, RELIABILITY.md "Abuse while
//! a normal client works"): 10,000 malformed frames, 1000 idle sockets, and
//! slow writers (one byte a second), each from privileged and from
//! unprivileged peers, at the secret port (tcp, privileged = source port
//! below 1024) and the load port (unix, privileged = root) at once, with
//! the server's default limits. Meanwhile a normal client opens a fresh
//! connection every round and asks Get, List and Status on the secret port
//! (plus List on a connection it keeps) and Status on the load port: every
//! one of its requests must succeed.
//!
//! Unprivileged peers are real processes running as `nobody` (`setpriv`):
//! they must get nothing but `Denied` (or a silent close).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keystore_enclave::server::{DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_LOAD_CONNECTIONS};
use keystore_shared::protocol::ErrorCode;
use keystore_shared::{Client, Endpoint};
use keystore_tests::abuse::{
    self, Abuse, BOUND, IDLE, MALFORMED, MIN_ROUNDS, SLOW, SLOW_SECONDS, Who,
};
use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;

use crate::support::server::{Harness, Options, Transport, fixtures, patient};

/// The normal client: until `stop`, and at least [`MIN_ROUNDS`] times, a
/// fresh connection asks Get/List/Status on the secret port and Status on
/// the load port, and a kept connection asks List. Returns the rounds done
/// or the first failure.
async fn normal_client(secret: Endpoint, load: Endpoint, stop: Arc<AtomicBool>) -> usize {
    let (name, value) = fixtures().remove(0);
    let mut kept = Client::connect_with(&secret, patient())
        .await
        .expect("kept connection");
    let mut rounds = 0;
    while rounds < MIN_ROUNDS || !stop.load(Ordering::Acquire) {
        let mut fresh = Client::connect_with(&secret, patient())
            .await
            .unwrap_or_else(|e| panic!("round {rounds}: connecting to the secret port: {e}"));
        let got = fresh
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("round {rounds}: Get: {e}"));
        assert_eq!(got.expose(), value.as_slice());
        let names = fresh
            .list()
            .await
            .unwrap_or_else(|e| panic!("round {rounds}: List: {e}"));
        assert_eq!(names.len(), fixtures().len());
        let status = fresh
            .status()
            .await
            .unwrap_or_else(|e| panic!("round {rounds}: Status: {e}"));
        assert!(status.ready);
        let names = kept
            .list()
            .await
            .unwrap_or_else(|e| panic!("round {rounds}: List on the kept connection: {e}"));
        assert_eq!(names.len(), fixtures().len());
        let mut loader = Client::connect_with(&load, patient())
            .await
            .unwrap_or_else(|e| panic!("round {rounds}: connecting to the load port: {e}"));
        let status = loader
            .status()
            .await
            .unwrap_or_else(|e| panic!("round {rounds}: Status on the load port: {e}"));
        assert!(status.ready);
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rounds
}

/// An enclave with default limits, its secret port on tcp, both sockets
/// open to `nobody` (the kernel, not file modes, must keep it out).
async fn enclave() -> Harness {
    abuse::raise_fd_limit().unwrap();
    let harness = Harness::start(Options {
        transport: Transport::Tcp,
        ..Options::default()
    })
    .await;
    let Endpoint::Unix { path } = &harness.load_endpoint else {
        panic!("the harness's load port is a unix socket");
    };
    abuse::open_socket_to_everyone(path).unwrap();
    harness
}

/// Runs `attack` against both ports while the normal client works; returns
/// what the attack returned per port.
async fn while_a_normal_client_works<T, F, Fut>(harness: &Harness, attack: F) -> Vec<T>
where
    F: Fn(Endpoint) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let normal = tokio::spawn(normal_client(
        harness.endpoint.clone(),
        harness.load_endpoint.clone(),
        stop.clone(),
    ));
    let secret = tokio::spawn(attack(harness.endpoint.clone()));
    let load = tokio::spawn(attack(harness.load_endpoint.clone()));
    let (secret, load) = tokio::time::timeout(BOUND, async { tokio::join!(secret, load) })
        .await
        .expect("the abuse did not end within the bound");
    // Secret port first.
    let results = vec![secret.unwrap(), load.unwrap()];
    stop.store(true, Ordering::Release);
    let rounds = tokio::time::timeout(BOUND, normal)
        .await
        .expect("the normal client did not finish within the bound")
        .expect("the normal client failed");
    assert!(rounds >= MIN_ROUNDS);
    results
}

/// Every unprivileged connection got `Denied` or nothing at all.
fn only_denied(received: &[Vec<u8>]) {
    for bytes in received {
        let codes = abuse::error_codes(bytes).unwrap();
        assert!(
            codes.iter().all(|c| *c == ErrorCode::Denied) && codes.len() <= 1,
            "an unprivileged peer got {codes:?}"
        );
    }
}

/// Sends the malformed payloads, 16 connections at a time; returns the
/// error codes received.
async fn malformed_as_root(endpoint: Endpoint) -> Vec<ErrorCode> {
    let payloads = abuse::malformed_payloads(MALFORMED);
    let gate = Arc::new(tokio::sync::Semaphore::new(16));
    let mut sends = JoinSet::new();
    for payload in payloads {
        let endpoint = endpoint.clone();
        let permit = gate.clone().acquire_owned().await.unwrap();
        sends.spawn(async move {
            let stream = abuse::connect(&endpoint, Who::Privileged).await.unwrap();
            let received = abuse::send_and_drain(stream, &payload, BOUND)
                .await
                .unwrap();
            drop(permit);
            abuse::error_codes(&received).unwrap()
        });
    }
    sends.join_all().await.concat()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_from_privileged_peers() {
    if !abuse::is_root() {
        eprintln!("skipped: needs root for ports below 1024");
        return;
    }
    let harness = enclave().await;
    let codes = while_a_normal_client_works(&harness, malformed_as_root).await;
    for codes in codes {
        // Each frame that is no request is answered BadRequest (or, over
        // the limit, TooLarge and closed), and never anything but an error.
        assert!(
            codes
                .iter()
                .all(|c| matches!(c, ErrorCode::BadRequest | ErrorCode::TooLarge)),
            "{codes:?}"
        );
        assert!(codes.len() >= MALFORMED / 2, "{} answers", codes.len());
    }
    harness.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_from_unprivileged_peers() {
    if !abuse::is_root() {
        eprintln!("skipped: needs root for setpriv");
        return;
    }
    let harness = enclave().await;
    let received = while_a_normal_client_works(&harness, |endpoint| async move {
        // 200 connections of 50 frames each (49 the server would answer,
        // then an announced 4 GiB): 10,000 frames per port.
        let mut payload = abuse::malformed_payloads(49).concat();
        payload.extend_from_slice(&u32::MAX.to_be_bytes());
        tokio::task::spawn_blocking(move || {
            abuse::as_nobody(&endpoint, Abuse::Send(200), &payload).unwrap()
        })
        .await
        .unwrap()
    })
    .await;
    for received in received {
        assert_eq!(received.len(), 200);
        only_denied(&received);
    }
    harness.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_from_privileged_peers() {
    if !abuse::is_root() {
        eprintln!("skipped: needs root for ports below 1024");
        return;
    }
    let harness = enclave().await;
    let held = while_a_normal_client_works(&harness, |endpoint| async move {
        let mut idle = Vec::with_capacity(IDLE);
        for _ in 0..IDLE {
            idle.push(abuse::connect(&endpoint, Who::Privileged).await.unwrap());
        }
        // Held while the normal client goes on working.
        tokio::time::sleep(Duration::from_secs(3)).await;
        idle
    })
    .await;
    // Each port kept at most its slots' worth of idle sockets; the rest
    // were evicted (closed with nothing said) or, had one found every slot
    // busy answering, refused as busy.
    for (idle, slots) in held
        .into_iter()
        .zip([DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_LOAD_CONNECTIONS])
    {
        let mut closed = JoinSet::new();
        for mut stream in idle {
            closed.spawn(async move {
                let mut received = Vec::new();
                tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut received))
                    .await
                    .ok()
                    .map(|_| received)
            });
        }
        let closed: Vec<Vec<u8>> = closed.join_all().await.into_iter().flatten().collect();
        assert!(
            closed.len() >= IDLE - slots,
            "{} of {IDLE} idle sockets closed",
            closed.len()
        );
        for received in closed {
            let codes = abuse::error_codes(&received).unwrap();
            assert!(
                codes.iter().all(|c| *c == ErrorCode::Unavailable),
                "{codes:?}"
            );
        }
    }
    harness.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_from_unprivileged_peers() {
    if !abuse::is_root() {
        eprintln!("skipped: needs root for setpriv");
        return;
    }
    let harness = enclave().await;
    let received = while_a_normal_client_works(&harness, |endpoint| async move {
        tokio::task::spawn_blocking(move || {
            abuse::as_nobody(&endpoint, Abuse::Idle(IDLE, 3), &[]).unwrap()
        })
        .await
        .unwrap()
    })
    .await;
    for received in received {
        assert_eq!(received.len(), IDLE);
        only_denied(&received);
    }
    harness.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_writers_from_privileged_peers() {
    if !abuse::is_root() {
        eprintln!("skipped: needs root for ports below 1024");
        return;
    }
    let harness = enclave().await;
    let still_open = while_a_normal_client_works(&harness, |endpoint| async move {
        let mut slow = Vec::with_capacity(SLOW);
        for _ in 0..SLOW {
            slow.push(abuse::connect(&endpoint, Who::Privileged).await.unwrap());
        }
        // A request announced in full, then trickled: never complete
        // within the test.
        let mut payload = 200u32.to_be_bytes().to_vec();
        payload.extend_from_slice(&abuse::trickled_request());
        abuse::trickle(slow, &payload, SLOW_SECONDS).await
    })
    .await;
    // More slow writers than slots: the normal client's connections took
    // the slots of some (they were evicted), and the rest never got more
    // than the slots.
    for open in still_open {
        assert!(open < SLOW, "no slow writer was evicted");
    }
    harness.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_writers_from_unprivileged_peers() {
    if !abuse::is_root() {
        eprintln!("skipped: needs root for setpriv");
        return;
    }
    let harness = enclave().await;
    let received = while_a_normal_client_works(&harness, |endpoint| async move {
        let payload = abuse::trickled_request();
        tokio::task::spawn_blocking(move || {
            abuse::as_nobody(
                &endpoint,
                Abuse::Slow(SLOW, u64::try_from(SLOW_SECONDS).unwrap()),
                &payload,
            )
            .unwrap()
        })
        .await
        .unwrap()
    })
    .await;
    for received in received {
        assert_eq!(received.len(), SLOW);
        only_denied(&received);
    }
    harness.stop().await.unwrap();
}
