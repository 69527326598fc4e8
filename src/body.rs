//! The HTTP bodies tollgate builds around others'.
//!
//! [`MeteredBody`] wraps upstream's answer, hands every frame to its
//! [`Meter`] on the way to the client, and has the record submitted exactly
//! once: at the end of the stream, on an upstream error, on idle timeout, or
//! in `Drop` when the client goes away (as linkerd's body-eos wrappers do).
//! A non-streamed answer whose client goes away may instead be read to its
//! end by a background task (`--client-abort finish`), so its real usage is
//! recorded.
//! [`UploadBody`] streams a request body upstream and reports on it through
//! an [`Upload`]; [`HeldBody`] forwards a buffered JSON body and holds its
//! room in `--max-buffered` meanwhile; [`ChannelBody`] is fed piece by piece
//! from another thread.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use crate::http::BoxError;
use crate::meter::{Meter, Upload};

/// Most answer bytes a background task reads for a client that left; past
/// it the record is submitted as it stands (an estimate).
const DRAIN_CAP: u64 = 64 << 20;

/// Upstream's answer body on its way to the client, metered.
pub struct MeteredBody {
    /// `None` once handed to a task reading the answer for a client that left.
    body: Option<Metered>,
    /// Read the rest of the answer when the client leaves early.
    finish: bool,
}

/// The metering itself; [`MeteredBody`] decides what happens when the
/// client leaves.
struct Metered {
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
    /// Wraps `inner`; silence longer than `idle` ends the stream with an
    /// error. `finish`: a client leaving early leaves the rest of the answer
    /// to a background task, which reads it (within the idle timeout and
    /// [`DRAIN_CAP`]) and records its real usage.
    pub fn new(
        inner: crate::upstream::UpstreamBody,
        meter: Meter,
        idle: Duration,
        finish: bool,
    ) -> MeteredBody {
        let strips = meter.strips();
        let body = Metered {
            inner,
            meter,
            idle,
            timer: None,
            last_activity: Instant::now(),
            tail: None,
            strips,
            done: false,
        };
        MeteredBody {
            body: Some(body),
            finish,
        }
    }
}

impl HttpBody for MeteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().body {
            Some(b) => Pin::new(b).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        let Some(mut b) = self.body.take() else {
            return;
        };
        // Complete (or an empty answer hyper never needed to poll): the
        // record is, or is about to be, submitted by `Metered`'s own Drop.
        if b.done || b.inner.is_end_stream() {
            return;
        }
        b.meter.client_left();
        if self.finish {
            // The upstream connection belongs to this worker's reactor: the
            // task runs on the same runtime.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(drain(b));
            }
        }
        // Otherwise the meter's own Drop submits the record as it stands.
    }
}

/// Reads the rest of an answer whose client left, so the meter sees its
/// usage; the record is submitted at its end, on error, on idle timeout or
/// past [`DRAIN_CAP`] (as it stands).
async fn drain(mut b: Metered) {
    use http_body_util::BodyExt;
    let mut read = 0u64;
    while let Some(Ok(f)) = b.frame().await {
        read += f.data_ref().map_or(0, |d| d.len() as u64);
        if read > DRAIN_CAP {
            break;
        }
    }
}

impl Metered {
    fn end(&mut self) -> Option<Bytes> {
        let tail = self.meter.take_tail();
        self.meter.submit();
        self.done = true;
        (!tail.is_empty()).then_some(tail)
    }
}

impl HttpBody for Metered {
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
                        // Submit before the client can see the end.
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
                    this.meter.submit();
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
                        this.meter.submit();
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

impl Drop for Metered {
    fn drop(&mut self) {
        // An answer hyper never needed to poll (empty) is complete; any
        // other unfinished one was cut by the client.
        if !self.done && self.inner.is_end_stream() {
            let _ = self.end();
        }
        // Otherwise the meter's own Drop submits it as it stands.
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

/// A buffered request body on its way upstream, holding its room in
/// `--max-buffered` until hyper drops it (sent, or the request refused).
/// A clone is the same bytes again, for a retry, holding the same room.
#[derive(Clone)]
pub struct HeldBody {
    inner: Option<Bytes>,
    _room: Arc<tokio::sync::OwnedSemaphorePermit>,
}

impl HeldBody {
    /// `bytes`, holding `room` while they are forwarded.
    pub fn new(bytes: Bytes, room: tokio::sync::OwnedSemaphorePermit) -> HeldBody {
        HeldBody {
            inner: (!bytes.is_empty()).then_some(bytes),
            _room: Arc::new(room),
        }
    }
}

impl HttpBody for HeldBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.get_mut().inner.take().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.inner.as_ref().map_or(0, |b| b.len() as u64))
    }
}

/// Most bytes of an upload searched for its `model` field.
const SNIFF_LIMIT: usize = 64 << 10;

/// A request body streamed upstream unbuffered, whatever its size. It
/// reports progress (the answer-head timeout counts from the upload's last
/// byte, not from its first), counts its bytes, notices a client that
/// breaks off or stalls (no byte for the body timeout fails it), and for
/// audio and image uploads reads the `model` field from the first bytes.
pub struct UploadBody {
    inner: Incoming,
    seen: Vec<u8>,
    sniff: Option<bool>,
    state: Arc<Upload>,
    timeout: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

/// The client sent no byte of its upload for longer than the body timeout.
#[derive(Debug)]
pub struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request body timeout")
    }
}

impl std::error::Error for BodyTimeout {}

impl UploadBody {
    /// Wraps an upload. `sniff`: `Some(multipart)` to look for the model;
    /// `timeout`: the longest silence of the client.
    pub fn new(
        inner: Incoming,
        sniff: Option<bool>,
        timeout: Duration,
    ) -> (UploadBody, Arc<Upload>) {
        let state = Arc::new(Upload::new());
        (
            UploadBody {
                inner,
                seen: Vec::new(),
                sniff,
                state: state.clone(),
                timeout,
                timer: None,
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
            crate::meter::find_multipart_model(&self.seen)
        } else {
            crate::meter::find_model(&self.seen)
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
                    this.state.add(d.len());
                    this.look_for_model(d);
                }
            }
            Poll::Ready(Some(Err(_))) => this.state.fail(),
            Poll::Ready(None) => this.state.touch(),
            Poll::Pending => {
                let deadline = this.state.last_activity() + this.timeout;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
                if timer.deadline() != deadline.into() {
                    timer.as_mut().reset(deadline.into());
                }
                if timer.as_mut().poll(cx).is_ready() {
                    this.state.time_out();
                    return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
                }
            }
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
