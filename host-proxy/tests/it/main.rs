//! keystore-host's integration tests: the daemon's parts (forwarder,
//! credentials, loader), the CLI, packaging and end-to-end runs with the
//! real enclave binary.
//!
//! One test binary per crate (one link of the dependencies), a module per
//! area.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

mod agent;
mod agent_abuse;
mod attestation_cli;
mod audit_drain;
mod audit_verify;
mod client_commands;
mod credentials;
mod decrypt;
mod deploy_walkthrough;
mod doctor;
mod dotenv;
mod e2e;
mod edit;
mod enclave_logs;
mod encrypt;
mod fault_matrix;
mod file_key;
mod formats;
mod forwarder;
mod key_policy_denies;
mod loader;
mod loader_signal;
mod localstack;
mod logs;
mod metrics;
mod moto;
mod packaging;
mod pinned_key_packaging;
mod rotate;
mod s3;
