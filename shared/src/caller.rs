//! Who a read is made for: the identity the agent asserts to the enclave.
//!
//! The agent learns a caller from the kernel (`SO_PEERCRED` on its unix
//! socket, plus the supplementary groups and systemd unit of that PID) or
//! from the token file an HTTP request presents. It forwards that identity
//! with each `Get`/`List` over a privileged connection, and the enclave
//! checks it against the operator's access rules. The enclave believes a
//! [`Caller`] only from a privileged peer: an unprivileged peer cannot
//! claim to be someone else.
//!
//! Every field is bounded while decoding, so a hostile frame cannot make
//! the enclave allocate more than a caller's worth of memory.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

/// Most supplementary groups a caller may carry (Linux allows 65,536; real
/// users have a handful, and rules rarely name more than a few).
pub const MAX_CALLER_GROUPS: usize = 256;

/// Longest user, group, unit or token name accepted in a caller.
pub const MAX_CALLER_NAME: usize = 256;

/// The identity a read is made for.
///
/// Names (`user`, `group_names`) are resolved on the parent instance by the
/// agent, which is as trusted as root there; the enclave compares them as
/// text. An empty caller (every field absent) matches no rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    /// Numeric user id, from `SO_PEERCRED`.
    #[serde(default)]
    pub uid: Option<u32>,
    /// The user name of `uid` on the parent instance.
    #[serde(default, deserialize_with = "bounded_name")]
    pub user: Option<String>,
    /// Primary group id, from `SO_PEERCRED`.
    #[serde(default)]
    pub gid: Option<u32>,
    /// Supplementary group ids (`/proc/PID/status`), primary included.
    #[serde(default, deserialize_with = "bounded_gids")]
    pub groups: Vec<u32>,
    /// Names of `groups` (and `gid`) on the parent instance.
    #[serde(default, deserialize_with = "bounded_names")]
    pub group_names: Vec<String>,
    /// The systemd unit the caller runs in (`/proc/PID/cgroup`), e.g.
    /// `api.service`.
    #[serde(default, deserialize_with = "bounded_name")]
    pub unit: Option<String>,
    /// The name of the HTTP token the caller presented (never the token's
    /// secret value).
    #[serde(default, deserialize_with = "bounded_name")]
    pub token: Option<String>,
}

impl Caller {
    /// The superuser, as a privileged peer that names no caller is taken to
    /// be: only root can bind a port below 1024 or is uid 0 on a socket.
    pub fn root() -> Self {
        Caller {
            uid: Some(0),
            user: Some("root".to_owned()),
            gid: Some(0),
            groups: vec![0],
            group_names: vec!["root".to_owned()],
            ..Caller::default()
        }
    }

    /// Whether this is uid 0.
    pub fn is_root(&self) -> bool {
        self.uid == Some(0)
    }

    /// Whether the caller is in the group with this id.
    pub fn in_gid(&self, gid: u32) -> bool {
        self.gid == Some(gid) || self.groups.contains(&gid)
    }

    /// Whether the caller is in the group with this name.
    pub fn in_group(&self, name: &str) -> bool {
        self.group_names.iter().any(|g| g == name)
    }
}

impl fmt::Display for Caller {
    /// A short description for logs, errors and audit records, e.g.
    /// `uid 1000 (api) unit api.service`. Names and ids only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        match (self.uid, &self.user) {
            (Some(uid), Some(user)) => parts.push(format!("uid {uid} ({user})")),
            (Some(uid), None) => parts.push(format!("uid {uid}")),
            (None, Some(user)) => parts.push(format!("user {user}")),
            (None, None) => {}
        }
        if let Some(unit) = &self.unit {
            parts.push(format!("unit {unit}"));
        }
        if let Some(token) = &self.token {
            parts.push(format!("token {token}"));
        }
        if parts.is_empty() {
            f.write_str("an anonymous caller")
        } else {
            f.write_str(&parts.join(" "))
        }
    }
}

fn check_name<E: serde::de::Error>(name: &str) -> Result<(), E> {
    if name.len() > MAX_CALLER_NAME {
        return Err(E::custom(format_args!(
            "a caller name is {} bytes; at most {MAX_CALLER_NAME} are allowed",
            name.len()
        )));
    }
    Ok(())
}

fn bounded_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let name = Option::<String>::deserialize(d)?;
    if let Some(name) = &name {
        check_name(name)?;
    }
    Ok(name)
}

fn bounded_gids<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    d.deserialize_seq(BoundedSeq::<u32>::new())
}

fn bounded_names<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let names = d.deserialize_seq(BoundedSeq::<String>::new())?;
    for name in &names {
        check_name(name)?;
    }
    Ok(names)
}

/// A sequence visitor that refuses its [`MAX_CALLER_GROUPS`]+1st element
/// before decoding it.
struct BoundedSeq<T>(std::marker::PhantomData<T>);

impl<T> BoundedSeq<T> {
    fn new() -> Self {
        BoundedSeq(std::marker::PhantomData)
    }
}

impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for BoundedSeq<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at most {MAX_CALLER_GROUPS} groups")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(16));
        while let Some(item) = seq.next_element::<T>()? {
            if items.len() == MAX_CALLER_GROUPS {
                return Err(serde::de::Error::invalid_length(
                    MAX_CALLER_GROUPS + 1,
                    &self,
                ));
            }
            items.push(item);
        }
        Ok(items)
    }
}
