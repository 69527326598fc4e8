//! Request tags: what `x-tollgate-tags` (and a key's default tags) may say,
//! parsed into one canonical form that the records, the rollups and the
//! reports share.
//!
//! A tag is `key=value` or a bare `word` (a key with an empty value). At most
//! [`MAX_TAGS`] per request, keys of at most [`MAX_KEY`] bytes and values of
//! at most [`MAX_VALUE`], both of `[A-Za-z0-9_.:/-]` only, each key once. The
//! canonical form is the tags sorted by key and joined by commas
//! (`feature=autocomplete,team=search,urgent`): that is what is stored, so
//! equal tag sets are equal strings.

use std::collections::BTreeMap;

/// The request header clients tag requests with.
pub const HEADER: &str = "x-tollgate-tags";

/// Most tags on one request (its own and its key's defaults together).
pub const MAX_TAGS: usize = 10;

/// Longest tag key, in bytes.
pub const MAX_KEY: usize = 32;

/// Longest tag value, in bytes.
pub const MAX_VALUE: usize = 64;

/// A set of tags: key to value (`""` for a bare word).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tags(BTreeMap<String, String>);

/// Why a tag list was refused; the message names the tag, escaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagError(pub String);

impl std::fmt::Display for TagError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A client's tag as it may be quoted in a message: escaped (no control or
/// non-ASCII character comes back raw) and cut to a readable length.
fn quoted(s: &str) -> String {
    let mut out: String = s.chars().take(80).flat_map(char::escape_default).collect();
    if s.chars().count() > 80 {
        out.push_str("...");
    }
    format!("\"{out}\"")
}

fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'/' | b'-')
}

/// Checks one tag key (also the key of `group_by=tag:<key>` and of the `tag`
/// filter).
pub fn check_key(key: &str) -> Result<(), TagError> {
    if key.is_empty() {
        return Err(TagError("a tag key cannot be empty".into()));
    }
    if key.len() > MAX_KEY {
        return Err(TagError(format!(
            "tag key {} is longer than {MAX_KEY} bytes",
            quoted(key)
        )));
    }
    if !key.bytes().all(allowed) {
        return Err(TagError(format!(
            "tag key {} may only hold A-Z, a-z, 0-9 and _ . : / -",
            quoted(key)
        )));
    }
    Ok(())
}

/// Checks one tag value (never empty: a bare word has no `=`).
pub fn check_value(tag: &str, value: &str) -> Result<(), TagError> {
    if value.is_empty() {
        return Err(TagError(format!(
            "tag {} has an empty value (write a bare word without `=`)",
            quoted(tag)
        )));
    }
    if value.len() > MAX_VALUE {
        return Err(TagError(format!(
            "tag {} has a value longer than {MAX_VALUE} bytes",
            quoted(tag)
        )));
    }
    if !value.bytes().all(allowed) {
        return Err(TagError(format!(
            "tag {} may only hold A-Z, a-z, 0-9 and _ . : / - in its value",
            quoted(tag)
        )));
    }
    Ok(())
}

/// One `key=value` or `word`, checked.
fn parse_one(tag: &str) -> Result<(&str, &str), TagError> {
    let (key, value) = match tag.split_once('=') {
        Some((k, v)) => {
            check_value(tag, v)?;
            (k, v)
        }
        None => (tag, ""),
    };
    check_key(key).map_err(|e| {
        if tag.contains('=') {
            TagError(format!("bad tag {}: {e}", quoted(tag)))
        } else {
            e
        }
    })?;
    Ok((key, value))
}

impl Tags {
    /// Parses a comma-separated list (spaces around each tag are ignored;
    /// an empty list is no tags).
    pub fn parse(list: &str) -> Result<Tags, TagError> {
        let mut out = BTreeMap::new();
        if list.trim().is_empty() {
            return Ok(Tags(out));
        }
        for tag in list.split(',').map(str::trim) {
            if tag.is_empty() {
                return Err(TagError(
                    "empty tag in the list (two commas in a row, or one at an end)".into(),
                ));
            }
            let (k, v) = parse_one(tag)?;
            if out.insert(k.to_owned(), v.to_owned()).is_some() {
                return Err(TagError(format!("tag key {} is given twice", quoted(k))));
            }
            if out.len() > MAX_TAGS {
                return Err(TagError(format!(
                    "more than {MAX_TAGS} tags (at {})",
                    quoted(tag)
                )));
            }
        }
        Ok(Tags(out))
    }

    /// Parses the values of every `x-tollgate-tags` header line, as one list.
    pub fn from_headers<'a>(
        values: impl Iterator<Item = &'a http::HeaderValue>,
    ) -> Result<Tags, TagError> {
        let mut list = String::new();
        for v in values {
            if !list.is_empty() {
                list.push(',');
            }
            list.push_str(&String::from_utf8_lossy(v.as_bytes()));
        }
        Tags::parse(&list)
    }

    /// These tags over `defaults`: a key in both keeps this set's value.
    pub fn over(mut self, defaults: &Tags) -> Result<Tags, TagError> {
        for (k, v) in &defaults.0 {
            self.0.entry(k.clone()).or_insert_with(|| v.clone());
        }
        if self.0.len() > MAX_TAGS {
            return Err(TagError(format!(
                "more than {MAX_TAGS} tags with the key's default tags"
            )));
        }
        Ok(self)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The canonical form: sorted by key, `k=v` or `word`, joined by commas.
    pub fn canonical(&self) -> String {
        let mut s = String::new();
        for (k, v) in &self.0 {
            if !s.is_empty() {
                s.push(',');
            }
            s.push_str(k);
            if !v.is_empty() {
                s.push('=');
                s.push_str(v);
            }
        }
        s
    }
}

/// The `(key, value)` pairs of a canonical (stored) tag list, in order; a
/// bare word's value is `""`.
pub fn pairs(canonical: &str) -> impl Iterator<Item = (&str, &str)> {
    canonical
        .split(',')
        .filter(|t| !t.is_empty())
        .map(|t| t.split_once('=').unwrap_or((t, "")))
}

/// The value of `key` in a canonical tag list: `None` when the key is not
/// there, `Some("")` for a bare word.
pub fn value_of<'a>(canonical: &'a str, key: &str) -> Option<&'a str> {
    pairs(canonical).find(|(k, _)| *k == key).map(|(_, v)| v)
}

/// The `tag` filter of `/usage` and `/queries`: records carrying `key`
/// (with `value`, when given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagFilter {
    /// The tag key.
    pub key: String,
    /// Only this value (`""` for the bare word); any value when `None`.
    pub value: Option<String>,
}

impl TagFilter {
    /// Parses `key` or `key=value`.
    pub fn parse(s: &str) -> Result<TagFilter, TagError> {
        let (key, value) = parse_one(s)?;
        Ok(TagFilter {
            key: key.to_owned(),
            value: s.contains('=').then(|| value.to_owned()),
        })
    }

    /// Whether a record with this canonical tag list matches.
    pub fn matches(&self, canonical: &str) -> bool {
        match (value_of(canonical, &self.key), &self.value) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(v), Some(want)) => v == want,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(s: &str) -> String {
        Tags::parse(s).unwrap().canonical()
    }

    fn err(s: &str) -> String {
        Tags::parse(s).unwrap_err().0
    }

    #[test]
    fn lists_become_sorted_canonical_strings() {
        assert_eq!(
            canon("team=search,feature=autocomplete"),
            "feature=autocomplete,team=search"
        );
        assert_eq!(canon(" urgent , a=1 "), "a=1,urgent");
        assert_eq!(canon(""), "");
        assert_eq!(canon("   "), "");
        assert_eq!(canon("k:v/x-1_2.3=A-b.c:d/e_f"), "k:v/x-1_2.3=A-b.c:d/e_f");
        let ten: Vec<String> = (0..10).map(|i| format!("k{i}=v")).collect();
        assert_eq!(Tags::parse(&ten.join(",")).unwrap().0.len(), 10);
    }

    #[test]
    fn bad_tags_are_refused_by_name() {
        assert!(err("a=1,,b").contains("empty tag"));
        assert!(err("a=1,").contains("empty tag"));
        assert!(err("team=a,team=b").contains("\"team\" is given twice"));
        assert!(err("word,word").contains("given twice"));
        assert!(err("team=").contains("\"team=\" has an empty value"));
        assert!(err("=x").contains("bad tag \"=x\""));
        assert!(err("a=b=c").contains("\"a=b=c\""));
        assert!(err("team=se arch").contains("\"team=se arch\""));
        assert!(err("sp ace").contains("tag key \"sp ace\" may only hold"));
        let long_key = "k".repeat(33);
        assert!(err(&long_key).contains("longer than 32 bytes"));
        assert!(Tags::parse(&"k".repeat(32)).is_ok());
        let long_value = format!("k={}", "v".repeat(65));
        assert!(err(&long_value).contains("longer than 64 bytes"));
        assert!(Tags::parse(&format!("k={}", "v".repeat(64))).is_ok());
        let eleven: Vec<String> = (0..11).map(|i| format!("k{i}")).collect();
        assert!(err(&eleven.join(",")).contains("more than 10 tags (at \"k10\")"));
    }

    #[test]
    fn messages_escape_what_the_client_sent() {
        let e = err("a=\u{7}<b>\"é");
        assert!(e.contains(r#""a=\u{7}<b>\"\u{e9}""#), "{e}");
        assert!(!e.contains('\u{7}'));
        let e = err(&format!("{}!", "x".repeat(200)));
        assert!(e.len() < 150, "{e}");
        assert!(e.contains("..."));
    }

    #[test]
    fn request_tags_override_key_defaults() {
        let defaults = Tags::parse("team=search,env=prod").unwrap();
        let t = Tags::parse("team=ads,feature=x")
            .unwrap()
            .over(&defaults)
            .unwrap();
        assert_eq!(t.canonical(), "env=prod,feature=x,team=ads");
        let nine: Vec<String> = (0..9).map(|i| format!("r{i}")).collect();
        let e = Tags::parse(&nine.join(","))
            .unwrap()
            .over(&defaults)
            .unwrap_err();
        assert!(e.0.contains("more than 10 tags"));
    }

    #[test]
    fn canonical_lists_are_read_back() {
        let c = "feature=autocomplete,team=search,urgent";
        assert_eq!(value_of(c, "team"), Some("search"));
        assert_eq!(value_of(c, "urgent"), Some(""));
        assert_eq!(value_of(c, "tea"), None);
        assert_eq!(value_of("", "team"), None);
        assert_eq!(pairs(c).count(), 3);
        let f = TagFilter::parse("team=search").unwrap();
        assert!(f.matches(c));
        assert!(!f.matches("team=ads"));
        let any = TagFilter::parse("team").unwrap();
        assert!(any.matches("team=ads"));
        assert!(any.matches("team"));
        assert!(!any.matches("teams=x"));
        assert!(TagFilter::parse("a b").is_err());
    }
}
