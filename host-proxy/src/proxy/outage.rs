//! How the daemon's polling tasks (the audit drain, the enclave log relay)
//! report a failing enclave: once per outage at warn level, then quietly,
//! and once when it ends, so a long outage does not flood the journal.

use std::fmt::Display;

/// One polling task's outage state.
#[derive(Debug)]
pub struct Outage {
    task: &'static str,
    failing: bool,
}

impl Outage {
    /// A task named `task` in its log lines (e.g. `audit drain`).
    pub fn new(task: &'static str) -> Self {
        Outage {
            task,
            failing: false,
        }
    }

    /// A poll succeeded.
    pub fn ok(&mut self) {
        if self.failing {
            tracing::info!("{} recovered", self.task);
            self.failing = false;
        }
    }

    /// A poll failed with `err` (never secret: these are transport and
    /// protocol errors).
    pub fn failed(&mut self, err: &dyn Display) {
        if self.failing {
            tracing::debug!(error = %err, "{} still failing", self.task);
        } else {
            tracing::warn!(error = %err, "{} failed; retrying every poll", self.task);
        }
        self.failing = true;
    }
}
