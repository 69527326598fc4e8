//! The SQLite schema as numbered migrations. Each step takes a database from
//! the version before it to its own; the version reached is kept in
//! `PRAGMA user_version`. A start applies only the steps past the stored
//! version, all in one transaction, and refuses a database newer than it
//! knows. Steps are never edited once released: a change is a new step.
//!
//! The steps are idempotent (`IF NOT EXISTS`, `IF EXISTS`): a database whose
//! version was lowered on purpose (the integration tests do, to rebuild the
//! rollups) replays them over what it already has.

use rusqlite::{Connection, TransactionBehavior};

use crate::store::StoreError;

/// One schema step.
pub(super) struct Migration {
    /// The version the database has after this step.
    pub(super) version: i64,
    /// What the step does, for the log.
    pub(super) what: &'static str,
    /// The statements, run as one batch.
    pub(super) sql: &'static str,
    /// `(table, column)` a step adds with `ALTER TABLE ... ADD COLUMN`,
    /// which has no `IF NOT EXISTS`: the step is skipped where the column
    /// is there already, so replaying it stays harmless.
    pub(super) adds_column: Option<(&'static str, &'static str)>,
}

/// Every step, in order; versions count up from 1 without gaps.
pub(super) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        what: "records, prices, meta",
        sql: SCHEMA_V1,
        adds_column: None,
    },
    Migration {
        version: 2,
        what: "daily rollups, filled from the records already there",
        sql: SCHEMA_V2,
        adds_column: None,
    },
    Migration {
        version: 3,
        what: "user keys, limits, rejections",
        sql: SCHEMA_V3,
        adds_column: None,
    },
    Migration {
        version: 4,
        what: "covering time index on records, no (user, ts) index",
        sql: SCHEMA_V4,
        adds_column: None,
    },
    Migration {
        version: 5,
        what: "records say whether the client left before the answer's end",
        sql: SCHEMA_V5,
        adds_column: Some(("queries", "client_aborted")),
    },
    Migration {
        version: 6,
        what: "records keep their service tier and audio tokens; prices get flex, priority and audio rates",
        sql: SCHEMA_V6,
        adds_column: Some(("queries", "service_tier")),
    },
    Migration {
        version: 7,
        what: "budget alerts sent, once per threshold and period",
        sql: SCHEMA_V7,
        adds_column: None,
    },
    Migration {
        version: 8,
        what: "request tags on records and keys, daily rollups per tag",
        sql: SCHEMA_V8,
        adds_column: Some(("queries", "tags")),
    },
    Migration {
        version: 9,
        what: "records name the upstream that served them",
        sql: SCHEMA_V9,
        adds_column: Some(("queries", "upstream")),
    },
    Migration {
        version: 10,
        what: "image tokens and per-unit counts on records, image and unit rates on prices",
        sql: SCHEMA_V10,
        adds_column: Some(("queries", "units")),
    },
    Migration {
        version: 11,
        what: "Batch API jobs followed until metered; records keep a batch line's custom_id",
        sql: SCHEMA_V11,
        adds_column: Some(("queries", "custom_id")),
    },
    Migration {
        version: 12,
        what: "projects (members and limits); records and keys name their project",
        sql: SCHEMA_V12,
        adds_column: Some(("queries", "project")),
    },
];

/// The version this build brings a database to.
pub(super) const LATEST: i64 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// Records (with a time index and a per-user one), prices and a key-value
/// table.
pub(super) const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS queries (
    id               INTEGER PRIMARY KEY,
    user             TEXT    NOT NULL,
    model            TEXT    NOT NULL,
    requested_model  TEXT    NOT NULL,
    endpoint         TEXT    NOT NULL,
    ts               INTEGER NOT NULL,
    duration_us      INTEGER NOT NULL,
    ttfb_us          INTEGER,
    status           INTEGER NOT NULL,
    stream           INTEGER NOT NULL,
    query_tokens     INTEGER NOT NULL,
    answer_tokens    INTEGER NOT NULL,
    cached_tokens    INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    cost             INTEGER NOT NULL,
    priced           INTEGER NOT NULL,
    estimated        INTEGER NOT NULL,
    request_id       TEXT
);
CREATE INDEX IF NOT EXISTS queries_ts ON queries (ts);
CREATE INDEX IF NOT EXISTS queries_user_ts ON queries (user, ts);
CREATE TABLE IF NOT EXISTS prices (
    model       TEXT    NOT NULL,
    valid_from  INTEGER NOT NULL,
    query       INTEGER NOT NULL,
    cached      INTEGER,
    answer      INTEGER NOT NULL,
    PRIMARY KEY (model, valid_from)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
";

/// Per-day totals kept by the writer in the same transaction as the records,
/// so reports over any span read a few rows per day instead of every record.
/// Retention deletes records, never these. Records written before the
/// rollups existed are summed into them once, here; the sums saturate at
/// `i64::MAX` (summed by 32-bit halves, which SQLite's `SUM` cannot overflow
/// on), so huge stored counts cannot stop a start with `integer overflow`.
const SCHEMA_V2: &str = "
CREATE TABLE IF NOT EXISTS usage_daily (
    day              INTEGER NOT NULL,
    user             TEXT    NOT NULL,
    model            TEXT    NOT NULL,
    queries          INTEGER NOT NULL,
    query_tokens     INTEGER NOT NULL,
    answer_tokens    INTEGER NOT NULL,
    cached_tokens    INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    cost             INTEGER NOT NULL,
    unpriced         INTEGER NOT NULL,
    PRIMARY KEY (day, user, model)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_daily_user ON usage_daily (user, day);
CREATE INDEX IF NOT EXISTS usage_daily_model ON usage_daily (model, day);
INSERT INTO usage_daily (day, user, model, queries, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, unpriced)
SELECT ts / 86400000, user, model, COUNT(*),
    MIN(SUM(MAX(CAST(query_tokens AS INTEGER), 0) >> 32) * 4294967296 + SUM(MAX(CAST(query_tokens AS INTEGER), 0) & 4294967295), 9223372036854775807),
    MIN(SUM(MAX(CAST(answer_tokens AS INTEGER), 0) >> 32) * 4294967296 + SUM(MAX(CAST(answer_tokens AS INTEGER), 0) & 4294967295), 9223372036854775807),
    MIN(SUM(MAX(CAST(cached_tokens AS INTEGER), 0) >> 32) * 4294967296 + SUM(MAX(CAST(cached_tokens AS INTEGER), 0) & 4294967295), 9223372036854775807),
    MIN(SUM(MAX(CAST(reasoning_tokens AS INTEGER), 0) >> 32) * 4294967296 + SUM(MAX(CAST(reasoning_tokens AS INTEGER), 0) & 4294967295), 9223372036854775807),
    MIN(SUM(MAX(CAST(cost AS INTEGER), 0) >> 32) * 4294967296 + SUM(MAX(CAST(cost AS INTEGER), 0) & 4294967295), 9223372036854775807),
    SUM(1 - priced)
FROM queries GROUP BY 1, 2, 3;
";

/// Users' keys (digests only), limits and refused requests.
const SCHEMA_V3: &str = "
CREATE TABLE IF NOT EXISTS api_keys (
    id         TEXT PRIMARY KEY,
    user       TEXT    NOT NULL,
    digest     BLOB    NOT NULL UNIQUE,
    created    INTEGER NOT NULL,
    last_used  INTEGER,
    revoked    INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS api_keys_user ON api_keys (user, created);
CREATE TABLE IF NOT EXISTS limits (
    user    TEXT PRIMARY KEY,
    budget  INTEGER,
    period  TEXT NOT NULL,
    rpm     INTEGER,
    tpm     INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rejections (
    id      INTEGER PRIMARY KEY,
    ts      INTEGER NOT NULL,
    user    TEXT    NOT NULL,
    model   TEXT    NOT NULL,
    reason  TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS rejections_ts ON rejections (ts);
CREATE INDEX IF NOT EXISTS rejections_user_ts ON rejections (user, ts);
";

/// The record indexes changed while the version stayed 3, so a version-3
/// database may have any of their generations; this step leaves every one
/// with the current pair.
const SCHEMA_V4: &str = "
-- Covering the report sums: the partial days at the edges of a /usage range
-- are summed from this index alone, without a table lookup per record.
-- Entries are appended in time order, so the wider index costs inserts little.
DROP INDEX IF EXISTS queries_ts;
CREATE INDEX IF NOT EXISTS queries_ts_sums ON queries (ts, user, model, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, priced);
-- No (user, ts) index: it made every insert about 4x dearer (random
-- string-keyed B-tree inserts), and per-user totals come from the rollups.
-- /queries?user= walks the ts index over its time range instead.
DROP INDEX IF EXISTS queries_user_ts;
";

/// Whether the client left before the whole answer reached it (0 for the
/// records written before).
const SCHEMA_V5: &str = "
ALTER TABLE queries ADD COLUMN client_aborted INTEGER NOT NULL DEFAULT 0;
";

/// The service tier of each record (NULL for the records written before
/// and for requests without one) and its audio tokens; per-tier and audio
/// rates beside the standard ones (NULL: the standard rates).
const SCHEMA_V6: &str = "
ALTER TABLE queries ADD COLUMN service_tier TEXT;
ALTER TABLE queries ADD COLUMN audio_query_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE queries ADD COLUMN audio_answer_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE prices ADD COLUMN flex_query INTEGER;
ALTER TABLE prices ADD COLUMN flex_cached INTEGER;
ALTER TABLE prices ADD COLUMN flex_answer INTEGER;
ALTER TABLE prices ADD COLUMN priority_query INTEGER;
ALTER TABLE prices ADD COLUMN priority_cached INTEGER;
ALTER TABLE prices ADD COLUMN priority_answer INTEGER;
ALTER TABLE prices ADD COLUMN audio_query INTEGER;
ALTER TABLE prices ADD COLUMN audio_answer INTEGER;
";

/// Which budget alerts went out: one row per subject, period and kind, so
/// a threshold is announced once however often it is checked or restarted.
const SCHEMA_V7: &str = "
CREATE TABLE IF NOT EXISTS alerts_sent (
    subject      TEXT    NOT NULL,
    period_start INTEGER NOT NULL,
    kind         TEXT    NOT NULL,
    at           INTEGER NOT NULL,
    PRIMARY KEY (subject, period_start, kind)
) WITHOUT ROWID;
";

/// Request tags (canonical, see `crate::tags`) on records and as keys'
/// defaults, and their daily rollups: one row per tag key, day, tag value,
/// user and model, written with the records (empty for those written before).
const SCHEMA_V8: &str = "
ALTER TABLE queries ADD COLUMN tags TEXT NOT NULL DEFAULT '';
ALTER TABLE api_keys ADD COLUMN tags TEXT NOT NULL DEFAULT '';
CREATE TABLE IF NOT EXISTS usage_daily_tags (
    tag_key          TEXT    NOT NULL,
    day              INTEGER NOT NULL,
    tag_value        TEXT    NOT NULL,
    user             TEXT    NOT NULL,
    model            TEXT    NOT NULL,
    queries          INTEGER NOT NULL,
    query_tokens     INTEGER NOT NULL,
    answer_tokens    INTEGER NOT NULL,
    cached_tokens    INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    cost             INTEGER NOT NULL,
    unpriced         INTEGER NOT NULL,
    PRIMARY KEY (tag_key, day, tag_value, user, model)
) WITHOUT ROWID;
";

/// The upstream that served a record (NULL for the records written before).
const SCHEMA_V9: &str = "
ALTER TABLE queries ADD COLUMN upstream TEXT;
";

/// Image tokens and what is priced per unit (images, tool calls, seconds,
/// characters; see `crate::pricing::Units`) on records, empty for those
/// written before; image token and unit rates on prices (NULL: none).
const SCHEMA_V10: &str = "
ALTER TABLE queries ADD COLUMN image_query_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE queries ADD COLUMN image_answer_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE queries ADD COLUMN units TEXT NOT NULL DEFAULT '';
ALTER TABLE prices ADD COLUMN image_query INTEGER;
ALTER TABLE prices ADD COLUMN image_answer INTEGER;
ALTER TABLE prices ADD COLUMN unit INTEGER;
";

/// Batch API jobs created through tollgate (`metered` NULL until their
/// lines are recorded), and the `custom_id` of a batch line's record.
const SCHEMA_V11: &str = "
CREATE TABLE IF NOT EXISTS batches (
    id            TEXT    PRIMARY KEY,
    user          TEXT    NOT NULL,
    tags          TEXT    NOT NULL DEFAULT '',
    upstream      TEXT    NOT NULL,
    endpoint      TEXT    NOT NULL,
    input_file_id TEXT    NOT NULL,
    created       INTEGER NOT NULL,
    state         TEXT,
    metered       INTEGER,
    project       TEXT
) WITHOUT ROWID;
ALTER TABLE queries ADD COLUMN custom_id TEXT;
";

/// Projects: members (a JSON array of user names), the project's own
/// limits (`period` NULL: none) and its alert webhook (NULL: the global one). Records and keys name their project (NULL:
/// none, and for those written before). A project's daily rollups are rows
/// of `usage_daily_tags` under the tag key `@project`, which no request tag
/// can have (see `crate::projects::ROLLUP_KEY`).
const SCHEMA_V12: &str = "
ALTER TABLE queries ADD COLUMN project TEXT;
ALTER TABLE api_keys ADD COLUMN project TEXT;
CREATE TABLE IF NOT EXISTS projects (
    name    TEXT PRIMARY KEY,
    members TEXT NOT NULL,
    budget  INTEGER,
    period  TEXT,
    rpm     INTEGER,
    tpm     INTEGER,
    alert_webhook TEXT
);
";

/// Whether `table` has `column`.
fn has_column(c: &Connection, table: &str, column: &str) -> Result<bool, StoreError> {
    let mut st = c.prepare(&format!("PRAGMA table_info({table})"))?;
    let names = st.query_map([], |r| r.get::<_, String>(1))?;
    for n in names {
        if n? == column {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Runs one step (skipping a column that is there already).
fn apply(c: &Connection, m: &Migration) -> Result<(), StoreError> {
    if let Some((table, column)) = m.adds_column {
        if has_column(c, table, column)? {
            return Ok(());
        }
    }
    c.execute_batch(m.sql)?;
    Ok(())
}

fn user_version(c: &Connection) -> Result<i64, StoreError> {
    Ok(c.pragma_query_value(None, "user_version", |r| r.get(0))?)
}

fn refuse_newer(version: i64) -> Result<(), StoreError> {
    if version > LATEST {
        return Err(StoreError(format!(
            "database schema version {version} is newer than this tollgate ({LATEST}); upgrade tollgate"
        )));
    }
    Ok(())
}

/// Brings the database to [`LATEST`]; returns the versions applied, none
/// when it was already there.
pub(super) fn migrate(c: &mut Connection) -> Result<Vec<i64>, StoreError> {
    let version = user_version(c)?;
    refuse_newer(version)?;
    if version == LATEST {
        return Ok(Vec::new());
    }
    // Taking the write lock first: two processes starting on the same file
    // must not both migrate, and the version is read again under the lock.
    let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version = user_version(&tx)?;
    refuse_newer(version)?;
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| m.version > version) {
        apply(&tx, m)?;
        applied.push(m.version);
    }
    tx.pragma_update(None, "user_version", LATEST)?;
    tx.commit()?;
    if version > 0 {
        for m in MIGRATIONS.iter().filter(|m| applied.contains(&m.version)) {
            tracing::info!(version = m.version, "database schema upgraded: {}", m.what);
        }
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every table and index as SQLite stores them, sorted.
    fn schema(c: &Connection) -> Vec<(String, String, Option<String>)> {
        let mut st = c
            .prepare("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY type, name")
            .unwrap();
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap();
        rows.collect::<Result<_, _>>().unwrap()
    }

    fn names(c: &Connection) -> Vec<String> {
        schema(c).into_iter().map(|(_, n, _)| n).collect()
    }

    /// A database as the given steps leave it.
    fn at_version(path: &std::path::Path, version: i64) -> Connection {
        let c = Connection::open(path).unwrap();
        for m in MIGRATIONS.iter().filter(|m| m.version <= version) {
            apply(&c, m).unwrap();
        }
        c.pragma_update(None, "user_version", version).unwrap();
        c
    }

    /// The schema the release before versioned steps created at every
    /// start, under version 3 (frozen here: it is what databases in the
    /// field have).
    const UNVERSIONED_V3: &str = "
CREATE TABLE IF NOT EXISTS queries (
    id               INTEGER PRIMARY KEY,
    user             TEXT    NOT NULL,
    model            TEXT    NOT NULL,
    requested_model  TEXT    NOT NULL,
    endpoint         TEXT    NOT NULL,
    ts               INTEGER NOT NULL,
    duration_us      INTEGER NOT NULL,
    ttfb_us          INTEGER,
    status           INTEGER NOT NULL,
    stream           INTEGER NOT NULL,
    query_tokens     INTEGER NOT NULL,
    answer_tokens    INTEGER NOT NULL,
    cached_tokens    INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    cost             INTEGER NOT NULL,
    priced           INTEGER NOT NULL,
    estimated        INTEGER NOT NULL,
    request_id       TEXT
);
DROP INDEX IF EXISTS queries_ts;
CREATE INDEX IF NOT EXISTS queries_ts_sums ON queries (ts, user, model, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, priced);
DROP INDEX IF EXISTS queries_user_ts;
CREATE TABLE IF NOT EXISTS prices (
    model       TEXT    NOT NULL,
    valid_from  INTEGER NOT NULL,
    query       INTEGER NOT NULL,
    cached      INTEGER,
    answer      INTEGER NOT NULL,
    PRIMARY KEY (model, valid_from)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage_daily (
    day              INTEGER NOT NULL,
    user             TEXT    NOT NULL,
    model            TEXT    NOT NULL,
    queries          INTEGER NOT NULL,
    query_tokens     INTEGER NOT NULL,
    answer_tokens    INTEGER NOT NULL,
    cached_tokens    INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    cost             INTEGER NOT NULL,
    unpriced         INTEGER NOT NULL,
    PRIMARY KEY (day, user, model)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_daily_user ON usage_daily (user, day);
CREATE INDEX IF NOT EXISTS usage_daily_model ON usage_daily (model, day);
CREATE TABLE IF NOT EXISTS api_keys (
    id         TEXT PRIMARY KEY,
    user       TEXT    NOT NULL,
    digest     BLOB    NOT NULL UNIQUE,
    created    INTEGER NOT NULL,
    last_used  INTEGER,
    revoked    INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS api_keys_user ON api_keys (user, created);
CREATE TABLE IF NOT EXISTS limits (
    user    TEXT PRIMARY KEY,
    budget  INTEGER,
    period  TEXT NOT NULL,
    rpm     INTEGER,
    tpm     INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rejections (
    id      INTEGER PRIMARY KEY,
    ts      INTEGER NOT NULL,
    user    TEXT    NOT NULL,
    model   TEXT    NOT NULL,
    reason  TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS rejections_ts ON rejections (ts);
CREATE INDEX IF NOT EXISTS rejections_user_ts ON rejections (user, ts);
";

    fn fresh(dir: &std::path::Path) -> Connection {
        let mut c = Connection::open(dir.join("fresh.db")).unwrap();
        assert_eq!(migrate(&mut c).unwrap(), (1..=LATEST).collect::<Vec<_>>());
        c
    }

    #[test]
    fn versions_count_up_from_one() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i64 + 1);
        }
    }

    #[test]
    fn a_fresh_database_reaches_the_latest_version_with_todays_schema() {
        let dir = tempfile::tempdir().unwrap();
        let c = fresh(dir.path());
        assert_eq!(user_version(&c).unwrap(), LATEST);
        let today = Connection::open(dir.path().join("today.db")).unwrap();
        today.execute_batch(UNVERSIONED_V3).unwrap();
        for m in MIGRATIONS.iter().filter(|m| m.version > 4) {
            apply(&today, m).unwrap();
        }
        assert_eq!(schema(&c), schema(&today));
        let n = names(&c);
        assert!(n.contains(&"queries_ts_sums".to_owned()));
        assert!(!n.contains(&"queries_ts".to_owned()));
        assert!(!n.contains(&"queries_user_ts".to_owned()));
    }

    #[test]
    fn each_older_version_upgrades_to_the_fresh_schema() {
        let dir = tempfile::tempdir().unwrap();
        let want = schema(&fresh(dir.path()));
        for version in 1..LATEST {
            let path = dir.path().join(format!("v{version}.db"));
            let mut c = at_version(&path, version);
            let applied = migrate(&mut c).unwrap();
            assert_eq!(applied, ((version + 1)..=LATEST).collect::<Vec<_>>());
            assert_eq!(user_version(&c).unwrap(), LATEST);
            assert_eq!(schema(&c), want, "from version {version}");
        }
    }

    #[test]
    fn a_version_3_database_of_any_earlier_release_upgrades() {
        let dir = tempfile::tempdir().unwrap();
        let want = schema(&fresh(dir.path()));
        // Every version-3 schema released: with both old record indexes,
        // with the time index only, and with the covering index.
        let unversioned = Connection::open(dir.path().join("unversioned.db")).unwrap();
        unversioned.execute_batch(UNVERSIONED_V3).unwrap();
        unversioned.pragma_update(None, "user_version", 3).unwrap();
        let mut dbs = vec![unversioned];
        let both = at_version(&dir.path().join("both.db"), 3);
        dbs.push(both);
        let ts_only = at_version(&dir.path().join("ts-only.db"), 3);
        ts_only.execute_batch("DROP INDEX queries_user_ts").unwrap();
        dbs.push(ts_only);
        for mut c in dbs {
            c.execute(
                "INSERT INTO queries (user, model, requested_model, endpoint, ts, duration_us, status, stream, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, priced, estimated) VALUES ('ann','m','m','/v1/x',1700000000000,1,200,0,5,6,0,0,42,1,0)",
                [],
            )
            .unwrap();
            assert_eq!(migrate(&mut c).unwrap(), (4..=LATEST).collect::<Vec<_>>());
            assert_eq!(schema(&c), want);
            let n: i64 = c
                .query_row("SELECT COUNT(*) FROM queries", [], |r| r.get(0))
                .unwrap();
            assert_eq!(n, 1);
        }
    }

    #[test]
    fn a_version_1_database_gets_rollups_of_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = at_version(&dir.path().join("v1.db"), 1);
        c.execute(
            "INSERT INTO queries (user, model, requested_model, endpoint, ts, duration_us, status, stream, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, priced, estimated) VALUES ('ann','m','m','/v1/x',1700000000000,1,200,0,5,6,0,0,42,1,0)",
            [],
        )
        .unwrap();
        migrate(&mut c).unwrap();
        let row: (i64, i64, i64) = c
            .query_row(
                "SELECT queries, query_tokens, cost FROM usage_daily",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(row, (1, 5, 42));
    }

    #[test]
    fn a_lowered_version_replays_the_column_step_harmlessly() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = fresh(dir.path());
        let want = schema(&c);
        c.pragma_update(None, "user_version", 1).unwrap();
        assert_eq!(migrate(&mut c).unwrap(), (2..=LATEST).collect::<Vec<_>>());
        assert_eq!(schema(&c), want);
        assert!(has_column(&c, "queries", "client_aborted").unwrap());
        assert!(has_column(&c, "queries", "service_tier").unwrap());
        assert!(has_column(&c, "prices", "priority_answer").unwrap());
        assert!(has_column(&c, "queries", "upstream").unwrap());
    }

    #[test]
    fn a_newer_database_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = fresh(dir.path());
        c.pragma_update(None, "user_version", LATEST + 1).unwrap();
        let before = schema(&c);
        let e = migrate(&mut c).unwrap_err();
        assert_eq!(
            e.0,
            format!(
                "database schema version {} is newer than this tollgate ({LATEST}); upgrade tollgate",
                LATEST + 1
            )
        );
        assert_eq!(user_version(&c).unwrap(), LATEST + 1);
        assert_eq!(schema(&c), before);
    }

    #[test]
    fn a_current_database_runs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = fresh(dir.path());
        let cookie = |c: &Connection| -> i64 {
            c.pragma_query_value(None, "schema_version", |r| r.get(0))
                .unwrap()
        };
        let before = cookie(&c);
        let changes = c.total_changes();
        assert!(migrate(&mut c).unwrap().is_empty());
        assert_eq!(cookie(&c), before);
        assert_eq!(c.total_changes(), changes);
    }
}
