//! Admission: a request goes upstream only with its worst case reserved
//! against its user's budget and rates, and with room for its record in the
//! usage queue (so a record never waits for room, and is never dropped).

use std::time::Duration;

use crate::app::App;
use crate::budget::{Hold, Refusal};
use crate::config::BudgetOffline;
use crate::error::ApiError;
use crate::record::Rejected;
use crate::store::Slot;

use super::Ctx;

/// Longest a request waits for room in the usage queue before a 503.
const QUEUE_WAIT: Duration = Duration::from_secs(10);

/// Longest a request waits for a grant of budget lease before a 503.
const LEASE_WAIT: Duration = Duration::from_secs(3);

/// What an admitted request holds until its record is written.
pub struct Admission {
    /// The budget reservation (none when no limit applies).
    pub hold: Option<Hold>,
    /// Room for the record in the usage queue.
    pub slot: Slot,
}

/// Reserves the request's worst case and a queue slot, or refuses it. A
/// refusal is counted (metrics and `/usage`), never recorded as a query.
/// The request must fit its user's limits and its project's: when one
/// refuses, what the other reserved is undone before the answer.
pub async fn admit(app: &App, ctx: &Ctx) -> Result<Admission, ApiError> {
    let user_limited = app.budgets.active();
    let project = ctx
        .project
        .as_deref()
        .filter(|_| app.project_budgets.active());
    let hold = if user_limited || project.is_some() {
        let (cost, tokens) = super::reserve::reservation(app, ctx);
        let user_hold = if user_limited {
            check(app, &app.budgets, &ctx.user, ctx, cost, tokens)
                .await
                .map_err(|r| refused(app, ctx, r, Scope::User))?
        } else {
            None
        };
        let project_hold = match project {
            Some(p) => match check(app, &app.project_budgets, p, ctx, cost, tokens).await {
                Ok(h) => h,
                Err(r) => {
                    if let Some(h) = user_hold {
                        h.cancel();
                    }
                    return Err(refused(app, ctx, r, Scope::Project));
                }
            },
            None => None,
        };
        match (user_hold, project_hold) {
            (Some(u), Some(p)) => Some(u.with(p)),
            (u, p) => u.or(p),
        }
    } else {
        None
    };
    let slot = app
        .store
        .reserve(QUEUE_WAIT)
        .await
        .ok_or_else(|| ApiError::unavailable("usage store is far behind; try again shortly"))?;
    Ok(Admission { hold, slot })
}

/// Whose limit refused a request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    User,
    Project,
}

/// Counts a refusal and turns it into the answer.
fn refused(app: &App, ctx: &Ctx, r: Refused, scope: Scope) -> ApiError {
    match r {
        Refused::Unavailable => ApiError::unavailable(
            "the budget database is unreachable and this instance's budget lease is used up; try again shortly",
        )
        .with_code("service_unavailable"),
        Refused::Limit(refusal) => {
            if matches!(refusal, Refusal::Budget { .. }) {
                match (scope, ctx.project.as_deref()) {
                    (Scope::User, _) => app.alerts.refused(&ctx.user),
                    (Scope::Project, Some(p)) => app.alerts.project_refused(p),
                    (Scope::Project, None) => {}
                }
            }
            app.store.reject(Rejected {
                at_ms: ctx.started_ms,
                user: ctx.user.clone(),
                model: ctx.request.model.clone(),
                reason: refusal.code(),
            });
            refusal_error(refusal, scope)
        }
    }
}

enum Refused {
    Limit(Refusal),
    Unavailable,
}

/// The budget check of `name` (a user, or a project) in `b`; a leased
/// budget whose lease does not cover the request hands the check to the
/// lease thread, which asks the database for more (one round trip).
/// Nothing granted: over budget. The database away: 503, or with
/// `--budget-offline admit` the whole budget as this instance knows it.
async fn check(
    app: &App,
    b: &std::sync::Arc<crate::budget::Budgets>,
    name: &str,
    ctx: &Ctx,
    cost: i128,
    tokens: u64,
) -> Result<Option<Hold>, Refused> {
    match b.check(name, cost, tokens, ctx.started_ms) {
        Err(Refusal::Unleased { .. }) => {}
        r => return r.map_err(Refused::Limit),
    }
    match b
        .check_leased(name, cost, tokens, ctx.started_ms, LEASE_WAIT)
        .await
    {
        Ok(r) => r.map_err(Refused::Limit),
        Err(_) if app.config.budget_offline == BudgetOffline::Admit => b
            .check_unleased(name, cost, tokens, ctx.started_ms)
            .map_err(Refused::Limit),
        Err(_) => Err(Refused::Unavailable),
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> ApiError {
        refusal_error(r, Scope::User)
    }
}

/// A refusal's answer, saying whose limit it was: the user's or the
/// project's (both apply to a request of a project).
fn refusal_error(r: Refusal, scope: Scope) -> ApiError {
    let code = r.code();
    let (who, their) = match scope {
        Scope::User => ("This user", "their"),
        Scope::Project => ("This request's project", "its"),
    };
    match r {
        // `Unleased` is never answered as such: `check` asks for a lease first.
        Refusal::Budget { retry_after } => ApiError::too_many(
            code,
            format!("{who} has used up {their} budget for this period."),
            retry_after,
        ),
        Refusal::Unleased { .. } => ApiError::too_many(
            code,
            format!("{who} has used up {their} budget for this period."),
            None,
        ),
        Refusal::Rate { what, retry_after } => ApiError::too_many(
            code,
            format!("{who} is over {their} {what}-per-minute limit."),
            Some(retry_after),
        ),
    }
}
