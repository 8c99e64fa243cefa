//! The parent-instance side of nitro-keystore: the vsock proxy, the secrets
//! loader, and the commands host applications and operators run.
#![forbid(unsafe_code)]

pub mod aws;
pub mod credentials;
pub mod dotenv;
pub mod encrypt;
pub mod forwarder;
pub mod loader;
pub mod policy;
pub mod proxy;
