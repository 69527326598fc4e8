//! Budget alerts: a JSON message POSTed to `--alert-webhook` when a user's
//! (or a project's) spend crosses a threshold of their budget (50%, 80%,
//! 100% by default) and when a request is refused for budget, once per
//! threshold per period. A project's alerts go to its own webhook when it
//! has one.
//!
//! Nothing here runs on the request path: a refusal is handed over with a
//! non-blocking `try_send`, and one `alerts` thread (its own runtime) checks
//! the budgets every second and delivers. A delivery is retried with
//! backoff; a slow or dead receiver only delays alerts. "Once" holds across
//! restarts and instances: an alert goes out only after its row was
//! inserted into `alerts_sent` (the store decides who sends it). An alert
//! whose every retry failed is logged and not sent again.
//!
//! The message is Slack's incoming-webhook shape (`text`) with the figures
//! as fields beside it for generic receivers.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::budget::{Budgets, Limits};
use crate::projects::Projects;
use crate::store::Accounts;

/// How often spend is compared with the thresholds.
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// Deliveries tried per alert, the first at once, then after 1, 2, 4, 8 s.
const TRIES: u32 = 5;
/// Longest wait for one delivery's answer.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Refusals waiting to be looked at; past it they are dropped (the same
/// user's next refusal, or the 100% threshold, still tells).
const QUEUE: usize = 1024;
/// Deliveries in progress at once; past it new alerts are logged and dropped.
const MAX_IN_FLIGHT: usize = 256;

/// The handle the proxy tells refusals to.
pub struct Alerts {
    tx: Option<mpsc::Sender<Subject>>,
}

/// Whose budget an alert is about.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Subject {
    User(String),
    Project(String),
}

/// The budgets alerts watch, and where projects' alerts go.
pub struct Watched {
    /// Users' budgets.
    pub users: Arc<Budgets>,
    /// Projects' budgets.
    pub projects: Arc<Budgets>,
    /// Projects, with their own webhooks.
    pub webhooks: Arc<Projects>,
}

impl Alerts {
    /// No webhook: nothing is sent.
    pub fn off() -> Alerts {
        Alerts { tx: None }
    }

    /// Starts the `alerts` thread. Without `--alert-webhook` it still runs
    /// for projects with a webhook of their own (and sends nothing else).
    pub fn start(
        webhook: Option<Uri>,
        thresholds: Vec<u8>,
        watched: Watched,
        accounts: Arc<dyn Accounts>,
    ) -> Alerts {
        let (tx, rx) = mpsc::channel(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("alerts".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!("budget alerts are off: no runtime: {e}");
                        return;
                    }
                };
                let worker = Worker {
                    url: webhook,
                    thresholds,
                    watched,
                    accounts,
                    in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
                };
                rt.block_on(worker.run(rx));
            });
        if let Err(e) = spawned {
            tracing::error!("budget alerts are off: cannot start their thread: {e}");
            return Alerts::off();
        }
        Alerts { tx: Some(tx) }
    }

    /// A request of `user` was refused for budget. Never blocks.
    pub fn refused(&self, user: &str) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(Subject::User(user.to_owned()));
        }
    }

    /// A request was refused for its project's budget. Never blocks.
    pub fn project_refused(&self, project: &str) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(Subject::Project(project.to_owned()));
        }
    }
}

/// One alert, as POSTed.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    /// A sentence for chat receivers (Slack, Mattermost, Teams' Slack mode).
    pub text: String,
    /// `budget_threshold` or `budget_refused`.
    pub event: &'static str,
    /// The user (user budgets only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The project (project budgets only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// The percentage crossed (`budget_threshold` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<u8>,
    /// `day`, `week`, `month` or `total`.
    pub period: &'static str,
    /// Start of the period, RFC 3339 (absent for a total budget).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period_start: Option<String>,
    /// Dollars spent in the period when the alert was made.
    pub spent: String,
    /// The budget, dollars.
    pub budget: String,
}

struct Worker {
    /// `--alert-webhook`, if set.
    url: Option<Uri>,
    thresholds: Vec<u8>,
    watched: Watched,
    accounts: Arc<dyn Accounts>,
    in_flight: Arc<tokio::sync::Semaphore>,
}

type HttpClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

impl Worker {
    async fn run(self, mut rx: mpsc::Receiver<Subject>) {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        let client: HttpClient = Client::builder(TokioExecutor::new()).build(connector);
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                who = rx.recv() => match who {
                    Some(who) => self.on_refusal(&client, &who).await,
                    None => return,
                },
                _ = tick.tick() => self.check(&client).await,
            }
        }
    }

    /// Where a subject's alerts go: a project's own webhook, else the
    /// global one; `None`: nowhere (nothing is claimed or sent).
    fn url_of(&self, who: &Subject) -> Option<Uri> {
        match who {
            Subject::User(_) => self.url.clone(),
            Subject::Project(p) => self
                .watched
                .webhooks
                .webhook(p)
                .or_else(|| self.url.clone()),
        }
    }

    fn budgets_of(&self, who: &Subject) -> &Budgets {
        match who {
            Subject::User(_) => &self.watched.users,
            Subject::Project(_) => &self.watched.projects,
        }
    }

    /// Announces every threshold crossed and not yet announced.
    async fn check(&self, client: &HttpClient) {
        let now = crate::timestamp::now_ms();
        let users = self.watched.users.budgets_in_use(now);
        let projects = self.watched.projects.budgets_in_use(now);
        let all = (users
            .into_iter()
            .map(|(u, l, s, x)| (Subject::User(u), l, s, x)))
        .chain(
            projects
                .into_iter()
                .map(|(p, l, s, x)| (Subject::Project(p), l, s, x)),
        );
        for (who, limits, period_start, spent) in all {
            let Some(budget) = limits.budget.filter(|b| *b > 0) else {
                continue;
            };
            let Some(url) = self.url_of(&who) else {
                continue;
            };
            // The highest threshold crossed is announced; lower ones crossed
            // in the same second are noted as sent without a message each.
            let crossed: Vec<u8> = self
                .thresholds
                .iter()
                .copied()
                .filter(|t| spent * 100 >= i128::from(budget) * i128::from(*t))
                .collect();
            let mut newest = None;
            for t in &crossed {
                if self
                    .claim(&who, period_start, &format!("threshold:{t}"), now)
                    .await
                {
                    newest = Some(*t);
                }
            }
            if let Some(t) = newest {
                let m = message(&who, &limits, period_start, spent, Some(t));
                self.deliver(client, url, m);
            }
        }
    }

    async fn on_refusal(&self, client: &HttpClient, who: &Subject) {
        let now = crate::timestamp::now_ms();
        let Some(url) = self.url_of(who) else {
            return;
        };
        let name = match who {
            Subject::User(n) | Subject::Project(n) => n,
        };
        let budgets = self.budgets_of(who);
        let Some((limits, _)) = budgets.limits_of(name) else {
            return;
        };
        let period_start = limits.period.start(now);
        if self.claim(who, period_start, "refused", now).await {
            let (spent, _) = budgets.spent(name, now);
            self.deliver(
                client,
                url,
                message(who, &limits, period_start, spent, None),
            );
        }
    }

    /// Whether this instance sends the alert (the store had no row for it).
    async fn claim(&self, who: &Subject, period_start: i64, kind: &str, now: i64) -> bool {
        let accounts = self.accounts.clone();
        let subject = match who {
            Subject::User(u) => format!("user:{u}"),
            Subject::Project(p) => format!("project:{p}"),
        };
        let kind = kind.to_owned();
        let claimed = tokio::task::spawn_blocking(move || {
            accounts.claim_alert(&subject, period_start, &kind, now)
        })
        .await;
        match claimed {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                // Tried again at the next check.
                tracing::warn!("budget alert not sent: the database refused its note: {e}");
                false
            }
            Err(_) => false,
        }
    }

    fn deliver(&self, client: &HttpClient, url: Uri, m: Message) {
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            tracing::warn!("budget alert dropped: {MAX_IN_FLIGHT} deliveries already in progress");
            return;
        };
        let body = Bytes::from(serde_json::to_vec(&m).unwrap_or_default());
        let client = client.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut backoff = Duration::from_secs(1);
            for attempt in 1..=TRIES {
                let mut req = Request::new(Full::new(body.clone()));
                *req.method_mut() = Method::POST;
                *req.uri_mut() = url.clone();
                req.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                let outcome = tokio::time::timeout(DELIVERY_TIMEOUT, client.request(req)).await;
                let why = match outcome {
                    Ok(Ok(resp)) if resp.status().is_success() => return,
                    Ok(Ok(resp)) => format!("answered {}", resp.status()),
                    Ok(Err(e)) => format!("{e}"),
                    Err(_) => "no answer in time".to_owned(),
                };
                if attempt == TRIES {
                    tracing::warn!(
                        "budget alert ({}) not delivered after {TRIES} tries: {why}",
                        m.event
                    );
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        });
    }
}

fn message(
    who: &Subject,
    limits: &Limits,
    period_start: i64,
    spent: i128,
    threshold: Option<u8>,
) -> Message {
    let budget = i128::from(limits.budget.unwrap_or(0));
    let dollars = |v: i128| crate::pricing::format_dollars(v);
    let period = limits.period.as_str();
    let (whose, their) = match who {
        Subject::User(u) => (format!("user {u}"), "their"),
        Subject::Project(p) => (format!("project {p}"), "its"),
    };
    let text = match threshold {
        Some(t) => format!(
            "tollgate: {whose} has spent {t}% of {their} {period} budget (${} of ${})",
            dollars(spent),
            dollars(budget)
        ),
        None => format!(
            "tollgate: a request of {whose} was refused: the {period} budget is used up (${} of ${})",
            dollars(spent),
            dollars(budget)
        ),
    };
    let (user, project) = match who {
        Subject::User(u) => (Some(u.clone()), None),
        Subject::Project(p) => (None, Some(p.clone())),
    };
    Message {
        text,
        event: if threshold.is_some() {
            "budget_threshold"
        } else {
            "budget_refused"
        },
        user,
        project,
        threshold,
        period,
        period_start: (period_start != i64::MIN).then(|| crate::timestamp::format_ms(period_start)),
        spent: dollars(spent),
        budget: dollars(budget),
    }
}
