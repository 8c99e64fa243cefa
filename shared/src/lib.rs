//! Pieces both sides of nitro-keystore share: how to address a socket
//! ([`endpoint`]), the one accept loop every server runs ([`serve`]), how
//! messages are framed and what they say ([`frame`], [`protocol`]), what a
//! secret may be called ([`name`]), whom a read is for ([`caller`]), who may
//! read what ([`access`]), the `ENC[...]` value format
//! ([`envelope`]), how an attestation document is checked
//! ([`attestation`]), and the [`client`] that makes every request/response
//! exchange.
#![forbid(unsafe_code)]

pub mod access;
pub mod attestation;
pub mod audit;
pub mod caller;
pub mod client;
pub mod endpoint;
pub mod envelope;
pub mod file_record;
pub mod frame;
pub mod name;
pub mod protocol;
pub mod serve;

pub use access::{AccessRules, RulesError};
pub use caller::Caller;
pub use client::{Client, ClientConfig, ClientError};
pub use endpoint::{Endpoint, EndpointError, Listener, Peer, Stream};
pub use frame::{Connection, FrameError, FrameLimits};
pub use name::{NameError, SecretName};
pub use protocol::{
    Credentials, ErrorCode, LoadEntry, LogBatch, LogCursor, LogEvent, LogLevel, PROTOCOL_VERSION,
    ProtocolError, Request, RequestOp, Response, ResponseBody, SecretBytes, SecretString,
    StatusReport,
};
