//! The caller identity a request carries: optional on the wire, bounded
//! while decoding, printed without secrets.

use keystore_shared::caller::{MAX_CALLER_GROUPS, MAX_CALLER_NAME};
use keystore_shared::{Caller, Request, RequestOp};
use serde_cbor::Value;

fn api() -> Caller {
    Caller {
        uid: Some(1000),
        user: Some("api".into()),
        gid: Some(1000),
        groups: vec![1000, 27],
        group_names: vec!["api".into(), "sudo".into()],
        unit: Some("api.service".into()),
        token: None,
    }
}

#[test]
fn a_caller_round_trips_and_an_absent_one_is_none() {
    let request = Request::new(3, RequestOp::List).on_behalf_of(api());
    let bytes = serde_cbor::to_vec(&request).unwrap();
    assert_eq!(serde_cbor::from_slice::<Request>(&bytes).unwrap(), request);

    // A request without a caller carries no `caller` key at all, so a peer
    // that predates callers reads it unchanged.
    let plain = serde_cbor::to_vec(&Request::new(3, RequestOp::List)).unwrap();
    let Value::Map(map) = serde_cbor::from_slice::<Value>(&plain).unwrap() else {
        panic!("a request is a map");
    };
    assert!(!map.contains_key(&Value::Text("caller".into())));
    assert_eq!(
        serde_cbor::from_slice::<Request>(&plain).unwrap().caller,
        None
    );
}

fn request_with_caller(caller: Value) -> Vec<u8> {
    let mut map = std::collections::BTreeMap::new();
    map.insert(Value::Text("id".into()), Value::Integer(1));
    map.insert(Value::Text("v".into()), Value::Integer(1));
    map.insert(Value::Text("op".into()), Value::Text("List".into()));
    map.insert(Value::Text("caller".into()), caller);
    serde_cbor::to_vec(&Value::Map(map)).unwrap()
}

fn caller_map(key: &str, value: Value) -> Value {
    let mut map = std::collections::BTreeMap::new();
    map.insert(Value::Text(key.into()), value);
    Value::Map(map)
}

#[test]
fn too_many_groups_or_too_long_a_name_is_refused_while_decoding() {
    let at_limit = (0..MAX_CALLER_GROUPS as i128).map(Value::Integer).collect();
    let ok = request_with_caller(caller_map("groups", Value::Array(at_limit)));
    let got: Request = serde_cbor::from_slice(&ok).unwrap();
    assert_eq!(got.caller.unwrap().groups.len(), MAX_CALLER_GROUPS);

    let over = (0..=MAX_CALLER_GROUPS as i128)
        .map(Value::Integer)
        .collect();
    let err = serde_cbor::from_slice::<Request>(&request_with_caller(caller_map(
        "groups",
        Value::Array(over),
    )))
    .unwrap_err();
    assert!(err.to_string().contains("groups"), "{err}");

    let names = (0..=MAX_CALLER_GROUPS)
        .map(|i| Value::Text(format!("g{i}")))
        .collect();
    assert!(
        serde_cbor::from_slice::<Request>(&request_with_caller(caller_map(
            "group_names",
            Value::Array(names)
        )))
        .is_err()
    );

    let long = Value::Text("u".repeat(MAX_CALLER_NAME + 1));
    let err = serde_cbor::from_slice::<Request>(&request_with_caller(caller_map("user", long)))
        .unwrap_err();
    assert!(err.to_string().contains("at most"), "{err}");
}

#[test]
fn display_names_ids_and_root_is_uid_zero() {
    assert_eq!(api().to_string(), "uid 1000 (api) unit api.service");
    assert_eq!(Caller::default().to_string(), "an anonymous caller");
    let token = Caller {
        token: Some("ci".into()),
        ..Caller::default()
    };
    assert_eq!(token.to_string(), "token ci");
    assert!(Caller::root().is_root());
    assert!(!api().is_root());
    assert!(api().in_gid(27) && api().in_gid(1000) && !api().in_gid(4));
    assert!(api().in_group("sudo") && !api().in_group("adm"));
}
