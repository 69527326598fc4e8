use super::*;

#[test]
fn encodings_by_model() {
    let o = encoding("gpt-4o") as *const CoreBPE;
    let c = encoding("gpt-4") as *const CoreBPE;
    assert_ne!(o, c);
    for m in [
        "gpt-4o-mini",
        "gpt-4.1",
        "gpt-5",
        "o3",
        "o4-mini",
        "gpt-4o-2024-08-06",
    ] {
        assert_eq!(encoding(m) as *const CoreBPE, o, "{m}");
    }
    for m in [
        "gpt-4-0613",
        "gpt-3.5-turbo",
        "text-embedding-3-small",
        "gpt-4-1106-preview",
    ] {
        assert_eq!(encoding(m) as *const CoreBPE, c, "{m}");
    }
}

#[test]
fn chat_prompt_follows_the_cookbook() {
    let bpe = encoding("gpt-4o");
    let body = br#"{"model":"gpt-4o","messages":[{"role":"system","content":"You are terse."},{"role":"user","name":"ann","content":"Hello there"}]}"#;
    // 3 priming + per message: 3 + every value's tokens (+1 with a name).
    let want = 3
        + (3 + count(bpe, "system") + count(bpe, "You are terse."))
        + (3 + count(bpe, "user") + 1 + count(bpe, "ann") + count(bpe, "Hello there"));
    assert_eq!(prompt_tokens(Endpoint::Chat, "gpt-4o", body), want);
}

#[test]
fn embeddings_prompt() {
    let body = br#"{"model":"text-embedding-3-small","input":["one two","three"]}"#;
    let bpe = encoding("text-embedding-3-small");
    assert_eq!(
        prompt_tokens(Endpoint::Embeddings, "text-embedding-3-small", body),
        count(bpe, "one two") + count(bpe, "three")
    );
    let body = br#"{"model":"text-embedding-3-small","input":[[1,2,3],[4]]}"#;
    assert_eq!(prompt_tokens(Endpoint::Embeddings, "x", body), 4);
}

#[test]
fn streamed_answer_text() {
    let cap = Capture {
        bytes: b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"Hello\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\" world\"}}]}\n\n".to_vec(),
        overflow: 0,
    };
    let n = answer_tokens("gpt-4o", &cap);
    let bpe = encoding("gpt-4o");
    assert_eq!(n, count(bpe, "Hello world"));
    let doubled = Capture {
        bytes: cap.bytes.clone(),
        overflow: cap.bytes.len() as u64,
    };
    assert_eq!(answer_tokens("gpt-4o", &doubled), 2 * n);
}

#[test]
fn whole_json_answer_text() {
    let cap = Capture {
        bytes: br#"{"model":"gpt-4o","choices":[{"message":{"role":"assistant","content":"one two three"}}]}"#.to_vec(),
        overflow: 0,
    };
    let bpe = encoding("gpt-4o");
    let n = answer_tokens("gpt-4o", &cap);
    assert!(n >= count(bpe, "one two three") && n <= count(bpe, "one two three") + 1);
}

/// SSE events of a chat stream, one `delta` (a JSON object) per event.
fn chat_events(deltas: &[String]) -> Vec<u8> {
    deltas
        .iter()
        .map(|d| format!("data: {{\"choices\":[{{\"index\":0,\"delta\":{d}}}]}}\n\n"))
        .collect::<String>()
        .into_bytes()
}

fn content(s: &str) -> String {
    format!("{{\"content\":{}}}", serde_json::to_string(s).unwrap())
}

/// N chunks of one token each are N tokens: pieces are concatenated as the
/// model produced them, with no separator between chunks.
#[test]
fn one_token_chunks_count_once_each() {
    let bpe = encoding("gpt-4o");
    assert_eq!(count(bpe, " hello"), 1);
    assert_eq!(count(bpe, &" hello".repeat(10)), 10);
    for n in [1, 2, 5, 10, 100] {
        let mut deltas = vec![r#"{"role":"assistant","content":""}"#.to_owned()];
        deltas.extend((0..n).map(|_| content(" hello")));
        let cap = Capture {
            bytes: chat_events(&deltas),
            overflow: 0,
        };
        assert_eq!(answer_tokens("gpt-4o", &cap), n, "{n} chunks");
    }
}

/// A word split over chunks is one word, not two with a space between.
#[test]
fn a_word_split_over_chunks_is_counted_whole() {
    let bpe = encoding("gpt-4o");
    let pieces = ["Extra", "ordinarily", " long", " sentences", "."];
    let deltas: Vec<String> = pieces.iter().map(|p| content(p)).collect();
    let cap = Capture {
        bytes: chat_events(&deltas),
        overflow: 0,
    };
    assert_eq!(answer_tokens("gpt-4o", &cap), count(bpe, &pieces.concat()));
}

/// Distinct choices, tool calls and Responses output items are separate
/// texts: each is counted on its own, none glued to another.
#[test]
fn distinct_choices_and_items_are_counted_apart() {
    let bpe = encoding("gpt-4o");
    // Two choices interleaved (n=2), and a tool call's arguments in pieces.
    let ev =
        |i: u32, d: &str| format!("data: {{\"choices\":[{{\"index\":{i},\"delta\":{d}}}]}}\n\n");
    let mut s = String::new();
    for (a, b) in [("Hello", "Good"), (" there", "bye"), ("!", " now")] {
        s.push_str(&ev(0, &content(a)));
        s.push_str(&ev(1, &content(b)));
    }
    for piece in ["{\"ci", "ty\":", " \"Paris\"}"] {
        let d = format!(
            r#"{{"tool_calls":[{{"index":0,"function":{{"arguments":{}}}}}]}}"#,
            serde_json::to_string(piece).unwrap()
        );
        s.push_str(&ev(2, &d));
    }
    let cap = Capture {
        bytes: s.into_bytes(),
        overflow: 0,
    };
    let want =
        count(bpe, "Hello there!") + count(bpe, "Goodbye now") + count(bpe, r#"{"city": "Paris"}"#);
    assert_eq!(answer_tokens("gpt-4o", &cap), want);

    // Responses API: two output items, each streamed in pieces.
    let ev = |item: &str, out: u32, d: &str| {
        format!(
            "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"item_id\":\"{item}\",\"output_index\":{out},\"content_index\":0,\"delta\":{}}}\n\n",
            serde_json::to_string(d).unwrap()
        )
    };
    let s = [
        ev("msg_a", 0, "Sun"),
        ev("msg_a", 0, "flower"),
        ev("msg_b", 1, "Moon"),
        ev("msg_b", 1, "light"),
    ]
    .concat();
    let cap = Capture {
        bytes: s.into_bytes(),
        overflow: 0,
    };
    assert_eq!(
        answer_tokens("gpt-4o", &cap),
        count(bpe, "Sunflower") + count(bpe, "Moonlight")
    );
}

/// A cut capture (bytes past the cap) still extrapolates from one count per chunk.
#[test]
fn one_token_chunks_extrapolate_past_the_cap() {
    let deltas: Vec<String> = (0..8).map(|_| content(" hello")).collect();
    let bytes = chat_events(&deltas);
    let cap = Capture {
        overflow: bytes.len() as u64,
        bytes,
    };
    assert_eq!(answer_tokens("gpt-4o", &cap), 16);
}
