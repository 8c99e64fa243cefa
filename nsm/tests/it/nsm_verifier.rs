//! The mock NSM judged by the project's own verifier: the same code that
//! checks real AWS documents accepts the mock's documents under the mock
//! root, and refuses them under the AWS root — so nothing mock-signed can
//! pass for a real enclave.

use std::time::{Duration, SystemTime};

use keystore_nsm::mock::PCR_LEN;
use keystore_nsm::{AttestationRequest, MockConfig, MockNsm, Nsm};
use keystore_shared::attestation::{AttestationError, Root, Verifier, VerifyAt};

fn mock(dir: &std::path::Path) -> MockNsm {
    let mut config = MockConfig::default();
    config.pcrs.insert(1, [0x11; PCR_LEN]);
    MockNsm::open(dir, config).expect("mock NSM opens")
}

fn mock_root(nsm: &MockNsm) -> Root {
    let pem = std::fs::read_to_string(nsm.pki().root_pem_path()).expect("root.pem");
    Root::from_pem(&pem).expect("mock root parses")
}

fn request() -> AttestationRequest {
    AttestationRequest {
        public_key: Some(b"spki-der-would-go-here".to_vec()),
        user_data: Some(vec![7; 1024]),
        nonce: Some(vec![0xab; 32]),
    }
}

#[test]
fn mock_documents_verify_under_the_mock_root_with_every_expectation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nsm = mock(dir.path());
    let req = request();
    let doc = nsm.attest(&req).expect("attest");

    let pcr0 = nsm.pcr(0).expect("pcr0");
    let verified = Verifier::new(mock_root(&nsm))
        .at(VerifyAt::Now)
        .expect_pcr(0, pcr0.to_vec())
        .expect_pcr(1, vec![0x11; PCR_LEN])
        .expect_nonce(req.nonce.clone().expect("nonce"))
        .expect_public_key(req.public_key.clone().expect("key"))
        .verify(&doc)
        .expect("the project's verifier accepts a mock document");

    assert_eq!(verified.digest, "SHA384");
    assert_eq!(verified.pcrs.len(), 16);
    assert_eq!(verified.module_id, nsm.module_id());
    assert_eq!(verified.user_data, req.user_data);
    // PCR0 is the hash of this very test binary, as an EIF build would measure it.
    assert_eq!(pcr0, keystore_nsm::mock::executable_pcr0().expect("pcr0"));
}

#[test]
fn mock_documents_are_refused_under_the_aws_root() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nsm = mock(dir.path());
    let doc = nsm.attest(&request()).expect("attest");
    let err = Verifier::new(Root::aws_nitro_enclaves_g1().expect("aws root"))
        .verify(&doc)
        .expect_err("a mock document must never pass for a real one");
    assert!(
        matches!(err, AttestationError::UntrustedRoot { .. }),
        "unexpected error: {err}"
    );
}

#[test]
fn another_mock_pki_is_a_foreign_root() {
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    let doc = mock(a.path()).attest(&request()).expect("attest");
    let err = Verifier::new(mock_root(&mock(b.path())))
        .verify(&doc)
        .expect_err("foreign root");
    assert!(
        matches!(err, AttestationError::UntrustedRoot { .. }),
        "unexpected error: {err}"
    );
}

#[test]
fn expectations_and_time_are_enforced_on_mock_documents() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nsm = mock(dir.path());
    let doc = nsm.attest(&request()).expect("attest");
    let verifier = Verifier::new(mock_root(&nsm));

    let err = verifier
        .clone()
        .expect_pcr(0, vec![0; PCR_LEN])
        .verify(&doc)
        .expect_err("wrong PCR0");
    assert!(
        matches!(err, AttestationError::PcrMismatch { index: 0, .. }),
        "{err}"
    );

    let err = verifier
        .clone()
        .expect_nonce(vec![0xac; 32])
        .verify(&doc)
        .expect_err("wrong nonce");
    assert!(matches!(err, AttestationError::NonceMismatch), "{err}");

    // The leaf lives about three hours, like a real NSM leaf.
    let later = SystemTime::now() + Duration::from_secs(4 * 3600);
    let err = verifier
        .at(VerifyAt::Time(later))
        .verify(&doc)
        .expect_err("expired leaf");
    assert!(
        matches!(
            err,
            AttestationError::CertificateNotValidAt { depth: 0, .. }
        ),
        "{err}"
    );
}

#[test]
fn flipping_any_signature_byte_is_caught() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nsm = mock(dir.path());
    let doc = nsm.attest(&request()).expect("attest");
    let verifier = Verifier::new(mock_root(&nsm));
    // The raw r||s signature is the document's last 96 bytes.
    for offset in [1, 48, 96] {
        let mut bad = doc.clone();
        let i = bad.len() - offset;
        bad[i] ^= 0x01;
        let err = verifier.verify(&bad).expect_err("tampered signature");
        assert!(matches!(err, AttestationError::BadSignature), "{err}");
    }
}
