//! Runs the browser suite in `tests/dashboard`: Debian's Chromium, driven by
//! Playwright for Python, against the real tollgate binary on a database
//! seeded here with 35 days of history (see `tests/dashboard/test_dashboard.py`).
//!
//! Playwright lives in `target/dashboard-venv`, built on first use from PyPI;
//! its own browser download is never used (`executable_path` is the system
//! Chromium). Without Chromium, Python or PyPI the test says so on stderr and
//! passes locally, but fails in CI (`CI` set), so CI never mistakes a machine
//! that cannot run it for one where it passed. `TOLLGATE_SKIP_BROWSER=1`
//! skips it on purpose; `TOLLGATE_DASHBOARD_SHOTS=docs` keeps the screenshots.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// What the suite runs on; a change here rebuilds the environment.
const REQUIREMENTS: &[&str] = &["playwright>=1.40,<2", "pytest>=8,<10"];

/// Written into the environment once every requirement is installed.
const MARKER: &str = ".tollgate-requirements";

const DAY: i64 = 86_400_000;

/// Says something on the real stderr, past libtest's output capture.
fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

/// Gives up: a failure in CI, a loud skip elsewhere.
fn unavailable(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("dashboard browser suite cannot run in CI: {why}");
    }
    say(&format!(
        "dashboard browser suite: SKIPPED, {why} (with CI set this fails)"
    ));
}

fn show(out: &Output) -> String {
    format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether `venv` holds a finished install of `wanted`.
fn ready(venv: &Path, wanted: &str) -> bool {
    venv.join("bin").join("python").exists()
        && std::fs::read_to_string(venv.join(MARKER)).is_ok_and(|m| m == wanted)
}

/// The environment's python, building the environment when it is missing or
/// was built for other requirements; `Err` says why it could not be built.
fn venv_python(target: &Path) -> Result<PathBuf, String> {
    let venv = target.join("dashboard-venv");
    let python = venv.join("bin").join("python");
    let wanted = REQUIREMENTS.join("\n");
    if ready(&venv, &wanted) {
        return Ok(python);
    }
    // Built aside and renamed into place: another `cargo test` sharing this
    // target directory never sees a half-installed environment.
    let building = target.join(format!("dashboard-venv.building-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&building);
    say(&format!(
        "dashboard suite: creating {} with {}",
        venv.display(),
        REQUIREMENTS.join(" ")
    ));
    let out = Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg(&building)
        .output()
        .map_err(|e| format!("python3 not found ({e})"))?;
    if !out.status.success() {
        return Err(format!(
            "`python3 -m venv` failed (Debian: apt-get install python3-venv)\n{}",
            show(&out)
        ));
    }
    let out = Command::new(building.join("bin").join("python"))
        .args(["-m", "pip", "install", "--disable-pip-version-check", "-q"])
        .args(REQUIREMENTS)
        .output()
        .map_err(|e| format!("cannot run pip: {e}"))?;
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&building);
        return Err(format!(
            "pip could not install {} (is PyPI reachable?)\n{}",
            REQUIREMENTS.join(" "),
            show(&out)
        ));
    }
    std::fs::write(building.join(MARKER), &wanted).map_err(|e| e.to_string())?;
    if venv.exists() && !ready(&venv, &wanted) {
        let _ = std::fs::remove_dir_all(&venv);
    }
    if std::fs::rename(&building, &venv).is_err() {
        // Another run finished first: use its environment.
        let _ = std::fs::remove_dir_all(&building);
        if !ready(&venv, &wanted) {
            return Err(format!("could not move {} into place", building.display()));
        }
    }
    Ok(python)
}

/// 35 days of history before today (UTC), 12 records a day over three
/// users and three models, with odd pico-dollar costs (so rounding to the
/// cent matters), some upstream errors and some estimated usage; the daily
/// rollups are built from them as a migration builds them.
fn seed(db: &Path) {
    let (backend, _, _) = tollgate::store::sqlite::open(db, true).expect("open the database");
    let today = tollgate::timestamp::now_ms().div_euclid(DAY) * DAY;
    let mut values = Vec::new();
    for d in 1..=35i64 {
        for k in 0..12i64 {
            let n = d * 12 + k;
            let user = ["alice", "bob", "carol"][((d + k) % 3) as usize];
            let model = ["gpt-4o", "gpt-4o-mini", "o4-mini"][((d * k + k) % 3) as usize];
            let ts = today - d * DAY + k * 7_200_000 + 1_234;
            let status = if (d + k) % 10 == 0 { 500 } else { 200 };
            let estimated = i64::from((d * k) % 7 == 0);
            let (q, a) = (500 + n % 900, 100 + n % 300);
            let cost = 1_234_567_891 * (1 + n % 97);
            values.push(format!(
                "('{user}','{model}','{model}','/v1/chat/completions',{ts},800000,300000,{status},0,{q},{a},0,0,{cost},1,{estimated},NULL)"
            ));
        }
    }
    backend
        .execute_batch(&format!(
            "BEGIN;
             INSERT INTO queries (user, model, requested_model, endpoint, ts, duration_us, ttfb_us, status, stream,
                                  query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, priced, estimated, request_id)
             VALUES {};
             INSERT INTO usage_daily (day, user, model, queries, query_tokens, answer_tokens, cached_tokens, reasoning_tokens, cost, unpriced)
             SELECT ts / 86400000, user, model, COUNT(*), SUM(query_tokens), SUM(answer_tokens), SUM(cached_tokens),
                    SUM(reasoning_tokens), SUM(cost), SUM(1 - priced)
             FROM queries GROUP BY 1, 2, 3;
             COMMIT;",
            values.join(",")
        ))
        .expect("seed the database");
}

#[test]
fn dashboard_browser_suite() {
    if std::env::var_os("TOLLGATE_SKIP_BROWSER").is_some_and(|v| v == "1") {
        say("dashboard browser suite: skipped (TOLLGATE_SKIP_BROWSER=1)");
        return;
    }
    let chromium = std::env::var_os("TOLLGATE_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !chromium.exists() {
        return unavailable(&format!(
            "no Chromium at {} (Debian: apt-get install chromium)",
            chromium.display()
        ));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = match venv_python(&root.join("target")) {
        Ok(p) => p,
        Err(why) => return unavailable(&why),
    };
    let dir = std::env::temp_dir().join(format!("tollgate-dashboard-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let db = dir.join("usage.db");
    seed(&db);
    let mut cmd = Command::new(&python);
    cmd.args([
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/dashboard",
    ])
    .current_dir(root)
    .env("TOLLGATE_BIN", env!("CARGO_BIN_EXE_tollgate"))
    .env("TOLLGATE_DASHBOARD_DB", &db)
    .env("TOLLGATE_CHROMIUM", &chromium)
    // Playwright must never fetch a browser of its own.
    .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    .env("PYTHONDONTWRITEBYTECODE", "1");
    if let Some(shots) = std::env::var_os("TOLLGATE_DASHBOARD_SHOTS") {
        cmd.env("TOLLGATE_DASHBOARD_SHOTS", root.join(shots));
    }
    let out = cmd.output().expect("running pytest");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "the dashboard browser suite failed (pytest exit {:?})\n{}",
        out.status.code(),
        show(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout.lines().rev().find(|l| !l.trim().is_empty());
    say(&format!(
        "dashboard browser suite: {}",
        summary.unwrap_or("(no output)")
    ));
}
