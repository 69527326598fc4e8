//! `GET /reconcile`: OpenAI's Costs API beside tollgate's costs, per day and
//! model, for an admin (the same comparison as `tollgate reconcile`).

use std::sync::Arc;

use serde::Serialize;

use super::{ok, query::percent_decode, Scaled};
use crate::app::App;
use crate::error::ApiError;
use crate::http::Body;
use crate::reconcile::{Error, Period};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    from: String,
    to: String,
    threshold: Scaled,
    /// Lines whose difference is above the threshold.
    flagged: usize,
    openai: Scaled,
    tollgate: Scaled,
    lines: Vec<Line>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Line {
    day: String,
    /// The model, or OpenAI's line item when it names none.
    item: String,
    openai: Scaled,
    tollgate: Scaled,
    /// tollgate minus OpenAI.
    difference: Scaled,
    flagged: bool,
}

pub(super) async fn reconcile(
    app: &Arc<App>,
    query: &str,
) -> Result<http::Response<Body>, ApiError> {
    let mut args: [Option<String>; 3] = [None, None, None];
    const NAMES: [&str; 3] = ["from", "to", "threshold"];
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k, true).ok_or_else(|| ApiError::bad_request("bad query string"))?;
        let Some(i) = NAMES.iter().position(|n| *n == k) else {
            return Err(ApiError::bad_param(
                &k,
                format!("unknown parameter {k} (allowed: {})", NAMES.join(", ")),
            ));
        };
        args[i] =
            Some(percent_decode(v, true).ok_or_else(|| {
                ApiError::bad_param(&k, format!("bad encoding of parameter {k}"))
            })?);
    }
    let [Some(from), Some(to), threshold] = args else {
        let missing = if args[0].is_none() { "from" } else { "to" };
        return Err(ApiError::bad_param(
            missing,
            format!("{missing} is required (a day as YYYY-MM-DD)"),
        ));
    };
    let period = Period::parse(&from, &to, threshold.as_deref()).map_err(|e| {
        let param = ["to", "threshold"]
            .into_iter()
            .find(|p| e.starts_with(&format!("{p} ")))
            .unwrap_or("from");
        ApiError::bad_param(param, e)
    })?;
    super::catch_up(app).await;
    let lines = app.reconcile(&period).await.map_err(|e| match e {
        Error::NoKey => ApiError::unavailable(e.to_string()).with_code("no_openai_admin_key"),
        Error::Upstream(_) => ApiError::bad_gateway(e.to_string()),
        Error::Store(_) => ApiError::internal(e.to_string()),
    })?;
    let sum = |f: fn(&crate::reconcile::Line) -> i64| {
        Scaled::dollars(lines.iter().map(|l| i128::from(f(l))).sum())
    };
    ok(&Answer {
        from: period.from.to_string(),
        to: period.to.to_string(),
        threshold: Scaled::dollars(period.threshold.into()),
        flagged: lines.iter().filter(|l| l.flagged).count(),
        openai: sum(|l| l.openai),
        tollgate: sum(|l| l.tollgate),
        lines: lines
            .iter()
            .map(|l| Line {
                day: l.day.clone(),
                item: l.item.clone(),
                openai: Scaled::dollars(l.openai.into()),
                tollgate: Scaled::dollars(l.tollgate.into()),
                difference: Scaled::dollars(i128::from(l.tollgate) - i128::from(l.openai)),
                flagged: l.flagged,
            })
            .collect(),
    })
}
