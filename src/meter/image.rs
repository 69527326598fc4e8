//! The fields of an image generation request that its budget reservation
//! and per-image price depend on (`model`, `n`, `size`, `quality`,
//! `partial_images`, `stream`), and of a speech request its price depends
//! on (`model`, the characters of `input`), read from their JSON bodies
//! without re-serializing them.

use serde::Deserialize;
use serde_json::Value;

use super::RequestError;

/// What an image generation request asks for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ImageRequest {
    /// `model` (empty when absent: upstream picks its default).
    pub model: String,
    /// Images asked for (`n`, 1 when absent).
    pub n: u64,
    /// `size`, when a string.
    pub size: Option<String>,
    /// `quality`, when a string.
    pub quality: Option<String>,
    /// `partial_images` of a streamed request (0 when absent).
    pub partial_images: u64,
    /// `stream: true`.
    pub stream: bool,
}

#[derive(Deserialize)]
struct Fields {
    #[serde(default)]
    model: Option<Value>,
    #[serde(default)]
    n: Option<Value>,
    #[serde(default)]
    size: Option<Value>,
    #[serde(default)]
    quality: Option<Value>,
    #[serde(default)]
    partial_images: Option<Value>,
    #[serde(default)]
    stream: Option<Value>,
}

/// A count as upstream may read it: an integer, a number rounded up (a
/// lenient server takes `2.5` or `"3"` as well), never below zero; `None`
/// when it is no number at all.
fn count(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().map(|f| f.max(0.0).ceil() as u64)),
        Value::String(s) => s.trim().parse::<f64>().ok().map(|f| {
            if f.is_nan() {
                0
            } else {
                f.max(0.0).ceil() as u64
            }
        }),
        _ => None,
    }
}

/// A JSON object body read into `T`: anything else is refused, as not
/// JSON or as not an object.
fn object<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, RequestError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                Ok(_) => RequestError::NotObject,
                Err(_) => RequestError::NotJson,
            },
        );
    }
    serde_json::from_slice(body).map_err(|_| RequestError::NotJson)
}

/// A body's `model`: a string, or empty when absent or null.
fn model_of(v: Option<Value>) -> Result<String, RequestError> {
    match v {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(RequestError::ModelNotString),
    }
}

/// Reads an image generation body. Refuses what is not a JSON object, or
/// has a `model` that is not a string (or duplicated members, which
/// parsers disagree on).
pub fn parse_image_request(body: &[u8]) -> Result<ImageRequest, RequestError> {
    let f: Fields = object(body)?;
    let model = model_of(f.model)?;
    let text = |v: Option<Value>| match v {
        Some(Value::String(s)) => Some(s),
        _ => None,
    };
    Ok(ImageRequest {
        model,
        n: f.n.as_ref().and_then(count).unwrap_or(1),
        size: text(f.size),
        quality: text(f.quality),
        partial_images: f.partial_images.as_ref().and_then(count).unwrap_or(0),
        stream: f.stream == Some(Value::Bool(true)),
    })
}

/// What a speech request (`/v1/audio/speech`) is priced by.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SpeechRequest {
    /// `model` (empty when absent).
    pub model: String,
    /// Characters (Unicode scalar values) of `input`.
    pub characters: u64,
}

#[derive(Deserialize)]
struct SpeechFields {
    #[serde(default)]
    model: Option<Value>,
    #[serde(default)]
    input: Option<Value>,
}

/// Reads a speech body. Refuses what is not a JSON object, or has a
/// `model` that is not a string.
pub fn parse_speech_request(body: &[u8]) -> Result<SpeechRequest, RequestError> {
    let f: SpeechFields = object(body)?;
    let model = model_of(f.model)?;
    let characters = match f.input {
        Some(Value::String(s)) => s.chars().count() as u64,
        _ => 0,
    };
    Ok(SpeechRequest { model, characters })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_fields_that_set_the_reservation() {
        let r = parse_image_request(
            br#"{"prompt":"x","model":"gpt-image-1","n":3,"size":"1024x1536","quality":"low","stream":true,"partial_images":2}"#,
        )
        .unwrap();
        assert_eq!(r.model, "gpt-image-1");
        assert_eq!(r.n, 3);
        assert_eq!(r.size.as_deref(), Some("1024x1536"));
        assert_eq!(r.quality.as_deref(), Some("low"));
        assert_eq!(r.partial_images, 2);
        assert!(r.stream);
        let d = parse_image_request(br#" {"prompt":"x"}"#).unwrap();
        assert_eq!(
            (d.model.as_str(), d.n, d.size, d.stream),
            ("", 1, None, false)
        );
    }

    #[test]
    fn speech_counts_the_characters_of_its_input() {
        let s = parse_speech_request(
            r#"{"model":"tts-1","input":"h\u00e9llo w\u00f6rld","voice":"alloy"}"#.as_bytes(),
        )
        .unwrap();
        assert_eq!((s.model.as_str(), s.characters), ("tts-1", 11));
        assert_eq!(
            parse_speech_request(br#"{"model":2}"#),
            Err(RequestError::ModelNotString)
        );
        assert_eq!(parse_speech_request(b"[]"), Err(RequestError::NotObject));
    }

    #[test]
    fn counts_are_read_leniently_and_never_wrap() {
        let n = |body: &str| parse_image_request(body.as_bytes()).unwrap().n;
        assert_eq!(n(r#"{"n":2.5}"#), 3);
        assert_eq!(n(r#"{"n":"4"}"#), 4);
        assert_eq!(n(r#"{"n":-3}"#), 0);
        assert_eq!(n(r#"{"n":1e300}"#), u64::MAX);
        assert_eq!(n(r#"{"n":18446744073709551615}"#), u64::MAX);
        assert_eq!(n(r#"{"n":null}"#), 1);
        assert_eq!(n(r#"{"n":"many"}"#), 1);
    }

    #[test]
    fn refuses_what_is_not_an_object_with_a_string_model() {
        assert_eq!(parse_image_request(b"[1]"), Err(RequestError::NotObject));
        assert_eq!(parse_image_request(b"{x"), Err(RequestError::NotJson));
        assert_eq!(parse_image_request(b""), Err(RequestError::NotJson));
        assert_eq!(
            parse_image_request(br#"{"model":1}"#),
            Err(RequestError::ModelNotString)
        );
        assert_eq!(
            parse_image_request(br#"{"n":1,"n":10}"#),
            Err(RequestError::NotJson)
        );
    }
}
