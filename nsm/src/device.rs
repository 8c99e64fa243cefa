//! The real Nitro Security Module, `/dev/nsm`, through the AWS driver crate.

use std::fmt;
use std::path::Path;

use aws_nitro_enclaves_nsm_api::api::{ErrorCode, Request, Response};
use aws_nitro_enclaves_nsm_api::driver;
use serde_bytes::ByteBuf;
use zeroize::Zeroizing;

use super::{AttestationRequest, Nsm, NsmError, PcrDescription};

/// Where the NSM device lives inside an enclave.
pub const NSM_DEVICE_PATH: &str = "/dev/nsm";

/// Most `GetRandom` round trips one [`Nsm::fill_random`] call makes (the
/// device returns up to 256 bytes each, so this bounds a call to ~1 MiB).
const MAX_RANDOM_ROUNDS: usize = 4096;

/// An open `/dev/nsm`. The descriptor is closed on drop.
pub struct DeviceNsm {
    fd: i32,
}

impl fmt::Debug for DeviceNsm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceNsm").field("fd", &self.fd).finish()
    }
}

impl DeviceNsm {
    /// Opens `/dev/nsm`; fails with [`NsmError::DeviceUnavailable`] (naming the
    /// path and the OS reason) outside an enclave.
    pub fn open() -> Result<Self, NsmError> {
        let unavailable = |reason: String| NsmError::DeviceUnavailable {
            path: NSM_DEVICE_PATH.to_owned(),
            reason,
        };
        // The driver only logs why it failed: find out ourselves first.
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(Path::new(NSM_DEVICE_PATH))
            .map_err(|e| unavailable(e.to_string()))?;
        let fd = driver::nsm_init();
        if fd < 0 {
            return Err(unavailable("nsm_init failed to open the device".to_owned()));
        }
        let nsm = Self { fd };
        // Make sure it answers before anyone relies on it.
        nsm.describe_pcr(0)?;
        Ok(nsm)
    }

    fn request(&self, request: Request) -> Response {
        driver::nsm_process_request(self.fd, request)
    }
}

impl Drop for DeviceNsm {
    fn drop(&mut self) {
        driver::nsm_exit(self.fd);
    }
}

/// Maps a response that is not the one asked for.
fn unexpected(response: Response, wanted: &str) -> NsmError {
    match response {
        Response::Error(code) => rejected(&code),
        other => {
            NsmError::UnexpectedResponse(format!("wanted {wanted}, got {}", response_name(&other)))
        }
    }
}

fn rejected(code: &ErrorCode) -> NsmError {
    NsmError::Rejected(format!("{code:?}"))
}

/// The variant name only: responses may carry key material or large blobs.
fn response_name(response: &Response) -> &'static str {
    match response {
        Response::DescribePCR { .. } => "DescribePCR",
        Response::ExtendPCR { .. } => "ExtendPCR",
        Response::LockPCR => "LockPCR",
        Response::LockPCRs => "LockPCRs",
        Response::DescribeNSM { .. } => "DescribeNSM",
        Response::Attestation { .. } => "Attestation",
        Response::GetRandom { .. } => "GetRandom",
        Response::Error(_) => "Error",
        _ => "an unknown response",
    }
}

fn attestation_document(response: Response) -> Result<Vec<u8>, NsmError> {
    match response {
        Response::Attestation { document } if !document.is_empty() => Ok(document),
        Response::Attestation { .. } => Err(NsmError::UnexpectedResponse(
            "empty attestation document".to_owned(),
        )),
        other => Err(unexpected(other, "Attestation")),
    }
}

/// The bytes of a `GetRandom` answer, wiped when dropped: they become seed
/// material for the seal key and the recipient key.
fn random_bytes(response: Response) -> Result<Zeroizing<Vec<u8>>, NsmError> {
    match response {
        Response::GetRandom { random } if !random.is_empty() => Ok(Zeroizing::new(random)),
        Response::GetRandom { .. } => Err(NsmError::UnexpectedResponse(
            "GetRandom returned no bytes".to_owned(),
        )),
        other => Err(unexpected(other, "GetRandom")),
    }
}

fn pcr_description(index: u16, response: Response) -> Result<PcrDescription, NsmError> {
    match response {
        Response::DescribePCR { lock, data } => Ok(PcrDescription {
            index,
            locked: lock,
            data,
        }),
        Response::Error(ErrorCode::InvalidIndex) => Err(NsmError::BadPcrIndex(index)),
        other => Err(unexpected(other, "DescribePCR")),
    }
}

/// Fills `buf` from successive chunks produced by `next`; each chunk is
/// wiped as soon as it is copied.
fn fill_from(
    buf: &mut [u8],
    mut next: impl FnMut() -> Result<Zeroizing<Vec<u8>>, NsmError>,
) -> Result<(), NsmError> {
    let mut filled = 0;
    let mut rounds = 0;
    while filled < buf.len() {
        if rounds == MAX_RANDOM_ROUNDS {
            return Err(NsmError::UnexpectedResponse(format!(
                "GetRandom produced only {filled} of {} bytes in {MAX_RANDOM_ROUNDS} requests",
                buf.len()
            )));
        }
        rounds += 1;
        let chunk = next()?;
        let n = chunk.len().min(buf.len() - filled);
        buf[filled..filled + n].copy_from_slice(&chunk[..n]);
        filled += n;
    }
    Ok(())
}

impl Nsm for DeviceNsm {
    fn attest(&self, req: &AttestationRequest) -> Result<Vec<u8>, NsmError> {
        req.check_sizes()?;
        let response = self.request(Request::Attestation {
            user_data: req.user_data.clone().map(ByteBuf::from),
            nonce: req.nonce.clone().map(ByteBuf::from),
            public_key: req.public_key.clone().map(ByteBuf::from),
        });
        attestation_document(response)
    }

    fn fill_random(&self, buf: &mut [u8]) -> Result<(), NsmError> {
        fill_from(buf, || random_bytes(self.request(Request::GetRandom)))
    }

    fn describe_pcr(&self, index: u16) -> Result<PcrDescription, NsmError> {
        pcr_description(index, self.request(Request::DescribePCR { index }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_map_to_errors() {
        let err = attestation_document(Response::Error(ErrorCode::InputTooLarge)).unwrap_err();
        assert!(
            matches!(&err, NsmError::Rejected(m) if m == "InputTooLarge"),
            "{err}"
        );
        let err = attestation_document(Response::LockPCR).unwrap_err();
        assert!(
            matches!(&err, NsmError::UnexpectedResponse(m) if m.contains("LockPCR")),
            "{err}"
        );
        let err = attestation_document(Response::Attestation { document: vec![] }).unwrap_err();
        assert!(matches!(err, NsmError::UnexpectedResponse(_)), "{err}");
        assert_eq!(
            attestation_document(Response::Attestation {
                document: vec![0x84]
            })
            .unwrap(),
            [0x84]
        );

        let err = pcr_description(40, Response::Error(ErrorCode::InvalidIndex)).unwrap_err();
        assert!(matches!(err, NsmError::BadPcrIndex(40)), "{err}");
        let pcr = pcr_description(
            3,
            Response::DescribePCR {
                lock: true,
                data: vec![5; 48],
            },
        )
        .unwrap();
        assert_eq!((pcr.index, pcr.locked, pcr.data.len()), (3, true, 48));
        let err = pcr_description(
            3,
            Response::GetRandom {
                random: vec![1, 2, 3],
            },
        )
        .unwrap_err();
        // The payload of an unexpected response never leaks into the message.
        assert!(
            matches!(&err, NsmError::UnexpectedResponse(m) if m == "wanted DescribePCR, got GetRandom"),
            "{err}"
        );

        let err = random_bytes(Response::GetRandom { random: vec![] }).unwrap_err();
        assert!(matches!(err, NsmError::UnexpectedResponse(_)), "{err}");
        let random = random_bytes(Response::GetRandom {
            random: vec![7; 16],
        })
        .unwrap();
        assert_eq!(random.as_slice(), [7; 16]);
    }

    #[test]
    fn random_is_assembled_from_chunks() {
        let mut calls = 0u8;
        let mut buf = [0u8; 600];
        fill_from(&mut buf, || {
            calls += 1;
            Ok(Zeroizing::new(vec![calls; 256]))
        })
        .unwrap();
        assert_eq!(calls, 3);
        assert!(buf[..256].iter().all(|&b| b == 1));
        assert!(buf[256..512].iter().all(|&b| b == 2));
        assert!(buf[512..].iter().all(|&b| b == 3));

        let err = fill_from(&mut buf, || Err(rejected(&ErrorCode::InternalError))).unwrap_err();
        assert!(matches!(err, NsmError::Rejected(_)), "{err}");
        let err = fill_from(&mut buf, || Ok(Zeroizing::new(vec![]))).unwrap_err();
        assert!(matches!(err, NsmError::UnexpectedResponse(_)), "{err}");
    }

    #[test]
    fn open_fails_cleanly_without_the_device() {
        if Path::new(NSM_DEVICE_PATH).exists() {
            // Inside a real enclave the device must work instead.
            let nsm = DeviceNsm::open().unwrap();
            assert_eq!(nsm.describe_pcr(0).unwrap().data.len(), 48);
            return;
        }
        let err = DeviceNsm::open().unwrap_err();
        match &err {
            NsmError::DeviceUnavailable { path, reason } => {
                assert_eq!(path, NSM_DEVICE_PATH);
                assert!(reason.contains("No such file"), "{reason}");
            }
            other => panic!("wrong error: {other}"),
        }
        assert!(err.to_string().contains("/dev/nsm"), "{err}");
    }
}
