//! A circuit breaker around KMS calls (DESIGN.md, "Serve-last-good and the
//! breaker (issue 15)").
//!
//! After [`BreakerConfig::failure_threshold`] consecutive calls that failed
//! by the service's fault (throttling, 5xx, timeouts, connection errors) the
//! breaker opens: calls fail at once with [`KmsError::BreakerOpen`](super::KmsError::BreakerOpen)
//! instead of adding to a throttling or failing KMS. After a jittered wait
//! one call goes through as a half-open probe (the others still fail fast);
//! its success closes the breaker, its failure opens it again with a wait
//! twice as long, bounded by [`BreakerConfig::max_open`]. An answer from KMS
//! that refuses the call (`AccessDenied`, `InvalidCiphertext`, ...) is an
//! answer, so it counts as the service working.
//!
//! The state machine ([`BreakerCore`]) takes the time and the jitter as
//! arguments, so it is tested with a fake clock and no sleeps.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Default consecutive service failures that open the breaker.
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 5;
/// Default first open period (before jitter).
pub const DEFAULT_INITIAL_OPEN: Duration = Duration::from_secs(1);
/// Default longest open period.
pub const DEFAULT_MAX_OPEN: Duration = Duration::from_secs(60);

/// When the breaker opens and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive service failures that open it (0: the breaker is off).
    pub failure_threshold: u32,
    /// Open period after the first opening; doubles per failed probe.
    pub initial_open: Duration,
    /// Longest open period.
    pub max_open: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            initial_open: DEFAULT_INITIAL_OPEN,
            max_open: DEFAULT_MAX_OPEN,
        }
    }
}

impl BreakerConfig {
    /// Refuses periods that would make the breaker spin or never probe.
    pub fn validate(&self) -> Result<(), String> {
        if self.initial_open.is_zero() {
            return Err("the breaker's initial open period must be > 0".to_owned());
        }
        if self.max_open < self.initial_open {
            return Err("the breaker's max open period must be >= its initial one".to_owned());
        }
        Ok(())
    }
}

/// The breaker's state, as `status` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls fail fast until the wait is over.
    Open,
    /// One probe call is in flight; the others fail fast.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `open` or `half-open`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        }
    }
}

/// How a call that went through ended, for the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// KMS answered (success or a refusal).
    Answered,
    /// The service failed (throttling, 5xx, timeout, connection).
    Fault,
    /// The call says nothing about KMS (e.g. no credentials).
    Neutral,
}

/// A snapshot for `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerSnapshot {
    /// The state.
    pub state: BreakerState,
    /// Service failures in a row.
    pub consecutive_failures: u32,
    /// While open: time until the next probe may go.
    pub next_probe_in: Option<Duration>,
    /// Times the breaker opened since start.
    pub opened: u64,
}

/// Why a call may not go through now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// When a call may be tried again.
    pub retry_in: Duration,
}

/// The permit a call got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// A normal call (breaker closed).
    Call,
    /// The one half-open probe.
    Probe,
}

#[derive(Clone, Copy, Debug)]
enum Phase {
    Closed,
    Open { until: Instant },
    HalfOpen { since: Instant },
}

/// The state machine; every method takes the current time.
#[derive(Debug)]
pub struct BreakerCore {
    config: BreakerConfig,
    phase: Phase,
    consecutive: u32,
    /// Open period before jitter for the next opening.
    next_open: Duration,
    opened: u64,
}

impl BreakerCore {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> BreakerCore {
        BreakerCore {
            config,
            phase: Phase::Closed,
            consecutive: 0,
            next_open: config.initial_open,
            opened: 0,
        }
    }

    /// Whether a call may go now, and as what.
    pub fn admit(&mut self, now: Instant) -> Result<Admit, Rejected> {
        match self.phase {
            Phase::Closed => Ok(Admit::Call),
            Phase::Open { until } if now < until => Err(Rejected {
                retry_in: until - now,
            }),
            Phase::Open { .. } => {
                self.phase = Phase::HalfOpen { since: now };
                Ok(Admit::Probe)
            }
            // Only one probe at a time; the caller learns of its result
            // by trying again shortly.
            Phase::HalfOpen { since } => {
                // A probe outlives the SDK's operation timeout only if its
                // task was lost; do not stay half-open forever then.
                if now.saturating_duration_since(since) > self.config.max_open {
                    self.phase = Phase::HalfOpen { since: now };
                    return Ok(Admit::Probe);
                }
                Err(Rejected {
                    retry_in: self.config.initial_open,
                })
            }
        }
    }

    /// Records how an admitted call ended. `jitter` maps the open period's
    /// ceiling to the actual wait (kept within `ceiling/2..=ceiling`).
    pub fn record(
        &mut self,
        now: Instant,
        admit: Admit,
        outcome: Outcome,
        jitter: impl FnOnce(Duration) -> Duration,
    ) {
        match outcome {
            Outcome::Answered => {
                self.consecutive = 0;
                self.next_open = self.config.initial_open;
                self.phase = Phase::Closed;
            }
            Outcome::Neutral => {
                if admit == Admit::Probe {
                    // The probe learned nothing: the next call probes again.
                    self.phase = Phase::Open { until: now };
                }
            }
            Outcome::Fault => {
                self.consecutive = self.consecutive.saturating_add(1);
                let trips = match self.phase {
                    Phase::Closed => {
                        self.config.failure_threshold > 0
                            && self.consecutive >= self.config.failure_threshold
                    }
                    Phase::HalfOpen { .. } => admit == Admit::Probe,
                    // A call admitted before the breaker opened: already open.
                    Phase::Open { .. } => false,
                };
                if trips {
                    let ceiling = self.next_open;
                    let wait = jitter(ceiling).clamp(ceiling / 2, ceiling);
                    self.phase = Phase::Open {
                        until: now.checked_add(wait).unwrap_or(now),
                    };
                    self.opened = self.opened.saturating_add(1);
                    self.next_open = ceiling.saturating_mul(2).min(self.config.max_open);
                }
            }
        }
    }

    /// The breaker's state at `now`.
    pub fn snapshot(&self, now: Instant) -> BreakerSnapshot {
        let (state, next_probe_in) = match self.phase {
            Phase::Closed => (BreakerState::Closed, None),
            Phase::Open { until } => (
                BreakerState::Open,
                Some(until.saturating_duration_since(now)),
            ),
            Phase::HalfOpen { .. } => (BreakerState::HalfOpen, None),
        };
        BreakerSnapshot {
            state,
            consecutive_failures: self.consecutive,
            next_probe_in,
            opened: self.opened,
        }
    }
}

/// The breaker on the real clock, shared by the KMS client's clones.
#[derive(Debug)]
pub struct Breaker {
    core: Mutex<BreakerCore>,
}

/// An admitted call. Dropped without [`Permit::finish`] (the call's future
/// was cancelled) it counts as [`Outcome::Neutral`], so a lost probe does not
/// leave the breaker half-open.
#[derive(Debug)]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    admit: Admit,
    done: bool,
}

impl Permit<'_> {
    /// Records how the call ended.
    pub fn finish(mut self, outcome: Outcome) {
        self.done = true;
        self.breaker.record(self.admit, outcome);
    }

    /// Whether this call is the half-open probe.
    pub fn is_probe(&self) -> bool {
        self.admit == Admit::Probe
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.breaker.record(self.admit, Outcome::Neutral);
        }
    }
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Breaker {
        Breaker {
            core: Mutex::new(BreakerCore::new(config)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerCore> {
        // The core's methods do not panic; a poisoned lock still holds a
        // consistent state.
        self.core
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admits a call, or says when to try again.
    pub fn admit(&self) -> Result<Permit<'_>, Rejected> {
        let admit = self.lock().admit(Instant::now())?;
        Ok(Permit {
            breaker: self,
            admit,
            done: false,
        })
    }

    fn record(&self, admit: Admit, outcome: Outcome) {
        self.lock()
            .record(Instant::now(), admit, outcome, equal_jitter);
    }

    /// The state now.
    pub fn snapshot(&self) -> BreakerSnapshot {
        self.lock().snapshot(Instant::now())
    }
}

/// Uniform in `ceiling/2..=ceiling`: spreads enclaves behind one KMS apart
/// while keeping a floor, so an open breaker really waits.
fn equal_jitter(ceiling: Duration) -> Duration {
    let micros = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
    Duration::from_micros(rand::random_range(micros / 2..=micros))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn config() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 3,
            initial_open: SEC,
            max_open: 8 * SEC,
        }
    }

    /// The longest wait: the jitter's ceiling.
    fn top(c: Duration) -> Duration {
        c
    }

    /// One call admitted at `now` that ends with `outcome`.
    fn call(core: &mut BreakerCore, now: Instant, outcome: Outcome) {
        let admit = core.admit(now).unwrap();
        core.record(now, admit, outcome, top);
    }

    fn fail(core: &mut BreakerCore, now: Instant) {
        call(core, now, Outcome::Fault);
    }

    /// A breaker of [`config`] that `threshold` faults at `t0` opened.
    fn opened() -> (BreakerCore, Instant) {
        let t0 = Instant::now();
        let mut core = BreakerCore::new(config());
        for _ in 0..config().failure_threshold {
            fail(&mut core, t0);
        }
        (core, t0)
    }

    #[test]
    fn opens_after_threshold_consecutive_faults_only() {
        let t0 = Instant::now();
        let mut core = BreakerCore::new(config());
        fail(&mut core, t0);
        fail(&mut core, t0);
        // An answer (even a refusal) resets the count.
        call(&mut core, t0, Outcome::Answered);
        fail(&mut core, t0);
        fail(&mut core, t0);
        assert_eq!(core.snapshot(t0).state, BreakerState::Closed);
        assert_eq!(core.snapshot(t0).consecutive_failures, 2);
        fail(&mut core, t0);
        let snap = core.snapshot(t0);
        assert_eq!(snap.state, BreakerState::Open);
        assert_eq!(snap.next_probe_in, Some(SEC));
        assert_eq!(snap.opened, 1);
        assert_eq!(
            core.admit(t0 + SEC / 2),
            Err(Rejected { retry_in: SEC / 2 })
        );
    }

    #[test]
    fn neutral_outcomes_do_not_count() {
        let t0 = Instant::now();
        let mut core = BreakerCore::new(config());
        for _ in 0..10 {
            call(&mut core, t0, Outcome::Neutral);
        }
        assert_eq!(core.snapshot(t0).state, BreakerState::Closed);
        assert_eq!(core.snapshot(t0).consecutive_failures, 0);
    }

    #[test]
    fn one_probe_then_closed_on_success() {
        let (mut core, t0) = opened();
        let t1 = t0 + SEC;
        assert_eq!(core.admit(t1), Ok(Admit::Probe));
        assert_eq!(core.snapshot(t1).state, BreakerState::HalfOpen);
        // Everyone else still fails fast while the probe is out.
        assert!(core.admit(t1).is_err());
        core.record(t1, Admit::Probe, Outcome::Answered, top);
        let snap = core.snapshot(t1);
        assert_eq!(snap.state, BreakerState::Closed);
        assert_eq!(snap.consecutive_failures, 0);
        assert_eq!(core.admit(t1), Ok(Admit::Call));
        // A later opening starts from the initial period again.
        for _ in 0..3 {
            fail(&mut core, t1);
        }
        assert_eq!(core.snapshot(t1).next_probe_in, Some(SEC));
    }

    #[test]
    fn failed_probes_back_off_exponentially_up_to_the_bound() {
        let (mut core, t0) = opened();
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..6 {
            let wait = core.snapshot(now).next_probe_in.unwrap();
            waits.push(wait);
            now += wait;
            assert_eq!(core.admit(now), Ok(Admit::Probe));
            core.record(now, Admit::Probe, Outcome::Fault, top);
        }
        assert_eq!(
            waits,
            vec![SEC, 2 * SEC, 4 * SEC, 8 * SEC, 8 * SEC, 8 * SEC]
        );
        assert_eq!(core.snapshot(now).opened, 7);
    }

    #[test]
    fn jitter_is_kept_between_half_and_the_ceiling() {
        let t0 = Instant::now();
        let mut core = BreakerCore::new(config());
        fail(&mut core, t0);
        fail(&mut core, t0);
        let admit = core.admit(t0).unwrap();
        core.record(t0, admit, Outcome::Fault, |_| Duration::ZERO);
        assert_eq!(core.snapshot(t0).next_probe_in, Some(SEC / 2));
        let t1 = t0 + SEC / 2;
        assert_eq!(core.admit(t1), Ok(Admit::Probe));
        core.record(t1, Admit::Probe, Outcome::Fault, |_| 100 * SEC);
        assert_eq!(core.snapshot(t1).next_probe_in, Some(2 * SEC));
        // The real jitter stays in range too.
        for _ in 0..100 {
            let j = equal_jitter(SEC);
            assert!(j >= SEC / 2 && j <= SEC, "{j:?}");
        }
    }

    #[test]
    fn a_probe_that_learns_nothing_lets_the_next_call_probe() {
        let (mut core, t0) = opened();
        let t1 = t0 + SEC;
        assert_eq!(core.admit(t1), Ok(Admit::Probe));
        core.record(t1, Admit::Probe, Outcome::Neutral, top);
        assert_eq!(core.admit(t1), Ok(Admit::Probe));
    }

    #[test]
    fn a_dropped_permit_releases_the_probe() {
        let breaker = Breaker::new(BreakerConfig {
            failure_threshold: 1,
            initial_open: Duration::from_nanos(1),
            max_open: Duration::from_nanos(1),
        });
        breaker.admit().unwrap().finish(Outcome::Fault);
        // The open period is a nanosecond: the next admit is the probe
        // once any time has passed; loop until it is, bounded.
        let mut probe = None;
        for _ in 0..1000 {
            if let Ok(p) = breaker.admit() {
                probe = Some(p);
                break;
            }
            std::thread::yield_now();
        }
        let probe = probe.unwrap();
        assert!(probe.is_probe());
        drop(probe);
        assert_ne!(breaker.snapshot().state, BreakerState::HalfOpen);
    }

    #[test]
    fn a_zero_threshold_never_opens() {
        let t0 = Instant::now();
        let mut core = BreakerCore::new(BreakerConfig {
            failure_threshold: 0,
            ..config()
        });
        for _ in 0..100 {
            fail(&mut core, t0);
        }
        assert_eq!(core.snapshot(t0).state, BreakerState::Closed);
        assert!(config().validate().is_ok());
        assert!(
            BreakerConfig {
                initial_open: Duration::ZERO,
                ..config()
            }
            .validate()
            .is_err()
        );
    }
}
