//! A local stand-in for the Nitro Security Module.
//!
//! [`MockNsm`] produces attestation documents in exactly the format real NSMs
//! emit (untagged `COSE_Sign1`, ES384, payload keys in the real order,
//! unused optional fields as CBOR `null`), signed by a leaf certificate that
//! chains to a local root kept in a directory ([`MockPki`]). Point the KMS
//! emulator and verifiers at [`MockPki::root_pem_path`].
//!
//! PCR0 is the SHA-384 of the running executable, read once at startup, so
//! changing the binary changes PCR0 just like rebuilding an EIF does.

mod pki;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_nitro_enclaves_cose::CoseSign1;
use aws_nitro_enclaves_cose::crypto::{
    Hash, MessageDigest, SignatureAlgorithm, SigningPrivateKey, SigningPublicKey,
};
use aws_nitro_enclaves_cose::error::CoseError;
use aws_nitro_enclaves_cose::header_map::HeaderMap;
use p384::ecdsa::Signature;
use p384::ecdsa::signature::hazmat::PrehashVerifier;
use rand::TryRng;
use rand::rngs::SysRng;
use sha2::{Digest, Sha384};

use super::{AttestationRequest, Nsm, NsmError, PcrDescription};
pub use pki::{
    BACKDATE, INTERMEDIATE_CERT_FILE, INTERMEDIATE_KEY_FILE, LEAF_LIFETIME, MockPki,
    ROOT_CERT_FILE, ROOT_KEY_FILE,
};
use pki::{Leaf, SecretKey};

/// Length of every PCR value (SHA-384).
pub const PCR_LEN: usize = 48;
/// PCRs carried in attestation documents and locked (0..=15), as on real NSMs.
pub const DOCUMENT_PCRS: u16 = 16;
/// PCRs [`Nsm::describe_pcr`] answers for (0..=31); 16..=31 are zero and unlocked.
pub const DESCRIBABLE_PCRS: u16 = 32;
/// A leaf certificate is re-issued when less than this much validity remains.
pub const LEAF_RENEW_BEFORE: Duration = Duration::from_secs(3600);
/// Longest accepted `module_id` (it is also the leaf certificate's CN).
pub const MAX_MODULE_ID: usize = 64;

/// `{1: -35}`: the COSE protected header of every NSM document (alg ES384).
pub const PROTECTED_HEADER: [u8; 4] = [0xa1, 0x01, 0x38, 0x22];

/// Logged whenever a mock NSM opens. Because the mock uses it, every binary
/// that links the mock contains this text, which lets
/// `scripts/check-layout.sh` prove the production enclave does not.
pub const MOCK_NSM_MARKER: &str = "keystore-nsm mock: not for production";

/// How the mock NSM presents itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MockConfig {
    /// Values of PCR 1..=15 (PCR0 is always the executable's hash, or the
    /// explicit override of [`MockNsm::open_with_pcr0`]). Unset PCRs are zero.
    pub pcrs: BTreeMap<u16, [u8; PCR_LEN]>,
    /// `module_id` to report; by default `i-00000000000000000-enc` followed by
    /// 16 hex digits derived from the PKI's root certificate.
    pub module_id: Option<String>,
    /// How far the mock's clock runs behind the host's: documents are
    /// stamped (and leaf certificates issued) this much in the past, as by
    /// an NSM whose clock disagrees with KMS's.
    pub clock_behind: Duration,
}

/// The mock Nitro Security Module.
pub struct MockNsm {
    pki: MockPki,
    pcrs: [[u8; PCR_LEN]; DOCUMENT_PCRS as usize],
    module_id: String,
    clock_behind: Duration,
    leaf: Mutex<Arc<Leaf>>,
}

impl fmt::Debug for MockNsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockNsm")
            .field("marker", &MOCK_NSM_MARKER)
            .field("module_id", &self.module_id)
            .field("pki", &self.pki)
            .field("pcr0", &hex::encode(self.pcrs[0]))
            .finish_non_exhaustive()
    }
}

/// SHA-384 of the running executable: the mock's PCR0.
pub fn executable_pcr0() -> Result<[u8; PCR_LEN], NsmError> {
    let exe = std::env::current_exe().map_err(|e| {
        NsmError::InvalidConfig(format!(
            "cannot locate the running executable to measure PCR0: {e}"
        ))
    })?;
    let err = |e: std::io::Error| {
        NsmError::InvalidConfig(format!(
            "cannot read {} to measure PCR0: {e}",
            exe.display()
        ))
    };
    let mut file = File::open(&exe).map_err(err)?;
    let mut hasher = Sha384::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().into())
}

impl MockNsm {
    /// Opens (creating on first use) the PKI in `dir` and measures the running
    /// executable into PCR0.
    pub fn open(dir: impl AsRef<Path>, config: MockConfig) -> Result<Self, NsmError> {
        let pcr0 = executable_pcr0()?;
        Self::open_with_pcr0(dir, config, pcr0)
    }

    /// Like [`MockNsm::open`] but with an explicit PCR0 (for tests).
    pub fn open_with_pcr0(
        dir: impl AsRef<Path>,
        config: MockConfig,
        pcr0: [u8; PCR_LEN],
    ) -> Result<Self, NsmError> {
        let mut pcrs = [[0u8; PCR_LEN]; DOCUMENT_PCRS as usize];
        pcrs[0] = pcr0;
        for (&index, value) in &config.pcrs {
            match index {
                0 => {
                    return Err(NsmError::InvalidConfig(
                        "PCR0 is the executable's SHA-384 and cannot be configured".to_owned(),
                    ));
                }
                1..DOCUMENT_PCRS => pcrs[usize::from(index)] = *value,
                _ => return Err(NsmError::BadPcrIndex(index)),
            }
        }
        let pki = MockPki::open(dir)?;
        let module_id = match config.module_id {
            Some(id) => {
                validate_module_id(&id)?;
                id
            }
            None => {
                let digest = Sha384::digest(pki.root_der());
                format!("i-00000000000000000-enc{}", hex::encode(&digest[..8]))
            }
        };
        let now = SystemTime::now();
        let leaf = pki.issue_leaf(
            &module_id,
            now.checked_sub(config.clock_behind).unwrap_or(now),
        )?;
        tracing::warn!(
            marker = MOCK_NSM_MARKER,
            module_id = %module_id,
            pcr0 = %hex::encode(pcr0),
            root = %pki.root_pem_path().display(),
            "mock NSM ready: its attestation documents prove nothing"
        );
        Ok(Self {
            pki,
            pcrs,
            module_id,
            clock_behind: config.clock_behind,
            leaf: Mutex::new(Arc::new(leaf)),
        })
    }

    /// The value of PCR `index` (0..=31; 16..=31 are always zero).
    pub fn pcr(&self, index: u16) -> Result<[u8; PCR_LEN], NsmError> {
        match index {
            0..DOCUMENT_PCRS => Ok(self.pcrs[usize::from(index)]),
            DOCUMENT_PCRS..DESCRIBABLE_PCRS => Ok([0; PCR_LEN]),
            _ => Err(NsmError::BadPcrIndex(index)),
        }
    }

    /// The `module_id` this mock reports.
    pub fn module_id(&self) -> &str {
        &self.module_id
    }

    /// The certificate chain this mock signs with.
    pub fn pki(&self) -> &MockPki {
        &self.pki
    }

    /// Produces a document as [`Nsm::attest`] does, but as if the clock read
    /// `now` (the leaf certificate is re-issued if it does not cover `now`
    /// with at least [`LEAF_RENEW_BEFORE`] to spare).
    pub fn attest_at(
        &self,
        req: &AttestationRequest,
        now: SystemTime,
    ) -> Result<Vec<u8>, NsmError> {
        req.check_sizes()?;
        let timestamp = now
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|d| u64::try_from(d.as_millis()).ok())
            .ok_or_else(|| NsmError::Internal("system clock out of range".to_owned()))?;
        let leaf = self.leaf_for(now)?;
        let payload = self.payload(&leaf, timestamp, req);
        sign_cose(&leaf.key, &payload)
    }

    fn leaf_for(&self, now: SystemTime) -> Result<Arc<Leaf>, NsmError> {
        // The guarded value is replaced whole, so a poisoned lock still holds
        // a consistent leaf.
        let mut current = self.leaf.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = now >= current.not_before
            && current
                .not_after
                .duration_since(now)
                .is_ok_and(|left| left >= LEAF_RENEW_BEFORE);
        if !fresh {
            *current = Arc::new(self.pki.issue_leaf(&self.module_id, now)?);
            tracing::debug!(module_id = %self.module_id, "re-issued mock NSM leaf certificate");
        }
        Ok(Arc::clone(&current))
    }

    /// The CBOR payload, keys in the order real NSMs use.
    fn payload(&self, leaf: &Leaf, timestamp: u64, req: &AttestationRequest) -> Vec<u8> {
        let mut c = Cbor::with_capacity(
            1024 + leaf.cert_der.len()
                + self.pki.root_der().len()
                + self.pki.intermediate_der().len()
                + 3 * super::MAX_ATTESTATION_FIELD,
        );
        c.map(9);
        c.text("module_id");
        c.text(&self.module_id);
        c.text("digest");
        c.text("SHA384");
        c.text("timestamp");
        c.uint(timestamp);
        c.text("pcrs");
        c.map(u64::from(DOCUMENT_PCRS));
        for (index, value) in self.pcrs.iter().enumerate() {
            c.uint(index as u64);
            c.bytes(value);
        }
        c.text("certificate");
        c.bytes(&leaf.cert_der);
        c.text("cabundle");
        c.array(2);
        c.bytes(self.pki.root_der());
        c.bytes(self.pki.intermediate_der());
        c.text("public_key");
        c.opt_bytes(req.public_key.as_deref());
        c.text("user_data");
        c.opt_bytes(req.user_data.as_deref());
        c.text("nonce");
        c.opt_bytes(req.nonce.as_deref());
        c.0
    }
}

/// Signs `payload` into an untagged `COSE_Sign1` with ES384, through the
/// same COSE crate the verifier in `keystore_shared::attestation` parses
/// with, so the two cannot disagree on the Sig_structure.
fn sign_cose(key: &SecretKey, payload: &[u8]) -> Result<Vec<u8>, NsmError> {
    let cose_err = |e: CoseError| NsmError::Internal(format!("COSE_Sign1: {e}"));
    let doc =
        CoseSign1::new::<Sha>(payload, &HeaderMap::new(), &Es384Signer(key)).map_err(cose_err)?;
    doc.as_bytes(false).map_err(cose_err)
}

/// SHA-2 for the COSE crate's `Hash` trait (its own needs openssl).
struct Sha;

impl Hash for Sha {
    fn hash(digest: MessageDigest, data: &[u8]) -> Result<Vec<u8>, CoseError> {
        Ok(match digest {
            MessageDigest::Sha256 => sha2::Sha256::digest(data).to_vec(),
            MessageDigest::Sha384 => Sha384::digest(data).to_vec(),
            MessageDigest::Sha512 => sha2::Sha512::digest(data).to_vec(),
        })
    }
}

/// A leaf key for the COSE crate's signing traits: ES384, raw r‖s output.
struct Es384Signer<'a>(&'a SecretKey);

impl SigningPublicKey for Es384Signer<'_> {
    fn get_parameters(&self) -> Result<(SignatureAlgorithm, MessageDigest), CoseError> {
        Ok((SignatureAlgorithm::ES384, MessageDigest::Sha384))
    }

    fn verify(&self, digest: &[u8], signature: &[u8]) -> Result<bool, CoseError> {
        let Ok(sig) = Signature::from_slice(signature) else {
            return Ok(false);
        };
        Ok(self.0.verifying_key().verify_prehash(digest, &sig).is_ok())
    }
}

impl SigningPrivateKey for Es384Signer<'_> {
    fn sign(&self, digest: &[u8]) -> Result<Vec<u8>, CoseError> {
        let sig = self
            .0
            .sign_prehash(digest)
            .map_err(|e| CoseError::SignatureError(e.into()))?;
        Ok(sig.to_bytes().to_vec())
    }
}

fn validate_module_id(id: &str) -> Result<(), NsmError> {
    let ok_chars = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if id.is_empty() || id.len() > MAX_MODULE_ID || !ok_chars {
        return Err(NsmError::InvalidConfig(format!(
            "module_id must be 1..={MAX_MODULE_ID} characters of [A-Za-z0-9._-], got {id:?}"
        )));
    }
    Ok(())
}

impl Nsm for MockNsm {
    fn attest(&self, req: &AttestationRequest) -> Result<Vec<u8>, NsmError> {
        let now = SystemTime::now();
        self.attest_at(req, now.checked_sub(self.clock_behind).unwrap_or(now))
    }

    fn fill_random(&self, buf: &mut [u8]) -> Result<(), NsmError> {
        SysRng
            .try_fill_bytes(buf)
            .map_err(|e| NsmError::Internal(format!("OS random generator failed: {e}")))
    }

    fn describe_pcr(&self, index: u16) -> Result<PcrDescription, NsmError> {
        let data = self.pcr(index)?;
        Ok(PcrDescription {
            index,
            locked: index < DOCUMENT_PCRS,
            data: data.to_vec(),
        })
    }
}

/// A minimal definite-length CBOR writer (RFC 8949, shortest heads) for the
/// handful of types attestation documents use.
struct Cbor(Vec<u8>);

impl Cbor {
    fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }

    fn head(&mut self, major: u8, n: u64) {
        let m = major << 5;
        if n < 24 {
            self.0.push(m | n as u8);
        } else if let Ok(n) = u8::try_from(n) {
            self.0.extend_from_slice(&[m | 24, n]);
        } else if let Ok(n) = u16::try_from(n) {
            self.0.push(m | 25);
            self.0.extend_from_slice(&n.to_be_bytes());
        } else if let Ok(n) = u32::try_from(n) {
            self.0.push(m | 26);
            self.0.extend_from_slice(&n.to_be_bytes());
        } else {
            self.0.push(m | 27);
            self.0.extend_from_slice(&n.to_be_bytes());
        }
    }

    fn uint(&mut self, n: u64) {
        self.head(0, n);
    }

    fn bytes(&mut self, b: &[u8]) {
        self.head(2, b.len() as u64);
        self.0.extend_from_slice(b);
    }

    fn text(&mut self, s: &str) {
        self.head(3, s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }

    fn array(&mut self, n: u64) {
        self.head(4, n);
    }

    fn map(&mut self, n: u64) {
        self.head(5, n);
    }

    fn opt_bytes(&mut self, b: Option<&[u8]>) {
        match b {
            Some(b) => self.bytes(b),
            None => self.0.push(0xf6),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cbor_heads_are_shortest_form() {
        let cases: [(u64, &[u8]); 7] = [
            (0, &[0x00]),
            (23, &[0x17]),
            (24, &[0x18, 24]),
            (255, &[0x18, 0xff]),
            (256, &[0x19, 0x01, 0x00]),
            (70_000, &[0x1a, 0x00, 0x01, 0x11, 0x70]),
            (
                1_665_582_606_081,
                &[0x1b, 0, 0, 0x01, 0x83, 0xcc, 0x75, 0xa7, 0x01],
            ),
        ];
        for (n, want) in cases {
            let mut c = Cbor::with_capacity(9);
            c.uint(n);
            assert_eq!(c.0, want, "{n}");
        }
        let mut c = Cbor::with_capacity(8);
        c.opt_bytes(None);
        c.text("ab");
        c.bytes(&[7]);
        assert_eq!(c.0, [0xf6, 0x62, b'a', b'b', 0x41, 7]);
    }

    #[test]
    fn documents_are_untagged_sign1_with_the_nsm_headers() {
        let dir = tempfile::tempdir().unwrap();
        let nsm = MockNsm::open_with_pcr0(dir.path(), MockConfig::default(), [7; PCR_LEN]).unwrap();
        let doc = nsm.attest(&AttestationRequest::default()).unwrap();
        // array(4), bstr(4) {1: -35}, unprotected {} as real NSMs write it.
        assert_eq!(doc[..6], [0x84, 0x44, 0xa1, 0x01, 0x38, 0x22]);
        assert_eq!(doc[6], 0xa0);
        // The signature is raw r‖s (96 bytes), the last field.
        assert_eq!(doc[doc.len() - 98..doc.len() - 96], [0x58, 96]);
        assert!(format!("{nsm:?}").contains(MOCK_NSM_MARKER));
    }

    #[test]
    fn leaf_is_renewed_when_it_nears_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let nsm = MockNsm::open_with_pcr0(dir.path(), MockConfig::default(), [7; PCR_LEN]).unwrap();
        let now = SystemTime::now();
        let first = nsm.leaf_for(now).unwrap();
        let same = nsm.leaf_for(now + Duration::from_secs(3600)).unwrap();
        assert!(Arc::ptr_eq(&first, &same));
        let later = now + LEAF_LIFETIME - LEAF_RENEW_BEFORE + Duration::from_secs(5);
        let renewed = nsm.leaf_for(later).unwrap();
        assert!(!Arc::ptr_eq(&first, &renewed));
        assert_ne!(first.cert_der, renewed.cert_der);
        assert!(renewed.not_after > later + LEAF_RENEW_BEFORE);
        // A clock that jumps back before the leaf's notBefore also renews it.
        let back = nsm.leaf_for(now).unwrap();
        assert!(!Arc::ptr_eq(&renewed, &back));
    }

    #[test]
    fn config_is_validated() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = MockConfig::default();
        config.pcrs.insert(0, [1; PCR_LEN]);
        let err = MockNsm::open_with_pcr0(dir.path(), config, [0; PCR_LEN]).unwrap_err();
        assert!(matches!(err, NsmError::InvalidConfig(_)), "{err}");
        let mut config = MockConfig::default();
        config.pcrs.insert(16, [1; PCR_LEN]);
        let err = MockNsm::open_with_pcr0(dir.path(), config, [0; PCR_LEN]).unwrap_err();
        assert!(matches!(err, NsmError::BadPcrIndex(16)), "{err}");
        let config = MockConfig {
            module_id: Some("bad id, with spaces".to_owned()),
            ..Default::default()
        };
        let err = MockNsm::open_with_pcr0(dir.path(), config, [0; PCR_LEN]).unwrap_err();
        assert!(err.to_string().contains("module_id"), "{err}");
    }
}
