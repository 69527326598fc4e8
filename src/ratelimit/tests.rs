use super::*;

#[test]
fn headers_to_limits() {
    let mut h = HeaderMap::new();
    h.insert("x-ratelimit-limit-requests", "500".parse().unwrap());
    h.insert("x-ratelimit-remaining-requests", "499".parse().unwrap());
    h.insert("x-ratelimit-reset-requests", "120ms".parse().unwrap());
    h.insert("x-ratelimit-limit-tokens", "500000".parse().unwrap());
    h.insert("x-ratelimit-remaining-tokens", "486895".parse().unwrap());
    h.insert("x-ratelimit-reset-tokens", "1m0s".parse().unwrap());
    let now = 1_706_188_685_000;
    let rl = from_headers(&h, now).unwrap();
    let req = rl.requests.clone().unwrap();
    assert_eq!(req.maximum, Some(500));
    assert_eq!(req.remaining, Some(499));
    assert_eq!(req.reset.as_deref(), Some("2024-01-25T13:18:05.120Z"));
    let tok = rl.tokens.clone().unwrap();
    assert_eq!(tok.maximum, Some(500_000));
    assert_eq!(tok.reset.as_deref(), Some("2024-01-25T13:19:05.000Z"));
    // Captured now, parsed later: the same answer, resets from arrival time.
    let raw = Raw::capture(&h, now).unwrap();
    h.clear();
    assert_eq!(raw.parse(), Some(rl));
}

#[test]
fn no_headers_no_limits() {
    let h = HeaderMap::new();
    assert_eq!(from_headers(&h, 0), None);
    assert!(Raw::capture(&h, 0).is_none());
    let mut h = HeaderMap::new();
    h.insert("x-ratelimit-reset-tokens", "soon".parse().unwrap());
    let raw = Raw::capture(&h, 0).expect("present, if unreadable");
    assert_eq!(raw.parse(), None);
}

#[test]
fn captured_later_reads_like_now() {
    let now = 1_706_188_685_000;
    let cases: [&[(&str, &str)]; 4] = [
        &[("x-ratelimit-remaining-requests", " 12 ")],
        &[
            ("x-ratelimit-limit-tokens", "30000000"),
            ("x-ratelimit-reset-tokens", "1h2m3.456789s"),
        ],
        &[("x-ratelimit-reset-requests", "not a duration")],
        &[("x-ratelimit-limit-requests", "18446744073709551615")],
    ];
    for headers in cases {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, v.parse().unwrap());
        }
        let raw = Raw::capture(&h, now).expect("present");
        assert_eq!(raw.parse(), from_headers(&h, now), "{headers:?}");
    }
    // Values too long to be real are not kept.
    let mut h = HeaderMap::new();
    h.insert(
        "x-ratelimit-remaining-tokens",
        "9".repeat(41).parse().unwrap(),
    );
    assert!(Raw::capture(&h, now).is_none());
    h.insert("x-ratelimit-remaining-requests", "7".parse().unwrap());
    let rl = Raw::capture(&h, now).unwrap().parse().unwrap();
    assert_eq!(rl.requests.unwrap().remaining, Some(7));
    assert_eq!(rl.tokens, None);
}
