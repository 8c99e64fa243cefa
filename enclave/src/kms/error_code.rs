//! The `__type` of a KMS error answer, as a type: decisions (retry, new
//! credentials, new recipient pair, revocation wipe) match on variants, not
//! on strings.

use std::fmt;

/// Longest unknown code kept verbatim; KMS's own are under 40 characters.
const MAX_OTHER_LEN: usize = 64;

/// What KMS said went wrong, from its `__type`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KmsErrorCode {
    /// The key policy (or an IAM policy) does not allow the call.
    AccessDenied,
    /// The key is disabled.
    Disabled,
    /// The key is pending deletion or import, or otherwise unusable.
    InvalidState,
    /// The key (or alias) does not exist.
    NotFound,
    /// The ciphertext was not made under this key or encryption context.
    InvalidCiphertext,
    /// The ciphertext names another key than the `KeyId` given.
    IncorrectKey,
    /// A parameter is invalid (KMS also says this of a stale attestation
    /// document).
    Validation,
    /// The request is not valid for the key's state or spec.
    InvalidRequest,
    /// Too many requests.
    Throttling,
    /// KMS failed internally.
    Internal,
    /// A dependency of KMS timed out.
    DependencyTimeout,
    /// The access key id is unknown.
    UnrecognizedClient,
    /// The SigV4 signature does not match.
    InvalidSignature,
    /// The session token has expired.
    ExpiredToken,
    /// Any other code, kept (bounded) for messages.
    Other(String),
    /// The answer carried no code at all.
    Missing {
        /// The HTTP status it came with.
        status: u16,
    },
}

impl KmsErrorCode {
    /// Reads KMS's `__type` (as the SDK reports it; a `prefix#` form is
    /// accepted too).
    pub fn parse(code: Option<&str>, status: u16) -> Self {
        let Some(code) = code.filter(|c| !c.is_empty()) else {
            return KmsErrorCode::Missing { status };
        };
        let name = code.rsplit('#').next().unwrap_or(code);
        match name {
            "AccessDeniedException" => KmsErrorCode::AccessDenied,
            "DisabledException" => KmsErrorCode::Disabled,
            "KMSInvalidStateException" => KmsErrorCode::InvalidState,
            "NotFoundException" => KmsErrorCode::NotFound,
            "InvalidCiphertextException" => KmsErrorCode::InvalidCiphertext,
            "IncorrectKeyException" => KmsErrorCode::IncorrectKey,
            "ValidationException" | "InvalidParameterValue" => KmsErrorCode::Validation,
            "InvalidRequestException" => KmsErrorCode::InvalidRequest,
            "ThrottlingException" => KmsErrorCode::Throttling,
            "KMSInternalException"
            | "InternalFailure"
            | "ServiceUnavailable"
            | "ServiceUnavailableException" => KmsErrorCode::Internal,
            "DependencyTimeoutException" | "RequestTimeout" | "RequestTimeoutException" => {
                KmsErrorCode::DependencyTimeout
            }
            "UnrecognizedClientException" => KmsErrorCode::UnrecognizedClient,
            "InvalidSignatureException" => KmsErrorCode::InvalidSignature,
            "ExpiredTokenException" => KmsErrorCode::ExpiredToken,
            other => KmsErrorCode::Other(other.chars().take(MAX_OTHER_LEN).collect()),
        }
    }

    /// KMS's name for it (for `Missing`, a description).
    pub fn as_str(&self) -> &str {
        match self {
            KmsErrorCode::AccessDenied => "AccessDeniedException",
            KmsErrorCode::Disabled => "DisabledException",
            KmsErrorCode::InvalidState => "KMSInvalidStateException",
            KmsErrorCode::NotFound => "NotFoundException",
            KmsErrorCode::InvalidCiphertext => "InvalidCiphertextException",
            KmsErrorCode::IncorrectKey => "IncorrectKeyException",
            KmsErrorCode::Validation => "ValidationException",
            KmsErrorCode::InvalidRequest => "InvalidRequestException",
            KmsErrorCode::Throttling => "ThrottlingException",
            KmsErrorCode::Internal => "KMSInternalException",
            KmsErrorCode::DependencyTimeout => "DependencyTimeoutException",
            KmsErrorCode::UnrecognizedClient => "UnrecognizedClientException",
            KmsErrorCode::InvalidSignature => "InvalidSignatureException",
            KmsErrorCode::ExpiredToken => "ExpiredTokenException",
            KmsErrorCode::Other(code) => code,
            KmsErrorCode::Missing { .. } => "(no error code)",
        }
    }

    /// Whether the same call can succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            KmsErrorCode::Throttling | KmsErrorCode::Internal | KmsErrorCode::DependencyTimeout
        )
    }

    /// Whether KMS refused the credentials themselves.
    pub fn is_credentials_rejection(&self) -> bool {
        matches!(
            self,
            KmsErrorCode::UnrecognizedClient
                | KmsErrorCode::InvalidSignature
                | KmsErrorCode::ExpiredToken
        )
    }

    /// Whether KMS says this enclave may no longer use the key: the policy
    /// refuses it, or the key is disabled, unusable or gone.
    pub fn is_revocation(&self) -> bool {
        matches!(
            self,
            KmsErrorCode::AccessDenied
                | KmsErrorCode::Disabled
                | KmsErrorCode::InvalidState
                | KmsErrorCode::NotFound
        )
    }
}

impl fmt::Display for KmsErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KmsErrorCode::Missing { status } => write!(f, "(no error code; HTTP {status})"),
            other => f.write_str(other.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_codes_round_trip_and_unknown_ones_are_bounded() {
        for code in [
            "AccessDeniedException",
            "DisabledException",
            "KMSInvalidStateException",
            "NotFoundException",
            "InvalidCiphertextException",
            "ThrottlingException",
            "UnrecognizedClientException",
            "ExpiredTokenException",
        ] {
            let parsed = KmsErrorCode::parse(Some(code), 400);
            assert!(!matches!(parsed, KmsErrorCode::Other(_)), "{code}");
            assert_eq!(parsed.as_str(), code);
        }
        assert_eq!(
            KmsErrorCode::parse(Some("com.amazonaws.kms#NotFoundException"), 400),
            KmsErrorCode::NotFound
        );
        let long = "X".repeat(10_000);
        match KmsErrorCode::parse(Some(&long), 400) {
            KmsErrorCode::Other(kept) => assert_eq!(kept.len(), MAX_OTHER_LEN),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            KmsErrorCode::parse(None, 502).to_string(),
            "(no error code; HTTP 502)"
        );
        assert_eq!(
            KmsErrorCode::parse(Some(""), 500),
            KmsErrorCode::Missing { status: 500 }
        );
    }

    #[test]
    fn classes_do_not_overlap() {
        assert!(KmsErrorCode::AccessDenied.is_revocation());
        assert!(!KmsErrorCode::AccessDenied.is_transient());
        assert!(KmsErrorCode::Throttling.is_transient());
        assert!(!KmsErrorCode::Throttling.is_revocation());
        assert!(KmsErrorCode::ExpiredToken.is_credentials_rejection());
        assert!(!KmsErrorCode::InvalidCiphertext.is_revocation());
    }
}
