//! Micro-benchmarks of the work tollgate does per request and per streamed
//! frame, on realistic 1 KB, 10 KB and 100 KB inputs.
//!
//! `cargo bench --bench micro` (filter: `cargo bench --bench micro -- sse`).
//! `TOLLGATE_BENCH_SMOKE=1` shortens every measurement (CI: it only has to run).

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{HeaderMap, HeaderName, HeaderValue};

use tollgate::endpoint::{Endpoint, StreamKind};
use tollgate::meter::{self, JsonScanner, SseScanner};
use tollgate::pricing::{default_prices, PriceTable, Tokens};
use tollgate::record::Capture;

#[allow(dead_code)]
mod common;
use common::{chat_answer, chat_request, chat_stream, responses_stream, StreamMode, SIZES};

fn smoke() -> bool {
    std::env::var_os("TOLLGATE_BENCH_SMOKE").is_some_and(|v| v != "0")
}

fn config() -> Criterion {
    let c = Criterion::default();
    if smoke() {
        c.warm_up_time(Duration::from_millis(10))
            .measurement_time(Duration::from_millis(50))
            .sample_size(10)
    } else {
        c.warm_up_time(Duration::from_millis(700))
            .measurement_time(Duration::from_secs(2))
    }
}

fn parse_request(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse_request");
    for (size, name) in SIZES {
        let body = chat_request(size, StreamMode::Stream);
        assert!(meter::parse_request(&body).is_ok_and(|r| r.stream));
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), &body, |b, body| {
            b.iter(|| meter::parse_request(black_box(body)))
        });
    }
    g.finish();
}

fn splice(c: &mut Criterion) {
    let mut g = c.benchmark_group("splice_include_usage");
    for (size, name) in SIZES {
        let body = chat_request(size, StreamMode::Stream);
        let spliced = meter::splice_include_usage(&body).expect("splices");
        assert!(meter::parse_request(&spliced).is_ok_and(|r| r.include_usage));
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), &body, |b, body| {
            b.iter(|| meter::splice_include_usage(black_box(body)))
        });
    }
    g.finish();
}

/// Splits `b` into chunks of `n` bytes, as a network read would.
fn chunks(b: &[u8], n: usize) -> Vec<Bytes> {
    b.chunks(n).map(Bytes::copy_from_slice).collect()
}

fn json_answer(c: &mut Criterion) {
    let mut g = c.benchmark_group("json_answer");
    for (size, name) in SIZES {
        let body = chat_answer(size);
        // hyper hands over a plain body in reads of up to 16 KiB or so.
        let parts = chunks(&body, 16 << 10);
        let mut check = JsonScanner::default();
        parts.iter().for_each(|p| check.feed(p));
        assert!(check.finish().0.usage.is_some_and(|u| u.query == 1117));
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(name), &parts, |b, parts| {
            b.iter(|| {
                let mut s = JsonScanner::default();
                for p in parts {
                    s.feed(black_box(p));
                }
                s.finish()
            })
        });
    }
    g.finish();
}

/// Splits a stream into its events (how upstreams usually write them).
fn events(b: &[u8]) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut start = 0;
    for at in memchr::memmem::find_iter(b, b"\n\n") {
        out.push(Bytes::copy_from_slice(&b[start..at + 2]));
        start = at + 2;
    }
    if start < b.len() {
        out.push(Bytes::copy_from_slice(&b[start..]));
    }
    out
}

fn run_scanner(kind: StreamKind, strip: bool, parts: &[Bytes]) -> (SseScanner, usize) {
    let mut s = SseScanner::new(kind, strip);
    let mut out = 0;
    for p in parts {
        out += s.feed(p).len();
    }
    out += s.finish().len();
    (s, out)
}

fn sse(c: &mut Criterion) {
    let cases = [
        // tollgate asked for usage on the client's behalf: strips the usage chunk.
        ("chat_strip", StreamKind::Chat, true),
        // The client asked for usage itself: bytes pass unchanged.
        ("chat_passthrough", StreamKind::Chat, false),
        ("responses", StreamKind::Responses, false),
    ];
    for (case, kind, strip) in cases {
        let mut g = c.benchmark_group(format!("sse_{case}"));
        for (size, name) in SIZES {
            let stream = match kind {
                StreamKind::Chat => chat_stream(size, true),
                StreamKind::Responses => responses_stream(size),
            };
            g.throughput(Throughput::Bytes(stream.len() as u64));
            let chunkings: [(&str, Vec<Bytes>); 4] = [
                ("per_event", events(&stream)),
                ("64B", chunks(&stream, 64)),
                ("1KiB", chunks(&stream, 1 << 10)),
                ("16KiB", chunks(&stream, 16 << 10)),
            ];
            for (how, parts) in &chunkings {
                let (s, out) = run_scanner(kind, strip, parts);
                assert!(
                    s.found.usage.is_some() && s.found.done,
                    "{case} {name} {how}"
                );
                assert_eq!(out < stream.len(), strip, "{case} {name} {how}");
                g.bench_with_input(BenchmarkId::new(*how, name), parts, |b, parts| {
                    b.iter(|| run_scanner(kind, strip, black_box(parts)).1)
                });
            }
        }
        g.finish();
    }
}

fn openai_headers(with_limits: bool) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut put = |k: &'static str, v: &'static str| {
        h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
    };
    put("date", "Wed, 26 Nov 2026 22:41:07 GMT");
    put("content-type", "application/json");
    put("transfer-encoding", "chunked");
    put("connection", "keep-alive");
    put("access-control-expose-headers", "X-Request-ID");
    put("openai-organization", "user-abc123");
    put("openai-processing-ms", "483");
    put("openai-version", "2020-10-01");
    put(
        "strict-transport-security",
        "max-age=31536000; includeSubDomains; preload",
    );
    put("x-request-id", "req_0d7b9b6a1e9f4f4c8c9a6f2b3d4e5f60");
    put("cf-cache-status", "DYNAMIC");
    put("server", "cloudflare");
    put("alt-svc", "h3=\":443\"; ma=86400");
    if with_limits {
        put("x-ratelimit-limit-requests", "10000");
        put("x-ratelimit-limit-tokens", "30000000");
        put("x-ratelimit-remaining-requests", "9999");
        put("x-ratelimit-remaining-tokens", "29999457");
        put("x-ratelimit-reset-requests", "6ms");
        put("x-ratelimit-reset-tokens", "1m2.172s");
    }
    h
}

fn ratelimits(c: &mut Criterion) {
    let mut g = c.benchmark_group("ratelimit");
    g.throughput(Throughput::Elements(1));
    let with = openai_headers(true);
    let without = openai_headers(false);
    assert!(tollgate::ratelimit::from_headers(&with, 0).is_some());
    g.bench_function("from_headers", |b| {
        b.iter(|| tollgate::ratelimit::from_headers(black_box(&with), black_box(1_764_196_867_000)))
    });
    // What every answer pays on the request path: the headers are copied
    // (reference counts) and parsed only when read.
    g.bench_function("capture", |b| {
        b.iter(|| tollgate::ratelimit::Raw::capture(black_box(&with), black_box(1_764_196_867_000)))
    });
    g.bench_function("capture_absent", |b| {
        b.iter(|| tollgate::ratelimit::Raw::capture(black_box(&without), black_box(0)))
    });
    g.finish();
}

fn cost(c: &mut Criterion) {
    let mut table = PriceTable::default();
    for (m, p) in default_prices() {
        table.insert(&m, p);
    }
    let tokens = Tokens {
        query: 1117,
        answer: 300,
        cached: 512,
        ..Tokens::default()
    };
    let cases = [
        ("exact", "gpt-4o-mini", "gpt-4o-mini"),
        ("dated_snapshot", "gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        (
            "fine_tuned",
            "ft:gpt-4o-mini-2024-07-18:org::A1b2C3",
            "ft:gpt-4o-mini-2024-07-18:org::A1b2C3",
        ),
        ("unknown", "acme-llm-7b", "acme-llm-7b"),
    ];
    let mut g = c.benchmark_group("cost");
    g.throughput(Throughput::Elements(1));
    for (name, answered, requested) in cases {
        assert_eq!(
            table.cost(answered, requested, 1_764_196_867_000, tokens).1,
            name != "unknown"
        );
        g.bench_function(name, |b| {
            b.iter(|| {
                table.cost(
                    black_box(answered),
                    black_box(requested),
                    1_764_196_867_000,
                    tokens,
                )
            })
        });
    }
    g.finish();
}

fn tiktoken(c: &mut Criterion) {
    tollgate::tokens::warm_up();
    let mut g = c.benchmark_group("tiktoken");
    if !smoke() {
        g.sample_size(20);
    }
    for (size, name) in SIZES {
        let body = chat_request(size, StreamMode::Off);
        assert!(tollgate::tokens::prompt_tokens(Endpoint::Chat, "gpt-4o-mini", &body) > 0);
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::new("prompt_tokens", name), &body, |b, body| {
            b.iter(|| {
                tollgate::tokens::prompt_tokens(Endpoint::Chat, "gpt-4o-mini", black_box(body))
            })
        });
        let capture = Capture {
            bytes: chat_stream(size, false),
            overflow: 0,
        };
        assert!(tollgate::tokens::answer_tokens("gpt-4o-mini", &capture) > 0);
        g.throughput(Throughput::Bytes(capture.bytes.len() as u64));
        g.bench_with_input(
            BenchmarkId::new("answer_tokens_sse", name),
            &capture,
            |b, capture| {
                b.iter(|| tollgate::tokens::answer_tokens("gpt-4o-mini", black_box(capture)))
            },
        );
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = parse_request, splice, json_answer, sse, ratelimits, cost, tiktoken
}
criterion_main!(benches);
