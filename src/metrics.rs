//! Prometheus metrics (`GET /metrics`), kept with `prometheus-client`.
//!
//! Per-record figures (tokens, cost, latencies) are counted by the writer
//! thread once a record is priced, so the request path only touches the
//! in-flight gauge.
//!
//! Label values that clients choose (user, model, path) are bounded: each
//! label keeps at most a fixed number of distinct values (users: a setting),
//! and a value past the cap, or one longer than [`MAX_LABEL_LEN`] or holding
//! a control character, is counted as `other`. Every series a scrape shows
//! was therefore admitted once, and `/metrics` cannot be grown without bound.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64};

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::ratelimit::RateLimits;
use crate::record::Priced;

/// Labels of the request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Request path.
    pub endpoint: String,
    /// Answered (else requested) model.
    pub model: String,
    /// Upstream status (499/502/504 as recorded).
    pub status: u16,
}

/// Labels of token counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// User.
    pub user: String,
    /// Model.
    pub model: String,
    /// `query`, `answer`, `cached` or `reasoning`.
    pub kind: &'static str,
}

/// Labels of the cost counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UserModel {
    /// User.
    pub user: String,
    /// Model.
    pub model: String,
}

/// Labels of rate-limit gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// `requests` or `tokens`.
    pub limit: &'static str,
}

/// Labels of rejections (access control and budgets).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    /// Why: `budget_exceeded`, `rate_limit_exceeded`, `invalid_api_key`, ...
    pub reason: &'static str,
}

/// Labels of the ended batches' counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BatchLabels {
    /// `metered` (this instance wrote its lines) or `metered_elsewhere`
    /// (another instance claimed it first).
    pub outcome: &'static str,
}

/// Labels of per-worker gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    /// Server worker thread, from 0.
    pub worker: u32,
}

/// Every metric tollgate exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<UserModel, Counter<f64, AtomicU64>>,
    duration: Histogram,
    ttfb: Histogram,
    overhead: Histogram,
    estimated: Counter,
    /// Requests inside the proxy (from arrival to the last byte).
    pub in_flight: Gauge,
    queue_depth: Gauge,
    batch_size: Histogram,
    commit_seconds: Histogram,
    write_errors: Counter,
    ratelimit_remaining: Family<LimitLabels, Gauge<i64, AtomicI64>>,
    ratelimit_limit: Family<LimitLabels, Gauge<i64, AtomicI64>>,
    rejected: Family<RejectLabels, Counter>,
    batches: Family<BatchLabels, Counter>,
    connections: Family<WorkerLabels, Gauge>,
    users: LabelCap,
    models: LabelCap,
    endpoints: LabelCap,
}

/// Distinct users with series of their own, unless configured.
pub const DEFAULT_MAX_USERS: usize = 1000;
/// Longest label value kept as it is.
pub const MAX_LABEL_LEN: usize = 128;
/// Distinct models and endpoints with series of their own.
const MAX_MODELS: usize = 256;
/// Distinct endpoint paths with series of their own (paths carry ids).
const MAX_ENDPOINTS: usize = 64;
/// What a value past its label's cap is counted as.
const OTHER: &str = "other";

/// The distinct values one label has taken, up to a cap.
struct LabelCap {
    seen: Mutex<HashSet<String>>,
    cap: usize,
}

impl LabelCap {
    fn new(cap: usize) -> LabelCap {
        LabelCap {
            seen: Mutex::new(HashSet::new()),
            cap,
        }
    }

    /// The label value to count `v` under.
    fn label<'a>(&self, v: &'a str) -> &'a str {
        if v.len() > MAX_LABEL_LEN || v.chars().any(char::is_control) {
            return OTHER;
        }
        let mut seen = self.seen.lock();
        if seen.contains(v) {
            return v;
        }
        if seen.len() < self.cap {
            seen.insert(v.to_owned());
            return v;
        }
        OTHER
    }
}

fn seconds_buckets() -> Histogram {
    // 50 us .. ~105 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 22))
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new(DEFAULT_MAX_USERS)
    }
}

impl Metrics {
    /// Metrics whose `user` label takes at most `max_users` distinct values.
    pub fn new(max_users: usize) -> Metrics {
        let m = Metrics {
            registry: Registry::with_prefix("tollgate"),
            requests: Family::default(),
            tokens: Family::default(),
            cost: Family::default(),
            duration: seconds_buckets(),
            ttfb: seconds_buckets(),
            overhead: Histogram::new(exponential_buckets(0.000_001, 2.0, 24)),
            estimated: Counter::default(),
            in_flight: Gauge::default(),
            queue_depth: Gauge::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 15)),
            commit_seconds: seconds_buckets(),
            write_errors: Counter::default(),
            ratelimit_remaining: Family::default(),
            ratelimit_limit: Family::default(),
            rejected: Family::default(),
            batches: Family::default(),
            connections: Family::default(),
            users: LabelCap::new(max_users),
            models: LabelCap::new(MAX_MODELS),
            endpoints: LabelCap::new(MAX_ENDPOINTS),
        };
        m.register()
    }

    fn register(mut self) -> Self {
        let r = &mut self.registry;
        r.register(
            "requests",
            "Metered requests by endpoint, model and status",
            self.requests.clone(),
        );
        r.register(
            "tokens",
            "Tokens by user, model and kind (query, answer, cached, reasoning)",
            self.tokens.clone(),
        );
        r.register(
            "cost_dollars",
            "Cost in dollars by user and model",
            self.cost.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time from arrival to the last byte of the answer",
            self.duration.clone(),
        );
        r.register(
            "upstream_ttfb_seconds",
            "Time from arrival to the first byte of upstream's answer body",
            self.ttfb.clone(),
        );
        r.register(
            "overhead_seconds",
            "Time tollgate itself spent on a request (total minus waiting on upstream)",
            self.overhead.clone(),
        );
        r.register(
            "estimated_records",
            "Records whose tokens were estimated because upstream reported no usage",
            self.estimated.clone(),
        );
        r.register(
            "in_flight_requests",
            "Requests being proxied now",
            self.in_flight.clone(),
        );
        r.register(
            "writer_queue_depth",
            "Records queued or in flight, not yet written",
            self.queue_depth.clone(),
        );
        r.register(
            "writer_batch_size",
            "Records per database transaction",
            self.batch_size.clone(),
        );
        r.register(
            "writer_commit_seconds",
            "Duration of one database transaction",
            self.commit_seconds.clone(),
        );
        r.register(
            "writer_errors",
            "Failed database writes (records are kept and retried)",
            self.write_errors.clone(),
        );
        r.register(
            "upstream_ratelimit_remaining",
            "Remaining requests/tokens from upstream's latest x-ratelimit headers",
            self.ratelimit_remaining.clone(),
        );
        r.register(
            "upstream_ratelimit_limit",
            "Request/token limits from upstream's latest x-ratelimit headers",
            self.ratelimit_limit.clone(),
        );
        r.register(
            "rejected_requests",
            "Requests refused before upstream by access control, budgets or limits",
            self.rejected.clone(),
        );
        r.register(
            "batches_ended",
            "Batch API jobs followed to their end, by outcome",
            self.batches.clone(),
        );
        r.register(
            "connections",
            "Open client connections by server worker",
            self.connections.clone(),
        );
        self
    }

    /// Counts a written batch. Figures are summed per label set first, so
    /// label strings are cloned and hashed once per batch, not per record.
    pub fn records(&self, batch: &[Priced]) {
        #[derive(Default)]
        struct Sums {
            requests: u64,
            tokens: [u64; 4],
            cost: i64,
        }
        let mut by: HashMap<(&str, &str, &str, u16), Sums> = HashMap::new();
        for p in batch {
            let r = &p.record;
            let model = r.model_or_requested();
            let s = by
                .entry((&r.endpoint, model, &r.user, r.status))
                .or_default();
            s.requests += 1;
            for (t, n) in s.tokens.iter_mut().zip([
                r.usage.query,
                r.usage.answer,
                r.usage.cached,
                r.usage.reasoning,
            ]) {
                *t += n;
            }
            s.cost = s.cost.saturating_add(p.cost);
            self.duration.observe(r.duration_us as f64 / 1e6);
            if let Some(t) = r.ttfb_us {
                self.ttfb.observe(t as f64 / 1e6);
            }
            self.overhead.observe(r.overhead_us as f64 / 1e6);
            if r.estimated {
                self.estimated.inc();
            }
        }
        for ((endpoint, model, user, status), s) in by {
            let (endpoint, model, user) = (
                self.endpoints.label(endpoint),
                self.models.label(model),
                self.users.label(user),
            );
            self.requests
                .get_or_create(&RequestLabels {
                    endpoint: endpoint.to_owned(),
                    model: model.to_owned(),
                    status,
                })
                .inc_by(s.requests);
            for (kind, n) in ["query", "answer", "cached", "reasoning"]
                .into_iter()
                .zip(s.tokens)
            {
                if n > 0 {
                    self.tokens
                        .get_or_create(&TokenLabels {
                            user: user.to_owned(),
                            model: model.to_owned(),
                            kind,
                        })
                        .inc_by(n);
                }
            }
            if s.cost > 0 {
                self.cost
                    .get_or_create(&UserModel {
                        user: user.to_owned(),
                        model: model.to_owned(),
                    })
                    .inc_by(s.cost as f64 / 1e12);
            }
        }
    }

    /// Counts one committed batch.
    pub fn batch(&self, records: usize, seconds: f64) {
        self.batch_size.observe(records as f64);
        self.commit_seconds.observe(seconds);
    }

    /// Counts a failed write attempt.
    pub fn write_error(&self) {
        self.write_errors.inc();
    }

    /// Copies upstream's latest rate limits.
    pub fn ratelimits(&self, rl: &RateLimits) {
        for (name, l) in [("requests", &rl.requests), ("tokens", &rl.tokens)] {
            let Some(l) = l else { continue };
            let labels = LimitLabels { limit: name };
            if let Some(v) = l.remaining {
                self.ratelimit_remaining
                    .get_or_create(&labels)
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            }
            if let Some(v) = l.maximum {
                self.ratelimit_limit
                    .get_or_create(&labels)
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            }
        }
    }

    /// Counts a request refused before upstream.
    pub fn rejected(&self, reason: &'static str) {
        self.rejected.get_or_create(&RejectLabels { reason }).inc();
    }

    /// Counts a followed batch that ended (`metered` or `metered_elsewhere`).
    pub fn batch_ended(&self, outcome: &'static str) {
        self.batches.get_or_create(&BatchLabels { outcome }).inc();
    }

    /// The open-connections gauge of one server worker (the workers also
    /// balance new connections by it).
    pub fn worker_connections(&self, worker: usize) -> Gauge {
        self.connections
            .get_or_create(&WorkerLabels {
                worker: u32::try_from(worker).unwrap_or(u32::MAX),
            })
            .clone()
    }

    /// The text exposition, with the queue depth read now.
    pub fn encode(&self, queue_depth: usize) -> String {
        self.queue_depth.set(queue_depth as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
