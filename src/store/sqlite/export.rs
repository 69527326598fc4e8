//! Reading a whole database for `tollgate migrate`: opened read-only, and
//! read in one transaction, so every read sees the same moment even while
//! a proxy goes on writing the file.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::schema::LATEST;
use crate::record::{Priced, Record, Usage};
use crate::store::rollup::Daily;
use crate::store::transfer::{
    Anchor, KeyRow, LimitRow, ProjectRow, RejectionRow, RollupRow, SharedRows,
};
use crate::store::StoreError;

/// A SQLite database opened read-only, at one moment.
pub struct SqliteSource {
    conn: Connection,
}

/// Opens `path` read-only (never creating it) and starts the read
/// transaction. Refuses a file that is missing, is not a tollgate database,
/// or is of another schema version than this build's.
pub fn open_source(path: &Path) -> Result<SqliteSource, StoreError> {
    let shown = path.display();
    if !path.is_file() {
        return Err(StoreError(format!("{shown}: no such file")));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StoreError(format!("{shown}: {e}")))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|e| StoreError(format!("{shown}: {e}")))?;
    if version > LATEST {
        return Err(StoreError(format!(
            "{shown}: database schema version {version} is newer than this tollgate ({LATEST}); migrate with the tollgate that wrote it, or a newer one"
        )));
    }
    if version == 0 {
        return Err(StoreError(format!("{shown}: not a tollgate database")));
    }
    if version < LATEST {
        return Err(StoreError(format!(
            "{shown}: database schema version {version} is older than this tollgate's ({LATEST}); start this tollgate on it once (it upgrades the file), then migrate"
        )));
    }
    // Deferred: the snapshot is taken by the first read and kept to COMMIT.
    conn.execute_batch("BEGIN")?;
    Ok(SqliteSource { conn })
}

fn anchor(r: &rusqlite::Row<'_>) -> rusqlite::Result<Anchor> {
    Ok(Anchor {
        id: r.get(0)?,
        ts: r.get(1)?,
        user: r.get(2)?,
        duration_us: r.get(3)?,
    })
}

impl SqliteSource {
    /// The highest record id (0 without records).
    pub fn max_record_id(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM queries", [], |r| r.get(0))?)
    }

    /// The lowest record id (0 without records).
    pub fn min_record_id(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT COALESCE(MIN(id), 0) FROM queries", [], |r| r.get(0))?)
    }

    /// How many records have ids up to `id`.
    pub fn count_records_through(&self, id: i64) -> Result<u64, StoreError> {
        let n: i64 =
            self.conn
                .query_row("SELECT COUNT(*) FROM queries WHERE id <= ?1", [id], |r| {
                    r.get(0)
                })?;
        Ok(n.max(0) as u64)
    }

    /// The record with this id, as an [`Anchor`].
    pub fn anchor(&self, id: i64) -> Result<Option<Anchor>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, ts, user, duration_us FROM queries WHERE id = ?1",
                [id],
                anchor,
            )
            .optional()?)
    }

    /// Every daily rollup row.
    pub fn rollups(&self) -> Result<Vec<RollupRow>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT day, user, model, queries, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, unpriced FROM usage_daily ORDER BY day, user, model",
        )?;
        let rows = st.query_map([], |r| {
            Ok(RollupRow {
                day: r.get(0)?,
                user: r.get(1)?,
                model: r.get(2)?,
                sums: Daily {
                    queries: r.get(3)?,
                    query_tokens: r.get(4)?,
                    answer_tokens: r.get(5)?,
                    cached_tokens: r.get(6)?,
                    reasoning_tokens: r.get(7)?,
                    cost: r.get(8)?,
                    unpriced: r.get(9)?,
                },
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// At most `limit` records with ids in `(after, through]`, by id, and
    /// their ids.
    pub fn records(
        &self,
        after: i64,
        through: i64,
        limit: usize,
    ) -> Result<(Vec<i64>, Vec<Priced>), StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT id, user, model, requested_model, endpoint, ts, duration_us, ttfb_us, status, stream,
                    query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, priced, estimated,
                    request_id, client_aborted, service_tier, audio_query_tokens, audio_answer_tokens, tags, upstream,
                    image_query_tokens, image_answer_tokens, units, custom_id, project
             FROM queries WHERE id > ?1 AND id <= ?2 ORDER BY id LIMIT ?3",
        )?;
        let n = |v: i64| v.max(0) as u64;
        let rows = st.query_map(
            rusqlite::params![after, through, i64::try_from(limit).unwrap_or(i64::MAX)],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    Priced {
                        record: Record {
                            user: r.get(1)?,
                            model: r.get(2)?,
                            requested_model: r.get(3)?,
                            endpoint: r.get(4)?,
                            started_ms: r.get(5)?,
                            duration_us: n(r.get(6)?),
                            ttfb_us: r.get::<_, Option<i64>>(7)?.map(n),
                            status: u16::try_from(r.get::<_, i64>(8)?).unwrap_or(0),
                            stream: r.get(9)?,
                            usage: Usage {
                                query: n(r.get(10)?),
                                answer: n(r.get(11)?),
                                cached: n(r.get(12)?),
                                reasoning: n(r.get(13)?),
                                audio_query: n(r.get(20)?),
                                audio_answer: n(r.get(21)?),
                                image_query: n(r.get(24)?),
                                image_answer: n(r.get(25)?),
                            },
                            units: crate::pricing::Units::from_text(&r.get::<_, String>(26)?),
                            tags: r.get(22)?,
                            upstream: r.get(23)?,
                            custom_id: r.get(27)?,
                            project: r.get(28)?,
                            tier: r
                                .get::<_, Option<String>>(19)?
                                .as_deref()
                                .and_then(crate::pricing::Tier::from_stored),
                            estimated: r.get(16)?,
                            request_id: r.get(17)?,
                            client_aborted: r.get(18)?,
                            ..Record::default()
                        },
                        cost: r.get(14)?,
                        priced: r.get(15)?,
                    },
                ))
            },
        )?;
        let mut out = (Vec::new(), Vec::new());
        for r in rows {
            let (id, p) = r?;
            out.0.push(id);
            out.1.push(p);
        }
        Ok(out)
    }

    /// Rejections with ids above `after`, by id.
    pub fn rejections(&self, after: i64) -> Result<Vec<RejectionRow>, StoreError> {
        let mut st = self.conn.prepare(
            "SELECT id, ts, user, model, reason FROM rejections WHERE id > ?1 ORDER BY id",
        )?;
        let rows = st.query_map([after], |r| {
            Ok(RejectionRow {
                id: r.get(0)?,
                ts: r.get(1)?,
                user: r.get(2)?,
                model: r.get(3)?,
                reason: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Prices, keys, limits, rate limits and the built-in-prices marker.
    pub fn shared(&self) -> Result<SharedRows, StoreError> {
        let c = &self.conn;
        let prices = super::reports::price_rows(c)?;
        let mut st = c.prepare(
            "SELECT id, user, digest, created, last_used, revoked, tags, project FROM api_keys ORDER BY created, id",
        )?;
        let keys = st
            .query_map([], |r| {
                Ok(KeyRow {
                    id: r.get(0)?,
                    user: r.get(1)?,
                    digest: r.get(2)?,
                    created: r.get(3)?,
                    last_used: r.get(4)?,
                    revoked: r.get(5)?,
                    tags: r.get(6)?,
                    project: r.get(7)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut st =
            c.prepare("SELECT user, budget, period, rpm, tpm FROM limits ORDER BY user")?;
        let limits = st
            .query_map([], |r| {
                Ok(LimitRow {
                    user: r.get(0)?,
                    budget: r.get(1)?,
                    period: r.get(2)?,
                    rpm: r.get(3)?,
                    tpm: r.get(4)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        let mut st = c.prepare(
            "SELECT name, members, budget, period, rpm, tpm, alert_webhook FROM projects ORDER BY name",
        )?;
        let projects = st
            .query_map([], |r| {
                Ok(ProjectRow {
                    name: r.get(0)?,
                    members: r.get(1)?,
                    budget: r.get(2)?,
                    period: r.get(3)?,
                    rpm: r.get(4)?,
                    tpm: r.get(5)?,
                    alert_webhook: r.get(6)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        let meta = |key: &str| -> Result<Option<String>, StoreError> {
            Ok(
                c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                    .optional()?,
            )
        };
        Ok(SharedRows {
            prices,
            keys,
            limits,
            projects,
            ratelimits: meta("ratelimits")?,
            default_prices_loaded: meta("default_prices_loaded")?.is_some(),
        })
    }
}
