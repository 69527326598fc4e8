use std::sync::atomic::{AtomicUsize, Ordering};

use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

/// How the test server answers each request on a connection.
#[derive(Clone, Copy)]
enum Answer {
    /// `Content-Length` body, connection kept.
    Length,
    /// Chunked body of 20 small events written in one go, connection kept.
    Chunked,
    /// Head and one chunk, then silence (the answer never ends).
    Partial,
    /// `Content-Length` body, then the server closes the connection without
    /// saying so in the head (an idle keep-alive timeout on its side).
    LengthThenClose,
}

struct Server {
    port: u16,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

async fn server(answer: Answer) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let (c, r) = (connections.clone(), requests.clone());
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            c.fetch_add(1, Ordering::SeqCst);
            let r = r.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // Requests in these tests have no body: read to the blank line.
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    buf.drain(..end);
                    r.fetch_add(1, Ordering::SeqCst);
                    match answer {
                        Answer::Length | Answer::LengthThenClose => {
                            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
                                .await
                                .unwrap();
                            if matches!(answer, Answer::LengthThenClose) {
                                return;
                            }
                        }
                        Answer::Chunked => {
                            let mut out = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
                            for i in 0..20 {
                                let ev = format!("data: {{\"n\":{i}}}\n\n");
                                out.extend_from_slice(
                                    format!("{:x}\r\n{ev}\r\n", ev.len()).as_bytes(),
                                );
                            }
                            out.extend_from_slice(b"0\r\n\r\n");
                            s.write_all(&out).await.unwrap();
                        }
                        Answer::Partial => {
                            s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
                                .await
                                .unwrap();
                            std::future::pending::<()>().await;
                        }
                    }
                }
            });
        }
    });
    Server {
        port,
        connections,
        requests,
    }
}

fn upstream_at(port: u16) -> Upstream {
    let config = Config {
        upstream: crate::config::UpstreamUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap(),
        ..Config::default()
    };
    Upstream::new(&config.upstream, &config.upstream_trust, &config, 1).unwrap()
}

fn get() -> Request<Body> {
    Request::get("/v1/models")
        .body(Empty::new().map_err(|e| match e {}).boxed_unsync())
        .unwrap()
}

async fn read_all(resp: Response<UpstreamBody>) -> Bytes {
    resp.into_body().collect().await.unwrap().to_bytes()
}

#[tokio::test]
async fn a_connection_read_to_the_end_is_reused() {
    let srv = server(Answer::Length).await;
    let up = upstream_at(srv.port);
    for _ in 0..5 {
        let resp = up.send(get()).await.unwrap();
        assert_eq!(read_all(resp).await, "hello");
        assert_eq!(up.idle_connections(), 1);
    }
    assert_eq!(srv.connections.load(Ordering::SeqCst), 1);
    assert_eq!(srv.requests.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn a_chunked_stream_read_to_the_end_is_reused() {
    let srv = server(Answer::Chunked).await;
    let up = upstream_at(srv.port);
    for _ in 0..3 {
        let body = read_all(up.send(get()).await.unwrap()).await;
        assert!(body.ends_with(b"data: {\"n\":19}\n\n"), "{body:?}");
    }
    assert_eq!(srv.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn events_that_arrived_together_are_handed_over_without_waiting() {
    // The point of driving the connection in the body: once the first event
    // is there, the other 19 (same read) come out of poll_frame at once,
    // without a round trip through another task.
    let srv = server(Answer::Chunked).await;
    let up = upstream_at(srv.port);
    let mut body = up.send(get()).await.unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"data: {\"n\":0}\n\n");
    let mut cx = Context::from_waker(Waker::noop());
    let mut events = 1;
    loop {
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(f))) => {
                assert!(f.into_data().unwrap().starts_with(b"data: "));
                events += 1;
            }
            Poll::Ready(None) => break,
            Poll::Ready(Some(Err(e))) => panic!("{e}"),
            Poll::Pending => panic!("pending after {events} events"),
        }
    }
    assert_eq!(events, 20);
}

#[tokio::test]
async fn an_answer_dropped_midway_closes_its_connection() {
    let srv = server(Answer::Partial).await;
    let up = upstream_at(srv.port);
    let mut body = up.send(get()).await.unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"hello");
    drop(body);
    assert_eq!(up.idle_connections(), 0);
    let mut body = up.send(get()).await.unwrap().into_body();
    body.frame().await.unwrap().unwrap();
    assert_eq!(srv.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_idle_connection_the_upstream_closed_is_replaced() {
    let srv = server(Answer::LengthThenClose).await;
    let up = upstream_at(srv.port);
    for n in 1..=3 {
        let resp = up.send(get()).await.unwrap();
        assert_eq!(read_all(resp).await, "hello");
        // Let the close arrive before the next request.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(srv.connections.load(Ordering::SeqCst), n);
    }
    assert_eq!(srv.requests.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn the_reaper_drops_closed_and_old_connections() {
    let srv = server(Answer::LengthThenClose).await;
    let up = upstream_at(srv.port);
    read_all(up.send(get()).await.unwrap()).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Whether or not the close was seen when it came back, reaping finds it.
    up.pools[0].reap(Instant::now());
    assert_eq!(up.idle_connections(), 0);

    let srv = server(Answer::Length).await;
    let up = upstream_at(srv.port);
    read_all(up.send(get()).await.unwrap()).await;
    up.pools[0].reap(Instant::now());
    assert_eq!(up.idle_connections(), 1, "a live, fresh connection stays");
    up.pools[0].reap(Instant::now() + Duration::from_secs(91));
    assert_eq!(up.idle_connections(), 0, "past the idle timeout it goes");
}

#[tokio::test]
async fn nothing_listening_is_a_connect_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let up = upstream_at(port);
    match up.send(get()).await {
        Err(UpstreamError::Connect(_)) => {}
        other => panic!(
            "expected a connect error, got {:?}",
            other.map(|r| r.status())
        ),
    }
}
