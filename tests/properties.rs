//! The fuzz properties on stable Rust: proptest drives the same property
//! functions as the libFuzzer targets (`tests/props/mod.rs`) with realistic
//! generated inputs, and every file of `fuzz/corpus/*` is replayed through
//! them, so CI guards what fuzzing established without nightly.

#[path = "props/mod.rs"]
mod props;

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use serde_json::{json, Map, Value};

const CASES: u32 = 400;

// ---------------------------------------------------------------------------
// Corpus replay
// ---------------------------------------------------------------------------

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.expect("dir entry").path())
            .filter(|p| {
                p.is_file()
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Runs `f` on every file, collecting failures instead of stopping at the first.
fn replay(files: &[PathBuf], f: fn(&[u8])) -> Vec<String> {
    let mut failed = Vec::new();
    for p in files {
        let data = match std::fs::read(p) {
            Ok(d) => d,
            // A running fuzzer replaces corpus files as it reduces them.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("read {}: {e}", p.display()),
        };
        if let Err(e) = std::panic::catch_unwind(|| f(&data)) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failed.push(format!("{}: {msg}", p.display()));
        }
    }
    failed
}

#[test]
fn corpus_replay() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut failed = Vec::new();
    let mut total = 0;
    for (name, f) in props::TARGETS {
        let corpus = files(&root.join("fuzz/corpus").join(name));
        assert!(
            corpus.iter().any(|p| p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))),
            "fuzz/corpus/{name} has its seed files"
        );
        total += corpus.len();
        failed.extend(replay(&corpus, *f));
    }
    assert!(
        failed.is_empty(),
        "corpus files failing:\n{}",
        failed.join("\n")
    );
    assert!(total > 0);
}

/// Reproducers of bugs found by fuzzing, replayed with no known bug tolerated.
/// While `props::KNOWN_BUGS` names an open bug, this test is ignored; once
/// fixed, it guards the fix.
#[test]
fn fuzz_regressions_strict() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    let mut failed = Vec::new();
    for (name, f) in props::TARGETS {
        failed.extend(props::strictly(|| replay(&files(&root.join(name)), *f)));
    }
    assert!(
        failed.is_empty(),
        "regressions failing:\n{}",
        failed.join("\n")
    );
}

// ---------------------------------------------------------------------------
// JSON text with varied spelling
// ---------------------------------------------------------------------------

/// Writes JSON the many ways clients do: optional whitespace (CRLF and tabs
/// included), `\u` escapes in keys and strings, and now and then an earlier
/// decoy copy of a member that the later one overrides (last member wins).
struct Writer {
    state: u64,
    out: String,
}

impl Writer {
    fn new(seed: u64) -> Self {
        Writer {
            state: seed | 1,
            out: String::new(),
        }
    }

    fn next(&mut self) -> u64 {
        // xorshift64: a cheap deterministic stream of choices.
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    fn ws(&mut self) {
        let w = match self.next() % 10 {
            0 => " ",
            1 => "\n  ",
            2 => "\r\n\t",
            3 => "  ",
            _ => "",
        };
        self.out.push_str(w);
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            let escape = self.next() % 12 == 0;
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                c if (c as u32) < 0x20 || escape => {
                    let mut buf = [0u16; 2];
                    for u in c.encode_utf16(&mut buf) {
                        self.out.push_str(&format!("\\u{u:04x}"));
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }

    fn value(&mut self, v: &Value) {
        match v {
            Value::Object(m) => {
                self.out.push('{');
                self.ws();
                let mut first = true;
                for (k, v) in m {
                    if self.next() % 16 == 0 {
                        // A decoy the real member overrides.
                        let decoy = if self.next() % 2 == 0 {
                            Value::Null
                        } else {
                            json!({"include_usage": false})
                        };
                        self.member(&mut first, k, &decoy);
                    }
                    self.member(&mut first, k, v);
                }
                self.out.push('}');
            }
            Value::Array(a) => {
                self.out.push('[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        self.out.push(',');
                    }
                    self.ws();
                    self.value(v);
                    self.ws();
                }
                self.out.push(']');
            }
            Value::String(s) => self.string(s),
            other => self.out.push_str(&other.to_string()),
        }
    }

    fn member(&mut self, first: &mut bool, k: &str, v: &Value) {
        if !*first {
            self.out.push(',');
            self.ws();
        }
        *first = false;
        self.string(k);
        self.ws();
        self.out.push(':');
        self.ws();
        self.value(v);
        self.ws();
    }
}

fn spelled(v: &Value, seed: u64) -> String {
    let mut w = Writer::new(seed);
    w.ws();
    w.value(v);
    w.ws();
    w.out
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9 .,!?-]{0,20}",
        "\\PC{0,12}",
        Just("line\nbreak \"quoted\" back\\slash {\"usage\":{}} [DONE]".to_owned()),
        Just("😀 café \u{2028}".to_owned()),
    ]
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        text().prop_map(Value::String),
    ]
}

fn any_json() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn stream_options() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        Just(Some(Value::Null)),
        Just(Some(json!({}))),
        Just(Some(json!({"include_usage": true}))),
        Just(Some(json!({"include_usage": false}))),
        Just(Some(json!({"include_obfuscation": false}))),
        Just(Some(
            json!({"include_obfuscation": true, "include_usage": false})
        )),
        Just(Some(
            json!({"include_usage": "yes", "x": [1, {"include_usage": false}]})
        )),
        scalar().prop_map(Some),
    ]
}

/// Request bodies as the SDKs and hand-written clients send them.
fn request_body() -> impl Strategy<Value = Value> {
    let model = prop_oneof![
        4 => prop_oneof![
            Just("gpt-4o-mini"),
            Just("gpt-4.1-2025-04-14"),
            Just("text-embedding-3-small"),
            Just("ft:gpt-4o-mini:org::abc123"),
        ]
        .prop_map(|s| Some(Value::from(s))),
        1 => text().prop_map(|s| Some(Value::String(s))),
        1 => Just(None),
        1 => scalar().prop_map(Some),
    ];
    let stream = prop_oneof![
        Just(None),
        Just(Some(Value::Bool(true))),
        Just(Some(Value::Bool(false))),
        scalar().prop_map(Some),
    ];
    let messages = prop::collection::vec(
        (
            prop_oneof![Just("user"), Just("system"), Just("assistant")],
            text(),
        ),
        0..4,
    );
    let limit = prop::option::of(prop_oneof![
        4 => (0u64..100_000).prop_map(Value::from),
        1 => scalar(),
    ]);
    let limits = (limit.clone(), limit.clone(), limit);
    (
        model,
        stream,
        stream_options(),
        messages,
        prop::option::of(any_json()),
        limits,
    )
        .prop_map(|(model, stream, so, messages, extra, limits)| {
            let mut m = Map::new();
            let msgs: Vec<Value> = messages
                .into_iter()
                .map(|(r, c)| json!({"role": r, "content": c}))
                .collect();
            m.insert("messages".into(), Value::Array(msgs));
            if let Some(v) = model {
                m.insert("model".into(), v);
            }
            if let Some(v) = stream {
                m.insert("stream".into(), v);
            }
            if let Some(v) = so {
                m.insert("stream_options".into(), v);
            }
            if let Some(v) = extra {
                m.insert("metadata".into(), v);
            }
            let (a, b, c) = limits;
            for (k, v) in [
                ("max_tokens", a),
                ("max_completion_tokens", b),
                ("max_output_tokens", c),
            ] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            Value::Object(m)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn request_fields_and_splice(v in request_body(), seed in any::<u64>()) {
        let body = spelled(&v, seed);
        props::request_fields(body.as_bytes());
        props::splice(body.as_bytes());
    }

    #[test]
    fn request_fields_any_json(v in any_json(), seed in any::<u64>()) {
        let body = spelled(&v, seed);
        props::request_fields(body.as_bytes());
        props::splice(body.as_bytes());
    }

    #[test]
    fn request_fields_any_bytes(b in prop::collection::vec(any::<u8>(), 0..64)) {
        props::request_fields(&b);
        props::splice(&b);
    }
}

// ---------------------------------------------------------------------------
// usage
// ---------------------------------------------------------------------------

fn count() -> impl Strategy<Value = Value> {
    prop_oneof![
        6 => (0u64..100_000).prop_map(Value::from),
        1 => Just(Value::from(u64::MAX)),
        1 => Just(Value::Null),
        1 => Just(Value::from(-1)),
        1 => Just(Value::from(1.5)),
        1 => Just(Value::from("12")),
    ]
}

fn details(key: &'static str) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        2 => Just(None),
        1 => Just(Some(Value::Null)),
        4 => (prop::option::of(count()), prop::option::of(count())).prop_map(move |(a, b)| {
            let mut m = Map::new();
            if let Some(a) = a {
                m.insert(key.into(), a);
            }
            if let Some(b) = b {
                m.insert("audio_tokens".into(), b);
            }
            Some(Value::Object(m))
        }),
        1 => Just(Some(json!("none"))),
    ]
}

/// Usage objects of every OpenAI shape, with fields missing, null or mistyped.
fn usage_object() -> impl Strategy<Value = Value> {
    let names = [
        "prompt_tokens",
        "completion_tokens",
        "input_tokens",
        "output_tokens",
        "total_tokens",
    ];
    (
        prop::collection::vec(prop::option::of(count()), 5),
        details("cached_tokens"),
        details("reasoning_tokens"),
        details("cached_tokens"),
        details("reasoning_tokens"),
    )
        .prop_map(move |(counts, ptd, ctd, itd, otd)| {
            let mut m = Map::new();
            for (k, v) in names.iter().zip(counts) {
                if let Some(v) = v {
                    m.insert((*k).into(), v);
                }
            }
            for (k, v) in [
                ("prompt_tokens_details", ptd),
                ("completion_tokens_details", ctd),
                ("input_tokens_details", itd),
                ("output_tokens_details", otd),
            ] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            Value::Object(m)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn usage_objects_and_answers(u in usage_object(), text in text(), size in 0usize..64, seed in any::<u64>()) {
        let obj = spelled(&u, seed);
        props::usage_object_check(obj.as_bytes());
        let answer = json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
            "usage": u,
        });
        let body = spelled(&answer, seed);
        props::usage_json_check(body.as_bytes(), size);
        let mut data = vec![size as u8];
        data.extend_from_slice(body.as_bytes());
        props::usage_json(&data);
    }
}

// ---------------------------------------------------------------------------
// SSE
// ---------------------------------------------------------------------------

fn chat_event() -> impl Strategy<Value = String> {
    let model = prop_oneof![Just("gpt-4o-mini-2024-07-18"), Just("gpt-4o")];
    prop_oneof![
        6 => (model.clone(), text()).prop_map(|(m, t)| format!(
            "data: {}",
            json!({"id":"c","object":"chat.completion.chunk","model":m,
                   "choices":[{"index":0,"delta":{"content":t},"finish_reason":null}],"usage":null})
        )),
        2 => (model, usage_object()).prop_map(|(m, u)| format!(
            "data: {}",
            json!({"id":"c","object":"chat.completion.chunk","model":m,"choices":[],"usage":u})
        )),
        1 => usage_object().prop_map(|u| format!(
            "data: {}",
            json!({"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":u})
        )),
        1 => Just("data: [DONE]".to_owned()),
        1 => Just(": keep-alive".to_owned()),
        1 => Just("data: {\"error\":{\"message\":\"overloaded\",\"type\":\"server_error\",\"param\":null,\"code\":null}}".to_owned()),
        1 => Just("data: {\"choices\": [ ],\n data: \"usage\" : {\"prompt_tokens\":1}}".to_owned()),
    ]
}

fn responses_event() -> impl Strategy<Value = String> {
    let ty = prop_oneof![
        Just("response.created"),
        Just("response.in_progress"),
        Just("response.output_text.delta"),
        Just("response.completed"),
        Just("response.failed"),
        Just("response.incomplete"),
        Just("error"),
    ];
    (ty, usage_object(), text(), any::<bool>()).prop_map(|(ty, u, t, named)| {
        let data = json!({"type": ty, "delta": t,
            "response": {"id": "resp_1", "model": "gpt-4.1-2025-04-14", "usage": u}});
        if named {
            format!("event: {ty}\ndata: {data}")
        } else {
            format!("data: {data}")
        }
    })
}

/// A stream: events with `\n\n` or `\r\n\r\n` after each, maybe cut short,
/// plus chunk lengths (zeros included) covering it.
fn sse_stream() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
    let ev = prop_oneof![chat_event(), responses_event()];
    (
        prop::collection::vec((ev, any::<bool>()), 0..10),
        any::<u16>(),
        prop::collection::vec(0usize..40, 1..20),
    )
        .prop_map(|(events, cut, lens)| {
            let mut s = String::new();
            for (e, crlf) in events {
                if crlf {
                    s.push_str(&e.replace('\n', "\r\n"));
                    s.push_str("\r\n\r\n");
                } else {
                    s.push_str(&e);
                    s.push_str("\n\n");
                }
            }
            let mut b = s.into_bytes();
            if cut % 4 == 0 && !b.is_empty() {
                b.truncate(cut as usize % b.len());
            }
            // Chunk lengths cycle through `lens` until the input is covered.
            let mut split = Vec::new();
            let mut left = b.len();
            for &l in lens.iter().cycle() {
                if left == 0 {
                    break;
                }
                // An empty chunk, then at least one byte, so the loop ends.
                let l = l.clamp(1, left);
                if l == 1 {
                    split.push(0);
                }
                split.push(l);
                left -= l;
            }
            (b, split)
        })
}

/// Runs a proptest on a thread with a large stack: the nested SSE
/// strategies' value trees overflow the default 2 MiB in debug builds.
fn run_big<S>(strategy: S, test: fn(S::Value))
where
    S: Strategy + Send + 'static,
    S::Value: std::fmt::Debug,
{
    let t = std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(move || {
            let mut runner =
                proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(CASES));
            if let Err(e) = runner.run(&strategy, |v| {
                test(v);
                Ok(())
            }) {
                panic!("{e}");
            }
        })
        .expect("spawn test thread");
    if let Err(e) = t.join() {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn sse_streams() {
    run_big(sse_stream(), |(input, split)| {
        props::sse_check(&input, &[split]);
        props::sse_scanner(&input);
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn sse_any_bytes(b in prop::collection::vec(prop_oneof![
        Just(b'\n'), Just(b'\r'), Just(b'd'), Just(b':'), Just(b'{'), any::<u8>()], 0..200)) {
        props::sse_scanner(&b);
    }
}

// ---------------------------------------------------------------------------
// Durations, timestamps, prices
// ---------------------------------------------------------------------------

fn term() -> impl Strategy<Value = props::Term> {
    let int = prop_oneof![
        6 => "[0-9]{0,7}",
        1 => "[0-9]{20,40}",
        1 => (0u128..4).prop_map(|k| k.to_string()),
    ];
    (
        int,
        prop::option::of("[0-9]{0,12}"),
        0..props::GO_UNITS.len(),
        0..4u8,
    )
        .prop_map(|(int, frac, unit, boundary)| {
            // Right below u128::MAX ns or i64::MAX ms in this unit.
            let top = match boundary {
                0 => Some(u128::MAX),
                1 => Some(i64::MAX as u128 * 1_000_000),
                _ => None,
            };
            let int = match top {
                Some(top) if int.len() == 1 => {
                    let max = top / props::GO_UNITS[unit].1;
                    (max - int.parse::<u128>().unwrap_or(0)).to_string()
                }
                _ => int,
            };
            let int = if int.is_empty() && frac.as_deref().is_none_or(str::is_empty) {
                "0".to_owned()
            } else {
                int
            };
            props::Term { int, frac, unit }
        })
}

fn timestamp_text() -> impl Strategy<Value = String> {
    // Dates at the ends of the 4-digit years come often, with offsets that
    // push the instant past them.
    let date = prop_oneof![
        (
            prop_oneof![Just(0u32), Just(1), 1970u32..2100, Just(9999)],
            0u32..14,
            0u32..33
        ),
        Just((0, 1, 1)),
        Just((9999, 12, 31)),
    ];
    (
        date,
        0u32..25,
        0u32..61,
        prop::option::of(0u32..62),
        prop::option::of("[0-9]{1,7}"),
        prop::sample::select(vec!["T", "t", " "]),
        prop_oneof![
            Just(String::from("Z")),
            Just(String::from("z")),
            (
                prop::sample::select(vec!["+", "-", " "]),
                0u32..25,
                0u32..61,
                0u32..3
            )
                .prop_map(|(s, h, m, form)| match form {
                    0 => format!("{s}{h:02}"),
                    1 => format!("{s}{h:02}{m:02}"),
                    _ => format!("{s}{h:02}:{m:02}"),
                }),
            Just(String::new()),
        ],
    )
        .prop_map(|((y, mo, d), h, mi, s, frac, sep, off)| {
            let mut t = format!("{y:04}-{mo:02}-{d:02}{sep}{h:02}:{mi:02}");
            if let Some(s) = s {
                t.push_str(&format!(":{s:02}"));
                if let Some(f) = frac {
                    t.push('.');
                    t.push_str(&f);
                }
            }
            t.push_str(&off);
            t
        })
}

fn price_number() -> impl Strategy<Value = String> {
    prop_oneof![
        (0u64..100_000, 0u32..8).prop_map(|(v, d)| {
            let s = format!("{:0>width$}", v, width = d as usize + 1);
            let (i, f) = s.split_at(s.len() - d as usize);
            if f.is_empty() {
                i.to_owned()
            } else {
                format!("{i}.{f}")
            }
        }),
        (1u64..1000, -20i32..20).prop_map(|(v, e)| format!("{v}e{e}")),
        (1u64..1000, -20i32..20).prop_map(|(v, e)| format!("{v}.50E{e:+}")),
        Just("-0".to_owned()),
        Just("-0.01".to_owned()),
        Just("9223372036854775807".to_owned()),
        Just("\"0.01\"".to_owned()),
        Just("null".to_owned()),
    ]
}

fn price_body() -> impl Strategy<Value = String> {
    let vf = prop_oneof![
        4 => timestamp_text().prop_map(|t| Value::String(t).to_string()),
        1 => Just("\"2023-11-06T00:00:00Z\"".to_owned()),
        1 => Just("0".to_owned()),
    ];
    let key = prop::sample::select(vec![
        "per1KQueryTokens",
        "per1KAnswerTokens",
        "per1KCachedQueryTokens",
        "per1MQueryTokens",
        "per1MAnswerTokens",
        "per1MCachedQueryTokens",
        "currency",
    ]);
    (
        prop::option::of(vf),
        prop::collection::vec((key, price_number()), 0..5),
        any::<bool>(),
    )
        .prop_map(|(vf, prices, unit_1m)| {
            let mut members = Vec::new();
            if let Some(vf) = vf {
                members.push(format!("\"validFrom\":{vf}"));
            }
            // Mostly consistent units, so accepted bodies are common.
            for (k, v) in prices {
                let k = if unit_1m {
                    k.replace("per1K", "per1M")
                } else {
                    k.to_owned()
                };
                members.push(format!("\"{k}\": {v}"));
            }
            format!("{{{}}}", members.join(", "))
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn go_durations(terms in prop::collection::vec(term(), 1..4)) {
        props::go_duration_check(&terms);
        let text: String = terms.iter().map(|t| {
            let mut s = t.int.clone();
            if let Some(f) = &t.frac {
                s.push('.');
                s.push_str(f);
            }
            s.push_str(props::GO_UNITS[t.unit].0);
            s
        }).collect();
        props::go_duration(text.as_bytes());
    }

    #[test]
    fn go_duration_any_bytes(b in prop::collection::vec(any::<u8>(), 0..48)) {
        props::go_duration(&b);
    }

    #[test]
    fn timestamps(t in timestamp_text()) {
        props::timestamp(t.as_bytes());
        props::timestamp_check(&t);
    }

    #[test]
    fn price_bodies(body in price_body()) {
        props::price_body(body.as_bytes());
    }
}

fn path_text() -> impl Strategy<Value = String> {
    let seg = prop_oneof![
        Just("chat".to_string()),
        Just("completions".to_string()),
        Just("Chat".to_string()),
        Just("responses".to_string()),
        Just("files".to_string()),
        Just(".".to_string()),
        Just("..".to_string()),
        Just(String::new()),
        Just("%2e".to_string()),
        Just("%2E%2e".to_string()),
        Just("%63hat".to_string()),
        Just("%2F".to_string()),
        Just("%5c".to_string()),
        Just("%00".to_string()),
        Just("%".to_string()),
        Just("%4".to_string()),
        Just("%zz".to_string()),
        Just("a%20b".to_string()),
        Just("%41".to_string()),
        "[a-zA-Z0-9_~.-]{1,6}",
    ];
    prop::collection::vec(seg, 0..7).prop_map(|v| v.join("/"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn paths(t in path_text()) {
        props::path(t.as_bytes());
    }

    #[test]
    fn path_any_bytes(b in prop::collection::vec(any::<u8>(), 0..40)) {
        props::path(&b);
    }
}
