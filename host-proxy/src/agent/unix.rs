//! The agent's unix socket: the enclave's framed protocol, so
//! [`keystore_shared::Client`] works against it unchanged, with the caller
//! taken from the kernel.
//!
//! The caller of every request on a connection is who `SO_PEERCRED` says
//! connected (uid, gid; groups, unit and names from `/proc` and the user
//! database, see [`super::identity`]). A request that names its own
//! `caller` is refused `Denied`: an application must not pose as another.
//! `Get`, `List`, `Status` and `Attest` are forwarded to the enclave through
//! the pool; `Load` and `GetCredentials` are refused (the loader and the
//! credentials service have their own ports).

use std::sync::Arc;
use std::time::Duration;

use keystore_shared::endpoint::{Peer, Stream};
use keystore_shared::frame::{Connection, FrameError, FrameLimits, decode_body};
use keystore_shared::protocol::{
    DEFAULT_MAX_REQUEST_FRAME, DEFAULT_MAX_RESPONSE_FRAME, ErrorCode, PROTOCOL_VERSION, Request,
    RequestHeader, RequestOp, Response, ResponseBody,
};
use keystore_shared::serve::{Accepted, Handler, PeerDenied, PeerPolicy, Refusal};
use keystore_shared::{Caller, ProtocolError};

use super::identity;
use super::pool::Pool;

/// How long resolving a caller's identity (proc files, user database) may
/// take before the connection is refused.
const IDENTITY_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves unix peers the kernel identifies (`SO_PEERCRED`), whoever they
/// are; what they may read is the enclave's rules' business.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdentifiedUnixPeers;

impl PeerPolicy for IdentifiedUnixPeers {
    fn check(&self, peer: &Peer) -> Result<(), PeerDenied> {
        match peer {
            Peer::Unix { cred: Some(_), .. } => Ok(()),
            other => Err(PeerDenied {
                reason: format!(
                    "the kernel did not say who {other} is (no SO_PEERCRED); the agent serves identified unix peers only"
                ),
            }),
        }
    }
}

/// Answers framed requests on the agent's unix socket.
#[derive(Debug)]
pub struct UnixHandler {
    pool: Arc<Pool>,
    idle_timeout: Duration,
}

impl UnixHandler {
    /// A handler forwarding through `pool`; a connection with no complete
    /// request for `idle_timeout` is closed.
    pub fn new(pool: Arc<Pool>, idle_timeout: Duration) -> Self {
        UnixHandler { pool, idle_timeout }
    }
}

fn limits() -> FrameLimits {
    FrameLimits::new(DEFAULT_MAX_REQUEST_FRAME, DEFAULT_MAX_RESPONSE_FRAME)
}

impl Handler for UnixHandler {
    async fn handle(&self, conn: Accepted) {
        let mut connection = Connection::with_limits(conn.stream, limits());
        let Peer::Unix {
            cred: Some(cred), ..
        } = conn.peer
        else {
            return;
        };
        let resolved = tokio::time::timeout(
            IDENTITY_TIMEOUT,
            tokio::task::spawn_blocking(move || identity::caller_from_credentials(&cred)),
        )
        .await;
        let caller = match resolved {
            Ok(Ok(caller)) => caller,
            _ => {
                let response = Response::error(
                    0,
                    ErrorCode::Unavailable,
                    "the agent could not resolve who is connecting; try again",
                );
                let _ = connection.write_message(&response).await;
                return;
            }
        };
        tracing::debug!(caller = %caller, "agent connection");
        let mut shutdown = conn.shutdown;
        loop {
            let read = tokio::select! {
                () = shutdown.wait() => return,
                read = tokio::time::timeout(self.idle_timeout, connection.read_frame_with(decode_request)) => read,
            };
            // A request is not evicted for a newcomer until its answer is
            // written; a frame that is no request proves nothing.
            let mut working = None;
            let response = match read.map(|frame| frame.and_then(Option::transpose)) {
                Err(_) | Ok(Ok(None)) => return,
                Ok(Ok(Some((id, request)))) => match request {
                    Ok(request) => {
                        working = Some(connection.get_ref().working());
                        self.answer(id, request, &caller).await
                    }
                    Err(message) => {
                        connection.get_ref().misbehaved();
                        Response::error(id, ErrorCode::BadRequest, message)
                    }
                },
                Ok(Err(FrameError::Decode(reason))) => {
                    connection.get_ref().misbehaved();
                    Response::error(
                        0,
                        ErrorCode::BadRequest,
                        format!("request frame is not a valid request: {reason}"),
                    )
                }
                Ok(Err(err @ FrameError::TooLarge { .. })) => {
                    let response = Response::error(0, ErrorCode::TooLarge, err.to_string());
                    let _ = connection.write_message(&response).await;
                    let _ = connection.shutdown().await;
                    return;
                }
                Ok(Err(_)) => return,
            };
            let written = connection.write_message(&response).await;
            drop(response);
            drop(working);
            if written.is_err() {
                return;
            }
        }
    }

    async fn refuse(&self, stream: &mut Stream, refusal: &Refusal) {
        let code = match refusal {
            Refusal::Busy { .. } => ErrorCode::Unavailable,
            Refusal::Denied(_) => ErrorCode::Denied,
        };
        let mut connection = Connection::with_limits(stream, limits());
        if connection
            .write_message(&Response::error(0, code, refusal.to_string()))
            .await
            .is_ok()
        {
            let _ = connection.shutdown().await;
        }
    }
}

impl UnixHandler {
    /// Forwards one request for `caller` and builds the answer.
    async fn answer(&self, id: u64, request: Request, caller: &Caller) -> Response {
        let kind = request.op.kind();
        if request.caller.is_some() {
            tracing::warn!(caller = %caller, op = kind, "request names its own caller; refused");
            return Response::error(
                id,
                ErrorCode::Denied,
                format!(
                    "the agent takes the caller from the kernel ({caller}); a request may not name its own caller"
                ),
            );
        }
        let asked = match &request.op {
            RequestOp::Get { name } => Some(name.clone()),
            RequestOp::List | RequestOp::Status | RequestOp::Attest { .. } => None,
            RequestOp::Load { .. }
            | RequestOp::GetCredentials
            | RequestOp::AuditRead { .. }
            | RequestOp::AuditCheckpoint
            | RequestOp::LogRead { .. } => {
                return Response::error(
                    id,
                    ErrorCode::Denied,
                    format!(
                        "the agent does not forward {kind}: loading, the audit trail and the enclave's log are the host daemon's, on the enclave's load port"
                    ),
                );
            }
        };
        let result = self.pool.call(request.op, Some(caller.clone())).await;
        let body = match result {
            Ok(ResponseBody::Secret { name, .. }) if Some(&name) != asked.as_ref() => {
                ResponseBody::Error {
                    code: ErrorCode::Internal,
                    message: "the enclave answered with another secret than the one asked for"
                        .to_owned(),
                }
            }
            Ok(body) => body,
            Err(err) => ResponseBody::Error {
                code: err.code(),
                message: err.message(),
            },
        };
        let outcome = match &body {
            ResponseBody::Error { code, .. } => code.as_str(),
            _ => "ok",
        };
        tracing::info!(caller = %caller, op = kind, outcome, "agent request");
        Response::new(id, body)
    }
}

/// A request frame: its id and the typed request, or why it is not one.
fn decode_request(body: &[u8]) -> Result<(u64, Result<Request, String>), FrameError> {
    let header: RequestHeader = decode_body(body)?;
    let id = header.id.unwrap_or(0);
    let request = match header.v {
        None => Err(format!(
            "request has no protocol version `v`; this agent speaks version {PROTOCOL_VERSION}"
        )),
        Some(v) if v != PROTOCOL_VERSION => Err(ProtocolError::UnsupportedVersion {
            got: v,
            expected: PROTOCOL_VERSION,
        }
        .to_string()),
        Some(_) if header.id.is_none() => Err("request has no `id`".to_owned()),
        Some(_) => decode_body::<Request>(body).map_err(|err| match err {
            FrameError::Decode(reason) => format!("not a valid request: {reason}"),
            other => other.to_string(),
        }),
    };
    Ok((id, request))
}
