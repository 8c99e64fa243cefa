//! End-to-end tests and local stand-ins for nitro-keystore: the KMS
//! emulator ([`kms`]), the test PKI it serves HTTPS with ([`tls`]), and the
//! [`fixture`] tests start it from; hostile peers for the abuse tests
//! ([`abuse`]).
#![forbid(unsafe_code)]

pub mod abuse;
pub mod fixture;
pub mod kms;
pub mod tls;
