//! `keystore-enclave`: the process that runs inside the Nitro Enclave.
#![forbid(unsafe_code)]

fn main() {}
