//! The HTTP server: accept loop, routing, graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::body::Body;
use crate::config::Config;
use crate::store::{sqlite, Store};

/// The upstream HTTP client type.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, Body>;

/// Everything a request handler needs.
pub struct State {
    /// The validated settings.
    pub config: Config,
    /// One pooled client for every upstream call.
    pub client: UpstreamClient,
    /// Where records go and reports come from.
    pub store: Arc<Store>,
    /// `Bearer <upstream token>`, prepared once.
    pub auth_header: Option<HeaderValue>,
}

/// Why the server could not start.
#[derive(Debug)]
pub struct StartError {
    /// The setting at fault.
    pub setting: &'static str,
    /// What went wrong.
    pub message: String,
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid {}: {}", self.setting, self.message)
    }
}

impl std::error::Error for StartError {}

fn client(config: &Config) -> UpstreamClient {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(config.upstream_connect_timeout));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(https)
}

/// Opens the store and builds the shared state.
pub fn state(config: Config) -> Result<Arc<State>, StartError> {
    let (backend, reports) =
        sqlite::open(&config.db, config.default_prices).map_err(|e| StartError {
            setting: "--db",
            message: format!("{}: {e}", config.db.display()),
        })?;
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let retain = config
        .retain_days
        .map(|d| std::time::Duration::from_secs(u64::from(d) * 86_400));
    let store = Store::start(backend, reports, metrics, retain).map_err(|e| StartError {
        setting: "--db",
        message: e.to_string(),
    })?;
    let auth_header = match &config.upstream_token {
        Some(t) => {
            let mut v = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| StartError {
                setting: "TOLLGATE_UPSTREAM_TOKEN",
                message: "not a valid header value".into(),
            })?;
            v.set_sensitive(true);
            Some(v)
        }
        None => None,
    };
    Ok(Arc::new(State {
        client: client(&config),
        config,
        store,
        auth_header,
    }))
}

/// Largest request head answered normally. hyper's own limit is set above it
/// so that oversized heads get tollgate's 431 in OpenAI's shape; only heads
/// past hyper's limit get hyper's bare 431.
const MAX_HEADER_BYTES: usize = 32 << 10;

async fn route(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let head: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if head > MAX_HEADER_BYTES {
        return Ok(crate::error::ApiError::headers_too_large(MAX_HEADER_BYTES).into_response());
    }
    if req.uri().path().starts_with("/v1/") {
        Ok(crate::proxy::handle(&state, req).await)
    } else {
        Ok(crate::api::handle(&state, req).await)
    }
}

/// Serves until `shutdown` completes, then stops accepting, lets in-flight
/// requests finish within the grace period, and writes every pending record.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let state = state(config)?;
    serve(listener, state, shutdown).await;
    Ok(())
}

/// [`run`] with a state built by [`state`].
pub async fn serve(listener: TcpListener, state: Arc<State>, shutdown: impl Future<Output = ()>) {
    if let Ok(addr) = listener.local_addr() {
        if !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "listening on a non-loopback address: the admin endpoints (/model, /usage, /queries, /ratelimits) are NOT authenticated; anyone who can reach this port can read usage and change prices"
            );
        }
        tracing::info!(%addr, upstream = %state.config.upstream, db = %state.config.db.display(), "tollgate listening");
    }
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state.config.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES * 4);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size((MAX_HEADER_BYTES * 4) as u32);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let st = state.clone();
                let svc = service_fn(move |req| route(st.clone(), req));
                let conn = builder.serve_connection(TokioIo::new(stream), svc).into_owned();
                let conn = graceful.watch(conn);
                conns.spawn(async move {
                    let _ = conn.await;
                });
                while conns.try_join_next().is_some() {}
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    let grace = state.config.shutdown_grace;
    tracing::info!(
        in_flight = conns.len(),
        "shutting down: no longer accepting"
    );
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            remaining = conns.len(),
            "grace period over: cutting the remaining connections (their records are still written)"
        );
        conns.abort_all();
    }
    while conns.join_next().await.is_some() {}
    let store = state.store.clone();
    let _ = tokio::task::spawn_blocking(move || store.close()).await;
    tracing::info!("all usage records written; bye");
}
