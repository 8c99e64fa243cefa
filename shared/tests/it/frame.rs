//! Frame codec and `Connection` behaviour on good, hostile and broken input.
// Test helpers outside #[test] fns are not covered by allow-unwrap-in-tests.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use keystore_shared::frame::{
    Connection, DEFAULT_MAX_FRAME, FrameError, FrameLimits, HEADER_LEN, MAX_ENCODABLE_FRAME,
    decode_frame, encode_frame, encode_frame_into,
};
use keystore_shared::protocol::{Request, RequestOp, Response, ResponseBody, SecretBytes};
use tokio::io::{AsyncWriteExt, DuplexStream, duplex};
use zeroize::Zeroizing;

const TIMEOUT: Duration = Duration::from_secs(10);

fn get(id: u64, name: &str) -> Request {
    Request::new(
        id,
        RequestOp::Get {
            name: name.to_owned(),
        },
    )
}

fn frame_with_body(body: &[u8]) -> Vec<u8> {
    let mut out = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// A connection whose peer end we drive by hand.
fn pair() -> (Connection<DuplexStream>, DuplexStream) {
    let (a, b) = duplex(1 << 20);
    (Connection::new(a), b)
}

#[test]
fn encode_layout_is_be_length_then_cbor() {
    let req = get(7, "db/password");
    let frame = encode_frame(&req, DEFAULT_MAX_FRAME).unwrap();
    let body = serde_cbor::to_vec(&req).unwrap();
    assert_eq!(&frame[..HEADER_LEN], &(body.len() as u32).to_be_bytes());
    assert_eq!(&frame[HEADER_LEN..], &body[..]);
    let (back, used): (Request, usize) = decode_frame(&frame, DEFAULT_MAX_FRAME).unwrap().unwrap();
    assert_eq!(back, req);
    assert_eq!(used, frame.len());
    // Allocated once at its exact size: nothing was reallocated (and left
    // behind unwiped) on the way.
    assert_eq!(frame.capacity(), frame.len());
}

#[test]
fn decode_needs_more_bytes_for_every_proper_prefix() {
    let frame = encode_frame(&get(1, "a"), DEFAULT_MAX_FRAME).unwrap();
    for cut in 0..frame.len() {
        let r: Option<(Request, usize)> = decode_frame(&frame[..cut], DEFAULT_MAX_FRAME).unwrap();
        assert!(r.is_none(), "prefix of {cut} bytes decoded");
    }
}

#[test]
fn decode_reports_bytes_used_with_trailing_frames() {
    let mut buf = encode_frame(&get(1, "first"), DEFAULT_MAX_FRAME)
        .unwrap()
        .to_vec();
    let first_len = buf.len();
    buf.extend_from_slice(&encode_frame(&get(2, "second"), DEFAULT_MAX_FRAME).unwrap());
    let (a, used): (Request, usize) = decode_frame(&buf, DEFAULT_MAX_FRAME).unwrap().unwrap();
    assert_eq!(used, first_len);
    assert_eq!(a, get(1, "first"));
    let (b, _): (Request, usize) = decode_frame(&buf[used..], DEFAULT_MAX_FRAME)
        .unwrap()
        .unwrap();
    assert_eq!(b, get(2, "second"));
}

#[test]
fn oversize_prefix_refused_from_header_alone() {
    let header = [0xFF, 0xFF, 0xFF, 0xFF];
    match decode_frame::<Request>(&header, DEFAULT_MAX_FRAME) {
        Err(FrameError::TooLarge { len, max }) => {
            assert_eq!(len, u64::from(u32::MAX));
            assert_eq!(max, DEFAULT_MAX_FRAME);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // One byte over the limit is refused, exactly the limit is not.
    let over = ((DEFAULT_MAX_FRAME + 1) as u32).to_be_bytes();
    assert!(matches!(
        decode_frame::<Request>(&over, DEFAULT_MAX_FRAME),
        Err(FrameError::TooLarge { .. })
    ));
    let at = (DEFAULT_MAX_FRAME as u32).to_be_bytes();
    assert!(matches!(
        decode_frame::<Request>(&at, DEFAULT_MAX_FRAME),
        Ok(None)
    ));
}

#[test]
fn garbage_and_trailing_bodies_are_decode_errors() {
    let bodies: &[&[u8]] = &[
        b"",
        &[0xFF],
        &[0x1F],
        &[0xA1, 0x61],
        b"\x00",
        b"not cbor at all",
        // Valid CBOR for the wrong shape: an array of ints.
        &[0x83, 0x01, 0x02, 0x03],
        // A byte string claiming 4 GiB of content.
        &[0x5A, 0xFF, 0xFF, 0xFF, 0xFF, 0x00],
        // An array claiming 2^64-1 elements.
        &[0x9B, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF],
        // 10 000 nested arrays (recursion bomb).
        &[0x81; 10_000],
    ];
    for body in bodies {
        let frame = frame_with_body(body);
        let r = decode_frame::<Request>(&frame, DEFAULT_MAX_FRAME);
        assert!(matches!(r, Err(FrameError::Decode(_))), "{body:x?}: {r:?}");
    }
    // A valid message followed by junk inside the same frame.
    let mut body = serde_cbor::to_vec(&get(1, "x")).unwrap();
    body.push(0x00);
    let r = decode_frame::<Request>(&frame_with_body(&body), DEFAULT_MAX_FRAME);
    assert!(matches!(r, Err(FrameError::Decode(_))), "{r:?}");
}

#[test]
fn encode_refuses_oversize_without_writing() {
    let big = Response::new(
        1,
        ResponseBody::Secret {
            name: "big".into(),
            value: SecretBytes::new(vec![7; 2 * DEFAULT_MAX_FRAME]),
        },
    );
    match encode_frame(&big, DEFAULT_MAX_FRAME) {
        Err(FrameError::OutgoingTooLarge { len, max }) => {
            assert!(len > 2 * DEFAULT_MAX_FRAME);
            assert_eq!(max, DEFAULT_MAX_FRAME);
        }
        other => panic!(
            "expected OutgoingTooLarge, got {:?}",
            other.map(|f| f.len())
        ),
    }
}

#[test]
fn limits_are_clamped_to_the_prefix_range() {
    let limits = FrameLimits::new(usize::MAX, 10);
    assert_eq!(limits.max_read, MAX_ENCODABLE_FRAME);
    assert_eq!(limits.max_write, 10);
    assert_eq!(
        FrameLimits::default(),
        FrameLimits::symmetric(DEFAULT_MAX_FRAME)
    );
}

#[tokio::test]
async fn clean_eof_between_frames_is_none() {
    let (mut conn, mut peer) = pair();
    peer.write_all(&encode_frame(&get(1, "a"), DEFAULT_MAX_FRAME).unwrap())
        .await
        .unwrap();
    drop(peer);
    let first: Option<Request> = conn.read_message().await.unwrap();
    assert_eq!(first, Some(get(1, "a")));
    let second: Option<Request> = conn.read_message().await.unwrap();
    assert_eq!(second, None);
}

#[tokio::test]
async fn eof_mid_header_is_truncated() {
    let (mut conn, mut peer) = pair();
    peer.write_all(&[0, 0]).await.unwrap();
    drop(peer);
    match conn.read_message::<Request>().await {
        Err(FrameError::Truncated { received, expected }) => {
            assert_eq!(received, 2);
            assert_eq!(expected, None);
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
}

#[tokio::test]
async fn half_written_frame_then_eof_is_truncated() {
    let frame = encode_frame(&get(9, "half"), DEFAULT_MAX_FRAME).unwrap();
    let (mut conn, mut peer) = pair();
    let half = frame.len() / 2;
    peer.write_all(&frame[..half]).await.unwrap();
    drop(peer);
    match conn.read_message::<Request>().await {
        Err(FrameError::Truncated { received, expected }) => {
            assert_eq!(received, half);
            assert_eq!(expected, Some(frame.len() as u64));
            let msg = FrameError::Truncated { received, expected }.to_string();
            assert!(msg.contains(&frame.len().to_string()), "{msg}");
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
}

#[tokio::test]
async fn four_gib_prefix_refused_before_body_without_allocating() {
    let (mut conn, mut peer) = pair();
    // Only the prefix is sent and the peer stays open: if the reader tried to
    // read (or reserve room for) the body, this would hang or blow up.
    peer.write_all(&[0xFF, 0xFF, 0xFF, 0xFF]).await.unwrap();
    let r = tokio::time::timeout(TIMEOUT, conn.read_message::<Request>())
        .await
        .expect("reader waited for a body it should have refused");
    match r {
        Err(FrameError::TooLarge { len, max }) => {
            assert_eq!(len, 0xFFFF_FFFF);
            assert_eq!(max, DEFAULT_MAX_FRAME);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(
        conn.read_buffer_capacity() <= 16 * 1024,
        "read buffer grew to {}",
        conn.read_buffer_capacity()
    );
    drop(peer);
}

#[tokio::test]
async fn large_max_does_not_reserve_announced_size_up_front() {
    let (a, mut peer) = duplex(1 << 16);
    let mut conn = Connection::with_limits(a, FrameLimits::symmetric(MAX_ENCODABLE_FRAME));
    // Announce 1 GiB, send 100 bytes, stall.
    peer.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
    peer.write_all(&[0u8; 100]).await.unwrap();
    let r = tokio::time::timeout(Duration::from_millis(200), conn.read_message::<Request>()).await;
    assert!(r.is_err(), "should still be waiting for the body");
    assert!(
        conn.read_buffer_capacity() <= 16 * 1024,
        "reserved {} bytes for a stalled frame",
        conn.read_buffer_capacity()
    );
}

#[tokio::test]
async fn garbage_body_is_decode_error_and_stream_stays_in_sync() {
    let (mut conn, mut peer) = pair();
    peer.write_all(&frame_with_body(b"\xFFgarbage"))
        .await
        .unwrap();
    peer.write_all(&encode_frame(&get(2, "next"), DEFAULT_MAX_FRAME).unwrap())
        .await
        .unwrap();
    let r = conn.read_message::<Request>().await;
    assert!(matches!(r, Err(FrameError::Decode(_))), "{r:?}");
    let next: Request = conn.read_message().await.unwrap().unwrap();
    assert_eq!(next, get(2, "next"));
}

#[tokio::test]
async fn read_and_write_limits_are_independent() {
    let (a, b) = duplex(4 << 20);
    // Server: reads requests up to 64 KiB, writes responses up to 2 MiB.
    let mut server = Connection::with_limits(a, FrameLimits::new(DEFAULT_MAX_FRAME, 2 << 20));
    let mut client = Connection::new(b);
    client.set_max_frame(2 << 20, DEFAULT_MAX_FRAME);
    assert_eq!(
        client.limits(),
        FrameLimits::new(2 << 20, DEFAULT_MAX_FRAME)
    );

    client.write_message(&get(1, "big")).await.unwrap();
    let req: Request = server.read_message().await.unwrap().unwrap();
    let value = vec![0xA5u8; 1 << 20];
    server
        .write_message(&Response::new(
            req.id,
            ResponseBody::Secret {
                name: "big".into(),
                value: SecretBytes::new(value.clone()),
            },
        ))
        .await
        .unwrap();
    let resp: Response = client.read_message().await.unwrap().unwrap();
    let ResponseBody::Secret { value: got, .. } = resp.result else {
        panic!("not a secret")
    };
    assert_eq!(got.expose(), &value[..]);

    // The client may not send a 1 MiB request: refused before writing.
    let huge = get(2, &"n".repeat(1 << 20));
    let err = client.write_message(&huge).await.unwrap_err();
    assert!(
        matches!(err, FrameError::OutgoingTooLarge { .. }),
        "{err:?}"
    );
    // Nothing reached the server: the next frame it sees is the small one.
    client.write_message(&get(3, "small")).await.unwrap();
    let next: Request = server.read_message().await.unwrap().unwrap();
    assert_eq!(next.id, 3);

    // And the server refuses a request over its read limit.
    client.set_max_frame(2 << 20, 2 << 20);
    client
        .write_message(&get(4, &"n".repeat(100_000)))
        .await
        .unwrap();
    let err = server.read_message::<Request>().await.unwrap_err();
    assert!(matches!(err, FrameError::TooLarge { .. }), "{err:?}");
}

#[tokio::test]
async fn many_pipelined_frames_in_one_write() {
    let (mut conn, mut peer) = pair();
    let mut all = Vec::new();
    for id in 0..5_000u64 {
        all.extend_from_slice(&encode_frame(&get(id, "p"), DEFAULT_MAX_FRAME).unwrap());
    }
    let writer = tokio::spawn(async move {
        peer.write_all(&all).await.unwrap();
    });
    for id in 0..5_000u64 {
        let r: Request = conn.read_message().await.unwrap().unwrap();
        assert_eq!(r.id, id);
    }
    writer.await.unwrap();
}

#[tokio::test]
async fn large_frame_trickled_in_small_pieces() {
    let (a, mut peer) = duplex(512);
    let mut conn = Connection::with_limits(a, FrameLimits::symmetric(4 << 20));
    let value: Vec<u8> = (0..(3 << 20)).map(|i: u32| (i % 251) as u8).collect();
    let resp = Response::new(
        5,
        ResponseBody::Secret {
            name: "trickle".into(),
            value: SecretBytes::new(value.clone()),
        },
    );
    let frame = encode_frame(&resp, 4 << 20).unwrap().to_vec();
    let writer = tokio::spawn(async move {
        for chunk in frame.chunks(1000) {
            peer.write_all(chunk).await.unwrap();
        }
    });
    let got: Response = tokio::time::timeout(TIMEOUT, conn.read_message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, resp);
    writer.await.unwrap();
    // The big buffer is released once drained.
    assert!(conn.read_buffer_capacity() <= 64 * 1024);
}

#[tokio::test]
async fn read_message_is_cancellation_safe() {
    let (mut conn, mut peer) = pair();
    let frame = encode_frame(&get(77, "cancel"), DEFAULT_MAX_FRAME).unwrap();
    peer.write_all(&frame[..5]).await.unwrap();
    // Time out with a partial frame buffered...
    let r = tokio::time::timeout(Duration::from_millis(50), conn.read_message::<Request>()).await;
    assert!(r.is_err());
    // ...then the rest arrives and the frame is intact.
    peer.write_all(&frame[5..]).await.unwrap();
    let got: Request = conn.read_message().await.unwrap().unwrap();
    assert_eq!(got, get(77, "cancel"));
}

#[test]
fn connection_debug_shows_no_buffered_bytes() {
    let (a, _b) = duplex(64);
    let conn = Connection::new(a);
    let dbg = format!("{conn:?}");
    assert!(dbg.contains("limits"), "{dbg}");
}

/// What a batching server relies on: after one read, every whole frame it
/// delivered comes out of the buffer in order without further reads, and a
/// partial frame at the end stays buffered until the rest arrives.
#[tokio::test]
async fn buffered_frames_come_out_in_order_and_a_partial_one_is_kept() {
    let (a, mut peer) = duplex(1 << 16);
    let mut conn = Connection::new(a);
    let mut bytes = Vec::new();
    for id in 1..=3 {
        bytes.extend_from_slice(&encode_frame(&get(id, "x"), DEFAULT_MAX_FRAME).unwrap());
    }
    let fourth = encode_frame(&get(4, "x"), DEFAULT_MAX_FRAME).unwrap();
    let split = fourth.len() / 2;
    bytes.extend_from_slice(&fourth[..split]);
    peer.write_all(&bytes).await.unwrap();

    // Nothing is buffered before the first read.
    let none: Option<Result<Request, FrameError>> = conn
        .next_buffered_with(keystore_shared::frame::decode_body)
        .unwrap();
    assert!(none.is_none());
    let first: Request = conn.read_message().await.unwrap().unwrap();
    assert_eq!(first.id, 1);
    let mut ids = Vec::new();
    while let Some(request) = conn
        .next_buffered_with(keystore_shared::frame::decode_body::<Request>)
        .unwrap()
    {
        ids.push(request.unwrap().id);
    }
    assert_eq!(ids, vec![2, 3], "the whole frames, in order, then none");
    // The half frame is still there: the rest completes it.
    peer.write_all(&fourth[split..]).await.unwrap();
    let last: Request = tokio::time::timeout(TIMEOUT, conn.read_message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(last, get(4, "x"));
}

#[tokio::test]
async fn buffered_oversize_prefix_is_refused_like_a_read() {
    let (a, mut peer) = duplex(1 << 16);
    let mut conn = Connection::new(a);
    let mut bytes = encode_frame(&get(1, "x"), DEFAULT_MAX_FRAME)
        .unwrap()
        .to_vec();
    bytes.extend_from_slice(&u32::MAX.to_be_bytes());
    peer.write_all(&bytes).await.unwrap();
    let first: Request = conn.read_message().await.unwrap().unwrap();
    assert_eq!(first.id, 1);
    let err = conn
        .next_buffered_with(keystore_shared::frame::decode_body::<Request>)
        .unwrap_err();
    assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
}

/// Frames appended into one buffer are exactly the frames `encode_frame`
/// makes, one after another; an oversize one appends nothing.
#[test]
fn encode_frame_into_appends_whole_frames_only() {
    let mut out = Zeroizing::new(Vec::new());
    let small = get(7, "db/password");
    encode_frame_into(&small, DEFAULT_MAX_FRAME, &mut out).unwrap();
    encode_frame_into(&get(8, "b"), DEFAULT_MAX_FRAME, &mut out).unwrap();
    let mut expected = encode_frame(&small, DEFAULT_MAX_FRAME).unwrap().to_vec();
    expected.extend_from_slice(&encode_frame(&get(8, "b"), DEFAULT_MAX_FRAME).unwrap());
    assert_eq!(out.as_slice(), expected.as_slice());
    let before = out.len();
    let err = encode_frame_into(&get(9, &"n".repeat(200)), 64, &mut out).unwrap_err();
    assert!(matches!(err, FrameError::OutgoingTooLarge { .. }), "{err}");
    assert_eq!(out.len(), before);
    let (decoded, used) = decode_frame::<Request>(&out, DEFAULT_MAX_FRAME)
        .unwrap()
        .unwrap();
    assert_eq!(decoded, small);
    let (second, _) = decode_frame::<Request>(&out[used..], DEFAULT_MAX_FRAME)
        .unwrap()
        .unwrap();
    assert_eq!(second.id, 8);
}
