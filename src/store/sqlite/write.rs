//! The writer thread's connection: record batches with their daily
//! rollups and the keys' last use, rate limits, price changes (re-pricing
//! the records they cover), retention and rejections.

use std::collections::HashMap;

use rusqlite::{params, Connection};

use super::{i, DAY};
use crate::pricing::{self, Price, PriceTable};
use crate::ratelimit::RateLimits;
use crate::record::{Priced, Rejected};
use crate::store::{Backend, StoreError};

/// The writer thread's connection.
pub struct SqliteBackend {
    conn: Connection,
}

impl SqliteBackend {
    pub(super) fn new(conn: Connection) -> SqliteBackend {
        SqliteBackend { conn }
    }
}

const INSERT: &str = "INSERT INTO queries (user, model, requested_model, endpoint, ts, duration_us, ttfb_us, status, stream, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, priced, estimated, request_id, client_aborted, upstream) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)";

/// Adds a batch's increments to the daily rollups. Sums saturate at
/// `i64::MAX` instead of overflowing: SQLite would turn an overflowing `+`
/// into a REAL that no report can read back as an integer. `MAX(x, 0)` drops
/// a count a wrapped sum once left negative.
const UPSERT_DAILY: &str = "INSERT INTO usage_daily (day, user, model, queries, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, unpriced)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
ON CONFLICT (day, user, model) DO UPDATE SET
    queries = MIN(MAX(queries, 0) + excluded.queries, 9223372036854775807),
    query_tokens = MIN(MAX(query_tokens, 0) + excluded.query_tokens, 9223372036854775807),
    answer_tokens = MIN(MAX(answer_tokens, 0) + excluded.answer_tokens, 9223372036854775807),
    cached_tokens = MIN(MAX(cached_tokens, 0) + excluded.cached_tokens, 9223372036854775807),
    reasoning_tokens = MIN(MAX(reasoning_tokens, 0) + excluded.reasoning_tokens, 9223372036854775807),
    cost = MIN(MAX(cost, 0) + excluded.cost, 9223372036854775807),
    unpriced = MIN(MAX(unpriced, 0) + excluded.unpriced, 9223372036854775807)";

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
                let model = r.model_or_requested();
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
                    r.client_aborted,
                    r.upstream.as_deref(),
                ])?;
                if let Some(k) = &r.key_id {
                    let mut st = tx.prepare_cached(
                        "UPDATE api_keys SET last_used = MAX(COALESCE(last_used, 0), ?2) WHERE id = ?1",
                    )?;
                    st.execute(params![k, r.started_ms])?;
                }
            }
            let mut up = tx.prepare_cached(UPSERT_DAILY)?;
            for ((day, user, model), d) in crate::store::rollup::daily(batch) {
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
                "SELECT id, model, requested_model, ts, CAST(query_tokens AS INTEGER), CAST(cached_tokens AS INTEGER), CAST(answer_tokens AS INTEGER), CAST(cost AS INTEGER), priced, user FROM queries
                 WHERE ts >= ?1 AND (model = ?2 OR requested_model = ?2
                    OR model LIKE ?3 ESCAPE '\\' OR requested_model LIKE ?3 ESCAPE '\\'
                    OR model LIKE 'ft:%' OR requested_model LIKE 'ft:%')",
            )?;
            let mut upd = tx.prepare("UPDATE queries SET cost = ?2, priced = ?3 WHERE id = ?1")?;
            let mut deltas: HashMap<(i64, String, String), (i64, i64)> = HashMap::new();
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
                    d.0 = d.0.saturating_add(new.0.saturating_sub(old.0));
                    d.1 += i64::from(old.1) - i64::from(new.1);
                }
            }
            drop(rows);
            let mut roll = tx.prepare(
                "UPDATE usage_daily SET cost = MAX(MIN(cost + ?4, 9223372036854775807), 0), unpriced = unpriced + ?5 WHERE day = ?1 AND user = ?2 AND model = ?3",
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
