use super::*;

#[test]
fn usage_objects() {
    let u = parse_usage(br#"{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":4},"completion_tokens_details":{"reasoning_tokens":2}}"#).unwrap();
    assert_eq!(
        u,
        Usage {
            query: 10,
            answer: 5,
            cached: 4,
            reasoning: 2,
            ..Usage::default()
        }
    );
    // Audio tokens of chat (prompt/completion details) and Responses
    // (input/output details): the audio parts of the prompt and the answer.
    let u = parse_usage(br#"{"prompt_tokens":100,"completion_tokens":50,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":60},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":40}}"#).unwrap();
    assert_eq!((u.audio_query, u.audio_answer), (60, 40));
    let u = parse_usage(br#"{"input_tokens":100,"output_tokens":50,"input_tokens_details":{"audio_tokens":7},"output_tokens_details":{"audio_tokens":3}}"#).unwrap();
    assert_eq!((u.audio_query, u.audio_answer), (7, 3));
    let u = parse_usage(br#"{"input_tokens":7,"input_tokens_details":{"cached_tokens":1},"output_tokens":3,"output_tokens_details":{"reasoning_tokens":1},"total_tokens":10}"#).unwrap();
    assert_eq!((u.query, u.answer, u.cached, u.reasoning), (7, 3, 1, 1));
    let u = parse_usage(br#"{"prompt_tokens":8,"total_tokens":8}"#).unwrap();
    assert_eq!((u.query, u.answer), (8, 0));
    assert_eq!(parse_usage(br#"{"type":"duration","seconds":3}"#), None);
    assert_eq!(parse_usage(br#"{"prompt_tokens":"x"}"#), None);
}

#[test]
fn json_answer_pretty_printed() {
    let body = br#"{
  "id": "chatcmpl-1",
  "object": "chat.completion",
  "model": "gpt-4o-2024-08-06",
  "choices": [{"index": 0, "message": {"role": "assistant", "content": "the \"usage\": {\"prompt_tokens\": 99}"}}],
  "usage": {
    "prompt_tokens": 12,
    "completion_tokens": 3,
    "total_tokens": 15
  }
}"#;
    for split in [1, 7, 50, body.len() - 1] {
        let mut s = JsonScanner::default();
        s.feed(&body[..split]);
        s.feed(&body[split..]);
        let (found, capture) = s.finish();
        assert_eq!(found.model.as_deref(), Some("gpt-4o-2024-08-06"));
        let u = found.usage.unwrap();
        assert_eq!((u.query, u.answer), (12, 3));
        assert_eq!(capture.bytes, body);
    }
}

#[test]
fn json_answer_larger_than_window() {
    let mut body =
        br#"{"object":"list","model":"text-embedding-3-small","data":[{"embedding":["#.to_vec();
    for i in 0..200_000 {
        body.extend_from_slice(format!("0.{i},").as_bytes());
    }
    body.extend_from_slice(br#"0]}],"usage":{"prompt_tokens":42,"total_tokens":42}}"#);
    let mut s = JsonScanner::default();
    for c in body.chunks(8192) {
        s.feed(c);
    }
    let (found, capture) = s.finish();
    assert_eq!(found.usage.unwrap().query, 42);
    assert_eq!(found.model.as_deref(), Some("text-embedding-3-small"));
    assert!(capture.bytes.len() <= 256 << 10);
    assert_eq!(
        capture.bytes.len() as u64 + capture.overflow,
        body.len() as u64
    );
}

#[test]
fn image_transcription_and_duration_usage() {
    let u = parse_usage(
        br#"{"total_tokens":4210,"input_tokens":50,"input_tokens_details":{"text_tokens":40,"image_tokens":10},"output_tokens":4160}"#,
    )
    .unwrap();
    assert_eq!(
        (u.query, u.image_query, u.answer, u.image_answer),
        (50, 10, 4160, 0)
    );
    let u = parse_usage(
        br#"{"input_tokens":50,"output_tokens":300,"output_tokens_details":{"text_tokens":100,"image_tokens":200}}"#,
    )
    .unwrap();
    assert_eq!(u.image_answer, 200);
    // Transcriptions: `input_token_details`, singular.
    let u = parse_usage(
        br#"{"type":"tokens","input_tokens":120,"input_token_details":{"text_tokens":20,"audio_tokens":100},"output_tokens":50,"total_tokens":170}"#,
    )
    .unwrap();
    assert_eq!((u.query, u.audio_query, u.answer), (120, 100, 50));
    assert_eq!(
        parse_seconds(br#"{"type":"duration","seconds":37}"#),
        Some(37)
    );
    assert_eq!(
        parse_seconds(br#"{"type":"duration","seconds":2.1}"#),
        Some(3)
    );
    assert_eq!(parse_seconds(br#"{"type":"tokens","seconds":37}"#), None);
    assert_eq!(parse_seconds(br#"{"type":"duration","seconds":"x"}"#), None);
    assert_eq!(parse_usage(br#"{"type":"duration","seconds":37}"#), None);
}
