//! keystore-shared's integration tests: one binary (one link of the
//! dependencies) with a module per area: endpoints, frames, protocol, the
//! accept loop, the client and the attestation verifier.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

mod access;
mod attestation_fuzz;
mod attestation_pki;
mod attestation_real;
mod caller;
mod client;
mod endpoint;
mod frame;
mod frame_proptest;
mod fuzz_seeds;
mod protocol;
mod serve;
