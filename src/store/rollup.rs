//! The daily rollup rows of a batch: one per (UTC day, user, model), summed
//! the same way whichever backend adds them to its table. Sums saturate, so
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
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let mut out: BTreeMap<(i64, &str, &str), Daily> = BTreeMap::new();
    for p in batch {
        let r = &p.record;
        let key = (
            r.started_ms.div_euclid(DAY_MS),
            r.user.as_str(),
            r.model_or_requested(),
        );
        let d = out.entry(key).or_default();
        d.queries = d.queries.saturating_add(1);
        d.query_tokens = d.query_tokens.saturating_add(n(r.usage.query));
        d.answer_tokens = d.answer_tokens.saturating_add(n(r.usage.answer));
        d.cached_tokens = d.cached_tokens.saturating_add(n(r.usage.cached));
        d.reasoning_tokens = d.reasoning_tokens.saturating_add(n(r.usage.reasoning));
        d.cost = d.cost.saturating_add(p.cost);
        d.unpriced = d.unpriced.saturating_add(i64::from(!p.priced));
    }
    out
}
