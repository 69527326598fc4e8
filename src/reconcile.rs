//! Reconciliation against the invoice: OpenAI's organization Costs API
//! (`GET /v1/organization/costs`, grouped by line item, one bucket per UTC
//! day) beside tollgate's own cost of the same days, per day and model.
//!
//! OpenAI names a token line item `"<model snapshot>, <kind>"` (`input`,
//! `output`, `cached input`, ...); its kinds are summed per model, because
//! tollgate prices a record as a whole. Other line items (tool calls,
//! storage, fine-tuning) keep their own name and have no tollgate side
//! unless a model of that name was metered. Both sides are exact decimals:
//! OpenAI's amounts are parsed from the JSON text, not through a float.
//!
//! The admin key of the Costs API comes from the environment only
//! (`TOLLGATE_OPENAI_ADMIN_KEY` or `OPENAI_ADMIN_KEY`), never a flag.

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::NaiveDate;
use http::{header, HeaderValue, Method, Request};
use http_body_util::BodyExt;
use serde::Deserialize;

use crate::store::{Filter, GroupKey, Reports};
use crate::upstream::Upstream;

/// Largest Costs API page read (its answers are a few KB per day).
const MAX_PAGE: usize = 16 << 20;
/// Most pages followed: 180 daily buckets each, far beyond any period asked.
const MAX_PAGES: usize = 64;
/// Longest period, in days (the Costs API's own page limit is 180 buckets).
pub const MAX_DAYS: i64 = 366;

/// What to compare.
#[derive(Debug, Clone)]
pub struct Period {
    /// First day, UTC.
    pub from: NaiveDate,
    /// Last day, UTC, included.
    pub to: NaiveDate,
    /// A difference larger than this (pico-dollars, either way) is flagged.
    pub threshold: i64,
}

impl Period {
    /// Parses `YYYY-MM-DD` days and a dollar threshold (`None`: $0.01).
    pub fn parse(from: &str, to: &str, threshold: Option<&str>) -> Result<Period, String> {
        let day = |name: &str, s: &str| {
            NaiveDate::parse_from_str(s, "%Y-%m-%d")
                .map_err(|_| format!("{name} must be a day as YYYY-MM-DD"))
        };
        let from = day("from", from)?;
        let to = day("to", to)?;
        if to < from {
            return Err("to must not be before from".into());
        }
        if (to - from).num_days() >= MAX_DAYS {
            return Err(format!("at most {MAX_DAYS} days at once"));
        }
        let threshold = match threshold {
            None => 10_000_000_000,
            Some(t) => crate::pricing::parse_scaled(t, 12)
                .ok()
                .filter(|t| *t >= 0)
                .ok_or("threshold must be a non-negative amount of dollars, e.g. 0.01")?,
        };
        Ok(Period {
            from,
            to,
            threshold,
        })
    }

    fn start_s(&self) -> i64 {
        self.from
            .and_hms_opt(0, 0, 0)
            .unwrap_or_default()
            .and_utc()
            .timestamp()
    }

    fn end_s(&self) -> i64 {
        self.start_s() + ((self.to - self.from).num_days() + 1) * 86_400
    }
}

/// One compared line: a day and a model (or another line item).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// `YYYY-MM-DD`.
    pub day: String,
    /// The model, or OpenAI's line item when it names no model.
    pub item: String,
    /// OpenAI's amount, pico-dollars.
    pub openai: i64,
    /// tollgate's cost of the same day and model, pico-dollars.
    pub tollgate: i64,
    /// `|openai - tollgate|` is above the threshold.
    pub flagged: bool,
}

/// Why a reconciliation could not be made.
#[derive(Debug)]
pub enum Error {
    /// No admin key in the environment.
    NoKey,
    /// The Costs API could not be reached or answered badly.
    Upstream(String),
    /// tollgate's own store failed.
    Store(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::NoKey => write!(
                f,
                "the Costs API needs an organization admin key: set TOLLGATE_OPENAI_ADMIN_KEY (or OPENAI_ADMIN_KEY)"
            ),
            Error::Upstream(e) => write!(f, "Costs API: {e}"),
            Error::Store(e) => write!(f, "tollgate's records: {e}"),
        }
    }
}

/// Compares OpenAI's costs with tollgate's for `period`. `upstream_uri`
/// makes the upstream's URI of a path (its base path included).
pub async fn reconcile(
    period: &Period,
    upstream: &Upstream,
    upstream_uri: &(dyn Fn(&str) -> Result<http::Uri, http::Error> + Sync),
    key: Option<&str>,
    reports: std::sync::Arc<dyn Reports>,
) -> Result<Vec<Line>, Error> {
    let key = key.ok_or(Error::NoKey)?;
    let openai = fetch_costs(period, upstream, upstream_uri, key).await?;
    let filter = Filter {
        after: Some(period.start_s() * 1000 - 1),
        before: Some(period.end_s() * 1000),
        ..Filter::default()
    };
    let ours = tokio::task::spawn_blocking(move || {
        reports.usage(&filter, &[GroupKey::Day, GroupKey::Model])
    })
    .await
    .map_err(|e| Error::Store(e.to_string()))?
    .map_err(|e| Error::Store(e.to_string()))?;
    let mut lines: BTreeMap<(String, String), (i64, i64)> = BTreeMap::new();
    for ((day, item), amount) in openai {
        lines.entry((day, item)).or_default().0 += amount;
    }
    for (g, totals) in ours {
        let (Some(day), Some(model)) = (g.day, g.model) else {
            continue;
        };
        let cost = i64::try_from(totals.cost).unwrap_or(i64::MAX);
        lines.entry((day, model)).or_default().1 += cost;
    }
    Ok(lines
        .into_iter()
        .map(|((day, item), (openai, tollgate))| Line {
            day,
            item,
            openai,
            tollgate,
            flagged: openai.abs_diff(tollgate) > period.threshold.unsigned_abs(),
        })
        .collect())
}

#[derive(Deserialize)]
struct Page {
    #[serde(default)]
    data: Vec<Bucket>,
    #[serde(default)]
    has_more: bool,
    next_page: Option<String>,
}

#[derive(Deserialize)]
struct Bucket {
    start_time: i64,
    #[serde(default)]
    results: Vec<CostResult>,
}

#[derive(Deserialize)]
struct CostResult {
    amount: Option<Amount>,
    line_item: Option<String>,
}

#[derive(Deserialize)]
struct Amount {
    value: serde_json::Number,
}

/// OpenAI's amounts per (day, model or line item), pico-dollars.
async fn fetch_costs(
    period: &Period,
    upstream: &Upstream,
    upstream_uri: &(dyn Fn(&str) -> Result<http::Uri, http::Error> + Sync),
    key: &str,
) -> Result<Vec<((String, String), i64)>, Error> {
    let auth = HeaderValue::from_str(&format!("Bearer {key}"))
        .map_err(|_| Error::Upstream("the admin key is not a valid header value".into()))?;
    let mut out = Vec::new();
    let mut page: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let mut pq = format!(
            "/v1/organization/costs?start_time={}&end_time={}&bucket_width=1d&group_by=line_item&limit=180",
            period.start_s(),
            period.end_s()
        );
        if let Some(p) = &page {
            pq.push_str("&page=");
            pq.push_str(&percent_encode(p));
        }
        let uri = upstream_uri(&pq).map_err(|e| Error::Upstream(e.to_string()))?;
        let mut req = Request::new(crate::http::full(Bytes::new()));
        *req.method_mut() = Method::GET;
        *req.uri_mut() = uri;
        req.headers_mut()
            .insert(header::AUTHORIZATION, auth.clone());
        let resp = upstream
            .send(req)
            .await
            .map_err(|e| Error::Upstream(e.to_string()))?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_PAGE)
            .collect()
            .await
            .map_err(|e| Error::Upstream(format!("reading the answer: {e}")))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or_default();
            return Err(Error::Upstream(
                format!("answered {status} {message}").trim_end().to_owned(),
            ));
        }
        let p: Page = serde_json::from_slice(&body)
            .map_err(|e| Error::Upstream(format!("not a costs page: {e}")))?;
        for b in p.data {
            let day = chrono::DateTime::from_timestamp(b.start_time, 0)
                .ok_or_else(|| Error::Upstream("a bucket with a bad start_time".into()))?
                .format("%Y-%m-%d")
                .to_string();
            for r in b.results {
                let Some(a) = r.amount else { continue };
                let amount = dollars(&a.value)
                    .ok_or_else(|| Error::Upstream(format!("a bad amount: {}", a.value)))?;
                let item = model_of(r.line_item.as_deref().unwrap_or("(no line item)"));
                out.push(((day.clone(), item.to_owned()), amount));
            }
        }
        match (p.has_more, p.next_page) {
            (true, Some(next)) => page = Some(next),
            _ => return Ok(out),
        }
    }
    Err(Error::Upstream(format!("more than {MAX_PAGES} pages")))
}

/// `"gpt-4o-2024-08-06, cached input"` -> `gpt-4o-2024-08-06`; a line item
/// with no model (`"web search tool calls"`) stays whole.
pub fn model_of(line_item: &str) -> &str {
    match line_item.split_once(", ") {
        Some((model, _)) if !model.contains(' ') => model,
        _ => line_item,
    }
}

/// Dollars as written in JSON (`0.06`, `12`, `1.5e-7`) to pico-dollars.
fn dollars(n: &serde_json::Number) -> Option<i64> {
    let text = n.to_string();
    crate::pricing::parse_scaled(&text, 12).ok().or_else(|| {
        // More than 12 decimals: round to the pico-dollar.
        let f = n.as_f64()? * 1e12;
        (f.is_finite() && f.abs() < 9e18).then(|| f.round() as i64)
    })
}

/// A query value with everything but unreserved characters escaped.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A name for the terminal: a model name may be a client's, so anything
/// but printable ASCII is escaped.
fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        s.into()
    } else {
        s.escape_default().to_string().into()
    }
}

/// The lines as a table for a terminal.
pub fn render(lines: &[Line]) -> String {
    use std::fmt::Write;
    let d = |v: i64| crate::pricing::format_dollars(v.into());
    let mut out = format!(
        "{:<10}  {:<40}  {:>14}  {:>14}  {:>14}\n",
        "day", "model / line item", "openai", "tollgate", "difference"
    );
    let (mut total_o, mut total_t) = (0i128, 0i128);
    for l in lines {
        total_o += i128::from(l.openai);
        total_t += i128::from(l.tollgate);
        let _ = writeln!(
            out,
            "{:<10}  {:<40}  {:>14}  {:>14}  {:>14}{}",
            l.day,
            printable(&l.item),
            d(l.openai),
            d(l.tollgate),
            d(l.tollgate - l.openai),
            if l.flagged {
                "  <-- over threshold"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(
        out,
        "{:<10}  {:<40}  {:>14}  {:>14}  {:>14}",
        "total",
        "",
        crate::pricing::format_dollars(total_o),
        crate::pricing::format_dollars(total_t),
        crate::pricing::format_dollars(total_t - total_o)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_items_name_their_model() {
        assert_eq!(model_of("gpt-4o-2024-08-06, input"), "gpt-4o-2024-08-06");
        assert_eq!(
            model_of("gpt-4o-mini-2024-07-18, cached input"),
            "gpt-4o-mini-2024-07-18"
        );
        assert_eq!(model_of("web search tool calls"), "web search tool calls");
        assert_eq!(model_of("Fine-tuning, training"), "Fine-tuning");
    }

    #[test]
    fn amounts_are_exact_decimals() {
        let n = |s: &str| serde_json::from_str::<serde_json::Number>(s).unwrap();
        assert_eq!(dollars(&n("0.06")), Some(60_000_000_000));
        assert_eq!(dollars(&n("12")), Some(12_000_000_000_000));
        assert_eq!(dollars(&n("1.5e-7")), Some(150_000));
        assert_eq!(dollars(&n("0.1234567890129")), Some(123_456_789_013));
        assert_eq!(dollars(&n("-0.5")), Some(-500_000_000_000));
    }

    #[test]
    fn periods_are_checked() {
        let p = Period::parse("2026-11-01", "2026-11-02", None).unwrap();
        assert_eq!(p.start_s(), 1_793_491_200);
        assert_eq!(p.end_s(), 1_793_491_200 + 2 * 86_400);
        assert_eq!(p.threshold, 10_000_000_000);
        assert!(Period::parse("2026-11-02", "2026-11-01", None).is_err());
        assert!(Period::parse("2026-11-1x", "2026-11-01", None).is_err());
        assert!(Period::parse("2025-01-01", "2026-11-01", None).is_err());
        assert!(Period::parse("2026-11-01", "2026-11-01", Some("-1")).is_err());
        assert_eq!(
            Period::parse("2026-11-01", "2026-11-01", Some("0.5"))
                .unwrap()
                .threshold,
            500_000_000_000
        );
    }
}
