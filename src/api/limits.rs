//! `/users/{user}/limits` and `/limits/default`: read, set and remove a
//! user's (or the default) budget and rates, with the spend so far; `/limits`
//! lists every limited user's.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::value::RawValue;

use super::{accounts::accounts, blocking, catch_up, internal, ok, read_body, Scaled, Time};
use crate::app::App;
use crate::budget::{Limits, Period};
use crate::error::ApiError;
use crate::http::Body;
use crate::pricing;

/// A user's (or the default) limits as answered.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct View<'a> {
    user: Option<&'a str>,
    /// The user has no limits of their own: these are the default.
    default: bool,
    budget: Option<Scaled>,
    period: &'static str,
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
    /// Only for a user who has limits (their own or the default).
    #[serde(flatten)]
    spend: Option<Spend>,
}

/// Spend in the current period of a limited user.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Spend {
    spent: Scaled,
    reserved: Scaled,
    remaining: Option<Scaled>,
    period_start: Option<Time>,
    period_end: Option<Time>,
}

impl<'a> View<'a> {
    /// From the in-memory budgets (no storage read).
    pub(super) fn of(app: &App, user: Option<&'a str>) -> View<'a> {
        let now = crate::timestamp::now_ms();
        let (limits, is_default) = match user {
            Some(u) => match app.budgets.limits_of(u) {
                Some((l, d)) => (Some(l), d),
                None => (None, false),
            },
            None => (app.budgets.default_limits(), true),
        };
        let spend = match (user, limits) {
            (Some(u), Some(l)) => {
                let (spent, reserved) = app.budgets.spent(u, now);
                Some(Spend {
                    spent: Scaled::dollars(spent),
                    reserved: Scaled::dollars(reserved),
                    remaining: l
                        .budget
                        .map(|b| Scaled::dollars((i128::from(b) - spent - reserved).max(0))),
                    period_start: (l.period != Period::Total).then(|| Time(l.period.start(now))),
                    period_end: l.period.end(now).map(Time),
                })
            }
            _ => None,
        };
        let l = limits.unwrap_or_default();
        View {
            user,
            default: is_default,
            budget: l.budget.map(|b| Scaled::dollars(b.into())),
            period: l.period.as_str(),
            requests_per_minute: l.rpm,
            tokens_per_minute: l.tpm,
            spend,
        }
    }
}

/// Parses a limits body: `budget` (dollars), `period`, `requestsPerMinute`,
/// `tokensPerMinute`; every field optional, `null` meaning no limit.
pub fn parse_limits_body(body: &[u8]) -> Result<Limits, ApiError> {
    let fields: BTreeMap<String, &RawValue> = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("body must be a JSON object: {e}")))?;
    let mut l = Limits::default();
    for (k, raw) in &fields {
        let v = raw.get().trim();
        if v == "null" {
            continue;
        }
        match k.as_str() {
            "budget" => {
                l.budget =
                    Some(pricing::parse_scaled(v, 12).map_err(|e| {
                        ApiError::bad_param("budget", format!("budget (dollars) {e}"))
                    })?)
            }
            "period" => {
                let s: String = serde_json::from_str(v).unwrap_or_default();
                l.period = Period::parse(&s).ok_or_else(|| {
                    ApiError::bad_param("period", "period must be day, week, month or total")
                })?;
            }
            "requestsPerMinute" | "tokensPerMinute" => {
                let n: u64 = v.parse().map_err(|_| {
                    ApiError::bad_param(k, format!("{k} must be a non-negative integer"))
                })?;
                if k == "requestsPerMinute" {
                    l.rpm = Some(n);
                } else {
                    l.tpm = Some(n);
                }
            }
            other => {
                return Err(ApiError::bad_param(other, format!("unknown field {other}")));
            }
        }
    }
    Ok(l)
}

/// `GET`: a user's limits (`None`: the default).
pub(super) fn get(app: &Arc<App>, user: Option<&str>) -> Result<Response<Body>, ApiError> {
    ok(&View::of(app, user))
}

/// `GET /limits`: every user under a limit (their own or the default),
/// with their spend, by name.
pub(super) fn list(app: &Arc<App>) -> Result<Response<Body>, ApiError> {
    let users = app.budgets.limited_users();
    let views: Vec<View> = users.iter().map(|u| View::of(app, Some(u))).collect();
    ok(&views)
}

/// `PUT`: sets them.
pub(super) async fn put(
    app: &Arc<App>,
    user: Option<String>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = read_body(req).await?;
    let l = parse_limits_body(&body)?;
    save(app, user.clone(), Some(l)).await?;
    get(app, user.as_deref())
}

/// `DELETE`: removes them.
pub(super) async fn delete(
    app: &Arc<App>,
    user: Option<String>,
) -> Result<Response<Body>, ApiError> {
    save(app, user.clone(), None).await?;
    get(app, user.as_deref())
}

/// Stores the limits, then applies them in memory with the spend so far.
async fn save(app: &Arc<App>, user: Option<String>, l: Option<Limits>) -> Result<(), ApiError> {
    let (u, stored) = (user.clone(), l);
    accounts(app, move |a| a.save_limits(u.as_deref(), stored.as_ref())).await?;
    match user.as_deref() {
        Some(u) => app.budgets.set_limits(u, l),
        None => app.budgets.set_default(l),
    }
    // Spend so far in the (new) period counts from now on.
    catch_up(app).await;
    let st = app.clone();
    blocking(move || st.rebuild_spend())
        .await?
        .map_err(internal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_bodies() {
        let l = parse_limits_body(
            br#"{"budget":1.5,"period":"week","requestsPerMinute":10,"tokensPerMinute":null}"#,
        )
        .unwrap();
        assert_eq!(l.budget, Some(1_500_000_000_000));
        assert_eq!(l.period, Period::Week);
        assert_eq!((l.rpm, l.tpm), (Some(10), None));
        for (body, param) in [
            (r#"{"budget":-1}"#, "budget"),
            (r#"{"period":"year"}"#, "period"),
            (r#"{"requestsPerMinute":1.5}"#, "requestsPerMinute"),
            (r#"{"burst":1}"#, "burst"),
        ] {
            let e = parse_limits_body(body.as_bytes()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
    }
}
