//! Admin handlers never wait for SQLite on a worker thread: each worker's
//! runtime also serves proxied connections, and SQLite can wait up to its
//! busy timeout (5 s) for a lock. With the database locked from outside
//! while a key is being created, proxied requests on every worker are still
//! answered, and the key is stored once the lock goes.

mod common;

use std::time::Duration;

use common::*;
use http::{Request, StatusCode};
use tokio::sync::mpsc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_holds_up_the_admin_write_not_the_proxy() {
    let mock = Mock::start(|_| Reply::json(completion("gpt-x", "ok", Tok::new(3, 4)))).await;
    let proxy = Proxy::start(&mock.url()).await;
    let addr = proxy.addr;
    let r = proxy.chat("bob", &chat_body("gpt-x", false)).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // Another process holding the write lock, as a backup tool or a long
    // report in another program would.
    let lock = rusqlite::Connection::open(&proxy.db).expect("open the database");
    lock.busy_timeout(STEP).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE")
        .expect("lock the database");

    let admin = tokio::spawn(async move {
        let req = Request::post("/users/alice/keys").body(empty()).unwrap();
        send(addr, req).await
    });
    // Time for the admin request to reach SQLite. Not asserted: were it
    // late, this test would prove less, not fail.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!admin.is_finished(), "the key was created through the lock");

    // Every connection stays open until the end, so that placement (to the
    // least loaded worker) spreads them over all workers, the one serving
    // the admin request included.
    let n = 2 * proxy.state.workers + 2;
    let hold = Gate::new();
    let (tx, mut answers) = mpsc::unbounded_channel();
    for _ in 0..n {
        let (tx, hold) = (tx.clone(), hold.clone());
        tokio::spawn(async move {
            let mut s = open(addr, chat_req("bob", &chat_body("gpt-x", false))).await;
            while let Some(piece) = s.next().await {
                piece.expect("proxied answer body");
            }
            let _ = tx.send((s.status, String::from_utf8_lossy(&s.got).into_owned()));
            hold.wait().await;
            drop(s);
        });
    }
    for i in 0..n {
        let (status, body) = within("a proxied answer", answers.recv())
            .await
            .expect("answer");
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(
            !admin.is_finished(),
            "the admin write ended (through its busy timeout) before proxied answer {} of {n}: \
             a worker thread was blocked in SQLite",
            i + 1
        );
    }

    lock.execute_batch("ROLLBACK").unwrap();
    let r = within("the admin write", admin).await.unwrap();
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    hold.open();
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let keys = proxy.get_json("/users/alice/keys").await;
    assert_eq!(keys[0]["id"], id.as_str(), "{keys}");
}
