//! Projects: named groups of users, each with its own limits. A key is
//! bound to one project when it is made; requests carry the project and
//! must fit its limits as well as their user's.
//!
//! This module owns the names (what a project may be called) and the
//! in-memory membership every request reads; the stored rows are the
//! store's (`Accounts`), the limits the project budgets' (`budget`).

use std::collections::BTreeMap;

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

/// Every project's members, in memory (read by each request).
#[derive(Default)]
pub struct Projects {
    members: RwLock<BTreeMap<String, Vec<String>>>,
}

impl Projects {
    /// Sets (or with `None` removes) a project's members.
    pub fn set(&self, name: &str, members: Option<Vec<String>>) {
        let mut m = self.members.write();
        match members {
            Some(v) => m.insert(name.to_owned(), v),
            None => m.remove(name),
        };
    }

    /// Makes the set of projects exactly `all` (as read from the database).
    pub fn replace(&self, all: BTreeMap<String, Vec<String>>) {
        *self.members.write() = all;
    }

    /// A project's members, if it exists.
    pub fn members(&self, name: &str) -> Option<Vec<String>> {
        self.members.read().get(name).cloned()
    }

    /// Every project name, sorted.
    pub fn names(&self) -> Vec<String> {
        self.members.read().keys().cloned().collect()
    }

    /// Whether `user` is a member of `project`.
    pub fn has_member(&self, project: &str, user: &str) -> bool {
        self.members
            .read()
            .get(project)
            .is_some_and(|m| m.iter().any(|u| u == user))
    }

    /// The project of a user who is in exactly one; `None` for a user in
    /// none or several.
    pub fn only_project_of(&self, user: &str) -> Option<String> {
        let m = self.members.read();
        let mut found = m
            .iter()
            .filter(|(_, members)| members.iter().any(|u| u == user))
            .map(|(name, _)| name);
        match (found.next(), found.next()) {
            (Some(name), None) => Some(name.clone()),
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
        for bad in ["", " alice", "a\u{7f}", &"u".repeat(257)] {
            assert!(check_member(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_project_needs_exactly_one() {
        let p = Projects::default();
        p.set("a", Some(vec!["ann".into(), "bob".into()]));
        p.set("b", Some(vec!["bob".into()]));
        assert_eq!(p.only_project_of("ann").as_deref(), Some("a"));
        assert_eq!(p.only_project_of("bob"), None);
        assert_eq!(p.only_project_of("cy"), None);
        assert!(p.has_member("b", "bob") && !p.has_member("b", "ann"));
        p.set("a", None);
        assert_eq!(p.only_project_of("bob").as_deref(), Some("b"));
    }
}
