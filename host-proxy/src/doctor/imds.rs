//! Check 3: the instance's credentials from IMDSv2, as the daemon's
//! credential chain gets them: a session token (`PUT /latest/api/token`),
//! the role name, and the role's credentials' `Code` and `Expiration`.
//! The answer holds the keys themselves: it is read into a zeroed buffer
//! and only `Code` and `Expiration` are looked at.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use keystore_shared::attestation::rfc3339;
use serde::Deserialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::Finding;
use super::network::{get, http_call};

/// This check's name.
pub const CHECK: &str = "credentials";
/// The instance metadata service.
pub const DEFAULT_IMDS: &str = "http://169.254.169.254";
/// Credentials expiring sooner than this fail the check (the daemon
/// refreshes 5 minutes ahead; IMDS renews well before expiry).
pub const MIN_VALIDITY: Duration = Duration::from_secs(5 * 60);
/// The token's lifetime asked for: the doctor needs it for seconds.
const TOKEN_TTL_SECONDS: &str = "60";
/// Longest role name accepted from IMDS.
const MAX_ROLE_LEN: usize = 128;

/// The fields of the credentials answer that are looked at (the keys in
/// it are not).
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CredentialsAnswer {
    #[serde(default)]
    code: String,
    #[serde(default)]
    expiration: Option<String>,
}

/// `host[:port]` of an `http://` URL.
fn authority(url: &str) -> Result<(String, u16), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("--imds {url:?} must be an http:// URL"))?;
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') {
        return Err(format!("--imds {url:?} must be http://HOST[:PORT]"));
    }
    match rest.rsplit_once(':') {
        Some((host, port)) => port
            .parse()
            .map(|port| (host.to_owned(), port))
            .map_err(|_| format!("--imds {url:?}: bad port")),
        None => Ok((rest.to_owned(), 80)),
    }
}

async fn call(
    host: &str,
    port: u16,
    request: Request<Full<Bytes>>,
) -> Result<(StatusCode, zeroize::Zeroizing<Vec<u8>>), String> {
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| e.to_string())?;
    http_call(stream, request).await
}

/// Runs the IMDSv2 sequence against `url`, each step bounded by `timeout`.
pub async fn check(url: &str, timeout: Duration) -> Finding {
    match tokio::time::timeout(timeout * 3, steps(url)).await {
        Ok(finding) => finding,
        Err(_) => Finding::fail(
            CHECK,
            format!(
                "IMDS at {url} is unreachable: no answer within {} ms",
                (timeout * 3).as_millis()
            ),
            UNREACHABLE_HINT,
        ),
    }
}

const UNREACHABLE_HINT: &str = "is this an EC2 instance with the metadata service on? \
     `aws ec2 modify-instance-metadata-options --instance-id ID --http-endpoint enabled \
     --http-tokens required --http-put-response-hop-limit 2` (2 when the daemon runs in a \
     container); --no-imds when the daemon's credentials come from elsewhere";

async fn steps(url: &str) -> Finding {
    let (host, port) = match authority(url) {
        Ok(authority) => authority,
        Err(err) => return Finding::fail(CHECK, err, "--imds http://169.254.169.254"),
    };
    let token_request = Request::builder()
        .method(Method::PUT)
        .uri("/latest/api/token")
        .header(http::header::HOST, host.as_str())
        .header("x-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL_SECONDS)
        .body(Full::new(Bytes::new()));
    let Ok(token_request) = token_request else {
        return Finding::fail(
            CHECK,
            format!("bad IMDS host {host:?}"),
            "--imds http://HOST[:PORT]",
        );
    };
    let token = match call(&host, port, token_request).await {
        Err(err) => {
            return Finding::fail(
                CHECK,
                format!("IMDS at {url} is unreachable: {err}"),
                UNREACHABLE_HINT,
            );
        }
        Ok((StatusCode::OK, body)) => match String::from_utf8(body.to_vec()) {
            Ok(token) if !token.is_empty() && token.len() <= 1024 => zeroize::Zeroizing::new(token),
            _ => {
                return Finding::fail(
                    CHECK,
                    "IMDS answered the token PUT with no usable token",
                    UNREACHABLE_HINT,
                );
            }
        },
        Ok((status, _)) => {
            return Finding::fail(
                CHECK,
                format!("IMDS refused an IMDSv2 token: HTTP {status}"),
                "a 403 means IMDS is disabled, a 401/405 or no answer from a container that \
                 the hop limit is 1: `aws ec2 modify-instance-metadata-options \
                 --http-endpoint enabled --http-put-response-hop-limit 2`",
            );
        }
    };
    let with_token = |path: &str| {
        get(&host, path).and_then(|mut request| {
            let value = http::HeaderValue::from_str(&token).map_err(|e| e.to_string())?;
            request
                .headers_mut()
                .insert("x-aws-ec2-metadata-token", value);
            Ok(request)
        })
    };
    let base = "/latest/meta-data/iam/security-credentials/";
    let role = match with_token(base) {
        Err(err) => return Finding::fail(CHECK, err, UNREACHABLE_HINT),
        Ok(request) => match call(&host, port, request).await {
            Err(err) => {
                return Finding::fail(
                    CHECK,
                    format!("IMDS at {url} is unreachable: {err}"),
                    UNREACHABLE_HINT,
                );
            }
            Ok((StatusCode::OK, body)) => String::from_utf8_lossy(&body)
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned(),
            Ok((StatusCode::NOT_FOUND, _)) => String::new(),
            Ok((status, _)) => {
                return Finding::fail(
                    CHECK,
                    format!("IMDS answered the role query with HTTP {status}"),
                    UNREACHABLE_HINT,
                );
            }
        },
    };
    if role.is_empty() {
        return Finding::fail(
            CHECK,
            "no IAM role: the instance has no instance profile",
            "attach one whose role the key policy names: `aws ec2 \
             associate-iam-instance-profile --instance-id ID --iam-instance-profile Name=PROFILE`",
        );
    }
    if role.len() > MAX_ROLE_LEN
        || !role
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
    {
        return Finding::fail(
            CHECK,
            "IMDS answered a role name that is not one",
            UNREACHABLE_HINT,
        );
    }
    let answer = match with_token(&format!("{base}{role}")) {
        Err(err) => return Finding::fail(CHECK, err, UNREACHABLE_HINT),
        Ok(request) => match call(&host, port, request).await {
            Ok((StatusCode::OK, body)) => serde_json::from_slice::<CredentialsAnswer>(&body),
            Ok((status, _)) => {
                return Finding::fail(
                    CHECK,
                    format!("IMDS has no credentials for role {role}: HTTP {status}"),
                    "check the instance profile's role and its trust policy (ec2.amazonaws.com)",
                );
            }
            Err(err) => {
                return Finding::fail(
                    CHECK,
                    format!("IMDS at {url} is unreachable: {err}"),
                    UNREACHABLE_HINT,
                );
            }
        },
    };
    let answer = match answer {
        Ok(answer) => answer,
        Err(_) => {
            return Finding::fail(
                CHECK,
                format!("IMDS's credentials for role {role} are not the expected JSON"),
                UNREACHABLE_HINT,
            );
        }
    };
    judge(
        &role,
        &answer.code,
        answer.expiration.as_deref(),
        SystemTime::now(),
    )
}

/// Whether credentials with `code` and `expiration` are usable at `now`.
fn judge(role: &str, code: &str, expiration: Option<&str>, now: SystemTime) -> Finding {
    if code != "Success" {
        return Finding::fail(
            CHECK,
            format!("IMDS says the credentials of role {role} are not usable: Code {code:?}"),
            "check the role's trust policy and that the instance profile still exists",
        );
    }
    let Some(expires) = expiration
        .and_then(|text| OffsetDateTime::parse(text, &Rfc3339).ok())
        .map(SystemTime::from)
    else {
        return Finding::fail(
            CHECK,
            format!("the credentials of role {role} have no readable Expiration"),
            UNREACHABLE_HINT,
        );
    };
    let clock_hint = "IMDS renews credentials well before they expire: expired ones mean the \
                      instance clock is wrong (chronyc tracking) or IMDS is stuck; stop and \
                      start the instance if the clock is right";
    match expires.duration_since(now) {
        Err(_) => Finding::fail(
            CHECK,
            format!(
                "the credentials of role {role} expired at {}",
                rfc3339(&expires)
            ),
            clock_hint,
        ),
        Ok(left) if left < MIN_VALIDITY => Finding::fail(
            CHECK,
            format!(
                "the credentials of role {role} expire soon: in {} s (at {})",
                left.as_secs(),
                rfc3339(&expires)
            ),
            clock_hint,
        ),
        Ok(left) => Finding::ok(
            CHECK,
            format!(
                "IMDSv2 answers: role {role}, credentials valid for {} more minute(s) (until {})",
                left.as_secs() / 60,
                rfc3339(&expires)
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Outcome;

    #[test]
    fn urls() {
        assert_eq!(
            authority("http://169.254.169.254").unwrap(),
            ("169.254.169.254".to_owned(), 80)
        );
        assert_eq!(
            authority("http://127.0.0.1:8080/").unwrap(),
            ("127.0.0.1".to_owned(), 8080)
        );
        assert!(authority("https://x").is_err());
        assert!(authority("http://x/latest").is_err());
        assert!(authority("http://x:port").is_err());
    }

    #[test]
    fn expiry_is_judged() {
        let now =
            SystemTime::from(OffsetDateTime::parse("2026-01-01T12:00:00Z", &Rfc3339).unwrap());
        let ok = judge("r", "Success", Some("2026-01-01T18:00:00Z"), now);
        assert_eq!(ok.status, Outcome::Ok, "{ok:?}");
        let soon = judge("r", "Success", Some("2026-01-01T12:02:00Z"), now);
        assert_eq!(soon.status, Outcome::Fail);
        assert!(soon.saw.contains("expire soon: in 120 s"), "{soon:?}");
        let gone = judge("r", "Success", Some("2026-01-01T11:00:00Z"), now);
        assert!(
            gone.saw.contains("expired at 2026-01-01T11:00:00"),
            "{gone:?}"
        );
        assert_eq!(judge("r", "Failure", None, now).status, Outcome::Fail);
        assert_eq!(
            judge("r", "Success", Some("soon"), now).status,
            Outcome::Fail
        );
    }
}
