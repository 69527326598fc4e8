use super::*;
use crate::record::Record;

fn priced(user: &str, model: &str, endpoint: &str, request_id: Option<&str>) -> Priced {
    Priced {
        record: Record {
            user: user.into(),
            requested_model: model.into(),
            endpoint: endpoint.into(),
            status: 200,
            request_id: request_id.map(str::to_owned),
            ttfb_us: Some(1500),
            duration_us: 2500,
            ..Record::default()
        },
        cost: 1_234_000_000,
        priced: true,
    }
}

const NOW: &str = "2026-11-27T00:00:00.000000Z";

fn text(p: &Priced) -> String {
    let mut buf = Vec::new();
    text_line(&mut buf, NOW, p);
    String::from_utf8(buf).unwrap()
}

#[test]
fn text_line_has_the_tracing_shape() {
    let line = text(&priced(
        "alice",
        "gpt-m",
        "/v1/chat/completions",
        Some("req-1"),
    ));
    assert_eq!(
        line,
        "2026-11-27T00:00:00.000000Z  INFO tollgate::access: request user=\"alice\" endpoint=\"/v1/chat/completions\" model=\"gpt-m\" status=200 stream=false query_tokens=0 answer_tokens=0 cached_tokens=0 reasoning_tokens=0 estimated=false cost=0.001234 duration_ms=2.5 ttfb_ms=1.5 request_id=\"req-1\"\n"
    );
}

#[test]
fn client_values_cannot_forge_lines_or_fields() {
    let forged = "x\n2026-11-27T00:00:00Z  INFO tollgate::access: request user=\"mallory\" cost=0";
    for (user, model, id) in [
        ("bob endpoint=/v1/free cost=0", "m", "r"),
        ("u", forged, "r"),
        ("u\"quoted\" cost=0", "m\t\r\u{1b}[31m\0", "id\nstatus=200"),
    ] {
        let line = text(&priced(user, model, "/v1/chat/completions", Some(id)));
        assert_eq!(line.matches('\n').count(), 1, "{line:?}");
        assert!(line.ends_with('\n'));
        assert!(
            !line.chars().any(|c| c.is_control() && c != '\n'),
            "a raw control character: {line:?}"
        );
        // Exactly one of each field: nothing a client sent made another.
        for key in [" user=", " endpoint=", " model=", " status=", " cost="] {
            let outside_quotes = unquoted_parts(&line);
            assert_eq!(outside_quotes.matches(key).count(), 1, "{key} in {line:?}");
        }
    }
}

/// The line with every quoted value removed.
fn unquoted_parts(line: &str) -> String {
    let mut out = String::new();
    let mut in_quotes = false;
    let mut escaped = false;
    for c in line.chars() {
        if in_quotes {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_quotes = false;
                out.push('"');
            }
        } else {
            if c == '"' {
                in_quotes = true;
            }
            out.push(c);
        }
    }
    out
}

#[test]
fn json_line_is_one_json_object_with_escaped_values() {
    let p = priced("u\n\"x\"", "m\u{1b}", "/v1/chat/completions", None);
    let mut buf = Vec::new();
    json_line(&mut buf, NOW, &p);
    let line = String::from_utf8(buf).unwrap();
    assert_eq!(line.matches('\n').count(), 1);
    let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
    assert_eq!(v["target"], "tollgate::access");
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["fields"]["user"], "u\n\"x\"");
    assert_eq!(v["fields"]["model"], "m\u{1b}");
    assert_eq!(v["fields"]["status"], 200);
    assert_eq!(v["fields"]["cost"], "0.001234");
    assert_eq!(v["fields"]["ttfb_ms"], 1.5);
    assert!(v["fields"].get("request_id").is_none());
}

#[test]
fn millis_writes_what_float_display_writes() {
    let mut cases: Vec<u64> = (0..3000).collect();
    cases.extend([
        999_999,
        1_000_000,
        1_000_001,
        123_456_789,
        u64::from(u32::MAX),
        10u64.pow(15) + 7,
    ]);
    for us in cases {
        let mut buf = Vec::new();
        millis(&mut buf, us);
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            format!("{}", us as f64 / 1000.0),
            "{us}"
        );
    }
}

#[test]
fn quoted_matches_debug_for_plain_and_escaped_values() {
    for s in [
        "alice",
        "a b=c",
        "",
        "q\"x",
        "back\\slash",
        "tab\t",
        "é",
        "\u{7f}",
        "~",
    ] {
        let mut buf = Vec::new();
        quoted(&mut buf, s);
        assert_eq!(String::from_utf8(buf).unwrap(), format!("{s:?}"));
    }
}
