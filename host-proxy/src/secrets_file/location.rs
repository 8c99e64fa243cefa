//! Where an operator command reads and writes a secrets file: a local path
//! or an S3 object (`s3://BUCKET/KEY`).
//!
//! [`Location::read`] returns the bytes with a [`Version`] token (the
//! object's ETag, or the SHA-256 of a local file's bytes), and
//! [`Location::write`] replaces the contents only if they are still that
//! version, so a concurrent writer is never silently overwritten:
//! - S3: one `PutObject` with `If-Match: <ETag read>`; S3 answers
//!   `412 PreconditionFailed` (or `409 ConditionalRequestConflict` for a
//!   racing conditional write) and keeps the other writer's object;
//! - a local file: re-read and compared right before the atomic rename
//!   ([`write_atomically`]); a writer that lands between that check and
//!   the rename is not detected (the window is one `rename`), which is the
//!   best a plain file system offers without locks every editor would have
//!   to honour.
//!
//! [`update`] runs a command's bytes-in/bytes-out core (`encrypt`,
//! `rotate`) on a location: the contents are read into a wiped buffer, the
//! command returns the new contents (or `None`: nothing changed, nothing is
//! written), and they are written back conditionally. The contents never
//! pass through a file of their own: an S3 object goes from `GetObject` to
//! memory to `PutObject` with `If-Match`.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::proxy::source::{DEFAULT_S3_TIMEOUT, S3Source, SourceError};
use crate::secrets_file::dotenv::MAX_FILE_SIZE;
use crate::secrets_file::encrypt::write_atomically;
use crate::secrets_file::{self, Format, ReadError};

/// A `s3://BUCKET/KEY` location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    /// The bucket.
    pub bucket: String,
    /// The object key (may contain `/`).
    pub key: String,
}

impl fmt::Display for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.key)
    }
}

/// A `s3://` URL that cannot name an object.
#[derive(Debug, thiserror::Error)]
#[error("invalid S3 URL {url:?}: {reason} (expected s3://BUCKET/KEY)")]
pub struct S3UrlError {
    /// The URL as given.
    pub url: String,
    /// What is wrong.
    pub reason: &'static str,
}

impl FromStr for S3Url {
    type Err = S3UrlError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let err = |reason| S3UrlError {
            url: url.to_owned(),
            reason,
        };
        let rest = url.strip_prefix("s3://").ok_or_else(|| err("not s3://"))?;
        let (bucket, key) = rest.split_once('/').ok_or_else(|| err("no object key"))?;
        // S3 bucket names: 3 to 63 of lowercase letters, digits, '.', '-'.
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !bucket_ok {
            return Err(err("bad bucket name"));
        }
        // Object keys are at most 1024 bytes of UTF-8.
        if key.is_empty() || key.len() > 1024 {
            return Err(err("empty or over-long object key"));
        }
        if key.chars().any(char::is_control) {
            return Err(err("control character in the object key"));
        }
        Ok(S3Url {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
        })
    }
}

/// Where a secrets file lives, as given on the command line: a path, or a
/// `s3://BUCKET/KEY` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local file.
    File(PathBuf),
    /// An S3 object.
    S3(S3Url),
}

impl Location {
    /// `s3://BUCKET/KEY` is an object (and must be a valid one); anything
    /// else is a path.
    pub fn parse(text: &str) -> Result<Location, S3UrlError> {
        if text.starts_with("s3://") {
            text.parse().map(Location::S3)
        } else {
            Ok(Location::File(PathBuf::from(text)))
        }
    }

    /// The format its name implies ([`Format::from_name`]; for S3, the
    /// object key's).
    pub fn format(&self) -> Format {
        match self {
            Location::File(path) => Format::from_path(path),
            Location::S3(url) => Format::from_name(&url.key),
        }
    }

    /// Reads the contents (at most [`MAX_FILE_SIZE`] bytes, refused
    /// beyond) and their version. S3 needs `s3`.
    pub async fn read(&self, s3: Option<&S3Access>) -> Result<Contents, LocationError> {
        match self {
            Location::File(path) => {
                let bytes = secrets_file::read(path)?;
                if bytes.len() > MAX_FILE_SIZE {
                    return Err(LocationError::TooLarge {
                        location: self.to_string(),
                    });
                }
                let version = Version::Sha256(Sha256::digest(&bytes[..]).into());
                Ok(Contents { bytes, version })
            }
            Location::S3(url) => {
                let s3 = s3.ok_or_else(|| self.no_access())?;
                let source = S3Source::new(url.clone(), s3.client.clone(), s3.timeout);
                match source.fetch(None).await? {
                    Some((bytes, etag)) => Ok(Contents {
                        bytes,
                        version: Version::ETag(etag),
                    }),
                    // An unconditional GetObject always has a body.
                    None => Err(LocationError::S3 {
                        location: self.to_string(),
                        reason: "no contents returned".to_owned(),
                    }),
                }
            }
        }
    }

    /// Replaces the contents with `bytes` if they are still at `read` (the
    /// version [`Location::read`] returned); otherwise
    /// [`LocationError::Conflict`] and nothing is written. Returns the new
    /// version.
    pub async fn write(
        &self,
        s3: Option<&S3Access>,
        bytes: &[u8],
        read: &Version,
    ) -> Result<Version, LocationError> {
        if bytes.len() > MAX_FILE_SIZE {
            return Err(LocationError::TooLarge {
                location: self.to_string(),
            });
        }
        match (self, read) {
            (Location::File(path), Version::Sha256(expected)) => {
                let now = secrets_file::read(path)?;
                let current: [u8; 32] = Sha256::digest(&now[..]).into();
                if current != *expected {
                    return Err(self.conflict());
                }
                write_atomically(path, bytes).map_err(|e| LocationError::WriteFile {
                    location: self.to_string(),
                    reason: e.to_string(),
                })?;
                Ok(Version::Sha256(Sha256::digest(bytes).into()))
            }
            (Location::S3(url), Version::ETag(etag)) => {
                let s3 = s3.ok_or_else(|| self.no_access())?;
                tokio::time::timeout(s3.timeout, s3.put_if_match(self, url, bytes, etag))
                    .await
                    .map_err(|_| LocationError::S3 {
                        location: self.to_string(),
                        reason: format!("no answer within {:?}", s3.timeout),
                    })?
            }
            _ => Err(LocationError::VersionKind {
                location: self.to_string(),
            }),
        }
    }

    fn conflict(&self) -> LocationError {
        LocationError::Conflict {
            location: self.to_string(),
        }
    }

    fn no_access(&self) -> LocationError {
        LocationError::NoS3Access {
            location: self.to_string(),
        }
    }
}

impl FromStr for Location {
    type Err = S3UrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Location::parse(s)
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::File(path) => path.display().fmt(f),
            Location::S3(url) => url.fmt(f),
        }
    }
}

/// What a location held when read, to write back only over the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Version {
    /// SHA-256 of a local file's bytes.
    Sha256([u8; 32]),
    /// An S3 object's ETag (as S3 sent it, quotes included).
    ETag(String),
}

/// A location's bytes and their version.
pub struct Contents {
    /// The bytes, wiped when dropped.
    pub bytes: Zeroizing<Vec<u8>>,
    /// Their version.
    pub version: Version,
}

impl fmt::Debug for Contents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Contents")
            .field("len", &self.bytes.len())
            .field("version", &self.version)
            .finish()
    }
}

/// The S3 client of an operator command and the bound on each call.
#[derive(Debug, Clone)]
pub struct S3Access {
    client: aws_sdk_s3::Client,
    timeout: Duration,
}

impl S3Access {
    /// `client` with each call (request, retries, body) bounded by
    /// `timeout`.
    pub fn new(client: aws_sdk_s3::Client, timeout: Duration) -> Self {
        S3Access { client, timeout }
    }

    /// The standard credential chain and region, with the optional
    /// endpoint (path-style) and extra CA of an S3-compatible or test
    /// server; [`DEFAULT_S3_TIMEOUT`] per call unless given.
    pub async fn connect(
        region: Option<String>,
        endpoint_url: Option<String>,
        extra_ca_pem: Option<Vec<u8>>,
        timeout: Option<Duration>,
    ) -> Result<S3Access, crate::aws::AwsSetupError> {
        let client = crate::aws::s3_client(region, endpoint_url, extra_ca_pem).await?;
        Ok(S3Access::new(client, timeout.unwrap_or(DEFAULT_S3_TIMEOUT)))
    }

    async fn put_if_match(
        &self,
        location: &Location,
        url: &S3Url,
        bytes: &[u8],
        etag: &str,
    ) -> Result<Version, LocationError> {
        let result = self
            .client
            .put_object()
            .bucket(&url.bucket)
            .key(&url.key)
            .if_match(etag)
            .body(ByteStream::from(bytes.to_vec()))
            .send()
            .await;
        match result {
            Ok(output) => Ok(Version::ETag(output.e_tag().unwrap_or_default().to_owned())),
            Err(err) => {
                let status = err.raw_response().map(|raw| raw.status().as_u16());
                // 412: the ETag no longer matches; 409: another conditional
                // write to the same key is in flight.
                if matches!(status, Some(412 | 409)) {
                    return Err(location.conflict());
                }
                Err(LocationError::S3 {
                    location: location.to_string(),
                    reason: crate::proxy::source::describe(&err),
                })
            }
        }
    }
}

/// Why a location could not be read or written. Names the location, never
/// contents.
#[derive(Debug, thiserror::Error)]
pub enum LocationError {
    /// The local file could not be read.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The S3 object could not be fetched.
    #[error(transparent)]
    Fetch(#[from] SourceError),
    /// The contents changed since they were read; nothing was written.
    #[error(
        "{location} changed since it was read (another writer?); nothing was written: \
         run the command again on the new contents"
    )]
    Conflict {
        /// The path or URL.
        location: String,
    },
    /// The contents exceed the secrets-file bound.
    #[error("{location} is larger than {MAX_FILE_SIZE} bytes")]
    TooLarge {
        /// The path or URL.
        location: String,
    },
    /// An S3 call failed.
    #[error("cannot write {location}: {reason}")]
    S3 {
        /// The URL.
        location: String,
        /// S3's error code and message, or the transport failure.
        reason: String,
    },
    /// The local file could not be replaced.
    #[error("cannot write {location}: {reason}")]
    WriteFile {
        /// The path.
        location: String,
        /// The OS error.
        reason: String,
    },
    /// An S3 location was used without an S3 client.
    #[error("{location}: no S3 client configured")]
    NoS3Access {
        /// The URL.
        location: String,
    },
    /// A version token of the other kind of location.
    #[error("{location}: the version given was not read from this kind of location")]
    VersionKind {
        /// The path or URL.
        location: String,
    },
}

/// What [`update`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Updated {
    /// The command left the contents as they were: nothing was written.
    Unchanged,
    /// New contents were written (S3: conditionally); their version.
    Written(Version),
}

/// Runs `command` on the contents of `location` (read with their
/// version): `command` returns its result and the new contents, or `None`
/// if it changed nothing. New contents are written back only over the
/// version read (S3: `If-Match`; a local file: compared right before the
/// rename), else [`LocationError::Conflict`]. A command error writes
/// nothing.
pub async fn update<T, E, F, Fut>(
    location: &Location,
    s3: Option<&S3Access>,
    command: F,
) -> Result<(T, Updated), E>
where
    F: FnOnce(Zeroizing<Vec<u8>>) -> Fut,
    Fut: Future<Output = Result<(T, Option<Zeroizing<Vec<u8>>>), E>>,
    E: From<LocationError>,
{
    let Contents { bytes, version } = location.read(s3).await?;
    let (out, new) = command(bytes).await?;
    let Some(new) = new else {
        return Ok((out, Updated::Unchanged));
    };
    let written = location.write(s3, &new, &version).await?;
    Ok((out, Updated::Written(written)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_urls() {
        let url: S3Url = "s3://my-bucket/dir/secrets.env".parse().unwrap();
        assert_eq!(url.bucket, "my-bucket");
        assert_eq!(url.key, "dir/secrets.env");
        assert_eq!(url.to_string(), "s3://my-bucket/dir/secrets.env");
        for bad in [
            "s3://",
            "s3://bucket",
            "s3://bucket/",
            "s3://Bucket/key",
            "s3://b/key",
            "s3://bucket/a\nb",
            "https://bucket/key",
        ] {
            assert!(bad.parse::<S3Url>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn locations() {
        assert_eq!(
            Location::parse("/etc/keystore/secrets.env").unwrap(),
            Location::File("/etc/keystore/secrets.env".into())
        );
        let s3 = Location::parse("s3://bucket/dir/app.yaml").unwrap();
        assert!(matches!(s3, Location::S3(_)));
        assert_eq!(s3.format(), Format::Yaml);
        assert_eq!(
            Location::parse("conf/app.json").unwrap().format(),
            Format::Json
        );
        assert!(Location::parse("s3://x").is_err());
    }

    #[tokio::test]
    async fn a_file_changed_since_it_was_read_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.env");
        std::fs::write(&path, "A=1\n").unwrap();
        let location = Location::File(path.clone());
        let read = location.read(None).await.unwrap();
        assert_eq!(&read.bytes[..], b"A=1\n");

        // Another writer...
        std::fs::write(&path, "A=2\n").unwrap();
        let err = location
            .write(None, b"A=ENC\n", &read.version)
            .await
            .unwrap_err();
        assert!(matches!(err, LocationError::Conflict { .. }), "{err}");
        assert!(err.to_string().contains("changed since it was read"));
        assert_eq!(std::fs::read(&path).unwrap(), b"A=2\n");

        // ...and from the current version, the write goes through.
        let read = location.read(None).await.unwrap();
        let written = location.write(None, b"A=3\n", &read.version).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"A=3\n");
        assert_eq!(written, location.read(None).await.unwrap().version);
    }

    #[tokio::test]
    async fn an_s3_location_needs_a_client_and_versions_do_not_mix() {
        let s3 = Location::parse("s3://bucket/app.env").unwrap();
        assert!(matches!(
            s3.read(None).await.unwrap_err(),
            LocationError::NoS3Access { .. }
        ));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.env");
        std::fs::write(&path, "A=1\n").unwrap();
        let file = Location::File(path.clone());
        let err = file
            .write(None, b"A=2\n", &Version::ETag("\"x\"".into()))
            .await
            .unwrap_err();
        assert!(matches!(err, LocationError::VersionKind { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"A=1\n");
    }

    #[tokio::test]
    async fn update_writes_only_new_contents_over_the_version_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.env");
        std::fs::write(&path, "A=1\n").unwrap();
        let location = Location::File(path.clone());

        // Nothing new: nothing written.
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        let (_, updated) = update(&location, None, |bytes| async move {
            assert_eq!(&bytes[..], b"A=1\n");
            Ok::<_, LocationError>(((), None))
        })
        .await
        .unwrap();
        assert_eq!(updated, Updated::Unchanged);
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            modified
        );

        // Changed underneath the command: refused, the other writer kept.
        let other = path.clone();
        let err = update(&location, None, |_bytes| async move {
            std::fs::write(&other, "A=2\n").unwrap();
            Ok::<_, LocationError>(((), Some(Zeroizing::new(b"A=mine\n".to_vec()))))
        })
        .await
        .unwrap_err();
        assert!(matches!(err, LocationError::Conflict { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"A=2\n");

        // A command error writes nothing.
        let err = update(&location, None, |_bytes| async {
            Err::<((), Option<Zeroizing<Vec<u8>>>), _>(LocationError::NoS3Access {
                location: "x".into(),
            })
        })
        .await
        .unwrap_err();
        assert!(matches!(err, LocationError::NoS3Access { .. }));
        assert_eq!(std::fs::read(&path).unwrap(), b"A=2\n");

        // New contents: written, the version returned is theirs.
        let (_, updated) = update(&location, None, |_bytes| async {
            Ok::<_, LocationError>(((), Some(Zeroizing::new(b"A=3\n".to_vec()))))
        })
        .await
        .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"A=3\n");
        assert_eq!(
            updated,
            Updated::Written(location.read(None).await.unwrap().version)
        );
    }
}
