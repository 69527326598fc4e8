//! The daily rollup rows of a batch: one per (UTC day, user, model), and
//! one per (tag key, UTC day, tag value, user, model) for every tag a record
//! carries, summed the same way whichever backend adds them to its tables. Sums saturate, so
//! a count no upstream should send can clamp a row but never wrap it.

use std::collections::BTreeMap;

use crate::record::Priced;

/// Milliseconds per day: rollup days are `started_ms / DAY` (UTC).
pub const DAY_MS: i64 = 86_400_000;

/// One rollup row's increments.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Daily {
    /// Records.
    pub queries: i64,
    /// Prompt tokens.
    pub query_tokens: i64,
    /// Completion tokens.
    pub answer_tokens: i64,
    /// Cached prompt tokens.
    pub cached_tokens: i64,
    /// Reasoning tokens.
    pub reasoning_tokens: i64,
    /// Pico-dollars.
    pub cost: i64,
    /// Records without a price.
    pub unpriced: i64,
}

impl Daily {
    /// The increments in column order: queries, the four token counts,
    /// cost, unpriced.
    pub fn columns(&self) -> [i64; 7] {
        [
            self.queries,
            self.query_tokens,
            self.answer_tokens,
            self.cached_tokens,
            self.reasoning_tokens,
            self.cost,
            self.unpriced,
        ]
    }
}

/// A batch's rollup increments by (day, user, model), in key order (so
/// instances upserting the same rows lock them in the same order).
pub fn daily(batch: &[Priced]) -> BTreeMap<(i64, &str, &str), Daily> {
    let mut out: BTreeMap<(i64, &str, &str), Daily> = BTreeMap::new();
    for p in batch {
        let r = &p.record;
        let key = (
            r.started_ms.div_euclid(DAY_MS),
            r.user.as_str(),
            r.model_or_requested(),
        );
        out.entry(key).or_default().add(p);
    }
    out
}

/// The key of a tag rollup row: tag key, day, tag value, user, model (the
/// order of the tables' primary keys, so `/usage` by one tag key reads one
/// range).
pub type TagRow<'a> = (&'a str, i64, &'a str, &'a str, &'a str);

/// A batch's tag rollup increments, one row per tag of each record, in key
/// order. A record's tag keys are distinct, so each record is counted once
/// under any one tag key.
pub fn tagged(batch: &[Priced]) -> BTreeMap<TagRow<'_>, Daily> {
    let mut out: BTreeMap<TagRow<'_>, Daily> = BTreeMap::new();
    for p in batch {
        let r = &p.record;
        let day = r.started_ms.div_euclid(DAY_MS);
        for (k, v) in rollup_tags(&r.tags, r.project.as_deref()) {
            let key = (k, day, v, r.user.as_str(), r.model_or_requested());
            out.entry(key).or_default().add(p);
        }
    }
    out
}

/// The (key, value) pairs a record is rolled up under in the tag rollups:
/// its tags, and its project under [`crate::projects::ROLLUP_KEY`] (which
/// no tag key can be), so `/usage` by project reads the same rollups.
pub fn rollup_tags<'a>(
    tags: &'a str,
    project: Option<&'a str>,
) -> impl Iterator<Item = (&'a str, &'a str)> {
    crate::tags::pairs(tags).chain(project.map(|p| (crate::projects::ROLLUP_KEY, p)))
}

/// A tag rollup row's key, owned (re-pricing collects them from records):
/// tag key, day, tag value, user, model.
pub type OwnedTagRow = (String, i64, String, String, String);

impl Daily {
    /// Adds one record.
    fn add(&mut self, p: &Priced) {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let r = &p.record;
        self.queries = self.queries.saturating_add(1);
        self.query_tokens = self.query_tokens.saturating_add(n(r.usage.query));
        self.answer_tokens = self.answer_tokens.saturating_add(n(r.usage.answer));
        self.cached_tokens = self.cached_tokens.saturating_add(n(r.usage.cached));
        self.reasoning_tokens = self.reasoning_tokens.saturating_add(n(r.usage.reasoning));
        self.cost = self.cost.saturating_add(p.cost);
        self.unpriced = self.unpriced.saturating_add(i64::from(!p.priced));
    }
}
