//! The rows `tollgate migrate` carries from a SQLite database into
//! PostgreSQL, as neither backend stores them: [`super::sqlite`] reads them
//! (`export.rs`), [`super::postgres`] writes them (`import.rs`), and
//! [`super::migrate`] decides what goes. Rows the two schemas store alike
//! (keys, limits, prices) cross as their raw columns.

use serde::{Deserialize, Serialize};

use crate::pricing::Price;
use crate::store::rollup::Daily;

/// One record of the source, enough to know the source again: a later run
/// finds the same row under the same id in the same file, and not in another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    /// The record's id in the source.
    pub id: i64,
    /// Its start, ms since the epoch.
    pub ts: i64,
    /// Its user.
    pub user: String,
    /// Its duration, microseconds (differs between records of one moment).
    pub duration_us: i64,
}

/// How far the copy of one source went, stored in the target with each
/// step, so a run that stopped half-way, or a run after new records came,
/// goes on from there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Records with ids up to this one are copied.
    pub records_through: i64,
    /// The daily rollups already hold the records with ids up to this one
    /// (the first run copies the source's rollups whole, which also hold
    /// the records retention deleted).
    pub rollups_through: i64,
    /// Rejections with ids up to this one are copied.
    pub rejections_through: i64,
    /// The source's record at `rollups_through` (`None` while it had none).
    pub anchor: Option<Anchor>,
}

/// One daily rollup row of the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollupRow {
    /// UTC day (ms since the epoch / 86,400,000).
    pub day: i64,
    /// User.
    pub user: String,
    /// Model.
    pub model: String,
    /// Its sums.
    pub sums: Daily,
}

/// One refused request of the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectionRow {
    /// Its id in the source.
    pub id: i64,
    /// When, ms since the epoch.
    pub ts: i64,
    /// Who.
    pub user: String,
    /// Requested model.
    pub model: String,
    /// Why (`budget_exceeded`, `rate_limit_exceeded`).
    pub reason: String,
}

/// One stored key: its digest, never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    /// Key id.
    pub id: String,
    /// Owner.
    pub user: String,
    /// SHA-256 of the key.
    pub digest: Vec<u8>,
    /// Creation, ms since the epoch.
    pub created: i64,
    /// Last use, ms since the epoch.
    pub last_used: Option<i64>,
    /// Revocation, ms since the epoch.
    pub revoked: Option<i64>,
    /// Default tags (canonical).
    pub tags: String,
    /// The project it is bound to.
    pub project: Option<String>,
}

/// One stored project: members (a JSON array) and its limits (`period`
/// `None`: no limits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectRow {
    /// Name.
    pub name: String,
    /// Members, as stored (a JSON array of user names).
    pub members: String,
    /// Pico-dollars per period.
    pub budget: Option<i64>,
    /// `day`, `week`, `month`, `total`; `None` without limits.
    pub period: Option<String>,
    /// Requests per minute.
    pub rpm: Option<i64>,
    /// Tokens per minute.
    pub tpm: Option<i64>,
    /// Its alert webhook.
    pub alert_webhook: Option<String>,
}

/// One stored limit row (user `""` holds the default limits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitRow {
    /// User, `""` for the default.
    pub user: String,
    /// Pico-dollars per period.
    pub budget: Option<i64>,
    /// `day`, `week`, `month`.
    pub period: String,
    /// Requests per minute.
    pub rpm: Option<i64>,
    /// Tokens per minute.
    pub tpm: Option<i64>,
}

/// The source's state besides records: prices (every row, with its
/// validity history), keys, limits and a few settings of its own.
#[derive(Debug, Clone, Default)]
pub struct SharedRows {
    /// Every price row.
    pub prices: Vec<(String, Price)>,
    /// Every key, revoked ones included.
    pub keys: Vec<KeyRow>,
    /// Every limit row.
    pub limits: Vec<LimitRow>,
    /// Every project.
    pub projects: Vec<ProjectRow>,
    /// The latest upstream rate limits (JSON), if stored.
    pub ratelimits: Option<String>,
    /// Whether the built-in price list was loaded once (so the target's
    /// instances do not load it over the copied prices).
    pub default_prices_loaded: bool,
}

/// What a run wrote into the target, for its report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SharedCopied {
    /// Price rows added.
    pub prices: u64,
    /// Price rows the target had already (the target's kept).
    pub prices_there: u64,
    /// Of those, rows whose values differ from the source's.
    pub prices_differ: u64,
    /// Keys added.
    pub keys: u64,
    /// Keys the target had already.
    pub keys_there: u64,
    /// Keys revoked in the source that the target had active: now revoked.
    pub keys_revoked: u64,
    /// Limit rows added.
    pub limits: u64,
    /// Limit rows the target had already (the target's kept).
    pub limits_there: u64,
    /// Projects added.
    pub projects: u64,
    /// Projects the target had already (the target's kept).
    pub projects_there: u64,
    /// Whether the rate limits were copied (the target had none).
    pub ratelimits: bool,
}
