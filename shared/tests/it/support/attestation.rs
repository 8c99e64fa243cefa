//! Test helpers: real vectors, a tiny CBOR writer, a P-384 test PKI built
//! with x509-cert's builder, and a COSE_Sign1 signer written from RFC 9052
//! (independent of the code under test).
#![allow(dead_code, clippy::unwrap_used, missing_docs)]

use std::str::FromStr;
use std::time::{Duration, SystemTime};

use der::Encode;
use p384::ecdsa::signature::hazmat::PrehashSigner;
use p384::ecdsa::{DerSignature, Signature, SigningKey};
use sha2::{Digest, Sha384};
use spki::{SubjectPublicKeyInfoOwned, SubjectPublicKeyInfoRef};
use x509_cert::builder::profile::BuilderProfile;
use x509_cert::builder::{Builder, CertificateBuilder};
use x509_cert::certificate::TbsCertificate;
use x509_cert::ext::pkix::{BasicConstraints, KeyUsage, KeyUsages};
use x509_cert::ext::{Extension, ToExtension};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::{Time, Validity};

pub const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/vectors/nitro-kms");

pub fn vector(rel: &str) -> Vec<u8> {
    std::fs::read(format!("{VECTORS}/{rel}")).unwrap()
}

pub fn real_doc(name: &str) -> Vec<u8> {
    vector(&format!("attestation/{name}"))
}

pub const REAL_DOCS: [&str; 6] = [
    "blocky_2024-09-07_debug_max1024.cose",
    "blocky_2024-09-07_production_max1024.cose",
    "evervault_2022-10-12_debug.cose",
    "evervault_2022-10-13_production.cose",
    "evervault_2023-01-18_production_from_cert_san.cose",
    "evervault_2023-09-18_debug.cose",
];

// ---- CBOR writer -------------------------------------------------------

pub fn head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    match n {
        0..=23 => out.push(m | n as u8),
        24..=0xff => out.extend([m | 24, n as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend((n as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend((n as u32).to_be_bytes());
        }
        _ => {
            out.push(m | 27);
            out.extend(n.to_be_bytes());
        }
    }
}

pub fn bstr(out: &mut Vec<u8>, b: &[u8]) {
    head(out, 2, b.len() as u64);
    out.extend_from_slice(b);
}

pub fn tstr(out: &mut Vec<u8>, s: &str) {
    head(out, 3, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// An optional payload field: omitted, CBOR null, or bytes.
#[derive(Clone, Debug)]
pub enum Opt {
    Absent,
    Null,
    Bytes(Vec<u8>),
}

/// Everything that goes into a test payload, with knobs for odd encodings.
#[derive(Clone, Debug)]
pub struct Payload {
    pub module_id: String,
    pub digest: String,
    pub timestamp: u64,
    pub pcrs: Vec<(u64, Vec<u8>)>,
    pub certificate: Vec<u8>,
    pub cabundle: Vec<Vec<u8>>,
    pub public_key: Opt,
    pub user_data: Opt,
    pub nonce: Opt,
    /// Encode the top-level map as `0xbf ... 0xff`.
    pub indefinite: bool,
    /// Encode the timestamp as a non-minimal 8-byte integer.
    pub wide_timestamp: bool,
    /// Encode `user_data` as an array of integers instead of a byte string.
    pub user_data_as_array: bool,
    /// Extra raw (key, value) CBOR items appended to the map.
    pub extra: Vec<Vec<u8>>,
}

impl Payload {
    pub fn encode(&self) -> Vec<u8> {
        let mut fields: Vec<Vec<u8>> = Vec::new();
        let mut f = |key: &str, value: &dyn Fn(&mut Vec<u8>)| {
            let mut b = Vec::new();
            tstr(&mut b, key);
            value(&mut b);
            fields.push(b);
        };
        f("module_id", &|b| tstr(b, &self.module_id));
        f("digest", &|b| tstr(b, &self.digest));
        f("timestamp", &|b| {
            if self.wide_timestamp {
                b.push(0x1b);
                b.extend(self.timestamp.to_be_bytes());
            } else {
                head(b, 0, self.timestamp);
            }
        });
        f("pcrs", &|b| {
            head(b, 5, self.pcrs.len() as u64);
            for (i, v) in &self.pcrs {
                head(b, 0, *i);
                bstr(b, v);
            }
        });
        f("certificate", &|b| bstr(b, &self.certificate));
        f("cabundle", &|b| {
            head(b, 4, self.cabundle.len() as u64);
            for c in &self.cabundle {
                bstr(b, c);
            }
        });
        let opt = |key: &str, o: &Opt, as_array: bool, fields: &mut Vec<Vec<u8>>| {
            let mut b = Vec::new();
            match o {
                Opt::Absent => return,
                Opt::Null => {
                    tstr(&mut b, key);
                    b.push(0xf6);
                }
                Opt::Bytes(v) if as_array => {
                    tstr(&mut b, key);
                    head(&mut b, 4, v.len() as u64);
                    for x in v {
                        head(&mut b, 0, u64::from(*x));
                    }
                }
                Opt::Bytes(v) => {
                    tstr(&mut b, key);
                    bstr(&mut b, v);
                }
            }
            fields.push(b);
        };
        opt("public_key", &self.public_key, false, &mut fields);
        opt(
            "user_data",
            &self.user_data,
            self.user_data_as_array,
            &mut fields,
        );
        opt("nonce", &self.nonce, false, &mut fields);
        fields.extend(self.extra.iter().cloned());
        let mut out = Vec::new();
        if self.indefinite {
            out.push(0xbf);
        } else {
            head(&mut out, 5, fields.len() as u64);
        }
        for fld in fields {
            out.extend(fld);
        }
        if self.indefinite {
            out.push(0xff);
        }
        out
    }
}

/// Protected header `{1: -35}` (ES384), as the NSM sends it.
pub const PROTECTED_ES384: [u8; 4] = [0xa1, 0x01, 0x38, 0x22];

/// Builds an untagged COSE_Sign1 over `payload` signed with `key`.
pub fn sign_cose(payload: &[u8], key: &SigningKey, protected: &[u8]) -> Vec<u8> {
    let mut sig_structure = Vec::new();
    head(&mut sig_structure, 4, 4);
    tstr(&mut sig_structure, "Signature1");
    bstr(&mut sig_structure, protected);
    bstr(&mut sig_structure, &[]);
    bstr(&mut sig_structure, payload);
    let sig: Signature = key.sign_prehash(&Sha384::digest(&sig_structure)).unwrap();
    let mut out = Vec::new();
    head(&mut out, 4, 4);
    bstr(&mut out, protected);
    out.push(0xa0);
    bstr(&mut out, payload);
    bstr(&mut out, &sig.to_bytes());
    out
}

// ---- test PKI ----------------------------------------------------------

/// Deterministic P-384 key from a small seed.
pub fn key(seed: u8) -> SigningKey {
    let mut bytes = [0x11u8; 48];
    bytes[47] = seed;
    bytes[0] = 0x01;
    SigningKey::from_slice(&bytes).unwrap()
}

/// Which extensions a test certificate carries.
#[derive(Clone, Debug)]
pub struct Exts {
    pub ca: Option<(bool, Option<u8>)>,
    pub key_usage: Option<KeyUsage>,
}

impl Exts {
    pub fn ca(path_len: Option<u8>) -> Self {
        Self {
            ca: Some((true, path_len)),
            key_usage: Some(KeyUsage(
                KeyUsages::KeyCertSign | KeyUsages::CRLSign | KeyUsages::DigitalSignature,
            )),
        }
    }
    pub fn leaf() -> Self {
        Self {
            ca: Some((false, None)),
            key_usage: Some(KeyUsage(KeyUsages::DigitalSignature.into())),
        }
    }
}

struct Profile {
    subject: Name,
    issuer: Name,
    exts: Exts,
}

impl BuilderProfile for Profile {
    fn get_issuer(&self, _subject: &Name) -> Name {
        self.issuer.clone()
    }
    fn get_subject(&self) -> Name {
        self.subject.clone()
    }
    fn build_extensions(
        &self,
        _spk: SubjectPublicKeyInfoRef<'_>,
        _issuer_spk: SubjectPublicKeyInfoRef<'_>,
        tbs: &TbsCertificate,
    ) -> x509_cert::builder::Result<Vec<Extension>> {
        let mut out = Vec::new();
        if let Some((ca, path_len_constraint)) = self.exts.ca {
            let bc = BasicConstraints {
                ca,
                path_len_constraint,
            };
            out.push(bc.to_extension(tbs.subject(), &[])?);
        }
        if let Some(ku) = self.exts.key_usage {
            out.push(ku.to_extension(tbs.subject(), &[])?);
        }
        Ok(out)
    }
}

/// One test certificate with its key.
pub struct TestCert {
    pub der: Vec<u8>,
    pub key: SigningKey,
    pub name: Name,
}

pub fn name(cn: &str) -> Name {
    Name::from_str(&format!("CN={cn},O=nitro-keystore tests,C=US")).unwrap()
}

/// Validity window `[from, from + len]`.
pub fn window(from: SystemTime, len: Duration) -> Validity {
    Validity::new(
        Time::try_from(from).unwrap(),
        Time::try_from(from + len).unwrap(),
    )
}

/// Issues a certificate for `subject_key` named `cn`, signed by `issuer`
/// (or self-signed when `issuer` is None).
pub fn issue(
    cn: &str,
    subject_key: SigningKey,
    issuer: Option<&TestCert>,
    validity: Validity,
    exts: Exts,
    serial: u32,
) -> TestCert {
    let subject = name(cn);
    let issuer_name = issuer.map_or_else(|| subject.clone(), |i| i.name.clone());
    let spki = SubjectPublicKeyInfoOwned::from_key(subject_key.verifying_key()).unwrap();
    let profile = Profile {
        subject: subject.clone(),
        issuer: issuer_name,
        exts,
    };
    let builder =
        CertificateBuilder::new(profile, SerialNumber::from(serial), validity, spki).unwrap();
    let signer = issuer.map_or(&subject_key, |i| &i.key);
    let cert = builder.build::<_, DerSignature>(signer).unwrap();
    TestCert {
        der: cert.to_der().unwrap(),
        key: subject_key,
        name: subject,
    }
}

/// A root → intermediate → leaf chain, all valid around `t`.
pub struct Pki {
    pub root: TestCert,
    pub inter: TestCert,
    pub leaf: TestCert,
}

pub fn t0() -> SystemTime {
    // 2025-06-01T00:00:00Z
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_748_736_000)
}

pub const DAY: Duration = Duration::from_secs(86_400);

pub fn pki() -> Pki {
    let root = issue(
        "test root",
        key(1),
        None,
        window(t0() - DAY * 365, DAY * 3650),
        Exts::ca(None),
        1,
    );
    let inter = issue(
        "test intermediate",
        key(2),
        Some(&root),
        window(t0() - DAY * 30, DAY * 60),
        Exts::ca(Some(0)),
        2,
    );
    let leaf = issue(
        "test leaf",
        key(3),
        Some(&inter),
        window(t0() - DAY, DAY * 2),
        Exts::leaf(),
        3,
    );
    Pki { root, inter, leaf }
}

/// A typical payload for `pki`, timestamped at `t0`.
pub fn payload(pki: &Pki) -> Payload {
    Payload {
        module_id: "i-0123456789abcdef0-enc0123456789abcdef".to_owned(),
        digest: "SHA384".to_owned(),
        timestamp: t0()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
        pcrs: (0..16).map(|i| (i, vec![i as u8; 48])).collect(),
        certificate: pki.leaf.der.clone(),
        cabundle: vec![pki.root.der.clone(), pki.inter.der.clone()],
        public_key: Opt::Bytes(b"spki".to_vec()),
        user_data: Opt::Null,
        nonce: Opt::Bytes(vec![7; 32]),
        indefinite: false,
        wide_timestamp: false,
        user_data_as_array: false,
        extra: Vec::new(),
    }
}

/// Signs `p` with the leaf key of `pki`.
pub fn signed(pki: &Pki, p: &Payload) -> Vec<u8> {
    sign_cose(&p.encode(), &pki.leaf.key, &PROTECTED_ES384)
}
