//! Dashboard sessions: who logged in (the admin, or a key holder), kept in
//! memory under a random id that only the browser's HttpOnly cookie holds.
//!
//! Only the id's SHA-256 is the table's key, so the table never holds a
//! usable cookie. Sessions end at their expiry, at logout, when the key they
//! were opened with is revoked (checked by the caller on every use), and at
//! restart.

use std::collections::HashMap;

use parking_lot::Mutex;

use super::{digest, random, Digest};

/// How long a session lasts after login.
pub const SESSION_TTL_MS: i64 = 12 * 3600 * 1000;

/// Most sessions held at once: logins past it push out the one closest to
/// its expiry, so that logging in over and over cannot grow memory.
const MAX_SESSIONS: usize = 10_000;

/// The cookie that carries the session id.
pub const COOKIE: &str = "tollgate_session";

/// Who a session acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The admin key's holder: reads every report.
    Admin,
    /// A user key's holder: reads only their own usage and limits.
    User {
        /// The user.
        user: String,
        /// The key logged in with; the session ends when it is revoked.
        key_id: String,
    },
}

/// One session.
#[derive(Debug, Clone)]
pub struct Session {
    /// Who it acts for.
    pub role: Role,
    /// The token every POST of this session must carry in `x-tollgate-csrf`.
    pub csrf: String,
    /// Expiry, ms since the epoch.
    pub expires_ms: i64,
}

/// The open sessions.
#[derive(Default)]
pub struct Sessions {
    open: Mutex<HashMap<Digest, Session>>,
}

/// 32 random bytes as hex.
fn token() -> String {
    random(32).iter().map(|b| format!("{b:02x}")).collect()
}

impl Sessions {
    /// Opens a session; returns its id (for the cookie) and the session.
    pub fn open(&self, role: Role, now_ms: i64) -> (String, Session) {
        let id = token();
        let s = Session {
            role,
            csrf: token(),
            expires_ms: now_ms + SESSION_TTL_MS,
        };
        let mut open = self.open.lock();
        if open.len() >= MAX_SESSIONS {
            open.retain(|_, s| s.expires_ms > now_ms);
        }
        if open.len() >= MAX_SESSIONS {
            if let Some(k) = open
                .iter()
                .min_by_key(|(_, s)| s.expires_ms)
                .map(|(k, _)| *k)
            {
                open.remove(&k);
            }
        }
        open.insert(digest(&id), s.clone());
        (id, s)
    }

    /// The live session with this id.
    pub fn get(&self, id: &str, now_ms: i64) -> Option<Session> {
        let key = digest(id);
        let mut open = self.open.lock();
        match open.get(&key) {
            Some(s) if s.expires_ms > now_ms => Some(s.clone()),
            Some(_) => {
                open.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Ends a session.
    pub fn close(&self, id: &str) {
        self.open.lock().remove(&digest(id));
    }

    /// Number of sessions held (expired ones included until next seen).
    pub fn len(&self) -> usize {
        self.open.lock().len()
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The session id in a request's `Cookie` headers, if any.
pub fn cookie_id(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_close_and_stay_bounded() {
        let s = Sessions::default();
        let (id, first) = s.open(Role::Admin, 1_000);
        assert_eq!(id.len(), 64);
        assert_ne!(id, first.csrf);
        assert_eq!(s.get(&id, 1_000).unwrap().role, Role::Admin);
        assert!(s.get(&id, 1_000 + SESSION_TTL_MS).is_none());
        assert!(s.is_empty(), "an expired session is dropped when seen");
        let (id, _) = s.open(Role::Admin, 0);
        s.close(&id);
        assert!(s.get(&id, 1).is_none());
        for n in 0..MAX_SESSIONS + 5 {
            s.open(Role::Admin, n as i64);
        }
        assert_eq!(s.len(), MAX_SESSIONS);
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = http::HeaderMap::new();
        h.append(
            http::header::COOKIE,
            "a=1; tollgate_session=abc ; b=2".parse().unwrap(),
        );
        assert_eq!(cookie_id(&h), Some("abc"));
        let mut h = http::HeaderMap::new();
        h.append(http::header::COOKIE, "a=1".parse().unwrap());
        h.append(
            http::header::COOKIE,
            "tollgate_session=def".parse().unwrap(),
        );
        assert_eq!(cookie_id(&h), Some("def"));
        h = http::HeaderMap::new();
        h.append(
            http::header::COOKIE,
            "xtollgate_session=1; tollgate_session=".parse().unwrap(),
        );
        assert_eq!(cookie_id(&h), None);
    }
}
