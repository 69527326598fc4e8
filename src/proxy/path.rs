//! The request path as tollgate classifies and forwards it.
//!
//! A path is normalised before anything looks at it, so that a spelling
//! upstream treats as `/v1/chat/completions` is metered as one:
//! percent-encoded unreserved characters are decoded, empty and `.`
//! segments dropped, `..` applied, and the names of metered endpoints
//! matched without regard to case. A path that would leave `/v1/`, or that
//! hides a separator (`%2F`, `%5C`) or a control character in an escape, is
//! refused: it is never forwarded with the upstream key.
//!
//! Endpoint families (the first segment after `/v1/`) that tollgate cannot
//! meter are refused unless the admin opens them (`--allow-unmetered`).

use std::borrow::Cow;

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// `..` climbs out of `/v1/`.
    LeavesV1,
    /// An escape tollgate will not forward: an encoded separator, a control
    /// character, or bad percent syntax.
    BadEscape,
}

impl PathError {
    /// The message answered to the client.
    pub fn message(&self) -> &'static str {
        match self {
            PathError::LeavesV1 => "The request path must stay under /v1/.",
            PathError::BadEscape => {
                "The request path has an escape tollgate does not forward (an encoded '/', '\\', control character or a malformed '%')."
            }
        }
    }
}

/// Paths of the metered endpoints, matched case-insensitively.
const METERED: [&str; 10] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/images/variations",
    "/v1/batches",
];

/// Azure OpenAI's shape of a path, `/openai/deployments/{deployment}/...`
/// (what the `AzureOpenAI` SDKs call): the deployment and the `/v1/...`
/// path it stands for. `None`: not that shape; `Err`: that shape with a
/// deployment name that is not plain (letters, digits, `-`, `_`, `.`).
pub fn from_azure(path: &str) -> Option<Result<(&str, String), PathError>> {
    let rest = path.strip_prefix(AZURE_PREFIX)?;
    let (deployment, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let plain = !deployment.is_empty()
        && deployment != "."
        && deployment != ".."
        && deployment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !plain {
        return Some(Err(PathError::BadEscape));
    }
    Some(Ok((deployment, format!("/v1/{rest}"))))
}

/// Where Azure-shaped paths start.
pub const AZURE_PREFIX: &str = "/openai/deployments/";

/// The normal form of a `/v1/...` path; borrowed when it already is one.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let b = path.as_bytes();
    let plain = !b.contains(&b'%')
        && !path.contains("//")
        && !path.split('/').any(|s| s == "." || s == "..")
        && !path.ends_with('/');
    let out: Cow<'_, str> = if plain {
        Cow::Borrowed(path)
    } else {
        let decoded = decode_unreserved(path)?;
        let mut segments: Vec<&str> = Vec::new();
        for seg in decoded.split('/') {
            match seg {
                "" | "." => {}
                ".." => {
                    // The first segment is `v1`: popping it leaves `/v1/`.
                    if segments.len() <= 1 {
                        return Err(PathError::LeavesV1);
                    }
                    segments.pop();
                }
                s => segments.push(s),
            }
        }
        if segments.first() != Some(&"v1") || segments.len() < 2 {
            return Err(PathError::LeavesV1);
        }
        Cow::Owned(format!("/{}", segments.join("/")))
    };
    // Known endpoints in any case: an upstream that ignores case would
    // otherwise serve an unmetered spelling.
    if let Some(m) = METERED.iter().find(|m| m.eq_ignore_ascii_case(&out)) {
        if **m != *out {
            return Ok(Cow::Owned((*m).to_owned()));
        }
    }
    Ok(out)
}

/// Decodes `%XX` escapes of unreserved characters (RFC 3986 2.3); keeps
/// other escapes as they are, upper-cased; refuses encoded separators,
/// control characters and malformed escapes.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let hex = |c: u8| (c as char).to_digit(16);
        let (Some(h), Some(l)) = (
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadEscape);
        };
        let c = (h * 16 + l) as u8;
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
            out.push(c);
        } else if c == b'/' || c == b'\\' || c.is_ascii_control() {
            return Err(PathError::BadEscape);
        } else {
            out.extend_from_slice(format!("%{c:02X}").as_bytes());
        }
        i += 3;
    }
    // Only ASCII was put in place of ASCII escapes: still UTF-8.
    String::from_utf8(out).map_err(|_| PathError::BadEscape)
}

/// The endpoint family of a normalised `/v1/...` path: its first segment.
pub fn family(path: &str) -> &str {
    path.strip_prefix("/v1/")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("")
}

/// Families tollgate meters (or that cost nothing): always allowed.
pub const METERED_FAMILIES: [&str; 12] = [
    "chat",
    "completions",
    "responses",
    "conversations",
    "embeddings",
    "audio",
    "images",
    "moderations",
    "models",
    "files",
    "uploads",
    "batches",
];

/// Families that spend without a record of their cost: fine-tuning, Realtime (which mints short-lived upstream
/// credentials a client spends with directly), Assistants runs
/// (`threads`), vector stores, containers, evals, videos, and anything
/// tollgate does not know.
pub fn is_metered_family(family: &str) -> bool {
    METERED_FAMILIES.contains(&family)
}

#[cfg(test)]
mod tests;
