//! What a streamed upload tells the proxy while it passes: its progress, a
//! break on the client's side, and the `model` read from its first bytes.
//! The upload body ([`crate::body::UploadBody`]) writes it; the proxy's
//! timeouts and the [`Meter`](super::Meter) read it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What a streamed upload tells the proxy while it passes.
#[derive(Debug)]
pub struct Upload {
    started: Instant,
    /// Microseconds after `started` of the last upload progress (or its end).
    active_at: AtomicU64,
    /// The client's side of the upload broke (it left, or sent bad framing).
    failed: AtomicBool,
    /// Bytes passed on so far.
    bytes: AtomicU64,
    /// It broke because the client sent nothing for the body timeout.
    timed_out: AtomicBool,
    /// The `model` form field (multipart) or JSON member, once seen.
    pub model: OnceLock<String>,
}

impl Upload {
    /// An upload starting now.
    pub(crate) fn new() -> Upload {
        Upload {
            started: Instant::now(),
            active_at: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            bytes: AtomicU64::new(0),
            timed_out: AtomicBool::new(false),
            model: OnceLock::new(),
        }
    }

    /// When the upload last moved.
    pub fn last_activity(&self) -> Instant {
        self.started + Duration::from_micros(self.active_at.load(Ordering::Relaxed))
    }

    /// Whether the client's upload broke.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// The upload moved (or ended).
    pub(crate) fn touch(&self) {
        let us = self.started.elapsed().as_micros() as u64;
        self.active_at.store(us, Ordering::Relaxed);
    }

    /// Bytes uploaded so far (all of them once the upload ended).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// `n` more bytes passed.
    pub(crate) fn add(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The client's side of the upload broke.
    pub(crate) fn fail(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }

    /// Whether the upload broke because the client stalled.
    pub fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::Relaxed)
    }

    /// The client sent nothing for the body timeout.
    pub(crate) fn time_out(&self) {
        self.timed_out.store(true, Ordering::Relaxed);
        self.fail();
    }
}
