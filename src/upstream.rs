//! Connections to the upstream: HTTP/1.1 keep-alive connections that are
//! driven by the request using them, not by tasks of their own.
//!
//! hyper's pooled client runs every connection in a separate task and hands
//! each body chunk across to the request's task: for a stream of small SSE
//! events that is a wake-up and a `writev` per event, and it was most of
//! tollgate's cost per stream (BENCHMARKS.md). Here the connection future is
//! polled by the request future until the answer head arrives and then by
//! the answer body, so everything a request does runs in the client
//! connection's task, and events that arrive in one read reach the client in
//! one write.
//!
//! A connection goes back to the idle list only once its answer was read to
//! the end; one dropped mid-answer (client gone, error) is closed. A request
//! that an idle connection could not take (closed by the upstream while idle)
//! goes to the next idle connection or a fresh one: hyper hands it back
//! unsent. One that was sent when the connection failed is not repeated (it
//! may have been billed).

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tower_service::Service;

use crate::config::{Config, Trust, UpstreamUrl};
use crate::http::{Body, BoxError};

type Io = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;
/// Boxed: the connection state is large (1.7 KB) and changes hands several
/// times per request.
type Conn = Pin<Box<http1::Connection<Io, Body>>>;

/// Idle connections kept at most; more are closed as they come back.
const MAX_IDLE: usize = 1024;

/// How often idle connections are checked for closure and age.
const REAP_EVERY: Duration = Duration::from_secs(5);

/// The TLS client settings for an upstream: ring, TLS 1.2 and 1.3, the
/// built-in (webpki) roots plus the operating system's store and the PEM
/// file that `trust` names. Host names and validity are checked by rustls.
fn tls_config(trust: &Trust) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if trust.system_roots {
        let found = rustls_native_certs::load_native_certs();
        if found.certs.is_empty() {
            let why = found
                .errors
                .first()
                .map_or_else(|| "none found".to_owned(), ToString::to_string);
            return Err(format!("cannot load the system's trusted roots: {why}"));
        }
        // A store commonly holds a few certificates rustls cannot use
        // (expired, odd encodings): those are skipped, as browsers do.
        roots.add_parsable_certificates(found.certs);
    }
    if let Some(path) = &trust.ca_file {
        use rustls_pki_types::pem::PemObject;
        let shown = path.display();
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read {shown}: {e}"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{shown} is not a PEM certificate file: {e}"))?;
        if certs.is_empty() {
            return Err(format!("{shown} holds no PEM certificate"));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| format!("{shown}: unusable certificate: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The upstream: where requests go and the idle connections to it, one
/// idle list per server worker thread (a connection belongs to the reactor
/// of the thread that opened it; used from another thread, every event
/// would cross threads).
pub struct Upstream {
    pools: Vec<Arc<Pool>>,
}

thread_local! {
    /// The server worker this thread is (0 outside the workers).
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the current thread as server worker `n`.
pub fn set_worker(n: usize) {
    WORKER.with(|w| w.set(n));
}

struct Pool {
    /// TCP (with connect timeout) and TLS (ring, webpki roots, ALPN http/1.1).
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority` of the upstream, for the connector.
    origin: Uri,
    /// The `Host` header every request carries.
    host: HeaderValue,
    /// Idle connections, oldest first.
    idle: Mutex<Vec<Idle>>,
    /// Idle connections older than this are closed.
    idle_timeout: Duration,
}

struct Idle {
    /// The request side of the connection.
    send: SendRequest<Body>,
    /// The connection itself, polled only by whoever holds it.
    conn: Conn,
    /// When it went idle.
    since: Instant,
}

/// Why a request got no answer head from the upstream.
#[derive(Debug)]
pub enum UpstreamError {
    /// No connection could be opened (TCP or TLS): nothing reached upstream.
    Connect(BoxError),
    /// The connection failed while the request was sent or the head awaited.
    Http(hyper::Error),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamError::Connect(e) => write!(f, "cannot connect: {e}"),
            UpstreamError::Http(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for UpstreamError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UpstreamError::Connect(e) => e.source(),
            UpstreamError::Http(e) => std::error::Error::source(e),
        }
    }
}

impl Upstream {
    /// The upstream at `url` for `workers` server threads, with no
    /// connection open yet; HTTPS trusts the built-in roots and what `trust`
    /// adds. An error says why `trust` cannot be used.
    pub fn new(
        url: &UpstreamUrl,
        trust: &Trust,
        config: &Config,
        workers: usize,
    ) -> Result<Upstream, String> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.upstream_connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(trust)?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let up = url;
        let origin = Uri::builder()
            .scheme(up.scheme.clone())
            .authority(up.authority.clone())
            .path_and_query("/")
            .build()
            .expect("scheme and authority were validated");
        let host =
            HeaderValue::from_str(up.authority.as_str()).expect("an authority is a header value");
        let pools = (0..workers.max(1))
            .map(|_| {
                Arc::new(Pool {
                    connector: connector.clone(),
                    origin: origin.clone(),
                    host: host.clone(),
                    idle: Mutex::new(Vec::new()),
                    idle_timeout: config.upstream_keepalive,
                })
            })
            .collect();
        Ok(Upstream { pools })
    }

    fn pool(&self) -> &Arc<Pool> {
        &self.pools[WORKER.with(|w| w.get()) % self.pools.len()]
    }

    /// Sends `req` (origin-form URI) and waits for the answer head. The
    /// answer body keeps driving the connection.
    pub async fn send(
        &self,
        mut req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, UpstreamError> {
        let pool = self.pool();
        req.headers_mut().insert(header::HOST, pool.host.clone());
        loop {
            let (mut send, mut conn, reused) = match pool.checkout() {
                Some(i) => (i.send, i.conn, true),
                None => {
                    let (s, c) = pool.connect().await?;
                    (s, c, false)
                }
            };
            // A connection from the idle list may have been closed meanwhile:
            // polling it reads the close.
            let ready = poll_fn(|cx| {
                if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                    return Poll::Ready(Err(r.err()));
                }
                send.poll_ready(cx).map_err(Some)
            })
            .await;
            if let Err(e) = ready {
                match e {
                    _ if reused => continue,
                    Some(e) => return Err(UpstreamError::Http(e)),
                    None => return Err(UpstreamError::Connect("closed at once".into())),
                }
            }
            let mut answer = std::pin::pin!(send.try_send_request(req));
            let mut live = true;
            let res = poll_fn(|cx| {
                if live && conn.as_mut().poll(cx).is_ready() {
                    // Ended (or failed): the answer future says how.
                    live = false;
                }
                answer.as_mut().poll(cx)
            })
            .await;
            match res {
                Ok(resp) => {
                    let lease = live.then(|| Lease {
                        send,
                        conn,
                        pool: Arc::downgrade(pool),
                    });
                    return Ok(resp.map(|incoming| UpstreamBody {
                        incoming,
                        lease,
                        ended: false,
                        unflushed: false,
                        deferred: None,
                    }));
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if reused => req = r,
                    _ => return Err(UpstreamError::Http(e.into_error())),
                },
            }
        }
    }

    /// Closes this worker's idle connections that the upstream closed or
    /// that are too old, every few seconds, until the upstream is dropped.
    pub fn spawn_reaper(&self) {
        let pool: Weak<Pool> = Arc::downgrade(self.pool());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REAP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                pool.reap(Instant::now());
            }
        });
    }

    /// Idle connections right now, all workers together.
    pub fn idle_connections(&self) -> usize {
        self.pools.iter().map(|p| p.idle.lock().len()).sum()
    }
}

impl Pool {
    fn checkout(&self) -> Option<Idle> {
        let now = Instant::now();
        let mut idle = self.idle.lock();
        while let Some(i) = idle.pop() {
            if now.duration_since(i.since) < self.idle_timeout {
                return Some(i);
            }
            // Everything below is older still.
            idle.clear();
        }
        None
    }

    async fn connect(&self) -> Result<(SendRequest<Body>, Conn), UpstreamError> {
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(UpstreamError::Connect)?;
        let io = connector
            .call(self.origin.clone())
            .await
            .map_err(UpstreamError::Connect)?;
        tracing::debug!(upstream = %self.origin, "upstream connection opened");
        let (send, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(UpstreamError::Http)?;
        Ok((send, Box::pin(conn)))
    }

    fn checkin(&self, send: SendRequest<Body>, mut conn: Conn) {
        // One poll finishes the answer's bookkeeping (keep-alive or close);
        // its waker is replaced by the next real poll.
        let mut cx = Context::from_waker(Waker::noop());
        if conn.as_mut().poll(&mut cx).is_ready() || !send.is_ready() {
            return;
        }
        let mut idle = self.idle.lock();
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                send,
                conn,
                since: Instant::now(),
            });
        }
    }

    fn reap(&self, now: Instant) {
        let mut cx = Context::from_waker(Waker::noop());
        let mut idle = self.idle.lock();
        idle.retain_mut(|i| {
            now.duration_since(i.since) < self.idle_timeout
                && i.conn.as_mut().poll(&mut cx).is_pending()
        });
    }
}

/// A connection lent to one request until its answer has been read.
struct Lease {
    send: SendRequest<Body>,
    conn: Conn,
    pool: Weak<Pool>,
}

/// The upstream's answer body. Polling it also drives its connection.
pub struct UpstreamBody {
    incoming: Incoming,
    /// `None` once the connection ended or was given back.
    lease: Option<Lease>,
    /// The body was read to its end.
    ended: bool,
    /// Data went out since the last `Pending`: the client's connection may
    /// not have written it yet.
    unflushed: bool,
    /// An error held back until the data before it was flushed, and until when.
    deferred: Option<(hyper::Error, Pin<Box<tokio::time::Sleep>>)>,
}

/// How long an error that came right after data is held back: hyper drops
/// the answer's buffered bytes when its body fails, and a connection closed
/// at once can lose what the client has not read yet.
const ERROR_HOLD: Duration = Duration::from_millis(20);

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some((_, hold)) = &mut this.deferred {
            if hold.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if let Some((e, _)) = this.deferred.take() {
                return Poll::Ready(Some(Err(e)));
            }
        }
        if let Some(l) = &mut this.lease {
            if l.conn.as_mut().poll(cx).is_ready() {
                this.lease = None;
            }
        }
        let out = Pin::new(&mut this.incoming).poll_frame(cx);
        match &out {
            Poll::Ready(Some(Ok(_))) => this.unflushed = true,
            Poll::Ready(Some(Err(_))) if this.unflushed => {
                // Events and a reset often arrive in one read. The error
                // waits (`ERROR_HOLD`): `Pending` makes hyper write what it
                // has, and the client gets time to read it.
                if let Poll::Ready(Some(Err(e))) = out {
                    this.deferred = Some((e, Box::pin(tokio::time::sleep(ERROR_HOLD))));
                }
                this.unflushed = false;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Pending => this.unflushed = false,
            _ => {}
        }
        if matches!(out, Poll::Ready(None)) || this.incoming.is_end_stream() {
            this.ended = true;
        }
        out
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let Some(l) = self.lease.take() {
            if self.ended {
                if let Some(pool) = l.pool.upgrade() {
                    pool.checkin(l.send, l.conn);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
