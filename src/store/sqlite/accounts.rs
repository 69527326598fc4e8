//! Users' keys (digests only) and limits, on a connection of their own:
//! they are written by the API and read at start, never on the report path.

use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};

use super::i;
use crate::budget::{Limits, Period};
use crate::store::{Accounts, BatchInfo, KeyInfo, ProjectInfo, StoreError};

/// The `limits` row of the default limits (no user name is empty).
const DEFAULT_LIMITS_USER: &str = "";

/// Keys and limits over one connection.
pub struct SqliteAccounts {
    conn: Mutex<Connection>,
}

impl SqliteAccounts {
    pub(super) fn new(conn: Connection) -> SqliteAccounts {
        SqliteAccounts {
            conn: Mutex::new(conn),
        }
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        f(&self.conn.lock())
    }
}

fn key_info(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyInfo> {
    Ok(KeyInfo {
        id: r.get(0)?,
        user: r.get(1)?,
        created_ms: r.get(2)?,
        last_used_ms: r.get(3)?,
        revoked_ms: r.get(4)?,
        tags: r.get(5)?,
        project: r.get(6)?,
    })
}

impl Accounts for SqliteAccounts {
    fn create_batch(&self, b: &BatchInfo) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO batches (id, user, tags, upstream, endpoint, input_file_id, created, project) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
                params![b.id, b.user, b.tags, b.upstream, b.endpoint, b.input_file_id, b.created_ms, b.project],
            )?;
            Ok(())
        })
    }

    fn open_batches(&self) -> Result<Vec<BatchInfo>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT id, user, tags, upstream, endpoint, input_file_id, created, project FROM batches WHERE metered IS NULL ORDER BY created, id",
            )?;
            let rows = st.query_map([], |r| {
                Ok(BatchInfo {
                    id: r.get(0)?,
                    user: r.get(1)?,
                    tags: r.get(2)?,
                    upstream: r.get(3)?,
                    endpoint: r.get(4)?,
                    input_file_id: r.get(5)?,
                    created_ms: r.get(6)?,
                    project: r.get(7)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn claim_batch(&self, id: &str, state: &str, now_ms: i64) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE batches SET metered = ?3, state = ?2 WHERE id = ?1 AND metered IS NULL",
                params![id, state, now_ms],
            )?;
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
        self.with(|c| {
            let n = c.execute(
                "INSERT INTO alerts_sent (subject, period_start, kind, at) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                params![subject, period_start, kind, now_ms],
            )?;
            Ok(n == 1)
        })
    }

    fn create_key(&self, info: &KeyInfo, digest: &[u8; 32]) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO api_keys (id, user, digest, created, tags, project) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![info.id, info.user, &digest[..], info.created_ms, info.tags, info.project],
            )?;
            Ok(())
        })
    }

    fn list_keys(&self, user: &str) -> Result<Vec<KeyInfo>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT id, user, created, last_used, revoked, tags, project FROM api_keys WHERE user = ?1 ORDER BY created, id",
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
                "SELECT id, user, created, last_used, revoked, tags, project, digest FROM api_keys WHERE revoked IS NULL",
            )?;
            let rows = st.query_map([], |r| {
                let d: Vec<u8> = r.get(7)?;
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

    fn save_project(&self, p: &ProjectInfo) -> Result<(), StoreError> {
        let members = serde_json::to_string(&p.members).map_err(|e| StoreError(e.to_string()))?;
        let l = p.limits.as_ref();
        self.with(|c| {
            c.execute(
                "INSERT INTO projects (name, members, budget, period, rpm, tpm, alert_webhook) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (name) DO UPDATE SET members = excluded.members, budget = excluded.budget, period = excluded.period, rpm = excluded.rpm, tpm = excluded.tpm, alert_webhook = excluded.alert_webhook",
                params![
                    p.name,
                    members,
                    l.and_then(|l| l.budget),
                    l.map(|l| l.period.as_str()),
                    l.and_then(|l| l.rpm.map(i)),
                    l.and_then(|l| l.tpm.map(i)),
                    p.alert_webhook
                ],
            )?;
            Ok(())
        })
    }

    fn delete_project(&self, name: &str) -> Result<bool, StoreError> {
        self.with(|c| Ok(c.execute("DELETE FROM projects WHERE name = ?1", [name])? == 1))
    }

    fn all_projects(&self) -> Result<Vec<ProjectInfo>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT name, members, budget, period, rpm, tpm, alert_webhook FROM projects ORDER BY name",
            )?;
            let rows = st.query_map([], |r| {
                let members: String = r.get(1)?;
                let period: Option<String> = r.get(3)?;
                let n = |v: Option<i64>| v.map(|v| v.max(0) as u64);
                Ok(ProjectInfo {
                    name: r.get(0)?,
                    // Written by tollgate; a row edited by hand into
                    // something unreadable has no members.
                    members: serde_json::from_str(&members).unwrap_or_default(),
                    limits: match period {
                        Some(p) => Some(Limits {
                            budget: r.get(2)?,
                            period: Period::parse(&p).unwrap_or_default(),
                            rpm: n(r.get(4)?),
                            tpm: n(r.get(5)?),
                        }),
                        None => None,
                    },
                    alert_webhook: r.get(6)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }
}
