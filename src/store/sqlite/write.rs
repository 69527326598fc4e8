//! The writer thread's connection: record batches with their daily
//! rollups and the keys' last use, rate limits, price changes (re-pricing
//! the records they cover), retention and rejections.

use std::collections::HashMap;

use rusqlite::{params, Connection};

use super::{i, DAY};
use crate::pricing::{self, Price, PriceTable, Tier};
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

const INSERT: &str = "INSERT INTO queries (user, model, requested_model, endpoint, ts, duration_us, ttfb_us, status, stream, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, priced, estimated, request_id, client_aborted, service_tier, audio_query_tokens, audio_answer_tokens, tags, upstream, image_query_tokens, image_answer_tokens, units, custom_id, project) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28)";

/// Inserts a price row (standard and tier rates); its parameters are
/// those of [`UPSERT_PRICE`].
pub(super) const INSERT_PRICE: &str = "INSERT INTO prices (model, valid_from, query, cached, answer, flex_query, flex_cached, flex_answer, priority_query, priority_cached, priority_answer, audio_query, audio_answer, image_query, image_answer, unit) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)";

/// Stores a price row (standard and tier rates), replacing one of the same `valid_from`.
pub(super) const UPSERT_PRICE: &str = "INSERT INTO prices (model, valid_from, query, cached, answer, flex_query, flex_cached, flex_answer, priority_query, priority_cached, priority_answer, audio_query, audio_answer, image_query, image_answer, unit) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
ON CONFLICT (model, valid_from) DO UPDATE SET query = excluded.query, cached = excluded.cached, answer = excluded.answer,
    flex_query = excluded.flex_query, flex_cached = excluded.flex_cached, flex_answer = excluded.flex_answer,
    priority_query = excluded.priority_query, priority_cached = excluded.priority_cached, priority_answer = excluded.priority_answer,
    audio_query = excluded.audio_query, audio_answer = excluded.audio_answer,
    image_query = excluded.image_query, image_answer = excluded.image_answer, unit = excluded.unit";

/// The parameters of [`UPSERT_PRICE`].
pub(super) fn price_params(model: &str, p: &Price) -> Vec<rusqlite::types::Value> {
    use rusqlite::types::Value;
    let mut v = vec![
        Value::Text(model.to_owned()),
        Value::Integer(p.valid_from),
        Value::Integer(p.query),
        p.cached.map_or(Value::Null, Value::Integer),
        Value::Integer(p.answer),
    ];
    v.extend(
        p.extra_columns()
            .into_iter()
            .map(|c| c.map_or(Value::Null, Value::Integer)),
    );
    v
}

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

/// Adds a batch's increments to the tag rollups, saturating like
/// [`UPSERT_DAILY`].
const UPSERT_TAGS: &str = "INSERT INTO usage_daily_tags (tag_key, day, tag_value, user, model, queries, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, unpriced)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
ON CONFLICT (tag_key, day, tag_value, user, model) DO UPDATE SET
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
                    r.tier.map(|t| t.as_str()),
                    i(r.usage.audio_query),
                    i(r.usage.audio_answer),
                    r.tags,
                    r.upstream.as_deref(),
                    i(r.usage.image_query),
                    i(r.usage.image_answer),
                    r.units.to_text(),
                    r.custom_id.as_deref(),
                    r.project,
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
            let mut up = tx.prepare_cached(UPSERT_TAGS)?;
            for ((key, day, value, user, model), d) in crate::store::rollup::tagged(batch) {
                up.execute(params![
                    key,
                    day,
                    value,
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
            UPSERT_PRICE,
            rusqlite::params_from_iter(price_params(model, price)),
        )?;
        // Records that may be priced under this name: the name itself, its
        // dated snapshots and fine-tuned models; the lookup chain decides.
        let mut changed = 0u64;
        {
            let like_dated = format!("{}-%", escape_like(model));
            let mut sel = tx.prepare(
                "SELECT id, model, requested_model, ts, CAST(query_tokens AS INTEGER), CAST(cached_tokens AS INTEGER), CAST(answer_tokens AS INTEGER), CAST(cost AS INTEGER), priced, user, service_tier, CAST(audio_query_tokens AS INTEGER), CAST(audio_answer_tokens AS INTEGER), tags, CAST(image_query_tokens AS INTEGER), CAST(image_answer_tokens AS INTEGER), units, project FROM queries
                 WHERE ts >= ?1 AND (model = ?2 OR requested_model = ?2
                    OR model LIKE ?3 ESCAPE '\\' OR requested_model LIKE ?3 ESCAPE '\\'
                    OR model LIKE 'ft:%' OR requested_model LIKE 'ft:%')",
            )?;
            let mut upd = tx.prepare("UPDATE queries SET cost = ?2, priced = ?3 WHERE id = ?1")?;
            let mut deltas: HashMap<(i64, String, String), (i64, i64)> = HashMap::new();
            let mut tag_deltas: HashMap<crate::store::rollup::OwnedTagRow, (i64, i64)> =
                HashMap::new();
            let mut rows = sel.query(params![price.valid_from, model, like_dated])?;
            while let Some(row) = rows.next()? {
                let id: i64 = row.get(0)?;
                let m: String = row.get(1)?;
                let req: String = row.get(2)?;
                let ts: i64 = row.get(3)?;
                let user: String = row.get(9)?;
                let tags: String = row.get(13)?;
                let project: Option<String> = row.get(17)?;
                let tokens = pricing::Tokens {
                    query: row.get::<_, i64>(4)?.max(0) as u64,
                    cached: row.get::<_, i64>(5)?.max(0) as u64,
                    answer: row.get::<_, i64>(6)?.max(0) as u64,
                    tier: row
                        .get::<_, Option<String>>(10)?
                        .and_then(|t| Tier::from_stored(&t)),
                    audio_query: row.get::<_, i64>(11)?.max(0) as u64,
                    audio_answer: row.get::<_, i64>(12)?.max(0) as u64,
                    image_query: row.get::<_, i64>(14)?.max(0) as u64,
                    image_answer: row.get::<_, i64>(15)?.max(0) as u64,
                    units: pricing::Units::from_text(&row.get::<_, String>(16)?),
                };
                let old: (i64, bool) = (row.get(7)?, row.get(8)?);
                let new = table.cost(&m, &req, ts, tokens);
                if new != old {
                    upd.execute(params![id, new.0, new.1])?;
                    changed += 1;
                    let cost = new.0.saturating_sub(old.0);
                    let unpriced = i64::from(old.1) - i64::from(new.1);
                    let day = ts.div_euclid(DAY);
                    for (k, v) in crate::store::rollup::rollup_tags(&tags, project.as_deref()) {
                        let key = (k.to_owned(), day, v.to_owned(), user.clone(), m.clone());
                        let d = tag_deltas.entry(key).or_default();
                        d.0 = d.0.saturating_add(cost);
                        d.1 += unpriced;
                    }
                    let d = deltas.entry((day, user, m)).or_default();
                    d.0 = d.0.saturating_add(cost);
                    d.1 += unpriced;
                }
            }
            drop(rows);
            let mut roll = tx.prepare(
                "UPDATE usage_daily SET cost = MAX(MIN(cost + ?4, 9223372036854775807), 0), unpriced = unpriced + ?5 WHERE day = ?1 AND user = ?2 AND model = ?3",
            )?;
            for ((day, user, m), (cost, unpriced)) in deltas {
                roll.execute(params![day, user, m, cost, unpriced])?;
            }
            let mut roll = tx.prepare(
                "UPDATE usage_daily_tags SET cost = MAX(MIN(cost + ?6, 9223372036854775807), 0), unpriced = unpriced + ?7 WHERE tag_key = ?1 AND day = ?2 AND tag_value = ?3 AND user = ?4 AND model = ?5",
            )?;
            for ((k, day, v, user, m), (cost, unpriced)) in tag_deltas {
                roll.execute(params![k, day, v, user, m, cost, unpriced])?;
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
