//! SQLite storage (bundled, WAL): one write connection owned by the writer
//! thread, a small pool of read connections for the reports.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use std::collections::BTreeMap;

use super::{
    Accounts, Backend, Filter, GroupKey, GroupValues, KeyInfo, Priced, Reports, StoreError,
    UsageTotals,
};
use crate::budget::{Limits, Period};
use crate::pricing::{self, Price, PriceTable};
use crate::ratelimit::RateLimits;
use crate::record::Rejected;
use crate::record::StoredRecord;

/// Current schema version (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 3;

/// Milliseconds in a day.
const DAY: i64 = 86_400_000;

const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS queries (
    id               INTEGER PRIMARY KEY,
    user             TEXT    NOT NULL,
    model            TEXT    NOT NULL,
    requested_model  TEXT    NOT NULL,
    endpoint         TEXT    NOT NULL,
    ts               INTEGER NOT NULL,
    duration_us      INTEGER NOT NULL,
    ttfb_us          INTEGER,
    status           INTEGER NOT NULL,
    stream           INTEGER NOT NULL,
    query_tokens     INTEGER NOT NULL,
    answer_tokens    INTEGER NOT NULL,
    cached_tokens    INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    cost             INTEGER NOT NULL,
    priced           INTEGER NOT NULL,
    estimated        INTEGER NOT NULL,
    request_id       TEXT
);
-- Covering the report sums: the partial days at the edges of a /usage range
-- are summed from this index alone, without a table lookup per record.
-- Entries are appended in time order, so the wider index costs inserts little.
DROP INDEX IF EXISTS queries_ts;
CREATE INDEX IF NOT EXISTS queries_ts_sums ON queries (ts, user, model, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, priced);
-- No (user, ts) index: it made every insert about 4x dearer (random
-- string-keyed B-tree inserts), and per-user totals come from the rollups.
-- /queries?user= walks the ts index over its time range instead.
DROP INDEX IF EXISTS queries_user_ts;
CREATE TABLE IF NOT EXISTS prices (
    model       TEXT    NOT NULL,
    valid_from  INTEGER NOT NULL,
    query       INTEGER NOT NULL,
    cached      INTEGER,
    answer      INTEGER NOT NULL,
    PRIMARY KEY (model, valid_from)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
";

/// Per-day totals kept by the writer in the same transaction as the records,
/// so reports over any span read a few rows per day instead of every record.
/// Retention deletes records, never these.
const SCHEMA_V2: &str = "
CREATE TABLE IF NOT EXISTS usage_daily (
    day              INTEGER NOT NULL,
    user             TEXT    NOT NULL,
    model            TEXT    NOT NULL,
    queries          INTEGER NOT NULL,
    query_tokens     INTEGER NOT NULL,
    answer_tokens    INTEGER NOT NULL,
    cached_tokens    INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    cost             INTEGER NOT NULL,
    unpriced         INTEGER NOT NULL,
    PRIMARY KEY (day, user, model)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_daily_user ON usage_daily (user, day);
CREATE INDEX IF NOT EXISTS usage_daily_model ON usage_daily (model, day);
";

/// Users' keys (digests only), limits and refused requests.
const SCHEMA_V3: &str = "
CREATE TABLE IF NOT EXISTS api_keys (
    id         TEXT PRIMARY KEY,
    user       TEXT    NOT NULL,
    digest     BLOB    NOT NULL UNIQUE,
    created    INTEGER NOT NULL,
    last_used  INTEGER,
    revoked    INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS api_keys_user ON api_keys (user, created);
CREATE TABLE IF NOT EXISTS limits (
    user    TEXT PRIMARY KEY,
    budget  INTEGER,
    period  TEXT NOT NULL,
    rpm     INTEGER,
    tpm     INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rejections (
    id      INTEGER PRIMARY KEY,
    ts      INTEGER NOT NULL,
    user    TEXT    NOT NULL,
    model   TEXT    NOT NULL,
    reason  TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS rejections_ts ON rejections (ts);
CREATE INDEX IF NOT EXISTS rejections_user_ts ON rejections (user, ts);
";

/// The `limits` row of the default limits (no user name is empty).
const DEFAULT_LIMITS_USER: &str = "";

/// Fills the rollups of records written before they existed (schema 1).
const BACKFILL_V2: &str = "
INSERT INTO usage_daily (day, user, model, queries, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, unpriced)
SELECT ts / 86400000, user, model, COUNT(*), SUM(query_tokens), SUM(answer_tokens), SUM(cached_tokens), SUM(reasoning_tokens), SUM(cost), SUM(1 - priced)
FROM queries GROUP BY 1, 2, 3;
";

fn connect(path: &Path) -> Result<Connection, StoreError> {
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI,
    )?;
    c.busy_timeout(Duration::from_secs(5))?;
    // WAL + NORMAL: a committed batch survives a killed process; only a power
    // loss can take the last commits.
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(c)
}

/// Opens (creating and migrating) the database at `path`. With
/// `default_prices`, the built-in price list is loaded the first time.
pub fn open(
    path: &Path,
    default_prices: bool,
) -> Result<(SqliteBackend, Arc<SqliteReports>), StoreError> {
    let mut c = connect(path)?;
    let version: i64 = c.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError(format!(
            "database schema version {version} is newer than this tollgate ({SCHEMA_VERSION})"
        )));
    }
    let tx = c.transaction()?;
    tx.execute_batch(SCHEMA_V1)?;
    tx.execute_batch(SCHEMA_V2)?;
    tx.execute_batch(SCHEMA_V3)?;
    if version == 1 {
        tx.execute_batch(BACKFILL_V2)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    let loaded: Option<String> = tx
        .query_row(
            "SELECT value FROM meta WHERE key = 'default_prices_loaded'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if default_prices && loaded.is_none() {
        for (model, p) in pricing::default_prices() {
            tx.execute(
                "INSERT OR IGNORE INTO prices (model, valid_from, query, cached, answer) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![model, p.valid_from, p.query, p.cached, p.answer],
            )?;
        }
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('default_prices_loaded', '1')",
            [],
        )?;
    }
    tx.commit()?;
    let reports = Arc::new(SqliteReports {
        path: path.to_owned(),
        pool: Mutex::new(Vec::new()),
    });
    Ok((SqliteBackend { conn: c }, reports))
}

/// The writer thread's connection.
pub struct SqliteBackend {
    conn: Connection,
}

const INSERT: &str = "INSERT INTO queries (user, model, requested_model, endpoint, ts, duration_us, ttfb_us, status, stream, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, priced, estimated, request_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)";

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

const UPSERT_DAILY: &str = "INSERT INTO usage_daily (day, user, model, queries, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, unpriced)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
ON CONFLICT (day, user, model) DO UPDATE SET
    queries = queries + excluded.queries,
    query_tokens = query_tokens + excluded.query_tokens,
    answer_tokens = answer_tokens + excluded.answer_tokens,
    cached_tokens = cached_tokens + excluded.cached_tokens,
    reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens,
    cost = cost + excluded.cost,
    unpriced = unpriced + excluded.unpriced";

/// One rollup row's increments.
#[derive(Default)]
struct Daily {
    queries: i64,
    query_tokens: i64,
    answer_tokens: i64,
    cached_tokens: i64,
    reasoning_tokens: i64,
    cost: i64,
    unpriced: i64,
}

impl Backend for SqliteBackend {
    fn write(
        &mut self,
        batch: &[Priced],
        ratelimits: Option<&RateLimits>,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached(INSERT)?;
            let mut daily: std::collections::HashMap<(i64, &str, &str), Daily> =
                std::collections::HashMap::new();
            for p in batch {
                let r = &p.record;
                let model = r.model_or_requested();
                let d = daily
                    .entry((r.started_ms.div_euclid(DAY), &r.user, model))
                    .or_default();
                d.queries += 1;
                d.query_tokens += i(r.usage.query);
                d.answer_tokens += i(r.usage.answer);
                d.cached_tokens += i(r.usage.cached);
                d.reasoning_tokens += i(r.usage.reasoning);
                d.cost = d.cost.saturating_add(p.cost);
                d.unpriced += i64::from(!p.priced);
                st.execute(params![
                    r.user,
                    model,
                    r.requested_model,
                    r.endpoint,
                    r.started_ms,
                    i(r.duration_us),
                    r.ttfb_us.map(i),
                    r.status,
                    r.stream,
                    i(r.usage.query),
                    i(r.usage.answer),
                    i(r.usage.cached),
                    i(r.usage.reasoning),
                    p.cost,
                    p.priced,
                    r.estimated,
                    r.request_id,
                ])?;
                if let Some(k) = &r.key_id {
                    let mut st = tx.prepare_cached(
                        "UPDATE api_keys SET last_used = MAX(COALESCE(last_used, 0), ?2) WHERE id = ?1",
                    )?;
                    st.execute(params![k, r.started_ms])?;
                }
            }
            let mut up = tx.prepare_cached(UPSERT_DAILY)?;
            for ((day, user, model), d) in daily {
                up.execute(params![
                    day,
                    user,
                    model,
                    d.queries,
                    d.query_tokens,
                    d.answer_tokens,
                    d.cached_tokens,
                    d.reasoning_tokens,
                    d.cost,
                    d.unpriced
                ])?;
            }
        }
        if let Some(rl) = ratelimits {
            let json = serde_json::to_string(rl).map_err(|e| StoreError(e.to_string()))?;
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('ratelimits', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [json],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn set_price(
        &mut self,
        model: &str,
        price: &Price,
        table: &PriceTable,
    ) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO prices (model, valid_from, query, cached, answer) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (model, valid_from) DO UPDATE SET query = excluded.query, cached = excluded.cached, answer = excluded.answer",
            params![model, price.valid_from, price.query, price.cached, price.answer],
        )?;
        // Records that may be priced under this name: the name itself, its
        // dated snapshots and fine-tuned models; the lookup chain decides.
        let mut changed = 0u64;
        {
            let like_dated = format!("{}-%", escape_like(model));
            let mut sel = tx.prepare(
                "SELECT id, model, requested_model, ts, query_tokens, cached_tokens, answer_tokens, cost, priced, user FROM queries
                 WHERE ts >= ?1 AND (model = ?2 OR requested_model = ?2
                    OR model LIKE ?3 ESCAPE '\\' OR requested_model LIKE ?3 ESCAPE '\\'
                    OR model LIKE 'ft:%' OR requested_model LIKE 'ft:%')",
            )?;
            let mut upd = tx.prepare("UPDATE queries SET cost = ?2, priced = ?3 WHERE id = ?1")?;
            let mut deltas: std::collections::HashMap<(i64, String, String), (i64, i64)> =
                std::collections::HashMap::new();
            let mut rows = sel.query(params![price.valid_from, model, like_dated])?;
            while let Some(row) = rows.next()? {
                let id: i64 = row.get(0)?;
                let m: String = row.get(1)?;
                let req: String = row.get(2)?;
                let ts: i64 = row.get(3)?;
                let user: String = row.get(9)?;
                let tokens = pricing::Tokens {
                    query: row.get::<_, i64>(4)?.max(0) as u64,
                    cached: row.get::<_, i64>(5)?.max(0) as u64,
                    answer: row.get::<_, i64>(6)?.max(0) as u64,
                };
                let old: (i64, bool) = (row.get(7)?, row.get(8)?);
                let new = table.cost(&m, &req, ts, tokens);
                if new != old {
                    upd.execute(params![id, new.0, new.1])?;
                    changed += 1;
                    let d = deltas.entry((ts.div_euclid(DAY), user, m)).or_default();
                    d.0 += new.0 - old.0;
                    d.1 += i64::from(old.1) - i64::from(new.1);
                }
            }
            drop(rows);
            let mut roll = tx.prepare(
                "UPDATE usage_daily SET cost = cost + ?4, unpriced = unpriced + ?5 WHERE day = ?1 AND user = ?2 AND model = ?3",
            )?;
            for ((day, user, m), (cost, unpriced)) in deltas {
                roll.execute(params![day, user, m, cost, unpriced])?;
            }
        }
        tx.commit()?;
        Ok(changed)
    }

    fn write_rejections(&mut self, rejections: &[Rejected]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO rejections (ts, user, model, reason) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for r in rejections {
                st.execute(params![r.at_ms, r.user, r.model, r.reason])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn delete_before(&mut self, cutoff_ms: i64, limit: usize) -> Result<usize, StoreError> {
        Ok(self.conn.execute(
            "DELETE FROM queries WHERE id IN (SELECT id FROM queries WHERE ts < ?1 ORDER BY ts LIMIT ?2)",
            params![cutoff_ms, limit as i64],
        )?)
    }
}

impl SqliteBackend {
    /// Runs arbitrary SQL on the write connection (benchmarks fill databases with it).
    pub fn execute_batch(&self, sql: &str) -> Result<(), StoreError> {
        Ok(self.conn.execute_batch(sql)?)
    }
}

fn escape_like(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

/// Read connections for the reports.
pub struct SqliteReports {
    path: PathBuf,
    pool: Mutex<Vec<Connection>>,
}

impl SqliteReports {
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

/// SQL conditions and parameters for a filter.
fn where_clause(f: &Filter) -> (String, Vec<rusqlite::types::Value>) {
    let (conds, args) = conditions(f, true);
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
        let mut acc: BTreeMap<GroupValues, [i128; 8]> = BTreeMap::new();
        self.with(|c| {
            for piece in pieces(f.after, f.before) {
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
        let (w, mut args) = where_clause(f);
        let sql = format!(
            "SELECT id, user, model, requested_model, endpoint, ts, duration_us, ttfb_us, status, stream,
                    query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, priced, estimated, request_id
             FROM queries{w} ORDER BY ts, id LIMIT ? OFFSET ?"
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
            let mut st =
                c.prepare("SELECT model, valid_from, query, cached, answer FROM prices")?;
            let mut rows = st.query([])?;
            let mut t = PriceTable::default();
            while let Some(r) = rows.next()? {
                let model: String = r.get(0)?;
                t.insert(
                    &model,
                    Price {
                        valid_from: r.get(1)?,
                        query: r.get(2)?,
                        cached: r.get(3)?,
                        answer: r.get(4)?,
                    },
                );
            }
            Ok(t)
        })
    }

    fn accounts(&self) -> &dyn super::Accounts {
        self
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

/// A part of a time range read either from the rollups or from the records.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    /// Whole days `[from, to)` (day numbers; `None` is unbounded), from the rollups.
    Days(Option<i64>, Option<i64>, i64),
    /// Records with `from <= ts < to` (ms), added (1) or removed (-1).
    Records(i64, i64, i64),
}

/// Splits the exclusive range (`after`, `before`) into whole days read from
/// the rollups and partial days read from the records. A partial day more
/// than half covered is read as its whole day minus the uncovered records, so
/// at most half a day of records is ever scanned per edge.
fn pieces(after: Option<i64>, before: Option<i64>) -> Vec<Piece> {
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

fn piece_totals(
    c: &Connection,
    piece: &Piece,
    f: &Filter,
    group: &[GroupKey],
    acc: &mut BTreeMap<GroupValues, [i128; 8]>,
) -> Result<(), StoreError> {
    use rusqlite::types::Value;
    let rollup = matches!(piece, Piece::Days(..));
    let mut conds: Vec<&str> = Vec::new();
    let mut args: Vec<Value> = Vec::new();
    let sign = match *piece {
        Piece::Days(from, to, sign) => {
            if let Some(d) = from {
                conds.push("day >= ?");
                args.push(Value::Integer(d));
            }
            if let Some(d) = to {
                conds.push("day < ?");
                args.push(Value::Integer(d));
            }
            sign
        }
        Piece::Records(from, to, sign) => {
            conds.push("ts >= ?");
            args.push(Value::Integer(from));
            conds.push("ts < ?");
            args.push(Value::Integer(to));
            sign
        }
    };
    let (more, more_args) = conditions(f, false);
    conds.extend(more);
    args.extend(more_args);
    let keys: Vec<&str> = group.iter().map(|g| key_expr(*g, rollup)).collect();
    let sums = if rollup {
        "SUM(queries), SUM(query_tokens), SUM(answer_tokens), SUM(cached_tokens), SUM(reasoning_tokens), SUM(cost / 1000000000), SUM(cost % 1000000000), SUM(unpriced)"
    } else {
        "COUNT(*), SUM(query_tokens), SUM(answer_tokens), SUM(cached_tokens), SUM(reasoning_tokens), SUM(cost / 1000000000), SUM(cost % 1000000000), SUM(1 - priced)"
    };
    let table = if rollup { "usage_daily" } else { "queries" };
    grouped(c, &keys, group, sums, table, &conds, args, |g, r| {
        let n = keys.len();
        let int = |i: usize| -> rusqlite::Result<i128> {
            Ok(i128::from(r.get::<_, Option<i64>>(n + i)?.unwrap_or(0)))
        };
        let t = [
            int(0)?,
            int(1)?,
            int(2)?,
            int(3)?,
            int(4)?,
            int(5)? * 1_000_000_000 + int(6)?,
            int(7)?,
        ];
        let e = acc.entry(g).or_default();
        for (a, b) in e.iter_mut().zip(t) {
            *a += i128::from(sign) * b;
        }
        Ok(())
    })
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
            match k {
                GroupKey::User => g.user = v,
                GroupKey::Model => g.model = v,
                GroupKey::Day => g.day = v,
                GroupKey::Month => g.month = v,
            }
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
    acc: &mut BTreeMap<GroupValues, [i128; 8]>,
) -> Result<(), StoreError> {
    let (conds, args) = conditions(f, true);
    let keys: Vec<&str> = group.iter().map(|g| key_expr(*g, false)).collect();
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
                acc.entry(g).or_default()[7] += i128::from(n);
            }
            Ok(())
        },
    )
}

fn key_info(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyInfo> {
    Ok(KeyInfo {
        id: r.get(0)?,
        user: r.get(1)?,
        created_ms: r.get(2)?,
        last_used_ms: r.get(3)?,
        revoked_ms: r.get(4)?,
    })
}

impl Accounts for SqliteReports {
    fn create_key(&self, info: &KeyInfo, digest: &[u8; 32]) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO api_keys (id, user, digest, created) VALUES (?1, ?2, ?3, ?4)",
                params![info.id, info.user, &digest[..], info.created_ms],
            )?;
            Ok(())
        })
    }

    fn list_keys(&self, user: &str) -> Result<Vec<KeyInfo>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT id, user, created, last_used, revoked FROM api_keys WHERE user = ?1 ORDER BY created, id",
            )?;
            let rows = st.query_map([user], key_info)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn revoke_key(&self, id: &str, now_ms: i64) -> Result<Option<String>, StoreError> {
        self.with(|c| {
            let user: Option<String> = c
                .query_row(
                    "UPDATE api_keys SET revoked = ?2 WHERE id = ?1 AND revoked IS NULL RETURNING user",
                    params![id, now_ms],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(user)
        })
    }

    fn active_keys(&self) -> Result<Vec<(KeyInfo, [u8; 32])>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, user, created, last_used, revoked, digest FROM api_keys WHERE revoked IS NULL",
            )?;
            let rows = st.query_map([], |r| {
                let d: Vec<u8> = r.get(5)?;
                let mut digest = [0u8; 32];
                if d.len() == 32 {
                    digest.copy_from_slice(&d);
                }
                Ok((key_info(r)?, digest))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn save_limits(&self, user: Option<&str>, l: Option<&Limits>) -> Result<(), StoreError> {
        let user = user.unwrap_or(DEFAULT_LIMITS_USER);
        self.with(|c| {
            match l {
                Some(l) => c.execute(
                    "INSERT INTO limits (user, budget, period, rpm, tpm) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (user) DO UPDATE SET budget = excluded.budget, period = excluded.period, rpm = excluded.rpm, tpm = excluded.tpm",
                    params![
                        user,
                        l.budget,
                        l.period.as_str(),
                        l.rpm.map(i),
                        l.tpm.map(i)
                    ],
                )?,
                None => c.execute("DELETE FROM limits WHERE user = ?1", [user])?,
            };
            Ok(())
        })
    }

    fn all_limits(&self) -> Result<Vec<(Option<String>, Limits)>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT user, budget, period, rpm, tpm FROM limits")?;
            let rows = st.query_map([], |r| {
                let user: String = r.get(0)?;
                let period: String = r.get(2)?;
                let n = |v: Option<i64>| v.map(|v| v.max(0) as u64);
                Ok((
                    (user != DEFAULT_LIMITS_USER).then_some(user),
                    Limits {
                        budget: r.get(1)?,
                        period: Period::parse(&period).unwrap_or_default(),
                        rpm: n(r.get(3)?),
                        tpm: n(r.get(4)?),
                    },
                ))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }
}

#[cfg(test)]
mod tests;
