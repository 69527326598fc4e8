//! Usage from a plain (non-streamed) JSON answer, and the usage object of
//! every OpenAI API read into [`Usage`].

use serde::Deserialize;

use super::scan::{find_model, find_tier, find_usage_object};
use super::tools::ToolCounter;
use super::window::Window;
use super::Found;
use crate::record::{Capture, Usage};

#[derive(Deserialize, Default)]
struct Details {
    #[serde(default)]
    cached_tokens: Option<u64>,
    #[serde(default)]
    reasoning_tokens: Option<u64>,
    #[serde(default)]
    audio_tokens: Option<u64>,
    #[serde(default)]
    image_tokens: Option<u64>,
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
    /// Transcriptions name it without the plural.
    #[serde(default)]
    input_token_details: Option<Details>,
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
    let input = [
        &u.prompt_tokens_details,
        &u.input_tokens_details,
        &u.input_token_details,
    ];
    let output = [
        &u.completion_tokens_details,
        &u.output_tokens_details,
        &None,
    ];
    let find = |ds: [&Option<Details>; 3], f: fn(&Details) -> Option<u64>| {
        ds.into_iter().flatten().find_map(f).unwrap_or(0)
    };
    Some(Usage {
        query: query.unwrap_or(0),
        answer: answer.unwrap_or(0),
        cached: find(input, |d| d.cached_tokens),
        reasoning: find(output, |d| d.reasoning_tokens),
        audio_query: find(input, |d| d.audio_tokens),
        audio_answer: find(output, |d| d.audio_tokens),
        image_query: find(input, |d| d.image_tokens),
        image_answer: find(output, |d| d.image_tokens),
    })
}

#[derive(Deserialize)]
struct DurationObject {
    #[serde(rename = "type")]
    kind: String,
    seconds: serde_json::Number,
}

/// The seconds of a usage object of type `duration` (transcriptions priced
/// per minute), rounded up to whole seconds.
pub fn parse_seconds(obj: &[u8]) -> Option<u64> {
    let d: DurationObject = serde_json::from_slice(obj).ok()?;
    if d.kind != "duration" {
        return None;
    }
    d.seconds.as_u64().or_else(|| {
        d.seconds
            .as_f64()
            .filter(|f| f.is_finite())
            .map(|f| f.max(0.0).ceil() as u64)
    })
}

/// Reader of a plain (non-streamed) JSON answer of any size.
#[derive(Debug)]
pub struct JsonScanner {
    body: Window,
    /// Counts built-in tool calls (Responses answers only).
    tools: Option<ToolCounter>,
}

/// Whole JSON answers up to this size are kept (for estimation); past it only the ends.
const JSON_HEAD: usize = 256 << 10;
const JSON_TAIL: usize = 64 << 10;

impl Default for JsonScanner {
    fn default() -> Self {
        JsonScanner {
            body: Window::new(JSON_HEAD, JSON_TAIL),
            tools: None,
        }
    }
}

impl JsonScanner {
    /// A reader that also counts the built-in tool calls of a Responses answer.
    pub fn with_tools() -> JsonScanner {
        JsonScanner {
            tools: Some(ToolCounter::default()),
            ..JsonScanner::default()
        }
    }

    /// Feeds one chunk of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        self.body.push(chunk);
        if let Some(t) = &mut self.tools {
            t.feed(chunk);
        }
    }

    /// Usage and model of the whole body, plus the body when kept whole.
    pub fn finish(&mut self) -> (Found, Capture) {
        let w = std::mem::take(&mut self.body);
        let (usage_in, model_in) = match w.whole() {
            Some(all) => (all, all),
            None => (&w.tail[..], &w.head[..]),
        };
        let usage_object = find_usage_object(usage_in);
        let mut found = Found {
            usage: usage_object.and_then(parse_usage),
            model: find_model(model_in),
            done: true,
            // Top-level, after the content: in the tail when not kept whole.
            tier: find_tier(usage_in).or_else(|| find_tier(model_in)),
            ..Found::default()
        };
        found.units.seconds = usage_object.and_then(parse_seconds).unwrap_or(0);
        if let Some(t) = &self.tools {
            found.units.tools = t.counts();
        }
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

#[cfg(test)]
mod tests;
