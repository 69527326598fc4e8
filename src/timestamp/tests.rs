use super::*;

#[test]
fn old_readme_short_form() {
    // 14:50 at UTC+1 is 13:50Z.
    let want = parse("2024-01-24T13:50:00Z").unwrap();
    assert_eq!(parse("2024-01-24T14:50+01"), Some(want));
    assert_eq!(parse("2024-01-24T14:50 01"), Some(want));
    assert_eq!(parse("2024-01-24T14:50+01:00"), Some(want));
    assert_eq!(parse("2024-01-24T14:50+0100"), Some(want));
    assert_eq!(parse("2024-01-24T12:50-01"), Some(want));
}

#[test]
fn rfc3339_with_fraction() {
    assert_eq!(parse("2024-01-25T13:18:05.205Z"), Some(1_706_188_685_205));
    assert_eq!(parse("2024-01-25T13:18:05.2Z"), Some(1_706_188_685_200));
    assert_eq!(format_ms(1_706_188_685_205), "2024-01-25T13:18:05.205Z");
    assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
}

#[test]
fn date_only_is_midnight_utc() {
    assert_eq!(parse("1970-01-02"), Some(86_400_000));
}

#[test]
fn rejects_garbage() {
    for bad in [
        "",
        "yesterday",
        "2024-01-24T14:50",
        "2024-13-24T14:50Z",
        "2024-01-24T25:00Z",
        "2024-01-24T14:50+1",
        "2024-01-24T14:50+25",
        "2024-01-24T14:50:00.Z",
        "2024-01-24X14:50Z",
        "2024-01-24T14:50:00:00Z",
    ] {
        assert_eq!(parse(bad), None, "{bad:?} should be rejected");
    }
}
