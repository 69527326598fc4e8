//! The reports: `/usage` (totals, grouped), `/queries` (every record, as JSON
//! or CSV, streamed) and `/me/usage` (a key holder's own totals and limits).
//! They read SQLite, so every read runs on the blocking pool after
//! [`catch_up`].

use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Serialize;

use super::{blocking, catch_up, internal, ok, query::parse_params, Scaled};
use crate::app::App;
use crate::body::ChannelBody;
use crate::error::ApiError;
use crate::http::Body;
use crate::pricing;
use crate::record::StoredRecord;
use crate::store::{Filter, GroupValues, UsageTotals};

/// Size of the pieces `/queries` is written out in.
const CHUNK: usize = 64 << 10;

/// One `/usage` object: the group's keys (only those grouped by), then the totals.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Usage<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    day: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    month: Option<&'a str>,
    /// Grouped by tier: the tier, `null` for records without one.
    #[serde(rename = "serviceTier", skip_serializing_if = "Option::is_none")]
    tier: Option<Option<&'a str>>,
    /// `{"<key>": value or null}` when grouped by a tag key.
    #[serde(skip_serializing_if = "Option::is_none")]
    tags: Option<TagGroup<'a>>,
    /// Grouped by upstream: `null` for refused requests (no upstream) and
    /// records older than named upstreams, so the key is always there.
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<Option<&'a str>>,
    /// Grouped by project: `null` for requests of no project.
    #[serde(skip_serializing_if = "Option::is_none")]
    project: Option<Option<&'a str>>,
    num_queries: u64,
    query_tokens: u64,
    answer_tokens: u64,
    cost: Scaled,
    average_cost_per_query: Scaled,
    cached_query_tokens: u64,
    reasoning_tokens: u64,
    unpriced_queries: u64,
    rejected_queries: u64,
}

/// The tag a `/usage` row is grouped under: its key and the value (`None`
/// for the records without the key).
struct TagGroup<'a>(&'a str, Option<&'a str>);

impl Serialize for TagGroup<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry(self.0, &self.1)?;
        m.end()
    }
}

impl<'a> Usage<'a> {
    fn new(g: &'a GroupValues, t: &UsageTotals) -> Usage<'a> {
        Usage::grouped(g, t, false)
    }

    /// A row; `by_tier` shows the tier key even where it is `null`.
    fn grouped(g: &'a GroupValues, t: &UsageTotals, by_tier: bool) -> Usage<'a> {
        let avg = if t.queries == 0 {
            0
        } else {
            // Rounded to the nearest pico-dollar.
            (t.cost + i128::from(t.queries) / 2) / i128::from(t.queries)
        };
        Usage {
            user: g.user.as_deref(),
            model: g.model.as_deref(),
            day: g.day.as_deref(),
            month: g.month.as_deref(),
            tier: by_tier.then_some(g.tier.as_deref()),
            tags: None,
            upstream: None,
            project: None,
            num_queries: t.queries,
            query_tokens: t.query_tokens,
            answer_tokens: t.answer_tokens,
            cost: Scaled::dollars(t.cost),
            average_cost_per_query: Scaled::dollars(avg),
            cached_query_tokens: t.cached_tokens,
            reasoning_tokens: t.reasoning_tokens,
            unpriced_queries: t.unpriced,
            rejected_queries: t.rejected,
        }
    }

    /// Totals with no group keys.
    fn totals(t: &UsageTotals) -> Usage<'static> {
        static NONE: GroupValues = GroupValues {
            user: None,
            model: None,
            day: None,
            month: None,
            tier: None,
            tag: None,
            upstream: None,
        };
        Usage::new(&NONE, t)
    }
}

/// The `/usage` object.
pub fn usage_json(t: &UsageTotals) -> String {
    serde_json::to_string(&Usage::totals(t)).unwrap_or_default()
}

/// Narrows a report to one user's records (a key holder's session); asking
/// for another user's is refused rather than silently answered with theirs.
fn scope(f: &mut Filter, only: Option<&str>) -> Result<(), ApiError> {
    let Some(only) = only else { return Ok(()) };
    match &f.user {
        Some(u) if u != only => Err(ApiError::forbidden(
            "A key holder's dashboard session reads only its own records.",
        )
        .with_param("user")),
        _ => {
            f.user = Some(only.to_owned());
            Ok(())
        }
    }
}

/// `GET /usage`: one object, or an array of them with `group_by`; `only`
/// narrows it to one user's records.
pub(super) async fn usage(
    app: &Arc<App>,
    query: &str,
    only: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let mut p = parse_params(
        query,
        &[
            "user", "model", "after", "before", "tag", "project", "group_by",
        ],
    )?;
    scope(&mut p.filter, only)?;
    let tag_key = p
        .filter
        .group_tag
        .clone()
        .filter(|_| p.group.contains(&crate::store::GroupKey::Tag));
    let by_project = tag_key.as_deref() == Some(crate::projects::ROLLUP_KEY);
    let tag_key = tag_key.filter(|_| !by_project);
    catch_up(app).await;
    let reports = app.store.reports();
    let grouped = !p.group.is_empty();
    let by_tier = p.group.contains(&crate::store::GroupKey::Tier);
    let by_upstream = p.group.contains(&crate::store::GroupKey::Upstream);
    let rows = blocking(move || reports.usage(&p.filter, &p.group))
        .await?
        .map_err(|e| ApiError::internal(format!("could not read usage: {e}")))?;
    if !grouped {
        let t = rows.into_iter().next().map(|r| r.1).unwrap_or_default();
        return ok(&Usage::totals(&t));
    }
    let all: Vec<Usage> = rows
        .iter()
        .map(|(g, t)| {
            let mut u = Usage::grouped(g, t, by_tier);
            u.tags = tag_key.as_deref().map(|k| TagGroup(k, g.tag.as_deref()));
            if by_upstream {
                u.upstream = Some(g.upstream.as_deref());
            }
            if by_project {
                u.project = Some(g.tag.as_deref());
            }
            u
        })
        .collect();
    ok(&all)
}

/// `GET /me/usage`: the caller's own totals and limits, by user key.
pub(super) async fn me_usage(
    app: &Arc<App>,
    req: &Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let key = crate::access::user_from_key(&app.keys, req.headers(), crate::timestamp::now_ms())?;
    let user = key.user.clone();
    catch_up(app).await;
    let reports = app.store.reports();
    let f = Filter {
        user: Some(user.clone()),
        ..Filter::default()
    };
    let rows = blocking(move || reports.usage(&f, &[]))
        .await?
        .map_err(internal)?;
    let t = rows.into_iter().next().map(|r| r.1).unwrap_or_default();
    #[derive(Serialize)]
    struct Me<'a> {
        user: &'a str,
        usage: Usage<'static>,
        limits: super::limits::View<'a>,
    }
    ok(&Me {
        user: &user,
        usage: Usage::totals(&t),
        limits: super::limits::View::of(app, Some(&user)),
    })
}

/// `GET /queries`: records written out in [`CHUNK`]-sized pieces as they
/// are read, so a large page never sits whole in memory; `only` narrows it
/// to one user's records.
pub(super) async fn queries(
    app: &Arc<App>,
    query: &str,
    only: Option<&str>,
) -> Result<Response<Body>, ApiError> {
    let mut p = parse_params(
        query,
        &[
            "user",
            "model",
            "after",
            "before",
            "tag",
            "project",
            "limit",
            "offset",
            "format",
            "status",
            "estimated",
            "order",
        ],
    )?;
    scope(&mut p.filter, only)?;
    catch_up(app).await;
    let reports = app.store.reports();
    // The parts of each cost come from the same prices the writer priced
    // (and re-prices) the records with.
    let prices = app.store.prices().clone();
    let (tx, body) = ChannelBody::new(4);
    let csv = p.csv;
    let f = p.filter;
    tokio::task::spawn_blocking(move || {
        let mut buf = String::with_capacity(CHUNK + 1024);
        buf.push_str(if csv { CSV_HEADER } else { "[" });
        let mut first = true;
        let mut alive = true;
        let res = reports.queries(&f, &mut |r| {
            let parts = parts_of(&prices, &r);
            if csv {
                record_csv(&mut buf, &r, &parts);
            } else {
                if !first {
                    buf.push(',');
                }
                record_json(&mut buf, &r, &parts);
            }
            first = false;
            if buf.len() >= CHUNK {
                let piece = Bytes::from(std::mem::take(&mut buf));
                alive = tx.blocking_send(Ok(piece)).is_ok();
            }
            alive
        });
        match res {
            Ok(()) => {
                if !csv {
                    buf.push(']');
                }
                let _ = tx.blocking_send(Ok(Bytes::from(buf)));
            }
            Err(e) => {
                // The status is already sent: end the body with an error.
                tracing::error!(error = %e, "reading /queries failed");
                let _ = tx.blocking_send(Err(Box::new(e)));
            }
        }
    });
    let mut r = Response::new(body.boxed_unsync());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if csv {
            "text/csv; charset=utf-8"
        } else {
            "application/json"
        }),
    );
    Ok(r)
}

/// Appends `s` as a JSON string. Only for the `/queries` writer, which
/// appends record after record to one buffer rather than allocating per record.
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A stored record's cost split by part, under `prices`: zeros when it
/// has no price.
pub fn parts_of(prices: &pricing::PriceTable, r: &StoredRecord) -> pricing::Breakdown {
    if !r.priced {
        return pricing::Breakdown::default();
    }
    prices
        .breakdown(&r.model, &r.requested_model, r.started_ms, r.tokens())
        .0
}

/// Appends pico-dollars as a decimal dollar figure, without allocating.
fn push_dollars(out: &mut String, pico: i64) {
    let neg = pico < 0;
    let v = pico.unsigned_abs();
    let (int, frac) = (v / 1_000_000_000_000, v % 1_000_000_000_000);
    if neg {
        out.push('-');
    }
    let _ = write!(out, "{int}");
    if frac != 0 {
        let mut f = frac;
        let mut width = 12;
        while f % 10 == 0 {
            f /= 10;
            width -= 1;
        }
        let _ = write!(out, ".{f:0width$}");
    }
}

/// One `/queries` element: the record and its cost by part.
pub fn record_json(out: &mut String, r: &StoredRecord, parts: &pricing::Breakdown) {
    out.push_str("{\"id\":");
    out.push_str(&r.id.to_string());
    out.push_str(",\"user\":");
    push_json_str(out, &r.user);
    out.push_str(",\"model\":");
    push_json_str(out, &r.model);
    out.push_str(",\"requestedModel\":");
    push_json_str(out, &r.requested_model);
    out.push_str(",\"endpoint\":");
    push_json_str(out, &r.endpoint);
    out.push_str(",\"timestamp\":");
    push_json_str(out, &crate::timestamp::format_ms(r.started_ms));
    let _ = write!(
        out,
        ",\"queryTokens\":{},\"answerTokens\":{},\"cachedQueryTokens\":{},\"reasoningTokens\":{},\"cost\":{},\"priced\":{},\"estimated\":{},\"status\":{},\"stream\":{},\"durationMs\":{}",
        r.query_tokens,
        r.answer_tokens,
        r.cached_tokens,
        r.reasoning_tokens,
        pricing::format_dollars(r.cost.into()),
        r.priced,
        r.estimated,
        r.status,
        r.stream,
        pricing::format_scaled(r.duration_us.into(), 3),
    );
    out.push_str(",\"ttfbMs\":");
    match r.ttfb_us {
        Some(t) => out.push_str(&pricing::format_scaled(t.into(), 3)),
        None => out.push_str("null"),
    }
    out.push_str(",\"requestId\":");
    match &r.request_id {
        Some(id) => push_json_str(out, id),
        None => out.push_str("null"),
    }
    let _ = write!(
        out,
        ",\"audioQueryTokens\":{},\"audioAnswerTokens\":{},\"serviceTier\":",
        r.audio_query_tokens, r.audio_answer_tokens
    );
    push_tier(out, r.tier);
    for (name, v) in [
        ("inputCost", parts.input),
        ("cachedInputCost", parts.cached_input),
        ("outputCost", parts.output),
        ("audioInputCost", parts.audio_input),
        ("audioOutputCost", parts.audio_output),
    ] {
        out.push_str(",\"");
        out.push_str(name);
        out.push_str("\":");
        push_dollars(out, v);
    }
    out.push_str(",\"tierRates\":");
    push_tier(out, parts.tier);
    out.push_str(",\"tierAdjustment\":");
    push_dollars(out, parts.tier_adjustment);
    out.push_str(",\"clientAborted\":");
    out.push_str(if r.client_aborted { "true" } else { "false" });
    out.push_str(",\"tags\":{");
    for (i, (k, v)) in crate::tags::pairs(&r.tags).enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(out, k);
        out.push(':');
        push_json_str(out, v);
    }
    out.push('}');
    out.push_str(",\"upstream\":");
    match &r.upstream {
        Some(u) => push_json_str(out, u),
        None => out.push_str("null"),
    }
    let _ = write!(
        out,
        ",\"imageQueryTokens\":{},\"imageAnswerTokens\":{}",
        r.image_query_tokens, r.image_answer_tokens
    );
    for (name, v) in [
        ("imageInputCost", parts.image_input),
        ("imageOutputCost", parts.image_output),
        ("toolCost", parts.tool),
    ] {
        out.push_str(",\"");
        out.push_str(name);
        out.push_str("\":");
        push_dollars(out, v);
    }
    // Only tollgate's own names and numbers (see `pricing::units`).
    out.push_str(",\"units\":");
    push_json_str(out, &r.units.to_text());
    out.push_str(",\"customId\":");
    match &r.custom_id {
        Some(c) => push_json_str(out, c),
        None => out.push_str("null"),
    }
    out.push_str(",\"project\":");
    match &r.project {
        Some(p) => push_json_str(out, p),
        None => out.push_str("null"),
    }
    out.push('}');
}

/// Appends a tier as a JSON string, or `null`.
fn push_tier(out: &mut String, t: Option<pricing::Tier>) {
    match t {
        Some(t) => {
            out.push('"');
            out.push_str(t.as_str());
            out.push('"');
        }
        None => out.push_str("null"),
    }
}

const CSV_HEADER: &str = "id,user,model,requestedModel,endpoint,timestamp,queryTokens,answerTokens,cachedQueryTokens,reasoningTokens,cost,priced,estimated,status,stream,durationMs,ttfbMs,requestId,audioQueryTokens,audioAnswerTokens,serviceTier,inputCost,cachedInputCost,outputCost,audioInputCost,audioOutputCost,tierRates,tierAdjustment,clientAborted,tags,upstream,imageQueryTokens,imageAnswerTokens,imageInputCost,imageOutputCost,toolCost,units,customId,project\r\n";

/// Leading characters that make a spreadsheet read a cell as a formula
/// (OWASP, "CSV Injection").
const FORMULA_STARTS: [char; 6] = ['=', '+', '-', '@', '\t', '\r'];

/// Appends a text CSV field, quoted when it needs to be (RFC 4180). A value
/// a spreadsheet would evaluate gets a leading `'` (inside the quotes), so
/// client- and upstream-chosen names are shown as text, never run.
fn push_csv(out: &mut String, s: &str) {
    let formula = s.starts_with(FORMULA_STARTS);
    if s.contains([',', '"', '\n', '\r']) {
        out.push('"');
        if formula {
            out.push('\'');
        }
        out.push_str(&s.replace('"', "\"\""));
        out.push('"');
    } else {
        if formula {
            out.push('\'');
        }
        out.push_str(s);
    }
}

/// One `/queries?format=csv` row.
pub fn record_csv(out: &mut String, r: &StoredRecord, parts: &pricing::Breakdown) {
    out.push_str(&r.id.to_string());
    for s in [&r.user, &r.model, &r.requested_model, &r.endpoint] {
        out.push(',');
        push_csv(out, s);
    }
    let _ = write!(
        out,
        ",{},{},{},{},{},{},{},{},{},{},{},",
        crate::timestamp::format_ms(r.started_ms),
        r.query_tokens,
        r.answer_tokens,
        r.cached_tokens,
        r.reasoning_tokens,
        pricing::format_dollars(r.cost.into()),
        r.priced,
        r.estimated,
        r.status,
        r.stream,
        pricing::format_scaled(r.duration_us.into(), 3),
    );
    if let Some(t) = r.ttfb_us {
        out.push_str(&pricing::format_scaled(t.into(), 3));
    }
    out.push(',');
    if let Some(id) = &r.request_id {
        push_csv(out, id);
    }
    let _ = write!(out, ",{},{},", r.audio_query_tokens, r.audio_answer_tokens);
    if let Some(t) = r.tier {
        out.push_str(t.as_str());
    }
    for v in [
        parts.input,
        parts.cached_input,
        parts.output,
        parts.audio_input,
        parts.audio_output,
    ] {
        out.push(',');
        push_dollars(out, v);
    }
    out.push(',');
    if let Some(t) = parts.tier {
        out.push_str(t.as_str());
    }
    out.push(',');
    push_dollars(out, parts.tier_adjustment);
    out.push(',');
    out.push_str(if r.client_aborted { "true" } else { "false" });
    out.push(',');
    push_csv(out, &r.tags);
    out.push(',');
    if let Some(u) = &r.upstream {
        push_csv(out, u);
    }
    let _ = write!(out, ",{},{}", r.image_query_tokens, r.image_answer_tokens);
    for v in [parts.image_input, parts.image_output, parts.tool] {
        out.push(',');
        push_dollars(out, v);
    }
    out.push(',');
    push_csv(out, &r.units.to_text());
    out.push(',');
    if let Some(c) = &r.custom_id {
        push_csv(out, c);
    }
    out.push(',');
    if let Some(p) = &r.project {
        push_csv(out, p);
    }
    out.push_str("\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_of_nothing_is_zeros() {
        assert_eq!(
            usage_json(&UsageTotals::default()),
            r#"{"numQueries":0,"queryTokens":0,"answerTokens":0,"cost":0,"averageCostPerQuery":0,"cachedQueryTokens":0,"reasoningTokens":0,"unpricedQueries":0,"rejectedQueries":0}"#
        );
    }

    #[test]
    fn grouped_usage_puts_the_keys_first() {
        let g = GroupValues {
            user: Some("a\"b".into()),
            day: Some("2024-01-02".into()),
            ..GroupValues::default()
        };
        let t = UsageTotals {
            queries: 3,
            cost: 10,
            ..UsageTotals::default()
        };
        assert_eq!(
            serde_json::to_string(&Usage::new(&g, &t)).unwrap(),
            r#"{"user":"a\"b","day":"2024-01-02","numQueries":3,"queryTokens":0,"answerTokens":0,"cost":0.00000000001,"averageCostPerQuery":0.000000000003,"cachedQueryTokens":0,"reasoningTokens":0,"unpricedQueries":0,"rejectedQueries":0}"#
        );
    }

    #[test]
    fn csv_fields_never_start_a_formula() {
        let field = |v: &str| {
            let mut s = String::new();
            push_csv(&mut s, v);
            s
        };
        for (v, want) in [
            ("=1+2", "'=1+2"),
            ("+1", "'+1"),
            ("-1", "'-1"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\tx", "'\tx"),
            ("\r=1", "\"'\r=1\""),
            ("=A1,\"b\"", "\"'=A1,\"\"b\"\"\""),
            ("gpt-4o", "gpt-4o"),
            ("a=b", "a=b"),
            ("'quoted", "'quoted"),
            ("", ""),
        ] {
            assert_eq!(field(v), want, "{v:?}");
        }
    }

    #[test]
    fn dollars_are_written_like_format_dollars() {
        for v in [
            0,
            1,
            -1,
            10,
            1_000_000_000_000,
            1_250_000,
            -2_500_000_000_001,
            i64::MAX,
            i64::MIN,
        ] {
            let mut s = String::new();
            push_dollars(&mut s, v);
            assert_eq!(s, pricing::format_dollars(v.into()), "{v}");
        }
    }

    #[test]
    fn json_strings_escape() {
        let mut s = String::new();
        push_json_str(&mut s, "a\"b\\c\nd\u{1}é");
        assert_eq!(s, r#""a\"b\\c\nd\u0001é""#);
        let v: String = serde_json::from_str(&s).unwrap();
        assert_eq!(v, "a\"b\\c\nd\u{1}é");
    }
}
