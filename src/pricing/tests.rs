use super::*;

fn per1k(s: &str) -> i64 {
    parse_scaled(s, SCALE_PER_1K).unwrap()
}

#[test]
fn old_readme_cost_is_exact() {
    // 3243 x 0.01/1K + 1399 x 0.03/1K = 0.0744 (openai-api-proxy printed 0.07440000000000001).
    let p = Price {
        valid_from: 0,
        query: per1k("0.01"),
        cached: None,
        answer: per1k("0.03"),
        ..Price::default()
    };
    let c = p.cost(Tokens {
        query: 3243,
        answer: 1399,
        cached: 0,
        ..Tokens::default()
    });
    assert_eq!(format_dollars(c.into()), "0.0744");
}

#[test]
fn cached_tokens_use_cached_price() {
    let p = Price {
        valid_from: 0,
        query: parse_scaled("2.50", SCALE_PER_1M).unwrap(),
        cached: Some(parse_scaled("1.25", SCALE_PER_1M).unwrap()),
        answer: parse_scaled("10", SCALE_PER_1M).unwrap(),
        ..Price::default()
    };
    // (1000-400) x 2.5e-6 + 400 x 1.25e-6 + 100 x 1e-5 = 0.0015 + 0.0005 + 0.001
    let c = p.cost(Tokens {
        query: 1000,
        answer: 100,
        cached: 400,
        ..Tokens::default()
    });
    assert_eq!(format_dollars(c.into()), "0.003");
    // Cached more than query (a broken upstream) never goes negative.
    let c = p.cost(Tokens {
        query: 10,
        answer: 0,
        cached: 50,
        ..Tokens::default()
    });
    assert_eq!(format_dollars(c.into()), "0.0000125");
}

#[test]
fn decimals_parse_exactly() {
    assert_eq!(parse_scaled("0.01", 9), Ok(10_000_000));
    assert_eq!(parse_scaled("1e-2", 9), Ok(10_000_000));
    assert_eq!(parse_scaled("0.005", 6), Ok(5_000));
    assert_eq!(parse_scaled("10", 6), Ok(10_000_000));
    assert_eq!(parse_scaled("0", 6), Ok(0));
    assert_eq!(parse_scaled("-0", 6), Ok(0));
    assert_eq!(parse_scaled("1.50000000000000", 6), Ok(1_500_000));
    assert_eq!(parse_scaled("-1", 6), Err(DecimalError::Negative));
    assert_eq!(parse_scaled("0.0000001", 6), Err(DecimalError::TooPrecise));
    assert_eq!(parse_scaled("1e30", 6), Err(DecimalError::TooLarge));
    assert_eq!(parse_scaled("abc", 6), Err(DecimalError::NotANumber));
    assert_eq!(parse_scaled("1.", 6), Err(DecimalError::NotANumber));
    assert_eq!(parse_scaled(".5", 6), Err(DecimalError::NotANumber));
}

#[test]
fn decimals_format_without_noise() {
    assert_eq!(format_scaled(0, 12), "0");
    assert_eq!(format_scaled(74_400_000_000, 12), "0.0744");
    assert_eq!(format_scaled(1_000_000_000_000, 12), "1");
    assert_eq!(format_scaled(-5, 1), "-0.5");
    assert_eq!(format_scaled(10_000_000, 9), "0.01");
    // Beyond 64 bits, the 128-bit path.
    assert_eq!(
        format_scaled(i128::from(u64::MAX) * 10 + 5, 12),
        "184467440.737095516155"
    );
    assert_eq!(
        format_scaled(-(i128::from(u64::MAX) * 1000), 3),
        "-18446744073709551615"
    );
    assert_eq!(format_scaled(1, 12), "0.000000000001");
}

#[test]
fn lookup_follows_the_chain_and_validity() {
    let mut t = PriceTable::default();
    let p = |q: i64, from: i64| Price {
        valid_from: from,
        query: q,
        cached: None,
        answer: q,
        ..Price::default()
    };
    t.insert("gpt-4o", p(1, 0));
    t.insert("gpt-4o", p(2, 1000));
    t.insert("gpt-4o-mini", p(7, 0));
    assert_eq!(
        t.lookup("gpt-4o-2024-08-06", "gpt-4o", 999)
            .unwrap()
            .1
            .query,
        1
    );
    assert_eq!(t.lookup("gpt-4o-2024-08-06", "x", 1000).unwrap().1.query, 2);
    assert_eq!(
        t.lookup("", "ft:gpt-4o-mini:org::abc", 5).unwrap().1.query,
        7
    );
    // The answered model wins over the requested one.
    assert_eq!(
        t.lookup("gpt-4o-mini", "gpt-4o", 5).unwrap().0,
        "gpt-4o-mini"
    );
    assert!(t.lookup("unknown", "", 5).is_none());
    // Before the first row there is no price.
    t.insert("late", p(3, 10_000));
    assert!(t.lookup("late", "", 9_999).is_none());
    // Same instant replaces.
    t.insert("gpt-4o", p(5, 1000));
    assert_eq!(t.rows("gpt-4o").unwrap().len(), 2);
    assert_eq!(t.lookup("gpt-4o", "", 2000).unwrap().1.query, 5);
}

#[test]
fn date_suffixes() {
    assert_eq!(strip_date("gpt-4o-2024-08-06"), "gpt-4o");
    assert_eq!(strip_date("gpt-4-0613"), "gpt-4");
    assert_eq!(strip_date("gpt-4o"), "gpt-4o");
    assert_eq!(strip_date("o3"), "o3");
    assert_eq!(strip_date("gpt-4-1106-preview"), "gpt-4-1106-preview");
}

#[test]
fn default_prices_load() {
    let d = default_prices();
    assert!(d.len() >= 11);
    let (_, mini) = d.iter().find(|(m, _)| m == "gpt-4o-mini").unwrap();
    assert_eq!(mini.query, 150_000);
    assert_eq!(mini.cached, Some(75_000));
    let (_, emb) = d
        .iter()
        .find(|(m, _)| m == "text-embedding-3-small")
        .unwrap();
    assert_eq!(emb.cached, None);
    assert_eq!(emb.answer, 0);
}

#[test]
fn image_tokens_are_priced_at_their_own_rates_and_add_up() {
    // $5 text, $10 image in, $40 image out per 1M; $1.25 cached.
    let p = Price {
        query: 5_000_000,
        cached: Some(1_250_000),
        answer: 40_000_000,
        image_query: Some(10_000_000),
        image_answer: Some(40_000_000),
        ..Price::default()
    };
    let t = Tokens {
        query: 150,
        cached: 50,
        image_query: 60,
        answer: 1000,
        image_answer: 1000,
        ..Tokens::default()
    };
    let b = p.breakdown(t);
    assert_eq!(b.input, 40 * 5_000_000);
    assert_eq!(b.cached_input, 50 * 1_250_000);
    assert_eq!(b.image_input, 60 * 10_000_000);
    assert_eq!(b.image_output, 1000 * 40_000_000);
    assert_eq!(b.output, 0);
    assert_eq!(b.total(), p.cost(t));
    // More image tokens than the uncached prompt holds: capped, never wrapped.
    let odd = Tokens {
        query: 10,
        cached: 8,
        image_query: 100,
        ..Tokens::default()
    };
    let b = p.breakdown(odd);
    assert_eq!((b.input, b.image_input), (0, 2 * 10_000_000));
}

#[test]
fn per_unit_rows_price_images_tools_seconds_and_characters() {
    let mut t = PriceTable::default();
    let unit = |u: i64| Price {
        unit: Some(u),
        ..Price::default()
    };
    t.insert("dall-e-3/1024x1792/hd", unit(120_000_000_000));
    t.insert("dall-e-3/1024x1024/standard", unit(40_000_000_000));
    t.insert("dall-e-2/256x256", unit(16_000_000_000));
    t.insert("web_search_call", unit(10_000_000_000));
    t.insert("web_search_call/gpt-4o", unit(25_000_000_000));
    t.insert("whisper-1", unit(100_000_000));
    t.insert(
        "gpt-4o",
        Price {
            query: 2_500_000,
            answer: 10_000_000,
            ..Price::default()
        },
    );
    let units = |u: Units| Tokens {
        units: u,
        ..Tokens::default()
    };
    let images = |n, size, q| {
        units(Units {
            images: n,
            image_size: size,
            image_quality: q,
            ..Units::default()
        })
    };
    let (b, ok) = t.breakdown(
        "",
        "dall-e-3",
        0,
        images(2, Some((1024, 1792)), Some(Quality::Hd)),
    );
    assert!(ok);
    assert_eq!(
        (b.image_output, b.total()),
        (240_000_000_000, 240_000_000_000)
    );
    // Defaults: 1024x1024, standard; a dated answer finds the base's rules.
    let (b, ok) = t.breakdown("dall-e-3-2024-01-01", "", 0, images(1, None, None));
    assert!(ok);
    assert_eq!(b.total(), 40_000_000_000);
    // A rule without quality covers every quality of its size.
    let (b, _) = t.breakdown(
        "",
        "dall-e-2",
        0,
        images(3, Some((256, 256)), Some(Quality::Hd)),
    );
    assert_eq!(b.total(), 48_000_000_000);
    // No rule: unpriced, no partial cost.
    assert_eq!(
        t.breakdown("", "dall-e-2", 0, images(1, Some((512, 512)), None)),
        (Breakdown::default(), false)
    );
    // Tools: the model family's row, else the tool's own.
    let mut u = Units::default();
    u.add_tool(Tool::WebSearch, 2);
    let tok = Tokens {
        query: 1000,
        answer: 100,
        units: u,
        ..Tokens::default()
    };
    let (b, ok) = t.breakdown("gpt-4o-2024-08-06", "gpt-4o", 0, tok);
    assert!(ok);
    assert_eq!(b.tool, 50_000_000_000);
    assert_eq!(b.total(), 50_000_000_000 + 2_500_000_000 + 1_000_000_000);
    let (b, _) = t.breakdown("", "gpt-5", 0, units(u));
    assert_eq!(b.tool, 20_000_000_000);
    // A tool without any price: unpriced.
    let mut fs = Units::default();
    fs.add_tool(Tool::FileSearch, 1);
    assert!(!t.breakdown("gpt-4o", "", 0, units(fs)).1);
    // Seconds at the model's unit rate, as audio input.
    let secs = units(Units {
        seconds: 37,
        ..Units::default()
    });
    let (b, ok) = t.breakdown("", "whisper-1", 0, secs);
    assert!(ok);
    assert_eq!((b.audio_input, b.total()), (3_700_000_000, 3_700_000_000));
    // Seconds for a model without a unit rate: unpriced.
    assert!(!t.breakdown("", "gpt-4o", 0, secs).1);
}
