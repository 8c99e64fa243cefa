//! Counts of KMS calls by operation and outcome (issue 16), carried in
//! `Status` and relayed by the daemon as `keystore_enclave_kms_calls_total`.
//!
//! Outcomes are the fixed [`KMS_CALL_OUTCOMES`]: `ok`, KMS's own known
//! `__type`s, the stage of a failure without an answer, and `other`. An
//! unknown `__type` is `other`, never its own label, so KMS (or whatever
//! answers in its place) cannot grow the set.

use std::sync::atomic::{AtomicU64, Ordering};

use keystore_shared::protocol::{KMS_CALL_OUTCOMES, KMS_OPERATIONS, KmsCallCount, KmsCallStats};

use super::{KmsError, KmsErrorCode};

const OUTCOMES: usize = KMS_CALL_OUTCOMES.len();
const OPERATIONS: usize = KMS_OPERATIONS.len();

/// A KMS operation the enclave makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KmsOperation {
    /// `Decrypt` with a `Recipient`.
    Decrypt,
}

impl KmsOperation {
    fn index(self) -> usize {
        match self {
            KmsOperation::Decrypt => 0,
        }
    }
}

/// Call counters, one per (operation, outcome).
#[derive(Debug)]
pub struct KmsCalls {
    counts: [[AtomicU64; OUTCOMES]; OPERATIONS],
}

impl Default for KmsCalls {
    fn default() -> Self {
        KmsCalls {
            counts: [const { [const { AtomicU64::new(0) }; OUTCOMES] }; OPERATIONS],
        }
    }
}

/// The index of `name` in [`KMS_CALL_OUTCOMES`] (`other` when absent).
fn outcome_index(name: &str) -> usize {
    KMS_CALL_OUTCOMES
        .iter()
        .position(|o| *o == name)
        .unwrap_or(OUTCOMES - 1)
}

/// The outcome label of a failed call.
pub fn outcome_of(err: &KmsError) -> &'static str {
    let name = match err {
        KmsError::Service { code, .. } => match code {
            // Unknown or missing codes never become labels of their own.
            KmsErrorCode::Other(_) | KmsErrorCode::Missing { .. } => "other",
            known => known.as_str(),
        },
        KmsError::ProxyConnect(_) => "proxy_connect",
        KmsError::Tls(_) => "tls",
        KmsError::Transport(_) => "transport",
        KmsError::Timeout(_) => "timeout",
        KmsError::Credentials(_) => "credentials",
        KmsError::BreakerOpen { .. } => "breaker_open",
        _ => "other",
    };
    KMS_CALL_OUTCOMES[outcome_index(name)]
}

impl KmsCalls {
    /// Counts one call of `operation` that ended as `outcome` (`ok` or
    /// [`outcome_of`] an error).
    pub fn count(&self, operation: KmsOperation, outcome: &str) {
        if let Some(row) = self.counts.get(operation.index())
            && let Some(cell) = row.get(outcome_index(outcome))
        {
            cell.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The non-zero counts, for `Status`.
    pub fn snapshot(&self) -> KmsCallStats {
        let mut calls = Vec::new();
        for (operation, row) in KMS_OPERATIONS.iter().zip(&self.counts) {
            for (outcome, cell) in KMS_CALL_OUTCOMES.iter().zip(row) {
                let count = cell.load(Ordering::Relaxed);
                if count > 0 {
                    calls.push(KmsCallCount {
                        operation: (*operation).to_owned(),
                        outcome: (*outcome).to_owned(),
                        count,
                    });
                }
            }
        }
        KmsCallStats { calls }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(code: Option<&str>) -> KmsError {
        KmsError::Service {
            code: KmsErrorCode::parse(code, 400),
            message: String::new(),
            status: 400,
            hint: None,
        }
    }

    #[test]
    fn outcomes_are_known_types_or_other() {
        assert_eq!(
            outcome_of(&service(Some("ThrottlingException"))),
            "ThrottlingException"
        );
        assert_eq!(
            outcome_of(&service(Some("com.amazon#KMSInternalException"))),
            "KMSInternalException"
        );
        // A code KMS never sends, even one spelled like a label, is other.
        assert_eq!(outcome_of(&service(Some("ok"))), "other");
        assert_eq!(outcome_of(&service(Some("SomethingNew"))), "other");
        assert_eq!(outcome_of(&service(None)), "other");
        assert_eq!(outcome_of(&KmsError::Timeout("slow".into())), "timeout");
        assert_eq!(
            outcome_of(&KmsError::BreakerOpen {
                retry_in: std::time::Duration::from_secs(1),
                last_failure: "throttled".into(),
            }),
            "breaker_open"
        );
        for outcome in KMS_CALL_OUTCOMES {
            assert_eq!(KMS_CALL_OUTCOMES[outcome_index(outcome)], *outcome);
        }
    }

    #[test]
    fn counts_show_only_what_happened() {
        let calls = KmsCalls::default();
        assert!(calls.snapshot().calls.is_empty());
        calls.count(KmsOperation::Decrypt, "ok");
        calls.count(KmsOperation::Decrypt, "ok");
        calls.count(KmsOperation::Decrypt, "ThrottlingException");
        calls.count(KmsOperation::Decrypt, "not-a-label");
        let snapshot = calls.snapshot();
        let get = |outcome: &str| {
            snapshot
                .calls
                .iter()
                .find(|c| c.outcome == outcome)
                .map(|c| (c.operation.as_str(), c.count))
        };
        assert_eq!(get("ok"), Some(("Decrypt", 2)));
        assert_eq!(get("ThrottlingException"), Some(("Decrypt", 1)));
        assert_eq!(get("other"), Some(("Decrypt", 1)));
        assert_eq!(snapshot.calls.len(), 3);
    }
}
