//! The target side of `tollgate migrate`: records copied by binary `COPY`
//! (the writer's own path) into their monthly partitions, daily rollups,
//! rejections, and prices, keys and limits. Each step commits together
//! with the source's progress row in `meta`, so a run that stops half-way
//! or runs again continues where the last one committed, never twice.

use std::collections::HashMap;

use super::schema::MIGRATION_LOCK;
use super::write::{
    copy_records, daily_columns, tag_columns, upsert_daily, upsert_tags, DailyColumns,
};
use super::{connect, schema, wait, PgBackend};
use crate::config::PgUrl;
use crate::pricing::Price;
use crate::record::Priced;
use crate::store::transfer::{Progress, RejectionRow, RollupRow, SharedCopied, SharedRows};
use crate::store::StoreError;

/// The advisory lock a migration into this database runs under: two runs
/// at once would both copy what neither had recorded yet.
const IMPORT_LOCK: i64 = MIGRATION_LOCK + 2;

/// The `meta` keys of the sources' progress rows start with this.
pub const PROGRESS_PREFIX: &str = "migrated_sqlite:";

/// A PostgreSQL database being filled by `tollgate migrate`.
pub struct PgTarget {
    backend: PgBackend,
}

/// Connects, brings the schema to this build's version, and takes the
/// import lock (held for the connection's life).
pub fn open_target(url: &PgUrl) -> Result<PgTarget, StoreError> {
    let mut c = connect(url)?;
    schema::migrate(&mut c)?;
    let locked: bool =
        wait(c.query_one("SELECT pg_try_advisory_lock($1)", &[&IMPORT_LOCK]))?.get(0);
    if !locked {
        return Err(StoreError(
            "another tollgate migrate is running into this database".into(),
        ));
    }
    Ok(PgTarget {
        backend: PgBackend::new(url.clone(), c)?,
    })
}

fn save(key: &str, p: &Progress) -> Result<String, StoreError> {
    debug_assert!(key.starts_with(PROGRESS_PREFIX));
    serde_json::to_string(p).map_err(|e| StoreError(e.to_string()))
}

const SAVE_PROGRESS: &str = "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value";

impl PgTarget {
    /// Every source copied into this database before, by `meta` key.
    pub fn sources(&mut self) -> Result<Vec<(String, Progress)>, StoreError> {
        let c = self.backend.client()?;
        let rows = wait(c.query(
            "SELECT key, value FROM meta WHERE key LIKE $1 ORDER BY key",
            &[&format!("{PROGRESS_PREFIX}%")],
        ))?;
        rows.iter()
            .map(|r| {
                let key: String = r.get(0);
                let value: String = r.get(1);
                let p = serde_json::from_str(&value)
                    .map_err(|e| StoreError(format!("meta {key}: {e}")))?;
                Ok((key, p))
            })
            .collect()
    }

    /// Adds a new source's daily rollups whole and records its progress
    /// row, in one transaction.
    pub fn start_source(
        &mut self,
        key: &str,
        p: &Progress,
        rollups: &[RollupRow],
    ) -> Result<(), StoreError> {
        let value = save(key, p)?;
        let daily = DailyColumns::from_rows(
            rollups
                .iter()
                .map(|r| (r.day, r.user.as_str(), r.model.as_str(), r.sums)),
        );
        let c = self.backend.client()?;
        wait(async {
            let tx = c.transaction().await?;
            let fresh = tx
                .execute(
                    "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
                    &[&key, &value],
                )
                .await?;
            if fresh == 1 {
                upsert_daily(&tx, &daily).await?;
            }
            tx.commit().await
        })?;
        Ok(())
    }

    /// Copies records (`ids` ascending, one per record) and the rollups of
    /// those above `p.rollups_through`, then moves the progress past them;
    /// one transaction.
    pub fn copy_records(
        &mut self,
        key: &str,
        p: &mut Progress,
        ids: &[i64],
        batch: &[Priced],
        anchor: Option<crate::store::transfer::Anchor>,
    ) -> Result<(), StoreError> {
        let Some(&last) = ids.last() else {
            return Ok(());
        };
        // Ids ascend, so the records the rollups lack are a suffix.
        let unrolled = &batch[ids.partition_point(|&id| id <= p.rollups_through)..];
        let mut next = p.clone();
        next.records_through = last;
        if last > next.rollups_through {
            next.rollups_through = last;
            next.anchor = anchor;
        }
        let value = save(key, &next)?;
        self.backend.ensure_partitions(batch)?;
        let daily = daily_columns(unrolled);
        // The tag rollups are not copied whole: they come from every
        // record copied (none of those retention deleted).
        let tagged = tag_columns(batch);
        let c = self.backend.client()?;
        wait(async {
            let tx = c.transaction().await?;
            copy_records(&tx, batch).await?;
            upsert_daily(&tx, &daily).await?;
            upsert_tags(&tx, &tagged).await?;
            tx.execute(SAVE_PROGRESS, &[&key, &value]).await?;
            tx.commit().await
        })?;
        *p = next;
        Ok(())
    }

    /// Copies rejections (ids ascending) and moves the progress past them.
    pub fn copy_rejections(
        &mut self,
        key: &str,
        p: &mut Progress,
        rows: &[RejectionRow],
    ) -> Result<(), StoreError> {
        let Some(last) = rows.last() else {
            return Ok(());
        };
        let mut next = p.clone();
        next.rejections_through = last.id;
        let value = save(key, &next)?;
        let ts: Vec<i64> = rows.iter().map(|r| r.ts).collect();
        let user: Vec<&str> = rows.iter().map(|r| r.user.as_str()).collect();
        let model: Vec<&str> = rows.iter().map(|r| r.model.as_str()).collect();
        let reason: Vec<&str> = rows.iter().map(|r| r.reason.as_str()).collect();
        let c = self.backend.client()?;
        wait(async {
            let tx = c.transaction().await?;
            tx.execute(
                "INSERT INTO rejections (ts, username, model, reason) SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[])",
                &[&ts, &user, &model, &reason],
            )
            .await?;
            tx.execute(SAVE_PROGRESS, &[&key, &value]).await?;
            tx.commit().await
        })?;
        *p = next;
        Ok(())
    }

    /// Adds the prices, keys, limits and projects the database lacks, in one
    /// transaction. Rows it has already are kept as they are (they may have
    /// been changed through an instance on it since), except that a key
    /// revoked in the source is revoked here too and a key's last use is
    /// the later of the two.
    pub fn copy_shared(&mut self, s: &SharedRows) -> Result<SharedCopied, StoreError> {
        let c = self.backend.client()?;
        wait(async {
            let mut out = SharedCopied::default();
            let tx = c.transaction().await?;
            let have: HashMap<(String, i64), Price> = tx
                .query(
                    "SELECT model, valid_from, query, cached, answer, flex_query, flex_cached, flex_answer,
                            priority_query, priority_cached, priority_answer, audio_query, audio_answer,
                            image_query, image_answer, unit
                     FROM prices",
                    &[],
                )
                .await?
                .iter()
                .map(|r| {
                    let p = Price {
                        valid_from: r.get(1),
                        query: r.get(2),
                        cached: r.get(3),
                        answer: r.get(4),
                        ..Price::default()
                    }
                    .with_extra_columns(std::array::from_fn(|i| r.get(5 + i)));
                    ((r.get(0), p.valid_from), p)
                })
                .collect();
            let insert_price = format!("{} ON CONFLICT DO NOTHING", super::write::INSERT_PRICE);
            for (model, p) in &s.prices {
                match have.get(&(model.clone(), p.valid_from)) {
                    Some(v) => {
                        out.prices_there += 1;
                        if v != p {
                            out.prices_differ += 1;
                        }
                    }
                    None => {
                        out.prices +=
                            super::write::store_price(&tx, &insert_price, model, p).await?;
                    }
                }
            }
            let keys: HashMap<String, Option<i64>> = tx
                .query("SELECT id, revoked FROM api_keys", &[])
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            for k in &s.keys {
                match keys.get(&k.id) {
                    None => {
                        out.keys += tx
                            .execute(
                                "INSERT INTO api_keys (id, username, digest, created, last_used, revoked, tags, project) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                                &[&k.id, &k.user, &k.digest, &k.created, &k.last_used, &k.revoked, &k.tags, &k.project],
                            )
                            .await?;
                    }
                    Some(revoked) => {
                        out.keys_there += 1;
                        // Uses through the source since the last run.
                        if let Some(t) = k.last_used {
                            tx.execute(
                                "UPDATE api_keys SET last_used = $2 WHERE id = $1 AND (last_used IS NULL OR last_used < $2)",
                                &[&k.id, &t],
                            )
                            .await?;
                        }
                        if revoked.is_none() && k.revoked.is_some() {
                            out.keys_revoked += tx
                                .execute(
                                    "UPDATE api_keys SET revoked = $2 WHERE id = $1 AND revoked IS NULL",
                                    &[&k.id, &k.revoked],
                                )
                                .await?;
                        }
                    }
                }
            }
            for l in &s.limits {
                let n = tx
                    .execute(
                        "INSERT INTO limits (username, budget, period, rpm, tpm) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (username) DO NOTHING",
                        &[&l.user, &l.budget, &l.period, &l.rpm, &l.tpm],
                    )
                    .await?;
                if n == 1 {
                    out.limits += 1;
                } else {
                    out.limits_there += 1;
                }
            }
            for p in &s.projects {
                let n = tx
                    .execute(
                        "INSERT INTO projects (name, members, budget, period, rpm, tpm, alert_webhook) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (name) DO NOTHING",
                        &[&p.name, &p.members, &p.budget, &p.period, &p.rpm, &p.tpm, &p.alert_webhook],
                    )
                    .await?;
                if n == 1 {
                    out.projects += 1;
                } else {
                    out.projects_there += 1;
                }
            }
            if let Some(rl) = &s.ratelimits {
                out.ratelimits = tx
                    .execute(
                        "INSERT INTO meta (key, value) VALUES ('ratelimits', $1) ON CONFLICT (key) DO NOTHING",
                        &[rl],
                    )
                    .await?
                    == 1;
            }
            if s.default_prices_loaded {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('default_prices_loaded', '1') ON CONFLICT (key) DO NOTHING",
                    &[],
                )
                .await?;
            }
            tx.commit().await?;
            Ok::<_, tokio_postgres::Error>(out)
        })
        .map_err(StoreError::from)
    }
}
