//! keystore-nsm's integration tests: the mock NSM's documents and PKI, and
//! the shared verifier's view of them.
//!
//! One test binary per crate (one link of the dependencies), a module per
//! area.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod nsm_mock;
mod nsm_verifier;
