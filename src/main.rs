use std::process::ExitCode;

use tollgate::config::{self, Command, LogFormat};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let config = match config::parse(std::env::args().skip(1), &|k| std::env::var(k).ok()) {
        Ok(Command::Run(c)) => c,
        Ok(Command::CheckConfig(c)) => {
            println!(
                "configuration is valid: listen {}, upstream {}, db {}",
                c.listen,
                c.upstream,
                c.db.display()
            );
            return ExitCode::SUCCESS;
        }
        Ok(Command::Reconcile {
            config,
            from,
            to,
            threshold,
        }) => {
            return match tollgate::reconcile::Period::parse(&from, &to, threshold.as_deref()) {
                Ok(period) => reconcile(config, period).await,
                Err(e) => fail(&format!("reconcile: {e}")),
            }
        }
        Ok(Command::Prices { config, action }) => return prices(config, action).await,
        Ok(Command::Migrate(m)) => return migrate(&m),
        Ok(Command::Help) => {
            print!("{}", config::help());
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("tollgate {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(&e),
    };
    // Log lines are written by a background thread: a slow stderr never
    // stalls a request or the usage writer (lines are dropped instead).
    let (writer, _guard) = tracing_appender::non_blocking(std::io::stderr());
    tollgate::store::access_log::install(config.log_format, writer.clone());
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match config.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.with_ansi(false).init(),
    }
    // Signal handlers exist before the first connection can arrive, so a
    // SIGTERM right after start-up drains instead of killing.
    let shutdown = match shutdown_signal() {
        Ok(s) => s,
        Err(e) => return fail(&format!("cannot install signal handlers: {e}")),
    };
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            return fail(&format!(
                "invalid --listen: cannot bind {}: {e}",
                config.listen
            ))
        }
    };
    let app = match tollgate::app::App::build(config) {
        Ok(app) => app,
        Err(e) => return fail(&e),
    };
    tollgate::server::run(listener, app, shutdown).await;
    ExitCode::SUCCESS
}

/// `tollgate prices import|export`.
async fn prices(config: config::Config, action: config::PricesCommand) -> ExitCode {
    let app = match tollgate::app::App::build(config) {
        Ok(app) => app,
        Err(e) => return fail(&e),
    };
    let now = tollgate::timestamp::now_ms();
    let (file, dry_run, valid_from) = match action {
        config::PricesCommand::Export => {
            print!(
                "{}",
                tollgate::pricing::list::export_tsv(&app.store.prices(), now)
            );
            return ExitCode::SUCCESS;
        }
        config::PricesCommand::Import {
            file,
            dry_run,
            valid_from,
        } => (file, dry_run, valid_from),
    };
    let valid_from = match valid_from.as_deref().map(tollgate::timestamp::parse) {
        None => now,
        Some(Some(t)) => t,
        Some(None) => {
            return fail(&"--valid-from: not a timestamp with an offset, like 2026-12-01T00:00:00Z")
        }
    };
    let list = match std::fs::read_to_string(&file)
        .map_err(|e| format!("cannot read {file}: {e}"))
        .and_then(|t| tollgate::pricing::list::parse(&t).map_err(|e| format!("{file}: {e}")))
    {
        Ok(l) => l,
        Err(e) => return fail(&e),
    };
    let d = match app.import_prices(&list, valid_from, dry_run).await {
        Ok(d) => d,
        Err(e) => return fail(&format!("could not store the prices: {e}")),
    };
    let per_1m = |p: &tollgate::pricing::Price| {
        let f =
            |v: i64| tollgate::pricing::format_scaled(v.into(), tollgate::pricing::SCALE_PER_1M);
        format!(
            "input {} cached {} output {}",
            f(p.query),
            p.cached.map_or("-".into(), f),
            f(p.answer)
        )
    };
    for (m, p) in &d.added {
        println!("+ {m}: {}", per_1m(p));
    }
    for (m, old, new) in &d.changed {
        println!("~ {m}: {} -> {}", per_1m(old), per_1m(new));
    }
    let verb = if dry_run { "would add" } else { "added" };
    println!(
        "{} added, {} changed, {} unchanged; {verb} {} price rows valid from {}",
        d.added.len(),
        d.changed.len(),
        d.unchanged.len(),
        d.added.len() + d.changed.len(),
        tollgate::timestamp::format_ms(valid_from)
    );
    // The writer stores what it was handed before the process ends.
    app.store.flush().await;
    ExitCode::SUCCESS
}

/// `tollgate reconcile`: prints the comparison; exit status 1 when a line
/// is over the threshold, 2 when it could not be made.
async fn reconcile(config: config::Config, period: tollgate::reconcile::Period) -> ExitCode {
    let app = match tollgate::app::App::build(config) {
        Ok(app) => app,
        Err(e) => return fail(&e),
    };
    match app.reconcile(&period).await {
        Ok(lines) => {
            print!("{}", tollgate::reconcile::render(&lines));
            let flagged = lines.iter().filter(|l| l.flagged).count();
            if flagged > 0 {
                println!("{flagged} line(s) differ by more than the threshold");
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// `tollgate migrate`: copies, then says what it copied.
fn migrate(m: &config::Migrate) -> ExitCode {
    let s = match tollgate::store::migrate::migrate(&m.from, &m.to) {
        Ok(s) => s,
        Err(e) => return fail(&format!("migrate: {e}")),
    };
    let c = &s.shared;
    println!(
        "migrated {} -> {}{}",
        m.from.display(),
        m.to.redacted(),
        if s.new_source {
            " (first run for this file)"
        } else {
            " (continuing an earlier run)"
        }
    );
    println!(
        "  records:       {} copied ({} copied before)",
        s.records, s.records_before
    );
    println!("  daily rollups: {} rows copied", s.rollups);
    println!("  rejections:    {} copied", s.rejections);
    println!(
        "  prices:        {} copied ({} there already{})",
        c.prices,
        c.prices_there,
        if c.prices_differ > 0 {
            format!(", {} of them differ: PostgreSQL's kept", c.prices_differ)
        } else {
            String::new()
        }
    );
    println!(
        "  keys:          {} copied ({} there already, {} revoked now)",
        c.keys, c.keys_there, c.keys_revoked
    );
    println!(
        "  limits:        {} copied ({} there already: PostgreSQL's kept)",
        c.limits, c.limits_there
    );
    println!(
        "  projects:      {} copied ({} there already: PostgreSQL's kept)",
        c.projects, c.projects_there
    );
    println!(
        "  rate limits:   {}",
        if c.ratelimits { "copied" } else { "not copied" }
    );
    ExitCode::SUCCESS
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("tollgate: {e}");
    ExitCode::from(2)
}

fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}
