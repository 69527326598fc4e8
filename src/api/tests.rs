use super::*;

#[test]
fn price_bodies() {
    let p = parse_price_body(
        br#"{"validFrom":"2023-11-06T00:00:00Z","per1KQueryTokens":0.01,"per1KAnswerTokens":0.03}"#,
    )
    .unwrap();
    assert_eq!(p.query, 10_000_000);
    assert_eq!(p.answer, 30_000_000);
    assert_eq!(p.cached, None);
    let p = parse_price_body(
        br#"{"validFrom":"2024-01-24T14:50+01","per1MQueryTokens":2.5,"per1MAnswerTokens":10,"per1MCachedQueryTokens":1.25}"#,
    )
    .unwrap();
    assert_eq!(p.query, 2_500_000);
    assert_eq!(p.cached, Some(1_250_000));
    assert_eq!(
        p.valid_from,
        crate::timestamp::parse("2024-01-24T13:50:00Z").unwrap()
    );
}

#[test]
fn bad_price_bodies_name_the_field() {
    let cases: [(&[u8], Option<&str>); 8] = [
        (
            br#"{"per1KQueryTokens":1,"per1KAnswerTokens":1}"#,
            Some("validFrom"),
        ),
        (
            br#"{"validFrom":"x","per1KQueryTokens":1,"per1KAnswerTokens":1}"#,
            Some("validFrom"),
        ),
        (
            br#"{"validFrom":"2024-01-01T00:00:00Z","per1KQueryTokens":-1,"per1KAnswerTokens":1}"#,
            Some("per1KQueryTokens"),
        ),
        (
            br#"{"validFrom":"2024-01-01T00:00:00Z","per1KQueryTokens":"1","per1KAnswerTokens":1}"#,
            Some("per1KQueryTokens"),
        ),
        (
            br#"{"validFrom":"2024-01-01T00:00:00Z","per1KQueryTokens":1}"#,
            Some("per1KAnswerTokens"),
        ),
        (
            br#"{"validFrom":"2024-01-01T00:00:00Z","per1KQueryTokens":1,"per1MAnswerTokens":1}"#,
            None,
        ),
        (
            br#"{"validFrom":"2024-01-01T00:00:00Z","per1kQueryTokens":1}"#,
            Some("per1kQueryTokens"),
        ),
        (br#"[1]"#, None),
    ];
    for (body, param) in cases {
        let e = parse_price_body(body).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            e.param.as_deref(),
            param,
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn filters() {
    let f = parse_filter(
        "user=adam&after=2024-01-24T14:50%2B01&before=2024-01-25T00:00:00Z&limit=5&offset=2",
        &["user", "after", "before", "limit", "offset"],
    )
    .unwrap();
    assert_eq!(f.user.as_deref(), Some("adam"));
    assert_eq!(f.after, crate::timestamp::parse("2024-01-24T13:50:00Z"));
    assert_eq!(f.limit, Some(5));
    assert_eq!(f.offset, 2);
    // An unencoded + arrives as a space and still means +.
    let f = parse_filter("after=2024-01-24T14:50+01", &["after"]).unwrap();
    assert_eq!(f.after, crate::timestamp::parse("2024-01-24T13:50:00Z"));
    let e = parse_filter("after=yesterday", &["after"]).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("after"));
    let e = parse_filter("usr=adam", &["user"]).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("usr"));
    let e = parse_filter("limit=-1", &["limit"]).unwrap_err();
    assert_eq!(e.param.as_deref(), Some("limit"));
}

#[test]
fn usage_of_nothing_is_zeros() {
    assert_eq!(
        usage_json(&UsageTotals::default()),
        r#"{"numQueries":0,"queryTokens":0,"answerTokens":0,"cost":0,"averageCostPerQuery":0,"cachedQueryTokens":0,"reasoningTokens":0,"unpricedQueries":0,"rejectedQueries":0}"#
    );
}

#[test]
fn json_strings_escape() {
    let mut s = String::new();
    push_json_str(&mut s, "a\"b\\c\nd\u{1}é");
    assert_eq!(s, r#""a\"b\\c\nd\u0001é""#);
    let v: String = serde_json::from_str(&s).unwrap();
    assert_eq!(v, "a\"b\\c\nd\u{1}é");
}
