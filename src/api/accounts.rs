//! User keys: `POST`/`GET /users/{user}/keys` and `DELETE /keys/{id}`, and
//! [`accounts`], the one way this module reaches stored keys and limits.

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use serde::Serialize;

use super::{blocking, created, internal, ok, read_body, Time};
use crate::app::App;
use crate::error::ApiError;
use crate::http::Body;
use crate::store::{Accounts, KeyInfo, StoreError};

/// Runs `f` on the stored keys and limits, on the blocking pool (SQLite may
/// wait for a lock; the worker thread must not).
pub(super) async fn accounts<T: Send + 'static>(
    app: &App,
    f: impl FnOnce(&dyn Accounts) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let accounts = app.store.accounts();
    blocking(move || f(&*accounts)).await?.map_err(internal)
}

/// A key as listed (never the key itself).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Key<'a> {
    id: &'a str,
    user: &'a str,
    created_at: Time,
    last_used_at: Option<Time>,
    revoked_at: Option<Time>,
    /// Only for a key with default tags: the answer stays as it was for others.
    #[serde(skip_serializing_if = "super::TagsJson::is_empty")]
    tags: super::TagsJson<'a>,
    /// Only for a key bound to a project.
    #[serde(skip_serializing_if = "Option::is_none")]
    project: Option<&'a str>,
}

/// A new key: the only answer that ever holds the key itself.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct NewKey<'a> {
    id: &'a str,
    user: &'a str,
    key: &'a str,
    created_at: Time,
    #[serde(skip_serializing_if = "super::TagsJson::is_empty")]
    tags: super::TagsJson<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    project: Option<&'a str>,
}

/// A revoked key.
#[derive(Serialize)]
struct Revoked<'a> {
    id: &'a str,
    user: &'a str,
    revoked: bool,
}

/// The body of `POST /users/{user}/keys`: nothing, or
/// `{"tags": "k=v,word", "project": "name"}` (both optional).
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NewKeyBody {
    #[serde(default)]
    tags: Option<String>,
    #[serde(default)]
    project: Option<String>,
}

/// `POST /users/{user}/keys`, with the key's default tags in the body.
pub(super) async fn create_key(
    app: &Arc<App>,
    user: String,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = read_body(req).await?;
    let asked: NewKeyBody = if body.iter().all(u8::is_ascii_whitespace) {
        NewKeyBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "body must be empty or a JSON object like {{\"tags\": \"team=search\", \"project\": \"search\"}}: {e}"
            ))
        })?
    };
    let tags = crate::tags::Tags::parse(asked.tags.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::bad_param("tags", e.0))?;
    // The project named, which the user must be in; else the user's only one.
    let project = match asked.project {
        Some(p) => {
            crate::projects::check_name(&p).map_err(|e| ApiError::bad_param("project", e))?;
            if !app.projects.has_member(&p, &user) {
                return Err(ApiError::bad_param(
                    "project",
                    format!("user {user} is not a member of project {p}"),
                ));
            }
            Some(p)
        }
        None => app.projects.only_project_of(&user),
    };
    let key = crate::access::new_key();
    let digest = crate::access::digest(&key);
    let info = KeyInfo {
        id: crate::access::new_key_id(),
        user,
        created_ms: crate::timestamp::now_ms(),
        last_used_ms: None,
        revoked_ms: None,
        tags: tags.canonical(),
        project,
    };
    let info = accounts(app, move |a| a.create_key(&info, &digest).map(|()| info)).await?;
    app.keys.insert(crate::access::KeyEntry {
        id: info.id.clone(),
        user: info.user.clone(),
        digest,
        last_used: std::sync::atomic::AtomicI64::new(0),
        tags,
        project: info.project.clone(),
    });
    created(&NewKey {
        id: &info.id,
        user: &info.user,
        key: &key,
        created_at: Time(info.created_ms),
        tags: super::TagsJson(&info.tags),
        project: info.project.as_deref(),
    })
}

/// `GET /users/{user}/keys`, oldest first, with the latest use seen in memory.
pub(super) async fn list_keys(app: &Arc<App>, user: String) -> Result<Response<Body>, ApiError> {
    let keys = accounts(app, move |a| a.list_keys(&user)).await?;
    let listed: Vec<Key> = keys
        .iter()
        .map(|k| Key {
            id: &k.id,
            user: &k.user,
            created_at: Time(k.created_ms),
            last_used_at: k.last_used_ms.max(app.keys.last_used(&k.id)).map(Time),
            revoked_at: k.revoked_ms.map(Time),
            tags: super::TagsJson(&k.tags),
            project: k.project.as_deref(),
        })
        .collect();
    ok(&listed)
}

/// `DELETE /keys/{id}`.
pub(super) async fn revoke_key(app: &Arc<App>, id: String) -> Result<Response<Body>, ApiError> {
    // Out of memory first: the key stops working before the answer.
    app.keys.remove(&id);
    let now = crate::timestamp::now_ms();
    let owner = {
        let id = id.clone();
        accounts(app, move |a| a.revoke_key(&id, now)).await?
    };
    match owner {
        Some(user) => ok(&Revoked {
            id: &id,
            user: &user,
            revoked: true,
        }),
        None => Err(ApiError::not_found(format!("no active key {id}")).with_code("not_found")),
    }
}
