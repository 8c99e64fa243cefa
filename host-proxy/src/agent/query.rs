//! What an agent HTTP request asks, read from its URI or JSON body: pure
//! functions over hostile text (any local process may send it), kept apart
//! from the server so the fuzz target `agent_query` compiles this file
//! alone.

/// What a `GetSecretValue` request asks.
#[derive(Debug, PartialEq, Eq)]
pub struct Query {
    /// The secret's name (`SecretId`).
    pub secret_id: String,
    /// `VersionId`, if asked.
    pub version_id: Option<String>,
    /// `VersionStage`, if asked.
    pub version_stage: Option<String>,
}

/// `secretId`, `versionId`, `versionStage`, `refreshNow` from a query
/// string (form-encoded, as the Secrets Manager Agent parses it).
pub fn parse_query(query: &str) -> Result<Query, String> {
    let parsed = parse_params(query, true)?;
    let secret_id = parsed
        .secret_id
        .filter(|id| !id.is_empty())
        .ok_or_else(|| "missing parameter secretId".to_owned())?;
    Ok(Query {
        secret_id,
        version_id: parsed.version_id,
        version_stage: parsed.version_stage,
    })
}

/// `/v1/NAME?versionId=..`: the name is the rest of the path, decoded.
pub fn parse_path(rest: &str, query: &str) -> Result<Query, String> {
    let secret_id = percent_decode(rest, false)?;
    if secret_id.is_empty() {
        return Err("missing secret ID".to_owned());
    }
    let parsed = parse_params(query, false)?;
    Ok(Query {
        secret_id,
        version_id: parsed.version_id,
        version_stage: parsed.version_stage,
    })
}

#[derive(Default)]
struct Params {
    secret_id: Option<String>,
    version_id: Option<String>,
    version_stage: Option<String>,
}

fn parse_params(query: &str, secret_id_allowed: bool) -> Result<Params, String> {
    let mut params = Params::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(key, true)?;
        let value = percent_decode(value, true)?;
        match key.as_str() {
            "secretId" if secret_id_allowed => params.secret_id = Some(value),
            "versionId" => params.version_id = Some(value),
            "versionStage" => params.version_stage = Some(value),
            // Every read goes to the enclave; there is no cache to refresh.
            "refreshNow" => match value.to_lowercase().as_str() {
                "true" | "1" | "false" | "0" => {}
                _ => return Err("invalid refreshNow value".to_owned()),
            },
            other => return Err(format!("unknown parameter: {other}")),
        }
    }
    Ok(params)
}

/// Decodes `%XX` escapes (and `+` as a space in form data); the result must
/// be UTF-8.
fn percent_decode(text: &str, plus_is_space: bool) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| "invalid percent-encoding in the request".to_owned())?;
                out.push(hex);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "the request is not valid UTF-8".to_owned())
}

/// The JSON body of `POST /` `secretsmanager.GetSecretValue` (at most
/// 16 KiB, bounded by the caller): a JSON object with a string `SecretId`.
pub fn parse_json(body: &[u8]) -> Result<Query, serde_json::Error> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Input {
        secret_id: String,
        #[serde(default)]
        version_id: Option<String>,
        #[serde(default)]
        version_stage: Option<String>,
    }
    let input: Input = serde_json::from_slice(body)?;
    Ok(Query {
        secret_id: input.secret_id,
        version_id: input.version_id,
        version_stage: input.version_stage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse_like_the_secrets_manager_agent() {
        let q =
            parse_query("secretId=db%2Fpassword&versionStage=AWSCURRENT&refreshNow=true").unwrap();
        assert_eq!(q.secret_id, "db/password");
        assert_eq!(q.version_stage.as_deref(), Some("AWSCURRENT"));
        assert_eq!(parse_query("secretId=a+b").unwrap().secret_id, "a b");
        assert_eq!(
            parse_query("versionId=x").unwrap_err(),
            "missing parameter secretId"
        );
        assert_eq!(
            parse_query("secretId=a&colour=red").unwrap_err(),
            "unknown parameter: colour"
        );
        assert_eq!(
            parse_query("secretId=a&refreshNow=maybe").unwrap_err(),
            "invalid refreshNow value"
        );
        assert!(parse_query("secretId=%zz").is_err());
        assert!(parse_query("secretId=%ff").is_err());
        let p = parse_path("db/password", "versionStage=AWSCURRENT").unwrap();
        assert_eq!(p.secret_id, "db/password");
        assert_eq!(parse_path("", "").unwrap_err(), "missing secret ID");
        assert!(parse_path("a", "secretId=b").is_err());
    }

    #[test]
    fn json_bodies_parse_like_the_secrets_manager_api() {
        let q = parse_json(br#"{"SecretId":"db/password","VersionStage":"AWSCURRENT"}"#).unwrap();
        assert_eq!(q.secret_id, "db/password");
        assert_eq!(q.version_stage.as_deref(), Some("AWSCURRENT"));
        assert_eq!(q.version_id, None);
        assert!(parse_json(br#"{"VersionId":"x"}"#).is_err());
        assert!(parse_json(br#"{"SecretId":1}"#).is_err());
        assert!(parse_json(b"[]").is_err());
    }
}
