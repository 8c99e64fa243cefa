//! Fault injection and call accounting.
//!
//! A [`Fault`] is a misbehaviour (added latency, `ThrottlingException`,
//! `KMSInternalException`, a connection closed without an answer) applied
//! to the next N calls or to a random fraction of calls, optionally only to
//! one operation. [`Faults`] holds the active ones; [`CallStats`] counts
//! what the emulator saw, per operation.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use rand::TryRng;
use serde::{Deserialize, Serialize};

use super::protocol::Operation;

/// Longest latency one fault may add (bounds how long a request can hang).
pub const MAX_LATENCY: Duration = Duration::from_secs(60);
/// Most faults active at once.
pub const MAX_FAULTS: usize = 256;

/// What a fault does to a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// Wait this long before handling the call (combines with the others).
    Latency(Duration),
    /// Answer `ThrottlingException` (HTTP 400).
    Throttle,
    /// Answer `KMSInternalException` (HTTP 500).
    InternalError,
    /// Close the connection without answering.
    DropConnection,
}

/// Which calls a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Trigger {
    /// The next N matching calls.
    Next(u32),
    /// Each matching call with this probability (0.0 to 1.0), until cleared.
    Fraction(f64),
}

/// A fault to inject.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fault {
    /// What happens.
    pub kind: FaultKind,
    /// To which calls.
    pub trigger: Trigger,
    /// Only calls of this operation (all operations if `None`).
    pub operation: Option<Operation>,
}

impl Fault {
    /// A fault of `kind` for the next call of any operation.
    pub fn new(kind: FaultKind) -> Self {
        Self {
            kind,
            trigger: Trigger::Next(1),
            operation: None,
        }
    }

    /// Adds `delay` to the next call.
    pub fn latency(delay: Duration) -> Self {
        Self::new(FaultKind::Latency(delay))
    }

    /// Throttles the next call.
    pub fn throttle() -> Self {
        Self::new(FaultKind::Throttle)
    }

    /// Fails the next call with `KMSInternalException` (HTTP 500).
    pub fn internal_error() -> Self {
        Self::new(FaultKind::InternalError)
    }

    /// Drops the connection of the next call.
    pub fn drop_connection() -> Self {
        Self::new(FaultKind::DropConnection)
    }

    /// Applies to the next `n` matching calls.
    #[must_use]
    pub fn next(mut self, n: u32) -> Self {
        self.trigger = Trigger::Next(n);
        self
    }

    /// Applies to each matching call with probability `fraction` (clamped
    /// to 0.0..=1.0; NaN counts as 0).
    #[must_use]
    pub fn fraction(mut self, fraction: f64) -> Self {
        let fraction = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        };
        self.trigger = Trigger::Fraction(fraction);
        self
    }

    /// Applies only to calls of `operation`.
    #[must_use]
    pub fn on(mut self, operation: Operation) -> Self {
        self.operation = Some(operation);
        self
    }
}

/// What the server must do with one call after consulting the faults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Total latency to add first.
    pub delay: Duration,
    /// The failure to produce instead of handling the call, if any.
    pub failure: Option<FaultKind>,
}

/// The active faults.
#[derive(Debug, Default)]
pub struct Faults {
    active: Mutex<Vec<Fault>>,
}

impl Faults {
    /// Adds a fault; returns false (and ignores it) over [`MAX_FAULTS`].
    pub fn inject(&self, mut fault: Fault) -> bool {
        if let FaultKind::Latency(d) = &mut fault.kind {
            *d = (*d).min(MAX_LATENCY);
        }
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        if active.len() >= MAX_FAULTS {
            return false;
        }
        active.push(fault);
        true
    }

    /// Removes every fault.
    pub fn clear(&self) {
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// How many faults are still active.
    pub fn pending(&self) -> usize {
        self.active.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Decides the fate of one call of `operation`, consuming the faults
    /// that fire: every firing latency adds up; the first firing failure
    /// wins and later failures are left for later calls.
    pub fn decide(&self, operation: Operation) -> Decision {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        let mut decision = Decision::default();
        active.retain_mut(|fault| {
            if fault.operation.is_some_and(|op| op != operation) {
                return true;
            }
            let is_failure = !matches!(fault.kind, FaultKind::Latency(_));
            if is_failure && decision.failure.is_some() {
                return true;
            }
            let (fires, keep) = match &mut fault.trigger {
                Trigger::Next(0) => (false, false),
                Trigger::Next(n) => {
                    *n -= 1;
                    (true, *n > 0)
                }
                Trigger::Fraction(p) => (random_unit() < *p, true),
            };
            if fires {
                match fault.kind {
                    FaultKind::Latency(d) => decision.delay = decision.delay.saturating_add(d),
                    kind => decision.failure = Some(kind),
                }
            }
            keep
        });
        decision
    }
}

/// A uniform sample in [0, 1); 1.0 (never below any fraction) if the
/// random source fails, so a failing source never injects faults.
fn random_unit() -> f64 {
    let mut bytes = [0u8; 8];
    match rand::rngs::SysRng.try_fill_bytes(&mut bytes) {
        // 53 random bits scaled to [0, 1); the conversion is exact.
        #[allow(clippy::cast_precision_loss)]
        Ok(()) => (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64,
        Err(_) => 1.0,
    }
}

/// What the emulator saw for one operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallStats {
    /// Calls received (including faulted and refused ones).
    pub calls: u64,
    /// Calls whose request carried a `Recipient`.
    pub with_recipient: u64,
    /// Successful responses that carried `Plaintext`.
    pub plaintext_responses: u64,
    /// Calls answered with an error (injected or not).
    pub errors: u64,
    /// Calls a fault failed or dropped.
    pub faulted: u64,
}

/// Per-operation counters.
#[derive(Debug, Default)]
pub struct CallCounter {
    stats: Mutex<BTreeMap<Operation, CallStats>>,
}

impl CallCounter {
    /// Applies `f` to the counters of `operation`.
    pub fn update(&self, operation: Operation, f: impl FnOnce(&mut CallStats)) {
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        f(stats.entry(operation).or_default());
    }

    /// The counters of `operation`.
    pub fn get(&self, operation: Operation) -> CallStats {
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&operation)
            .copied()
            .unwrap_or_default()
    }

    /// Every operation's counters (operations never called are absent).
    pub fn all(&self) -> BTreeMap<Operation, CallStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Zeroes every counter.
    pub fn reset(&self) {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_n_fires_n_times_on_matching_operation_only() {
        let faults = Faults::default();
        faults.inject(Fault::throttle().next(2).on(Operation::Decrypt));
        assert_eq!(faults.decide(Operation::Encrypt).failure, None);
        assert_eq!(
            faults.decide(Operation::Decrypt).failure,
            Some(FaultKind::Throttle)
        );
        assert_eq!(
            faults.decide(Operation::Decrypt).failure,
            Some(FaultKind::Throttle)
        );
        assert_eq!(faults.decide(Operation::Decrypt).failure, None);
        assert_eq!(faults.pending(), 0);
    }

    #[test]
    fn latency_adds_up_and_first_failure_wins() {
        let faults = Faults::default();
        faults.inject(Fault::latency(Duration::from_millis(10)));
        faults.inject(Fault::latency(Duration::from_millis(5)));
        faults.inject(Fault::internal_error());
        faults.inject(Fault::drop_connection());
        let d = faults.decide(Operation::Encrypt);
        assert_eq!(d.delay, Duration::from_millis(15));
        assert_eq!(d.failure, Some(FaultKind::InternalError));
        let d = faults.decide(Operation::Encrypt);
        assert_eq!(d.delay, Duration::ZERO);
        assert_eq!(d.failure, Some(FaultKind::DropConnection));
        assert_eq!(faults.decide(Operation::Encrypt), Decision::default());
    }

    #[test]
    fn fractions() {
        let faults = Faults::default();
        faults.inject(Fault::throttle().fraction(0.0));
        assert!((0..200).all(|_| faults.decide(Operation::Encrypt).failure.is_none()));
        faults.clear();
        faults.inject(Fault::throttle().fraction(1.0));
        assert!((0..200).all(|_| faults.decide(Operation::Encrypt).failure.is_some()));
        faults.clear();
        faults.inject(Fault::throttle().fraction(0.5));
        let hits = (0..2000)
            .filter(|_| faults.decide(Operation::Encrypt).failure.is_some())
            .count();
        assert!((800..1200).contains(&hits), "{hits}");
        assert_eq!(
            Fault::throttle().fraction(f64::NAN).trigger,
            Trigger::Fraction(0.0)
        );
    }
}
