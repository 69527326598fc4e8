//! What a storage backend implements, and the values that cross the
//! boundary: [`Backend`] (the writer thread's side: records, prices,
//! retention, rejections), [`Reports`] (reads for the API and start-up) and
//! [`Accounts`] (users' keys and limits). Nothing here knows a database:
//! SQLite is one implementation ([`super::sqlite`]), PostgreSQL can be another.

use crate::budget::Limits;
use crate::pricing::{Price, PriceTable};
use crate::ratelimit::RateLimits;
use crate::record::{Priced, Rejected, StoredRecord};

/// A storage failure.
#[derive(Debug)]
pub struct StoreError(pub String);

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreError {}

/// The write side, owned by the writer thread.
pub trait Backend: Send + 'static {
    /// Writes a batch (and the latest rate limits, if any) in one transaction.
    fn write(
        &mut self,
        batch: &[Priced],
        ratelimits: Option<&RateLimits>,
    ) -> Result<(), StoreError>;
    /// Stores a price row and re-prices the records it now covers with `table`
    /// (which already holds the row). Returns how many records changed cost.
    fn set_price(
        &mut self,
        model: &str,
        price: &Price,
        table: &PriceTable,
    ) -> Result<u64, StoreError>;
    /// Deletes at most `limit` records that started before `cutoff_ms`
    /// (rollups stay); returns how many went.
    fn delete_before(&mut self, cutoff_ms: i64, limit: usize) -> Result<usize, StoreError>;
    /// Counts requests refused before upstream.
    fn write_rejections(&mut self, rejections: &[Rejected]) -> Result<(), StoreError>;
}

/// A user key as listed (never the key itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// Key id.
    pub id: String,
    /// Owner.
    pub user: String,
    /// Creation, ms since the epoch.
    pub created_ms: i64,
    /// Last use, ms since the epoch.
    pub last_used_ms: Option<i64>,
    /// Revocation, ms since the epoch.
    pub revoked_ms: Option<i64>,
    /// Default tags of its requests, canonical (see [`crate::tags`]).
    pub tags: String,
    /// The project its requests are charged to.
    pub project: Option<String>,
}

/// A stored project: its members and its own limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectInfo {
    /// Name (see [`crate::projects::check_name`]).
    pub name: String,
    /// Member user names, sorted, each once.
    pub members: Vec<String>,
    /// The project's limits, if any.
    pub limits: Option<Limits>,
    /// Where its budget alerts go instead of `--alert-webhook`.
    pub alert_webhook: Option<String>,
}

/// Users' keys and limits.
pub trait Accounts: Send + Sync + 'static {
    /// Stores a new key's digest.
    fn create_key(&self, info: &KeyInfo, digest: &[u8; 32]) -> Result<(), StoreError>;
    /// A user's keys, oldest first.
    fn list_keys(&self, user: &str) -> Result<Vec<KeyInfo>, StoreError>;
    /// Revokes a key; its owner, or `None` if no such active key.
    fn revoke_key(&self, id: &str, now_ms: i64) -> Result<Option<String>, StoreError>;
    /// Every active key with its digest.
    fn active_keys(&self) -> Result<Vec<(KeyInfo, [u8; 32])>, StoreError>;
    /// Sets or (with `None`) removes a user's limits; user `None` is the default.
    fn save_limits(&self, user: Option<&str>, l: Option<&Limits>) -> Result<(), StoreError>;
    /// Every stored limit; user `None` is the default.
    fn all_limits(&self) -> Result<Vec<(Option<String>, Limits)>, StoreError>;
    /// Creates or replaces a project (members and limits).
    fn save_project(&self, p: &ProjectInfo) -> Result<(), StoreError>;
    /// Deletes a project; whether it existed.
    fn delete_project(&self, name: &str) -> Result<bool, StoreError>;
    /// Every project, by name.
    fn all_projects(&self) -> Result<Vec<ProjectInfo>, StoreError>;
    /// Notes that the alert `kind` of `subject` for the period starting at
    /// `period_start` goes out; false when it already went (from this
    /// instance or another).
    fn claim_alert(
        &self,
        subject: &str,
        period_start: i64,
        kind: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError>;
    /// Stores a batch created through tollgate (a second store of the
    /// same id changes nothing).
    fn create_batch(&self, b: &BatchInfo) -> Result<(), StoreError>;
    /// The batches not metered yet, oldest first.
    fn open_batches(&self) -> Result<Vec<BatchInfo>, StoreError>;
    /// Marks batch `id` metered in its terminal `state`; false when it
    /// already was (by this instance or another): its records are written
    /// only by whoever gets true.
    fn claim_batch(&self, id: &str, state: &str, now_ms: i64) -> Result<bool, StoreError>;
}

/// A Batch API job created through tollgate, followed until it is metered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchInfo {
    /// Upstream's batch id.
    pub id: String,
    /// The user who created it, charged for its lines.
    pub user: String,
    /// The creating request's tags, canonical.
    pub tags: String,
    /// The creating request's project, charged for its lines too.
    pub project: Option<String>,
    /// The upstream it was created on (followed there with its key).
    pub upstream: String,
    /// The endpoint its lines call (`/v1/chat/completions`, ...).
    pub endpoint: String,
    /// Its input file.
    pub input_file_id: String,
    /// When it was created, ms since the epoch.
    pub created_ms: i64,
}

/// Filters of `/usage` and `/queries`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this user.
    pub user: Option<String>,
    /// Only this model (answered, or requested when none was answered).
    pub model: Option<String>,
    /// Start strictly after, ms since the epoch.
    pub after: Option<i64>,
    /// Start strictly before, ms since the epoch.
    pub before: Option<i64>,
    /// At most this many rows (`/queries`).
    pub limit: Option<u64>,
    /// Skip this many rows (`/queries`).
    pub offset: u64,
    /// Only statuses in this inclusive range (`/queries`; the rollups have
    /// no status, so `/usage` never sets it).
    pub status: Option<(u16, u16)>,
    /// Only estimated (`true`) or only reported (`false`) usage (`/queries`).
    pub estimated: Option<bool>,
    /// Newest first (`/queries`); oldest first otherwise.
    pub newest_first: bool,
    /// Only records carrying this tag (`tag=key` or `tag=key=value`).
    pub tag: Option<crate::tags::TagFilter>,
    /// The tag key [`GroupKey::Tag`] groups by (`group_by=tag:<key>`).
    pub group_tag: Option<String>,
}

/// Totals of `/usage`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageTotals {
    /// Matching records.
    pub queries: u64,
    /// Sum of prompt tokens.
    pub query_tokens: u64,
    /// Sum of completion tokens.
    pub answer_tokens: u64,
    /// Sum of cached prompt tokens.
    pub cached_tokens: u64,
    /// Sum of reasoning tokens.
    pub reasoning_tokens: u64,
    /// Sum of cost, pico-dollars.
    pub cost: i128,
    /// Records with no price.
    pub unpriced: u64,
    /// Requests refused before upstream (budgets, limits).
    pub rejected: u64,
}

/// What `/usage` can group by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GroupKey {
    /// Per user.
    User,
    /// Per model.
    Model,
    /// Per UTC day.
    Day,
    /// Per UTC month.
    Month,
    /// Per service tier. Tiers are not in the daily rollups: grouped by
    /// tier, totals are summed from the records (those retention kept).
    Tier,
    /// Per value of the tag key [`Filter::group_tag`] (records without it
    /// apart, under no value).
    Tag,
    /// Per upstream that served (summed from the per-query records: the
    /// daily rollups do not keep it).
    Upstream,
}

/// The values of the group keys of one `/usage` row (`None` where not grouped).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct GroupValues {
    /// User.
    pub user: Option<String>,
    /// Model.
    pub model: Option<String>,
    /// `YYYY-MM-DD`.
    pub day: Option<String>,
    /// `YYYY-MM`.
    pub month: Option<String>,
    /// Service tier (`None` also for records without one).
    pub tier: Option<String>,
    /// The value of the grouped tag key (`""` for a bare word); `None`
    /// where not grouped or for records without the key.
    pub tag: Option<String>,
    /// Upstream name.
    pub upstream: Option<String>,
}

impl GroupValues {
    /// Sets the value of one group key.
    pub fn set(&mut self, key: GroupKey, v: Option<String>) {
        match key {
            GroupKey::User => self.user = v,
            GroupKey::Model => self.model = v,
            GroupKey::Day => self.day = v,
            GroupKey::Month => self.month = v,
            GroupKey::Tier => self.tier = v,
            GroupKey::Tag => self.tag = v,
            GroupKey::Upstream => self.upstream = v,
        }
    }
}

/// The read side, shared by API handlers (called on blocking threads).
pub trait Reports: Send + Sync + 'static {
    /// Totals over the filter, one row per combination of the group keys
    /// (a single row without keys), sorted by key.
    fn usage(
        &self,
        f: &Filter,
        group: &[GroupKey],
    ) -> Result<Vec<(GroupValues, UsageTotals)>, StoreError>;
    /// Records over the filter, oldest first, handed one by one to `sink`
    /// until it returns false.
    fn queries(
        &self,
        f: &Filter,
        sink: &mut dyn FnMut(StoredRecord) -> bool,
    ) -> Result<(), StoreError>;
    /// Every price row.
    fn prices(&self) -> Result<PriceTable, StoreError>;
    /// The last stored rate limits.
    fn ratelimits(&self) -> Result<Option<RateLimits>, StoreError>;
    /// Versions of the state other instances may change (prices, keys,
    /// limits, the latest upstream rate limits); `None` where no other instance can (SQLite's single writer).
    fn state_versions(&self) -> Result<Option<StateVersions>, StoreError> {
        Ok(None)
    }
}

/// Versions of the shared state: one that moved means that kind changed in
/// the database since it was read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateVersions {
    /// Price rows.
    pub prices: i64,
    /// Keys created or revoked.
    pub keys: i64,
    /// Limits set or removed.
    pub limits: i64,
    /// The latest upstream rate limits, stored with a batch.
    pub ratelimits: i64,
}
