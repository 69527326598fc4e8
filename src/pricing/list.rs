//! Price lists as files: the bundled TSV format (read for the built-in list,
//! for `tollgate prices import` and written by `prices export`) and the
//! community price map LiteLLM publishes
//! (`model_prices_and_context_window.json`), and the difference between a
//! list and the prices in effect.
//!
//! TSV rows are `model input cached output` in USD per 1M tokens, then
//! optionally the eight columns of flex input, cached, output; priority
//! input, cached, output; audio input, output (12 columns), then
//! optionally image input, output (USD per 1M tokens) and the unit price
//! (USD per second, character, image or tool call; 15 columns): the
//! layout of [`Price::extra_columns`]. `-` is "none". Older lists of 4 and
//! 12 columns still read. LiteLLM's map gives USD per token; only its OpenAI
//! entries (`litellm_provider` `openai`) are read, and its batch prices are
//! not (tollgate has no batch rate yet).

use std::collections::BTreeMap;

use super::{parse_scaled, Price, PriceTable, Rates, SCALE_PER_1M};

/// A model's price as a list gives it (no `valid_from` of its own).
pub type Entry = (String, Price);

/// Why a list could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListError(pub String);

impl std::fmt::Display for ListError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Reads a list: LiteLLM's JSON map when the text is a JSON object, else
/// the TSV format.
pub fn parse(text: &str) -> Result<Vec<Entry>, ListError> {
    if text.trim_start().starts_with('{') {
        parse_litellm(text)
    } else {
        parse_tsv(text)
    }
}

/// Reads the TSV format (4, 12 or 15 columns per row; `#` comments).
pub fn parse_tsv(text: &str) -> Result<Vec<Entry>, ListError> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |what: String| ListError(format!("line {}: {what}", n + 1));
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() != 4 && f.len() != 12 && f.len() != 15 {
            return Err(bad(format!(
                "{} columns; a row is model, input, cached, output (USD per 1M tokens), optionally followed by flex, priority and audio columns (12 in all), then image input, output and the unit price (15 in all)",
                f.len()
            )));
        }
        let p = |i: usize| -> Result<Option<i64>, ListError> {
            // The unit price is in USD per unit, the others per 1M tokens.
            let scale = if i == 14 { 12 } else { SCALE_PER_1M };
            match f[i] {
                "-" => Ok(None),
                s => parse_scaled(s, scale)
                    .ok()
                    .filter(|v| *v >= 0)
                    .map(Some)
                    .ok_or_else(|| {
                        bad(format!(
                            "column {}: `{}` is not a price",
                            i + 1,
                            s.escape_default()
                        ))
                    }),
            }
        };
        let mut extra = [None; 11];
        for (i, e) in extra.iter_mut().enumerate().take(f.len() - 4) {
            *e = p(4 + i)?;
        }
        let price = Price {
            valid_from: 0,
            query: p(1)?.unwrap_or(0),
            cached: p(2)?,
            answer: p(3)?.unwrap_or(0),
            ..Price::default()
        }
        .with_extra_columns(extra);
        out.push((f[0].to_owned(), price));
    }
    Ok(out)
}

/// Reads LiteLLM's price map: USD per token, OpenAI's entries only.
pub fn parse_litellm(text: &str) -> Result<Vec<Entry>, ListError> {
    let map: BTreeMap<String, serde_json::Value> = serde_json::from_str(text)
        .map_err(|e| ListError(format!("not a LiteLLM price map: {e}")))?;
    let mut out = Vec::new();
    for (model, v) in map {
        if v.get("litellm_provider").and_then(|p| p.as_str()) != Some("openai") {
            continue;
        }
        let rate = |field: &str| -> Result<Option<i64>, ListError> {
            match v.get(field) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::Number(n)) => per_token(n)
                    .map(Some)
                    .ok_or_else(|| ListError(format!("{model}: {field} is not a price: {n}"))),
                Some(other) => Err(ListError(format!(
                    "{model}: {field} is not a number: {other}"
                ))),
            }
        };
        // Priced per second (whisper-1) or per character (tts-1): a unit price.
        let unit = rate("input_cost_per_second")?.or(rate("input_cost_per_character")?);
        let (Some(query), Some(answer)) = (
            rate("input_cost_per_token")?.or(unit.map(|_| 0)),
            rate("output_cost_per_token")?.or(Some(0)),
        ) else {
            continue; // priced per image or per pixel: no rule tollgate reads
        };
        let tier = |t: &str| -> Result<Option<Rates>, ListError> {
            let q = rate(&format!("input_cost_per_token_{t}"))?;
            let a = rate(&format!("output_cost_per_token_{t}"))?;
            let c = rate(&format!("cache_read_input_token_cost_{t}"))?;
            Ok(q.zip(a).map(|(query, answer)| Rates {
                query,
                cached: c,
                answer,
            }))
        };
        out.push((
            model.clone(),
            Price {
                valid_from: 0,
                query,
                cached: rate("cache_read_input_token_cost")?,
                answer,
                flex: tier("flex")?,
                priority: tier("priority")?,
                audio_query: rate("input_cost_per_audio_token")?,
                audio_answer: rate("output_cost_per_audio_token")?,
                image_query: rate("input_cost_per_image_token")?,
                image_answer: rate("output_cost_per_image_token")?,
                unit,
            },
        ));
    }
    Ok(out)
}

/// USD per token, as JSON writes it (`2.5e-06`), in pico-dollars per token.
fn per_token(n: &serde_json::Number) -> Option<i64> {
    parse_scaled(&n.to_string(), 12).ok().filter(|v| *v >= 0)
}

/// What importing a list changes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Models without a price yet.
    pub added: Vec<Entry>,
    /// Models whose price in effect differs: (model, in effect, new).
    pub changed: Vec<(String, Price, Price)>,
    /// Models whose price in effect is already the list's.
    pub unchanged: Vec<String>,
}

/// Compares a list with the prices in effect at `now_ms`.
pub fn diff(table: &PriceTable, list: &[Entry], now_ms: i64) -> Diff {
    let mut d = Diff::default();
    let mut seen = std::collections::HashSet::new();
    for (model, new) in list {
        if !seen.insert(model.as_str()) {
            continue; // the first row of a model wins
        }
        let current = table.rows(model).and_then(|rows| {
            let i = rows.partition_point(|p| p.valid_from <= now_ms);
            i.checked_sub(1).map(|i| rows[i])
        });
        match current {
            None => d.added.push((model.clone(), *new)),
            Some(cur) if same_rates(&cur, new) => d.unchanged.push(model.clone()),
            Some(cur) => d.changed.push((model.clone(), cur, *new)),
        }
    }
    d
}

/// Equal prices, whatever their `valid_from`.
fn same_rates(a: &Price, b: &Price) -> bool {
    Price {
        valid_from: 0,
        ..*a
    } == Price {
        valid_from: 0,
        ..*b
    }
}

/// The prices in effect at `now_ms`, one row per model, in the TSV format
/// (all 15 columns), sorted by model.
pub fn export_tsv(table: &PriceTable, now_ms: i64) -> String {
    use std::fmt::Write;
    let mut out = String::from(
        "# tollgate price list, USD per 1M tokens (\"-\": none). Import it with `tollgate prices import FILE`.\n\
         # model\tinput\tcached\toutput\tflex:in\tcached\tout\tpriority:in\tcached\tout\taudio:in\tout\timage:in\tout\tunit (USD)\n",
    );
    let cell_at = |v: Option<i64>, scale: u32| {
        v.map_or_else(|| "-".to_owned(), |v| super::format_scaled(v.into(), scale))
    };
    let cell = |v: Option<i64>| cell_at(v, SCALE_PER_1M);
    for model in table.names() {
        let Some(rows) = table.rows(model) else {
            continue;
        };
        let i = rows.partition_point(|p| p.valid_from <= now_ms);
        let Some(p) = i.checked_sub(1).map(|i| rows[i]) else {
            continue;
        };
        let _ = write!(
            out,
            "{model}\t{}\t{}\t{}",
            cell(Some(p.query)),
            cell(p.cached),
            cell(Some(p.answer))
        );
        for (i, c) in p.extra_columns().into_iter().enumerate() {
            let scale = if i == 10 { 12 } else { SCALE_PER_1M };
            let _ = write!(out, "\t{}", cell_at(c, scale));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PICO_PER_1M: i64 = 1_000_000;

    #[test]
    fn tsv_rows_of_4_and_12_columns() {
        let l = parse_tsv("# c\ngpt-a 2.50 1.25 10\n\ngpt-b 1 - 2 0.5 - 1 - - - 40 80\n").unwrap();
        assert_eq!(l[0].0, "gpt-a");
        assert_eq!(l[0].1.query, 2_500_000);
        assert_eq!(l[0].1.cached, Some(1_250_000));
        assert_eq!(l[0].1.answer, 10 * PICO_PER_1M);
        assert_eq!(
            l[1].1.flex,
            Some(Rates {
                query: 500_000,
                cached: None,
                answer: PICO_PER_1M
            })
        );
        assert_eq!(l[1].1.priority, None);
        assert_eq!(l[1].1.audio_query, Some(40 * PICO_PER_1M));
        for bad in ["m 1 2", "m 1 x 2", "m -1 - 2", "m 1 - 2 3"] {
            let e = parse_tsv(bad).unwrap_err();
            assert!(e.0.starts_with("line 1:"), "{e}");
        }
    }

    #[test]
    fn tsv_rows_of_15_columns_carry_image_and_unit_prices() {
        let l = parse_tsv(
            "gpt-image-1 5 1.25 40 - - - - - - - - 10 40 -\ndall-e-3/1024x1024/standard 0 - 0 - - - - - - - - - - 0.04\nwhisper-1 0 - 0 - - - - - - - - - - 0.0001\n",
        )
        .unwrap();
        assert_eq!(l[0].1.image_query, Some(10 * PICO_PER_1M));
        assert_eq!(l[0].1.image_answer, Some(40 * PICO_PER_1M));
        assert_eq!(l[0].1.unit, None);
        // The unit column is USD per unit, not per 1M.
        assert_eq!(l[1].1.unit, Some(40_000_000_000));
        assert_eq!(l[2].1.unit, Some(100_000_000));
        let mut t = PriceTable::default();
        for (m, p) in &l {
            t.insert(m, *p);
        }
        let text = export_tsv(&t, 1);
        assert!(
            text.contains(
                "dall-e-3/1024x1024/standard\t0\t-\t0\t-\t-\t-\t-\t-\t-\t-\t-\t-\t-\t0.04\n"
            ),
            "{text}"
        );
        // Exported sorted by model.
        let mut sorted = l.clone();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(parse_tsv(&text).unwrap(), sorted);
        for bad in [
            "m 1 - 2 - - - - - - - - - -",
            "m 1 - 2 - - - - - - - - - - x",
        ] {
            assert!(parse_tsv(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn litellm_per_second_and_per_character_prices_are_unit_prices() {
        let map = r#"{
          "whisper-1": {"input_cost_per_second": 0.0001, "output_cost_per_second": 0.0001, "litellm_provider": "openai", "mode": "audio_transcription"},
          "tts-1": {"input_cost_per_character": 1.5e-05, "litellm_provider": "openai", "mode": "audio_speech"},
          "gpt-image-1": {"input_cost_per_token": 5e-06, "output_cost_per_token": 4e-05, "input_cost_per_image_token": 1e-05, "output_cost_per_image_token": 4e-05, "litellm_provider": "openai"}
        }"#;
        let l = parse(map).unwrap();
        let get = |m: &str| l.iter().find(|(n, _)| n == m).unwrap().1;
        assert_eq!(get("whisper-1").unit, Some(100_000_000));
        assert_eq!(get("whisper-1").query, 0);
        assert_eq!(get("tts-1").unit, Some(15_000_000));
        assert_eq!(get("gpt-image-1").image_query, Some(10_000_000));
        assert_eq!(get("gpt-image-1").image_answer, Some(40_000_000));
    }

    #[test]
    fn the_bundled_list_reads_and_exports_back_to_itself() {
        let mut t = PriceTable::default();
        for (m, p) in super::super::default_prices() {
            t.insert(&m, p);
        }
        let text = export_tsv(&t, 1);
        let again = parse_tsv(&text).unwrap();
        assert_eq!(again.len(), t.names().len());
        for (m, p) in again {
            assert_eq!(t.rows(&m).unwrap()[0], p, "{m}");
        }
    }

    #[test]
    fn litellm_entries_of_openai_with_tiers_and_audio() {
        let map = r#"{
          "sample_spec": {"input_cost_per_token": 0.0, "litellm_provider": "one of https://docs.litellm.ai/docs/providers"},
          "gpt-4o": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05, "cache_read_input_token_cost": 1.25e-06,
                     "input_cost_per_token_priority": 4.25e-06, "output_cost_per_token_priority": 1.7e-05,
                     "input_cost_per_token_batches": 1.25e-06, "litellm_provider": "openai", "mode": "chat"},
          "gpt-4o-audio-preview": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05,
                     "input_cost_per_audio_token": 4e-05, "output_cost_per_audio_token": 8e-05, "litellm_provider": "openai"},
          "azure/gpt-4o": {"input_cost_per_token": 2.5e-06, "output_cost_per_token": 1e-05, "litellm_provider": "azure"},
          "dall-e-3": {"input_cost_per_pixel": 4e-08, "output_cost_per_pixel": 0.0, "litellm_provider": "openai"},
          "text-embedding-3-small": {"input_cost_per_token": 2e-08, "output_cost_per_token": 0.0, "litellm_provider": "openai"}
        }"#;
        let l = parse(map).unwrap();
        let names: Vec<&str> = l.iter().map(|(m, _)| m.as_str()).collect();
        assert_eq!(
            names,
            ["gpt-4o", "gpt-4o-audio-preview", "text-embedding-3-small"]
        );
        let g = l[0].1;
        assert_eq!(
            (g.query, g.cached, g.answer),
            (2_500_000, Some(1_250_000), 10_000_000)
        );
        assert_eq!(
            g.priority,
            Some(Rates {
                query: 4_250_000,
                cached: None,
                answer: 17_000_000
            })
        );
        assert_eq!(g.flex, None);
        assert_eq!(l[1].1.audio_query, Some(40_000_000));
        assert_eq!(l[1].1.audio_answer, Some(80_000_000));
        assert_eq!(l[2].1.query, 20_000);
        assert!(parse(
            "{\"m\": {\"input_cost_per_token\": \"x\", \"litellm_provider\": \"openai\"}}"
        )
        .is_err());
    }

    #[test]
    fn diff_against_the_prices_in_effect() {
        let mut t = PriceTable::default();
        let p = |q: i64, from: i64| Price {
            valid_from: from,
            query: q,
            answer: q,
            ..Price::default()
        };
        t.insert("a", p(1, 0));
        t.insert("b", p(1, 0));
        t.insert("b", p(2, 1_000)); // in effect from 1000
        t.insert("c", p(5, 5_000)); // not yet in effect at 2000
        let list = vec![
            ("a".to_owned(), p(1, 0)),
            ("b".to_owned(), p(2, 0)),
            ("c".to_owned(), p(5, 0)),
            ("d".to_owned(), p(7, 0)),
            ("a".to_owned(), p(9, 0)),
        ];
        let d = diff(&t, &list, 2_000);
        assert_eq!(d.unchanged, ["a", "b"]);
        assert_eq!(
            d.added.iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>(),
            ["c", "d"]
        );
        assert!(d.changed.is_empty());
        let d = diff(&t, &[("b".to_owned(), p(3, 0))], 2_000);
        assert_eq!(d.changed, vec![("b".to_owned(), p(2, 1_000), p(3, 0))]);
    }
}
