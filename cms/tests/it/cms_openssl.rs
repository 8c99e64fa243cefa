//! Interop with an independent CMS implementation, the `openssl cms` CLI:
//! openssl-made envelopes (DER, and indefinite-length BER with `-stream`)
//! must open with our `open`, and openssl must open our builder's output.
//!
//! The recipient certificate carries subjectKeyIdentifier = SHA-256 of its
//! SPKI DER, as KMS names recipients, so `open` stays fully strict. openssl
//! writes the SHA-256 AlgorithmIdentifiers without NULL parameters, KMS with
//! them: between this file and the real vectors both forms are covered.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::support::cms::find;
use keystore_cms::{CmsError, open, rsa_subject_key_identifier, seal_for_recipient};
use rsa::PrivateKey;
use rsa::pkcs8::DecodePrivateKey;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

/// An openssl-generated key and self-signed certificate in a temp dir.
struct Fixture {
    dir: TempDir,
    key: PrivateKey,
}

impl Fixture {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn openssl(args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("the openssl CLI must be installed (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

fn make_fixture(bits: usize, ski_choice: SkiChoice) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let key_pem = dir.path().join("key.pem");
    let key_der = dir.path().join("key.der");
    let cert = dir.path().join("cert.pem");
    let bits_opt = format!("rsa_keygen_bits:{bits}");
    openssl(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        &bits_opt,
        "-out",
        s(&key_pem),
    ]);
    openssl(&[
        "pkcs8",
        "-topk8",
        "-nocrypt",
        "-in",
        s(&key_pem),
        "-outform",
        "DER",
        "-out",
        s(&key_der),
    ]);
    let key = PrivateKey::from_pkcs8_der(&std::fs::read(&key_der).expect("key.der"))
        .expect("openssl PKCS#8 key");

    // SKI from openssl's own SPKI encoding, cross-checked with ours.
    let spki_der = openssl(&["pkey", "-in", s(&key_pem), "-pubout", "-outform", "DER"]);
    let ski: [u8; 32] = Sha256::digest(&spki_der).into();
    assert_eq!(
        ski,
        rsa_subject_key_identifier(&key.to_public_key()).expect("ski")
    );
    let ext = match ski_choice {
        SkiChoice::Sha256OfSpki => format!("subjectKeyIdentifier={}", hex::encode(ski)),
        // openssl's default: SHA-1 of the public key bits (20 bytes).
        SkiChoice::OpensslDefault => "subjectKeyIdentifier=hash".to_owned(),
    };
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        s(&key_pem),
        "-subj",
        "/CN=nitro-keystore cms test recipient",
        "-days",
        "1",
        "-addext",
        &ext,
        "-out",
        s(&cert),
    ]);
    let printed = String::from_utf8(openssl(&[
        "x509",
        "-in",
        s(&cert),
        "-noout",
        "-ext",
        "subjectKeyIdentifier",
    ]))
    .expect("utf-8");
    let printed_hex: String = printed
        .lines()
        .nth(1)
        .unwrap_or_default()
        .trim()
        .replace(':', "")
        .to_lowercase();
    match ski_choice {
        SkiChoice::Sha256OfSpki => assert_eq!(printed_hex, hex::encode(ski), "{printed}"),
        SkiChoice::OpensslDefault => assert_eq!(printed_hex.len(), 40, "{printed}"),
    }
    Fixture { dir, key }
}

#[derive(Clone, Copy)]
enum SkiChoice {
    /// What KMS does: SHA-256 of the SPKI DER.
    Sha256OfSpki,
    /// openssl's default SHA-1 key identifier, which must not match.
    OpensslDefault,
}

static RSA2048: OnceLock<Fixture> = OnceLock::new();
static RSA4096: OnceLock<Fixture> = OnceLock::new();

fn rsa2048() -> &'static Fixture {
    RSA2048.get_or_init(|| make_fixture(2048, SkiChoice::Sha256OfSpki))
}

fn rsa4096() -> &'static Fixture {
    RSA4096.get_or_init(|| make_fixture(4096, SkiChoice::Sha256OfSpki))
}

fn payload(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i * 7 % 253) as u8).collect()
}

/// Encrypts `plaintext` with `openssl cms` to the fixture's certificate.
fn openssl_encrypt(fx: &Fixture, plaintext: &[u8], stream: bool, tag: &str) -> Vec<u8> {
    let input = fx.path(&format!("{tag}.in"));
    let output = fx.path(&format!("{tag}.cms"));
    std::fs::write(&input, plaintext).expect("write plaintext");
    let cert = fx.path("cert.pem");
    let mut args = vec![
        "cms",
        "-encrypt",
        "-binary",
        "-keyid",
        "-recip",
        s(&cert),
        "-keyopt",
        "rsa_padding_mode:oaep",
        "-keyopt",
        "rsa_oaep_md:sha256",
        "-keyopt",
        "rsa_mgf1_md:sha256",
        "-aes256",
        "-outform",
        "DER",
        "-in",
        s(&input),
        "-out",
        s(&output),
    ];
    if stream {
        args.push("-stream");
    }
    openssl(&args);
    std::fs::read(&output).expect("read openssl output")
}

/// SHA-256 AlgorithmIdentifier as openssl writes it: no NULL parameters.
const SHA256_ALGID_NO_NULL: &str = "300b0609608648016503040201";
/// SHA-256 AlgorithmIdentifier as KMS writes it: with NULL parameters.
const SHA256_ALGID_NULL: &str = "300d06096086480165030402010500";

const OPENSSL_SIZES: [usize; 8] = [0, 1, 16, 1000, 4095, 4096, 5000, 100_000];

fn check_openssl_produced(stream: bool) {
    let fx = rsa2048();
    for size in OPENSSL_SIZES {
        let plaintext = payload(size);
        let tag = format!("openssl-{}-{size}", if stream { "ber" } else { "der" });
        let blob = openssl_encrypt(fx, &plaintext, stream, &tag);
        // Prove which encoding this case exercised.
        assert_eq!(blob.starts_with(&[0x30, 0x80]), stream, "{tag}");
        assert!(find(&blob, &hex::decode(SHA256_ALGID_NO_NULL).expect("hex")).is_some());
        assert!(find(&blob, &hex::decode(SHA256_ALGID_NULL).expect("hex")).is_none());

        let opened = open(&blob, &fx.key).unwrap_or_else(|e| panic!("{tag}: {e}"));
        assert_eq!(opened.as_slice(), plaintext, "{tag}");
    }
}

#[test]
fn openssl_der_envelopes_open() {
    check_openssl_produced(false);
}

#[test]
fn openssl_streamed_ber_envelopes_open() {
    check_openssl_produced(true);
}

#[test]
fn openssl_envelope_for_another_key_is_a_recipient_mismatch() {
    let blob = openssl_encrypt(rsa2048(), b"not for you", true, "mismatch");
    let err = open(&blob, &rsa4096().key).unwrap_err();
    assert!(matches!(err, CmsError::RecipientMismatch), "{err:?}");
}

#[test]
fn sha1_key_identifier_is_not_accepted_as_ours() {
    // Same key material, but the certificate names it the openssl way
    // (SHA-1): KMS would never address us so, and `open` must not guess.
    let fx = make_fixture(2048, SkiChoice::OpensslDefault);
    let blob = openssl_encrypt(&fx, b"hello", false, "sha1-ski");
    let err = open(&blob, &fx.key).unwrap_err();
    assert!(matches!(err, CmsError::RecipientMismatch), "{err:?}");
}

fn check_openssl_opens_builder_output(fx: &Fixture, bits: usize) {
    for size in [0usize, 12, 1000, 4112, 100_000] {
        let plaintext = payload(size);
        let sealed = seal_for_recipient(&plaintext, &fx.key.to_public_key(), &mut rand::rng())
            .expect("seal");
        let tag = format!("ours-{bits}-{size}");
        let input = fx.path(&format!("{tag}.cms"));
        let output = fx.path(&format!("{tag}.out"));
        std::fs::write(&input, &sealed).expect("write sealed");
        openssl(&[
            "cms",
            "-decrypt",
            "-binary",
            "-inform",
            "DER",
            "-inkey",
            s(&fx.path("key.pem")),
            "-in",
            s(&input),
            "-out",
            s(&output),
        ]);
        let decrypted = std::fs::read(&output).expect("read openssl plaintext");
        assert_eq!(decrypted, plaintext, "{tag}");
    }
}

#[test]
fn openssl_opens_builder_output_rsa2048() {
    check_openssl_opens_builder_output(rsa2048(), 2048);
}

#[test]
fn openssl_opens_builder_output_rsa4096() {
    check_openssl_opens_builder_output(rsa4096(), 4096);
}
