//! Admission: a request goes upstream only with its worst case reserved
//! against its user's budget and rates, and with room for its record in the
//! usage queue (so a record never waits for room, and is never dropped).

use std::time::Duration;

use crate::app::App;
use crate::budget::{Hold, Refusal};
use crate::error::ApiError;
use crate::record::Rejected;
use crate::store::Slot;

use super::Ctx;

/// Longest a request waits for room in the usage queue before a 503.
const QUEUE_WAIT: Duration = Duration::from_secs(10);

/// What an admitted request holds until its record is written.
pub struct Admission {
    /// The budget reservation (none when no limit applies).
    pub hold: Option<Hold>,
    /// Room for the record in the usage queue.
    pub slot: Slot,
}

/// Reserves the request's worst case and a queue slot, or refuses it. A
/// refusal is counted (metrics and `/usage`), never recorded as a query.
pub async fn admit(app: &App, ctx: &Ctx) -> Result<Admission, ApiError> {
    let hold = if app.budgets.active() {
        let (cost, tokens) = super::reserve::reservation(app, ctx);
        match app.budgets.check(&ctx.user, cost, tokens, ctx.started_ms) {
            Ok(h) => h,
            Err(refusal) => {
                if matches!(refusal, Refusal::Budget { .. }) {
                    app.alerts.refused(&ctx.user);
                }
                app.store.reject(Rejected {
                    at_ms: ctx.started_ms,
                    user: ctx.user.clone(),
                    model: ctx.request.model.clone(),
                    reason: refusal.code(),
                });
                return Err(refusal.into());
            }
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

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> ApiError {
        let code = r.code();
        match r {
            Refusal::Budget { retry_after } => ApiError::too_many(
                code,
                "This user has used up their budget for this period.",
                retry_after,
            ),
            Refusal::Rate { what, retry_after } => ApiError::too_many(
                code,
                format!("This user is over their {what}-per-minute limit."),
                Some(retry_after),
            ),
        }
    }
}
