//! AWS Signature Version 4 verification against the emulator's configured
//! credentials, and the credential set itself (rotatable at runtime).
//!
//! The expected signature is recomputed with the `aws-sigv4` crate (the
//! signer the SDK itself uses) from the request: method, path and query,
//! exactly the headers listed in `SignedHeaders`, the body hash and
//! `X-Amz-Date`; it is compared with the one sent in constant time.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use http::HeaderMap;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime};

use super::protocol::{ErrorKind, KmsError};

/// Signing service name of KMS.
pub const SERVICE: &str = "kms";
/// How far `X-Amz-Date` may be from the emulator's clock (AWS: 15 minutes).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(15 * 60);
/// The only algorithm accepted.
const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// Most signed headers accepted in one request.
const MAX_SIGNED_HEADERS: usize = 64;

/// One access key the emulator accepts.
#[derive(Clone, Deserialize, PartialEq, Eq)]
pub struct Credential {
    /// The access key id (`AKIA...` / `ASIA...`).
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
    /// Required session token (temporary credentials), if any.
    #[serde(default)]
    pub session_token: Option<String>,
    /// When the session token expires; requests after that get
    /// `ExpiredTokenException`.
    #[serde(default, with = "unix_seconds")]
    pub expires_at: Option<SystemTime>,
}

impl Credential {
    /// Long-term credentials (no session token).
    pub fn new(access_key_id: impl Into<String>, secret_access_key: impl Into<String>) -> Self {
        Self {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            session_token: None,
            expires_at: None,
        }
    }

    /// Temporary credentials with `session_token`, expiring at `expires_at`.
    #[must_use]
    pub fn with_session_token(
        mut self,
        session_token: impl Into<String>,
        expires_at: Option<SystemTime>,
    ) -> Self {
        self.session_token = Some(session_token.into());
        self.expires_at = expires_at;
        self
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"** redacted **")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "** redacted **"),
            )
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

mod unix_seconds {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SystemTime>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(|s| UNIX_EPOCH + Duration::from_secs(s)))
    }
}

/// The access keys the emulator accepts, by access key id.
#[derive(Debug, Default)]
pub struct CredentialStore {
    by_id: RwLock<BTreeMap<String, Credential>>,
}

impl CredentialStore {
    /// A store holding `credentials`.
    pub fn new(credentials: impl IntoIterator<Item = Credential>) -> Self {
        let store = Self::default();
        store.replace(credentials);
        store
    }

    /// Replaces every credential (rotation).
    pub fn replace(&self, credentials: impl IntoIterator<Item = Credential>) {
        let map = credentials
            .into_iter()
            .map(|c| (c.access_key_id.clone(), c))
            .collect();
        *self.by_id.write().unwrap_or_else(|e| e.into_inner()) = map;
    }

    /// Adds or replaces one credential.
    pub fn insert(&self, credential: Credential) {
        self.by_id
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(credential.access_key_id.clone(), credential);
    }

    /// Removes the credential with `access_key_id`; true if it existed.
    pub fn remove(&self, access_key_id: &str) -> bool {
        self.by_id
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(access_key_id)
            .is_some()
    }

    fn get(&self, access_key_id: &str) -> Option<Credential> {
        self.by_id
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(access_key_id)
            .cloned()
    }
}

/// Who made a verified request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The access key id that signed it.
    pub access_key_id: String,
}

/// The parts of an HTTP request SigV4 covers.
#[derive(Debug)]
pub struct SignedRequest<'a> {
    /// `POST`.
    pub method: &'a str,
    /// Path and query as received (`/`).
    pub path_and_query: &'a str,
    /// All request headers.
    pub headers: &'a HeaderMap,
    /// The full body.
    pub body: &'a [u8],
}

/// The parsed `Authorization` header.
struct Authorization<'a> {
    access_key_id: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

/// Verifies `request` was signed for `region`/`kms` by a credential in
/// `store`, at a time within [`MAX_CLOCK_SKEW`] of `now`.
///
/// # Errors
/// `MissingAuthenticationTokenException`, `IncompleteSignatureException`,
/// `UnrecognizedClientException` (unknown key or wrong session token),
/// `ExpiredTokenException`, or `InvalidSignatureException` (wrong secret,
/// scope, or a stale or future date).
pub fn verify(
    request: &SignedRequest<'_>,
    store: &CredentialStore,
    region: &str,
    now: SystemTime,
) -> Result<Caller, KmsError> {
    let header = |name: &str| -> Result<Option<&str>, KmsError> {
        request
            .headers
            .get(name)
            .map(|v| {
                v.to_str().map_err(|_| {
                    KmsError::new(
                        ErrorKind::IncompleteSignature,
                        format!("header {name} is not visible ASCII"),
                    )
                })
            })
            .transpose()
    };
    let authorization = header("authorization")?.ok_or_else(|| {
        KmsError::new(
            ErrorKind::MissingAuthenticationToken,
            "Missing Authentication Token",
        )
    })?;
    let auth = parse_authorization(authorization)?;

    let amz_date = header("x-amz-date")?.ok_or_else(|| {
        KmsError::new(
            ErrorKind::IncompleteSignature,
            "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.",
        )
    })?;
    let signed_at = parse_amz_date(amz_date)?;
    if auth.service != SERVICE {
        return Err(invalid_signature(format!(
            "Credential should be scoped to correct service: '{SERVICE}'."
        )));
    }
    if auth.region != region {
        return Err(invalid_signature(format!(
            "Credential should be scoped to a valid region, not '{}'. Expected '{region}'.",
            auth.region
        )));
    }
    if amz_date.get(..8) != Some(auth.date) {
        return Err(invalid_signature(format!(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from \
             HTTP: '{}' != '{}', from '{amz_date}'.",
            auth.date,
            amz_date.get(..8).unwrap_or_default()
        )));
    }
    if signed_at + MAX_CLOCK_SKEW < now {
        return Err(invalid_signature(format!(
            "Signature expired: {amz_date} is now earlier than {} ({} - 15 min.)",
            format_amz_date(now - MAX_CLOCK_SKEW),
            format_amz_date(now)
        )));
    }
    if signed_at > now + MAX_CLOCK_SKEW {
        return Err(invalid_signature(format!(
            "Signature not yet current: {amz_date} is still later than {} ({} + 15 min.)",
            format_amz_date(now + MAX_CLOCK_SKEW),
            format_amz_date(now)
        )));
    }

    let token_invalid = || {
        KmsError::new(
            ErrorKind::UnrecognizedClient,
            "The security token included in the request is invalid.",
        )
    };
    let credential = store.get(auth.access_key_id).ok_or_else(token_invalid)?;
    let sent_token = header("x-amz-security-token")?;
    match (&credential.session_token, sent_token) {
        (None, None) => {}
        (Some(expected), Some(sent)) if bool::from(expected.as_bytes().ct_eq(sent.as_bytes())) => {}
        _ => return Err(token_invalid()),
    }
    if let Some(expires_at) = credential.expires_at
        && now >= expires_at
    {
        return Err(KmsError::new(
            ErrorKind::ExpiredToken,
            "The security token included in the request is expired",
        ));
    }

    if !auth.signed_headers.contains(&"host") {
        return Err(KmsError::new(
            ErrorKind::IncompleteSignature,
            "'Host' must be a 'SignedHeader' in the AWS Authorization.",
        ));
    }
    // The signer adds these itself (from the time and the session token).
    let added_by_signer = ["x-amz-date", "x-amz-security-token", "x-amz-content-sha256"];
    let mut headers = Vec::new();
    for name in &auth.signed_headers {
        if added_by_signer.contains(name) {
            continue;
        }
        let values = request.headers.get_all(*name);
        let mut any = false;
        for value in values {
            let value = value.to_str().map_err(|_| {
                invalid_signature(format!("signed header {name} is not visible ASCII"))
            })?;
            headers.push((*name, value));
            any = true;
        }
        if !any {
            return Err(invalid_signature(format!(
                "signed header {name} is missing from the request"
            )));
        }
    }

    let signable = SignableRequest::new(
        request.method,
        request.path_and_query,
        headers.into_iter(),
        SignableBody::Bytes(request.body),
    )
    .map_err(|e| invalid_signature(format!("request cannot be canonicalised: {e}")))?;
    let identity = Credentials::new(
        &credential.access_key_id,
        &credential.secret_access_key,
        sent_token.map(str::to_owned),
        None,
        "mock-kms",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(SERVICE)
        .time(signed_at)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| KmsError::new(ErrorKind::Internal, format!("signing parameters: {e}")))?
        .into();
    let expected = sign(signable, &params)
        .map_err(|e| invalid_signature(format!("request cannot be signed: {e}")))?
        .signature()
        .to_owned();
    if bool::from(expected.as_bytes().ct_eq(auth.signature.as_bytes())) {
        Ok(Caller {
            access_key_id: credential.access_key_id,
        })
    } else {
        Err(invalid_signature(
            "The request signature we calculated does not match the signature you provided. \
             Check your AWS Secret Access Key and signing method. Consult the service \
             documentation for details.",
        ))
    }
}

/// `AWS4-HMAC-SHA256 Credential=AKID/DATE/REGION/SERVICE/aws4_request,
/// SignedHeaders=a;b, Signature=hex`.
fn parse_authorization(value: &str) -> Result<Authorization<'_>, KmsError> {
    let incomplete = |what: &str| {
        KmsError::new(
            ErrorKind::IncompleteSignature,
            format!("Authorization header is malformed: {what}"),
        )
    };
    let rest = value
        .strip_prefix(ALGORITHM)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or_else(|| incomplete("only AWS4-HMAC-SHA256 is supported"))?;
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (name, val) = part
            .trim()
            .split_once('=')
            .ok_or_else(|| incomplete("expected Name=Value pairs"))?;
        let slot = match name {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed_headers,
            "Signature" => &mut signature,
            _ => return Err(incomplete("unknown component")),
        };
        if slot.replace(val).is_some() {
            return Err(incomplete("repeated component"));
        }
    }
    let credential = credential.ok_or_else(|| incomplete("missing Credential"))?;
    let signed_headers = signed_headers.ok_or_else(|| incomplete("missing SignedHeaders"))?;
    let signature = signature.ok_or_else(|| incomplete("missing Signature"))?;

    let scope: Vec<&str> = credential.split('/').collect();
    let [access_key_id, date, region, service, "aws4_request"] = scope.as_slice() else {
        return Err(incomplete(
            "Credential must be AKID/YYYYMMDD/region/service/aws4_request",
        ));
    };
    let signed_headers: Vec<&str> = signed_headers.split(';').collect();
    if signed_headers.is_empty()
        || signed_headers.len() > MAX_SIGNED_HEADERS
        || signed_headers.iter().any(|h| {
            h.is_empty()
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
    {
        return Err(incomplete("SignedHeaders must be lower-case header names"));
    }
    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(incomplete("Signature must be 64 hex digits"));
    }
    Ok(Authorization {
        access_key_id,
        date,
        region,
        service,
        signed_headers,
        signature,
    })
}

fn parse_amz_date(value: &str) -> Result<SystemTime, KmsError> {
    PrimitiveDateTime::parse(
        value,
        format_description!("[year][month][day]T[hour][minute][second]Z"),
    )
    .map(|t| SystemTime::from(t.assume_utc()))
    .map_err(|_| {
        KmsError::new(
            ErrorKind::IncompleteSignature,
            format!("X-Amz-Date {value:?} is not YYYYMMDD'T'HHMMSS'Z'"),
        )
    })
}

fn format_amz_date(t: SystemTime) -> String {
    OffsetDateTime::from(t)
        .format(format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .unwrap_or_default()
}

fn invalid_signature(message: impl Into<String>) -> KmsError {
    KmsError::new(ErrorKind::InvalidSignature, message)
}
