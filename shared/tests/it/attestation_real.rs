//! The six real NSM documents against the real AWS root: they verify at
//! their own timestamp, decode to the manifest's values, fail today, and
//! every tampering is refused for the right reason.
#![allow(clippy::unwrap_used)]

use crate::support::attestation as attestation_support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use attestation_support::{REAL_DOCS, real_doc, vector};
use keystore_shared::attestation::{
    AWS_ROOT_G1_SHA256, AttestationDocument, AttestationError, MAX_DOCUMENT_SIZE, Root, Verifier,
    VerifyAt, rfc3339,
};
use sha2::{Digest, Sha256};

struct Expected {
    file: &'static str,
    module_id: &'static str,
    timestamp: u64,
    pcr0: &'static str,
    public_key_len: Option<usize>,
    user_data_len: Option<usize>,
    nonce_len: Option<usize>,
    leaf_not_before: &'static str,
    leaf_not_after: &'static str,
}

// Copied from tests/vectors/nitro-kms/manifest.json (decoded independently
// with Python cbor2 + cryptography).
const EXPECTED: [Expected; 6] = [
    Expected {
        file: "blocky_2024-09-07_debug_max1024.cose",
        module_id: "i-0a22e5c5f24d22174-enc0191ccebaf8feaba",
        timestamp: 1725719886508,
        pcr0: "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        public_key_len: Some(1024),
        user_data_len: Some(1024),
        nonce_len: Some(1024),
        leaf_not_before: "2024-09-07T14:38:03Z",
        leaf_not_after: "2024-09-07T17:38:06Z",
    },
    Expected {
        file: "blocky_2024-09-07_production_max1024.cose",
        module_id: "i-0a22e5c5f24d22174-enc0191cceb4289903f",
        timestamp: 1725719859545,
        pcr0: "e72a46ca80a260fb044a125442f0c7e331813bcbaf9724d9f3857758992766f2d65710a27aa94ae3949dd54e7c9fe86a",
        public_key_len: Some(1024),
        user_data_len: Some(1024),
        nonce_len: Some(1024),
        leaf_not_before: "2024-09-07T14:37:36Z",
        leaf_not_after: "2024-09-07T17:37:39Z",
    },
    Expected {
        file: "evervault_2022-10-12_debug.cose",
        module_id: "i-03ad7cdb817437eeb-enc0183cc7569b3f6e1",
        timestamp: 1665582606081,
        pcr0: "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        public_key_len: Some(19),
        user_data_len: Some(13),
        nonce_len: None,
        leaf_not_before: "2022-10-12T13:49:51Z",
        leaf_not_after: "2022-10-12T16:49:54Z",
    },
    Expected {
        file: "evervault_2022-10-13_production.cose",
        module_id: "i-020b6af9246d90e92-enc0183d09086c24190",
        timestamp: 1665651482136,
        pcr0: "f4d48b81a460c9916d1e685119074bf24660afd3e34fae9fca0a0d28d9d5599936332687e6f66fc890ac8cf150142d8b",
        public_key_len: None,
        user_data_len: None,
        nonce_len: Some(256),
        leaf_not_before: "2022-10-13T08:57:59Z",
        leaf_not_after: "2022-10-13T11:58:02Z",
    },
    Expected {
        file: "evervault_2023-01-18_production_from_cert_san.cose",
        module_id: "i-0ec0e572c8263d8ff-enc0185c4fd382eeb25",
        timestamp: 1674047239280,
        pcr0: "d265a83faa7b4fa0d73b82b6d06253e894445922937d0ee5a74fe4891da9817611a71e71b98e5329232902de3cf419af",
        public_key_len: None,
        user_data_len: Some(120),
        nonce_len: Some(256),
        leaf_not_before: "2023-01-18T13:07:13Z",
        leaf_not_after: "2023-01-18T16:07:16Z",
    },
    Expected {
        file: "evervault_2023-09-18_debug.cose",
        module_id: "i-0918f6c55e3b61d89-enc018aa8b8e2285d13",
        timestamp: 1695049410860,
        pcr0: "000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000",
        public_key_len: None,
        user_data_len: Some(91),
        nonce_len: Some(256),
        leaf_not_before: "2023-09-18T14:37:09Z",
        leaf_not_after: "2023-09-18T17:37:12Z",
    },
];

fn aws() -> Root {
    Root::aws_nitro_enclaves_g1().unwrap()
}

fn verifier() -> Verifier {
    Verifier::new(aws()).at(VerifyAt::Document)
}

const PRODUCTION: &str = "blocky_2024-09-07_production_max1024.cose";

#[test]
fn expectations_table_covers_every_vector() {
    let mut files: Vec<&str> = EXPECTED.iter().map(|e| e.file).collect();
    files.sort_unstable();
    assert_eq!(files, REAL_DOCS);
}

#[test]
fn every_real_document_verifies_at_its_timestamp_and_decodes() {
    for e in &EXPECTED {
        let bytes = real_doc(e.file);
        let doc = verifier()
            .verify(&bytes)
            .unwrap_or_else(|err| panic!("{}: {err}", e.file));
        assert_eq!(doc.module_id, e.module_id, "{}", e.file);
        assert_eq!(doc.timestamp, e.timestamp, "{}", e.file);
        assert_eq!(doc.digest, "SHA384");
        assert_eq!(hex::encode(&doc.pcrs[&0]), e.pcr0, "{}", e.file);
        assert_eq!(doc.pcrs.len(), 16, "{}", e.file);
        assert!(doc.pcrs.values().all(|v| v.len() == 48));
        assert_eq!(doc.public_key.as_ref().map(Vec::len), e.public_key_len);
        assert_eq!(doc.user_data.as_ref().map(Vec::len), e.user_data_len);
        assert_eq!(doc.nonce.as_ref().map(Vec::len), e.nonce_len);
        assert_eq!(doc.cabundle.len(), 4);
        assert_eq!(doc.cabundle[0], aws().der(), "cabundle[0] is the AWS root");
        // The unverified parse decodes to the same thing.
        assert_eq!(AttestationDocument::parse_unverified(&bytes).unwrap(), doc);
        let chain = doc.certificate_chain().unwrap();
        assert_eq!(chain.len(), 5);
        assert_eq!(rfc3339(&chain[0].not_before), e.leaf_not_before);
        assert_eq!(rfc3339(&chain[0].not_after), e.leaf_not_after);
        assert!(!chain[0].is_ca);
        assert!(chain[1..].iter().all(|c| c.is_ca));
        assert_eq!(chain[4].subject, aws().subject());
    }
}

#[test]
fn every_real_document_fails_today_because_the_leaf_expired() {
    for e in &EXPECTED {
        let bytes = real_doc(e.file);
        for v in [
            Verifier::new(aws()),
            Verifier::new(aws()).at(VerifyAt::Now),
            Verifier::new(aws()).at(VerifyAt::Time(SystemTime::now())),
        ] {
            match v.verify(&bytes) {
                Err(AttestationError::CertificateNotValidAt {
                    depth, not_after, ..
                }) => {
                    assert_eq!(depth, 0, "{}: the leaf is reported first", e.file);
                    assert_eq!(rfc3339(&not_after), e.leaf_not_after);
                }
                other => panic!("{}: expected expiry, got {other:?}", e.file),
            }
        }
    }
}

#[test]
fn validity_window_edges_are_enforced() {
    let bytes = real_doc(PRODUCTION);
    let doc = AttestationDocument::parse_unverified(&bytes).unwrap();
    let leaf = &doc.certificate_chain().unwrap()[0];
    let ok = |t| verifier().at(VerifyAt::Time(t)).verify(&bytes);
    ok(leaf.not_before).unwrap();
    ok(leaf.not_after).unwrap();
    let before = ok(leaf.not_before - Duration::from_secs(1)).unwrap_err();
    assert!(matches!(
        before,
        AttestationError::CertificateNotValidAt { depth: 0, .. }
    ));
    let after = ok(leaf.not_after + Duration::from_secs(1)).unwrap_err();
    assert!(matches!(
        after,
        AttestationError::CertificateNotValidAt { depth: 0, .. }
    ));
    // Before the AWS root existed, every certificate is invalid; the leaf is named.
    let ancient = ok(UNIX_EPOCH + Duration::from_secs(1_000_000_000)).unwrap_err();
    assert!(matches!(
        ancient,
        AttestationError::CertificateNotValidAt { depth: 0, .. }
    ));
    assert!(
        ancient.to_string().contains("2001-09-09T01:46:40Z"),
        "{ancient}"
    );
}

#[test]
fn embedded_root_matches_the_published_fingerprint_and_the_vectors() {
    let root = aws();
    assert_eq!(hex::encode(Sha256::digest(root.der())), AWS_ROOT_G1_SHA256);
    assert_eq!(hex::encode(root.fingerprint_sha256()), AWS_ROOT_G1_SHA256);
    assert_eq!(root.der(), vector("root/aws_nitro_enclaves_root_g1.der"));
    let pem = String::from_utf8(vector("root/aws_nitro_enclaves_root_g1.pem")).unwrap();
    assert_eq!(Root::from_pem(&pem).unwrap().der(), root.der());
    assert!(
        root.subject().contains("CN=aws.nitro-enclaves"),
        "{}",
        root.subject()
    );
}

#[test]
fn pinned_root_constructor_refuses_other_bytes() {
    let der = vector("root/aws_nitro_enclaves_root_g1.der");
    let wrong = "00".repeat(32);
    assert!(matches!(
        Root::from_der_pinned(&der, &wrong),
        Err(AttestationError::RootFingerprintMismatch { .. })
    ));
    let mut altered = der.clone();
    let last = altered.len() - 1;
    altered[last] ^= 1;
    assert!(matches!(
        Root::from_der_pinned(&altered, AWS_ROOT_G1_SHA256),
        Err(AttestationError::RootFingerprintMismatch { .. })
    ));
    Root::from_der_pinned(&der, &AWS_ROOT_G1_SHA256.to_uppercase()).unwrap();
}

#[test]
fn flipped_signature_byte_is_a_bad_signature() {
    for e in &EXPECTED {
        let mut bytes = real_doc(e.file);
        let last = bytes.len() - 1; // the signature is the last 96 bytes
        bytes[last - 40] ^= 0x01;
        assert_eq!(
            verifier().verify(&bytes),
            Err(AttestationError::BadSignature),
            "{}",
            e.file
        );
    }
}

#[test]
fn changed_pcr_byte_is_a_bad_signature() {
    let mut bytes = real_doc(PRODUCTION);
    let pcr0 = hex::decode(EXPECTED[1].pcr0).unwrap();
    let at = bytes
        .windows(48)
        .position(|w| w == pcr0.as_slice())
        .unwrap();
    bytes[at + 10] ^= 0x80;
    let doc = AttestationDocument::parse_unverified(&bytes).unwrap();
    assert_ne!(
        hex::encode(&doc.pcrs[&0]),
        EXPECTED[1].pcr0,
        "the edit hit PCR0"
    );
    assert_eq!(
        verifier().verify(&bytes),
        Err(AttestationError::BadSignature)
    );
}

#[test]
fn changed_nonce_byte_is_a_bad_signature() {
    let mut bytes = real_doc("evervault_2022-10-13_production.cose");
    // The nonce is the last field of the payload, right before the signature.
    let at = bytes.len() - 96 - 3 - 10;
    bytes[at] ^= 0x55;
    assert_eq!(
        verifier().verify(&bytes),
        Err(AttestationError::BadSignature)
    );
}

#[test]
fn intermediate_taken_as_root_is_untrusted() {
    let bytes = real_doc(PRODUCTION);
    let doc = AttestationDocument::parse_unverified(&bytes).unwrap();
    let foreign = Root::from_der(&doc.cabundle[1]).unwrap();
    let err = Verifier::new(foreign)
        .at(VerifyAt::Document)
        .verify(&bytes)
        .unwrap_err();
    assert!(
        matches!(err, AttestationError::UntrustedRoot { .. }),
        "{err}"
    );
}

#[test]
fn expected_pcr_mismatch_names_the_pcr() {
    let bytes = real_doc(PRODUCTION);
    let good = hex::decode(EXPECTED[1].pcr0).unwrap();
    verifier()
        .expect_pcr(0, good.clone())
        .verify(&bytes)
        .unwrap();
    let mut bad = good;
    bad[0] ^= 1;
    match verifier().expect_pcr(0, bad.clone()).verify(&bytes) {
        Err(AttestationError::PcrMismatch {
            index,
            expected_hex,
            actual_hex,
        }) => {
            assert_eq!(index, 0);
            assert_eq!(expected_hex, hex::encode(&bad));
            assert_eq!(actual_hex, EXPECTED[1].pcr0);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        verifier().expect_pcr(20, vec![0; 48]).verify(&bytes),
        Err(AttestationError::PcrMissing { index: 20 })
    );
}

#[test]
fn nonce_and_public_key_expectations() {
    let bytes = real_doc(PRODUCTION);
    verifier()
        .expect_nonce(vec![1u8; 1024])
        .verify(&bytes)
        .unwrap();
    verifier()
        .expect_public_key(vec![1u8; 1024])
        .verify(&bytes)
        .unwrap();
    assert_eq!(
        verifier().expect_nonce(vec![1u8; 1023]).verify(&bytes),
        Err(AttestationError::NonceMismatch)
    );
    assert_eq!(
        verifier().expect_public_key(vec![2u8; 1024]).verify(&bytes),
        Err(AttestationError::PublicKeyMismatch)
    );
    // Absent in the document counts as a mismatch.
    let no_nonce = real_doc("evervault_2022-10-12_debug.cose");
    assert_eq!(
        verifier().expect_nonce(vec![0u8; 8]).verify(&no_nonce),
        Err(AttestationError::NonceMismatch)
    );
    let no_key = real_doc("evervault_2022-10-13_production.cose");
    assert_eq!(
        verifier().expect_public_key(b"k".to_vec()).verify(&no_key),
        Err(AttestationError::PublicKeyMismatch)
    );
}

#[test]
fn oversized_document_is_refused_before_parsing() {
    let mut bytes = real_doc(PRODUCTION);
    bytes.resize(MAX_DOCUMENT_SIZE + 1, 0);
    let err = verifier().verify(&bytes).unwrap_err();
    assert_eq!(
        err,
        AttestationError::TooLarge {
            len: MAX_DOCUMENT_SIZE + 1,
            max: MAX_DOCUMENT_SIZE
        }
    );
    assert_eq!(AttestationDocument::parse_unverified(&bytes), Err(err));
}

#[test]
fn trailing_or_missing_bytes_are_malformed() {
    let bytes = real_doc(PRODUCTION);
    let mut extended = bytes.clone();
    extended.push(0);
    assert!(matches!(
        verifier().verify(&extended),
        Err(AttestationError::Malformed { .. })
    ));
    assert!(matches!(
        verifier().verify(&bytes[..bytes.len() - 1]),
        Err(AttestationError::Malformed { .. })
    ));
    assert!(matches!(
        verifier().verify(&[]),
        Err(AttestationError::Malformed { .. })
    ));
}

#[test]
fn tagged_cose_sign1_is_accepted() {
    let mut tagged = vec![0xd2]; // tag 18
    tagged.extend(real_doc(PRODUCTION));
    verifier().verify(&tagged).unwrap();
    let mut wrong_tag = vec![0xd1]; // tag 17 = COSE_Mac0
    wrong_tag.extend(real_doc(PRODUCTION));
    assert!(matches!(
        verifier().verify(&wrong_tag),
        Err(AttestationError::Malformed { .. })
    ));
}
