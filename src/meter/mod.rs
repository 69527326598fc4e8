//! Metering one exchange: what the request and answer bodies say (read
//! without re-serializing them, chunk by chunk) turned into the request's
//! [`Record`], submitted exactly once.
//!
//! - `request`: the request fields and the `include_usage` splice.
//! - `image`: the fields of an image generation request and of a speech request.
//! - `sse`, `json`: usage and model of SSE and plain JSON answers.
//! - `multipart`: the `model` of a multipart upload.
//! - `upload`: what a streamed upload reports while it passes.
//! - `tools`: the built-in tool calls of a Responses answer.
//! - `scan`, `window`: the byte-level JSON scanning and the bounded
//!   window the answer scanners share.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;

use crate::budget::RecentCosts;
use crate::endpoint::Endpoint;
use crate::record::{Capture, Estimate, Record, Usage};
use crate::store::{Slot, Store};

mod image;
mod json;
mod multipart;
mod request;
mod scan;
mod sse;
mod tools;
mod upload;
mod window;

pub use image::{parse_image_request, parse_speech_request, ImageRequest, SpeechRequest};
pub use json::{parse_seconds, parse_usage, JsonScanner};
pub(crate) use multipart::find_multipart_model;
pub use request::{
    parse_request, splice_include_usage, RequestError, RequestInfo, MAX_ANSWER_TOKENS, MAX_CHOICES,
};
pub(crate) use scan::find_model;
pub use sse::SseScanner;
pub use upload::Upload;

/// What was learnt from an answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    /// Usage reported by upstream.
    pub usage: Option<Usage>,
    /// The answered model.
    pub model: Option<String>,
    /// A stream ended properly (`[DONE]` or a terminal Responses event).
    pub done: bool,
    /// The service tier the answer says it was processed in.
    pub tier: Option<crate::pricing::Tier>,
    /// Counts priced per unit that the answer reports: built-in tool calls
    /// and a transcription's seconds.
    pub units: crate::pricing::Units,
}

/// How the answer body is read.
#[derive(Debug)]
pub enum Observer {
    /// Not read (bodies of endpoints without usage).
    Ignore,
    /// A plain JSON answer.
    Json(JsonScanner),
    /// An SSE stream.
    Sse(SseScanner),
}

/// The record of one request under construction; submitted exactly once,
/// when the exchange ends in whatever way.
pub struct Meter {
    store: Arc<Store>,
    in_flight: Gauge,
    slot: Option<Slot>,
    record: Record,
    started: Instant,
    endpoint: Endpoint,
    request_body: Bytes,
    observer: Observer,
    upload: Option<Arc<Upload>>,
    /// Where the costs of image and audio requests are learnt.
    recent: Option<Arc<RecentCosts>>,
    /// The images an image request asked for, priced per image when the
    /// answer reports no tokens (dall-e-2, dall-e-3).
    images: Option<crate::pricing::Units>,
    /// Characters of a speech request's input.
    speech: Option<u64>,
    /// The model the record is priced by, over the answered one (an Azure
    /// deployment's base model).
    priced_as: Option<String>,
    /// The answer kept whole for a hook (a batch creation's).
    keep: Option<Kept>,
}

/// Reads a whole (small) answer once the exchange ends: its status and body.
pub type AnswerHook = Box<dyn FnOnce(u16, &[u8]) + Send + Sync>;

/// A small answer kept whole, and what reads it once the exchange ends.
struct Kept {
    bytes: Vec<u8>,
    cap: usize,
    overflow: bool,
    done: AnswerHook,
}

impl Meter {
    /// Starts metering a request about to go upstream. Until an answer head
    /// arrives, the status is 499 (client gone): dropping the meter then
    /// still leaves a record.
    pub fn new(
        store: Arc<Store>,
        in_flight: Gauge,
        slot: Slot,
        mut record: Record,
        started: Instant,
        endpoint: Endpoint,
        request_body: Bytes,
    ) -> Meter {
        record.status = 499;
        in_flight.inc();
        Meter {
            store,
            in_flight,
            slot: Some(slot),
            record,
            started,
            endpoint,
            request_body,
            observer: Observer::Ignore,
            upload: None,
            recent: None,
            images: None,
            speech: None,
            priced_as: None,
            keep: None,
        }
    }

    /// The request's `model` (empty where it has none).
    pub fn requested_model(&self) -> &str {
        &self.record.requested_model
    }

    /// The next attempt goes to `upstream`; its records are priced by
    /// `priced_as` when set, whatever model upstream answers with.
    pub fn serve(&mut self, upstream: &Arc<str>, priced_as: Option<&str>) {
        if self.record.upstream.as_ref() != Some(upstream) {
            self.record.upstream = Some(upstream.clone());
        }
        if self.priced_as.as_deref() != priced_as {
            self.priced_as = priced_as.map(str::to_owned);
        }
    }

    /// A speech request of so many input characters: priced by them where
    /// the model has a per-character price, else by its estimated tokens.
    pub fn speech(&mut self, characters: u64) {
        self.speech = Some(characters);
    }

    /// The images asked for (`n`, `size`, `quality`): the price when the
    /// answer reports no tokens.
    pub fn per_image(&mut self, units: crate::pricing::Units) {
        self.images = Some(units);
    }

    /// The request's body streams: its model may be read from it as it passes.
    pub fn upload(&mut self, upload: Arc<Upload>) {
        self.upload = Some(upload);
    }

    /// The request's cost teaches later reservations of its kind.
    pub fn learn_into(&mut self, recent: Arc<RecentCosts>) {
        self.recent = Some(recent);
    }

    /// Keeps the answer (at most `cap` bytes) for `done`, which gets the
    /// status and the whole answer when the exchange ends (nothing when the
    /// answer was larger).
    pub fn keep_answer(&mut self, cap: usize, done: AnswerHook) {
        self.keep = Some(Kept {
            bytes: Vec::new(),
            cap,
            overflow: false,
            done,
        });
    }

    /// The answer head arrived.
    pub fn answered(&mut self, status: u16, request_id: Option<String>, observer: Observer) {
        self.record.status = status;
        self.record.request_id = request_id;
        self.observer = observer;
    }

    /// The client left before the whole answer reached it.
    pub fn client_left(&mut self) {
        self.record.client_aborted = true;
    }

    /// Tollgate answered for upstream (502/504).
    pub fn failed(&mut self, status: u16) {
        self.record.status = status;
    }

    /// Submits the record of an attempt that reached upstream and was
    /// retried (a 429, a 5xx, a connection that failed before the head):
    /// this request's user, model and path, `status`, no tokens.
    pub async fn attempt(&self, status: u16, request_id: Option<String>) {
        let r = &self.record;
        let rec = Record {
            user: r.user.clone(),
            requested_model: r.requested_model.clone(),
            endpoint: r.endpoint.clone(),
            started_ms: r.started_ms,
            duration_us: self.started.elapsed().as_micros() as u64,
            status,
            stream: r.stream,
            request_id,
            upstream: r.upstream.clone(),
            tier: r.tier,
            tags: r.tags.clone(),
            project: r.project.clone(),
            ..Record::default()
        };
        match self.store.reserve(Duration::from_secs(1)).await {
            Some(slot) => self.store.submit(rec, slot),
            None => tracing::warn!(
                status,
                "usage queue full: the record of a retried attempt is lost"
            ),
        }
    }

    /// The request never reached upstream: no record.
    pub fn cancel(mut self) {
        if self.slot.take().is_some() {
            self.in_flight.dec();
        }
    }

    /// Adds time tollgate spent on the request outside the upstream wait.
    pub fn overhead(&mut self, d: Duration) {
        self.record.overhead_us += d.as_micros() as u64;
    }

    /// Passes one chunk of the answer through the scanners.
    pub(crate) fn observe(&mut self, data: Bytes, now: Instant) -> Bytes {
        if self.record.ttfb_us.is_none() {
            self.record.ttfb_us = Some(now.duration_since(self.started).as_micros() as u64);
        }
        if let Some(k) = &mut self.keep {
            if k.bytes.len() + data.len() <= k.cap {
                k.bytes.extend_from_slice(&data);
            } else {
                k.overflow = true;
            }
        }
        let out = match &mut self.observer {
            Observer::Ignore => data,
            Observer::Json(j) => {
                j.feed(&data);
                data
            }
            Observer::Sse(s) => s.feed(&data),
        };
        self.overhead(now.elapsed());
        out
    }

    /// Bytes the scanner still holds at the end of the stream.
    pub(crate) fn take_tail(&mut self) -> Bytes {
        match &mut self.observer {
            Observer::Sse(s) => s.finish(),
            _ => Bytes::new(),
        }
    }

    /// Submits the record (once).
    pub(crate) fn submit(&mut self) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        self.in_flight.dec();
        let mut rec = std::mem::take(&mut self.record);
        // No answer head before the exchange ended: the client left (or
        // broke off its upload).
        rec.client_aborted |= rec.status == 499;
        rec.duration_us = self.started.elapsed().as_micros() as u64;
        let (found, capture) = match std::mem::replace(&mut self.observer, Observer::Ignore) {
            Observer::Ignore => (Found::default(), None),
            Observer::Json(mut j) => {
                let (f, c) = j.finish();
                (f, Some(c))
            }
            Observer::Sse(mut s) => {
                let _ = s.finish();
                (
                    std::mem::take(&mut s.found),
                    Some(std::mem::take(&mut s.capture)),
                )
            }
        };
        if let Some(m) = found.model {
            rec.model = m;
        }
        if let Some(m) = self.priced_as.take() {
            rec.model = m;
        }
        // The tier upstream processed the request in wins over the one asked for.
        if found.tier.is_some() {
            rec.tier = found.tier;
        }
        if let Some(m) = self.upload.as_ref().and_then(|u| u.model.get()) {
            rec.requested_model = m.clone();
        }
        let broken = found.usage.filter(|u| !u.is_plausible());
        if let Some(u) = broken {
            // Only numbers and tollgate's own names: nothing the client chose.
            tracing::warn!(
                endpoint = ?self.endpoint,
                status = rec.status,
                query = u.query,
                answer = u.answer,
                cached = u.cached,
                reasoning = u.reasoning,
                audio_query = u.audio_query,
                audio_answer = u.audio_answer,
                bound = crate::record::MAX_PLAUSIBLE_TOKENS,
                "upstream reported implausible token counts; the record is estimated instead"
            );
            rec.estimated = true;
        }
        rec.units.tools = found.units.tools;
        rec.units.seconds = found.units.seconds;
        let image_api = matches!(self.endpoint, Endpoint::Images | Endpoint::ImageUpload);
        match found.usage.filter(Usage::is_plausible) {
            Some(mut u) => {
                // Image APIs' output tokens are image tokens unless split.
                if image_api && u.image_answer == 0 {
                    u.image_answer = u.answer.saturating_sub(u.audio_answer);
                }
                rec.usage = u;
            }
            // An image model priced per image: its answer has no usage.
            None if image_api && matches!(rec.status, 200..=299) && broken.is_none() => {
                if let Some(i) = self.images {
                    rec.units.images = i.images;
                    rec.units.image_size = i.image_size;
                    rec.units.image_quality = i.image_quality;
                }
            }
            None if self.should_estimate(rec.status) => {
                rec.estimate = Some(Box::new(Estimate {
                    endpoint: self.endpoint,
                    request_body: std::mem::take(&mut self.request_body),
                    capture: capture.filter(|c: &Capture| !c.bytes.is_empty()),
                }));
            }
            // Speech: audio, no usage.
            None if self.endpoint == Endpoint::Speech && matches!(rec.status, 200..=299) => {
                let prices = self.store.prices();
                let per_char = prices
                    .lookup(&rec.model, &rec.requested_model, rec.started_ms)
                    .is_some_and(|(_, p)| p.unit.is_some());
                if per_char {
                    rec.units.characters = self.speech.unwrap_or(0);
                } else {
                    // Token-priced speech: the input's tokens, estimated
                    // (the audio it became is not counted).
                    rec.estimate = Some(Box::new(Estimate {
                        endpoint: self.endpoint,
                        request_body: std::mem::take(&mut self.request_body),
                        capture: None,
                    }));
                }
            }
            // No tokens to count (an upstream error, a model list, ...).
            None => {}
        }
        // With the tokens known, the budget settles now rather than when the
        // writer gets to the record, so a next request sees the real spend.
        if rec.estimate.is_none() && (rec.hold.is_some() || self.recent.is_some()) {
            // The writer prices the record again, under the prices of
            // when it is written (a price change may come in between).
            let (cost, _) = rec.cost(&self.store.prices());
            if let Some(r) = &self.recent {
                let uploaded = self.upload.as_ref().map_or(0, |u| u.bytes());
                r.learn(self.endpoint, &rec.requested_model, cost, uploaded);
            }
            if let Some(h) = rec.hold.take() {
                h.settle(cost, rec.usage.query.saturating_add(rec.usage.answer));
            }
        }
        if let Some(k) = self.keep.take() {
            // A client gone before the end leaves a cut answer: no JSON.
            if !k.overflow {
                (k.done)(rec.status, &k.bytes);
            }
        }
        self.store.submit(rec, slot);
    }

    /// Whether the answer's SSE scanner removes the usage-only chunk, so
    /// the body's length differs from upstream's.
    pub(crate) fn strips(&self) -> bool {
        matches!(&self.observer, Observer::Sse(s) if s.strips())
    }

    /// Tokens may have been spent without upstream saying how many: a
    /// successful answer without usage, a cut stream, or no answer at all.
    fn should_estimate(&self, status: u16) -> bool {
        self.endpoint.needs_model()
            && (matches!(status, 200..=299) || matches!(status, 499 | 502 | 504))
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.submit();
    }
}
