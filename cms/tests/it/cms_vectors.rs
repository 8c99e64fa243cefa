//! `keystore_cms` against real KMS `CiphertextForRecipient` blobs
//! (tests/vectors/nitro-kms/cms) and against its own KMS-shaped builder.

use std::sync::OnceLock;
use std::time::Instant;

use crate::support::cms::{REAL_BLOBS, enclaver_key, find, sdkgo_key, vector};
use ::cms::cert::IssuerAndSerialNumber;
use ::cms::content_info::ContentInfo;
use ::cms::enveloped_data::{
    EnvelopedData, KeyTransRecipientInfo, OriginatorInfo, RecipientIdentifier, RecipientInfo,
    RecipientInfos,
};
use der::asn1::OctetString;
use der::{Any, Decode, Encode};
use keystore_cms::{
    CmsError, MAX_BLOB_LEN, MAX_PLAINTEXT_LEN, open, parse, rsa_subject_key_identifier,
    seal_for_recipient, subject_key_identifier,
};
use rsa::PrivateKey;
use rsa::pkcs8::EncodePublicKey;
use x509_cert::ext::pkix::SubjectKeyIdentifier;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;

fn h(s: &str) -> Vec<u8> {
    hex::decode(s).expect("test hex")
}

#[test]
fn all_six_real_blobs_parse() {
    for name in REAL_BLOBS {
        let blob = vector(name);
        let info = parse(&blob).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(info.subject_key_identifier.len(), 32, "{name}");
        assert_eq!(info.encrypted_key.len(), 256, "{name}: RSA-2048");
        assert!(!info.ciphertext.is_empty() && info.ciphertext.len().is_multiple_of(16));
    }
}

#[test]
fn sdkc_blob_exposes_expected_key_iv_and_ciphertext() {
    let info = parse(&vector("sdkc_cms_test_input_ber.ber")).expect("parse");
    assert!(info.encrypted_key.starts_with(&h("a0614593a030ee33")));
    assert!(info.encrypted_key.ends_with(&h("0ab0dd")));
    assert_eq!(info.iv.as_slice(), h("688c6d5f7f31b0fecedf09f2e7c99ac9"));
    assert_eq!(
        info.ciphertext,
        h(
            "70e5caaffd49ad24efe15bf903be9d19895b777d269b57b025f6f67e7ef93f94\
             464515f2ebe034ea0b7621a1ff19292e"
        )
    );
}

#[test]
fn primitive_context_zero_content_is_read() {
    let blob = vector("sdkc_cms_test_input_ber_w_ctx.ber");
    // The vector really is the primitive form: `80 10 <16 bytes>`.
    assert!(find(&blob, &h("80101f943eb0105c1b0644df4f7130448a28")).is_some());
    let info = parse(&blob).expect("parse");
    assert!(info.encrypted_key.starts_with(&h("4a1ca12202e4ce0b")));
    assert_eq!(info.iv.as_slice(), h("e66c1172aee0f2f7be34e3afc6b0e4fe"));
    assert_eq!(info.ciphertext, h("1f943eb0105c1b0644df4f7130448a28"));
}

#[test]
fn single_chunk_constructed_content_is_read() {
    let info = parse(&vector("rustcrypto_kms_ciphertext_for_recipient_1.ber")).expect("parse");
    assert_eq!(info.ciphertext, h("cc74adf65d973c8b72cd51e1b927f0f0"));
}

/// Walks the `[0]` chunks by hand (an oracle independent of the `der` crate)
/// and checks that `parse` joined exactly those bytes, in order.
#[test]
fn five_chunk_content_is_joined() {
    let blob = vector("rustcrypto_kms_ciphertext_for_recipient_4.ber");
    let info = parse(&blob).expect("parse");
    assert_eq!(info.ciphertext.len(), 4112);

    let mut pos = find(&blob, &info.iv).expect("IV in blob") + 16;
    assert_eq!(
        &blob[pos..pos + 2],
        [0xa0, 0x80],
        "constructed indefinite [0]"
    );
    pos += 2;
    let mut joined = Vec::new();
    let mut sizes = Vec::new();
    while blob[pos] == 0x04 {
        let (len, header) = match blob[pos + 1] {
            0x82 => (
                usize::from(blob[pos + 2]) << 8 | usize::from(blob[pos + 3]),
                4,
            ),
            0x81 => (usize::from(blob[pos + 2]), 3),
            short => (usize::from(short), 2),
        };
        joined.extend_from_slice(&blob[pos + header..pos + header + len]);
        sizes.push(len);
        pos += header + len;
    }
    assert_eq!(sizes, [1000, 1000, 1000, 1000, 112]);
    assert_eq!(&blob[pos..], [0u8; 10], "five closing EOCs");
    assert_eq!(info.ciphertext, joined);
}

#[test]
fn enclaver_blob_opens_to_hello_world() {
    let blob = vector("enclaver_cfr_hello_world.ber");
    let plaintext = open(&blob, &enclaver_key()).expect("open");
    assert_eq!(plaintext.as_slice(), b"Hello, World");
    assert_eq!(
        plaintext.as_slice(),
        vector("enclaver_expected_plaintext.bin")
    );
}

#[test]
fn sdkgo_blob_opens_to_the_data_key() {
    let blob = vector("sdkgo_cfr_datakey.ber");
    let plaintext = open(&blob, &sdkgo_key()).expect("open");
    assert_eq!(
        plaintext.as_slice(),
        h("3be82c440f06cb4d44c4c2ec3bf30d472407d3a9125aa4c1842b98f6bdd26e41")
    );
    assert_eq!(plaintext.as_slice(), vector("sdkgo_expected_plaintext.bin"));
}

#[test]
fn real_ski_is_sha256_of_the_recipient_spki() {
    for (name, key) in [
        ("enclaver_cfr_hello_world.ber", enclaver_key()),
        ("sdkgo_cfr_datakey.ber", sdkgo_key()),
    ] {
        let spki = key.to_public_key().to_public_key_der().expect("spki");
        let info = parse(&vector(name)).expect("parse");
        assert_eq!(
            info.subject_key_identifier,
            subject_key_identifier(spki.as_bytes()),
            "{name}"
        );
    }
}

#[test]
fn wrong_key_is_a_recipient_mismatch() {
    let err = open(&vector("enclaver_cfr_hello_world.ber"), &sdkgo_key()).unwrap_err();
    assert!(matches!(err, CmsError::RecipientMismatch), "{err:?}");
    let err = open(&vector("sdkgo_cfr_datakey.ber"), &enclaver_key()).unwrap_err();
    assert!(matches!(err, CmsError::RecipientMismatch), "{err:?}");
}

/// Readdress a blob to `key` by overwriting its SKI, so the recipient check
/// passes and the RSA-OAEP unwrap has to fail.
fn readdress(blob: &[u8], key: &PrivateKey) -> Vec<u8> {
    let info = parse(blob).expect("parse");
    let pos = find(blob, &info.subject_key_identifier).expect("SKI in blob");
    let mut patched = blob.to_vec();
    patched[pos..pos + 32]
        .copy_from_slice(&rsa_subject_key_identifier(&key.to_public_key()).expect("ski"));
    patched
}

#[test]
fn forced_decrypt_with_another_key_is_the_opaque_error() {
    // A real blob, readdressed.
    let patched = readdress(&vector("enclaver_cfr_hello_world.ber"), &sdkgo_key());
    let err = open(&patched, &sdkgo_key()).unwrap_err();
    assert!(matches!(err, CmsError::Decryption), "{err:?}");
    assert_eq!(err.to_string(), "decryption failed");

    // A builder blob, readdressed.
    let sealed = seal_for_recipient(b"secret", &enclaver_key().to_public_key(), &mut rand::rng())
        .expect("seal");
    let patched = readdress(&sealed, &sdkgo_key());
    let err = open(&patched, &sdkgo_key()).unwrap_err();
    assert!(matches!(err, CmsError::Decryption), "{err:?}");
}

#[test]
fn bad_cbc_padding_is_the_same_opaque_error() {
    // "Hello, World" is 12 bytes, so its only block ends in four 0x04 pad
    // bytes. XOR-ing the last IV byte with 0x24 turns the last pad byte into
    // 0x20, which is never valid padding.
    let blob = vector("enclaver_cfr_hello_world.ber");
    let info = parse(&blob).expect("parse");
    let pos = find(&blob, &info.iv).expect("IV in blob");
    let mut patched = blob.clone();
    patched[pos + 15] ^= 0x24;
    let err = open(&patched, &enclaver_key()).unwrap_err();
    assert!(matches!(err, CmsError::Decryption), "{err:?}");

    // And one that still has valid padding decrypts (to altered plaintext):
    // CBC is unauthenticated, which is why the error must not say more.
    let mut patched = blob;
    patched[pos] ^= 0x01;
    let opened = open(&patched, &enclaver_key()).expect("valid padding");
    assert_eq!(opened.as_slice(), b"Iello, World");
}

#[test]
fn corrupt_encrypted_key_is_the_opaque_error() {
    let blob = vector("sdkgo_cfr_datakey.ber");
    let info = parse(&blob).expect("parse");
    let pos = find(&blob, &info.encrypted_key).expect("key in blob");
    let mut patched = blob;
    patched[pos + 100] ^= 0x01;
    let err = open(&patched, &sdkgo_key()).unwrap_err();
    assert!(matches!(err, CmsError::Decryption), "{err:?}");
}

/// Replaces the random parts of a KMS-shaped blob (SKI, encrypted key, IV,
/// ciphertext chunks) with a filler, leaving only the fixed structure.
fn skeleton(blob: &[u8]) -> Vec<u8> {
    let info = parse(blob).expect("parse");
    let mut out = blob.to_vec();
    let mut from = 0;
    let mut blank = |part: &[u8]| {
        let at = from + find(&out[from..], part).expect("part in blob");
        out[at..at + part.len()].fill(0xEE);
        from = at + part.len();
    };
    blank(&info.subject_key_identifier);
    blank(&info.encrypted_key);
    blank(&info.iv);
    for chunk in info.ciphertext.chunks(1000) {
        blank(chunk);
    }
    out
}

/// The builder emits the same bytes as real KMS everywhere except the random
/// parts: indefinite-length wrappers, version, RecipientInfos framing, OAEP
/// parameters with NULLs, AES OID, chunk headers, and the EOC trailer.
#[test]
fn builder_output_has_the_real_kms_shape() {
    let key = sdkgo_key().to_public_key();
    let cases = [
        ("enclaver_cfr_hello_world.ber", 12),
        ("rustcrypto_kms_ciphertext_for_recipient_1.ber", 0),
        ("sdkgo_cfr_datakey.ber", 32),
        ("sdkc_cms_test_input_ber.ber", 40),
        ("rustcrypto_kms_ciphertext_for_recipient_4.ber", 4100),
    ];
    for (name, plaintext_len) in cases {
        let real = vector(name);
        let built =
            seal_for_recipient(&vec![0x5A; plaintext_len], &key, &mut rand::rng()).expect("seal");
        assert_eq!(built.len(), real.len(), "{name}: length");
        assert_eq!(
            hex::encode(skeleton(&built)),
            hex::encode(skeleton(&real)),
            "{name}: structure"
        );
    }
    // Spot-check the exact prefix through the SKI tag and the trailer.
    let built = seal_for_recipient(b"x", &key, &mut rand::rng()).expect("seal");
    let prefix = h(
        "308006092a864886f70d010703a08030800201023182016b3082016702010280 20"
            .replace(' ', "")
            .as_str(),
    );
    assert!(built.starts_with(&prefix));
    assert!(built.ends_with(&[0u8; 10]));
}

#[test]
fn builder_splits_content_into_1000_byte_chunks() {
    let key = sdkgo_key();
    let plaintext = vec![7u8; 2999];
    let built =
        seal_for_recipient(&plaintext, &key.to_public_key(), &mut rand::rng()).expect("seal");
    let info = parse(&built).expect("parse");
    assert_eq!(info.ciphertext.len(), 3008);
    for (i, chunk) in info.ciphertext.chunks(1000).enumerate() {
        let header: &[u8] = if chunk.len() == 1000 {
            &[0x04, 0x82, 0x03, 0xe8]
        } else {
            &[0x04, 0x08]
        };
        let framed = [header, chunk].concat();
        assert!(find(&built, &framed).is_some(), "chunk {i}");
    }
    assert_eq!(open(&built, &key).expect("open").as_slice(), plaintext);
}

static KEYS: [OnceLock<PrivateKey>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];

/// One key per size for the whole test binary: RSA-4096 generation takes
/// seconds.
fn generated_key(bits: usize) -> &'static PrivateKey {
    let slot = match bits {
        2048 => &KEYS[0],
        3072 => &KEYS[1],
        4096 => &KEYS[2],
        _ => panic!("unexpected size {bits}"),
    };
    slot.get_or_init(|| {
        let started = Instant::now();
        let key = PrivateKey::new(&mut rand::rng(), bits).expect("keygen");
        eprintln!("RSA-{bits} keygen: {:?}", started.elapsed());
        key
    })
}

const PAYLOAD_SIZES: [usize; 10] = [0, 1, 15, 16, 17, 999, 1000, 1001, 4112, 100_000];

fn round_trip(bits: usize) {
    let key = generated_key(bits);
    let public = key.to_public_key();
    for size in PAYLOAD_SIZES {
        let plaintext: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        let sealed = seal_for_recipient(&plaintext, &public, &mut rand::rng()).expect("seal");
        let info = parse(&sealed).expect("parse");
        assert_eq!(info.encrypted_key.len(), bits / 8, "RSA-{bits}");
        assert_eq!(info.ciphertext.len(), (size / 16 + 1) * 16);
        let started = Instant::now();
        let opened = open(&sealed, key).expect("open");
        if size == 4112 {
            eprintln!("RSA-{bits} open of {size} bytes: {:?}", started.elapsed());
        }
        assert_eq!(opened.as_slice(), plaintext, "RSA-{bits}, {size} bytes");
    }
}

#[test]
fn round_trip_rsa2048() {
    round_trip(2048);
}

#[test]
fn round_trip_rsa3072() {
    round_trip(3072);
}

#[test]
fn round_trip_rsa4096() {
    round_trip(4096);
}

#[test]
fn largest_plaintext_round_trips_and_larger_is_refused() {
    let key = sdkgo_key();
    let public = key.to_public_key();
    let plaintext = vec![0xA5; MAX_PLAINTEXT_LEN];
    let sealed = seal_for_recipient(&plaintext, &public, &mut rand::rng()).expect("seal");
    assert!(sealed.len() <= MAX_BLOB_LEN);
    assert_eq!(open(&sealed, &key).expect("open").as_slice(), plaintext);

    let err =
        seal_for_recipient(&[0; MAX_PLAINTEXT_LEN + 1], &public, &mut rand::rng()).unwrap_err();
    assert!(matches!(err, CmsError::PlaintextTooLarge { .. }), "{err:?}");
}

#[test]
fn oversized_and_overdeep_input_is_refused_before_decoding() {
    let err = parse(&vec![0x30; MAX_BLOB_LEN + 1]).unwrap_err();
    assert!(matches!(err, CmsError::TooLarge { .. }), "{err:?}");

    let depth = keystore_cms::MAX_NESTING_DEPTH + 1;
    let mut deep = Vec::new();
    for _ in 0..depth {
        deep.extend_from_slice(&[0x30, 0x80]);
    }
    deep.extend_from_slice(&[0x05, 0x00]);
    deep.extend(std::iter::repeat_n(0u8, 2 * depth));
    let err = parse(&deep).unwrap_err();
    assert!(matches!(err, CmsError::TooDeep { .. }), "{err:?}");
}

/// Patches `from` (which must occur exactly once) to `to` in a real blob.
fn patched(name: &str, from: &str, to: &str) -> Vec<u8> {
    let blob = vector(name);
    let (from, to) = (h(from), h(to));
    let at = find(&blob, &from).expect("pattern in blob");
    assert!(find(&blob[at + 1..], &from).is_none(), "pattern is unique");
    let mut out = blob;
    out[at..at + from.len()].copy_from_slice(&to);
    out
}

type IsExpected = fn(&CmsError) -> bool;

#[test]
fn structural_deviations_are_named() {
    let name = "sdkgo_cfr_datakey.ber";
    let cases: [(&str, &str, IsExpected); 7] = [
        // ContentInfo says signedData.
        ("2a864886f70d010703a080", "2a864886f70d010702a080", |e| {
            matches!(e, CmsError::NotEnvelopedData(_))
        }),
        // EnvelopedData version 0.
        ("30800201023182", "30800201003182", |e| {
            matches!(e, CmsError::Version { found: 0, .. })
        }),
        // KeyTransRecipientInfo version 0.
        ("020102802096", "020100802096", |e| {
            matches!(e, CmsError::Version { found: 0, .. })
        }),
        // OAEP hash SHA-384 instead of SHA-256.
        (
            "a00f300d06096086480165030402010500a1",
            "a00f300d06096086480165030402020500a1",
            |e| matches!(e, CmsError::UnsupportedKeyEncryption(_)),
        ),
        // MGF1 hash SHA-384.
        (
            "300d060960864801650304020105000482",
            "300d060960864801650304020205000482",
            |e| matches!(e, CmsError::UnsupportedKeyEncryption(_)),
        ),
        // AES-128-CBC instead of AES-256-CBC.
        ("60864801650304012a0410", "6086480165030401020410", |e| {
            matches!(e, CmsError::UnsupportedContentEncryption(_))
        }),
        // Inner content type id-signedData instead of id-data.
        ("2a864886f70d010701301d", "2a864886f70d010702301d", |e| {
            matches!(e, CmsError::ContentType(_))
        }),
    ];
    for (from, to, expected) in cases {
        let err = open(&patched(name, from, to), &sdkgo_key()).unwrap_err();
        assert!(expected(&err), "{from} -> {to}: {err:?}");
    }
}

/// Decodes the sdkgo blob with the `cms` crate's types, lets `edit`
/// change the EnvelopedData, and re-encodes it (as DER) for `open`.
fn edited(edit: impl FnOnce(&mut EnvelopedData)) -> Vec<u8> {
    let blob = vector("sdkgo_cfr_datakey.ber");
    let ci = ContentInfo::from_ber(&blob).expect("ContentInfo");
    let mut ed: EnvelopedData = ci
        .content
        .decode_as_encoding(der::EncodingRules::Ber)
        .expect("EnvelopedData");
    edit(&mut ed);
    ContentInfo {
        content_type: ci.content_type,
        content: Any::encode_from(&ed).expect("re-encode"),
    }
    .to_der()
    .expect("ContentInfo DER")
}

/// The (only) KeyTransRecipientInfo of a real blob.
fn ktri(ed: &EnvelopedData) -> KeyTransRecipientInfo {
    match ed.recip_infos.0.as_slice() {
        [RecipientInfo::Ktri(k)] => k.clone(),
        _ => panic!("real blob has one ktri"),
    }
}

/// Replaces the recipient with an edited copy.
fn edit_ktri(ed: &mut EnvelopedData, edit: impl FnOnce(&mut KeyTransRecipientInfo)) {
    let mut k = ktri(ed);
    edit(&mut k);
    ed.recip_infos = RecipientInfos::try_from(vec![RecipientInfo::Ktri(k)]).expect("set");
}

#[test]
fn re_encoded_der_still_opens() {
    let blob = edited(|_| {});
    assert_eq!(blob[..2], [0x30, 0x82], "definite-length DER this time");
    assert_eq!(
        open(&blob, &sdkgo_key()).expect("open").as_slice(),
        vector("sdkgo_expected_plaintext.bin")
    );
}

#[test]
fn schema_level_deviations_are_named() {
    let key = sdkgo_key();
    let check = |blob: Vec<u8>, expected: IsExpected, what: &str| {
        let err = open(&blob, &key).unwrap_err();
        assert!(expected(&err), "{what}: {err:?}");
    };
    check(
        edited(|ed| {
            let mut other = ktri(ed);
            other.rid = RecipientIdentifier::SubjectKeyIdentifier(SubjectKeyIdentifier(
                OctetString::new([0x11; 32]).expect("ski"),
            ));
            let mine = ktri(ed);
            ed.recip_infos = RecipientInfos::try_from(vec![
                RecipientInfo::Ktri(mine),
                RecipientInfo::Ktri(other),
            ])
            .expect("two recipients");
        }),
        |e| matches!(e, CmsError::RecipientCount(2)),
        "two recipients",
    );
    check(
        edited(|ed| {
            edit_ktri(ed, |k| {
                k.rid = RecipientIdentifier::IssuerAndSerialNumber(IssuerAndSerialNumber {
                    issuer: Name::default(),
                    serial_number: SerialNumber::new(&[1]).expect("serial"),
                });
            })
        }),
        |e| matches!(e, CmsError::NotSubjectKeyIdentifier),
        "issuer and serial",
    );
    check(
        edited(|ed| edit_ktri(ed, |k| k.key_enc_alg.parameters = None)),
        |e| matches!(e, CmsError::UnsupportedKeyEncryption(_)),
        "OAEP defaults (SHA-1)",
    );
    check(
        edited(|ed| {
            ed.originator_info = Some(OriginatorInfo {
                certs: None,
                crls: None,
            })
        }),
        |e| matches!(e, CmsError::UnexpectedField("originatorInfo")),
        "originatorInfo",
    );
    check(
        edited(|ed| ed.encrypted_content.encrypted_content = None),
        |e| matches!(e, CmsError::MissingContent),
        "detached content",
    );
    check(
        edited(|ed| {
            let ct = ed.encrypted_content.encrypted_content.as_ref().expect("ct");
            let short = ct.as_bytes()[..40].to_vec();
            ed.encrypted_content.encrypted_content = Some(OctetString::new(short).expect("ct"));
        }),
        |e| matches!(e, CmsError::CiphertextLength(40)),
        "ciphertext not a block multiple",
    );
    check(
        edited(|ed| {
            ed.encrypted_content.content_enc_alg.parameters =
                Some(Any::encode_from(&OctetString::new([0u8; 8]).expect("iv")).expect("any"))
        }),
        |e| matches!(e, CmsError::BadIv),
        "8-byte IV",
    );
    check(
        edited(|ed| {
            edit_ktri(ed, |k| {
                let mut short = k.enc_key.as_bytes().to_vec();
                short.pop();
                k.enc_key = OctetString::new(short).expect("key");
            })
        }),
        |e| {
            matches!(
                e,
                CmsError::EncryptedKeyLength {
                    found: 255,
                    expected: 256
                }
            )
        },
        "255-byte encrypted key",
    );
}

#[test]
fn errors_never_carry_secrets() {
    // Every error Display/Debug is short, structural text: check the opaque
    // path and the mismatch path do not echo key or plaintext bytes.
    let blob = vector("enclaver_cfr_hello_world.ber");
    let readdressed = readdress(&blob, &sdkgo_key());
    for err in [
        open(&blob, &sdkgo_key()).unwrap_err(),
        open(&readdressed, &sdkgo_key()).unwrap_err(),
    ] {
        let text = format!("{err} {err:?}");
        assert!(!text.contains("Hello"), "{text}");
        assert!(text.len() < 100, "{text}");
    }
}
