use super::*;

fn ms(s: &str) -> i64 {
    crate::timestamp::parse(s).unwrap()
}

#[test]
fn periods_are_calendar_aligned() {
    let now = ms("2026-11-26T22:10:00Z"); // a Thursday
    assert_eq!(Period::Day.start(now), ms("2026-11-26T00:00:00Z"));
    assert_eq!(Period::Week.start(now), ms("2026-11-23T00:00:00Z"));
    assert_eq!(Period::Week.end(now), Some(ms("2026-11-30T00:00:00Z")));
    assert_eq!(Period::Month.start(now), ms("2026-11-01T00:00:00Z"));
    assert_eq!(Period::Month.end(now), Some(ms("2026-12-01T00:00:00Z")));
    assert_eq!(
        Period::Month.end(ms("2026-12-31T23:59:59Z")),
        Some(ms("2027-01-01T00:00:00Z"))
    );
    assert_eq!(Period::Total.end(now), None);
    // A Monday starts its own week.
    assert_eq!(
        Period::Week.start(ms("2026-11-23T00:00:00Z")),
        ms("2026-11-23T00:00:00Z")
    );
}

#[test]
fn reservations_hold_under_the_budget() {
    let b = Arc::new(Budgets::default());
    assert!(!b.active());
    b.set_limits(
        "ann",
        Some(Limits {
            budget: Some(100),
            ..Limits::default()
        }),
    );
    assert!(b.active());
    let now = ms("2026-11-26T10:00:00Z");
    let h1 = b.check("ann", 60, 0, now).unwrap().unwrap();
    // 60 reserved: another 60 would overrun.
    assert!(matches!(
        b.check("ann", 60, 0, now),
        Err(Refusal::Budget { .. })
    ));
    h1.settle(10, 0);
    assert_eq!(b.spent("ann", now), (10, 0));
    let h2 = b.check("ann", 60, 0, now).unwrap().unwrap();
    drop(h2); // never reached upstream: released, nothing spent
    assert_eq!(b.spent("ann", now), (10, 0));
    assert!(b.check("bob", 1_000_000, 0, now).unwrap().is_none());
    // Next month starts from zero.
    let later = ms("2026-12-01T00:00:01Z");
    assert!(b.check("ann", 90, 0, later).is_ok());
}

#[test]
fn refusal_says_when_it_frees_up() {
    let b = Arc::new(Budgets::default());
    b.set_default(Some(Limits {
        budget: Some(0),
        period: Period::Day,
        rpm: Some(2),
        tpm: Some(100),
    }));
    let now = ms("2026-11-26T23:00:00Z");
    match b.check("x", 1, 0, now) {
        Err(Refusal::Budget { retry_after }) => assert_eq!(retry_after, Some(3600)),
        other => panic!("{other:?}"),
    }
    b.set_default(Some(Limits {
        budget: None,
        period: Period::Day,
        rpm: Some(2),
        tpm: Some(100),
    }));
    let t = ms("2026-11-26T23:00:45Z");
    let _a = b.check("x", 0, 10, t).unwrap();
    let _b = b.check("x", 0, 10, t).unwrap();
    assert_eq!(
        b.check("x", 0, 10, t).unwrap_err(),
        Refusal::Rate {
            what: "requests",
            retry_after: 15
        }
    );
    assert_eq!(
        b.check("y", 0, 101, t).unwrap_err(),
        Refusal::Rate {
            what: "tokens",
            retry_after: 15
        }
    );
    // A new minute resets the counters.
    assert!(b.check("x", 0, 10, t + 15_000).is_ok());
}

#[test]
fn concurrent_checks_never_overrun() {
    let b = Arc::new(Budgets::default());
    b.set_limits(
        "ann",
        Some(Limits {
            budget: Some(1000),
            period: Period::Total,
            ..Limits::default()
        }),
    );
    let now = 0;
    let held = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..100 {
                    if let Ok(Some(h)) = b.check("ann", 30, 0, now) {
                        held.lock().unwrap().push(h);
                    }
                }
            });
        }
    });
    let held = held.into_inner().unwrap();
    assert_eq!(held.len(), 33, "1000 / 30 reservations fit");
    for h in held {
        h.settle(30, 0);
    }
    assert_eq!(b.spent("ann", now), (990, 0));
}

#[test]
fn held_together_settle_together_and_cancel_undoes_the_minute() {
    let (users, projects) = (Arc::new(Budgets::default()), Arc::new(Budgets::default()));
    let l = Limits {
        budget: Some(100),
        rpm: Some(1),
        ..Limits::default()
    };
    users.set_limits("ann", Some(l));
    projects.set_limits("search", Some(l));
    let now = ms("2026-11-26T10:00:00Z");
    let u = users.check("ann", 60, 5, now).unwrap().unwrap();
    let p = projects.check("search", 60, 5, now).unwrap().unwrap();
    u.with(p).settle(7, 3);
    assert_eq!(users.spent("ann", now), (7, 0));
    assert_eq!(projects.spent("search", now), (7, 0));
    // The next minute: a cancelled check leaves its request uncounted, so
    // the one request of the minute is still there.
    let next = now + 60_000;
    users.check("ann", 10, 0, next).unwrap().unwrap().cancel();
    assert_eq!(users.spent("ann", next), (7, 0));
    let h = users.check("ann", 10, 0, next).unwrap().unwrap();
    assert!(matches!(
        users.check("ann", 10, 0, next),
        Err(Refusal::Rate { .. })
    ));
    // Dropped unsettled (the request never reached upstream): released,
    // and both of a pair.
    let p = projects.check("search", 10, 0, next).unwrap().unwrap();
    drop(h.with(p));
    assert_eq!(users.spent("ann", next), (7, 0));
    assert_eq!(projects.spent("search", next), (7, 0));
}
