use super::reports::where_clause;
use super::schema::SCHEMA_V1;
use super::*;
use crate::pricing::{Price, PriceTable};
use crate::record::{Priced, Record, Usage};
use crate::store::{Backend, Filter, GroupKey, Reports, UsageTotals};

fn rec(user: &str, model: &str, ts: i64, q: u64, a: u64) -> Priced {
    Priced {
        record: Record {
            user: user.into(),
            requested_model: model.into(),
            model: model.into(),
            endpoint: "/v1/chat/completions".into(),
            started_ms: ts,
            status: 200,
            usage: Usage {
                query: q,
                answer: a,
                cached: q / 3,
                reasoning: a / 2,
                ..Usage::default()
            },
            ..Record::default()
        },
        cost: (q * 7 + a * 13) as i64,
        priced: q % 5 != 0,
    }
}

/// Totals straight from the records, as the reference.
fn naive(c: &Connection, f: &Filter) -> UsageTotals {
    let (w, args) = where_clause(f);
    c.query_row(
        &format!("SELECT COUNT(*), COALESCE(SUM(query_tokens),0), COALESCE(SUM(answer_tokens),0), COALESCE(SUM(cached_tokens),0), COALESCE(SUM(reasoning_tokens),0), COALESCE(SUM(cost),0), COALESCE(SUM(1-priced),0) FROM queries{w}"),
        rusqlite::params_from_iter(args),
        |r| {
            Ok(UsageTotals {
                queries: r.get::<_, i64>(0)? as u64,
                query_tokens: r.get::<_, i64>(1)? as u64,
                answer_tokens: r.get::<_, i64>(2)? as u64,
                cached_tokens: r.get::<_, i64>(3)? as u64,
                reasoning_tokens: r.get::<_, i64>(4)? as u64,
                cost: r.get::<_, i64>(5)?.into(),
                unpriced: r.get::<_, i64>(6)? as u64,
                rejected: 0,
            })
        },
    )
    .unwrap()
}

/// A tiny deterministic generator, so failures reproduce.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[test]
fn rollups_agree_with_records_for_any_range() {
    let dir = tempfile::tempdir().unwrap();
    let (mut backend, reports, _) = open(&dir.path().join("t.db"), false).unwrap();
    let mut g = Lcg(7);
    let base = 1_700_000_000_000i64;
    let users = ["ann", "bob", "cy"];
    let models = ["gpt-4o", "gpt-4o-mini"];
    let batch: Vec<Priced> = (0..3000)
        .map(|_| {
            let ts = base + (g.next() % (20 * DAY as u64)) as i64;
            rec(
                users[(g.next() % 3) as usize],
                models[(g.next() % 2) as usize],
                ts,
                g.next() % 1000,
                g.next() % 500,
            )
        })
        .collect();
    for chunk in batch.chunks(700) {
        backend.write(chunk, None).unwrap();
    }
    let c = connect(&dir.path().join("t.db")).unwrap();
    // Exact day boundaries, a millisecond either side, and random instants.
    let mut instants = vec![None];
    for d in [0i64, 3, 7, 19] {
        let day = (base / DAY + d) * DAY;
        instants.extend([Some(day - 1), Some(day), Some(day + 1)]);
    }
    for _ in 0..12 {
        instants.push(Some(base + (g.next() % (21 * DAY as u64)) as i64));
    }
    for &after in &instants {
        for &before in &instants {
            for user in [None, Some("bob")] {
                let f = Filter {
                    user: user.map(str::to_owned),
                    model: None,
                    after,
                    before,
                    ..Filter::default()
                };
                let got = reports.usage(&f, &[]).unwrap();
                assert_eq!(got.len(), 1);
                assert_eq!(
                    got[0].1,
                    naive(&c, &f),
                    "after {after:?} before {before:?} user {user:?}"
                );
            }
        }
    }
}

#[test]
fn grouped_rows_sum_to_the_total() {
    let dir = tempfile::tempdir().unwrap();
    let (mut backend, reports, _) = open(&dir.path().join("t.db"), false).unwrap();
    let base = 1_700_000_000_000i64;
    let recs = vec![
        rec("ann", "gpt-4o", base, 10, 5),
        rec("ann", "gpt-4o", base + DAY, 20, 5),
        rec("bob", "gpt-4o-mini", base + 2 * DAY, 30, 5),
        rec("ann", "gpt-4o-mini", base + 40 * DAY, 40, 5),
    ];
    backend.write(&recs, None).unwrap();
    let f = Filter {
        after: Some(base - 1),
        before: Some(base + 41 * DAY),
        ..Filter::default()
    };
    let total = reports.usage(&f, &[]).unwrap()[0].1.clone();
    assert_eq!(total.queries, 4);
    let by_user = reports.usage(&f, &[GroupKey::User]).unwrap();
    assert_eq!(by_user.len(), 2);
    assert_eq!(by_user[0].0.user.as_deref(), Some("ann"));
    assert_eq!(by_user[0].1.queries, 3);
    assert_eq!(by_user[1].1.query_tokens, 30);
    let by_um = reports
        .usage(&f, &[GroupKey::User, GroupKey::Model])
        .unwrap();
    assert_eq!(by_um.len(), 3);
    let sum: u64 = by_um.iter().map(|(_, t)| t.query_tokens).sum();
    assert_eq!(sum, total.query_tokens);
    let by_month = reports.usage(&f, &[GroupKey::Month]).unwrap();
    assert_eq!(by_month.len(), 2);
    assert_eq!(by_month[0].0.month.as_deref(), Some("2023-11"));
    let by_day = reports.usage(&f, &[GroupKey::Day]).unwrap();
    assert_eq!(by_day.len(), 4);
    assert_eq!(by_day[0].0.day.as_deref(), Some("2023-11-14"));
    // No match: one row of zeros without grouping, no rows with it.
    let none = Filter {
        user: Some("nobody".into()),
        ..Filter::default()
    };
    assert_eq!(
        reports.usage(&none, &[]).unwrap()[0].1,
        UsageTotals::default()
    );
    assert!(reports.usage(&none, &[GroupKey::User]).unwrap().is_empty());
}

#[test]
fn repricing_updates_rollups() {
    let dir = tempfile::tempdir().unwrap();
    let (mut backend, reports, _) = open(&dir.path().join("t.db"), false).unwrap();
    let base = 1_700_000_000_000i64;
    let mut r = rec("ann", "gpt-4o-2024-08-06", base, 1000, 100);
    r.cost = 0;
    r.priced = false;
    backend.write(&[r], None).unwrap();
    let price = Price {
        valid_from: 0,
        query: 2_500_000,
        cached: None,
        answer: 10_000_000,
        ..Price::default()
    };
    let mut table = PriceTable::default();
    table.insert("gpt-4o", price);
    assert_eq!(backend.set_price("gpt-4o", &price, &table).unwrap(), 1);
    let f = Filter {
        after: Some(base - DAY / 3),
        before: Some(base + DAY / 3),
        ..Filter::default()
    };
    let t = reports.usage(&f, &[]).unwrap()[0].1.clone();
    let all = reports.usage(&Filter::default(), &[]).unwrap()[0].1.clone();
    let want = 1000 * 2_500_000 + 100 * 10_000_000;
    assert_eq!(t.cost, want);
    assert_eq!(all.cost, want);
    assert_eq!(all.unpriced, 0);
}

#[test]
fn migrates_schema_1_with_backfill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(SCHEMA_V1).unwrap();
        c.execute(
            "INSERT INTO queries (user, model, requested_model, endpoint, ts, duration_us, status, stream, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, priced, estimated) VALUES ('ann','m','m','/v1/x',1700000000000,1,200,0,5,6,0,0,42,1,0)",
            [],
        )
        .unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
    }
    let (_b, reports, _) = open(&path, false).unwrap();
    let t = reports.usage(&Filter::default(), &[]).unwrap()[0].1.clone();
    assert_eq!((t.queries, t.query_tokens, t.cost), (1, 5, 42));
}

/// Huge counts (past the plausibility bound, as a database of an older
/// tollgate may hold) never overflow: rollups written in one batch and in
/// several saturate at `i64::MAX`, and every report over them answers,
/// saturated, flat and grouped, whole days and partial ones.
#[test]
fn huge_counts_saturate_in_rollups_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let (mut backend, reports, _) = open(&dir.path().join("t.db"), false).unwrap();
    let day = 19_000 * DAY;
    let huge = |ts: i64| {
        let mut p = rec("eve", "gpt-4o", ts, 0, 0);
        p.record.usage = Usage {
            query: u64::MAX,
            answer: u64::MAX,
            cached: u64::MAX,
            reasoning: u64::MAX,
            ..Usage::default()
        };
        p.cost = i64::MAX;
        p
    };
    backend
        .write(
            &[
                huge(day + 1),
                huge(day + 2),
                rec("ann", "gpt-4o", day + 3, 10, 4),
            ],
            None,
        )
        .unwrap();
    backend.write(&[huge(day + 4)], None).unwrap();
    let c = Connection::open(dir.path().join("t.db")).unwrap();
    let (q, kind): (i64, String) = c
        .query_row(
            "SELECT query_tokens, typeof(query_tokens) FROM usage_daily WHERE user = 'eve'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((q, kind.as_str()), (i64::MAX, "integer"));
    let max = i64::MAX as u64;
    for (after, before) in [
        (None, None),
        (Some(day), Some(day + 10)),
        (Some(day + 1), None),
        (Some(day - 1), Some(day + DAY / 2 + 1)),
    ] {
        let f = Filter {
            after,
            before,
            ..Filter::default()
        };
        let t = &reports.usage(&f, &[]).unwrap()[0].1;
        assert_eq!(t.query_tokens, max, "{after:?}..{before:?}");
        assert_eq!(t.reasoning_tokens, max);
        let g = reports.usage(&f, &[GroupKey::User, GroupKey::Day]).unwrap();
        let ann = g.iter().find(|(g, _)| g.user.as_deref() == Some("ann"));
        if let Some((_, t)) = ann {
            assert_eq!(t.query_tokens, 10, "sane rows stay exact");
        }
        let eve = g
            .iter()
            .find(|(g, _)| g.user.as_deref() == Some("eve"))
            .unwrap();
        assert_eq!(eve.1.answer_tokens, max);
    }
}
