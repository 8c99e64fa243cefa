//! keystore-enclave's integration tests: the secret and load ports, the
//! recipient key, the KMS client and transport against the emulator, loads
//! and the periodic re-decrypt, and the binary itself.
//!
//! One test binary per crate (one link of the dependencies), a module per
//! area.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

mod abuse_matrix;
mod access;
mod audit;
mod breaker;
mod fault_matrix;
mod file_key;
mod kms_client;
mod kms_credentials;
mod kms_transport;
mod load_e2e;
mod load_local;
mod peers;
mod pinned_key;
mod recipient;
mod server;
mod server_abuse;
mod server_binary;
mod server_refresh;
