//! HTTP tokens: files in a directory (default `/etc/nitro-keystore/tokens`),
//! one per token, each naming the identity it stands for.
//!
//! A token file is `key = value` lines (`#` starts a comment):
//!
//! ```text
//! token = 3f9c0d6e1b7a4c2e9d8f5a6b7c1d2e3f   # the secret the app sends (≥ 16 characters)
//! user = api                                 # optional: also stands for this user…
//! uid = 1000                                 # …or uid,
//! group = deploy                             # optional: and this group
//! ```
//!
//! The file's name is the token's name: it becomes [`Caller::token`], which
//! rules match with `who: { token: NAME }`. With `user`/`uid`/`group` the
//! caller also carries that uid and user name / group, so rules written for
//! users and groups apply to it too.
//!
//! A file is refused (logged, the others still load) when it is not a
//! regular file, larger than [`MAX_TOKEN_FILE`], writable by group or others,
//! readable by others (the intended mode is `0640`, owner root, group the
//! app's), or malformed. The directory is re-read every
//! [`DEFAULT_RELOAD_INTERVAL`] and on `SIGHUP`, so adding or revoking a token
//! takes effect without a restart. Presented tokens are compared in constant
//! time (SHA-256 digests compared with `subtle`), and token secrets are kept
//! in [`Zeroizing`] buffers.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use keystore_shared::Caller;
use keystore_shared::caller::MAX_CALLER_NAME;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::identity;

/// Default directory of token files.
pub const DEFAULT_TOKEN_DIR: &str = "/etc/nitro-keystore/tokens";
/// Largest token file read.
pub const MAX_TOKEN_FILE: u64 = 4096;
/// Most token files loaded from the directory.
pub const MAX_TOKENS: usize = 1024;
/// Shortest token secret accepted.
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest token secret accepted (and longest header value compared).
pub const MAX_TOKEN_LEN: usize = 1024;
/// How often the token directory is re-read.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(10);

/// Why a token file (or the directory) was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Reading failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error (in the message, not chained, so it is said once).
        source: std::io::Error,
    },
    /// The file is not acceptable (mode, size, content).
    #[error("{path}: {reason}")]
    Invalid {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong (never the token's value).
        reason: String,
    },
}

/// One loaded token.
struct Token {
    /// SHA-256 of the secret, compared in constant time.
    digest: Zeroizing<[u8; 32]>,
    /// The identity it stands for.
    caller: Caller,
}

/// The tokens currently loaded; swap in a new set on reload.
#[derive(Default)]
struct TokenSet {
    tokens: Vec<Token>,
}

/// The agent's token store.
pub struct Tokens {
    dir: Option<PathBuf>,
    current: RwLock<Arc<TokenSet>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("dir", &self.dir)
            .field("count", &self.len())
            .finish()
    }
}

impl Tokens {
    /// Tokens from `dir` (none if `None`); loads them once now.
    pub fn new(dir: Option<PathBuf>) -> Self {
        let tokens = Tokens {
            dir,
            current: RwLock::new(Arc::new(TokenSet::default())),
        };
        tokens.reload();
        tokens
    }

    /// Number of tokens loaded.
    pub fn len(&self) -> usize {
        self.snapshot().tokens.len()
    }

    /// Whether no token is loaded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn snapshot(&self) -> Arc<TokenSet> {
        match self.current.read() {
            Ok(set) => set.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Re-reads the directory. Bad files are logged and skipped; a missing
    /// or unreadable directory leaves no token loaded.
    pub fn reload(&self) {
        let Some(dir) = &self.dir else {
            return;
        };
        let set = match load_dir(dir) {
            Ok((set, errors)) => {
                for err in errors {
                    tracing::warn!(error = %err, "token file ignored");
                }
                set
            }
            Err(err) => {
                tracing::warn!(error = %err, "no HTTP tokens loaded");
                TokenSet::default()
            }
        };
        tracing::debug!(count = set.tokens.len(), "tokens loaded");
        match self.current.write() {
            Ok(mut current) => *current = Arc::new(set),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(set),
        }
    }

    /// The identity a presented token stands for, or `None`. Every loaded
    /// token is compared, each in constant time.
    pub fn check(&self, presented: &[u8]) -> Option<Caller> {
        if presented.is_empty() || presented.len() > MAX_TOKEN_LEN {
            return None;
        }
        let digest = Zeroizing::new(<[u8; 32]>::from(Sha256::digest(presented)));
        let set = self.snapshot();
        let mut found = None;
        for token in &set.tokens {
            if bool::from(token.digest.ct_eq(&*digest)) {
                found = Some(token.caller.clone());
            }
        }
        found
    }

    /// Re-reads the directory every `interval` and on `SIGHUP`, until the
    /// returned task is aborted. Must run inside a Tokio runtime.
    pub fn spawn_reloader(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let tokens = self.clone();
        // Registered before returning, so a SIGHUP from now on cannot kill
        // the process.
        let mut hup = signal(SignalKind::hangup()).ok();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval.max(Duration::from_secs(1)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                match &mut hup {
                    Some(hup) => tokio::select! {
                        _ = tick.tick() => {}
                        _ = hup.recv() => tracing::info!("SIGHUP: re-reading tokens"),
                    },
                    None => {
                        tick.tick().await;
                    }
                }
                let tokens = tokens.clone();
                let _ = tokio::task::spawn_blocking(move || tokens.reload()).await;
            }
        })
    }
}

/// Loads every acceptable token file of `dir`.
fn load_dir(dir: &Path) -> Result<(TokenSet, Vec<TokenError>), TokenError> {
    let io = |source| TokenError::Io {
        path: dir.to_owned(),
        source,
    };
    let meta = std::fs::metadata(dir).map_err(io)?;
    if meta.mode() & 0o022 != 0 {
        return Err(TokenError::Invalid {
            path: dir.to_owned(),
            reason: format!(
                "the directory is writable by group or others (mode {:o}); make it 0755 or 0750",
                meta.permissions().mode() & 0o7777
            ),
        });
    }
    let mut entries: Vec<PathBuf> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        if entries.len() == MAX_TOKENS {
            return Err(TokenError::Invalid {
                path: dir.to_owned(),
                reason: format!("more than {MAX_TOKENS} token files"),
            });
        }
        entries.push(entry.path());
    }
    entries.sort();
    let mut set = TokenSet::default();
    let mut errors = Vec::new();
    for path in entries {
        match load_file(&path) {
            Ok(token) => set.tokens.push(token),
            Err(err) => errors.push(err),
        }
    }
    Ok((set, errors))
}

/// Loads one token file (see the module docs for the checks).
fn load_file(path: &Path) -> Result<Token, TokenError> {
    let invalid = |reason: String| TokenError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty() && n.len() <= MAX_CALLER_NAME)
        .ok_or_else(|| invalid("the file name is not a usable token name".to_owned()))?
        .to_owned();
    let file = std::fs::File::open(path).map_err(|source| TokenError::Io {
        path: path.to_owned(),
        source,
    })?;
    let meta = file.metadata().map_err(|source| TokenError::Io {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() {
        return Err(invalid("not a regular file".to_owned()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(invalid(format!(
            "writable by group or others (mode {mode:o}); chmod 0640"
        )));
    }
    if mode & 0o004 != 0 {
        return Err(invalid(format!(
            "readable by others (mode {mode:o}); chmod 0640 and give the app's group read access"
        )));
    }
    if meta.len() > MAX_TOKEN_FILE {
        return Err(invalid(format!(
            "{} bytes; a token file is at most {MAX_TOKEN_FILE}",
            meta.len()
        )));
    }
    let mut text = Zeroizing::new(String::new());
    file.take(MAX_TOKEN_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|source| TokenError::Io {
            path: path.to_owned(),
            source,
        })?;
    parse(&name, &text).map_err(invalid)
}

/// Parses a token file's text; errors never quote the token.
fn parse(name: &str, text: &str) -> Result<Token, String> {
    let mut secret: Option<&str> = None;
    let mut caller = Caller {
        token: Some(name.to_owned()),
        ..Caller::default()
    };
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let number = number + 1;
        let Some((key, value)) = line.split_once('=') else {
            return Err(format!("line {number}: expected `key = value`"));
        };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "token" => {
                if secret.is_some() {
                    return Err(format!("line {number}: a second `token`"));
                }
                if value.len() < MIN_TOKEN_LEN || value.len() > MAX_TOKEN_LEN {
                    return Err(format!(
                        "line {number}: the token must be {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} characters"
                    ));
                }
                if !value.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(format!(
                        "line {number}: the token must be printable ASCII without spaces"
                    ));
                }
                secret = Some(value);
            }
            "user" => {
                let uid = identity::uid_of(value)
                    .ok_or_else(|| format!("line {number}: no user called {value:?}"))?;
                set_user(&mut caller, uid, value.to_owned(), number)?;
            }
            "uid" => {
                let uid: u32 = value
                    .parse()
                    .map_err(|_| format!("line {number}: uid must be a number"))?;
                if caller.uid.is_some_and(|set| set != uid) {
                    return Err(format!("line {number}: a second, different user"));
                }
                caller.uid = Some(uid);
                if caller.user.is_none() {
                    caller.user = identity::user_name(uid);
                }
            }
            "group" => {
                let gid = identity::gid_of(value)
                    .ok_or_else(|| format!("line {number}: no group called {value:?}"))?;
                if caller.gid.is_none() {
                    caller.gid = Some(gid);
                }
                if !caller.groups.contains(&gid) {
                    caller.groups.push(gid);
                    caller.group_names.push(value.to_owned());
                }
            }
            other => {
                return Err(format!(
                    "line {number}: unknown key `{other}` (token, user, uid, group)"
                ));
            }
        }
    }
    let secret = secret.ok_or_else(|| "no `token = ...` line".to_owned())?;
    Ok(Token {
        digest: Zeroizing::new(Sha256::digest(secret.as_bytes()).into()),
        caller,
    })
}

fn set_user(caller: &mut Caller, uid: u32, user: String, line: usize) -> Result<(), String> {
    if caller.uid.is_some_and(|set| set != uid) {
        return Err(format!("line {line}: a second, different user"));
    }
    caller.uid = Some(uid);
    caller.user = Some(user);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn tokens_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    #[test]
    fn a_token_file_names_its_identity() {
        let dir = tokens_dir();
        write(
            dir.path(),
            "ci",
            "# CI reads deploy keys\ntoken = abcdefghijklmnop1234  # secret\nuser = root\ngroup = root\n",
            0o640,
        );
        let tokens = Tokens::new(Some(dir.path().to_owned()));
        assert_eq!(tokens.len(), 1);
        let caller = tokens.check(b"abcdefghijklmnop1234").unwrap();
        assert_eq!(caller.token.as_deref(), Some("ci"));
        assert_eq!(caller.uid, Some(0));
        assert_eq!(caller.user.as_deref(), Some("root"));
        assert_eq!(caller.group_names, vec!["root".to_owned()]);
        assert!(tokens.check(b"abcdefghijklmnop123").is_none());
        assert!(tokens.check(b"abcdefghijklmnop12345").is_none());
        assert!(tokens.check(b"").is_none());
    }

    #[test]
    fn unsafe_or_malformed_files_are_refused_and_others_still_load() {
        let dir = tokens_dir();
        write(dir.path(), "good", "token = good-token-0123456789\n", 0o600);
        write(
            dir.path(),
            "groupw",
            "token = groupw-token-0123456789\n",
            0o660,
        );
        write(
            dir.path(),
            "worldr",
            "token = worldr-token-0123456789\n",
            0o644,
        );
        write(dir.path(), "short", "token = short\n", 0o640);
        write(dir.path(), "nokey", "user = root\n", 0o640);
        write(dir.path(), "junk", "token: x\n", 0o640);
        write(
            dir.path(),
            "big",
            &format!("token = big-token-0123456789\n#{}\n", "x".repeat(5000)),
            0o640,
        );
        let (set, errors) = load_dir(dir.path()).unwrap();
        assert_eq!(set.tokens.len(), 1);
        assert_eq!(errors.len(), 6, "{errors:?}");
        let text = errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        assert!(text.contains("writable by group"), "{text}");
        assert!(text.contains("readable by others"), "{text}");
        assert!(text.contains("at most 4096"), "{text}");
        assert!(!text.contains("token-0123456789"), "a token leaked: {text}");
        let tokens = Tokens::new(Some(dir.path().to_owned()));
        assert!(tokens.check(b"good-token-0123456789").is_some());
        assert!(tokens.check(b"groupw-token-0123456789").is_none());
    }

    #[test]
    fn a_writable_directory_is_refused() {
        let dir = tokens_dir();
        write(dir.path(), "good", "token = good-token-0123456789\n", 0o600);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(load_dir(dir.path()).is_err());
        let tokens = Tokens::new(Some(dir.path().to_owned()));
        assert!(tokens.is_empty());
    }

    #[test]
    fn reload_picks_up_added_and_removed_tokens() {
        let dir = tokens_dir();
        let tokens = Tokens::new(Some(dir.path().to_owned()));
        assert!(tokens.check(b"later-token-0123456789").is_none());
        let path = write(
            dir.path(),
            "later",
            "token = later-token-0123456789\n",
            0o640,
        );
        tokens.reload();
        assert!(tokens.check(b"later-token-0123456789").is_some());
        std::fs::remove_file(path).unwrap();
        tokens.reload();
        assert!(tokens.check(b"later-token-0123456789").is_none());
    }
}
