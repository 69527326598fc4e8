//! Spending limits and request/token rates per user, enforced before a
//! request goes upstream.
//!
//! A request reserves its worst-case cost (and tokens) under one lock before
//! it is forwarded, and the reservation is settled to the real cost when its
//! record is priced by the writer. Concurrent requests therefore see each
//! other's reservations: a budget is never overrun by requests that all
//! passed the check at once ("check first, charge later").
//!
//! With several instances on one database, budgets are leased
//! (`lease.rs`): each instance admits against its slice of the remaining
//! budget rather than against the whole.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use chrono::{Datelike, TimeZone, Utc};
use parking_lot::{Mutex, RwLock};

pub mod lease;
mod recent;

pub use lease::{lease_size, Away, LeaseSource, RateAsk, Taken};
pub use recent::RecentCosts;

/// Budget period, calendar-aligned in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Period {
    /// From 00:00 UTC.
    Day,
    /// From Monday 00:00 UTC.
    Week,
    /// From the 1st, 00:00 UTC.
    #[default]
    Month,
    /// Forever.
    Total,
}

const DAY_MS: i64 = 86_400_000;

impl Period {
    /// Parses `day`, `week`, `month` or `total`.
    pub fn parse(s: &str) -> Option<Period> {
        Some(match s {
            "day" => Period::Day,
            "week" => Period::Week,
            "month" => Period::Month,
            "total" => Period::Total,
            _ => return None,
        })
    }

    /// The API name.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
            Period::Total => "total",
        }
    }

    /// Start of the period containing `now_ms`.
    pub fn start(self, now_ms: i64) -> i64 {
        let day = now_ms.div_euclid(DAY_MS) * DAY_MS;
        match self {
            Period::Day => day,
            // 1970-01-01 was a Thursday: Monday is 3 days before day 4.
            Period::Week => day - ((now_ms.div_euclid(DAY_MS) + 3).rem_euclid(7)) * DAY_MS,
            Period::Month => {
                let t = Utc
                    .timestamp_millis_opt(now_ms)
                    .single()
                    .unwrap_or_default();
                Utc.with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
                    .single()
                    .map_or(day, |d| d.timestamp_millis())
            }
            Period::Total => i64::MIN,
        }
    }

    /// End (exclusive) of the period containing `now_ms`; `None` for total.
    pub fn end(self, now_ms: i64) -> Option<i64> {
        let start = self.start(now_ms);
        match self {
            Period::Day => Some(start + DAY_MS),
            Period::Week => Some(start + 7 * DAY_MS),
            Period::Month => {
                let t = Utc.timestamp_millis_opt(start).single()?;
                let (y, m) = if t.month() == 12 {
                    (t.year() + 1, 1)
                } else {
                    (t.year(), t.month() + 1)
                };
                Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0)
                    .single()
                    .map(|d| d.timestamp_millis())
            }
            Period::Total => None,
        }
    }
}

/// A user's limits. Every part is optional.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limits {
    /// Spending limit per period, pico-dollars.
    pub budget: Option<i64>,
    /// The budget's period.
    pub period: Period,
    /// Requests per calendar minute.
    pub rpm: Option<u64>,
    /// Tokens (prompt + completion) per calendar minute.
    pub tpm: Option<u64>,
}

#[derive(Debug, Default)]
struct UserState {
    period_start: i64,
    spent: i128,
    reserved: i128,
    minute: i64,
    requests: u64,
    tokens: u64,
    /// Leased budgets only: pico-dollars granted to this instance in the
    /// period (less what it gave back).
    granted: i128,
    /// Leased budgets only: real cost settled here in the period.
    used: i128,
    /// The largest reservation since the user was last idle: the least a
    /// grant gives.
    need: i128,
    /// When the lease stops being admitted against unless renewed
    /// (monotonic ms of the lease thread; 0: no lease).
    lease_until: i64,
    /// When the user last asked to be admitted (monotonic ms).
    last_check: i64,
    /// Background grants of this user wait until then (monotonic ms).
    backoff_until: i64,
    /// The shortfall a grant found no room for: until `backoff_until`,
    /// requests short of as much are refused without asking again.
    backoff_need: i128,
    /// Leased rates only: requests and tokens of `minute` granted to this
    /// instance (less what it gave back).
    rate_requests: u64,
    rate_tokens: u64,
    /// The largest token reservation since the user was last idle: the
    /// least a token grant gives.
    token_need: u64,
    /// A minute whose pool a rate grant found empty: whether of requests,
    /// and the token shortfall it found no room for (`u64::MAX`: none). The
    /// rest of that minute, such asks are refused without asking again.
    rate_empty: Option<(i64, bool, u64)>,
}

impl UserState {
    /// A new period starts from zero (the minute's counters stay).
    fn start_period(&mut self, period_start: i64) {
        *self = UserState {
            period_start,
            minute: self.minute,
            requests: self.requests,
            tokens: self.tokens,
            rate_requests: self.rate_requests,
            rate_tokens: self.rate_tokens,
            token_need: self.token_need,
            rate_empty: self.rate_empty,
            last_check: self.last_check,
            ..UserState::default()
        };
    }

    /// Lease not yet reserved or spent (negative after a request cost more
    /// than it reserved).
    fn avail(&self) -> i128 {
        self.granted
            .saturating_sub(self.used)
            .saturating_sub(self.reserved)
    }

    /// Whether a reservation of `cost` (more than 0) fits the lease.
    fn fits(&self, cost: i128) -> bool {
        cost <= self.avail()
    }

    /// Leased or not, limits changed: a pool found empty may have room.
    fn limits_changed(&mut self) {
        self.backoff_until = 0;
        self.rate_empty = None;
    }

    /// A new minute: its counters and rate grants start from zero.
    fn start_minute(&mut self, minute: i64) {
        self.minute = minute;
        self.requests = 0;
        self.tokens = 0;
        self.rate_requests = 0;
        self.rate_tokens = 0;
    }

    /// Below this much unused lease, the lease thread asks for more ahead
    /// of need: the largest request seen (more would strand budget in
    /// leases of instances whose requests already ended).
    fn low_water(&self) -> i128 {
        self.need.max(1)
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The budget of the period is used up.
    Budget {
        /// Seconds until the period ends (`None` for a total budget).
        retry_after: Option<u64>,
    },
    /// Too many requests or tokens this minute.
    Rate {
        /// `requests` or `tokens`.
        what: &'static str,
        /// Seconds until the next minute.
        retry_after: u64,
    },
    /// Leased budgets: the request does not fit this instance's lease (or
    /// the lease lapsed); ask the lease thread for more and check again.
    Unleased {
        /// The least the grant must give.
        need: i128,
    },
}

impl Refusal {
    /// The error code answered and counted.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Budget { .. } | Refusal::Unleased { .. } => "budget_exceeded",
            Refusal::Rate { .. } => "rate_limit_exceeded",
        }
    }
}

/// Limits and live counters of every user.
#[derive(Default)]
pub struct Budgets {
    /// Whether any limit exists; requests skip everything else when not.
    active: AtomicBool,
    limits: RwLock<HashMap<String, Limits>>,
    default: RwLock<Option<Limits>>,
    state: Mutex<HashMap<String, UserState>>,
    /// Costs seen on endpoints whose reservation is learnt from them.
    pub recent: Arc<RecentCosts>,
    /// Set when budgets are leased from a shared database.
    leasing: OnceLock<lease::Leasing>,
}

/// A reservation held by a request until its record is priced.
pub struct Hold {
    budgets: Arc<Budgets>,
    user: String,
    cost: i128,
    tokens: u64,
    period_start: i64,
    minute: i64,
    done: bool,
    /// Another limit's reservation on the same request's path (its
    /// project's), settled and released with this one.
    also: Option<Box<Hold>>,
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold")
            .field("user", &self.user)
            .field("cost", &self.cost)
            .field("tokens", &self.tokens)
            .finish()
    }
}

impl Hold {
    /// Replaces the reservation by what the request really cost.
    pub fn settle(mut self, cost: i64, tokens: u64) {
        self.budgets.release(&self, i128::from(cost), tokens, false);
        self.done = true;
        if let Some(also) = self.also.take() {
            also.settle(cost, tokens);
        }
    }

    /// Holds `other` with this one: both settle (or are released) together.
    pub fn with(mut self, other: Hold) -> Hold {
        match self.also.take() {
            Some(also) => self.also = Some(Box::new(also.with(other))),
            None => self.also = Some(Box::new(other)),
        }
        self
    }

    /// Undoes the reservation as if the request had never been checked
    /// (its request and tokens of the minute too): another limit on its
    /// path refused it.
    pub fn cancel(mut self) {
        self.budgets.release(&self, 0, 0, true);
        self.done = true;
        if let Some(also) = self.also.take() {
            also.cancel();
        }
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        // Never reached upstream (or its record was lost): nothing spent.
        if !self.done {
            self.budgets.release(self, 0, 0, false);
        }
    }
}

impl Budgets {
    /// Whether any limit is set.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    fn refresh_active(&self) {
        let any = !self.limits.read().is_empty() || self.default.read().is_some();
        self.active.store(any, Ordering::Relaxed);
    }

    /// Sets (or with `None` removes) a user's own limits.
    pub fn set_limits(&self, user: &str, l: Option<Limits>) {
        match l {
            Some(l) => self.limits.write().insert(user.to_owned(), l),
            None => self.limits.write().remove(user),
        };
        self.refresh_active();
        self.forget_backoffs();
    }

    /// Sets (or removes) the limits of users without their own.
    pub fn set_default(&self, l: Option<Limits>) {
        *self.default.write() = l;
        self.refresh_active();
        self.forget_backoffs();
    }

    /// Replaces every user's own limits and the default at once (as read
    /// from the database after another instance changed them); whether
    /// anything changed.
    pub fn replace_limits(&self, users: HashMap<String, Limits>, default: Option<Limits>) -> bool {
        let changed = *self.limits.read() != users || *self.default.read() != default;
        if changed {
            *self.limits.write() = users;
            *self.default.write() = default;
            self.refresh_active();
            self.forget_backoffs();
        }
        changed
    }

    /// A user's own limits.
    pub fn own_limits(&self, user: &str) -> Option<Limits> {
        self.limits.read().get(user).copied()
    }

    /// Every user under a limit, sorted: those with limits of their own and,
    /// while a default is set, those with spend or reservations under it.
    pub fn limited_users(&self) -> Vec<String> {
        let mut users: Vec<String> = self.limits.read().keys().cloned().collect();
        if self.default.read().is_some() {
            users.extend(self.state.lock().keys().cloned());
        }
        users.sort_unstable();
        users.dedup();
        users
    }

    /// The default limits.
    pub fn default_limits(&self) -> Option<Limits> {
        *self.default.read()
    }

    /// The limits that apply to a user, and whether they are the default.
    pub fn limits_of(&self, user: &str) -> Option<(Limits, bool)> {
        self.own_limits(user)
            .map(|l| (l, false))
            .or_else(|| self.default_limits().map(|l| (l, true)))
    }

    /// Sets a user's spend in the period starting at `period_start`, as read
    /// from the database (at start-up, or when limits change).
    pub fn set_spent(&self, user: &str, period_start: i64, spent: i128) {
        let mut st = self.state.lock();
        let s = st.entry(user.to_owned()).or_default();
        if s.period_start != period_start {
            s.start_period(period_start);
        }
        s.spent = spent;
    }

    /// Adds spend nothing reserved ahead (a Batch API job's lines, metered
    /// when the job ends), so later requests see it at once.
    pub fn charge(&self, user: &str, now_ms: i64, cost: i128) {
        let Some((l, _)) = self.limits_of(user) else {
            return;
        };
        let start = l.period.start(now_ms);
        let mut st = self.state.lock();
        let s = st.entry(user.to_owned()).or_default();
        if s.period_start != start {
            s.start_period(start);
        }
        s.spent = s.spent.saturating_add(cost);
        s.used = s.used.saturating_add(cost);
    }

    /// Spent and reserved pico-dollars of a user in the current period.
    pub fn spent(&self, user: &str, now_ms: i64) -> (i128, i128) {
        let Some((l, _)) = self.limits_of(user) else {
            return (0, 0);
        };
        let st = self.state.lock();
        match st.get(user) {
            Some(s) if s.period_start == l.period.start(now_ms) => (s.spent, s.reserved),
            _ => (0, 0),
        }
    }

    /// Checks a request and reserves its worst case. `Ok(None)`: the user
    /// has no limits. Sums saturate: the amounts come from client numbers,
    /// and a sum past every limit must refuse, never wrap around to pass.
    /// Leased budgets check against this instance's lease, and answer
    /// [`Refusal::Unleased`] when it does not fit.
    pub fn check(
        self: &Arc<Self>,
        user: &str,
        cost: i128,
        tokens: u64,
        now_ms: i64,
    ) -> Result<Option<Hold>, Refusal> {
        self.check_as(user, cost, tokens, now_ms, true)
    }

    /// [`Budgets::check`] against the whole budget as this instance knows
    /// its spend, leased or not: with the database away and the setting
    /// that keeps admitting then.
    pub fn check_unleased(
        self: &Arc<Self>,
        user: &str,
        cost: i128,
        tokens: u64,
        now_ms: i64,
    ) -> Result<Option<Hold>, Refusal> {
        self.check_as(user, cost, tokens, now_ms, false)
    }

    fn check_as(
        self: &Arc<Self>,
        user: &str,
        cost: i128,
        tokens: u64,
        now_ms: i64,
        leased: bool,
    ) -> Result<Option<Hold>, Refusal> {
        let Some((l, _)) = self.limits_of(user) else {
            return Ok(None);
        };
        let period_start = l.period.start(now_ms);
        let minute = now_ms.div_euclid(60_000);
        let next_minute = || (((minute + 1) * 60_000 - now_ms + 999) / 1000).max(1) as u64;
        let leasing = self.leasing.get().filter(|_| leased);
        let mono = leasing.map_or(0, |l| l.mono_ms());
        let mut st = self.state.lock();
        let s = st.entry(user.to_owned()).or_default();
        if s.period_start != period_start {
            s.start_period(period_start);
        }
        s.last_check = mono;
        // Only forward: a request stamped just before a new minute began
        // here counts in the new one (its slices are the live ones).
        if s.minute < minute {
            s.start_minute(minute);
        }
        let minute = s.minute;
        if let (Some(b), Some(_)) = (l.budget, leasing) {
            // A request over the whole budget never fits: it must not make
            // every later grant that large.
            if cost <= i128::from(b) {
                s.need = s.need.max(cost);
            }
            if cost == 0 {
                // Spends nothing: refused, as on one instance, only once
                // the spend known here reached the budget.
                if s.spent >= i128::from(b) {
                    return Err(self.over_budget_of(&l, now_ms));
                }
            } else if s.lease_until <= mono || !s.fits(cost) {
                return Err(Refusal::Unleased { need: cost });
            }
        } else if let Some(b) = l.budget {
            // Saturating: a reservation may be as large as a request's
            // fields make it.
            if s.spent.saturating_add(s.reserved).saturating_add(cost) > i128::from(b)
                || (cost == 0 && s.spent >= i128::from(b))
            {
                return Err(Refusal::Budget {
                    retry_after: l
                        .period
                        .end(now_ms)
                        .map(|e| ((e - now_ms + 999) / 1000).max(1) as u64),
                });
            }
        }
        if let Some(rpm) = l.rpm {
            if s.requests.saturating_add(1) > rpm {
                return Err(Refusal::Rate {
                    what: "requests",
                    retry_after: next_minute(),
                });
            }
            // Leased: within this instance's slice of the minute.
            if leasing.is_some() && s.requests.saturating_add(1) > s.rate_requests {
                return Err(Refusal::Unleased { need: cost });
            }
        }
        if let Some(tpm) = l.tpm {
            if s.tokens.saturating_add(tokens) > tpm {
                return Err(Refusal::Rate {
                    what: "tokens",
                    retry_after: next_minute(),
                });
            }
            if leasing.is_some() {
                s.token_need = s.token_need.max(tokens);
                if s.tokens.saturating_add(tokens) > s.rate_tokens {
                    return Err(Refusal::Unleased { need: cost });
                }
            }
        }
        s.reserved = s.reserved.saturating_add(cost);
        s.requests = s.requests.saturating_add(1);
        s.tokens = s.tokens.saturating_add(tokens);
        Ok(Some(Hold {
            budgets: self.clone(),
            user: user.to_owned(),
            cost,
            tokens,
            period_start,
            minute,
            done: false,
            also: None,
        }))
    }

    /// Every user with a budget and a counter in this instance: limits,
    /// period start and spent pico-dollars of the current period (for
    /// budget alerts).
    pub fn budgets_in_use(&self, now_ms: i64) -> Vec<(String, Limits, i64, i128)> {
        let users: Vec<(String, i64, i128)> = self
            .state
            .lock()
            .iter()
            .map(|(u, s)| (u.clone(), s.period_start, s.spent))
            .collect();
        users
            .into_iter()
            .filter_map(|(user, start, spent)| {
                let (l, _) = self.limits_of(&user)?;
                l.budget?;
                let now_start = l.period.start(now_ms);
                let spent = if start == now_start { spent } else { 0 };
                Some((user, l, now_start, spent))
            })
            .collect()
    }

    /// The refusal of a request over the user's budget (a leased budget
    /// whose pool had nothing left for it).
    pub fn over_budget(&self, user: &str, now_ms: i64) -> Refusal {
        match self.limits_of(user) {
            Some((l, _)) => self.over_budget_of(&l, now_ms),
            None => Refusal::Budget { retry_after: None },
        }
    }

    /// Why a leased request is refused after its grants were asked for:
    /// the budget's pool, else the minute's requests, else its tokens.
    pub fn short_refusal(&self, user: &str, cost: i128, tokens: u64, now_ms: i64) -> Refusal {
        let Some((l, _)) = self.limits_of(user) else {
            return Refusal::Budget { retry_after: None };
        };
        let minute = now_ms.div_euclid(60_000);
        let rate = |what| Refusal::Rate {
            what,
            retry_after: (((minute + 1) * 60_000 - now_ms + 999) / 1000).max(1) as u64,
        };
        let st = self.state.lock();
        let Some(s) = st.get(user) else {
            return self.over_budget_of(&l, now_ms);
        };
        let budget_short = l.budget.is_some()
            && cost > 0
            && (s.period_start != l.period.start(now_ms) || !s.fits(cost));
        let (used_requests, used_tokens, got_requests, got_tokens) = if s.minute >= minute {
            (s.requests, s.tokens, s.rate_requests, s.rate_tokens)
        } else {
            (0, 0, 0, 0)
        };
        if budget_short {
            self.over_budget_of(&l, now_ms)
        } else if l.rpm.is_some() && used_requests.saturating_add(1) > got_requests {
            rate("requests")
        } else if l.tpm.is_some() && used_tokens.saturating_add(tokens) > got_tokens {
            rate("tokens")
        } else {
            self.over_budget_of(&l, now_ms)
        }
    }

    fn over_budget_of(&self, l: &Limits, now_ms: i64) -> Refusal {
        Refusal::Budget {
            retry_after: l
                .period
                .end(now_ms)
                .map(|e| ((e - now_ms + 999) / 1000).max(1) as u64),
        }
    }

    /// Limits changed: grants found no room under the old ones.
    fn forget_backoffs(&self) {
        for s in self.state.lock().values_mut() {
            s.limits_changed();
        }
    }

    /// Ends a reservation at `cost` and `tokens`; `undo` also takes its
    /// request back off the minute's count.
    fn release(&self, h: &Hold, cost: i128, tokens: u64, undo: bool) {
        let mut st = self.state.lock();
        let Some(s) = st.get_mut(&h.user) else {
            return;
        };
        if s.period_start == h.period_start {
            s.reserved = s.reserved.saturating_sub(h.cost);
            s.spent = s.spent.saturating_add(cost);
            s.used = s.used.saturating_add(cost);
        }
        if s.minute == h.minute {
            s.tokens = s.tokens.saturating_add(tokens).saturating_sub(h.tokens);
            if undo {
                s.requests = s.requests.saturating_sub(1);
            }
        }
    }
}

#[cfg(test)]
mod tests;
