//! Go-style durations (`1h2m3.5s`, `20ms`): OpenAI writes rate-limit resets
//! in this form, and tollgate's own duration settings accept it too.

/// Parses Go's duration format (`1h2m3.5s`, `6m0s`, `20ms`, `1.5us`, `0`) into
/// nanoseconds. Units: `h`, `m`, `s`, `ms`, `us`/`µs`/`μs`, `ns`. A bare number is
/// taken as seconds, as OpenAI-compatible servers sometimes send plain seconds.
pub fn parse_go_duration_ns(s: &str) -> Option<u128> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if s == "0" {
        return Some(0);
    }
    let b = s.as_bytes();
    if b.iter().all(|c| c.is_ascii_digit() || *c == b'.') {
        return decimal_times(s, 1_000_000_000);
    }
    let mut total: u128 = 0;
    let mut i = 0;
    while i < b.len() {
        let start = i;
        while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
            i += 1;
        }
        let number = &s[start..i];
        if number.is_empty() {
            return None;
        }
        let unit_start = i;
        while i < b.len() && !(b[i].is_ascii_digit() || b[i] == b'.') {
            i += 1;
        }
        let unit_ns: u128 = match &s[unit_start..i] {
            "h" => 3_600_000_000_000,
            "m" => 60_000_000_000,
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" | "µs" | "μs" => 1_000,
            "ns" => 1,
            _ => return None,
        };
        total = total.checked_add(decimal_times(number, unit_ns)?)?;
    }
    Some(total)
}

/// `number * unit` where number is a non-negative decimal, truncated to an integer.
fn decimal_times(number: &str, unit: u128) -> Option<u128> {
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
        return None;
    }
    let int_v: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let mut result = int_v.checked_mul(unit)?;
    let mut scale = unit;
    for c in frac.bytes().take(30) {
        if !c.is_ascii_digit() {
            return None;
        }
        scale /= 10;
        result = result.checked_add(u128::from(c - b'0') * scale)?;
    }
    Some(result)
}

#[cfg(test)]
mod tests;
