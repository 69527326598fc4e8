//! Realistic OpenAI payloads shared by the benches: request bodies, JSON
//! answers and SSE streams of a chosen size, shaped like what the API sends
//! (same field order and padding fields), with escapes and non-ASCII text so
//! the parsers do the work they do in production.

use serde_json::json;

/// Deterministic prose: words drawn by a small LCG, with punctuation, the odd
/// newline and non-ASCII word, so JSON strings carry escapes and UTF-8.
pub struct Prose(u64);

const WORDS: [&str; 48] = [
    "the",
    "model",
    "returns",
    "a",
    "token",
    "stream",
    "and",
    "every",
    "request",
    "is",
    "metered",
    "per",
    "user",
    "with",
    "cost",
    "in",
    "exact",
    "decimals",
    "cache",
    "prompt",
    "answer",
    "reasoning",
    "latency",
    "budget",
    "proxy",
    "upstream",
    "header",
    "window",
    "context",
    "function",
    "call",
    "result",
    "value",
    "string",
    "number",
    "array",
    "object",
    "café",
    "naïve",
    "日本語",
    "Grüße",
    "\"quoted\"",
    "path\\to",
    "tab\there",
    "emoji🙂",
    "résumé",
    "über",
    "straße",
];

impl Prose {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Prose {
        Prose(seed.wrapping_mul(6364136223846793005).wrapping_add(1))
    }

    fn next(&mut self) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) as usize
    }

    /// One word, sometimes with punctuation.
    pub fn word(&mut self) -> String {
        let w = WORDS[self.next() % WORDS.len()];
        match self.next() % 16 {
            0 => format!("{w}."),
            1 => format!("{w},"),
            2 => format!("{w}.\n"),
            _ => w.to_owned(),
        }
    }

    /// Text of about `bytes` UTF-8 bytes.
    pub fn text(&mut self, bytes: usize) -> String {
        let mut s = String::with_capacity(bytes + 16);
        while s.len() < bytes {
            if !s.is_empty() && !s.ends_with('\n') {
                s.push(' ');
            }
            s.push_str(&self.word());
        }
        s
    }
}

/// Streaming flags of a chat request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamMode {
    /// No `stream` field.
    Off,
    /// `stream: true` only.
    Stream,
    /// `stream: true` with `stream_options.include_usage: true`.
    StreamWithUsage,
}

/// A chat completion request body of about `size` bytes: a system prompt and
/// alternating user/assistant turns.
pub fn chat_request(size: usize, mode: StreamMode) -> Vec<u8> {
    let mut p = Prose::new(size as u64);
    let mut messages = vec![json!({
        "role": "system",
        "content": "You are a careful assistant. Answer briefly and cite the documents you were given."
    })];
    let build = |messages: &Vec<serde_json::Value>| {
        let mut v = json!({
            "model": "gpt-4o-mini",
            "messages": messages,
            "temperature": 0.7,
            "max_tokens": 512,
            "user": "bench",
        });
        match mode {
            StreamMode::Off => {}
            StreamMode::Stream => v["stream"] = json!(true),
            StreamMode::StreamWithUsage => {
                v["stream"] = json!(true);
                v["stream_options"] = json!({"include_usage": true});
            }
        }
        serde_json::to_vec(&v).expect("serializes")
    };
    loop {
        let len = build(&messages).len();
        if len >= size {
            break;
        }
        let role = if messages.len() % 2 == 1 {
            "user"
        } else {
            "assistant"
        };
        // The last turn is cut so the body lands close to `size`.
        let want = (size - len).saturating_sub(40).clamp(8, 600);
        messages.push(json!({"role": role, "content": p.text(want)}));
    }
    build(&messages)
}

const CHAT_ID: &str = "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG";
const ANSWER_MODEL: &str = "gpt-4o-mini-2024-07-18";

fn usage_json(prompt: u64, completion: u64) -> serde_json::Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": prompt / 2, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0
        }
    })
}

/// A non-streamed chat completion answer of about `size` bytes, usage last.
pub fn chat_answer(size: usize) -> Vec<u8> {
    let mut p = Prose::new(size as u64 + 7);
    let build = |content: &str| {
        // Field order as OpenAI sends it: usage after choices.
        format!(
            r#"{{"id":"{CHAT_ID}","object":"chat.completion","created":1741569952,"model":"{ANSWER_MODEL}","choices":[{{"index":0,"message":{{"role":"assistant","content":{},"refusal":null,"annotations":[]}},"logprobs":null,"finish_reason":"stop"}}],"usage":{},"service_tier":"default","system_fingerprint":"fp_06737a9306"}}"#,
            serde_json::to_string(content).expect("serializes"),
            usage_json(1117, (content.len() / 4) as u64),
        )
    };
    let overhead = build("").len();
    build(&p.text(size.saturating_sub(overhead))).into_bytes()
}

/// One chat completion chunk event.
fn chunk_event(delta: serde_json::Value, finish: Option<&str>) -> String {
    format!(
        "data: {{\"id\":\"{CHAT_ID}\",\"object\":\"chat.completion.chunk\",\"created\":1741570283,\"model\":\"{ANSWER_MODEL}\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_06737a9306\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{}}}],\"usage\":null}}\n\n",
        finish.map_or("null".to_owned(), |f| format!("\"{f}\"")),
    )
}

/// The events of a streamed chat answer: a role chunk, content chunks of
/// `words_per_chunk` words, a finish chunk, the usage-only chunk when
/// `with_usage`, and `[DONE]`. `content_chunks` content events exactly, or
/// as many as fit `size` bytes when `content_chunks` is 0.
pub fn chat_stream_events(
    size: usize,
    content_chunks: usize,
    words_per_chunk: usize,
    with_usage: bool,
) -> Vec<Vec<u8>> {
    let mut p = Prose::new(size as u64 + 11);
    let mut events = vec![chunk_event(
        json!({"role": "assistant", "content": "", "refusal": null}),
        None,
    )];
    let finish = chunk_event(json!({}), Some("stop"));
    let usage = format!(
        "data: {{\"id\":\"{CHAT_ID}\",\"object\":\"chat.completion.chunk\",\"created\":1741570283,\"model\":\"{ANSWER_MODEL}\",\"service_tier\":\"default\",\"system_fingerprint\":\"fp_06737a9306\",\"choices\":[],\"usage\":{}}}\n\n",
        usage_json(1117, 300)
    );
    let done = "data: [DONE]\n\n".to_owned();
    let tail_len = finish.len() + if with_usage { usage.len() } else { 0 } + done.len();
    let mut total = events[0].len() + tail_len;
    let mut n = 0;
    loop {
        let words: Vec<String> = (0..words_per_chunk).map(|_| p.word()).collect();
        let ev = chunk_event(json!({"content": format!(" {}", words.join(" "))}), None);
        let full = if content_chunks > 0 {
            n >= content_chunks
        } else {
            total + ev.len() > size && n > 0
        };
        if full {
            break;
        }
        total += ev.len();
        events.push(ev);
        n += 1;
    }
    events.push(finish);
    if with_usage {
        events.push(usage);
    }
    events.push(done);
    events.into_iter().map(String::into_bytes).collect()
}

/// A streamed chat answer of about `size` bytes, as one buffer.
pub fn chat_stream(size: usize, with_usage: bool) -> Vec<u8> {
    chat_stream_events(size, 0, 2, with_usage).concat()
}

/// A Responses API stream of about `size` bytes: created/in_progress, item and
/// part events, text deltas, the done events repeating the whole text, and
/// `response.completed` carrying the whole response and its usage.
pub fn responses_stream(size: usize) -> Vec<u8> {
    let mut p = Prose::new(size as u64 + 13);
    let resp_id = "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b";
    let msg_id = "msg_67ccd2bf17f0819081ff3bb2cf6508e60bb6a6b452d3795b";
    let response = |status: &str, text: Option<&str>, usage: Option<serde_json::Value>| {
        let output = match text {
            Some(t) => json!([{
                "id": msg_id, "type": "message", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": t, "annotations": []}]
            }]),
            None => json!([]),
        };
        json!({
            "id": resp_id, "object": "response", "created_at": 1741476542u64,
            "status": status, "error": null, "incomplete_details": null,
            "instructions": null, "max_output_tokens": null, "model": "gpt-4.1-2025-04-14",
            "output": output, "parallel_tool_calls": true, "previous_response_id": null,
            "reasoning": {"effort": null, "summary": null}, "store": true, "temperature": 1.0,
            "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
            "top_p": 1.0, "truncation": "disabled", "usage": usage, "user": null, "metadata": {}
        })
    };
    let event = |name: &str, data: serde_json::Value| format!("event: {name}\ndata: {data}\n\n");
    let mut seq = 0u64;
    let mut next_seq = || {
        seq += 1;
        seq
    };
    let mut head = String::new();
    head += &event(
        "response.created",
        json!({"type": "response.created", "sequence_number": next_seq(), "response": response("in_progress", None, None)}),
    );
    head += &event(
        "response.in_progress",
        json!({"type": "response.in_progress", "sequence_number": next_seq(), "response": response("in_progress", None, None)}),
    );
    head += &event(
        "response.output_item.added",
        json!({"type": "response.output_item.added", "sequence_number": next_seq(), "output_index": 0,
               "item": {"id": msg_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}}),
    );
    head += &event(
        "response.content_part.added",
        json!({"type": "response.content_part.added", "sequence_number": next_seq(), "item_id": msg_id,
               "output_index": 0, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}),
    );
    let tail = |text: &str, seq0: u64| {
        let mut t = String::new();
        t += &event(
            "response.output_text.done",
            json!({"type": "response.output_text.done", "sequence_number": seq0, "item_id": msg_id,
                   "output_index": 0, "content_index": 0, "text": text}),
        );
        t += &event(
            "response.content_part.done",
            json!({"type": "response.content_part.done", "sequence_number": seq0 + 1, "item_id": msg_id,
                   "output_index": 0, "content_index": 0, "part": {"type": "output_text", "text": text, "annotations": []}}),
        );
        t += &event(
            "response.output_item.done",
            json!({"type": "response.output_item.done", "sequence_number": seq0 + 2, "output_index": 0,
                   "item": {"id": msg_id, "type": "message", "status": "completed", "role": "assistant",
                            "content": [{"type": "output_text", "text": text, "annotations": []}]}}),
        );
        let usage = json!({
            "input_tokens": 36, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": (text.len() / 4) as u64, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 36 + (text.len() / 4) as u64
        });
        t += &event(
            "response.completed",
            json!({"type": "response.completed", "sequence_number": seq0 + 3,
                   "response": response("completed", Some(text), Some(usage))}),
        );
        t
    };
    let mut deltas = String::new();
    let mut text = String::new();
    loop {
        let w = format!(" {}", p.word());
        let ev = event(
            "response.output_text.delta",
            json!({"type": "response.output_text.delta", "sequence_number": next_seq(), "item_id": msg_id,
                   "output_index": 0, "content_index": 0, "delta": w, "logprobs": []}),
        );
        // Each word shows up in its delta and four more times in the done events.
        if head.len() + deltas.len() + ev.len() + tail(&text, 0).len() + 4 * w.len() > size
            && !text.is_empty()
        {
            break;
        }
        deltas += &ev;
        text += &w;
    }
    let t = tail(&text, seq + 1);
    format!("{head}{deltas}{t}").into_bytes()
}

/// The input sizes every micro-benchmark runs on.
pub const SIZES: [(usize, &str); 3] = [(1 << 10, "1KB"), (10 << 10, "10KB"), (100 << 10, "100KB")];
