//! Random and mutated inputs never panic the parser or the verifier, and a
//! mutated real document is never accepted with different content.
#![allow(clippy::unwrap_used)]

use crate::support::attestation as attestation_support;

use std::sync::OnceLock;

use attestation_support::{REAL_DOCS, real_doc};
use keystore_shared::attestation::{AttestationDocument, Root, Verifier, VerifyAt};
use proptest::prelude::*;

fn docs() -> &'static Vec<Vec<u8>> {
    static DOCS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    DOCS.get_or_init(|| REAL_DOCS.iter().map(|f| real_doc(f)).collect())
}

fn verifier() -> Verifier {
    Verifier::new(Root::aws_nitro_enclaves_g1().unwrap()).at(VerifyAt::Document)
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, mask: u8 },
    Truncate { len: usize },
    Extend { tail: Vec<u8> },
    Insert { at: usize, bytes: Vec<u8> },
    Remove { at: usize, len: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        prop::collection::vec(any::<u8>(), 1..64).prop_map(|tail| Mutation::Extend { tail }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1usize..64).prop_map(|(at, len)| Mutation::Remove { at, len }),
    ]
}

fn apply(doc: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut d = doc.to_vec();
    for m in muts {
        let n = d.len().max(1);
        match m {
            Mutation::Flip { at, mask } => {
                if let Some(b) = d.get_mut(at % n) {
                    *b ^= mask;
                }
            }
            Mutation::Truncate { len } => d.truncate(len % n),
            Mutation::Extend { tail } => d.extend_from_slice(tail),
            Mutation::Insert { at, bytes } => {
                let at = at % (d.len() + 1);
                d.splice(at..at, bytes.iter().copied());
            }
            Mutation::Remove { at, len } => {
                let at = at % n;
                let end = (at + len).min(d.len());
                if at < end {
                    d.drain(at..end);
                }
            }
        }
    }
    d
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let _ = AttestationDocument::parse_unverified(&bytes);
        prop_assert!(verifier().verify(&bytes).is_err());
    }

    #[test]
    fn cbor_looking_prefixes_never_panic(
        head in prop::sample::select(vec![0x84u8, 0xd2, 0xa9, 0xbf, 0x9f, 0x5f, 0x7f, 0xd8]),
        bytes in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut input = vec![head];
        input.extend(bytes);
        let _ = AttestationDocument::parse_unverified(&input);
        prop_assert!(verifier().verify(&input).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn mutated_real_documents_never_panic(
        which in 0usize..6,
        muts in prop::collection::vec(mutation(), 1..4),
    ) {
        let original = &docs()[which];
        let mutated = apply(original, &muts);
        let _ = AttestationDocument::parse_unverified(&mutated);
        if let Ok(doc) = verifier().verify(&mutated) {
            // Only changes outside the signed content (e.g. an unprotected
            // header edit that still parses) may pass, and then the content
            // must be exactly the original's.
            let expected = verifier().verify(original).unwrap();
            prop_assert_eq!(doc, expected);
        }
    }
}
