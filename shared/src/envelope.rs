//! The `ENC[...]` value format of secret files.
//!
//! Operators keep `.env`/JSON/YAML files where secret values read
//! `ENC[v1:<kind>:<base64>]` and everything else stays plain. The version
//! and kind travel inside the brackets so the format can grow without
//! guessing. Three kinds exist:
//!
//! - `kms`: a KMS `CiphertextBlob` of `Encrypt` with the encryption context
//!   `{"keystore:name": "<name>"}`, which binds it to its name: a host
//!   cannot move one secret's ciphertext under another name (at most
//!   [`MAX_KMS_CIPHERTEXT`] bytes, so values up to 4 KiB);
//! - `fk`: AES-256-GCM under the file's data key, the name bound in the AAD
//!   (nonce ‖ ciphertext ‖ tag; values up to
//!   [`DEFAULT_MAX_SECRET_VALUE`](crate::protocol::DEFAULT_MAX_SECRET_VALUE));
//! - `file`: the encoded file record, the value of the reserved entry
//!   `keystore:file` (see [`crate::file_record`]).

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::file_record::{FK_OVERHEAD, MAX_FK_PLAINTEXT, MAX_RECORD_LEN};

/// Encryption-context key that binds a ciphertext to its secret's name.
pub const NAME_CONTEXT_KEY: &str = "keystore:name";

/// Largest KMS `CiphertextBlob` (KMS's documented maximum is 6144 bytes).
pub const MAX_KMS_CIPHERTEXT: usize = 6144;

/// Largest `fk` payload: nonce, the largest value and the GCM tag.
pub const MAX_FK_SEALED: usize = MAX_FK_PLAINTEXT + FK_OVERHEAD;

/// Longest `kms` envelope text: base64 of the largest blob plus framing.
pub const MAX_ENVELOPE_LEN: usize = envelope_len(MAX_KMS_CIPHERTEXT);

/// Longest envelope text of any kind (a `file` record of a full load).
pub const MAX_ANY_ENVELOPE_LEN: usize = envelope_len(MAX_RECORD_LEN);

/// Text length of an envelope whose payload is `payload` bytes, plus room
/// for the framing.
const fn envelope_len(payload: usize) -> usize {
    payload.div_ceil(3) * 4 + 16
}

const PREFIX: &str = "ENC[";
const SUFFIX: &str = "]";

/// A parsed `ENC[...]` value.
#[derive(Clone, PartialEq, Eq)]
pub enum Envelope {
    /// `ENC[v1:kms:...]`: a value encrypted directly by KMS `Encrypt`.
    Kms {
        /// The KMS `CiphertextBlob`.
        ciphertext: Vec<u8>,
    },
    /// `ENC[v1:fk:...]`: a value sealed under the file's data key
    /// (see [`crate::file_record::FileKey`]).
    Fk {
        /// Nonce ‖ ciphertext ‖ GCM tag.
        sealed: Vec<u8>,
    },
    /// `ENC[v1:file:...]`: the file record (only under the reserved name
    /// `keystore:file`; decode it with
    /// [`FileRecord::decode`](crate::file_record::FileRecord::decode)).
    File {
        /// The encoded record.
        record: Vec<u8>,
    },
}

/// Why a string is not a usable envelope. Messages never repeat the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// The text is not of the form `ENC[...]`.
    #[error("not an ENC[...] value")]
    NotAnEnvelope,
    /// Longer than any envelope this version writes.
    #[error("ENC[...] value is {len} characters; at most {max} are accepted")]
    TooLarge {
        /// Length of the text.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A version this build does not know.
    #[error("unsupported ENC[...] version `{0}` (this build reads v1)")]
    UnsupportedVersion(String),
    /// A kind this build does not know.
    #[error("unsupported ENC[v1:...] kind `{0}` (this build reads `kms`, `fk` and `file`)")]
    UnsupportedKind(String),
    /// The payload is not standard base64.
    #[error("ENC[...] payload is not valid base64")]
    BadBase64,
    /// The payload decodes to nothing, or to more than KMS ever returns.
    #[error("ENC[...] ciphertext is {len} bytes; expected 1..={max}")]
    BadCiphertextLength {
        /// Decoded length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An `fk` payload shorter than a nonce and a tag, or longer than the
    /// largest value sealed.
    #[error("ENC[v1:fk:...] payload is {len} bytes; expected {min}..={max}")]
    BadSealedLength {
        /// Decoded length.
        len: usize,
        /// Nonce + tag.
        min: usize,
        /// The limit.
        max: usize,
    },
}

impl Envelope {
    /// Whether `text` looks like an envelope (it may still fail to parse).
    pub fn is_envelope(text: &str) -> bool {
        let text = text.trim();
        text.starts_with(PREFIX) && text.ends_with(SUFFIX)
    }

    /// Parses `ENC[v1:<kind>:<base64>]`; surrounding whitespace is ignored.
    /// Every size is checked before anything is decoded.
    pub fn parse(text: &str) -> Result<Self, EnvelopeError> {
        let text = text.trim();
        if text.len() > MAX_ANY_ENVELOPE_LEN {
            return Err(EnvelopeError::TooLarge {
                len: text.len(),
                max: MAX_ANY_ENVELOPE_LEN,
            });
        }
        let inner = text
            .strip_prefix(PREFIX)
            .and_then(|t| t.strip_suffix(SUFFIX))
            .ok_or(EnvelopeError::NotAnEnvelope)?;
        let mut parts = inner.splitn(3, ':');
        let (Some(version), Some(kind), Some(payload)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(EnvelopeError::NotAnEnvelope);
        };
        if version != "v1" {
            return Err(EnvelopeError::UnsupportedVersion(short(version)));
        }
        let max_payload = match kind {
            "kms" => MAX_KMS_CIPHERTEXT,
            "fk" => MAX_FK_SEALED,
            "file" => MAX_RECORD_LEN,
            _ => return Err(EnvelopeError::UnsupportedKind(short(kind))),
        };
        let max_text = envelope_len(max_payload);
        if text.len() > max_text {
            return Err(EnvelopeError::TooLarge {
                len: text.len(),
                max: max_text,
            });
        }
        let bytes = STANDARD
            .decode(payload)
            .map_err(|_| EnvelopeError::BadBase64)?;
        match kind {
            "kms" => Envelope::kms(bytes),
            "fk" => Envelope::fk(bytes),
            _ => Envelope::file(bytes),
        }
    }

    /// Wraps a KMS `CiphertextBlob`.
    pub fn kms(ciphertext: Vec<u8>) -> Result<Self, EnvelopeError> {
        if ciphertext.is_empty() || ciphertext.len() > MAX_KMS_CIPHERTEXT {
            return Err(EnvelopeError::BadCiphertextLength {
                len: ciphertext.len(),
                max: MAX_KMS_CIPHERTEXT,
            });
        }
        Ok(Envelope::Kms { ciphertext })
    }

    /// Wraps a sealed `fk` value (nonce ‖ ciphertext ‖ tag).
    pub fn fk(sealed: Vec<u8>) -> Result<Self, EnvelopeError> {
        if sealed.len() < FK_OVERHEAD || sealed.len() > MAX_FK_SEALED {
            return Err(EnvelopeError::BadSealedLength {
                len: sealed.len(),
                min: FK_OVERHEAD,
                max: MAX_FK_SEALED,
            });
        }
        Ok(Envelope::Fk { sealed })
    }

    /// Wraps an encoded file record (its structure is checked by
    /// [`FileRecord::decode`](crate::file_record::FileRecord::decode)).
    pub fn file(record: Vec<u8>) -> Result<Self, EnvelopeError> {
        if record.is_empty() || record.len() > MAX_RECORD_LEN {
            return Err(EnvelopeError::BadCiphertextLength {
                len: record.len(),
                max: MAX_RECORD_LEN,
            });
        }
        Ok(Envelope::File { record })
    }

    /// The decoded payload: the KMS ciphertext to hand to `Decrypt` for
    /// `kms`, the sealed bytes for `fk`, the encoded record for `file`.
    pub fn ciphertext(&self) -> &[u8] {
        match self {
            Envelope::Kms { ciphertext } => ciphertext,
            Envelope::Fk { sealed } => sealed,
            Envelope::File { record } => record,
        }
    }

    /// The kind as written between the colons (`kms`, `fk`, `file`).
    pub fn kind(&self) -> &'static str {
        match self {
            Envelope::Kms { .. } => "kms",
            Envelope::Fk { .. } => "fk",
            Envelope::File { .. } => "file",
        }
    }
}

/// The encryption context that binds a value to `name`.
pub fn encryption_context(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(NAME_CONTEXT_KEY.to_owned(), name.to_owned())])
}

/// Keeps error messages short and printable whatever the input was.
fn short(s: &str) -> String {
    s.chars()
        .take(16)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

impl fmt::Display for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}v1:{}:{}{SUFFIX}",
            self.kind(),
            STANDARD.encode(self.ciphertext())
        )
    }
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Envelope")
            .field("kind", &self.kind())
            .field("payload_len", &self.ciphertext().len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text() {
        let env = Envelope::kms(vec![1, 2, 3, 250]).unwrap();
        let text = env.to_string();
        assert_eq!(text, "ENC[v1:kms:AQID+g==]");
        assert!(Envelope::is_envelope(&text));
        assert_eq!(Envelope::parse(&format!("  {text}\n")).unwrap(), env);
        assert_eq!(env.ciphertext(), &[1, 2, 3, 250]);
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        let cases = [
            ("plain value", EnvelopeError::NotAnEnvelope),
            ("ENC[v1:kms]", EnvelopeError::NotAnEnvelope),
            ("ENC[v1:kms:AQID", EnvelopeError::NotAnEnvelope),
            (
                "ENC[v2:kms:AQID]",
                EnvelopeError::UnsupportedVersion("v2".into()),
            ),
            (
                "ENC[v1:age:AQID]",
                EnvelopeError::UnsupportedKind("age".into()),
            ),
            (
                "ENC[v1:fk:AQID]",
                EnvelopeError::BadSealedLength {
                    len: 3,
                    min: FK_OVERHEAD,
                    max: MAX_FK_SEALED,
                },
            ),
            (
                "ENC[v1:file:]",
                EnvelopeError::BadCiphertextLength {
                    len: 0,
                    max: MAX_RECORD_LEN,
                },
            ),
            ("ENC[v1:kms:not base64!]", EnvelopeError::BadBase64),
            (
                "ENC[v1:kms:]",
                EnvelopeError::BadCiphertextLength {
                    len: 0,
                    max: MAX_KMS_CIPHERTEXT,
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(Envelope::parse(text).unwrap_err(), want, "{text}");
        }
        // Each kind has its own bound, checked before decoding.
        let huge = format!("ENC[v1:kms:{}]", "A".repeat(MAX_ENVELOPE_LEN));
        assert!(matches!(
            Envelope::parse(&huge),
            Err(EnvelopeError::TooLarge { .. })
        ));
        let huge = format!("ENC[v1:fk:{}]", "A".repeat(envelope_len(MAX_FK_SEALED)));
        assert!(matches!(
            Envelope::parse(&huge),
            Err(EnvelopeError::TooLarge { .. })
        ));
        let huge = format!("ENC[v1:fk:{}]", "A".repeat(MAX_ANY_ENVELOPE_LEN));
        assert!(matches!(
            Envelope::parse(&huge),
            Err(EnvelopeError::TooLarge { .. })
        ));
    }

    #[test]
    fn the_largest_kms_blob_fits() {
        let env = Envelope::kms(vec![0xff; MAX_KMS_CIPHERTEXT]).unwrap();
        assert_eq!(Envelope::parse(&env.to_string()).unwrap(), env);
        assert!(Envelope::kms(vec![0; MAX_KMS_CIPHERTEXT + 1]).is_err());
    }

    #[test]
    fn fk_and_file_round_trip_and_the_largest_value_fits() {
        let fk = Envelope::fk(vec![7; MAX_FK_SEALED]).unwrap();
        let text = fk.to_string();
        assert!(text.starts_with("ENC[v1:fk:"));
        assert_eq!(Envelope::parse(&text).unwrap(), fk);
        assert!(Envelope::fk(vec![0; MAX_FK_SEALED + 1]).is_err());
        assert!(Envelope::fk(vec![0; FK_OVERHEAD - 1]).is_err());
        let file = Envelope::file(vec![1, 2, 3]).unwrap();
        assert_eq!(file.to_string(), "ENC[v1:file:AQID]");
        assert_eq!(Envelope::parse("ENC[v1:file:AQID]").unwrap(), file);
        assert_eq!(
            format!("{fk:?}"),
            format!("Envelope {{ kind: \"fk\", payload_len: {MAX_FK_SEALED} }}")
        );
    }

    #[test]
    fn context_names_the_value() {
        let ctx = encryption_context("DB_PASSWORD");
        assert_eq!(
            ctx.get("keystore:name").map(String::as_str),
            Some("DB_PASSWORD")
        );
        assert_eq!(ctx.len(), 1);
    }

    #[test]
    fn errors_and_debug_do_not_repeat_the_payload() {
        let env = Envelope::kms(b"ciphertext-bytes".to_vec()).unwrap();
        assert!(!format!("{env:?}").contains("Y2lwaGVy"));
        for text in ["ENC[v1:kms:hunter2!hunter2]", "ENC[v1:age:hunter2hunter2]"] {
            let err = Envelope::parse(text).unwrap_err();
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
        // Unknown kinds are echoed, but cut short and printable.
        let err = Envelope::parse("ENC[v1:kind-that-goes-on-and-on\u{7}:AAAA]").unwrap_err();
        assert_eq!(
            err,
            EnvelopeError::UnsupportedKind("kind-that-goes-o".into())
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_any_text(s in ".{0,200}") {
            let _ = Envelope::parse(&s);
            let _ = Envelope::parse(&format!("ENC[{s}]"));
            let _ = Envelope::parse(&format!("ENC[v1:fk:{s}]"));
            let _ = Envelope::parse(&format!("ENC[v1:file:{s}]"));
        }

        #[test]
        fn every_kind_round_trips(kind in 0..3u8, payload in proptest::collection::vec(proptest::num::u8::ANY, 1..200)) {
            let env = match kind {
                0 => Envelope::kms(payload),
                1 => Envelope::fk([payload.as_slice(), &[0; FK_OVERHEAD]].concat()),
                _ => Envelope::file(payload),
            }.unwrap();
            proptest::prop_assert_eq!(Envelope::parse(&env.to_string()).unwrap(), env);
        }
    }
}
