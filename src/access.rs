//! Who may do what: the admin key, per-user API keys and the client
//! authentication mode.
//!
//! User keys are `tg-` plus 32 random bytes in base62, shown once; only their
//! SHA-256 is stored. Checking a key is an in-memory lookup by the digest's
//! first 8 bytes followed by a constant-time comparison of the whole digest.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use http::HeaderMap;
use parking_lot::RwLock;
use ring::rand::{SecureRandom, SystemRandom};

use crate::error::ApiError;

pub mod session;

/// How clients name the user they act for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Trust the `x-user` header (as the seed API, openai-api-proxy, does).
    Header,
    /// The client sends its tollgate key as `Authorization: Bearer tg-...`.
    Keys,
}

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// SHA-256 of a key.
pub fn digest(key: &str) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Equality whose time does not depend on where the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Base62 of a big-endian number (no leading-zero padding).
fn base62(bytes: &[u8]) -> String {
    let mut n: Vec<u8> = bytes.to_vec();
    let mut out = Vec::new();
    while n.iter().any(|&b| b != 0) {
        let mut rem = 0u32;
        for b in n.iter_mut() {
            let cur = (rem << 8) | u32::from(*b);
            *b = (cur / 62) as u8;
            rem = cur % 62;
        }
        out.push(BASE62[rem as usize]);
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

fn random(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    SystemRandom::new()
        .fill(&mut b)
        .expect("the system random generator works");
    b
}

/// A new user key: `tg-` + 32 random bytes in base62.
pub fn new_key() -> String {
    format!("tg-{}", base62(&random(32)))
}

/// A new key id (not secret).
pub fn new_key_id() -> String {
    format!("key_{}", base62(&random(12)))
}

/// One active key, as held in memory.
#[derive(Debug)]
pub struct KeyEntry {
    /// Key id.
    pub id: String,
    /// The user it acts for.
    pub user: String,
    /// SHA-256 of the key.
    pub digest: Digest,
    /// Last use, ms since the epoch (0: never).
    pub last_used: AtomicI64,
    /// Tags every request with this key carries unless it sets the same key.
    pub tags: crate::tags::Tags,
    /// The project its requests are charged to (bound when it was made).
    pub project: Option<String>,
}

/// The active user keys.
#[derive(Default)]
pub struct Keys {
    by_prefix: RwLock<HashMap<u64, Vec<Arc<KeyEntry>>>>,
}

fn prefix(d: &Digest) -> u64 {
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

impl Keys {
    /// Adds an active key.
    pub fn insert(&self, e: KeyEntry) {
        let mut m = self.by_prefix.write();
        let v = m.entry(prefix(&e.digest)).or_default();
        // The state poll may have loaded it already (another instance's view).
        v.retain(|k| k.id != e.id);
        v.push(Arc::new(e));
    }

    /// Forgets a key at once (revocation).
    pub fn remove(&self, id: &str) {
        let mut m = self.by_prefix.write();
        for v in m.values_mut() {
            v.retain(|e| e.id != id);
        }
        m.retain(|_, v| !v.is_empty());
    }

    /// Makes `active` the whole set (as read from the database after another
    /// instance created or revoked a key): keys not in it are refused from
    /// now on; kept keys keep their in-memory last use.
    pub fn replace(&self, active: Vec<KeyEntry>) {
        let mut m = self.by_prefix.write();
        let mut old: HashMap<String, Arc<KeyEntry>> = m
            .drain()
            .flat_map(|(_, v)| v)
            .map(|e| (e.id.clone(), e))
            .collect();
        for e in active {
            let e = match old.remove(&e.id) {
                Some(kept) if kept.digest == e.digest => {
                    kept.last_used
                        .fetch_max(e.last_used.load(Ordering::Relaxed), Ordering::Relaxed);
                    kept
                }
                _ => Arc::new(e),
            };
            m.entry(prefix(&e.digest)).or_default().push(e);
        }
    }

    /// The entry of a presented key, if active.
    pub fn find(&self, key: &str) -> Option<Arc<KeyEntry>> {
        let d = digest(key);
        let m = self.by_prefix.read();
        m.get(&prefix(&d))?
            .iter()
            .find(|e| constant_time_eq(&e.digest, &d))
            .cloned()
    }

    /// Whether the key with this id is active.
    pub fn is_active(&self, id: &str) -> bool {
        self.by_prefix.read().values().flatten().any(|e| e.id == id)
    }

    /// The last-use time of a key kept in memory, if any.
    pub fn last_used(&self, id: &str) -> Option<i64> {
        let m = self.by_prefix.read();
        m.values()
            .flatten()
            .find(|e| e.id == id)
            .map(|e| e.last_used.load(Ordering::Relaxed))
            .filter(|&t| t > 0)
    }
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Checks access to an admin endpoint: with an admin key configured, the
/// request must carry it; without one, only loopback clients get in.
pub fn admin(
    admin_digest: Option<&Digest>,
    headers: &HeaderMap,
    remote: SocketAddr,
) -> Result<(), ApiError> {
    match admin_digest {
        Some(want) => match bearer(headers) {
            Some(t) if constant_time_eq(&digest(t), want) => Ok(()),
            _ => Err(ApiError::unauthorized(
                "This endpoint needs the admin key: Authorization: Bearer <TOLLGATE_ADMIN_TOKEN>.",
            )
            .with_code("invalid_api_key")),
        },
        None if remote.ip().to_canonical().is_loopback() => Ok(()),
        None => Err(ApiError::forbidden(
            "Admin endpoints answer only to loopback clients while no admin key is set (TOLLGATE_ADMIN_TOKEN).",
        )),
    }
}

/// The user a key-authenticated request acts for.
pub fn user_from_key(
    keys: &Keys,
    headers: &HeaderMap,
    now_ms: i64,
) -> Result<Arc<KeyEntry>, ApiError> {
    let invalid = || {
        ApiError::unauthorized(
            "Incorrect API key provided. Use a tollgate key: Authorization: Bearer tg-...",
        )
        .with_code("invalid_api_key")
    };
    // Azure-shaped clients (the `AzureOpenAI` SDKs) send theirs as `api-key`.
    let token = bearer(headers)
        .or_else(|| {
            headers
                .get("api-key")
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|t| !t.is_empty())
        })
        .ok_or_else(invalid)?;
    let e = keys.find(token).ok_or_else(invalid)?;
    e.last_used.store(now_ms, Ordering::Relaxed);
    Ok(e)
}

#[cfg(test)]
mod tests;
