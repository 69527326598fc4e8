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
    // Pieces are joined with spaces, so allow the small difference.
    let exact = count(bpe, "Hello world");
    assert!(n >= exact && n <= exact + 2, "{n} vs {exact}");
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
