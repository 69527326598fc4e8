//! PostgreSQL storage, for several tollgate instances on one database: the
//! writer thread's own connection ([`PgBackend`]: records by binary `COPY`
//! with their daily rollups in one transaction), a small pool of connections
//! for the reports ([`PgReports`]) and for users' keys and limits
//! ([`PgAccounts`]). Records are partitioned by month, so retention drops
//! whole partitions. The schema is versioned and migrated under an advisory
//! lock (`schema.rs`).
//!
//! The driver is `tokio-postgres`. Each connection's socket is driven by a
//! task on a small runtime private to this module; the calls themselves are
//! awaited on the calling thread (`wait`), which may be the writer thread,
//! a blocking-pool thread or a server worker, like SQLite's calls are.

mod accounts;
mod import;
mod leases;
mod reports;
mod schema;
mod write;

pub use accounts::PgAccounts;
pub use import::{open_target, PgTarget, PROGRESS_PREFIX};
pub use leases::PgLeases;
pub use reports::PgReports;
pub use schema::LATEST as SCHEMA_VERSION;
pub use write::PgBackend;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;
use tokio_postgres::{Client, Statement};

use crate::config::PgUrl;
use crate::pricing;
use crate::store::StoreError;

/// Milliseconds in a day.
const DAY: i64 = 86_400_000;

/// Connections kept idle in a pool.
const POOL_IDLE: usize = 8;

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        // `Display` of a server error is only "db error"; the details say why.
        match e.as_db_error() {
            Some(db) => StoreError(format!("{}: {}", db.severity(), db.message())),
            None => StoreError(e.to_string()),
        }
    }
}

/// The runtime that drives the connections' sockets.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tollgate-pg")
            .enable_all()
            .build()
            .expect("PostgreSQL driver runtime")
    })
}

/// Waits for a driver call on this thread. The futures of a connected
/// client only exchange messages with its connection task, so they need no
/// runtime here, and waiting is allowed on any thread (a server worker
/// blocks as it does on a SQLite call).
fn wait<F: Future>(f: F) -> F::Output {
    futures_executor::block_on(f)
}

/// The TLS connector: rustls (ring) trusting the webpki roots and the
/// URL's `sslrootcert`, if any.
fn tls(
    ca: Option<&std::path::Path>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca {
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| StoreError(format!("sslrootcert {}: {e}", path.display())))?;
        for c in certs {
            let c = c.map_err(|e| StoreError(format!("sslrootcert {}: {e}", path.display())))?;
            roots
                .add(c)
                .map_err(|e| StoreError(format!("sslrootcert {}: {e}", path.display())))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StoreError(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Opens one connection; its socket is driven on the module's runtime.
fn connect(url: &PgUrl) -> Result<Client, StoreError> {
    let (config, ca) = url
        .config_and_ca()
        .map_err(|e| StoreError(format!("bad URL: {e}")))?;
    let make_tls = tls(ca.as_deref())?;
    let (client, conn) = runtime()
        .block_on_detached(async move { config.connect(make_tls).await })
        .map_err(StoreError::from)?;
    runtime().spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// Runs a future on the runtime from any thread and waits for its output.
trait BlockOnDetached {
    fn block_on_detached<F>(&self, f: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static;
}

impl BlockOnDetached for tokio::runtime::Runtime {
    fn block_on_detached<F>(&self, f: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        // `Runtime::block_on` refuses to run inside another runtime (the
        // tests' and the server's); a spawned task and a wait do not care.
        let task = self.spawn(f);
        wait(task).expect("PostgreSQL driver task")
    }
}

/// A pooled connection and its prepared statements (a report runs a few
/// statements of a small set; preparing each once saves a round trip).
pub(crate) struct Conn {
    client: Client,
    prepared: HashMap<String, Statement>,
}

/// Most statements kept prepared per connection.
const PREPARED_MAX: usize = 256;

impl Conn {
    /// The statement for `sql`, prepared the first time.
    async fn statement(&mut self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(st) = self.prepared.get(sql) {
            return Ok(st.clone());
        }
        let st = self.client.prepare(sql).await?;
        if self.prepared.len() >= PREPARED_MAX {
            self.prepared.clear();
        }
        self.prepared.insert(sql.to_owned(), st.clone());
        Ok(st)
    }
}

/// Connections shared by the read side and the accounts.
pub(crate) struct Pool {
    url: PgUrl,
    idle: Mutex<Vec<Conn>>,
}

impl Pool {
    fn new(url: PgUrl) -> Pool {
        Pool {
            url,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Runs `f` on an idle connection (or a new one); a connection that
    /// broke is not kept.
    fn with<T>(&self, f: impl FnOnce(&mut Conn) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut c = loop {
            match self.idle.lock().pop() {
                Some(c) if c.client.is_closed() => continue,
                Some(c) => break c,
                None => {
                    break Conn {
                        client: connect(&self.url)?,
                        prepared: HashMap::new(),
                    }
                }
            }
        };
        let out = f(&mut c);
        if !c.client.is_closed() {
            let mut idle = self.idle.lock();
            if idle.len() < POOL_IDLE {
                idle.push(c);
            }
        }
        out
    }
}

/// Opens the database at `url`: migrates its schema (one instance at a
/// time), loads the built-in price list the first time when
/// `default_prices`, and connects the writer, the reports and the accounts.
pub fn open(
    url: &PgUrl,
    default_prices: bool,
) -> Result<(PgBackend, Arc<PgReports>, Arc<PgAccounts>), StoreError> {
    let mut c = connect(url)?;
    schema::migrate(&mut c)?;
    if default_prices {
        load_default_prices(&mut c)?;
    }
    let pool = Arc::new(Pool::new(url.clone()));
    Ok((
        PgBackend::new(url.clone(), c)?,
        Arc::new(PgReports::new(pool.clone())),
        Arc::new(PgAccounts::new(pool)),
    ))
}

/// Loads the built-in price list once in the database's life (the marker
/// row decides, so of several instances starting at once only one loads).
fn load_default_prices(c: &mut Client) -> Result<(), StoreError> {
    wait(async {
        let tx = c.transaction().await?;
        let marked = tx
            .execute(
                "INSERT INTO meta (key, value) VALUES ('default_prices_loaded', '1') ON CONFLICT (key) DO NOTHING",
                &[],
            )
            .await?;
        if marked == 1 {
            let sql = format!("{} ON CONFLICT DO NOTHING", write::INSERT_PRICE);
            for (model, p) in pricing::default_prices() {
                write::store_price(&tx, &sql, &model, &p).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    })
}

/// A count as PostgreSQL stores it, clamped to `i64::MAX`.
fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
