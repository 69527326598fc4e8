//! Projects: named groups of users, each with its own limits. A key is
//! bound to one project when it is made; requests carry the project and
//! must fit its limits as well as their user's.
//!
//! This module owns the names (what a project may be called), the
//! in-memory membership every request reads and each project's alert
//! webhook; the stored rows are the
//! store's (`Accounts`), the limits the project budgets' (`budget`).

use std::collections::{BTreeMap, HashMap};

use parking_lot::RwLock;

/// The tag key a project's daily rollup rows are stored under in the tag
/// rollups: `@` is no tag key's character, so none can collide.
pub const ROLLUP_KEY: &str = "@project";

/// Longest project name, in bytes (a tag value's limit, see [`crate::tags`]).
pub const MAX_NAME: usize = 64;

/// Longest member (user) name, in bytes.
pub const MAX_MEMBER: usize = 256;

/// Most members of one project.
pub const MAX_MEMBERS: usize = 10_000;

/// Checks a project name: 1 to [`MAX_NAME`] bytes of `A-Z a-z 0-9 _ . -`
/// (safe in paths, CSV, logs and the tag rollups).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!("a project name has 1 to {MAX_NAME} characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err("a project name may only hold A-Z, a-z, 0-9 and _ . -".into());
    }
    Ok(())
}

/// Checks a member name as the proxy accepts a user (`x-user`): visible
/// ASCII, no leading or trailing space, at most [`MAX_MEMBER`] bytes.
pub fn check_member(user: &str) -> Result<(), String> {
    if user.is_empty() || user.len() > MAX_MEMBER {
        return Err(format!("a member name has 1 to {MAX_MEMBER} characters"));
    }
    if !user.bytes().all(|b| (0x20..0x7f).contains(&b)) || user.trim() != user {
        return Err(
            "a member name must be visible ASCII text without leading or trailing spaces".into(),
        );
    }
    Ok(())
}

/// Checks a project's alert webhook as `--alert-webhook` is checked: an
/// `http://` or `https://` URL with a host.
pub fn check_webhook(url: &str) -> Result<http::Uri, String> {
    url.parse()
        .ok()
        .filter(|u: &http::Uri| {
            matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
        })
        .ok_or_else(|| "the alert webhook must be an http:// or https:// URL".to_owned())
}

/// One project, as held in memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Project {
    /// Member user names, sorted, each once.
    pub members: Vec<String>,
    /// Where its budget alerts go instead of `--alert-webhook`.
    pub webhook: Option<http::Uri>,
}

#[derive(Default)]
struct Inner {
    by_name: BTreeMap<String, Project>,
    /// User to the projects they are in (each request reads it).
    of_user: HashMap<String, Vec<String>>,
}

impl Inner {
    fn reindex(&mut self) {
        let mut of_user: HashMap<String, Vec<String>> = HashMap::new();
        for (name, p) in &self.by_name {
            for m in &p.members {
                of_user.entry(m.clone()).or_default().push(name.clone());
            }
        }
        self.of_user = of_user;
    }
}

/// Every project, in memory (read by each request).
#[derive(Default)]
pub struct Projects {
    inner: RwLock<Inner>,
}

impl Projects {
    /// Sets (or with `None` removes) a project.
    pub fn set(&self, name: &str, project: Option<Project>) {
        let mut m = self.inner.write();
        match project {
            Some(p) => m.by_name.insert(name.to_owned(), p),
            None => m.by_name.remove(name),
        };
        m.reindex();
    }

    /// Makes the set of projects exactly `all` (as read from the database).
    pub fn replace(&self, all: BTreeMap<String, Project>) {
        let mut m = self.inner.write();
        m.by_name = all;
        m.reindex();
    }

    /// A project, if it exists.
    pub fn get(&self, name: &str) -> Option<Project> {
        self.inner.read().by_name.get(name).cloned()
    }

    /// A project's members, if it exists.
    pub fn members(&self, name: &str) -> Option<Vec<String>> {
        self.inner
            .read()
            .by_name
            .get(name)
            .map(|p| p.members.clone())
    }

    /// A project's alert webhook, if it has one.
    pub fn webhook(&self, name: &str) -> Option<http::Uri> {
        self.inner.read().by_name.get(name)?.webhook.clone()
    }

    /// Every project name, sorted.
    pub fn names(&self) -> Vec<String> {
        self.inner.read().by_name.keys().cloned().collect()
    }

    /// Whether `user` is a member of `project`.
    pub fn has_member(&self, project: &str, user: &str) -> bool {
        self.inner
            .read()
            .of_user
            .get(user)
            .is_some_and(|ps| ps.iter().any(|p| p == project))
    }

    /// The project of a user who is in exactly one; `None` for a user in
    /// none or several.
    pub fn only_project_of(&self, user: &str) -> Option<String> {
        match self.inner.read().of_user.get(user).map(Vec::as_slice) {
            Some([one]) => Some(one.clone()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_members() {
        assert!(check_name("search-team_2.0").is_ok());
        for bad in ["", "a b", "a/b", "é", &"x".repeat(65), "@project"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_member("alice").is_ok());
        assert!(check_webhook("https://hooks.example/x").is_ok());
        for bad in ["ftp://x/y", "not a url", "/relative"] {
            assert!(check_webhook(bad).is_err(), "{bad:?}");
        }
        for bad in ["", " alice", "a\u{7f}", &"u".repeat(257)] {
            assert!(check_member(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_project_needs_exactly_one() {
        let p = Projects::default();
        let of = |m: &[&str]| Project {
            members: m.iter().map(|s| s.to_string()).collect(),
            webhook: None,
        };
        p.set("a", Some(of(&["ann", "bob"])));
        p.set("b", Some(of(&["bob"])));
        assert_eq!(p.only_project_of("ann").as_deref(), Some("a"));
        assert_eq!(p.only_project_of("bob"), None);
        assert_eq!(p.only_project_of("cy"), None);
        assert!(p.has_member("b", "bob") && !p.has_member("b", "ann"));
        p.set("a", None);
        assert_eq!(p.only_project_of("bob").as_deref(), Some("b"));
    }
}
