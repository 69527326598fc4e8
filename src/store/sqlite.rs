//! SQLite storage (bundled, WAL): one write connection owned by the writer
//! thread, a small pool of read connections for the reports.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use super::{Backend, Filter, Priced, Reports, StoreError, UsageTotals};
use crate::pricing::{self, Price, PriceTable};
use crate::ratelimit::RateLimits;
use crate::record::StoredRecord;

/// Current schema version (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;

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
CREATE INDEX IF NOT EXISTS queries_ts ON queries (ts);
CREATE INDEX IF NOT EXISTS queries_user_ts ON queries (user, ts);
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

impl Backend for SqliteBackend {
    fn write(
        &mut self,
        batch: &[Priced],
        ratelimits: Option<&RateLimits>,
    ) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached(INSERT)?;
            for p in batch {
                let r = &p.record;
                let model = if r.model.is_empty() {
                    &r.requested_model
                } else {
                    &r.model
                };
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
                "SELECT id, model, requested_model, ts, query_tokens, cached_tokens, answer_tokens, cost, priced FROM queries
                 WHERE ts >= ?1 AND (model = ?2 OR requested_model = ?2
                    OR model LIKE ?3 ESCAPE '\\' OR requested_model LIKE ?3 ESCAPE '\\'
                    OR model LIKE 'ft:%' OR requested_model LIKE 'ft:%')",
            )?;
            let mut upd = tx.prepare("UPDATE queries SET cost = ?2, priced = ?3 WHERE id = ?1")?;
            let mut rows = sel.query(params![price.valid_from, model, like_dated])?;
            while let Some(row) = rows.next()? {
                let id: i64 = row.get(0)?;
                let m: String = row.get(1)?;
                let req: String = row.get(2)?;
                let ts: i64 = row.get(3)?;
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
                }
            }
        }
        tx.commit()?;
        Ok(changed)
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
    use rusqlite::types::Value;
    let mut conds: Vec<&str> = Vec::new();
    let mut args: Vec<Value> = Vec::new();
    if let Some(u) = &f.user {
        conds.push("user = ?");
        args.push(Value::Text(u.clone()));
    }
    if let Some(m) = &f.model {
        conds.push("model = ?");
        args.push(Value::Text(m.clone()));
    }
    if let Some(a) = f.after {
        conds.push("ts > ?");
        args.push(Value::Integer(a));
    }
    if let Some(b) = f.before {
        conds.push("ts < ?");
        args.push(Value::Integer(b));
    }
    let sql = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    (sql, args)
}

impl Reports for SqliteReports {
    fn usage(&self, f: &Filter) -> Result<UsageTotals, StoreError> {
        let (w, args) = where_clause(f);
        // Cost is summed in two parts so the total cannot overflow 64 bits.
        let sql = format!(
            "SELECT COUNT(*), COALESCE(SUM(query_tokens), 0), COALESCE(SUM(answer_tokens), 0), COALESCE(SUM(cached_tokens), 0), COALESCE(SUM(reasoning_tokens), 0),
                    COALESCE(SUM(cost / 1000000000), 0), COALESCE(SUM(cost % 1000000000), 0), COALESCE(SUM(1 - priced), 0)
             FROM queries{w}"
        );
        self.with(|c| {
            let mut st = c.prepare_cached(&sql)?;
            let t = st.query_row(rusqlite::params_from_iter(args), |r| {
                let n = |i: usize| r.get::<_, i64>(i).map(|v| v.max(0) as u64);
                Ok(UsageTotals {
                    queries: r.get::<_, i64>(0)? as u64,
                    query_tokens: n(1)?,
                    answer_tokens: n(2)?,
                    cached_tokens: n(3)?,
                    reasoning_tokens: n(4)?,
                    cost: i128::from(r.get::<_, i64>(5)?) * 1_000_000_000
                        + i128::from(r.get::<_, i64>(6)?),
                    unpriced: r.get::<_, i64>(7)? as u64,
                })
            })?;
            Ok(t)
        })
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
