//! The writer thread's connection: each batch of records goes in by binary
//! `COPY`, in one transaction with its daily rollups (`ON CONFLICT` sums,
//! so instances writing the same day add up), the keys' last use and the
//! rate limits. Also price changes (re-pricing the records they cover),
//! monthly partitions, retention (whole partitions dropped) and rejections.
//!
//! A lost connection is reopened on the next attempt; the writer thread
//! retries the same batch until it is written, and a batch token committed
//! with the batch keeps a retry after a commit whose answer was lost from
//! writing it twice.

use std::collections::{BTreeMap, HashSet};
use std::pin::pin;

use chrono::{Datelike, TimeZone, Utc};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Transaction};

use super::schema::PARTITION_LOCK;
use super::{connect, i, wait, DAY};

/// The writer's settings: a lock held elsewhere (a long transaction, a
/// table lock) fails the attempt after a while instead of stalling it
/// silently, so readiness says the database refuses writes.
const WRITER_SETTINGS: &str = "SET lock_timeout = '2s'; SET statement_timeout = '60s'";

/// A connection for the writer.
fn connect_writer(url: &PgUrl) -> Result<Client, StoreError> {
    let c = connect(url)?;
    wait(c.batch_execute(WRITER_SETTINGS))?;
    Ok(c)
}
use crate::config::PgUrl;
use crate::pricing::{self, Price, PriceTable, Tier};
use crate::ratelimit::RateLimits;
use crate::record::{Priced, Rejected};
use crate::store::rollup::Daily;
use crate::store::{Backend, StoreError};

/// How long batch tokens are kept: far longer than any retry lasts.
const TOKEN_KEEP_MS: i64 = 2 * DAY;

/// The writer thread's connection.
pub struct PgBackend {
    url: PgUrl,
    client: Option<Client>,
    /// Months whose partition is known to exist.
    months: HashSet<i64>,
    /// Unique to this process: batch tokens start with it.
    instance: String,
    /// Batches written by this process.
    seq: u64,
    /// The token of the batch being retried, if the last attempt failed.
    retry: Option<String>,
}

const COPY: &str = "COPY queries (username, model, requested_model, endpoint, ts, duration_us, ttfb_us, status, stream, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, priced, estimated, request_id, client_aborted, service_tier, audio_query_tokens, audio_answer_tokens, tags, upstream, image_query_tokens, image_answer_tokens, units, custom_id, project) FROM STDIN (FORMAT binary)";

/// Inserts a price row (standard and tier rates); its parameters are
/// those of [`UPSERT_PRICE`].
pub(super) const INSERT_PRICE: &str = "INSERT INTO prices (model, valid_from, query, cached, answer, flex_query, flex_cached, flex_answer, priority_query, priority_cached, priority_answer, audio_query, audio_answer, image_query, image_answer, unit) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)";

/// Stores a price row (standard and tier rates), replacing one of the same `valid_from`.
pub(super) const UPSERT_PRICE: &str = "INSERT INTO prices (model, valid_from, query, cached, answer, flex_query, flex_cached, flex_answer, priority_query, priority_cached, priority_answer, audio_query, audio_answer, image_query, image_answer, unit) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
ON CONFLICT (model, valid_from) DO UPDATE SET query = excluded.query, cached = excluded.cached, answer = excluded.answer,
    flex_query = excluded.flex_query, flex_cached = excluded.flex_cached, flex_answer = excluded.flex_answer,
    priority_query = excluded.priority_query, priority_cached = excluded.priority_cached, priority_answer = excluded.priority_answer,
    audio_query = excluded.audio_query, audio_answer = excluded.audio_answer,
    image_query = excluded.image_query, image_answer = excluded.image_answer, unit = excluded.unit";

/// Runs `sql` ([`UPSERT_PRICE`], or [`INSERT_PRICE`] with a conflict
/// clause) for one row.
pub(super) async fn store_price(
    tx: &tokio_postgres::Transaction<'_>,
    sql: &str,
    model: &str,
    p: &Price,
) -> Result<u64, tokio_postgres::Error> {
    let t = p.extra_columns();
    tx.execute(
        sql,
        &[
            &model,
            &p.valid_from,
            &p.query,
            &p.cached,
            &p.answer,
            &t[0],
            &t[1],
            &t[2],
            &t[3],
            &t[4],
            &t[5],
            &t[6],
            &t[7],
            &t[8],
            &t[9],
            &t[10],
        ],
    )
    .await
}

const COPY_TYPES: &[Type] = &[
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT4,
    Type::BOOL,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::BOOL,
    Type::BOOL,
    Type::TEXT,
    Type::BOOL,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
];

const UPSERT_DAILY: &str = "INSERT INTO usage_daily AS d (day, username, model, queries, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, unpriced)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[])
ON CONFLICT (day, username, model) DO UPDATE SET
    queries = d.queries + excluded.queries,
    query_tokens = d.query_tokens + excluded.query_tokens,
    answer_tokens = d.answer_tokens + excluded.answer_tokens,
    cached_tokens = d.cached_tokens + excluded.cached_tokens,
    reasoning_tokens = d.reasoning_tokens + excluded.reasoning_tokens,
    cost = d.cost + excluded.cost,
    unpriced = d.unpriced + excluded.unpriced";

/// This instance's leases shrink by what its records written in the same
/// transaction cost (those of the lease's period: rollup days are day numbers, period
/// starts milliseconds at a day's start),
/// so a lease's amount plus the spend written stays what was granted.
const SPEND_LEASES: &str = "UPDATE budget_leases l SET amount = l.amount - s.cost
FROM (SELECT b.username, sum(v.cost) AS cost
      FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS v(day, username, cost)
      JOIN budget_leases b ON b.username = v.username AND b.instance = $4 AND v.day >= b.period_start / 86400000
      GROUP BY b.username) s
WHERE l.username = s.username AND l.instance = $4";
/// The tag rollup rows of a batch, added as [`UPSERT_DAILY`] adds its rows.
const UPSERT_TAGS: &str = "INSERT INTO usage_daily_tags AS d (tag_key, day, tag_value, username, model, queries, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, unpriced)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[])
ON CONFLICT (tag_key, day, tag_value, username, model) DO UPDATE SET
    queries = d.queries + excluded.queries,
    query_tokens = d.query_tokens + excluded.query_tokens,
    answer_tokens = d.answer_tokens + excluded.answer_tokens,
    cached_tokens = d.cached_tokens + excluded.cached_tokens,
    reasoning_tokens = d.reasoning_tokens + excluded.reasoning_tokens,
    cost = d.cost + excluded.cost,
    unpriced = d.unpriced + excluded.unpriced";

/// The tag rollup rows of a batch as column arrays, in key order.
#[derive(Default)]
pub(super) struct TagColumns<'a> {
    key: Vec<&'a str>,
    day: Vec<i64>,
    value: Vec<&'a str>,
    user: Vec<&'a str>,
    model: Vec<&'a str>,
    sums: [Vec<i64>; 7],
}

/// Adds a batch's tag rollup increments inside `tx`.
pub(super) async fn upsert_tags(
    tx: &Transaction<'_>,
    tagged: &TagColumns<'_>,
) -> Result<(), tokio_postgres::Error> {
    if tagged.key.is_empty() {
        return Ok(());
    }
    let s = &tagged.sums;
    tx.execute(
        UPSERT_TAGS,
        &[
            &tagged.key,
            &tagged.day,
            &tagged.value,
            &tagged.user,
            &tagged.model,
            &s[0],
            &s[1],
            &s[2],
            &s[3],
            &s[4],
            &s[5],
            &s[6],
        ],
    )
    .await?;
    Ok(())
}

/// The cost a batch's project rollup rows add per (day, project lease key):
/// what the project leases of this instance shrink by, as users' do.
fn project_spend(t: &TagColumns<'_>) -> (Vec<i64>, Vec<String>, Vec<i64>) {
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..t.key.len() {
        if t.key[i] == crate::projects::ROLLUP_KEY && t.sums[5][i] != 0 {
            out.0.push(t.day[i]);
            out.1
                .push(format!("{}{}", super::leases::PROJECT_PREFIX, t.value[i]));
            out.2.push(t.sums[5][i]);
        }
    }
    out
}

pub(super) fn tag_columns(batch: &[Priced]) -> TagColumns<'_> {
    let mut c = TagColumns::default();
    for ((key, day, value, user, model), d) in crate::store::rollup::tagged(batch) {
        c.key.push(key);
        c.day.push(day);
        c.value.push(value);
        c.user.push(user);
        c.model.push(model);
        for (col, x) in c.sums.iter_mut().zip(d.columns()) {
            col.push(x);
        }
    }
    c
}

/// The rollup rows of a batch as column arrays, sorted by key (instances
/// upserting the same rows then lock them in the same order).
#[derive(Default)]
pub(super) struct DailyColumns<'a> {
    day: Vec<i64>,
    user: Vec<&'a str>,
    model: Vec<&'a str>,
    sums: [Vec<i64>; 7],
}

pub(super) fn daily_columns(batch: &[Priced]) -> DailyColumns<'_> {
    DailyColumns::from_rows(
        crate::store::rollup::daily(batch)
            .into_iter()
            .map(|((day, user, model), d)| (day, user, model, d)),
    )
}

impl<'a> DailyColumns<'a> {
    /// Columns of rows given in key order.
    pub(super) fn from_rows(
        rows: impl IntoIterator<Item = (i64, &'a str, &'a str, Daily)>,
    ) -> Self {
        let mut c = DailyColumns::default();
        for (day, user, model, d) in rows {
            c.day.push(day);
            c.user.push(user);
            c.model.push(model);
            for (col, x) in c.sums.iter_mut().zip(d.columns()) {
                col.push(x);
            }
        }
        c
    }
}

/// Writes records by binary `COPY` inside `tx`.
pub(super) async fn copy_records(
    tx: &Transaction<'_>,
    batch: &[Priced],
) -> Result<(), tokio_postgres::Error> {
    let sink = tx.copy_in(COPY).await?;
    let mut w = pin!(BinaryCopyInWriter::new(sink, COPY_TYPES));
    for p in batch {
        let r = &p.record;
        let status = i32::from(r.status);
        let tier = r.tier.map(|t| t.as_str());
        let (audio_q, audio_a) = (i(r.usage.audio_query), i(r.usage.audio_answer));
        let upstream = r.upstream.as_deref();
        let (image_q, image_a) = (i(r.usage.image_query), i(r.usage.image_answer));
        let units = r.units.to_text();
        let custom_id = r.custom_id.as_deref();
        let row: [&(dyn ToSql + Sync); 28] = [
            &r.user,
            &r.model_or_requested(),
            &r.requested_model,
            &r.endpoint,
            &r.started_ms,
            &i(r.duration_us),
            &r.ttfb_us.map(i),
            &status,
            &r.stream,
            &i(r.usage.query),
            &i(r.usage.answer),
            &i(r.usage.cached),
            &i(r.usage.reasoning),
            &p.cost,
            &p.priced,
            &r.estimated,
            &r.request_id,
            &r.client_aborted,
            &tier,
            &audio_q,
            &audio_a,
            &r.tags,
            &upstream,
            &image_q,
            &image_a,
            &units,
            &custom_id,
            &r.project,
        ];
        w.as_mut().write(&row).await?;
    }
    w.finish().await?;
    Ok(())
}

/// Adds rollup increments inside `tx` (`ON CONFLICT` sums).
pub(super) async fn upsert_daily(
    tx: &Transaction<'_>,
    daily: &DailyColumns<'_>,
) -> Result<(), tokio_postgres::Error> {
    if daily.day.is_empty() {
        return Ok(());
    }
    let s = &daily.sums;
    tx.execute(
        UPSERT_DAILY,
        &[
            &daily.day,
            &daily.user,
            &daily.model,
            &s[0],
            &s[1],
            &s[2],
            &s[3],
            &s[4],
            &s[5],
            &s[6],
        ],
    )
    .await?;
    Ok(())
}

/// The month (months since year 0) a time falls in.
pub(super) fn month_of(ts: i64) -> i64 {
    let t = Utc.timestamp_millis_opt(ts).single().unwrap_or(if ts < 0 {
        chrono::DateTime::<Utc>::MIN_UTC
    } else {
        chrono::DateTime::<Utc>::MAX_UTC
    });
    i64::from(t.year()) * 12 + i64::from(t.month0())
}

/// The first millisecond of a month.
pub(super) fn month_start(month: i64) -> i64 {
    let year = i32::try_from(month.div_euclid(12)).unwrap_or(i32::MAX);
    let m = month.rem_euclid(12) as u32 + 1;
    Utc.with_ymd_and_hms(year, m, 1, 0, 0, 0)
        .single()
        .map_or(if month < 0 { i64::MIN } else { i64::MAX }, |t| {
            t.timestamp_millis()
        })
}

/// The name of a month's partition, e.g. `queries_y2026m05`.
pub(super) fn partition_name(month: i64) -> String {
    format!(
        "queries_y{}m{:02}",
        month.div_euclid(12),
        month.rem_euclid(12) + 1
    )
    .replace('-', "n")
}

/// The month of a partition name, if it is one of ours.
pub(super) fn partition_month(name: &str) -> Option<i64> {
    let rest = name.strip_prefix("queries_y")?.replace('n', "-");
    let (y, m) = rest.split_once('m')?;
    let (y, m): (i64, i64) = (y.parse().ok()?, m.parse().ok()?);
    (1..=12).contains(&m).then_some(y * 12 + m - 1)
}

impl PgBackend {
    /// The budget leases of this instance (the writer subtracts what it
    /// writes from them).
    pub fn leases(&self) -> super::PgLeases {
        super::PgLeases::new(self.url.clone(), self.instance.clone())
    }

    pub(super) fn new(url: PgUrl, client: Client) -> Result<PgBackend, StoreError> {
        wait(client.batch_execute(WRITER_SETTINGS))?;
        let mut id = [0u8; 8];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id);
        Ok(PgBackend {
            url,
            client: Some(client),
            months: HashSet::new(),
            instance: id.iter().map(|b| format!("{b:02x}")).collect(),
            seq: 0,
            retry: None,
        })
    }

    /// The connection, reopened if it was lost.
    pub(super) fn client(&mut self) -> Result<&mut Client, StoreError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
            self.client = Some(connect_writer(&self.url)?);
        }
        Ok(self.client.as_mut().expect("connected just now"))
    }

    /// After a failure: forget what may have changed meanwhile.
    fn failed(&mut self) {
        self.months.clear();
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
    }

    /// Makes sure the partitions of these months (and the month after the
    /// latest, so a month's first records never wait for one) exist. In a
    /// transaction of its own: creating a partition locks the whole table.
    pub(super) fn ensure_partitions(&mut self, batch: &[Priced]) -> Result<(), StoreError> {
        let mut want: Vec<i64> = batch
            .iter()
            .map(|p| month_of(p.record.started_ms))
            .filter(|m| !self.months.contains(m))
            .collect();
        if want.is_empty() {
            return Ok(());
        }
        if let Some(&last) = want.iter().max() {
            want.push(last + 1);
        }
        want.sort_unstable();
        want.dedup();
        let c = self.client()?;
        wait(async {
            let tx = c.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])
                .await?;
            for &m in &want {
                let sql = format!(
                    "CREATE TABLE IF NOT EXISTS {} PARTITION OF queries FOR VALUES FROM ({}) TO ({})",
                    partition_name(m),
                    month_start(m),
                    month_start(m + 1)
                );
                tx.batch_execute(&sql).await?;
            }
            tx.commit().await
        })?;
        self.months.extend(want);
        Ok(())
    }

    fn try_write(
        &mut self,
        batch: &[Priced],
        ratelimits: Option<&RateLimits>,
        token: &str,
    ) -> Result<(), StoreError> {
        self.ensure_partitions(batch)?;
        let rl = ratelimits
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| StoreError(e.to_string()))?;
        let daily = daily_columns(batch);
        let tagged = tag_columns(batch);
        let projects = project_spend(&tagged);
        let mut last_used: BTreeMap<&str, i64> = BTreeMap::new();
        for p in batch {
            if let Some(k) = &p.record.key_id {
                let t = last_used.entry(k.as_str()).or_insert(i64::MIN);
                *t = (*t).max(p.record.started_ms);
            }
        }
        let instance = self.instance.clone();
        let c = self.client()?;
        wait(async {
            let tx = c.transaction().await?;
            if !batch.is_empty() {
                let fresh = tx
                    .execute(
                        "INSERT INTO write_batches (token, at_ms) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                        &[&token, &crate::timestamp::now_ms()],
                    )
                    .await?;
                if fresh == 0 {
                    // Committed by an attempt whose answer was lost.
                    tracing::warn!(
                        records = batch.len(),
                        "a retried batch was already written; not writing it again"
                    );
                    return tx.rollback().await;
                }
                copy_records(&tx, batch).await?;
                upsert_daily(&tx, &daily).await?;
                let s = &daily.sums;
                if s[5].iter().any(|&c| c != 0) {
                    tx.execute(SPEND_LEASES, &[&daily.day, &daily.user, &s[5], &instance])
                        .await?;
                }
                if !projects.0.is_empty() {
                    tx.execute(
                        SPEND_LEASES,
                        &[&projects.0, &projects.1, &projects.2, &instance],
                    )
                    .await?;
                }
                upsert_tags(&tx, &tagged).await?;
                if !last_used.is_empty() {
                    let ids: Vec<&str> = last_used.keys().copied().collect();
                    let ts: Vec<i64> = last_used.values().copied().collect();
                    tx.execute(
                        "UPDATE api_keys k SET last_used = GREATEST(COALESCE(k.last_used, 0), v.ts)
                         FROM unnest($1::text[], $2::bigint[]) AS v(id, ts) WHERE k.id = v.id",
                        &[&ids, &ts],
                    )
                    .await?;
                }
            }
            if let Some(json) = &rl {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('ratelimits', $1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    &[json],
                )
                .await?;
            }
            tx.commit().await
        })?;
        Ok(())
    }

    fn try_set_price(
        &mut self,
        model: &str,
        price: &Price,
        table: &PriceTable,
    ) -> Result<u64, StoreError> {
        let c = self.client()?;
        wait(async {
            let tx = c.transaction().await?;
            store_price(&tx, UPSERT_PRICE, model, price).await?;
            // Records that may be priced under this name: the name itself,
            // its dated snapshots and fine-tuned models; the lookup chain decides.
            let like_dated = format!("{}-%", escape_like(model));
            let rows = tx
                .query(
                    "SELECT id, model, requested_model, ts, query_tokens, cached_tokens, answer_tokens, cost, priced, username, service_tier, audio_query_tokens, audio_answer_tokens, tags, image_query_tokens, image_answer_tokens, units, project FROM queries
                     WHERE ts >= $1 AND (model = $2 OR requested_model = $2
                        OR model LIKE $3 ESCAPE '\\' OR requested_model LIKE $3 ESCAPE '\\'
                        OR model LIKE 'ft:%' OR requested_model LIKE 'ft:%')",
                    &[&price.valid_from, &model, &like_dated],
                )
                .await?;
            let (mut ids, mut tss, mut costs, mut priced) = (vec![], vec![], vec![], vec![]);
            let mut deltas: BTreeMap<(i64, String, String), (i64, i64)> = BTreeMap::new();
            let mut tag_deltas: BTreeMap<crate::store::rollup::OwnedTagRow, (i64, i64)> =
                BTreeMap::new();
            for row in &rows {
                let m: String = row.get(1);
                let req: String = row.get(2);
                let ts: i64 = row.get(3);
                let tokens = pricing::Tokens {
                    query: row.get::<_, i64>(4).max(0) as u64,
                    cached: row.get::<_, i64>(5).max(0) as u64,
                    answer: row.get::<_, i64>(6).max(0) as u64,
                    tier: row.get::<_, Option<&str>>(10).and_then(Tier::from_stored),
                    audio_query: row.get::<_, i64>(11).max(0) as u64,
                    audio_answer: row.get::<_, i64>(12).max(0) as u64,
                    image_query: row.get::<_, i64>(14).max(0) as u64,
                    image_answer: row.get::<_, i64>(15).max(0) as u64,
                    units: pricing::Units::from_text(row.get::<_, &str>(16)),
                };
                let old: (i64, bool) = (row.get(7), row.get(8));
                let new = table.cost(&m, &req, ts, tokens);
                if new != old {
                    ids.push(row.get::<_, i64>(0));
                    tss.push(ts);
                    costs.push(new.0);
                    priced.push(new.1);
                    let (cost, unpriced) = (new.0 - old.0, i64::from(old.1) - i64::from(new.1));
                    let (day, user, tags): (i64, String, &str) =
                        (ts.div_euclid(DAY), row.get(9), row.get(13));
                    let project: Option<&str> = row.get(17);
                    for (k, v) in crate::store::rollup::rollup_tags(tags, project) {
                        let key = (k.to_owned(), day, v.to_owned(), user.clone(), m.clone());
                        let d = tag_deltas.entry(key).or_default();
                        d.0 += cost;
                        d.1 += unpriced;
                    }
                    let d = deltas.entry((day, user, m)).or_default();
                    d.0 += cost;
                    d.1 += unpriced;
                }
            }
            if !ids.is_empty() {
                tx.execute(
                    "UPDATE queries q SET cost = v.cost, priced = v.priced
                     FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::boolean[]) AS v(id, ts, cost, priced)
                     WHERE q.ts = v.ts AND q.id = v.id",
                    &[&ids, &tss, &costs, &priced],
                )
                .await?;
                let (mut day, mut user, mut m, mut cost, mut unpriced) =
                    (vec![], vec![], vec![], vec![], vec![]);
                for ((d, u, mo), (c, n)) in deltas {
                    day.push(d);
                    user.push(u);
                    m.push(mo);
                    cost.push(c);
                    unpriced.push(n);
                }
                tx.execute(
                    "UPDATE usage_daily d SET cost = d.cost + v.cost, unpriced = d.unpriced + v.unpriced
                     FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::bigint[]) AS v(day, username, model, cost, unpriced)
                     WHERE d.day = v.day AND d.username = v.username AND d.model = v.model",
                    &[&day, &user, &m, &cost, &unpriced],
                )
                .await?;
                if !tag_deltas.is_empty() {
                    let (mut key, mut day, mut value, mut user, mut m, mut cost, mut unpriced) =
                        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
                    for ((k, d, v, u, mo), (c, n)) in tag_deltas {
                        key.push(k);
                        day.push(d);
                        value.push(v);
                        user.push(u);
                        m.push(mo);
                        cost.push(c);
                        unpriced.push(n);
                    }
                    tx.execute(
                        "UPDATE usage_daily_tags d SET cost = d.cost + v.cost, unpriced = d.unpriced + v.unpriced
                         FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::bigint[])
                             AS v(tag_key, day, tag_value, username, model, cost, unpriced)
                         WHERE d.tag_key = v.tag_key AND d.day = v.day AND d.tag_value = v.tag_value
                           AND d.username = v.username AND d.model = v.model",
                        &[&key, &day, &value, &user, &m, &cost, &unpriced],
                    )
                    .await?;
                }
            }
            tx.commit().await?;
            Ok(ids.len() as u64)
        })
    }

    fn try_delete_before(&mut self, cutoff_ms: i64, limit: usize) -> Result<usize, StoreError> {
        let c = self.client()?;
        let (dropped, deleted) = wait(async {
            // Whole months past the cutoff go by dropping their partition.
            let parts = c
                .query(
                    "SELECT c.relname, c.reltuples::bigint FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                     WHERE i.inhparent = 'queries'::regclass",
                    &[],
                )
                .await?;
            let mut dropped = 0i64;
            for row in parts {
                let name: String = row.get(0);
                let Some(month) = partition_month(&name) else {
                    continue;
                };
                if month_start(month + 1) <= cutoff_ms {
                    c.batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
                        .await?;
                    dropped += row.get::<_, i64>(1).max(0);
                    tracing::info!(partition = %name, "retention: dropped a month of records (rollups kept)");
                }
            }
            // The rest, in the month the cutoff falls in, a batch at a time.
            let deleted = c
                .execute(
                    "DELETE FROM queries WHERE (ts, id) IN (SELECT ts, id FROM queries WHERE ts < $1 ORDER BY ts LIMIT $2)",
                    &[&cutoff_ms, &(limit as i64)],
                )
                .await?;
            c.execute(
                "DELETE FROM write_batches WHERE at_ms < $1",
                &[&(crate::timestamp::now_ms() - TOKEN_KEEP_MS)],
            )
            .await?;
            Ok::<_, tokio_postgres::Error>((dropped, deleted))
        })?;
        if dropped > 0 {
            self.months.clear();
        }
        Ok(deleted as usize + usize::try_from(dropped).unwrap_or(0))
    }

    fn try_write_rejections(&mut self, rejections: &[Rejected]) -> Result<(), StoreError> {
        let ts: Vec<i64> = rejections.iter().map(|r| r.at_ms).collect();
        let user: Vec<&str> = rejections.iter().map(|r| r.user.as_str()).collect();
        let model: Vec<&str> = rejections.iter().map(|r| r.model.as_str()).collect();
        let reason: Vec<&str> = rejections.iter().map(|r| r.reason).collect();
        let c = self.client()?;
        wait(c.execute(
            "INSERT INTO rejections (ts, username, model, reason) SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[])",
            &[&ts, &user, &model, &reason],
        ))?;
        Ok(())
    }

    /// Runs arbitrary SQL on the write connection (benchmarks and tests use it).
    pub fn execute_batch(&mut self, sql: &str) -> Result<(), StoreError> {
        let c = self.client()?;
        Ok(wait(c.batch_execute(sql))?)
    }
}

/// Runs `f`, and after a failure drops what may be stale.
fn guarded<T>(
    b: &mut PgBackend,
    f: impl FnOnce(&mut PgBackend) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let out = f(b);
    if out.is_err() {
        b.failed();
    }
    out
}

impl Backend for PgBackend {
    fn write(
        &mut self,
        batch: &[Priced],
        ratelimits: Option<&RateLimits>,
    ) -> Result<(), StoreError> {
        // The writer thread retries the same batch until it is written, so
        // a retry keeps the token of the failed attempt.
        let token = match self.retry.take() {
            Some(t) => t,
            None => {
                self.seq += 1;
                format!("{}-{}", self.instance, self.seq)
            }
        };
        let out = guarded(self, |b| b.try_write(batch, ratelimits, &token));
        if out.is_err() && !batch.is_empty() {
            self.retry = Some(token);
        }
        out
    }

    fn set_price(
        &mut self,
        model: &str,
        price: &Price,
        table: &PriceTable,
    ) -> Result<u64, StoreError> {
        guarded(self, |b| b.try_set_price(model, price, table))
    }

    fn delete_before(&mut self, cutoff_ms: i64, limit: usize) -> Result<usize, StoreError> {
        guarded(self, |b| b.try_delete_before(cutoff_ms, limit))
    }

    fn write_rejections(&mut self, rejections: &[Rejected]) -> Result<(), StoreError> {
        guarded(self, |b| b.try_write_rejections(rejections))
    }
}

fn escape_like(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_and_partition_names_round_trip() {
        // 2026-05-20T12:00:00Z
        let ts = 1_779_278_400_000;
        let m = month_of(ts);
        assert_eq!(partition_name(m), "queries_y2026m05");
        assert_eq!(partition_month("queries_y2026m05"), Some(m));
        assert!(month_start(m) <= ts && ts < month_start(m + 1));
        assert_eq!(month_start(m), 1_777_593_600_000);
        assert_eq!(partition_name(month_of(0) - 1), "queries_y1969m12");
        assert_eq!(partition_month("queries_y1969m12"), Some(month_of(0) - 1));
        assert_eq!(partition_month("queries_other"), None);
        assert_eq!(partition_month("queries_y2026m13"), None);
        // December rolls over into January of the next year.
        let dec = partition_month("queries_y2025m12").unwrap();
        assert_eq!(partition_name(dec + 1), "queries_y2026m01");
    }
}
