//! Who is on the other end of the agent's unix socket, as the kernel says.
//!
//! `SO_PEERCRED` gives uid, gid and pid at connect time; the rest is read
//! from `/proc/PID` (supplementary groups from `status`, the systemd unit
//! from `cgroup`) and from the user and group databases (names). Each file
//! read is bounded; a file that is missing, too large or unparsable leaves
//! its field empty rather than failing the caller: uid and gid, which the
//! kernel reported, are always there. Nothing here trusts anything the peer
//! sends.

use std::io::Read;
use std::path::Path;

use keystore_shared::Caller;
use keystore_shared::caller::{MAX_CALLER_GROUPS, MAX_CALLER_NAME};
use keystore_shared::endpoint::UnixCredentials;
use nix::unistd::{Gid, Group, Uid, User};

/// Most bytes read from one `/proc` file (`status` is about 1.5 KiB,
/// `cgroup` one line on cgroup v2).
const MAX_PROC_FILE: u64 = 64 * 1024;

/// The caller behind a unix peer's credentials. Blocking (file reads, user
/// database look-ups): run it on a blocking thread.
pub fn caller_from_credentials(cred: &UnixCredentials) -> Caller {
    caller_from_proc(cred, Path::new("/proc"))
}

/// [`caller_from_credentials`] with another `/proc` root (for tests).
pub fn caller_from_proc(cred: &UnixCredentials, proc_root: &Path) -> Caller {
    let mut groups = vec![cred.gid];
    let mut unit = None;
    if let Some(pid) = cred.pid.filter(|pid| *pid > 0) {
        let dir = proc_root.join(pid.to_string());
        // The process may have exited and its PID been reused: believe its
        // files only while they describe the ids the kernel reported.
        if let Some(status) = read_bounded(&dir.join("status"))
            && same_process(&status, cred)
        {
            for gid in supplementary_groups(&status) {
                if !groups.contains(&gid) && groups.len() < MAX_CALLER_GROUPS {
                    groups.push(gid);
                }
            }
            unit = read_bounded(&dir.join("cgroup")).and_then(|text| systemd_unit(&text));
        }
    }
    let group_names = groups.iter().filter_map(|gid| group_name(*gid)).collect();
    Caller {
        uid: Some(cred.uid),
        user: user_name(cred.uid),
        gid: Some(cred.gid),
        groups,
        group_names,
        unit,
        token: None,
    }
}

/// The user name of `uid`, if the user database has one that fits a caller.
pub fn user_name(uid: u32) -> Option<String> {
    User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|user| user.name)
        .filter(|name| fits(name))
}

/// The group name of `gid`, if the group database has one that fits.
pub fn group_name(gid: u32) -> Option<String> {
    Group::from_gid(Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|group| group.name)
        .filter(|name| fits(name))
}

/// The uid of the user called `name`.
pub fn uid_of(name: &str) -> Option<u32> {
    User::from_name(name)
        .ok()
        .flatten()
        .map(|user| user.uid.as_raw())
}

/// The gid of the group called `name`.
pub fn gid_of(name: &str) -> Option<u32> {
    Group::from_name(name)
        .ok()
        .flatten()
        .map(|group| group.gid.as_raw())
}

fn fits(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_CALLER_NAME
}

/// A file's text, at most [`MAX_PROC_FILE`] bytes of it; `None` when it
/// cannot be read, is larger, or is not UTF-8.
fn read_bounded(path: &Path) -> Option<String> {
    let file = std::fs::File::open(path).ok()?;
    let mut bytes = Vec::new();
    file.take(MAX_PROC_FILE + 1).read_to_end(&mut bytes).ok()?;
    if bytes.len() as u64 > MAX_PROC_FILE {
        return None;
    }
    String::from_utf8(bytes).ok()
}

/// Whether `/proc/PID/status` shows the effective uid and gid `SO_PEERCRED`
/// reported (second field of its `Uid:` and `Gid:` lines).
fn same_process(status: &str, cred: &UnixCredentials) -> bool {
    let effective = |key: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .and_then(|id| id.parse::<u32>().ok())
    };
    effective("Uid:") == Some(cred.uid) && effective("Gid:") == Some(cred.gid)
}

/// The gids of the `Groups:` line of `/proc/PID/status` (at most
/// [`MAX_CALLER_GROUPS`]; an unparsable entry ends the list).
pub fn supplementary_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .map(|list| {
            list.split_whitespace()
                .map_while(|gid| gid.parse().ok())
                .take(MAX_CALLER_GROUPS)
                .collect()
        })
        .unwrap_or_default()
}

/// The systemd unit a process runs in, from `/proc/PID/cgroup`: the last
/// path component ending in `.service` (or `.scope`) of the unified
/// hierarchy (`0::/system.slice/api.service`), or of the `name=systemd`
/// hierarchy on cgroup v1.
pub fn systemd_unit(cgroup: &str) -> Option<String> {
    let path = cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        (controllers.is_empty() || controllers == "name=systemd").then_some(path)
    })?;
    path.split('/')
        .rev()
        .find(|part| part.ends_with(".service") || part.ends_with(".scope"))
        .filter(|unit| fits(unit))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_line_parses_and_is_bounded() {
        let status = "Name:\tcat\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 27 1000 \nNgid:\t0\n";
        assert_eq!(supplementary_groups(status), vec![4, 24, 27, 1000]);
        assert_eq!(supplementary_groups("Groups:\n"), Vec::<u32>::new());
        assert_eq!(supplementary_groups("Name: x\n"), Vec::<u32>::new());
        let many = format!(
            "Groups:{}\n",
            (0..10_000).map(|g| format!(" {g}")).collect::<String>()
        );
        assert_eq!(supplementary_groups(&many).len(), MAX_CALLER_GROUPS);
    }

    #[test]
    fn unit_from_cgroup_v2_and_v1() {
        assert_eq!(
            systemd_unit("0::/system.slice/api.service\n").as_deref(),
            Some("api.service")
        );
        assert_eq!(
            systemd_unit("0::/user.slice/user-1000.slice/session-3.scope\n").as_deref(),
            Some("session-3.scope")
        );
        assert_eq!(
            systemd_unit("12:cpu:/x\n1:name=systemd:/system.slice/cron.service\n").as_deref(),
            Some("cron.service")
        );
        assert_eq!(systemd_unit("0::/\n"), None);
        assert_eq!(systemd_unit("garbage"), None);
    }

    #[test]
    fn missing_proc_leaves_fields_empty_but_keeps_kernel_ids() {
        let dir = tempfile::tempdir().unwrap();
        let cred = UnixCredentials {
            uid: 4242,
            gid: 4343,
            pid: Some(99),
        };
        let caller = caller_from_proc(&cred, dir.path());
        assert_eq!(caller.uid, Some(4242));
        assert_eq!(caller.gid, Some(4343));
        assert_eq!(caller.groups, vec![4343]);
        assert_eq!(caller.unit, None);
        assert_eq!(caller.token, None);
    }

    #[test]
    fn proc_files_give_groups_and_unit() {
        let dir = tempfile::tempdir().unwrap();
        let pid_dir = dir.path().join("7");
        std::fs::create_dir(&pid_dir).unwrap();
        std::fs::write(
            pid_dir.join("status"),
            "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t0 10 20\n",
        )
        .unwrap();
        std::fs::write(pid_dir.join("cgroup"), "0::/system.slice/api.service\n").unwrap();
        let cred = UnixCredentials {
            uid: 0,
            gid: 0,
            pid: Some(7),
        };
        let caller = caller_from_proc(&cred, dir.path());
        assert_eq!(caller.groups, vec![0, 10, 20]);
        assert_eq!(caller.unit.as_deref(), Some("api.service"));
        assert_eq!(caller.user.as_deref(), Some("root"));
        assert!(caller.group_names.contains(&"root".to_owned()));

        // Another process now holds the PID: its groups and unit are not
        // the caller's.
        let other = UnixCredentials { uid: 1000, ..cred };
        let caller = caller_from_proc(&other, dir.path());
        assert_eq!(caller.groups, vec![0]);
        assert_eq!(caller.unit, None);
    }
}
