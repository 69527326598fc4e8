//! Query strings of the report endpoints: filters, `group_by`, `format`,
//! and the percent-decoding paths and parameters share.

use crate::error::ApiError;
use crate::store::{Filter, GroupKey};

/// Decodes `%XX` escapes (and `+` as space in query strings).
pub(super) fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Parameters of the report endpoints.
#[derive(Debug, Default)]
pub struct Params {
    /// Filters.
    pub filter: Filter,
    /// `group_by` of `/usage`.
    pub group: Vec<GroupKey>,
    /// `format=csv` of `/queries`.
    pub csv: bool,
}

/// Parses the filter parameters; `allowed` lists those the endpoint takes.
pub fn parse_filter(query: &str, allowed: &[&str]) -> Result<Filter, ApiError> {
    parse_params(query, allowed).map(|p| p.filter)
}

/// Parses report parameters; `allowed` lists those the endpoint takes.
pub fn parse_params(query: &str, allowed: &[&str]) -> Result<Params, ApiError> {
    let mut p = Params::default();
    let f = &mut p.filter;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k, true).ok_or_else(|| ApiError::bad_request("bad query string"))?;
        let v = percent_decode(v, true)
            .ok_or_else(|| ApiError::bad_param(&k, format!("bad encoding of parameter {k}")))?;
        if !allowed.contains(&k.as_str()) {
            return Err(ApiError::bad_param(
                &k,
                format!("unknown parameter {k} (allowed: {})", allowed.join(", ")),
            ));
        }
        let time = |v: &str| {
            crate::timestamp::parse(v).ok_or_else(|| {
                ApiError::bad_param(
                    &k,
                    format!(
                        "{k} `{v}` is not a timestamp with an offset, like 2024-01-24T14:50%2B01"
                    ),
                )
            })
        };
        let number = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| ApiError::bad_param(&k, format!("{k} must be a non-negative integer")))
        };
        match k.as_str() {
            "user" => f.user = Some(v),
            "model" => f.model = Some(v),
            "after" => f.after = Some(time(&v)?),
            "before" => f.before = Some(time(&v)?),
            "limit" => f.limit = Some(number(&v)?),
            "offset" => f.offset = number(&v)?,
            "group_by" => {
                for g in v.split(',').map(str::trim).filter(|g| !g.is_empty()) {
                    let key = match g {
                        "user" => GroupKey::User,
                        "model" => GroupKey::Model,
                        "day" => GroupKey::Day,
                        "month" => GroupKey::Month,
                        "upstream" => GroupKey::Upstream,
                        other => {
                            return Err(ApiError::bad_param(
                                "group_by",
                                format!(
                                    "cannot group by {other} (user, model, day, month, upstream)"
                                ),
                            ))
                        }
                    };
                    if !p.group.contains(&key) {
                        p.group.push(key);
                    }
                }
            }
            "format" => match v.as_str() {
                "json" => p.csv = false,
                "csv" => p.csv = true,
                _ => return Err(ApiError::bad_param("format", "format must be json or csv")),
            },
            _ => unreachable!("checked against allowed"),
        }
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        let f = parse_filter(
            "user=adam&after=2024-01-24T14:50%2B01&before=2024-01-25T00:00:00Z&limit=5&offset=2",
            &["user", "after", "before", "limit", "offset"],
        )
        .unwrap();
        assert_eq!(f.user.as_deref(), Some("adam"));
        assert_eq!(f.after, crate::timestamp::parse("2024-01-24T13:50:00Z"));
        assert_eq!(f.limit, Some(5));
        assert_eq!(f.offset, 2);
        // An unencoded + arrives as a space and still means +.
        let f = parse_filter("after=2024-01-24T14:50+01", &["after"]).unwrap();
        assert_eq!(f.after, crate::timestamp::parse("2024-01-24T13:50:00Z"));
        let e = parse_filter("after=yesterday", &["after"]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("after"));
        let e = parse_filter("usr=adam", &["user"]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("usr"));
        let e = parse_filter("limit=-1", &["limit"]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("limit"));
    }
}
