//! Byte-level JSON scanning: spans of strings, values and object members,
//! and the keys (`usage`, `model`, `choices`, `error`) looked up in answer
//! bytes that may be a window of a larger text, so they are never parsed whole.

use std::sync::LazyLock;

use memchr::memmem::Finder;

use crate::pricing::Tier;

/// Whether a member's key is `name`, escapes (`\u005f`) decoded.
pub(super) fn key_is(body: &[u8], m: &Member, name: &str) -> bool {
    let raw = &body[m.key.0..m.key.1];
    if !raw.contains(&b'\\') {
        return raw.len() == name.len() + 2 && &raw[1..raw.len() - 1] == name.as_bytes();
    }
    serde_json::from_slice::<String>(raw).is_ok_and(|k| k == name)
}

pub(super) struct Member {
    /// Span of the key, quotes included.
    pub(super) key: (usize, usize),
    /// Span of the value.
    pub(super) value: (usize, usize),
}

/// Members of the object starting at `open` (which holds `{`).
pub(super) fn object_members(b: &[u8], open: usize) -> Option<Vec<Member>> {
    let mut out = Vec::new();
    let mut i = skip_ws(b, open + 1);
    if b.get(i) == Some(&b'}') {
        return Some(out);
    }
    loop {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let ke = skip_string(b, i)?;
        let mut j = skip_ws(b, ke);
        if b.get(j) != Some(&b':') {
            return None;
        }
        j = skip_ws(b, j + 1);
        let ve = skip_value(b, j)?;
        out.push(Member {
            key: (i, ke),
            value: (j, ve),
        });
        i = skip_ws(b, ve);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b'}') => return Some(out),
            _ => return None,
        }
    }
}

pub(super) fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// End (exclusive) of the string starting at `i` (which holds `"`).
pub(super) fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        let k = j + memchr::memchr2(b'"', b'\\', b.get(j..)?)?;
        if b[k] == b'\\' {
            j = k + 2;
        } else {
            return Some(k + 1);
        }
    }
}

/// End (exclusive) of the JSON value starting at `i`. Structure is trusted
/// only as far as bracket matching; callers pass validated JSON or accept `None`.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            {
                j += 1;
            }
            (j > i).then_some(j)
        }
    }
}

static USAGE_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\""));
static MODEL_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"model\""));
static TIER_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"service_tier\""));
static CHOICES_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"choices\""));
pub(super) static ERROR_KEY: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"\"error\""));

/// Where the value of a `"key":` occurrence at `at` starts (the key's quote at `at`).
pub(super) fn value_after_key(b: &[u8], at: usize, key_len: usize) -> Option<usize> {
    // A quote escaped inside a string is no key.
    if at > 0 && b[at - 1] == b'\\' {
        return None;
    }
    let i = skip_ws(b, at + key_len);
    if b.get(i) != Some(&b':') {
        return None;
    }
    Some(skip_ws(b, i + 1))
}

/// The last object value of key `usage` in `b` (a JSON text or a window of one).
/// An unescaped `"usage":` can only be a key, never string content.
pub(super) fn find_usage_object(b: &[u8]) -> Option<&[u8]> {
    for at in USAGE_KEY.find_iter(b).collect::<Vec<_>>().into_iter().rev() {
        if let Some(v) = value_after_key(b, at, 7) {
            if b.get(v) == Some(&b'{') {
                let end = skip_value(b, v)?;
                return Some(&b[v..end]);
            }
        }
    }
    None
}

/// The first string value of key `model`.
pub(crate) fn find_model(b: &[u8]) -> Option<String> {
    for at in MODEL_KEY.find_iter(b) {
        if let Some(v) = value_after_key(b, at, 7) {
            if b.get(v) == Some(&b'"') {
                let end = skip_string(b, v)?;
                return serde_json::from_slice::<String>(&b[v..end]).ok();
            }
        }
    }
    None
}

/// The tier named by the last string value of key `service_tier` (the
/// top-level one: an answer's own fields come after its content). `None`
/// when there is none, or it names no known tier.
pub(crate) fn find_tier(b: &[u8]) -> Option<Tier> {
    for at in TIER_KEY.find_iter(b).collect::<Vec<_>>().into_iter().rev() {
        if let Some(v) = value_after_key(b, at, 14) {
            if b.get(v) == Some(&b'"') {
                let end = skip_string(b, v)?;
                let s = serde_json::from_slice::<&str>(&b[v..end]).ok()?;
                return Tier::parse(s);
            }
        }
    }
    None
}

/// Whether the event's `choices` is an empty array (the usage-only chunk).
pub(super) fn choices_empty(b: &[u8]) -> bool {
    CHOICES_KEY.find_iter(b).any(|at| {
        value_after_key(b, at, 9)
            .filter(|&v| b.get(v) == Some(&b'['))
            .is_some_and(|v| b.get(skip_ws(b, v + 1)) == Some(&b']'))
    })
}
