//! Frames from host apps: every byte is hostile. Decoding must return a typed
//! error, never panic, and never claim to consume more than it was given.
#![no_main]

use keystore_shared::frame::{DEFAULT_MAX_FRAME, decode_frame};
use keystore_shared::protocol::{Request, RequestHeader, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // What the enclave's server reads first, then the typed request.
    if let Ok(Some((_, used))) = decode_frame::<RequestHeader>(data, DEFAULT_MAX_FRAME) {
        assert!(used <= data.len());
    }
    if let Ok(Some((_, used))) = decode_frame::<Request>(data, DEFAULT_MAX_FRAME) {
        assert!(used <= data.len());
    }
    if let Ok(Some((_, used))) = decode_frame::<Response>(data, DEFAULT_MAX_FRAME) {
        assert!(used <= data.len());
    }
});
