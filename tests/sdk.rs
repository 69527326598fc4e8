//! Runs the suite in `tests/sdk`: the official `openai` Python SDK against the
//! real tollgate binary and a mock upstream (see `tests/sdk/test_sdk.py`).
//!
//! The Python environment lives in `target/sdk-venv` and is built on first use
//! from PyPI. Without Python or PyPI the test fails, so a machine that cannot
//! run the suite is never mistaken for one where it passed; set
//! `TOLLGATE_SKIP_SDK=1` to skip it on purpose.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// What the suite runs on; a change here rebuilds the environment.
const REQUIREMENTS: &[&str] = &["openai>=1.109,<4", "pytest>=8,<10"];

/// Written into the environment once every requirement is installed.
const MARKER: &str = ".tollgate-requirements";

/// Says something on the real stderr, past libtest's output capture.
fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "{msg}");
}

fn show(out: &Output) -> String {
    format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(cmd: &mut Command, what: &str) -> Output {
    match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "{what}: {:?} not found ({e}). The SDK suite needs python3 with venv and pip \
             (Debian: apt-get install python3 python3-venv); set TOLLGATE_SKIP_SDK=1 to skip it",
            cmd.get_program()
        ),
        Err(e) => panic!("{what}: cannot run {:?}: {e}", cmd.get_program()),
    }
}

/// Whether `venv` holds a finished install of `wanted`.
fn ready(venv: &Path, wanted: &str) -> bool {
    venv.join("bin").join("python").exists()
        && std::fs::read_to_string(venv.join(MARKER)).is_ok_and(|m| m == wanted)
}

/// The environment's python, building the environment when it is missing or
/// was built for other requirements.
fn venv_python(target: &Path) -> PathBuf {
    let venv = target.join("sdk-venv");
    let python = venv.join("bin").join("python");
    let wanted = REQUIREMENTS.join("\n");
    if ready(&venv, &wanted) {
        return python;
    }
    // Built aside and renamed into place: another `cargo test` sharing this
    // target directory never sees a half-installed environment.
    let building = target.join(format!("sdk-venv.building-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&building);
    say(&format!(
        "sdk suite: creating {} with {}",
        venv.display(),
        REQUIREMENTS.join(" ")
    ));
    let out = run(
        Command::new("python3").arg("-m").arg("venv").arg(&building),
        "creating the virtualenv",
    );
    assert!(
        out.status.success(),
        "`python3 -m venv` failed (Debian: apt-get install python3-venv; or set \
         TOLLGATE_SKIP_SDK=1 to skip the SDK suite)\n{}",
        show(&out)
    );
    let out = run(
        Command::new(building.join("bin").join("python"))
            .args(["-m", "pip", "install", "--disable-pip-version-check", "-q"])
            .args(REQUIREMENTS),
        "installing the SDK",
    );
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&building);
        panic!(
            "pip could not install {} (is PyPI reachable?); set TOLLGATE_SKIP_SDK=1 to skip \
             the SDK suite\n{}",
            REQUIREMENTS.join(" "),
            show(&out)
        );
    }
    std::fs::write(building.join(MARKER), &wanted).expect("writing the requirements marker");
    if venv.exists() && !ready(&venv, &wanted) {
        let _ = std::fs::remove_dir_all(&venv);
    }
    if std::fs::rename(&building, &venv).is_err() {
        // Another run finished first: use its environment.
        let _ = std::fs::remove_dir_all(&building);
        assert!(
            ready(&venv, &wanted),
            "could not move {} into place",
            building.display()
        );
    }
    python
}

#[test]
fn openai_python_sdk_suite() {
    if std::env::var_os("TOLLGATE_SKIP_SDK").is_some_and(|v| v == "1") {
        say("sdk suite: skipped (TOLLGATE_SKIP_SDK=1)");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = venv_python(&root.join("target"));
    let out = run(
        Command::new(&python)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/sdk"])
            .current_dir(root)
            .env("TOLLGATE_BIN", env!("CARGO_BIN_EXE_tollgate"))
            // Keep the source tree free of __pycache__ directories.
            .env("PYTHONDONTWRITEBYTECODE", "1"),
        "running pytest",
    );
    assert!(
        out.status.success(),
        "the SDK suite failed (pytest exit {:?})\n{}",
        out.status.code(),
        show(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout.lines().rev().find(|l| !l.trim().is_empty());
    say(&format!("sdk suite: {}", summary.unwrap_or("(no output)")));
}
