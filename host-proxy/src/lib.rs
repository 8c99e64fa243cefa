//! The parent-instance side of nitro-keystore, as a library: the proxy
//! daemon's parts ([`proxy`]), the secrets file ([`secrets_file`]), KMS key
//! policies ([`policy`]), the AWS client set-up ([`aws`]) and the
//! daemon's Prometheus metrics ([`metrics`]) and the operator's
//! `doctor` checks ([`doctor`]). The
//! `keystore-host` binary's commands live in its own `cli` module.
#![forbid(unsafe_code)]

pub mod agent;
pub mod aws;
pub mod doctor;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod secrets_file;
