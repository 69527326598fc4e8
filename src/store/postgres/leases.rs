//! Budget leases in the database (`budget_leases`, schema step 5; rate
//! leases `rate_leases`, step 8), over a connection of their own used only
//! by the lease thread: a grant is one call of `tollgate_lease_take` (or
//! `tollgate_rate_take`), a give-back and a renewal one statement each. The writer subtracts written records from this instance's leases
//! in its batch transaction (`write.rs`).

use parking_lot::Mutex;
use tokio_postgres::Client;

use super::{connect, wait};
use crate::budget::{lease, LeaseSource, RateAsk, Taken};
use crate::config::PgUrl;
use crate::store::StoreError;

/// A lease call that waits longer fails: the request waiting on it gets its
/// answer (503) rather than hanging on a stuck database.
const LEASE_SETTINGS: &str = "SET lock_timeout = '2s'; SET statement_timeout = '3s'";

/// What a project's lease rows are keyed by: this prefix and the project's
/// name. A control character, so no user name (visible text) can collide.
pub const PROJECT_PREFIX: &str = "\u{1f}project:";

/// Leases of one instance: of users' budgets and rates, or (with
/// [`PgLeases::for_projects`]) of projects'.
pub struct PgLeases {
    url: PgUrl,
    instance: String,
    /// Put before every name in the lease tables ("" for users).
    prefix: &'static str,
    client: Mutex<Option<Client>>,
}

impl PgLeases {
    pub(super) fn new(url: PgUrl, instance: String) -> PgLeases {
        PgLeases {
            url,
            instance,
            prefix: "",
            client: Mutex::new(None),
        }
    }

    /// The same instance's leases of project budgets and rates (same
    /// tables, rows keyed by [`PROJECT_PREFIX`] and the project).
    pub fn for_projects(&self) -> PgLeases {
        PgLeases {
            url: self.url.clone(),
            instance: self.instance.clone(),
            prefix: PROJECT_PREFIX,
            client: Mutex::new(None),
        }
    }

    /// The row key of `name`.
    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The name a row key stands for in this lease kind, if it is one.
    fn name_of<'a>(&self, key: &'a str) -> Option<&'a str> {
        if self.prefix.is_empty() {
            (!key.starts_with(PROJECT_PREFIX)).then_some(key)
        } else {
            key.strip_prefix(self.prefix)
        }
    }

    /// Runs `f` on the connection, reopened if it was lost.
    fn with<T>(
        &self,
        f: impl FnOnce(&Client) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, String> {
        let mut c = self.client.lock();
        if c.as_ref().is_none_or(Client::is_closed) {
            *c = None;
            let client = connect(&self.url).map_err(|e| e.0)?;
            wait(client.batch_execute(LEASE_SETTINGS)).map_err(|e| StoreError::from(e).0)?;
            *c = Some(client);
        }
        let client = c.as_ref().expect("connected just now");
        f(client).map_err(|e| StoreError::from(e).0)
    }
}

fn ttl_ms() -> i64 {
    i64::try_from(lease::LEASE_TTL.as_millis()).unwrap_or(i64::MAX)
}

impl LeaseSource for PgLeases {
    fn take(&self, user: &str, period_start: i64, limit: i64, need: i64) -> Result<Taken, String> {
        let user = &self.key(user);
        self.with(|c| {
            let row = wait(c.query_one(
                "SELECT granted, reset FROM tollgate_lease_take($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &user,
                    &self.instance,
                    &period_start,
                    &limit,
                    &need,
                    &lease::SHARE_DIV,
                    &ttl_ms(),
                ],
            ))?;
            Ok(Taken {
                granted: row.try_get(0)?,
                reset: row.try_get(1)?,
            })
        })
    }

    fn give_back(&self, user: &str, period_start: i64, amount: i64) -> Result<(), String> {
        let user = &self.key(user);
        self.with(|c| {
            wait(c.execute(
                "UPDATE budget_leases SET amount = amount - $4
                 WHERE username = $1 AND instance = $2 AND period_start = $3 AND expires_at > now()",
                &[&user, &self.instance, &period_start, &amount],
            ))?;
            Ok(())
        })
    }

    fn take_rate(&self, user: &str, ask: RateAsk) -> Result<(u64, u64), String> {
        let limit = |l: Option<u64>| l.map(|v| i64::try_from(v).unwrap_or(i64::MAX));
        let need = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let user = &self.key(user);
        self.with(|c| {
            let row = wait(c.query_one(
                "SELECT requests, tokens FROM tollgate_rate_take($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &user,
                    &self.instance,
                    &ask.minute,
                    &limit(ask.rpm),
                    &limit(ask.tpm),
                    &need(ask.requests),
                    &need(ask.tokens),
                    &lease::SHARE_DIV,
                ],
            ))?;
            let part = |v: i64| u64::try_from(v).unwrap_or(0);
            Ok((part(row.try_get(0)?), part(row.try_get(1)?)))
        })
    }

    fn give_back_rate(
        &self,
        user: &str,
        minute: i64,
        requests: u64,
        tokens: u64,
    ) -> Result<(), String> {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let user = &self.key(user);
        self.with(|c| {
            wait(c.execute(
                "UPDATE rate_leases SET requests = requests - $4, tokens = tokens - $5
                 WHERE username = $1 AND instance = $2 AND minute = $3",
                &[&user, &self.instance, &minute, &n(requests), &n(tokens)],
            ))?;
            Ok(())
        })
    }

    fn release_all(&self) -> Result<(), String> {
        self.with(|c| {
            wait(c.execute(
                "DELETE FROM budget_leases WHERE instance = $1",
                &[&self.instance],
            ))?;
            Ok(())
        })
    }

    fn renew(&self) -> Result<Vec<(String, i64)>, String> {
        self.with(|c| {
            let rows = wait(c.query(
                "UPDATE budget_leases SET expires_at = now() + make_interval(secs => $2::bigint / 1000.0)
                 WHERE instance = $1 AND expires_at > now() RETURNING username, period_start",
                &[&self.instance, &ttl_ms()],
            ))?;
            // Lapsed leases of any instance, long past mattering. Rate
            // slices are kept to the end of their minute: what they admitted
            // counts until then (also after a stop).
            wait(c.execute(
                "DELETE FROM budget_leases WHERE expires_at < now() - interval '10 minutes'",
                &[],
            ))?;
            let minute = crate::timestamp::now_ms().div_euclid(60_000);
            wait(c.execute(
                "DELETE FROM rate_leases WHERE minute < $1",
                &[&(minute - 1)],
            ))?;
            let mut out = Vec::new();
            for r in &rows {
                // Renewed for both kinds; reported for this one.
                if let Some(name) = self.name_of(r.try_get(0)?) {
                    out.push((name.to_owned(), r.try_get(1)?));
                }
            }
            Ok(out)
        })
    }
}
