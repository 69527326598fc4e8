//! Where records go: a bounded channel to one blocking writer thread that
//! batches them into the database, an estimator thread for records without
//! upstream usage, and the read side of the reports.
//!
//! Storage sits behind two narrow traits, [`Backend`] (records and prices in)
//! and [`Reports`] (reports and prices out), so another database is an
//! addition next to [`sqlite`], not a rewrite.

pub mod sqlite;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Mutex, RwLock};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::budget::Limits;
use crate::metrics::Metrics;
use crate::pricing::{Price, PriceTable};
use crate::ratelimit::RateLimits;
use crate::record::{Priced, Record, Rejected, StoredRecord};

/// A storage failure.
#[derive(Debug)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(e.to_string())
    }
}

/// The write side, owned by the writer thread.
pub trait Backend: Send + 'static {
    /// Writes a batch (and the latest rate limits, if any) in one transaction.
    fn write(
        &mut self,
        batch: &[Priced],
        ratelimits: Option<&RateLimits>,
    ) -> Result<(), StoreError>;
    /// Stores a price row and re-prices the records it now covers with `table`
    /// (which already holds the row). Returns how many records changed cost.
    fn set_price(
        &mut self,
        model: &str,
        price: &Price,
        table: &PriceTable,
    ) -> Result<u64, StoreError>;
    /// Deletes at most `limit` records that started before `cutoff_ms`
    /// (rollups stay); returns how many went.
    fn delete_before(&mut self, cutoff_ms: i64, limit: usize) -> Result<usize, StoreError>;
    /// Counts requests refused before upstream.
    fn write_rejections(&mut self, rejections: &[Rejected]) -> Result<(), StoreError>;
}

/// A user key as listed (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// Key id.
    pub id: String,
    /// Owner.
    pub user: String,
    /// Creation, ms since the epoch.
    pub created_ms: i64,
    /// Last use, ms since the epoch.
    pub last_used_ms: Option<i64>,
    /// Revocation, ms since the epoch.
    pub revoked_ms: Option<i64>,
}

/// Users' keys and limits.
pub trait Accounts: Send + Sync + 'static {
    /// Stores a new key's digest.
    fn create_key(&self, info: &KeyInfo, digest: &[u8; 32]) -> Result<(), StoreError>;
    /// A user's keys, oldest first.
    fn list_keys(&self, user: &str) -> Result<Vec<KeyInfo>, StoreError>;
    /// Revokes a key; its owner, or `None` if no such active key.
    fn revoke_key(&self, id: &str, now_ms: i64) -> Result<Option<String>, StoreError>;
    /// Every active key with its digest.
    fn active_keys(&self) -> Result<Vec<(KeyInfo, [u8; 32])>, StoreError>;
    /// Sets or (with `None`) removes a user's limits; user `None` is the default.
    fn save_limits(&self, user: Option<&str>, l: Option<&Limits>) -> Result<(), StoreError>;
    /// Every stored limit; user `None` is the default.
    fn all_limits(&self) -> Result<Vec<(Option<String>, Limits)>, StoreError>;
}

/// Filters of `/usage` and `/queries`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this user.
    pub user: Option<String>,
    /// Only this model (answered, or requested when none was answered).
    pub model: Option<String>,
    /// Start strictly after, ms since the epoch.
    pub after: Option<i64>,
    /// Start strictly before, ms since the epoch.
    pub before: Option<i64>,
    /// At most this many rows (`/queries`).
    pub limit: Option<u64>,
    /// Skip this many rows (`/queries`).
    pub offset: u64,
}

/// Totals of `/usage`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageTotals {
    /// Matching records.
    pub queries: u64,
    /// Sum of prompt tokens.
    pub query_tokens: u64,
    /// Sum of completion tokens.
    pub answer_tokens: u64,
    /// Sum of cached prompt tokens.
    pub cached_tokens: u64,
    /// Sum of reasoning tokens.
    pub reasoning_tokens: u64,
    /// Sum of cost, pico-dollars.
    pub cost: i128,
    /// Records with no price.
    pub unpriced: u64,
    /// Requests refused before upstream (budgets, limits).
    pub rejected: u64,
}

/// What `/usage` can group by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GroupKey {
    /// Per user.
    User,
    /// Per model.
    Model,
    /// Per UTC day.
    Day,
    /// Per UTC month.
    Month,
}

/// The values of the group keys of one `/usage` row (`None` where not grouped).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct GroupValues {
    /// User.
    pub user: Option<String>,
    /// Model.
    pub model: Option<String>,
    /// `YYYY-MM-DD`.
    pub day: Option<String>,
    /// `YYYY-MM`.
    pub month: Option<String>,
}

/// The read side, shared by API handlers (called on blocking threads).
pub trait Reports: Send + Sync + 'static {
    /// Totals over the filter, one row per combination of the group keys
    /// (a single row without keys), sorted by key.
    fn usage(
        &self,
        f: &Filter,
        group: &[GroupKey],
    ) -> Result<Vec<(GroupValues, UsageTotals)>, StoreError>;
    /// Records over the filter, oldest first, handed one by one to `sink`
    /// until it returns false.
    fn queries(
        &self,
        f: &Filter,
        sink: &mut dyn FnMut(StoredRecord) -> bool,
    ) -> Result<(), StoreError>;
    /// Every price row.
    fn prices(&self) -> Result<PriceTable, StoreError>;
    /// The last stored rate limits.
    fn ratelimits(&self) -> Result<Option<RateLimits>, StoreError>;
    /// Keys and limits.
    fn accounts(&self) -> &dyn Accounts;
}

/// Records queued or in flight at most; past it new requests wait.
pub const QUEUE_CAPACITY: usize = 65_536;
/// Most records in one transaction.
const MAX_BATCH: usize = 8192;

/// How long the writer gathers records before a commit. Records are in memory
/// (and counted in budgets) from the moment they are queued; this only delays
/// when they reach the database, by at most this much. Each commit briefly
/// takes a core from the request path: at concurrency 1 on two cores, 10 ms
/// windows doubled p99 latency against 50 ms (BENCHMARKS.md).
const COMMIT_WINDOW: Duration = Duration::from_millis(50);

enum Msg {
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

/// Handle to the store, shared by every request.
pub struct Store {
    writer_tx: Sender<Msg>,
    estimator_tx: Sender<Msg>,
    permits: Arc<Semaphore>,
    prices: Arc<RwLock<PriceTable>>,
    reports: Arc<dyn Reports>,
    ratelimits: Arc<Latest>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    last_full_warning: AtomicI64,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// What the writer reports about itself.
#[derive(Default)]
struct Health {
    /// The last write attempt failed.
    failing: AtomicBool,
}

/// A reserved place in the queue for one record: taken before a request goes
/// upstream so that a record never waits for room.
pub struct Slot(OwnedSemaphorePermit);

impl Store {
    /// Starts the estimator and writer threads over `backend`.
    pub fn start(
        backend: impl Backend,
        reports: Arc<dyn Reports>,
        metrics: Arc<Metrics>,
        retain: Option<Duration>,
    ) -> Result<Arc<Store>, StoreError> {
        let table = reports.prices()?;
        let ratelimits = reports.ratelimits()?;
        let prices = Arc::new(RwLock::new(table));
        let (writer_tx, writer_rx) = crossbeam_channel::bounded(QUEUE_CAPACITY + 1024);
        let (estimator_tx, estimator_rx) = crossbeam_channel::bounded(QUEUE_CAPACITY + 1024);
        let w_prices = prices.clone();
        let latest = Arc::new(Latest {
            value: Mutex::new(LatestValue {
                raw: None,
                parsed: ratelimits,
            }),
            dirty: AtomicBool::new(false),
        });
        let w_latest = latest.clone();
        let health = Arc::new(Health::default());
        let w = Writer {
            prices: w_prices,
            latest: w_latest,
            metrics: metrics.clone(),
            health: health.clone(),
            retain,
        };
        let writer = std::thread::Builder::new()
            .name("tollgate-writer".into())
            .spawn(move || w.run(backend, writer_rx))
            .map_err(|e| StoreError(e.to_string()))?;
        let to_writer = writer_tx.clone();
        // Vocabularies load beside the estimator, not in it: its queue (and
        // the flushes that pass through it) must move from the first moment.
        std::thread::Builder::new()
            .name("tollgate-vocab".into())
            .spawn(crate::tokens::warm_up)
            .map_err(|e| StoreError(e.to_string()))?;
        let estimator = std::thread::Builder::new()
            .name("tollgate-estimator".into())
            .spawn(move || estimator_loop(estimator_rx, to_writer))
            .map_err(|e| StoreError(e.to_string()))?;
        Ok(Arc::new(Store {
            writer_tx,
            estimator_tx,
            permits: Arc::new(Semaphore::new(QUEUE_CAPACITY)),
            prices,
            reports,
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
        self.ratelimits.value.lock().raw = Some(raw);
        self.ratelimits.dirty.store(true, Ordering::Release);
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

fn estimator_loop(rx: Receiver<Msg>, writer: Sender<Msg>) {
    while let Ok(msg) = rx.recv() {
        let msg = match msg {
            Msg::Record(mut r, permit) => {
                estimate(&mut r);
                Msg::Record(r, permit)
            }
            other => other,
        };
        let last = matches!(msg, Msg::Shutdown);
        if writer.send(msg).is_err() || last {
            return;
        }
    }
}

/// Fills in what upstream did not report.
fn estimate(r: &mut Record) {
    let Some(e) = r.estimate.take() else {
        return;
    };
    let model = r.model_or_requested();
    let query = (r.usage.query == 0 && e.endpoint.needs_model())
        .then(|| crate::tokens::prompt_tokens(e.endpoint, model, &e.request_body));
    let answer = e
        .capture
        .as_ref()
        .filter(|_| r.usage.answer == 0)
        .map(|c| crate::tokens::answer_tokens(model, c));
    if let Some(q) = query {
        r.usage.query = q;
    }
    if let Some(a) = answer {
        r.usage.answer = a;
    }
    r.estimated = true;
}

struct Pending {
    rejections: Vec<Rejected>,
    batch: Vec<Priced>,
    permits: Vec<OwnedSemaphorePermit>,
    ratelimits: Option<RateLimits>,
    flushes: Vec<oneshot::Sender<()>>,
}

/// The latest rate limits, and whether they changed since last written.
struct Latest {
    value: Mutex<LatestValue>,
    dirty: AtomicBool,
}

struct LatestValue {
    /// Headers not parsed yet, newer than `parsed`.
    raw: Option<crate::ratelimit::Raw>,
    /// The last limits that parsed.
    parsed: Option<RateLimits>,
}

impl Latest {
    fn get(&self) -> Option<RateLimits> {
        let mut v = self.value.lock();
        if let Some(rl) = v.raw.take().and_then(|r| r.parse()) {
            v.parsed = Some(rl);
        }
        v.parsed.clone()
    }
}

struct Writer {
    prices: Arc<RwLock<PriceTable>>,
    latest: Arc<Latest>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    retain: Option<Duration>,
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
                            h.settle(cost, r.usage.query + r.usage.answer);
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
        if self.latest.dirty.swap(false, Ordering::AcqRel) {
            p.ratelimits = self.latest.get();
        }
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
                    for r in &p.batch {
                        access_log(r);
                    }
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

/// One line per request (target `tollgate::access`): never prompt or answer
/// text, never keys.
fn access_log(p: &Priced) {
    let r = &p.record;
    tracing::info!(
        target: "tollgate::access",
        user = %r.user,
        endpoint = %r.endpoint,
        model = %r.model_or_requested(),
        status = r.status,
        stream = r.stream,
        query_tokens = r.usage.query,
        answer_tokens = r.usage.answer,
        cached_tokens = r.usage.cached,
        reasoning_tokens = r.usage.reasoning,
        estimated = r.estimated,
        cost = %crate::pricing::format_dollars(p.cost.into()),
        duration_ms = r.duration_us as f64 / 1000.0,
        ttfb_ms = r.ttfb_us.map(|t| t as f64 / 1000.0),
        request_id = r.request_id.as_deref(),
        "request"
    );
}
