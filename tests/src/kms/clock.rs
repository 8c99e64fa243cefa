//! The emulator's clock: the wall clock plus an offset tests can advance,
//! so a document or a signature can be made to look old without waiting.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Wall clock plus an adjustable forward offset.
#[derive(Debug, Default)]
pub struct Clock {
    offset_ms: AtomicU64,
}

impl Clock {
    /// The emulator's current time.
    pub fn now(&self) -> SystemTime {
        SystemTime::now() + self.offset()
    }

    /// How far the clock is ahead of the wall clock.
    pub fn offset(&self) -> Duration {
        Duration::from_millis(self.offset_ms.load(Ordering::Relaxed))
    }

    /// Moves the clock forward by `by`; returns the new offset.
    pub fn advance(&self, by: Duration) -> Duration {
        let add = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        let previous = self
            .offset_ms
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |ms| {
                Some(ms.saturating_add(add))
            })
            .unwrap_or_else(|ms| ms);
        Duration::from_millis(previous.saturating_add(add))
    }

    /// Puts the clock back on the wall clock.
    pub fn reset(&self) {
        self.offset_ms.store(0, Ordering::Relaxed);
    }
}
