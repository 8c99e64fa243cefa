//! Checks 5 and 6b: what the enclave's image pins against what the daemon
//! is configured for, and the enclave's running state as its `Status`
//! reports it: loads, the KMS breaker, staleness, the audit trail.

use std::time::Duration;

use keystore_shared::StatusReport;

use super::attestation::arn_region;
use super::network::DaemonInfo;
use super::{Config, Finding, NO_ENCLAVE};

/// The pinned key check's name.
pub const PINNED_KEY: &str = "pinned_key";
/// The loads check's name.
pub const LOADS: &str = "loads";
/// The audit check's name.
pub const AUDIT: &str = "audit";
/// Default bound on audit records waiting in the enclave.
pub const DEFAULT_MAX_AUDIT_BUFFERED: u64 = 1000;

const REBUILD: &str = "the pins are part of the measured image: rebuild it with \
     `docker build --build-arg KMS_REGION=REGION --build-arg KMS_KEY_ARNS=ARN ...` \
     (Dockerfile.enclave), then regenerate the key policy for the new PCR0";

/// The enclave's pinned key ARNs and region against the daemon's region
/// and `--key-id`.
pub fn check_pinned_key(
    status: Option<&StatusReport>,
    daemon: Option<&DaemonInfo>,
    config: &Config,
) -> Finding {
    let Some(status) = status else {
        return Finding::skip(PINNED_KEY, NO_ENCLAVE);
    };
    let Some(pins) = &status.kms_pins else {
        return Finding::warn(
            PINNED_KEY,
            "the enclave does not say which key it pins (a build older than doctor, or one \
             without --region)",
            "upgrade the enclave image",
        );
    };
    let pinned = &pins.key_arns;
    if pinned.is_empty() {
        return Finding::fail(
            PINNED_KEY,
            "the enclave's image pins no KMS key: it refuses every Load",
            REBUILD,
        );
    }
    let enclave_region = pins.region.clone();
    let mut problems = Vec::new();
    for arn in pinned {
        if let Some(region) = arn_region(arn)
            && region != enclave_region
        {
            problems.push(format!(
                "the pinned key {arn} is in {region} but the image calls KMS in {enclave_region}"
            ));
        }
    }
    let (daemon_region, whose) = match (daemon.and_then(|d| d.region.clone()), &config.region) {
        (Some(region), _) => (Some(region), "the daemon's --region"),
        (None, Some(region)) => (Some(region.clone()), "--region"),
        (None, None) => (None, ""),
    };
    if let Some(region) = &daemon_region
        && *region != enclave_region
    {
        problems.push(format!(
            "the image pins region {enclave_region} but {whose} is {region}"
        ));
    }
    if let Some(key) = &config.key_id
        && !pinned.iter().any(|arn| arn.eq_ignore_ascii_case(key))
    {
        problems.push(format!(
            "the key {key} is not the enclave's pinned key [{}]",
            pinned.join(", ")
        ));
    }
    if problems.is_empty() {
        Finding::ok(
            PINNED_KEY,
            format!(
                "the image pins [{}] in {enclave_region}{}",
                pinned.join(", "),
                daemon_region.map_or_else(String::new, |r| format!("; {whose} is {r}"))
            ),
        )
    } else {
        Finding::fail(
            PINNED_KEY,
            format!("pinned key mismatch: {}", problems.join("; ")),
            format!(
                "seal the secrets with a pinned key and run the daemon in the image's region, \
                 or {REBUILD}"
            ),
        )
    }
}

fn secs(ms: u64) -> u64 {
    Duration::from_millis(ms).as_secs()
}

/// The last load, the breaker and staleness against `--max-stale`.
pub fn check_loads(status: Option<&StatusReport>) -> Finding {
    let Some(status) = status else {
        return Finding::skip(LOADS, NO_ENCLAVE);
    };
    let last_error = status.last_error.as_deref().unwrap_or("none");
    let kms_hint = "KMS calls from the enclave fail: read the last error, then the `allowlist`, \
                    `tls`, `credentials` and `pcrs` checks above; the breaker probes KMS again \
                    by itself";
    if let Some(breaker) = &status.breaker
        && breaker.state == "open"
    {
        // The breaker's own last failure: `last_error` is set only when
        // the load or re-decrypt that tripped it has finished.
        let cause = breaker.last_failure.as_deref().unwrap_or(last_error);
        return Finding::fail(
            LOADS,
            format!(
                "the KMS breaker is open after {} failure(s) in a row (opened {} time(s){}); \
                 last failure: {cause}",
                breaker.consecutive_failures,
                breaker.opened,
                breaker
                    .next_probe_in_ms
                    .map_or_else(String::new, |ms| format!(", next probe in {ms} ms"))
            ),
            kms_hint,
        );
    }
    if let (Some(age), Some(max)) = (status.last_decrypt_age_ms, status.max_stale_ms)
        && max > 0
    {
        if age > max {
            return Finding::fail(
                LOADS,
                format!(
                    "stale: the last successful decrypt was {} s ago, past --max-stale {} s; the \
                     enclave has wiped its secrets. Last error: {last_error}",
                    secs(age),
                    secs(max)
                ),
                kms_hint,
            );
        }
        if age > max / 2 {
            return Finding::warn(
                LOADS,
                format!(
                    "the last successful decrypt was {} s ago: over half of --max-stale {} s, \
                     after which the enclave wipes its secrets. Last error: {last_error}",
                    secs(age),
                    secs(max)
                ),
                kms_hint,
            );
        }
    }
    if !status.ready {
        return Finding::fail(
            LOADS,
            format!("no secrets loaded; last error: {last_error}"),
            "the daemon loads its --secrets file at start and on change: see journalctl -u \
             keystore-host-proxy and the checks above",
        );
    }
    let breaker = status
        .breaker
        .as_ref()
        .map_or("unknown", |b| b.state.as_str());
    if breaker == "half-open" {
        return Finding::warn(
            LOADS,
            format!(
                "the KMS breaker is half-open (probing after failures); last error: {last_error}"
            ),
            kms_hint,
        );
    }
    let saw = format!(
        "{} secret(s) loaded, last decrypt {}, breaker {breaker}",
        status.secret_count,
        status
            .last_decrypt_age_ms
            .map_or_else(|| "never".to_owned(), |ms| format!("{} s ago", secs(ms)))
    );
    match &status.last_error {
        Some(err) => Finding::warn(
            LOADS,
            format!("{saw}; but the last load or refresh failed: {err}"),
            "the enclave keeps serving the set it has; fix the cause before --max-stale runs out",
        ),
        None => Finding::ok(LOADS, saw),
    }
}

/// The audit trail: the enclave's buffer against the daemon's drain.
pub fn check_audit(
    status: Option<&StatusReport>,
    daemon: Option<&DaemonInfo>,
    max_buffered: u64,
) -> Finding {
    let Some(status) = status else {
        return Finding::skip(AUDIT, NO_ENCLAVE);
    };
    let Some(audit) = &status.audit else {
        return Finding::warn(
            AUDIT,
            "the enclave does not report its audit trail (an older build)",
            "upgrade the enclave image",
        );
    };
    let drain_hint = "the daemon drains the trail into --audit-log every --audit-poll: check it \
                      runs without --no-audit-log, can write its log (journalctl -u \
                      keystore-host-proxy) and reaches the enclave's load port";
    if audit.dropping {
        return Finding::fail(
            AUDIT,
            format!(
                "audit lag: the enclave's buffer is full and it is dropping records ({} \
                 dropped in {} gap(s), {} buffered)",
                audit.dropped, audit.gaps, audit.buffered
            ),
            drain_hint,
        );
    }
    if let Some(daemon) = daemon
        && daemon.audit_log.is_none()
    {
        return Finding::fail(
            AUDIT,
            format!(
                "audit lag: the daemon does not drain the audit trail (--no-audit-log); {} \
                 record(s) wait in the enclave",
                audit.buffered
            ),
            drain_hint,
        );
    }
    if audit.buffered > max_buffered {
        return Finding::fail(
            AUDIT,
            format!(
                "audit lag: {} record(s) wait in the enclave (more than {max_buffered})",
                audit.buffered
            ),
            drain_hint,
        );
    }
    let saw = format!(
        "{} record(s) buffered, last seq {}, drained to {}",
        audit.buffered,
        audit
            .last_seq
            .map_or_else(|| "none".to_owned(), |s| s.to_string()),
        daemon
            .and_then(|d| d.audit_log.clone())
            .unwrap_or_else(|| "unknown (daemon did not answer)".to_owned())
    );
    if audit.dropped > 0 {
        return Finding::warn(
            AUDIT,
            format!(
                "{saw}; {} record(s) were dropped earlier ({} gap record(s) in the log)",
                audit.dropped, audit.gaps
            ),
            "`keystore-host audit verify` shows where; keep the daemon draining",
        );
    }
    Finding::ok(AUDIT, saw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Outcome;
    use keystore_shared::protocol::{AuditStatus, BreakerStatus};

    fn ready() -> StatusReport {
        StatusReport {
            ready: true,
            secret_count: 2,
            last_decrypt_age_ms: Some(1000),
            max_stale_ms: Some(60_000),
            breaker: Some(BreakerStatus {
                state: "closed".into(),
                ..BreakerStatus::default()
            }),
            audit: Some(AuditStatus::default()),
            ..StatusReport::default()
        }
    }

    #[test]
    fn loads() {
        assert_eq!(check_loads(Some(&ready())).status, Outcome::Ok);
        let mut open = ready();
        open.breaker = Some(BreakerStatus {
            state: "open".into(),
            consecutive_failures: 5,
            next_probe_in_ms: Some(900),
            opened: 1,
            last_failure: Some("KMS refused: ThrottlingException (HTTP 400)".into()),
        });
        let finding = check_loads(Some(&open));
        assert_eq!(finding.status, Outcome::Fail);
        assert!(
            finding.saw.contains("breaker is open after 5")
                && finding
                    .saw
                    .contains("last failure: KMS refused: ThrottlingException"),
            "{finding:?}"
        );
        let mut stale = ready();
        stale.last_decrypt_age_ms = Some(61_000);
        let finding = check_loads(Some(&stale));
        assert_eq!(finding.status, Outcome::Fail);
        assert!(finding.saw.starts_with("stale: "), "{finding:?}");
        stale.last_decrypt_age_ms = Some(31_000);
        assert_eq!(check_loads(Some(&stale)).status, Outcome::Warn);
        let mut empty = ready();
        empty.ready = false;
        assert_eq!(check_loads(Some(&empty)).status, Outcome::Fail);
    }

    #[test]
    fn audit() {
        let daemon = DaemonInfo {
            audit_log: Some("/var/log/x".into()),
            ..DaemonInfo::default()
        };
        assert_eq!(
            check_audit(Some(&ready()), Some(&daemon), 10).status,
            Outcome::Ok
        );
        let mut lag = ready();
        lag.audit = Some(AuditStatus {
            buffered: 11,
            ..AuditStatus::default()
        });
        let finding = check_audit(Some(&lag), Some(&daemon), 10);
        assert_eq!(finding.status, Outcome::Fail);
        assert!(
            finding.saw.contains("audit lag: 11 record(s)"),
            "{finding:?}"
        );
        lag.audit = Some(AuditStatus {
            dropping: true,
            ..AuditStatus::default()
        });
        assert!(
            check_audit(Some(&lag), Some(&daemon), 10)
                .saw
                .contains("dropping")
        );
    }
}
