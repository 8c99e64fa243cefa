//! End-to-end tests and local stand-ins for nitro-keystore: the KMS
//! emulator ([`kms`]), the test PKI it serves HTTPS with ([`tls`]), and the
//! [`fixture`] tests start it from.
#![forbid(unsafe_code)]

pub mod fixture;
pub mod kms;
pub mod tls;
