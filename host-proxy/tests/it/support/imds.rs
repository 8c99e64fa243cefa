//! A small fake of the EC2 instance metadata service (IMDSv2), for the
//! doctor's credentials check: a token PUT, the role name, the role's
//! credentials with a chosen `Expiration`. Test code only.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The token the fake hands out and then requires.
const TOKEN: &str = "fake-imds-token";

/// What the fake answers.
#[derive(Clone)]
pub struct ImdsAnswers {
    /// The role name; `None` answers 404 (no instance profile).
    pub role: Option<String>,
    /// The credentials' `Expiration` (RFC 3339).
    pub expiration: String,
}

/// A running fake, stopped when dropped.
pub struct FakeImds {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeImds {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeImds {
    /// Serves `answers` on 127.0.0.1 (a free port).
    pub async fn start(answers: ImdsAnswers) -> FakeImds {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let answers = answers.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).to_lowercase();
                    let (status, body) = answer(&head, &answers);
                    let response = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        FakeImds { addr, task }
    }

    /// Its base URL, for `doctor --imds`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// The answer to one request head (lower-cased).
fn answer(head: &str, answers: &ImdsAnswers) -> (&'static str, String) {
    let line = head.lines().next().unwrap_or_default();
    if line.starts_with("put /latest/api/token ") {
        return if head.contains("x-aws-ec2-metadata-token-ttl-seconds:") {
            ("200 OK", TOKEN.to_owned())
        } else {
            ("400 Bad Request", String::new())
        };
    }
    if !head.contains(&format!("x-aws-ec2-metadata-token: {TOKEN}")) {
        return ("401 Unauthorized", String::new());
    }
    let base = "get /latest/meta-data/iam/security-credentials/";
    let Some(rest) = line.strip_prefix(base) else {
        return ("404 Not Found", String::new());
    };
    let path = rest.split(' ').next().unwrap_or_default();
    match (&answers.role, path) {
        (None, _) => ("404 Not Found", String::new()),
        (Some(role), "") => ("200 OK", role.clone()),
        (Some(role), asked) if asked == role.to_lowercase() => (
            "200 OK",
            serde_json::json!({
                "Code": "Success",
                "LastUpdated": "2026-01-01T00:00:00Z",
                "Type": "AWS-HMAC",
                "AccessKeyId": "ASIAFAKEFAKEFAKE",
                "SecretAccessKey": "fake-secret-key",
                "Token": "fake-session-token",
                "Expiration": answers.expiration,
            })
            .to_string(),
        ),
        _ => ("404 Not Found", String::new()),
    }
}
