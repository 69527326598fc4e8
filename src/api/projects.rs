//! `/projects` and `/projects/{name}`: projects and their members;
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
    let members = app.projects.members(name)?;
    Some(View {
        name: name.to_owned(),
        members,
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

/// The body of `PUT /projects/{name}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ProjectBody {
    members: Vec<String>,
}

/// Parses a project body: `{"members": ["ann", "bob"]}`; the members come
/// back sorted, each once.
pub fn parse_project_body(body: &[u8]) -> Result<Vec<String>, ApiError> {
    let b: ProjectBody = serde_json::from_slice(body).map_err(|e| {
        let msg = e.to_string();
        let field = if msg.contains("unknown field") {
            msg.split('`').nth(1).unwrap_or("members").to_owned()
        } else {
            "members".to_owned()
        };
        ApiError::bad_param(
            &field,
            format!("body must be a JSON object like {{\"members\": [\"ann\", \"bob\"]}}: {msg}"),
        )
    })?;
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
    Ok(members)
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
    let members = parse_project_body(&read_body(req).await?)?;
    let existed = app.projects.members(&name).is_some();
    let info = ProjectInfo {
        name: name.clone(),
        members: members.clone(),
        limits: app.project_budgets.own_limits(&name),
    };
    accounts(app, move |a| a.save_project(&info)).await?;
    app.projects.set(&name, Some(members));
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
    let members = app.projects.members(&name).ok_or_else(|| no_such(&name))?;
    let info = ProjectInfo {
        name: name.clone(),
        members,
        limits,
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
        assert_eq!(
            parse_project_body(br#"{"members":["bob","ann","bob"]}"#).unwrap(),
            ["ann", "bob"]
        );
        for (body, param) in [
            (r#"{"members":"ann"}"#, "members"),
            (r#"{"members":[" ann"]}"#, "members"),
            (r#"{"members":[""]}"#, "members"),
            (r#"{}"#, "members"),
            (r#"{"members":[],"owner":"x"}"#, "owner"),
            ("nope", "members"),
        ] {
            let e = parse_project_body(body.as_bytes()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
    }
}
