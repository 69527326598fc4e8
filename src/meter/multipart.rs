//! The `model` form field of a multipart upload (audio, image edits), read
//! from the body's first bytes as it streams upstream.

use std::sync::LazyLock;

use memchr::memmem::Finder;

static MULTIPART_MODEL: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(b"name=\"model\""));

/// The `model` form field of a multipart body's beginning (audio, image edits).
pub(crate) fn find_multipart_model(b: &[u8]) -> Option<String> {
    let at = MULTIPART_MODEL.find(b)?;
    let rest = &b[at..];
    let start = memchr::memmem::find(rest, b"\r\n\r\n")? + 4;
    let len = memchr::memmem::find(&rest[start..], b"\r\n")?;
    let v = std::str::from_utf8(&rest[start..start + len]).ok()?.trim();
    (!v.is_empty()).then(|| v.to_owned())
}

#[cfg(test)]
mod tests;
