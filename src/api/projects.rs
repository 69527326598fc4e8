//! `/projects` and `/projects/{name}`: projects, their members and alert
//! webhooks;
//! `/projects/{name}/limits`: a project's limits (the body and answer of
//! `/users/{user}/limits`), with its spend so far.

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use serde::Serialize;

use super::{
    accounts::accounts, blocking, catch_up, created, internal, ok, read_body, Scaled, Time,
};
use crate::app::App;
use crate::budget::{Limits, Period};
use crate::error::ApiError;
use crate::http::Body;
use crate::store::ProjectInfo;

/// A project as answered.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct View {
    name: String,
    members: Vec<String>,
    /// `null` while the project has no limits of its own.
    limits: Option<LimitsView>,
    /// Only for a project with its own alert webhook: its host (a webhook
    /// URL may hold a secret, so it is never answered whole).
    #[serde(skip_serializing_if = "Option::is_none")]
    alerts: Option<AlertsView>,
}

/// Where a project's alerts go.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AlertsView {
    webhook_host: String,
}

/// A project's limits and spend in the current period.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LimitsView {
    budget: Option<Scaled>,
    period: &'static str,
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
    spent: Scaled,
    reserved: Scaled,
    remaining: Option<Scaled>,
    period_start: Option<Time>,
    period_end: Option<Time>,
}

impl LimitsView {
    fn of(app: &App, name: &str, l: Limits) -> LimitsView {
        let now = crate::timestamp::now_ms();
        let (spent, reserved) = app.project_budgets.spent(name, now);
        LimitsView {
            budget: l.budget.map(|b| Scaled::dollars(b.into())),
            period: l.period.as_str(),
            requests_per_minute: l.rpm,
            tokens_per_minute: l.tpm,
            spent: Scaled::dollars(spent),
            reserved: Scaled::dollars(reserved),
            remaining: l
                .budget
                .map(|b| Scaled::dollars((i128::from(b) - spent - reserved).max(0))),
            period_start: (l.period != Period::Total).then(|| Time(l.period.start(now))),
            period_end: l.period.end(now).map(Time),
        }
    }
}

/// A project's answer, from memory; `None` if it does not exist.
fn view(app: &App, name: &str) -> Option<View> {
    let p = app.projects.get(name)?;
    Some(View {
        name: name.to_owned(),
        members: p.members,
        alerts: p.webhook.map(|u| AlertsView {
            webhook_host: u.host().unwrap_or("").to_owned(),
        }),
        limits: app
            .project_budgets
            .own_limits(name)
            .map(|l| LimitsView::of(app, name, l)),
    })
}

fn checked(name: &str) -> Result<(), ApiError> {
    crate::projects::check_name(name).map_err(|e| ApiError::bad_param("name", e))
}

fn no_such(name: &str) -> ApiError {
    ApiError::not_found(format!("no project {name}")).with_code("not_found")
}

/// A parsed project body.
#[derive(Debug, PartialEq, Eq)]
pub struct ProjectUpdate {
    /// Members, sorted, each once.
    pub members: Vec<String>,
    /// `None`: keep the webhook; `Some(None)`: remove it.
    pub webhook: Option<Option<http::Uri>>,
}

/// Parses a project body: `{"members": ["ann", "bob"]}`, optionally with
/// `"alerts": {"webhook": "https://..."}`; the members come back sorted,
/// each once.
pub fn parse_project_body(body: &[u8]) -> Result<ProjectUpdate, ApiError> {
    use serde_json::Value;
    let shape = "a JSON object like {\"members\": [\"ann\", \"bob\"], \"alerts\": {\"webhook\": \"https://...\"}}";
    let mut fields: serde_json::Map<String, Value> = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_param("members", format!("body must be {shape}: {e}")))?;
    if let Some(other) = fields
        .keys()
        .find(|k| !matches!(k.as_str(), "members" | "alerts"))
    {
        return Err(ApiError::bad_param(other, format!("unknown field {other}")));
    }
    let members: Vec<String> = match fields.remove("members") {
        Some(Value::Array(a)) => a
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                _ => Err(ApiError::bad_param(
                    "members",
                    "members must be user names (strings)",
                )),
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(ApiError::bad_param(
                "members",
                format!("body must be {shape}"),
            ))
        }
    };
    let bad_alerts = || {
        ApiError::bad_param(
            "alerts",
            "alerts must be null or {\"webhook\": URL or null}",
        )
    };
    let webhook = match fields.remove("alerts") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::Object(mut a)) => {
            let w = a.remove("webhook");
            if !a.is_empty() {
                return Err(bad_alerts());
            }
            match w {
                None | Some(Value::Null) => Some(None),
                Some(Value::String(u)) => Some(Some(
                    crate::projects::check_webhook(&u)
                        .map_err(|e| ApiError::bad_param("alerts", e))?,
                )),
                Some(_) => return Err(bad_alerts()),
            }
        }
        Some(_) => return Err(bad_alerts()),
    };
    let b = ProjectUpdate { members, webhook };
    if b.members.len() > crate::projects::MAX_MEMBERS {
        return Err(ApiError::bad_param(
            "members",
            format!(
                "a project has at most {} members",
                crate::projects::MAX_MEMBERS
            ),
        ));
    }
    for m in &b.members {
        crate::projects::check_member(m).map_err(|e| ApiError::bad_param("members", e))?;
    }
    let mut members = b.members;
    members.sort_unstable();
    members.dedup();
    Ok(ProjectUpdate {
        members,
        webhook: b.webhook,
    })
}

/// `GET /projects`: every project, by name.
pub(super) fn list(app: &Arc<App>) -> Result<Response<Body>, ApiError> {
    let all: Vec<View> = app
        .projects
        .names()
        .iter()
        .filter_map(|n| view(app, n))
        .collect();
    ok(&all)
}

/// `GET /projects/{name}`.
pub(super) fn get(app: &Arc<App>, name: &str) -> Result<Response<Body>, ApiError> {
    checked(name)?;
    ok(&view(app, name).ok_or_else(|| no_such(name))?)
}

/// `PUT /projects/{name}`: creates it (201) or replaces its members (its
/// limits stay).
pub(super) async fn put(
    app: &Arc<App>,
    name: String,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    checked(&name)?;
    let update = parse_project_body(&read_body(req).await?)?;
    let old = app.projects.get(&name);
    let existed = old.is_some();
    let webhook = match update.webhook {
        Some(w) => w,
        None => old.and_then(|p| p.webhook),
    };
    let info = ProjectInfo {
        name: name.clone(),
        members: update.members.clone(),
        limits: app.project_budgets.own_limits(&name),
        alert_webhook: webhook.as_ref().map(|u| u.to_string()),
    };
    accounts(app, move |a| a.save_project(&info)).await?;
    app.projects.set(
        &name,
        Some(crate::projects::Project {
            members: update.members,
            webhook,
        }),
    );
    let v = view(app, &name).ok_or_else(|| no_such(&name))?;
    if existed {
        ok(&v)
    } else {
        created(&v)
    }
}

/// `DELETE /projects/{name}`: the project and its limits. Keys bound to it
/// keep its name on their records.
pub(super) async fn delete(app: &Arc<App>, name: String) -> Result<Response<Body>, ApiError> {
    checked(&name)?;
    let n = name.clone();
    if !accounts(app, move |a| a.delete_project(&n)).await? {
        return Err(no_such(&name));
    }
    app.projects.set(&name, None);
    app.project_budgets.set_limits(&name, None);
    ok(&serde_json::json!({ "name": name, "deleted": true }))
}

/// `GET /projects/{name}/limits`.
pub(super) fn get_limits(app: &Arc<App>, name: &str) -> Result<Response<Body>, ApiError> {
    checked(name)?;
    let v = view(app, name).ok_or_else(|| no_such(name))?;
    ok(&v.limits)
}

/// `PUT` (with a limits body) or `DELETE` (`None`) `/projects/{name}/limits`.
pub(super) async fn set_limits(
    app: &Arc<App>,
    name: String,
    req: Option<Request<Incoming>>,
) -> Result<Response<Body>, ApiError> {
    checked(&name)?;
    let limits = match req {
        Some(req) => Some(super::limits::parse_limits_body(&read_body(req).await?)?),
        None => None,
    };
    let p = app.projects.get(&name).ok_or_else(|| no_such(&name))?;
    let info = ProjectInfo {
        name: name.clone(),
        members: p.members,
        limits,
        alert_webhook: p.webhook.map(|u| u.to_string()),
    };
    accounts(app, move |a| a.save_project(&info)).await?;
    app.project_budgets.set_limits(&name, limits);
    // Spend so far in the (new) period counts from now on.
    catch_up(app).await;
    let st = app.clone();
    blocking(move || st.rebuild_spend())
        .await?
        .map_err(internal)?;
    get_limits(app, &name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_bodies() {
        let u = parse_project_body(br#"{"members":["bob","ann","bob"]}"#).unwrap();
        assert_eq!(
            (u.members.as_slice(), u.webhook),
            (&["ann".to_owned(), "bob".to_owned()][..], None)
        );
        let u = parse_project_body(br#"{"members":[],"alerts":{"webhook":"https://h.example/x"}}"#)
            .unwrap();
        assert_eq!(u.webhook.unwrap().unwrap().host(), Some("h.example"));
        for body in [
            r#"{"members":[],"alerts":null}"#,
            r#"{"members":[],"alerts":{"webhook":null}}"#,
        ] {
            assert_eq!(
                parse_project_body(body.as_bytes()).unwrap().webhook,
                Some(None)
            );
        }
        for (body, param) in [
            (r#"{"members":"ann"}"#, "members"),
            (r#"{"members":[" ann"]}"#, "members"),
            (r#"{"members":[""]}"#, "members"),
            (r#"{}"#, "members"),
            (r#"{"members":[],"owner":"x"}"#, "owner"),
            (
                r#"{"members":[],"alerts":{"webhook":"ftp://x/y"}}"#,
                "alerts",
            ),
            (r#"{"members":[],"alerts":{"webhook":1}}"#, "alerts"),
            (
                r#"{"members":[],"alerts":{"url":"https://h.example"}}"#,
                "alerts",
            ),
            (r#"{"members":[1]}"#, "members"),
            ("nope", "members"),
        ] {
            let e = parse_project_body(body.as_bytes()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
    }
}
