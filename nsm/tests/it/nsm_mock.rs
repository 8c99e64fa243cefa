//! The mock NSM against real NSM documents and an independent verifier.
// Helpers outside `#[test]` functions panic on purpose too: this is a test crate.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keystore_nsm::mock::{DOCUMENT_PCRS, PCR_LEN, PROTECTED_HEADER};
use keystore_nsm::{AttestationRequest, MAX_ATTESTATION_FIELD, MockConfig, MockNsm, Nsm, NsmError};
use nsm_nitro_enclave_utils::api::nsm::AttestationDoc;
use nsm_nitro_enclave_utils::time::Time;
use nsm_nitro_enclave_utils::verify::AttestationDocVerifierExt;
use sha2::{Digest, Sha384};

fn vectors() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/vectors/nitro-kms")
}

fn real_doc(name: &str) -> Vec<u8> {
    std::fs::read(vectors().join("attestation").join(name)).unwrap()
}

fn aws_root() -> Vec<u8> {
    std::fs::read(vectors().join("root/aws_nitro_enclaves_root_g1.der")).unwrap()
}

fn at(ms: u64) -> Time {
    Time::new(Box::new(move || ms))
}

fn millis(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

fn mock(dir: &Path) -> MockNsm {
    let mut config = MockConfig::default();
    config.pcrs.insert(8, [0x88; PCR_LEN]);
    MockNsm::open_with_pcr0(dir, config, [0x42; PCR_LEN]).unwrap()
}

// ---------------------------------------------------------------------------
// A tiny order-preserving CBOR reader, so key order can be compared.

#[derive(Debug, Clone, PartialEq)]
enum Item {
    Uint(u64),
    Neg(u64),
    Bytes(Vec<u8>),
    Text(String),
    Array(Vec<Item>),
    /// Entries in encoded order; `bool` = indefinite length.
    Map(Vec<(Item, Item)>, bool),
    Null,
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        s
    }

    fn arg(&mut self, info: u8) -> Option<u64> {
        Some(match info {
            0..=23 => u64::from(info),
            24 => u64::from(self.take(1)[0]),
            25 => u64::from(u16::from_be_bytes(self.take(2).try_into().unwrap())),
            26 => u64::from(u32::from_be_bytes(self.take(4).try_into().unwrap())),
            27 => u64::from_be_bytes(self.take(8).try_into().unwrap()),
            31 => return None,
            _ => panic!("reserved additional info {info}"),
        })
    }

    fn item(&mut self) -> Item {
        let ib = self.take(1)[0];
        let (major, info) = (ib >> 5, ib & 0x1f);
        if ib == 0xf6 {
            return Item::Null;
        }
        let arg = self.arg(info);
        match major {
            0 => Item::Uint(arg.unwrap()),
            1 => Item::Neg(arg.unwrap()),
            2 => Item::Bytes(self.take(arg.unwrap() as usize).to_vec()),
            3 => Item::Text(String::from_utf8(self.take(arg.unwrap() as usize).to_vec()).unwrap()),
            4 => Item::Array((0..arg.unwrap()).map(|_| self.item()).collect()),
            5 => match arg {
                Some(n) => Item::Map((0..n).map(|_| (self.item(), self.item())).collect(), false),
                None => {
                    let mut entries = Vec::new();
                    while self.b[self.pos] != 0xff {
                        entries.push((self.item(), self.item()));
                    }
                    self.pos += 1;
                    Item::Map(entries, true)
                }
            },
            _ => panic!("unexpected CBOR major type {major}"),
        }
    }
}

fn parse(b: &[u8]) -> Item {
    let mut r = Reader { b, pos: 0 };
    let item = r.item();
    assert_eq!(r.pos, b.len(), "trailing bytes");
    item
}

/// Type shape of an item: types, key names/order, and byte lengths where
/// they are fixed by the format.
fn shape(item: &Item) -> String {
    match item {
        Item::Uint(_) => "uint".into(),
        Item::Neg(_) => "nint".into(),
        Item::Bytes(_) => "bstr".into(),
        Item::Text(_) => "tstr".into(),
        Item::Null => "null".into(),
        Item::Array(items) => {
            let inner: Vec<String> = items.iter().map(shape).collect();
            let mut uniq = inner.clone();
            uniq.dedup();
            format!("[{}]", uniq.join(","))
        }
        Item::Map(entries, _) => {
            let inner: Vec<String> = entries
                .iter()
                .map(|(k, v)| match (k, v) {
                    (Item::Text(k), v) => format!("{k}:{}", shape(v)),
                    (Item::Uint(k), Item::Bytes(b)) => format!("{k}:bstr{}", b.len()),
                    (k, v) => format!("{}:{}", shape(k), shape(v)),
                })
                .collect();
            format!("{{{}}}", inner.join(","))
        }
    }
}

struct Cose {
    protected: Vec<u8>,
    unprotected: Item,
    payload_bytes: Vec<u8>,
    payload: Item,
    signature: Vec<u8>,
}

fn cose(doc: &[u8]) -> Cose {
    assert_eq!(doc[0], 0x84, "untagged 4-element array");
    let Item::Array(parts) = parse(doc) else {
        panic!("not an array")
    };
    let [
        Item::Bytes(protected),
        unprotected,
        Item::Bytes(payload_bytes),
        Item::Bytes(signature),
    ] = <[Item; 4]>::try_from(parts).unwrap()
    else {
        panic!("bad COSE_Sign1 layout")
    };
    let payload = parse(&payload_bytes);
    Cose {
        protected,
        unprotected,
        payload_bytes,
        payload,
        signature,
    }
}

fn field<'a>(payload: &'a Item, key: &str) -> &'a Item {
    let Item::Map(entries, _) = payload else {
        panic!("payload is not a map")
    };
    entries
        .iter()
        .find(|(k, _)| *k == Item::Text(key.into()))
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no {key}"))
}

fn looks_like_module_id(id: &str) -> bool {
    let Some((instance, enclave)) = id.split_once("-enc") else {
        return false;
    };
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    instance.strip_prefix("i-").is_some_and(|i| hex(i, 17)) && hex(enclave, 16)
}

// ---------------------------------------------------------------------------

/// Named `nsm::…` so `cargo test -p keystore-nsm nsm` selects them.
mod nsm {
    use super::*;

    #[test]
    fn documents_have_the_exact_structure_of_real_ones() {
        let dir = tempfile::tempdir().unwrap();
        let nsm = mock(dir.path());

        // (real document, request producing the same optional fields)
        let cases = [
            (
                "blocky_2024-09-07_production_max1024.cose",
                AttestationRequest {
                    public_key: Some(vec![1; MAX_ATTESTATION_FIELD]),
                    user_data: Some(vec![1; MAX_ATTESTATION_FIELD]),
                    nonce: Some(vec![1; MAX_ATTESTATION_FIELD]),
                },
            ),
            (
                "evervault_2022-10-13_production.cose",
                AttestationRequest {
                    nonce: Some(vec![9; 256]),
                    ..Default::default()
                },
            ),
            (
                "evervault_2022-10-12_debug.cose",
                AttestationRequest {
                    public_key: Some(b"my super secret key".to_vec()),
                    user_data: Some(b"hello, world!".to_vec()),
                    nonce: None,
                },
            ),
        ];
        for (name, req) in cases {
            let real = cose(&real_doc(name));
            let ours = cose(&nsm.attest(&req).unwrap());

            assert_eq!(real.protected, PROTECTED_HEADER, "{name}");
            assert_eq!(ours.protected, real.protected);
            assert_eq!(ours.unprotected, Item::Map(vec![], false));
            assert_eq!(ours.unprotected, real.unprotected);
            assert_eq!(real.signature.len(), 96);
            assert_eq!(ours.signature.len(), 96);

            // Same keys, same order, same types; the cabundle is shorter (root +
            // one intermediate instead of four certificates) but of the same type.
            assert_eq!(shape(&ours.payload), shape(&real.payload), "{name}");
            let Item::Map(keys, indefinite) = &ours.payload else {
                panic!()
            };
            assert!(!indefinite);
            let keys: Vec<_> = keys.iter().map(|(k, _)| k.clone()).collect();
            let want: Vec<_> = [
                "module_id",
                "digest",
                "timestamp",
                "pcrs",
                "certificate",
                "cabundle",
                "public_key",
                "user_data",
                "nonce",
            ]
            .iter()
            .map(|k| Item::Text((*k).into()))
            .collect();
            assert_eq!(keys, want);
            assert_eq!(field(&ours.payload, "digest"), &Item::Text("SHA384".into()));
            for doc in [&real, &ours] {
                let Item::Text(id) = field(&doc.payload, "module_id") else {
                    panic!()
                };
                assert!(looks_like_module_id(id), "{id}");
            }
            let Item::Array(bundle) = field(&ours.payload, "cabundle") else {
                panic!()
            };
            assert_eq!(bundle.len(), 2);
            assert_eq!(bundle[0], Item::Bytes(nsm.pki().root_der().to_vec()));
            assert_eq!(
                bundle[1],
                Item::Bytes(nsm.pki().intermediate_der().to_vec())
            );
            let Item::Map(pcrs, _) = field(&ours.payload, "pcrs") else {
                panic!()
            };
            assert_eq!(pcrs.len(), usize::from(DOCUMENT_PCRS));
            assert_eq!(pcrs[0], (Item::Uint(0), Item::Bytes(vec![0x42; PCR_LEN])));
            assert_eq!(pcrs[8], (Item::Uint(8), Item::Bytes(vec![0x88; PCR_LEN])));
            assert_eq!(pcrs[1], (Item::Uint(1), Item::Bytes(vec![0; PCR_LEN])));
            assert!(!ours.payload_bytes.is_empty());
        }
    }

    #[test]
    fn an_independent_verifier_accepts_mock_documents() {
        let dir = tempfile::tempdir().unwrap();
        let nsm = mock(dir.path());
        let req = AttestationRequest {
            public_key: Some(vec![0x30, 0x59, 0x30, 0x13]),
            user_data: Some(b"bound".to_vec()),
            nonce: Some(vec![0xab; 32]),
        };
        let doc = nsm.attest(&req).unwrap();
        let root = nsm.pki().root_der().to_vec();

        let verified = AttestationDoc::from_cose(&doc, &root, Time::default()).unwrap();
        assert_eq!(
            verified.public_key.as_deref().map(|b| &b[..]),
            req.public_key.as_deref()
        );
        assert_eq!(
            verified.user_data.as_deref().map(|b| &b[..]),
            req.user_data.as_deref()
        );
        assert_eq!(
            verified.nonce.as_deref().map(|b| &b[..]),
            req.nonce.as_deref()
        );
        assert_eq!(verified.pcrs[&0][..], [0x42; PCR_LEN]);
        assert_eq!(verified.module_id, nsm.module_id());
        let now = millis(SystemTime::now());
        assert!(verified.timestamp <= now && now - verified.timestamp < 60_000);

        // The same chain read back from the root.pem file.
        let pem = std::fs::read_to_string(nsm.pki().root_pem_path()).unwrap();
        let from_file = <x509_cert::Certificate as der::DecodePem>::from_pem(&pem).unwrap();
        assert_eq!(der::Encode::to_der(&from_file).unwrap(), root);

        // Wrong root.
        assert!(AttestationDoc::from_cose(&doc, &aws_root(), Time::default()).is_err());
        // Another mock PKI's root.
        let other = tempfile::tempdir().unwrap();
        let other = mock(other.path());
        assert!(AttestationDoc::from_cose(&doc, other.pki().root_der(), Time::default()).is_err());
        // A flipped signature byte.
        let mut bad = doc.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x01;
        assert!(AttestationDoc::from_cose(&bad, &root, Time::default()).is_err());
        // A flipped payload byte (inside the nonce, the last field).
        let mut bad = doc.clone();
        let at_nonce = doc.len() - 96 - 2 - 5;
        assert_eq!(bad[at_nonce], 0xab);
        bad[at_nonce] ^= 0x01;
        assert!(AttestationDoc::from_cose(&bad, &root, Time::default()).is_err());
        // After the ~3 h leaf expired.
        assert!(AttestationDoc::from_cose(&doc, &root, at(now + 4 * 3600 * 1000)).is_err());
        // Before the leaf existed.
        assert!(AttestationDoc::from_cose(&doc, &root, at(now - 3600 * 1000)).is_err());

        // Control: the verifier is used the right way round on a real document.
        let real = real_doc("blocky_2024-09-07_production_max1024.cose");
        let real_ts = match field(&cose(&real).payload, "timestamp") {
            Item::Uint(ts) => *ts,
            other => panic!("{other:?}"),
        };
        AttestationDoc::from_cose(&real, &aws_root(), at(real_ts)).unwrap();
        assert!(AttestationDoc::from_cose(&real, &root, at(real_ts)).is_err());
    }

    #[test]
    fn documents_signed_at_another_time_verify_then() {
        let dir = tempfile::tempdir().unwrap();
        let nsm = mock(dir.path());
        let root = nsm.pki().root_der().to_vec();
        let later = SystemTime::now() + Duration::from_secs(2 * 3600 + 30 * 60);
        // The startup leaf has < 1 h left at `later`: a new one is issued.
        let doc = nsm
            .attest_at(&AttestationRequest::default(), later)
            .unwrap();
        let verified = AttestationDoc::from_cose(&doc, &root, at(millis(later))).unwrap();
        assert_eq!(verified.timestamp, millis(later));
        assert!(verified.nonce.is_none() && verified.user_data.is_none());
        // And a document made now, after that, is valid now again.
        let doc = nsm.attest(&AttestationRequest::default()).unwrap();
        AttestationDoc::from_cose(&doc, &root, Time::default()).unwrap();
    }

    #[test]
    fn a_clock_behind_stamps_documents_in_the_past() {
        let dir = tempfile::tempdir().unwrap();
        let behind = Duration::from_secs(600);
        let config = MockConfig {
            clock_behind: behind,
            ..Default::default()
        };
        let nsm = MockNsm::open_with_pcr0(dir.path(), config, [0; PCR_LEN]).unwrap();
        let before = millis(SystemTime::now() - behind);
        let doc = nsm.attest(&AttestationRequest::default()).unwrap();
        let after = millis(SystemTime::now() - behind);
        let verified =
            AttestationDoc::from_cose(&doc, nsm.pki().root_der(), Time::default()).unwrap();
        assert!(
            (before..=after).contains(&verified.timestamp),
            "{before} <= {} <= {after}",
            verified.timestamp
        );
    }

    #[test]
    fn pcr0_is_the_sha384_of_the_running_executable() {
        let dir = tempfile::tempdir().unwrap();
        let nsm = MockNsm::open(dir.path(), MockConfig::default()).unwrap();
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let want: [u8; PCR_LEN] = Sha384::digest(&exe).into();
        assert_eq!(nsm.pcr(0).unwrap(), want);
        assert_ne!(want, [0; PCR_LEN]);
        let described = nsm.describe_pcr(0).unwrap();
        assert_eq!(described.data, want);
        assert!(described.locked);
        let doc = nsm.attest(&AttestationRequest::default()).unwrap();
        let verified =
            AttestationDoc::from_cose(&doc, nsm.pki().root_der(), Time::default()).unwrap();
        assert_eq!(verified.pcrs[&0][..], want);
    }

    #[test]
    fn describe_pcr_reports_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let nsm = mock(dir.path());
        let p8 = nsm.describe_pcr(8).unwrap();
        assert_eq!(
            (p8.index, p8.locked, p8.data),
            (8, true, vec![0x88; PCR_LEN])
        );
        let p15 = nsm.describe_pcr(15).unwrap();
        assert_eq!((p15.locked, p15.data), (true, vec![0; PCR_LEN]));
        let p16 = nsm.describe_pcr(16).unwrap();
        assert_eq!((p16.locked, p16.data), (false, vec![0; PCR_LEN]));
        assert!(matches!(
            nsm.describe_pcr(32),
            Err(NsmError::BadPcrIndex(32))
        ));
        assert_eq!(nsm.pcr(0).unwrap(), [0x42; PCR_LEN]);
    }

    #[test]
    fn request_fields_round_trip_and_null_when_absent() {
        let dir = tempfile::tempdir().unwrap();
        let nsm = mock(dir.path());
        let full = AttestationRequest {
            public_key: Some((0..=255).cycle().take(MAX_ATTESTATION_FIELD).collect()),
            user_data: Some(vec![]),
            nonce: Some(b"n".to_vec()),
        };
        let doc = cose(&nsm.attest(&full).unwrap());
        assert_eq!(
            field(&doc.payload, "public_key"),
            &Item::Bytes(full.public_key.clone().unwrap())
        );
        assert_eq!(field(&doc.payload, "user_data"), &Item::Bytes(vec![]));
        assert_eq!(field(&doc.payload, "nonce"), &Item::Bytes(b"n".to_vec()));

        let doc = cose(&nsm.attest(&AttestationRequest::default()).unwrap());
        for key in ["public_key", "user_data", "nonce"] {
            assert_eq!(field(&doc.payload, key), &Item::Null, "{key}");
        }
    }

    #[test]
    fn oversize_fields_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let nsm = mock(dir.path());
        let big = Some(vec![0; MAX_ATTESTATION_FIELD + 1]);
        let reqs = [
            (
                "public_key",
                AttestationRequest {
                    public_key: big.clone(),
                    ..Default::default()
                },
            ),
            (
                "user_data",
                AttestationRequest {
                    user_data: big.clone(),
                    ..Default::default()
                },
            ),
            (
                "nonce",
                AttestationRequest {
                    nonce: big.clone(),
                    ..Default::default()
                },
            ),
        ];
        for (name, req) in reqs {
            match nsm.attest(&req) {
                Err(NsmError::FieldTooLarge { field, len, max }) => {
                    assert_eq!((field, len, max), (name, 1025, 1024));
                }
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn concurrent_opens_of_a_fresh_directory_agree_on_one_root() {
        let parent = tempfile::tempdir().unwrap();
        // Both a missing directory and an existing empty one.
        let fresh = parent.path().join("nested/pki");
        let empty = parent.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        for dir in [fresh, empty] {
            let threads = 6;
            let barrier = Arc::new(Barrier::new(threads));
            let handles: Vec<_> = (0..threads)
                .map(|_| {
                    let barrier = Arc::clone(&barrier);
                    let dir = dir.clone();
                    std::thread::spawn(move || {
                        barrier.wait();
                        MockNsm::open_with_pcr0(&dir, MockConfig::default(), [1; PCR_LEN])
                            .unwrap()
                            .pki()
                            .root_der()
                            .to_vec()
                    })
                })
                .collect();
            let roots: Vec<Vec<u8>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            assert!(roots.windows(2).all(|w| w[0] == w[1]), "{}", dir.display());
            let on_disk = std::fs::read_to_string(dir.join("root.pem")).unwrap();
            let on_disk = <x509_cert::Certificate as der::DecodePem>::from_pem(&on_disk).unwrap();
            assert_eq!(der::Encode::to_der(&on_disk).unwrap(), roots[0]);
            let mut files: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            files.sort();
            assert_eq!(
                files,
                [
                    "intermediate-key.pem",
                    "intermediate.pem",
                    "root-key.pem",
                    "root.pem"
                ]
            );
            // Losers cleaned up their temporary directories.
            let leftovers: Vec<_> = std::fs::read_dir(dir.parent().unwrap())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".tmp-"))
                .collect();
            assert!(leftovers.is_empty(), "{leftovers:?}");
        }
    }

    #[test]
    fn a_second_open_reuses_the_persisted_root() {
        let dir = tempfile::tempdir().unwrap();
        let first = mock(dir.path());
        let root = first.pki().root_der().to_vec();
        let inter = first.pki().intermediate_der().to_vec();
        let pem = std::fs::read(dir.path().join("root.pem")).unwrap();
        let doc1 = cose(&first.attest(&AttestationRequest::default()).unwrap());
        drop(first);

        let second = mock(dir.path());
        assert_eq!(second.pki().root_der(), root);
        assert_eq!(second.pki().intermediate_der(), inter);
        assert_eq!(std::fs::read(dir.path().join("root.pem")).unwrap(), pem);
        let doc2_bytes = second.attest(&AttestationRequest::default()).unwrap();
        AttestationDoc::from_cose(&doc2_bytes, &root, Time::default()).unwrap();
        // A new process gets a new leaf, like a new enclave would.
        let doc2 = cose(&doc2_bytes);
        assert_ne!(
            field(&doc1.payload, "certificate"),
            field(&doc2.payload, "certificate")
        );
        assert_eq!(
            field(&doc1.payload, "module_id"),
            field(&doc2.payload, "module_id")
        );
    }

    #[test]
    fn custom_module_id_and_randomness() {
        let dir = tempfile::tempdir().unwrap();
        let config = MockConfig {
            module_id: Some("i-0123456789abcdef0-enc0123456789abcdef".into()),
            ..Default::default()
        };
        let nsm = MockNsm::open_with_pcr0(dir.path(), config, [0; PCR_LEN]).unwrap();
        let doc = nsm.attest(&AttestationRequest::default()).unwrap();
        let verified =
            AttestationDoc::from_cose(&doc, nsm.pki().root_der(), Time::default()).unwrap();
        assert_eq!(
            verified.module_id,
            "i-0123456789abcdef0-enc0123456789abcdef"
        );

        let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
        nsm.fill_random(&mut a).unwrap();
        nsm.fill_random(&mut b).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0; 64]);
    }

    #[test]
    fn attest_cost() {
        let dir = tempfile::tempdir().unwrap();
        let started = Instant::now();
        let nsm = mock(dir.path());
        let opened = started.elapsed();
        let started = Instant::now();
        let n = 20;
        for i in 0..n {
            let req = AttestationRequest {
                nonce: Some(vec![i; 32]),
                ..Default::default()
            };
            assert!(!nsm.attest(&req).unwrap().is_empty());
        }
        let per = started.elapsed() / u32::from(n);
        eprintln!("mock NSM: open (new PKI) {opened:?}, one attest {per:?}");
        assert!(per < Duration::from_millis(500), "{per:?}");
    }
}
