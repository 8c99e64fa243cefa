//! The `.env` secrets file on the parent: reading and rewriting it without
//! disturbing its layout ([`dotenv`]), and turning its plain values into
//! KMS envelopes ([`encrypt`]).

pub mod dotenv;
pub mod encrypt;
