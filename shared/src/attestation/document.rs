//! The attestation payload: a CBOR map decoded into [`AttestationDocument`].
//!
//! Decoding is two-stage: serde reads the map with strict types (byte
//! fields must be CBOR byte strings, no duplicate keys), then [`validate`]
//! applies the NSM limits and returns typed errors.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::chain::{self, CertificateInfo};
use super::error::AttestationError;
use super::{MAX_CABUNDLE_LEN, MAX_CERT_LEN, MAX_FIELD_LEN, MAX_PCRS, cose};

/// A decoded NSM attestation document (the COSE_Sign1 payload).
///
/// Obtained verified from [`Verifier::verify`](super::Verifier::verify), or
/// unverified from [`AttestationDocument::parse_unverified`] for display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestationDocument {
    /// Enclave module id, e.g. `i-0a22e5c5f24d22174-enc0191cceb4289903f`.
    pub module_id: String,
    /// Digest used for the PCRs; always "SHA384" once validated.
    pub digest: String,
    /// Milliseconds since the Unix epoch, set by the NSM.
    pub timestamp: u64,
    /// PCR index (< 32) → value (32, 48 or 64 bytes).
    pub pcrs: BTreeMap<u16, Vec<u8>>,
    /// DER leaf certificate whose key signed the document.
    pub certificate: Vec<u8>,
    /// DER certificates: `cabundle[0]` is the root, then intermediates in order.
    pub cabundle: Vec<Vec<u8>>,
    /// Public key the enclave asked to embed (KMS encrypts to it).
    pub public_key: Option<Vec<u8>>,
    /// Application data the enclave asked to embed.
    pub user_data: Option<Vec<u8>>,
    /// Nonce the enclave asked to embed (freshness against replay).
    pub nonce: Option<Vec<u8>>,
}

impl AttestationDocument {
    /// Decodes a COSE_Sign1 document WITHOUT checking its signature or chain:
    /// for display and diagnostics only, never for trust decisions.
    pub fn parse_unverified(cose_bytes: &[u8]) -> Result<Self, AttestationError> {
        let sign1 = cose::CoseDocument::parse(cose_bytes)?;
        Self::from_payload(sign1.payload())
    }

    /// Decodes and validates a CBOR payload map (definite or indefinite length).
    pub(crate) fn from_payload(payload: &[u8]) -> Result<Self, AttestationError> {
        let raw: RawPayload = serde_cbor::from_slice(payload)
            .map_err(|e| AttestationError::malformed(format!("payload: {e}")))?;
        validate(raw)
    }

    /// Subjects and validity of `certificate` then `cabundle` (leaf first),
    /// for display; says nothing about whether the chain is trusted.
    pub fn certificate_chain(&self) -> Result<Vec<CertificateInfo>, AttestationError> {
        let path = chain::parse_path(&self.certificate, &self.cabundle)?;
        Ok(path.iter().enumerate().map(|(d, c)| c.info(d)).collect())
    }

    /// The NSM timestamp as a [`SystemTime`].
    pub fn time(&self) -> Option<SystemTime> {
        UNIX_EPOCH.checked_add(Duration::from_millis(self.timestamp))
    }
}

fn validate(raw: RawPayload) -> Result<AttestationDocument, AttestationError> {
    let missing = |field: &str| AttestationError::malformed(format!("payload lacks {field}"));
    let module_id = raw.module_id.ok_or_else(|| missing("module_id"))?;
    if module_id.is_empty() {
        return Err(AttestationError::malformed("module_id is empty"));
    }
    let digest = raw.digest.ok_or_else(|| missing("digest"))?;
    if digest != "SHA384" {
        return Err(AttestationError::BadDigest { digest });
    }
    let timestamp = raw.timestamp.ok_or_else(|| missing("timestamp"))?;
    let raw_pcrs = raw.pcrs.ok_or_else(|| missing("pcrs"))?;
    if raw_pcrs.0.is_empty() {
        return Err(AttestationError::malformed("pcrs is empty"));
    }
    let mut pcrs = BTreeMap::new();
    for (index, Bytes(value)) in raw_pcrs.0 {
        let idx = match u16::try_from(index) {
            Ok(i) if usize::from(i) < MAX_PCRS => i,
            _ => {
                return Err(AttestationError::BadPcr {
                    index,
                    reason: format!("index out of range (must be < {MAX_PCRS})"),
                });
            }
        };
        if !matches!(value.len(), 32 | 48 | 64) {
            return Err(AttestationError::BadPcr {
                index,
                reason: format!("{} bytes, expected 32, 48 or 64", value.len()),
            });
        }
        pcrs.insert(idx, value);
    }
    let Bytes(certificate) = raw.certificate.ok_or_else(|| missing("certificate"))?;
    check_cert_len("certificate", &certificate)?;
    let cabundle: Vec<Vec<u8>> = raw
        .cabundle
        .ok_or_else(|| missing("cabundle"))?
        .into_iter()
        .map(|Bytes(b)| b)
        .collect();
    if cabundle.is_empty() {
        return Err(AttestationError::malformed("cabundle is empty"));
    }
    if cabundle.len() > MAX_CABUNDLE_LEN {
        return Err(AttestationError::FieldTooLarge {
            field: "cabundle",
            len: cabundle.len(),
        });
    }
    for cert in &cabundle {
        check_cert_len("cabundle entry", cert)?;
    }
    let optional = |field: &'static str, v: Option<Option<Bytes>>| match v.flatten() {
        Some(Bytes(b)) if b.len() > MAX_FIELD_LEN => Err(AttestationError::FieldTooLarge {
            field,
            len: b.len(),
        }),
        other => Ok(other.map(|Bytes(b)| b)),
    };
    Ok(AttestationDocument {
        module_id,
        digest,
        timestamp,
        pcrs,
        certificate,
        cabundle,
        public_key: optional("public_key", raw.public_key)?,
        user_data: optional("user_data", raw.user_data)?,
        nonce: optional("nonce", raw.nonce)?,
    })
}

fn check_cert_len(field: &'static str, der: &[u8]) -> Result<(), AttestationError> {
    if der.is_empty() {
        return Err(AttestationError::malformed(format!("{field} is empty")));
    }
    if der.len() > MAX_CERT_LEN {
        return Err(AttestationError::FieldTooLarge {
            field,
            len: der.len(),
        });
    }
    Ok(())
}

/// A CBOR byte string, and only that: serde_bytes would also take an array
/// of integers, which the NSM never sends.
struct Bytes(Vec<u8>);

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Bytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a CBOR byte string")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes(v.to_vec()))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes(v))
            }
        }
        d.deserialize_bytes(V)
    }
}

/// `pcrs`: unsigned index → byte string, duplicates and oversize maps refused.
struct PcrMap(BTreeMap<u64, Bytes>);

impl<'de> Deserialize<'de> for PcrMap {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PcrMap;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of PCR index to byte string")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PcrMap, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(index) = map.next_key::<u64>()? {
                    if out.len() >= MAX_PCRS {
                        return Err(de::Error::custom(format!("more than {MAX_PCRS} PCRs")));
                    }
                    let value: Bytes = map.next_value()?;
                    if out.insert(index, value).is_some() {
                        return Err(de::Error::custom(format!("duplicate PCR index {index}")));
                    }
                }
                Ok(PcrMap(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// `cabundle`: an array of byte strings, bounded while reading.
struct CaBundle(Vec<Bytes>);

impl<'de> Deserialize<'de> for CaBundle {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CaBundle;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of byte strings")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<CaBundle, A::Error> {
                let mut out = Vec::new();
                while let Some(cert) = seq.next_element::<Bytes>()? {
                    if out.len() >= MAX_CABUNDLE_LEN {
                        return Err(de::Error::custom(format!(
                            "cabundle has more than {MAX_CABUNDLE_LEN} certificates"
                        )));
                    }
                    out.push(cert);
                }
                Ok(CaBundle(out))
            }
        }
        d.deserialize_seq(V)
    }
}

/// The payload map as read, before limits are applied. Optional fields are
/// `Option<Option<_>>`: absent vs present-with-null are both accepted.
#[derive(Default)]
struct RawPayload {
    module_id: Option<String>,
    digest: Option<String>,
    timestamp: Option<u64>,
    pcrs: Option<PcrMap>,
    certificate: Option<Bytes>,
    cabundle: Option<Vec<Bytes>>,
    public_key: Option<Option<Bytes>>,
    user_data: Option<Option<Bytes>>,
    nonce: Option<Option<Bytes>>,
}

fn set_once<T, E: de::Error>(slot: &mut Option<T>, value: T, key: &str) -> Result<(), E> {
    if slot.is_some() {
        return Err(E::custom(format!("duplicate key {key}")));
    }
    *slot = Some(value);
    Ok(())
}

impl<'de> Deserialize<'de> for RawPayload {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawPayload;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an attestation document map")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawPayload, A::Error> {
                let mut p = RawPayload::default();
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "module_id" => set_once(&mut p.module_id, map.next_value()?, &key)?,
                        "digest" => set_once(&mut p.digest, map.next_value()?, &key)?,
                        "timestamp" => set_once(&mut p.timestamp, map.next_value()?, &key)?,
                        "pcrs" => set_once(&mut p.pcrs, map.next_value()?, &key)?,
                        "certificate" => set_once(&mut p.certificate, map.next_value()?, &key)?,
                        "cabundle" => {
                            let CaBundle(v) = map.next_value()?;
                            set_once(&mut p.cabundle, v, &key)?
                        }
                        "public_key" => set_once(&mut p.public_key, map.next_value()?, &key)?,
                        "user_data" => set_once(&mut p.user_data, map.next_value()?, &key)?,
                        "nonce" => set_once(&mut p.nonce, map.next_value()?, &key)?,
                        // Unknown keys are ignored so a newer NSM adding a
                        // field does not break verification.
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(p)
            }
        }
        d.deserialize_map(V)
    }
}
