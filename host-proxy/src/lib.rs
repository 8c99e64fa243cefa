//! The parent-instance side of nitro-keystore: the vsock proxy, the secrets
//! loader, and the commands host applications and operators run.
#![forbid(unsafe_code)]

pub mod policy;
