//! End-to-end tests and local stand-ins for nitro-keystore: the KMS
//! emulator ([`kms`]) and the test PKI it serves HTTPS with ([`tls`]).
#![forbid(unsafe_code)]

pub mod kms;
pub mod tls;
