//! Length-prefixed CBOR frames and a [`Connection`] that hides them.
//!
//! A frame is a 4-byte big-endian body length followed by one CBOR item.
//! Every byte read here may come from an untrusted peer, so:
//!
//! - the length prefix is checked against a configured maximum *before* any
//!   of the body is read or buffer space is reserved for it;
//! - buffers grow with the bytes actually received, never with the length a
//!   peer claims;
//! - nothing panics on malformed input: every failure is a [`FrameError`];
//! - bodies can carry secret values, so consumed bytes are wiped and buffers
//!   are [`Zeroizing`], and decode errors are scrubbed of echoed input.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::{Zeroize, Zeroizing};

/// Size of the big-endian length prefix.
pub const HEADER_LEN: usize = 4;

/// Default maximum body size in either direction (host-app request frames).
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;

/// The largest body a 4-byte prefix can describe; larger configured limits
/// are clamped to it.
pub const MAX_ENCODABLE_FRAME: usize = u32::MAX as usize;

/// Initial read buffer size and the least spare room offered to each read,
/// so small pipelined frames arrive in few system calls.
const READ_CHUNK: usize = 8 * 1024;

/// A read buffer larger than this is released once it is drained, so one big
/// `Load` frame does not pin megabytes for the rest of a connection's life.
const SHRINK_ABOVE: usize = 64 * 1024;

/// Errors from framing and from encoding or decoding a body.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a body larger than we accept; the body was not read
    /// and the stream is no longer in sync, so close the connection.
    #[error("incoming frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced body length.
        len: u64,
        /// Configured maximum.
        max: usize,
    },
    /// We were asked to send a message larger than the configured maximum;
    /// nothing was written.
    #[error("outgoing message of {len} bytes exceeds the limit of {max} bytes")]
    OutgoingTooLarge {
        /// Encoded body length.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The peer closed the connection part-way through a frame.
    #[error("connection closed mid-frame: {received} of {} bytes received", expected_text(*.expected))]
    Truncated {
        /// Bytes of the frame (prefix included) that did arrive.
        received: usize,
        /// Full frame size, if the prefix arrived.
        expected: Option<u64>,
    },
    /// The body is not valid CBOR for the expected message type. The frame
    /// was consumed, so the connection is still in sync.
    #[error("malformed frame body: {0}")]
    Decode(String),
    /// The message could not be serialized (not expected for protocol types).
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// The transport failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

fn expected_text(expected: Option<u64>) -> String {
    match expected {
        Some(n) => n.to_string(),
        None => "an unknown number of".to_owned(),
    }
}

/// Maximum body sizes, separately for each direction: a server reads small
/// requests but may write responses sized by the secret-value limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest body accepted from the peer.
    pub max_read: usize,
    /// Largest body we agree to send.
    pub max_write: usize,
}

impl FrameLimits {
    /// Limits with separate read and write maxima, each clamped to
    /// [`MAX_ENCODABLE_FRAME`].
    pub const fn new(max_read: usize, max_write: usize) -> Self {
        FrameLimits {
            max_read: clamp(max_read),
            max_write: clamp(max_write),
        }
    }

    /// The same maximum in both directions.
    pub const fn symmetric(max: usize) -> Self {
        Self::new(max, max)
    }
}

impl Default for FrameLimits {
    fn default() -> Self {
        Self::symmetric(DEFAULT_MAX_FRAME)
    }
}

const fn clamp(max: usize) -> usize {
    if max > MAX_ENCODABLE_FRAME {
        MAX_ENCODABLE_FRAME
    } else {
        max
    }
}

/// Where the first frame in a buffer stands.
enum FrameStatus {
    /// Fewer bytes than a full frame; `total` is its size once the prefix is
    /// known.
    Incomplete { total: Option<usize> },
    /// A whole frame: body is `buf[HEADER_LEN..total]`.
    Complete { total: usize },
}

/// Reads the prefix (if present) and checks it against `max` before anything
/// else, so an oversize frame is refused with only 4 bytes seen.
fn frame_status(buf: &[u8], max: usize) -> Result<FrameStatus, FrameError> {
    let Some(prefix) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(FrameStatus::Incomplete { total: None });
    };
    let len = u32::from_be_bytes(*prefix);
    let max = clamp(max);
    let body_len = usize::try_from(len).map_err(|_| FrameError::TooLarge {
        len: u64::from(len),
        max,
    })?;
    if body_len > max {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max,
        });
    }
    // body_len <= u32::MAX, so this cannot overflow on 64-bit; be safe anyway.
    let total = body_len
        .checked_add(HEADER_LEN)
        .ok_or(FrameError::TooLarge {
            len: u64::from(len),
            max,
        })?;
    if buf.len() < total {
        Ok(FrameStatus::Incomplete { total: Some(total) })
    } else {
        Ok(FrameStatus::Complete { total })
    }
}

/// Decodes a CBOR body, scrubbing the error text of any echoed input.
/// Decodes one frame body (without its length prefix) as `T`. Decoder
/// messages are redacted: they name schema items, never input bytes.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_cbor::from_slice(body).map_err(|err| FrameError::Decode(redact(&err.to_string())))
}

/// Decodes the first frame of `buf` without I/O — the building block of
/// [`Connection::read_message`], exposed for fuzzing and property tests.
///
/// Returns `Ok(None)` if `buf` does not yet hold a whole frame, or the
/// message and the number of bytes it used. A prefix over `max` is refused as
/// soon as the 4 prefix bytes are present.
pub fn decode_frame<T: DeserializeOwned>(
    buf: &[u8],
    max: usize,
) -> Result<Option<(T, usize)>, FrameError> {
    match frame_status(buf, max)? {
        FrameStatus::Incomplete { .. } => Ok(None),
        FrameStatus::Complete { total } => {
            let body = buf.get(HEADER_LEN..total).unwrap_or_default();
            Ok(Some((decode_body(body)?, total)))
        }
    }
}

/// Encodes `msg` as one frame (prefix + CBOR body), refusing bodies over
/// `max` before allocating them. The buffer is wiped on drop because it may
/// hold a secret value.
pub fn encode_frame<T: Serialize>(msg: &T, max: usize) -> Result<Zeroizing<Vec<u8>>, FrameError> {
    // A first pass only counts, so an empty buffer is allocated once at the
    // frame's exact size: no reallocation leaves copies of secrets behind,
    // and an oversize message is refused without allocating it.
    let mut frame = Zeroizing::new(Vec::new());
    encode_frame_into(msg, max, &mut frame)?;
    Ok(frame)
}

/// Appends `msg` as one frame (prefix + CBOR body) to `out`, refusing bodies
/// over `max` with nothing appended — the batching form of
/// [`encode_frame`], for a server that writes several answers at once.
///
/// `out` may hold secrets: when it must grow, the bytes move to a new
/// [`Zeroizing`] buffer and the old one is wiped as it drops, so growth
/// leaves no unwiped copy behind (a plain `Vec` reallocation would).
pub fn encode_frame_into<T: Serialize>(
    msg: &T,
    max: usize,
    out: &mut Zeroizing<Vec<u8>>,
) -> Result<(), FrameError> {
    let max = clamp(max);
    let mut counter = ByteCounter(0);
    serde_cbor::to_writer(&mut counter, msg).map_err(|err| FrameError::Encode(err.to_string()))?;
    let len = counter.0;
    if len > max {
        return Err(FrameError::OutgoingTooLarge { len, max });
    }
    let prefix = u32::try_from(len).map_err(|_| FrameError::OutgoingTooLarge { len, max })?;
    let start = out.len();
    let needed = start.saturating_add(HEADER_LEN).saturating_add(len);
    if needed > out.capacity() {
        let mut grown = Zeroizing::new(Vec::with_capacity(
            needed.max(out.capacity().saturating_mul(2)),
        ));
        grown.extend_from_slice(out);
        *out = grown;
    }
    out.extend_from_slice(&prefix.to_be_bytes());
    let written = serde_cbor::to_writer(&mut **out, msg);
    if written.is_err() || out.len() != needed {
        // Take back the partial frame (capacity was reserved, so nothing
        // moved); the bytes dropped from the end are wiped.
        if let Some(partial) = out.get_mut(start..) {
            partial.zeroize();
        }
        out.truncate(start);
        return Err(match written {
            Err(err) => FrameError::Encode(err.to_string()),
            Ok(()) => FrameError::Encode("message changed size between encoding passes".to_owned()),
        });
    }
    Ok(())
}

/// An `io::Write` that only counts bytes.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 = self.0.saturating_add(buf.len());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Removes input that serde echoes into error messages (`invalid type:
/// string "…"`, ``unknown variant `…` ``) so a malformed message carrying a
/// secret cannot leak it into logs.
///
/// serde's data errors read "<what was found>, expected <what we wanted>";
/// the part after the *last* ", expected" comes from our own schema, and so do
/// the names in "missing field" / "duplicate field". Everything from the first
/// quote up to that point may be peer input (which can itself contain quotes
/// or the word "expected") and is replaced wholesale.
fn redact(message: &str) -> String {
    let (head, tail) = match message.rfind(", expected") {
        Some(at) => message.split_at(at),
        None => (message, ""),
    };
    if tail.is_empty()
        && (head.starts_with("missing field `") || head.starts_with("duplicate field `"))
    {
        return message.to_owned();
    }
    match head.find(['"', '`']) {
        Some(at) => {
            let (before, quoted) = head.split_at(at);
            let quote = if quoted.starts_with('`') { '`' } else { '"' };
            format!("{before}{quote}…{quote}{tail}")
        }
        None => message.to_owned(),
    }
}

/// Bytes received but not yet consumed, in a buffer that is wiped when bytes
/// are consumed and when it is released.
#[derive(Default)]
struct ReadBuffer {
    buf: Zeroizing<Vec<u8>>,
    /// Start of unconsumed data; advancing it instead of shifting the buffer
    /// keeps many small pipelined frames linear rather than quadratic.
    start: usize,
}

impl ReadBuffer {
    fn pending(&self) -> &[u8] {
        self.buf.get(self.start..).unwrap_or_default()
    }

    fn consume(&mut self, n: usize) {
        let end = self.start.saturating_add(n).min(self.buf.len());
        if let Some(used) = self.buf.get_mut(self.start..end) {
            used.zeroize();
        }
        self.start = end;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            if self.buf.capacity() > SHRINK_ABOVE {
                // Dropping the old Zeroizing<Vec> wipes its whole capacity.
                self.buf = Zeroizing::new(Vec::new());
            }
        }
    }

    /// Makes room for the next read. `frame_total` is the size of the frame
    /// being assembled, if its prefix has arrived.
    ///
    /// Capacity doubles with the data actually received (capped at the frame
    /// size), so a peer announcing a large frame and then stalling costs
    /// little memory, and growth plus compaction stay linear overall.
    fn prepare(&mut self, frame_total: Option<usize>) {
        let pending_len = self.buf.len().saturating_sub(self.start);
        // Always more than `pending_len`: the frame is not complete yet.
        let frame_need = frame_total.unwrap_or(HEADER_LEN).max(READ_CHUNK);
        let capacity = self.buf.capacity();
        let oversized = capacity > SHRINK_ABOVE && capacity / 2 >= frame_need;
        let full = self.buf.len() == capacity;
        if !oversized && !full {
            return;
        }
        let target = frame_need.min(READ_CHUNK.max(pending_len.saturating_mul(2)));
        if oversized || target > capacity {
            let mut fresh = Zeroizing::new(Vec::with_capacity(target.max(pending_len + 1)));
            fresh.extend_from_slice(self.pending());
            // The old buffer is wiped as it drops here.
            self.buf = fresh;
        } else {
            // Full, with consumed bytes in front, and the partial frame fits:
            // move it to the front. Either at least half the buffer becomes
            // free or the whole frame now fits, so this is amortised O(1)
            // per byte.
            self.buf.copy_within(self.start.., 0);
            if let Some(stale) = self.buf.get_mut(pending_len..) {
                stale.zeroize();
            }
            self.buf.truncate(pending_len);
        }
        self.start = 0;
    }
}

/// A framed, typed message stream over any byte stream (an
/// [`crate::endpoint::Stream`], or an in-memory pipe in tests).
///
/// `read_message` is cancellation safe: partial frames stay buffered in the
/// connection, so it may sit in `tokio::select!` or under a timeout.
/// `write_message` is not: cancelling it may leave half a frame on the wire,
/// after which the connection must be dropped.
pub struct Connection<S> {
    stream: S,
    rbuf: ReadBuffer,
    limits: FrameLimits,
}

impl<S> std::fmt::Debug for Connection<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print buffered bytes: they may be a secret in transit.
        f.debug_struct("Connection")
            .field("limits", &self.limits)
            .field("buffered", &self.rbuf.pending().len())
            .finish_non_exhaustive()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Wraps `stream` with [`DEFAULT_MAX_FRAME`] in both directions.
    pub fn new(stream: S) -> Self {
        Self::with_limits(stream, FrameLimits::default())
    }

    /// Wraps `stream` with the given limits.
    pub fn with_limits(stream: S, limits: FrameLimits) -> Self {
        Connection {
            stream,
            rbuf: ReadBuffer::default(),
            limits,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> FrameLimits {
        self.limits
    }

    /// Replaces both limits.
    pub fn set_limits(&mut self, limits: FrameLimits) {
        self.limits = limits;
    }

    /// Sets the read and write maxima (clamped to [`MAX_ENCODABLE_FRAME`]),
    /// e.g. a server reading 64 KiB requests while answering with 1 MiB
    /// secrets.
    pub fn set_max_frame(&mut self, max_read: usize, max_write: usize) {
        self.limits = FrameLimits::new(max_read, max_write);
    }

    /// Bytes of read-buffer memory currently held; lets tests and metrics
    /// confirm that an announced-but-unsent frame reserved nothing.
    pub fn read_buffer_capacity(&self) -> usize {
        self.rbuf.buf.capacity()
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// The underlying stream, mutably; reading from it directly desyncs the
    /// framing.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Unwraps the stream; bytes already buffered but not yet decoded are
    /// discarded (and wiped).
    pub fn into_inner(self) -> S {
        self.stream
    }

    /// Reads the next message. `Ok(None)` means the peer closed the
    /// connection cleanly between frames.
    ///
    /// After [`FrameError::TooLarge`] or [`FrameError::Io`] the stream is out
    /// of sync and should be closed; after [`FrameError::Decode`] the bad
    /// frame has been consumed and the next one can be read.
    pub async fn read_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        self.read_frame_with(decode_body).await?.transpose()
    }

    /// Reads the next frame and hands its body to `decode`, in place (no
    /// copy), for callers that decode one frame more than once, e.g. a
    /// header first. `Ok(None)` means the peer closed between frames. The
    /// frame is consumed whatever `decode` returns, so the stream stays in
    /// sync. Cancellation safe, like [`Connection::read_message`].
    pub async fn read_frame_with<T>(
        &mut self,
        decode: impl FnOnce(&[u8]) -> T,
    ) -> Result<Option<T>, FrameError> {
        loop {
            let max = self.limits.max_read;
            let frame_total = match frame_status(self.rbuf.pending(), max)? {
                FrameStatus::Complete { total } => {
                    let body = self
                        .rbuf
                        .pending()
                        .get(HEADER_LEN..total)
                        .unwrap_or_default();
                    let decoded = decode(body);
                    self.rbuf.consume(total);
                    return Ok(Some(decoded));
                }
                FrameStatus::Incomplete { total } => total,
            };
            self.rbuf.prepare(frame_total);
            let read = self.stream.read_buf(&mut *self.rbuf.buf).await?;
            if read == 0 {
                let received = self.rbuf.pending().len();
                if received == 0 {
                    return Ok(None);
                }
                return Err(FrameError::Truncated {
                    received,
                    expected: frame_total.map(|total| total as u64),
                });
            }
        }
    }

    /// The next frame if one is already complete in the read buffer, handed
    /// to `decode` like [`Connection::read_frame_with`], without reading from
    /// the stream: a server answers every request a read delivered before
    /// writing them all at once. `Ok(None)`: no whole frame is buffered (a
    /// partial one stays for the next read). An oversize prefix is refused
    /// here as it would be by a read.
    pub fn next_buffered_with<T>(
        &mut self,
        decode: impl FnOnce(&[u8]) -> T,
    ) -> Result<Option<T>, FrameError> {
        match frame_status(self.rbuf.pending(), self.limits.max_read)? {
            FrameStatus::Complete { total } => {
                let body = self
                    .rbuf
                    .pending()
                    .get(HEADER_LEN..total)
                    .unwrap_or_default();
                let decoded = decode(body);
                self.rbuf.consume(total);
                Ok(Some(decoded))
            }
            FrameStatus::Incomplete { .. } => Ok(None),
        }
    }

    /// Sends bytes that are already whole frames (from
    /// [`encode_frame_into`]) in one write, then flushes. Not cancellation
    /// safe, like [`Connection::write_message`].
    pub async fn write_frames(&mut self, frames: &[u8]) -> Result<(), FrameError> {
        self.stream.write_all(frames).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Encodes and sends one message, then flushes. Messages over the write
    /// limit are refused with [`FrameError::OutgoingTooLarge`] and nothing is
    /// sent.
    pub async fn write_message<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        let frame = encode_frame(msg, self.limits.max_write)?;
        self.stream.write_all(&frame).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Flushes and shuts down the write side, telling the peer no more
    /// frames follow.
    pub async fn shutdown(&mut self) -> Result<(), FrameError> {
        self.stream.shutdown().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_keeps_schema_names_and_drops_input() {
        assert_eq!(
            redact(r#"invalid type: string "hunter2", expected u64 at offset 3"#),
            r#"invalid type: string "…", expected u64 at offset 3"#
        );
        assert_eq!(
            redact("unknown variant `hunter2`, expected one of `Get`, `List`"),
            "unknown variant `…`, expected one of `Get`, `List`"
        );
        assert_eq!(redact("missing field `id`"), "missing field `id`");
        assert_eq!(redact("character `x` here"), "character `…`");
        // Input that mimics the message structure still does not leak.
        let tricky = r#"invalid type: string "a\" expected SECRET, expected x", expected u64"#;
        let out = redact(tricky);
        assert!(!out.contains("SECRET"), "{out}");
        assert!(out.ends_with(", expected u64"), "{out}");
        let tricky = "unknown variant `a` , expected SECRET`, expected one of `Get`";
        let out = redact(tricky);
        assert!(!out.contains("SECRET"), "{out}");
    }

    #[test]
    fn prepare_grows_with_received_bytes_not_announced_size() {
        let mut rb = ReadBuffer::default();
        rb.prepare(Some(16 * 1024 * 1024));
        assert!(rb.buf.capacity() >= READ_CHUNK);
        assert!(rb.buf.capacity() < 2 * READ_CHUNK);
    }

    #[test]
    fn consume_wipes_and_shrinks() {
        let mut rb = ReadBuffer::default();
        rb.prepare(Some(1 << 20));
        rb.buf.resize(200 * 1024, 7);
        rb.consume(100);
        assert!(rb.buf.get(..100).unwrap().iter().all(|&b| b == 0));
        assert_eq!(rb.pending().len(), 200 * 1024 - 100);
        rb.consume(200 * 1024);
        assert_eq!(rb.pending().len(), 0);
        assert!(rb.buf.capacity() <= SHRINK_ABOVE);
    }
}
