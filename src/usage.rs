//! Reading what accounting needs from request and answer bodies, without
//! re-serializing them: the request's `model`/`stream` fields, the
//! `include_usage` splice, and usage/model from JSON answers and SSE streams
//! fed in arbitrary chunks.

use std::borrow::Cow;
use std::sync::LazyLock;

use bytes::Bytes;
use memchr::memmem::Finder;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// The API an incoming path belongs to; decides how bodies are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions` (legacy).
    Completions,
    /// `POST /v1/responses`.
    Responses,
    /// `POST /v1/embeddings`.
    Embeddings,
    /// Audio transcription/translation and image generation/edits: bodies streamed, answers may carry usage.
    Media,
    /// Everything else under `/v1/`: streamed through, recorded with zero tokens.
    Other,
}

impl Endpoint {
    /// Classifies a request.
    pub fn classify(method: &http::Method, path: &str) -> Endpoint {
        if method != http::Method::POST {
            return Endpoint::Other;
        }
        match path.trim_end_matches('/') {
            "/v1/chat/completions" => Endpoint::Chat,
            "/v1/completions" => Endpoint::Completions,
            "/v1/responses" => Endpoint::Responses,
            "/v1/embeddings" => Endpoint::Embeddings,
            "/v1/audio/transcriptions"
            | "/v1/audio/translations"
            | "/v1/images/generations"
            | "/v1/images/edits"
            | "/v1/images/variations" => Endpoint::Media,
            _ => Endpoint::Other,
        }
    }

    /// Whether the request body is a JSON object that must carry a `model`.
    pub fn needs_model(self) -> bool {
        matches!(
            self,
            Endpoint::Chat | Endpoint::Completions | Endpoint::Responses | Endpoint::Embeddings
        )
    }

    /// Whether upstream only reports streamed usage when asked (`include_usage`).
    pub fn usage_on_request(self) -> bool {
        matches!(self, Endpoint::Chat | Endpoint::Completions)
    }

    /// How an SSE answer of this endpoint is framed.
    pub fn stream_kind(self) -> StreamKind {
        match self {
            Endpoint::Responses => StreamKind::Responses,
            _ => StreamKind::Chat,
        }
    }
}

/// The request fields tollgate needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestInfo {
    /// `model`.
    pub model: String,
    /// `stream: true`.
    pub stream: bool,
    /// `stream_options.include_usage: true`.
    pub include_usage: bool,
    /// `max_completion_tokens`, `max_tokens` or `max_output_tokens`.
    pub max_tokens: Option<u64>,
    /// How many answers the request asks for (`n`, `best_of`; 1 without).
    pub choices: u64,
}

/// Why a request body was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// Not parseable JSON (or not UTF-8).
    NotJson,
    /// JSON, but not an object.
    NotObject,
    /// No `model` field.
    NoModel,
    /// `model` is not a string.
    ModelNotString,
}

impl RequestError {
    /// The message answered to the client.
    pub fn message(self) -> &'static str {
        match self {
            RequestError::NotJson => "We could not parse the JSON body of your request. The body must be valid UTF-8 JSON.",
            RequestError::NotObject => "The request body must be a JSON object.",
            RequestError::NoModel => "you must provide a model parameter",
            RequestError::ModelNotString => "Invalid type for 'model': expected a string.",
        }
    }

    /// The request field at fault.
    pub fn param(self) -> Option<&'static str> {
        match self {
            RequestError::NoModel | RequestError::ModelNotString => Some("model"),
            _ => None,
        }
    }
}

/// A JSON value read only as far as accounting needs.
#[derive(Default)]
enum Loose<'a> {
    Str(Cow<'a, str>),
    Bool(bool),
    /// An object; `include_usage` holds that member's boolean, if any.
    Object {
        include_usage: Option<bool>,
    },
    Null,
    Int(u64),
    Other,
    /// The member is absent.
    #[default]
    Missing,
}

impl Loose<'_> {
    fn int(self) -> Option<u64> {
        match self {
            Loose::Int(n) => Some(n),
            _ => None,
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Loose<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Loose<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Loose::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Loose::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Loose::Str(Cow::Owned(v)))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Loose::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Loose::Other)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Loose::Int(v))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Loose::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Loose::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Loose::Null)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Loose::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut include_usage = None;
                while let Some(k) = map.next_key::<Cow<'de, str>>()? {
                    if k == "include_usage" {
                        include_usage = match map.next_value::<Loose>()? {
                            Loose::Bool(b) => Some(b),
                            _ => None,
                        };
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Loose::Object { include_usage })
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow, default)]
    model: Loose<'a>,
    #[serde(borrow, default)]
    stream: Loose<'a>,
    #[serde(borrow, default)]
    stream_options: Loose<'a>,
    #[serde(borrow, default)]
    max_tokens: Loose<'a>,
    #[serde(borrow, default)]
    max_completion_tokens: Loose<'a>,
    #[serde(borrow, default)]
    max_output_tokens: Loose<'a>,
    #[serde(borrow, default)]
    n: Loose<'a>,
    #[serde(borrow, default)]
    best_of: Loose<'a>,
}

/// Validates a JSON request body and reads `model`, `stream` and
/// `stream_options.include_usage`. The whole body is validated (structure and
/// UTF-8) so a broken body never reaches upstream.
pub fn parse_request(body: &[u8]) -> Result<RequestInfo, RequestError> {
    match body.iter().find(|c| !c.is_ascii_whitespace()) {
        Some(b'{') => {}
        Some(_) => {
            // Distinguish valid non-object JSON from garbage.
            let mut copy = body.to_vec();
            return match simd_json::to_borrowed_value(&mut copy) {
                Ok(_) => Err(RequestError::NotObject),
                Err(_) => Err(RequestError::NotJson),
            };
        }
        None => return Err(RequestError::NotJson),
    }
    // simd-json parses in place; the forwarded bytes stay untouched.
    let mut copy = body.to_vec();
    let head: Head = simd_json::serde::from_slice(&mut copy).map_err(|_| RequestError::NotJson)?;
    let model = match head.model {
        Loose::Missing => return Err(RequestError::NoModel),
        Loose::Str(s) => s.into_owned(),
        _ => return Err(RequestError::ModelNotString),
    };
    let stream = matches!(head.stream, Loose::Bool(true));
    let include_usage = matches!(
        head.stream_options,
        Loose::Object {
            include_usage: Some(true)
        }
    );
    let max_tokens = [
        head.max_completion_tokens,
        head.max_tokens,
        head.max_output_tokens,
    ]
    .into_iter()
    .find_map(Loose::int);
    // Upstream may generate (and bill) every candidate of `best_of`.
    let choices = [head.n, head.best_of]
        .into_iter()
        .filter_map(Loose::int)
        .max()
        .unwrap_or(1)
        .max(1);
    Ok(RequestInfo {
        model,
        stream,
        include_usage,
        max_tokens,
        choices,
    })
}

/// Returns `body` with `stream_options.include_usage` set to true, merged into an
/// existing `stream_options` object. `body` must be a valid JSON object (as
/// checked by [`parse_request`]). `None` when `stream_options` is neither an
/// object nor null, which upstream rejects anyway.
pub fn splice_include_usage(body: &[u8]) -> Option<Vec<u8>> {
    let open = skip_ws(body, 0);
    if body.get(open) != Some(&b'{') {
        return None;
    }
    let members = object_members(body, open)?;
    let last = members
        .iter()
        .rev()
        .find(|m| key_is(body, m, "stream_options"));
    let mut out = Vec::with_capacity(body.len() + 40);
    match last {
        None => {
            out.extend_from_slice(&body[..=open]);
            out.extend_from_slice(br#""stream_options":{"include_usage":true}"#);
            if !members.is_empty() {
                out.push(b',');
            }
            out.extend_from_slice(&body[open + 1..]);
        }
        Some(m) => {
            let (vs, ve) = m.value;
            match body[vs] {
                b'n' => {
                    out.extend_from_slice(&body[..vs]);
                    out.extend_from_slice(br#"{"include_usage":true}"#);
                    out.extend_from_slice(&body[ve..]);
                }
                b'{' => {
                    let inner = object_members(body, vs)?;
                    match inner
                        .iter()
                        .rev()
                        .find(|m| key_is(body, m, "include_usage"))
                    {
                        Some(iu) => {
                            out.extend_from_slice(&body[..iu.value.0]);
                            out.extend_from_slice(b"true");
                            out.extend_from_slice(&body[iu.value.1..]);
                        }
                        None => {
                            out.extend_from_slice(&body[..=vs]);
                            out.extend_from_slice(br#""include_usage":true"#);
                            if !inner.is_empty() {
                                out.push(b',');
                            }
                            out.extend_from_slice(&body[vs + 1..]);
                        }
                    }
                }
                _ => return None,
            }
        }
    }
    Some(out)
}

/// Whether a member's key is `name`, escapes (`\u005f`) decoded.
fn key_is(body: &[u8], m: &Member, name: &str) -> bool {
    let raw = &body[m.key.0..m.key.1];
    if !raw.contains(&b'\\') {
        return raw.len() == name.len() + 2 && &raw[1..raw.len() - 1] == name.as_bytes();
    }
    serde_json::from_slice::<String>(raw).is_ok_and(|k| k == name)
}

struct Member {
    /// Span of the key, quotes included.
    key: (usize, usize),
    /// Span of the value.
    value: (usize, usize),
}

/// Members of the object starting at `open` (which holds `{`).
fn object_members(b: &[u8], open: usize) -> Option<Vec<Member>> {
    let mut out = Vec::new();
    let mut i = skip_ws(b, open + 1);
    if b.get(i) == Some(&b'}') {
        return Some(out);
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let ke = skip_string(b, i)?;
        let mut j = skip_ws(b, ke);
        if b.get(j) != Some(&b':') {
            return None;
        }
        j = skip_ws(b, j + 1);
        let ve = skip_value(b, j)?;
        out.push(Member {
            key: (i, ke),
            value: (j, ve),
        });
        i = skip_ws(b, ve);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b'}') => return Some(out),
            _ => return None,
        }
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// End (exclusive) of the string starting at `i` (which holds `"`).
fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        let k = j + memchr::memchr2(b'"', b'\\', b.get(j..)?)?;
        if b[k] == b'\\' {
            j = k + 2;
        } else {
            return Some(k + 1);
        }
    }
}

/// End (exclusive) of the JSON value starting at `i`. Structure is trusted
/// only as far as bracket matching; callers pass validated JSON or accept `None`.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            {
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

static USAGE_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\""));
static MODEL_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"model\""));
static CHOICES_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"choices\""));
static ERROR_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"error\""));

/// Where the value of a `"key":` occurrence at `at` starts (the key's quote at `at`).
fn value_after_key(b: &[u8], at: usize, key_len: usize) -> Option<usize> {
    // A quote escaped inside a string is no key.
    if at > 0 && b[at - 1] == b'\\' {
        return None;
    }
    let i = skip_ws(b, at + key_len);
    if b.get(i) != Some(&b':') {
        return None;
    }
    Some(skip_ws(b, i + 1))
}

/// The last object value of key `usage` in `b` (a JSON text or a window of one).
/// An unescaped `"usage":` can only be a key, never string content.
fn find_usage_object(b: &[u8]) -> Option<&[u8]> {
    for at in USAGE_KEY.find_iter(b).collect::<Vec<_>>().into_iter().rev() {
        if let Some(v) = value_after_key(b, at, 7) {
            if b.get(v) == Some(&b'{') {
                let end = skip_value(b, v)?;
                return Some(&b[v..end]);
            }
        }
    }
    None
}

/// The first string value of key `model`.
pub fn find_model(b: &[u8]) -> Option<String> {
    for at in MODEL_KEY.find_iter(b) {
        if let Some(v) = value_after_key(b, at, 7) {
            if b.get(v) == Some(&b'"') {
                let end = skip_string(b, v)?;
                return serde_json::from_slice::<String>(&b[v..end]).ok();
            }
        }
    }
    None
}

/// Whether the event's `choices` is an empty array (the usage-only chunk).
fn choices_empty(b: &[u8]) -> bool {
    CHOICES_KEY.find_iter(b).any(|at| {
        value_after_key(b, at, 9)
            .filter(|&v| b.get(v) == Some(&b'['))
            .is_some_and(|v| b.get(skip_ws(b, v + 1)) == Some(&b']'))
    })
}

/// Tokens reported by upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt / input tokens.
    pub query: u64,
    /// Completion / output tokens.
    pub answer: u64,
    /// Cached prompt tokens (a subset of `query`).
    pub cached: u64,
    /// Reasoning tokens (a subset of `answer`).
    pub reasoning: u64,
}

#[derive(Deserialize, Default)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct UsageObject {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<Details>,
    #[serde(default)]
    completion_tokens_details: Option<Details>,
    #[serde(default)]
    input_tokens_details: Option<Details>,
    #[serde(default)]
    output_tokens_details: Option<Details>,
}

/// Parses a usage object of any OpenAI API (chat, completions, embeddings,
/// responses, audio, images). `None` when it holds no token counts.
pub fn parse_usage(obj: &[u8]) -> Option<Usage> {
    let u: UsageObject = serde_json::from_slice(obj).ok()?;
    let query = u.prompt_tokens.or(u.input_tokens);
    let answer = u.completion_tokens.or(u.output_tokens);
    if query.is_none() && answer.is_none() {
        return None;
    }
    let cached = [u.prompt_tokens_details, u.input_tokens_details]
        .into_iter()
        .flatten()
        .find_map(|d| d.cached_tokens)
        .unwrap_or(0);
    let reasoning = [u.completion_tokens_details, u.output_tokens_details]
        .into_iter()
        .flatten()
        .find_map(|d| d.reasoning_tokens)
        .unwrap_or(0);
    Some(Usage {
        query: query.unwrap_or(0),
        answer: answer.unwrap_or(0),
        cached,
        reasoning,
    })
}

/// What was learnt from an answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Found {
    /// Usage reported by upstream.
    pub usage: Option<Usage>,
    /// The answered model.
    pub model: Option<String>,
    /// A stream ended properly (`[DONE]` or a terminal Responses event).
    pub done: bool,
}

/// Bytes kept of an event or body for inspection: all of it up to `head_cap`,
/// then only a rolling tail, so memory stays bounded whatever the size.
#[derive(Debug, Default)]
struct Window {
    head: Vec<u8>,
    tail: Vec<u8>,
    len: u64,
    head_cap: usize,
    tail_cap: usize,
}

impl Window {
    fn new(head_cap: usize, tail_cap: usize) -> Self {
        Window {
            head_cap,
            tail_cap,
            ..Window::default()
        }
    }

    fn push(&mut self, mut b: &[u8]) {
        self.len += b.len() as u64;
        if self.head.len() < self.head_cap {
            let n = b.len().min(self.head_cap - self.head.len());
            self.head.extend_from_slice(&b[..n]);
            b = &b[n..];
        }
        if !b.is_empty() {
            self.tail.extend_from_slice(b);
            if self.tail.len() > 2 * self.tail_cap {
                let cut = self.tail.len() - self.tail_cap;
                self.tail.drain(..cut);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole content, when it was small enough to keep whole.
    fn whole(&self) -> Option<&[u8]> {
        self.tail.is_empty().then_some(&self.head[..])
    }
}

/// Raw answer bytes kept for token estimation, bounded.
#[derive(Debug, Default)]
pub struct Capture {
    /// Kept bytes (whole SSE events or the JSON body), up to [`CAPTURE_CAP`].
    pub bytes: Vec<u8>,
    /// Bytes seen past the cap; estimates extrapolate over them.
    pub overflow: u64,
}

/// Most answer bytes kept per request for estimation; past it, estimates
/// extrapolate. Small, because every stream holds it until its usage arrives.
pub const CAPTURE_CAP: usize = 256 << 10;

impl Capture {
    fn push(&mut self, b: &[u8]) {
        let room = CAPTURE_CAP - self.bytes.len();
        if b.len() <= room {
            self.bytes.extend_from_slice(b);
        } else {
            self.bytes.extend_from_slice(&b[..room]);
            self.overflow += (b.len() - room) as u64;
        }
    }
}

/// SSE framing flavour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// `data: {chunk}` events ending in `data: [DONE]` (chat and legacy completions).
    Chat,
    /// Named Responses API events (`event: response.completed`).
    Responses,
}

/// Largest partial event held back while stripping; past it, stripping stops
/// for the stream and bytes flow through unchanged.
const HOLD_CAP: usize = 1 << 20;
const EVENT_HEAD: usize = 64 << 10;
const EVENT_TAIL: usize = 64 << 10;

/// Incremental reader of an SSE answer: finds event boundaries across chunk
/// splits, reads usage and model, captures text for estimation and, when
/// `strip` is set, removes the usage-only chunk (`"choices":[]`) that tollgate
/// asked for on the client's behalf.
#[derive(Debug)]
pub struct SseScanner {
    kind: StreamKind,
    strip: bool,
    /// Terminator progress at the end of the last chunk: 1 after `\n`, 2 after `\n\r`.
    nl: u8,
    event: Window,
    held: Vec<u8>,
    /// What has been found so far.
    pub found: Found,
    /// Text kept for estimation.
    pub capture: Capture,
}

impl SseScanner {
    /// A scanner; `strip` removes the usage-only chunk from the output.
    pub fn new(kind: StreamKind, strip: bool) -> Self {
        SseScanner {
            kind,
            strip,
            nl: 0,
            event: Window::new(EVENT_HEAD, EVENT_TAIL),
            held: Vec::new(),
            found: Found::default(),
            capture: Capture::default(),
        }
    }

    /// Whether the scanner removes the usage-only chunk.
    pub fn strips(&self) -> bool {
        self.strip
    }

    /// Feeds one chunk; returns what to forward to the client now.
    pub fn feed(&mut self, chunk: &Bytes) -> Bytes {
        let b = &chunk[..];
        let mut pos = 0;
        let held_at_entry = !self.held.is_empty();
        // Materialized output; while `None`, the output so far is exactly `b[..pos]`.
        let mut out: Option<Vec<u8>> = None;
        while let Some(end) = self.next_end(b, pos) {
            let seg = &b[pos..end];
            let keep = if self.event.is_empty() {
                self.inspect(seg)
            } else {
                self.event.push(seg);
                let ev = std::mem::replace(&mut self.event, Window::new(EVENT_HEAD, EVENT_TAIL));
                self.inspect_window(&ev)
            };
            if self.strip {
                // The first event of a chunk may have begun in earlier chunks.
                let first = pos == 0 && held_at_entry;
                if out.is_none() && (first || !keep) {
                    out = Some(b[..pos].to_vec());
                }
                if let (Some(o), true) = (out.as_mut(), keep) {
                    if first {
                        o.extend_from_slice(&self.held);
                    }
                    o.extend_from_slice(seg);
                }
                if first {
                    self.held.clear();
                }
            }
            pos = end;
        }
        let rest = &b[pos..];
        if !rest.is_empty() {
            self.event.push(rest);
        }
        if !self.strip {
            return chunk.clone();
        }
        if !rest.is_empty() {
            self.held.extend_from_slice(rest);
            if self.held.len() > HOLD_CAP {
                // No event boundary in sight: stop stripping, release everything.
                self.strip = false;
                let mut o = out.unwrap_or_else(|| b[..pos].to_vec());
                o.append(&mut self.held);
                return Bytes::from(o);
            }
        }
        match out {
            Some(o) => Bytes::from(o),
            None => chunk.slice(..pos),
        }
    }

    /// Ends the stream: returns held-back bytes (a final event without its
    /// blank line) and inspects them.
    pub fn finish(&mut self) -> Bytes {
        if !self.event.is_empty() {
            let ev = std::mem::take(&mut self.event);
            let keep = self.inspect_window(&ev);
            if !keep {
                self.held.clear();
            }
        }
        Bytes::from(std::mem::take(&mut self.held))
    }

    /// End (exclusive) of the next event terminator at or after `from`.
    fn next_end(&mut self, b: &[u8], from: usize) -> Option<usize> {
        // An empty chunk must not lose a terminator split across chunks.
        if from >= b.len() {
            return None;
        }
        let mut i = from;
        // Resume a terminator split across chunks.
        if from == 0 && self.nl != 0 {
            let state = std::mem::replace(&mut self.nl, 0);
            match (state, b.first(), b.get(1)) {
                (1, Some(b'\n'), _) => return Some(1),
                (1, Some(b'\r'), Some(b'\n')) => return Some(2),
                (1, Some(b'\r'), None) => {
                    self.nl = 2;
                    return None;
                }
                (2, Some(b'\n'), _) => return Some(1),
                _ => {}
            }
        }
        while let Some(k) = memchr::memchr(b'\n', &b[i..]) {
            let k = i + k;
            match (b.get(k + 1), b.get(k + 2)) {
                (Some(b'\n'), _) => return Some(k + 2),
                (Some(b'\r'), Some(b'\n')) => return Some(k + 3),
                (None, _) => {
                    self.nl = 1;
                    return None;
                }
                (Some(b'\r'), None) => {
                    self.nl = 2;
                    return None;
                }
                _ => i = k + 1,
            }
        }
        None
    }

    fn inspect_window(&mut self, w: &Window) -> bool {
        match w.whole() {
            Some(all) => self.inspect(all),
            None => {
                // An event too large to keep whole (a Responses API
                // `response.completed` carries the whole response): usage
                // sits at its end, type and model near its start.
                if self.found.model.is_none() || self.kind == StreamKind::Responses {
                    if let Some(m) = find_model(&w.head) {
                        self.found.model = Some(m);
                    }
                }
                if let Some(u) = find_usage_object(&w.tail).and_then(parse_usage) {
                    self.found.usage = Some(u);
                }
                if self.kind == StreamKind::Responses
                    && event_type(&w.head).is_some_and(|t| is_terminal(&t))
                {
                    self.found.done = true;
                }
                true
            }
        }
    }

    /// Reads one complete event; returns whether to forward it.
    fn inspect(&mut self, ev: &[u8]) -> bool {
        match self.kind {
            StreamKind::Chat => {
                if is_done(ev) {
                    self.found.done = true;
                    return true;
                }
                if self.found.model.is_none() {
                    self.found.model = find_model(ev);
                }
                if let Some(u) = find_usage_object(ev).and_then(parse_usage) {
                    self.found.usage = Some(u);
                    if choices_empty(ev) {
                        return false;
                    }
                }
                // A mid-stream error event (`data: {"error": {...}}`) is no answer text.
                let is_error = ERROR_KEY
                    .find_iter(ev)
                    .any(|at| value_after_key(ev, at, 7).is_some_and(|v| ev.get(v) == Some(&b'{')));
                if !is_error {
                    self.capture.push(ev);
                }
                true
            }
            StreamKind::Responses => {
                let ty = event_type(ev).unwrap_or_default();
                if ty.ends_with(".delta") {
                    self.capture.push(ev);
                } else if ty == "response.created" || ty == "response.in_progress" {
                    if self.found.model.is_none() {
                        self.found.model = find_model(ev);
                    }
                } else if is_terminal(&ty) {
                    if let Some(m) = find_model(ev) {
                        self.found.model = Some(m);
                    }
                    if let Some(u) = find_usage_object(ev).and_then(parse_usage) {
                        self.found.usage = Some(u);
                    }
                    self.found.done = true;
                }
                true
            }
        }
    }
}

/// The Responses API events that end a response (and may carry usage).
fn is_terminal(ty: &str) -> bool {
    matches!(
        ty,
        "response.completed" | "response.incomplete" | "response.failed"
    )
}

fn is_done(ev: &[u8]) -> bool {
    ev.split(|&c| c == b'\n').any(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        line.strip_prefix(b"data:")
            .map(|d| d.trim_ascii() == b"[DONE]")
            .unwrap_or(false)
    })
}

/// The SSE `event:` name, else the data's `"type"`.
fn event_type(ev: &[u8]) -> Option<String> {
    for line in ev.split(|&c| c == b'\n') {
        if let Some(name) = line.strip_prefix(b"event:") {
            return Some(String::from_utf8_lossy(name.trim_ascii()).into_owned());
        }
    }
    static TYPE_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"type\""));
    let at = TYPE_KEY.find(ev)?;
    let v = value_after_key(ev, at, 6)?;
    let end = skip_string(ev, v)?;
    serde_json::from_slice(&ev[v..end]).ok()
}

/// Reader of a plain (non-streamed) JSON answer of any size.
#[derive(Debug)]
pub struct JsonScanner {
    body: Window,
}

/// Whole JSON answers up to this size are kept (for estimation); past it only the ends.
const JSON_HEAD: usize = 256 << 10;
const JSON_TAIL: usize = 64 << 10;

impl Default for JsonScanner {
    fn default() -> Self {
        JsonScanner {
            body: Window::new(JSON_HEAD, JSON_TAIL),
        }
    }
}

impl JsonScanner {
    /// Feeds one chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.body.push(chunk);
    }

    /// Usage and model of the whole body, plus the body when kept whole.
    pub fn finish(&mut self) -> (Found, Capture) {
        let w = std::mem::take(&mut self.body);
        let (usage_in, model_in) = match w.whole() {
            Some(all) => (all, all),
            None => (&w.tail[..], &w.head[..]),
        };
        let found = Found {
            usage: find_usage_object(usage_in).and_then(parse_usage),
            model: find_model(model_in),
            done: true,
        };
        let capture = match w.whole() {
            Some(_) => Capture {
                bytes: w.head,
                overflow: 0,
            },
            None => Capture {
                overflow: w.len - w.head.len() as u64,
                bytes: w.head,
            },
        };
        (found, capture)
    }
}

static MULTIPART_MODEL: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"name=\"model\""));

/// The `model` form field of a multipart body's beginning (audio, image edits).
pub fn find_multipart_model(b: &[u8]) -> Option<String> {
    let at = MULTIPART_MODEL.find(b)?;
    let rest = &b[at..];
    let start = memchr::memmem::find(rest, b"\r\n\r\n")? + 4;
    let len = memchr::memmem::find(&rest[start..], b"\r\n")?;
    let v = std::str::from_utf8(&rest[start..start + len]).ok()?.trim();
    (!v.is_empty()).then(|| v.to_owned())
}

#[cfg(test)]
mod tests;
