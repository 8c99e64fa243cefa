//! Pieces both sides of nitro-keystore share: how to address a socket
//! ([`endpoint`]), how messages are framed and what they say ([`frame`],
//! [`protocol`]), how an attestation document is checked
//! ([`attestation`]), and the [`client`] host apps use.
#![forbid(unsafe_code)]

pub mod attestation;
pub mod client;
pub mod endpoint;
pub mod envelope;
pub mod frame;
pub mod protocol;

pub use client::{Client, ClientConfig, ClientError};
pub use endpoint::{Endpoint, EndpointError, Listener, Peer, Stream};
pub use frame::{Connection, FrameError, FrameLimits};
pub use protocol::{
    Credentials, ErrorCode, LoadEntry, PROTOCOL_VERSION, ProtocolError, Request, RequestOp,
    Response, ResponseBody, SecretBytes, SecretString, StatusReport,
};
