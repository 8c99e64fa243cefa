//! Where the loader reads the secrets file: a local path, or an S3 object
//! (`s3://BUCKET/KEY`) fetched with the instance role.
//!
//! Both are polled cheaply: a local file by size and mtime, an S3 object by
//! ETag (a conditional `GetObject` with `If-None-Match`, so an unchanged
//! object costs one small request and no body). Both are bounded to the
//! same size as a local file ([`MAX_FILE_SIZE`]) and every S3 call to a
//! timeout. Errors name the path or URL, never a value: the object holds
//! only ciphertext envelopes and plain settings, but its contents are still
//! kept out of messages.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_sdk_s3::error::SdkError;
use zeroize::Zeroizing;

use crate::metrics::Metrics;
use crate::secrets_file::dotenv::MAX_FILE_SIZE;
use crate::secrets_file::{self, ReadError};

pub use crate::secrets_file::location::{Location as SecretsLocation, S3Url, S3UrlError};

/// Bound on one S3 fetch (request and body) unless configured otherwise.
pub const DEFAULT_S3_TIMEOUT: Duration = Duration::from_secs(30);

/// An S3 object polled by ETag.
#[derive(Debug, Clone)]
pub struct S3Source {
    url: S3Url,
    client: aws_sdk_s3::Client,
    timeout: Duration,
    metrics: Option<Arc<Metrics>>,
}

/// How an S3 fetch failed, as the `outcome` label of
/// `keystore_s3_fetches_total` (a fixed set; the detail stays in the
/// error's text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S3ErrorKind {
    /// No answer within the fetch timeout.
    Timeout,
    /// S3 refused the role (`AccessDenied`, HTTP 403).
    AccessDenied,
    /// No such bucket or key (HTTP 404).
    NotFound,
    /// Any other error S3 answered with.
    Service,
    /// Connecting or reading failed below HTTP.
    Transport,
    /// The object is larger than a secrets file may be.
    TooLarge,
    /// The answer lacked what a fetch needs (an ETag).
    InvalidAnswer,
    /// Anything else (building the request).
    Other,
}

impl S3ErrorKind {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            S3ErrorKind::Timeout => "timeout",
            S3ErrorKind::AccessDenied => "access_denied",
            S3ErrorKind::NotFound => "not_found",
            S3ErrorKind::Service => "service_error",
            S3ErrorKind::Transport => "transport",
            S3ErrorKind::TooLarge => "too_large",
            S3ErrorKind::InvalidAnswer => "invalid_answer",
            S3ErrorKind::Other => "other",
        }
    }

    /// The kind of an SDK error.
    fn of<E, R>(err: &SdkError<E, R>) -> S3ErrorKind
    where
        E: aws_sdk_s3::error::ProvideErrorMetadata,
    {
        match err {
            SdkError::ServiceError(service) => {
                let code = service.err().code().unwrap_or("");
                match code {
                    "AccessDenied"
                    | "Forbidden"
                    | "InvalidAccessKeyId"
                    | "SignatureDoesNotMatch"
                    | "ExpiredToken" => S3ErrorKind::AccessDenied,
                    "NoSuchKey" | "NoSuchBucket" | "NotFound" => S3ErrorKind::NotFound,
                    _ => S3ErrorKind::Service,
                }
            }
            SdkError::TimeoutError(_) => S3ErrorKind::Timeout,
            SdkError::DispatchFailure(failure) if failure.is_timeout() => S3ErrorKind::Timeout,
            SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => S3ErrorKind::Transport,
            _ => S3ErrorKind::Other,
        }
    }
}

/// A failed fetch before it becomes a [`SourceError`]: its kind for the
/// metrics, and the value-free reason.
struct S3Failure {
    kind: S3ErrorKind,
    reason: String,
}

impl S3Source {
    /// A source for `url` read through `client` (the standard credential
    /// chain: the instance role on EC2), each fetch bounded by `timeout`.
    pub fn new(url: S3Url, client: aws_sdk_s3::Client, timeout: Duration) -> Self {
        S3Source {
            url,
            client,
            timeout,
            metrics: None,
        }
    }

    /// Counts each fetch's outcome into `metrics`.
    pub fn set_metrics(&mut self, metrics: Arc<Metrics>) {
        self.metrics = Some(metrics);
    }

    /// The object's URL.
    pub fn url(&self) -> &S3Url {
        &self.url
    }

    /// Fetches the object unless its ETag is still `etag`: `Ok(None)` when
    /// unchanged, else its bytes and ETag.
    pub async fn fetch(
        &self,
        etag: Option<&str>,
    ) -> Result<Option<(Zeroizing<Vec<u8>>, String)>, SourceError> {
        let fetched = tokio::time::timeout(self.timeout, self.fetch_unbounded(etag))
            .await
            .unwrap_or_else(|_| {
                Err(S3Failure {
                    kind: S3ErrorKind::Timeout,
                    reason: format!("no answer within {:?}", self.timeout),
                })
            });
        if let Some(metrics) = &self.metrics {
            metrics.s3_fetch(match &fetched {
                Ok(Some(_)) => "ok",
                Ok(None) => "not_modified",
                Err(failure) => failure.kind.as_str(),
            });
        }
        fetched.map_err(|failure| SourceError::S3 {
            url: self.url.to_string(),
            reason: failure.reason,
        })
    }

    async fn fetch_unbounded(
        &self,
        etag: Option<&str>,
    ) -> Result<Option<(Zeroizing<Vec<u8>>, String)>, S3Failure> {
        let fail = |kind: S3ErrorKind, reason: String| S3Failure { kind, reason };
        let mut request = self
            .client
            .get_object()
            .bucket(&self.url.bucket)
            .key(&self.url.key);
        if let Some(etag) = etag {
            request = request.if_none_match(etag);
        }
        let output = match request.send().await {
            Ok(output) => output,
            Err(err) => {
                if let Some(raw) = err.raw_response()
                    && raw.status().as_u16() == 304
                {
                    return Ok(None);
                }
                let kind = match err.raw_response().map(|r| r.status().as_u16()) {
                    Some(403) => S3ErrorKind::AccessDenied,
                    Some(404) => S3ErrorKind::NotFound,
                    _ => S3ErrorKind::of(&err),
                };
                return Err(fail(kind, describe(&err)));
            }
        };
        let too_large = || {
            fail(
                S3ErrorKind::TooLarge,
                format!("object larger than {MAX_FILE_SIZE} bytes"),
            )
        };
        if output
            .content_length()
            .is_some_and(|len| len < 0 || len as u64 > MAX_FILE_SIZE as u64)
        {
            return Err(too_large());
        }
        let new_etag = output
            .e_tag()
            .ok_or_else(|| {
                fail(
                    S3ErrorKind::InvalidAnswer,
                    "the answer carries no ETag".to_owned(),
                )
            })?
            .to_owned();
        let mut body = output.body;
        let mut bytes = Zeroizing::new(Vec::new());
        while let Some(chunk) = body.try_next().await.map_err(|e| {
            fail(
                S3ErrorKind::Transport,
                format!("reading the object failed: {e}"),
            )
        })? {
            if bytes.len() + chunk.len() > MAX_FILE_SIZE {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(Some((bytes, new_etag)))
    }
}

/// A short, value-free description of an SDK error: the service's error
/// code and HTTP status, or the transport failure.
pub(crate) fn describe<E, R>(err: &SdkError<E, R>) -> String
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug,
{
    match err {
        SdkError::ServiceError(service) => {
            let inner = service.err();
            let code = inner.code().unwrap_or("unknown error");
            match inner.message() {
                Some(message) => format!("{code}: {message}"),
                None => code.to_owned(),
            }
        }
        SdkError::TimeoutError(_) => "the request timed out".to_owned(),
        SdkError::DispatchFailure(failure) => {
            let what = if failure.is_timeout() {
                "timed out"
            } else if failure.is_io() {
                "I/O error"
            } else {
                "failed"
            };
            format!("connecting to S3 {what}: {}", error_chain(err))
        }
        other => error_chain(other),
    }
}

/// An error and its sources, joined by ": ".
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(next) = source {
        text.push_str(": ");
        text.push_str(&next.to_string());
        source = next.source();
    }
    text
}

/// The secrets file could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The local file could not be read.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The S3 object could not be fetched.
    #[error("cannot fetch {url}: {reason}")]
    S3 {
        /// The object's URL.
        url: String,
        /// What went wrong (no value of the file).
        reason: String,
    },
}

/// The secrets file's source, with what was last seen of it.
#[derive(Debug, Clone)]
pub enum SecretsSource {
    /// A local file.
    File(PathBuf),
    /// An S3 object.
    S3(S3Source),
}

impl From<PathBuf> for SecretsSource {
    fn from(path: PathBuf) -> Self {
        SecretsSource::File(path)
    }
}

impl From<S3Source> for SecretsSource {
    fn from(source: S3Source) -> Self {
        SecretsSource::S3(source)
    }
}

impl fmt::Display for SecretsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretsSource::File(path) => path.display().fmt(f),
            SecretsSource::S3(source) => source.url.fmt(f),
        }
    }
}

impl SecretsSource {
    /// The path or URL, as errors name it.
    pub fn origin(&self) -> PathBuf {
        match self {
            SecretsSource::File(path) => path.clone(),
            SecretsSource::S3(source) => PathBuf::from(source.url.to_string()),
        }
    }
}

/// What a poll last saw, to tell a change without reading the contents.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Seen {
    /// Nothing yet (or the last read failed).
    #[default]
    Nothing,
    /// A local file's size and mtime.
    File {
        /// Size in bytes.
        len: u64,
        /// Last modification.
        modified: Option<SystemTime>,
    },
    /// An S3 object's ETag.
    ETag(String),
}

fn file_stamp(path: &Path) -> Seen {
    match std::fs::metadata(path) {
        Ok(meta) => Seen::File {
            len: meta.len(),
            modified: meta.modified().ok(),
        },
        Err(_) => Seen::Nothing,
    }
}

impl SecretsSource {
    /// Reads the contents if they may have changed since `seen` (always
    /// when `force`): `Ok(None)` when unchanged. `seen` is updated only
    /// when contents were read, so a failure is retried.
    pub async fn poll(
        &self,
        seen: &mut Seen,
        force: bool,
    ) -> Result<Option<Zeroizing<Vec<u8>>>, SourceError> {
        match self {
            SecretsSource::File(path) => {
                let stamp = file_stamp(path);
                if !force && stamp != Seen::Nothing && stamp == *seen {
                    return Ok(None);
                }
                let bytes = secrets_file::read(path)?;
                *seen = stamp;
                Ok(Some(bytes))
            }
            SecretsSource::S3(source) => {
                let etag = match (&*seen, force) {
                    (Seen::ETag(etag), false) => Some(etag.as_str()),
                    _ => None,
                };
                match source.fetch(etag).await? {
                    None => Ok(None),
                    Some((bytes, etag)) => {
                        *seen = Seen::ETag(etag);
                        Ok(Some(bytes))
                    }
                }
            }
        }
    }

    /// Reads the contents now, whatever was seen before.
    pub async fn read(&self) -> Result<Zeroizing<Vec<u8>>, SourceError> {
        let mut seen = Seen::Nothing;
        match self.poll(&mut seen, true).await? {
            Some(bytes) => Ok(bytes),
            // A forced poll always reads; an empty answer cannot happen.
            None => Err(SourceError::S3 {
                url: self.to_string(),
                reason: "no contents returned".to_owned(),
            }),
        }
    }
}
