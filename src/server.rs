//! The HTTP server: worker threads, routing, graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::app::App;
use crate::http::Body;

/// Largest request head answered normally. hyper's own limit is set above it
/// so that oversized heads get tollgate's 431 in OpenAI's shape; only heads
/// past hyper's limit get hyper's bare 431.
const MAX_HEADER_BYTES: usize = 32 << 10;

async fn route(
    app: Arc<App>,
    remote: std::net::SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let head: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if head > MAX_HEADER_BYTES {
        return Ok(crate::error::ApiError::headers_too_large(MAX_HEADER_BYTES).into_response());
    }
    let path = req.uri().path();
    if path.starts_with("/v1/") || path.starts_with(crate::proxy::AZURE_PREFIX) {
        return Ok(crate::proxy::handle(&app, req).await);
    }
    let head = req.method() == http::Method::HEAD;
    let resp = crate::api::handle(&app, remote, req).await;
    if !head {
        return Ok(resp);
    }
    // HTTP/1 connections drop a HEAD answer's body themselves; HTTP/2 would
    // send it, and clients reject a body there.
    let (parts, _) = resp.into_parts();
    Ok(Response::from_parts(
        parts,
        crate::http::full(bytes::Bytes::new()),
    ))
}

/// Waits until a new connection has sent its first bytes: a request line, or
/// the whole HTTP/2 preface. hyper's header timeout only starts once it knows
/// the protocol, so a client that sends nothing (or trickles the preface)
/// would otherwise hold its connection forever.
async fn first_bytes(stream: &tokio::net::TcpStream, limit: std::time::Duration) -> bool {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = [0u8; 24];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => return false,
        };
        if n == 0 {
            return false;
        }
        if n == PREFACE.len() || buf[..n] != PREFACE[..n] {
            return true;
        }
        // Part of the preface: peek again once more has arrived (peek
        // answers at once while bytes wait, so the deadline is checked here).
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Serves `app` until `shutdown` completes, then stops accepting, lets
/// in-flight requests finish within the grace period, and writes every
/// pending record.
pub async fn run(listener: TcpListener, app: Arc<App>, shutdown: impl Future<Output = ()>) {
    // Batches are followed while the server runs (and its store is open).
    app.batches.follow();
    if let Ok(addr) = listener.local_addr() {
        if !addr.ip().is_loopback() {
            if app.admin_digest.is_none() {
                tracing::warn!(
                    %addr,
                    "listening on a non-loopback address without an admin key: the admin endpoints (/model, /usage, /queries, /ratelimits, /users, /metrics) answer only to loopback clients; set TOLLGATE_ADMIN_TOKEN to use them remotely"
                );
            }
            if app.config.auth == crate::access::AuthMode::Header {
                tracing::warn!(
                    %addr,
                    "listening on a non-loopback address with --auth header: the x-user header is trusted, so anyone who can reach this port can spend as any user; use --auth keys"
                );
            }
        }
        tracing::info!(%addr, upstream = %app.config.upstream, db = %app.config.db.display(), "tollgate listening");
        if app.admin_digest.is_none() {
            tracing::info!("no admin key (TOLLGATE_ADMIN_TOKEN): admin endpoints answer only to loopback clients");
        }
    }
    // One single-threaded runtime per core, each accepting from the same
    // socket: a connection, its upstream connection and its body all live on
    // one thread, as in nginx's workers. A multi-threaded runtime woke a second
    // thread (futex) for most events only to find nothing to steal.
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot hand the listening socket to the workers");
            return;
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut inboxes = Vec::new();
    let mut handoff = Vec::new();
    for _ in 0..app.workers {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        handoff.push(tx);
        inboxes.push(rx);
    }
    let shared = Arc::new(Workers {
        loads: (0..app.workers)
            .map(|n| app.metrics.worker_connections(n))
            .collect(),
        handoff,
    });
    let mut finished = Vec::new();
    for (n, inbox) in inboxes.into_iter().enumerate() {
        let l = match listener.try_clone() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot share the listening socket");
                break;
            }
        };
        let (app, stop, shared) = (app.clone(), stop_rx.clone(), shared.clone());
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name(format!("tollgate-w{n}"))
            .spawn(move || {
                crate::upstream::set_worker(n);
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(worker(n, l, inbox, shared, app, stop)),
                    Err(e) => tracing::error!(error = %e, "cannot start a worker runtime"),
                }
                drop(done_tx);
            });
        match spawned {
            Ok(_) => finished.push(done_rx),
            Err(e) => tracing::error!(error = %e, "cannot start a worker thread"),
        }
    }
    drop(listener);
    if finished.is_empty() {
        tracing::error!("no worker could start; shutting down");
    } else {
        shutdown.await;
    }
    let _ = stop_tx.send(true);
    for done in finished {
        let _ = done.await;
    }
    let store = app.store.clone();
    let _ = tokio::task::spawn_blocking(move || store.close()).await;
    let budgets = [app.budgets.clone(), app.project_budgets.clone()];
    let _ =
        tokio::task::spawn_blocking(move || budgets.iter().for_each(|b| b.release_leases())).await;
    tracing::info!("all usage records written; bye");
}

/// What the workers share: how many connections each serves (the
/// `tollgate_connections` gauges), and a way to hand a connection to another.
struct Workers {
    loads: Vec<Gauge>,
    handoff: Vec<tokio::sync::mpsc::UnboundedSender<(std::net::TcpStream, SocketAddr)>>,
}

impl Workers {
    /// Counts a connection that worker `n` accepted against the least loaded
    /// worker, at once, so that decisions made before that worker picks it
    /// up already see it. Returns it when `n` keeps it; a connection that
    /// cannot be handed over (that worker is gone) is kept too.
    fn place(
        &self,
        n: usize,
        stream: tokio::net::TcpStream,
        remote: SocketAddr,
    ) -> Option<(tokio::net::TcpStream, SocketAddr)> {
        let least = (0..self.loads.len())
            .min_by_key(|&i| self.loads[i].get())
            .unwrap_or(n);
        if self.loads[least].get() >= self.loads[n].get() {
            self.loads[n].inc();
            return Some((stream, remote));
        }
        self.loads[least].inc();
        let std = match stream.into_std() {
            Ok(std) => std,
            Err(_) => {
                // The socket is already closed.
                self.loads[least].dec();
                return None;
            }
        };
        match self.handoff[least].send((std, remote)) {
            Ok(()) => None,
            Err(back) => {
                self.loads[least].dec();
                let (std, remote) = back.0;
                let stream = tokio::net::TcpStream::from_std(std).ok()?;
                self.loads[n].inc();
                Some((stream, remote))
            }
        }
    }
}

/// Counts a connection against its worker while it lives.
struct Load<'a>(&'a Gauge);

impl Drop for Load<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One worker: accepts and serves connections on its own thread until told
/// to stop, then drains them within the grace period.
///
/// Every worker wakes for a new connection and whichever accepts first gets
/// it, which can leave one thread with most of a fixed set of keep-alive
/// connections (there is no work stealing between threads). So a worker that
/// serves more connections than another passes a new one to the least loaded.
async fn worker(
    n: usize,
    listener: std::net::TcpListener,
    mut inbox: tokio::sync::mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr)>,
    shared: Arc<Workers>,
    app: Arc<App>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "worker cannot listen");
            return;
        }
    };
    app.upstreams.spawn_reapers();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(app.config.header_timeout)
        .max_buf_size(MAX_HEADER_BYTES * 4);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size((MAX_HEADER_BYTES * 4) as u32);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut conns = JoinSet::new();
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, remote)) => match shared.place(n, stream, remote) {
                    Some(kept) => kept,
                    None => continue,
                },
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
            Some((std, remote)) = inbox.recv() => match tokio::net::TcpStream::from_std(std) {
                Ok(stream) => (stream, remote),
                Err(_) => {
                    shared.loads[n].dec();
                    continue;
                }
            },
            _ = stop.wait_for(|s| *s) => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let shared = shared.clone();
        conns.spawn(async move {
            let _load = Load(&shared.loads[n]);
            if !first_bytes(&stream, app.config.header_timeout).await {
                return;
            }
            let svc = service_fn(move |req| route(app.clone(), remote, req));
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            let _ = watcher.watch(conn.into_owned()).await;
        });
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    let grace = app.config.shutdown_grace;
    tracing::info!(
        in_flight = conns.len(),
        "shutting down: no longer accepting"
    );
    let drained = tokio::time::timeout(grace, graceful.shutdown()).await;
    // Whatever is left: connections that never sent a request, or (past the
    // grace period) requests cut short, whose records are still written.
    if drained.is_err() {
        tracing::warn!(
            remaining = conns.len(),
            "grace period over: cutting the remaining connections (their records are still written)"
        );
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}
