//! Timestamps in and out of the REST API.
//!
//! Out: RFC 3339 UTC with milliseconds. In: RFC 3339 plus the short forms the
//! seed API's README used (`2024-01-24T14:50+01`: no seconds, hour-only offset).

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Formats milliseconds since the epoch as `2024-01-25T13:18:05.205Z`.
pub fn format_ms(ms: i64) -> String {
    match DateTime::<Utc>::from_timestamp_millis(ms) {
        Some(t) => t.to_rfc3339_opts(SecondsFormat::Millis, true),
        None => String::from("1970-01-01T00:00:00.000Z"),
    }
}

/// Parses a timestamp with an explicit offset into milliseconds since the epoch.
///
/// Accepted: `YYYY-MM-DDTHH:MM[:SS[.fff]]` followed by `Z`, `±HH`, `±HHMM` or
/// `±HH:MM`; a space instead of `T`; a space instead of `+` before the offset
/// (what an unencoded `+` becomes in a query string); a bare date (midnight UTC).
pub fn parse(s: &str) -> Option<i64> {
    // Only instants that format back to four-digit years (0000-9999).
    parse_any(s).filter(|ms| (MIN_MS..=MAX_MS).contains(ms))
}

/// 0000-01-01T00:00:00.000Z.
pub const MIN_MS: i64 = -62_167_219_200_000;
/// 9999-12-31T23:59:59.999Z.
pub const MAX_MS: i64 = 253_402_300_799_999;

fn parse_any(s: &str) -> Option<i64> {
    let s = s.trim_matches(|c: char| c == ' ');
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_millis());
    }
    let b = s.as_bytes();
    let date = NaiveDate::parse_from_str(s.get(..10)?, "%Y-%m-%d").ok()?;
    if b.len() == 10 {
        return Some(date.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis());
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let rest = &s[11..];
    // Split the time of day from the offset.
    let off_at = rest.find(['Z', 'z', '+', '-', ' ']).unwrap_or(rest.len());
    let (time, offset) = rest.split_at(off_at);
    let (hms, frac) = match time.split_once('.') {
        Some((hms, frac)) => (hms, Some(frac)),
        None => (time, None),
    };
    let mut parts = hms.split(':');
    let h = two_digits(parts.next()?)?;
    let m = two_digits(parts.next()?)?;
    let sec = match parts.next() {
        Some(p) => two_digits(p)?,
        None => 0,
    };
    if parts.next().is_some() {
        return None;
    }
    let millis = match frac {
        None => 0,
        Some(f) if !f.is_empty() && f.bytes().all(|c| c.is_ascii_digit()) => {
            let mut ms = 0u32;
            for (i, c) in f.bytes().take(3).enumerate() {
                ms += u32::from(c - b'0') * 10u32.pow(2 - i as u32);
            }
            ms
        }
        Some(_) => return None,
    };
    let naive = date.and_hms_milli_opt(h, m, sec, millis)?;
    let offset_s = parse_offset(offset)?;
    Some(naive.and_utc().timestamp_millis() - i64::from(offset_s) * 1000)
}

fn two_digits(p: &str) -> Option<u32> {
    if p.len() == 2 && p.bytes().all(|c| c.is_ascii_digit()) {
        p.parse().ok()
    } else {
        None
    }
}

/// Offset in seconds east of UTC.
fn parse_offset(o: &str) -> Option<i32> {
    if o.eq_ignore_ascii_case("z") {
        return Some(0);
    }
    let (sign, digits) = match o.as_bytes().first()? {
        b'+' | b' ' => (1, &o[1..]),
        b'-' => (-1, &o[1..]),
        _ => return None,
    };
    let digits: String = digits.chars().filter(|&c| c != ':').collect();
    if !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let (h, m) = match digits.len() {
        2 => (digits.parse::<i32>().ok()?, 0),
        4 => (
            digits[..2].parse::<i32>().ok()?,
            digits[2..].parse::<i32>().ok()?,
        ),
        _ => return None,
    };
    if h > 23 || m > 59 {
        return None;
    }
    Some(sign * (h * 3600 + m * 60))
}

#[cfg(test)]
mod tests;
