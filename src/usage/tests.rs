use super::*;

#[test]
fn request_fields() {
    let r = parse_request(br#"{"model":"gpt-4o","messages":[],"stream":true}"#).unwrap();
    assert_eq!(r.model, "gpt-4o");
    assert!(r.stream);
    assert!(!r.include_usage);
    let r = parse_request(
        br#" {"stream_options":{"include_usage":true},"model":"m\u00e9","stream":false}"#,
    )
    .unwrap();
    assert_eq!(r.model, "mé");
    assert!(!r.stream);
    assert!(r.include_usage);
}

#[test]
fn request_errors() {
    assert_eq!(parse_request(b"not json"), Err(RequestError::NotJson));
    assert_eq!(parse_request(b""), Err(RequestError::NotJson));
    assert_eq!(parse_request(b"[1,2]"), Err(RequestError::NotObject));
    assert_eq!(parse_request(b"\"x\""), Err(RequestError::NotObject));
    assert_eq!(parse_request(b"{}"), Err(RequestError::NoModel));
    assert_eq!(
        parse_request(br#"{"model":5}"#),
        Err(RequestError::ModelNotString)
    );
    assert_eq!(
        parse_request(br#"{"model":null}"#),
        Err(RequestError::ModelNotString)
    );
    assert_eq!(
        parse_request(br#"{"model":"a","x":[1,2"#),
        Err(RequestError::NotJson)
    );
    assert_eq!(
        parse_request(b"{\"model\":\"\xff\"}"),
        Err(RequestError::NotJson)
    );
}

fn spliced(body: &str) -> serde_json::Value {
    let out = splice_include_usage(body.as_bytes()).expect("spliced");
    serde_json::from_slice(&out).expect("splice result parses")
}

#[test]
fn splice_adds_or_merges() {
    let v = spliced(r#"{"model":"m","stream":true}"#);
    assert_eq!(v["stream_options"]["include_usage"], true);
    assert_eq!(v["model"], "m");

    let v = spliced(r#"{"model":"m","stream_options":{"include_obfuscation":false}}"#);
    assert_eq!(v["stream_options"]["include_usage"], true);
    assert_eq!(v["stream_options"]["include_obfuscation"], false);

    let v = spliced(r#"{"model":"m","stream_options":{}}"#);
    assert_eq!(
        v["stream_options"],
        serde_json::json!({"include_usage": true})
    );

    let v = spliced(r#"{"model":"m","stream_options":null}"#);
    assert_eq!(
        v["stream_options"],
        serde_json::json!({"include_usage": true})
    );

    let v = spliced(r#"{ "model" : "m" , "stream_options" : { "include_usage" : false } }"#);
    assert_eq!(v["stream_options"]["include_usage"], true);

    assert_eq!(
        splice_include_usage(br#"{"model":"m","stream_options":3}"#),
        None
    );
}

#[test]
fn splice_keeps_other_bytes() {
    let body = r#"{"model":"m","messages":[{"role":"user","content":"say \"stream_options\": {}"}],"tools":[{"type":"function"}]}"#;
    let out = splice_include_usage(body.as_bytes()).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert_eq!(
        out.replacen(r#""stream_options":{"include_usage":true},"#, "", 1),
        body
    );
}

#[test]
fn usage_objects() {
    let u = parse_usage(br#"{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,"prompt_tokens_details":{"cached_tokens":4},"completion_tokens_details":{"reasoning_tokens":2}}"#).unwrap();
    assert_eq!(
        u,
        Usage {
            query: 10,
            answer: 5,
            cached: 4,
            reasoning: 2
        }
    );
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

fn chat_stream(with_usage: bool, sep: &str) -> (String, String) {
    let mut full = String::new();
    let mut client = String::new();
    for (i, word) in ["Hel", "lo", " there"].iter().enumerate() {
        let usage = if with_usage { r#","usage":null"# } else { "" };
        let ev = format!(
            r#"data: {{"id":"c","object":"chat.completion.chunk","model":"gpt-4o-mini-2024-07-18","choices":[{{"index":0,"delta":{{"content":"{word}"}},"finish_reason":null}}]{usage}}}{sep}{sep}"#
        );
        let _ = i;
        full.push_str(&ev);
        client.push_str(&ev);
    }
    let usage_ev = format!(
        r#"data: {{"id":"c","object":"chat.completion.chunk","model":"gpt-4o-mini-2024-07-18","choices":[],"usage":{{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}}}{sep}{sep}"#
    );
    full.push_str(&usage_ev);
    let done = format!("data: [DONE]{sep}{sep}");
    full.push_str(&done);
    client.push_str(&done);
    (full, client)
}

fn run(scanner: &mut SseScanner, input: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut last = 0;
    for &c in cuts.iter().chain(std::iter::once(&input.len())) {
        let chunk = Bytes::copy_from_slice(&input[last..c]);
        out.extend_from_slice(&scanner.feed(&chunk));
        last = c;
    }
    out.extend_from_slice(&scanner.finish());
    out
}

#[test]
fn sse_strip_every_single_split() {
    for sep in ["\n", "\r\n"] {
        let (full, client) = chat_stream(true, sep);
        let input = full.as_bytes();
        for cut in 0..=input.len() {
            let mut s = SseScanner::new(StreamKind::Chat, true);
            let out = run(&mut s, input, &[cut]);
            assert_eq!(
                String::from_utf8_lossy(&out),
                client,
                "cut at {cut} sep {sep:?}"
            );
            let u = s.found.usage.expect("usage found");
            assert_eq!((u.query, u.answer), (9, 3));
            assert!(s.found.done);
            assert_eq!(s.found.model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
        }
    }
}

#[test]
fn sse_strip_byte_by_byte_and_passthrough() {
    let (full, client) = chat_stream(true, "\n");
    let input = full.as_bytes();
    let cuts: Vec<usize> = (1..input.len()).collect();
    let mut s = SseScanner::new(StreamKind::Chat, true);
    assert_eq!(run(&mut s, input, &cuts), client.as_bytes());
    assert_eq!(s.found.usage.unwrap().query, 9);

    // Without strip, bytes pass untouched and usage is still read.
    let mut s = SseScanner::new(StreamKind::Chat, false);
    assert_eq!(run(&mut s, input, &cuts[..10]), input);
    assert_eq!(s.found.usage.unwrap().answer, 3);
}

#[test]
fn sse_whole_events_are_zero_copy() {
    let (full, _) = chat_stream(true, "\n");
    let first_event_end = full.find("\n\n").unwrap() + 2;
    let chunk = Bytes::copy_from_slice(&full.as_bytes()[..first_event_end]);
    let mut s = SseScanner::new(StreamKind::Chat, true);
    let out = s.feed(&chunk);
    assert_eq!(out.as_ptr(), chunk.as_ptr());
    assert_eq!(out.len(), chunk.len());
}

#[test]
fn sse_cut_stream_has_no_usage_but_capture() {
    let (full, _) = chat_stream(false, "\n");
    let cut = full.find("data: [DONE]").unwrap() - 30;
    let mut s = SseScanner::new(StreamKind::Chat, true);
    let out = run(&mut s, &full.as_bytes()[..cut], &[]);
    assert_eq!(out, &full.as_bytes()[..cut]);
    assert!(s.found.usage.is_none());
    assert!(!s.found.done);
    assert!(!s.capture.bytes.is_empty());
}

#[test]
fn sse_usage_on_a_content_chunk_is_kept() {
    let ev = "data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n";
    let mut s = SseScanner::new(StreamKind::Chat, true);
    let out = run(&mut s, ev.as_bytes(), &[]);
    assert_eq!(out, ev.as_bytes());
    assert_eq!(s.found.usage.unwrap().query, 1);
}

#[test]
fn responses_stream_usage_in_completed_event() {
    let mut text = String::new();
    text.push_str("event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"r\",\"model\":\"gpt-4o-2024-08-06\",\"usage\":null}}\n\n");
    text.push_str("event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n");
    let big = "x".repeat(300_000);
    text.push_str(&format!("event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"id\":\"r\",\"model\":\"gpt-4o-2024-08-06\",\"output\":[{{\"content\":[{{\"text\":\"{big}\"}}]}}],\"usage\":{{\"input_tokens\":11,\"input_tokens_details\":{{\"cached_tokens\":2}},\"output_tokens\":5,\"output_tokens_details\":{{\"reasoning_tokens\":1}},\"total_tokens\":16}}}}}}\n\n"));
    let input = text.as_bytes();
    for cuts in [
        vec![],
        vec![100, 200, 5000, 250_000],
        (1..38).map(|i| i * 7919).collect::<Vec<_>>(),
    ] {
        let mut s = SseScanner::new(StreamKind::Responses, false);
        let out = run(&mut s, input, &cuts);
        assert_eq!(out, input);
        let u = s.found.usage.unwrap();
        assert_eq!((u.query, u.answer, u.cached, u.reasoning), (11, 5, 2, 1));
        assert_eq!(s.found.model.as_deref(), Some("gpt-4o-2024-08-06"));
        assert!(s.found.done);
    }
}

#[test]
fn sse_without_boundaries_stops_stripping() {
    let junk = vec![b'a'; HOLD_CAP + 10];
    let mut s = SseScanner::new(StreamKind::Chat, true);
    let out = run(&mut s, &junk, &[HOLD_CAP / 2]);
    assert_eq!(out.len(), junk.len());
}

#[test]
fn multipart_model_field() {
    let body = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF....\r\n--b\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-transcribe\r\n--b--\r\n";
    assert_eq!(
        find_multipart_model(body).as_deref(),
        Some("gpt-4o-transcribe")
    );
    assert_eq!(
        find_multipart_model(b"--b\r\nname=\"model\"\r\n\r\ncut"),
        None
    );
}
