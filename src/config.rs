//! Settings: command-line flags, then environment variables, then an optional
//! TOML file (`--config FILE`), then defaults, parsed into one validated
//! [`Config`]. A bad value is a [`ConfigError`] naming the setting.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::Uri;

/// Validated settings of a tollgate process.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address the proxy listens on.
    pub listen: SocketAddr,
    /// Upstream base URL; the incoming path and query are appended to it.
    pub upstream: Upstream,
    /// SQLite database file.
    pub db: PathBuf,
    /// Key injected as `Authorization: Bearer` upstream; `None` passes the
    /// client's own `Authorization` through.
    pub upstream_token: Option<String>,
    /// Longest wait for a TCP/TLS connection to upstream.
    pub upstream_connect_timeout: Duration,
    /// Longest silence from upstream: before the answer head, and between
    /// streamed bytes.
    pub upstream_idle_timeout: Duration,
    /// Largest request body read for metering (JSON APIs); larger gets 413.
    pub max_body: u64,
    /// How long in-flight requests may run on after a shutdown signal.
    pub shutdown_grace: Duration,
    /// Longest time a client may take to send its request head.
    pub header_timeout: Duration,
    /// Load the built-in price list into a new database.
    pub default_prices: bool,
    /// Delete per-query records older than this many days (rollups stay).
    pub retain_days: Option<u32>,
    /// Log line format.
    pub log_format: LogFormat,
    /// Admin key: when set, admin endpoints require it; when not, they answer
    /// only to loopback clients.
    pub admin_token: Option<String>,
    /// How clients name their user.
    pub auth: crate::access::AuthMode,
    /// Completion tokens reserved against a budget when a request sets no
    /// `max_tokens`.
    pub reserve_answer_tokens: u64,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable text.
    Text,
    /// One JSON object per line.
    Json,
}

/// An upstream base URL, split for fast per-request URI building.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: http::uri::Scheme,
    /// Host and port.
    pub authority: http::uri::Authority,
    /// Path prefix without a trailing slash (often empty).
    pub base_path: String,
}

impl Upstream {
    /// Parses `http(s)://host[:port][/prefix]`.
    pub fn parse(s: &str) -> Result<Upstream, String> {
        let uri: Uri = s.parse().map_err(|e| format!("not a URL ({e})"))?;
        let scheme = uri.scheme().cloned().ok_or("missing http:// or https://")?;
        if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
            return Err("scheme must be http or https".into());
        }
        let authority = uri.authority().cloned().ok_or("missing host")?;
        if uri.query().is_some() {
            return Err("must not have a query string".into());
        }
        Ok(Upstream {
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

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".parse().expect("valid default"),
            upstream: Upstream::parse("https://api.openai.com").expect("valid default"),
            db: PathBuf::from("openai-queries.db"),
            upstream_token: None,
            upstream_connect_timeout: Duration::from_secs(10),
            upstream_idle_timeout: Duration::from_secs(600),
            max_body: 32 << 20,
            shutdown_grace: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
            default_prices: true,
            retain_days: None,
            log_format: LogFormat::Text,
            admin_token: None,
            auth: crate::access::AuthMode::Header,
            reserve_answer_tokens: 4096,
        }
    }
}

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
    /// Print usage.
    Help,
    /// Print the version.
    Version,
}

/// Usage text for `--help`.
pub const HELP: &str = "\
tollgate: a metering proxy for the OpenAI API (tokens and cost per user)

Usage: tollgate [check-config] [OPTIONS]

Options (flag / environment variable / TOML key; flags win, then env, then file):
  --listen ADDR                   TOLLGATE_LISTEN                   listen       [127.0.0.1:8080]
  --upstream URL                  TOLLGATE_UPSTREAM                 upstream     [https://api.openai.com]
  --db FILE                       TOLLGATE_DB                       db           [openai-queries.db]
  --upstream-connect-timeout DUR  TOLLGATE_UPSTREAM_CONNECT_TIMEOUT upstream_connect_timeout [10s]
  --upstream-idle-timeout DUR     TOLLGATE_UPSTREAM_IDLE_TIMEOUT    upstream_idle_timeout    [600s]
  --max-body SIZE                 TOLLGATE_MAX_BODY                 max_body     [32MiB]
  --shutdown-grace DUR            TOLLGATE_SHUTDOWN_GRACE           shutdown_grace [30s]
  --header-timeout DUR            TOLLGATE_HEADER_TIMEOUT           header_timeout [10s]
  --retain-days N                  TOLLGATE_RETAIN_DAYS              retain_days  [keep forever]
  --log-format text|json          TOLLGATE_LOG_FORMAT               log_format   [text]
  --auth header|keys              TOLLGATE_AUTH                     auth         [header]
  --reserve-answer-tokens N       TOLLGATE_RESERVE_ANSWER_TOKENS    reserve_answer_tokens [4096]
  --no-default-prices             TOLLGATE_NO_DEFAULT_PRICES=1      default_prices = false
  --config FILE                   TOLLGATE_CONFIG                   TOML file with the keys above
  -h, --help                      this text
  -V, --version                   the version

The upstream API key comes from TOLLGATE_UPSTREAM_TOKEN (or FORWARD_TOKEN) or the
TOML key upstream_token, never from a flag; likewise the admin key
(TOLLGATE_ADMIN_TOKEN or admin_token). Without one, the client's own
Authorization header is passed through. Durations: 500ms, 2s, 10m, 1h.
Sizes: bytes, or with KiB/MiB/GiB (KB/MB/GB are powers of 1000).
";

/// (flag, env var, TOML key) of every valued setting.
const SETTINGS: [(&str, &str, &str); 12] = [
    ("--auth", "TOLLGATE_AUTH", "auth"),
    (
        "--reserve-answer-tokens",
        "TOLLGATE_RESERVE_ANSWER_TOKENS",
        "reserve_answer_tokens",
    ),
    ("--retain-days", "TOLLGATE_RETAIN_DAYS", "retain_days"),
    ("--log-format", "TOLLGATE_LOG_FORMAT", "log_format"),
    ("--listen", "TOLLGATE_LISTEN", "listen"),
    ("--upstream", "TOLLGATE_UPSTREAM", "upstream"),
    ("--db", "TOLLGATE_DB", "db"),
    (
        "--upstream-connect-timeout",
        "TOLLGATE_UPSTREAM_CONNECT_TIMEOUT",
        "upstream_connect_timeout",
    ),
    (
        "--upstream-idle-timeout",
        "TOLLGATE_UPSTREAM_IDLE_TIMEOUT",
        "upstream_idle_timeout",
    ),
    ("--max-body", "TOLLGATE_MAX_BODY", "max_body"),
    (
        "--shutdown-grace",
        "TOLLGATE_SHUTDOWN_GRACE",
        "shutdown_grace",
    ),
    (
        "--header-timeout",
        "TOLLGATE_HEADER_TIMEOUT",
        "header_timeout",
    ),
];

/// Parses the command line (without the program name) and environment.
pub fn parse(
    args: impl IntoIterator<Item = String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Command, ConfigError> {
    let mut flags: Vec<(String, String)> = Vec::new();
    let mut config_file = env("TOLLGATE_CONFIG");
    let mut no_default_prices = false;
    let mut check = false;
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "check-config" if flags.is_empty() && !check => check = true,
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
                if name != "--config" && !SETTINGS.iter().any(|s| s.0 == name) {
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
        .map(|s| s.2)
        .chain(["upstream_token", "admin_token", "default_prices"])
        .collect();
    if let Some(k) = file.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(err("--config", format!("unknown key `{k}`")));
    }
    // The raw value of a setting, by precedence.
    let raw = |flag: &str| -> Result<Option<String>, ConfigError> {
        let (_, env_name, key) = SETTINGS.iter().find(|s| s.0 == flag).expect("known");
        if let Some((_, v)) = flags.iter().rev().find(|(n, _)| n == flag) {
            return Ok(Some(v.clone()));
        }
        if let Some(v) = env(env_name).filter(|v| !v.is_empty()) {
            return Ok(Some(v));
        }
        match file.get(*key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(toml::Value::Integer(i)) => Ok(Some(i.to_string())),
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
    if let Some(v) = raw("--upstream")? {
        c.upstream = Upstream::parse(&v).map_err(|m| err("--upstream", format!("`{v}`: {m}")))?;
    }
    if let Some(v) = raw("--db")? {
        if v.is_empty() {
            return Err(err("--db", "must not be empty"));
        }
        c.db = PathBuf::from(v);
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
    dur("--shutdown-grace", &mut c.shutdown_grace)?;
    dur("--header-timeout", &mut c.header_timeout)?;
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
    c.admin_token = env("TOLLGATE_ADMIN_TOKEN").filter(|t| !t.is_empty());
    if c.admin_token.is_none() {
        match file.get("admin_token") {
            Some(toml::Value::String(s)) if !s.is_empty() => c.admin_token = Some(s.clone()),
            None => {}
            Some(_) => return Err(err("admin_token", "must be a non-empty string")),
        }
    }
    if let Some(v) = raw("--retain-days")? {
        c.retain_days = Some(v.parse::<u32>().ok().filter(|&d| d > 0).ok_or_else(|| {
            err(
                "--retain-days",
                format!("`{v}` is not a whole number of days above 0"),
            )
        })?);
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
    Ok(if check {
        Command::CheckConfig(c)
    } else {
        Command::Run(c)
    })
}

/// `500ms`, `2s`, `10m`, `1h30m`, or plain seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let ns = crate::ratelimit::parse_go_duration_ns(s)?;
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
