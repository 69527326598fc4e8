//! SQLite storage (bundled, WAL): one write connection owned by the writer
//! thread ([`SqliteBackend`]), a small pool of read connections for the
//! reports ([`SqliteReports`]), and one connection for users' keys and limits
//! ([`SqliteAccounts`]). The schema is versioned (`schema.rs`).

mod accounts;
mod reports;
mod schema;
mod write;

pub use accounts::SqliteAccounts;
pub use reports::SqliteReports;
pub(crate) use reports::{plan, Piece};
pub use write::SqliteBackend;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::pricing;
use crate::store::StoreError;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(e.to_string())
    }
}

/// Milliseconds in a day.
const DAY: i64 = 86_400_000;

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
) -> Result<(SqliteBackend, Arc<SqliteReports>, Arc<SqliteAccounts>), StoreError> {
    let mut c = connect(path)?;
    schema::migrate(&mut c)?;
    if default_prices {
        load_default_prices(&mut c)?;
    }
    let reports = Arc::new(SqliteReports::new(path));
    let accounts = Arc::new(SqliteAccounts::new(connect(path)?));
    Ok((SqliteBackend::new(c), reports, accounts))
}

/// Loads the built-in price list once in the database's life: prices
/// removed or changed later are not brought back by a restart.
fn load_default_prices(c: &mut Connection) -> Result<(), StoreError> {
    let tx = c.transaction()?;
    let loaded: Option<String> = tx
        .query_row(
            "SELECT value FROM meta WHERE key = 'default_prices_loaded'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if loaded.is_none() {
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
    Ok(())
}

/// A count as SQLite stores it, clamped to `i64::MAX`.
fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests;
