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
fn absurd_answer_sizes_are_refused_naming_the_field() {
    let max = MAX_ANSWER_TOKENS;
    let r =
        parse_request(format!(r#"{{"model":"m","max_tokens":{max},"n":128}}"#).as_bytes()).unwrap();
    assert_eq!((r.max_tokens, r.choices), (Some(max), 128));
    for (body, err) in [
        (
            r#"{"model":"m","max_tokens":18446744073709551615}"#,
            RequestError::TooManyTokens("max_tokens"),
        ),
        (
            // Refused even though max_completion_tokens is the one read.
            r#"{"model":"m","max_completion_tokens":5,"max_output_tokens":1000000001}"#,
            RequestError::TooManyTokens("max_output_tokens"),
        ),
        (
            r#"{"model":"m","n":2,"best_of":129}"#,
            RequestError::TooManyChoices("best_of"),
        ),
    ] {
        assert_eq!(parse_request(body.as_bytes()), Err(err), "{body}");
        assert!(err.param().is_some());
    }
    // A missing model is the first thing said.
    assert_eq!(parse_request(br#"{"n":1000}"#), Err(RequestError::NoModel));
}
