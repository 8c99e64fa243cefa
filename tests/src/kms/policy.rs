//! Key policies: parsing a JSON policy document and deciding whether it
//! allows a call.
//!
//! The emulator has one caller account, so the model is deliberately small:
//! `Effect` Allow/Deny (an explicit Deny wins), `Action` (strings or lists,
//! `*`/`?` wildcards, case-insensitive), `Principal` (`"*"` or `{"AWS": ...}`
//! naming the account), `Resource` (wildcards), and `Condition` blocks with
//! `StringEquals` / `StringEqualsIgnoreCase`, their negations
//! `StringNotEquals` / `StringNotEqualsIgnoreCase`, `ArnEquals`/`ArnLike`
//! and their negations (wildcards, case-sensitive; `aws:PrincipalArn` is the
//! caller's `arn:aws:iam::ACCOUNT:user/ACCESS_KEY_ID`), and `Null`. As in IAM, a
//! positive condition on a key the request does not carry (for example
//! `kms:RecipientAttestation:ImageSha384` without a `Recipient`) is not
//! satisfied, a negated one is, and `Null: {KEY: "true"}` holds exactly when
//! the key is absent. Anything outside the model is a
//! `MalformedPolicyDocumentException` that says so, rather than a policy
//! silently evaluated differently from AWS.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

use super::protocol::{ErrorKind, KmsError};

/// Largest policy document KMS accepts, in bytes.
pub const MAX_POLICY_LEN: usize = 32 * 1024;
/// Most statements the emulator parses in one policy.
pub const MAX_STATEMENTS: usize = 100;

/// Global condition key: the caller's ARN (set on every request).
pub const PRINCIPAL_ARN: &str = "aws:PrincipalArn";

/// Condition key for the SHA-384 of the enclave image (PCR0).
pub const IMAGE_SHA384: &str = "kms:RecipientAttestation:ImageSha384";
/// Prefix of the condition keys for individual PCRs (`...PCR0` to `...PCR31`).
pub const PCR_PREFIX: &str = "kms:RecipientAttestation:PCR";

/// The AWS default key policy: the account may do everything.
pub fn default_policy(account: &str) -> String {
    serde_json::json!({
        "Version": "2012-10-17",
        "Id": "key-default-1",
        "Statement": [{
            "Sid": "Enable IAM User Permissions",
            "Effect": "Allow",
            "Principal": { "AWS": format!("arn:aws:iam::{account}:root") },
            "Action": "kms:*",
            "Resource": "*"
        }]
    })
    .to_string()
}

/// A parsed key policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    statements: Vec<Statement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Statement {
    sid: Option<String>,
    allow: bool,
    principal: Principal,
    actions: Vec<String>,
    resources: Vec<String>,
    conditions: Vec<Condition>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Principal {
    Anyone,
    Aws(Vec<String>),
    /// `Service`, `Federated`, ...: never the emulator's caller.
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operator {
    StringEquals,
    StringEqualsIgnoreCase,
    StringNotEquals,
    StringNotEqualsIgnoreCase,
    ArnEquals,
    ArnNotEquals,
    Null,
}

impl Operator {
    fn name(self) -> &'static str {
        match self {
            Operator::StringEquals => "StringEquals",
            Operator::StringEqualsIgnoreCase => "StringEqualsIgnoreCase",
            Operator::StringNotEquals => "StringNotEquals",
            Operator::StringNotEqualsIgnoreCase => "StringNotEqualsIgnoreCase",
            Operator::ArnEquals => "ArnEquals",
            Operator::ArnNotEquals => "ArnNotEquals",
            Operator::Null => "Null",
        }
    }

    /// Whether the condition holds for `actual` (`None`: the request does
    /// not carry the key).
    fn holds(self, values: &[String], actual: Option<&str>) -> bool {
        let any =
            |eq: fn(&str, &str) -> bool| actual.is_some_and(|a| values.iter().any(|v| eq(v, a)));
        let exact = |v: &str, a: &str| v == a;
        let ignore_case = |v: &str, a: &str| v.eq_ignore_ascii_case(a);
        let arn_match = |v: &str, a: &str| wildcard_match(v, a);
        match self {
            Operator::StringEquals => any(exact),
            Operator::StringEqualsIgnoreCase => any(ignore_case),
            // Negations hold when the key is absent, as in IAM.
            Operator::StringNotEquals => !any(exact),
            Operator::StringNotEqualsIgnoreCase => !any(ignore_case),
            // IAM compares ARNs case-sensitively, with `*`/`?` wildcards.
            Operator::ArnEquals => any(arn_match),
            Operator::ArnNotEquals => !any(arn_match),
            // Values are checked at parse time to be "true" or "false".
            Operator::Null => values.iter().any(|v| (v == "true") == actual.is_none()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Condition {
    operator: Operator,
    /// As written, for messages.
    key: String,
    values: Vec<String>,
}

/// What a call asks for, as the policy sees it.
#[derive(Clone, Debug)]
pub struct RequestContext {
    /// `kms:Decrypt`, ...
    pub action: String,
    /// The caller's principal ARN (for messages).
    pub caller_arn: String,
    /// The caller's account id.
    pub caller_account: String,
    /// The key's ARN.
    pub resource: String,
    /// Condition keys the request carries, by lower-cased name.
    pub condition_keys: BTreeMap<String, String>,
}

impl RequestContext {
    /// A context for `action` on `resource` by `caller_arn` in `caller_account`,
    /// with `kms:CallerAccount` set.
    pub fn new(action: &str, caller_arn: &str, caller_account: &str, resource: &str) -> Self {
        let mut ctx = Self {
            action: action.to_owned(),
            caller_arn: caller_arn.to_owned(),
            caller_account: caller_account.to_owned(),
            resource: resource.to_owned(),
            condition_keys: BTreeMap::new(),
        };
        ctx.set("kms:CallerAccount", caller_account);
        ctx.set(PRINCIPAL_ARN, caller_arn);
        ctx
    }

    /// Adds condition key `key` (case-insensitive name) with `value`.
    pub fn set(&mut self, key: &str, value: &str) {
        self.condition_keys
            .insert(key.to_ascii_lowercase(), value.to_owned());
    }
}

impl Policy {
    /// Parses a policy document.
    ///
    /// # Errors
    /// `MalformedPolicyDocumentException` naming what is wrong or unsupported.
    pub fn parse(text: &str) -> Result<Policy, KmsError> {
        if text.len() > MAX_POLICY_LEN {
            return Err(malformed(format!(
                "policy is {} bytes, over the {MAX_POLICY_LEN}-byte limit",
                text.len()
            )));
        }
        let doc: Value = serde_json::from_str(text)
            .map_err(|e| malformed(format!("policy is not valid JSON: {e}")))?;
        let Value::Object(doc) = doc else {
            return Err(malformed("policy must be a JSON object"));
        };
        for key in doc.keys() {
            if !matches!(key.as_str(), "Version" | "Id" | "Statement") {
                return Err(malformed(format!("unsupported policy element {key:?}")));
            }
        }
        if let Some(version) = doc.get("Version")
            && !matches!(version.as_str(), Some("2012-10-17" | "2008-10-17"))
        {
            return Err(malformed(
                "Version must be \"2012-10-17\" or \"2008-10-17\"",
            ));
        }
        let statements = match doc.get("Statement") {
            Some(Value::Array(list)) => list.iter().collect::<Vec<_>>(),
            Some(one @ Value::Object(_)) => vec![one],
            _ => {
                return Err(malformed(
                    "Statement must be an object or a list of objects",
                ));
            }
        };
        if statements.is_empty() || statements.len() > MAX_STATEMENTS {
            return Err(malformed(format!(
                "a policy needs 1 to {MAX_STATEMENTS} statements"
            )));
        }
        let statements = statements
            .into_iter()
            .enumerate()
            .map(|(i, s)| Statement::parse(i, s))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Policy { statements })
    }

    /// Decides a call: `Ok` if some statement allows it and none denies it.
    ///
    /// # Errors
    /// `AccessDeniedException` with a message like real KMS's, followed by
    /// the reasons (explicit deny, or which conditions were not satisfied).
    pub fn authorize(&self, ctx: &RequestContext) -> Result<(), KmsError> {
        let mut allowed = false;
        let mut reasons = Vec::new();
        for (i, statement) in self.statements.iter().enumerate() {
            if !statement.applies_to(ctx) {
                continue;
            }
            match statement.unmet_condition(ctx) {
                None if !statement.allow => {
                    return Err(KmsError::new(
                        ErrorKind::AccessDenied,
                        format!(
                            "User: {} is not authorized to perform: {} on resource: {} with an \
                             explicit deny in a resource-based policy (statement {})",
                            ctx.caller_arn,
                            ctx.action,
                            ctx.resource,
                            statement.label(i)
                        ),
                    ));
                }
                None => allowed = true,
                Some(reason) if statement.allow => {
                    reasons.push(format!("statement {}: {reason}", statement.label(i)));
                }
                Some(_) => {}
            }
        }
        if allowed {
            return Ok(());
        }
        let mut message = format!(
            "User: {} is not authorized to perform: {} on resource: {} because no \
             resource-based policy allows the {} action",
            ctx.caller_arn, ctx.action, ctx.resource, ctx.action
        );
        if !reasons.is_empty() {
            let _ = write!(message, " ({})", reasons.join("; "));
        }
        Err(KmsError::new(ErrorKind::AccessDenied, message))
    }
}

impl Statement {
    fn parse(index: usize, value: &Value) -> Result<Statement, KmsError> {
        let Value::Object(map) = value else {
            return Err(malformed(format!("statement {index} is not an object")));
        };
        for key in map.keys() {
            if !matches!(
                key.as_str(),
                "Sid" | "Effect" | "Principal" | "Action" | "Resource" | "Condition"
            ) {
                return Err(malformed(format!(
                    "statement {index}: unsupported element {key:?} (the emulator models \
                     Sid, Effect, Principal, Action, Resource, Condition)"
                )));
            }
        }
        let sid = match map.get("Sid") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                return Err(malformed(format!(
                    "statement {index}: Sid must be a string"
                )));
            }
        };
        let allow = match map.get("Effect").and_then(Value::as_str) {
            Some("Allow") => true,
            Some("Deny") => false,
            _ => {
                return Err(malformed(format!(
                    "statement {index}: Effect must be \"Allow\" or \"Deny\""
                )));
            }
        };
        let principal = match map.get("Principal") {
            Some(Value::String(s)) if s == "*" => Principal::Anyone,
            Some(Value::Object(p)) if !p.is_empty() => match p.get("AWS") {
                Some(aws) => Principal::Aws(strings(index, "Principal.AWS", aws)?),
                None => Principal::Other,
            },
            _ => {
                return Err(malformed(format!(
                    "statement {index}: Principal must be \"*\" or an object such as {{\"AWS\": ...}}"
                )));
            }
        };
        let actions = strings(
            index,
            "Action",
            map.get("Action")
                .ok_or_else(|| malformed(format!("statement {index}: Action is required")))?,
        )?;
        let resources = strings(
            index,
            "Resource",
            map.get("Resource")
                .ok_or_else(|| malformed(format!("statement {index}: Resource is required")))?,
        )?;
        let conditions = match map.get("Condition") {
            None => Vec::new(),
            Some(Value::Object(ops)) => {
                let mut conditions = Vec::new();
                for (op, block) in ops {
                    let operator = match op.as_str() {
                        "StringEquals" => Operator::StringEquals,
                        "StringEqualsIgnoreCase" => Operator::StringEqualsIgnoreCase,
                        "StringNotEquals" => Operator::StringNotEquals,
                        "StringNotEqualsIgnoreCase" => Operator::StringNotEqualsIgnoreCase,
                        "ArnEquals" | "ArnLike" => Operator::ArnEquals,
                        "ArnNotEquals" | "ArnNotLike" => Operator::ArnNotEquals,
                        "Null" => Operator::Null,
                        other => {
                            return Err(malformed(format!(
                                "statement {index}: condition operator {other:?} is not supported \
                                 by the emulator (StringEquals, StringEqualsIgnoreCase, \
                                 StringNotEquals, StringNotEqualsIgnoreCase, ArnEquals, ArnLike, \
                                 ArnNotEquals, ArnNotLike, Null)"
                            )));
                        }
                    };
                    let Value::Object(block) = block else {
                        return Err(malformed(format!(
                            "statement {index}: {op} must map condition keys to values"
                        )));
                    };
                    for (key, values) in block {
                        let values = strings(index, key, values)?;
                        if operator == Operator::Null
                            && values.iter().any(|v| v != "true" && v != "false")
                        {
                            return Err(malformed(format!(
                                "statement {index}: Null takes \"true\" or \"false\" for {key}"
                            )));
                        }
                        conditions.push(Condition {
                            operator,
                            key: key.clone(),
                            values,
                        });
                    }
                }
                conditions
            }
            Some(_) => {
                return Err(malformed(format!(
                    "statement {index}: Condition must be an object"
                )));
            }
        };
        Ok(Statement {
            sid,
            allow,
            principal,
            actions,
            resources,
            conditions,
        })
    }

    fn label(&self, index: usize) -> String {
        match &self.sid {
            Some(sid) => format!("{sid:?}"),
            None => format!("#{index}"),
        }
    }

    /// Whether principal, action and resource match (conditions aside).
    fn applies_to(&self, ctx: &RequestContext) -> bool {
        let principal = match &self.principal {
            Principal::Anyone => true,
            Principal::Other => false,
            Principal::Aws(values) => values.iter().any(|v| {
                v == "*"
                    || *v == ctx.caller_account
                    || v.starts_with(&format!("arn:aws:iam::{}:", ctx.caller_account))
                    || v.starts_with(&format!("arn:aws:sts::{}:", ctx.caller_account))
            }),
        };
        principal
            && self
                .actions
                .iter()
                .any(|a| wildcard_match(&a.to_ascii_lowercase(), &ctx.action.to_ascii_lowercase()))
            && self
                .resources
                .iter()
                .any(|r| wildcard_match(r, &ctx.resource))
    }

    /// The first condition the request does not satisfy, described.
    fn unmet_condition(&self, ctx: &RequestContext) -> Option<String> {
        self.conditions.iter().find_map(|c| {
            let name = c.operator.name();
            let actual = ctx
                .condition_keys
                .get(&c.key.to_ascii_lowercase())
                .map(String::as_str);
            if c.operator.holds(&c.values, actual) {
                return None;
            }
            Some(match actual {
                None => format!(
                    "condition {name} {} is not satisfied: the request carries no {} \
                     (recipient keys need a Recipient attestation document)",
                    c.key, c.key
                ),
                Some(actual) => format!(
                    "condition {name} {} is not satisfied: the request has {actual:?}, the policy \
                     expects {:?}",
                    c.key, c.values
                ),
            })
        })
    }
}

/// A string or a non-empty list of strings (numbers and booleans are taken
/// as their JSON text, as IAM does).
fn strings(index: usize, what: &str, value: &Value) -> Result<Vec<String>, KmsError> {
    let one = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    };
    let list = match value {
        Value::Array(items) => items.iter().map(one).collect::<Option<Vec<_>>>(),
        other => one(other).map(|s| vec![s]),
    };
    match list {
        Some(list) if !list.is_empty() => Ok(list),
        _ => Err(malformed(format!(
            "statement {index}: {what} must be a string or a non-empty list of strings"
        ))),
    }
}

/// Glob match with `*` (any run) and `?` (one character), iterative so a
/// hostile pattern cannot blow the stack.
fn wildcard_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || Some(&c) == t.get(ti) => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p.get(pi..)
        .is_some_and(|rest| rest.iter().all(|&c| c == '*'))
}

fn malformed(message: impl Into<String>) -> KmsError {
    KmsError::new(ErrorKind::MalformedPolicyDocument, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACCOUNT: &str = "111122223333";
    const KEY: &str = "arn:aws:kms:us-east-1:111122223333:key/k";

    fn ctx(action: &str) -> RequestContext {
        RequestContext::new(action, "arn:aws:iam::111122223333:user/t", ACCOUNT, KEY)
    }

    #[test]
    fn default_policy_allows_everything_to_the_account() {
        let policy = Policy::parse(&default_policy(ACCOUNT)).unwrap();
        policy.authorize(&ctx("kms:Decrypt")).unwrap();
        let other = RequestContext::new("kms:Decrypt", "arn:aws:iam::999:user/x", "999", KEY);
        assert_eq!(
            policy.authorize(&other).unwrap_err().kind,
            ErrorKind::AccessDenied
        );
    }

    #[test]
    fn explicit_deny_wins_and_actions_match_wildcards() {
        let policy = Policy::parse(
            r#"{"Statement":[
              {"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*"},
              {"Sid":"NoEncrypt","Effect":"Deny","Principal":{"AWS":"*"},"Action":["kms:Encr?pt"],"Resource":"*"}]}"#,
        )
        .unwrap();
        policy.authorize(&ctx("kms:Decrypt")).unwrap();
        let err = policy.authorize(&ctx("kms:Encrypt")).unwrap_err();
        assert!(err.message.contains("explicit deny"), "{err}");
        assert!(err.message.contains("NoEncrypt"), "{err}");
        // Actions are case-insensitive.
        policy.authorize(&ctx("KMS:decrypt")).unwrap();
    }

    #[test]
    fn recipient_conditions() {
        let policy = Policy::parse(&format!(
            r#"{{"Version":"2012-10-17","Statement":[{{"Sid":"Enclave","Effect":"Allow",
               "Principal":{{"AWS":["arn:aws:iam::{ACCOUNT}:root"]}},"Action":"kms:Decrypt","Resource":"*",
               "Condition":{{"StringEqualsIgnoreCase":{{"{IMAGE_SHA384}":"AABB"}}}}}}]}}"#
        ))
        .unwrap();
        let mut good = ctx("kms:Decrypt");
        good.set(IMAGE_SHA384, "aabb");
        policy.authorize(&good).unwrap();

        let mut bad = ctx("kms:Decrypt");
        bad.set(IMAGE_SHA384, "ccdd");
        let err = policy.authorize(&bad).unwrap_err();
        assert!(err.message.contains(IMAGE_SHA384), "{err}");
        assert!(err.message.contains("\"Enclave\""), "{err}");

        let err = policy.authorize(&ctx("kms:Decrypt")).unwrap_err();
        assert!(err.message.contains("carries no"), "{err}");
        // Another action is simply not allowed.
        assert!(policy.authorize(&ctx("kms:Encrypt")).is_err());
    }

    #[test]
    fn string_equals_is_case_sensitive() {
        let policy = Policy::parse(
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*",
               "Condition":{"StringEquals":{"kms:RecipientAttestation:PCR8":["aa","bb"]}}}}"#,
        )
        .unwrap();
        let mut c = ctx("kms:Decrypt");
        c.set("kms:RecipientAttestation:PCR8", "BB");
        assert!(policy.authorize(&c).is_err());
        c.set("kms:RecipientAttestation:PCR8", "bb");
        policy.authorize(&c).unwrap();
    }

    #[test]
    fn negated_and_null_conditions_follow_iam() {
        // An attested-only allow plus the two denies the generated key
        // policy carries; "kms:*" stands for a grant or an IAM policy.
        let policy = Policy::parse(&format!(
            r#"{{"Statement":[
              {{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*"}},
              {{"Sid":"NoDocument","Effect":"Deny","Principal":{{"AWS":"*"}},"Action":"kms:Decrypt","Resource":"*",
                "Condition":{{"Null":{{"{IMAGE_SHA384}":"true"}}}}}},
              {{"Sid":"OtherImage","Effect":"Deny","Principal":{{"AWS":"*"}},"Action":"kms:Decrypt","Resource":"*",
                "Condition":{{"StringNotEqualsIgnoreCase":{{"{IMAGE_SHA384}":["AABB","CCDD"]}}}}}}]}}"#
        ))
        .unwrap();
        let err = policy.authorize(&ctx("kms:Decrypt")).unwrap_err();
        assert!(err.message.contains("NoDocument"), "{err}");
        let mut other = ctx("kms:Decrypt");
        other.set(IMAGE_SHA384, "eeff");
        let err = policy.authorize(&other).unwrap_err();
        assert!(err.message.contains("OtherImage"), "{err}");
        for pinned in ["aabb", "CCDD"] {
            let mut good = ctx("kms:Decrypt");
            good.set(IMAGE_SHA384, pinned);
            policy.authorize(&good).unwrap();
        }
        // Other actions are untouched by the denies.
        policy.authorize(&ctx("kms:Encrypt")).unwrap();
        // Null "false" holds only when the key is present.
        let present = Policy::parse(&format!(
            r#"{{"Statement":{{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*",
               "Condition":{{"Null":{{"{IMAGE_SHA384}":false}}}}}}}}"#
        ))
        .unwrap();
        assert!(present.authorize(&ctx("kms:Decrypt")).is_err());
        present.authorize(&other).unwrap();
        // StringNotEquals is case-sensitive.
        let not_equals = Policy::parse(
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*",
               "Condition":{"StringNotEquals":{"kms:RecipientAttestation:PCR8":"aa"}}}}"#,
        )
        .unwrap();
        let mut upper = ctx("kms:Decrypt");
        upper.set("kms:RecipientAttestation:PCR8", "AA");
        not_equals.authorize(&upper).unwrap();
        upper.set("kms:RecipientAttestation:PCR8", "aa");
        assert!(not_equals.authorize(&upper).is_err());
        assert!(
            Policy::parse(
                r#"{"Statement":{"Effect":"Deny","Principal":"*","Action":"kms:*","Resource":"*",
                   "Condition":{"Null":{"k":"maybe"}}}}"#
            )
            .is_err()
        );
    }

    #[test]
    fn principal_arn_exempts_one_caller_from_a_deny() {
        let policy = Policy::parse(&format!(
            r#"{{"Statement":[
              {{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*"}},
              {{"Sid":"NoDocument","Effect":"Deny","Principal":{{"AWS":"*"}},"Action":"kms:Decrypt","Resource":"*",
                "Condition":{{"Null":{{"{IMAGE_SHA384}":"true"}},
                              "ArnNotEquals":{{"{PRINCIPAL_ARN}":["arn:aws:iam::{ACCOUNT}:user/ROTATOR"]}}}}}}]}}"#
        ))
        .unwrap();
        let as_user = |user: &str| {
            RequestContext::new(
                "kms:Decrypt",
                &format!("arn:aws:iam::{ACCOUNT}:user/{user}"),
                ACCOUNT,
                KEY,
            )
        };
        let err = policy.authorize(&as_user("OPERATOR")).unwrap_err();
        assert!(err.message.contains("NoDocument"), "{err}");
        policy.authorize(&as_user("ROTATOR")).unwrap();
        // Case-sensitive, as IAM compares ARNs.
        assert!(policy.authorize(&as_user("rotator")).is_err());
        // ArnLike with a wildcard, and ArnEquals on its own.
        let like = Policy::parse(&format!(
            r#"{{"Statement":{{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*",
               "Condition":{{"ArnLike":{{"{PRINCIPAL_ARN}":"arn:aws:iam::{ACCOUNT}:user/ROT*"}}}}}}}}"#
        ))
        .unwrap();
        like.authorize(&as_user("ROTATOR")).unwrap();
        assert!(like.authorize(&as_user("OPERATOR")).is_err());
    }

    #[test]
    fn malformed_policies_are_refused() {
        for bad in [
            "",
            "[]",
            "{",
            r#"{"Statement":[]}"#,
            r#"{"Statement":[{"Effect":"Maybe","Principal":"*","Action":"kms:*","Resource":"*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Resource":"*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","NotAction":"kms:*","Resource":"*"}]}"#,
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*","Condition":{"NumericEquals":{"a":"1"}}}]}"#,
            r#"{"Version":"1999","Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:*","Resource":"*"}]}"#,
        ] {
            let err = Policy::parse(bad).unwrap_err();
            assert_eq!(err.kind, ErrorKind::MalformedPolicyDocument, "{bad}");
        }
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match("*", ""));
        assert!(wildcard_match("kms:*", "kms:decrypt"));
        assert!(wildcard_match("a*b*c", "aXXbYYc"));
        assert!(!wildcard_match("a*b*c", "aXXbYY"));
        assert!(wildcard_match("a?c", "abc"));
        assert!(!wildcard_match("a?c", "ac"));
        assert!(!wildcard_match("kms:Decrypt", "kms:DecryptX"));
        assert!(wildcard_match(&"*".repeat(1000), "x"));
    }
}
