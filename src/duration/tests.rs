use super::*;

const MS: u128 = 1_000_000;
const S: u128 = 1_000_000_000;

#[test]
fn go_durations() {
    assert_eq!(parse_go_duration_ns("20ms"), Some(20 * MS));
    assert_eq!(parse_go_duration_ns("1s"), Some(S));
    assert_eq!(parse_go_duration_ns("1.5s"), Some(1500 * MS));
    assert_eq!(parse_go_duration_ns("6m0s"), Some(360 * S));
    assert_eq!(parse_go_duration_ns("1s200ms"), Some(1200 * MS));
    assert_eq!(parse_go_duration_ns("1h2m3.5s"), Some(3723 * S + 500 * MS));
    assert_eq!(
        parse_go_duration_ns("23h18m29.144s"),
        Some((23 * 3600 + 18 * 60 + 29) * S + 144 * MS)
    );
    assert_eq!(parse_go_duration_ns("4m12.172s"), Some(252_172 * MS));
    assert_eq!(parse_go_duration_ns("10us"), Some(10_000));
    assert_eq!(parse_go_duration_ns("10µs"), Some(10_000));
    assert_eq!(parse_go_duration_ns("7ns"), Some(7));
    assert_eq!(parse_go_duration_ns("0"), Some(0));
    assert_eq!(parse_go_duration_ns("2"), Some(2 * S));
}

#[test]
fn go_durations_reject_garbage() {
    for bad in ["", "ms", "1x", "1..5s", "-1s", "1s-", "s1", "1 s", "."] {
        assert_eq!(parse_go_duration_ns(bad), None, "{bad:?}");
    }
}
