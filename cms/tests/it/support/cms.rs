//! Shared loaders for the CMS test binaries: the real KMS vectors and their
//! published private keys.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::path::PathBuf;

use rsa::PrivateKey;
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::DecodePrivateKey;

/// The six real `CiphertextForRecipient` blobs (file names).
pub const REAL_BLOBS: [&str; 6] = [
    "enclaver_cfr_hello_world.ber",
    "sdkgo_cfr_datakey.ber",
    "sdkc_cms_test_input_ber.ber",
    "sdkc_cms_test_input_ber_w_ctx.ber",
    "rustcrypto_kms_ciphertext_for_recipient_1.ber",
    "rustcrypto_kms_ciphertext_for_recipient_4.ber",
];

/// Path of a file in `tests/vectors/nitro-kms/cms/`.
pub fn vector_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/vectors/nitro-kms/cms")
        .join(name)
}

/// Contents of a vector file.
pub fn vector(name: &str) -> Vec<u8> {
    let path = vector_path(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The enclaver recipient key (PKCS#8 DER).
pub fn enclaver_key() -> PrivateKey {
    PrivateKey::from_pkcs8_der(&vector("enclaver_recipient_key.pkcs8.der")).expect("enclaver key")
}

/// The nitro-enclaves-sdk-go recipient key (PKCS#1 PEM).
pub fn sdkgo_key() -> PrivateKey {
    let pem = String::from_utf8(vector("sdkgo_recipient_key.pkcs1.pem")).expect("utf-8 PEM");
    PrivateKey::from_pkcs1_pem(&pem).expect("sdkgo key")
}

/// Index of the first occurrence of `needle` in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
