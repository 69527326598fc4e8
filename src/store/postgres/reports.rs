//! The read side over the pool: `/usage` totals (whole days from the
//! rollups, the partial days at the edges from the records: the same plan
//! as SQLite's, from [`crate::store::sqlite`]'s `pieces`), `/queries`,
//! prices and the stored rate limits.

use std::collections::BTreeMap;
use std::pin::pin;
use std::sync::Arc;

use futures_util::StreamExt;
use tokio_postgres::types::ToSql;

use super::{wait, Conn, Pool};
use crate::pricing::{Price, PriceTable, Tier};
use crate::ratelimit::RateLimits;
use crate::record::StoredRecord;
use crate::store::sqlite::{plan, Piece};
use crate::store::{
    Filter, GroupKey, GroupValues, Reports, StateVersions, StoreError, UsageTotals,
};

/// Reports over the shared pool.
pub struct PgReports {
    pool: Arc<Pool>,
}

impl PgReports {
    pub(super) fn new(pool: Arc<Pool>) -> PgReports {
        PgReports { pool }
    }
}

/// A parameter of a built query.
type Arg = Box<dyn ToSql + Sync + Send>;

/// Conditions and their numbered parameters, built together.
#[derive(Default)]
struct Conds {
    conds: Vec<String>,
    args: Vec<Arg>,
}

impl Conds {
    /// Adds `column op $n` with `v` as `$n`.
    fn push(&mut self, column_op: &str, v: Arg) {
        self.args.push(v);
        self.conds.push(format!("{column_op} ${}", self.args.len()));
    }

    /// The filter's user and model, and (with `times`) its exclusive time bounds.
    fn filter(&mut self, f: &Filter, times: bool) {
        if let Some(u) = &f.user {
            self.push("username =", Box::new(u.clone()));
        }
        if let Some(m) = &f.model {
            self.push("model =", Box::new(m.clone()));
        }
        if times {
            if let Some(a) = f.after {
                self.push("ts >", Box::new(a));
            }
            if let Some(b) = f.before {
                self.push("ts <", Box::new(b));
            }
        }
    }

    fn where_sql(&self) -> String {
        if self.conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", self.conds.join(" AND "))
        }
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.args
            .iter()
            .map(|a| &**a as &(dyn ToSql + Sync))
            .collect()
    }
}

impl Reports for PgReports {
    fn usage(
        &self,
        f: &Filter,
        group: &[GroupKey],
    ) -> Result<Vec<(GroupValues, UsageTotals)>, StoreError> {
        let mut acc: BTreeMap<GroupValues, [i128; 8]> = BTreeMap::new();
        self.pool.with(|c| {
            for piece in plan(f, group) {
                piece_totals(c, &piece, f, group, &mut acc)?;
            }
            rejection_counts(c, f, group, &mut acc)
        })?;
        let n = |v: i128| u64::try_from(v.max(0)).unwrap_or(u64::MAX);
        let mut rows: Vec<(GroupValues, UsageTotals)> = acc
            .into_iter()
            .filter(|(_, t)| t[0] > 0 || t[7] > 0)
            .map(|(g, t)| {
                (
                    g,
                    UsageTotals {
                        queries: n(t[0]),
                        query_tokens: n(t[1]),
                        answer_tokens: n(t[2]),
                        cached_tokens: n(t[3]),
                        reasoning_tokens: n(t[4]),
                        cost: t[5],
                        unpriced: n(t[6]),
                        rejected: n(t[7]),
                    },
                )
            })
            .collect();
        if group.is_empty() && rows.is_empty() {
            rows.push((GroupValues::default(), UsageTotals::default()));
        }
        Ok(rows)
    }

    fn queries(
        &self,
        f: &Filter,
        sink: &mut dyn FnMut(StoredRecord) -> bool,
    ) -> Result<(), StoreError> {
        let mut q = Conds::default();
        q.filter(f, true);
        if let Some((lo, hi)) = f.status {
            q.push("status >=", Box::new(i32::from(lo)));
            q.push("status <=", Box::new(i32::from(hi)));
        }
        if let Some(e) = f.estimated {
            q.push("estimated =", Box::new(e));
        }
        if let Some(t) = &f.tag {
            tag_condition(&mut q, t);
        }
        let limit: Option<i64> = f.limit.map(|l| i64::try_from(l).unwrap_or(i64::MAX));
        let offset = i64::try_from(f.offset).unwrap_or(i64::MAX);
        let n = q.args.len();
        let order = if f.newest_first {
            "ts DESC, id DESC"
        } else {
            "ts, id"
        };
        let sql = format!(
            "SELECT id, username, model, requested_model, endpoint, ts, duration_us, ttfb_us, status, stream,
                    query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, priced, estimated, request_id, client_aborted, service_tier,
                    audio_query_tokens, audio_answer_tokens, tags, upstream,
                    image_query_tokens, image_answer_tokens, units, custom_id, project
             FROM queries{} ORDER BY {order} LIMIT ${} OFFSET ${}",
            q.where_sql(),
            n + 1,
            n + 2
        );
        q.args.push(Box::new(limit));
        q.args.push(Box::new(offset));
        self.pool.with(|c| {
            wait(async {
                let st = c.statement(&sql).await?;
                let rows = c.client.query_raw(&st, q.params()).await?;
                let mut rows = pin!(rows);
                while let Some(r) = rows.next().await {
                    let r = r?;
                    let rec = StoredRecord {
                        id: r.try_get(0)?,
                        user: r.try_get(1)?,
                        model: r.try_get(2)?,
                        requested_model: r.try_get(3)?,
                        endpoint: r.try_get(4)?,
                        started_ms: r.try_get(5)?,
                        duration_us: r.try_get(6)?,
                        ttfb_us: r.try_get(7)?,
                        status: u16::try_from(r.try_get::<_, i32>(8)?).unwrap_or(0),
                        stream: r.try_get(9)?,
                        query_tokens: r.try_get(10)?,
                        answer_tokens: r.try_get(11)?,
                        cached_tokens: r.try_get(12)?,
                        reasoning_tokens: r.try_get(13)?,
                        cost: r.try_get(14)?,
                        priced: r.try_get(15)?,
                        estimated: r.try_get(16)?,
                        request_id: r.try_get(17)?,
                        client_aborted: r.try_get(18)?,
                        tier: r
                            .try_get::<_, Option<&str>>(19)?
                            .and_then(Tier::from_stored),
                        audio_query_tokens: r.try_get(20)?,
                        audio_answer_tokens: r.try_get(21)?,
                        tags: r.try_get(22)?,
                        upstream: r.try_get(23)?,
                        image_query_tokens: r.try_get(24)?,
                        image_answer_tokens: r.try_get(25)?,
                        units: crate::pricing::Units::from_text(r.try_get::<_, &str>(26)?),
                        custom_id: r.try_get(27)?,
                        project: r.try_get(28)?,
                    };
                    if !sink(rec) {
                        break;
                    }
                }
                Ok::<_, tokio_postgres::Error>(())
            })?;
            Ok(())
        })
    }

    fn prices(&self) -> Result<PriceTable, StoreError> {
        self.pool.with(|c| {
            let rows = wait(c.client.query(
                "SELECT model, valid_from, query, cached, answer, flex_query, flex_cached, flex_answer, priority_query, priority_cached, priority_answer, audio_query, audio_answer, image_query, image_answer, unit FROM prices",
                &[],
            ))?;
            let mut t = PriceTable::default();
            for r in rows {
                let model: String = r.try_get(0)?;
                t.insert(
                    &model,
                    Price {
                        valid_from: r.try_get(1)?,
                        query: r.try_get(2)?,
                        cached: r.try_get(3)?,
                        answer: r.try_get(4)?,
                        ..Price::default()
                    }
                    .with_extra_columns([
                        r.try_get(5)?,
                        r.try_get(6)?,
                        r.try_get(7)?,
                        r.try_get(8)?,
                        r.try_get(9)?,
                        r.try_get(10)?,
                        r.try_get(11)?,
                        r.try_get(12)?,
                        r.try_get(13)?,
                        r.try_get(14)?,
                        r.try_get(15)?,
                    ]),
                );
            }
            Ok(t)
        })
    }

    fn ratelimits(&self) -> Result<Option<RateLimits>, StoreError> {
        self.pool.with(|c| {
            let row = wait(
                c.client
                    .query_opt("SELECT value FROM meta WHERE key = 'ratelimits'", &[]),
            )?;
            let v: Option<String> = row.map(|r| r.try_get(0)).transpose()?;
            Ok(v.and_then(|s| serde_json::from_str(&s).ok()))
        })
    }

    fn state_versions(&self) -> Result<Option<StateVersions>, StoreError> {
        self.pool.with(|c| {
            let st = wait(c.statement("SELECT name, version FROM tollgate_state"))?;
            let rows = wait(c.client.query(&st, &[]))?;
            let mut v = StateVersions::default();
            for r in &rows {
                let n: i64 = r.try_get(1)?;
                match r.try_get::<_, &str>(0)? {
                    "prices" => v.prices = n,
                    "keys" => v.keys = n,
                    "limits" => v.limits = n,
                    "ratelimits" => v.ratelimits = n,
                    _ => {}
                }
            }
            Ok(Some(v))
        })
    }
}

/// Rows read for one piece: the group values (tag aside), the raw tag
/// column when one was read, and the seven quantities.
type PieceRows = Vec<(GroupValues, Option<String>, [i128; 7])>;

/// Where a piece's rows are read from (as in SQLite's reports).
enum Source<'a> {
    /// `usage_daily`.
    Daily,
    /// `usage_daily_tags`, one tag key (and perhaps one value).
    Tagged(&'a str, Option<&'a str>),
    /// The records.
    Records,
}

fn piece_totals(
    c: &mut Conn,
    piece: &Piece,
    f: &Filter,
    group: &[GroupKey],
    acc: &mut BTreeMap<GroupValues, [i128; 8]>,
) -> Result<(), StoreError> {
    let plain: Vec<GroupKey> = group
        .iter()
        .copied()
        .filter(|g| *g != GroupKey::Tag)
        .collect();
    let tag_group = f
        .group_tag
        .as_deref()
        .filter(|_| group.contains(&GroupKey::Tag));
    let sign = match *piece {
        Piece::Days(_, _, s) | Piece::Records(_, _, s) => s,
    };
    let mut add = |rows: PieceRows, sign: i64, tag: &dyn Fn(Option<String>) -> Option<String>| {
        for (mut g, t, sums) in rows {
            g.tag = tag(t);
            let e = acc.entry(g).or_default();
            for (a, v) in e.iter_mut().zip(sums) {
                *a += i128::from(sign) * v;
            }
        }
    };
    if matches!(piece, Piece::Records(..)) {
        let rows = read_piece(c, piece, f, &plain, Source::Records, tag_group.is_some())?;
        let k = tag_group.unwrap_or("");
        if k == crate::projects::ROLLUP_KEY {
            // Read from the project column as it is.
            add(rows, sign, &|t| t);
        } else {
            add(rows, sign, &|t| {
                t.and_then(|t| crate::tags::value_of(&t, k).map(str::to_owned))
            });
        }
        return Ok(());
    }
    match (&f.tag, tag_group) {
        (None, None) => add(
            read_piece(c, piece, f, &plain, Source::Daily, false)?,
            sign,
            &|_| None,
        ),
        (Some(t), _) => {
            let src = Source::Tagged(&t.key, t.value.as_deref());
            let rows = read_piece(c, piece, f, &plain, src, tag_group.is_some())?;
            add(rows, sign, &|t| t);
        }
        (None, Some(k)) => {
            // Those with the key by value; those without it are all the
            // records less those with it.
            let with = read_piece(c, piece, f, &plain, Source::Tagged(k, None), true)?;
            add(with, sign, &|t| t);
            add(
                read_piece(c, piece, f, &plain, Source::Daily, false)?,
                sign,
                &|_| None,
            );
            let with = read_piece(c, piece, f, &plain, Source::Tagged(k, None), false)?;
            add(with, -sign, &|_| None);
        }
    }
    Ok(())
}

/// The `tag` filter of the records, on their canonical tag list (`,k=v,`
/// is found in `,list,` exactly when the record has that tag).
fn tag_condition(q: &mut Conds, t: &crate::tags::TagFilter) {
    // A project filter (see `crate::projects::ROLLUP_KEY`) is on its column.
    if t.key == crate::projects::ROLLUP_KEY {
        let cond = match &t.value {
            Some(v) => {
                q.args.push(Box::new(v.clone()));
                format!("project = ${}", q.args.len())
            }
            None => "project IS NOT NULL".to_owned(),
        };
        q.conds.push(cond);
        return;
    }
    let mut found = |needle: String| {
        q.args.push(Box::new(needle));
        format!("strpos(',' || tags || ',', ${}) > 0", q.args.len())
    };
    let cond = match &t.value {
        Some(v) if v.is_empty() => found(format!(",{},", t.key)),
        Some(v) => found(format!(",{}={v},", t.key)),
        None => {
            let bare = found(format!(",{},", t.key));
            let valued = found(format!(",{}=", t.key));
            format!("({bare} OR {valued})")
        }
    };
    q.conds.push(cond);
}

/// Reads one piece of a source, grouped by `plain` (and by the tag column,
/// returned raw, with `tag_col`).
fn read_piece(
    c: &mut Conn,
    piece: &Piece,
    f: &Filter,
    plain: &[GroupKey],
    src: Source<'_>,
    tag_col: bool,
) -> Result<PieceRows, StoreError> {
    let rollup = !matches!(src, Source::Records);
    let mut q = Conds::default();
    match *piece {
        Piece::Days(from, to, _) => {
            if let Some(d) = from {
                q.push("day >=", Box::new(d));
            }
            if let Some(d) = to {
                q.push("day <", Box::new(d));
            }
        }
        Piece::Records(from, to, _) => {
            q.push("ts >=", Box::new(from));
            q.push("ts <", Box::new(to));
        }
    }
    q.filter(f, false);
    let table = match src {
        Source::Daily => "usage_daily",
        Source::Tagged(key, value) => {
            q.push("tag_key =", Box::new(key.to_owned()));
            if let Some(v) = value {
                q.push("tag_value =", Box::new(v.to_owned()));
            }
            "usage_daily_tags"
        }
        Source::Records => {
            if let Some(t) = &f.tag {
                tag_condition(&mut q, t);
            }
            "queries"
        }
    };
    let mut keys: Vec<&str> = plain.iter().map(|g| key_expr(*g, rollup)).collect();
    if tag_col {
        keys.push(if rollup {
            "tag_value"
        } else if f.group_tag.as_deref() == Some(crate::projects::ROLLUP_KEY) {
            "project"
        } else {
            "tags"
        });
    }
    // Sums as text: `sum(bigint)` is numeric, exact past i64, read as i128.
    let sums = if rollup {
        "sum(queries)::text, sum(query_tokens)::text, sum(answer_tokens)::text, sum(cached_tokens)::text, sum(reasoning_tokens)::text, sum(cost)::text, sum(unpriced)::text"
    } else {
        "count(*)::text, sum(query_tokens)::text, sum(answer_tokens)::text, sum(cached_tokens)::text, sum(reasoning_tokens)::text, sum(cost)::text, sum(CASE WHEN priced THEN 0 ELSE 1 END)::text"
    };
    let mut out: PieceRows = Vec::new();
    grouped(c, &keys, plain, sums, table, &q, |g, r| {
        let t: Option<String> = if tag_col {
            r.try_get(plain.len())?
        } else {
            None
        };
        let mut v = [0i128; 7];
        for (i, x) in v.iter_mut().enumerate() {
            *x = int(r, keys.len() + i)?;
        }
        out.push((g, t, v));
        Ok(())
    })?;
    Ok(out)
}

/// A text column holding a whole number (a sum), 0 when null.
fn int(r: &tokio_postgres::Row, i: usize) -> Result<i128, StoreError> {
    let v: Option<String> = r.try_get(i)?;
    v.map_or(Ok(0), |s| {
        s.parse()
            .map_err(|_| StoreError(format!("not a whole number: {s}")))
    })
}

/// The SQL expression of a group key, over the rollups or the records
/// (the same values as SQLite's `date()` and `strftime()`).
fn key_expr(g: GroupKey, rollup: bool) -> &'static str {
    match (g, rollup) {
        (GroupKey::User, _) => "username",
        (GroupKey::Model, _) => "model",
        (GroupKey::Day, true) => "to_char(date '1970-01-01' + day::integer, 'YYYY-MM-DD')",
        (GroupKey::Day, false) => {
            "to_char(timestamp '1970-01-01' + (ts / 1000) * interval '1 second', 'YYYY-MM-DD')"
        }
        (GroupKey::Month, true) => "to_char(date '1970-01-01' + day::integer, 'YYYY-MM')",
        (GroupKey::Month, false) => {
            "to_char(timestamp '1970-01-01' + (ts / 1000) * interval '1 second', 'YYYY-MM')"
        }
        // Only ever read from the records (see `plan`).
        (GroupKey::Tier, _) => "service_tier",
        // Read apart (see `piece_totals`); only rejections, untagged, get here.
        (GroupKey::Tag, _) => "NULL::text",
        (GroupKey::Upstream, _) => "upstream",
    }
}

/// Runs `SELECT keys, aggregates FROM table WHERE conds GROUP BY keys` and
/// hands each row, with its group values, to `each` (aggregates start at
/// column `keys.len()`).
fn grouped(
    c: &mut Conn,
    keys: &[&str],
    group: &[GroupKey],
    aggregates: &str,
    table: &str,
    q: &Conds,
    mut each: impl FnMut(GroupValues, &tokio_postgres::Row) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut sql = String::from("SELECT ");
    for k in keys {
        sql.push_str(k);
        sql.push_str(", ");
    }
    sql.push_str(aggregates);
    sql.push_str(" FROM ");
    sql.push_str(table);
    sql.push_str(&q.where_sql());
    if !keys.is_empty() {
        sql.push_str(" GROUP BY ");
        let positions: Vec<String> = (1..=keys.len()).map(|i| i.to_string()).collect();
        sql.push_str(&positions.join(", "));
    }
    let rows = wait(async {
        let st = c.statement(&sql).await?;
        c.client.query(&st, &q.params()).await
    })?;
    for r in &rows {
        let mut g = GroupValues::default();
        for (i, k) in group.iter().enumerate() {
            let v: Option<String> = r.try_get(i)?;
            g.set(*k, v);
        }
        each(g, r)?;
    }
    Ok(())
}

/// Adds the refused requests matching the filter (grouped like the usage).
fn rejection_counts(
    c: &mut Conn,
    f: &Filter,
    group: &[GroupKey],
    acc: &mut BTreeMap<GroupValues, [i128; 8]>,
) -> Result<(), StoreError> {
    if f.tag.is_some() {
        // Refused requests keep no tags: none carries the one asked for.
        return Ok(());
    }
    let mut q = Conds::default();
    q.filter(f, true);
    // Refusals come before any answer: they have no tier.
    let keys: Vec<&str> = group
        .iter()
        .map(|g| match g {
            GroupKey::Tier => "NULL::text",
            GroupKey::Upstream => "NULL::text",
            g => key_expr(*g, false),
        })
        .collect();
    grouped(c, &keys, group, "count(*)", "rejections", &q, |g, r| {
        let n: i64 = r.try_get(keys.len())?;
        if n > 0 {
            acc.entry(g).or_default()[7] += i128::from(n);
        }
        Ok(())
    })
}
