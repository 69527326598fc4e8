//! What crosses the proxy in each direction: hop-by-hop headers never do,
//! tollgate's own headers (`x-user`, `x-tollgate-tags`, a tollgate key) stay here, upstream's
//! cookies stay there.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::access::AuthMode;

/// Headers that describe one connection, not the message (RFC 9110 7.6.1).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    let hop: Vec<HeaderName> = h.keys().filter(|n| is_hop_by_hop(n)).cloned().collect();
    for n in hop {
        h.remove(n);
    }
}

/// Usage is read from the answer, so it must not come compressed.
pub fn ask_identity(h: &mut HeaderMap) {
    h.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
}

/// Azure's key header, which Azure-shaped clients send their key in.
pub const AZURE_KEY: HeaderName = HeaderName::from_static("api-key");

/// Turns the client's headers into upstream's: the configured key replaces
/// the client's `Authorization` (a tollgate key is never sent on, in
/// `Authorization` or `api-key`).
pub fn to_upstream(h: &mut HeaderMap, auth: AuthMode, upstream_auth: Option<&HeaderValue>) {
    strip_hop_by_hop(h);
    h.remove(header::HOST);
    h.remove("x-user");
    h.remove(crate::tags::HEADER);
    match upstream_auth {
        Some(v) => {
            h.insert(header::AUTHORIZATION, v.clone());
        }
        None if auth == AuthMode::Keys => {
            h.remove(header::AUTHORIZATION);
            h.remove(AZURE_KEY);
        }
        None => {}
    }
}

/// Turns upstream's answer headers into the client's. `rewritten`: the body
/// changes length on the way (the spliced usage chunk is removed).
pub fn to_client(h: &mut HeaderMap, rewritten: bool) {
    strip_hop_by_hop(h);
    h.remove(header::SET_COOKIE);
    if rewritten {
        h.remove(header::CONTENT_LENGTH);
    }
}
