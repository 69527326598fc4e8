//! Upstream rate-limit headers (`x-ratelimit-*`).

use http::{HeaderMap, HeaderName};

use crate::duration::parse_go_duration_ns;
use serde::{Deserialize, Serialize};

/// One limit (requests or tokens) as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Limit {
    /// `x-ratelimit-limit-*`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maximum: Option<u64>,
    /// `x-ratelimit-remaining-*`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
    /// Absolute reset time, RFC 3339: the answer's arrival plus `x-ratelimit-reset-*`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset: Option<String>,
}

/// The latest rate-limit state reported by upstream (`GET /ratelimits`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RateLimits {
    /// Token limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Limit>,
    /// Request limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests: Option<Limit>,
}

/// The headers read, in the order [`parse`] expects them (prepared names:
/// looking up a `&str` parses and lowercases it first).
const NAMES: [HeaderName; 6] = [
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
];

/// An answer's `x-ratelimit-*` headers as they came, with their arrival
/// time. The values are copied out (hyper's header values share the whole
/// read buffer, which it could then not reuse for the next answer); parsing
/// and formatting the reset times waits until someone reads them, off the
/// request path.
#[derive(Debug, Clone)]
pub struct Raw {
    values: [Option<Short>; 6],
    at_ms: i64,
}

/// A short header value kept inline. Real values are a few characters
/// (`9999`, `1m2.172s`); longer ones are not kept and read as absent.
#[derive(Debug, Clone, Copy)]
struct Short {
    len: u8,
    buf: [u8; 24],
}

impl Short {
    fn new(s: &str) -> Option<Short> {
        let mut buf = [0u8; 24];
        buf.get_mut(..s.len())?.copy_from_slice(s.as_bytes());
        Some(Short {
            len: s.len() as u8,
            buf,
        })
    }

    fn as_str(&self) -> &str {
        // Copied from a `&str` by `new`.
        std::str::from_utf8(&self.buf[..usize::from(self.len)]).unwrap_or("")
    }
}

impl Raw {
    /// The rate-limit headers of an answer that arrived at `at_ms`; `None`
    /// when it has none.
    pub fn capture(headers: &HeaderMap, at_ms: i64) -> Option<Raw> {
        let values = NAMES.map(|n| {
            headers
                .get(&n)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| Short::new(v.trim()))
        });
        values
            .iter()
            .any(Option::is_some)
            .then_some(Raw { values, at_ms })
    }

    /// What the headers say; `None` when none of them parses.
    pub fn parse(&self) -> Option<RateLimits> {
        parse(|i| self.values[i].as_ref().map(Short::as_str), self.at_ms)
    }
}

/// Reads the `x-ratelimit-*` headers of an answer that arrived at `now_ms`.
/// `None` when the answer carries none of them.
pub fn from_headers(headers: &HeaderMap, now_ms: i64) -> Option<RateLimits> {
    parse(
        |i| {
            headers
                .get(&NAMES[i])
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        },
        now_ms,
    )
}

fn parse<'a>(get: impl Fn(usize) -> Option<&'a str>, now_ms: i64) -> Option<RateLimits> {
    let limit = |first: usize| -> Option<Limit> {
        let get = |i: usize| get(first + i);
        let maximum = get(0).and_then(|v| v.parse().ok());
        let remaining = get(1).and_then(|v| v.parse().ok());
        let reset = get(2).and_then(parse_go_duration_ns).map(|ns| {
            // Absurd resets end at the last representable instant, never
            // wrap around to before the answer.
            let at = i64::try_from(ns / 1_000_000)
                .ok()
                .and_then(|d| now_ms.checked_add(d))
                .unwrap_or(i64::MAX)
                .min(crate::timestamp::MAX_MS);
            crate::timestamp::format_ms(at)
        });
        if maximum.is_none() && remaining.is_none() && reset.is_none() {
            None
        } else {
            Some(Limit {
                maximum,
                remaining,
                reset,
            })
        }
    };
    let rl = RateLimits {
        tokens: limit(0),
        requests: limit(3),
    };
    (rl.tokens.is_some() || rl.requests.is_some()).then_some(rl)
}

#[cfg(test)]
mod tests;
