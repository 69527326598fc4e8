//! Users' keys (digests only) and limits, over the shared pool: written by
//! the API and read at start, never on the request path.

use std::sync::Arc;

use super::{i, wait, Pool};
use crate::budget::{Limits, Period};
use crate::store::{Accounts, BatchInfo, KeyInfo, ProjectInfo, StoreError};

/// The `limits` row of the default limits (no user name is empty).
const DEFAULT_LIMITS_USER: &str = "";

/// Keys and limits over the pool.
pub struct PgAccounts {
    pool: Arc<Pool>,
}

impl PgAccounts {
    pub(super) fn new(pool: Arc<Pool>) -> PgAccounts {
        PgAccounts { pool }
    }
}

fn key_info(r: &tokio_postgres::Row) -> Result<KeyInfo, tokio_postgres::Error> {
    Ok(KeyInfo {
        id: r.try_get(0)?,
        user: r.try_get(1)?,
        created_ms: r.try_get(2)?,
        last_used_ms: r.try_get(3)?,
        revoked_ms: r.try_get(4)?,
        tags: r.try_get(5)?,
        project: r.try_get(6)?,
    })
}

impl Accounts for PgAccounts {
    fn create_batch(&self, b: &BatchInfo) -> Result<(), StoreError> {
        self.pool.with(|c| {
            wait(c.client.execute(
                "INSERT INTO batches (id, username, tags, upstream, endpoint, input_file_id, created, project) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
                &[&b.id, &b.user, &b.tags, &b.upstream, &b.endpoint, &b.input_file_id, &b.created_ms, &b.project],
            ))?;
            Ok(())
        })
    }

    fn open_batches(&self) -> Result<Vec<BatchInfo>, StoreError> {
        self.pool.with(|c| {
            let rows = wait(c.client.query(
                "SELECT id, username, tags, upstream, endpoint, input_file_id, created, project FROM batches WHERE metered IS NULL ORDER BY created, id",
                &[],
            ))?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                out.push(BatchInfo {
                    id: r.try_get(0)?,
                    user: r.try_get(1)?,
                    tags: r.try_get(2)?,
                    upstream: r.try_get(3)?,
                    endpoint: r.try_get(4)?,
                    input_file_id: r.try_get(5)?,
                    created_ms: r.try_get(6)?,
                    project: r.try_get(7)?,
                });
            }
            Ok(out)
        })
    }

    fn claim_batch(&self, id: &str, state: &str, now_ms: i64) -> Result<bool, StoreError> {
        self.pool.with(|c| {
            let n = wait(c.client.execute(
                "UPDATE batches SET metered = $3, state = $2 WHERE id = $1 AND metered IS NULL",
                &[&id, &state, &now_ms],
            ))?;
            Ok(n == 1)
        })
    }

    fn claim_alert(
        &self,
        subject: &str,
        period_start: i64,
        kind: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        self.pool.with(|c| {
            let n = wait(c.client.execute(
                "INSERT INTO alerts_sent (subject, period_start, kind, at) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                &[&subject, &period_start, &kind, &now_ms],
            ))?;
            Ok(n == 1)
        })
    }

    fn create_key(&self, info: &KeyInfo, digest: &[u8; 32]) -> Result<(), StoreError> {
        self.pool.with(|c| {
            wait(c.client.execute(
                "INSERT INTO api_keys (id, username, digest, created, tags, project) VALUES ($1, $2, $3, $4, $5, $6)",
                &[&info.id, &info.user, &&digest[..], &info.created_ms, &info.tags, &info.project],
            ))?;
            Ok(())
        })
    }

    fn list_keys(&self, user: &str) -> Result<Vec<KeyInfo>, StoreError> {
        self.pool.with(|c| {
            let rows = wait(c.client.query(
                "SELECT id, username, created, last_used, revoked, tags, project FROM api_keys WHERE username = $1 ORDER BY created, id",
                &[&user],
            ))?;
            Ok(rows.iter().map(key_info).collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn revoke_key(&self, id: &str, now_ms: i64) -> Result<Option<String>, StoreError> {
        self.pool.with(|c| {
            let row = wait(c.client.query_opt(
                "UPDATE api_keys SET revoked = $2 WHERE id = $1 AND revoked IS NULL RETURNING username",
                &[&id, &now_ms],
            ))?;
            Ok(row.map(|r| r.try_get(0)).transpose()?)
        })
    }

    fn active_keys(&self) -> Result<Vec<(KeyInfo, [u8; 32])>, StoreError> {
        self.pool.with(|c| {
            let rows = wait(c.client.query(
                "SELECT id, username, created, last_used, revoked, tags, project, digest FROM api_keys WHERE revoked IS NULL",
                &[],
            ))?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                let d: Vec<u8> = r.try_get(7)?;
                let mut digest = [0u8; 32];
                if d.len() == 32 {
                    digest.copy_from_slice(&d);
                }
                out.push((key_info(r)?, digest));
            }
            Ok(out)
        })
    }

    fn save_limits(&self, user: Option<&str>, l: Option<&Limits>) -> Result<(), StoreError> {
        let user = user.unwrap_or(DEFAULT_LIMITS_USER);
        self.pool.with(|c| {
            match l {
                Some(l) => wait(c.client.execute(
                    "INSERT INTO limits (username, budget, period, rpm, tpm) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (username) DO UPDATE SET budget = excluded.budget, period = excluded.period, rpm = excluded.rpm, tpm = excluded.tpm",
                    &[&user, &l.budget, &l.period.as_str(), &l.rpm.map(i), &l.tpm.map(i)],
                ))?,
                None => wait(c.client.execute("DELETE FROM limits WHERE username = $1", &[&user]))?,
            };
            Ok(())
        })
    }

    fn all_limits(&self) -> Result<Vec<(Option<String>, Limits)>, StoreError> {
        self.pool.with(|c| {
            let rows = wait(
                c.client
                    .query("SELECT username, budget, period, rpm, tpm FROM limits", &[]),
            )?;
            let n = |v: Option<i64>| v.map(|v| v.max(0) as u64);
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                let user: String = r.try_get(0)?;
                let period: String = r.try_get(2)?;
                out.push((
                    (user != DEFAULT_LIMITS_USER).then_some(user),
                    Limits {
                        budget: r.try_get(1)?,
                        period: Period::parse(&period).unwrap_or_default(),
                        rpm: n(r.try_get(3)?),
                        tpm: n(r.try_get(4)?),
                    },
                ));
            }
            Ok(out)
        })
    }

    fn save_project(&self, p: &ProjectInfo) -> Result<(), StoreError> {
        let members = serde_json::to_string(&p.members).map_err(|e| StoreError(e.to_string()))?;
        let l = p.limits.as_ref();
        let (budget, period) = (l.and_then(|l| l.budget), l.map(|l| l.period.as_str()));
        let (rpm, tpm) = (l.and_then(|l| l.rpm.map(i)), l.and_then(|l| l.tpm.map(i)));
        self.pool.with(|c| {
            wait(c.client.execute(
                "INSERT INTO projects (name, members, budget, period, rpm, tpm, alert_webhook) VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (name) DO UPDATE SET members = excluded.members, budget = excluded.budget, period = excluded.period, rpm = excluded.rpm, tpm = excluded.tpm, alert_webhook = excluded.alert_webhook",
                &[&p.name, &members, &budget, &period, &rpm, &tpm, &p.alert_webhook],
            ))?;
            Ok(())
        })
    }

    fn delete_project(&self, name: &str) -> Result<bool, StoreError> {
        self.pool.with(|c| {
            Ok(wait(
                c.client
                    .execute("DELETE FROM projects WHERE name = $1", &[&name]),
            )? == 1)
        })
    }

    fn all_projects(&self) -> Result<Vec<ProjectInfo>, StoreError> {
        self.pool.with(|c| {
            let rows = wait(c.client.query(
                "SELECT name, members, budget, period, rpm, tpm, alert_webhook FROM projects ORDER BY name",
                &[],
            ))?;
            let n = |v: Option<i64>| v.map(|v| v.max(0) as u64);
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                let members: String = r.try_get(1)?;
                let period: Option<String> = r.try_get(3)?;
                out.push(ProjectInfo {
                    name: r.try_get(0)?,
                    // Written by tollgate; a row edited by hand into
                    // something unreadable has no members.
                    members: serde_json::from_str(&members).unwrap_or_default(),
                    limits: match period {
                        Some(p) => Some(Limits {
                            budget: r.try_get(2)?,
                            period: Period::parse(&p).unwrap_or_default(),
                            rpm: n(r.try_get(4)?),
                            tpm: n(r.try_get(5)?),
                        }),
                        None => None,
                    },
                    alert_webhook: r.try_get(6)?,
                });
            }
            Ok(out)
        })
    }
}
