//! `/usage` over spans of days: totals come from daily rollups plus the
//! records of partial days, so they are checked against sums computed here
//! from the records themselves, for time bounds on and around day edges,
//! before and after a re-pricing, flat and grouped.

mod common;

use std::collections::BTreeMap;

use common::*;

const DAY: i64 = 86_400_000;
/// Midnight UTC of day 19000 (2022-01-08), the first seeded day.
const D0: i64 = 19_000 * DAY;

/// Records over six days: on every edge that matters to a day split
/// (midnight, the last ms of a day, around noon) and at scattered times.
fn seeds() -> Vec<Seed> {
    let mut offsets = vec![
        0,
        1,
        DAY / 4,
        DAY / 2 - 1,
        DAY / 2,
        DAY / 2 + 1,
        3 * DAY / 4,
        DAY - 1,
    ];
    let mut x: i64 = 12345;
    for _ in 0..10 {
        x = (x * 1_103_515_245 + 12_345) % 2_147_483_648;
        offsets.push(x % DAY);
    }
    let mut rows = Vec::new();
    for d in 0..6 {
        for (k, off) in offsets.iter().enumerate() {
            let i = rows.len() as i64;
            let priced = i % 7 != 3;
            rows.push(Seed {
                ts: D0 + d * DAY + off,
                user: format!("u{}", i % 3),
                model: format!("m{}", (i / 2 + k as i64) % 2),
                query: 100 + i,
                answer: 10 + i % 13,
                cached: i % 5,
                reasoning: i % 4,
                cost: if priced { 1_000_003 * (i + 1) } else { 0 },
                priced,
            });
        }
    }
    rows
}

/// The `/usage` fields a set of records must produce, as raw JSON text.
fn expected(rows: &[&Seed]) -> BTreeMap<String, String> {
    let n = rows.len() as i128;
    let cost: i128 = rows.iter().map(|r| i128::from(r.cost)).sum();
    let avg = if n == 0 { 0 } else { (cost + n / 2) / n };
    let sum = |f: fn(&Seed) -> i64| rows.iter().map(|r| f(r)).sum::<i64>().to_string();
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
            rows.iter().filter(|r| !r.priced).count().to_string(),
        ),
        // Seeded records are all served requests: nothing was refused.
        ("rejectedQueries".into(), "0".into()),
    ])
}

/// Filter bounds on and around the edges of days 1 to 3, and beyond the data.
fn bounds() -> Vec<Option<i64>> {
    let mut b = vec![None, Some(D0 - DAY), Some(D0 + 7 * DAY)];
    for d in 1..4 {
        for off in [
            -1,
            0,
            1,
            DAY / 4,
            DAY / 2 - 1,
            DAY / 2,
            DAY / 2 + 1,
            3 * DAY / 4,
        ] {
            b.push(Some(D0 + d * DAY + off));
        }
    }
    b
}

fn query(
    user: Option<&str>,
    model: Option<&str>,
    after: Option<i64>,
    before: Option<i64>,
) -> String {
    let mut q = Vec::new();
    if let Some(u) = user {
        q.push(format!("user={u}"));
    }
    if let Some(m) = model {
        q.push(format!("model={m}"));
    }
    if let Some(a) = after {
        q.push(format!("after={}", tollgate::timestamp::format_ms(a)));
    }
    if let Some(b) = before {
        q.push(format!("before={}", tollgate::timestamp::format_ms(b)));
    }
    q.join("&")
}

/// Checks `/usage` against the records for every pair of bounds and the
/// given filters, over a few connections at once.
async fn check_all(
    addr: std::net::SocketAddr,
    rows: &[Seed],
    filters: &[(Option<&str>, Option<&str>)],
) -> usize {
    let b = bounds();
    let mut cases = Vec::new();
    for &(user, model) in filters {
        for &after in &b {
            for &before in &b {
                if let (Some(a), Some(z)) = (after, before) {
                    if a >= z {
                        continue;
                    }
                }
                let sel: Vec<&Seed> = rows
                    .iter()
                    .filter(|r| after.is_none_or(|a| r.ts > a))
                    .filter(|r| before.is_none_or(|z| r.ts < z))
                    .filter(|r| user.is_none_or(|u| r.user == u))
                    .filter(|r| model.is_none_or(|m| r.model == m))
                    .collect();
                cases.push((query(user, model, after, before), expected(&sel)));
            }
        }
    }
    let n = cases.len();
    let mut tasks = Vec::new();
    for part in cases.chunks(n.div_ceil(6)) {
        let part = part.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut c = KeepAlive::new(addr).await;
            for (q, want) in part {
                let r = c.get(&format!("/usage?{q}")).await;
                assert_eq!(r.status, 200, "{q}: {}", r.text());
                assert_eq!(raw_object(&r.text()), want, "/usage?{q}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("checks pass");
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_over_days_matches_the_records_on_every_edge() {
    let mock = Mock::start(|_| Reply::json(completion("m0", "ok", Tok::new(1, 1)))).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("days.db");
    let mut rows = seeds();
    seed_db(&mock.url(), &db, &rows).await;
    let proxy = Proxy::builder(&mock.url()).db(&db).start().await;

    let filters = [(None, None), (Some("u1"), None), (None, Some("m0"))];
    let checked = check_all(proxy.addr, &rows, &filters).await;
    assert!(checked > 800, "{checked}");

    // Re-price m0 from the middle of day 2: only its later records change,
    // and the rollups must follow.
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
    let mut changed = 0;
    for s in rows.iter_mut().filter(|s| s.model == "m0" && s.ts >= from) {
        // 0.001 $/1K = 1_000_000 pico-dollars per token.
        let cost = s.query * 1_000_000 + s.answer * 2_000_000;
        if (cost, true) != (s.cost, s.priced) {
            changed += 1;
        }
        s.cost = cost;
        s.priced = true;
    }
    assert_eq!(
        raw_object(&r.text())["repricedQueries"],
        changed.to_string()
    );
    check_all(proxy.addr, &rows, &[(None, Some("m0"))]).await;

    // Live records of today join the rollups too.
    for _ in 0..3 {
        assert_eq!(proxy.chat("u1", &chat_body("m0", false)).await.status, 200);
    }
    let u = proxy.usage_raw("user=u1").await;
    let before: usize = rows.iter().filter(|r| r.user == "u1").count();
    assert_eq!(u["numQueries"], (before + 3).to_string());

    // Grouped totals: each group equals the filtered flat totals. (A
    // connection opened now: one idle through the checks above may have
    // been closed by the server's idle limit.)
    let mut c = KeepAlive::new(proxy.addr).await;
    for (after, before) in [
        (None, None),
        (Some(D0 + DAY + DAY / 4), Some(D0 + 3 * DAY + 3 * DAY / 4)),
        (Some(D0 + 2 * DAY - 1), Some(D0 + 2 * DAY + 1)),
    ] {
        let q = query(None, None, after, before);
        let r = c.get(&format!("/usage?group_by=user,day&{q}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let groups = raw_array(&r.text());
        let mut want: BTreeMap<(String, String), Vec<&Seed>> = BTreeMap::new();
        for s in rows
            .iter()
            .filter(|r| after.is_none_or(|a| r.ts > a))
            .filter(|r| before.is_none_or(|z| r.ts < z))
        {
            let day = chrono::DateTime::from_timestamp_millis(s.ts)
                .unwrap()
                .format("\"%Y-%m-%d\"")
                .to_string();
            want.entry((format!("\"{}\"", s.user), day))
                .or_default()
                .push(s);
        }
        // Today's live records belong to no seeded day.
        let groups: Vec<BTreeMap<String, String>> = groups
            .into_iter()
            .filter(|g| g["day"].as_str() < "\"2023")
            .collect();
        assert_eq!(groups.len(), want.len(), "group_by=user,day&{q}");
        for mut g in groups {
            let key = (g.remove("user").unwrap(), g.remove("day").unwrap());
            assert_eq!(
                g,
                expected(&want[&key]),
                "group {key:?} of group_by=user,day&{q}"
            );
        }
    }
}
