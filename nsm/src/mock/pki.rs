//! The mock NSM's certificate chain: a persistent P-384 root and
//! intermediate kept in a directory, and short-lived leaves issued in memory.
//!
//! Layout of the directory (created atomically on first use):
//!
//! | file | content | mode |
//! | --- | --- | --- |
//! | `root.pem` | root CA certificate | 0644 |
//! | `root-key.pem` | root CA private key, PKCS#8 | 0600 |
//! | `intermediate.pem` | intermediate CA certificate (pathLen 0) | 0644 |
//! | `intermediate-key.pem` | intermediate CA private key, PKCS#8 | 0600 |
//!
//! Every certificate is ecdsa-with-SHA384 over P-384 and follows the rules
//! rustls-webpki applies to the real AWS chain.

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use der::asn1::BitString;
use der::pem::LineEnding;
use der::{DecodePem, Encode, EncodePem};
use p384::ecdsa::signature::Verifier;
use p384::ecdsa::signature::hazmat::PrehashSigner;
use p384::ecdsa::{DerSignature, Signature, SigningKey, VerifyingKey};
use p384::elliptic_curve::Generate;
use p384::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use rand::TryRng;
use rand::rngs::SysRng;
use spki::{EncodePublicKey, SubjectPublicKeyInfoOwned, SubjectPublicKeyInfoRef};
use x509_cert::Certificate;
use x509_cert::builder::profile::BuilderProfile;
use x509_cert::builder::{Builder, CertificateBuilder};
use x509_cert::certificate::TbsCertificate;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, KeyUsage, KeyUsages, SubjectKeyIdentifier,
};
use x509_cert::ext::{Extension, ToExtension};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::{Time, Validity};
use zeroize::Zeroizing;

use crate::NsmError;

/// File name of the root certificate inside the PKI directory.
pub const ROOT_CERT_FILE: &str = "root.pem";
/// File name of the root private key inside the PKI directory.
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// File name of the intermediate certificate inside the PKI directory.
pub const INTERMEDIATE_CERT_FILE: &str = "intermediate.pem";
/// File name of the intermediate private key inside the PKI directory.
pub const INTERMEDIATE_KEY_FILE: &str = "intermediate-key.pem";

/// How long a leaf certificate lives (real NSM leaves: about 3 hours).
pub const LEAF_LIFETIME: Duration = Duration::from_secs(3 * 3600);
/// How far in the past every certificate's validity starts (clock skew).
pub const BACKDATE: Duration = Duration::from_secs(60);

const ROOT_LIFETIME: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
const INTERMEDIATE_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Largest PEM file this module reads.
const MAX_PEM_FILE: u64 = 64 * 1024;

const ROOT_SUBJECT: &str = "CN=mock.nitro-enclaves,OU=mock-nsm,O=nitro-keystore,C=US";
const INTERMEDIATE_SUBJECT: &str =
    "CN=mock-intermediate.nitro-enclaves,OU=mock-nsm,O=nitro-keystore,C=US";

/// A P-384 private key that never prints its content.
pub(crate) struct SecretKey(SigningKey);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

impl SecretKey {
    /// A fresh key from the OS RNG.
    pub(crate) fn generate() -> Result<Self, String> {
        SigningKey::try_generate_from_rng(&mut SysRng)
            .map(Self)
            .map_err(|e| format!("OS random generator failed: {e}"))
    }

    /// Signs a SHA-384 `digest` with ECDSA P-384 (deterministic, RFC 6979).
    pub(crate) fn sign_prehash(&self, digest: &[u8]) -> Result<Signature, String> {
        self.0
            .sign_prehash(digest)
            .map_err(|e| format!("ECDSA signing failed: {e}"))
    }

    /// The public half.
    pub(crate) fn verifying_key(&self) -> &VerifyingKey {
        self.0.verifying_key()
    }

    fn spki(&self) -> Result<SubjectPublicKeyInfoOwned, String> {
        SubjectPublicKeyInfoOwned::from_key(self.0.verifying_key())
            .map_err(|e| format!("encoding public key: {e}"))
    }
}

/// Which kind of certificate a [`Profile`] produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Root,
    Intermediate,
    Leaf,
}

/// Our own certificate profile: exactly the extensions webpki wants.
struct Profile {
    kind: Kind,
    subject: Name,
    issuer: Name,
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
        spk: SubjectPublicKeyInfoRef<'_>,
        issuer_spk: SubjectPublicKeyInfoRef<'_>,
        tbs: &TbsCertificate,
    ) -> x509_cert::builder::Result<Vec<Extension>> {
        let (basic, usage) = match self.kind {
            Kind::Root => (
                BasicConstraints {
                    ca: true,
                    path_len_constraint: None,
                },
                KeyUsages::KeyCertSign | KeyUsages::CRLSign,
            ),
            Kind::Intermediate => (
                BasicConstraints {
                    ca: true,
                    path_len_constraint: Some(0),
                },
                KeyUsages::KeyCertSign | KeyUsages::CRLSign,
            ),
            Kind::Leaf => (
                BasicConstraints {
                    ca: false,
                    path_len_constraint: None,
                },
                KeyUsages::DigitalSignature.into(),
            ),
        };
        let mut exts: Vec<Extension> = Vec::with_capacity(4);
        let ext = basic.to_extension(tbs.subject(), &exts)?;
        exts.push(ext);
        let ext = KeyUsage(usage).to_extension(tbs.subject(), &exts)?;
        exts.push(ext);
        let ext = SubjectKeyIdentifier::try_from(spk)?.to_extension(tbs.subject(), &exts)?;
        exts.push(ext);
        let ext =
            AuthorityKeyIdentifier::try_from(issuer_spk)?.to_extension(tbs.subject(), &exts)?;
        exts.push(ext);
        Ok(exts)
    }
}

/// A positive, non-zero, 16-byte random serial number.
fn random_serial() -> Result<SerialNumber, String> {
    let mut bytes = [0u8; 16];
    SysRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| format!("OS random generator failed: {e}"))?;
    // Positive (high bit clear) and without a leading zero octet.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::new(&bytes).map_err(|e| format!("serial number: {e}"))
}

fn validity(now: SystemTime, lifetime: Duration) -> Result<Validity, String> {
    let not_before = now.checked_sub(BACKDATE).unwrap_or(now);
    let not_after = now
        .checked_add(lifetime)
        .ok_or_else(|| "certificate end time overflows".to_owned())?;
    let not_before = Time::try_from(not_before).map_err(|e| format!("notBefore: {e}"))?;
    let not_after = Time::try_from(not_after).map_err(|e| format!("notAfter: {e}"))?;
    Ok(Validity::new(not_before, not_after))
}

/// Issues one certificate for `subject_key`'s public key, signed by `issuer_key`.
fn issue(
    kind: Kind,
    subject: &Name,
    subject_spki: SubjectPublicKeyInfoOwned,
    issuer: &Name,
    issuer_key: &SecretKey,
    now: SystemTime,
    lifetime: Duration,
) -> Result<Certificate, String> {
    let profile = Profile {
        kind,
        subject: subject.clone(),
        issuer: issuer.clone(),
    };
    let builder = CertificateBuilder::new(
        profile,
        random_serial()?,
        validity(now, lifetime)?,
        subject_spki,
    )
    .map_err(|e| format!("certificate builder: {e}"))?;
    builder
        .build::<_, DerSignature>(&issuer_key.0)
        .map_err(|e| format!("signing certificate: {e}"))
}

fn parse_name(s: &str) -> Result<Name, String> {
    Name::from_str(s).map_err(|e| format!("distinguished name {s:?}: {e}"))
}

/// A leaf certificate and its key, issued in memory by the intermediate.
pub(crate) struct Leaf {
    /// The leaf's private key (signs attestation documents).
    pub(crate) key: SecretKey,
    /// DER of the leaf certificate.
    pub(crate) cert_der: Vec<u8>,
    /// The leaf's `notBefore`.
    pub(crate) not_before: SystemTime,
    /// The leaf's `notAfter`.
    pub(crate) not_after: SystemTime,
}

impl fmt::Debug for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leaf")
            .field("cert_der_len", &self.cert_der.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The mock NSM's persistent root and intermediate CA.
pub struct MockPki {
    dir: PathBuf,
    root_der: Vec<u8>,
    intermediate_der: Vec<u8>,
    intermediate_subject: Name,
    intermediate_not_after: SystemTime,
    intermediate_key: SecretKey,
}

impl fmt::Debug for MockPki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockPki")
            .field("dir", &self.dir)
            .field("root_der_len", &self.root_der.len())
            .field("intermediate_der_len", &self.intermediate_der.len())
            .finish_non_exhaustive()
    }
}

impl MockPki {
    /// Loads the PKI in `dir`, creating it first if `dir` does not exist or is
    /// an empty directory. Safe against concurrent creation by several
    /// processes: the chain is built in a temporary sibling directory and
    /// renamed into place; whoever loses the race loads the winner's chain.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, NsmError> {
        let dir = dir.as_ref();
        let err = |reason: String| NsmError::MockPki {
            path: dir.to_path_buf(),
            reason,
        };
        if dir.join(ROOT_CERT_FILE).exists() {
            return Self::load(dir).map_err(err);
        }
        Self::create(dir).map_err(err)
    }

    /// The PKI directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the root certificate (PEM), for the KMS emulator and verifiers.
    pub fn root_pem_path(&self) -> PathBuf {
        self.dir.join(ROOT_CERT_FILE)
    }

    /// DER of the root certificate.
    pub fn root_der(&self) -> &[u8] {
        &self.root_der
    }

    /// DER of the intermediate certificate.
    pub fn intermediate_der(&self) -> &[u8] {
        &self.intermediate_der
    }

    /// Issues a fresh leaf (new P-384 key) valid from a minute before `now`
    /// for [`LEAF_LIFETIME`] after it.
    pub(crate) fn issue_leaf(&self, subject_cn: &str, now: SystemTime) -> Result<Leaf, NsmError> {
        let err = |reason: String| NsmError::MockPki {
            path: self.dir.clone(),
            reason: format!("issuing leaf certificate: {reason}"),
        };
        let key = SecretKey::generate().map_err(err)?;
        let subject = parse_name(&format!(
            "CN={subject_cn},OU=mock-nsm,O=nitro-keystore,C=US"
        ))
        .map_err(err)?;
        let spki = key.spki().map_err(err)?;
        let cert = issue(
            Kind::Leaf,
            &subject,
            spki,
            &self.intermediate_subject,
            &self.intermediate_key,
            now,
            LEAF_LIFETIME,
        )
        .map_err(err)?;
        let not_before = cert
            .tbs_certificate()
            .validity()
            .not_before
            .to_system_time();
        let not_after = cert.tbs_certificate().validity().not_after.to_system_time();
        if not_after > self.intermediate_not_after {
            return Err(err(
                "the intermediate certificate expires before the leaf would; delete the PKI directory to regenerate it".to_owned(),
            ));
        }
        let cert_der = cert.to_der().map_err(|e| err(e.to_string()))?;
        Ok(Leaf {
            key,
            cert_der,
            not_before,
            not_after,
        })
    }

    fn create(dir: &Path) -> Result<Self, String> {
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = dir
            .file_name()
            .ok_or_else(|| "the PKI path has no final component".to_owned())?
            .to_string_lossy()
            .into_owned();
        fs::create_dir_all(&parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;

        let mut suffix = [0u8; 8];
        SysRng
            .try_fill_bytes(&mut suffix)
            .map_err(|e| format!("OS random generator failed: {e}"))?;
        let tmp = parent.join(format!(".{name}.tmp-{}", hex::encode(suffix)));
        DirBuilder::new()
            .mode(0o755)
            .create(&tmp)
            .map_err(|e| format!("creating {}: {e}", tmp.display()))?;
        let guard = RemoveOnDrop(Some(tmp.clone()));

        let now = SystemTime::now();
        let root_key = SecretKey::generate()?;
        let root_subject = parse_name(ROOT_SUBJECT)?;
        let root = issue(
            Kind::Root,
            &root_subject,
            root_key.spki()?,
            &root_subject,
            &root_key,
            now,
            ROOT_LIFETIME,
        )?;
        let intermediate_key = SecretKey::generate()?;
        let intermediate_subject = parse_name(INTERMEDIATE_SUBJECT)?;
        let intermediate = issue(
            Kind::Intermediate,
            &intermediate_subject,
            intermediate_key.spki()?,
            &root_subject,
            &root_key,
            now,
            INTERMEDIATE_LIFETIME,
        )?;

        write_file(
            &tmp.join(ROOT_CERT_FILE),
            cert_pem(&root)?.as_bytes(),
            0o644,
        )?;
        write_file(
            &tmp.join(ROOT_KEY_FILE),
            key_pem(&root_key)?.as_bytes(),
            0o600,
        )?;
        write_file(
            &tmp.join(INTERMEDIATE_CERT_FILE),
            cert_pem(&intermediate)?.as_bytes(),
            0o644,
        )?;
        write_file(
            &tmp.join(INTERMEDIATE_KEY_FILE),
            key_pem(&intermediate_key)?.as_bytes(),
            0o600,
        )?;

        match fs::rename(&tmp, dir) {
            Ok(()) => {
                // The directory now lives at `dir`; nothing left to remove.
                guard.disarm();
                if let Ok(d) = File::open(&parent) {
                    // Best effort: make the rename durable.
                    let _ = d.sync_all();
                }
                tracing::info!(dir = %dir.display(), "created mock NSM PKI");
                Ok(Self {
                    dir: dir.to_path_buf(),
                    root_der: root.to_der().map_err(|e| e.to_string())?,
                    intermediate_der: intermediate.to_der().map_err(|e| e.to_string())?,
                    intermediate_subject,
                    intermediate_not_after: intermediate
                        .tbs_certificate()
                        .validity()
                        .not_after
                        .to_system_time(),
                    intermediate_key,
                })
            }
            Err(e) => {
                drop(guard);
                if dir.join(ROOT_CERT_FILE).exists() {
                    // Another process won the race: use its chain.
                    Self::load(dir)
                } else {
                    Err(format!(
                        "cannot move the new PKI into place ({e}); the directory must be absent, empty, or hold {ROOT_CERT_FILE}"
                    ))
                }
            }
        }
    }

    fn load(dir: &Path) -> Result<Self, String> {
        let root = Certificate::from_pem(read_bounded(&dir.join(ROOT_CERT_FILE))?.as_bytes())
            .map_err(|e| format!("{ROOT_CERT_FILE}: {e}"))?;
        let intermediate =
            Certificate::from_pem(read_bounded(&dir.join(INTERMEDIATE_CERT_FILE))?.as_bytes())
                .map_err(|e| format!("{INTERMEDIATE_CERT_FILE}: {e}"))?;
        let key_pem = read_bounded(&dir.join(INTERMEDIATE_KEY_FILE))?;
        let intermediate_key = SecretKey(
            SigningKey::from_pkcs8_pem(&key_pem)
                .map_err(|e| format!("{INTERMEDIATE_KEY_FILE}: {e}"))?,
        );

        // The key must belong to the certificate.
        let cert_spki = intermediate
            .tbs_certificate()
            .subject_public_key_info()
            .to_der()
            .map_err(|e| e.to_string())?;
        let key_spki = intermediate_key
            .verifying_key()
            .to_public_key_der()
            .map_err(|e| e.to_string())?;
        if cert_spki != key_spki.as_bytes() {
            return Err(format!(
                "{INTERMEDIATE_KEY_FILE} does not match {INTERMEDIATE_CERT_FILE}"
            ));
        }
        // The intermediate must be issued by the root.
        if intermediate.tbs_certificate().issuer() != root.tbs_certificate().subject() {
            return Err(format!(
                "{INTERMEDIATE_CERT_FILE} is not issued by {ROOT_CERT_FILE}"
            ));
        }
        verify_signed_by(&intermediate, &root)
            .map_err(|e| format!("{INTERMEDIATE_CERT_FILE} signature: {e}"))?;

        let intermediate_not_after = intermediate
            .tbs_certificate()
            .validity()
            .not_after
            .to_system_time();
        let needed = SystemTime::now()
            .checked_add(LEAF_LIFETIME)
            .ok_or_else(|| "clock out of range".to_owned())?;
        if intermediate_not_after < needed {
            return Err(format!(
                "{INTERMEDIATE_CERT_FILE} expires too soon; delete the directory to regenerate the PKI"
            ));
        }
        let intermediate_subject = intermediate.tbs_certificate().subject().clone();
        Ok(Self {
            dir: dir.to_path_buf(),
            root_der: root.to_der().map_err(|e| e.to_string())?,
            intermediate_der: intermediate.to_der().map_err(|e| e.to_string())?,
            intermediate_subject,
            intermediate_not_after,
            intermediate_key,
        })
    }
}

/// Checks `cert`'s ECDSA P-384 / SHA-384 signature with `issuer`'s key.
fn verify_signed_by(cert: &Certificate, issuer: &Certificate) -> Result<(), String> {
    let issuer_key = VerifyingKey::from_sec1_bytes(
        issuer
            .tbs_certificate()
            .subject_public_key_info()
            .subject_public_key
            .raw_bytes(),
    )
    .map_err(|e| format!("issuer key: {e}"))?;
    let tbs = cert.tbs_certificate().to_der().map_err(|e| e.to_string())?;
    let sig: &BitString = cert.signature();
    let sig = DerSignature::from_bytes(sig.raw_bytes()).map_err(|e| e.to_string())?;
    issuer_key.verify(&tbs, &sig).map_err(|e| e.to_string())
}

fn cert_pem(cert: &Certificate) -> Result<String, String> {
    cert.to_pem(LineEnding::LF).map_err(|e| e.to_string())
}

fn key_pem(key: &SecretKey) -> Result<Zeroizing<String>, String> {
    key.0
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| format!("encoding private key: {e}"))
}

fn write_file(path: &Path, content: &[u8], mode: u32) -> Result<(), String> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("creating {}: {e}", path.display()))?;
    f.write_all(content)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("writing {}: {e}", path.display()))
}

fn read_bounded(path: &Path) -> Result<Zeroizing<String>, String> {
    let f = File::open(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut s = Zeroizing::new(String::new());
    f.take(MAX_PEM_FILE + 1)
        .read_to_string(&mut s)
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    if s.len() as u64 > MAX_PEM_FILE {
        return Err(format!(
            "{} is larger than {MAX_PEM_FILE} bytes",
            path.display()
        ));
    }
    Ok(s)
}

/// Removes a half-built temporary directory unless disarmed.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = fs::remove_dir_all(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use der::Decode;

    #[test]
    fn chain_has_the_extensions_webpki_needs() {
        let dir = tempfile::tempdir().unwrap();
        let pki = MockPki::open(dir.path().join("pki")).unwrap();
        let leaf = pki.issue_leaf("leaf", SystemTime::now()).unwrap();
        let root = Certificate::from_der(pki.root_der()).unwrap();
        let inter = Certificate::from_der(pki.intermediate_der()).unwrap();
        let leaf_cert = Certificate::from_der(&leaf.cert_der).unwrap();
        let bc = |c: &Certificate| {
            let (critical, bc) = c
                .tbs_certificate()
                .get_extension::<BasicConstraints>()
                .unwrap()
                .unwrap();
            assert!(critical);
            bc
        };
        assert!(bc(&root).ca);
        assert_eq!(bc(&inter).path_len_constraint, Some(0));
        assert!(!bc(&leaf_cert).ca);
        let ku = |c: &Certificate| {
            c.tbs_certificate()
                .get_extension::<KeyUsage>()
                .unwrap()
                .unwrap()
                .1
        };
        assert!(ku(&inter).key_cert_sign() && ku(&inter).crl_sign());
        assert!(ku(&leaf_cert).digital_signature() && !ku(&leaf_cert).key_cert_sign());
        verify_signed_by(&leaf_cert, &inter).unwrap();
        verify_signed_by(&inter, &root).unwrap();
        verify_signed_by(&root, &root).unwrap();
        assert!(verify_signed_by(&leaf_cert, &root).is_err());
        assert_ne!(
            leaf_cert.tbs_certificate().serial_number(),
            inter.tbs_certificate().serial_number()
        );
        let v = leaf_cert.tbs_certificate().validity();
        let span = v.not_after.to_unix_duration() - v.not_before.to_unix_duration();
        assert_eq!(span, LEAF_LIFETIME + BACKDATE);
    }

    #[test]
    fn key_files_are_private_and_keys_never_print() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let pki = MockPki::open(dir.path()).unwrap();
        // Keys: owner only (whatever the umask). Certificates: at least
        // owner-readable.
        for file in [ROOT_KEY_FILE, INTERMEDIATE_KEY_FILE] {
            let mode = fs::metadata(dir.path().join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{file}: {mode:o}");
        }
        for file in [ROOT_CERT_FILE, INTERMEDIATE_CERT_FILE] {
            let mode = fs::metadata(dir.path().join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o400, 0o400, "{file}: {mode:o}");
        }
        let dbg = format!("{pki:?}");
        let key = read_bounded(&dir.path().join(INTERMEDIATE_KEY_FILE)).unwrap();
        let body: String = key.lines().nth(1).unwrap().to_owned();
        assert!(!dbg.contains(&body), "{dbg}");
        assert!(dbg.contains("MockPki"));
    }

    #[test]
    fn mismatched_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(MockPki::open(dir.path()).unwrap());
        let other = tempfile::tempdir().unwrap();
        drop(MockPki::open(other.path()).unwrap());
        fs::copy(
            other.path().join(INTERMEDIATE_KEY_FILE),
            dir.path().join(INTERMEDIATE_KEY_FILE),
        )
        .unwrap();
        let err = MockPki::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
    }

    #[test]
    fn non_empty_foreign_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("unrelated"), b"x").unwrap();
        let err = MockPki::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("must be absent, empty"), "{err}");
        // No temporary directory is left behind.
        let parent = dir.path().parent().unwrap();
        let name = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let leftovers = fs::read_dir(parent)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!(".{name}.tmp-"))
            })
            .count();
        assert_eq!(leftovers, 0);
    }
}
