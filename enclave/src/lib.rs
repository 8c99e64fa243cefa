//! The nitro-keystore enclave: it talks to the Nitro Security Module
//! (`keystore_nsm`), holds an ephemeral RSA recipient key, opens KMS
//! `CiphertextForRecipient` blobs (`keystore_cms`), keeps secrets sealed in
//! memory ([`store`]) under the operator's access rules ([`access`]), serves them over vsock ([`server`])
//! and records every read in a hash-chained, attested audit trail ([`audit`]).
//! [`enclave::Enclave`] puts them together; the binary and every test
//! harness start it.
#![forbid(unsafe_code)]

pub mod access;
pub mod audit;
pub mod enclave;
pub mod file_key;
pub mod kms;
pub mod load;
pub mod log_ring;
pub mod recipient;
pub mod server;
pub mod service;
pub mod store;
