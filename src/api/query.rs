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

/// What `/usage` can group by, by name. The dashboard offers the groupings
/// listed here (except the time ones), so a new one shows up there too.
pub const GROUP_KEYS: &[(&str, GroupKey)] = &[
    ("user", GroupKey::User),
    ("model", GroupKey::Model),
    ("day", GroupKey::Day),
    ("month", GroupKey::Month),
    ("tier", GroupKey::Tier),
    ("upstream", GroupKey::Upstream),
];

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
            "tag" | "project" if f.tag.is_some() => {
                return Err(ApiError::bad_param(
                    &k,
                    "give one tag or project filter at most (tag and project cannot be combined)",
                ));
            }
            "project" => {
                crate::projects::check_name(&v).map_err(|e| ApiError::bad_param("project", e))?;
                f.tag = Some(crate::tags::TagFilter {
                    key: crate::projects::ROLLUP_KEY.to_owned(),
                    value: Some(v),
                });
            }
            "tag" => {
                let t = crate::tags::TagFilter::parse(&v)
                    .map_err(|e| ApiError::bad_param("tag", e.0))?;
                f.tag = Some(t);
            }
            "group_by" => {
                for g in v.split(',').map(str::trim).filter(|g| !g.is_empty()) {
                    // Projects are rolled up as a tag key no request tag can
                    // have: grouped the same way, one of them at most.
                    let tag_key = match g.strip_prefix("tag:") {
                        Some(k) => {
                            crate::tags::check_key(k)
                                .map_err(|e| ApiError::bad_param("group_by", e.0))?;
                            Some(k)
                        }
                        None if g == "project" => Some(crate::projects::ROLLUP_KEY),
                        None => None,
                    };
                    if let Some(k) = tag_key {
                        if f.group_tag.as_deref().is_some_and(|old| old != k) {
                            return Err(ApiError::bad_param(
                                "group_by",
                                "group by one tag key or project at most",
                            ));
                        }
                        f.group_tag = Some(k.to_owned());
                        if !p.group.contains(&GroupKey::Tag) {
                            p.group.push(GroupKey::Tag);
                        }
                        continue;
                    }
                    let Some(&(_, key)) = GROUP_KEYS.iter().find(|(name, _)| *name == g) else {
                        let names: Vec<&str> = GROUP_KEYS.iter().map(|(n, _)| *n).collect();
                        return Err(ApiError::bad_param(
                            "group_by",
                            format!(
                                "cannot group by {g} ({}, project, tag:<key>)",
                                names.join(", ")
                            ),
                        ));
                    };
                    if !p.group.contains(&key) {
                        p.group.push(key);
                    }
                }
            }
            "status" => {
                f.status = Some(match v.as_str() {
                    "ok" => (100, 399),
                    "error" => (400, u16::MAX),
                    code => match code.parse::<u16>() {
                        Ok(c) if (100..=999).contains(&c) => (c, c),
                        _ => {
                            return Err(ApiError::bad_param(
                                "status",
                                "status must be ok, error or an HTTP status code",
                            ))
                        }
                    },
                })
            }
            "estimated" => {
                f.estimated = Some(match v.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => {
                        return Err(ApiError::bad_param(
                            "estimated",
                            "estimated must be true or false",
                        ))
                    }
                })
            }
            "order" => {
                f.newest_first = match v.as_str() {
                    "asc" => false,
                    "desc" => true,
                    _ => return Err(ApiError::bad_param("order", "order must be asc or desc")),
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
    // The tag rollups hold one tag key per row: a filter on one key and
    // groups by another would need every record read.
    if let (Some(t), Some(k)) = (&f.tag, &f.group_tag) {
        if t.key != *k {
            let shown = |k: &str| {
                if k == crate::projects::ROLLUP_KEY {
                    "project".to_owned()
                } else {
                    format!("tag:{k}")
                }
            };
            return Err(ApiError::bad_param(
                "group_by",
                format!(
                    "group_by={} cannot be combined with a filter on another tag key or the project ({}); filter on the same or group by {}",
                    shown(k),
                    shown(&t.key),
                    shown(&t.key)
                ),
            ));
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
        let all = ["status", "estimated", "order"];
        let f = parse_filter("status=error&estimated=true&order=desc", &all).unwrap();
        assert_eq!(f.status, Some((400, u16::MAX)));
        assert_eq!(f.estimated, Some(true));
        assert!(f.newest_first);
        let f = parse_filter("status=429&estimated=false&order=asc", &all).unwrap();
        assert_eq!(f.status, Some((429, 429)));
        assert_eq!(f.estimated, Some(false));
        assert!(!f.newest_first);
        assert_eq!(
            parse_filter("status=ok", &all).unwrap().status,
            Some((100, 399))
        );
        for (q, param) in [
            ("status=fine", "status"),
            ("status=42", "status"),
            ("estimated=yes", "estimated"),
            ("order=newest", "order"),
        ] {
            let e = parse_filter(q, &all).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{q}");
        }
    }
}
