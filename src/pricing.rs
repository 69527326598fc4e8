//! Prices and cost, in exact integer arithmetic.
//!
//! A price is held as pico-dollars (1e-12 USD) per token: every price OpenAI
//! publishes per 1K or per 1M tokens is an integer there, so cost is an exact
//! integer too and the API prints it as a decimal without float noise.

use std::collections::HashMap;

/// Pico-dollars in one dollar.
pub const PICO_PER_DOLLAR: i128 = 1_000_000_000_000;

/// One price row of a model, valid from `valid_from` until the next row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    /// Start of validity, milliseconds since the epoch.
    pub valid_from: i64,
    /// Pico-dollars per prompt token.
    pub query: i64,
    /// Pico-dollars per cached prompt token; `None` means the query price.
    pub cached: Option<i64>,
    /// Pico-dollars per completion token.
    pub answer: i64,
}

/// Tokens of one request, as priced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    /// Prompt tokens, cached ones included.
    pub query: u64,
    /// Completion tokens, reasoning ones included.
    pub answer: u64,
    /// The cached subset of `query`.
    pub cached: u64,
}

impl Price {
    /// Cost in pico-dollars: (query - cached) x query + cached x cached + answer x answer.
    pub fn cost(&self, t: Tokens) -> i64 {
        let cached = t.cached.min(t.query);
        // Token counts come from upstream's answer: saturate, never wrap.
        let c = i128::from(t.query - cached)
            .saturating_mul(i128::from(self.query))
            .saturating_add(
                i128::from(cached).saturating_mul(i128::from(self.cached.unwrap_or(self.query))),
            )
            .saturating_add(i128::from(t.answer).saturating_mul(i128::from(self.answer)));
        i64::try_from(c).unwrap_or(i64::MAX)
    }
}

/// All price rows, by model, each list sorted by `valid_from`.
#[derive(Debug, Default, Clone)]
pub struct PriceTable {
    models: HashMap<String, Vec<Price>>,
}

impl PriceTable {
    /// Adds a row, replacing one with the same `valid_from`.
    pub fn insert(&mut self, model: &str, price: Price) {
        let rows = self.models.entry(model.to_owned()).or_default();
        match rows.binary_search_by_key(&price.valid_from, |p| p.valid_from) {
            Ok(i) => rows[i] = price,
            Err(i) => rows.insert(i, price),
        }
    }

    /// Rows of one model, oldest first.
    pub fn rows(&self, model: &str) -> Option<&[Price]> {
        self.models.get(model).map(Vec::as_slice)
    }

    /// Model names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.models.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Whether no model has a price.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// The price row valid at `at_ms` for exactly `model`.
    fn valid(&self, model: &str, at_ms: i64) -> Option<&Price> {
        let rows = self.models.get(model)?;
        let i = rows.partition_point(|p| p.valid_from <= at_ms);
        i.checked_sub(1).map(|i| &rows[i])
    }

    /// The price for a request that started at `at_ms`, found through the
    /// lookup chain of [`candidates`]. Returns the name priced under and the row.
    pub fn lookup<'a>(
        &'a self,
        answered: &str,
        requested: &str,
        at_ms: i64,
    ) -> Option<(String, &'a Price)> {
        // The common cases first, without building the whole chain.
        for m in [answered, requested] {
            if let Some(p) = self.valid(m, at_ms) {
                return Some((m.to_owned(), p));
            }
        }
        candidates(answered, requested)
            .into_iter()
            .find_map(|m| self.valid(&m, at_ms).map(|p| (m, p)))
    }

    /// Cost in pico-dollars and whether a price was found.
    pub fn cost(&self, answered: &str, requested: &str, at_ms: i64, t: Tokens) -> (i64, bool) {
        // Nothing to price (model lists, files, ...): free, and not "unpriced".
        if t.query == 0 && t.answer == 0 {
            return (0, true);
        }
        let direct = self
            .valid(answered, at_ms)
            .or_else(|| self.valid(requested, at_ms));
        match direct.or_else(|| self.lookup(answered, requested, at_ms).map(|(_, p)| p)) {
            Some(p) => (p.cost(t), true),
            None => (0, false),
        }
    }
}

/// The names a request's price is looked up under, in order: the answered
/// model, the requested one, then each without a date suffix, and the base
/// model of a fine-tuned name (`ft:gpt-4o-mini:org::id` -> `gpt-4o-mini`).
pub fn candidates(answered: &str, requested: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(4);
    let mut push = |s: &str| {
        if !s.is_empty() && !out.iter().any(|o| o == s) {
            out.push(s.to_owned());
        }
    };
    push(answered);
    push(requested);
    for m in [answered, requested] {
        let base = fine_tune_base(m).unwrap_or(m);
        push(base);
        push(strip_date(base));
    }
    out
}

fn fine_tune_base(m: &str) -> Option<&str> {
    let rest = m.strip_prefix("ft:")?;
    rest.split(':').next().filter(|s| !s.is_empty())
}

/// `gpt-4o-2024-08-06` -> `gpt-4o`, `gpt-4-0613` -> `gpt-4`; anything else unchanged.
pub fn strip_date(m: &str) -> &str {
    let b = m.as_bytes();
    let digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    if b.len() > 11 {
        let t = &b[b.len() - 11..];
        if t[0] == b'-'
            && digits(&t[1..5])
            && t[5] == b'-'
            && digits(&t[6..8])
            && t[8] == b'-'
            && digits(&t[9..11])
        {
            return &m[..m.len() - 11];
        }
    }
    if b.len() > 5 {
        let t = &b[b.len() - 5..];
        if t[0] == b'-' && digits(&t[1..]) {
            return &m[..m.len() - 5];
        }
    }
    m
}

/// Why a decimal could not be taken as a price.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecimalError {
    /// Not a JSON number.
    NotANumber,
    /// Below zero.
    Negative,
    /// Finer than the unit can hold.
    TooPrecise,
    /// Too large.
    TooLarge,
}

impl std::fmt::Display for DecimalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DecimalError::NotANumber => "must be a finite number",
            DecimalError::Negative => "must not be negative",
            DecimalError::TooPrecise => "has more decimals than 1e-12 dollars per token",
            DecimalError::TooLarge => "is too large",
        })
    }
}

/// Parses the text of a JSON number exactly and multiplies it by `10^scale`;
/// the result must be a non-negative integer that fits in an `i64`.
pub fn parse_scaled(text: &str, scale: u32) -> Result<i64, DecimalError> {
    let t = text.trim();
    let (mantissa, exp) = match t.find(['e', 'E']) {
        Some(i) => (
            &t[..i],
            t[i + 1..]
                .parse::<i32>()
                .map_err(|_| DecimalError::NotANumber)?,
        ),
        None => (t, 0),
    };
    let (neg, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mantissa),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty()
        || !int.bytes().all(|c| c.is_ascii_digit())
        || !frac.bytes().all(|c| c.is_ascii_digit())
        || (mantissa.contains('.') && frac.is_empty())
    {
        return Err(DecimalError::NotANumber);
    }
    let mut digits: String = format!("{int}{frac}");
    let mut shift = i64::from(scale) + i64::from(exp) - frac.len() as i64;
    // Trailing zeros may absorb a negative shift.
    while shift < 0 && digits.ends_with('0') && digits.len() > 1 {
        digits.pop();
        shift += 1;
    }
    let all_zero = digits.bytes().all(|c| c == b'0');
    if neg && !all_zero {
        return Err(DecimalError::Negative);
    }
    if all_zero {
        return Ok(0);
    }
    if shift < 0 {
        return Err(DecimalError::TooPrecise);
    }
    let digits = digits.trim_start_matches('0');
    if digits.len() as i64 + shift > 19 {
        return Err(DecimalError::TooLarge);
    }
    let v: i64 = digits.parse().map_err(|_| DecimalError::TooLarge)?;
    v.checked_mul(10i64.pow(shift as u32))
        .ok_or(DecimalError::TooLarge)
}

/// Formats `value / 10^scale` as a plain decimal without trailing zeros.
pub fn format_scaled(value: i128, scale: u32) -> String {
    let mut out = Vec::with_capacity(24);
    write_scaled(&mut out, value, scale);
    String::from_utf8(out).unwrap_or_default()
}

/// [`format_scaled`] into a buffer: the access log calls
/// it per record, so it avoids `fmt` and 128-bit division where the value
/// fits 64 bits (it nearly always does).
pub fn write_scaled(out: &mut Vec<u8>, value: i128, scale: u32) {
    if value < 0 {
        out.push(b'-');
    }
    let v = value.unsigned_abs();
    let div = 10u128.pow(scale);
    let (int, frac) = match (u64::try_from(v), u64::try_from(div)) {
        (Ok(v), Ok(d)) => (u128::from(v / d), u128::from(v % d)),
        _ => (v / div, v % div),
    };
    out.extend_from_slice(itoa::Buffer::new().format(int).as_bytes());
    if frac != 0 {
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(frac).as_bytes();
        out.push(b'.');
        out.resize(out.len() + scale as usize - digits.len(), b'0');
        let end = digits.len() - digits.iter().rev().take_while(|&&d| d == b'0').count();
        out.extend_from_slice(&digits[..end]);
    }
}

/// Formats pico-dollars as dollars.
pub fn format_dollars(pico: i128) -> String {
    format_scaled(pico, 12)
}

/// Pico-dollars per token from a price per 1K tokens.
pub const SCALE_PER_1K: u32 = 9;
/// Pico-dollars per token from a price per 1M tokens.
pub const SCALE_PER_1M: u32 = 6;

/// Price list shipped with tollgate: (model, $/1M input, $/1M cached input, $/1M output).
const DEFAULT_PRICES: &str = include_str!("prices.tsv");

/// The built-in price list, valid from the epoch.
pub fn default_prices() -> Vec<(String, Price)> {
    DEFAULT_PRICES
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let p = |s: &str| parse_scaled(s, SCALE_PER_1M).expect("built-in price parses");
            let cached = match f[2] {
                "-" => None,
                c => Some(p(c)),
            };
            (
                f[0].to_owned(),
                Price {
                    valid_from: 0,
                    query: p(f[1]),
                    cached,
                    answer: p(f[3]),
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests;
