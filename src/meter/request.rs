//! The request fields accounting needs (`model`, `stream`, `include_usage`,
//! token limits), read without re-serializing the body, and the
//! `include_usage` splice that asks upstream for a streamed answer's usage.

use std::borrow::Cow;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::scan::{key_is, object_members, skip_ws};

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
    /// `service_tier`, when it names a known tier.
    pub tier: Option<crate::pricing::Tier>,
}

/// Most answer tokens a request may ask for (`max_tokens`,
/// `max_completion_tokens`, `max_output_tokens`): far above any model's
/// output limit, and small enough that no reservation built from it (times
/// [`MAX_CHOICES`], plus the prompt) can overflow.
pub const MAX_ANSWER_TOKENS: u64 = 1_000_000_000;

/// Most answers a request may ask for (`n`, `best_of`): OpenAI's own bound.
pub const MAX_CHOICES: u64 = 128;

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
    /// A token limit (the field named) above [`MAX_ANSWER_TOKENS`].
    TooManyTokens(&'static str),
    /// `n` or `best_of` (the field named) above [`MAX_CHOICES`].
    TooManyChoices(&'static str),
}

impl RequestError {
    /// The message answered to the client.
    pub fn message(self) -> &'static str {
        match self {
            RequestError::NotJson => "We could not parse the JSON body of your request. The body must be valid UTF-8 JSON.",
            RequestError::NotObject => "The request body must be a JSON object.",
            RequestError::NoModel => "you must provide a model parameter",
            RequestError::ModelNotString => "Invalid type for 'model': expected a string.",
            RequestError::TooManyTokens(_) => {
                "The token limit is implausibly large: tollgate accepts at most 1000000000."
            }
            RequestError::TooManyChoices(_) => {
                "Too many answers asked for: tollgate accepts at most 128."
            }
        }
    }

    /// The request field at fault.
    pub fn param(self) -> Option<&'static str> {
        match self {
            RequestError::NoModel | RequestError::ModelNotString => Some("model"),
            RequestError::TooManyTokens(f) | RequestError::TooManyChoices(f) => Some(f),
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
    #[serde(borrow, default)]
    service_tier: Loose<'a>,
}

/// Validates a JSON request body and reads `model`, `stream` and
/// `stream_options.include_usage`. The whole body is validated (structure and
/// UTF-8) so a broken body never reaches upstream. Every token limit and
/// answer count present (whichever one accounting uses) must be within
/// [`MAX_ANSWER_TOKENS`] and [`MAX_CHOICES`]: reservations are built from
/// them, and an absurd value is refused naming its field.
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
    let limits = [
        ("max_completion_tokens", head.max_completion_tokens.int()),
        ("max_tokens", head.max_tokens.int()),
        ("max_output_tokens", head.max_output_tokens.int()),
    ];
    if let Some((f, _)) = limits
        .iter()
        .find(|(_, v)| v.is_some_and(|v| v > MAX_ANSWER_TOKENS))
    {
        return Err(RequestError::TooManyTokens(f));
    }
    let max_tokens = limits.iter().find_map(|(_, v)| *v);
    let counts = [("n", head.n.int()), ("best_of", head.best_of.int())];
    if let Some((f, _)) = counts
        .iter()
        .find(|(_, v)| v.is_some_and(|v| v > MAX_CHOICES))
    {
        return Err(RequestError::TooManyChoices(f));
    }
    // Upstream may generate (and bill) every candidate of `best_of`.
    let choices = counts
        .iter()
        .filter_map(|(_, v)| *v)
        .max()
        .unwrap_or(1)
        .max(1);
    // Any other value is upstream's to refuse; tollgate only prices known tiers.
    let tier = match &head.service_tier {
        Loose::Str(s) => crate::pricing::Tier::parse(s),
        _ => None,
    };
    Ok(RequestInfo {
        model,
        stream,
        include_usage,
        max_tokens,
        choices,
        tier,
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

#[cfg(test)]
mod tests;
