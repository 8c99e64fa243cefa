//! The KMS operations themselves: given an authenticated caller and a
//! request body, produce the response body or a KMS error. No HTTP here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use rand::TryRng;
use zeroize::Zeroizing;

use super::ciphertext;
use super::clock::Clock;
use super::faults::CallCounter;
use super::keys::{Key, KeyStore};
use super::policy::{Policy, RequestContext, default_policy};
use super::protocol::{
    Blob, CreateAliasRequest, CreateKeyRequest, DecryptRequest, DecryptResponse, EncryptRequest,
    EncryptResponse, EncryptionContext, ErrorKind, GenerateDataKeyRequest, GenerateDataKeyResponse,
    GetKeyPolicyResponse, KeyMetadata, KeyMetadataResponse, KeyRequest, KmsError, Operation,
    PutKeyPolicyRequest, ReEncryptRequest, ReEncryptResponse, RecipientInfo, parse_request,
    to_body,
};
use super::recipient::{AttestationRoot, AttestedRecipient};
use super::sigv4::Caller;

/// Largest `Plaintext` for `Encrypt` (KMS limit).
pub const MAX_PLAINTEXT: usize = 4096;
/// Largest `NumberOfBytes` for `GenerateDataKey` (KMS limit).
pub const MAX_DATA_KEY: usize = 1024;
/// The only encryption algorithm of symmetric keys.
const SYMMETRIC_DEFAULT: &str = "SYMMETRIC_DEFAULT";

/// The emulated KMS: keys, attestation root and clock.
#[derive(Debug)]
pub struct Kms {
    keys: RwLock<KeyStore>,
    root: AttestationRoot,
    clock: Arc<Clock>,
    /// Misbehave like a KMS that does not check a request's `KeyId`.
    ignore_key_id: AtomicBool,
}

impl Kms {
    /// A KMS for `region`/`account` with no keys.
    pub fn new(region: &str, account: &str, root: AttestationRoot, clock: Arc<Clock>) -> Self {
        Self {
            keys: RwLock::new(KeyStore::new(region, account)),
            root,
            clock,
            ignore_key_id: AtomicBool::new(false),
        }
    }

    /// With `true`, `Decrypt` and `ReEncrypt` stop checking that `KeyId`
    /// names the ciphertext's key (real KMS answers `IncorrectKeyException`)
    /// and answer for the ciphertext's own key: what a forged or broken KMS
    /// would do, for tests of a client's own check of the answer's `KeyId`.
    pub fn set_ignore_key_id(&self, ignore: bool) {
        self.ignore_key_id.store(ignore, Ordering::SeqCst);
    }

    /// The account id.
    pub fn account(&self) -> String {
        self.read().account().to_owned()
    }

    /// The region.
    pub fn region(&self) -> String {
        self.read().region().to_owned()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, KeyStore> {
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, KeyStore> {
        self.keys.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `operation` for `caller` on a JSON `body`, updating `counter`
    /// (`with_recipient`, `plaintext_responses`).
    ///
    /// # Errors
    /// The KMS error to send back.
    pub fn handle(
        &self,
        operation: Operation,
        caller: &Caller,
        body: &[u8],
        counter: &CallCounter,
    ) -> Result<Vec<u8>, KmsError> {
        let caller = CallerContext::new(caller, &self.account());
        match operation {
            Operation::CreateKey => to_body(&self.create_key(&parse_request(body)?)?),
            Operation::CreateAlias => self.create_alias(&caller, &parse_request(body)?),
            Operation::DescribeKey => self.describe_key(&caller, &parse_request(body)?),
            Operation::PutKeyPolicy => self.put_key_policy(&caller, &parse_request(body)?),
            Operation::GetKeyPolicy => self.get_key_policy(&caller, &parse_request(body)?),
            Operation::Encrypt => self.encrypt(&caller, &parse_request(body)?),
            Operation::Decrypt => {
                let request: DecryptRequest = parse_request(body)?;
                if request.recipient.is_some() {
                    counter.update(operation, |s| s.with_recipient += 1);
                }
                let response = self.decrypt(&caller, &request)?;
                if response.plaintext.is_some() {
                    counter.update(operation, |s| s.plaintext_responses += 1);
                }
                to_body(&response)
            }
            Operation::GenerateDataKey => {
                let request: GenerateDataKeyRequest = parse_request(body)?;
                if request.recipient.is_some() {
                    counter.update(operation, |s| s.with_recipient += 1);
                }
                let response = self.generate_data_key(&caller, &request)?;
                if response.plaintext.is_some() {
                    counter.update(operation, |s| s.plaintext_responses += 1);
                }
                to_body(&response)
            }
            Operation::ReEncrypt => self.re_encrypt(&caller, &parse_request(body)?),
        }
    }

    /// `CreateKey` (also used by the library API).
    ///
    /// # Errors
    /// `MalformedPolicyDocumentException` for a bad policy,
    /// `UnsupportedOperationException` for key types the emulator lacks.
    pub fn create_key(&self, request: &CreateKeyRequest) -> Result<KeyMetadataResponse, KmsError> {
        for (what, value, allowed) in [
            ("KeyUsage", &request.key_usage, "ENCRYPT_DECRYPT"),
            ("KeySpec", &request.key_spec, SYMMETRIC_DEFAULT),
            (
                "CustomerMasterKeySpec",
                &request.customer_master_key_spec,
                SYMMETRIC_DEFAULT,
            ),
            ("Origin", &request.origin, "AWS_KMS"),
        ] {
            if let Some(value) = value
                && value != allowed
            {
                return Err(KmsError::new(
                    ErrorKind::UnsupportedOperation,
                    format!("the emulator supports only {what} {allowed}, not {value}"),
                ));
            }
        }
        if request.multi_region == Some(true) {
            return Err(KmsError::new(
                ErrorKind::UnsupportedOperation,
                "the emulator does not model multi-Region keys",
            ));
        }
        let account = self.account();
        let text = request
            .policy
            .clone()
            .unwrap_or_else(|| default_policy(&account));
        let policy = Policy::parse(&text)?;
        let description = request.description.clone().unwrap_or_default();
        if description.len() > 8192 {
            return Err(KmsError::new(
                ErrorKind::Validation,
                "Description must be at most 8192 characters",
            ));
        }
        let now = self.clock.now();
        let key = self.write().create(policy, text, description, now)?;
        Ok(KeyMetadataResponse {
            key_metadata: key.metadata(&account),
        })
    }

    /// The metadata of the key `key_id` names (no policy check; library API).
    ///
    /// # Errors
    /// `NotFoundException`.
    pub fn key_metadata(&self, key_id: &str) -> Result<KeyMetadata, KmsError> {
        let store = self.read();
        Ok(store.resolve(key_id)?.metadata(store.account()))
    }

    fn create_alias(
        &self,
        caller: &CallerContext,
        request: &CreateAliasRequest,
    ) -> Result<Vec<u8>, KmsError> {
        super::keys::check_alias_name(&request.alias_name)?;
        let mut store = self.write();
        let key = store.resolve(&request.target_key_id)?;
        caller.authorize(&key, "kms:CreateAlias", None)?;
        store.create_alias(&request.alias_name, &request.target_key_id)?;
        Ok(b"{}".to_vec())
    }

    fn describe_key(
        &self,
        caller: &CallerContext,
        request: &KeyRequest,
    ) -> Result<Vec<u8>, KmsError> {
        let key = self.read().resolve(&request.key_id)?;
        caller.authorize(&key, "kms:DescribeKey", None)?;
        to_body(&KeyMetadataResponse {
            key_metadata: key.metadata(&caller.account),
        })
    }

    fn put_key_policy(
        &self,
        caller: &CallerContext,
        request: &PutKeyPolicyRequest,
    ) -> Result<Vec<u8>, KmsError> {
        check_policy_name(request.policy_name.as_deref())?;
        let mut store = self.write();
        let key = store.resolve(&request.key_id)?;
        if request.key_id.contains("alias/") {
            return Err(not_found_alias(&request.key_id));
        }
        caller.authorize(&key, "kms:PutKeyPolicy", None)?;
        let policy = Policy::parse(&request.policy)?;
        store.set_policy(key.id, policy, request.policy.clone())?;
        Ok(b"{}".to_vec())
    }

    fn get_key_policy(
        &self,
        caller: &CallerContext,
        request: &KeyRequest,
    ) -> Result<Vec<u8>, KmsError> {
        check_policy_name(request.policy_name.as_deref())?;
        let key = self.read().resolve(&request.key_id)?;
        if request.key_id.contains("alias/") {
            return Err(not_found_alias(&request.key_id));
        }
        caller.authorize(&key, "kms:GetKeyPolicy", None)?;
        to_body(&GetKeyPolicyResponse {
            policy: key.policy_text.clone(),
            policy_name: "default",
        })
    }

    fn encrypt(
        &self,
        caller: &CallerContext,
        request: &EncryptRequest,
    ) -> Result<Vec<u8>, KmsError> {
        check_algorithm(request.encryption_algorithm.as_deref())?;
        let plaintext = &request.plaintext.0;
        if plaintext.is_empty() || plaintext.len() > MAX_PLAINTEXT {
            return Err(KmsError::new(
                ErrorKind::Validation,
                format!("Plaintext must be 1 to {MAX_PLAINTEXT} bytes"),
            ));
        }
        let context = request.encryption_context.clone().unwrap_or_default();
        let key = self.read().resolve(&request.key_id)?;
        caller.authorize_with_context(&key, "kms:Encrypt", None, &context)?;
        let blob = seal(&key, plaintext, &context)?;
        to_body(&EncryptResponse {
            ciphertext_blob: Blob(blob),
            key_id: key.arn.clone(),
            encryption_algorithm: SYMMETRIC_DEFAULT,
        })
    }

    fn decrypt(
        &self,
        caller: &CallerContext,
        request: &DecryptRequest,
    ) -> Result<DecryptResponse, KmsError> {
        check_algorithm(request.encryption_algorithm.as_deref())?;
        let context = request.encryption_context.clone().unwrap_or_default();
        let (key, plaintext) = self.open(
            &request.ciphertext_blob.0,
            request.key_id.as_deref(),
            &context,
        )?;
        let recipient = self.recipient(request.recipient.as_ref())?;
        caller.authorize_with_context(&key, "kms:Decrypt", recipient.as_ref(), &context)?;
        let (plaintext, for_recipient) = match &recipient {
            Some(r) => (None, Some(Blob(r.seal(&plaintext)?))),
            None => (Some(Blob(plaintext.to_vec())), None),
        };
        Ok(DecryptResponse {
            key_id: key.arn.clone(),
            plaintext,
            encryption_algorithm: SYMMETRIC_DEFAULT,
            ciphertext_for_recipient: for_recipient,
        })
    }

    fn generate_data_key(
        &self,
        caller: &CallerContext,
        request: &GenerateDataKeyRequest,
    ) -> Result<GenerateDataKeyResponse, KmsError> {
        let len = match (request.number_of_bytes, request.key_spec.as_deref()) {
            (Some(n), None) => usize::try_from(n)
                .ok()
                .filter(|n| (1..=MAX_DATA_KEY).contains(n))
                .ok_or_else(|| {
                    KmsError::new(
                        ErrorKind::Validation,
                        format!("NumberOfBytes must be 1 to {MAX_DATA_KEY}"),
                    )
                })?,
            (None, Some("AES_256")) => 32,
            (None, Some("AES_128")) => 16,
            (None, Some(other)) => {
                return Err(KmsError::new(
                    ErrorKind::Validation,
                    format!("KeySpec must be AES_256 or AES_128, not {other}"),
                ));
            }
            (Some(_), Some(_)) => {
                return Err(KmsError::new(
                    ErrorKind::Validation,
                    "Specify either KeySpec or NumberOfBytes, not both",
                ));
            }
            (None, None) => {
                return Err(KmsError::new(
                    ErrorKind::Validation,
                    "Specify KeySpec or NumberOfBytes",
                ));
            }
        };
        let context = request.encryption_context.clone().unwrap_or_default();
        let key = self.read().resolve(&request.key_id)?;
        let recipient = self.recipient(request.recipient.as_ref())?;
        caller.authorize_with_context(&key, "kms:GenerateDataKey", recipient.as_ref(), &context)?;

        let mut data_key = Zeroizing::new(vec![0u8; len]);
        rand::rngs::SysRng
            .try_fill_bytes(&mut data_key)
            .map_err(|_| KmsError::new(ErrorKind::Internal, "random source failed"))?;
        let blob = seal(&key, &data_key, &context)?;
        let (plaintext, for_recipient) = match &recipient {
            Some(r) => (None, Some(Blob(r.seal(&data_key)?))),
            None => (Some(Blob(data_key.to_vec())), None),
        };
        Ok(GenerateDataKeyResponse {
            ciphertext_blob: Blob(blob),
            plaintext,
            key_id: key.arn.clone(),
            ciphertext_for_recipient: for_recipient,
        })
    }

    fn re_encrypt(
        &self,
        caller: &CallerContext,
        request: &ReEncryptRequest,
    ) -> Result<Vec<u8>, KmsError> {
        check_algorithm(request.source_encryption_algorithm.as_deref())?;
        check_algorithm(request.destination_encryption_algorithm.as_deref())?;
        let source_context = request
            .source_encryption_context
            .clone()
            .unwrap_or_default();
        let destination_context = request
            .destination_encryption_context
            .clone()
            .unwrap_or_default();
        let (source, plaintext) = self.open(
            &request.ciphertext_blob.0,
            request.source_key_id.as_deref(),
            &source_context,
        )?;
        caller.authorize_with_context(&source, "kms:ReEncryptFrom", None, &source_context)?;
        let destination = self.read().resolve(&request.destination_key_id)?;
        caller.authorize_with_context(
            &destination,
            "kms:ReEncryptTo",
            None,
            &destination_context,
        )?;
        let blob = seal(&destination, &plaintext, &destination_context)?;
        to_body(&ReEncryptResponse {
            ciphertext_blob: Blob(blob),
            source_key_id: source.arn.clone(),
            key_id: destination.arn.clone(),
            source_encryption_algorithm: SYMMETRIC_DEFAULT,
            destination_encryption_algorithm: SYMMETRIC_DEFAULT,
        })
    }

    /// Finds a blob's key (checking `key_id` if given) and decrypts it.
    fn open(
        &self,
        blob: &[u8],
        key_id: Option<&str>,
        context: &EncryptionContext,
    ) -> Result<(Arc<Key>, Zeroizing<Vec<u8>>), KmsError> {
        let envelope = ciphertext::parse(blob).map_err(invalid_ciphertext)?;
        let store = self.read();
        if let Some(key_id) = key_id.filter(|_| !self.ignore_key_id.load(Ordering::SeqCst)) {
            let named = store.resolve(key_id)?;
            if named.id != envelope.key_id {
                return Err(KmsError::new(
                    ErrorKind::IncorrectKey,
                    "The key ID in the request does not identify a KMS key that can perform \
                     this operation.",
                ));
            }
        }
        let key = store
            .get(envelope.key_id)
            .ok_or_else(|| invalid_ciphertext(ciphertext::CiphertextError::Malformed))?;
        drop(store);
        let plaintext =
            ciphertext::open(&envelope, &key.material, context).map_err(invalid_ciphertext)?;
        Ok((key, plaintext))
    }

    fn recipient(
        &self,
        recipient: Option<&RecipientInfo>,
    ) -> Result<Option<AttestedRecipient>, KmsError> {
        let Some(recipient) = recipient else {
            return Ok(None);
        };
        let root = self.root.get()?;
        AttestedRecipient::verify(recipient, root, self.clock.now()).map(Some)
    }
}

/// The caller as policies see it.
struct CallerContext {
    arn: String,
    account: String,
}

impl CallerContext {
    fn new(caller: &Caller, account: &str) -> Self {
        Self {
            arn: format!("arn:aws:iam::{account}:user/{}", caller.access_key_id),
            account: account.to_owned(),
        }
    }

    fn authorize(
        &self,
        key: &Key,
        action: &str,
        recipient: Option<&AttestedRecipient>,
    ) -> Result<(), KmsError> {
        self.authorize_with_context(key, action, recipient, &EncryptionContext::new())
    }

    fn authorize_with_context(
        &self,
        key: &Key,
        action: &str,
        recipient: Option<&AttestedRecipient>,
        context: &EncryptionContext,
    ) -> Result<(), KmsError> {
        let mut ctx = RequestContext::new(action, &self.arn, &self.account, &key.arn);
        for (k, v) in context {
            ctx.set(&format!("kms:EncryptionContext:{k}"), v);
        }
        if let Some(recipient) = recipient {
            recipient.add_condition_keys(&mut ctx);
        }
        key.policy.authorize(&ctx)
    }
}

fn seal(key: &Key, plaintext: &[u8], context: &EncryptionContext) -> Result<Vec<u8>, KmsError> {
    ciphertext::seal(key.id, &key.material, plaintext, context)
        .map_err(|e| KmsError::new(ErrorKind::Internal, format!("encryption failed: {e}")))
}

fn invalid_ciphertext(_: ciphertext::CiphertextError) -> KmsError {
    // Real KMS says nothing more specific, and neither should we: the
    // reason (wrong context, tampering) is not the caller's to learn.
    KmsError::new(
        ErrorKind::InvalidCiphertext,
        "The ciphertext is invalid, or does not match the encryption context or key",
    )
}

fn check_algorithm(algorithm: Option<&str>) -> Result<(), KmsError> {
    match algorithm {
        None | Some(SYMMETRIC_DEFAULT) => Ok(()),
        Some(other) => Err(KmsError::new(
            ErrorKind::InvalidKeyUsage,
            format!("EncryptionAlgorithm {other} is not supported by symmetric keys"),
        )),
    }
}

fn check_policy_name(name: Option<&str>) -> Result<(), KmsError> {
    match name {
        None | Some("default") => Ok(()),
        Some(other) => Err(KmsError::new(
            ErrorKind::Validation,
            format!("PolicyName {other:?} is invalid: the only valid name is \"default\""),
        )),
    }
}

fn not_found_alias(key_id: &str) -> KmsError {
    KmsError::new(
        ErrorKind::NotFound,
        format!("Key policies are attached to keys, not aliases: {key_id}"),
    )
}
