//! Shutdown: the binary under SIGTERM with streams in flight, start-up
//! failures (exit code 2), and the in-process drain.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

/// The tollgate binary, running.
struct Bin {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Bin {
    fn drop(&mut self) {
        // Only if a test failed half-way: never leave the process behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port from the "tollgate listening addr=127.0.0.1:PORT" log line.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("tollgate listening")?..];
    let at = rest.find("127.0.0.1:")?;
    let port: String = rest[at + 10..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    format!("127.0.0.1:{port}").parse().ok()
}

fn spawn_bin(upstream: &str, db: &std::path::Path, extra: &[&str]) -> Bin {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["--listen", "127.0.0.1:0", "--upstream", upstream])
        .arg("--db")
        .arg(db)
        .args(["--no-default-prices", "--upstream-idle-timeout", "10s"])
        .args(extra)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .env_remove("TOLLGATE_UPSTREAM_TOKEN")
        .env_remove("FORWARD_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tollgate");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        // Keep draining so the child never blocks on a full pipe.
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = listening_addr(&line) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(addr);
                }
            }
        }
    });
    let addr = rx
        .recv_timeout(STEP)
        .expect("tollgate logs its listening address");
    Bin { child, addr }
}

fn sigterm(child: &Child) {
    // Through the shell's builtin: /bin/kill is not on every minimal image.
    let ok = Command::new("sh")
        .args(["-c", &format!("kill -TERM {}", child.id())])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -TERM failed");
}

async fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    eventually("tollgate exits", STEP, || {
        let st = child.try_wait().expect("try_wait");
        async move { st }
    })
    .await
}

/// Waits until new connections are refused: the listener is closed.
async fn wait_refused(addr: SocketAddr) {
    eventually("listener closed", STEP, || async move {
        tokio::net::TcpStream::connect(addr)
            .await
            .is_err()
            .then_some(())
    })
    .await
}

/// A mock whose streams pause after their first event until `gate` opens;
/// non-streamed requests are answered at once. Request ids are `req-N`.
async fn gated_mock(gate: &Gate, hang: bool) -> Mock {
    let g = gate.clone();
    Mock::start(move |seen| {
        let id = format!("req-{}", seen.n);
        let reply = if seen.json()["stream"] == true {
            let ev = chat_stream(seen, "gpt-4o", &["slow", " stream"], Tok::new(20, 2));
            let mut steps = vec![Step::Send(ev[0].clone()), Step::Send(ev[1].clone())];
            if hang {
                steps.push(Step::Hang);
            } else {
                steps.push(Step::Wait(g.clone()));
                steps.extend(ev[2..].iter().cloned().map(Step::Send));
            }
            Reply::sse(steps)
        } else {
            Reply::json(completion("gpt-4o", "fast", Tok::new(20, 1)))
        };
        reply.header("x-request-id", &id)
    })
    .await
}

/// SIGTERM with streams in flight: no new connections, the streams finish,
/// exit code 0, and every request the clients saw complete has its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_streams_finish_and_writes_every_record() {
    let gate = Gate::new();
    let mock = gated_mock(&gate, false).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let mut bin = spawn_bin(&mock.url(), &db, &["--shutdown-grace", "15s"]);
    let addr = bin.addr;

    let mut completed = BTreeSet::new();
    for _ in 0..3 {
        let r = send(addr, chat_req("fast", &chat_body("gpt-4o", false))).await;
        assert_eq!(r.status, 200);
        completed.insert(r.header("x-request-id").unwrap());
    }
    let mut streams = Vec::new();
    for i in 0..12 {
        let proto = if i % 2 == 0 { Proto::H1 } else { Proto::H2 };
        let mut s = open_with(addr, proto, chat_req("slow", &chat_body("gpt-4o", true))).await;
        s.read_until("slow").await;
        streams.push(s);
    }
    sigterm(&bin.child);
    wait_refused(addr).await;
    assert!(bin.child.try_wait().unwrap().is_none(), "still draining");
    gate.open();
    for s in streams {
        let id = s
            .headers
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        let got = s
            .finish()
            .await
            .expect("stream completes during the grace period");
        assert!(got.ends_with(b"data: [DONE]\n\n"));
        completed.insert(id);
    }
    let status = wait_exit(&mut bin.child).await;
    assert_eq!(status.code(), Some(0), "clean exit");

    let rows = db_rows(&db);
    let ids: BTreeSet<String> = rows.iter().filter_map(|r| r.request_id.clone()).collect();
    assert_eq!(rows.len(), 15, "one record per request: {rows:?}");
    assert_eq!(ids, completed);
    assert_eq!(rows.iter().filter(|r| r.stream).count(), 12);
    assert!(rows.iter().all(|r| !r.estimated && r.status == 200));
}

/// Streams that outlive the grace period are cut, and still recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cuts_streams_after_the_grace_period_and_records_them() {
    let gate = Gate::new();
    let mock = gated_mock(&gate, true).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tollgate.db");
    let mut bin = spawn_bin(&mock.url(), &db, &["--shutdown-grace", "1s"]);
    let mut streams = Vec::new();
    for _ in 0..5 {
        let mut s = open(bin.addr, chat_req("slow", &chat_body("gpt-4o", true))).await;
        s.read_until("slow").await;
        streams.push(s);
    }
    sigterm(&bin.child);
    for s in streams {
        s.finish()
            .await
            .expect_err("cut at the end of the grace period");
    }
    let status = wait_exit(&mut bin.child).await;
    assert_eq!(status.code(), Some(0));
    let rows = db_rows(&db);
    assert_eq!(rows.len(), 5, "{rows:?}");
    assert!(rows
        .iter()
        .all(|r| r.estimated && r.status == 200 && r.query_tokens > 0));
}

/// A bad setting stops start-up with exit code 2 and one line naming it.
#[test]
fn bad_settings_exit_2_with_one_line_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ok.db");
    let db = db.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (&["--listen", "nope", "--db", db], "--listen"),
        (
            &["--listen", "127.0.0.1:0", "--db", "/proc/nope/x.db"],
            "--db",
        ),
        (
            &[
                "--listen",
                "127.0.0.1:0",
                "--db",
                db,
                "--upstream",
                "ftp://x",
            ],
            "--upstream",
        ),
        (
            &["--listen", "127.0.0.1:0", "--db", db, "--max-body", "lots"],
            "--max-body",
        ),
        (
            &[
                "--listen",
                "127.0.0.1:0",
                "--db",
                db,
                "--upstream-idle-timeout",
                "soon",
            ],
            "--upstream-idle-timeout",
        ),
        (
            &[
                "--listen",
                "127.0.0.1:0",
                "--db",
                db,
                "--shutdown-grace",
                "0s",
            ],
            "--shutdown-grace",
        ),
    ];
    for (args, setting) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .expect("run tollgate");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line, got {err:?}");
        assert!(
            lines[0].contains(setting),
            "{args:?}: {err:?} names {setting}"
        );
    }
}

/// The in-process seam: after the shutdown future completes, in-flight
/// streams finish and every record is in the database when `serve` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_shutdown_drains_and_writes_every_record() {
    let gate = Gate::new();
    let mock = gated_mock(&gate, false).await;
    let mut proxy = Proxy::builder(&mock.url())
        .grace(std::time::Duration::from_secs(15))
        .start()
        .await;
    let mut streams = Vec::new();
    for _ in 0..6 {
        let mut s = open(proxy.addr, chat_req("slow", &chat_body("gpt-4o", true))).await;
        s.read_until("slow").await;
        streams.push(s);
    }
    let server = proxy.signal_stop();
    wait_refused(proxy.addr).await;
    assert!(!server.is_finished(), "waits for in-flight streams");
    gate.open();
    for s in streams {
        s.finish().await.expect("stream completes");
    }
    within("serve returns", server).await.unwrap();
    let rows = db_rows(&proxy.db);
    assert_eq!(rows.len(), 6);
    assert!(rows.iter().all(|r| !r.estimated && r.query_tokens == 20));
}

/// Even with the grace period over, the cut streams' records are written
/// before `serve` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_grace_expiry_still_writes_records() {
    let gate = Gate::new();
    let mock = gated_mock(&gate, true).await;
    let mut proxy = Proxy::builder(&mock.url())
        .grace(Duration::from_millis(300))
        .start()
        .await;
    let mut streams = Vec::new();
    for _ in 0..4 {
        let mut s = open(proxy.addr, chat_req("slow", &chat_body("gpt-4o", true))).await;
        s.read_until("slow").await;
        streams.push(s);
    }
    let server = proxy.signal_stop();
    within("serve returns", server).await.unwrap();
    let rows = db_rows(&proxy.db);
    assert_eq!(rows.len(), 4);
    assert!(rows.iter().all(|r| r.estimated && r.status == 200));
    drop(streams);
}
