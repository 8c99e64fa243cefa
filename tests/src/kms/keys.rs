//! The emulator's key store: symmetric keys (UUID id, ARN, 256-bit
//! material, policy, metadata) and aliases, and how a `KeyId` parameter
//! (id, key ARN, alias name or alias ARN) resolves to a key.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rand::TryRng;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::policy::Policy;
use super::protocol::{ErrorKind, KeyMetadata, KmsError};

/// Longest alias name real KMS accepts.
pub const MAX_ALIAS_LEN: usize = 256;
/// Most keys one emulator holds (bounds memory under a runaway test).
pub const MAX_KEYS: usize = 10_000;

/// One symmetric KMS key.
pub struct Key {
    /// The key's UUID.
    pub id: Uuid,
    /// `arn:aws:kms:<region>:<account>:key/<id>`.
    pub arn: String,
    /// AES-256 key material.
    pub material: Zeroizing<[u8; 32]>,
    /// The parsed key policy.
    pub policy: Arc<Policy>,
    /// The policy document as given (returned by `GetKeyPolicy`).
    pub policy_text: String,
    /// Free-form description.
    pub description: String,
    /// When the key was created.
    pub created: SystemTime,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("arn", &self.arn)
            .finish_non_exhaustive()
    }
}

impl Key {
    /// The metadata `CreateKey`/`DescribeKey` return.
    pub fn metadata(&self, account: &str) -> KeyMetadata {
        KeyMetadata {
            aws_account_id: account.to_owned(),
            key_id: self.id.to_string(),
            arn: self.arn.clone(),
            creation_date: self
                .created
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or_default(),
            enabled: true,
            description: self.description.clone(),
            key_usage: "ENCRYPT_DECRYPT",
            key_state: "Enabled",
            origin: "AWS_KMS",
            key_manager: "CUSTOMER",
            customer_master_key_spec: "SYMMETRIC_DEFAULT",
            key_spec: "SYMMETRIC_DEFAULT",
            encryption_algorithms: vec!["SYMMETRIC_DEFAULT"],
            multi_region: false,
        }
    }
}

/// Keys and aliases of the emulator's one account and region.
#[derive(Debug)]
pub struct KeyStore {
    region: String,
    account: String,
    keys: BTreeMap<Uuid, Arc<Key>>,
    aliases: BTreeMap<String, Uuid>,
}

impl KeyStore {
    /// An empty store for `region` and `account`.
    pub fn new(region: impl Into<String>, account: impl Into<String>) -> Self {
        Self {
            region: region.into(),
            account: account.into(),
            keys: BTreeMap::new(),
            aliases: BTreeMap::new(),
        }
    }

    /// The store's region.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The store's account id.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// The ARN of key `id`.
    pub fn key_arn(&self, id: Uuid) -> String {
        format!("arn:aws:kms:{}:{}:key/{id}", self.region, self.account)
    }

    /// Creates a key with fresh random material.
    ///
    /// # Errors
    /// `KMSInternalException` if randomness fails, `LimitExceededException`
    /// semantics are reported as `ValidationException` over [`MAX_KEYS`].
    pub fn create(
        &mut self,
        policy: Policy,
        policy_text: String,
        description: String,
        now: SystemTime,
    ) -> Result<Arc<Key>, KmsError> {
        if self.keys.len() >= MAX_KEYS {
            return Err(KmsError::new(
                ErrorKind::Validation,
                format!("the emulator holds at most {MAX_KEYS} keys"),
            ));
        }
        let mut material = Zeroizing::new([0u8; 32]);
        rand::rngs::SysRng
            .try_fill_bytes(material.as_mut_slice())
            .map_err(|_| KmsError::new(ErrorKind::Internal, "random source failed"))?;
        let id = Uuid::new_v4();
        let key = Arc::new(Key {
            id,
            arn: self.key_arn(id),
            material,
            policy: Arc::new(policy),
            policy_text,
            description,
            created: now,
        });
        self.keys.insert(id, Arc::clone(&key));
        Ok(key)
    }

    /// Replaces key `id`'s policy.
    ///
    /// # Errors
    /// `NotFoundException` if the key does not exist.
    pub fn set_policy(&mut self, id: Uuid, policy: Policy, text: String) -> Result<(), KmsError> {
        let old = self
            .keys
            .get(&id)
            .ok_or_else(|| not_found(&id.to_string()))?;
        // A new Arc: requests in flight keep the policy they started with.
        let updated = Key {
            id: old.id,
            arn: old.arn.clone(),
            material: old.material.clone(),
            policy: Arc::new(policy),
            policy_text: text,
            description: old.description.clone(),
            created: old.created,
        };
        self.keys.insert(id, Arc::new(updated));
        Ok(())
    }

    /// Creates alias `name` (`alias/...`) for the key named by `target`
    /// (key id or key ARN; aliases cannot point at aliases).
    ///
    /// # Errors
    /// `InvalidAliasNameException`, `AlreadyExistsException`,
    /// `NotFoundException`, or `ValidationException` for an alias target.
    pub fn create_alias(&mut self, name: &str, target: &str) -> Result<(), KmsError> {
        check_alias_name(name)?;
        if self.aliases.contains_key(name) {
            return Err(KmsError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "An alias with the name arn:aws:kms:{}:{}:{name} already exists",
                    self.region, self.account
                ),
            ));
        }
        if target.starts_with("alias/") || target.contains(":alias/") {
            return Err(KmsError::new(
                ErrorKind::Validation,
                "TargetKeyId must be a key id or key ARN, not an alias",
            ));
        }
        let key = self.resolve(target)?;
        self.aliases.insert(name.to_owned(), key.id);
        Ok(())
    }

    /// Resolves a `KeyId` parameter: UUID, key ARN, `alias/...` or alias ARN.
    ///
    /// # Errors
    /// `NotFoundException` if it names nothing in this region and account.
    pub fn resolve(&self, key_id: &str) -> Result<Arc<Key>, KmsError> {
        let local = if let Some(rest) = key_id.strip_prefix("arn:") {
            // arn:<partition>:kms:<region>:<account>:<resource>
            let mut parts = rest.splitn(5, ':');
            let (Some(_partition), Some("kms"), Some(region), Some(account), Some(resource)) = (
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
                parts.next(),
            ) else {
                return Err(invalid_key_id(key_id));
            };
            if region != self.region || account != self.account {
                return Err(not_found(key_id));
            }
            resource
        } else {
            key_id
        };
        let id = if local.starts_with("alias/") {
            *self.aliases.get(local).ok_or_else(|| not_found(key_id))?
        } else if let Some(id) = local.strip_prefix("key/") {
            Uuid::parse_str(id).map_err(|_| invalid_key_id(key_id))?
        } else if key_id.starts_with("arn:") {
            return Err(invalid_key_id(key_id));
        } else {
            Uuid::parse_str(local).map_err(|_| invalid_key_id(key_id))?
        };
        self.get(id).ok_or_else(|| not_found(key_id))
    }

    /// The key with UUID `id`.
    pub fn get(&self, id: Uuid) -> Option<Arc<Key>> {
        self.keys.get(&id).cloned()
    }
}

/// Checks an alias name the way KMS does: `alias/` prefix, not
/// `alias/aws/`, 1-256 characters of `a-zA-Z0-9/_-`.
///
/// # Errors
/// `InvalidAliasNameException`.
pub fn check_alias_name(name: &str) -> Result<(), KmsError> {
    let Some(rest) = name.strip_prefix("alias/") else {
        return Err(KmsError::new(
            ErrorKind::InvalidAliasName,
            format!("Alias must start with the prefix \"alias/\": {name}"),
        ));
    };
    if rest.starts_with("aws/") {
        return Err(KmsError::new(
            ErrorKind::InvalidAliasName,
            "The alias prefix alias/aws/ is reserved for AWS managed keys",
        ));
    }
    let valid = !rest.is_empty()
        && name.len() <= MAX_ALIAS_LEN
        && rest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-'));
    if valid {
        Ok(())
    } else {
        Err(KmsError::new(
            ErrorKind::InvalidAliasName,
            format!("Alias name {name:?} must be 1-256 characters of a-z A-Z 0-9 / _ -"),
        ))
    }
}

fn not_found(key_id: &str) -> KmsError {
    KmsError::new(
        ErrorKind::NotFound,
        format!("Key '{key_id}' does not exist"),
    )
}

fn invalid_key_id(key_id: &str) -> KmsError {
    KmsError::new(ErrorKind::NotFound, format!("Invalid keyId {key_id}"))
}
