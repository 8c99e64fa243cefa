//! Test support shared by the areas of this crate's test binary.

pub mod audit_log;
pub mod common;
pub mod emulator;
pub mod imds;
pub mod localstack;
pub mod moto;
pub mod ops;
pub mod peer;
pub mod relay;
pub mod stack;
