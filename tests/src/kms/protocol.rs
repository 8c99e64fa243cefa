//! The KMS JSON 1.1 wire protocol: operation names (`X-Amz-Target`),
//! request and response bodies, base64 blobs, and error responses with real
//! KMS exception names and HTTP status codes.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `X-Amz-Target` prefix of every KMS operation.
pub const TARGET_PREFIX: &str = "TrentService.";
/// Content type of KMS requests and responses.
pub const CONTENT_TYPE: &str = "application/x-amz-json-1.1";

/// The KMS operations the emulator implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Operation {
    /// `CreateKey`
    CreateKey,
    /// `CreateAlias`
    CreateAlias,
    /// `DescribeKey`
    DescribeKey,
    /// `PutKeyPolicy`
    PutKeyPolicy,
    /// `GetKeyPolicy`
    GetKeyPolicy,
    /// `Encrypt`
    Encrypt,
    /// `Decrypt`
    Decrypt,
    /// `GenerateDataKey`
    GenerateDataKey,
    /// `ReEncrypt`
    ReEncrypt,
}

impl Operation {
    /// Every implemented operation.
    pub const ALL: [Operation; 9] = [
        Operation::CreateKey,
        Operation::CreateAlias,
        Operation::DescribeKey,
        Operation::PutKeyPolicy,
        Operation::GetKeyPolicy,
        Operation::Encrypt,
        Operation::Decrypt,
        Operation::GenerateDataKey,
        Operation::ReEncrypt,
    ];

    /// The operation name as it appears after `TrentService.`.
    pub fn name(self) -> &'static str {
        match self {
            Operation::CreateKey => "CreateKey",
            Operation::CreateAlias => "CreateAlias",
            Operation::DescribeKey => "DescribeKey",
            Operation::PutKeyPolicy => "PutKeyPolicy",
            Operation::GetKeyPolicy => "GetKeyPolicy",
            Operation::Encrypt => "Encrypt",
            Operation::Decrypt => "Decrypt",
            Operation::GenerateDataKey => "GenerateDataKey",
            Operation::ReEncrypt => "ReEncrypt",
        }
    }

    /// Looks an operation up by its name (`Decrypt`).
    pub fn from_name(name: &str) -> Option<Operation> {
        Operation::ALL.into_iter().find(|op| op.name() == name)
    }

    /// Parses an `X-Amz-Target` header value (`TrentService.Decrypt`).
    ///
    /// # Errors
    /// `UnknownOperationException` for any other target.
    pub fn from_target(target: &str) -> Result<Operation, KmsError> {
        target
            .strip_prefix(TARGET_PREFIX)
            .and_then(Operation::from_name)
            .ok_or_else(|| {
                KmsError::new(
                    ErrorKind::UnknownOperation,
                    format!("operation {target:?} is not supported by the emulator"),
                )
            })
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// KMS exception types the emulator returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// `NotFoundException`: the key or alias does not exist.
    NotFound,
    /// `AlreadyExistsException`: the alias exists.
    AlreadyExists,
    /// `AccessDeniedException`: the key policy does not allow the call.
    AccessDenied,
    /// `InvalidCiphertextException`: the blob or its encryption context is wrong.
    InvalidCiphertext,
    /// `IncorrectKeyException`: `KeyId` does not match the ciphertext's key.
    IncorrectKey,
    /// `InvalidAliasNameException`: a malformed or reserved alias name.
    InvalidAliasName,
    /// `InvalidKeyUsageException`: the key cannot do this.
    InvalidKeyUsage,
    /// `ValidationException`: a parameter is out of range or missing.
    Validation,
    /// `SerializationException`: the body is not the expected JSON.
    Serialization,
    /// `MalformedPolicyDocumentException`: the policy cannot be parsed.
    MalformedPolicyDocument,
    /// `UnsupportedOperationException`: a valid request the emulator does not model.
    UnsupportedOperation,
    /// `UnknownOperationException`: the `X-Amz-Target` names no operation.
    UnknownOperation,
    /// `ThrottlingException`: request rate exceeded (injected).
    Throttling,
    /// `KMSInternalException`: server-side failure (HTTP 500).
    Internal,
    /// `UnrecognizedClientException`: unknown access key or session token.
    UnrecognizedClient,
    /// `InvalidSignatureException`: the SigV4 signature does not match.
    InvalidSignature,
    /// `IncompleteSignatureException`: the Authorization header is malformed.
    IncompleteSignature,
    /// `MissingAuthenticationTokenException`: no Authorization header.
    MissingAuthenticationToken,
    /// `ExpiredTokenException`: the session token has expired.
    ExpiredToken,
}

impl ErrorKind {
    /// The `__type` name real KMS uses.
    pub fn type_name(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "NotFoundException",
            ErrorKind::AlreadyExists => "AlreadyExistsException",
            ErrorKind::AccessDenied => "AccessDeniedException",
            ErrorKind::InvalidCiphertext => "InvalidCiphertextException",
            ErrorKind::IncorrectKey => "IncorrectKeyException",
            ErrorKind::InvalidAliasName => "InvalidAliasNameException",
            ErrorKind::InvalidKeyUsage => "InvalidKeyUsageException",
            ErrorKind::Validation => "ValidationException",
            ErrorKind::Serialization => "SerializationException",
            ErrorKind::MalformedPolicyDocument => "MalformedPolicyDocumentException",
            ErrorKind::UnsupportedOperation => "UnsupportedOperationException",
            ErrorKind::UnknownOperation => "UnknownOperationException",
            ErrorKind::Throttling => "ThrottlingException",
            ErrorKind::Internal => "KMSInternalException",
            ErrorKind::UnrecognizedClient => "UnrecognizedClientException",
            ErrorKind::InvalidSignature => "InvalidSignatureException",
            ErrorKind::IncompleteSignature => "IncompleteSignatureException",
            ErrorKind::MissingAuthenticationToken => "MissingAuthenticationTokenException",
            ErrorKind::ExpiredToken => "ExpiredTokenException",
        }
    }

    /// The HTTP status real KMS answers with: 500 for `KMSInternalException`,
    /// 400 for every other error of the JSON protocol.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::Internal => 500,
            _ => 400,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.type_name())
    }
}

/// A KMS error response: exception type plus message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct KmsError {
    /// The exception type.
    pub kind: ErrorKind,
    /// The human-readable message (never secret material).
    pub message: String,
}

impl KmsError {
    /// Builds an error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// The JSON body: `{"__type": "...", "message": "..."}`.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::json!({ "__type": self.kind.type_name(), "message": self.message })
            .to_string()
            .into_bytes()
    }
}

/// Encryption context: a string map, compared canonically (sorted keys).
pub type EncryptionContext = BTreeMap<String, String>;

/// Bytes carried as base64 in JSON.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Blob(pub Vec<u8>);

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Blobs may be plaintext: print only their size.
        write!(f, "Blob({} bytes)", self.0.len())
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        B64.decode(text.as_bytes())
            .map(Blob)
            .map_err(|e| serde::de::Error::custom(format!("invalid base64 blob: {e}")))
    }
}

/// The `Recipient` parameter of `Decrypt` and `GenerateDataKey`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RecipientInfo {
    /// Must be `RSAES_OAEP_SHA_256`.
    pub key_encryption_algorithm: Option<String>,
    /// The COSE_Sign1 attestation document.
    pub attestation_document: Option<Blob>,
}

/// `CreateKey` request.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateKeyRequest {
    /// Key policy (JSON text); the account default if absent.
    pub policy: Option<String>,
    /// Free-form description.
    pub description: Option<String>,
    /// `ENCRYPT_DECRYPT` (the only supported usage).
    pub key_usage: Option<String>,
    /// `SYMMETRIC_DEFAULT` (the only supported spec).
    pub key_spec: Option<String>,
    /// Deprecated alias of `KeySpec`.
    pub customer_master_key_spec: Option<String>,
    /// `AWS_KMS` (the only supported origin).
    pub origin: Option<String>,
    /// Multi-Region keys are not modelled.
    pub multi_region: Option<bool>,
}

/// `CreateAlias` request.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateAliasRequest {
    /// `alias/...`
    pub alias_name: String,
    /// Key id or key ARN.
    pub target_key_id: String,
}

/// A request that names one key (`DescribeKey`, `GetKeyPolicy`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct KeyRequest {
    /// Key id, key ARN, alias name or alias ARN.
    pub key_id: String,
    /// Policy name (only `default` exists).
    pub policy_name: Option<String>,
}

/// `PutKeyPolicy` request.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PutKeyPolicyRequest {
    /// Key id or ARN.
    pub key_id: String,
    /// Only `default` exists.
    pub policy_name: Option<String>,
    /// The policy document (JSON text).
    pub policy: String,
}

/// `Encrypt` request.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EncryptRequest {
    /// Key id, ARN or alias.
    pub key_id: String,
    /// 1 to 4096 bytes.
    pub plaintext: Blob,
    /// Bound to the ciphertext.
    pub encryption_context: Option<EncryptionContext>,
    /// `SYMMETRIC_DEFAULT` if present.
    pub encryption_algorithm: Option<String>,
}

/// `Decrypt` request.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DecryptRequest {
    /// A blob from `Encrypt`, `GenerateDataKey` or `ReEncrypt`.
    pub ciphertext_blob: Blob,
    /// Must equal the context used to encrypt.
    pub encryption_context: Option<EncryptionContext>,
    /// Optional; must name the ciphertext's key.
    pub key_id: Option<String>,
    /// `SYMMETRIC_DEFAULT` if present.
    pub encryption_algorithm: Option<String>,
    /// Attested recipient: answer with `CiphertextForRecipient`.
    pub recipient: Option<RecipientInfo>,
}

/// `GenerateDataKey` request.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct GenerateDataKeyRequest {
    /// Key id, ARN or alias.
    pub key_id: String,
    /// Bound to the wrapped data key.
    pub encryption_context: Option<EncryptionContext>,
    /// 1 to 1024.
    pub number_of_bytes: Option<i64>,
    /// `AES_256` or `AES_128`.
    pub key_spec: Option<String>,
    /// Attested recipient: answer with `CiphertextForRecipient`.
    pub recipient: Option<RecipientInfo>,
}

/// `ReEncrypt` request.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ReEncryptRequest {
    /// The blob to re-encrypt.
    pub ciphertext_blob: Blob,
    /// Context the blob was encrypted with.
    pub source_encryption_context: Option<EncryptionContext>,
    /// Optional; must name the blob's key.
    pub source_key_id: Option<String>,
    /// The key to re-encrypt under.
    pub destination_key_id: String,
    /// Context for the new blob.
    pub destination_encryption_context: Option<EncryptionContext>,
    /// `SYMMETRIC_DEFAULT` if present.
    pub source_encryption_algorithm: Option<String>,
    /// `SYMMETRIC_DEFAULT` if present.
    pub destination_encryption_algorithm: Option<String>,
}

/// Key metadata as `CreateKey` and `DescribeKey` return it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct KeyMetadata {
    /// Account that owns the key.
    #[serde(rename = "AWSAccountId")]
    pub aws_account_id: String,
    /// The UUID.
    pub key_id: String,
    /// `arn:aws:kms:<region>:<account>:key/<id>`.
    pub arn: String,
    /// Seconds since the epoch.
    pub creation_date: f64,
    /// Always true.
    pub enabled: bool,
    /// Free-form description.
    pub description: String,
    /// `ENCRYPT_DECRYPT`.
    pub key_usage: &'static str,
    /// `Enabled`.
    pub key_state: &'static str,
    /// `AWS_KMS`.
    pub origin: &'static str,
    /// `CUSTOMER`.
    pub key_manager: &'static str,
    /// `SYMMETRIC_DEFAULT`.
    pub customer_master_key_spec: &'static str,
    /// `SYMMETRIC_DEFAULT`.
    pub key_spec: &'static str,
    /// `["SYMMETRIC_DEFAULT"]`.
    pub encryption_algorithms: Vec<&'static str>,
    /// Always false.
    pub multi_region: bool,
}

/// `CreateKey` / `DescribeKey` response.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct KeyMetadataResponse {
    /// The key's metadata.
    pub key_metadata: KeyMetadata,
}

/// `GetKeyPolicy` response.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct GetKeyPolicyResponse {
    /// The policy document.
    pub policy: String,
    /// `default`.
    pub policy_name: &'static str,
}

/// `Encrypt` response.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct EncryptResponse {
    /// The new blob.
    pub ciphertext_blob: Blob,
    /// Key ARN.
    pub key_id: String,
    /// `SYMMETRIC_DEFAULT`.
    pub encryption_algorithm: &'static str,
}

/// `Decrypt` response.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct DecryptResponse {
    /// Key ARN.
    pub key_id: String,
    /// Absent when a `Recipient` was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plaintext: Option<Blob>,
    /// `SYMMETRIC_DEFAULT`.
    pub encryption_algorithm: &'static str,
    /// CMS EnvelopedData for the attested recipient.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ciphertext_for_recipient: Option<Blob>,
}

/// `GenerateDataKey` response.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct GenerateDataKeyResponse {
    /// The data key wrapped under the KMS key.
    pub ciphertext_blob: Blob,
    /// Absent when a `Recipient` was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plaintext: Option<Blob>,
    /// Key ARN.
    pub key_id: String,
    /// CMS EnvelopedData for the attested recipient.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ciphertext_for_recipient: Option<Blob>,
}

/// `ReEncrypt` response.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ReEncryptResponse {
    /// The new blob.
    pub ciphertext_blob: Blob,
    /// Source key ARN.
    pub source_key_id: String,
    /// Destination key ARN.
    pub key_id: String,
    /// `SYMMETRIC_DEFAULT`.
    pub source_encryption_algorithm: &'static str,
    /// `SYMMETRIC_DEFAULT`.
    pub destination_encryption_algorithm: &'static str,
}

/// Deserialises a request body, mapping JSON errors to
/// `SerializationException` like real KMS.
///
/// # Errors
/// `SerializationException` when the body is not the expected JSON shape.
pub fn parse_request<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, KmsError> {
    let body = if body.is_empty() {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| {
        KmsError::new(
            ErrorKind::Serialization,
            format!("could not parse request body: {e}"),
        )
    })
}

/// Serialises a response body.
///
/// # Errors
/// `KMSInternalException` if serialisation fails (it cannot for these types).
pub fn to_body<T: Serialize>(response: &T) -> Result<Vec<u8>, KmsError> {
    serde_json::to_vec(response)
        .map_err(|e| KmsError::new(ErrorKind::Internal, format!("response encoding: {e}")))
}
