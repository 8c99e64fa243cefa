//! The operator's access rules, enforced by the enclave on `Get` and `List`
//! for the caller a privileged peer names: the uid-0 default, granted and
//! refused reads, the reserved rules entry, and a load whose rules entry is
//! bad (refused at load; the previous set and its rules stay).
#![allow(clippy::unwrap_used, missing_docs)]

use crate::support::emulator as emulator_support;
use crate::support::server as server_support;

use std::sync::Arc;
use std::time::Duration;

use emulator_support::Emulator;
use keystore_enclave::access::PolicySource;
use keystore_enclave::load::{LoadConfig, LoadError, Loader};
use keystore_enclave::store::{SealKey, Store, StoreConfig, StoreError};
use keystore_shared::access::{RULES_NAME, RulesError};
use keystore_shared::envelope::Envelope;
use keystore_shared::protocol::{ErrorCode, LoadEntry};
use keystore_shared::{Caller, Client, ClientConfig};
use server_support::{Harness, Options, Transport, fixtures, patient};
use zeroize::Zeroizing;

/// The rules of these tests: `app` reads the `db/` names and `api/token`,
/// the `ops` group reads `blob/*`.
const RULES: &str = r#"{"rules":[
    {"who":{"user":"app"},"read":["db/*","api/token"]},
    {"who":{"group":"ops"},"read":["blob/?ax"]}
]}"#;

fn app() -> Caller {
    Caller {
        uid: Some(1000),
        user: Some("app".into()),
        gid: Some(1000),
        groups: vec![1000],
        group_names: vec!["app".into()],
        unit: Some("app.service".into()),
        token: None,
    }
}

fn uid(uid: u32) -> Caller {
    Caller {
        uid: Some(uid),
        ..Caller::default()
    }
}

fn sorted(names: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    names.sort();
    names
}

/// A connection the enclave trusts to name a caller: a privileged peer
/// (tcp from a source port below 1024; the tests run as root).
async fn privileged(harness: &Harness) -> Client {
    Client::connect_with(
        &harness.endpoint,
        ClientConfig {
            privileged: true,
            ..patient()
        },
    )
    .await
    .unwrap()
}

async fn harness() -> Harness {
    Harness::start(Options {
        transport: Transport::Tcp,
        ..Options::default()
    })
    .await
}

/// Replaces the harness's set with the fixtures plus `rules`, if any.
fn fill(harness: &Harness, rules: Option<&str>) {
    let store = harness.service.store();
    let mut builder = store.builder();
    for (name, value) in fixtures() {
        builder.insert(name, Zeroizing::new(value)).unwrap();
    }
    if let Some(rules) = rules {
        builder
            .insert(RULES_NAME, Zeroizing::new(rules.as_bytes().to_vec()))
            .unwrap();
    }
    store.replace(builder.build());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_rules_root_reads_and_everyone_else_is_denied() {
    let harness = harness().await;
    let mut client = privileged(&harness).await;
    let all = sorted(&fixtures().iter().map(|(n, _)| *n).collect::<Vec<_>>());

    // A privileged peer that names no caller reads as root.
    assert_eq!(
        client.get("db/password").await.unwrap().expose(),
        b"hunter2"
    );
    let root = client
        .get_as("db/password", Some(Caller::root()))
        .await
        .unwrap();
    assert_eq!(root.expose(), b"hunter2");
    assert_eq!(client.list_as(Some(Caller::root())).await.unwrap(), all);

    let err = client.get_as("db/password", Some(app())).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Denied), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("uid 1000 (app) unit app.service may not read `db/password`"),
        "{text}"
    );
    assert!(text.contains("only uid 0 may read"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    assert_eq!(
        client.list_as(Some(uid(1000))).await.unwrap(),
        Vec::<String>::new()
    );
    // An anonymous caller (the agent could not identify it) reads nothing.
    let err = client
        .get_as("db/password", Some(Caller::default()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Denied), "{err}");
    assert!(err.to_string().contains("an anonymous caller"), "{err}");
    harness.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_rules_each_caller_reads_what_is_granted_and_nothing_else() {
    let harness = harness().await;
    fill(&harness, Some(RULES));
    let mut client = privileged(&harness).await;

    // The granted user reads its names...
    assert_eq!(
        client
            .get_as("db/password", Some(app()))
            .await
            .unwrap()
            .expose(),
        b"hunter2"
    );
    assert_eq!(
        client
            .get_as("api/token", Some(app()))
            .await
            .unwrap()
            .expose(),
        b"tok-\x00\x01\xffbinary"
    );
    // ... and nothing else: Denied names the secret and the caller, never
    // the value, whether or not the name exists.
    for name in ["blob/max", "empty", "no/such/name"] {
        let err = client.get_as(name, Some(app())).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Denied), "{name}: {err}");
        let text = err.to_string();
        assert!(
            text.contains(&format!(
                "uid 1000 (app) unit app.service may not read `{name}`"
            )),
            "{text}"
        );
        assert!(text.contains("no access rule grants it"), "{text}");
    }
    assert_eq!(
        client.list_as(Some(app())).await.unwrap(),
        sorted(&["api/token", "db/password"])
    );

    // A group rule.
    let ops = Caller {
        uid: Some(2000),
        groups: vec![2000, 3000],
        group_names: vec!["ops".into()],
        ..Caller::default()
    };
    assert_eq!(
        client
            .get_as("blob/max", Some(ops.clone()))
            .await
            .unwrap()
            .expose()
            .len(),
        1024 * 1024
    );
    assert_eq!(client.list_as(Some(ops)).await.unwrap(), ["blob/max"]);

    // With rules, root reads only what they grant it: here nothing.
    let err = client
        .get_as("db/password", Some(Caller::root()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Denied), "{err}");
    assert_eq!(
        client.list_as(Some(Caller::root())).await.unwrap(),
        Vec::<String>::new()
    );

    // The rules entry itself is never served nor listed, to anyone.
    for caller in [Caller::root(), app()] {
        let err = client
            .get_as(RULES_NAME, Some(caller.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Denied), "{err}");
        assert!(err.to_string().contains("never served"), "{err}");
        assert!(!err.to_string().contains("db/*"), "{err}");
        assert!(
            !client
                .list_as(Some(caller))
                .await
                .unwrap()
                .iter()
                .any(|n| n.starts_with("keystore:"))
        );
    }
    // The file record's name is reserved like the rules': never served.
    let err = client
        .get_as("keystore:file", Some(Caller::root()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Denied), "{err}");
    // Another `keystore:` name is not a name at all.
    let err = client
        .get_as("keystore:other", Some(Caller::root()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest), "{err}");

    // Status counts secrets, not the rules entry.
    assert_eq!(
        client.status().await.unwrap().secret_count,
        fixtures().len() as u64
    );

    // A set loaded without a rules entry returns to the uid-0 default.
    fill(&harness, None);
    assert_eq!(
        client
            .get_as("db/password", Some(Caller::root()))
            .await
            .unwrap()
            .expose(),
        b"hunter2"
    );
    let err = client.get_as("db/password", Some(app())).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Denied), "{err}");
    harness.stop().await.unwrap();
}

struct Loaded {
    em: Emulator,
    store: Arc<Store>,
    loader: Loader,
    key: String,
}

impl Loaded {
    async fn start() -> Loaded {
        let em = Emulator::start().await;
        let store = Arc::new(Store::new(
            SealKey::from_entropy(&[5; 32], &[6; 32]),
            StoreConfig::default(),
        ));
        let config = LoadConfig {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            ..LoadConfig::default()
        };
        let loader = Loader::new(em.kms(), em.recipient.clone(), store.clone(), config).unwrap();
        let key = em.key_arn.clone();
        Loaded {
            em,
            store,
            loader,
            key,
        }
    }

    /// An entry the operator encrypted under `bound_to`'s name context and
    /// placed under `name`.
    async fn entry(&self, name: &str, bound_to: &str, value: &[u8]) -> LoadEntry {
        let blob = self.em.encrypt(&self.key, bound_to, value).await;
        LoadEntry {
            name: name.to_owned(),
            envelope: Envelope::kms(blob).unwrap().to_string(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_travel_with_the_set_and_a_bad_rules_entry_keeps_the_previous_set() {
    let l = Loaded::start().await;
    let first = vec![
        l.entry("db/password", "db/password", b"v1").await,
        l.entry(RULES_NAME, RULES_NAME, RULES.as_bytes()).await,
    ];
    let report = l.loader.load(first).await.unwrap();
    assert_eq!(report.count, 2);
    let set = l.store.snapshot();
    assert_eq!(set.names(), ["db/password"]);
    assert_eq!(set.access().source(), PolicySource::Operator);
    assert!(set.access().allows(&app(), "db/password"));
    assert!(!set.access().allows(&Caller::root(), "db/password"));

    // A rules entry that decrypts but does not decode fails the load.
    let garbage = vec![
        l.entry("db/password", "db/password", b"v2").await,
        l.entry(RULES_NAME, RULES_NAME, b"rules:\n  - who: anyone\n")
            .await,
    ];
    let err = l.loader.load(garbage).await.unwrap_err();
    assert_eq!(err.name(), Some(RULES_NAME), "{err}");
    assert!(
        matches!(
            &err,
            LoadError::Store {
                source: StoreError::Rules(_),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("access rules"), "{err}");
    // So does well-formed JSON that breaks a rule (here an empty pattern
    // in the second rule).
    let bad_pattern = br#"{"rules":[{"who":"any","read":["A"]},{"who":"any","read":[""]}]}"#;
    let err = l
        .loader
        .load(vec![l.entry(RULES_NAME, RULES_NAME, bad_pattern).await])
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            LoadError::Store {
                source: StoreError::Rules(RulesError::Pattern { rule: 2, .. }),
                ..
            }
        ),
        "{err:?}"
    );

    // A rules entry bound to another name (moved by the host) fails to
    // decrypt: KMS refuses the name context.
    let moved = vec![
        l.entry("db/password", "db/password", b"v3").await,
        l.entry(
            RULES_NAME,
            "db/password",
            br#"{"rules":[{"who":"any","read":["*"]}]}"#,
        )
        .await,
    ];
    let err = l.loader.load(moved).await.unwrap_err();
    assert_eq!(err.name(), Some(RULES_NAME), "{err}");
    assert_eq!(err.stage(), "name-binding", "{err}");

    // After every failure the first set and its rules still serve.
    let set = l.store.snapshot();
    assert_eq!(set.get("db/password").unwrap().as_slice(), b"v1");
    assert_eq!(set.access().source(), PolicySource::Operator);
    assert!(set.access().allows(&app(), "db/password"));

    // A load without a rules entry returns to the uid-0 default.
    let plain = vec![l.entry("db/password", "db/password", b"v4").await];
    l.loader.load(plain).await.unwrap();
    let set = l.store.snapshot();
    assert_eq!(set.access().source(), PolicySource::Default);
    assert!(set.access().allows(&Caller::root(), "db/password"));
    assert!(!set.access().allows(&app(), "db/password"));
}
