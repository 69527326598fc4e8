//! The PostgreSQL schema as numbered migrations, recorded one row per step
//! in `tollgate_schema`. Several instances may start at once: migrations run
//! under a session advisory lock, so one applies them and the others find
//! them done; each step commits with its row, so a step is never applied
//! twice. A database newer than this build is refused before anything is
//! touched. Steps are never edited once released: a change is a new step.
//!
//! Records (`queries`) are range-partitioned by month on `ts`; the
//! partitions are made by the writer as months come (`write.rs`), and
//! retention drops them whole.

use tokio_postgres::Client;

use super::wait;
use crate::store::StoreError;

/// One schema step.
pub(super) struct Migration {
    /// The version the database has after this step.
    pub(super) version: i32,
    /// What the step does, for the log.
    pub(super) what: &'static str,
    /// The statements, run as one batch in the step's transaction.
    pub(super) sql: &'static str,
}

/// Every step, in order; versions count up from 1 without gaps.
pub(super) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        what: "records by month, daily rollups, prices, keys, limits, rejections",
        sql: SCHEMA_V1,
    },
    Migration {
        version: 2,
        what: "versions of prices, keys, limits and rate limits, for instances to follow",
        sql: SCHEMA_V2,
    },
    Migration {
        version: 3,
        what: "records keep their service tier and audio tokens; prices get flex, priority and audio rates",
        sql: SCHEMA_V3,
    },
    Migration {
        version: 4,
        what: "budget alerts sent, once per threshold and period",
        sql: SCHEMA_V4,
    },
    Migration {
        version: 5,
        what: "budget leases: each instance's slice of a user's remaining budget",
        sql: SCHEMA_V5,
    },
    Migration {
        version: 6,
        what: "request tags on records and keys, daily rollups per tag",
        sql: SCHEMA_V6,
    },
    Migration {
        version: 7,
        what: "records name the upstream that served them",
        sql: SCHEMA_V7,
    },
    Migration {
        version: 8,
        what: "rate leases: each instance's slice of a user's requests and tokens per minute",
        sql: SCHEMA_V8,
    },
    Migration {
        version: 9,
        what: "image tokens and per-unit counts on records, image and unit rates on prices",
        sql: SCHEMA_V9,
    },
    Migration {
        version: 10,
        what: "Batch API jobs followed until metered; records keep a batch line's custom_id",
        sql: SCHEMA_V10,
    },
    Migration {
        version: 11,
        what: "projects (members and limits); records and keys name their project",
        sql: SCHEMA_V11,
    },
    Migration {
        version: 12,
        what: "project budgets leased like users': a project's spend from its rollups",
        sql: SCHEMA_V12,
    },
];

/// The version this build brings a database to.
pub const LATEST: i32 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// Which budget alerts went out: the first instance to insert a row sends
/// the alert, so several instances announce a threshold once.
const SCHEMA_V4: &str = "
CREATE TABLE alerts_sent (
    subject      text   NOT NULL,
    period_start bigint NOT NULL,
    kind         text   NOT NULL,
    at           bigint NOT NULL,
    PRIMARY KEY (subject, period_start, kind)
);
";

/// Request tags (canonical, see `crate::tags`) on records and as keys'
/// defaults, and their daily rollups: one row per tag key, day, tag value,
/// user and model, written with the records (empty for those written
/// before). Adding a column with a constant default touches no row.
const SCHEMA_V6: &str = "
ALTER TABLE queries ADD COLUMN tags text NOT NULL DEFAULT '';
ALTER TABLE api_keys ADD COLUMN tags text NOT NULL DEFAULT '';
CREATE TABLE usage_daily_tags (
    tag_key          text   NOT NULL,
    day              bigint NOT NULL,
    tag_value        text   NOT NULL,
    username         text   NOT NULL,
    model            text   NOT NULL,
    queries          bigint NOT NULL,
    query_tokens     bigint NOT NULL,
    answer_tokens    bigint NOT NULL,
    cached_tokens    bigint NOT NULL,
    reasoning_tokens bigint NOT NULL,
    cost             bigint NOT NULL,
    unpriced         bigint NOT NULL,
    PRIMARY KEY (tag_key, day, tag_value, username, model)
);
";

/// The advisory lock key migrations run under ("tollgate" in ASCII).
pub(super) const MIGRATION_LOCK: i64 = 0x746f_6c6c_6761_7465;

/// The advisory lock key partitions are created under.
pub(super) const PARTITION_LOCK: i64 = MIGRATION_LOCK + 1;

/// The first schema. `username` stands for SQLite's `user`, a reserved
/// word here. Records have no primary key (a partitioned table's would have
/// to include `ts`, and nothing looks a record up by id alone); `(ts, id)`
/// orders `/queries` and finds a re-priced record.
const SCHEMA_V1: &str = "
CREATE SEQUENCE queries_id_seq AS bigint;
CREATE TABLE queries (
    id               bigint  NOT NULL DEFAULT nextval('queries_id_seq'),
    username         text    NOT NULL,
    model            text    NOT NULL,
    requested_model  text    NOT NULL,
    endpoint         text    NOT NULL,
    ts               bigint  NOT NULL,
    duration_us      bigint  NOT NULL,
    ttfb_us          bigint,
    status           integer NOT NULL,
    stream           boolean NOT NULL,
    query_tokens     bigint  NOT NULL,
    answer_tokens    bigint  NOT NULL,
    cached_tokens    bigint  NOT NULL,
    reasoning_tokens bigint  NOT NULL,
    cost             bigint  NOT NULL,
    priced           boolean NOT NULL,
    estimated        boolean NOT NULL,
    request_id       text,
    client_aborted   boolean NOT NULL DEFAULT false
) PARTITION BY RANGE (ts);
ALTER SEQUENCE queries_id_seq OWNED BY queries.id;
CREATE INDEX queries_ts ON queries (ts, id);
CREATE TABLE usage_daily (
    day              bigint NOT NULL,
    username         text   NOT NULL,
    model            text   NOT NULL,
    queries          bigint NOT NULL,
    query_tokens     bigint NOT NULL,
    answer_tokens    bigint NOT NULL,
    cached_tokens    bigint NOT NULL,
    reasoning_tokens bigint NOT NULL,
    cost             bigint NOT NULL,
    unpriced         bigint NOT NULL,
    PRIMARY KEY (day, username, model)
);
CREATE INDEX usage_daily_user ON usage_daily (username, day);
CREATE INDEX usage_daily_model ON usage_daily (model, day);
CREATE TABLE prices (
    model       text   NOT NULL,
    valid_from  bigint NOT NULL,
    query       bigint NOT NULL,
    cached      bigint,
    answer      bigint NOT NULL,
    PRIMARY KEY (model, valid_from)
);
CREATE TABLE meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE api_keys (
    id         text   PRIMARY KEY,
    username   text   NOT NULL,
    digest     bytea  NOT NULL UNIQUE,
    created    bigint NOT NULL,
    last_used  bigint,
    revoked    bigint
);
CREATE INDEX api_keys_user ON api_keys (username, created);
CREATE TABLE limits (
    username text PRIMARY KEY,
    budget   bigint,
    period   text NOT NULL,
    rpm      bigint,
    tpm      bigint
);
CREATE TABLE rejections (
    id       bigserial PRIMARY KEY,
    ts       bigint NOT NULL,
    username text   NOT NULL,
    model    text   NOT NULL,
    reason   text   NOT NULL
);
CREATE INDEX rejections_ts ON rejections (ts);
-- Batches already committed, so that a batch retried after a commit whose
-- answer was lost (the connection dropped) is not written twice.
CREATE TABLE write_batches (
    token text   PRIMARY KEY,
    at_ms bigint NOT NULL
);
";

/// Batch API jobs created through tollgate (`metered` NULL until one
/// instance claims them and records their lines), and the `custom_id` of a
/// batch line's record.
const SCHEMA_V10: &str = "
CREATE TABLE batches (
    id            text   PRIMARY KEY,
    username      text   NOT NULL,
    tags          text   NOT NULL DEFAULT '',
    upstream      text   NOT NULL,
    endpoint      text   NOT NULL,
    input_file_id text   NOT NULL,
    created       bigint NOT NULL,
    state         text,
    metered       bigint,
    project       text
);
ALTER TABLE queries ADD COLUMN IF NOT EXISTS custom_id text;
";

/// The upstream that served a record (NULL for the records written before).
const SCHEMA_V7: &str = "
ALTER TABLE queries ADD COLUMN IF NOT EXISTS upstream text;
";

/// Image tokens and what is priced per unit (images, tool calls, seconds,
/// characters; see `crate::pricing::Units`) on records, empty for those
/// written before; image token and unit rates on prices (NULL: none).
/// Constant defaults rewrite no partition.
const SCHEMA_V9: &str = "
ALTER TABLE queries
    ADD COLUMN IF NOT EXISTS image_query_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS image_answer_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS units text NOT NULL DEFAULT '';
ALTER TABLE prices
    ADD COLUMN IF NOT EXISTS image_query bigint,
    ADD COLUMN IF NOT EXISTS image_answer bigint,
    ADD COLUMN IF NOT EXISTS unit bigint;
";

/// A version per kind of shared state (the latest upstream rate limits too), bumped by triggers in the
/// transaction of every write to it, so that no write path can forget to;
/// each instance polls them (`PgReports::state_versions`) and reloads what
/// moved. Key rows change on every batch (`last_used`), so only a change of
/// `revoked` (and inserts, deletes) counts for keys.
const SCHEMA_V2: &str = "
CREATE TABLE tollgate_state (
    name    text   PRIMARY KEY,
    version bigint NOT NULL
);
INSERT INTO tollgate_state (name, version)
    VALUES ('prices', 0), ('keys', 0), ('limits', 0), ('ratelimits', 0);
CREATE FUNCTION tollgate_bump_state() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE tollgate_state SET version = version + 1 WHERE name = TG_ARGV[0];
    RETURN NULL;
END
$$;
CREATE TRIGGER prices_changed AFTER INSERT OR UPDATE OR DELETE ON prices
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate_bump_state('prices');
CREATE TRIGGER keys_changed AFTER INSERT OR UPDATE OF revoked OR DELETE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate_bump_state('keys');
CREATE TRIGGER limits_changed AFTER INSERT OR UPDATE OR DELETE ON limits
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate_bump_state('limits');
CREATE TRIGGER ratelimits_changed AFTER INSERT OR UPDATE ON meta
    FOR EACH ROW WHEN (NEW.key = 'ratelimits')
    EXECUTE FUNCTION tollgate_bump_state('ratelimits');
";

/// Projects: members (a JSON array of user names), the project's own
/// limits (`period` NULL: none) and its alert webhook (NULL: the global one); a change moves the `limits` version, so
/// other instances reload projects with limits. Records and keys name
/// their project (NULL: none, and for those written before). A project's
/// daily rollups are rows of `usage_daily_tags` under the tag key
/// `@project`, which no request tag can have.
const SCHEMA_V11: &str = "
ALTER TABLE queries ADD COLUMN project text;
ALTER TABLE api_keys ADD COLUMN project text;
CREATE TABLE projects (
    name    text PRIMARY KEY,
    members text NOT NULL,
    budget  bigint,
    period  text,
    rpm     bigint,
    tpm     bigint,
    alert_webhook text
);
CREATE TRIGGER projects_changed AFTER INSERT OR UPDATE OR DELETE ON projects
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate_bump_state('limits');
";

/// The service tier of each record (NULL for the records written before
/// and for requests without one) and its audio tokens; per-tier and audio
/// rates beside the standard ones (NULL: the standard rates). New columns
/// that are nullable or have a constant default rewrite nothing,
/// partitions included.
const SCHEMA_V3: &str = "
ALTER TABLE queries
    ADD COLUMN service_tier text,
    ADD COLUMN audio_query_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN audio_answer_tokens bigint NOT NULL DEFAULT 0;
ALTER TABLE prices
    ADD COLUMN flex_query bigint,
    ADD COLUMN flex_cached bigint,
    ADD COLUMN flex_answer bigint,
    ADD COLUMN priority_query bigint,
    ADD COLUMN priority_cached bigint,
    ADD COLUMN priority_answer bigint,
    ADD COLUMN audio_query bigint,
    ADD COLUMN audio_answer bigint;
";

/// Budget leases (`budget::lease`). A row is one instance's slice of one
/// user's budget in one period: `amount` is what it was granted less its
/// records already written (the writer subtracts them in the batch's own
/// transaction), so `spent + sum(live amounts)` only moves when a slice is
/// granted, given back or expires. `tollgate_lease_take` grants a slice in
/// one statement: it serializes the grants of one user on an advisory
/// transaction lock, and as a volatile function its next statements read a
/// snapshot taken after that lock, so two grants never both see the same
/// room. The size rule is `budget::lease::lease_size`'s:
/// `least(room, greatest(need, room / (div * holders)))`, nothing when
/// `room < need`.
const SCHEMA_V5: &str = "
CREATE TABLE budget_leases (
    username     text        NOT NULL,
    instance     text        NOT NULL,
    period_start bigint      NOT NULL,
    amount       bigint      NOT NULL,
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (username, instance)
);
CREATE INDEX budget_leases_instance ON budget_leases (instance);
CREATE FUNCTION tollgate_lease_take(p_user text, p_instance text, p_period bigint,
        p_limit bigint, p_need bigint, p_div bigint, p_ttl_ms bigint,
        OUT granted bigint, OUT room bigint, OUT holders bigint, OUT reset boolean)
    LANGUAGE plpgsql AS $$
DECLARE
    v_spent  numeric;
    v_leased numeric;
    v_others bigint;
    v_mine   boolean;
    v_room   numeric;
    v_grant  numeric;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('tollgate_lease:' || p_user, 0));
    SELECT coalesce(sum(cost), 0) INTO v_spent
        FROM usage_daily WHERE username = p_user AND day >= p_period / 86400000;
    SELECT coalesce(sum(greatest(amount, 0)), 0),
           count(*) FILTER (WHERE instance <> p_instance AND amount > 0),
           bool_or(instance = p_instance)
        INTO v_leased, v_others, v_mine
        FROM budget_leases
        WHERE username = p_user AND period_start = p_period AND expires_at > now();
    v_room := greatest(p_limit - v_spent - v_leased, 0);
    holders := v_others + 1;
    IF v_room < greatest(p_need, 1) THEN
        v_grant := 0;
    ELSE
        v_grant := least(v_room, greatest(p_need, floor(v_room / (p_div * holders))));
    END IF;
    granted := v_grant;
    room := v_room - v_grant;
    reset := NOT coalesce(v_mine, false);
    INSERT INTO budget_leases AS l (username, instance, period_start, amount, expires_at)
        VALUES (p_user, p_instance, p_period, granted,
                now() + make_interval(secs => p_ttl_ms / 1000.0))
        ON CONFLICT (username, instance) DO UPDATE SET
            amount = CASE WHEN reset THEN excluded.amount ELSE l.amount + excluded.amount END,
            period_start = excluded.period_start,
            expires_at = excluded.expires_at;
END
$$;
";

/// Rate leases (`budget::lease`): a row is one instance's slice of one
/// user's requests and tokens in one calendar minute. Unlike budget leases
/// nothing is settled into them: a slice counts as used for its whole
/// minute (less what an idle instance gives back), so the sum of slices of
/// a minute is what all instances may admit in it, and a killed instance's
/// slice ends with its minute. `tollgate_rate_take` sizes each part as
/// `tollgate_lease_take` does, under the same kind of per-user lock; a part
/// not asked for (`need` 0) or without a limit (`NULL`) grants nothing.
const SCHEMA_V8: &str = "
CREATE TABLE rate_leases (
    username text   NOT NULL,
    instance text   NOT NULL,
    minute   bigint NOT NULL,
    requests bigint NOT NULL,
    tokens   bigint NOT NULL,
    PRIMARY KEY (username, minute, instance)
);
CREATE FUNCTION tollgate_rate_part(p_limit bigint, p_used numeric, p_need bigint,
        p_div bigint, p_holders bigint) RETURNS bigint
    LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN p_limit IS NULL OR p_need <= 0 OR p_limit - p_used < p_need THEN 0
        ELSE least(p_limit - p_used,
                   greatest(p_need, floor((p_limit - p_used) / (p_div * p_holders))))::bigint
    END
$$;
CREATE FUNCTION tollgate_rate_take(p_user text, p_instance text, p_minute bigint,
        p_rpm bigint, p_tpm bigint, p_need_requests bigint, p_need_tokens bigint,
        p_div bigint, OUT requests bigint, OUT tokens bigint)
    LANGUAGE plpgsql AS $$
DECLARE
    v_requests numeric;
    v_tokens   numeric;
    v_others   bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('tollgate_rate:' || p_user, 0));
    DELETE FROM rate_leases WHERE username = p_user AND minute < p_minute;
    SELECT coalesce(sum(greatest(l.requests, 0)), 0), coalesce(sum(greatest(l.tokens, 0)), 0),
           count(*) FILTER (WHERE l.instance <> p_instance)
        INTO v_requests, v_tokens, v_others
        FROM rate_leases l WHERE l.username = p_user AND l.minute = p_minute;
    requests := tollgate_rate_part(p_rpm, v_requests, p_need_requests, p_div, v_others + 1);
    tokens := tollgate_rate_part(p_tpm, v_tokens, p_need_tokens, p_div, v_others + 1);
    INSERT INTO rate_leases AS l (username, instance, minute, requests, tokens)
        VALUES (p_user, p_instance, p_minute, requests, tokens)
        ON CONFLICT (username, minute, instance) DO UPDATE SET
            requests = l.requests + excluded.requests,
            tokens = l.tokens + excluded.tokens;
END
$$;
";

/// Project budgets are leased like users' (`PgLeases::for_projects`): their
/// lease rows are keyed by a control character, `project:` and the name
/// (no user name can start so), and a project's spend is the sum of its
/// `@project` tag rollups rather than of a user's daily rollups. Otherwise
/// `tollgate_lease_take` is step 5's.
const SCHEMA_V12: &str = "
CREATE OR REPLACE FUNCTION tollgate_lease_take(p_user text, p_instance text, p_period bigint,
        p_limit bigint, p_need bigint, p_div bigint, p_ttl_ms bigint,
        OUT granted bigint, OUT room bigint, OUT holders bigint, OUT reset boolean)
    LANGUAGE plpgsql AS $$
DECLARE
    v_spent  numeric;
    v_leased numeric;
    v_others bigint;
    v_mine   boolean;
    v_room   numeric;
    v_grant  numeric;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('tollgate_lease:' || p_user, 0));
    IF left(p_user, 9) = chr(31) || 'project:' THEN
        SELECT coalesce(sum(cost), 0) INTO v_spent FROM usage_daily_tags
            WHERE tag_key = '@project' AND tag_value = substr(p_user, 10)
              AND day >= p_period / 86400000;
    ELSE
        SELECT coalesce(sum(cost), 0) INTO v_spent
            FROM usage_daily WHERE username = p_user AND day >= p_period / 86400000;
    END IF;
    SELECT coalesce(sum(greatest(amount, 0)), 0),
           count(*) FILTER (WHERE instance <> p_instance AND amount > 0),
           bool_or(instance = p_instance)
        INTO v_leased, v_others, v_mine
        FROM budget_leases
        WHERE username = p_user AND period_start = p_period AND expires_at > now();
    v_room := greatest(p_limit - v_spent - v_leased, 0);
    holders := v_others + 1;
    IF v_room < greatest(p_need, 1) THEN
        v_grant := 0;
    ELSE
        v_grant := least(v_room, greatest(p_need, floor(v_room / (p_div * holders))));
    END IF;
    granted := v_grant;
    room := v_room - v_grant;
    reset := NOT coalesce(v_mine, false);
    INSERT INTO budget_leases AS l (username, instance, period_start, amount, expires_at)
        VALUES (p_user, p_instance, p_period, granted,
                now() + make_interval(secs => p_ttl_ms / 1000.0))
        ON CONFLICT (username, instance) DO UPDATE SET
            amount = CASE WHEN reset THEN excluded.amount ELSE l.amount + excluded.amount END,
            period_start = excluded.period_start,
            expires_at = excluded.expires_at;
END
$$;
";

fn refuse_newer(version: i32) -> Result<(), StoreError> {
    if version > LATEST {
        return Err(StoreError(format!(
            "database schema version {version} is newer than this tollgate ({LATEST}); upgrade tollgate"
        )));
    }
    Ok(())
}

/// The version the database is at (0 when tollgate never ran on it).
pub(super) fn version(c: &mut Client) -> Result<i32, StoreError> {
    wait(async {
        let exists = c
            .query_one("SELECT to_regclass('tollgate_schema') IS NOT NULL", &[])
            .await?
            .get::<_, bool>(0);
        if !exists {
            return Ok(0);
        }
        let v: Option<i32> = c
            .query_one("SELECT max(version) FROM tollgate_schema", &[])
            .await?
            .get(0);
        Ok(v.unwrap_or(0))
    })
}

/// Brings the database to [`LATEST`]; returns the versions applied, none
/// when it was already there (or another instance applied them meanwhile).
pub(super) fn migrate(c: &mut Client) -> Result<Vec<i32>, StoreError> {
    let v = version(c)?;
    refuse_newer(v)?;
    if v == LATEST {
        return Ok(Vec::new());
    }
    wait(c.execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK]))?;
    let out = migrate_locked(c);
    let unlocked = wait(c.execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK]));
    let applied = out?;
    unlocked?;
    for m in MIGRATIONS.iter().filter(|m| applied.contains(&m.version)) {
        tracing::info!(version = m.version, "database schema: {}", m.what);
    }
    Ok(applied)
}

fn migrate_locked(c: &mut Client) -> Result<Vec<i32>, StoreError> {
    wait(c.batch_execute(
        "CREATE TABLE IF NOT EXISTS tollgate_schema (
            version    integer PRIMARY KEY,
            what       text    NOT NULL,
            applied_ms bigint  NOT NULL
        )",
    ))?;
    // Read again under the lock: another instance may have migrated.
    let v = version(c)?;
    refuse_newer(v)?;
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| m.version > v) {
        wait(async {
            let tx = c.transaction().await?;
            tx.batch_execute(m.sql).await?;
            tx.execute(
                "INSERT INTO tollgate_schema (version, what, applied_ms) VALUES ($1, $2, $3)",
                &[&m.version, &m.what, &crate::timestamp::now_ms()],
            )
            .await?;
            tx.commit().await
        })
        .map_err(|e| {
            let e = StoreError::from(e);
            StoreError(format!("schema step {} ({}): {e}", m.version, m.what))
        })?;
        applied.push(m.version);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_count_up_from_one() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1);
        }
    }

    #[test]
    fn a_newer_version_is_refused_with_a_clear_message() {
        assert!(refuse_newer(LATEST).is_ok());
        assert_eq!(
            refuse_newer(LATEST + 1).unwrap_err().0,
            format!(
                "database schema version {} is newer than this tollgate ({LATEST}); upgrade tollgate",
                LATEST + 1
            )
        );
    }
}
