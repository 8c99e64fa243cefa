//! The access rules, both ways they are read: the operator's YAML on the
//! host (`keystore-host encrypt --rules`) and the canonical JSON of the
//! reserved `keystore:rules` entry in the enclave, which may hold whatever
//! the parent put under the pinned key's encryption. Parsing must return a
//! typed error, never panic; rules that parse re-encode to JSON that reads
//! back to the same rules (what the host stores is what the enclave
//! enforces); and deciding whether a caller may read a name must not panic
//! and must agree with the rules: no reserved name is ever granted, every
//! pattern grants its own text to the identity its rule names, and a name
//! is granted exactly when some rule grants it.
//!
//! Input: the rules text; if it holds a 0xFF byte (never valid UTF-8),
//! what follows it describes one more caller and name to decide, as fields
//! separated by NUL bytes: name, uid, user, gid, group name, unit, token.
//!
//! The YAML reader is compiled from keystore-host's own source file (not
//! the crate, which would link the AWS SDK into this build).
#![no_main]

use keystore_shared::access::{AccessRules, Rule, Who, glob_match, is_reserved};
use keystore_shared::caller::Caller;
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../host-proxy/src/secrets_file/rules.rs"]
mod rules;

/// The caller and name described after the 0xFF byte.
fn probe(tail: &[u8]) -> (String, Caller) {
    let mut fields = tail.split(|&b| b == 0).map(String::from_utf8_lossy);
    let mut next = || fields.next().map(|f| f.into_owned());
    let name = next().unwrap_or_default();
    let number = |f: Option<String>| f.and_then(|f| f.parse::<u32>().ok());
    let uid = number(next());
    let user = next();
    let gid = number(next());
    let group = next();
    let caller = Caller {
        uid,
        user,
        gid,
        groups: gid.into_iter().collect(),
        group_names: group.into_iter().collect(),
        unit: next(),
        token: next(),
    };
    (name, caller)
}

/// A caller that `who` names.
fn caller_for(who: &Who) -> Caller {
    let mut caller = Caller::default();
    match who {
        Who::User(user) => caller.user = Some(user.clone()),
        Who::Uid(uid) => caller.uid = Some(*uid),
        Who::Group(group) => caller.group_names = vec![group.clone()],
        Who::Gid(gid) => caller.groups = vec![*gid],
        Who::Unit(unit) => caller.unit = Some(unit.clone()),
        Who::Token(token) => caller.token = Some(token.clone()),
        Who::Any => {}
    }
    caller
}

/// Everything the enclave decides with these rules, checked for consistency.
fn decide(rules: &AccessRules, name: &str, caller: &Caller) {
    let allowed = rules.allows(caller, name);
    let granted = rules.rules().iter().any(|r: &Rule| r.grants(caller, name));
    assert_eq!(allowed, granted && !is_reserved(name));
}

fn check(rules: &AccessRules, probe: Option<&(String, Caller)>) {
    // What the host stores reads back, in the enclave, as the same rules.
    let json = rules.to_json();
    assert_eq!(AccessRules::from_json(&json).as_ref(), Ok(rules));

    for rule in rules.rules() {
        let caller = caller_for(&rule.who);
        assert!(rule.who.matches(&caller));
        let _ = rule.who.to_string();
        for pattern in &rule.read {
            // A pattern matches its own text (`*` and `?` match themselves).
            assert!(glob_match(pattern.as_str(), pattern.as_str()));
            assert!(rule.grants(&caller, pattern.as_str()));
            assert!(rules.allows(&caller, pattern.as_str()));
            // Reserved names stay unreadable whatever the patterns.
            assert!(!rules.allows(&caller, "keystore:rules"));
            assert!(!rules.allows(&caller, "keystore:file"));
            decide(rules, pattern.as_str(), &Caller::root());
        }
    }
    if let Some((name, caller)) = probe {
        decide(rules, name, caller);
        decide(rules, name, &Caller::root());
        decide(rules, name, &Caller::default());
    }
}

fuzz_target!(|data: &[u8]| {
    let (text, probe) = match data.iter().position(|&b| b == 0xFF) {
        Some(at) => (&data[..at], Some(probe(&data[at + 1..]))),
        None => (data, None),
    };
    if let Ok(rules) = AccessRules::from_json(text) {
        check(&rules, probe.as_ref());
    }
    match rules::parse_rules(text) {
        Ok(rules) => check(&rules, probe.as_ref()),
        Err(err) => {
            let _ = err.to_string();
        }
    }
    if let Some((name, caller)) = &probe {
        decide(&AccessRules::root_only(), name, caller);
        // Glob matching over the probe's own strings: bounded, no panic.
        let _ = glob_match(name, caller.user.as_deref().unwrap_or_default());
    }
});
