//! The latest upstream rate limits: set on the request path as raw headers,
//! parsed only when read (`/ratelimits`, a `/metrics` scrape, the writer),
//! and flagged when they changed since the writer last stored them.

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use crate::ratelimit::{RateLimits, Raw};

/// The latest rate limits, and whether they changed since last written.
pub(super) struct Latest {
    value: Mutex<LatestValue>,
    dirty: AtomicBool,
}

struct LatestValue {
    /// Headers not parsed yet, newer than `parsed`.
    raw: Option<Raw>,
    /// The last limits that parsed.
    parsed: Option<RateLimits>,
}

impl Latest {
    /// Starts from the limits stored last time (not dirty: they are stored).
    pub(super) fn new(stored: Option<RateLimits>) -> Latest {
        Latest {
            value: Mutex::new(LatestValue {
                raw: None,
                parsed: stored,
            }),
            dirty: AtomicBool::new(false),
        }
    }

    /// Keeps new headers, unparsed.
    pub(super) fn set(&self, raw: Raw) {
        self.value.lock().raw = Some(raw);
        self.dirty.store(true, Ordering::Release);
    }

    /// The latest limits that parsed.
    pub(super) fn get(&self) -> Option<RateLimits> {
        let mut v = self.value.lock();
        if let Some(rl) = v.raw.take().and_then(|r| r.parse()) {
            v.parsed = Some(rl);
        }
        v.parsed.clone()
    }

    /// Takes limits another instance stored, unless this one holds newer
    /// ones not written yet (its own then win, and are stored next).
    pub(super) fn adopt(&self, stored: RateLimits) {
        let mut v = self.value.lock();
        if v.raw.is_none() && !self.dirty.load(Ordering::Acquire) {
            v.parsed = Some(stored);
        }
    }

    /// The latest limits if they changed since the last call (for the writer).
    pub(super) fn take_changed(&self) -> Option<RateLimits> {
        if self.dirty.swap(false, Ordering::AcqRel) {
            self.get()
        } else {
            None
        }
    }
}
