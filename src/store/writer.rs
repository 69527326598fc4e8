//! The writer thread: the only writer of records. It prices each record,
//! gathers records for a short group-commit window, writes them in one
//! transaction with their rollups and the latest rate limits, retries until
//! the database takes them, deletes records past retention a little at a
//! time, and logs one access line per written record.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use parking_lot::RwLock;
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::backend::{Backend, StoreError};
use super::ratelimits::Latest;
use crate::metrics::Metrics;
use crate::pricing::{Price, PriceTable};
use crate::ratelimit::RateLimits;
use crate::record::{Priced, Record, Rejected};

/// Most records in one transaction.
const MAX_BATCH: usize = 8192;

/// How long the writer gathers records before a commit. Records are in memory
/// (and counted in budgets) from the moment they are queued; this only delays
/// when they reach the database, by at most this much. Each commit briefly
/// takes a core from the request path: at concurrency 1 on two cores, 10 ms
/// windows doubled p99 latency against 50 ms (BENCHMARKS.md).
const COMMIT_WINDOW: Duration = Duration::from_millis(50);

/// What the store sends the writer (through the estimator for records that
/// need estimating, and for flushes and shutdown).
pub(super) enum Msg {
    Record(Box<Record>, OwnedSemaphorePermit),
    Price {
        model: String,
        price: Price,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    Flush(oneshot::Sender<()>),
    Rejected(Rejected),
    Shutdown,
}

/// What the writer reports about itself.
#[derive(Default)]
pub(super) struct Health {
    /// The last write attempt failed.
    pub(super) failing: AtomicBool,
}

/// What the writer holds until the next commit.
struct Pending {
    rejections: Vec<Rejected>,
    batch: Vec<Priced>,
    permits: Vec<OwnedSemaphorePermit>,
    ratelimits: Option<RateLimits>,
    flushes: Vec<oneshot::Sender<()>>,
}

/// What the writer thread shares with the store handle.
pub(super) struct Writer {
    /// The price table records are priced with; the writer replaces it when
    /// a price changes.
    pub(super) prices: Arc<RwLock<PriceTable>>,
    /// Rate limits to store with the next batch.
    pub(super) latest: Arc<Latest>,
    /// Batch and write-error counters.
    pub(super) metrics: Arc<Metrics>,
    /// Read by readiness.
    pub(super) health: Arc<Health>,
    /// How long records are kept, if not forever.
    pub(super) retain: Option<Duration>,
}

/// Records deleted per retention step: small, so writes never wait long.
const RETENTION_BATCH: usize = 5000;

impl Writer {
    /// Deletes one batch of records past retention; returns when to run next.
    fn retention_step(&self, backend: &mut impl Backend, retain: Duration) -> Instant {
        let cutoff = crate::timestamp::now_ms() - retain.as_millis() as i64;
        match backend.delete_before(cutoff, RETENTION_BATCH) {
            Ok(n) if n == RETENTION_BATCH => Instant::now() + Duration::from_millis(20),
            Ok(n) => {
                if n > 0 {
                    tracing::info!(deleted = n, "retention: deleted old records (rollups kept)");
                }
                Instant::now() + Duration::from_secs(60)
            }
            Err(e) => {
                tracing::warn!(error = %e, "retention: delete failed; will retry");
                Instant::now() + Duration::from_secs(60)
            }
        }
    }

    /// Starts the writer thread over `backend`, reading `rx`.
    pub(super) fn spawn(
        self,
        backend: impl Backend,
        rx: Receiver<Msg>,
    ) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("tollgate-writer".into())
            .spawn(move || self.run(backend, rx))
    }

    fn run(self, mut backend: impl Backend, rx: Receiver<Msg>) {
        let mut p = Pending {
            rejections: Vec::new(),
            batch: Vec::with_capacity(MAX_BATCH),
            permits: Vec::with_capacity(MAX_BATCH),
            ratelimits: None,
            flushes: Vec::new(),
        };
        let mut shutting_down = false;
        let mut next_retention = Instant::now();
        loop {
            let first = if shutting_down {
                match rx.try_recv() {
                    Ok(m) => m,
                    Err(_) => break,
                }
            } else if let Some(retain) = self.retain {
                if Instant::now() >= next_retention {
                    next_retention = self.retention_step(&mut backend, retain);
                }
                match rx.recv_deadline(next_retention) {
                    Ok(m) => m,
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                    Err(_) => break,
                }
            } else {
                match rx.recv() {
                    Ok(m) => m,
                    Err(_) => break,
                }
            };
            let mut next = Some(first);
            let window_end = Instant::now() + COMMIT_WINDOW;
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Record(r, permit) => {
                        let (cost, priced) = r.cost(&self.prices.read());
                        let mut r = *r;
                        if let Some(h) = r.hold.take() {
                            h.settle(cost, r.usage.query.saturating_add(r.usage.answer));
                        }
                        p.batch.push(Priced {
                            record: r,
                            cost,
                            priced,
                        });
                        p.permits.push(permit);
                    }
                    Msg::Flush(reply) => p.flushes.push(reply),
                    Msg::Rejected(r) => p.rejections.push(r),
                    Msg::Price {
                        model,
                        price,
                        reply,
                    } => {
                        // Records before the change are written under the old
                        // prices first, so the re-pricing below sees them.
                        self.commit(&mut backend, &mut p, shutting_down);
                        let mut table = self.prices.read().clone();
                        table.insert(&model, price);
                        let res = backend.set_price(&model, &price, &table);
                        if res.is_ok() {
                            *self.prices.write() = table;
                        }
                        let _ = reply.send(res);
                    }
                    Msg::Shutdown => shutting_down = true,
                }
                if p.batch.len() < MAX_BATCH {
                    next = rx.try_recv().ok();
                    // Group commit: a commit costs about as much for one record as
                    // for hundreds, so a trickle waits briefly for company. It
                    // sleeps rather than blocks on the channel, so that senders
                    // meanwhile do not wake this thread once per record. A flush
                    // (a report about to read) or shutdown does not wait.
                    if next.is_none()
                        && !shutting_down
                        && p.flushes.is_empty()
                        && !p.batch.is_empty()
                    {
                        let now = Instant::now();
                        if now < window_end {
                            std::thread::sleep(window_end - now);
                            next = rx.try_recv().ok();
                        }
                    }
                }
            }
            self.commit(&mut backend, &mut p, shutting_down);
        }
        self.commit(&mut backend, &mut p, true);
    }

    /// Writes what is pending, retrying until it succeeds: records are never
    /// dropped while the process lives. While this retries, the queue fills and
    /// new requests wait for room (backpressure). At shutdown it gives up after a
    /// bounded number of attempts and says how many records were lost.
    fn commit(&self, backend: &mut impl Backend, p: &mut Pending, shutting_down: bool) {
        p.ratelimits = self.latest.take_changed();
        if p.batch.is_empty()
            && p.ratelimits.is_none()
            && p.flushes.is_empty()
            && p.rejections.is_empty()
        {
            return;
        }
        let mut delay = Duration::from_millis(50);
        let mut attempts = 0u32;
        let started = Instant::now();
        loop {
            let t = Instant::now();
            let written = if p.rejections.is_empty() {
                Ok(())
            } else {
                backend.write_rejections(&p.rejections)
            };
            if written.is_ok() {
                p.rejections.clear();
            }
            match written.and_then(|()| backend.write(&p.batch, p.ratelimits.as_ref())) {
                Ok(()) => {
                    self.metrics.batch(p.batch.len(), t.elapsed().as_secs_f64());
                    self.health.failing.store(false, Ordering::Relaxed);
                    self.metrics.records(&p.batch);
                    super::access_log::write_batch(&p.batch, &mut Vec::new());
                    if attempts > 0 {
                        tracing::warn!(
                            records = p.batch.len(),
                            waited_ms = started.elapsed().as_millis() as u64,
                            "usage records written after the database recovered"
                        );
                    }
                    break;
                }
                Err(e) => {
                    attempts += 1;
                    self.metrics.write_error();
                    self.health.failing.store(true, Ordering::Relaxed);
                    if shutting_down && attempts >= 20 {
                        tracing::error!(
                            records = p.batch.len(),
                            error = %e,
                            "giving up at shutdown: these usage records are lost"
                        );
                        break;
                    }
                    if attempts == 1 || attempts % 20 == 0 {
                        tracing::error!(
                            records = p.batch.len(),
                            error = %e,
                            attempts,
                            "cannot write usage records; holding them and retrying"
                        );
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
        p.batch.clear();
        p.permits.clear();
        p.ratelimits = None;
        for f in p.flushes.drain(..) {
            let _ = f.send(());
        }
    }
}
