use super::*;
use std::collections::HashMap;

fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    match parse(args.iter().map(|s| s.to_string()), &|k| env.get(k).cloned())? {
        Command::Run(c) => Ok(c),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn defaults() {
    let c = run(&[], &[]).unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.upstream.to_string(), "https://api.openai.com");
    assert_eq!(c.db, Db::Sqlite(PathBuf::from("openai-queries.db")));
    assert_eq!(c.upstream_connect_timeout, Duration::from_secs(10));
    assert_eq!(c.upstream_idle_timeout, Duration::from_secs(600));
    assert_eq!(c.max_body, 32 << 20);
    assert_eq!(c.shutdown_grace, Duration::from_secs(30));
    assert!(c.upstream_token.is_none());
    assert!(c.default_prices);
}

#[test]
fn flags_beat_env_beat_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:1\"\nupstream = \"http://file:1\"\ndb = \"file.db\"\nmax_body = \"1MiB\"\nupstream_token = \"from-file\"\nupstream_idle_timeout = 7\ndefault_prices = false\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let c = run(
        &["--config", f, "--listen=127.0.0.1:3"],
        &[
            ("TOLLGATE_LISTEN", "127.0.0.1:2"),
            ("TOLLGATE_UPSTREAM", "http://env:2/base/"),
        ],
    )
    .unwrap();
    assert_eq!(c.listen.port(), 3);
    assert_eq!(c.upstream.to_string(), "http://env:2/base");
    assert_eq!(c.db, Db::Sqlite(PathBuf::from("file.db")));
    assert_eq!(c.max_body, 1 << 20);
    assert_eq!(c.upstream_token.as_deref(), Some("from-file"));
    assert_eq!(c.upstream_idle_timeout, Duration::from_secs(7));
    assert!(!c.default_prices);
    let c = run(&["--config", f], &[("FORWARD_TOKEN", "old-name")]).unwrap();
    assert_eq!(c.upstream_token.as_deref(), Some("old-name"));
    let c = run(
        &["--config", f],
        &[("FORWARD_TOKEN", "old"), ("TOLLGATE_UPSTREAM_TOKEN", "new")],
    )
    .unwrap();
    assert_eq!(c.upstream_token.as_deref(), Some("new"));
}

#[test]
fn bad_values_name_the_setting() {
    let e = run(&["--listen", "nope"], &[]).unwrap_err();
    assert_eq!(e.setting, "--listen");
    let e = run(&[], &[("TOLLGATE_UPSTREAM", "ftp://x")]).unwrap_err();
    assert_eq!(e.setting, "--upstream");
    let e = run(&["--upstream-idle-timeout", "soon"], &[]).unwrap_err();
    assert_eq!(e.setting, "--upstream-idle-timeout");
    let e = run(&["--max-body", "12 parsecs"], &[]).unwrap_err();
    assert_eq!(e.setting, "--max-body");
    let e = run(&["--upstream-token", "sk-x"], &[]).unwrap_err();
    assert!(e.message.contains("never taken from a flag"));
    let e = run(&["--bogus"], &[]).unwrap_err();
    assert_eq!(e.setting, "--bogus");
    let e = run(&["--config", "/nonexistent/x.toml"], &[]).unwrap_err();
    assert_eq!(e.setting, "--config");
}

#[test]
fn durations_and_sizes() {
    assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(parse_duration("10m"), Some(Duration::from_secs(600)));
    assert_eq!(parse_duration("2"), Some(Duration::from_secs(2)));
    assert_eq!(parse_size("32MiB"), Some(32 << 20));
    assert_eq!(parse_size("10MB"), Some(10_000_000));
    assert_eq!(parse_size("4096"), Some(4096));
    assert_eq!(parse_size("x"), None);
}

#[test]
fn upstream_uri_keeps_prefix() {
    let u = UpstreamUrl::parse("http://127.0.0.1:9000/openai/").unwrap();
    assert_eq!(
        u.uri_for("/v1/chat/completions?x=1").unwrap().to_string(),
        "/openai/v1/chat/completions?x=1"
    );
}

#[test]
fn help_version_check() {
    let env = |_: &str| None;
    assert!(matches!(
        parse(["--help".to_string()], &env),
        Ok(Command::Help)
    ));
    assert!(matches!(
        parse(["-V".to_string()], &env),
        Ok(Command::Version)
    ));
    assert!(matches!(
        parse(["check-config".to_string()], &env),
        Ok(Command::CheckConfig(_))
    ));
}

#[test]
fn debug_never_shows_keys() {
    let c = Config {
        upstream_token: Some("sk-upstream-secret".into()),
        admin_token: Some("admin-secret".into()),
        ..Config::default()
    };
    let shown = format!("{c:?}");
    assert!(!shown.contains("sk-upstream-secret"), "{shown}");
    assert!(!shown.contains("admin-secret"), "{shown}");
    assert!(shown.contains("<redacted>"), "{shown}");
}

#[test]
fn help_lists_every_setting_and_every_listed_flag_parses() {
    let text = help();
    for s in SETTINGS {
        assert!(text.contains(s.flag), "--help misses {}", s.flag);
        assert!(text.contains(s.env), "--help misses {}", s.env);
    }
    let env = |_: &str| None;
    for s in SETTINGS
        .iter()
        .filter(|s| !s.value.is_empty() && !s.key.is_empty())
    {
        // An unknown flag is refused as such; a known one fails, if at all,
        // on its value.
        if let Err(e) = parse([s.flag.to_string(), "bogus-value".into()], &env) {
            assert!(!e.message.contains("unknown option"), "{}: {e}", s.flag);
        }
    }
}

#[test]
fn readme_documents_every_setting() {
    let readme = include_str!("../../README.md");
    for s in SETTINGS {
        assert!(
            readme.contains(&format!("`{}`", s.flag)),
            "README's settings table misses {}",
            s.flag
        );
    }
}

#[test]
fn reserve_floor_is_dollars() {
    assert_eq!(run(&[], &[]).unwrap().reserve_floor, 10_000_000_000);
    let c = run(&["--reserve-floor", "0.25"], &[]).unwrap();
    assert_eq!(c.reserve_floor, 250_000_000_000);
    let c = run(&[], &[("TOLLGATE_RESERVE_FLOOR", "0")]).unwrap();
    assert_eq!(c.reserve_floor, 0, "0 disables the floor");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.toml");
    std::fs::write(&file, "reserve_floor = 0.05\n").unwrap();
    let c = run(&["--config", file.to_str().unwrap()], &[]).unwrap();
    assert_eq!(c.reserve_floor, 50_000_000_000);
    for bad in ["-1", "cheap", "0.0000000000001", "1e30"] {
        let e = run(&["--reserve-floor", bad], &[]).unwrap_err();
        assert_eq!(e.setting, "--reserve-floor", "{bad}");
    }
}

#[test]
fn body_limits_and_client_aborts() {
    let c = run(&[], &[]).unwrap();
    assert_eq!(c.body_timeout, Duration::from_secs(60));
    assert_eq!(c.max_buffered, 256 << 20);
    assert_eq!(c.client_abort, ClientAbort::Finish);
    let c = run(
        &["--body-timeout", "5s", "--client-abort", "cancel"],
        &[("TOLLGATE_MAX_BUFFERED", "1GiB")],
    )
    .unwrap();
    assert_eq!(c.body_timeout, Duration::from_secs(5));
    assert_eq!(c.max_buffered, 1 << 30);
    assert_eq!(c.client_abort, ClientAbort::Cancel);
    let e = run(&["--client-abort", "later"], &[]).unwrap_err();
    assert_eq!(e.setting, "--client-abort");
    let e = run(&["--body-timeout", "0s"], &[]).unwrap_err();
    assert_eq!(e.setting, "--body-timeout");
    // Room for fewer bytes than one body may have would never admit it.
    let e = run(&["--max-buffered", "1MiB"], &[]).unwrap_err();
    assert_eq!(e.setting, "--max-buffered");
    run(&["--max-buffered", "1MiB", "--max-body", "1MiB"], &[]).unwrap();
}

#[test]
fn db_takes_a_postgres_url_and_never_shows_its_password() {
    let url = "postgres://tg:s3cret-pw@db.example:5432/tollgate?sslmode=require";
    for args in [vec!["--db", url]] {
        let c = run(&args, &[]).unwrap();
        let Db::Postgres(u) = &c.db else {
            panic!("not PostgreSQL: {:?}", c.db)
        };
        assert_eq!(u.secret(), url);
        let shown = [
            format!("{c:?}"),
            c.db.display(),
            format!("{u}"),
            format!("{u:?}"),
        ];
        for s in shown {
            assert!(!s.contains("s3cret-pw"), "{s}");
            assert!(s.contains("tg:<redacted>@db.example:5432/tollgate"), "{s}");
        }
    }
    let c = run(
        &[],
        &[("TOLLGATE_DB", "postgresql://h/db?password=pw-in-query")],
    )
    .unwrap();
    assert!(matches!(c.db, Db::Postgres(_)));
    assert!(!format!("{c:?}").contains("pw-in-query"));
    assert!(format!("{c:?}").contains("password=<redacted>"));
    // A file path stays a SQLite file, whatever it contains.
    let c = run(&["--db", "./postgres-data.db"], &[]).unwrap();
    assert_eq!(c.db, Db::Sqlite(PathBuf::from("./postgres-data.db")));
    // A malformed URL is refused naming --db, without the password.
    let e = run(&["--db", "postgres://u:hunter2@h:notaport/db"], &[]).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("--db"), "{msg}");
    assert!(!msg.contains("hunter2"), "{msg}");
}

#[test]
fn migrate_takes_a_file_and_a_postgres_url() {
    let parse_args = |a: &[&str]| parse(a.iter().map(|s| s.to_string()), &|_| None);
    match parse_args(&[
        "migrate",
        "--from",
        "old.db",
        "--to=postgres://u:pw@db:5432/tollgate",
    ]) {
        Ok(Command::Migrate(m)) => {
            assert_eq!(m.from, PathBuf::from("old.db"));
            assert_eq!(m.to.redacted(), "postgres://u:<redacted>@db:5432/tollgate");
        }
        other => panic!("unexpected {other:?}"),
    }
    let e = parse_args(&["migrate", "--from", "a.db", "--to", "b.db"]).unwrap_err();
    assert_eq!(e.setting, "--to");
    let e = parse_args(&["migrate", "--to", "postgres://h/x"]).unwrap_err();
    assert_eq!(e.setting, "--from");
    let e = parse_args(&[
        "migrate",
        "--from",
        "a.db",
        "--to",
        "postgres://h/x",
        "--listen",
        "x",
    ])
    .unwrap_err();
    assert_eq!(e.setting, "--listen");
    // Only as the first word: elsewhere it is not a subcommand.
    assert!(parse_args(&["--listen", "127.0.0.1:1", "migrate"]).is_err());
    assert!(help().contains("tollgate migrate --from FILE --to URL"));
}

#[test]
fn upstream_tables_name_several_upstreams_with_keys_from_env_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    std::fs::write(&keys, "# pool\nsk-file-1\n\n  sk-file-2  \n").unwrap();
    let file = dir.path().join("t.toml");
    std::fs::write(
        &file,
        format!(
            r#"upstream_retries = 3
[[upstream]]
name = "openai"
url = "https://api.openai.com"
models = ["gpt-4o*", "o1"]
key_env = ["KEY_A"]
key_files = ["{}"]
system_roots = true

[[upstream]]
name = "vllm"
url = "http://10.0.0.5:8000"
models = ["llama-*"]
ca_file = "/etc/ca.pem"
"#,
            keys.display()
        ),
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let c = run(&["--config", f], &[("KEY_A", "sk-env")]).unwrap();
    assert_eq!(c.upstream_retries, 3);
    let [openai, vllm] = &c.upstreams[..] else {
        panic!("{:?}", c.upstreams)
    };
    assert_eq!(openai.name, "openai");
    assert_eq!(openai.keys, ["sk-env", "sk-file-1", "sk-file-2"]);
    assert!(openai.trust.system_roots);
    assert!(openai.serves("gpt-4o-mini") && openai.serves("o1") && !openai.serves("o1-mini"));
    assert!(vllm.keys.is_empty());
    assert_eq!(vllm.url.to_string(), "http://10.0.0.5:8000");
    assert_eq!(
        vllm.trust.ca_file.as_deref(),
        Some(std::path::Path::new("/etc/ca.pem"))
    );
    let shown = format!("{c:?}");
    assert!(
        !shown.contains("sk-env") && !shown.contains("sk-file"),
        "{shown}"
    );
    assert_eq!(c.named_upstreams().len(), 2);

    // Errors name the upstream and the key, never a key's value.
    let e = run(&["--config", f], &[]).unwrap_err();
    assert_eq!(e.setting, "upstream openai.key_env");
    assert!(e.message.contains("KEY_A"), "{e}");
    let e = run(
        &["--config", f, "--upstream", "http://x"],
        &[("KEY_A", "sk-env")],
    )
    .unwrap_err();
    assert_eq!(e.setting, "--upstream");
    std::fs::write(
        &file,
        "[[upstream]]\nname = \"a\"\nurl = \"http://a\"\nkey = \"sk-inline\"\n",
    )
    .unwrap();
    let e = run(&["--config", f], &[]).unwrap_err();
    assert!(e.message.contains("unknown key `key`"), "{e}");
    std::fs::write(
        &file,
        "[[upstream]]\nname = \"a\"\nurl = \"http://a\"\n[[upstream]]\nname = \"a\"\nurl = \"http://b\"\n",
    )
    .unwrap();
    assert!(run(&["--config", f], &[])
        .unwrap_err()
        .message
        .contains("used twice"));
}

#[test]
fn without_upstream_tables_the_shorthand_is_one_upstream_named_default() {
    let c = run(
        &["--upstream", "http://local:1"],
        &[("TOLLGATE_UPSTREAM_TOKEN", "sk-one")],
    )
    .unwrap();
    let ups = c.named_upstreams();
    assert_eq!(ups.len(), 1);
    assert_eq!(ups[0].name, "default");
    assert_eq!(ups[0].keys, ["sk-one"]);
    assert!(ups[0].serves("anything"));
}

#[test]
fn fallback_tables_name_upstreams_serving_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.toml");
    let base = r#"
[[upstream]]
name = "openai"
url = "https://api.openai.com"
models = ["gpt-4o*"]

[[upstream]]
name = "azure-east"
kind = "azure"
url = "https://east.openai.azure.com"
api_version = "2024-06-01"
deployments = { "gpt-4o" = "my-4o", "gpt-35-turbo" = { deployment = "chat35", base_model = "gpt-3.5-turbo" } }
"#;
    let f = file.to_str().unwrap();
    let with = |extra: &str| {
        std::fs::write(&file, format!("{base}{extra}")).unwrap();
        run(&["--config", f], &[])
    };
    let c = with("[[fallback]]\nmodel = \"gpt-4o\"\nupstreams = [\"openai\", \"azure-east\"]\n")
        .unwrap();
    assert_eq!(
        c.fallbacks,
        [Fallback {
            model: "gpt-4o".into(),
            upstreams: vec!["openai".into(), "azure-east".into()]
        }]
    );
    let azure = c.upstreams[1].azure.as_ref().unwrap();
    assert_eq!(azure.api_version, "2024-06-01");
    assert_eq!(azure.deployment("gpt-4o").unwrap().deployment, "my-4o");
    assert_eq!(azure.deployment("gpt-4o").unwrap().priced_as(), "gpt-4o");
    assert_eq!(
        azure.deployment("gpt-35-turbo").unwrap().priced_as(),
        "gpt-3.5-turbo"
    );
    assert!(c.upstreams[1].serves("gpt-4o") && !c.upstreams[1].serves("gpt-4o-mini"));

    // A pattern is checked per request; a plain name now.
    assert!(
        with("[[fallback]]\nmodel = \"gpt-4o*\"\nupstreams = [\"openai\", \"azure-east\"]\n")
            .is_ok()
    );
    let e =
        with("[[fallback]]\nmodel = \"gpt-4o-mini\"\nupstreams = [\"openai\", \"azure-east\"]\n")
            .unwrap_err();
    assert!(e.message.contains("does not serve"), "{e}");
    let e =
        with("[[fallback]]\nmodel = \"gpt-4o\"\nupstreams = [\"openai\", \"nope\"]\n").unwrap_err();
    assert!(e.message.contains("no [[upstream]] is named `nope`"), "{e}");
    let e = with("[[fallback]]\nmodel = \"gpt-4o\"\nupstreams = [\"openai\", \"openai\"]\n")
        .unwrap_err();
    assert!(e.message.contains("twice"), "{e}");
    let e = with("[[fallback]]\nmodel = \"gpt-4o\"\n").unwrap_err();
    assert_eq!(e.setting, "fallback[0].upstreams");

    // Azure needs deployments with path-safe names, and no `models`.
    std::fs::write(
        &file,
        "[[upstream]]\nname = \"az\"\nkind = \"azure\"\nurl = \"https://x\"\n",
    )
    .unwrap();
    assert!(run(&["--config", f], &[])
        .unwrap_err()
        .message
        .contains("needs deployments"));
    std::fs::write(
        &file,
        "[[upstream]]\nname = \"az\"\nkind = \"azure\"\nurl = \"https://x\"\ndeployments = { \"gpt-4o\" = \"a/../b\" }\n",
    )
    .unwrap();
    assert!(run(&["--config", f], &[]).is_err());
    std::fs::write(
        &file,
        "[[upstream]]\nname = \"o\"\nurl = \"https://x\"\napi_version = \"1\"\n",
    )
    .unwrap();
    assert!(run(&["--config", f], &[])
        .unwrap_err()
        .message
        .contains("only for kind"));
    // Without [[upstream]] tables there is nothing to fall back to.
    std::fs::write(&file, "[[fallback]]\nmodel = \"a\"\nupstreams = [\"b\"]\n").unwrap();
    assert_eq!(run(&["--config", f], &[]).unwrap_err().setting, "fallback");
}
