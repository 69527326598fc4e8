//! `tollgate migrate --from FILE.db --to postgres://...`: copies a SQLite
//! database into PostgreSQL — records, daily rollups, rejections, prices
//! (every row, with its validity history), keys (digests; revoked ones stay
//! revoked), limits, the latest rate limits.
//!
//! Safe to run again: the target keeps one progress row per source
//! (`meta`, committed with each step), so a later run copies only records
//! and rejections that came since, and a run that stopped half-way goes on
//! where it stopped. A source is known again by its last copied record
//! (id, time, user, duration), which no other file has under that id. The
//! first run copies the source's rollups whole (they also count the records
//! retention deleted, as SQLite's reports do); later runs add the rollups
//! of the records they copy, as the writer does.

use std::path::Path;

use crate::config::PgUrl;
use crate::store::postgres::{self, PROGRESS_PREFIX};
use crate::store::sqlite;
use crate::store::transfer::{Anchor, Progress, SharedCopied};
use crate::store::StoreError;

/// Records per transaction.
const CHUNK: usize = 20_000;

/// What a run copied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Whether this source was new to the target.
    pub new_source: bool,
    /// Records copied by this run.
    pub records: u64,
    /// Records of the source that earlier runs copied.
    pub records_before: u64,
    /// Daily rollup rows copied whole (first run of a source only).
    pub rollups: u64,
    /// Rejections copied by this run.
    pub rejections: u64,
    /// Prices, keys, limits.
    pub shared: SharedCopied,
}

/// Copies what `from` holds and `to` lacks. `from` is only read.
pub fn migrate(from: &Path, to: &PgUrl) -> Result<Summary, StoreError> {
    let src = sqlite::open_source(from).map_err(|e| StoreError(format!("--from {e}")))?;
    let mut dst = postgres::open_target(to)
        .map_err(|e| StoreError(format!("--to {}: {e}", to.redacted())))?;
    let mut out = Summary::default();
    let max = src.max_record_id()?;
    let sources = dst.sources()?;
    let mut found = None;
    for (key, p) in &sources {
        if let Some(a) = &p.anchor {
            if src.anchor(a.id)?.as_ref() == Some(a) {
                found = Some((key.clone(), p.clone()));
                break;
            }
        }
    }
    if found.is_none() {
        let min = src.min_record_id()?;
        for (_, p) in &sources {
            if let Some(a) = &p.anchor {
                if min > a.id {
                    // The record it was known by may be one retention deleted.
                    return Err(StoreError(format!(
                        "--to already holds records copied from a SQLite database whose last copied record (id {}) {} no longer has: refusing to copy it again, which could count records twice",
                        a.id,
                        from.display()
                    )));
                }
            }
        }
        found = sources
            .iter()
            .find(|(_, p)| p.anchor.is_none())
            .map(|(k, p)| (k.clone(), p.clone()));
    }
    out.shared = dst.copy_shared(&src.shared()?)?;
    let (key, mut p) = match found {
        Some(f) => f,
        None => {
            out.new_source = true;
            let key = format!("{PROGRESS_PREFIX}{}", random_hex());
            let p = Progress {
                records_through: 0,
                rollups_through: max,
                rejections_through: 0,
                anchor: src.anchor(max)?,
            };
            let rollups = src.rollups()?;
            out.rollups = rollups.len() as u64;
            dst.start_source(&key, &p, &rollups)?;
            (key, p)
        }
    };
    out.records_before = src.count_records_through(p.records_through)?;
    loop {
        let (ids, recs) = src.records(p.records_through, max, CHUNK)?;
        let (Some(&last), Some(r)) = (ids.last(), recs.last()) else {
            break;
        };
        let anchor = Anchor {
            id: last,
            ts: r.record.started_ms,
            user: r.record.user.clone(),
            duration_us: i64::try_from(r.record.duration_us).unwrap_or(i64::MAX),
        };
        dst.copy_records(&key, &mut p, &ids, &recs, Some(anchor))?;
        out.records += recs.len() as u64;
    }
    let rejections = src.rejections(p.rejections_through)?;
    for chunk in rejections.chunks(CHUNK) {
        dst.copy_rejections(&key, &mut p, chunk)?;
        out.rejections += chunk.len() as u64;
    }
    Ok(out)
}

fn random_hex() -> String {
    let mut id = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id);
    id.iter().map(|b| format!("{b:02x}")).collect()
}
