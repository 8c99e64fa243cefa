//! Attestation documents come from KMS callers and host apps: parsing and
//! verifying arbitrary bytes must return a typed error, never panic.
#![no_main]

use std::sync::OnceLock;

use keystore_shared::attestation::{AttestationDocument, Root, Verifier, VerifyAt};
use libfuzzer_sys::fuzz_target;

fn verifier() -> &'static Verifier {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        let root = Root::aws_nitro_enclaves_g1().expect("embedded root");
        Verifier::new(root).at(VerifyAt::Document)
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = AttestationDocument::parse_unverified(data);
    let _ = verifier().verify(data);
});
