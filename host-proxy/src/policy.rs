//! KMS key policies that let only a measured enclave decrypt.
//!
//! `nitro-cli build-enclave` prints the EIF's measurements; this module turns
//! them into a key policy whose decrypt statement holds only when KMS sees an
//! attestation document with those PCRs (`kms:RecipientAttestation:*`).
//! A caller without a document — the parent instance itself — fails the
//! condition, so the plaintext can only ever reach the enclave.
//!
//! The policy has no "Enable IAM policies" statement for the account root:
//! with one, any IAM policy could grant `kms:Decrypt` without attestation.
//! The administrators' actions are listed one by one, without
//! `kms:CreateGrant`: a grant authorizes `Decrypt` without the key policy's
//! attestation conditions. And explicit denies, for every principal, back
//! the allow up (an explicit deny in the key policy beats any allow, from a
//! grant or an IAM policy added later):
//! - `kms:Decrypt` without an attestation document (`Null` on
//!   `kms:RecipientAttestation:ImageSha384`);
//! - `kms:Decrypt` with a document of another image, or other pinned PCRs
//!   (`StringNotEqualsIgnoreCase` over every allowed release; a negated
//!   operator also holds when the key is absent);
//! - `kms:ReEncryptFrom` (it would move a value to a key without these
//!   conditions and decrypt it there) and `kms:CreateGrant`.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use sha2::{Digest, Sha384};

/// Length of a SHA-384 PCR in hex.
const PCR_HEX_LEN: usize = 96;

/// PCRs a policy may pin besides PCR0 (which is `ImageSha384`).
pub const PINNABLE_PCRS: [u8; 4] = [1, 2, 3, 8];

/// Administration actions, listed one by one (a wildcard such as
/// `kms:Create*` would include `kms:CreateGrant`). Never `kms:CreateGrant`
/// (a grant bypasses the attestation conditions), nor `kms:ReplicateKey` /
/// `kms:UpdatePrimaryRegion` (a replica of a multi-Region key decrypts the
/// same ciphertexts under a policy of its own), nor any use of the key.
pub const ADMIN_ACTIONS: [&str; 23] = [
    "kms:DescribeKey",
    "kms:GetKeyPolicy",
    "kms:PutKeyPolicy",
    "kms:ListKeyPolicies",
    "kms:GetKeyRotationStatus",
    "kms:ListKeyRotations",
    "kms:EnableKeyRotation",
    "kms:DisableKeyRotation",
    "kms:RotateKeyOnDemand",
    "kms:EnableKey",
    "kms:DisableKey",
    "kms:UpdateKeyDescription",
    "kms:CreateAlias",
    "kms:UpdateAlias",
    "kms:DeleteAlias",
    "kms:ListAliases",
    "kms:ListResourceTags",
    "kms:TagResource",
    "kms:UntagResource",
    "kms:ListGrants",
    "kms:RevokeGrant",
    "kms:ScheduleKeyDeletion",
    "kms:CancelKeyDeletion",
];

/// Condition key of PCR0 (the enclave image).
const IMAGE_SHA384: &str = "kms:RecipientAttestation:ImageSha384";

/// Global condition key: the caller's principal ARN (for a role session,
/// the role's ARN).
const PRINCIPAL_ARN: &str = "aws:PrincipalArn";

/// What a rotation principal (`--rotator`) may do without attestation:
/// unwrap a file's data key and `kms` values (`decrypt`, `edit`, `rotate`),
/// move `kms` values to another key (`rotate --key-id`), and make new data
/// keys and values.
pub const ROTATOR_ACTIONS: [&str; 6] = [
    "kms:Decrypt",
    "kms:ReEncryptFrom",
    "kms:ReEncryptTo",
    "kms:GenerateDataKey",
    "kms:Encrypt",
    "kms:DescribeKey",
];

/// Actions no principal may take on the key, whatever else allows them.
const DENIED_ACTIONS: [&str; 2] = ["kms:ReEncryptFrom", "kms:CreateGrant"];

/// Why a policy could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The measurements file is not JSON of a known shape.
    #[error("measurements: {0}")]
    Measurements(String),
    /// A PCR value is not 96 hex digits.
    #[error("measurements: PCR{index} is not 96 hex digits")]
    BadPcr {
        /// Which PCR.
        index: u8,
    },
    /// PCR0/1/2 are all zero: a debug-mode enclave, which anyone can run.
    #[error(
        "measurements are all zero (PCR0, PCR1, PCR2): that is a --debug-mode enclave, whose \
         console is readable and which any EIF can impersonate; refusing without --allow-debug"
    )]
    DebugMeasurements,
    /// A PCR was asked for that the measurements do not have.
    #[error(
        "PCR{index} was requested but the measurements file has none (PCR8 needs a signed EIF)"
    )]
    MissingPcr {
        /// Which PCR.
        index: u8,
    },
    /// A PCR that cannot be pinned.
    #[error("PCR{0} cannot be pinned; choose from 1, 2, 3, 8 (PCR0 is always pinned)")]
    UnpinnablePcr(u8),
    /// A principal that is not an ARN.
    #[error("`{0}` is not an ARN (expected arn:PARTITION:iam::ACCOUNT:role/NAME or similar)")]
    BadPrincipal(String),
    /// A rotation principal that is also an enclave role: the parent
    /// instance could then decrypt without attestation.
    #[error(
        "`{0}` is both an enclave role and a rotator; the parent instance would get plaintext \
         without attestation. Use a separate role for rotation"
    )]
    RotatorIsEnclaveRole(String),
    /// A required principal list is empty.
    #[error("at least one {0} is required")]
    MissingPrincipal(&'static str),
}

/// The PCRs of one EIF build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measurements {
    pcrs: BTreeMap<u8, String>,
}

impl Measurements {
    /// Reads `nitro-cli build-enclave`/`describe-eif` output
    /// (`{"Measurements": {"PCR0": ...}}`) or a bare `{"PCR0": ...}` map.
    pub fn from_json(text: &str) -> Result<Self, PolicyError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| PolicyError::Measurements(format!("not JSON: {e}")))?;
        let map = value
            .get("Measurements")
            .unwrap_or(&value)
            .as_object()
            .ok_or_else(|| PolicyError::Measurements("expected a JSON object".into()))?;
        let mut pcrs = BTreeMap::new();
        for (key, value) in map {
            let Some(index) = key.strip_prefix("PCR").and_then(|i| i.parse::<u8>().ok()) else {
                continue; // e.g. "HashAlgorithm"
            };
            let hex = value.as_str().ok_or(PolicyError::BadPcr { index })?;
            pcrs.insert(index, normalise_pcr(index, hex)?);
        }
        for index in [0, 1, 2] {
            if !pcrs.contains_key(&index) {
                return Err(PolicyError::Measurements(format!("no PCR{index}")));
            }
        }
        Ok(Self { pcrs })
    }

    /// A PCR value in lower-case hex.
    pub fn pcr(&self, index: u8) -> Option<&str> {
        self.pcrs.get(&index).map(String::as_str)
    }

    /// Whether PCR0, PCR1 and PCR2 are all zero (a debug-mode enclave).
    pub fn is_debug(&self) -> bool {
        [0, 1, 2]
            .iter()
            .all(|i| self.pcr(*i).is_some_and(|v| v.bytes().all(|b| b == b'0')))
    }

    /// Adds PCR3, the hash of the parent instance's IAM role ARN, computed
    /// as the NSM extends it: SHA-384(48 zero bytes || ARN).
    pub fn with_parent_role(mut self, role_arn: &str) -> Result<Self, PolicyError> {
        check_arn(role_arn)?;
        let mut hash = Sha384::new();
        hash.update([0u8; 48]);
        hash.update(role_arn.as_bytes());
        self.pcrs.insert(3, hex::encode(hash.finalize()));
        Ok(self)
    }
}

fn normalise_pcr(index: u8, hex: &str) -> Result<String, PolicyError> {
    if hex.len() != PCR_HEX_LEN || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(PolicyError::BadPcr { index });
    }
    Ok(hex.to_ascii_lowercase())
}

fn check_arn(arn: &str) -> Result<(), PolicyError> {
    let parts: Vec<&str> = arn.split(':').collect();
    let ok = parts.len() >= 6
        && parts.first() == Some(&"arn")
        && parts.get(1).is_some_and(|p| p.starts_with("aws"))
        && parts.get(5).is_some_and(|r| !r.is_empty());
    if ok {
        Ok(())
    } else {
        Err(PolicyError::BadPrincipal(arn.chars().take(128).collect()))
    }
}

/// Everything a key policy is made from.
#[derive(Debug, Clone, Default)]
pub struct PolicySpec {
    /// Measurements of the release being deployed.
    pub current: Option<Measurements>,
    /// Releases still allowed during a rolling deploy.
    pub also: Vec<Measurements>,
    /// Roles whose enclaves may decrypt (the parent instance's role).
    pub enclave_principals: Vec<String>,
    /// Who administers the key (never allowed to use it).
    pub admin_principals: Vec<String>,
    /// Operators allowed to `Encrypt` secrets files.
    pub encrypt_principals: Vec<String>,
    /// Rotation principals (`--rotator`, opt-in): may `Decrypt` and
    /// `ReEncrypt` without attestation, for `rotate`, `decrypt` and `edit`.
    /// Empty: nobody off the enclave ever gets plaintext.
    pub rotator_principals: Vec<String>,
    /// PCRs pinned besides PCR0 (from [`PINNABLE_PCRS`]).
    pub extra_pcrs: Vec<u8>,
    /// Accept all-zero (debug-mode) measurements.
    pub allow_debug: bool,
}

/// Builds the key policy document.
pub fn key_policy(spec: &PolicySpec) -> Result<Value, PolicyError> {
    let current = spec
        .current
        .as_ref()
        .ok_or(PolicyError::Measurements("no measurements given".into()))?;
    if spec.enclave_principals.is_empty() {
        return Err(PolicyError::MissingPrincipal(
            "enclave role (--enclave-role)",
        ));
    }
    if spec.admin_principals.is_empty() {
        return Err(PolicyError::MissingPrincipal("key administrator (--admin)"));
    }
    for arn in spec
        .enclave_principals
        .iter()
        .chain(&spec.admin_principals)
        .chain(&spec.encrypt_principals)
        .chain(&spec.rotator_principals)
    {
        check_arn(arn)?;
    }
    if let Some(both) = spec
        .rotator_principals
        .iter()
        .find(|r| spec.enclave_principals.contains(r))
    {
        return Err(PolicyError::RotatorIsEnclaveRole(both.clone()));
    }
    for index in &spec.extra_pcrs {
        if !PINNABLE_PCRS.contains(index) {
            return Err(PolicyError::UnpinnablePcr(*index));
        }
    }

    let mut statements = vec![json!({
        "Sid": "KeyAdministration",
        "Effect": "Allow",
        "Principal": {"AWS": spec.admin_principals},
        "Action": ADMIN_ACTIONS,
        "Resource": "*",
    })];
    if !spec.encrypt_principals.is_empty() {
        statements.push(json!({
            "Sid": "OperatorsEncrypt",
            "Effect": "Allow",
            "Principal": {"AWS": spec.encrypt_principals},
            // GenerateDataKey: `encrypt --file-key` asks for one data key
            // per file (the operator sees its plaintext, as it sees values).
            "Action": ["kms:Encrypt", "kms:GenerateDataKey", "kms:DescribeKey"],
            "Resource": "*",
        }));
    }
    if !spec.rotator_principals.is_empty() {
        statements.push(json!({
            "Sid": "RotatorsDecryptAndReEncrypt",
            "Effect": "Allow",
            "Principal": {"AWS": spec.rotator_principals},
            "Action": ROTATOR_ACTIONS,
            "Resource": "*",
        }));
    }
    // Every value each pinned condition key may take, over all releases:
    // the denies below refuse any other.
    let mut allowed_values: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (n, measurements) in std::iter::once(current).chain(&spec.also).enumerate() {
        if measurements.is_debug() && !spec.allow_debug {
            return Err(PolicyError::DebugMeasurements);
        }
        let mut condition = serde_json::Map::new();
        let pcr0 = measurements
            .pcr(0)
            .ok_or(PolicyError::MissingPcr { index: 0 })?;
        condition.insert(IMAGE_SHA384.into(), Value::from(pcr0));
        for index in &spec.extra_pcrs {
            let value = measurements
                .pcr(*index)
                .ok_or(PolicyError::MissingPcr { index: *index })?;
            condition.insert(
                format!("kms:RecipientAttestation:PCR{index}"),
                Value::from(value),
            );
        }
        for (key, value) in &condition {
            let values = allowed_values.entry(key.clone()).or_default();
            if let Some(value) = value.as_str()
                && !values.iter().any(|v| v == value)
            {
                values.push(value.to_owned());
            }
        }
        let sid = if n == 0 {
            "EnclaveDecrypt".to_owned()
        } else {
            format!("EnclaveDecryptPrevious{n}")
        };
        statements.push(json!({
            "Sid": sid,
            "Effect": "Allow",
            "Principal": {"AWS": spec.enclave_principals},
            "Action": ["kms:Decrypt", "kms:GenerateDataKey"],
            "Resource": "*",
            "Condition": {"StringEqualsIgnoreCase": condition},
        }));
    }
    statements.push(with_exemption(
        json!({
            "Sid": "DenyDecryptWithoutAttestation",
            "Effect": "Deny",
            "Principal": {"AWS": "*"},
            "Action": "kms:Decrypt",
            "Resource": "*",
            "Condition": {"Null": {IMAGE_SHA384: "true"}},
        }),
        &spec.rotator_principals,
    ));
    // One statement per key: a deny's conditions are ANDed, and each
    // mismatch on its own must deny.
    for (key, values) in &allowed_values {
        let what = key.rsplit(':').next().unwrap_or(key);
        statements.push(with_exemption(
            json!({
                "Sid": format!("DenyDecryptUnless{what}"),
                "Effect": "Deny",
                "Principal": {"AWS": "*"},
                "Action": "kms:Decrypt",
                "Resource": "*",
                "Condition": {"StringNotEqualsIgnoreCase": {key.as_str(): values}},
            }),
            &spec.rotator_principals,
        ));
    }
    if spec.rotator_principals.is_empty() {
        statements.push(json!({
            "Sid": "DenyReEncryptFromAndGrants",
            "Effect": "Deny",
            "Principal": {"AWS": "*"},
            "Action": DENIED_ACTIONS,
            "Resource": "*",
        }));
    } else {
        // Grants stay denied to everyone; ReEncrypt out of the key only to
        // whoever is not a rotator.
        statements.push(with_exemption(
            json!({
                "Sid": "DenyReEncryptFrom",
                "Effect": "Deny",
                "Principal": {"AWS": "*"},
                "Action": "kms:ReEncryptFrom",
                "Resource": "*",
            }),
            &spec.rotator_principals,
        ));
        statements.push(json!({
            "Sid": "DenyGrants",
            "Effect": "Deny",
            "Principal": {"AWS": "*"},
            "Action": "kms:CreateGrant",
            "Resource": "*",
        }));
    }
    Ok(json!({"Version": "2012-10-17", "Statement": statements}))
}

/// A deny statement that no longer applies to `exempt` principals: an
/// `ArnNotEquals` on `aws:PrincipalArn` beside its other conditions (a
/// statement's conditions are ANDed, so it denies exactly as before to
/// everyone else). Unchanged when `exempt` is empty.
fn with_exemption(mut statement: Value, exempt: &[String]) -> Value {
    if exempt.is_empty() {
        return statement;
    }
    if let Some(object) = statement.as_object_mut() {
        let condition = object
            .entry("Condition")
            .or_insert_with(|| Value::Object(serde_json::Map::new()));
        if let Some(condition) = condition.as_object_mut() {
            condition.insert("ArnNotEquals".into(), json!({PRINCIPAL_ARN: exempt}));
        }
    }
    statement
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pcr(c: char) -> String {
        std::iter::repeat_n(c, PCR_HEX_LEN).collect()
    }

    fn build_output(p0: &str, p8: Option<&str>) -> String {
        let mut m = json!({
            "HashAlgorithm": "Sha384 { ... }",
            "PCR0": p0, "PCR1": pcr('b'), "PCR2": pcr('c'),
        });
        if let Some(p8) = p8 {
            m["PCR8"] = Value::from(p8);
        }
        json!({"Measurements": m}).to_string()
    }

    fn spec(current: &str) -> PolicySpec {
        PolicySpec {
            current: Some(Measurements::from_json(current).unwrap()),
            enclave_principals: vec!["arn:aws:iam::111122223333:role/parent".into()],
            admin_principals: vec!["arn:aws:iam::111122223333:role/admin".into()],
            ..Default::default()
        }
    }

    fn decrypt_statements(policy: &Value) -> Vec<&Value> {
        policy["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| {
                s["Effect"] == "Allow"
                    && s["Action"]
                        .as_array()
                        .unwrap()
                        .contains(&json!("kms:Decrypt"))
            })
            .collect()
    }

    fn statement<'a>(policy: &'a Value, sid: &str) -> &'a Value {
        policy["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["Sid"] == sid)
            .unwrap_or_else(|| panic!("no statement {sid}: {policy:#}"))
    }

    #[test]
    fn no_grants_explicit_admin_actions_and_the_denies() {
        let mut s = spec(&build_output(&pcr('A'), None));
        s.also = vec![Measurements::from_json(&build_output(&pcr('f'), None)).unwrap()];
        s.extra_pcrs = vec![1];
        let policy = key_policy(&s).unwrap();
        let text = policy.to_string();
        // CreateGrant appears only in the deny; no action wildcard anywhere.
        for st in policy["Statement"].as_array().unwrap() {
            let actions: Vec<&str> = match &st["Action"] {
                Value::String(a) => vec![a.as_str()],
                Value::Array(list) => list.iter().map(|a| a.as_str().unwrap()).collect(),
                other => panic!("{other}"),
            };
            assert!(!actions.iter().any(|a| a.contains('*')), "{st}");
            if st["Effect"] == "Allow" {
                assert!(!actions.contains(&"kms:CreateGrant"), "{st}");
                assert!(!actions.contains(&"kms:ReEncryptFrom"), "{st}");
            }
        }
        assert_eq!(text.matches("kms:CreateGrant").count(), 1, "{text}");
        let admin = statement(&policy, "KeyAdministration");
        assert!(
            admin["Action"]
                .as_array()
                .unwrap()
                .contains(&json!("kms:PutKeyPolicy"))
        );
        // Without a document: denied for everyone.
        let null = statement(&policy, "DenyDecryptWithoutAttestation");
        assert_eq!(null["Principal"]["AWS"], "*");
        assert_eq!(null["Condition"]["Null"][IMAGE_SHA384], "true");
        // Another image or another PCR1: denied, one statement per key,
        // listing every allowed release.
        let image = statement(&policy, "DenyDecryptUnlessImageSha384");
        assert_eq!(
            image["Condition"]["StringNotEqualsIgnoreCase"][IMAGE_SHA384],
            json!([pcr('a'), pcr('f')])
        );
        let pcr1 = statement(&policy, "DenyDecryptUnlessPCR1");
        assert_eq!(
            pcr1["Condition"]["StringNotEqualsIgnoreCase"]["kms:RecipientAttestation:PCR1"],
            json!([pcr('b')])
        );
        let denied = statement(&policy, "DenyReEncryptFromAndGrants");
        assert_eq!(
            denied["Action"],
            json!(["kms:ReEncryptFrom", "kms:CreateGrant"])
        );
        assert!(denied.get("Condition").is_none());
        // Every allow of Decrypt carries the PCR conditions.
        for st in decrypt_statements(&policy) {
            let cond = st["Condition"]["StringEqualsIgnoreCase"]
                .as_object()
                .unwrap();
            assert!(cond.contains_key(IMAGE_SHA384));
            assert!(cond.contains_key("kms:RecipientAttestation:PCR1"));
        }
    }

    #[test]
    fn a_rotator_is_allowed_and_exempted_from_the_decrypt_denies_only() {
        let rotator = "arn:aws:iam::111122223333:role/rotator";
        let plain = key_policy(&spec(&build_output(&pcr('A'), None))).unwrap();
        let mut s = spec(&build_output(&pcr('A'), None));
        s.rotator_principals = vec![rotator.into()];
        let policy = key_policy(&s).unwrap();
        let allow = statement(&policy, "RotatorsDecryptAndReEncrypt");
        assert_eq!(allow["Principal"]["AWS"], json!([rotator]));
        assert_eq!(allow["Action"], json!(ROTATOR_ACTIONS));
        assert!(allow.get("Condition").is_none());
        // Each Decrypt deny is the default one plus the exemption.
        for sid in [
            "DenyDecryptWithoutAttestation",
            "DenyDecryptUnlessImageSha384",
        ] {
            let mut st = statement(&policy, sid).clone();
            assert_eq!(
                st["Condition"]["ArnNotEquals"][PRINCIPAL_ARN],
                json!([rotator]),
                "{st}"
            );
            st["Condition"]
                .as_object_mut()
                .unwrap()
                .remove("ArnNotEquals");
            assert_eq!(&st, statement(&plain, sid));
        }
        let reencrypt = statement(&policy, "DenyReEncryptFrom");
        assert_eq!(reencrypt["Action"], "kms:ReEncryptFrom");
        assert_eq!(
            reencrypt["Condition"]["ArnNotEquals"][PRINCIPAL_ARN],
            json!([rotator])
        );
        // Grants stay denied to everyone, rotators included.
        let grants = statement(&policy, "DenyGrants");
        assert_eq!(grants["Action"], "kms:CreateGrant");
        assert!(grants.get("Condition").is_none());
        // Without --rotator nothing mentions principals in conditions.
        assert!(!plain.to_string().contains(PRINCIPAL_ARN));
        s.rotator_principals = vec!["arn:aws:iam::111122223333:role/parent".into()];
        assert!(matches!(
            key_policy(&s),
            Err(PolicyError::RotatorIsEnclaveRole(_))
        ));
        s.rotator_principals = vec!["not-an-arn".into()];
        assert!(matches!(key_policy(&s), Err(PolicyError::BadPrincipal(_))));
    }

    #[test]
    fn pins_pcr0_as_image_sha384_and_nothing_else_decrypts() {
        let policy = key_policy(&spec(&build_output(&pcr('A'), None))).unwrap();
        let decrypts = decrypt_statements(&policy);
        assert_eq!(decrypts.len(), 1);
        let cond = &decrypts[0]["Condition"]["StringEqualsIgnoreCase"];
        assert_eq!(
            cond["kms:RecipientAttestation:ImageSha384"],
            json!(pcr('a'))
        );
        assert_eq!(cond.as_object().unwrap().len(), 1);
        // The administrators can manage the key but never use it.
        let admin = &policy["Statement"][0];
        let actions = admin["Action"].as_array().unwrap();
        assert!(!actions.iter().any(|a| a == "kms:Decrypt" || a == "kms:*"));
    }

    #[test]
    fn extra_pcrs_and_parent_role() {
        let mut s = spec(&build_output(&pcr('a'), Some(&pcr('8'))));
        s.extra_pcrs = vec![1, 2, 3, 8];
        let role = "arn:aws:iam::111122223333:role/parent";
        s.current = Some(s.current.take().unwrap().with_parent_role(role).unwrap());
        let policy = key_policy(&s).unwrap();
        let cond = &decrypt_statements(&policy)[0]["Condition"]["StringEqualsIgnoreCase"];
        assert_eq!(cond["kms:RecipientAttestation:PCR1"], json!(pcr('b')));
        assert_eq!(cond["kms:RecipientAttestation:PCR8"], json!(pcr('8')));
        let mut h = Sha384::new();
        h.update([0u8; 48]);
        h.update(role.as_bytes());
        assert_eq!(
            cond["kms:RecipientAttestation:PCR3"],
            json!(hex::encode(h.finalize()))
        );
    }

    #[test]
    fn pcr8_needs_a_signed_build() {
        let mut s = spec(&build_output(&pcr('a'), None));
        s.extra_pcrs = vec![8];
        assert!(matches!(
            key_policy(&s),
            Err(PolicyError::MissingPcr { index: 8 })
        ));
        s.extra_pcrs = vec![4];
        assert!(matches!(key_policy(&s), Err(PolicyError::UnpinnablePcr(4))));
    }

    #[test]
    fn debug_measurements_are_refused_unless_allowed() {
        let zeros = json!({"Measurements": {"PCR0": pcr('0'), "PCR1": pcr('0'), "PCR2": pcr('0')}});
        let mut s = spec(&zeros.to_string());
        assert!(matches!(
            key_policy(&s),
            Err(PolicyError::DebugMeasurements)
        ));
        s.allow_debug = true;
        assert!(key_policy(&s).is_ok());
        // A debug build sneaking in through --also is refused too.
        let mut s = spec(&build_output(&pcr('a'), None));
        s.also = vec![Measurements::from_json(&zeros.to_string()).unwrap()];
        assert!(matches!(
            key_policy(&s),
            Err(PolicyError::DebugMeasurements)
        ));
    }

    #[test]
    fn also_keeps_the_previous_release_in_its_own_statement() {
        let mut s = spec(&build_output(&pcr('a'), None));
        s.also = vec![Measurements::from_json(&build_output(&pcr('f'), None)).unwrap()];
        s.extra_pcrs = vec![1];
        let policy = key_policy(&s).unwrap();
        let decrypts = decrypt_statements(&policy);
        let pcr0s: Vec<&Value> = decrypts
            .iter()
            .map(|d| &d["Condition"]["StringEqualsIgnoreCase"]["kms:RecipientAttestation:ImageSha384"])
            .collect();
        assert_eq!(pcr0s, [&json!(pcr('a')), &json!(pcr('f'))]);
        assert_ne!(decrypts[0]["Sid"], decrypts[1]["Sid"]);
    }

    #[test]
    fn bad_inputs_are_named() {
        assert!(matches!(
            Measurements::from_json("nope"),
            Err(PolicyError::Measurements(_))
        ));
        assert!(matches!(
            Measurements::from_json(r#"{"PCR0":"abc","PCR1":"x","PCR2":"y"}"#),
            Err(PolicyError::BadPcr { index: 0 })
        ));
        assert!(matches!(
            Measurements::from_json(&json!({"PCR0": pcr('a'), "PCR1": pcr('a')}).to_string()),
            Err(PolicyError::Measurements(m)) if m.contains("PCR2")
        ));
        let mut s = spec(&build_output(&pcr('a'), None));
        s.enclave_principals = vec!["parent-role".into()];
        assert!(matches!(key_policy(&s), Err(PolicyError::BadPrincipal(_))));
        s.enclave_principals.clear();
        assert!(matches!(
            key_policy(&s),
            Err(PolicyError::MissingPrincipal(_))
        ));
    }
}
