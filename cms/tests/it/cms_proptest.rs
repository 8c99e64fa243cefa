//! Hostile-input properties of `cms::parse` / `cms::open`: random bytes and
//! mutated real KMS blobs never panic, truncations are always refused, and a
//! mutation that leaves every parsed field intact still opens correctly.

use std::sync::OnceLock;

use crate::support::cms::{REAL_BLOBS, sdkgo_key, vector};
use keystore_cms::{open, parse, seal_for_recipient};
use proptest::prelude::*;
use rsa::PrivateKey;

fn key() -> &'static PrivateKey {
    static KEY: OnceLock<PrivateKey> = OnceLock::new();
    KEY.get_or_init(sdkgo_key)
}

fn blobs() -> &'static [Vec<u8>] {
    static BLOBS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    BLOBS.get_or_init(|| REAL_BLOBS.iter().map(|name| vector(name)).collect())
}

/// The real blob that `key()` opens, and its plaintext.
fn sdkgo() -> (&'static [u8], Vec<u8>) {
    (&blobs()[1], vector("sdkgo_expected_plaintext.bin"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = parse(&bytes);
        let _ = open(&bytes, key());
    }

    #[test]
    fn random_bytes_behind_a_valid_prefix_never_panic(
        which in 0..REAL_BLOBS.len(),
        cut in 0usize..600,
        tail in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let blob = &blobs()[which];
        let mut mutated = blob[..cut.min(blob.len())].to_vec();
        mutated.extend_from_slice(&tail);
        let _ = parse(&mutated);
        let _ = open(&mutated, key());
    }

    #[test]
    fn flipped_bytes_never_panic(
        which in 0..REAL_BLOBS.len(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8),
    ) {
        let mut mutated = blobs()[which].clone();
        for (at, xor) in flips {
            let i = at.index(mutated.len());
            mutated[i] ^= xor;
        }
        let _ = parse(&mutated);
        let _ = open(&mutated, key());
    }

    #[test]
    fn inserted_or_deleted_bytes_never_panic(
        which in 0..REAL_BLOBS.len(),
        at in any::<prop::sample::Index>(),
        insert in proptest::option::of(any::<u8>()),
    ) {
        let mut mutated = blobs()[which].clone();
        let i = at.index(mutated.len());
        match insert {
            Some(byte) => mutated.insert(i, byte),
            None => {
                mutated.remove(i);
            }
        }
        let _ = parse(&mutated);
        let _ = open(&mutated, key());
    }

    #[test]
    fn every_truncation_is_refused(which in 0..REAL_BLOBS.len(), at in any::<prop::sample::Index>()) {
        let blob = &blobs()[which];
        let truncated = &blob[..at.index(blob.len())];
        prop_assert!(parse(truncated).is_err());
    }

    /// Flipping one byte either breaks the structure, changes a parsed field,
    /// or (if every field is unchanged) still opens to the right plaintext.
    #[test]
    fn mutation_that_keeps_the_fields_keeps_the_plaintext(
        at in any::<prop::sample::Index>(),
        xor in 1u8..=255,
    ) {
        let (blob, plaintext) = sdkgo();
        let mut mutated = blob.to_vec();
        mutated[at.index(blob.len())] ^= xor;
        if let Ok(info) = parse(&mutated)
            && info == parse(blob).expect("real blob parses")
        {
            let opened = open(&mutated, key());
            prop_assert!(opened.is_ok(), "{:?}", opened.err());
            let opened = opened.expect("checked");
            prop_assert_eq!(opened.as_slice(), plaintext.as_slice());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn builder_round_trips(plaintext in proptest::collection::vec(any::<u8>(), 0..3000)) {
        let sealed = seal_for_recipient(&plaintext, &key().to_public_key(), &mut rand::rng())
            .expect("seal");
        let opened = open(&sealed, key()).expect("open");
        prop_assert_eq!(opened.as_slice(), plaintext.as_slice());
    }

    #[test]
    fn mutated_builder_output_never_panics(
        plaintext in proptest::collection::vec(any::<u8>(), 0..2100),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
    ) {
        let mut sealed = seal_for_recipient(&plaintext, &key().to_public_key(), &mut rand::rng())
            .expect("seal");
        for (at, xor) in flips {
            let i = at.index(sealed.len());
            sealed[i] ^= xor;
        }
        let _ = parse(&sealed);
        let _ = open(&sealed, key());
    }
}
