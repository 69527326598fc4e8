//! Request tags end to end: `x-tollgate-tags` checked (a bad tag is a 400
//! naming it, before upstream), never forwarded, stored with the record over
//! the key's default tags, shown by `/queries` (JSON and CSV), and `/usage`
//! filtered by a tag and grouped by a tag key from the tag rollups, with
//! totals equal to the records' own sums on and around day edges, before and
//! after a re-pricing. Runs on PostgreSQL too (`TOLLGATE_TEST_STORE=postgres`).

mod common;

use std::collections::BTreeMap;

use common::*;
use http::{Method, Request};
use tollgate::access::AuthMode;

const DAY: i64 = 86_400_000;
/// Midnight UTC of day 19000 (2022-01-08), the first seeded day.
const D0: i64 = 19_000 * DAY;

fn tagged_req(user: &str, tags: &[&str], body: &str) -> Request<ReqBody> {
    let mut b = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("x-user", user);
    for t in tags {
        b = b.header("x-tollgate-tags", *t);
    }
    b.body(full(body.to_owned())).unwrap()
}

#[tokio::test]
async fn bad_tags_are_refused_by_name_before_upstream() {
    let mock = Mock::start(|_| Reply::json(completion("m", "ok", Tok::new(1, 1)))).await;
    let p = Proxy::start(&mock.url()).await;
    let long_key = "k".repeat(33);
    let long_value = format!("k={}", "v".repeat(65));
    let eleven = (0..11)
        .map(|i| format!("t{i}"))
        .collect::<Vec<_>>()
        .join(",");
    for (header, named) in [
        ("team=se arch", "\"team=se arch\""),
        ("team=a,team=b", "\"team\" is given twice"),
        ("team=", "\"team=\""),
        ("=x", "\"=x\""),
        ("a=b=c", "\"a=b=c\""),
        ("a,,b", "empty tag"),
        ("<script>", "\"<script>\""),
        ("x=é", "\"x=\\u{e9}\""),
        (long_key.as_str(), "longer than 32 bytes"),
        (long_value.as_str(), "longer than 64 bytes"),
        (eleven.as_str(), "more than 10 tags (at \"t10\")"),
    ] {
        let r = send(p.addr, tagged_req("ann", &[header], &chat_body("m", false))).await;
        let msg = assert_openai_error(
            &r,
            400,
            "invalid_request_error",
            Some("x-tollgate-tags"),
            None,
        );
        assert!(msg.contains(named), "{header:?}: {msg}");
    }
    // Two header lines are one list: a key in both is a duplicate.
    let r = send(
        p.addr,
        tagged_req("ann", &["team=a", "team=b"], &chat_body("m", false)),
    )
    .await;
    assert_openai_error(
        &r,
        400,
        "invalid_request_error",
        Some("x-tollgate-tags"),
        None,
    );
    assert!(mock.seen().is_empty(), "a refused request reached upstream");
    assert_eq!(p.usage("").await["numQueries"], 0);
}

#[tokio::test]
async fn tags_are_recorded_and_never_forwarded() {
    let mock = Mock::start(|_| Reply::json(completion("m", "ok", Tok::new(3, 4)))).await;
    let p = Proxy::start(&mock.url()).await;
    let r = send(
        p.addr,
        tagged_req(
            "ann",
            &[" team=search , feature=autocomplete", "urgent"],
            &chat_body("m", false),
        ),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = send(p.addr, tagged_req("ann", &[], &chat_body("m", false))).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = mock.wait_seen(2).await;
    for s in &seen {
        assert_eq!(s.header_count("x-tollgate-tags"), 0, "tags went upstream");
    }
    let recs = p.wait_records(2).await;
    assert_eq!(
        recs[0]["tags"],
        serde_json::json!({"feature": "autocomplete", "team": "search", "urgent": ""})
    );
    assert_eq!(recs[1]["tags"], serde_json::json!({}));
    let csv = p.get("/queries?format=csv").await.text();
    let lines: Vec<&str> = csv.lines().collect();
    assert!(
        lines[0].ends_with(",clientAborted,tags,upstream,imageQueryTokens,imageAnswerTokens,imageInputCost,imageOutputCost,toolCost,units,customId,project"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].ends_with(",\"feature=autocomplete,team=search,urgent\",default,0,0,0,0,0,,,"),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].ends_with(",false,,default,0,0,0,0,0,,,"),
        "{}",
        lines[2]
    );
    // /queries filters by tag too.
    assert_eq!(p.queries("tag=team=search").await.len(), 1);
    assert_eq!(p.queries("tag=urgent").await.len(), 1);
    assert_eq!(p.queries("tag=team=ads").await.len(), 0);
}

#[tokio::test]
async fn keys_carry_default_tags_that_requests_override() {
    let mock = Mock::start(|_| Reply::json(completion("m", "ok", Tok::new(1, 1)))).await;
    let p = Proxy::builder(&mock.url())
        .auth(AuthMode::Keys)
        .start()
        .await;
    let r = p
        .admin_call(
            Method::POST,
            "/users/ann/keys",
            r#"{"tags":"team=search,env=prod"}"#,
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    assert_eq!(
        v["tags"],
        serde_json::json!({"env": "prod", "team": "search"})
    );
    let key = v["key"].as_str().unwrap().to_owned();
    let listed = p.get_json("/users/ann/keys").await;
    assert_eq!(listed[0]["tags"], v["tags"]);
    // A key without tags still takes an empty body, and its answer has no
    // `tags` (as before tags existed).
    let r = p.admin_call(Method::POST, "/users/bob/keys", "").await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(r.json().get("tags").is_none(), "{}", r.text());
    for (body, param) in [
        (r#"{"tags":"team=a b"}"#, Some("tags")),
        (r#"{"tags":"a,a"}"#, Some("tags")),
        (r#"{"tag":"a"}"#, None),
        ("[1]", None),
    ] {
        let r = p.admin_call(Method::POST, "/users/ann/keys", body).await;
        assert_openai_error(&r, 400, "invalid_request_error", param, None);
    }

    let req = |tags: Option<&str>| {
        let mut b = Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {key}"));
        if let Some(t) = tags {
            b = b.header("x-tollgate-tags", t);
        }
        b.body(full(chat_body("m", false))).unwrap()
    };
    assert_eq!(send(p.addr, req(None)).await.status, 200);
    assert_eq!(
        send(p.addr, req(Some("team=ads,feature=x"))).await.status,
        200
    );
    // Ten of its own and two defaults: past the bound together.
    let ten = (0..10)
        .map(|i| format!("t{i}"))
        .collect::<Vec<_>>()
        .join(",");
    let r = send(p.addr, req(Some(&ten))).await;
    assert_openai_error(
        &r,
        400,
        "invalid_request_error",
        Some("x-tollgate-tags"),
        None,
    );
    let recs = p.wait_records(2).await;
    assert_eq!(recs.len(), 2);
    assert_eq!(
        recs[0]["tags"],
        serde_json::json!({"env": "prod", "team": "search"})
    );
    assert_eq!(
        recs[1]["tags"],
        serde_json::json!({"env": "prod", "feature": "x", "team": "ads"})
    );
    // The key's default is forwarded no more than the header.
    for s in mock.seen() {
        assert_eq!(s.header_count("x-tollgate-tags"), 0);
    }
}

/// One seeded record and its tags.
#[derive(Clone, Debug)]
struct Row {
    seed: Seed,
    tags: &'static str,
}

const TAG_SETS: [&str; 5] = [
    "feature=autocomplete,team=search",
    "feature=chat",
    "",
    "team=ads,urgent",
    "feature=chat,team=search",
];

/// Records over five days, on the edges that matter to a day split.
fn rows() -> Vec<Row> {
    let offsets = [
        0,
        1,
        DAY / 4,
        DAY / 2 - 1,
        DAY / 2,
        DAY / 2 + 1,
        3 * DAY / 4,
        DAY - 1,
        12_345_678,
        70_000_001,
    ];
    let mut out = Vec::new();
    for d in 0..5 {
        for off in offsets {
            let i = out.len() as i64;
            let priced = i % 7 != 3;
            out.push(Row {
                seed: Seed {
                    ts: D0 + d * DAY + off,
                    user: format!("u{}", i % 3),
                    model: format!("m{}", (i / 2) % 2),
                    query: 100 + i,
                    answer: 10 + i % 13,
                    cached: i % 5,
                    reasoning: i % 4,
                    cost: if priced { 1_000_003 * (i + 1) } else { 0 },
                    priced,
                },
                tags: TAG_SETS[(i as usize * 7 + d as usize) % TAG_SETS.len()],
            });
        }
    }
    // In /queries order.
    out.sort_by_key(|r| r.seed.ts);
    out
}

/// Writes `rows` through the store's own writer (records and both
/// rollups in one transaction, as live requests are written).
async fn seed(upstream: &str, db: &std::path::Path, rows: &[Row]) {
    Proxy::builder(upstream).db(db).start().await.stop().await;
    let batch: Vec<tollgate::record::Priced> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| tollgate::record::Priced {
            record: tollgate::record::Record {
                user: r.seed.user.clone(),
                requested_model: r.seed.model.clone(),
                model: r.seed.model.clone(),
                endpoint: "/v1/chat/completions".into(),
                started_ms: r.seed.ts,
                duration_us: 1000,
                ttfb_us: Some(500),
                status: 200,
                usage: tollgate::record::Usage {
                    query: r.seed.query as u64,
                    answer: r.seed.answer as u64,
                    cached: r.seed.cached as u64,
                    reasoning: r.seed.reasoning as u64,
                    ..Default::default()
                },
                request_id: Some(format!("seed-{i}")),
                tags: r.tags.into(),
                ..Default::default()
            },
            cost: r.seed.cost,
            priced: r.seed.priced,
        })
        .collect();
    let db = db.to_owned();
    tokio::task::spawn_blocking(move || {
        use tollgate::store::Backend;
        match pg_url_of(&db) {
            Some(url) => {
                let url = tollgate::config::PgUrl::parse(&url).unwrap();
                let (mut b, _, _) = tollgate::store::postgres::open(&url, false).unwrap();
                b.write(&batch, None).unwrap();
            }
            None => {
                let (mut b, _, _) = tollgate::store::sqlite::open(&db, false).unwrap();
                b.write(&batch, None).unwrap();
            }
        }
    })
    .await
    .unwrap();
}

/// The `/usage` totals of a set of records, as raw JSON text.
fn expected(rows: &[&Row]) -> BTreeMap<String, String> {
    let n = rows.len() as i128;
    let cost: i128 = rows.iter().map(|r| i128::from(r.seed.cost)).sum();
    let avg = if n == 0 { 0 } else { (cost + n / 2) / n };
    let sum = |f: fn(&Seed) -> i64| rows.iter().map(|r| f(&r.seed)).sum::<i64>().to_string();
    BTreeMap::from([
        ("numQueries".into(), n.to_string()),
        ("queryTokens".into(), sum(|r| r.query)),
        ("answerTokens".into(), sum(|r| r.answer)),
        ("cachedQueryTokens".into(), sum(|r| r.cached)),
        ("reasoningTokens".into(), sum(|r| r.reasoning)),
        ("cost".into(), dollars(cost)),
        ("averageCostPerQuery".into(), dollars(avg)),
        (
            "unpricedQueries".into(),
            rows.iter().filter(|r| !r.seed.priced).count().to_string(),
        ),
        ("rejectedQueries".into(), "0".into()),
    ])
}

/// The value of `key` in a canonical tag list (`""` for a bare word).
fn tag_value(tags: &str, key: &str) -> Option<String> {
    tags.split(',')
        .filter(|t| !t.is_empty())
        .map(|t| t.split_once('=').unwrap_or((t, "")))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_owned())
}

/// What one `/usage` query asks for.
struct Ask {
    /// `tag=` filter: key and perhaps value.
    filter: Option<(&'static str, Option<&'static str>)>,
    /// `group_by=tag:<key>`.
    tag_group: Option<&'static str>,
    /// Other group keys.
    by_user: bool,
    by_model: bool,
    by_day: bool,
}

impl Ask {
    fn query(&self, after: Option<i64>, before: Option<i64>) -> String {
        let mut q = Vec::new();
        if let Some((k, v)) = self.filter {
            q.push(match v {
                Some(v) => format!("tag={k}={v}"),
                None => format!("tag={k}"),
            });
        }
        let mut g = Vec::new();
        if let Some(k) = self.tag_group {
            g.push(format!("tag:{k}"));
        }
        for (on, name) in [
            (self.by_user, "user"),
            (self.by_model, "model"),
            (self.by_day, "day"),
        ] {
            if on {
                g.push(name.to_owned());
            }
        }
        if !g.is_empty() {
            q.push(format!("group_by={}", g.join(",")));
        }
        if let Some(a) = after {
            q.push(format!("after={}", tollgate::timestamp::format_ms(a)));
        }
        if let Some(b) = before {
            q.push(format!("before={}", tollgate::timestamp::format_ms(b)));
        }
        q.join("&")
    }

    fn grouped(&self) -> bool {
        self.tag_group.is_some() || self.by_user || self.by_model || self.by_day
    }

    /// The group of a record, as the raw JSON texts of the group fields.
    fn group_of(&self, r: &Row) -> Vec<(String, String)> {
        let mut g = Vec::new();
        if let Some(k) = self.tag_group {
            let v = match tag_value(r.tags, k) {
                Some(v) => format!("\"{v}\""),
                None => "null".into(),
            };
            g.push(("tags".into(), format!("{{\"{k}\":{v}}}")));
        }
        if self.by_user {
            g.push(("user".into(), format!("\"{}\"", r.seed.user)));
        }
        if self.by_model {
            g.push(("model".into(), format!("\"{}\"", r.seed.model)));
        }
        if self.by_day {
            let day = chrono::DateTime::from_timestamp_millis(r.seed.ts)
                .unwrap()
                .format("\"%Y-%m-%d\"")
                .to_string();
            g.push(("day".into(), day));
        }
        g.sort();
        g
    }

    fn matches(&self, r: &Row) -> bool {
        match self.filter {
            None => true,
            Some((k, want)) => match (tag_value(r.tags, k), want) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(v), Some(w)) => v == w,
            },
        }
    }
}

fn asks() -> Vec<Ask> {
    let a = |filter, tag_group, by_user, by_model, by_day| Ask {
        filter,
        tag_group,
        by_user,
        by_model,
        by_day,
    };
    vec![
        a(None, Some("feature"), false, false, false),
        a(None, Some("feature"), true, true, false),
        a(None, Some("urgent"), false, false, true),
        a(Some(("team", Some("search"))), None, false, false, false),
        a(Some(("team", None)), None, true, false, false),
        a(Some(("urgent", None)), None, false, false, false),
        a(Some(("team", None)), Some("team"), false, true, false),
        a(
            Some(("feature", Some("chat"))),
            Some("feature"),
            false,
            false,
            true,
        ),
    ]
}

/// Bounds on and around the edges of days 1 and 2, and beyond the data.
fn bounds() -> Vec<Option<i64>> {
    let mut b = vec![None, Some(D0 - DAY), Some(D0 + 6 * DAY)];
    for d in 1..3 {
        for off in [-1, 0, 1, DAY / 4, DAY / 2 - 1, DAY / 2 + 1, 3 * DAY / 4] {
            b.push(Some(D0 + d * DAY + off));
        }
    }
    b
}

/// Checks every ask for every pair of bounds against the records; returns
/// how many queries were checked.
async fn check_all(addr: std::net::SocketAddr, rows: &[Row]) -> usize {
    let b = bounds();
    let mut cases = Vec::new();
    for ask in asks() {
        for &after in &b {
            for &before in &b {
                if let (Some(x), Some(z)) = (after, before) {
                    if x >= z {
                        continue;
                    }
                }
                let sel: Vec<&Row> = rows
                    .iter()
                    .filter(|r| after.is_none_or(|x| r.seed.ts > x))
                    .filter(|r| before.is_none_or(|z| r.seed.ts < z))
                    .filter(|r| ask.matches(r))
                    .collect();
                let want: BTreeMap<Vec<(String, String)>, BTreeMap<String, String>> = if ask
                    .grouped()
                {
                    let mut groups: BTreeMap<Vec<(String, String)>, Vec<&Row>> = BTreeMap::new();
                    for r in sel {
                        groups.entry(ask.group_of(r)).or_default().push(r);
                    }
                    groups
                        .into_iter()
                        .map(|(g, rs)| (g, expected(&rs)))
                        .collect()
                } else {
                    BTreeMap::from([(Vec::new(), expected(&sel))])
                };
                cases.push((ask.query(after, before), ask.grouped(), want));
            }
        }
    }
    let n = cases.len();
    let mut tasks = Vec::new();
    for part in cases.chunks(n.div_ceil(4)) {
        let part = part.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut c = KeepAlive::new(addr).await;
            for (q, grouped, want) in part {
                let r = c.get(&format!("/usage?{q}")).await;
                assert_eq!(r.status, 200, "{q}: {}", r.text());
                let got: BTreeMap<Vec<(String, String)>, BTreeMap<String, String>> = if grouped {
                    raw_array(&r.text())
                        .into_iter()
                        .map(|mut o| {
                            let mut g: Vec<(String, String)> = ["tags", "user", "model", "day"]
                                .iter()
                                .filter_map(|k| o.remove(*k).map(|v| (k.to_string(), v)))
                                .collect();
                            g.sort();
                            (g, o)
                        })
                        .collect()
                } else {
                    BTreeMap::from([(Vec::new(), raw_object(&r.text()))])
                };
                assert_eq!(got, want, "/usage?{q}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("checks pass");
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_by_tag_equals_the_sums_of_the_records() {
    let mock = Mock::start(|_| Reply::json(completion("m0", "ok", Tok::new(1, 1)))).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tags.db");
    let mut rows = rows();
    seed(&mock.url(), &db, &rows).await;
    let proxy = Proxy::builder(&mock.url()).db(&db).start().await;

    // /queries holds exactly the seeded records, with their tags: the
    // sums below are the sums of /queries.
    let recs = proxy.queries("").await;
    assert_eq!(recs.len(), rows.len());
    for (rec, row) in recs.iter().zip(&rows) {
        assert_eq!(rec["user"], row.seed.user.as_str());
        assert_eq!(rec["queryTokens"], row.seed.query);
        let want: serde_json::Map<String, serde_json::Value> = row
            .tags
            .split(',')
            .filter(|t| !t.is_empty())
            .map(|t| t.split_once('=').unwrap_or((t, "")))
            .map(|(k, v)| (k.to_owned(), v.into()))
            .collect();
        assert_eq!(rec["tags"], serde_json::Value::Object(want));
    }
    let raw = proxy.queries_raw("").await;
    for (rec, row) in raw.iter().zip(&rows) {
        assert_eq!(rec["cost"], dollars(row.seed.cost.into()));
    }

    let checked = check_all(proxy.addr, &rows).await;
    assert!(checked > 500, "{checked}");

    // Re-pricing m0 from the middle of day 2 moves the tag rollups too.
    let from = D0 + 2 * DAY + DAY / 3;
    let r = proxy
        .set_price(
            "m0",
            &format!(
                r#"{{"validFrom":"{}","per1KQueryTokens":0.001,"per1KAnswerTokens":0.002}}"#,
                tollgate::timestamp::format_ms(from)
            ),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    for r in rows
        .iter_mut()
        .filter(|r| r.seed.model == "m0" && r.seed.ts >= from)
    {
        r.seed.cost = r.seed.query * 1_000_000 + r.seed.answer * 2_000_000;
        r.seed.priced = true;
    }
    check_all(proxy.addr, &rows).await;
}

#[tokio::test]
async fn live_requests_fill_the_tag_rollups() {
    let mock = Mock::start(|s| {
        let n = s.json()["n"].as_u64().unwrap_or(1);
        Reply::json(completion("m", "ok", Tok::new(10 * n, n)))
    })
    .await;
    let p = Proxy::start(&mock.url()).await;
    let tags = ["feature=a,team=x", "feature=b", "", "feature=a", "team=x"];
    for (i, t) in tags.iter().cycle().take(12).enumerate() {
        let body = format!(r#"{{"model":"m","messages":[],"n":{}}}"#, i + 1);
        let r = send(p.addr, tagged_req(&format!("u{}", i % 2), &[t], &body)).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let recs = p.wait_records(12).await;
    // Sums of /queries per feature value (None: no feature).
    let mut want: BTreeMap<Option<String>, (u64, u64)> = BTreeMap::new();
    for r in &recs {
        let f = r["tags"]["feature"].as_str().map(str::to_owned);
        let e = want.entry(f).or_default();
        e.0 += 1;
        e.1 += r["queryTokens"].as_u64().unwrap();
    }
    let by = p.usage("group_by=tag:feature").await;
    let got: BTreeMap<Option<String>, (u64, u64)> = by
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["tags"]["feature"].as_str().map(str::to_owned),
                (
                    g["numQueries"].as_u64().unwrap(),
                    g["queryTokens"].as_u64().unwrap(),
                ),
            )
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(got.len(), 3);
    let x = p.usage("tag=team=x").await;
    let team_x = recs.iter().filter(|r| r["tags"]["team"] == "x").count();
    assert_eq!(x["numQueries"], team_x);
    // Bad report parameters are refused by name.
    for (q, param) in [
        ("group_by=tag:a%20b", "group_by"),
        ("group_by=tag:a,tag:b", "group_by"),
        ("group_by=tag:", "group_by"),
        ("tag=team=x&group_by=tag:feature", "group_by"),
        ("tag=a&tag=b", "tag"),
        ("tag=a%20b", "tag"),
    ] {
        let r = p.get(&format!("/usage?{q}")).await;
        assert_openai_error(&r, 400, "invalid_request_error", Some(param), None);
    }
}
