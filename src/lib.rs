//! tollgate: a metering proxy for the OpenAI API.
//!
//! Every request under `/v1/` is forwarded to the configured upstream
//! (OpenAI or any OpenAI-compatible server) with bodies streamed through
//! untouched, and leaves exactly one usage record: user, models, tokens
//! (cached and reasoning included), cost, status and timings. Records go over
//! a bounded channel to one writer thread that batches them into SQLite
//! (or PostgreSQL). A
//! small REST API reports prices, usage, per-query records and upstream rate
//! limits. That API keeps the endpoints and field names of the Java proxy
//! tollgate replaces, [openai-api-proxy](https://github.com/adam-sse/openai-api-proxy);
//! the docs call it "the seed API".
//!
//! # Layout
//!
//! In the order a request passes through; each module uses only modules
//! below it in this list or leaves (no import cycles between them).
//!
//! - `main.rs`: flags -> [`config::Config`] -> [`app::App::build`] ->
//!   [`server::run`].
//! - [`config`]: flags, environment and TOML parsed into one validated
//!   [`config::Config`]; `--help` is generated from its settings table.
//! - [`app`]: the [`app::App`], built once: store handle, metrics, prices,
//!   keys, budgets and the upstream pools.
//! - [`server`]: sockets, one worker thread (single-threaded runtime) per
//!   core, connection hand-off, header timeouts, routing (`/v1/` to
//!   [`proxy`], the rest to [`api`]) and graceful shutdown.
//! - [`proxy`]: the `/v1/` request's phases over one per-request context:
//!   path and authentication, body, admission (budget, rates, queue slot),
//!   upstream request, send, answer.
//! - [`batches`]: Batch API jobs created through the proxy, followed on
//!   their own thread until they end, then metered line by line.
//! - [`access`]: the admin key, user keys and client authentication modes.
//! - [`alerts`]: budget alerts POSTed to a webhook, off the request path.
//! - [`budget`]: spending limits and request/token rates, reserved before
//!   upstream and settled when the record is priced.
//! - [`endpoint`]: which API a request belongs to, deciding how its bodies are read.
//! - [`meter`]: reading model, stream flags and usage from request bodies,
//!   JSON answers, SSE streams and uploads, chunk by chunk, and the
//!   [`meter::Meter`] that turns what was read into the request's record and
//!   submits it once.
//! - [`body`]: the HTTP bodies tollgate wraps: [`body::MeteredBody`] feeds answer
//!   frames to the meter and ends it at the end, on error or when the client
//!   leaves; [`body::UploadBody`] streams uploads; [`body::ChannelBody`] streams
//!   answers built on another thread.
//! - [`upstreams`]: the configured upstreams, which serves a model, and
//!   each one's pool of keys (in turn; a key answered 429 rests).
//! - [`upstream`]: keep-alive connections to the upstream, driven inside the
//!   request's own task so a burst of events reaches the client in one write.
//! - [`record`]: the usage record, its token counts and what an estimate is made from.
//! - [`store`]: the [`store::Store`] handle, the writer and estimator
//!   threads, the backend-neutral traits; [`store::sqlite`] (the default)
//!   and [`store::postgres`] (several instances on one database) implement them.
//! - [`tokens`]: tiktoken estimates for answers without usage, off the request path.
//! - [`pricing`]: exact integer prices and costs, the model lookup chain, the
//!   built-in list, and what is priced per unit (images, tool calls, audio
//!   seconds, speech characters).
//! - [`reconcile`]: OpenAI's Costs API per day and model beside tollgate's
//!   own costs (`tollgate reconcile`, `GET /reconcile`).
//! - [`api`]: the REST API by resource (prices, reports, accounts, limits,
//!   projects, operations), JSON answers from serde structs.
//! - [`metrics`]: Prometheus metrics with bounded labels.
//! - [`error`]: errors answered in OpenAI's error shape.
//! - Leaves: [`http`] (body and error types), [`ratelimit`] (upstream's
//!   rate-limit headers), [`tags`] (request tags and their canonical
//!   form), [`projects`] (project names and members), [`duration`] and [`timestamp`] (time formats).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access;
pub mod alerts;
pub mod api;
pub mod app;
pub mod batches;
pub mod body;
pub mod budget;
pub mod config;
pub mod duration;
pub mod endpoint;
pub mod error;
pub mod http;
pub mod meter;
pub mod metrics;
pub mod pricing;
pub mod projects;
pub mod proxy;
pub mod ratelimit;
pub mod reconcile;
pub mod record;
pub mod server;
pub mod store;
pub mod tags;
pub mod timestamp;
pub mod tokens;
pub mod upstream;
pub mod upstreams;
