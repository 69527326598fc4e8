//! Budget leases, for instances sharing one database: each instance holds a
//! slice ("lease") of a user's remaining budget, granted by the database in
//! one atomic statement, and admits requests against it in memory exactly
//! as a single instance admits against the whole budget. The sum of live
//! leases never exceeds what remains, so instances together never spend
//! more than the budget (plus the per-request bound of one instance).
//!
//! The lease thread owns every database call: grants a request waits for
//! (its lease did not fit), grants made ahead of need (below the low-water
//! mark), unused leases given back when a user goes idle, and the renewal
//! of every lease of this instance (a lease expires, so a killed instance's
//! slice returns to the pool). A lease this instance could not renew in
//! time is no longer admitted against.
//!
//! Per-minute request and token limits are leased the same way, per
//! calendar minute: a slice of the minute's allowance, sized by the same
//! rule, refilled ahead of need and given back when the user goes idle. A
//! rate slice needs no renewal: it ends with its minute.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tokio::sync::oneshot;

use super::{Budgets, Hold, Limits, Refusal};

/// How long a lease lives without renewal: a killed instance's slice
/// returns to the pool this long after its last renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(5);

/// How often the leases of this instance are renewed: three tries before
/// they expire.
const RENEW_EVERY: Duration = Duration::from_millis(1250);

/// How often the thread looks for leases to refill or give back.
const TICK: Duration = Duration::from_millis(100);

/// A user without a request for this long gives back their unused lease.
pub const IDLE: Duration = Duration::from_secs(2);

/// After a grant found the pool empty, grants for that user wait this long
/// (its requests meanwhile are refused without asking); after a failed
/// call, every grant waits this long (requests get 503 meanwhile).
const BACKOFF: Duration = Duration::from_millis(500);

/// The lease size rule's divisor: a grant is at most this fraction of the
/// remaining budget per instance holding a lease of the user.
pub const SHARE_DIV: i64 = 2;

/// The lease size rule, as `tollgate_lease_take` applies it in the database
/// (schema step 5): of `room` (the budget less the spend written and every
/// live lease), a grant is `room / (SHARE_DIV * holders)` (`holders`: the
/// instances with a lease of this user, this one counted), at least `need`
/// (the largest reservation seen of the user, so one worst-case request
/// always fits) and at most `room`; nothing when `room < need`.
pub fn lease_size(room: i128, holders: u64, need: i128) -> i128 {
    let need = need.max(1);
    if room < need {
        return 0;
    }
    let share = room / (i128::from(SHARE_DIV) * i128::from(holders.max(1)));
    share.max(need).min(room)
}

/// What the database granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// Pico-dollars added to this instance's lease (0: nothing left).
    pub granted: i64,
    /// This instance had no live lease of the user for the period (never
    /// had one, or it expired): the lease is now exactly `granted`.
    pub reset: bool,
}

/// A rate grant asked for: of `minute`'s allowance under `rpm` and `tpm`
/// (`None`: no such limit), at least `requests` and `tokens` (0: none
/// asked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateAsk {
    /// The calendar minute (ms since the epoch / 60,000).
    pub minute: i64,
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens per minute.
    pub tpm: Option<u64>,
    /// The least number of requests a grant gives, if any.
    pub requests: u64,
    /// The least number of tokens a grant gives, if any.
    pub tokens: u64,
}

/// The database side of leases (PostgreSQL implements it).
pub trait LeaseSource: Send + Sync + 'static {
    /// Grants a slice of `user`'s remaining budget in the period starting at
    /// `period_start` under `limit`, sized by [`lease_size`] with `need`,
    /// living [`LEASE_TTL`]; in one atomic statement.
    fn take(&self, user: &str, period_start: i64, limit: i64, need: i64) -> Result<Taken, String>;
    /// Gives back `amount` of this instance's lease of `user`.
    fn give_back(&self, user: &str, period_start: i64, amount: i64) -> Result<(), String>;
    /// Grants slices of `user`'s requests and tokens in a minute, each
    /// sized by [`lease_size`], in one atomic statement: (requests, tokens).
    fn take_rate(&self, user: &str, ask: RateAsk) -> Result<(u64, u64), String>;
    /// Gives back unused requests and tokens of this instance's slice of
    /// `user`'s `minute`.
    fn give_back_rate(
        &self,
        user: &str,
        minute: i64,
        requests: u64,
        tokens: u64,
    ) -> Result<(), String>;
    /// Renews every live lease of this instance; returns the (user, period
    /// start) of those renewed.
    fn renew(&self) -> Result<Vec<(String, i64)>, String>;
    /// Drops every lease of this instance (at shutdown, once its records
    /// are written: a restarted instance need not wait for them to expire).
    fn release_all(&self) -> Result<(), String>;
}

/// Why a grant could not be asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Away;

/// What a request's check gives: its reservation, or why not.
pub type Checked = Result<Option<Hold>, Refusal>;

struct Ask {
    user: String,
    cost: i128,
    tokens: u64,
    now_ms: i64,
    reply: oneshot::Sender<Result<Checked, Away>>,
}

/// The handle the budgets hold while leasing.
pub(super) struct Leasing {
    tx: Sender<Ask>,
    base: Instant,
    source: Arc<dyn LeaseSource>,
    /// Set at shutdown: the lease thread stops taking and renewing.
    closed: std::sync::atomic::AtomicBool,
}

impl Leasing {
    /// Milliseconds since the leasing started (monotonic).
    pub(super) fn mono_ms(&self) -> i64 {
        self.base.elapsed().as_millis() as i64
    }

    fn at(&self, t: Instant) -> i64 {
        t.saturating_duration_since(self.base).as_millis() as i64
    }
}

impl Budgets {
    /// Makes budgets leased from `source` (several instances on one
    /// database): starts the lease thread, which ends with the budgets.
    pub fn start_leasing(self: &Arc<Self>, source: Arc<dyn LeaseSource>) -> std::io::Result<()> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let leasing = Leasing {
            tx,
            base: Instant::now(),
            source: source.clone(),
            closed: std::sync::atomic::AtomicBool::new(false),
        };
        if self.leasing.set(leasing).is_err() {
            return Ok(());
        }
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("tollgate-lease".into())
            .spawn(move || run(weak, source, rx))?;
        Ok(())
    }

    /// Gives every lease of this instance back to the pool, and admits
    /// nothing more against them; for shutdown, after the last records
    /// were written (the database counts them as spent by then).
    pub fn release_leases(&self) {
        let Some(leasing) = self.leasing.get() else {
            return;
        };
        leasing
            .closed
            .store(true, std::sync::atomic::Ordering::Release);
        for s in self.state.lock().values_mut() {
            s.lease_until = i64::MIN;
        }
        if let Err(e) = leasing.source.release_all() {
            tracing::warn!(error = %e, "cannot give back the budget leases; they expire on their own");
        }
    }

    /// Whether budgets are leased.
    pub fn leased(&self) -> bool {
        self.leasing.get().is_some()
    }

    /// A request its lease did not cover ([`Refusal::Unleased`]): the lease
    /// thread grows the lease (one database round trip) and makes the
    /// request's reservation itself, so that no request checking meanwhile
    /// takes what was granted for this one. Nothing left in the pool: over
    /// budget. `Err`: the database could not be asked within `wait`.
    pub async fn check_leased(
        &self,
        user: &str,
        cost: i128,
        tokens: u64,
        now_ms: i64,
        wait: Duration,
    ) -> Result<Checked, Away> {
        let Some(l) = self.leasing.get() else {
            return Err(Away);
        };
        let (reply, rx) = oneshot::channel();
        l.tx.send(Ask {
            user: user.to_owned(),
            cost,
            tokens,
            now_ms,
            reply,
        })
        .map_err(|_| Away)?;
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(r)) => r,
            _ => Err(Away),
        }
    }

    /// The lease figures of a user: (granted, used, reserved), for tests
    /// and the limits report.
    pub fn lease_of(&self, user: &str) -> (i128, i128, i128) {
        let st = self.state.lock();
        st.get(user)
            .map_or((0, 0, 0), |s| (s.granted, s.used, s.reserved))
    }

    /// Whether a request of `need` fits the user's live lease now.
    fn lease_fits(&self, user: &str, period_start: i64, need: i128, mono: i64) -> bool {
        let st = self.state.lock();
        st.get(user)
            .is_some_and(|s| s.period_start == period_start && s.lease_until > mono && s.fits(need))
    }

    /// Whether a grant for `user` found no room for `need` or less lately.
    fn backing_off(&self, user: &str, need: i128, mono: i64) -> bool {
        self.state
            .lock()
            .get(user)
            .is_some_and(|s| s.backoff_until > mono && need >= s.backoff_need)
    }

    /// The start of the user's current budget period.
    fn period_of(&self, user: &str, now_ms: i64) -> i64 {
        self.limits_of(user)
            .map_or(0, |(l, _)| l.period.start(now_ms))
    }

    /// What the user's live lease has left (0 without one).
    fn lease_left(&self, user: &str, period_start: i64, mono: i64) -> i128 {
        let st = self.state.lock();
        st.get(user)
            .filter(|s| s.period_start == period_start && s.lease_until > mono)
            .map_or(0, |s| s.avail())
    }

    /// Holds back grants of `user` of `need` or more until `until`
    /// (monotonic ms).
    fn backoff(&self, user: &str, need: i128, until: i64) {
        if let Some(s) = self.state.lock().get_mut(user) {
            s.backoff_until = until;
            s.backoff_need = need;
        }
    }

    /// Adds a grant to the local lease, valid until `until` (monotonic ms).
    fn add_lease(&self, user: &str, period_start: i64, t: Taken, until: i64) {
        let mut st = self.state.lock();
        let s = st.entry(user.to_owned()).or_default();
        if s.period_start != period_start {
            s.start_period(period_start);
        }
        if t.reset {
            // The database knows nothing else of this instance's lease.
            s.granted = s.used.saturating_add(s.reserved);
        }
        s.granted = s.granted.saturating_add(i128::from(t.granted));
        s.lease_until = until;
    }

    /// What to ask for so that a request of `tokens` fits the user's rate
    /// slices of `minute`; `None` when they fit, or when the pool of that
    /// minute was found empty for as much.
    fn rate_shortfall(&self, user: &str, minute: i64, l: &Limits, tokens: u64) -> Option<RateAsk> {
        let mut st = self.state.lock();
        let s = st.entry(user.to_owned()).or_default();
        if s.minute < minute {
            s.start_minute(minute);
        }
        let minute = s.minute;
        let requests = if l.rpm.is_some() && s.requests.saturating_add(1) > s.rate_requests {
            1
        } else {
            0
        };
        let tokens = match l.tpm {
            Some(_) => s
                .tokens
                .saturating_add(tokens)
                .saturating_sub(s.rate_tokens),
            None => 0,
        };
        if requests == 0 && tokens == 0 {
            return None;
        }
        if let Some((m, no_requests, no_tokens)) = s.rate_empty {
            if m == minute && ((requests > 0 && no_requests) || tokens >= no_tokens) {
                return None;
            }
        }
        Some(RateAsk {
            minute,
            rpm: l.rpm,
            tpm: l.tpm,
            requests,
            tokens,
        })
    }

    /// Adds rate grants to the user's slices of their minute.
    fn add_rate(&self, user: &str, ask: RateAsk, requests: u64, tokens: u64) {
        let mut st = self.state.lock();
        let s = st.entry(user.to_owned()).or_default();
        if s.minute < ask.minute {
            s.start_minute(ask.minute);
        } else if s.minute > ask.minute {
            // A grant for a minute already over: it ends unused.
            return;
        }
        s.rate_requests = s.rate_requests.saturating_add(requests);
        s.rate_tokens = s.rate_tokens.saturating_add(tokens);
        let no_requests = ask.requests > 0 && requests == 0;
        let no_tokens = if ask.tokens > 0 && tokens == 0 {
            ask.tokens
        } else {
            u64::MAX
        };
        if no_requests || no_tokens < u64::MAX {
            s.rate_empty = Some((ask.minute, no_requests, no_tokens));
        }
    }
}

/// Per user: what the thread does with it on this tick.
enum Chore {
    Refill(i128),
    GiveBack,
    /// Rate slices for the current minute, ahead of the next request.
    RefillRate(u64),
    GiveBackRate(i64),
}

fn run(budgets: Weak<Budgets>, source: Arc<dyn LeaseSource>, rx: Receiver<Ask>) {
    let mut next_renew = Instant::now();
    let mut next_tick = Instant::now();
    // Fail fast while the database is away, rather than one connect per ask.
    let mut failing_until: Option<Instant> = None;
    loop {
        let ask = match rx.recv_deadline(next_tick.min(next_renew)) {
            Ok(a) => Some(a),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let Some(b) = budgets.upgrade() else { return };
        let Some(leasing) = b.leasing.get() else {
            return;
        };
        if leasing.closed.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let failing = failing_until.is_some_and(|t| Instant::now() < t);
        if let Some(a) = ask {
            let r = match b.check(&a.user, a.cost, a.tokens, a.now_ms) {
                Err(Refusal::Unleased { .. }) if failing => Err(Away),
                Err(Refusal::Unleased { need }) => {
                    // The pool was empty just now: refused without asking
                    // again (a burst asks once).
                    let mono = leasing.mono_ms();
                    let period = b.period_of(&a.user, a.now_ms);
                    let short = need.saturating_sub(b.lease_left(&a.user, period, mono).max(0));
                    let took = if b.backing_off(&a.user, short, mono) {
                        Ok(())
                    } else {
                        take(&b, leasing, &*source, &a.user, need)
                    };
                    took.and_then(|()| take_rate(&b, &*source, &a.user, a.tokens, a.now_ms))
                        .map(|()| match b.check(&a.user, a.cost, a.tokens, a.now_ms) {
                            Err(Refusal::Unleased { .. }) => {
                                Err(b.short_refusal(&a.user, a.cost, a.tokens, a.now_ms))
                            }
                            r => r,
                        })
                }
                // Covered by a grant made for an earlier ask.
                r => Ok(r),
            };
            if r.is_err() {
                failing_until = Some(Instant::now() + BACKOFF);
            }
            let _ = a.reply.send(r);
            continue;
        }
        let now = Instant::now();
        if now >= next_renew {
            next_renew = now + RENEW_EVERY;
            match source.renew() {
                Ok(live) => {
                    failing_until = None;
                    renewed(&b, leasing.at(now + LEASE_TTL), &live);
                }
                Err(e) => {
                    failing_until = Some(now + BACKOFF);
                    tracing::warn!(error = %e, "cannot renew budget leases; they lapse if this goes on");
                }
            }
        }
        if now >= next_tick {
            next_tick = now + TICK;
            if !failing {
                chores(&b, leasing, &*source);
            }
        }
    }
}

/// Asks the database for a grant of at least `need` (unless it fits now:
/// a grant made for another request may have covered it).
fn take(
    b: &Budgets,
    leasing: &Leasing,
    source: &dyn LeaseSource,
    user: &str,
    need: i128,
) -> Result<(), Away> {
    let now_ms = crate::timestamp::now_ms();
    let Some(limit) = b
        .limits_of(user)
        .and_then(|(l, _)| Some((l.budget?, l.period)))
    else {
        return Ok(());
    };
    let period_start = limit.1.start(now_ms);
    let mono = leasing.mono_ms();
    if b.lease_fits(user, period_start, need, mono) {
        return Ok(());
    }
    // Only what the live lease lacks: its rest and the grant together
    // cover the request, so no slice too small for one request is stranded.
    let short = need.saturating_sub(b.lease_left(user, period_start, mono).max(0));
    let sent = Instant::now();
    let need = i64::try_from(short.max(1)).unwrap_or(i64::MAX);
    match source.take(user, period_start, limit.0, need) {
        Ok(t) => {
            b.add_lease(user, period_start, t, leasing.at(sent + LEASE_TTL));
            if t.granted == 0 {
                b.backoff(
                    user,
                    i128::from(need),
                    leasing.mono_ms() + BACKOFF.as_millis() as i64,
                );
            }
            Ok(())
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot take a budget lease");
            Err(Away)
        }
    }
}

/// Asks the database for rate slices so that a request of `tokens` fits
/// (unless it fits now, or the minute's pool was found empty for it).
fn take_rate(
    b: &Budgets,
    source: &dyn LeaseSource,
    user: &str,
    tokens: u64,
    now_ms: i64,
) -> Result<(), Away> {
    let Some((l, _)) = b.limits_of(user) else {
        return Ok(());
    };
    if l.rpm.is_none() && l.tpm.is_none() {
        return Ok(());
    }
    let minute = now_ms.div_euclid(60_000);
    let Some(ask) = b.rate_shortfall(user, minute, &l, tokens) else {
        return Ok(());
    };
    match source.take_rate(user, ask) {
        Ok((requests, tokens)) => {
            b.add_rate(user, ask, requests, tokens);
            Ok(())
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot take a rate lease");
            Err(Away)
        }
    }
}

/// After a renewal: the leases renewed live on; any other this instance
/// held has lapsed in the database, so it is not admitted against.
fn renewed(b: &Budgets, until: i64, live: &[(String, i64)]) {
    let live: std::collections::HashSet<(&str, i64)> =
        live.iter().map(|(u, p)| (u.as_str(), *p)).collect();
    let mut st = b.state.lock();
    for (user, s) in st.iter_mut() {
        if live.contains(&(user.as_str(), s.period_start)) {
            s.lease_until = until;
        } else if s.granted != s.used.saturating_add(s.reserved) || s.lease_until > 0 {
            s.granted = s.used.saturating_add(s.reserved);
            s.lease_until = 0;
        }
    }
}

/// Refills leases below their low-water mark of users still active, and
/// gives back the unused lease of idle users; rate slices likewise (an
/// active user's slices of a new minute are taken as it begins).
fn chores(b: &Budgets, leasing: &Leasing, source: &dyn LeaseSource) {
    let now_ms = crate::timestamp::now_ms();
    let minute = now_ms.div_euclid(60_000);
    let mono = leasing.mono_ms();
    let mut work = Vec::new();
    {
        let st = b.state.lock();
        for (user, s) in st.iter() {
            let avail = s.avail();
            let idle = mono - s.last_check >= IDLE.as_millis() as i64;
            if idle {
                if s.minute == minute && (s.rate_requests > s.requests || s.rate_tokens > s.tokens)
                {
                    work.push((user.clone(), s.period_start, Chore::GiveBackRate(minute)));
                }
            } else {
                work.push((
                    user.clone(),
                    s.period_start,
                    Chore::RefillRate(s.token_need),
                ));
            }
            if idle {
                if avail > 0 && s.lease_until > mono {
                    work.push((user.clone(), s.period_start, Chore::GiveBack));
                }
            } else if s.need > 0 && (s.lease_until <= mono || avail < s.low_water()) {
                // `need` is set by requests only: users merely known
                // (their spend read at start) are not leased ahead.
                if s.backoff_until <= mono {
                    work.push((user.clone(), s.period_start, Chore::Refill(s.need)));
                }
            }
        }
    }
    for (user, period_start, chore) in work {
        match chore {
            Chore::RefillRate(tokens) => {
                if take_rate(b, source, &user, tokens, now_ms).is_err() {
                    return;
                }
                continue;
            }
            Chore::GiveBackRate(minute) => {
                give_back_rate(b, source, &user, minute);
                continue;
            }
            _ => {}
        }
        let current = b
            .limits_of(&user)
            .and_then(|(l, _)| l.budget.map(|_| l.period.start(now_ms)))
            == Some(period_start);
        if !current {
            continue;
        }
        match chore {
            Chore::Refill(need) => {
                if take(b, leasing, source, &user, need).is_err() {
                    return;
                }
            }
            Chore::GiveBack => give_back(b, source, &user, period_start, mono),
            Chore::RefillRate(_) | Chore::GiveBackRate(_) => {}
        }
    }
}

/// Gives back what the user's lease holds unused: taken from the local
/// lease first (no request can use it meanwhile), restored if the database
/// did not take it back.
fn give_back(b: &Budgets, source: &dyn LeaseSource, user: &str, period_start: i64, mono: i64) {
    let amount = {
        let mut st = b.state.lock();
        let Some(s) = st.get_mut(user) else { return };
        let avail = s.avail();
        if s.period_start != period_start || avail <= 0 || s.lease_until <= mono {
            return;
        }
        s.granted -= avail;
        s.need = 0;
        avail
    };
    let n = i64::try_from(amount).unwrap_or(i64::MAX);
    if let Err(e) = source.give_back(user, period_start, n) {
        tracing::warn!(error = %e, "cannot give back a budget lease; keeping it");
        let mut st = b.state.lock();
        if let Some(s) = st.get_mut(user) {
            if s.period_start == period_start {
                s.granted = s.granted.saturating_add(i128::from(n));
            }
        }
    }
}

/// Gives back the unused part of an idle user's rate slices of `minute`,
/// restored if the database did not take it back.
fn give_back_rate(b: &Budgets, source: &dyn LeaseSource, user: &str, minute: i64) {
    let (requests, tokens) = {
        let mut st = b.state.lock();
        let Some(s) = st.get_mut(user) else { return };
        if s.minute != minute {
            return;
        }
        let unused = (
            s.rate_requests.saturating_sub(s.requests),
            s.rate_tokens.saturating_sub(s.tokens),
        );
        s.rate_requests -= unused.0;
        s.rate_tokens -= unused.1;
        s.token_need = 0;
        unused
    };
    if requests == 0 && tokens == 0 {
        return;
    }
    if let Err(e) = source.give_back_rate(user, minute, requests, tokens) {
        tracing::warn!(error = %e, "cannot give back a rate lease; keeping it");
        let mut st = b.state.lock();
        if let Some(s) = st.get_mut(user) {
            if s.minute == minute {
                s.rate_requests = s.rate_requests.saturating_add(requests);
                s.rate_tokens = s.rate_tokens.saturating_add(tokens);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_a_share_of_what_remains_per_holder() {
        // One holder: half of what remains.
        assert_eq!(lease_size(1000, 1, 10), 500);
        // Three holders: a sixth.
        assert_eq!(lease_size(1200, 3, 10), 200);
        // Holders counted at least once.
        assert_eq!(lease_size(1000, 0, 10), 500);
    }

    #[test]
    fn a_lease_always_fits_one_worst_case_request() {
        // Small budget, many instances: the share is below one request, so
        // the grant is that request (no starvation).
        assert_eq!(lease_size(100, 10, 30), 30);
        // Never more than what remains.
        assert_eq!(lease_size(30, 10, 30), 30);
        // Nothing when even one request does not fit: the request is refused.
        assert_eq!(lease_size(29, 1, 30), 0);
        assert_eq!(lease_size(0, 1, 0), 0);
        // A zero need still asks for something.
        assert_eq!(lease_size(1, 1, 0), 1);
        assert_eq!(
            lease_size(i128::from(i64::MAX), 1, 1),
            i128::from(i64::MAX) / 2
        );
    }

    #[test]
    fn leases_shrink_as_the_pool_empties() {
        // Three instances taking in turn from a budget of 100 requests of
        // 1: the grants shrink and their sum never exceeds the budget.
        let (mut room, mut taken) = (100i128, Vec::new());
        for holders in [
            1u64, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3,
        ] {
            let g = lease_size(room, holders, 1);
            room -= g;
            taken.push(g);
        }
        assert_eq!(taken[..3], [50, 12, 6]);
        assert!(taken.iter().sum::<i128>() <= 100);
        assert_eq!(room, 100 - taken.iter().sum::<i128>());
        assert!(taken.iter().all(|&g| g >= 1 || room == 0));
    }
}
