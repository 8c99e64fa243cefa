//! Checks 4 and 6a: the enclave's measurements against the key policy, and
//! its attestation document's freshness.
//!
//! A fresh document is asked for (`Attest` with a random nonce) and
//! verified against the trusted root before any PCR in it is believed.
//! KMS decides `Decrypt` on the `kms:RecipientAttestation:*` conditions of
//! the key policy, so those are what the PCRs are compared with: every
//! value a condition names for `ImageSha384` (PCR0) or `PCRn`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use aws_smithy_types::error::display::DisplayErrorContext;
use keystore_shared::StatusReport;
use keystore_shared::attestation::{AttestationDocument, Verifier, VerifyAt, rfc3339};
use serde_json::Value;

use super::{Config, Finding, NO_ENCLAVE, PolicySource};

/// The PCR check's name.
pub const PCRS: &str = "pcrs";
/// The document check's name.
pub const DOCUMENT: &str = "document";
/// KMS refuses attestation documents older than this.
pub const MAX_DOCUMENT_AGE: Duration = Duration::from_secs(5 * 60);
/// A leaf certificate valid for less than this is worth a warning.
pub const MIN_LEAF_VALIDITY: Duration = Duration::from_secs(10 * 60);
/// Bytes of the nonce sent with `Attest`.
const NONCE_LEN: usize = 32;
/// Largest policy file read.
const MAX_POLICY: usize = 64 * 1024;
/// The cause of a debug-mode enclave (stable text, asserted by tests).
pub const DEBUG_MODE: &str =
    "the enclave runs in debug mode: PCRs are zero and the key policy will refuse it";

/// A fresh document and the nonce it must carry, or why there is none.
pub type Fetched = Result<(Vec<u8>, [u8; NONCE_LEN]), String>;

/// Asks the enclave for a document bound to a fresh nonce.
pub async fn fetch(endpoint: &keystore_shared::Endpoint, timeout: Duration) -> Fetched {
    let mut nonce = [0u8; NONCE_LEN];
    rand::fill(&mut nonce);
    let asked = async {
        let mut client = super::enclave::connect(endpoint, timeout).await?;
        client.attest(&nonce, None).await
    };
    match tokio::time::timeout(timeout * 2, asked).await {
        Ok(Ok(document)) => Ok((document, nonce)),
        Ok(Err(err)) => Err(format!("Attest failed: {err}")),
        Err(_) => Err(format!(
            "Attest got no answer within {} ms",
            (timeout * 2).as_millis()
        )),
    }
}

/// The verified document, or the finding saying why not.
fn verified(
    config: &Config,
    fetched: &Fetched,
    check: &'static str,
) -> Result<AttestationDocument, Finding> {
    let (bytes, nonce) = fetched.as_ref().map_err(|err| {
        Finding::fail(
            check,
            err.clone(),
            "the enclave answered Status but not Attest: see its last error (keystore-host \
             status --enclave ...)",
        )
    })?;
    Verifier::new(config.root.clone())
        .at(VerifyAt::Time(SystemTime::now()))
        .expect_nonce(nonce.to_vec())
        .verify(bytes)
        .map_err(|err| {
            Finding::fail(
                check,
                format!(
                    "the attestation document does not verify against {}: {err}",
                    config.root.subject()
                ),
                "a genuine enclave's documents chain to the AWS Nitro Enclaves root (--root \
                 aws); a test enclave's to its mock PKI's root.pem (--root PATH); check the \
                 instance clock",
            )
        })
}

fn is_zero(value: &[u8]) -> bool {
    value.iter().all(|&b| b == 0)
}

/// PCR index → the values the key policy's conditions accept (lower-case
/// hex), over every statement and condition operator.
pub fn policy_pcrs(policy: &Value) -> BTreeMap<u16, BTreeSet<String>> {
    let mut pinned: BTreeMap<u16, BTreeSet<String>> = BTreeMap::new();
    let statements = match policy.get("Statement") {
        Some(Value::Array(list)) => list.iter().collect(),
        Some(one @ Value::Object(_)) => vec![one],
        _ => Vec::new(),
    };
    for statement in statements {
        let Some(Value::Object(operators)) = statement.get("Condition") else {
            continue;
        };
        for keys in operators.values() {
            let Value::Object(keys) = keys else { continue };
            for (key, values) in keys {
                let lower = key.to_ascii_lowercase();
                let Some(name) = lower.strip_prefix("kms:recipientattestation:") else {
                    continue;
                };
                let index = match name {
                    "imagesha384" => 0,
                    other => match other
                        .strip_prefix("pcr")
                        .and_then(|n| n.parse::<u16>().ok())
                    {
                        Some(index) if index < 32 => index,
                        _ => continue,
                    },
                };
                let entry = pinned.entry(index).or_default();
                match values {
                    Value::String(v) => {
                        entry.insert(v.to_ascii_lowercase());
                    }
                    Value::Array(list) => {
                        entry.extend(
                            list.iter()
                                .filter_map(Value::as_str)
                                .map(str::to_ascii_lowercase),
                        );
                    }
                    _ => {}
                }
            }
        }
    }
    pinned
}

/// Compares a document's PCRs with a policy's pins: `None` when they
/// match, else the finding naming each PCR that differs.
pub fn compare(
    pcrs: &BTreeMap<u16, Vec<u8>>,
    pinned: &BTreeMap<u16, BTreeSet<String>>,
    source: &str,
) -> Finding {
    if pinned.is_empty() {
        return Finding::warn(
            PCRS,
            format!(
                "{source} has no kms:RecipientAttestation conditions: it does not pin any enclave build"
            ),
            "generate the policy with `keystore-host policy --measurements ...` so only this \
             EIF can decrypt",
        );
    }
    let mut differ = Vec::new();
    for (index, accepted) in pinned {
        let have = pcrs
            .get(index)
            .map(hex::encode)
            .unwrap_or_else(|| "absent".to_owned());
        if !accepted.contains(&have) {
            let wanted: Vec<&str> = accepted.iter().map(|v| short(v)).collect();
            differ.push(format!(
                "PCR{index} differs: the policy pins {} but the enclave has {}",
                wanted.join(" or "),
                short(&have)
            ));
        }
    }
    if differ.is_empty() {
        let list: Vec<String> = pinned.keys().map(|i| format!("PCR{i}")).collect();
        Finding::ok(
            PCRS,
            format!("the enclave's {} match {source}", list.join(", ")),
        )
    } else {
        Finding::fail(
            PCRS,
            format!("{source} pins another build: {}", differ.join("; ")),
            "run the EIF the policy pins, or pin this one: `nitro-cli describe-eif` gives its \
             measurements, `keystore-host policy --measurements FILE` the policy, `aws kms \
             put-key-policy` installs it",
        )
    }
}

/// The first 16 hex digits, enough to tell builds apart in a message.
fn short(hex: &str) -> &str {
    hex.get(..16).unwrap_or(hex)
}

/// The key policy as JSON, and how to name it; `Err` is a finding.
async fn load_policy(config: &Config) -> Result<Option<(Value, String)>, Finding> {
    let unreadable = "give --policy-file FILE with the policy JSON (`aws kms get-key-policy \
                      --key-id KEY --policy-name default --query Policy --output text`)";
    match &config.policy {
        PolicySource::None => Ok(None),
        PolicySource::File(path) => {
            let text = read_bounded(path).map_err(|e| {
                Finding::fail(PCRS, format!("cannot read --policy-file: {e}"), unreadable)
            })?;
            let value = serde_json::from_slice(&text).map_err(|e| {
                Finding::fail(
                    PCRS,
                    format!("--policy-file {} is not JSON: {e}", path.display()),
                    unreadable,
                )
            })?;
            Ok(Some((
                value,
                format!("the key policy in {}", path.display()),
            )))
        }
        PolicySource::KeyId(key_id) => {
            let region = config.region.clone().or_else(|| arn_region(key_id));
            let sdk = crate::aws::sdk_config(
                region,
                config.kms_endpoint_url.clone(),
                config.ca_pem.clone(),
            )
            .await
            .map_err(|e| Finding::fail(PCRS, format!("AWS set-up: {e}"), unreadable))?;
            let client = aws_sdk_kms::Client::new(&sdk);
            let call = client
                .get_key_policy()
                .key_id(key_id)
                .policy_name("default")
                .send();
            let answer = tokio::time::timeout(config.timeout * 2, call)
                .await
                .map_err(|_| {
                    Finding::fail(
                        PCRS,
                        format!("GetKeyPolicy on {key_id} got no answer in time"),
                        unreadable,
                    )
                })?
                .map_err(|e| {
                    Finding::warn(
                        PCRS,
                        format!(
                            "cannot read the key policy of {key_id}: {}",
                            DisplayErrorContext(&e)
                        ),
                        unreadable,
                    )
                })?;
            let text = answer.policy().unwrap_or_default();
            let value = serde_json::from_str(text).map_err(|e| {
                Finding::fail(
                    PCRS,
                    format!("the key policy of {key_id} is not JSON: {e}"),
                    unreadable,
                )
            })?;
            Ok(Some((value, format!("the key policy of {key_id}"))))
        }
    }
}

/// Reads at most [`MAX_POLICY`] bytes (KMS's own limit is 32 KiB).
fn read_bounded(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut text = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_POLICY as u64 + 1)
        .read_to_end(&mut text)?;
    if text.len() > MAX_POLICY {
        return Err(std::io::Error::other(format!(
            "{} is larger than {MAX_POLICY} bytes",
            path.display()
        )));
    }
    Ok(text)
}

/// `REGION` of `arn:PARTITION:kms:REGION:ACCOUNT:key/ID`.
pub fn arn_region(arn: &str) -> Option<String> {
    let mut parts = arn.split(':');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("arn"), Some(_), Some("kms"), Some(region)) if !region.is_empty() => {
            Some(region.to_owned())
        }
        _ => None,
    }
}

/// The enclave's PCRs against the key policy (and debug mode).
pub async fn check_pcrs(config: &Config, fetched: Option<&Fetched>) -> Finding {
    let Some(fetched) = fetched else {
        return Finding::skip(PCRS, NO_ENCLAVE);
    };
    let document = match verified(config, fetched, PCRS) {
        Ok(document) => document,
        Err(finding) => return finding,
    };
    let debug = [0u16, 1, 2]
        .iter()
        .all(|i| document.pcrs.get(i).is_none_or(|v| is_zero(v)));
    if debug {
        return Finding::fail(
            PCRS,
            format!("PCR0, PCR1 and PCR2 are all zero: {DEBUG_MODE}"),
            "run the enclave without --debug-mode (nitro-cli run-enclave --eif-path ... \
             without --debug-mode; scripts/run-enclave.sh without --debug); read its logs \
             through the daemon instead of the console",
        );
    }
    match load_policy(config).await {
        Err(finding) => finding,
        Ok(None) => Finding::warn(
            PCRS,
            format!(
                "the document verifies and PCR0 is {}; no key policy to compare it with",
                short(&document.pcrs.get(&0).map(hex::encode).unwrap_or_default())
            ),
            "give --key-id KEY (GetKeyPolicy, where the role may read it) or --policy-file FILE",
        ),
        Ok(Some((policy, source))) => compare(&document.pcrs, &policy_pcrs(&policy), &source),
    }
}

/// The age of the enclave's document (KMS's 5-minute rule) and the fresh
/// document's certificate lifetime.
pub fn check_document(status: Option<&StatusReport>, fetched: Option<&Fetched>) -> Finding {
    let Some(status) = status else {
        return Finding::skip(DOCUMENT, NO_ENCLAVE);
    };
    let Some(age_ms) = status.document_age_ms else {
        return Finding::fail(
            DOCUMENT,
            "the enclave has no attestation document for KMS yet",
            "it makes one at start: see its last error (keystore-host status --enclave ...)",
        );
    };
    let age = Duration::from_millis(age_ms);
    if age > MAX_DOCUMENT_AGE {
        return Finding::fail(
            DOCUMENT,
            format!(
                "the enclave's attestation document is stale: {} s old; KMS refuses documents \
                 older than {} s",
                age.as_secs(),
                MAX_DOCUMENT_AGE.as_secs()
            ),
            "the enclave renews it every --document-refresh (4m): its renewals fail, see the \
             last error in `keystore-host status --enclave ...`; restarting the enclave makes \
             a new one",
        );
    }
    let saw = format!(
        "the enclave's document is {} s old (KMS allows {} s)",
        age.as_secs(),
        MAX_DOCUMENT_AGE.as_secs()
    );
    let fresh = fetched
        .and_then(|f| f.as_ref().ok())
        .and_then(|(bytes, _)| AttestationDocument::parse_unverified(bytes).ok());
    // KMS judges age by its clock against the NSM's timestamp: a document
    // made just now that is already old by this host's clock means the
    // one in use is older still to KMS.
    let behind = fresh
        .as_ref()
        .and_then(AttestationDocument::time)
        .and_then(|made| SystemTime::now().duration_since(made).ok())
        .unwrap_or_default();
    let seen_by_kms = behind.saturating_add(age);
    if seen_by_kms > MAX_DOCUMENT_AGE {
        return Finding::fail(
            DOCUMENT,
            format!(
                "the enclave's documents are stale when made: one made just now is already {} \
                 s old by this host's clock, so the one it sends KMS is {} s old; KMS refuses \
                 documents older than {} s",
                behind.as_secs(),
                seen_by_kms.as_secs(),
                MAX_DOCUMENT_AGE.as_secs()
            ),
            "the NSM's clock and this host's disagree: check this host's clock (chronyc \
             tracking); if it is right, KMS (on AWS time) refuses every document the enclave \
             sends",
        );
    }
    let leaf = fresh
        .and_then(|doc| doc.certificate_chain().ok())
        .and_then(|chain| chain.into_iter().find(|c| c.depth == 0));
    match leaf {
        Some(leaf) => leaf_lifetime(saw, leaf.not_before, leaf.not_after, SystemTime::now()),
        None => Finding::ok(DOCUMENT, saw),
    }
}

/// The document finding from its leaf certificate's validity at `now`
/// (`saw` says what was seen of the document so far).
fn leaf_lifetime(
    mut saw: String,
    not_before: SystemTime,
    not_after: SystemTime,
    now: SystemTime,
) -> Finding {
    if not_before > now {
        return Finding::fail(
            DOCUMENT,
            format!(
                "{saw}; its leaf certificate is valid only from {}: the clock here is behind",
                rfc3339(&not_before)
            ),
            "fix the instance clock (chronyc tracking)",
        );
    }
    match not_after.duration_since(now) {
        Err(_) => Finding::fail(
            DOCUMENT,
            format!(
                "{saw}; its leaf certificate expired at {}",
                rfc3339(&not_after)
            ),
            "fix the instance clock (chronyc tracking); the NSM issues fresh certificates",
        ),
        Ok(left) if left < MIN_LEAF_VALIDITY => Finding::warn(
            DOCUMENT,
            format!(
                "{saw}; its leaf certificate expires in {} s",
                left.as_secs()
            ),
            "the NSM renews it; if this stays, check the instance clock",
        ),
        Ok(left) => {
            saw.push_str(&format!(
                "; its leaf certificate is valid for {} more minute(s)",
                left.as_secs() / 60
            ));
            Finding::ok(DOCUMENT, saw)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Outcome;
    use serde_json::json;

    fn pcr(c: u8) -> Vec<u8> {
        vec![c; 48]
    }

    #[test]
    fn conditions_of_every_statement_count() {
        let policy = json!({"Statement": [
            {"Effect": "Deny", "Condition": {"StringNotEqualsIgnoreCase": {
                "kms:RecipientAttestation:ImageSha384": hex::encode(pcr(1))}}},
            {"Effect": "Allow", "Condition": {"StringEqualsIgnoreCase": {
                "kms:RecipientAttestation:PCR8": [hex::encode(pcr(8)).to_uppercase()],
                "aws:SourceIp": "10.0.0.1"}}},
            {"Effect": "Allow"}
        ]});
        let pinned = policy_pcrs(&policy);
        assert_eq!(pinned.keys().copied().collect::<Vec<_>>(), vec![0, 8]);
        let mut pcrs = BTreeMap::from([(0, pcr(1)), (8, pcr(8))]);
        assert_eq!(compare(&pcrs, &pinned, "p").status, Outcome::Ok);
        pcrs.insert(8, pcr(9));
        let differ = compare(&pcrs, &pinned, "p");
        assert_eq!(differ.status, Outcome::Fail);
        assert!(differ.saw.contains("PCR8 differs"), "{differ:?}");
        assert!(!differ.saw.contains("PCR0 differs"), "{differ:?}");
        assert_eq!(compare(&pcrs, &BTreeMap::new(), "p").status, Outcome::Warn);
    }

    #[test]
    fn stale_documents_fail() {
        let status = |age: u64| StatusReport {
            document_age_ms: Some(age),
            ..StatusReport::default()
        };
        assert_eq!(
            check_document(Some(&status(1000)), None).status,
            Outcome::Ok
        );
        let stale = check_document(Some(&status(301_000)), None);
        assert_eq!(stale.status, Outcome::Fail);
        assert!(stale.saw.contains("stale: 301 s old"), "{stale:?}");
        assert_eq!(check_document(None, None).status, Outcome::Skip);
    }

    #[test]
    fn leaf_lifetimes() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let minutes = |m: u64| Duration::from_secs(60 * m);
        let at = |from: SystemTime, to: SystemTime| leaf_lifetime("saw".into(), from, to, now);
        let fine = at(now - minutes(1), now + minutes(179));
        assert_eq!(fine.status, Outcome::Ok);
        assert!(
            fine.saw.ends_with("valid for 179 more minute(s)"),
            "{fine:?}"
        );
        let soon = at(now - minutes(175), now + minutes(5));
        assert_eq!(soon.status, Outcome::Warn);
        assert!(soon.saw.contains("expires in 300 s"), "{soon:?}");
        let expired = at(now - minutes(200), now - minutes(20));
        assert_eq!(expired.status, Outcome::Fail);
        assert!(expired.saw.contains("expired at"), "{expired:?}");
        let future = at(now + minutes(2), now + minutes(182));
        assert_eq!(future.status, Outcome::Fail);
        assert!(
            future.saw.contains("the clock here is behind"),
            "{future:?}"
        );
        assert!(
            future
                .hint
                .as_deref()
                .unwrap_or_default()
                .contains("chronyc")
        );
    }

    #[test]
    fn arn_regions() {
        assert_eq!(
            arn_region("arn:aws:kms:eu-west-1:111122223333:key/x").as_deref(),
            Some("eu-west-1")
        );
        assert_eq!(arn_region("alias/x"), None);
    }
}
