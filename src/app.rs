//! The application, built once from the [`Config`]: the store handle,
//! metrics, prices, keys, budgets and the upstream. The server serves it;
//! the proxy and the REST API read it.

use std::collections::HashMap;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::access::{self, Keys};
use crate::budget::{Budgets, Period};
use crate::config::{Config, Db};
use crate::metrics::Metrics;
use crate::store::{postgres, sqlite, Filter, GroupKey, StateVersions, Store, StoreError};

/// The application: everything a request handler needs, built once.
pub struct App {
    /// The validated settings.
    pub config: Config,
    /// The upstreams, their keys and idle connections.
    pub upstreams: crate::upstreams::Upstreams,
    /// Server worker threads (one per available core).
    pub workers: usize,
    /// Where records go and reports come from.
    pub store: Arc<Store>,
    /// SHA-256 of the admin key, if one is set.
    pub admin_digest: Option<access::Digest>,
    /// Active user keys.
    pub keys: Keys,
    /// Open dashboard sessions.
    pub sessions: access::session::Sessions,
    /// Limits and live spend.
    pub budgets: Arc<Budgets>,
    /// Projects: members and alert webhooks.
    pub projects: Arc<crate::projects::Projects>,
    /// Projects' limits and live spend (never leased: see README).
    pub project_budgets: Arc<Budgets>,
    /// Budget alerts to the webhook (off without one).
    pub alerts: crate::alerts::Alerts,
    /// Created batches, handed to their follower.
    pub batches: crate::batches::Batches,
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

/// How often an instance on a shared database looks for prices, keys and
/// limits (and upstream's latest rate limits) changed by another: well inside the promised second.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

impl App {
    /// Compares a price list with the prices in effect and, unless
    /// `dry_run`, adds the added and changed ones as rows valid from
    /// `valid_from` (records from then on are re-priced, earlier ones not).
    pub async fn import_prices(
        &self,
        list: &[crate::pricing::list::Entry],
        valid_from: i64,
        dry_run: bool,
    ) -> Result<crate::pricing::list::Diff, StoreError> {
        let d = crate::pricing::list::diff(&self.store.prices(), list, valid_from);
        if !dry_run {
            let changed = d.changed.iter().map(|(m, _, p)| (m, p));
            for (model, p) in d.added.iter().map(|(m, p)| (m, p)).chain(changed) {
                let price = crate::pricing::Price { valid_from, ..*p };
                self.store.set_price(model.clone(), price).await?;
            }
        }
        Ok(d)
    }

    /// OpenAI's Costs API (on the first upstream) beside this store's
    /// costs for `period`.
    pub async fn reconcile(
        &self,
        period: &crate::reconcile::Period,
    ) -> Result<Vec<crate::reconcile::Line>, crate::reconcile::Error> {
        let first = &self.upstreams.all()[0];
        crate::reconcile::reconcile(
            period,
            &first.conn,
            &|pq| first.url().uri_for(pq),
            self.config.openai_admin_key.as_deref(),
            self.store.reports(),
        )
        .await
    }

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
        type Source = Arc<dyn crate::budget::LeaseSource>;
        let mut leases: Option<(Source, Source)> = None;
        let (store, versions) = match &config.db {
            Db::Sqlite(path) => {
                let (backend, reports, accounts) =
                    sqlite::open(path, config.default_prices).map_err(opened)?;
                (
                    Store::start(backend, reports, accounts, metrics.clone(), retain),
                    None,
                )
            }
            Db::Postgres(url) => {
                let (backend, reports, accounts) =
                    postgres::open(url, config.default_prices).map_err(opened)?;
                // Read before what they version, so a change made meanwhile
                // is reloaded at the first poll rather than missed.
                let versions = crate::store::Reports::state_versions(&*reports)
                    .map_err(|e| db_error(e.to_string()))?;
                // Instances on one database lease their budgets from it.
                let users = backend.leases();
                let projects = users.for_projects();
                leases = Some((Arc::new(users), Arc::new(projects)));
                (
                    Store::start(backend, reports, accounts, metrics.clone(), retain),
                    versions,
                )
            }
        };
        let store = store.map_err(|e| db_error(e.to_string()))?;
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        let buffered = Arc::new(tokio::sync::Semaphore::new(
            usize::try_from(config.max_buffered.div_ceil(1024))
                .unwrap_or(usize::MAX)
                .min(tokio::sync::Semaphore::MAX_PERMITS),
        ));
        let budgets = Arc::new(Budgets::default());
        let projects = Arc::new(crate::projects::Projects::default());
        let project_budgets = Arc::new(Budgets::default());
        let alerts = crate::alerts::Alerts::start(
            config.alert_webhook.clone(),
            config.alert_thresholds.clone(),
            crate::alerts::Watched {
                users: budgets.clone(),
                projects: project_budgets.clone(),
                webhooks: projects.clone(),
            },
            store.accounts(),
        );
        let upstreams = crate::upstreams::Upstreams::new(&config, workers).map_err(|e| {
            let shorthand = config.upstreams.is_empty();
            StartError {
                setting: if shorthand && e.key {
                    "TOLLGATE_UPSTREAM_TOKEN"
                } else if shorthand {
                    "--upstream-ca-file"
                } else {
                    "[[upstream]]"
                },
                message: if shorthand {
                    e.message
                } else {
                    format!("{}: {}", e.upstream, e.message)
                },
            }
        })?;
        let batches = crate::batches::Batches::new(
            &config,
            store.clone(),
            metrics.clone(),
            budgets.clone(),
            project_budgets.clone(),
        )
        .map_err(|e| StartError {
            setting: "[[upstream]]",
            message: e,
        })?;
        let app = App {
            batches,
            buffered,
            alerts,
            upstreams,
            workers,
            admin_digest: config.admin_token.as_deref().map(access::digest),
            config,
            store,
            keys: Keys::default(),
            sessions: access::session::Sessions::default(),
            budgets,
            projects,
            project_budgets,
            metrics,
        };
        app.load_accounts()
            .map_err(|e| db_error(format!("cannot load keys and limits: {e}")))?;
        let app = Arc::new(app);
        if let Some((users, projects)) = leases {
            app.budgets
                .start_leasing(users)
                .map_err(|e| db_error(format!("cannot start the lease thread: {e}")))?;
            app.project_budgets
                .start_leasing(projects)
                .map_err(|e| db_error(format!("cannot start the lease thread: {e}")))?;
        }
        if let Some(v) = versions {
            let weak = Arc::downgrade(&app);
            std::thread::Builder::new()
                .name("tollgate-follow".into())
                .spawn(move || follow(weak, v))
                .map_err(|e| db_error(format!("cannot start the state poll: {e}")))?;
        }
        Ok(app)
    }

    /// Reloads what moved between `seen` and `now`; returns the versions
    /// now held (a kind whose reload failed keeps its old version, so it is
    /// tried again at the next poll).
    fn reload(&self, seen: StateVersions, now: StateVersions) -> StateVersions {
        let mut held = seen;
        let failed = |what: &str, e: StoreError| {
            tracing::warn!(error = %e, "cannot reload {what} changed by another instance");
        };
        if now.prices != seen.prices {
            match self.store.reports().prices() {
                Ok(t) => {
                    self.store.replace_prices(t);
                    held.prices = now.prices;
                }
                Err(e) => failed("prices", e),
            }
        }
        if now.ratelimits != seen.ratelimits {
            match self.store.reports().ratelimits() {
                Ok(rl) => {
                    if let Some(rl) = rl {
                        self.store.adopt_ratelimits(rl);
                    }
                    held.ratelimits = now.ratelimits;
                }
                Err(e) => failed("rate limits", e),
            }
        }
        if now.keys != seen.keys {
            match self.load_keys() {
                Ok(()) => held.keys = now.keys,
                Err(e) => failed("keys", e),
            }
        }
        if now.limits != seen.limits {
            // Spend is re-read only when the limits really changed: the
            // version also moves for this instance's own saves, whose spend
            // is already right here, and a re-read races with requests
            // settling meanwhile (their spend is not in the database yet).
            let reloaded = self.load_limits().and_then(|changed| {
                if changed {
                    self.rebuild_spend()
                } else {
                    Ok(())
                }
            });
            match reloaded {
                Ok(()) => held.limits = now.limits,
                Err(e) => failed("limits", e),
            }
        }
        held
    }

    /// Makes the active keys those of the database.
    fn load_keys(&self) -> Result<(), StoreError> {
        let active = self.store.accounts().active_keys()?;
        self.keys.replace(
            active
                .into_iter()
                .map(|(info, digest)| access::KeyEntry {
                    id: info.id,
                    user: info.user,
                    digest,
                    last_used: AtomicI64::new(info.last_used_ms.unwrap_or(0)),
                    // Checked when the key was made; a row edited by hand
                    // to something unreadable tags nothing.
                    tags: crate::tags::Tags::parse(&info.tags).unwrap_or_default(),
                    project: info.project,
                })
                .collect(),
        );
        Ok(())
    }

    /// Makes the limits (and projects) those of the database; whether the
    /// limits changed.
    fn load_limits(&self) -> Result<bool, StoreError> {
        let mut members = std::collections::BTreeMap::new();
        let mut project_limits = HashMap::new();
        for p in self.store.accounts().all_projects()? {
            if let Some(l) = p.limits {
                project_limits.insert(p.name.clone(), l);
            }
            // Checked when it was stored; a row edited by hand into
            // something unreadable alerts to the global webhook.
            let webhook = p
                .alert_webhook
                .as_deref()
                .and_then(|u| crate::projects::check_webhook(u).ok());
            members.insert(
                p.name,
                crate::projects::Project {
                    members: p.members,
                    webhook,
                },
            );
        }
        self.projects.replace(members);
        let projects_changed = self.project_budgets.replace_limits(project_limits, None);
        let mut users = HashMap::new();
        let mut default = None;
        for (user, l) in self.store.accounts().all_limits()? {
            match user {
                Some(u) => {
                    users.insert(u, l);
                }
                None => default = Some(l),
            }
        }
        Ok(self.budgets.replace_limits(users, default) | projects_changed)
    }

    /// Loads users' keys and limits, and each limited user's spend in the
    /// current period (so a restart does not reset anyone's spend).
    fn load_accounts(&self) -> Result<(), StoreError> {
        self.load_keys()?;
        self.load_limits()?;
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
            let projects = reports.usage(
                &Filter {
                    group_tag: Some(crate::projects::ROLLUP_KEY.to_owned()),
                    ..f.clone()
                },
                &[GroupKey::Tag],
            )?;
            for (g, t) in projects {
                let Some(p) = g.tag else { continue };
                if self
                    .project_budgets
                    .limits_of(&p)
                    .is_some_and(|(l, _)| l.period == period)
                {
                    self.project_budgets.set_spent(&p, start, t.cost);
                }
            }
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

/// The state poll of an instance on a shared database: every
/// [`FOLLOW_EVERY`] it reads the versions of prices, keys, limits and the
/// latest upstream rate limits, and reloads those another instance changed
/// (so a revoked key is refused here within a second). It ends with the app, or once the store is closed.
fn follow(app: Weak<App>, mut seen: StateVersions) {
    let mut failing = false;
    loop {
        std::thread::sleep(FOLLOW_EVERY);
        let Some(app) = app.upgrade() else { return };
        if app.store.closed() {
            return;
        }
        match app.store.reports().state_versions() {
            Ok(Some(now)) => {
                failing = false;
                if now != seen {
                    seen = app.reload(seen, now);
                }
            }
            Ok(None) => return,
            Err(e) => {
                // Once per outage: the poll goes on every 250 ms.
                if !failing {
                    tracing::warn!(error = %e, "cannot read the shared state's versions; retrying");
                }
                failing = true;
            }
        }
    }
}
