//! Where records go: the [`Store`] handle every request shares. Records
//! queue on a bounded channel (a [`Slot`] is reserved before a request goes
//! upstream) to the writer thread (`writer.rs`), through the estimator
//! thread (`estimator.rs`) when upstream reported no usage; reports and
//! accounts are read beside it.
//!
//! Storage sits behind the narrow traits of `backend.rs` ([`Backend`] for
//! the writer, [`Reports`] and [`Accounts`] for the rest), so another
//! database is an addition next to [`sqlite`], not a rewrite: [`postgres`]
//! is the second.

pub mod access_log;
mod backend;
mod estimator;
pub mod migrate;
pub mod postgres;
mod ratelimits;
pub mod rollup;
pub mod sqlite;
pub mod transfer;
mod writer;

pub use backend::{
    Accounts, Backend, BatchInfo, Filter, GroupKey, GroupValues, KeyInfo, ProjectInfo, Reports,
    StateVersions, StoreError, UsageTotals,
};

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::metrics::Metrics;
use crate::pricing::{Price, PriceTable};
use crate::ratelimit::RateLimits;
use crate::record::{Record, Rejected};
use ratelimits::Latest;
use writer::{Health, Msg, Writer};

/// Records queued or in flight at most; past it new requests wait.
pub const QUEUE_CAPACITY: usize = 65_536;

/// Handle to the store, shared by every request.
pub struct Store {
    writer_tx: Sender<Msg>,
    estimator_tx: Sender<Msg>,
    permits: Arc<Semaphore>,
    prices: Arc<RwLock<PriceTable>>,
    reports: Arc<dyn Reports>,
    accounts: Arc<dyn Accounts>,
    ratelimits: Arc<Latest>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    last_full_warning: AtomicI64,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// A reserved place in the queue for one record: taken before a request goes
/// upstream so that a record never waits for room.
pub struct Slot(OwnedSemaphorePermit);

impl Store {
    /// Starts the estimator and writer threads over `backend`.
    pub fn start(
        backend: impl Backend,
        reports: Arc<dyn Reports>,
        accounts: Arc<dyn Accounts>,
        metrics: Arc<Metrics>,
        retain: Option<Duration>,
    ) -> Result<Arc<Store>, StoreError> {
        let table = reports.prices()?;
        let ratelimits = reports.ratelimits()?;
        let prices = Arc::new(RwLock::new(table));
        let (writer_tx, writer_rx) = crossbeam_channel::bounded(QUEUE_CAPACITY + 1024);
        let (estimator_tx, estimator_rx) = crossbeam_channel::bounded(QUEUE_CAPACITY + 1024);
        let latest = Arc::new(Latest::new(ratelimits));
        let health = Arc::new(Health::default());
        let w = Writer {
            prices: prices.clone(),
            latest: latest.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            retain,
        };
        let spawned = |e: std::io::Error| StoreError(e.to_string());
        let writer = w.spawn(backend, writer_rx).map_err(spawned)?;
        let to_writer = writer_tx.clone();
        // Vocabularies load beside the estimator, not in it: its queue (and
        // the flushes that pass through it) must move from the first moment.
        std::thread::Builder::new()
            .name("tollgate-vocab".into())
            .spawn(crate::tokens::warm_up)
            .map_err(spawned)?;
        let estimator = estimator::spawn(estimator_rx, to_writer).map_err(spawned)?;
        Ok(Arc::new(Store {
            writer_tx,
            estimator_tx,
            permits: Arc::new(Semaphore::new(QUEUE_CAPACITY)),
            prices,
            reports,
            accounts,
            ratelimits: latest,
            threads: Mutex::new(vec![writer, estimator]),
            last_full_warning: AtomicI64::new(0),
            metrics,
            health,
        }))
    }

    /// Reserves room for one record, waiting at most `wait` when the writer is
    /// behind (backpressure). `None` when no room freed up in time.
    pub async fn reserve(&self, wait: Duration) -> Option<Slot> {
        if let Ok(p) = self.permits.clone().try_acquire_owned() {
            return Some(Slot(p));
        }
        // Once a second at most: this is hit by every request while it lasts.
        let now = crate::timestamp::now_ms();
        let last = self.last_full_warning.load(Ordering::Relaxed);
        if now - last >= 1000
            && self
                .last_full_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                capacity = QUEUE_CAPACITY,
                "usage queue is full: the database is not keeping up; new requests wait up to 10 s for room, then get 503"
            );
        }
        tokio::time::timeout(wait, self.permits.clone().acquire_owned())
            .await
            .ok()?
            .ok()
            .map(Slot)
    }

    /// Queues a record. Never blocks and never drops: the slot guarantees room.
    pub fn submit(&self, record: Record, slot: Slot) {
        let tx = if record.estimate.is_some() {
            &self.estimator_tx
        } else {
            &self.writer_tx
        };
        if let Err(e) = tx.try_send(Msg::Record(Box::new(record), slot.0)) {
            // Only after shutdown, when the threads are gone.
            tracing::error!("usage record lost: store closed ({e})");
        }
    }

    /// Counts a request refused before upstream (best effort: dropped, and
    /// logged, only when the queue is completely full).
    pub fn reject(&self, r: Rejected) {
        self.metrics.rejected(r.reason);
        if self.writer_tx.try_send(Msg::Rejected(r)).is_err() {
            tracing::warn!("usage queue full: a rejection was counted in metrics only");
        }
    }

    /// Keeps the latest upstream rate-limit headers. They are parsed when
    /// read (`/ratelimits`, a `/metrics` scrape) and written with the next
    /// batch: every answer that carries them also leaves a record.
    pub fn set_ratelimits(&self, raw: crate::ratelimit::Raw) {
        self.ratelimits.set(raw);
    }

    /// Takes the rate limits another instance stored (see `Latest::adopt`).
    pub fn adopt_ratelimits(&self, stored: RateLimits) {
        self.ratelimits.adopt(stored);
    }

    /// The latest upstream rate limits.
    pub fn ratelimits(&self) -> Option<RateLimits> {
        self.ratelimits.get()
    }

    /// Adds or replaces a price row and re-prices the records it covers.
    pub async fn set_price(&self, model: String, price: Price) -> Result<u64, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.writer_tx
            .try_send(Msg::Price {
                model,
                price,
                reply,
            })
            .map_err(|_| StoreError("store is busy or closed".into()))?;
        rx.await.map_err(|_| StoreError("store is closed".into()))?
    }

    /// Waits until every record queued before the call is written.
    pub async fn flush(&self) {
        let (reply, rx) = oneshot::channel();
        // Through the estimator, so records waiting there are flushed too.
        if self.estimator_tx.try_send(Msg::Flush(reply)).is_ok() {
            let _ = rx.await;
        }
    }

    /// The in-memory price table.
    pub fn prices(&self) -> parking_lot::RwLockReadGuard<'_, PriceTable> {
        self.prices.read()
    }

    /// Replaces the in-memory price table by `table` (as read from the
    /// database after another instance changed a price).
    pub fn replace_prices(&self, table: PriceTable) {
        *self.prices.write() = table;
    }

    /// Records queued or in flight, not yet written.
    pub fn queue_depth(&self) -> usize {
        QUEUE_CAPACITY - self.permits.available_permits()
    }

    /// Why the store is not ready, if it is not: the database refuses
    /// writes, or the queue is nearly full.
    pub fn unready(&self) -> Option<String> {
        if self.health.failing.load(Ordering::Relaxed) {
            return Some("the database refuses writes; records are held and retried".into());
        }
        let depth = self.queue_depth();
        (depth * 10 >= QUEUE_CAPACITY * 9)
            .then(|| format!("the writer is behind: {depth} of {QUEUE_CAPACITY} records queued"))
    }

    /// The read side.
    pub fn reports(&self) -> Arc<dyn Reports> {
        self.reports.clone()
    }

    /// Users' keys and limits.
    pub fn accounts(&self) -> Arc<dyn Accounts> {
        self.accounts.clone()
    }

    /// Whether [`Store::close`] was called.
    pub fn closed(&self) -> bool {
        self.threads.lock().is_empty()
    }

    /// Stops the threads after everything queued is written. Blocking; call
    /// once no request can submit any more.
    pub fn close(&self) {
        let threads: Vec<_> = std::mem::take(&mut *self.threads.lock());
        if threads.is_empty() {
            return;
        }
        // The estimator forwards it to the writer after what it still holds.
        let _ = self.estimator_tx.send(Msg::Shutdown);
        for t in threads {
            let _ = t.join();
        }
    }
}
