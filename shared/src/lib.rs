//! Pieces both sides of nitro-keystore share: how to address a socket
//! ([`endpoint`]), how messages are framed and what they say ([`frame`],
//! [`protocol`]), and how an attestation document is checked
//! ([`attestation`]).
#![forbid(unsafe_code)]
pub mod attestation;
