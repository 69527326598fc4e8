//! The metered proxy for everything under `/v1/`.
//!
//! A request's life is a sequence of phases over one per-request `Ctx`
//! (as pingora's `ProxyHttp` phases over its `CTX`), in the order they
//! happen: authenticate, read and check the body, admit (budget, rates, a
//! queue slot), build the upstream request, send it, and wrap the answer in a
//! [`MeteredBody`] that settles the record. Each phase either moves the
//! request on or returns an [`ApiError`].

mod admit;
mod headers;
mod path;
mod reserve;

pub use path::{normalize as normalize_path, PathError, AZURE_PREFIX};

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytes::BytesMut;
use http::header::{self, HeaderMap};
use http::request::Parts;
use http::{HeaderName, Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;

use crate::access::AuthMode;
use crate::app::App;
use crate::body::{HeldBody, MeteredBody, UploadBody};
use crate::config::ClientAbort;
use crate::endpoint::Endpoint;
use crate::error::ApiError;
use crate::http::Body;
use crate::meter::{self, JsonScanner, Meter, Observer, RequestError, SseScanner, Upload};
use crate::record::Record;
use crate::tags::Tags;
use crate::upstream::{UpstreamBody, UpstreamError};
use crate::upstreams::Chain;

/// Names the upstream that served an answer.
const UPSTREAM_HEADER: HeaderName = HeaderName::from_static("x-tollgate-upstream");

/// Forwards one API request upstream and meters it.
pub async fn handle(app: &Arc<App>, req: Request<Incoming>) -> Response<Body> {
    match forward(app, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn forward(app: &Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let mut ctx = Ctx::authenticate(app, &req)?;
    let (mut parts, body) = req.into_parts();
    let body = ctx.read_body(app, &mut parts.headers, body).await?;
    ctx.route(app)?;
    let admission = match admit::admit(app, &ctx).await {
        Ok(a) => a,
        Err(e) => {
            if ctx.upload.is_some() {
                drain(body).await;
            }
            return Err(e);
        }
    };
    let up = ctx.upstream_request(app, parts, body)?;
    let mut meter = ctx.meter(app, admission);
    meter.overhead(ctx.started.elapsed());
    if app.config.client_abort == ClientAbort::Finish
        && ctx.endpoint.needs_model()
        && !ctx.request.stream
    {
        return detached(app, ctx, meter, up).await;
    }
    let again = ctx.again.take();
    let chain = app.upstreams.chain(ctx.chain);
    let served = exchange(app, chain, up, again, ctx.upload.as_deref(), &mut meter).await;
    let answer = match served {
        Ok(a) => a,
        Err(e) => {
            settle_failed(meter, &e);
            return Err(e.into());
        }
    };
    Ok(ctx.wrap_answer(app, meter, answer, false))
}

/// Most bytes of a refused upload read and dropped before the refusal.
const DRAIN_LIMIT: u64 = 32 << 20;

/// Reads and drops what is left of a refused upload (bounded by
/// [`DRAIN_LIMIT`] and the upload's body timeout), so that a client still
/// sending it reads the refusal rather than a broken pipe.
async fn drain(mut body: Body) {
    let mut read = 0u64;
    while read < DRAIN_LIMIT {
        match body.frame().await {
            Some(Ok(f)) => read += f.data_ref().map_or(0, |d| d.len() as u64),
            _ => break,
        }
    }
}

/// Phases 5 and 6 of a non-streamed request under `--client-abort finish`,
/// in a task of their own: a client that leaves before the answer head
/// only drops the wait, and the task goes on; a client gone by the time the
/// head comes leaves the answer to [`MeteredBody`], which reads it to its
/// end in the background. Either way the record gets the answer's real
/// usage, marked as client-aborted.
async fn detached(
    app: &Arc<App>,
    ctx: Ctx,
    mut meter: Meter,
    up: Request<Body>,
) -> Result<Response<Body>, ApiError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let app = app.clone();
    // Spawned on this worker's own runtime: the upstream connection it
    // opens belongs to this thread's reactor, like the client's.
    tokio::spawn(async move {
        let mut ctx = ctx;
        let again = ctx.again.take();
        let chain = app.upstreams.chain(ctx.chain);
        let out = match exchange(&app, chain, up, again, None, &mut meter).await {
            Ok(answer) => Ok(ctx.wrap_answer(&app, meter, answer, true)),
            Err(e) => {
                if tx.is_closed() {
                    meter.client_left();
                }
                settle_failed(meter, &e);
                Err(e)
            }
        };
        // Refused when the client is gone: the answer's Drop takes over.
        let _ = tx.send(out);
    });
    match rx.await {
        Ok(out) => out.map_err(ApiError::from),
        Err(_) => Err(ApiError::internal("the upstream exchange ended unanswered")),
    }
}

/// Closes the record of a request that got no answer head.
fn settle_failed(meter: Meter, e: &SendError) {
    match e.status() {
        // Never reached upstream: nothing was spent, nothing to record.
        None => meter.cancel(),
        Some(status) => {
            let mut meter = meter;
            meter.failed(status);
        }
    }
}

/// What the proxy knows of one request, gathered phase by phase.
struct Ctx {
    started: Instant,
    started_ms: i64,
    user: String,
    key_id: Option<String>,
    /// The request's tags (its own over its key's defaults), canonical.
    tags: String,
    /// The project it is charged to: its key's, or (without keys) its
    /// user's only project.
    project: Option<String>,
    endpoint: Endpoint,
    /// Whether the method is POST (the only one that spends).
    post: bool,
    /// The request path, without the query string.
    path: String,
    request: RequestFacts,
    /// Progress of a streamed (unbuffered) upload.
    upload: Option<Arc<Upload>>,
    /// The buffered body again, for a retry (none for streamed uploads,
    /// which cannot be sent twice).
    again: Option<HeldBody>,
    /// Which of `app.upstreams` may serve the request, in order.
    chain: Chain,
    /// The deployment of an Azure-shaped path: the model asked for.
    deployment: Option<String>,
}

/// What the request body said (JSON APIs; empty for streamed uploads).
#[derive(Default)]
struct RequestFacts {
    /// The declared `content-length`, if any.
    declared: Option<u64>,
    /// What an image generation asks for.
    image: Option<meter::ImageRequest>,
    /// Characters of a speech request's input.
    speech: Option<u64>,
    model: String,
    stream: bool,
    max_tokens: Option<u64>,
    choices: u64,
    tier: Option<crate::pricing::Tier>,
    /// `include_usage` was spliced in: the usage-only chunk is not the client's.
    spliced: bool,
    /// The body as forwarded.
    body: Bytes,
}

impl Ctx {
    /// Phase 1: the path as forwarded (normalised, within `/v1/`, of a
    /// family that may be forwarded) and who the request is charged to.
    fn authenticate(app: &App, req: &Request<Incoming>) -> Result<Ctx, ApiError> {
        let started_ms = crate::timestamp::now_ms();
        let bad_path = |e: PathError| ApiError::bad_request(e.message()).with_code("invalid_path");
        let (deployment, raw) = match path::from_azure(req.uri().path()) {
            None => (None, Cow::Borrowed(req.uri().path())),
            Some(Ok((d, p))) => (Some(d.to_owned()), Cow::Owned(p)),
            Some(Err(e)) => return Err(bad_path(e)),
        };
        let path = path::normalize(&raw).map_err(bad_path)?;
        let family = path::family(&path);
        if !path::is_metered_family(family) && !app.config.allows_unmetered(family) {
            app.metrics.rejected("unmetered_endpoint");
            return Err(ApiError::forbidden(format!(
                "tollgate cannot meter /v1/{family} requests, so it does not forward them; an admin can allow them with --allow-unmetered {family}"
            ))
            .with_code("unmetered_endpoint"));
        }
        let (user, key_id, defaults) = match app.config.auth {
            AuthMode::Header => (user_of(req.headers())?, None, None),
            AuthMode::Keys => {
                let k = crate::access::user_from_key(&app.keys, req.headers(), started_ms)
                    .inspect_err(|_| app.metrics.rejected("invalid_api_key"))?;
                (k.user.clone(), Some(k.id.clone()), Some(k.clone()))
            }
        };
        let tags = request_tags(req.headers(), defaults.as_ref().map(|k| &k.tags))
            .inspect_err(|_| app.metrics.rejected("invalid_tags"))?;
        let project = match &defaults {
            Some(k) => k.project.clone(),
            None => app.projects.only_project_of(&user),
        };
        Ok(Ctx {
            started: Instant::now(),
            started_ms,
            user,
            key_id,
            tags,
            project,
            endpoint: Endpoint::classify(req.method(), &path),
            post: req.method() == http::Method::POST,
            path: path.into_owned(),
            request: RequestFacts {
                choices: 1,
                ..RequestFacts::default()
            },
            upload: None,
            again: None,
            chain: Chain::One(0),
            deployment,
        })
    }

    /// Phase 2b: the upstreams serving the request's model: its
    /// `[[fallback]]` list, else the first whose `models` match.
    fn route(&mut self, app: &App) -> Result<(), ApiError> {
        let model = &self.request.model;
        let Some(chain) = app.upstreams.route(model) else {
            return Err(ApiError::not_found(format!(
                "The model `{model}` is not served here: no upstream is configured for it."
            ))
            .with_param("model")
            .with_code("model_not_found"));
        };
        self.chain = chain;
        Ok(())
    }

    /// Phase 2: JSON APIs and image generations are read whole (within
    /// `--max-body`), checked and perhaps spliced; every other body streams
    /// through as it comes.
    async fn read_body(
        &mut self,
        app: &App,
        headers: &mut HeaderMap,
        body: Incoming,
    ) -> Result<Body, ApiError> {
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        self.request.declared = declared;
        if !self.endpoint.reads_body() {
            if self.creates_batch() {
                // Its answer is read for the batch id.
                headers::ask_identity(headers);
            }
            let sniff = self.endpoint.is_upload().then(|| {
                headers::ask_identity(headers);
                headers
                    .get(header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"multipart/"))
            });
            let (body, progress) = UploadBody::new(body, sniff, app.config.body_timeout);
            self.upload = Some(progress);
            if let Some(d) = &self.deployment {
                self.request.model.clone_from(d);
            }
            return Ok(body.boxed_unsync());
        }
        let limit = app.config.max_body;
        if declared.is_some_and(|n| n > limit) {
            return Err(ApiError::too_large(limit));
        }
        let (bytes, room) = read_buffered(app, body, declared, limit).await?;
        let r = &mut self.request;
        if self.endpoint == Endpoint::Speech {
            // Forwarded as it came: only read for its price.
            let speech = meter::parse_speech_request(&bytes)?;
            r.model.clone_from(&speech.model);
            r.speech = Some(speech.characters);
            r.body = bytes;
            headers.remove(header::CONTENT_LENGTH);
            headers::ask_identity(headers);
            let held = HeldBody::new(r.body.clone(), room);
            self.again = Some(held.clone());
            return Ok(held.boxed_unsync());
        }
        if self.endpoint == Endpoint::Images {
            // Forwarded as it came: only read for its reservation.
            let image = meter::parse_image_request(&bytes)?;
            r.model.clone_from(&image.model);
            r.stream = image.stream;
            r.image = Some(image);
            r.body = bytes;
            headers.remove(header::CONTENT_LENGTH);
            headers::ask_identity(headers);
            let held = HeldBody::new(r.body.clone(), room);
            self.again = Some(held.clone());
            return Ok(held.boxed_unsync());
        }
        let mut info = meter::parse_request(&bytes)?;
        if let Some(d) = &self.deployment {
            // Azure's path names the model; a body naming another is a
            // contradiction, not a choice between them.
            if info.model.is_empty() {
                info.model.clone_from(d);
            } else if info.model != *d {
                return Err(ApiError::bad_param(
                    "model",
                    "the model in the body is not the deployment in the path",
                ));
            }
        }
        r.body = bytes;
        if info.stream && !info.include_usage && self.endpoint.usage_on_request() {
            if let Some(spliced) = meter::splice_include_usage(&r.body) {
                r.body = Bytes::from(spliced);
                r.spliced = true;
            }
        }
        r.model = info.model;
        r.stream = info.stream;
        r.max_tokens = info.max_tokens;
        r.choices = info.choices;
        r.tier = info.tier;
        headers.remove(header::CONTENT_LENGTH);
        headers::ask_identity(headers);
        // The room in --max-buffered is held by the forwarded body (and its
        // copy for a retry) and given back when both are dropped.
        let held = HeldBody::new(r.body.clone(), room);
        self.again = Some(held.clone());
        Ok(held.boxed_unsync())
    }

    /// Phase 4: the request as upstream gets it, its target still the
    /// client's (normalised) path and query: each upstream tried makes it
    /// its own (`Route::target`).
    fn upstream_request(
        &self,
        app: &App,
        parts: Parts,
        body: Body,
    ) -> Result<Request<Body>, ApiError> {
        let path_and_query = match parts.uri.query() {
            // Azure's `api-version` is no OpenAI parameter; an Azure
            // upstream gets its configured one.
            Some(q) if self.deployment.is_some() => {
                let kept: Vec<&str> = q
                    .split('&')
                    .filter(|p| !p.is_empty() && !p.starts_with("api-version="))
                    .collect();
                if kept.is_empty() {
                    Cow::Borrowed(self.path.as_str())
                } else {
                    Cow::Owned(format!("{}?{}", self.path, kept.join("&")))
                }
            }
            Some(q) => Cow::Owned(format!("{}?{q}", self.path)),
            None => Cow::Borrowed(self.path.as_str()),
        };
        let uri = Uri::builder()
            .path_and_query(path_and_query.as_ref())
            .build()
            .map_err(|e| ApiError::bad_request(format!("bad request path: {e}")))?;
        let mut up = Request::new(body);
        *up.method_mut() = parts.method;
        *up.uri_mut() = uri;
        *up.headers_mut() = parts.headers;
        // The key goes in per attempt (`exchange`).
        headers::to_upstream(up.headers_mut(), app.config.auth, None);
        Ok(up)
    }

    /// Opens the request's record: from here on, whatever happens leaves one.
    fn meter(&mut self, app: &App, admission: admit::Admission) -> Meter {
        let upstream = app.upstreams.all()[app.upstreams.chain(self.chain)[0]]
            .name
            .clone();
        let batch = self.creates_batch().then(|| {
            app.batches.on_created(
                self.user.clone(),
                self.project.clone(),
                self.tags.clone(),
                upstream.clone(),
                self.started_ms,
            )
        });
        let r = &mut self.request;
        let record = Record {
            user: std::mem::take(&mut self.user),
            requested_model: std::mem::take(&mut r.model),
            endpoint: std::mem::take(&mut self.path),
            started_ms: self.started_ms,
            stream: r.stream,
            tier: r.tier,
            key_id: self.key_id.take(),
            tags: std::mem::take(&mut self.tags),
            project: self.project.take(),
            upstream: Some(upstream),
            hold: admission.hold,
            ..Record::default()
        };
        let mut meter = Meter::new(
            app.store.clone(),
            app.metrics.in_flight.clone(),
            admission.slot,
            record,
            self.started,
            self.endpoint,
            std::mem::take(&mut r.body),
        );
        if let Some(u) = &self.upload {
            meter.upload(u.clone());
        }
        if let Some(c) = r.speech {
            meter.speech(c);
        }
        if let Some(i) = &r.image {
            meter.per_image(crate::pricing::Units {
                images: i.n,
                image_size: i
                    .size
                    .as_deref()
                    .and_then(crate::pricing::units::parse_size),
                image_quality: i
                    .quality
                    .as_deref()
                    .and_then(crate::pricing::Quality::parse),
                ..Default::default()
            });
        }
        if let Some(hook) = batch {
            meter.keep_answer(crate::batches::MAX_CREATED_ANSWER, hook);
        }
        if matches!(
            self.endpoint,
            Endpoint::Images | Endpoint::ImageUpload | Endpoint::Audio
        ) {
            meter.learn_into(app.budgets.recent.clone());
        }
        meter
    }

    /// Whether the request creates a Batch API job (followed once created).
    fn creates_batch(&self) -> bool {
        self.post && self.path == "/v1/batches"
    }

    /// Phase 6: the answer goes back to the client through the scanner that
    /// reads its usage.
    fn wrap_answer(
        self,
        app: &App,
        mut meter: Meter,
        (answer, served): (Response<UpstreamBody>, usize),
        finish: bool,
    ) -> Response<Body> {
        let (mut parts, body) = answer.into_parts();
        if let Some(raw) =
            crate::ratelimit::Raw::capture(&parts.headers, crate::timestamp::now_ms())
        {
            app.store.set_ratelimits(raw);
        }
        let request_id = parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let strip = self.request.spliced && parts.status.is_success();
        let observer = observer_for(self.endpoint, &parts.headers, strip);
        let rewritten = strip && matches!(observer, Observer::Sse(_));
        meter.answered(parts.status.as_u16(), request_id, observer);
        headers::to_client(&mut parts.headers, rewritten);
        parts.headers.insert(
            UPSTREAM_HEADER,
            app.upstreams.all()[served].name_header.clone(),
        );
        let body = MeteredBody::new(body, meter, app.config.upstream_idle_timeout, finish);
        Response::from_parts(parts, body.boxed_unsync())
    }
}

/// How an answer is read for usage: by its endpoint and content type, and
/// not at all when it is compressed.
fn observer_for(endpoint: Endpoint, h: &HeaderMap, strip: bool) -> Observer {
    let encoded = h
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes() != b"identity");
    if endpoint == Endpoint::Other || encoded {
        return Observer::Ignore;
    }
    let content_type = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type.starts_with("text/event-stream") {
        Observer::Sse(SseScanner::new(endpoint.stream_kind(), strip))
    } else if content_type.contains("json") && endpoint == Endpoint::Responses {
        Observer::Json(JsonScanner::with_tools())
    } else if content_type.contains("json") {
        Observer::Json(JsonScanner::default())
    } else {
        Observer::Ignore
    }
}

/// The user a request is charged to, in header mode.
fn user_of(h: &HeaderMap) -> Result<String, ApiError> {
    match h.get("x-user").map(|v| v.to_str()) {
        Some(Ok(u)) if !u.trim().is_empty() => Ok(u.trim().to_owned()),
        Some(Err(_)) => Err(ApiError::unauthorized(
            "The x-user header must be visible ASCII text.",
        )),
        _ => Err(ApiError::unauthorized(
            "Missing x-user header: tollgate charges every request to a user.",
        )
        .with_code("missing_user")),
    }
}

/// The request's `x-tollgate-tags` over its key's default tags, canonical.
fn request_tags(h: &HeaderMap, defaults: Option<&Tags>) -> Result<String, ApiError> {
    let bad = |e: crate::tags::TagError| ApiError::bad_param(crate::tags::HEADER, e.0);
    let own = Tags::from_headers(h.get_all(crate::tags::HEADER).iter()).map_err(bad)?;
    let all = match defaults {
        Some(d) => own.over(d).map_err(bad)?,
        None => own,
    };
    Ok(all.canonical())
}

/// Longest wait for room among the buffered bodies (`--max-buffered`)
/// before a 503.
const BUFFER_WAIT: Duration = Duration::from_secs(2);

/// Room first taken for a body of unknown length; it grows (doubling) as
/// the body arrives.
const CHUNKED_START: u64 = 64 << 10;

/// KiB (rounded up): the semaphore's unit, so `acquire_many`'s `u32` covers
/// terabytes.
fn kib(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

/// Takes `n` KiB of `--max-buffered`, waiting at most [`BUFFER_WAIT`].
async fn take_room(app: &App, n: u32) -> Result<OwnedSemaphorePermit, ApiError> {
    let wait = app.buffered.clone().acquire_many_owned(n);
    match tokio::time::timeout(BUFFER_WAIT, wait).await {
        Ok(Ok(p)) => Ok(p),
        _ => {
            app.metrics.rejected("server_busy");
            let mut e = ApiError::unavailable(
                "tollgate holds as many request bodies as it may; try again shortly",
            )
            .with_code("server_busy");
            e.retry_after = Some(1);
            Err(e)
        }
    }
}

/// Reads a JSON request body: at most `limit` bytes (else 413), no silence
/// longer than `--body-timeout` (else 408), and only with room for it in
/// `--max-buffered` (the declared length up front, or growing as a chunked
/// body arrives), which the returned permit holds.
async fn read_buffered(
    app: &App,
    mut body: Incoming,
    declared: Option<u64>,
    limit: u64,
) -> Result<(Bytes, OwnedSemaphorePermit), ApiError> {
    let most = kib(limit);
    let mut room = take_room(app, kib(declared.unwrap_or(CHUNKED_START)).min(most)).await?;
    let mut buf = BytesMut::with_capacity(declared.map_or(0, |n| n as usize));
    let timeout = app.config.body_timeout;
    loop {
        let frame = match tokio::time::timeout(timeout, body.frame()).await {
            Err(_) => {
                app.metrics.rejected("body_timeout");
                return Err(ApiError::body_timeout(timeout));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ApiError::bad_request(format!(
                    "could not read the request body: {e}"
                )))
            }
            Ok(Some(Ok(f))) => f,
        };
        let Ok(d) = frame.into_data() else { continue };
        let len = (buf.len() as u64).saturating_add(d.len() as u64);
        if len > limit {
            return Err(ApiError::too_large(limit));
        }
        let held = room.num_permits() as u32;
        if kib(len) > held {
            let more = kib(len).max(held.saturating_mul(2)).min(most);
            room.merge(take_room(app, more.saturating_sub(held)).await?);
        }
        buf.extend_from_slice(&d);
    }
    Ok((buf.freeze(), room))
}

/// Why no answer head came back.
enum SendError {
    /// The client broke off its own upload (or framed it badly).
    ClientUpload,
    /// The client's upload stalled for longer than the body timeout.
    UploadTimeout(Duration),
    /// No connection to upstream could be opened.
    Unreachable,
    /// The connection failed while sending or waiting for the head.
    Upstream(UpstreamError),
    /// No head within the idle timeout.
    Timeout(Duration),
}

impl SendError {
    /// The status the record gets; `None`: the request never reached
    /// upstream, so it leaves no record.
    fn status(&self) -> Option<u16> {
        match self {
            SendError::ClientUpload => Some(499),
            SendError::UploadTimeout(_) => Some(408),
            SendError::Unreachable => None,
            SendError::Upstream(_) => Some(502),
            SendError::Timeout(_) => Some(504),
        }
    }
}

impl From<SendError> for ApiError {
    fn from(e: SendError) -> ApiError {
        match e {
            SendError::ClientUpload => {
                ApiError::bad_request("the request body could not be read to its end")
            }
            SendError::UploadTimeout(d) => ApiError::body_timeout(d),
            SendError::Unreachable => {
                ApiError::bad_gateway("upstream is unreachable").with_code("upstream_unreachable")
            }
            SendError::Upstream(e) => ApiError::bad_gateway(format!(
                "upstream failed before answering: {}",
                error_chain(&e)
            )),
            SendError::Timeout(d) => {
                ApiError::gateway_timeout(format!("upstream sent no answer within {d:?}"))
            }
        }
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> ApiError {
        match e.param() {
            Some(p) => ApiError::bad_param(p, e.message()),
            None => ApiError::bad_request(e.message()),
        }
    }
}

/// Phase 5: sends the request to the upstreams of its chain in turn, each
/// with the next key of its pool, and waits for the answer head. An answer
/// 429 (the key then rests until its reset), a 5xx, or a connection that
/// failed before the head is retried, up to `--upstream-retries` times on
/// one upstream (on another key while one is not resting), then on the
/// chain's next upstream serving the model, while the body can be sent
/// again (`again`): nothing has reached the client yet. Each failed
/// attempt that reached an upstream leaves its own record; the serving
/// attempt's goes on in `meter`. Returns the answer and the index of the
/// upstream that gave it.
async fn exchange(
    app: &App,
    chain: &[usize],
    up: Request<Body>,
    again: Option<HeldBody>,
    upload: Option<&Upload>,
    meter: &mut Meter,
) -> Result<(Response<UpstreamBody>, usize), SendError> {
    let (head, body) = up.into_parts();
    let mut body = Some(body);
    let all = app.upstreams.all();
    // `/ratelimits` per key is kept for `[[upstream]]` tables only.
    let per_key_limits = !app.config.upstreams.is_empty();
    for (pos, &at) in chain.iter().enumerate() {
        let route = &all[at];
        if !route.serves(meter.requested_model()) {
            // A fallback list's entry without this (globbed) model.
            continue;
        }
        let fall_back = again.is_some()
            && chain[pos + 1..]
                .iter()
                .any(|&i| all[i].serves(meter.requested_model()));
        let uri = route
            .target(&head.uri, meter.requested_model())
            .map_err(|_| SendError::Unreachable)?;
        meter.serve(&route.name, route.priced_as(meter.requested_model()));
        let mut tried: Vec<usize> = Vec::new();
        let mut retries = 0;
        loop {
            let now = crate::timestamp::now_ms();
            let key = route.pick(now, &tried);
            let body = match body.take() {
                Some(b) => b,
                None => again.clone().map_or_else(
                    || {
                        http_body_util::Empty::new()
                            .map_err(|e| match e {})
                            .boxed_unsync()
                    },
                    BodyExt::boxed_unsync,
                ),
            };
            let mut req = Request::new(body);
            *req.method_mut() = head.method.clone();
            *req.uri_mut() = uri.clone();
            *req.headers_mut() = head.headers.clone();
            if let Some(k) = key {
                // The configured key replaces whatever the client sent, in
                // either header.
                let k = route.key(k);
                req.headers_mut().remove(header::AUTHORIZATION);
                req.headers_mut().remove(headers::AZURE_KEY);
                req.headers_mut().insert(k.name.clone(), k.header.clone());
            }
            let out = send(app, route, req, upload).await;
            if per_key_limits {
                if let Ok(a) = &out {
                    route.note_limits(key, a.headers(), crate::timestamp::now_ms());
                }
            }
            let may_retry = again.is_some() && retries < app.config.upstream_retries;
            if !may_retry && !fall_back {
                return out.map(|a| (a, at));
            }
            if let Some(k) = key {
                tried.push(k);
            }
            // Whether the next try stays on this upstream.
            let (status, stay) = match &out {
                Ok(a) if a.status() == http::StatusCode::TOO_MANY_REQUESTS => {
                    let now = crate::timestamp::now_ms();
                    if let Some(k) = key {
                        route.rest(k, now, a.headers());
                    }
                    // Another key may take it now; with none, the next
                    // upstream, else the client gets this 429 (and its
                    // reset) rather than a wait here.
                    match route.pick(now, &tried) {
                        Some(next) if may_retry && !route.resting(next, now) => (429, true),
                        _ if fall_back => (429, false),
                        _ => return out.map(|a| (a, at)),
                    }
                }
                Ok(a) if a.status().is_server_error() => (a.status().as_u16(), may_retry),
                Ok(_) => return out.map(|a| (a, at)),
                Err(SendError::Unreachable) => (0, may_retry),
                Err(SendError::Upstream(_)) => (502, may_retry),
                Err(_) => return out.map(|a| (a, at)),
            };
            if tried.len() >= route.key_count() {
                // Every key had its turn: a 5xx or a failed connection may
                // still pass on one of them.
                tried.clear();
            }
            if status != 0 {
                let request_id = out.as_ref().ok().and_then(|a| {
                    a.headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                });
                meter.attempt(status, request_id).await;
            }
            if !stay {
                tracing::info!(
                    upstream = %route.name,
                    status,
                    "upstream failed before the answer; trying the next upstream"
                );
                break;
            }
            tracing::info!(
                upstream = %route.name,
                status,
                retry = retries + 1,
                "upstream attempt failed before the answer; sending again"
            );
            retries += 1;
        }
    }
    // Only reached with no upstream of the chain serving the model, which
    // routing rules out.
    Err(SendError::Unreachable)
}

/// Sends one attempt and waits for upstream's answer head. The idle
/// timeout counts from the request's last byte: a streamed upload that keeps
/// moving is never cut.
async fn send(
    app: &App,
    route: &crate::upstreams::Route,
    up: Request<Body>,
    upload: Option<&Upload>,
) -> Result<Response<UpstreamBody>, SendError> {
    let idle = app.config.upstream_idle_timeout;
    let fut = route.conn.send(up);
    tokio::pin!(fut);
    let mut deadline = Instant::now() + idle;
    let sent = loop {
        match tokio::time::timeout_at(deadline.into(), &mut fut).await {
            Ok(out) => break out,
            Err(_) => match upload.map(|u| u.last_activity() + idle) {
                Some(d) if d > Instant::now() => deadline = d,
                _ => return Err(SendError::Timeout(idle)),
            },
        }
    };
    sent.map_err(|e| {
        if upload.is_some_and(|u| u.timed_out()) {
            SendError::UploadTimeout(app.config.body_timeout)
        } else if upload.is_some_and(|u| u.failed()) {
            SendError::ClientUpload
        } else if matches!(e, UpstreamError::Connect(_)) {
            // The client's 502 says only "unreachable"; the operator needs
            // the reason (refused, timed out, which certificate check failed).
            tracing::warn!(upstream = %route.name, url = %route.url(), error = %error_chain(&e), "cannot connect to upstream");
            SendError::Unreachable
        } else {
            tracing::warn!(upstream = %route.name, url = %route.url(), error = %error_chain(&e), "upstream failed before answering");
            SendError::Upstream(e)
        }
    })
}

/// An error and its causes on one line, for logs and 502 messages.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
