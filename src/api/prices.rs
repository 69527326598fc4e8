//! `/model/{name}` (read, set) and `/models`: price rows per model, per 1K
//! and per 1M tokens, exact decimals.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::value::RawValue;

use super::{ok, read_body, Scaled, Time};
use crate::app::App;
use crate::error::ApiError;
use crate::http::Body;
use crate::pricing::{self, Price, Rates, SCALE_PER_1K, SCALE_PER_1M};

/// A model and its price rows.
#[derive(Serialize)]
struct Model<'a> {
    name: &'a str,
    costs: Vec<Cost>,
    /// Records re-priced by a change (only in the answer to setting a price).
    #[serde(rename = "repricedQueries", skip_serializing_if = "Option::is_none")]
    repriced: Option<u64>,
}

/// One price row, in both units.
#[derive(Serialize)]
struct Cost {
    #[serde(rename = "validFrom")]
    valid_from: Time,
    #[serde(rename = "per1KQueryTokens")]
    query_1k: Scaled,
    #[serde(rename = "per1KAnswerTokens")]
    answer_1k: Scaled,
    #[serde(
        rename = "per1KCachedQueryTokens",
        skip_serializing_if = "Option::is_none"
    )]
    cached_1k: Option<Scaled>,
    #[serde(rename = "per1MQueryTokens")]
    query_1m: Scaled,
    #[serde(rename = "per1MAnswerTokens")]
    answer_1m: Scaled,
    #[serde(
        rename = "per1MCachedQueryTokens",
        skip_serializing_if = "Option::is_none"
    )]
    cached_1m: Option<Scaled>,
    #[serde(
        rename = "per1KAudioQueryTokens",
        skip_serializing_if = "Option::is_none"
    )]
    audio_query_1k: Option<Scaled>,
    #[serde(
        rename = "per1KAudioAnswerTokens",
        skip_serializing_if = "Option::is_none"
    )]
    audio_answer_1k: Option<Scaled>,
    #[serde(
        rename = "per1MAudioQueryTokens",
        skip_serializing_if = "Option::is_none"
    )]
    audio_query_1m: Option<Scaled>,
    #[serde(
        rename = "per1MAudioAnswerTokens",
        skip_serializing_if = "Option::is_none"
    )]
    audio_answer_1m: Option<Scaled>,
    #[serde(
        rename = "per1KImageQueryTokens",
        skip_serializing_if = "Option::is_none"
    )]
    image_query_1k: Option<Scaled>,
    #[serde(
        rename = "per1KImageAnswerTokens",
        skip_serializing_if = "Option::is_none"
    )]
    image_answer_1k: Option<Scaled>,
    #[serde(
        rename = "per1MImageQueryTokens",
        skip_serializing_if = "Option::is_none"
    )]
    image_query_1m: Option<Scaled>,
    #[serde(
        rename = "per1MImageAnswerTokens",
        skip_serializing_if = "Option::is_none"
    )]
    image_answer_1m: Option<Scaled>,
    /// Dollars per unit (second, character, image or tool call).
    #[serde(rename = "perUnit", skip_serializing_if = "Option::is_none")]
    unit: Option<Scaled>,
    #[serde(flatten)]
    flex: Option<TierCost<Flex>>,
    #[serde(flatten)]
    priority: Option<TierCost<Priority>>,
}

/// The field names of one tier's rates.
trait TierNames {
    const NAMES: [&'static str; 6];
}

/// `per1KFlex...` fields.
struct Flex;
/// `per1KPriority...` fields.
struct Priority;

impl TierNames for Flex {
    const NAMES: [&'static str; 6] = [
        "per1KFlexQueryTokens",
        "per1KFlexAnswerTokens",
        "per1KFlexCachedQueryTokens",
        "per1MFlexQueryTokens",
        "per1MFlexAnswerTokens",
        "per1MFlexCachedQueryTokens",
    ];
}

impl TierNames for Priority {
    const NAMES: [&'static str; 6] = [
        "per1KPriorityQueryTokens",
        "per1KPriorityAnswerTokens",
        "per1KPriorityCachedQueryTokens",
        "per1MPriorityQueryTokens",
        "per1MPriorityAnswerTokens",
        "per1MPriorityCachedQueryTokens",
    ];
}

/// One tier's rates in both units, named like the standard ones with the
/// tier after the unit (`per1MFlexQueryTokens`).
struct TierCost<T> {
    rates: Rates,
    names: std::marker::PhantomData<T>,
}

impl<T: TierNames> Serialize for TierCost<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let r = &self.rates;
        let mut m = s.serialize_map(None)?;
        for (i, scale) in [(0, SCALE_PER_1K), (3, SCALE_PER_1M)] {
            m.serialize_entry(T::NAMES[i], &Scaled(r.query.into(), scale))?;
            m.serialize_entry(T::NAMES[i + 1], &Scaled(r.answer.into(), scale))?;
            if let Some(c) = r.cached {
                m.serialize_entry(T::NAMES[i + 2], &Scaled(c.into(), scale))?;
            }
        }
        m.end()
    }
}

fn tier_cost<T>(rates: Option<Rates>) -> Option<TierCost<T>> {
    rates.map(|rates| TierCost {
        rates,
        names: std::marker::PhantomData,
    })
}

impl Cost {
    fn of(p: &Price) -> Cost {
        let at = |scale| move |v: i64| Scaled(v.into(), scale);
        let (k, m) = (at(SCALE_PER_1K), at(SCALE_PER_1M));
        Cost {
            valid_from: Time(p.valid_from),
            query_1k: k(p.query),
            answer_1k: k(p.answer),
            cached_1k: p.cached.map(k),
            query_1m: m(p.query),
            answer_1m: m(p.answer),
            cached_1m: p.cached.map(m),
            audio_query_1k: p.audio_query.map(k),
            audio_answer_1k: p.audio_answer.map(k),
            audio_query_1m: p.audio_query.map(m),
            audio_answer_1m: p.audio_answer.map(m),
            image_query_1k: p.image_query.map(k),
            image_answer_1k: p.image_answer.map(k),
            image_query_1m: p.image_query.map(m),
            image_answer_1m: p.image_answer.map(m),
            unit: p.unit.map(|v| Scaled(v.into(), 12)),
            flex: tier_cost(p.flex),
            priority: tier_cost(p.priority),
        }
    }
}

impl<'a> Model<'a> {
    fn new(name: &'a str, rows: &[Price]) -> Model<'a> {
        let costs = rows.iter().map(Cost::of).collect();
        Model {
            name,
            costs,
            repriced: None,
        }
    }
}

/// `GET /model/{name}`.
pub(super) fn get_model(app: &Arc<App>, name: &str) -> Result<Response<Body>, ApiError> {
    let model = {
        let table = app.store.prices();
        let rows = table.rows(name).ok_or_else(|| {
            ApiError::not_found(format!("no prices for model {name}")).with_code("model_not_found")
        })?;
        Model::new(name, rows)
    };
    ok(&model)
}

/// `GET /models`.
pub(super) fn models(app: &Arc<App>) -> Result<Response<Body>, ApiError> {
    // A copy, so the writer never waits for this answer to be written.
    let table = app.store.prices().clone();
    let all: Vec<Model> = table
        .names()
        .into_iter()
        .map(|name| Model::new(name, table.rows(name).unwrap_or_default()))
        .collect();
    ok(&all)
}

/// Parses a price body: `validFrom` plus query/answer (and optionally cached)
/// prices, per 1K or per 1M tokens, never both units.
pub fn parse_price_body(body: &[u8]) -> Result<Price, ApiError> {
    let fields: BTreeMap<String, &RawValue> = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("body must be a JSON object: {e}")))?;
    const KNOWN: [&str; 16] = [
        "validFrom",
        "perUnit",
        "per1KImageQueryTokens",
        "per1KImageAnswerTokens",
        "per1MImageQueryTokens",
        "per1MImageAnswerTokens",
        "per1KAudioQueryTokens",
        "per1KAudioAnswerTokens",
        "per1MAudioQueryTokens",
        "per1MAudioAnswerTokens",
        "per1KQueryTokens",
        "per1KAnswerTokens",
        "per1KCachedQueryTokens",
        "per1MQueryTokens",
        "per1MAnswerTokens",
        "per1MCachedQueryTokens",
    ];
    let known =
        |k: &str| KNOWN.contains(&k) || Flex::NAMES.contains(&k) || Priority::NAMES.contains(&k);
    if let Some(k) = fields.keys().find(|k| !known(k)) {
        return Err(ApiError::bad_param(k, format!("unknown field {k}")));
    }
    let valid_from = match fields.get("validFrom") {
        None => return Err(ApiError::bad_param("validFrom", "validFrom is required")),
        Some(raw) => {
            let s: String = serde_json::from_str(raw.get()).map_err(|_| {
                ApiError::bad_param("validFrom", "validFrom must be a timestamp string")
            })?;
            crate::timestamp::parse(&s).ok_or_else(|| {
                ApiError::bad_param(
                    "validFrom",
                    format!("validFrom `{s}` is not a timestamp with an offset, like 2024-01-24T14:50:00Z"),
                )
            })?
        }
    };
    let has_1k = fields.keys().any(|k| k.starts_with("per1K"));
    let has_1m = fields.keys().any(|k| k.starts_with("per1M"));
    let (unit, scale) = match (has_1k, has_1m) {
        (true, true) => {
            return Err(ApiError::bad_request(
                "give prices either per 1K tokens or per 1M tokens, not both",
            ))
        }
        (false, true) => ("per1M", SCALE_PER_1M),
        _ => ("per1K", SCALE_PER_1K),
    };
    let price = |what: &str, required: bool| -> Result<Option<i64>, ApiError> {
        let key = format!("{unit}{what}");
        match fields.get(key.as_str()) {
            None if required => Err(ApiError::bad_param(&key, format!("{key} is required"))),
            None => Ok(None),
            Some(raw) => pricing::parse_scaled(raw.get(), scale)
                .map(Some)
                .map_err(|e| ApiError::bad_param(&key, format!("{key} {e}"))),
        }
    };
    let query = price("QueryTokens", true)?.unwrap_or(0);
    let answer = price("AnswerTokens", true)?.unwrap_or(0);
    let cached = price("CachedQueryTokens", false)?;
    // A tier's rates come whole (query and answer) or not at all.
    let tier = |name: &str| -> Result<Option<Rates>, ApiError> {
        let q = price(&format!("{name}QueryTokens"), false)?;
        let a = price(&format!("{name}AnswerTokens"), false)?;
        let c = price(&format!("{name}CachedQueryTokens"), false)?;
        match (q, a) {
            (Some(query), Some(answer)) => Ok(Some(Rates {
                query,
                cached: c,
                answer,
            })),
            (None, None) if c.is_none() => Ok(None),
            (None, _) => {
                let key = format!("{unit}{name}QueryTokens");
                Err(ApiError::bad_param(
                    &key,
                    format!("{key} is required with the other {name} prices"),
                ))
            }
            (Some(_), None) => {
                let key = format!("{unit}{name}AnswerTokens");
                Err(ApiError::bad_param(
                    &key,
                    format!("{key} is required with the other {name} prices"),
                ))
            }
        }
    };
    Ok(Price {
        valid_from,
        query,
        cached,
        answer,
        flex: tier("Flex")?,
        priority: tier("Priority")?,
        audio_query: price("AudioQueryTokens", false)?,
        audio_answer: price("AudioAnswerTokens", false)?,
        image_query: price("ImageQueryTokens", false)?,
        image_answer: price("ImageAnswerTokens", false)?,
        unit: match fields.get("perUnit") {
            None => None,
            Some(raw) => Some(
                pricing::parse_scaled(raw.get(), 12)
                    .map_err(|e| ApiError::bad_param("perUnit", format!("perUnit {e}")))?,
            ),
        },
    })
}

/// `POST`/`PUT /model/{name}`: the writer thread stores the row and
/// re-prices the records it covers; this only waits for its reply.
pub(super) async fn set_price(
    app: &Arc<App>,
    name: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = read_body(req).await?;
    let price = parse_price_body(&body)?;
    let repriced = app
        .store
        .set_price(name.to_owned(), price)
        .await
        .map_err(|e| ApiError::internal(format!("could not store the price: {e}")))?;
    let model = {
        let table = app.store.prices();
        Model {
            // The old answer's shape, plus what changed.
            repriced: Some(repriced),
            ..Model::new(name, table.rows(name).unwrap_or_default())
        }
    };
    ok(&model)
}

/// The answer to an import: what was (or, dry, would be) added.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Imported {
    dry_run: bool,
    valid_from: Time,
    added: Vec<Added>,
    changed: Vec<Changed>,
    unchanged: Vec<String>,
}

#[derive(Serialize)]
struct Added {
    name: String,
    price: Cost,
}

#[derive(Serialize)]
struct Changed {
    name: String,
    from: Cost,
    to: Cost,
}

/// Largest price list taken by `POST /prices/import` (LiteLLM's map is
/// about 1.5 MB).
const MAX_LIST: usize = 16 << 20;

/// `POST /prices/import?dryRun=true&validFrom=...`: the body is a list in
/// the bundled TSV format or LiteLLM's JSON price map.
pub(super) async fn import(
    app: &Arc<App>,
    query: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (mut dry_run, mut valid_from) = (false, None);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = super::query::percent_decode(v, true)
            .ok_or_else(|| ApiError::bad_param(k, "bad encoding"))?;
        match k {
            "dryRun" => {
                dry_run = match v.as_str() {
                    "true" | "" => true,
                    "false" => false,
                    _ => {
                        return Err(ApiError::bad_param(
                            "dryRun",
                            "dryRun must be true or false",
                        ))
                    }
                }
            }
            "validFrom" => {
                valid_from = Some(crate::timestamp::parse(&v).ok_or_else(|| {
                    ApiError::bad_param(
                        "validFrom",
                        "validFrom must be a timestamp with an offset, like 2026-12-01T00:00:00Z",
                    )
                })?)
            }
            _ => {
                return Err(ApiError::bad_param(
                    k,
                    format!(
                        "unknown parameter {} (allowed: dryRun, validFrom)",
                        k.escape_default()
                    ),
                ))
            }
        }
    }
    use http_body_util::BodyExt;
    let body = http_body_util::Limited::new(req.into_body(), MAX_LIST)
        .collect()
        .await
        .map_err(|_| ApiError::bad_request("could not read the list (at most 16 MiB)"))?
        .to_bytes();
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::bad_request("the list is not UTF-8 text"))?;
    let list = crate::pricing::list::parse(text).map_err(|e| ApiError::bad_request(e.0))?;
    let valid_from = valid_from.unwrap_or_else(crate::timestamp::now_ms);
    let d = app
        .import_prices(&list, valid_from, dry_run)
        .await
        .map_err(|e| ApiError::internal(format!("could not store the prices: {e}")))?;
    let at = |p: &Price| Cost::of(&Price { valid_from, ..*p });
    ok(&Imported {
        dry_run,
        valid_from: Time(valid_from),
        added: d
            .added
            .iter()
            .map(|(m, p)| Added {
                name: m.clone(),
                price: at(p),
            })
            .collect(),
        changed: d
            .changed
            .iter()
            .map(|(m, old, new)| Changed {
                name: m.clone(),
                from: Cost::of(old),
                to: at(new),
            })
            .collect(),
        unchanged: d.unchanged,
    })
}

/// `GET /prices/export`: the prices in effect, in the TSV format.
pub(super) fn export(app: &Arc<App>) -> Result<Response<Body>, ApiError> {
    let text = crate::pricing::list::export_tsv(&app.store.prices(), crate::timestamp::now_ms());
    let mut r = Response::new(crate::http::full(text));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/tab-separated-values; charset=utf-8"),
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn price_bodies() {
        let p = parse_price_body(
            br#"{"validFrom":"2023-11-06T00:00:00Z","per1KQueryTokens":0.01,"per1KAnswerTokens":0.03}"#,
        )
        .unwrap();
        assert_eq!(p.query, 10_000_000);
        assert_eq!(p.answer, 30_000_000);
        assert_eq!(p.cached, None);
        let p = parse_price_body(
            br#"{"validFrom":"2024-01-24T14:50+01","per1MQueryTokens":2.5,"per1MAnswerTokens":10,"per1MCachedQueryTokens":1.25}"#,
        )
        .unwrap();
        assert_eq!(p.query, 2_500_000);
        assert_eq!(p.cached, Some(1_250_000));
        assert_eq!(
            p.valid_from,
            crate::timestamp::parse("2024-01-24T13:50:00Z").unwrap()
        );
    }

    #[test]
    fn bad_price_bodies_name_the_field() {
        let cases: [(&[u8], Option<&str>); 8] = [
            (
                br#"{"per1KQueryTokens":1,"per1KAnswerTokens":1}"#,
                Some("validFrom"),
            ),
            (
                br#"{"validFrom":"x","per1KQueryTokens":1,"per1KAnswerTokens":1}"#,
                Some("validFrom"),
            ),
            (
                br#"{"validFrom":"2024-01-01T00:00:00Z","per1KQueryTokens":-1,"per1KAnswerTokens":1}"#,
                Some("per1KQueryTokens"),
            ),
            (
                br#"{"validFrom":"2024-01-01T00:00:00Z","per1KQueryTokens":"1","per1KAnswerTokens":1}"#,
                Some("per1KQueryTokens"),
            ),
            (
                br#"{"validFrom":"2024-01-01T00:00:00Z","per1KQueryTokens":1}"#,
                Some("per1KAnswerTokens"),
            ),
            (
                br#"{"validFrom":"2024-01-01T00:00:00Z","per1KQueryTokens":1,"per1MAnswerTokens":1}"#,
                None,
            ),
            (
                br#"{"validFrom":"2024-01-01T00:00:00Z","per1kQueryTokens":1}"#,
                Some("per1kQueryTokens"),
            ),
            (br#"[1]"#, None),
        ];
        for (body, param) in cases {
            let e = parse_price_body(body).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert_eq!(
                e.param.as_deref(),
                param,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn model_rows_in_both_units() {
        let p = Price {
            valid_from: 0,
            query: 2_500_000,
            cached: Some(1_250_000),
            answer: 10_000_000,
            ..Price::default()
        };
        let text = serde_json::to_string(&Model::new("m", &[p])).unwrap();
        assert_eq!(
            text,
            r#"{"name":"m","costs":[{"validFrom":"1970-01-01T00:00:00.000Z","per1KQueryTokens":0.0025,"per1KAnswerTokens":0.01,"per1KCachedQueryTokens":0.00125,"per1MQueryTokens":2.5,"per1MAnswerTokens":10,"per1MCachedQueryTokens":1.25}]}"#
        );
    }
}
