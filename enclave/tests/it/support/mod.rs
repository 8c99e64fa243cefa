//! Test support shared by the areas of this crate's test binary.

pub mod emulator;
pub mod server;
