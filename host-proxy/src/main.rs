//! `keystore-host`: client, proxy and operator commands on the parent instance.
#![forbid(unsafe_code)]

fn main() {}
