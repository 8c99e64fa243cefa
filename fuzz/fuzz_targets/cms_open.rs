//! `CiphertextForRecipient` arrives from outside the enclave: parsing and
//! opening it must fail with a typed error, never panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rsa::PrivateKey;
use rsa::pkcs8::DecodePrivateKey;

/// The real recipient key published with the enclaver vector, so mutations
/// of real blobs reach the decryption path.
static KEY: &[u8] =
    include_bytes!("../../tests/vectors/nitro-kms/cms/enclaver_recipient_key.pkcs8.der");

fn key() -> &'static PrivateKey {
    static PARSED: OnceLock<PrivateKey> = OnceLock::new();
    PARSED.get_or_init(|| PrivateKey::from_pkcs8_der(KEY).expect("vector key parses"))
}

fuzz_target!(|data: &[u8]| {
    let _ = keystore_cms::parse(data);
    let _ = keystore_cms::open(data, key());
});
