//! The async client host apps use to talk to the enclave's secret server.
//!
//! One [`Client`] is one connection; requests on it are answered in order,
//! so its methods take `&mut self`. Every wait is bounded: connecting by
//! [`ClientConfig::connect_timeout`], each request by
//! [`ClientConfig::request_timeout`]. Every answer is checked before it is
//! believed: it must echo the request's `id`, speak our protocol version and
//! be the success type matching the operation. After a timeout or a framing
//! failure the connection may hold half a frame or a late answer, so the
//! client refuses further requests ([`ClientError::Broken`]) instead of
//! misreading them; reconnect instead.

use std::time::Duration;

use crate::caller::Caller;
use crate::endpoint::{Endpoint, EndpointError, Stream};
use crate::frame::{Connection, FrameError, FrameLimits};
use crate::protocol::{
    DEFAULT_MAX_REQUEST_FRAME, DEFAULT_MAX_RESPONSE_FRAME, ErrorCode, ProtocolError, Request,
    RequestOp, Response, ResponseBody, SecretBytes, StatusReport,
};

/// Default bound on establishing a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on one request, from sending it to reading its answer.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Connection settings for a [`Client`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// How long connecting may take.
    pub connect_timeout: Duration,
    /// How long one request may take, answer included.
    pub request_timeout: Duration,
    /// Largest response body accepted; must admit the largest secret value.
    pub max_response_frame: usize,
    /// Largest request body sent; the server refuses larger ones anyway.
    pub max_request_frame: usize,
    /// Connect from a source port below 1024, for servers that serve only
    /// privileged peers ([`Endpoint::connect_privileged`]).
    pub privileged: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_response_frame: DEFAULT_MAX_RESPONSE_FRAME,
            max_request_frame: DEFAULT_MAX_REQUEST_FRAME,
            privileged: false,
        }
    }
}

/// Why a request through a [`Client`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection could not be established. (The endpoint error's
    /// message already names its cause, so it is not chained again.)
    #[error("{0}")]
    Connect(EndpointError),
    /// Connecting took longer than the connect timeout.
    #[error("connecting to {endpoint} timed out after {} ms", .after.as_millis())]
    ConnectTimeout {
        /// Where we tried to connect.
        endpoint: Endpoint,
        /// The timeout that elapsed.
        after: Duration,
    },
    /// The server answered with an error. `code` says what kind; the
    /// message is the server's and contains no secret material.
    #[error("{op} failed: {code}: {message}")]
    Server {
        /// The operation that failed.
        op: &'static str,
        /// Machine-readable category.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// No answer within the request timeout.
    #[error("{op} timed out after {} ms", .after.as_millis())]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The timeout that elapsed.
        after: Duration,
    },
    /// The server closed the connection instead of answering.
    #[error("{op}: the server closed the connection without answering")]
    Closed {
        /// The operation.
        op: &'static str,
    },
    /// Sending the request or reading the answer failed.
    #[error("{op}: {source}")]
    Frame {
        /// The operation.
        op: &'static str,
        /// What the framing layer reported.
        #[source]
        source: FrameError,
    },
    /// The server speaks another protocol version.
    #[error("{op}: {source}")]
    Version {
        /// The operation.
        op: &'static str,
        /// The version mismatch.
        #[source]
        source: ProtocolError,
    },
    /// The answer is for another request.
    #[error("{op}: response id {got} does not match request id {expected}")]
    IdMismatch {
        /// The operation.
        op: &'static str,
        /// The id we sent.
        expected: u64,
        /// The id that came back.
        got: u64,
    },
    /// The answer is a success of the wrong kind (or names another secret).
    #[error("{op}: unexpected response: {got}")]
    UnexpectedResponse {
        /// The operation.
        op: &'static str,
        /// What arrived instead (a type name, never a value).
        got: &'static str,
    },
    /// An earlier failure left the connection in an unknown state.
    #[error("connection unusable after an earlier failure; reconnect")]
    Broken,
}

impl ClientError {
    /// The server's error code, if the server answered with an error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Server { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// A connection to the enclave's secret server.
#[derive(Debug)]
pub struct Client {
    connection: Connection<Stream>,
    endpoint: Endpoint,
    config: ClientConfig,
    next_id: u64,
    broken: bool,
    /// Whether the server ever answered on this connection.
    answered: bool,
}

impl Client {
    /// Connects with the default [`ClientConfig`].
    pub async fn connect(endpoint: &Endpoint) -> Result<Client, ClientError> {
        Self::connect_with(endpoint, ClientConfig::default()).await
    }

    /// Connects with explicit timeouts and limits.
    pub async fn connect_with(
        endpoint: &Endpoint,
        config: ClientConfig,
    ) -> Result<Client, ClientError> {
        let connecting = async {
            if config.privileged {
                endpoint.connect_privileged().await
            } else {
                endpoint.connect().await
            }
        };
        let stream = tokio::time::timeout(config.connect_timeout, connecting)
            .await
            .map_err(|_| ClientError::ConnectTimeout {
                endpoint: endpoint.clone(),
                after: config.connect_timeout,
            })?
            .map_err(ClientError::Connect)?;
        let limits = FrameLimits::new(config.max_response_frame, config.max_request_frame);
        Ok(Client {
            connection: Connection::with_limits(stream, limits),
            endpoint: endpoint.clone(),
            config,
            next_id: 1,
            broken: false,
            answered: false,
        })
    }

    /// The endpoint this client is connected to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// One secret's value.
    pub async fn get(&mut self, name: &str) -> Result<SecretBytes, ClientError> {
        self.get_as(name, None).await
    }

    /// One secret's value, read on behalf of `caller` (the agent's use; the
    /// enclave believes the caller only from a privileged connection).
    pub async fn get_as(
        &mut self,
        name: &str,
        caller: Option<Caller>,
    ) -> Result<SecretBytes, ClientError> {
        let op = RequestOp::Get {
            name: name.to_owned(),
        };
        match self.call_as(op, caller).await? {
            ResponseBody::Secret {
                name: answered,
                value,
            } if answered == name => Ok(value),
            ResponseBody::Secret { .. } => Err(ClientError::UnexpectedResponse {
                op: "get",
                got: "a different secret than the one asked for",
            }),
            other => Err(unexpected("get", &other)),
        }
    }

    /// The names of the loaded secrets.
    pub async fn list(&mut self) -> Result<Vec<String>, ClientError> {
        self.list_as(None).await
    }

    /// The names `caller` may read (see [`Client::get_as`]).
    pub async fn list_as(&mut self, caller: Option<Caller>) -> Result<Vec<String>, ClientError> {
        match self.call_as(RequestOp::List, caller).await? {
            ResponseBody::Names { names } => Ok(names),
            other => Err(unexpected("list", &other)),
        }
    }

    /// The enclave's health report.
    pub async fn status(&mut self) -> Result<StatusReport, ClientError> {
        match self.call(RequestOp::Status).await? {
            ResponseBody::Status(report) => Ok(report),
            other => Err(unexpected("status", &other)),
        }
    }

    /// The enclave's log events after `after` (at most `max`; load port,
    /// privileged connections only). Naming `after` acknowledges it.
    pub async fn log_read(
        &mut self,
        after: Option<crate::protocol::LogCursor>,
        max: u32,
    ) -> Result<crate::protocol::LogBatch, ClientError> {
        match self.call(RequestOp::LogRead { after, max }).await? {
            ResponseBody::LogRecords(batch) => Ok(batch),
            other => Err(unexpected("log_read", &other)),
        }
    }

    /// A fresh attestation document binding `nonce` (and `user_data`). The
    /// document is returned unverified: check it with
    /// [`crate::attestation::Verifier`] before trusting anything in it.
    pub async fn attest(
        &mut self,
        nonce: &[u8],
        user_data: Option<&[u8]>,
    ) -> Result<Vec<u8>, ClientError> {
        let op = RequestOp::Attest {
            nonce: nonce.to_vec(),
            user_data: user_data.map(<[u8]>::to_vec),
        };
        match self.call(op).await? {
            ResponseBody::Attestation { document } => Ok(document),
            other => Err(unexpected("attest", &other)),
        }
    }

    /// Sends one request and reads its answer: the only request/response
    /// exchange in nitro-keystore. The answer must echo the request's id,
    /// speak [`crate::PROTOCOL_VERSION`] and be the success type that answers
    /// `op` (or an `Error`, returned as [`ClientError::Server`]).
    pub async fn call(&mut self, op: RequestOp) -> Result<ResponseBody, ClientError> {
        self.call_as(op, None).await
    }

    /// [`Client::call`], on behalf of `caller`.
    pub async fn call_as(
        &mut self,
        op: RequestOp,
        caller: Option<Caller>,
    ) -> Result<ResponseBody, ClientError> {
        let kind = op.kind();
        let expected = op.answer_kind();
        if self.broken {
            return Err(ClientError::Broken);
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let mut request = Request::new(id, op);
        request.caller = caller;
        // Pessimistic until the exchange completes: a timeout or error
        // below leaves the stream in an unknown state.
        self.broken = true;
        let mut response = self.exchange(&request, kind).await;
        // A server evicts a connection only while it waits for a request
        // (shared::serve, `evict_idle`): one closed before it ever answered
        // was cut before our request was read, so a new connection asks
        // again, once.
        if !self.answered && response.as_ref().is_err_and(cut_before_answer) {
            let fresh = Client::connect_with(&self.endpoint, self.config.clone()).await?;
            self.connection = fresh.connection;
            response = self.exchange(&request, kind).await;
        }
        let response = response?;
        self.answered = true;
        response
            .check_version()
            .map_err(|source| ClientError::Version { op: kind, source })?;
        // A refusal sent before the server read our request (busy, too
        // large) carries id 0; accept it as the answer to this request.
        let is_refusal = response.id == 0 && matches!(response.result, ResponseBody::Error { .. });
        if response.id != id && !is_refusal {
            return Err(ClientError::IdMismatch {
                op: kind,
                expected: id,
                got: response.id,
            });
        }
        if !is_refusal {
            self.broken = false;
        }
        match response.result {
            ResponseBody::Error { code, message } => Err(ClientError::Server {
                op: kind,
                code,
                message,
            }),
            body if body.kind() == expected => Ok(body),
            body => Err(ClientError::UnexpectedResponse {
                op: kind,
                got: body.kind(),
            }),
        }
    }

    /// Writes `request` and reads one answer, within the request timeout.
    async fn exchange(
        &mut self,
        request: &Request,
        kind: &'static str,
    ) -> Result<Response, ClientError> {
        let exchange = async {
            self.connection
                .write_message(request)
                .await
                .map_err(|source| ClientError::Frame { op: kind, source })?;
            self.connection
                .read_message::<Response>()
                .await
                .map_err(|source| ClientError::Frame { op: kind, source })
        };
        tokio::time::timeout(self.config.request_timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                op: kind,
                after: self.config.request_timeout,
            })??
            .ok_or(ClientError::Closed { op: kind })
    }
}

/// Whether the server closed the connection without answering (not a
/// timeout, not a malformed answer).
fn cut_before_answer(err: &ClientError) -> bool {
    match err {
        ClientError::Closed { .. }
        | ClientError::Frame {
            source: FrameError::Truncated { .. },
            ..
        } => true,
        ClientError::Frame {
            source: FrameError::Io(io),
            ..
        } => matches!(
            io.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

/// Names the kind of an unexpected answer without printing its content.
fn unexpected(op: &'static str, body: &ResponseBody) -> ClientError {
    ClientError::UnexpectedResponse {
        op,
        got: body.kind(),
    }
}
