//! Abuse of the agent while an allowed caller reads (issue 15,
//! RELIABILITY.md "Abuse while a normal client works"): 10,000 malformed
//! frames or HTTP requests, 1000 idle sockets, and slow writers (one byte a
//! second), from root and from `nobody` (`setpriv`), at the unix socket and
//! the HTTP port at once, with the agent's default limits. Meanwhile root
//! reads a secret in a loop through both fronts, each round on a fresh
//! connection (plus one kept unix connection): every read must succeed.
//!
//! Every local user may connect to the agent, so here the unprivileged
//! peers are served, not refused: what keeps the reader going is that a
//! connection asking nothing gives way to a newcomer, the busiest user's
//! first (`shared::serve`, `evict_idle`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keystore_shared::protocol::ErrorCode;
use keystore_shared::{Client, ClientConfig, Endpoint};
use keystore_tests::abuse::{
    self, Abuse, BOUND, IDLE, MALFORMED, MIN_ROUNDS, SLOW, SLOW_SECONDS, Who,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use crate::agent::{open_dir, real_enclave_with_rules, start_agent_with};

const TOKEN: &str = "ci-token-0123456789abcdef";
/// Malformed HTTP requests per connection.
const HTTP_PER_CONNECTION: usize = 50;

/// The reader: until `stop`, and at least [`MIN_ROUNDS`] times, reads
/// `db/password` on a fresh unix connection, on a kept one, and over HTTP
/// on a fresh connection.
async fn reader(socket: Endpoint, http: Endpoint, stop: Arc<AtomicBool>) -> usize {
    let config = || ClientConfig {
        connect_timeout: Duration::from_secs(30),
        request_timeout: Duration::from_secs(60),
        ..ClientConfig::default()
    };
    let mut kept = Client::connect_with(&socket, config()).await.unwrap();
    let mut rounds = 0;
    while rounds < MIN_ROUNDS || !stop.load(Ordering::Acquire) {
        let mut fresh = Client::connect_with(&socket, config())
            .await
            .unwrap_or_else(|e| panic!("round {rounds}: connecting to the agent socket: {e}"));
        for (which, client) in [("fresh", &mut fresh), ("kept", &mut kept)] {
            let value = client
                .get("db/password")
                .await
                .unwrap_or_else(|e| panic!("round {rounds}: Get on the {which} connection: {e}"));
            assert_eq!(value.expose(), b"hunter2");
        }
        let answer = tokio::time::timeout(BOUND, http_get(&http))
            .await
            .unwrap_or_else(|_| panic!("round {rounds}: HTTP read not answered"));
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.contains("hunter2"),
            "round {rounds}: HTTP answered {answer}"
        );
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rounds
}

/// One `GET /secretsmanager/get` on a fresh connection; the whole answer.
async fn http_get(http: &Endpoint) -> String {
    let Endpoint::Tcp { host, port } = http else {
        panic!("HTTP is on tcp");
    };
    let mut stream = tokio::net::TcpStream::connect((host.as_str(), *port))
        .await
        .unwrap();
    let request = format!(
        "GET /secretsmanager/get?secretId=db%2Fpassword HTTP/1.1\r\nHost: localhost\r\n\
         X-Aws-Parameters-Secrets-Token: {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// A target of the abuse.
#[derive(Clone)]
struct Target {
    endpoint: Endpoint,
    http: bool,
}

/// Starts an enclave and an agent (token `ci` for root), runs `attack` on
/// both fronts while the reader reads; returns the attack's results
/// (unix socket first).
async fn while_reading<T, F, Fut>(attack: F) -> Vec<T>
where
    F: Fn(Target) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    abuse::raise_fd_limit().unwrap();
    let dir = open_dir();
    let (enclave, stop_enclave) = real_enclave_with_rules(dir.path(), None).await;
    let agent = start_agent_with(dir.path(), enclave, "root", |_| {}).await;
    let socket = Endpoint::unix(&agent.socket);
    let stop = Arc::new(AtomicBool::new(false));
    let reading = tokio::spawn(reader(socket.clone(), agent.http.clone(), stop.clone()));
    let unix = tokio::spawn(attack(Target {
        endpoint: socket,
        http: false,
    }));
    let http = tokio::spawn(attack(Target {
        endpoint: agent.http.clone(),
        http: true,
    }));
    let (unix, http) = tokio::time::timeout(BOUND, async { tokio::join!(unix, http) })
        .await
        .expect("the abuse did not end within the bound");
    stop.store(true, Ordering::Release);
    let rounds = tokio::time::timeout(BOUND, reading)
        .await
        .expect("the reader did not finish within the bound")
        .expect("the reader failed");
    assert!(rounds >= MIN_ROUNDS);
    drop(agent);
    stop_enclave.stop().await;
    vec![unix.unwrap(), http.unwrap()]
}

/// 10,000 malformed HTTP requests over connections of
/// [`HTTP_PER_CONNECTION`]: pipelined requests the agent refuses (no
/// token, unknown path, bad method, bad query, a forwarded one), the last
/// of each connection unparseable.
fn malformed_http(connection: usize) -> Vec<u8> {
    let mut payload = Vec::new();
    for i in 0..HTTP_PER_CONNECTION - 1 {
        let request = match (connection + i) % 5 {
            0 => "GET /secretsmanager/get?secretId=db%2Fpassword HTTP/1.1\r\nHost: x\r\n\r\n"
                .to_owned(),
            1 => format!(
                "GET /nowhere HTTP/1.1\r\nHost: x\r\nX-Aws-Parameters-Secrets-Token: {TOKEN}\r\n\r\n"
            ),
            2 => format!(
                "DELETE /v1/db HTTP/1.1\r\nHost: x\r\nX-Aws-Parameters-Secrets-Token: {TOKEN}\r\n\r\n"
            ),
            3 => format!(
                "GET /secretsmanager/get?secretId=%ZZ HTTP/1.1\r\nHost: x\r\nX-Aws-Parameters-Secrets-Token: {TOKEN}\r\n\r\n"
            ),
            _ => format!(
                "GET /v1/db%2Fpassword HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.1\r\nX-Aws-Parameters-Secrets-Token: {TOKEN}\r\n\r\n"
            ),
        };
        payload.extend_from_slice(request.as_bytes());
    }
    let last: &[u8] = match connection % 4 {
        0 => b"\x00\xff garbage \x01\r\n\r\n",
        1 => b"GET / HTTP/9.9\r\n\r\n",
        2 => b"GET /v1/x HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
        _ => b"GET /v1/",
    };
    payload.extend_from_slice(last);
    if connection % 4 == 3 {
        // Headers over the agent's 16 KiB head limit.
        payload.extend_from_slice(b"x HTTP/1.1\r\n");
        payload.extend(std::iter::repeat_n(b'a', 20 * 1024));
    }
    payload
}

/// What an HTTP abuser got: only refusals, never the secret.
fn only_http_refusals(received: &[u8]) {
    let text = String::from_utf8_lossy(received);
    assert!(!text.contains("hunter2"), "an abuser read the secret");
    for line in text.lines().filter(|l| l.starts_with("HTTP/1.1 ")) {
        let status: u16 = line[9..12].parse().unwrap();
        assert!((400..500).contains(&status), "{line}");
    }
}

/// What a framed abuser got: only error answers.
fn only_errors(received: &[u8]) {
    let codes = abuse::error_codes(received).unwrap();
    assert!(
        codes.iter().all(|c| matches!(
            c,
            ErrorCode::BadRequest | ErrorCode::TooLarge | ErrorCode::Unavailable
        )),
        "{codes:?}"
    );
}

fn skip_unless_root() -> bool {
    if abuse::is_root() {
        return false;
    }
    eprintln!("skipped: needs root for setpriv and ports below 1024");
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_malformed_input_from_root() {
    if skip_unless_root() {
        return;
    }
    let results = while_reading(|target| async move {
        let payloads = if target.http {
            (0..MALFORMED / HTTP_PER_CONNECTION)
                .map(malformed_http)
                .collect()
        } else {
            abuse::malformed_payloads(MALFORMED)
        };
        let gate = Arc::new(tokio::sync::Semaphore::new(16));
        let mut sends = JoinSet::new();
        for payload in payloads {
            let endpoint = target.endpoint.clone();
            let permit = gate.clone().acquire_owned().await.unwrap();
            sends.spawn(async move {
                let stream = abuse::connect(&endpoint, Who::Privileged).await.unwrap();
                let received = abuse::send_and_drain(stream, &payload, BOUND)
                    .await
                    .unwrap();
                drop(permit);
                received
            });
        }
        sends.join_all().await
    })
    .await;
    results[0].iter().for_each(|r| only_errors(r));
    results[1].iter().for_each(|r| only_http_refusals(r));
    // The framed front answered (nearly) every frame that was no request.
    let answered: usize = results[0]
        .iter()
        .map(|r| abuse::error_codes(r).unwrap().len())
        .sum();
    assert!(answered >= MALFORMED / 2, "{answered} answers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_malformed_input_from_nobody() {
    if skip_unless_root() {
        return;
    }
    let results = while_reading(|target| async move {
        let payload = if target.http {
            malformed_http(3)
        } else {
            let mut payload = abuse::malformed_payloads(49).concat();
            payload.extend_from_slice(&u32::MAX.to_be_bytes());
            payload
        };
        tokio::task::spawn_blocking(move || {
            abuse::as_nobody(&target.endpoint, Abuse::Send(200), &payload).unwrap()
        })
        .await
        .unwrap()
    })
    .await;
    assert_eq!(results[0].len(), 200);
    results[0].iter().for_each(|r| only_errors(r));
    results[1].iter().for_each(|r| only_http_refusals(r));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_idle_sockets_from_root() {
    if skip_unless_root() {
        return;
    }
    while_reading(|target| async move {
        let mut idle = Vec::with_capacity(IDLE);
        for _ in 0..IDLE {
            idle.push(
                abuse::connect(&target.endpoint, Who::Privileged)
                    .await
                    .unwrap(),
            );
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        drop(idle);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_idle_sockets_from_nobody() {
    if skip_unless_root() {
        return;
    }
    let results = while_reading(|target| async move {
        tokio::task::spawn_blocking(move || {
            abuse::as_nobody(&target.endpoint, Abuse::Idle(IDLE, 3), &[]).unwrap()
        })
        .await
        .unwrap()
    })
    .await;
    assert_eq!(results[0].len(), IDLE);
    results[0].iter().for_each(|r| only_errors(r));
    results[1].iter().for_each(|r| only_http_refusals(r));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_slow_writers_from_root() {
    if skip_unless_root() {
        return;
    }
    while_reading(|target| async move {
        let mut slow = Vec::with_capacity(SLOW);
        for _ in 0..SLOW {
            slow.push(
                abuse::connect(&target.endpoint, Who::Privileged)
                    .await
                    .unwrap(),
            );
        }
        let payload = if target.http {
            format!("GET /secretsmanager/get?secretId=db%2Fpassword HTTP/1.1\r\nX-Aws-Parameters-Secrets-Token: {TOKEN}\r\n\r\n").into_bytes()
        } else {
            let mut payload = 200u32.to_be_bytes().to_vec();
            payload.extend_from_slice(&abuse::trickled_request());
            payload
        };
        abuse::trickle(slow, &payload, SLOW_SECONDS).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_slow_writers_from_nobody() {
    if skip_unless_root() {
        return;
    }
    let results = while_reading(|target| async move {
        let payload = if target.http {
            b"GET /secretsmanager/get?secretId=db%2Fpassword HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()
        } else {
            abuse::trickled_request()
        };
        tokio::task::spawn_blocking(move || {
            abuse::as_nobody(
                &target.endpoint,
                Abuse::Slow(SLOW, u64::try_from(SLOW_SECONDS).unwrap()),
                &payload,
            )
            .unwrap()
        })
        .await
        .unwrap()
    })
    .await;
    assert_eq!(results[0].len(), SLOW);
    results[0].iter().for_each(|r| only_errors(r));
    results[1].iter().for_each(|r| only_http_refusals(r));
}
