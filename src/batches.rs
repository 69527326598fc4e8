//! The Batch API metered: a batch created through tollgate (`POST
//! /v1/batches`, answered 2xx) is stored with who created it, and followed
//! by one thread of its own until it ends; then every line of its output and
//! error files becomes one record, priced at the batch rates
//! ([`crate::pricing::Tier::Batch`]).
//!
//! The follower survives restarts: open batches live in the database
//! (`batches` table) and are loaded at start. It polls each one on the
//! upstream it was created on, with that upstream's key, waiting
//! `--batch-poll` at first and twice as long after each poll up to
//! [`MAX_POLL`]. A batch is metered exactly once, also with several
//! instances on one database: the result files are read first, then the
//! batch is claimed with one conditional update
//! ([`crate::store::Accounts::claim_batch`]), and only the instance that
//! claimed it writes the records.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request};
use http_body_util::BodyExt;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::pricing::Tier;
use crate::record::{Record, Usage};
use crate::store::{BatchInfo, Store};
use crate::upstream::Upstream;

/// Longest wait between two polls of one batch.
pub const MAX_POLL: Duration = Duration::from_secs(600);

/// Most bytes of a batch creation's answer read for its id (the answer is
/// a small JSON object; a larger one is not a batch).
pub const MAX_CREATED_ANSWER: usize = 1 << 20;

/// Longest line of a result file (one answer body with its envelope).
const MAX_LINE: usize = 16 << 20;

/// The tag key each batch line's record carries, valued with the batch id.
pub const TAG: &str = "batch";

/// How long the follower sleeps at most before it looks whether the store
/// closed (the server stopped).
const IDLE_CHECK: Duration = Duration::from_millis(500);

/// The states in which a batch runs no more.
const TERMINAL: [&str; 4] = ["completed", "cancelled", "expired", "failed"];

/// Called with the status and body of a batch creation's answer.
pub type OnCreated = crate::meter::AnswerHook;

/// The handle requests use to hand created batches to the follower.
pub struct Batches {
    tx: mpsc::UnboundedSender<BatchInfo>,
    /// The follower and its queue until [`Batches::follow`] starts it.
    idle: parking_lot::Mutex<Option<(Follower, mpsc::UnboundedReceiver<BatchInfo>)>>,
}

impl Batches {
    /// The follower over `store`, with a connection pool per configured
    /// upstream; it runs once [`Batches::follow`] starts it (the server
    /// does: a command like `tollgate prices` that opens the store must not
    /// claim a batch it cannot stay to record).
    pub fn new(
        config: &Config,
        store: Arc<Store>,
        metrics: Arc<crate::metrics::Metrics>,
        budgets: Arc<crate::budget::Budgets>,
        project_budgets: Arc<crate::budget::Budgets>,
    ) -> Result<Batches, String> {
        let mut targets = HashMap::new();
        for conf in config.named_upstreams() {
            let conn = Upstream::new(&conf.url, &conf.trust, config, 1)?;
            let key = match conf.keys.first() {
                Some(k) => {
                    let mut v = HeaderValue::from_str(&format!("Bearer {k}"))
                        .map_err(|_| format!("{}: a key is not a valid header value", conf.name))?;
                    v.set_sensitive(true);
                    Some(v)
                }
                None => None,
            };
            targets.insert(
                conf.name.clone(),
                Target {
                    conn,
                    url: conf.url.clone(),
                    key,
                },
            );
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let f = Follower {
            store,
            metrics,
            budgets,
            project_budgets,
            targets,
            first: config.batch_poll,
            open: HashMap::new(),
        };
        Ok(Batches {
            tx,
            idle: parking_lot::Mutex::new(Some((f, rx))),
        })
    }

    /// Starts the follower thread (its own current-thread runtime), once;
    /// it ends when the store closes.
    pub fn follow(&self) {
        let Some((f, rx)) = self.idle.lock().take() else {
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("tollgate-batches".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(f.run(rx)),
                    Err(e) => {
                        tracing::error!("batches are not followed: cannot start a runtime: {e}")
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("batches are not followed: cannot start their thread: {e}");
        }
    }

    /// The hook that reads a batch creation's answer: a 2xx answer naming
    /// a batch makes it followed, charged to `user` (and `project`) with
    /// `tags`.
    pub fn on_created(
        &self,
        user: String,
        project: Option<String>,
        tags: String,
        upstream: Arc<str>,
        created_ms: i64,
    ) -> OnCreated {
        let tx = self.tx.clone();
        Box::new(move |status, body| {
            if !(200..300).contains(&status) {
                return;
            }
            let Some(c) = parse_created(body) else {
                tracing::warn!(
                    status,
                    "a batch creation's answer names no batch tollgate can follow; its lines are not metered"
                );
                return;
            };
            let _ = tx.send(BatchInfo {
                id: c.id,
                user,
                project,
                tags,
                upstream: upstream.to_string(),
                endpoint: c.endpoint,
                input_file_id: c.input_file_id,
                created_ms,
            });
        })
    }
}

/// What a batch creation's answer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// The batch id.
    pub id: String,
    /// The endpoint its lines call.
    pub endpoint: String,
    /// Its input file.
    pub input_file_id: String,
}

/// An id upstream gave, safe in a URL path and a tag value.
fn plain_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= crate::tags::MAX_VALUE
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// The id, endpoint and input file of a batch creation's answer; `None`
/// when it is not a batch object with ids tollgate can put in a path.
pub fn parse_created(body: &[u8]) -> Option<Created> {
    #[derive(Deserialize)]
    struct Answer {
        id: String,
        #[serde(default)]
        endpoint: String,
        #[serde(default)]
        input_file_id: String,
    }
    let a: Answer = serde_json::from_slice(body).ok()?;
    let endpoint_ok = a.endpoint.starts_with("/v1/")
        && a.endpoint.len() <= 64
        && a.endpoint
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'_' | b'-' | b'.'));
    (plain_id(&a.id) && endpoint_ok && (a.input_file_id.is_empty() || plain_id(&a.input_file_id)))
        .then_some(Created {
            id: a.id,
            endpoint: a.endpoint,
            input_file_id: a.input_file_id,
        })
}

/// One upstream as the follower reaches it.
struct Target {
    conn: Upstream,
    url: crate::config::UpstreamUrl,
    key: Option<HeaderValue>,
}

/// A batch being followed.
struct Open {
    info: BatchInfo,
    due: Instant,
    wait: Duration,
}

struct Follower {
    store: Arc<Store>,
    metrics: Arc<crate::metrics::Metrics>,
    budgets: Arc<crate::budget::Budgets>,
    project_budgets: Arc<crate::budget::Budgets>,
    targets: HashMap<String, Target>,
    first: Duration,
    open: HashMap<String, Open>,
}

/// Why a poll or a file read failed (logged; the batch is polled again).
type Failed = String;

impl Follower {
    /// Follows the open batches of the database not followed yet: at start,
    /// and every [`MAX_POLL`] after (on a shared database, those of an
    /// instance that stopped for good are taken over).
    fn load(&mut self) {
        match self.store.accounts().open_batches() {
            Ok(list) => {
                for b in list {
                    if !self.open.contains_key(&b.id) {
                        self.follow(b);
                    }
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot load the open batches"),
        }
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<BatchInfo>) {
        let accounts = self.store.accounts();
        self.load();
        let mut loaded = Instant::now();
        loop {
            if self.store.closed() {
                return;
            }
            if loaded.elapsed() >= MAX_POLL {
                self.load();
                loaded = Instant::now();
            }
            let now = Instant::now();
            let next = self
                .open
                .values()
                .map(|o| o.due)
                .min()
                .unwrap_or(now + IDLE_CHECK)
                .min(now + IDLE_CHECK);
            tokio::select! {
                got = rx.recv() => match got {
                    Some(b) => {
                        if let Err(e) = accounts.create_batch(&b) {
                            // Followed anyway while this instance runs.
                            tracing::error!(error = %e, "cannot store a created batch; it is not followed after a restart");
                        }
                        self.follow(b);
                    }
                    None => return,
                },
                () = tokio::time::sleep_until(next.into()) => {}
            }
            let now = Instant::now();
            let due: Vec<String> = self
                .open
                .values()
                .filter(|o| o.due <= now)
                .map(|o| o.info.id.clone())
                .collect();
            for id in due {
                if self.store.closed() {
                    return;
                }
                self.poll(&id).await;
            }
        }
    }

    fn follow(&mut self, info: BatchInfo) {
        let wait = self.first;
        self.open.insert(
            info.id.clone(),
            Open {
                info,
                due: Instant::now() + wait,
                wait,
            },
        );
    }

    /// Polls one batch; meters it when it ended, else waits longer.
    async fn poll(&mut self, id: &str) {
        let Some(o) = self.open.get(id) else { return };
        let info = o.info.clone();
        match self.check(&info).await {
            Ok(true) => {
                self.open.remove(id);
            }
            Ok(false) => self.later(id),
            Err(e) => {
                tracing::warn!(upstream = %info.upstream, error = %e, "cannot follow a batch; trying again later");
                self.later(id);
            }
        }
    }

    fn later(&mut self, id: &str) {
        if let Some(o) = self.open.get_mut(id) {
            o.wait = (o.wait * 2).min(MAX_POLL);
            o.due = Instant::now() + o.wait;
        }
    }

    /// Whether the batch is done with: metered here or by another instance.
    async fn check(&self, info: &BatchInfo) -> Result<bool, Failed> {
        let Some(target) = self.targets.get(&info.upstream) else {
            return Err(format!(
                "its upstream `{}` is not configured any more",
                info.upstream
            ));
        };
        let body = target
            .get(&format!("/v1/batches/{}", info.id), 1 << 20)
            .await?;
        #[derive(Deserialize)]
        struct Status {
            status: String,
            output_file_id: Option<String>,
            error_file_id: Option<String>,
        }
        let s: Status =
            serde_json::from_slice(&body).map_err(|e| format!("not a batch object: {e}"))?;
        if !TERMINAL.contains(&s.status.as_str()) {
            return Ok(false);
        }
        let tags = batch_tags(&info.tags, &info.id);
        let mut records = Vec::new();
        for file in [s.output_file_id, s.error_file_id].into_iter().flatten() {
            if !plain_id(&file) {
                return Err("a result file id tollgate cannot put in a path".into());
            }
            target
                .lines(&format!("/v1/files/{file}/content"), |line| {
                    if let Some(r) = line_record(info, &tags, line) {
                        records.push(r);
                    }
                })
                .await?;
        }
        if self.store.closed() {
            // Stopping: the records could not be written any more; the
            // batch stays open for the next start.
            return Err("the store closed".into());
        }
        let accounts = self.store.accounts();
        let claimed = accounts
            .claim_batch(&info.id, &s.status, crate::timestamp::now_ms())
            .map_err(|e| format!("cannot claim it: {e}"))?;
        if !claimed {
            self.metrics.batch_ended("metered_elsewhere");
            return Ok(true);
        }
        let n = records.len();
        let now = crate::timestamp::now_ms();
        let cost: i128 = {
            let prices = self.store.prices();
            records.iter().map(|r| i128::from(r.cost(&prices).0)).sum()
        };
        self.budgets.charge(&info.user, now, cost);
        if let Some(p) = &info.project {
            self.project_budgets.charge(p, now, cost);
        }
        for r in records {
            match self.store.reserve(Duration::from_secs(60)).await {
                Some(slot) => self.store.submit(r, slot),
                None => {
                    tracing::error!("usage queue full for a minute: a batch line's record is lost")
                }
            }
        }
        self.metrics.batch_ended("metered");
        tracing::info!(upstream = %info.upstream, state = %s.status, lines = n, "batch metered");
        Ok(true)
    }
}

impl Target {
    fn request(&self, path: &str) -> Result<Request<crate::http::Body>, Failed> {
        let uri = self.url.uri_for(path).map_err(|e| e.to_string())?;
        let mut req = Request::new(crate::http::full(Bytes::new()));
        *req.method_mut() = Method::GET;
        *req.uri_mut() = uri;
        if let Some(k) = &self.key {
            req.headers_mut().insert(header::AUTHORIZATION, k.clone());
        }
        Ok(req)
    }

    /// GETs `path` and reads the whole answer (at most `limit` bytes).
    async fn get(&self, path: &str, limit: usize) -> Result<Bytes, Failed> {
        let resp = self
            .conn
            .send(self.request(path)?)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("answered {status}"));
        }
        Ok(body)
    }

    /// GETs `path` (a JSONL file) and hands each non-empty line to `each`,
    /// as it arrives.
    async fn lines(&self, path: &str, mut each: impl FnMut(&[u8])) -> Result<(), Failed> {
        let resp = self
            .conn
            .send(self.request(path)?)
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("a result file: answered {}", resp.status()));
        }
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("reading a result file: {e}"))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(i) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                let line = line.trim_ascii();
                if !line.is_empty() {
                    each(line);
                }
            }
            if buf.len() > MAX_LINE {
                return Err(format!("a result line longer than {MAX_LINE} bytes"));
            }
        }
        let rest = buf.trim_ascii();
        if !rest.is_empty() {
            each(rest);
        }
        Ok(())
    }
}

/// The batch's tags with `batch=<id>` over them (the batch tag alone when
/// they are already full).
fn batch_tags(tags: &str, id: &str) -> String {
    use crate::tags::Tags;
    let Ok(own) = Tags::parse(&format!("{TAG}={id}")) else {
        return tags.to_owned();
    };
    let theirs = Tags::parse(tags).unwrap_or_default();
    own.clone().over(&theirs).unwrap_or(own).canonical()
}

/// Most bytes of a `custom_id` kept (OpenAI allows 512-character ones).
const MAX_CUSTOM_ID: usize = 512;

/// The record of one result line; `None` for a line that is not one.
fn line_record(b: &BatchInfo, tags: &str, line: &[u8]) -> Option<Record> {
    #[derive(Deserialize)]
    struct Line {
        custom_id: Option<String>,
        response: Option<Response>,
    }
    #[derive(Deserialize)]
    struct Response {
        status_code: Option<u16>,
        request_id: Option<String>,
        body: Option<Box<serde_json::value::RawValue>>,
    }
    #[derive(Deserialize)]
    struct Body<'a> {
        #[serde(default, borrow)]
        model: Option<std::borrow::Cow<'a, str>>,
        created: Option<i64>,
        usage: Option<Box<serde_json::value::RawValue>>,
    }
    let Ok(l) = serde_json::from_slice::<Line>(line) else {
        tracing::warn!("a batch result line is not JSON; skipped");
        return None;
    };
    let (status, request_id, body) = match l.response {
        Some(r) => (r.status_code.unwrap_or(500), r.request_id, r.body),
        // An error line without an answer: the request failed upstream.
        None => (500, None, None),
    };
    let body: Option<Body<'_>> = body
        .as_deref()
        .and_then(|raw| serde_json::from_str(raw.get()).ok());
    let (model, created, usage) = match &body {
        Some(b) => (
            b.model.as_deref().unwrap_or("").to_owned(),
            b.created,
            b.usage
                .as_deref()
                .and_then(|u| crate::meter::parse_usage(u.get().as_bytes())),
        ),
        None => (String::new(), None, None),
    };
    let usage = usage.filter(Usage::is_plausible).unwrap_or_default();
    let now = crate::timestamp::now_ms();
    // When upstream ran the line, if it says so sensibly; else now.
    let started_ms = created
        .and_then(|s| s.checked_mul(1000))
        .filter(|ms| *ms > b.created_ms - 86_400_000 && *ms <= now + 86_400_000)
        .unwrap_or(now);
    let mut custom_id = l.custom_id;
    if let Some(c) = &mut custom_id {
        if c.len() > MAX_CUSTOM_ID {
            let mut end = MAX_CUSTOM_ID;
            while !c.is_char_boundary(end) {
                end -= 1;
            }
            c.truncate(end);
        }
    }
    Some(Record {
        user: b.user.clone(),
        requested_model: model.clone(),
        model,
        endpoint: b.endpoint.clone(),
        started_ms,
        status,
        usage,
        tier: Some(Tier::Batch),
        request_id,
        upstream: Some(Arc::from(b.upstream.as_str())),
        tags: tags.to_owned(),
        custom_id,
        project: b.project.clone(),
        ..Record::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> BatchInfo {
        BatchInfo {
            id: "batch_1".into(),
            user: "ann".into(),
            tags: "team=ads".into(),
            project: None,
            upstream: "default".into(),
            endpoint: "/v1/chat/completions".into(),
            input_file_id: "file-in".into(),
            created_ms: crate::timestamp::now_ms(),
        }
    }

    #[test]
    fn created_answers_name_a_followable_batch() {
        let ok = br#"{"id":"batch_abc","object":"batch","endpoint":"/v1/chat/completions","input_file_id":"file-1","status":"validating"}"#;
        assert_eq!(
            parse_created(ok),
            Some(Created {
                id: "batch_abc".into(),
                endpoint: "/v1/chat/completions".into(),
                input_file_id: "file-1".into(),
            })
        );
        for bad in [
            &br#"{"id":"../files","endpoint":"/v1/chat/completions"}"#[..],
            br#"{"id":"batch_1","endpoint":"chat"}"#,
            br#"{"id":"","endpoint":"/v1/chat/completions"}"#,
            br#"not json"#,
        ] {
            assert_eq!(parse_created(bad), None);
        }
    }

    #[test]
    fn lines_become_batch_records() {
        let line = br#"{"id":"r1","custom_id":"q-1","response":{"status_code":200,"request_id":"req_9","body":{"model":"gpt-4o-mini","usage":{"prompt_tokens":10,"completion_tokens":4}}},"error":null}"#;
        let r = line_record(&info(), "batch=batch_1,team=ads", line).unwrap();
        assert_eq!(r.usage.query, 10);
        assert_eq!(r.usage.answer, 4);
        assert_eq!(r.model, "gpt-4o-mini");
        assert_eq!(r.tier, Some(Tier::Batch));
        assert_eq!(r.custom_id.as_deref(), Some("q-1"));
        assert_eq!(r.status, 200);
        let err =
            br#"{"id":"r2","custom_id":"q-2","response":null,"error":{"code":"x","message":"y"}}"#;
        let r = line_record(&info(), "", err).unwrap();
        assert_eq!((r.status, r.usage), (500, Usage::default()));
        assert!(line_record(&info(), "", b"{").is_none());
    }

    #[test]
    fn the_batch_tag_joins_the_batch_tags() {
        assert_eq!(batch_tags("team=ads", "batch_1"), "batch=batch_1,team=ads");
        assert_eq!(batch_tags("", "batch_1"), "batch=batch_1");
    }
}
