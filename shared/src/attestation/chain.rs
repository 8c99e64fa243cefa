//! X.509 path validation from the document's leaf through `cabundle` to a
//! pinned [`Root`], in pure Rust (p384 + x509-cert).
//!
//! Depth 0 is the leaf; depth n is `cabundle[0]`; the pinned root itself is
//! depth n+1 when `cabundle[0]` is issued by it rather than equal to it.

use std::time::SystemTime;

use const_oid::ObjectIdentifier;
use const_oid::db::rfc5280::{ID_CE_BASIC_CONSTRAINTS, ID_CE_KEY_USAGE};
use const_oid::db::rfc5912::{ECDSA_WITH_SHA_384, ID_EC_PUBLIC_KEY, SECP_384_R_1};
use der::{Decode, Header, Reader, SliceReader};
use p384::ecdsa::signature::hazmat::PrehashVerifier;
use p384::ecdsa::{Signature, VerifyingKey};
use sha2::{Digest, Sha384};
use x509_cert::Certificate;
use x509_cert::ext::pkix::{BasicConstraints, KeyUsage};

use super::error::AttestationError;
use super::root::Root;

/// Human-readable facts about one certificate of a document's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// 0 = leaf, counting up towards the root.
    pub depth: usize,
    /// Subject, RFC 4514 string.
    pub subject: String,
    /// Issuer, RFC 4514 string.
    pub issuer: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Whether basicConstraints says cA=true.
    pub is_ca: bool,
}

/// A parsed certificate with the raw TBS bytes its signature covers.
pub(crate) struct Cert {
    der: Vec<u8>,
    cert: Certificate,
    tbs: Vec<u8>,
}

impl Cert {
    /// Parses strict DER; errors are plain reasons for the caller to wrap.
    pub(crate) fn parse(der: &[u8]) -> Result<Self, String> {
        let cert =
            Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
        // Sign over the TBS bytes as received, not a re-encoding.
        let tbs = raw_tbs(der).map_err(|e| format!("cannot locate tbsCertificate: {e}"))?;
        Ok(Self {
            der: der.to_vec(),
            cert,
            tbs,
        })
    }

    pub(crate) fn der(&self) -> &[u8] {
        &self.der
    }

    pub(crate) fn subject(&self) -> String {
        self.cert.tbs_certificate().subject().to_string()
    }

    fn issuer_name_matches(&self, issuer: &Cert) -> bool {
        self.cert.tbs_certificate().issuer() == issuer.cert.tbs_certificate().subject()
    }

    pub(crate) fn validity(&self) -> (SystemTime, SystemTime) {
        let v = self.cert.tbs_certificate().validity();
        (v.not_before.to_system_time(), v.not_after.to_system_time())
    }

    /// The subject's P-384 public key; other key types are unsupported.
    pub(crate) fn p384_key(&self) -> Result<VerifyingKey, AttestationError> {
        let spki = self.cert.tbs_certificate().subject_public_key_info();
        let (alg, params) = spki::AlgorithmIdentifierRef::from(&spki.algorithm)
            .oids()
            .map_err(|e| AttestationError::malformed(format!("certificate key algorithm: {e}")))?;
        if alg != ID_EC_PUBLIC_KEY || params != Some(SECP_384_R_1) {
            return Err(AttestationError::UnsupportedAlgorithm {
                alg: format!(
                    "certificate key {alg} {} (need EC P-384)",
                    params.map(|p| p.to_string()).unwrap_or_default()
                ),
            });
        }
        let point = spki
            .subject_public_key
            .as_bytes()
            .ok_or_else(|| AttestationError::malformed("certificate key has unused bits"))?;
        VerifyingKey::from_sec1_bytes(point)
            .map_err(|_| AttestationError::malformed("certificate key is not a P-384 point"))
    }

    /// Checks this certificate's signature with `issuer_key`.
    fn signed_by(&self, issuer_key: &VerifyingKey) -> Result<(), String> {
        let outer = self.cert.signature_algorithm();
        if self.cert.tbs_certificate().signature() != outer {
            return Err("inner and outer signature algorithms differ".to_owned());
        }
        if outer.oid != ECDSA_WITH_SHA_384 || outer.parameters.is_some() {
            return Err(format!("unsupported signature algorithm {}", outer.oid));
        }
        let sig_der = self
            .cert
            .signature()
            .as_bytes()
            .ok_or("signature has unused bits")?;
        let sig = Signature::from_der(sig_der).map_err(|_| "signature is not DER ECDSA")?;
        issuer_key
            .verify_prehash(&Sha384::digest(&self.tbs), &sig)
            .map_err(|_| "signature does not verify with the issuer's key".to_owned())
    }

    fn basic_constraints(&self) -> Result<Option<BasicConstraints>, String> {
        self.cert
            .tbs_certificate()
            .get_extension::<BasicConstraints>()
            .map(|o| o.map(|(_, bc)| bc))
            .map_err(|e| format!("bad basicConstraints: {e}"))
    }

    fn key_usage(&self) -> Result<Option<KeyUsage>, String> {
        self.cert
            .tbs_certificate()
            .get_extension::<KeyUsage>()
            .map(|o| o.map(|(_, ku)| ku))
            .map_err(|e| format!("bad keyUsage: {e}"))
    }

    /// RFC 5280 §4.2: a critical extension we do not understand voids the cert.
    fn unknown_critical_extension(&self) -> Option<ObjectIdentifier> {
        const KNOWN: [ObjectIdentifier; 2] = [ID_CE_BASIC_CONSTRAINTS, ID_CE_KEY_USAGE];
        self.cert
            .tbs_certificate()
            .extensions()?
            .iter()
            .find(|e| e.critical && !KNOWN.contains(&e.extn_id))
            .map(|e| e.extn_id)
    }

    /// CA rules for a certificate that issues others. `following` counts the
    /// intermediates between it and the leaf (for pathLenConstraint).
    pub(crate) fn check_ca(&self, following: usize) -> Result<(), String> {
        if let Some(oid) = self.unknown_critical_extension() {
            return Err(format!("unsupported critical extension {oid}"));
        }
        match self.basic_constraints()? {
            Some(bc) if bc.ca => {
                if let Some(max) = bc.path_len_constraint
                    && following > usize::from(max)
                {
                    return Err(format!(
                        "pathLenConstraint {max} exceeded ({following} intermediates follow)"
                    ));
                }
            }
            _ => return Err("issuer is not a CA (basicConstraints cA is not true)".to_owned()),
        }
        if let Some(ku) = self.key_usage()?
            && !ku.key_cert_sign()
        {
            return Err("issuer's keyUsage lacks keyCertSign".to_owned());
        }
        Ok(())
    }

    fn check_leaf(&self) -> Result<(), String> {
        if let Some(oid) = self.unknown_critical_extension() {
            return Err(format!("unsupported critical extension {oid}"));
        }
        if let Some(bc) = self.basic_constraints()?
            && bc.ca
        {
            return Err("leaf certificate is a CA".to_owned());
        }
        if let Some(ku) = self.key_usage()?
            && !ku.digital_signature()
        {
            return Err("leaf keyUsage lacks digitalSignature".to_owned());
        }
        Ok(())
    }

    pub(crate) fn info(&self, depth: usize) -> CertificateInfo {
        let (not_before, not_after) = self.validity();
        let is_ca = matches!(self.basic_constraints(), Ok(Some(bc)) if bc.ca);
        CertificateInfo {
            depth,
            subject: self.subject(),
            issuer: self.cert.tbs_certificate().issuer().to_string(),
            not_before,
            not_after,
            is_ca,
        }
    }
}

fn raw_tbs(der: &[u8]) -> der::Result<Vec<u8>> {
    let mut r = SliceReader::new(der)?;
    let _outer = Header::decode(&mut r)?;
    Ok(r.tlv_bytes()?.to_vec())
}

/// Parses `certificate` and `cabundle` into a leaf-first path.
pub(crate) fn parse_path(leaf: &[u8], cabundle: &[Vec<u8>]) -> Result<Vec<Cert>, AttestationError> {
    let mut path = Vec::with_capacity(cabundle.len() + 1);
    for (depth, der) in std::iter::once(leaf)
        .chain(cabundle.iter().rev().map(Vec::as_slice))
        .enumerate()
    {
        let cert =
            Cert::parse(der).map_err(|reason| AttestationError::ChainBroken { depth, reason })?;
        path.push(cert);
    }
    Ok(path)
}

/// Validates `path` (leaf first, as from [`parse_path`]) against `root` at `at`.
pub(crate) fn validate(path: &[Cert], root: &Root, at: SystemTime) -> Result<(), AttestationError> {
    let broken =
        |depth: usize| move |reason: String| AttestationError::ChainBroken { depth, reason };
    let Some((leaf, _)) = path.split_first() else {
        return Err(AttestationError::malformed("empty certificate path"));
    };
    leaf.check_leaf().map_err(broken(0))?;
    for (depth, pair) in path.windows(2).enumerate() {
        let [child, issuer] = pair else { continue };
        link(child, issuer, depth)?;
    }
    let top_depth = path.len() - 1;
    let Some(top) = path.last() else {
        return Err(AttestationError::malformed("empty certificate path"));
    };
    let anchored_by_root_cert = if top.der() == root.cert().der() {
        false
    } else if top.issuer_name_matches(root.cert()) {
        // cabundle[0] is not the pinned root but may be issued by it.
        link(top, root.cert(), top_depth).map_err(|e| match e {
            AttestationError::ChainBroken { .. } => AttestationError::UntrustedRoot {
                subject: top.subject(),
            },
            other => other,
        })?;
        true
    } else {
        return Err(AttestationError::UntrustedRoot {
            subject: top.subject(),
        });
    };
    let anchor = anchored_by_root_cert.then(|| root.cert());
    for (depth, cert) in path.iter().chain(anchor).enumerate() {
        let (not_before, not_after) = cert.validity();
        if at < not_before || at > not_after {
            return Err(AttestationError::CertificateNotValidAt {
                depth,
                subject: cert.subject(),
                not_before,
                not_after,
                at,
            });
        }
    }
    Ok(())
}

/// Checks that `child` (at `depth`) is issued by `issuer` (at `depth + 1`).
fn link(child: &Cert, issuer: &Cert, depth: usize) -> Result<(), AttestationError> {
    let broken = |reason: String| AttestationError::ChainBroken { depth, reason };
    if !child.issuer_name_matches(issuer) {
        return Err(broken(format!(
            "issuer \"{}\" is not the next certificate's subject \"{}\"",
            child.cert.tbs_certificate().issuer(),
            issuer.subject()
        )));
    }
    // Intermediates between the issuer and the leaf: depth+1 minus the leaf.
    issuer
        .check_ca(depth)
        .map_err(|reason| AttestationError::ChainBroken {
            depth: depth + 1,
            reason,
        })?;
    let key = issuer.p384_key()?;
    child.signed_by(&key).map_err(broken)
}
