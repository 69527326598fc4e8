//! Body types and the metered answer body.
//!
//! [`MeteredBody`] wraps upstream's answer, hands every frame to the usage
//! scanners on its way to the client, and settles the request's record exactly
//! once: at the end of the stream, on an upstream error, on idle timeout, or in
//! `Drop` when the client goes away (as linkerd's body-eos wrappers do).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Sleep;

use crate::http::BoxError;
use crate::record::{Estimate, Record};
use crate::store::{Slot, Store};
use crate::usage::{Capture, Endpoint, Found, JsonScanner, SseScanner};

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
        }
    }

    /// The request's body streams: its model may be read from it as it passes.
    pub fn upload(&mut self, upload: Arc<Upload>) {
        self.upload = Some(upload);
    }

    /// The answer head arrived.
    pub fn answered(&mut self, status: u16, request_id: Option<String>, observer: Observer) {
        self.record.status = status;
        self.record.request_id = request_id;
        self.observer = observer;
    }

    /// Tollgate answered for upstream (502/504).
    pub fn failed(&mut self, status: u16) {
        self.record.status = status;
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
    fn observe(&mut self, data: Bytes, now: Instant) -> Bytes {
        if self.record.ttfb_us.is_none() {
            self.record.ttfb_us = Some(now.duration_since(self.started).as_micros() as u64);
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
    fn flush(&mut self) -> Bytes {
        match &mut self.observer {
            Observer::Sse(s) => s.finish(),
            _ => Bytes::new(),
        }
    }

    /// Submits the record (once).
    fn settle(&mut self) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        self.in_flight.dec();
        let mut rec = std::mem::take(&mut self.record);
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
        if let Some(m) = self.upload.as_ref().and_then(|u| u.model.get()) {
            rec.requested_model = m.clone();
        }
        match found.usage {
            Some(u) => rec.usage = u,
            None if self.should_estimate(rec.status) => {
                rec.estimate = Some(Box::new(Estimate {
                    endpoint: self.endpoint,
                    request_body: std::mem::take(&mut self.request_body),
                    capture: capture.filter(|c: &Capture| !c.bytes.is_empty()),
                }));
            }
            // No tokens to count (an upstream error, a model list, ...).
            None => {}
        }
        // With the tokens known, the budget settles now rather than when the
        // writer gets to the record, so a next request sees the real spend.
        if rec.estimate.is_none() {
            if let Some(h) = rec.hold.take() {
                // The writer prices the record again, under the prices of
                // when it is written (a price change may come in between).
                let (cost, _) = rec.cost(&self.store.prices());
                h.settle(cost, rec.usage.query + rec.usage.answer);
            }
        }
        self.store.submit(rec, slot);
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
        self.settle();
    }
}

/// Upstream's answer body on its way to the client, metered.
pub struct MeteredBody {
    inner: crate::upstream::UpstreamBody,
    meter: Meter,
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    last_activity: Instant,
    /// Bytes released at the end of the stream, sent before the end.
    tail: Option<Bytes>,
    strips: bool,
    done: bool,
}

/// The upstream went silent for longer than the idle timeout mid-answer.
#[derive(Debug)]
pub struct IdleTimeout;

impl std::fmt::Display for IdleTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream idle timeout")
    }
}

impl std::error::Error for IdleTimeout {}

impl MeteredBody {
    /// Wraps `inner`; silence longer than `idle` ends the stream with an error.
    pub fn new(inner: crate::upstream::UpstreamBody, meter: Meter, idle: Duration) -> MeteredBody {
        let strips = matches!(&meter.observer, Observer::Sse(s) if s.strips());
        MeteredBody {
            inner,
            meter,
            idle,
            timer: None,
            last_activity: Instant::now(),
            tail: None,
            strips,
            done: false,
        }
    }

    fn end(&mut self) -> Option<Bytes> {
        let tail = self.meter.flush();
        self.meter.settle();
        self.done = true;
        (!tail.is_empty()).then_some(tail)
    }
}

impl HttpBody for MeteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(t) = this.tail.take() {
            return Poll::Ready(Some(Ok(Frame::data(t))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let now = Instant::now();
                    this.last_activity = now;
                    let data = match frame.into_data() {
                        Ok(d) => d,
                        Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                    };
                    let mut out = this.meter.observe(data, now);
                    if this.inner.is_end_stream() {
                        // Settle before the client can see the end.
                        if let Some(t) = this.end() {
                            if out.is_empty() {
                                out = t;
                            } else {
                                this.tail = Some(t);
                            }
                        }
                    }
                    if out.is_empty() && !this.done {
                        continue;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Poll::Ready(Some(Err(e))) => {
                    this.meter.settle();
                    this.done = true;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                Poll::Ready(None) => {
                    return Poll::Ready(this.end().map(|t| Ok(Frame::data(t))));
                }
                Poll::Pending => {
                    let deadline = this.last_activity + this.idle;
                    let timer = this
                        .timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    if Instant::now() >= deadline {
                        this.meter.settle();
                        this.done = true;
                        return Poll::Ready(Some(Err(Box::new(IdleTimeout))));
                    }
                    // Activity since the timer was set: wait for the new deadline.
                    timer.as_mut().reset(deadline.into());
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.tail.is_none() && (self.done || (self.inner.is_end_stream() && !self.strips))
    }

    fn size_hint(&self) -> SizeHint {
        if self.strips {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        // An answer hyper never needed to poll (empty) is complete; any
        // other unfinished one was cut by the client.
        if !self.done && self.inner.is_end_stream() {
            let _ = self.end();
        }
        // Otherwise the meter's own Drop settles it as it stands.
    }
}

/// A body fed by a channel, for answers produced piece by piece on a
/// blocking thread (`/queries`): memory stays bounded by the channel.
pub struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, BoxError>>,
}

impl ChannelBody {
    /// A body and the sender that feeds it; `capacity` pieces may wait.
    pub fn new(
        capacity: usize,
    ) -> (
        tokio::sync::mpsc::Sender<Result<Bytes, BoxError>>,
        ChannelBody,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        (tx, ChannelBody { rx })
    }
}

impl HttpBody for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.get_mut()
            .rx
            .poll_recv(cx)
            .map(|o| o.map(|r| r.map(Frame::data)))
    }
}

/// Most bytes of an upload searched for its `model` field.
const SNIFF_LIMIT: usize = 64 << 10;

/// What a streamed upload tells the proxy while it passes.
#[derive(Debug)]
pub struct Upload {
    started: Instant,
    /// Microseconds after `started` of the last upload progress (or its end).
    active_at: AtomicU64,
    /// The client's side of the upload broke (it left, or sent bad framing).
    failed: AtomicBool,
    /// The `model` form field (multipart) or JSON member, once seen.
    pub model: OnceLock<String>,
}

impl Upload {
    /// When the upload last moved.
    pub fn last_activity(&self) -> Instant {
        self.started + Duration::from_micros(self.active_at.load(Ordering::Relaxed))
    }

    /// Whether the client's upload broke.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    fn touch(&self) {
        let us = self.started.elapsed().as_micros() as u64;
        self.active_at.store(us, Ordering::Relaxed);
    }
}

/// A request body streamed upstream unbuffered, whatever its size. It
/// reports progress (the answer-head timeout counts from the upload's last
/// byte, not from its first), notices a client that breaks off, and for
/// audio and image requests reads the `model` field from the first bytes.
pub struct UploadBody {
    inner: Incoming,
    seen: Vec<u8>,
    sniff: Option<bool>,
    state: Arc<Upload>,
}

impl UploadBody {
    /// Wraps an upload. `sniff`: `Some(multipart)` to look for the model.
    pub fn new(inner: Incoming, sniff: Option<bool>) -> (UploadBody, Arc<Upload>) {
        let state = Arc::new(Upload {
            started: Instant::now(),
            active_at: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            model: OnceLock::new(),
        });
        (
            UploadBody {
                inner,
                seen: Vec::new(),
                sniff,
                state: state.clone(),
            },
            state,
        )
    }

    fn look_for_model(&mut self, d: &[u8]) {
        let Some(multipart) = self.sniff else {
            return;
        };
        if self.state.model.get().is_some() || self.seen.len() >= SNIFF_LIMIT {
            return;
        }
        let n = d.len().min(SNIFF_LIMIT - self.seen.len());
        self.seen.extend_from_slice(&d[..n]);
        let m = if multipart {
            crate::usage::find_multipart_model(&self.seen)
        } else {
            crate::usage::find_model(&self.seen)
        };
        if let Some(m) = m {
            let _ = self.state.model.set(m);
            self.seen = Vec::new();
        }
    }
}

impl HttpBody for UploadBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.state.touch();
                if let Some(d) = frame.data_ref() {
                    this.look_for_model(d);
                }
            }
            Poll::Ready(Some(Err(_))) => this.state.failed.store(true, Ordering::Relaxed),
            Poll::Ready(None) => this.state.touch(),
            Poll::Pending => {}
        }
        polled.map(|o| o.map(|r| r.map_err(|e| Box::new(e) as BoxError)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
