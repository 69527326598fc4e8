//! The read side over a small pool of read connections: `/usage` totals
//! (whole days from the rollups, the partial days at the edges from the
//! records), `/queries`, prices and the stored rate limits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension};

use super::{connect, DAY};
use crate::pricing::{Price, PriceTable, Tier};
use crate::ratelimit::RateLimits;
use crate::record::StoredRecord;
use crate::store::{Filter, GroupKey, GroupValues, Reports, StoreError, UsageTotals};

/// Read connections for the reports.
pub struct SqliteReports {
    path: PathBuf,
    pool: Mutex<Vec<Connection>>,
}

impl SqliteReports {
    pub(super) fn new(path: &Path) -> SqliteReports {
        SqliteReports {
            path: path.to_owned(),
            pool: Mutex::new(Vec::new()),
        }
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let c = match self.pool.lock().pop() {
            Some(c) => c,
            None => connect(&self.path)?,
        };
        let out = f(&c);
        let mut pool = self.pool.lock();
        if pool.len() < 8 {
            pool.push(c);
        }
        out
    }
}

/// Every price row (standard, tier and audio rates), by model and
/// `valid_from`; the reports and `tollgate migrate` read them alike.
pub(super) fn price_rows(c: &Connection) -> Result<Vec<(String, Price)>, StoreError> {
    let mut st = c.prepare(
        "SELECT model, valid_from, query, cached, answer, flex_query, flex_cached, flex_answer,
                priority_query, priority_cached, priority_answer, audio_query, audio_answer,
                image_query, image_answer, unit
         FROM prices ORDER BY model, valid_from",
    )?;
    let rows = st.query_map([], |r| {
        Ok((
            r.get(0)?,
            Price {
                valid_from: r.get(1)?,
                query: r.get(2)?,
                cached: r.get(3)?,
                answer: r.get(4)?,
                ..Price::default()
            }
            .with_extra_columns([
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
                r.get(8)?,
                r.get(9)?,
                r.get(10)?,
                r.get(11)?,
                r.get(12)?,
                r.get(13)?,
                r.get(14)?,
                r.get(15)?,
            ]),
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The WHERE clause of a filter (the tests' reference totals read with it).
#[cfg(test)]
pub(super) fn where_clause(f: &Filter) -> (String, Vec<rusqlite::types::Value>) {
    let (mut conds, mut args) = conditions(f, true);
    if let Some(t) = &f.tag {
        let (cond, a) = tag_condition(t);
        conds.push(cond);
        args.extend(a);
    }
    let sql = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    (sql, args)
}

impl Reports for SqliteReports {
    fn usage(
        &self,
        f: &Filter,
        group: &[GroupKey],
    ) -> Result<Vec<(GroupValues, UsageTotals)>, StoreError> {
        let mut acc: BTreeMap<GroupValues, Acc> = BTreeMap::new();
        self.with(|c| {
            for piece in plan(f, group) {
                piece_totals(c, &piece, f, group, &mut acc)?;
            }
            rejection_counts(c, f, group, &mut acc)
        })?;
        let mut rows: Vec<(GroupValues, UsageTotals)> = acc
            .into_iter()
            .filter(|(_, a)| a.sum[0] > 0 || a.sum[7] > 0)
            .map(|(g, a)| {
                (
                    g,
                    UsageTotals {
                        queries: a.count(0),
                        query_tokens: a.count(1),
                        answer_tokens: a.count(2),
                        cached_tokens: a.count(3),
                        reasoning_tokens: a.count(4),
                        cost: a.sum[5],
                        unpriced: a.count(6),
                        rejected: a.count(7),
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
        let (mut conds, mut args) = conditions(f, true);
        if let Some((lo, hi)) = f.status {
            conds.push("status BETWEEN ? AND ?");
            args.push(rusqlite::types::Value::Integer(lo.into()));
            args.push(rusqlite::types::Value::Integer(hi.into()));
        }
        if let Some(e) = f.estimated {
            conds.push("estimated = ?");
            args.push(rusqlite::types::Value::Integer(e.into()));
        }
        if let Some(t) = &f.tag {
            let (cond, a) = tag_condition(t);
            conds.push(cond);
            args.extend(a);
        }
        let w = if conds.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", conds.join(" AND "))
        };
        let order = if f.newest_first {
            "ts DESC, id DESC"
        } else {
            "ts, id"
        };
        let sql = format!(
            "SELECT id, user, model, requested_model, endpoint, ts, duration_us, ttfb_us, status, stream,
                    CAST(query_tokens AS INTEGER), CAST(answer_tokens AS INTEGER), CAST(cached_tokens AS INTEGER),
                    CAST(reasoning_tokens AS INTEGER), CAST(cost AS INTEGER), priced, estimated, request_id, client_aborted, service_tier,
                    CAST(audio_query_tokens AS INTEGER), CAST(audio_answer_tokens AS INTEGER), tags, upstream,
                    CAST(image_query_tokens AS INTEGER), CAST(image_answer_tokens AS INTEGER), units, custom_id, project
             FROM queries{w} ORDER BY {order} LIMIT ? OFFSET ?"
        );
        args.push(rusqlite::types::Value::Integer(
            f.limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX)),
        ));
        args.push(rusqlite::types::Value::Integer(
            i64::try_from(f.offset).unwrap_or(i64::MAX),
        ));
        self.with(|c| {
            let mut st = c.prepare_cached(&sql)?;
            let mut rows = st.query(rusqlite::params_from_iter(args))?;
            while let Some(r) = rows.next()? {
                let rec = StoredRecord {
                    id: r.get(0)?,
                    user: r.get(1)?,
                    model: r.get(2)?,
                    requested_model: r.get(3)?,
                    endpoint: r.get(4)?,
                    started_ms: r.get(5)?,
                    duration_us: r.get(6)?,
                    ttfb_us: r.get(7)?,
                    status: r.get(8)?,
                    stream: r.get(9)?,
                    query_tokens: r.get(10)?,
                    answer_tokens: r.get(11)?,
                    cached_tokens: r.get(12)?,
                    reasoning_tokens: r.get(13)?,
                    cost: r.get(14)?,
                    priced: r.get(15)?,
                    estimated: r.get(16)?,
                    request_id: r.get(17)?,
                    client_aborted: r.get(18)?,
                    tier: r
                        .get::<_, Option<String>>(19)?
                        .and_then(|t| Tier::from_stored(&t)),
                    audio_query_tokens: r.get(20)?,
                    audio_answer_tokens: r.get(21)?,
                    tags: r.get(22)?,
                    upstream: r.get(23)?,
                    image_query_tokens: r.get(24)?,
                    image_answer_tokens: r.get(25)?,
                    units: crate::pricing::Units::from_text(&r.get::<_, String>(26)?),
                    custom_id: r.get(27)?,
                    project: r.get(28)?,
                };
                if !sink(rec) {
                    break;
                }
            }
            Ok(())
        })
    }

    fn prices(&self) -> Result<PriceTable, StoreError> {
        self.with(|c| {
            let mut t = PriceTable::default();
            for (model, p) in price_rows(c)? {
                t.insert(&model, p);
            }
            Ok(t)
        })
    }

    fn ratelimits(&self) -> Result<Option<RateLimits>, StoreError> {
        self.with(|c| {
            let v: Option<String> = c
                .query_row("SELECT value FROM meta WHERE key = 'ratelimits'", [], |r| {
                    r.get(0)
                })
                .optional()?;
            Ok(v.and_then(|s| serde_json::from_str(&s).ok()))
        })
    }
}

/// SQL conditions and parameters of a filter's user and model, and (with
/// `times`) its exclusive time bounds.
fn conditions(f: &Filter, times: bool) -> (Vec<&'static str>, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let bounds = [
        ("ts > ?", f.after.filter(|_| times).map(Value::Integer)),
        ("ts < ?", f.before.filter(|_| times).map(Value::Integer)),
    ];
    [
        ("user = ?", f.user.clone().map(Value::Text)),
        ("model = ?", f.model.clone().map(Value::Text)),
    ]
    .into_iter()
    .chain(bounds)
    .filter_map(|(c, v)| v.map(|v| (c, v)))
    .unzip()
}

/// A part of a time range read either from the rollups or from the records
/// (the PostgreSQL backend follows the same plan).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    /// Whole days `[from, to)` (day numbers; `None` is unbounded), from the rollups.
    Days(Option<i64>, Option<i64>, i64),
    /// Records with `from <= ts < to` (ms), added (1) or removed (-1).
    Records(i64, i64, i64),
}

/// The pieces a `/usage` range is read in: [`pieces`], or, grouped by a key
/// the rollups lack (the tier, the upstream), the records of the whole range.
pub(crate) fn plan(f: &Filter, group: &[GroupKey]) -> Vec<Piece> {
    if !group.contains(&GroupKey::Tier) && !group.contains(&GroupKey::Upstream) {
        return pieces(f.after, f.before);
    }
    let lo = f.after.map_or(i64::MIN, |a| a.saturating_add(1));
    let hi = f.before.unwrap_or(i64::MAX);
    if lo >= hi {
        return Vec::new();
    }
    vec![Piece::Records(lo, hi, 1)]
}

/// Splits the exclusive range (`after`, `before`) into whole days read from
/// the rollups and partial days read from the records. A partial day more
/// than half covered is read as its whole day minus the uncovered records, so
/// at most half a day of records is ever scanned per edge.
pub(crate) fn pieces(after: Option<i64>, before: Option<i64>) -> Vec<Piece> {
    let lo = after.map(|a| a.saturating_add(1));
    let hi = before;
    if let (Some(l), Some(h)) = (lo, hi) {
        if l >= h {
            return Vec::new();
        }
    }
    let first = lo.map(|l| l.div_euclid(DAY) + i64::from(l.rem_euclid(DAY) != 0));
    let last = hi.map(|h| h.div_euclid(DAY));
    if let (Some(f), Some(t), Some(l), Some(h)) = (first, last, lo, hi) {
        if f >= t {
            return vec![Piece::Records(l, h, 1)];
        }
    }
    let mut out = vec![Piece::Days(first, last, 1)];
    if let (Some(l), Some(f)) = (lo, first) {
        if l.rem_euclid(DAY) != 0 {
            let day = f - 1;
            if l - day * DAY < DAY / 2 {
                out.push(Piece::Days(Some(day), Some(f), 1));
                out.push(Piece::Records(day * DAY, l, -1));
            } else {
                out.push(Piece::Records(l, f * DAY, 1));
            }
        }
    }
    if let (Some(h), Some(t)) = (hi, last) {
        if h.rem_euclid(DAY) != 0 {
            if h - t * DAY > DAY / 2 {
                out.push(Piece::Days(Some(t), Some(t + 1), 1));
                out.push(Piece::Records(h, (t + 1) * DAY, -1));
            } else {
                out.push(Piece::Records(t * DAY, h, 1));
            }
        }
    }
    out
}

/// One group's totals: queries, four token counts, cost, unpriced, rejected.
#[derive(Default)]
struct Acc {
    sum: [i128; 8],
    /// A piece reached `i64::MAX` (a saturated rollup or huge stored
    /// counts): the total is `i64::MAX`, whatever other pieces subtract.
    saturated: [bool; 8],
}

impl Acc {
    /// A count total, within `0..=i64::MAX`: counts are never negative, and
    /// past what one stored value can hold they are saturated.
    fn count(&self, i: usize) -> u64 {
        if self.saturated[i] {
            return i64::MAX as u64;
        }
        self.sum[i].clamp(0, i128::from(i64::MAX)) as u64
    }
}

/// The quantities summed per group, over the rollups and over the records.
/// Tokens are read as non-negative integers (a REAL or a wrapped negative
/// value in an old database is clamped, never an error).
const ROLLUP_SUMS: [&str; 7] = [
    "CAST(queries AS INTEGER)",
    "MAX(CAST(query_tokens AS INTEGER), 0)",
    "MAX(CAST(answer_tokens AS INTEGER), 0)",
    "MAX(CAST(cached_tokens AS INTEGER), 0)",
    "MAX(CAST(reasoning_tokens AS INTEGER), 0)",
    "CAST(cost AS INTEGER)",
    "CAST(unpriced AS INTEGER)",
];
const RECORD_SUMS: [&str; 7] = [
    "1",
    "MAX(CAST(query_tokens AS INTEGER), 0)",
    "MAX(CAST(answer_tokens AS INTEGER), 0)",
    "MAX(CAST(cached_tokens AS INTEGER), 0)",
    "MAX(CAST(reasoning_tokens AS INTEGER), 0)",
    "CAST(cost AS INTEGER)",
    "1 - priced",
];

/// `SUM(x)` as two sums SQLite cannot overflow (it fails a whole query with
/// `integer overflow` otherwise): of the high and of the low 32 bits of each
/// value, recombined exactly in `i128` by [`Sums::decode`].
fn split_sums(exprs: &[&str]) -> String {
    exprs
        .iter()
        .map(|e| format!("SUM(({e}) >> 32), SUM(({e}) & 4294967295)"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Rows read for one piece: the group values (tag aside), the raw tag
/// column when one was read, and the seven quantities.
type PieceRows = Vec<(GroupValues, Option<String>, [i128; 7])>;

/// Where a piece's rows are read from.
enum Source<'a> {
    /// `usage_daily`.
    Daily,
    /// `usage_daily_tags`, one tag key (and perhaps one value).
    Tagged(&'a str, Option<&'a str>),
    /// The records.
    Records,
}

fn piece_totals(
    c: &Connection,
    piece: &Piece,
    f: &Filter,
    group: &[GroupKey],
    acc: &mut BTreeMap<GroupValues, Acc>,
) -> Result<(), StoreError> {
    // The tag is grouped apart: its column differs between the sources.
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
            acc_add(acc, g, sums, sign);
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

/// Adds one row's quantities to its group, `sign` times.
fn acc_add(acc: &mut BTreeMap<GroupValues, Acc>, g: GroupValues, t: [i128; 7], sign: i64) {
    let e = acc.entry(g).or_default();
    for (k, v) in t.into_iter().enumerate() {
        // Cost totals may pass i64::MAX legitimately; counts may not.
        if k != 5 && v >= i128::from(i64::MAX) {
            e.saturated[k] = true;
        }
        e.sum[k] += i128::from(sign) * v;
    }
}

/// The `tag` filter of the records, as SQL on their canonical tag list.
pub(super) fn tag_condition(
    t: &crate::tags::TagFilter,
) -> (&'static str, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    // A project filter (see `crate::projects::ROLLUP_KEY`) is on its column.
    if t.key == crate::projects::ROLLUP_KEY {
        return match &t.value {
            Some(v) => ("project = ?", vec![Value::Text(v.clone())]),
            None => ("project IS NOT NULL", vec![]),
        };
    }
    // Canonical lists hold no spaces or commas inside a tag: `,k=v,` is
    // found in `,list,` exactly when the record has that tag.
    let wrapped = "instr(',' || tags || ',', ?) > 0";
    match &t.value {
        Some(v) if v.is_empty() => (wrapped, vec![Value::Text(format!(",{},", t.key))]),
        Some(v) => (wrapped, vec![Value::Text(format!(",{}={v},", t.key))]),
        None => (
            "(instr(',' || tags || ',', ?) > 0 OR instr(',' || tags || ',', ?) > 0)",
            vec![
                Value::Text(format!(",{},", t.key)),
                Value::Text(format!(",{}=", t.key)),
            ],
        ),
    }
}

/// Reads one piece of a source, grouped by `plain` (and by the tag column,
/// returned raw, with `tag_col`).
fn read_piece(
    c: &Connection,
    piece: &Piece,
    f: &Filter,
    plain: &[GroupKey],
    src: Source<'_>,
    tag_col: bool,
) -> Result<PieceRows, StoreError> {
    use rusqlite::types::Value;
    let rollup = !matches!(src, Source::Records);
    let mut conds: Vec<&str> = Vec::new();
    let mut args: Vec<Value> = Vec::new();
    match *piece {
        Piece::Days(from, to, _) => {
            if let Some(d) = from {
                conds.push("day >= ?");
                args.push(Value::Integer(d));
            }
            if let Some(d) = to {
                conds.push("day < ?");
                args.push(Value::Integer(d));
            }
        }
        Piece::Records(from, to, _) => {
            conds.push("ts >= ?");
            args.push(Value::Integer(from));
            conds.push("ts < ?");
            args.push(Value::Integer(to));
        }
    }
    let (more, more_args) = conditions(f, false);
    conds.extend(more);
    args.extend(more_args);
    let table = match src {
        Source::Daily => "usage_daily",
        Source::Tagged(key, value) => {
            conds.push("tag_key = ?");
            args.push(Value::Text(key.to_owned()));
            if let Some(v) = value {
                conds.push("tag_value = ?");
                args.push(Value::Text(v.to_owned()));
            }
            "usage_daily_tags"
        }
        Source::Records => {
            if let Some(t) = &f.tag {
                let (cond, a) = tag_condition(t);
                conds.push(cond);
                args.extend(a);
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
    let read = |sums: Sums| {
        let mut out: PieceRows = Vec::new();
        grouped(
            c,
            &keys,
            plain,
            &sums.sql(rollup),
            table,
            &conds,
            args.clone(),
            |g, r| {
                let t: Option<String> = if tag_col { r.get(plain.len())? } else { None };
                out.push((g, t, sums.decode(r, keys.len())?));
                Ok(())
            },
        )
        .map(|()| out)
    };
    // The rollups are few rows: always read robustly. The records of a
    // partial day may be many: plain sums first, and the robust ones only
    // when stored values make those fail (`integer overflow`, a REAL).
    if rollup {
        read(Sums::Split)
    } else {
        match read(Sums::Plain) {
            Ok(rows) => Ok(rows),
            Err(_) => read(Sums::Split),
        }
    }
}

/// How a piece's quantities are summed in SQL.
#[derive(Clone, Copy)]
enum Sums {
    /// SQLite's `SUM` of the stored values: fails on a total past `i64`.
    Plain,
    /// [`split_sums`] of the clamped values: cannot fail.
    Split,
}

impl Sums {
    fn sql(self, rollup: bool) -> String {
        match (self, rollup) {
            (Sums::Split, true) => split_sums(&ROLLUP_SUMS),
            (Sums::Split, false) => split_sums(&RECORD_SUMS),
            (Sums::Plain, true) => "SUM(queries), SUM(query_tokens), SUM(answer_tokens), SUM(cached_tokens), SUM(reasoning_tokens), SUM(cost / 1000000000), SUM(cost % 1000000000), SUM(unpriced)".into(),
            (Sums::Plain, false) => "COUNT(*), SUM(query_tokens), SUM(answer_tokens), SUM(cached_tokens), SUM(reasoning_tokens), SUM(cost / 1000000000), SUM(cost % 1000000000), SUM(1 - priced)".into(),
        }
    }

    /// The seven quantities of a row whose aggregates start at column `at`.
    fn decode(self, r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<[i128; 7]> {
        let int = |i: usize| -> rusqlite::Result<i128> {
            Ok(i128::from(r.get::<_, Option<i64>>(at + i)?.unwrap_or(0)))
        };
        let mut t = [0i128; 7];
        match self {
            Sums::Plain => {
                for (k, v) in t.iter_mut().enumerate() {
                    // Cost comes as billions and the rest (columns 5, 6).
                    *v = match k {
                        0..=4 => int(k)?,
                        5 => int(5)? * 1_000_000_000 + int(6)?,
                        _ => int(7)?,
                    };
                }
            }
            Sums::Split => {
                for (k, v) in t.iter_mut().enumerate() {
                    *v = (int(2 * k)? << 32) + int(2 * k + 1)?;
                }
            }
        }
        Ok(t)
    }
}

/// The SQL expression of a group key, over the rollups or the records.
fn key_expr(g: GroupKey, rollup: bool) -> &'static str {
    match (g, rollup) {
        (GroupKey::User, _) => "user",
        (GroupKey::Model, _) => "model",
        (GroupKey::Day, true) => "date(day * 86400, 'unixepoch')",
        (GroupKey::Day, false) => "date(ts / 1000, 'unixepoch')",
        (GroupKey::Month, true) => "strftime('%Y-%m', day * 86400, 'unixepoch')",
        (GroupKey::Month, false) => "strftime('%Y-%m', ts / 1000, 'unixepoch')",
        // Only ever read from the records (see `plan`).
        (GroupKey::Tier, _) => "service_tier",
        // Read apart (see `piece_totals`); only rejections, untagged, get here.
        (GroupKey::Tag, _) => "NULL",
        (GroupKey::Upstream, _) => "upstream",
    }
}

/// Runs `SELECT keys, aggregates FROM table WHERE conds GROUP BY keys` and
/// hands each row, with its group values, to `each` (aggregates start at
/// column `keys.len()`).
#[allow(clippy::too_many_arguments)]
fn grouped(
    c: &Connection,
    keys: &[&str],
    group: &[GroupKey],
    aggregates: &str,
    table: &str,
    conds: &[&str],
    args: Vec<rusqlite::types::Value>,
    mut each: impl FnMut(GroupValues, &rusqlite::Row<'_>) -> rusqlite::Result<()>,
) -> Result<(), StoreError> {
    let mut sql = String::from("SELECT ");
    for k in keys {
        sql.push_str(k);
        sql.push_str(", ");
    }
    sql.push_str(aggregates);
    sql.push_str(" FROM ");
    sql.push_str(table);
    if !conds.is_empty() {
        sql.push_str(" WHERE ");
        sql.push_str(&conds.join(" AND "));
    }
    if !keys.is_empty() {
        sql.push_str(" GROUP BY ");
        sql.push_str(&keys.join(", "));
    }
    let mut st = c.prepare_cached(&sql)?;
    let mut rows = st.query(rusqlite::params_from_iter(args))?;
    while let Some(r) = rows.next()? {
        let mut g = GroupValues::default();
        for (i, k) in group.iter().enumerate() {
            let v: Option<String> = r.get(i)?;
            g.set(*k, v);
        }
        each(g, r)?;
    }
    Ok(())
}

/// Adds the refused requests matching the filter (grouped like the usage).
fn rejection_counts(
    c: &Connection,
    f: &Filter,
    group: &[GroupKey],
    acc: &mut BTreeMap<GroupValues, Acc>,
) -> Result<(), StoreError> {
    if f.tag.is_some() {
        // Refused requests keep no tags: none carries the one asked for.
        return Ok(());
    }
    let (conds, args) = conditions(f, true);
    // Refusals come before any answer: they have no tier.
    let keys: Vec<&str> = group
        .iter()
        .map(|g| match g {
            GroupKey::Tier => "NULL",
            GroupKey::Upstream => "NULL",
            g => key_expr(*g, false),
        })
        .collect();
    grouped(
        c,
        &keys,
        group,
        "COUNT(*)",
        "rejections",
        &conds,
        args,
        |g, r| {
            let n: i64 = r.get(keys.len())?;
            if n > 0 {
                acc.entry(g).or_default().sum[7] += i128::from(n);
            }
            Ok(())
        },
    )
}
