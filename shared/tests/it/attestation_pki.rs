//! Documents signed by a local P-384 test PKI (x509-cert builder): the
//! encodings newer NSMs use, and each chain rule failing on its own.
#![allow(clippy::unwrap_used)]

use crate::support::attestation as attestation_support;

use attestation_support::*;
use keystore_shared::attestation::{
    AttestationDocument, AttestationError, MAX_FIELD_LEN, Root, Verifier, VerifyAt,
};

fn verifier(pki: &Pki) -> Verifier {
    Verifier::new(Root::from_der(&pki.root.der).unwrap()).at(VerifyAt::Document)
}

#[test]
fn definite_map_document_verifies() {
    let pki = pki();
    let p = payload(&pki);
    let doc = verifier(&pki).verify(&signed(&pki, &p)).unwrap();
    assert_eq!(doc.module_id, p.module_id);
    assert_eq!(doc.pcrs.len(), 16);
    assert_eq!(doc.pcrs[&5], vec![5u8; 48]);
    assert_eq!(doc.public_key.as_deref(), Some(&b"spki"[..]));
    assert_eq!(doc.user_data, None);
    assert_eq!(doc.nonce, Some(vec![7; 32]));
}

#[test]
fn indefinite_length_map_verifies_over_the_bytes_as_received() {
    let pki = pki();
    let definite = payload(&pki);
    let indefinite = Payload {
        indefinite: true,
        ..definite.clone()
    };
    let encoded = indefinite.encode();
    assert_eq!(encoded.first(), Some(&0xbf));
    assert_eq!(encoded.last(), Some(&0xff));
    let a = verifier(&pki).verify(&signed(&pki, &definite)).unwrap();
    let b = verifier(&pki).verify(&signed(&pki, &indefinite)).unwrap();
    assert_eq!(a, b);
    // A signature made over the definite encoding does not cover the
    // indefinite one: nothing is re-encoded before checking.
    let definite_doc = signed(&pki, &definite);
    let signature = &definite_doc[definite_doc.len() - 96..];
    let mut swapped = Vec::new();
    head(&mut swapped, 4, 4);
    bstr(&mut swapped, &PROTECTED_ES384);
    swapped.push(0xa0);
    bstr(&mut swapped, &encoded);
    bstr(&mut swapped, signature);
    assert_eq!(
        verifier(&pki).verify(&swapped),
        Err(AttestationError::BadSignature)
    );
    // parse_unverified still decodes it (display only).
    assert_eq!(AttestationDocument::parse_unverified(&swapped).unwrap(), b);
}

#[test]
fn non_minimal_integer_encoding_is_verified_as_received() {
    let pki = pki();
    let p = Payload {
        wide_timestamp: true,
        ..payload(&pki)
    };
    let doc = verifier(&pki).verify(&signed(&pki, &p)).unwrap();
    assert_eq!(doc.timestamp, p.timestamp);
}

#[test]
fn optional_fields_may_be_absent_or_null() {
    let pki = pki();
    for opt in [Opt::Absent, Opt::Null] {
        let p = Payload {
            public_key: opt.clone(),
            user_data: opt.clone(),
            nonce: opt,
            ..payload(&pki)
        };
        let doc = verifier(&pki).verify(&signed(&pki, &p)).unwrap();
        assert_eq!(
            (doc.public_key, doc.user_data, doc.nonce),
            (None, None, None)
        );
    }
}

#[test]
fn unknown_keys_are_ignored_but_duplicates_refused() {
    let pki = pki();
    let mut extra = Vec::new();
    tstr(&mut extra, "future_field");
    tstr(&mut extra, "whatever");
    let p = Payload {
        extra: vec![extra],
        ..payload(&pki)
    };
    verifier(&pki).verify(&signed(&pki, &p)).unwrap();

    let mut dup = Vec::new();
    tstr(&mut dup, "digest");
    tstr(&mut dup, "SHA384");
    let p = Payload {
        extra: vec![dup],
        ..payload(&pki)
    };
    let err = verifier(&pki).verify(&signed(&pki, &p)).unwrap_err();
    assert!(
        matches!(&err, AttestationError::Malformed { what } if what.contains("duplicate")),
        "{err}"
    );
}

#[test]
fn byte_fields_must_be_byte_strings() {
    let pki = pki();
    let p = Payload {
        user_data: Opt::Bytes(vec![1, 2, 3]),
        user_data_as_array: true,
        ..payload(&pki)
    };
    assert!(matches!(
        verifier(&pki).verify(&signed(&pki, &p)),
        Err(AttestationError::Malformed { .. })
    ));
}

#[test]
fn missing_required_field_is_malformed() {
    let pki = pki();
    let mut p = payload(&pki);
    p.cabundle.clear();
    let err = AttestationDocument::parse_unverified(&signed(&pki, &p)).unwrap_err();
    assert!(matches!(err, AttestationError::Malformed { .. }), "{err}");
}

#[test]
fn payload_rules_have_their_own_errors() {
    let pki = pki();
    let check = |p: Payload| verifier(&pki).verify(&signed(&pki, &p)).unwrap_err();
    let base = payload(&pki);

    let e = check(Payload {
        digest: "SHA256".into(),
        ..base.clone()
    });
    assert_eq!(
        e,
        AttestationError::BadDigest {
            digest: "SHA256".into()
        }
    );

    let mut pcrs = base.pcrs.clone();
    pcrs.push((32, vec![0; 48]));
    let e = check(Payload {
        pcrs,
        ..base.clone()
    });
    assert!(
        matches!(e, AttestationError::BadPcr { index: 32, .. }),
        "{e}"
    );

    let mut pcrs = base.pcrs.clone();
    pcrs[3].1 = vec![0; 47];
    let e = check(Payload {
        pcrs,
        ..base.clone()
    });
    assert!(
        matches!(e, AttestationError::BadPcr { index: 3, .. }),
        "{e}"
    );

    for len in [32, 64] {
        let mut pcrs = base.pcrs.clone();
        pcrs[3].1 = vec![0; len];
        verifier(&pki)
            .verify(&signed(
                &pki,
                &Payload {
                    pcrs,
                    ..base.clone()
                },
            ))
            .unwrap();
    }

    let mut pcrs = base.pcrs.clone();
    pcrs.push((2, vec![0; 48]));
    let e = check(Payload {
        pcrs,
        ..base.clone()
    });
    assert!(
        matches!(&e, AttestationError::Malformed { what } if what.contains("duplicate")),
        "{e}"
    );

    for (field, p) in [
        (
            "public_key",
            Payload {
                public_key: Opt::Bytes(vec![0; MAX_FIELD_LEN + 1]),
                ..base.clone()
            },
        ),
        (
            "user_data",
            Payload {
                user_data: Opt::Bytes(vec![0; MAX_FIELD_LEN + 1]),
                ..base.clone()
            },
        ),
        (
            "nonce",
            Payload {
                nonce: Opt::Bytes(vec![0; MAX_FIELD_LEN + 1]),
                ..base.clone()
            },
        ),
    ] {
        assert_eq!(
            check(p),
            AttestationError::FieldTooLarge {
                field,
                len: MAX_FIELD_LEN + 1
            }
        );
    }
    verifier(&pki)
        .verify(&signed(
            &pki,
            &Payload {
                user_data: Opt::Bytes(vec![0; MAX_FIELD_LEN]),
                ..base.clone()
            },
        ))
        .unwrap();
}

#[test]
fn protected_header_must_say_es384() {
    let pki = pki();
    let payload = payload(&pki).encode();
    // {1: -7} = ES256
    let es256 = sign_cose(&payload, &pki.leaf.key, &[0xa1, 0x01, 0x26]);
    assert!(matches!(
        verifier(&pki).verify(&es256),
        Err(AttestationError::UnsupportedAlgorithm { .. })
    ));
    // {} = no algorithm
    let none = sign_cose(&payload, &pki.leaf.key, &[0xa0]);
    assert!(matches!(
        verifier(&pki).verify(&none),
        Err(AttestationError::UnsupportedAlgorithm { .. })
    ));
}

#[test]
fn signature_by_another_key_is_bad() {
    let pki = pki();
    let doc = sign_cose(&payload(&pki).encode(), &pki.inter.key, &PROTECTED_ES384);
    assert_eq!(
        verifier(&pki).verify(&doc),
        Err(AttestationError::BadSignature)
    );
}

#[test]
fn cabundle_may_start_below_the_pinned_root() {
    let pki = pki();
    let p = Payload {
        cabundle: vec![pki.inter.der.clone()],
        ..payload(&pki)
    };
    verifier(&pki).verify(&signed(&pki, &p)).unwrap();
}

#[test]
fn foreign_root_is_untrusted() {
    let pki = pki();
    let other = issue(
        "another root",
        key(9),
        None,
        window(t0() - DAY, DAY * 10),
        Exts::ca(None),
        9,
    );
    let doc = signed(&pki, &payload(&pki));
    let err = Verifier::new(Root::from_der(&other.der).unwrap())
        .at(VerifyAt::Document)
        .verify(&doc)
        .unwrap_err();
    assert!(
        matches!(err, AttestationError::UntrustedRoot { .. }),
        "{err}"
    );

    // Same name as the real root but a different key: the name matches,
    // the signature does not.
    let impostor = issue(
        "test root",
        key(8),
        None,
        window(t0() - DAY, DAY * 10),
        Exts::ca(None),
        1,
    );
    let p = Payload {
        cabundle: vec![pki.inter.der.clone()],
        ..payload(&pki)
    };
    let err = Verifier::new(Root::from_der(&impostor.der).unwrap())
        .at(VerifyAt::Document)
        .verify(&signed(&pki, &p))
        .unwrap_err();
    assert!(
        matches!(err, AttestationError::UntrustedRoot { .. }),
        "{err}"
    );
}

/// Builds root → inter → leaf with custom pieces and returns the signed doc.
fn custom_chain(inter_exts: Exts, leaf_exts: Exts, inter_signer: Option<u8>) -> (Pki, Vec<u8>) {
    let base = pki();
    let inter_issuer = match inter_signer {
        Some(seed) => TestCert {
            der: Vec::new(),
            key: key(seed),
            name: base.root.name.clone(),
        },
        None => TestCert {
            der: Vec::new(),
            key: base.root.key.clone(),
            name: base.root.name.clone(),
        },
    };
    let inter = issue(
        "test intermediate",
        key(2),
        Some(&inter_issuer),
        window(t0() - DAY * 30, DAY * 60),
        inter_exts,
        2,
    );
    let leaf = issue(
        "test leaf",
        key(3),
        Some(&inter),
        window(t0() - DAY, DAY * 2),
        leaf_exts,
        3,
    );
    let pki = Pki {
        root: base.root,
        inter,
        leaf,
    };
    let doc = signed(&pki, &payload(&pki));
    (pki, doc)
}

fn chain_err(pki: &Pki, doc: &[u8]) -> (usize, String) {
    match verifier(pki).verify(doc) {
        Err(AttestationError::ChainBroken { depth, reason }) => (depth, reason),
        other => panic!("expected ChainBroken, got {other:?}"),
    }
}

#[test]
fn sanity_custom_chain_with_defaults_verifies() {
    let (pki, doc) = custom_chain(Exts::ca(Some(0)), Exts::leaf(), None);
    verifier(&pki).verify(&doc).unwrap();
}

#[test]
fn intermediate_signed_by_wrong_key_breaks_the_chain() {
    let (pki, doc) = custom_chain(Exts::ca(Some(0)), Exts::leaf(), Some(7));
    let (depth, reason) = chain_err(&pki, &doc);
    assert_eq!(depth, 1);
    assert!(reason.contains("signature"), "{reason}");
}

#[test]
fn leaf_must_not_be_a_ca() {
    let (pki, doc) = custom_chain(Exts::ca(None), Exts::ca(None), None);
    let (depth, reason) = chain_err(&pki, &doc);
    assert_eq!(depth, 0);
    assert!(reason.contains("CA"), "{reason}");
}

#[test]
fn leaf_key_usage_must_allow_signatures() {
    let leaf = Exts {
        ca: None,
        key_usage: Some(x509_cert::ext::pkix::KeyUsage(
            x509_cert::ext::pkix::KeyUsages::KeyEncipherment.into(),
        )),
    };
    let (pki, doc) = custom_chain(Exts::ca(None), leaf, None);
    assert_eq!(chain_err(&pki, &doc).0, 0);
    // Without any extensions the leaf is acceptable.
    let bare = Exts {
        ca: None,
        key_usage: None,
    };
    let (pki, doc) = custom_chain(Exts::ca(None), bare, None);
    verifier(&pki).verify(&doc).unwrap();
}

#[test]
fn issuer_must_be_a_ca() {
    for inter in [
        Exts {
            ca: Some((false, None)),
            key_usage: None,
        },
        Exts {
            ca: None,
            key_usage: None,
        },
    ] {
        let (pki, doc) = custom_chain(inter, Exts::leaf(), None);
        let (depth, reason) = chain_err(&pki, &doc);
        assert_eq!(depth, 1);
        assert!(reason.contains("not a CA"), "{reason}");
    }
}

#[test]
fn issuer_key_usage_must_allow_cert_signing() {
    let inter = Exts {
        ca: Some((true, None)),
        key_usage: Some(x509_cert::ext::pkix::KeyUsage(
            x509_cert::ext::pkix::KeyUsages::DigitalSignature.into(),
        )),
    };
    let (pki, doc) = custom_chain(inter, Exts::leaf(), None);
    let (depth, reason) = chain_err(&pki, &doc);
    assert_eq!(depth, 1);
    assert!(reason.contains("keyCertSign"), "{reason}");
}

#[test]
fn path_length_constraint_is_respected() {
    let pki = pki();
    // Root allows no intermediates; the chain has one.
    let strict_root = issue(
        "test root",
        key(1),
        None,
        window(t0() - DAY * 365, DAY * 3650),
        Exts::ca(Some(0)),
        1,
    );
    let p = Payload {
        cabundle: vec![strict_root.der.clone(), pki.inter.der.clone()],
        ..payload(&pki)
    };
    let err = Verifier::new(Root::from_der(&strict_root.der).unwrap())
        .at(VerifyAt::Document)
        .verify(&signed(&pki, &p))
        .unwrap_err();
    match err {
        AttestationError::ChainBroken { depth, reason } => {
            assert_eq!(depth, 2);
            assert!(reason.contains("pathLenConstraint"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // The intermediate's own pathLen 0 still allows the leaf.
    verifier(&pki)
        .verify(&signed(&pki, &payload(&pki)))
        .unwrap();
}

#[test]
fn issuer_name_must_match() {
    let pki = pki();
    let p = Payload {
        // Leaf is issued by "test intermediate"; present the root twice instead.
        cabundle: vec![pki.root.der.clone()],
        ..payload(&pki)
    };
    let (depth, reason) = chain_err(&pki, &signed(&pki, &p));
    assert_eq!(depth, 0);
    assert!(
        reason.contains("is not the next certificate's subject"),
        "{reason}"
    );
}

#[test]
fn every_certificate_must_be_valid_at_the_time() {
    let pki = pki();
    let doc = signed(&pki, &payload(&pki));
    let v = verifier(&pki);
    let at = |t| v.clone().at(VerifyAt::Time(t)).verify(&doc);
    at(t0()).unwrap();
    // Leaf lives t0-1d..t0+1d, intermediate t0-30d..t0+30d, root t0-365d..+10y.
    let depth_at = |t| match at(t) {
        Err(AttestationError::CertificateNotValidAt { depth, .. }) => depth,
        other => panic!("{other:?}"),
    };
    assert_eq!(depth_at(t0() + DAY * 2), 0);
    assert_eq!(depth_at(t0() - DAY * 2), 0);

    // A leaf valid longer than its intermediate: the intermediate is named.
    let long_leaf = issue(
        "test leaf",
        key(3),
        Some(&pki.inter),
        window(t0() - DAY, DAY * 100),
        Exts::leaf(),
        4,
    );
    let pki2 = Pki {
        root: pki.root,
        inter: pki.inter,
        leaf: long_leaf,
    };
    let doc2 = signed(&pki2, &payload(&pki2));
    let err = verifier(&pki2)
        .at(VerifyAt::Time(t0() + DAY * 40))
        .verify(&doc2)
        .unwrap_err();
    match &err {
        AttestationError::CertificateNotValidAt { depth, subject, .. } => {
            assert_eq!(*depth, 1);
            assert!(subject.contains("test intermediate"), "{subject}");
        }
        other => panic!("{other:?}"),
    }
    verifier(&pki2)
        .at(VerifyAt::Time(t0() + DAY * 20))
        .verify(&doc2)
        .unwrap();
}

#[test]
fn roots_from_pem_and_der() {
    let pki = pki();
    let pem = der::EncodePem::to_pem(
        &<x509_cert::Certificate as der::Decode>::from_der(&pki.root.der).unwrap(),
        der::pem::LineEnding::LF,
    )
    .unwrap();
    let root = Root::from_pem(&pem).unwrap();
    assert_eq!(root.der(), pki.root.der);
    Verifier::new(root)
        .at(VerifyAt::Document)
        .verify(&signed(&pki, &payload(&pki)))
        .unwrap();

    let two = format!("{pem}{pem}");
    assert!(matches!(
        Root::from_pem(&two),
        Err(AttestationError::InvalidRoot { .. })
    ));
    assert!(matches!(
        Root::from_pem("garbage"),
        Err(AttestationError::InvalidRoot { .. })
    ));
    let broken = pem.replace("-----END CERTIFICATE-----", "");
    assert!(matches!(
        Root::from_pem(&broken),
        Err(AttestationError::InvalidRoot { .. })
    ));
    // A leaf is not a usable root.
    assert!(matches!(
        Root::from_der(&pki.leaf.der),
        Err(AttestationError::InvalidRoot { .. })
    ));
    assert!(matches!(
        Root::from_der(b"\x30\x00"),
        Err(AttestationError::InvalidRoot { .. })
    ));
}

#[test]
fn error_messages_name_the_check() {
    let pki = pki();
    let doc = signed(&pki, &payload(&pki));
    let err = verifier(&pki)
        .at(VerifyAt::Time(t0() + DAY * 2))
        .verify(&doc)
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("certificate at depth 0 (CN=test leaf"),
        "{msg}"
    );
    assert!(msg.contains("not valid at 2025-06-03T00:00:00Z"), "{msg}");
    assert!(
        msg.contains("(valid 2025-05-31T00:00:00Z..2025-06-02T00:00:00Z)"),
        "{msg}"
    );
    assert_eq!(err.kind(), "CertificateNotValidAt");
}

#[test]
fn deeply_nested_cbor_is_refused_without_overflowing_the_stack() {
    let pki = pki();
    // Unprotected header {1: [[[[...]]]]} nested 20,000 deep.
    let mut doc = vec![0x84];
    bstr(&mut doc, &PROTECTED_ES384);
    doc.extend([0xa1, 0x01]);
    doc.extend(std::iter::repeat_n(0x81, 20_000));
    doc.push(0x00);
    bstr(&mut doc, &[0xa0]);
    bstr(&mut doc, &[0; 96]);
    assert!(matches!(
        verifier(&pki).verify(&doc),
        Err(AttestationError::Malformed { .. })
    ));
    // The same nesting inside the payload, under an unknown key.
    let mut deep = Vec::new();
    tstr(&mut deep, "deep");
    deep.extend(std::iter::repeat_n(0x81, 20_000));
    deep.push(0x00);
    let p = Payload {
        extra: vec![deep],
        ..payload(&pki)
    };
    let err = AttestationDocument::parse_unverified(&signed(&pki, &p)).unwrap_err();
    assert!(matches!(err, AttestationError::Malformed { .. }), "{err}");
}
