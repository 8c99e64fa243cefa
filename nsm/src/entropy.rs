//! The one place NSM randomness is combined with the OS RNG.
//!
//! Every secret the enclave makes (the seal key, the RSA recipient key) is
//! drawn from both sources, hashed together, so that a weak enclave kernel
//! RNG or a faulty NSM alone does not make it predictable.
//!
//! Every buffer that holds NSM or OS randomness, a seed or a stream block is
//! `Zeroizing` (or wiped by hand), and the hashers are built with `sha2`'s
//! `zeroize` feature, so their internal state (which saw the seed) is wiped
//! on drop too.

use rand::TryRng;
use rand::rngs::{SysError, SysRng};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::{Nsm, NsmError};

/// Bytes drawn from each source, and the length of a mixed seed.
pub const SEED_LEN: usize = 32;

/// Why a seed could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum EntropyError {
    /// The NSM refused or failed.
    #[error("NSM randomness unavailable: {0}")]
    Nsm(#[source] NsmError),
    /// The operating system RNG failed.
    #[error("operating system randomness unavailable: {0}")]
    Os(String),
}

/// `SHA-256(domain ‖ from_nsm ‖ from_os)`: deterministic, for tests that need
/// to reproduce a key; production code calls [`seed`].
pub fn mix(
    domain: &[u8],
    from_nsm: &[u8; SEED_LEN],
    from_os: &[u8; SEED_LEN],
) -> Zeroizing<[u8; SEED_LEN]> {
    let mut digest = Sha256::new()
        .chain_update(domain)
        .chain_update(from_nsm)
        .chain_update(from_os)
        .finalize();
    let mut out = Zeroizing::new([0u8; SEED_LEN]);
    out.copy_from_slice(&digest);
    digest.zeroize();
    out
}

/// Draws [`SEED_LEN`] bytes from `nsm` and from the OS and [`mix`]es them
/// under `domain` (one constant per use, so two uses never share a seed).
pub fn seed(nsm: &dyn Nsm, domain: &[u8]) -> Result<Zeroizing<[u8; SEED_LEN]>, EntropyError> {
    let mut from_nsm = Zeroizing::new([0u8; SEED_LEN]);
    nsm.fill_random(from_nsm.as_mut_slice())
        .map_err(EntropyError::Nsm)?;
    let mut from_os = Zeroizing::new([0u8; SEED_LEN]);
    SysRng
        .try_fill_bytes(from_os.as_mut_slice())
        .map_err(|e| EntropyError::Os(e.to_string()))?;
    Ok(mix(domain, &from_nsm, &from_os))
}

/// A cryptographic RNG for one long draw (RSA key generation): fresh OS
/// bytes XORed with a SHA-256 counter-mode stream keyed by a [`seed`], so
/// its output is unpredictable as long as either source is. The seed is
/// wiped on drop.
pub struct MixedRng {
    seed: Zeroizing<[u8; SEED_LEN]>,
    counter: u64,
}

impl std::fmt::Debug for MixedRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MixedRng(<seed redacted>)")
    }
}

impl MixedRng {
    /// Seeds a new stream from `nsm` and the OS under `domain`.
    pub fn new(nsm: &dyn Nsm, domain: &[u8]) -> Result<Self, EntropyError> {
        Ok(Self::from_seed(seed(nsm, domain)?))
    }

    /// A stream over an explicit seed (for tests; see [`MixedRng::new`]).
    pub fn from_seed(seed: Zeroizing<[u8; SEED_LEN]>) -> Self {
        Self { seed, counter: 0 }
    }
}

impl TryRng for MixedRng {
    type Error = SysError;

    fn try_next_u32(&mut self) -> Result<u32, SysError> {
        let mut b = Zeroizing::new([0u8; 4]);
        self.try_fill_bytes(b.as_mut_slice())?;
        Ok(u32::from_le_bytes(*b))
    }

    fn try_next_u64(&mut self) -> Result<u64, SysError> {
        let mut b = Zeroizing::new([0u8; 8]);
        self.try_fill_bytes(b.as_mut_slice())?;
        Ok(u64::from_le_bytes(*b))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), SysError> {
        SysRng.try_fill_bytes(dst)?;
        for chunk in dst.chunks_mut(SEED_LEN) {
            let mut block = Sha256::new()
                .chain_update(self.seed.as_slice())
                .chain_update(self.counter.to_le_bytes())
                .finalize();
            self.counter = self.counter.wrapping_add(1);
            for (d, s) in chunk.iter_mut().zip(block.iter()) {
                *d ^= s;
            }
            block.zeroize();
        }
        Ok(())
    }
}

impl rand::TryCryptoRng for MixedRng {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AttestationRequest, PcrDescription};

    /// An NSM whose "randomness" is a constant, or that fails.
    struct ConstNsm(Option<u8>);

    impl Nsm for ConstNsm {
        fn attest(&self, _: &AttestationRequest) -> Result<Vec<u8>, NsmError> {
            Err(NsmError::Internal("not used".to_owned()))
        }
        fn fill_random(&self, buf: &mut [u8]) -> Result<(), NsmError> {
            match self.0 {
                Some(b) => {
                    buf.fill(b);
                    Ok(())
                }
                None => Err(NsmError::Rejected("broken".to_owned())),
            }
        }
        fn describe_pcr(&self, index: u16) -> Result<PcrDescription, NsmError> {
            Err(NsmError::BadPcrIndex(index))
        }
    }

    #[test]
    fn each_source_and_the_domain_change_the_mix() {
        let base = mix(b"d", &[1; SEED_LEN], &[2; SEED_LEN]);
        assert_eq!(*base, *mix(b"d", &[1; SEED_LEN], &[2; SEED_LEN]));
        assert_ne!(*base, *mix(b"d", &[3; SEED_LEN], &[2; SEED_LEN]));
        assert_ne!(*base, *mix(b"d", &[1; SEED_LEN], &[3; SEED_LEN]));
        assert_ne!(*base, *mix(b"e", &[1; SEED_LEN], &[2; SEED_LEN]));
        // Neither input shows through.
        assert_ne!(*base, [1; SEED_LEN]);
        assert_ne!(*base, [2; SEED_LEN]);
    }

    #[test]
    fn a_constant_nsm_alone_does_not_decide_the_seed() {
        let nsm = ConstNsm(Some(0));
        let a = seed(&nsm, b"d").unwrap();
        let b = seed(&nsm, b"d").unwrap();
        assert_ne!(*a, *b, "the OS half must differ between draws");
        match seed(&ConstNsm(None), b"d") {
            Err(EntropyError::Nsm(NsmError::Rejected(m))) => assert_eq!(m, "broken"),
            other => panic!("expected an NSM error, got {other:?}"),
        }
    }

    #[test]
    fn a_fixed_seed_alone_does_not_decide_the_stream() {
        let mut a = MixedRng::from_seed(Zeroizing::new([9; SEED_LEN]));
        let mut b = MixedRng::from_seed(Zeroizing::new([9; SEED_LEN]));
        let (mut x, mut y) = ([0u8; 100], [0u8; 100]);
        a.try_fill_bytes(&mut x).unwrap();
        b.try_fill_bytes(&mut y).unwrap();
        assert_ne!(x, y, "the OS bytes must differ");
        assert_ne!(a.try_next_u64().unwrap(), b.try_next_u64().unwrap());
        assert_eq!(format!("{a:?}"), "MixedRng(<seed redacted>)");
        let mut rng = MixedRng::new(&ConstNsm(Some(5)), b"d").unwrap();
        assert_ne!(rng.try_next_u64().unwrap(), rng.try_next_u64().unwrap());
        assert!(matches!(
            MixedRng::new(&ConstNsm(None), b"d"),
            Err(EntropyError::Nsm(_))
        ));
    }
}
