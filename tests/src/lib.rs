//! End-to-end tests and local stand-ins for nitro-keystore.
#![forbid(unsafe_code)]
