//! keystore-tests' integration tests: the KMS emulator through the real
//! AWS SDK, its binary, and its fault injection.
//!
//! One test binary per crate (one link of the dependencies), a module per
//! area.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod kms_bin;
mod kms_operations;
mod kms_resilience;
