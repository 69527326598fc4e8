//! The usage record: one per request that reached upstream, with what it is
//! made of: the token counts and, when upstream gave none, the request and
//! answer bytes an estimate is computed from.

use bytes::Bytes;

use crate::budget::Hold;
use crate::endpoint::Endpoint;
use crate::pricing::Tier;

/// Tokens reported by upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt / input tokens.
    pub query: u64,
    /// Completion / output tokens.
    pub answer: u64,
    /// Cached prompt tokens (a subset of `query`).
    pub cached: u64,
    /// Reasoning tokens (a subset of `answer`).
    pub reasoning: u64,
    /// Audio prompt tokens (a subset of `query`).
    pub audio_query: u64,
    /// Audio completion tokens (a subset of `answer`).
    pub audio_answer: u64,
    /// Image prompt tokens (a subset of `query`).
    pub image_query: u64,
    /// Image output tokens (a subset of `answer`).
    pub image_answer: u64,
}

/// Most tokens one usage field may plausibly count: 10^12, a thousand times
/// the largest context window and more than any single answer can hold. A
/// count above it is a broken answer (a bug or a poisoned upstream), not a
/// bill: such a usage is discarded and the record estimated instead, which
/// also keeps sums of stored counts far from `i64` overflow.
pub const MAX_PLAUSIBLE_TOKENS: u64 = 1_000_000_000_000;

impl Usage {
    /// Whether every count is within [`MAX_PLAUSIBLE_TOKENS`].
    pub fn is_plausible(&self) -> bool {
        [
            self.query,
            self.answer,
            self.cached,
            self.reasoning,
            self.audio_query,
            self.audio_answer,
            self.image_query,
            self.image_answer,
        ]
        .iter()
        .all(|&n| n <= MAX_PLAUSIBLE_TOKENS)
    }
}

/// One metered request, as the proxy hands it to the store.
#[derive(Debug, Default)]
pub struct Record {
    /// The user the request is charged to.
    pub user: String,
    /// `model` of the request (empty where the request has none).
    pub requested_model: String,
    /// `model` of the answer (empty when upstream did not say).
    pub model: String,
    /// Request path, without the query string.
    pub endpoint: String,
    /// When the request arrived, milliseconds since the epoch.
    pub started_ms: i64,
    /// From arrival to the last byte (or the failure), microseconds.
    pub duration_us: u64,
    /// From arrival to the first byte of the answer body, microseconds.
    pub ttfb_us: Option<u64>,
    /// Upstream's status; 499 when the client left before the answer's head,
    /// 502/504 when tollgate answered for a failed upstream.
    pub status: u16,
    /// Whether the request asked for a stream.
    pub stream: bool,
    /// Tokens, from upstream or estimated.
    pub usage: Usage,
    /// Whether `usage` (or a part of it) is an estimate.
    pub estimated: bool,
    /// The service tier: the answer's, else the request's.
    pub tier: Option<Tier>,
    /// Upstream's `x-request-id`.
    pub request_id: Option<String>,
    /// The client left before the whole answer reached it. The status stays
    /// upstream's when tollgate read the answer to its end anyway
    /// (`--client-abort finish`); 499 when no answer head came before it left
    /// and the exchange was cut.
    pub client_aborted: bool,
    /// Time tollgate itself spent on the request (parsing, scanning,
    /// queueing), microseconds; for the overhead metric, not stored.
    pub overhead_us: u64,
    /// Work left for the estimator thread, when upstream reported no usage.
    pub estimate: Option<Box<Estimate>>,
    /// The name of the upstream that served the request.
    pub upstream: Option<std::sync::Arc<str>>,
    /// The tollgate key the request came with (its last use is stored).
    pub key_id: Option<String>,
    /// The budget reservation to settle once the cost is known.
    pub hold: Option<Hold>,
    /// The request's tags in canonical form (see [`crate::tags`]); empty
    /// when it has none.
    pub tags: String,
    /// What is priced per unit: images, tool calls, seconds, characters.
    pub units: crate::pricing::Units,
    /// The `custom_id` of the Batch API line the record meters (`None`
    /// for every request that went through the proxy itself).
    pub custom_id: Option<String>,
    /// The project the request is charged to (see [`crate::projects`]).
    pub project: Option<String>,
}

impl Record {
    /// The answered model, or the requested one when upstream did not say:
    /// the model the record is stored, priced and reported under.
    pub fn model_or_requested(&self) -> &str {
        if self.model.is_empty() {
            &self.requested_model
        } else {
            &self.model
        }
    }

    /// The record's cost in pico-dollars under `prices`, and whether a
    /// price was found.
    pub fn cost(&self, prices: &crate::pricing::PriceTable) -> (i64, bool) {
        prices.cost(
            &self.model,
            &self.requested_model,
            self.started_ms,
            self.tokens(),
        )
    }

    /// What the record is priced from.
    pub fn tokens(&self) -> crate::pricing::Tokens {
        crate::pricing::Tokens {
            query: self.usage.query,
            answer: self.usage.answer,
            cached: self.usage.cached,
            audio_query: self.usage.audio_query,
            audio_answer: self.usage.audio_answer,
            image_query: self.usage.image_query,
            image_answer: self.usage.image_answer,
            tier: self.tier,
            units: self.units,
        }
    }
}

/// A record with its cost, ready to be written.
#[derive(Debug)]
pub struct Priced {
    /// The record.
    pub record: Record,
    /// Cost in pico-dollars.
    pub cost: i64,
    /// Whether a price was found.
    pub priced: bool,
}

/// A request refused before upstream by a budget or limit.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// Who.
    pub user: String,
    /// Requested model.
    pub model: String,
    /// `budget_exceeded` or `rate_limit_exceeded`.
    pub reason: &'static str,
}

/// What an estimate is computed from, off the request path.
#[derive(Debug)]
pub struct Estimate {
    /// Which API the request used.
    pub endpoint: Endpoint,
    /// The request body as forwarded.
    pub request_body: Bytes,
    /// Answer bytes captured for counting completion tokens.
    pub capture: Option<Capture>,
}

/// Raw answer bytes kept for token estimation, bounded.
#[derive(Debug, Default)]
pub struct Capture {
    /// Kept bytes (whole SSE events or the JSON body), up to [`CAPTURE_CAP`].
    pub bytes: Vec<u8>,
    /// Bytes seen past the cap; estimates extrapolate over them.
    pub overflow: u64,
}

/// Most answer bytes kept per request for estimation; past it, estimates
/// extrapolate. Small, because every stream holds it until its usage arrives.
pub const CAPTURE_CAP: usize = 256 << 10;

impl Capture {
    pub(crate) fn push(&mut self, b: &[u8]) {
        let room = CAPTURE_CAP - self.bytes.len();
        if b.len() <= room {
            self.bytes.extend_from_slice(b);
        } else {
            self.bytes.extend_from_slice(&b[..room]);
            self.overflow += (b.len() - room) as u64;
        }
    }
}

/// A stored record, as the reports return it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Row id.
    pub id: i64,
    /// See [`Record::user`].
    pub user: String,
    /// The answered model, or the requested one when upstream did not say.
    pub model: String,
    /// See [`Record::requested_model`].
    pub requested_model: String,
    /// See [`Record::endpoint`].
    pub endpoint: String,
    /// See [`Record::started_ms`].
    pub started_ms: i64,
    /// See [`Record::duration_us`].
    pub duration_us: i64,
    /// See [`Record::ttfb_us`].
    pub ttfb_us: Option<i64>,
    /// See [`Record::status`].
    pub status: u16,
    /// See [`Record::stream`].
    pub stream: bool,
    /// Prompt tokens.
    pub query_tokens: i64,
    /// Completion tokens.
    pub answer_tokens: i64,
    /// Cached prompt tokens.
    pub cached_tokens: i64,
    /// Reasoning tokens.
    pub reasoning_tokens: i64,
    /// Cost in pico-dollars.
    pub cost: i64,
    /// Whether a price was found.
    pub priced: bool,
    /// See [`Record::estimated`].
    pub estimated: bool,
    /// See [`Record::request_id`].
    pub request_id: Option<String>,
    /// See [`Record::client_aborted`].
    pub client_aborted: bool,
    /// See [`Record::tier`].
    pub tier: Option<Tier>,
    /// Audio prompt tokens.
    pub audio_query_tokens: i64,
    /// Audio completion tokens.
    pub audio_answer_tokens: i64,
    /// See [`Record::tags`].
    pub tags: String,
    /// The name of the upstream that served it (`None` for records written
    /// before tollgate had several upstreams).
    pub upstream: Option<String>,
    /// Image prompt tokens.
    pub image_query_tokens: i64,
    /// Image output tokens.
    pub image_answer_tokens: i64,
    /// See [`Record::units`].
    pub units: crate::pricing::Units,
    /// See [`Record::custom_id`].
    pub custom_id: Option<String>,
    /// See [`Record::project`].
    pub project: Option<String>,
}

impl StoredRecord {
    /// What the record is priced from.
    pub fn tokens(&self) -> crate::pricing::Tokens {
        let n = |v: i64| v.max(0) as u64;
        crate::pricing::Tokens {
            query: n(self.query_tokens),
            answer: n(self.answer_tokens),
            cached: n(self.cached_tokens),
            audio_query: n(self.audio_query_tokens),
            audio_answer: n(self.audio_answer_tokens),
            image_query: n(self.image_query_tokens),
            image_answer: n(self.image_answer_tokens),
            tier: self.tier,
            units: self.units,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_past_the_bound_are_implausible() {
        let at = |query, answer, cached, reasoning| Usage {
            query,
            answer,
            cached,
            reasoning,
            ..Usage::default()
        };
        let b = MAX_PLAUSIBLE_TOKENS;
        assert!(at(0, 0, 0, 0).is_plausible());
        assert!(at(b, b, b, b).is_plausible());
        assert!(!at(b + 1, 0, 0, 0).is_plausible());
        assert!(!at(0, b + 1, 0, 0).is_plausible());
        assert!(!at(0, 0, u64::MAX, 0).is_plausible());
        assert!(!at(0, 0, 0, i64::MAX as u64).is_plausible());
        let audio = |audio_query, audio_answer| Usage {
            audio_query,
            audio_answer,
            ..Usage::default()
        };
        assert!(audio(b, b).is_plausible());
        assert!(!audio(b + 1, 0).is_plausible());
        assert!(!audio(0, b + 1).is_plausible());
    }
}
