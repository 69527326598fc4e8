//! The body and error types every HTTP-facing module shares. A leaf: it
//! imports nothing from the crate, so the server, the proxy, the API and the
//! upstream pool can all use it without importing each other.

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};

/// Error type of every body tollgate produces.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request and answer tollgate sends.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body of known bytes.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}
