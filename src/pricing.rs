//! Prices and cost, in exact integer arithmetic.
//!
//! A price is held as pico-dollars (1e-12 USD) per token: every price OpenAI
//! publishes per 1K or per 1M tokens is an integer there, so cost is an exact
//! integer too and the API prints it as a decimal without float noise.

use std::collections::HashMap;

pub mod list;
pub mod units;

pub use units::{Quality, Tool, Units};

/// Pico-dollars in one dollar.
pub const PICO_PER_DOLLAR: i128 = 1_000_000_000_000;

/// A service tier (`service_tier` of a request or an answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// `auto`: upstream picks (answers say which one it took).
    Auto,
    /// `default`: standard processing.
    Default,
    /// `flex`: slower, cheaper processing.
    Flex,
    /// `priority`: faster, dearer processing.
    Priority,
    /// `scale`: the Scale Tier's reserved capacity.
    Scale,
    /// `batch`: a line of a Batch API job, priced at the batch rates. Set
    /// only by the batch follower ([`crate::batches`]): [`Tier::parse`]
    /// never yields it, so no client gets batch prices by asking.
    Batch,
}

impl Tier {
    /// The tier a `service_tier` value names; `None` for any other text, so
    /// nothing a client invents is stored or priced.
    pub fn parse(s: &str) -> Option<Tier> {
        Some(match s {
            "auto" => Tier::Auto,
            "default" => Tier::Default,
            "flex" => Tier::Flex,
            "priority" => Tier::Priority,
            "scale" => Tier::Scale,
            _ => return None,
        })
    }

    /// The tier of a stored record: what [`Tier::parse`] accepts, and also
    /// `batch`, which only tollgate itself writes.
    pub fn from_stored(s: &str) -> Option<Tier> {
        match s {
            "batch" => Some(Tier::Batch),
            _ => Tier::parse(s),
        }
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Auto => "auto",
            Tier::Default => "default",
            Tier::Flex => "flex",
            Tier::Priority => "priority",
            Tier::Scale => "scale",
            Tier::Batch => "batch",
        }
    }
}

/// Per-token rates of one tier, pico-dollars.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rates {
    /// Per prompt token.
    pub query: i64,
    /// Per cached prompt token; `None` means the query rate.
    pub cached: Option<i64>,
    /// Per completion token.
    pub answer: i64,
}

/// One price row of a model, valid from `valid_from` until the next row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Price {
    /// Start of validity, milliseconds since the epoch.
    pub valid_from: i64,
    /// Pico-dollars per prompt token.
    pub query: i64,
    /// Pico-dollars per cached prompt token; `None` means the query price.
    pub cached: Option<i64>,
    /// Pico-dollars per completion token.
    pub answer: i64,
    /// Rates of the flex tier; `None`: flex is priced at the standard rates.
    pub flex: Option<Rates>,
    /// Rates of the priority tier; `None`: priced at the standard rates.
    pub priority: Option<Rates>,
    /// Pico-dollars per audio prompt token; `None`: the query price.
    pub audio_query: Option<i64>,
    /// Pico-dollars per audio completion token; `None`: the answer price.
    pub audio_answer: Option<i64>,
    /// Pico-dollars per image prompt token; `None`: the query price.
    pub image_query: Option<i64>,
    /// Pico-dollars per image output token; `None`: the answer price.
    pub image_answer: Option<i64>,
    /// Pico-dollars per unit of what the row prices by unit: per second of
    /// audio (whisper-1), per character (tts-1), per image (a rule row
    /// `dall-e-3/1024x1024/standard`) or per tool call (`web_search_call`).
    pub unit: Option<i64>,
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
    /// The audio subset of `query` (uncached audio, as priced).
    pub audio_query: u64,
    /// The audio subset of `answer`.
    pub audio_answer: u64,
    /// The image subset of `query` (uncached image input, as priced).
    pub image_query: u64,
    /// The image subset of `answer`.
    pub image_answer: u64,
    /// The service tier the request was processed in, if known.
    pub tier: Option<Tier>,
    /// What is priced per unit (images, tool calls, seconds, characters).
    pub units: Units,
}

/// A cost split into the parts a price list names, pico-dollars each; the
/// parts add up to the record's cost exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Breakdown {
    /// Uncached text prompt tokens.
    pub input: i64,
    /// Cached prompt tokens.
    pub cached_input: i64,
    /// Text completion tokens, reasoning included.
    pub output: i64,
    /// Audio prompt tokens.
    pub audio_input: i64,
    /// Audio completion tokens.
    pub audio_output: i64,
    /// Image prompt tokens.
    pub image_input: i64,
    /// Image output tokens, or images priced per image.
    pub image_output: i64,
    /// Built-in tool calls, priced per call.
    pub tool: i64,
    /// The tier whose own rates were applied (`None`: standard rates).
    pub tier: Option<Tier>,
    /// What the tier's rates changed against the standard ones (negative
    /// for a discount); already inside the parts above.
    pub tier_adjustment: i64,
}

impl Breakdown {
    /// The sum of the parts: the cost.
    pub fn total(&self) -> i64 {
        self.input
            .saturating_add(self.cached_input)
            .saturating_add(self.output)
            .saturating_add(self.audio_input)
            .saturating_add(self.audio_output)
            .saturating_add(self.image_input)
            .saturating_add(self.image_output)
            .saturating_add(self.tool)
    }
}

fn times(n: u64, rate: i64) -> i128 {
    // Token counts come from upstream's answer: saturate, never wrap.
    i128::from(n).saturating_mul(i128::from(rate))
}

fn clamp(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Price {
    /// The standard rates of the row.
    pub fn standard(&self) -> Rates {
        Rates {
            query: self.query,
            cached: self.cached,
            answer: self.answer,
        }
    }

    /// The rates a tier is priced at: its own where the row has them, the
    /// standard ones otherwise; with which tier's own rates were taken.
    pub fn rates(&self, tier: Option<Tier>) -> (Rates, Option<Tier>) {
        let own = match tier {
            Some(Tier::Flex) => self.flex,
            Some(Tier::Priority) => self.priority,
            _ => None,
        };
        match own {
            Some(r) => (r, tier),
            None => (self.standard(), None),
        }
    }

    /// The optional rates as eleven nullable columns, as both backends
    /// store them: flex query, cached, answer, then priority's, then audio
    /// query and answer, image query and answer, and the unit rate.
    pub fn extra_columns(&self) -> [Option<i64>; 11] {
        let cols = |r: Option<Rates>| match r {
            Some(r) => [Some(r.query), r.cached, Some(r.answer)],
            None => [None; 3],
        };
        let (f, p) = (cols(self.flex), cols(self.priority));
        [
            f[0],
            f[1],
            f[2],
            p[0],
            p[1],
            p[2],
            self.audio_query,
            self.audio_answer,
            self.image_query,
            self.image_answer,
            self.unit,
        ]
    }

    /// Sets the optional rates from [`Price::extra_columns`]' layout; a
    /// tier without both its query and answer rate has none.
    pub fn with_extra_columns(mut self, c: [Option<i64>; 11]) -> Price {
        self.audio_query = c[6];
        self.audio_answer = c[7];
        self.image_query = c[8];
        self.image_answer = c[9];
        self.unit = c[10];
        let rates = |q: Option<i64>, cached, a: Option<i64>| {
            Some(Rates {
                query: q?,
                cached,
                answer: a?,
            })
        };
        self.flex = rates(c[0], c[1], c[2]);
        self.priority = rates(c[3], c[4], c[5]);
        self
    }

    /// The cost split by part: text (query - cached - audio - image) x
    /// query, cached x cached, audio x audio query, image x image query,
    /// (answer - audio - image) x answer, audio x audio answer and image x
    /// image answer; text and cached tokens at the tier's rates. Seconds
    /// (an audio input) and characters (a text input) at the row's unit
    /// rate; the other units are priced by their own rows
    /// ([`PriceTable::breakdown`]).
    pub fn breakdown(&self, t: Tokens) -> Breakdown {
        if t.tier == Some(Tier::Batch) {
            return self.batch_breakdown(t);
        }
        let cached = t.cached.min(t.query);
        let audio_in = t.audio_query.min(t.query - cached);
        let image_in = t.image_query.min(t.query - cached - audio_in);
        let audio_out = t.audio_answer.min(t.answer);
        let image_out = t.image_answer.min(t.answer - audio_out);
        let unit = self.unit.unwrap_or(0);
        let parts = |r: &Rates| {
            (
                clamp(times(t.query - cached - audio_in - image_in, r.query))
                    .saturating_add(clamp(times(t.units.characters, unit))),
                clamp(times(cached, r.cached.unwrap_or(r.query))),
                clamp(times(t.answer - audio_out - image_out, r.answer)),
            )
        };
        // Audio and image rates have no tier variants: the same in both sums.
        let media = |r: &Rates| {
            (
                clamp(times(audio_in, self.audio_query.unwrap_or(r.query)))
                    .saturating_add(clamp(times(t.units.seconds, unit))),
                clamp(times(audio_out, self.audio_answer.unwrap_or(r.answer))),
                clamp(times(image_in, self.image_query.unwrap_or(r.query))),
                clamp(times(image_out, self.image_answer.unwrap_or(r.answer))),
            )
        };
        let (rates, tier) = self.rates(t.tier);
        let (input, cached_input, output) = parts(&rates);
        let (audio_input, audio_output, image_input, image_output) = media(&rates);
        let mut b = Breakdown {
            input,
            cached_input,
            output,
            audio_input,
            audio_output,
            image_input,
            image_output,
            tool: 0,
            tier,
            tier_adjustment: 0,
        };
        if tier.is_some() {
            let s = self.standard();
            let (i, c, o) = parts(&s);
            let (ai, ao, ii, io) = media(&s);
            let standard = [c, o, ai, ao, ii, io]
                .into_iter()
                .fold(i, i64::saturating_add);
            b.tier_adjustment = b.total().saturating_sub(standard);
        }
        b
    }

    /// A batch line: every part at half its standard price (OpenAI's
    /// published Batch API discount), rounded down to the pico-dollar.
    fn batch_breakdown(&self, t: Tokens) -> Breakdown {
        let standard = self.breakdown(Tokens { tier: None, ..t });
        let mut b = Breakdown {
            input: standard.input / 2,
            cached_input: standard.cached_input / 2,
            output: standard.output / 2,
            audio_input: standard.audio_input / 2,
            audio_output: standard.audio_output / 2,
            image_input: standard.image_input / 2,
            image_output: standard.image_output / 2,
            tool: standard.tool,
            tier: Some(Tier::Batch),
            tier_adjustment: 0,
        };
        b.tier_adjustment = b.total().saturating_sub(standard.total());
        b
    }

    /// Cost in pico-dollars: the sum of [`Price::breakdown`].
    pub fn cost(&self, t: Tokens) -> i64 {
        self.breakdown(t).total()
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
        let (b, priced) = self.breakdown(answered, requested, at_ms, t);
        (b.total(), priced)
    }

    /// The cost split by part, and whether a price was found: for the
    /// tokens (and seconds or characters) the model's row, for images
    /// priced per image a rule row `MODEL/SIZE/QUALITY` (or `MODEL/SIZE`),
    /// for tool calls a row `TOOL/MODEL` (or `TOOL`). A count without a
    /// price leaves the whole record unpriced.
    pub fn breakdown(
        &self,
        answered: &str,
        requested: &str,
        at_ms: i64,
        t: Tokens,
    ) -> (Breakdown, bool) {
        let u = t.units;
        // Nothing to price (model lists, files, ...): free, and not "unpriced".
        if t.query == 0 && t.answer == 0 && u.is_empty() {
            return (Breakdown::default(), true);
        }
        let direct = self
            .valid(answered, at_ms)
            .or_else(|| self.valid(requested, at_ms));
        let row = direct.or_else(|| self.lookup(answered, requested, at_ms).map(|(_, p)| p));
        let by_row = t.query > 0 || t.answer > 0 || u.seconds > 0 || u.characters > 0;
        let mut b = match row {
            Some(p) if (u.seconds == 0 && u.characters == 0) || p.unit.is_some() => p.breakdown(t),
            _ if by_row => return (Breakdown::default(), false),
            _ => Breakdown::default(),
        };
        if u.images > 0 {
            let Some(rate) = self.per_image(answered, requested, at_ms, &u) else {
                return (Breakdown::default(), false);
            };
            b.image_output = b.image_output.saturating_add(clamp(times(u.images, rate)));
        }
        for tool in Tool::ALL {
            let n = u.tool(tool);
            if n == 0 {
                continue;
            }
            let Some(rate) = self.tool_rate(tool, answered, requested, at_ms) else {
                return (Breakdown::default(), false);
            };
            b.tool = b.tool.saturating_add(clamp(times(n, rate)));
        }
        (b, true)
    }

    /// The unit rate of the row `name` valid at `at_ms`.
    fn unit_rate(&self, name: &str, at_ms: i64) -> Option<i64> {
        self.valid(name, at_ms).and_then(|p| p.unit)
    }

    /// The price of one image: the rule for the model (through the lookup
    /// chain), size and quality; a request without them gets the
    /// defaults, 1024x1024 and `standard`.
    fn per_image(&self, answered: &str, requested: &str, at_ms: i64, u: &Units) -> Option<i64> {
        let (w, h) = u.image_size.unwrap_or((1024, 1024));
        let q = u.image_quality.unwrap_or(Quality::Standard).as_str();
        candidates(answered, requested).into_iter().find_map(|m| {
            self.unit_rate(&format!("{m}/{w}x{h}/{q}"), at_ms)
                .or_else(|| self.unit_rate(&format!("{m}/{w}x{h}"), at_ms))
        })
    }

    /// The price of one tool call: the tool's row for the model (through
    /// the lookup chain), else the tool's own row.
    fn tool_rate(&self, tool: Tool, answered: &str, requested: &str, at_ms: i64) -> Option<i64> {
        let kind = tool.item_type();
        candidates(answered, requested)
            .into_iter()
            .find_map(|m| self.unit_rate(&format!("{kind}/{m}"), at_ms))
            .or_else(|| self.unit_rate(kind, at_ms))
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

/// Price list shipped with tollgate: (model, $/1M input, $/1M cached input,
/// $/1M output, then the same three for flex and for priority, then $/1M
/// audio input and output, $/1M image input and output, and $ per unit).
const DEFAULT_PRICES: &str = include_str!("prices.tsv");

/// The built-in price list, valid from the epoch.
pub fn default_prices() -> Vec<(String, Price)> {
    list::parse_tsv(DEFAULT_PRICES).expect("the built-in price list parses")
}

#[cfg(test)]
mod tests;
