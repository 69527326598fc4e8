//! Settings: command-line flags, then environment variables, then an optional
//! TOML file (`--config FILE`), then defaults, parsed into one validated
//! [`Config`]. A bad value is a [`ConfigError`] naming the setting.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::Uri;

/// Validated settings of a tollgate process.
#[derive(Clone)]
pub struct Config {
    /// Address the proxy listens on.
    pub listen: SocketAddr,
    /// Upstream base URL; the incoming path and query are appended to it.
    pub upstream: UpstreamUrl,
    /// Where records go: a SQLite file or a PostgreSQL server.
    pub db: Db,
    /// Roots trusted for an HTTPS `upstream` beyond the built-in ones.
    pub upstream_trust: Trust,
    /// Named upstreams (`[[upstream]]` tables); empty: the one `upstream`
    /// with `upstream_token` and `upstream_trust`.
    pub upstreams: Vec<NamedUpstream>,
    /// Per model, the upstreams tried in turn (`[[fallback]]` tables).
    pub fallbacks: Vec<Fallback>,
    /// How many times a request answered 429 or 5xx, or whose connection
    /// failed, before anything reached the client, is sent again (on
    /// another key when there is one).
    pub upstream_retries: u32,
    /// Key injected as `Authorization: Bearer` upstream; `None` passes the
    /// client's own `Authorization` through.
    pub upstream_token: Option<String>,
    /// Longest wait for a TCP/TLS connection to upstream.
    pub upstream_connect_timeout: Duration,
    /// Longest silence from upstream: before the answer head, and between
    /// streamed bytes.
    pub upstream_idle_timeout: Duration,
    /// How long an idle upstream connection is kept for reuse.
    pub upstream_keepalive: Duration,
    /// First wait between two polls of an open Batch API job (doubling up
    /// to [`crate::batches::MAX_POLL`]).
    pub batch_poll: Duration,
    /// Largest request body read for metering (JSON APIs); larger gets 413.
    pub max_body: u64,
    /// How long in-flight requests may run on after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Longest time a client may take to send its request head.
    pub header_timeout: Duration,
    /// Longest silence while a request body is read (408) or streamed up.
    pub body_timeout: Duration,
    /// Most bytes of JSON request bodies buffered at once, all requests
    /// together; past it new bodies wait briefly, then get a 503.
    pub max_buffered: u64,
    /// What happens to a non-streamed answer whose client leaves early.
    pub client_abort: ClientAbort,
    /// Load the built-in price list into a new database.
    pub default_prices: bool,
    /// Delete per-query records older than this many days (rollups stay).
    pub retain_days: Option<u32>,
    /// Where budget alerts are POSTed (Slack-compatible JSON); none: no alerts.
    pub alert_webhook: Option<http::Uri>,
    /// Percentages of a budget whose crossing is announced, ascending.
    pub alert_thresholds: Vec<u8>,
    /// Log line format.
    pub log_format: LogFormat,
    /// Endpoint families forwarded although tollgate cannot meter them
    /// (`None`: the auth mode's default, all in header mode, none in keys mode).
    pub allow_unmetered: Option<Vec<String>>,
    /// Distinct users with metrics series of their own; the rest count as `other`.
    pub metrics_max_users: usize,
    /// Admin key: when set, admin endpoints require it; when not, they answer
    /// only to loopback clients.
    pub admin_token: Option<String>,
    /// OpenAI organization admin key, read only by `reconcile` (the Costs API).
    pub openai_admin_key: Option<String>,
    /// How clients name their user.
    pub auth: crate::access::AuthMode,
    /// Completion tokens reserved against a budget when a request sets no
    /// `max_tokens`.
    pub reserve_answer_tokens: u64,
    /// Pico-dollars reserved against a budget by a request whose cost
    /// cannot be bounded from its body (see the README's budget section);
    /// 0 reserves nothing.
    pub reserve_floor: i64,
    /// Leased budgets (PostgreSQL) with the database away and a request
    /// that its instance's lease does not cover.
    pub budget_offline: BudgetOffline,
}

/// Shows every setting but the two keys, which print as `<redacted>`.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |k: &Option<String>| k.as_ref().map(|_| "<redacted>");
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("upstream", &self.upstream)
            .field("db", &self.db)
            .field("upstream_trust", &self.upstream_trust)
            .field("upstreams", &self.upstreams)
            .field("fallbacks", &self.fallbacks)
            .field("upstream_retries", &self.upstream_retries)
            .field("upstream_token", &redacted(&self.upstream_token))
            .field("upstream_connect_timeout", &self.upstream_connect_timeout)
            .field("upstream_idle_timeout", &self.upstream_idle_timeout)
            .field("upstream_keepalive", &self.upstream_keepalive)
            .field("batch_poll", &self.batch_poll)
            .field("max_body", &self.max_body)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("header_timeout", &self.header_timeout)
            .field("body_timeout", &self.body_timeout)
            .field("max_buffered", &self.max_buffered)
            .field("client_abort", &self.client_abort)
            .field("default_prices", &self.default_prices)
            .field("retain_days", &self.retain_days)
            .field("log_format", &self.log_format)
            .field("allow_unmetered", &self.allow_unmetered)
            .field("metrics_max_users", &self.metrics_max_users)
            .field("admin_token", &redacted(&self.admin_token))
            .field("openai_admin_key", &redacted(&self.openai_admin_key))
            .field(
                "alert_webhook",
                &self
                    .alert_webhook
                    .as_ref()
                    .map(|u| u.host().unwrap_or("").to_owned()),
            )
            .field("alert_thresholds", &self.alert_thresholds)
            .field("auth", &self.auth)
            .field("reserve_answer_tokens", &self.reserve_answer_tokens)
            .field("reserve_floor", &self.reserve_floor)
            .field("budget_offline", &self.budget_offline)
            .finish()
    }
}

/// Where records are stored.
#[derive(Clone, PartialEq, Eq)]
pub enum Db {
    /// A SQLite database file (the default).
    Sqlite(PathBuf),
    /// A PostgreSQL server, shared by any number of tollgate instances.
    Postgres(PgUrl),
}

impl Db {
    /// A `postgres://` or `postgresql://` URL, else a SQLite file path.
    pub fn parse(v: &str) -> Result<Db, String> {
        if PgUrl::is_pg(v) {
            return PgUrl::parse(v).map(Db::Postgres);
        }
        Ok(Db::Sqlite(PathBuf::from(v)))
    }

    /// The database as logs may show it (no password).
    pub fn display(&self) -> String {
        match self {
            Db::Sqlite(p) => p.display().to_string(),
            Db::Postgres(u) => u.redacted(),
        }
    }
}

/// Never shows a password.
impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Db::Sqlite(p) => f.debug_tuple("Sqlite").field(p).finish(),
            Db::Postgres(u) => f.debug_tuple("Postgres").field(u).finish(),
        }
    }
}

/// A PostgreSQL connection URL. It may carry a password, so it prints (in
/// `Debug`, [`PgUrl::redacted`] and errors) with the password replaced.
#[derive(Clone, PartialEq, Eq)]
pub struct PgUrl(String);

impl PgUrl {
    /// Whether `v` names a PostgreSQL server rather than a file.
    pub fn is_pg(v: &str) -> bool {
        let lower = v.get(..13).unwrap_or(v).to_ascii_lowercase();
        lower.starts_with("postgres://") || lower.starts_with("postgresql://")
    }

    /// Checks the URL's syntax (the server is reached at start).
    pub fn parse(v: &str) -> Result<PgUrl, String> {
        let url = PgUrl(v.to_owned());
        url.config().map_err(|e| {
            // The driver's message may quote the URL; ours names it redacted.
            format!(
                "`{}` is not a PostgreSQL URL like postgres://user@host:5432/tollgate ({})",
                url.redacted(),
                redact_text(&e.to_string(), v)
            )
        })?;
        Ok(url)
    }

    /// The URL as written, password included: only for connecting.
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// The driver's settings: the URL's, with the password from `PGPASSWORD`
    /// when the URL has none, and TLS settings taken out (`sslrootcert`,
    /// which the driver does not know, comes back as the second value).
    pub fn config(&self) -> Result<tokio_postgres::Config, tokio_postgres::Error> {
        self.config_and_ca().map(|(c, _)| c)
    }

    /// [`PgUrl::config`] and the `sslrootcert` file, if the URL names one.
    pub fn config_and_ca(
        &self,
    ) -> Result<(tokio_postgres::Config, Option<PathBuf>), tokio_postgres::Error> {
        let (url, ca) = take_query_param(&self.0, "sslrootcert");
        let mut c: tokio_postgres::Config = url.parse()?;
        if c.get_password().is_none() {
            if let Ok(p) = std::env::var("PGPASSWORD") {
                c.password(p);
            }
        }
        if c.get_user().is_none() {
            if let Ok(u) = std::env::var("PGUSER") {
                c.user(u);
            }
        }
        if c.get_connect_timeout().is_none() {
            c.connect_timeout(Duration::from_secs(5));
        }
        c.application_name("tollgate");
        Ok((c, ca.map(PathBuf::from)))
    }

    /// The URL with any password replaced by `<redacted>`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl std::fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl std::fmt::Display for PgUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// `url` without the query parameter `key`, and that parameter's value.
fn take_query_param(url: &str, key: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), None);
    };
    let mut found = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| match kv.split_once('=') {
            Some((k, v)) if k == key => {
                found = Some(v.to_owned());
                false
            }
            _ => true,
        })
        .collect();
    if kept.is_empty() {
        (base.to_owned(), found)
    } else {
        (format!("{base}?{}", kept.join("&")), found)
    }
}

/// A PostgreSQL URL with the password of its user part and of a
/// `password=` parameter replaced by `<redacted>`.
fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let rest = scheme_end + 3;
        let auth_end = out[rest..].find(['/', '?']).map_or(out.len(), |i| rest + i);
        if let Some(at) = out[rest..auth_end].rfind('@') {
            let userinfo = &out[rest..rest + at];
            if let Some(colon) = userinfo.find(':') {
                out.replace_range(rest + colon + 1..rest + at, "<redacted>");
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (base, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=<redacted>"),
                _ => kv.to_owned(),
            })
            .collect();
        out = format!("{base}{}", query.join("&"));
    }
    out
}

/// `text` with any password `url` carries removed.
fn redact_text(text: &str, url: &str) -> String {
    let mut out = text.replace(url, &redact_url(url));
    if let Ok(c) = url.parse::<tokio_postgres::Config>() {
        if let Some(p) = c.get_password() {
            if let Ok(p) = std::str::from_utf8(p) {
                if !p.is_empty() {
                    out = out.replace(p, "<redacted>");
                }
            }
        }
    }
    out
}

/// What happens to a non-streamed answer whose client left before its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAbort {
    /// Read upstream's answer to its end in the background (upstream
    /// generates and bills it anyway) and record its real usage.
    #[default]
    Finish,
    /// Close the upstream connection and record what was seen (an estimate).
    Cancel,
}

/// What a leased budget does when the database is away and a request does
/// not fit its instance's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BudgetOffline {
    /// Refuse with 503 until the database is back (never overruns).
    #[default]
    Refuse,
    /// Admit against the whole budget as this instance last knew its spend
    /// (each instance may then spend the whole remaining budget).
    Admit,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable text.
    Text,
    /// One JSON object per line.
    Json,
}

/// One `[[upstream]]` table.
#[derive(Clone)]
pub struct NamedUpstream {
    /// Its name in records, `/usage` and logs.
    pub name: String,
    /// Base URL.
    pub url: UpstreamUrl,
    /// Its keys, used in turn; none: the client's `Authorization` passes
    /// through in header mode (a self-hosted server without keys).
    pub keys: Vec<String>,
    /// Models it serves, as names or glob patterns (`*`, `?`); empty: all.
    pub models: Vec<String>,
    /// Roots trusted beyond the built-in ones.
    pub trust: Trust,
    /// Set for an Azure OpenAI resource (`kind = "azure"`).
    pub azure: Option<Azure>,
}

impl NamedUpstream {
    /// Whether it serves `model`: one of its `models` patterns matches
    /// (none: every model), or for Azure, it has a deployment of it.
    pub fn serves(&self, model: &str) -> bool {
        match &self.azure {
            Some(a) => a.deployment(model).is_some(),
            None => self.models.is_empty() || self.models.iter().any(|p| glob(p, model)),
        }
    }
}

/// What an Azure OpenAI upstream needs beyond a URL: its API version and
/// which deployment serves which model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Azure {
    /// `api-version` sent with every request.
    pub api_version: String,
    /// The deployments, by the model name clients ask for.
    pub deployments: Vec<Deployment>,
}

impl Azure {
    /// The deployment serving `model`, if any.
    pub fn deployment(&self, model: &str) -> Option<&Deployment> {
        self.deployments.iter().find(|d| d.model == model)
    }
}

/// One Azure deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    /// The model name clients ask for.
    pub model: String,
    /// The deployment's name in Azure (a path segment).
    pub deployment: String,
    /// The model records are priced by (Azure answers with names of its
    /// own); `None`: `model`.
    pub base_model: Option<String>,
}

impl Deployment {
    /// The model its records are priced by.
    pub fn priced_as(&self) -> &str {
        self.base_model.as_deref().unwrap_or(&self.model)
    }
}

/// One `[[fallback]]` table: a model's upstreams, tried in this order
/// while an attempt fails before any answer reached the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    /// A model name or glob pattern.
    pub model: String,
    /// Upstream names, in the order they are tried.
    pub upstreams: Vec<String>,
}

/// Shows the keys as a count.
impl std::fmt::Debug for NamedUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamedUpstream")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("keys", &self.keys.len())
            .field("models", &self.models)
            .field("trust", &self.trust)
            .field("azure", &self.azure)
            .finish()
    }
}

/// `*` (any run of characters) and `?` (one character) glob matching.
pub fn glob(pattern: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (pattern.chars().collect(), s.chars().collect());
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// The `[[upstream]]` tables of a TOML file; keys come from the variables
/// `env` reads and from files, never from the TOML text itself.
fn named_upstreams(
    tables: &[toml::Value],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<NamedUpstream>, ConfigError> {
    const KNOWN: [&str; 10] = [
        "name",
        "url",
        "models",
        "key_env",
        "key_files",
        "ca_file",
        "system_roots",
        "kind",
        "api_version",
        "deployments",
    ];
    let mut out: Vec<NamedUpstream> = Vec::new();
    for (n, t) in tables.iter().enumerate() {
        let at = format!("upstream[{n}]");
        let t = t
            .as_table()
            .ok_or_else(|| err(&at, "must be a table ([[upstream]])"))?;
        if let Some(k) = t.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(err(
                &at,
                format!("unknown key `{k}` (known: {})", KNOWN.join(", ")),
            ));
        }
        let text = |k: &str| -> Result<Option<&str>, ConfigError> {
            match t.get(k) {
                None => Ok(None),
                Some(toml::Value::String(s)) if !s.is_empty() => Ok(Some(s)),
                Some(_) => Err(err(&format!("{at}.{k}"), "must be a non-empty string")),
            }
        };
        let list = |k: &str| -> Result<Vec<String>, ConfigError> {
            match t.get(k) {
                None => Ok(Vec::new()),
                Some(toml::Value::Array(a)) => a
                    .iter()
                    .map(|v| match v {
                        toml::Value::String(s) if !s.is_empty() => Ok(s.clone()),
                        _ => Err(err(
                            &format!("{at}.{k}"),
                            "must be a list of non-empty strings",
                        )),
                    })
                    .collect(),
                Some(_) => Err(err(&format!("{at}.{k}"), "must be a list of strings")),
            }
        };
        let name = text("name")?
            .ok_or_else(|| err(&at, "needs a name"))?
            .to_owned();
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            || name.len() > 64
        {
            return Err(err(
                &format!("{at}.name"),
                "must be up to 64 letters, digits, `-`, `_` or `.`",
            ));
        }
        let at = format!("upstream {name}");
        if out.iter().any(|u| u.name == name) {
            return Err(err(&at, "the name is used twice"));
        }
        let url = text("url")?.ok_or_else(|| err(&at, "needs a url"))?;
        let url = UpstreamUrl::parse(url).map_err(|m| err(&format!("{at}.url"), m))?;
        let mut keys = Vec::new();
        for var in list("key_env")? {
            let k = env(&var).filter(|k| !k.trim().is_empty()).ok_or_else(|| {
                err(
                    &format!("{at}.key_env"),
                    format!("environment variable {var} is not set"),
                )
            })?;
            keys.push(k.trim().to_owned());
        }
        for path in list("key_files")? {
            let text = std::fs::read_to_string(&path).map_err(|e| {
                err(
                    &format!("{at}.key_files"),
                    format!("cannot read {path}: {e}"),
                )
            })?;
            let before = keys.len();
            // One key a line; blank lines and `#` comments are skipped.
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned),
            );
            if keys.len() == before {
                return Err(err(
                    &format!("{at}.key_files"),
                    format!("{path} holds no key"),
                ));
            }
        }
        if keys
            .iter()
            .any(|k| !k.bytes().all(|b| b.is_ascii_graphic()))
        {
            // Never shows the key.
            return Err(err(
                &at,
                "a key holds a character that is not visible ASCII",
            ));
        }
        let system_roots = match t.get("system_roots") {
            None => false,
            Some(toml::Value::Boolean(b)) => *b,
            Some(_) => return Err(err(&format!("{at}.system_roots"), "must be true or false")),
        };
        let models = list("models")?;
        let azure = match text("kind")? {
            None | Some("openai") => {
                if let Some(k) = ["api_version", "deployments"]
                    .into_iter()
                    .find(|k| t.contains_key(*k))
                {
                    return Err(err(&format!("{at}.{k}"), "only for kind = \"azure\""));
                }
                None
            }
            Some("azure") => {
                if !models.is_empty() {
                    return Err(err(
                        &format!("{at}.models"),
                        "an azure upstream serves the models of its deployments; give no models",
                    ));
                }
                Some(azure_of(&at, t)?)
            }
            Some(other) => {
                return Err(err(
                    &format!("{at}.kind"),
                    format!("`{other}` is not openai or azure"),
                ))
            }
        };
        out.push(NamedUpstream {
            name,
            url,
            keys,
            models,
            trust: Trust {
                ca_file: text("ca_file")?.map(PathBuf::from),
                system_roots,
            },
            azure,
        });
    }
    Ok(out)
}

/// Whether `s` may stand in a URL path or query unescaped: a deployment
/// name or an API version.
fn is_url_safe(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The `api_version` and `deployments` of an azure `[[upstream]]` table.
fn azure_of(at: &str, t: &toml::Table) -> Result<Azure, ConfigError> {
    let api_version = match t.get("api_version") {
        None => DEFAULT_AZURE_API_VERSION.to_owned(),
        Some(toml::Value::String(s)) if is_url_safe(s) => s.clone(),
        Some(_) => {
            return Err(err(
                &format!("{at}.api_version"),
                "must be a version like 2024-10-21",
            ))
        }
    };
    let at = format!("{at}.deployments");
    let table = match t.get("deployments") {
        Some(toml::Value::Table(d)) if !d.is_empty() => d,
        _ => {
            return Err(err(
                &at,
                "an azure upstream needs deployments = { \"model\" = \"deployment\", ... }",
            ))
        }
    };
    let bad_name = |m: &str| {
        err(
            &format!("{at}.{m}"),
            "a deployment name is up to 64 letters, digits, `-`, `_` or `.`",
        )
    };
    let mut deployments = Vec::new();
    for (model, v) in table {
        let (deployment, base_model) = match v {
            toml::Value::String(d) => (d.clone(), None),
            toml::Value::Table(d) => {
                if let Some(k) = d
                    .keys()
                    .find(|k| !matches!(k.as_str(), "deployment" | "base_model"))
                {
                    return Err(err(
                        &format!("{at}.{model}"),
                        format!("unknown key `{k}` (known: deployment, base_model)"),
                    ));
                }
                let base = match d.get("base_model") {
                    None => None,
                    Some(toml::Value::String(b)) if !b.is_empty() => Some(b.clone()),
                    Some(_) => {
                        return Err(err(
                            &format!("{at}.{model}.base_model"),
                            "must be a non-empty string",
                        ))
                    }
                };
                match d.get("deployment") {
                    Some(toml::Value::String(s)) => (s.clone(), base),
                    _ => return Err(bad_name(model)),
                }
            }
            _ => return Err(bad_name(model)),
        };
        if model.is_empty() || !is_url_safe(&deployment) {
            return Err(bad_name(model));
        }
        deployments.push(Deployment {
            model: model.clone(),
            deployment,
            base_model,
        });
    }
    Ok(Azure {
        api_version,
        deployments,
    })
}

/// `api-version` of azure upstreams that name none: the latest GA version
/// of Azure OpenAI's data-plane API when this was written.
pub const DEFAULT_AZURE_API_VERSION: &str = "2024-10-21";

/// The `[[fallback]]` tables of a TOML file, checked against the upstreams.
fn fallbacks_of(
    tables: &[toml::Value],
    upstreams: &[NamedUpstream],
) -> Result<Vec<Fallback>, ConfigError> {
    let mut out = Vec::new();
    for (n, t) in tables.iter().enumerate() {
        let at = format!("fallback[{n}]");
        let t = t
            .as_table()
            .ok_or_else(|| err(&at, "must be a table ([[fallback]])"))?;
        if let Some(k) = t
            .keys()
            .find(|k| !matches!(k.as_str(), "model" | "upstreams"))
        {
            return Err(err(
                &at,
                format!("unknown key `{k}` (known: model, upstreams)"),
            ));
        }
        let model = match t.get("model") {
            Some(toml::Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(err(&format!("{at}.model"), "needs a model name or pattern")),
        };
        let names: Vec<String> = match t.get("upstreams") {
            Some(toml::Value::Array(a)) if !a.is_empty() => a
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| err(&format!("{at}.upstreams"), "must be upstream names"))?,
            _ => {
                return Err(err(
                    &format!("{at}.upstreams"),
                    "needs a list of upstream names",
                ))
            }
        };
        for (i, name) in names.iter().enumerate() {
            let Some(u) = upstreams.iter().find(|u| &u.name == name) else {
                return Err(err(
                    &format!("{at}.upstreams"),
                    format!("no [[upstream]] is named `{name}`"),
                ));
            };
            if names[..i].contains(name) {
                return Err(err(
                    &format!("{at}.upstreams"),
                    format!("`{name}` is named twice"),
                ));
            }
            // A plain name can be checked now; a pattern only per request.
            if !model.contains(['*', '?']) && !u.serves(&model) {
                return Err(err(
                    &format!("{at}.upstreams"),
                    format!(
                        "upstream `{name}` does not serve `{model}` (its models or deployments)"
                    ),
                ));
            }
        }
        out.push(Fallback {
            model,
            upstreams: names,
        });
    }
    Ok(out)
}

/// Which certificates an HTTPS upstream may present, beyond the built-in
/// (Mozilla's, from webpki-roots) roots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    /// A PEM file of further trusted roots (a private CA).
    pub ca_file: Option<PathBuf>,
    /// Also trust the operating system's store.
    pub system_roots: bool,
}

/// An upstream base URL, split for fast per-request URI building.
#[derive(Debug, Clone)]
pub struct UpstreamUrl {
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    /// Host and port.
    pub authority: http::uri::Authority,
    /// Path prefix without a trailing slash (often empty).
    pub base_path: String,
}

impl UpstreamUrl {
    /// Parses `http(s)://host[:port][/prefix]`.
    pub fn parse(s: &str) -> Result<UpstreamUrl, String> {
        let uri: Uri = s.parse().map_err(|e| format!("not a URL ({e})"))?;
        let scheme = uri.scheme().cloned().ok_or("missing http:// or https://")?;
        if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
            return Err("scheme must be http or https".into());
        }
        let authority = uri.authority().cloned().ok_or("missing host")?;
        // A password here would reach logs, error bodies and upstream's
        // `Host` header; keys have their own setting.
        if authority.as_str().contains('@') {
            return Err("must not carry a user name or password (user:password@host); give the upstream key in TOLLGATE_UPSTREAM_TOKEN".into());
        }
        if uri.query().is_some() {
            return Err("must not have a query string".into());
        }
        Ok(UpstreamUrl {
            scheme,
            authority,
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The upstream request target (origin form) for an incoming path and
    /// query.
    pub fn uri_for(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        let pq = if self.base_path.is_empty() {
            path_and_query.to_owned()
        } else {
            format!("{}{}", self.base_path, path_and_query)
        };
        Uri::builder().path_and_query(pq).build()
    }
}

impl std::fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

impl Config {
    /// The upstreams requests go to, in order: the `[[upstream]]` tables,
    /// or `upstream` named `default` with `upstream_token` as its one key.
    pub fn named_upstreams(&self) -> Vec<NamedUpstream> {
        if !self.upstreams.is_empty() {
            return self.upstreams.clone();
        }
        vec![NamedUpstream {
            name: "default".to_owned(),
            url: self.upstream.clone(),
            keys: self.upstream_token.iter().cloned().collect(),
            models: Vec::new(),
            trust: self.upstream_trust.clone(),
            azure: None,
        }]
    }

    /// Whether requests to an endpoint family tollgate cannot meter are
    /// forwarded.
    pub fn allows_unmetered(&self, family: &str) -> bool {
        match &self.allow_unmetered {
            None => self.auth == crate::access::AuthMode::Header,
            Some(list) => list.iter().any(|f| f == "all" || f == family),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".parse().expect("valid default"),
            upstream: UpstreamUrl::parse("https://api.openai.com").expect("valid default"),
            db: Db::Sqlite(PathBuf::from("openai-queries.db")),
            upstream_trust: Trust::default(),
            upstreams: Vec::new(),
            fallbacks: Vec::new(),
            upstream_retries: 2,
            upstream_token: None,
            upstream_connect_timeout: Duration::from_secs(10),
            upstream_idle_timeout: Duration::from_secs(600),
            upstream_keepalive: Duration::from_secs(90),
            batch_poll: Duration::from_secs(30),
            max_body: 32 << 20,
            shutdown_grace: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            max_buffered: 256 << 20,
            client_abort: ClientAbort::Finish,
            default_prices: true,
            retain_days: None,
            alert_webhook: None,
            alert_thresholds: vec![50, 80, 100],
            log_format: LogFormat::Text,
            allow_unmetered: None,
            metrics_max_users: crate::metrics::DEFAULT_MAX_USERS,
            admin_token: None,
            openai_admin_key: None,
            auth: crate::access::AuthMode::Header,
            reserve_answer_tokens: 4096,
            reserve_floor: DEFAULT_RESERVE_FLOOR,
            budget_offline: BudgetOffline::Refuse,
        }
    }
}

/// $0.01, in pico-dollars.
const DEFAULT_RESERVE_FLOOR: i64 = 10_000_000_000;

/// A setting that could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The setting, as its flag (`--listen`).
    pub setting: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid {}: {}", self.setting, self.message)
    }
}

impl std::error::Error for ConfigError {}

fn err(setting: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        setting: setting.to_owned(),
        message: message.into(),
    }
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    /// Run the proxy.
    Run(Config),
    /// Validate the configuration and exit.
    CheckConfig(Config),
    /// Import or export the price list.
    Prices {
        /// The settings (the store).
        config: Config,
        /// What to do.
        action: PricesCommand,
    },
    /// Compare OpenAI's Costs API with the records for a period.
    Reconcile {
        /// The settings (store, upstream, the Costs API key).
        config: Config,
        /// First day, `YYYY-MM-DD`.
        from: String,
        /// Last day, included.
        to: String,
        /// Dollars above which a difference is flagged.
        threshold: Option<String>,
    },
    /// Copy a SQLite database into PostgreSQL (`tollgate migrate`).
    Migrate(Migrate),
    /// Print usage.
    Help,
    /// Print the version.
    Version,
}

/// `tollgate prices ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PricesCommand {
    /// Read a list (the bundled TSV format or LiteLLM's JSON map) and add
    /// the prices that differ, valid from `valid_from` (default: now).
    Import {
        /// The list.
        file: String,
        /// Show what would change, change nothing.
        dry_run: bool,
        /// A timestamp with an offset.
        valid_from: Option<String>,
    },
    /// Print the prices in effect in the TSV format.
    Export,
}

/// What `tollgate migrate` copies from where.
#[derive(Debug, Clone)]
pub struct Migrate {
    /// The SQLite database file, opened read-only.
    pub from: PathBuf,
    /// The PostgreSQL database.
    pub to: PgUrl,
}

/// The flags of `tollgate migrate`, in `--help` as the settings are.
const MIGRATE_FLAGS: &[Setting] = &[
    Setting {
        flag: "--from",
        value: "FILE",
        env: "",
        key: "",
        default: "required",
        help: "the SQLite database to copy (opened read-only; a proxy may keep running on it)",
    },
    Setting {
        flag: "--to",
        value: "URL",
        env: "",
        key: "",
        default: "required",
        help: "postgres://user@host:5432/name (password from the URL or PGPASSWORD)",
    },
];

/// Parses the arguments after `migrate`.
fn parse_migrate(args: impl Iterator<Item = String>) -> Result<Command, ConfigError> {
    let (mut from, mut to) = (None, None);
    let mut args = args;
    while let Some(a) = args.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (a.clone(), None),
        };
        match name.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--from" | "--to" => {
                let value = match inline {
                    Some(v) => v,
                    None => args.next().ok_or_else(|| err(&name, "needs a value"))?,
                };
                if value.is_empty() {
                    return Err(err(&name, "must not be empty"));
                }
                if name == "--from" {
                    from = Some(value);
                } else {
                    to = Some(value);
                }
            }
            _ => {
                return Err(err(
                    &name,
                    "unknown option of migrate (it takes --from FILE --to URL)",
                ))
            }
        }
    }
    let from = from.ok_or_else(|| err("--from", "migrate needs the SQLite file to copy"))?;
    let to = to.ok_or_else(|| err("--to", "migrate needs the postgres:// URL to copy into"))?;
    if PgUrl::is_pg(&from) {
        return Err(err("--from", "must be a SQLite file, not a PostgreSQL URL"));
    }
    if !PgUrl::is_pg(&to) {
        return Err(err(
            "--to",
            "must be a postgres:// URL like postgres://user@host:5432/tollgate",
        ));
    }
    let to = PgUrl::parse(&to).map_err(|m| err("--to", m))?;
    Ok(Command::Migrate(Migrate {
        from: PathBuf::from(from),
        to,
    }))
}

/// One setting: where it can be given and what `--help` says of it.
struct Setting {
    flag: &'static str,
    /// Placeholder for the value in `--help` (empty for a switch).
    value: &'static str,
    env: &'static str,
    /// TOML key, or the TOML form for switches.
    key: &'static str,
    default: &'static str,
    help: &'static str,
}

/// Every setting, in the order `--help` lists them. The parser accepts
/// exactly these flags and TOML keys, and the help text is generated from
/// them, so the two cannot drift.
const SETTINGS: &[Setting] = &[
    Setting {
        flag: "--listen",
        value: "ADDR",
        env: "TOLLGATE_LISTEN",
        key: "listen",
        default: "127.0.0.1:8080",
        help: "address to listen on",
    },
    Setting {
        flag: "--upstream",
        value: "URL",
        env: "TOLLGATE_UPSTREAM",
        key: "upstream",
        default: "https://api.openai.com",
        help: "upstream base URL; the request's path and query are appended",
    },
    Setting {
        flag: "--db",
        value: "FILE|URL",
        env: "TOLLGATE_DB",
        key: "db",
        default: "openai-queries.db",
        help: "SQLite database file, or postgres://user@host:5432/name (password from the URL or PGPASSWORD)",
    },
    Setting {
        flag: "--upstream-connect-timeout",
        value: "DUR",
        env: "TOLLGATE_UPSTREAM_CONNECT_TIMEOUT",
        key: "upstream_connect_timeout",
        default: "10s",
        help: "TCP/TLS connect limit",
    },
    Setting {
        flag: "--upstream-idle-timeout",
        value: "DUR",
        env: "TOLLGATE_UPSTREAM_IDLE_TIMEOUT",
        key: "upstream_idle_timeout",
        default: "600s",
        help: "longest upstream silence: before the answer head and between streamed bytes",
    },
    Setting {
        flag: "--upstream-keepalive",
        value: "DUR",
        env: "TOLLGATE_UPSTREAM_KEEPALIVE",
        key: "upstream_keepalive",
        default: "90s",
        help: "how long an idle upstream connection is kept for reuse",
    },
    Setting {
        flag: "--batch-poll",
        value: "DUR",
        env: "TOLLGATE_BATCH_POLL",
        key: "batch_poll",
        default: "30s",
        help: "first wait between polls of an open Batch API job (doubling up to 10m)",
    },
    Setting {
        flag: "--upstream-ca-file",
        value: "FILE",
        env: "TOLLGATE_UPSTREAM_CA_FILE",
        key: "upstream_ca_file",
        default: "none",
        help: "PEM file of further roots trusted for an HTTPS upstream (a private CA), beside the built-in ones",
    },
    Setting {
        flag: "--upstream-system-roots",
        value: "true|false",
        env: "TOLLGATE_UPSTREAM_SYSTEM_ROOTS",
        key: "upstream_system_roots",
        default: "false",
        help: "also trust the operating system's certificate store for an HTTPS upstream",
    },
    Setting {
        flag: "--upstream-retries",
        value: "N",
        env: "TOLLGATE_UPSTREAM_RETRIES",
        key: "upstream_retries",
        default: "2",
        help: "times a request is sent again (on another key when there is one) after a 429, a 5xx or a failed connection, only while nothing reached the client",
    },
    Setting {
        flag: "--max-body",
        value: "SIZE",
        env: "TOLLGATE_MAX_BODY",
        key: "max_body",
        default: "32MiB",
        help: "largest JSON request body (streamed uploads are not limited)",
    },
    Setting {
        flag: "--shutdown-grace",
        value: "DUR",
        env: "TOLLGATE_SHUTDOWN_GRACE",
        key: "shutdown_grace",
        default: "30s",
        help: "how long in-flight requests may finish after SIGTERM",
    },
    Setting {
        flag: "--header-timeout",
        value: "DUR",
        env: "TOLLGATE_HEADER_TIMEOUT",
        key: "header_timeout",
        default: "10s",
        help: "longest time a client may take to send its request head",
    },
    Setting {
        flag: "--body-timeout",
        value: "DUR",
        env: "TOLLGATE_BODY_TIMEOUT",
        key: "body_timeout",
        default: "60s",
        help: "longest silence while a request body is read (408) or uploaded",
    },
    Setting {
        flag: "--max-buffered",
        value: "SIZE",
        env: "TOLLGATE_MAX_BUFFERED",
        key: "max_buffered",
        default: "256MiB",
        help: "most JSON request body bytes held at once, all requests together (past it: 503 after a short wait); at least --max-body",
    },
    Setting {
        flag: "--client-abort",
        value: "finish|cancel",
        env: "TOLLGATE_CLIENT_ABORT",
        key: "client_abort",
        default: "finish",
        help: "when a client leaves a non-streamed request early: finish reads the answer in the background and records its real usage; cancel closes upstream",
    },
    Setting {
        flag: "--retain-days",
        value: "N",
        env: "TOLLGATE_RETAIN_DAYS",
        key: "retain_days",
        default: "keep all",
        help: "delete per-query records older than N days (rollups stay)",
    },
    Setting {
        flag: "--alert-webhook",
        value: "URL",
        env: "TOLLGATE_ALERT_WEBHOOK",
        key: "alert_webhook",
        default: "none",
        help: "POST budget alerts (thresholds crossed, requests refused) here as Slack-compatible JSON",
    },
    Setting {
        flag: "--alert-thresholds",
        value: "PCTS",
        env: "TOLLGATE_ALERT_THRESHOLDS",
        key: "alert_thresholds",
        default: "50,80,100",
        help: "percentages of a budget announced once per period when crossed",
    },
    Setting {
        flag: "--metrics-max-users",
        value: "N",
        env: "TOLLGATE_METRICS_MAX_USERS",
        key: "metrics_max_users",
        default: "1000",
        help: "distinct users with metrics series of their own; the rest count as user=\"other\"",
    },
    Setting {
        flag: "--allow-unmetered",
        value: "LIST|all|none",
        env: "TOLLGATE_ALLOW_UNMETERED",
        key: "allow_unmetered",
        default: "all with --auth header, none with keys",
        help: "endpoint families forwarded although tollgate cannot meter them (batches, fine_tuning, realtime, threads, ...)",
    },
    Setting {
        flag: "--log-format",
        value: "text|json",
        env: "TOLLGATE_LOG_FORMAT",
        key: "log_format",
        default: "text",
        help: "log line format",
    },
    Setting {
        flag: "--auth",
        value: "header|keys",
        env: "TOLLGATE_AUTH",
        key: "auth",
        default: "header",
        help: "trust the x-user header, or require tollgate keys",
    },
    Setting {
        flag: "--reserve-answer-tokens",
        value: "N",
        env: "TOLLGATE_RESERVE_ANSWER_TOKENS",
        key: "reserve_answer_tokens",
        default: "4096",
        help: "answer tokens reserved against a budget when a request sets no max_tokens",
    },
    Setting {
        flag: "--reserve-floor",
        value: "DOLLARS",
        env: "TOLLGATE_RESERVE_FLOOR",
        key: "reserve_floor",
        default: "0.01",
        help: "dollars reserved against a budget by a request whose cost its body does not bound (audio, image edits, other paid endpoints); 0: none",
    },
    Setting {
        flag: "--budget-offline",
        value: "refuse|admit",
        env: "TOLLGATE_BUDGET_OFFLINE",
        key: "budget_offline",
        default: "refuse",
        help: "PostgreSQL away and a request past this instance's budget lease: refuse answers 503; admit checks the whole budget as this instance last knew it (instances may overrun it)",
    },
    Setting {
        flag: "--no-default-prices",
        value: "",
        env: "TOLLGATE_NO_DEFAULT_PRICES=1",
        key: "default_prices = false",
        default: "prices loaded",
        help: "skip loading the built-in price list into a new database",
    },
    Setting {
        flag: "--config",
        value: "FILE",
        env: "TOLLGATE_CONFIG",
        key: "",
        default: "none",
        help: "TOML file with the keys above",
    },
];

/// Secrets: never a flag (flags show in `ps`), only the environment or TOML.
const SECRETS: [(&str, &str); 3] = [
    (
        "TOLLGATE_UPSTREAM_TOKEN (or FORWARD_TOKEN)",
        "upstream_token",
    ),
    ("TOLLGATE_ADMIN_TOKEN", "admin_token"),
    (
        "TOLLGATE_OPENAI_ADMIN_KEY (or OPENAI_ADMIN_KEY), for reconcile",
        "openai_admin_key",
    ),
];

/// The `--help` text, generated from `SETTINGS`.
pub fn help() -> String {
    use std::fmt::Write;
    let mut out = String::from(
        "tollgate: a metering proxy for the OpenAI API (tokens and cost per user)\n\n\
         Usage: tollgate [check-config] [OPTIONS]\n\
         \x20      tollgate migrate --from FILE --to URL\n\
         \x20      tollgate prices import FILE [--dry-run] [--valid-from TIME] [OPTIONS]\n\
         \x20          (a list in the bundled TSV format or LiteLLM's JSON price map; the\n\
         \x20          prices that differ are added, valid from TIME, default now)\n\
         \x20      tollgate prices export [OPTIONS]   (the prices in effect, as TSV)\n\
         \x20      tollgate reconcile --from DAY --to DAY [--threshold DOLLARS] [OPTIONS]\n\
         \x20          (OpenAI's Costs API per day and model beside tollgate's costs; days as\n\
         \x20          YYYY-MM-DD, UTC, both included; differences above the threshold,\n\
         \x20          default 0.01, are flagged and make the exit status 1)\n\n\
         Options (flag / environment variable / TOML key [default]; flags win, then env, then file):\n",
    );
    for s in SETTINGS {
        let flag = format!("{} {}", s.flag, s.value);
        let _ = writeln!(
            out,
            "  {:<32} {:<34} {} [{}]",
            flag.trim_end(),
            s.env,
            s.key,
            s.default
        );
        let _ = writeln!(out, "      {}", s.help);
    }
    let _ = writeln!(out, "  {:<32} this text", "-h, --help");
    let _ = writeln!(out, "  {:<32} the version", "-V, --version");
    out.push_str(
        "\nmigrate: copies a SQLite database (records, rollups, rejections, prices, keys, limits)\n\
         into PostgreSQL; safe to run again (copies only what came since):\n",
    );
    for s in MIGRATE_FLAGS {
        let flag = format!("{} {}", s.flag, s.value);
        let _ = writeln!(out, "  {:<32} [{}]", flag, s.default);
        let _ = writeln!(out, "      {}", s.help);
    }
    out.push_str("\nKeys are never taken from a flag:\n");
    for (env, key) in SECRETS {
        let _ = writeln!(out, "  {env} / TOML {key}");
    }
    out.push_str(
        "Without an upstream key, the client's own Authorization header is passed through.\n\
         Without an admin key, admin endpoints answer only to loopback clients.\n\
         Durations: 500ms, 2s, 10m, 1h30m. Sizes: bytes, or with KiB/MiB/GiB (KB/MB/GB are powers of 1000).\n",
    );
    out
}

/// The settings that take a value, found by flag.
fn valued(flag: &str) -> Option<&'static Setting> {
    SETTINGS
        .iter()
        .find(|s| s.flag == flag && !s.value.is_empty() && !s.key.is_empty())
}

/// Parses the command line (without the program name) and environment.
pub fn parse(
    args: impl IntoIterator<Item = String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Command, ConfigError> {
    let mut flags: Vec<(String, String)> = Vec::new();
    let mut config_file = env("TOLLGATE_CONFIG");
    let mut no_default_prices = false;
    let mut check = false;
    let mut args = args.into_iter().peekable();
    if args.peek().is_some_and(|a| a == "migrate") {
        args.next();
        return parse_migrate(args);
    }
    let mut reconcile: Option<[Option<String>; 3]> = None;
    let mut prices: Option<PricesCommand> = None;
    if args.peek().is_some_and(|a| a == "reconcile") {
        args.next();
        reconcile = Some([None, None, None]);
    } else if args.peek().is_some_and(|a| a == "prices") {
        args.next();
        prices = Some(match args.next().as_deref() {
            Some("export") => PricesCommand::Export,
            Some("import") => PricesCommand::Import {
                file: args
                    .next()
                    .filter(|f| !f.starts_with("--"))
                    .ok_or_else(|| {
                        err("prices import", "needs a FILE (TSV or LiteLLM's JSON map)")
                    })?,
                dry_run: false,
                valid_from: None,
            },
            _ => {
                return Err(err(
                    "prices",
                    "expected `prices import FILE` or `prices export`",
                ))
            }
        });
    }
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "check-config" if flags.is_empty() && !check && reconcile.is_none() => check = true,
            "--dry-run" if matches!(prices, Some(PricesCommand::Import { .. })) => {
                if let Some(PricesCommand::Import { dry_run, .. }) = &mut prices {
                    *dry_run = true;
                }
            }
            "--valid-from" if matches!(prices, Some(PricesCommand::Import { .. })) => {
                let v = args.next().ok_or_else(|| err(&a, "needs a value"))?;
                if let Some(PricesCommand::Import { valid_from, .. }) = &mut prices {
                    *valid_from = Some(v);
                }
            }
            "--from" | "--to" | "--threshold" if reconcile.is_some() => {
                let i = ["--from", "--to", "--threshold"]
                    .iter()
                    .position(|f| *f == a)
                    .unwrap_or(0);
                let v = args.next().ok_or_else(|| err(&a, "needs a value"))?;
                if let Some(r) = &mut reconcile {
                    r[i] = Some(v);
                }
            }
            "--no-default-prices" => no_default_prices = true,
            "--upstream-token" | "--forward-token" | "--admin-token" => {
                return Err(err(
                    &a,
                    "keys are never taken from a flag (flags show in ps): set TOLLGATE_UPSTREAM_TOKEN or TOLLGATE_ADMIN_TOKEN",
                ))
            }
            _ => {
                let (name, inline) = match a.split_once('=') {
                    Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
                    _ => (a.clone(), None),
                };
                if name != "--config" && valued(&name).is_none() {
                    return Err(err(&name, "unknown option (see --help)"));
                }
                let value = match inline {
                    Some(v) => v,
                    None => args.next().ok_or_else(|| err(&name, "needs a value"))?,
                };
                if name == "--config" {
                    config_file = Some(value);
                } else {
                    flags.push((name, value));
                }
            }
        }
    }
    let file: toml::Table = match &config_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| err("--config", format!("cannot read {path}: {e}")))?;
            text.parse()
                .map_err(|e| err("--config", format!("{path} is not valid TOML: {e}")))?
        }
        None => toml::Table::new(),
    };
    let known: Vec<&str> = SETTINGS
        .iter()
        .filter(|s| !s.value.is_empty())
        .map(|s| s.key)
        .chain(SECRETS.iter().map(|s| s.1))
        .chain(["default_prices", "fallback"])
        .collect();
    if let Some(k) = file.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(err("--config", format!("unknown key `{k}`")));
    }
    // The raw value of a setting, by precedence.
    let raw = |flag: &str| -> Result<Option<String>, ConfigError> {
        let setting = valued(flag).expect("a known setting");
        if let Some((_, v)) = flags.iter().rev().find(|(n, _)| n == flag) {
            return Ok(Some(v.clone()));
        }
        if let Some(v) = env(setting.env).filter(|v| !v.is_empty()) {
            return Ok(Some(v));
        }
        match file.get(setting.key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(toml::Value::Integer(i)) => Ok(Some(i.to_string())),
            Some(toml::Value::Float(f)) => Ok(Some(f.to_string())),
            Some(toml::Value::Boolean(b)) => Ok(Some(b.to_string())),
            Some(other) => Err(err(flag, format!("unexpected TOML value {other}"))),
        }
    };
    let mut c = Config::default();
    if let Some(v) = raw("--listen")? {
        c.listen = v.parse().map_err(|_| {
            err(
                "--listen",
                format!("`{v}` is not an address like 127.0.0.1:8080"),
            )
        })?;
    }
    if let Some(toml::Value::Array(tables)) = file.get("upstream") {
        let shorthand = flags.iter().any(|(n, _)| n == "--upstream")
            || env("TOLLGATE_UPSTREAM").is_some_and(|v| !v.is_empty());
        if shorthand {
            return Err(err(
                "--upstream",
                "give either --upstream (TOLLGATE_UPSTREAM) or [[upstream]] tables in the config file, not both",
            ));
        }
        c.upstreams = named_upstreams(tables, env)?;
        if let Some(f) = file.get("fallback") {
            let toml::Value::Array(f) = f else {
                return Err(err("fallback", "must be [[fallback]] tables"));
            };
            c.fallbacks = fallbacks_of(f, &c.upstreams)?;
        }
    } else if file.contains_key("fallback") {
        return Err(err(
            "fallback",
            "[[fallback]] names [[upstream]] tables; there are none",
        ));
    } else if let Some(v) = raw("--upstream")? {
        c.upstream = UpstreamUrl::parse(&v).map_err(|m| {
            // Never echo credentials back.
            let shown = if v.contains('@') { "the URL" } else { &v };
            err("--upstream", format!("`{shown}`: {m}"))
        })?;
    }
    if let Some(v) = raw("--upstream-ca-file")? {
        if v.is_empty() {
            return Err(err("--upstream-ca-file", "must not be empty"));
        }
        c.upstream_trust.ca_file = Some(PathBuf::from(v));
    }
    if let Some(v) = raw("--upstream-system-roots")? {
        c.upstream_trust.system_roots = parse_bool(&v).ok_or_else(|| {
            err(
                "--upstream-system-roots",
                format!("`{v}` is not true or false"),
            )
        })?;
    }
    if let Some(v) = raw("--db")? {
        if v.is_empty() {
            return Err(err("--db", "must not be empty"));
        }
        c.db = Db::parse(&v).map_err(|m| err("--db", m))?;
    }
    let dur = |flag: &str, slot: &mut Duration| -> Result<(), ConfigError> {
        if let Some(v) = raw(flag)? {
            *slot = parse_duration(&v).ok_or_else(|| {
                err(
                    flag,
                    format!("`{v}` is not a duration like 500ms, 2s or 10m"),
                )
            })?;
            if slot.is_zero() {
                return Err(err(flag, "must be above zero"));
            }
        }
        Ok(())
    };
    dur(
        "--upstream-connect-timeout",
        &mut c.upstream_connect_timeout,
    )?;
    dur("--upstream-idle-timeout", &mut c.upstream_idle_timeout)?;
    dur("--upstream-keepalive", &mut c.upstream_keepalive)?;
    dur("--batch-poll", &mut c.batch_poll)?;
    dur("--shutdown-grace", &mut c.shutdown_grace)?;
    dur("--header-timeout", &mut c.header_timeout)?;
    dur("--body-timeout", &mut c.body_timeout)?;
    if let Some(v) = raw("--client-abort")? {
        c.client_abort = match v.as_str() {
            "finish" => ClientAbort::Finish,
            "cancel" => ClientAbort::Cancel,
            _ => {
                return Err(err(
                    "--client-abort",
                    format!("`{v}` is not finish or cancel"),
                ))
            }
        };
    }
    if let Some(v) = raw("--budget-offline")? {
        c.budget_offline = match v.as_str() {
            "refuse" => BudgetOffline::Refuse,
            "admit" => BudgetOffline::Admit,
            _ => {
                return Err(err(
                    "--budget-offline",
                    format!("`{v}` is not refuse or admit"),
                ))
            }
        };
    }
    if let Some(v) = raw("--auth")? {
        c.auth = match v.as_str() {
            "header" => crate::access::AuthMode::Header,
            "keys" => crate::access::AuthMode::Keys,
            _ => return Err(err("--auth", format!("`{v}` is not header or keys"))),
        };
    }
    if let Some(v) = raw("--reserve-answer-tokens")? {
        c.reserve_answer_tokens = v.parse().map_err(|_| {
            err(
                "--reserve-answer-tokens",
                format!("`{v}` is not a whole number"),
            )
        })?;
    }
    if let Some(v) = raw("--reserve-floor")? {
        c.reserve_floor = crate::pricing::parse_scaled(&v, 12).map_err(|_| {
            err(
                "--reserve-floor",
                format!("`{v}` is not a dollar amount like 0.01 (0 or more, at most 12 decimals)"),
            )
        })?;
    }
    c.admin_token = env("TOLLGATE_ADMIN_TOKEN").filter(|t| !t.is_empty());
    if c.admin_token.is_none() {
        match file.get("admin_token") {
            Some(toml::Value::String(s)) if !s.is_empty() => c.admin_token = Some(s.clone()),
            None => {}
            Some(_) => return Err(err("admin_token", "must be a non-empty string")),
        }
    }
    c.openai_admin_key = env("TOLLGATE_OPENAI_ADMIN_KEY")
        .or_else(|| env("OPENAI_ADMIN_KEY"))
        .filter(|k| !k.is_empty());
    if c.openai_admin_key.is_none() {
        match file.get("openai_admin_key") {
            Some(toml::Value::String(s)) if !s.is_empty() => c.openai_admin_key = Some(s.clone()),
            None => {}
            Some(_) => return Err(err("openai_admin_key", "must be a non-empty string")),
        }
    }
    if let Some(v) = raw("--upstream-retries")? {
        c.upstream_retries = v.parse().ok().filter(|&n| n <= 10).ok_or_else(|| {
            err(
                "--upstream-retries",
                format!("`{v}` is not a whole number from 0 to 10"),
            )
        })?;
    }
    if let Some(v) = raw("--retain-days")? {
        c.retain_days = Some(v.parse::<u32>().ok().filter(|&d| d > 0).ok_or_else(|| {
            err(
                "--retain-days",
                format!("`{v}` is not a whole number of days above 0"),
            )
        })?);
    }
    if let Some(v) = raw("--alert-webhook")? {
        let uri: http::Uri = v
            .parse()
            .ok()
            .filter(|u: &http::Uri| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
            })
            .ok_or_else(|| err("--alert-webhook", "must be an http:// or https:// URL"))?;
        c.alert_webhook = Some(uri);
    }
    if let Some(v) = raw("--alert-thresholds")? {
        let mut t = v
            .split(',')
            .map(|p| {
                p.trim()
                    .trim_end_matches('%')
                    .parse::<u8>()
                    .ok()
                    .filter(|p| (1..=100).contains(p))
            })
            .collect::<Option<Vec<u8>>>()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                err(
                    "--alert-thresholds",
                    format!("`{v}` is not a comma-separated list of percentages from 1 to 100"),
                )
            })?;
        t.sort_unstable();
        t.dedup();
        c.alert_thresholds = t;
    }
    if let Some(v) = raw("--metrics-max-users")? {
        c.metrics_max_users = v.parse().map_err(|_| {
            err(
                "--metrics-max-users",
                format!("`{v}` is not a whole number"),
            )
        })?;
    }
    if let Some(v) = raw("--allow-unmetered")? {
        c.allow_unmetered = Some(match v.trim() {
            "all" => vec!["all".to_owned()],
            "none" | "" => Vec::new(),
            list => list
                .split(',')
                .map(|f| {
                    let f = f.trim();
                    if f.is_empty() || !f.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                        Err(err(
                            "--allow-unmetered",
                            format!("`{f}` is not an endpoint family like batches or fine_tuning"),
                        ))
                    } else {
                        Ok(f.to_owned())
                    }
                })
                .collect::<Result<_, _>>()?,
        });
    }
    if let Some(v) = raw("--log-format")? {
        c.log_format = match v.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => return Err(err("--log-format", format!("`{v}` is not text or json"))),
        };
    }
    if let Some(v) = raw("--max-body")? {
        c.max_body = parse_size(&v)
            .filter(|&n| n > 0)
            .ok_or_else(|| err("--max-body", format!("`{v}` is not a size like 32MiB")))?;
    }
    if let Some(v) = raw("--max-buffered")? {
        c.max_buffered = parse_size(&v)
            .filter(|&n| n > 0)
            .ok_or_else(|| err("--max-buffered", format!("`{v}` is not a size like 256MiB")))?;
    }
    // A body as large as --max-body must fit, or it would wait forever.
    if c.max_buffered < c.max_body {
        return Err(err(
            "--max-buffered",
            format!("must be at least --max-body ({} bytes)", c.max_body),
        ));
    }
    c.upstream_token = env("TOLLGATE_UPSTREAM_TOKEN")
        .or_else(|| env("FORWARD_TOKEN"))
        .filter(|t| !t.is_empty());
    if c.upstream_token.is_none() {
        match file.get("upstream_token") {
            Some(toml::Value::String(s)) if !s.is_empty() => c.upstream_token = Some(s.clone()),
            None => {}
            Some(_) => return Err(err("upstream_token", "must be a non-empty string")),
        }
    }
    let env_no_defaults = env("TOLLGATE_NO_DEFAULT_PRICES")
        .is_some_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
    match file.get("default_prices") {
        Some(toml::Value::Boolean(b)) => c.default_prices = *b,
        None => {}
        Some(_) => return Err(err("default_prices", "must be true or false")),
    }
    if no_default_prices || env_no_defaults {
        c.default_prices = false;
    }
    if let Some(action) = prices {
        return Ok(Command::Prices { config: c, action });
    }
    if let Some([from, to, threshold]) = reconcile {
        let from = from.ok_or_else(|| err("--from", "reconcile needs --from DAY"))?;
        let to = to.ok_or_else(|| err("--to", "reconcile needs --to DAY"))?;
        return Ok(Command::Reconcile {
            config: c,
            from,
            to,
            threshold,
        });
    }
    Ok(if check {
        Command::CheckConfig(c)
    } else {
        Command::Run(c)
    })
}

/// `true`/`false` (also `1`/`0`, `yes`/`no`).
fn parse_bool(v: &str) -> Option<bool> {
    match v.trim() {
        "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

/// `500ms`, `2s`, `10m`, `1h30m`, or plain seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let ns = crate::duration::parse_go_duration_ns(s)?;
    Some(Duration::from_nanos(u64::try_from(ns).ok()?))
}

/// `1048576`, `512KiB`, `32MiB`, `1GiB`, `10MB`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests;
