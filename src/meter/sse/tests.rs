use super::*;

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
fn tool_calls_of_a_large_terminal_event_are_recovered_from_the_item_events() {
    // Three web searches between two large images: the completed event is
    // read through its head and tail windows only, where the searches are
    // not; each item's own output_item.done event still counts it, and the
    // larger count per kind wins (no item is counted twice).
    let img = format!(
        r#"{{"type":"image_generation_call","id":"ig","result":"{}"}}"#,
        "A".repeat(200_000)
    );
    let web = r#"{"type":"web_search_call","id":"ws","status":"completed"}"#;
    let code = |c: &str| format!(r#"{{"type":"code_interpreter_call","container_id":"{c}"}}"#);
    let items = [
        img.clone(),
        web.to_owned(),
        web.to_owned(),
        web.to_owned(),
        code("cntr_a"),
        code("cntr_a"),
        code("cntr_b"),
        img,
    ];
    let mut text = String::new();
    for it in &items {
        text.push_str(&format!(
            "event: response.output_item.done\ndata: {{\"type\":\"response.output_item.done\",\"item\":{it}}}\n\n"
        ));
    }
    text.push_str(&format!(
        "event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"model\":\"gpt-5\",\"output\":[{}],\"usage\":{{\"input_tokens\":1,\"output_tokens\":1}}}}}}\n\n",
        items.join(",")
    ));
    let len = text.len();
    let cuts: Vec<usize> = (1..).map(|i| i * 15_013).take_while(|&c| c < len).collect();
    for cuts in [vec![], cuts] {
        let mut s = SseScanner::new(StreamKind::Responses, false);
        run(&mut s, text.as_bytes(), &cuts);
        // web search, file search, code interpreter containers, image generation.
        assert_eq!(s.found.units.tools, [3, 0, 2, 2], "cuts {cuts:?}");
    }
    // The completed event alone, arriving in pieces (no item events): only
    // what its windows show, the first image.
    let completed = &text[text.find("event: response.completed").unwrap()..];
    let cuts: Vec<usize> = (1..)
        .map(|i| i * 15_013)
        .take_while(|&c| c < completed.len())
        .collect();
    let mut s = SseScanner::new(StreamKind::Responses, false);
    run(&mut s, completed.as_bytes(), &cuts);
    assert_eq!(s.found.units.tools, [0, 0, 0, 1]);
}
