//! keystore-cms's integration tests: real KMS vectors, OpenSSL as a peer,
//! and property tests of `open`.
//!
//! One test binary per crate (one link of the dependencies), a module per
//! area.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

mod cms_openssl;
mod cms_proptest;
mod cms_vectors;
