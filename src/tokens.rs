//! Token estimates for requests whose answer carried no usage (cut streams,
//! upstreams that ignore `include_usage`). Never runs on the request path: the
//! store's estimator thread calls it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::OnceLock;

use serde_json::Value;
use tiktoken_rs::CoreBPE;

use crate::endpoint::Endpoint;
use crate::record::Capture;

static O200K: OnceLock<CoreBPE> = OnceLock::new();
static CL100K: OnceLock<CoreBPE> = OnceLock::new();

/// Loads the `o200k_base` vocabulary (about 200 ms), the one of every current
/// model, at start-up so the first estimate does not pay for it.
/// `cl100k_base` (gpt-4, gpt-3.5, older embeddings) loads on its first use:
/// each vocabulary holds about 30 MB, and most deployments never need it.
pub fn warm_up() {
    let _ = encoding("gpt-4o");
}

/// The encoding a model uses: `cl100k_base` for gpt-4, gpt-3.5 and the
/// text-embedding models, `o200k_base` for everything newer (and unknown models).
pub fn encoding(model: &str) -> &'static CoreBPE {
    let m = model.rsplit('/').next().unwrap_or(model);
    let m = m.strip_prefix("ft:").unwrap_or(m);
    let cl100k = m.starts_with("gpt-3.5")
        || m.starts_with("text-embedding")
        || (m.starts_with("gpt-4")
            && !m.starts_with("gpt-4o")
            && !m.starts_with("gpt-4.")
            && !m.starts_with("gpt-4-o"));
    if cl100k {
        CL100K.get_or_init(|| tiktoken_rs::cl100k_base().expect("cl100k vocabulary is embedded"))
    } else {
        O200K.get_or_init(|| tiktoken_rs::o200k_base().expect("o200k vocabulary is embedded"))
    }
}

fn count(bpe: &CoreBPE, s: &str) -> u64 {
    bpe.encode_ordinary(s).len() as u64
}

/// Estimated prompt tokens of a request body.
pub fn prompt_tokens(endpoint: Endpoint, model: &str, body: &[u8]) -> u64 {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return 0;
    };
    let bpe = encoding(model);
    match endpoint {
        Endpoint::Chat => {
            // The cookbook's count: 3 per message, +1 with a name, +3 reply priming.
            let mut n = 3;
            if let Some(msgs) = v.get("messages").and_then(Value::as_array) {
                for m in msgs {
                    n += 3;
                    if let Some(obj) = m.as_object() {
                        for (k, val) in obj {
                            if k == "name" {
                                n += 1;
                            }
                            n += strings_tokens(bpe, val);
                        }
                    }
                }
            }
            if let Some(tools) = v.get("tools") {
                n += count(bpe, &tools.to_string());
            }
            n
        }
        _ => ["input", "prompt", "instructions", "messages"]
            .iter()
            .filter_map(|k| v.get(*k))
            .map(|val| match val {
                // Embeddings accept pre-tokenized input: one token per integer.
                Value::Array(items) if items.iter().all(Value::is_number) => items.len() as u64,
                Value::Array(items)
                    if items
                        .iter()
                        .all(|i| i.as_array().is_some_and(|a| a.iter().all(Value::is_number))) =>
                {
                    items
                        .iter()
                        .map(|i| i.as_array().map_or(0, Vec::len) as u64)
                        .sum()
                }
                other => strings_tokens(bpe, other),
            })
            .sum(),
    }
}

/// Tokens of every string inside a value (keys excluded).
fn strings_tokens(bpe: &CoreBPE, v: &Value) -> u64 {
    match v {
        Value::String(s) => count(bpe, s),
        Value::Array(a) => a.iter().map(|x| strings_tokens(bpe, x)).sum(),
        Value::Object(o) => o
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "type" | "role" | "id" | "detail"))
            .map(|(_, x)| strings_tokens(bpe, x))
            .sum(),
        _ => 0,
    }
}

/// Keys whose string values are generated text.
const TEXT_KEYS: [&str; 7] = [
    "content",
    "text",
    "arguments",
    "refusal",
    "reasoning_content",
    "reasoning",
    "delta",
];

/// Fields that tell the pieces of distinct choices, output items, content
/// parts and tool calls apart (`index` in chat choices and tool calls, the
/// Responses API's indices and item ids on its delta events).
const STREAM_IDS: [&str; 5] = [
    "index",
    "output_index",
    "content_index",
    "summary_index",
    "item_id",
];

/// Generated text, one string per stream of pieces: the pieces of one choice
/// (one tool call, one output item, ...) are concatenated as the model
/// produced them, so a word split over chunks is counted once and no
/// separator is invented between chunks.
#[derive(Default)]
struct Pieces {
    streams: Vec<String>,
    by_key: HashMap<String, usize>,
}

impl Pieces {
    fn push(&mut self, key: &str, s: &str) {
        let i = match self.by_key.get(key) {
            Some(&i) => i,
            None => {
                self.streams.push(String::new());
                self.by_key.insert(key.to_owned(), self.streams.len() - 1);
                self.streams.len() - 1
            }
        };
        self.streams[i].push_str(s);
    }

    /// Tokens of every stream, each counted on its own.
    fn tokens(&self, bpe: &CoreBPE) -> u64 {
        self.streams.iter().map(|s| count(bpe, s)).sum()
    }
}

/// Collects the generated text under `v` into `out`, keyed by where it sits:
/// the path of keys, with array elements named by their stream ids (else
/// their position), so the same choice in successive chunks shares a key.
fn answer_text(v: &Value, key: &mut String, out: &mut Pieces) {
    let len = key.len();
    match v {
        Value::Object(o) => {
            for id in STREAM_IDS {
                if let Some(x) = o.get(id).filter(|x| x.is_number() || x.is_string()) {
                    let _ = write!(key, "[{id}={x}]");
                }
            }
            let ids = key.len();
            for (k, x) in o {
                match x {
                    Value::String(s) if TEXT_KEYS.contains(&k.as_str()) => {
                        key.push('.');
                        key.push_str(k);
                        out.push(key, s);
                    }
                    Value::Object(_) | Value::Array(_) => {
                        key.push('.');
                        key.push_str(k);
                        answer_text(x, key, out);
                    }
                    _ => {}
                }
                key.truncate(ids);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                let named = x
                    .as_object()
                    .is_some_and(|o| STREAM_IDS.iter().any(|id| o.contains_key(*id)));
                if !named {
                    let _ = write!(key, "[{i}]");
                }
                answer_text(x, key, out);
                key.truncate(len);
            }
        }
        _ => {}
    }
    key.truncate(len);
}

/// Estimated completion tokens of the answer bytes captured for a request:
/// SSE events (each `data:` line parsed) or a JSON body. Bytes past the
/// capture cap are extrapolated from the captured ones.
pub fn answer_tokens(model: &str, capture: &Capture) -> u64 {
    let bytes = &capture.bytes;
    let mut text = Pieces::default();
    let mut key = String::new();
    let first = bytes.iter().find(|c| !c.is_ascii_whitespace());
    if first == Some(&b'{') {
        if let Ok(v) = serde_json::from_slice::<Value>(bytes) {
            // Only the generated parts of a whole answer.
            for k in ["choices", "output", "text"] {
                if let Some(x) = v.get(k) {
                    key.clear();
                    key.push_str(k);
                    if let Value::String(s) = x {
                        text.push(&key, s);
                    } else {
                        answer_text(x, &mut key, &mut text);
                    }
                }
            }
        }
    } else {
        for line in bytes.split(|&c| c == b'\n') {
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            if let Ok(v) = serde_json::from_slice::<Value>(data.trim_ascii()) {
                key.clear();
                match v.get("choices") {
                    Some(c) => answer_text(c, &mut key, &mut text),
                    None => answer_text(&v, &mut key, &mut text),
                }
            }
        }
    }
    let n = text.tokens(encoding(model));
    if capture.overflow > 0 && !bytes.is_empty() {
        let total = bytes.len() as u128 + u128::from(capture.overflow);
        (u128::from(n) * total / bytes.len() as u128) as u64
    } else {
        n
    }
}

#[cfg(test)]
mod tests;
