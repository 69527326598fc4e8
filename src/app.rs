//! The application, built once from the [`Config`]: the store handle,
//! metrics, prices, keys, budgets and the upstream. The server serves it;
//! the proxy and the REST API read it.

use std::collections::HashMap;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use http::HeaderValue;

use crate::access::{self, Keys};
use crate::budget::{Budgets, Period};
use crate::config::{Config, Db};
use crate::metrics::Metrics;
use crate::store::{postgres, sqlite, Filter, GroupKey, Store, StoreError};

/// The application: everything a request handler needs, built once.
pub struct App {
    /// The validated settings.
    pub config: Config,
    /// The upstream and its idle connections.
    pub upstream: crate::upstream::Upstream,
    /// Server worker threads (one per available core).
    pub workers: usize,
    /// Where records go and reports come from.
    pub store: Arc<Store>,
    /// `Bearer <upstream token>`, prepared once.
    pub auth_header: Option<HeaderValue>,
    /// SHA-256 of the admin key, if one is set.
    pub admin_digest: Option<access::Digest>,
    /// Active user keys.
    pub keys: Keys,
    /// Limits and live spend.
    pub budgets: Arc<Budgets>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Room for buffered JSON request bodies, in KiB (`--max-buffered`).
    pub buffered: Arc<tokio::sync::Semaphore>,
}

/// Why the server could not start.
#[derive(Debug)]
pub struct StartError {
    /// The setting at fault.
    pub setting: &'static str,
    /// What went wrong.
    pub message: String,
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid {}: {}", self.setting, self.message)
    }
}

impl std::error::Error for StartError {}

impl App {
    /// Opens the store, loads keys, limits and spend, and prepares the upstream.
    pub fn build(config: Config) -> Result<Arc<App>, StartError> {
        let db_error = |message: String| StartError {
            setting: "--db",
            message,
        };
        let opened = |e: StoreError| db_error(format!("{}: {e}", config.db.display()));
        let metrics = Arc::new(Metrics::new(config.metrics_max_users));
        let retain = config
            .retain_days
            .map(|d| std::time::Duration::from_secs(u64::from(d) * 86_400));
        let store = match &config.db {
            Db::Sqlite(path) => {
                let (backend, reports, accounts) =
                    sqlite::open(path, config.default_prices).map_err(opened)?;
                Store::start(backend, reports, accounts, metrics.clone(), retain)
            }
            Db::Postgres(url) => {
                let (backend, reports, accounts) =
                    postgres::open(url, config.default_prices).map_err(opened)?;
                Store::start(backend, reports, accounts, metrics.clone(), retain)
            }
        }
        .map_err(|e| db_error(e.to_string()))?;
        let auth_header = match &config.upstream_token {
            Some(t) => {
                let mut v =
                    HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| StartError {
                        setting: "TOLLGATE_UPSTREAM_TOKEN",
                        message: "not a valid header value".into(),
                    })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let buffered = Arc::new(tokio::sync::Semaphore::new(
            usize::try_from(config.max_buffered.div_ceil(1024))
                .unwrap_or(usize::MAX)
                .min(tokio::sync::Semaphore::MAX_PERMITS),
        ));
        let app = App {
            buffered,
            upstream: crate::upstream::Upstream::new(&config, workers),
            workers,
            admin_digest: config.admin_token.as_deref().map(access::digest),
            config,
            store,
            auth_header,
            keys: Keys::default(),
            budgets: Arc::new(Budgets::default()),
            metrics,
        };
        app.load_accounts()
            .map_err(|e| db_error(format!("cannot load keys and limits: {e}")))?;
        Ok(Arc::new(app))
    }

    /// Loads users' keys and limits, and each limited user's spend in the
    /// current period (so a restart does not reset anyone's spend).
    fn load_accounts(&self) -> Result<(), StoreError> {
        let accounts = self.store.accounts();
        for (info, digest) in accounts.active_keys()? {
            self.keys.insert(access::KeyEntry {
                id: info.id,
                user: info.user,
                digest,
                last_used: AtomicI64::new(info.last_used_ms.unwrap_or(0)),
            });
        }
        for (user, l) in accounts.all_limits()? {
            match user {
                Some(u) => self.budgets.set_limits(&u, Some(l)),
                None => self.budgets.set_default(Some(l)),
            }
        }
        self.rebuild_spend()
    }

    /// Reads every limited user's spend in their current period from the
    /// database (at start, and when limits change).
    pub fn rebuild_spend(&self) -> Result<(), StoreError> {
        let now = crate::timestamp::now_ms();
        let reports = self.store.reports();
        for period in [Period::Day, Period::Week, Period::Month, Period::Total] {
            let start = period.start(now);
            let f = Filter {
                after: (period != Period::Total).then(|| start - 1),
                ..Filter::default()
            };
            let mut spent: HashMap<String, i128> = reports
                .usage(&f, &[GroupKey::User])?
                .into_iter()
                .filter_map(|(g, t)| Some((g.user?, t.cost)))
                .collect();
            let users: Vec<String> = spent.keys().cloned().collect();
            for u in users {
                if self
                    .budgets
                    .limits_of(&u)
                    .is_some_and(|(l, _)| l.period == period)
                {
                    self.budgets
                        .set_spent(&u, start, spent.remove(&u).unwrap_or(0));
                }
            }
        }
        Ok(())
    }
}
