//! Admission: a request goes upstream only with its worst case reserved
//! against its user's budget and rates, and with room for its record in the
//! usage queue (so a record never waits for room, and is never dropped).

use std::time::Duration;

use crate::app::App;
use crate::budget::{Hold, Refusal};
use crate::endpoint::Endpoint;
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
        let (cost, tokens) = reservation(app, ctx);
        match app.budgets.check(&ctx.user, cost, tokens, ctx.started_ms) {
            Ok(h) => h,
            Err(refusal) => {
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

/// The worst-case cost (pico-dollars) and tokens a request may spend: a
/// prompt of at most one token per 3 bytes of body plus the answer size it
/// asks for times the answers it asks for (or the configured default), at
/// the requested model's prices.
fn reservation(app: &App, ctx: &Ctx) -> (i128, u64) {
    if !ctx.endpoint.needs_model() {
        return (0, 0);
    }
    let r = &ctx.request;
    let prompt = (r.body.len() as u64).div_ceil(3);
    let answer = if ctx.endpoint == Endpoint::Embeddings {
        0
    } else {
        r.max_tokens
            .unwrap_or(app.config.reserve_answer_tokens)
            .saturating_mul(r.choices)
    };
    let cost = app
        .store
        .prices()
        .lookup(&r.model, &r.model, ctx.started_ms)
        .map_or(0, |(_, p)| {
            // Saturating: a sum past any budget refuses, it never wraps.
            i128::from(prompt)
                .saturating_mul(i128::from(p.query))
                .saturating_add(i128::from(answer).saturating_mul(i128::from(p.answer)))
        });
    (cost, prompt.saturating_add(answer))
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
