//! TLS to the upstream, end to end: a local HTTPS mock with a certificate
//! from a CA generated here (rcgen). A CA trusted through the upstream's
//! `ca_file` works, streaming included; an unknown CA, an expired
//! certificate and a wrong host name each end in a 502 in OpenAI's error
//! shape and a log line saying which check failed.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use tokio_rustls::rustls;

/// A generated CA and the PEM file that names it as a trusted root.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: PathBuf,
    _dir: tempfile::TempDir,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("ca.pem");
        std::fs::write(&pem, cert.pem()).unwrap();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
            _dir: dir,
        }
    }

    /// A server configuration whose certificate, signed by this CA, names
    /// `names` and is valid from `from` to `until` (years).
    fn server(&self, names: &[&str], from: i32, until: i32) -> Arc<rustls::ServerConfig> {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.not_before = rcgen::date_time_ymd(from, 1, 1);
        params.not_after = rcgen::date_time_ymd(until, 1, 1);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .unwrap();
        Arc::new(config)
    }
}

/// A certificate good for the mock's address, now.
fn valid(ca: &Ca) -> Arc<rustls::ServerConfig> {
    ca.server(&["127.0.0.1", "localhost"], 2020, 2100)
}

async fn chat_mock(tls: Arc<rustls::ServerConfig>) -> Mock {
    Mock::start_tls(tls, |seen| {
        if seen.json()["stream"] == true {
            Reply::sse_events(chat_stream(
                seen,
                "tls-model-1",
                &["over", " TLS"],
                Tok::new(11, 2),
            ))
        } else {
            Reply::json(completion("tls-model-1", "over TLS", Tok::new(7, 3)))
        }
    })
    .await
}

/// The upstream's certificate comes from a CA named in `ca_file`: plain and
/// streamed requests pass through over HTTPS and both are metered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_from_ca_file_is_trusted_streaming_included() {
    let ca = Ca::new("tollgate test CA");
    let mock = chat_mock(valid(&ca)).await;
    assert!(mock.url().starts_with("https://"));
    let pem = ca.pem.clone();
    let proxy = Proxy::builder(&mock.url())
        .with(move |c| c.upstream_trust.ca_file = Some(pem))
        .start()
        .await;

    let r = proxy.chat("alice", &chat_body("tls-model", false)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("over TLS"));
    let r = proxy.chat("alice", &chat_body("tls-model", true)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(contains(&r.body, b"[DONE]"), "{}", r.text());

    let mut recs = proxy.wait_records(2).await;
    recs.sort_by_key(|r| r["stream"].as_bool());
    assert_eq!(recs[0]["stream"], false);
    assert_eq!(recs[0]["queryTokens"], 7);
    assert_eq!(recs[0]["answerTokens"], 3);
    assert_eq!(recs[1]["stream"], true);
    assert_eq!(recs[1]["queryTokens"], 11);
    assert_eq!(recs[1]["answerTokens"], 2);
    for r in &recs {
        assert_eq!(r["status"], 200);
        assert_eq!(r["estimated"], false);
    }
    assert_eq!(mock.seen().len(), 2);
}

/// A `ca_file` that holds no certificate stops the start with a message
/// naming the setting.
#[tokio::test]
async fn a_ca_file_without_certificates_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("empty.pem");
    std::fs::write(&pem, "not a certificate\n").unwrap();
    let config = tollgate::config::Config {
        db: tollgate::config::Db::Sqlite(dir.path().join("t.db")),
        upstream_trust: tollgate::config::Trust {
            ca_file: Some(pem),
            system_roots: false,
        },
        ..Default::default()
    };
    let e = tollgate::app::App::build(config).err().expect("refused");
    assert!(e.to_string().contains("no PEM certificate"), "{e}");
}

/// Runs the binary against an HTTPS mock presenting `tls`, trusting `ca`'s
/// file, and sends one chat request: it must fail with a 502 in OpenAI's
/// shape, never reach the mock's handler, and log a line containing `why`.
async fn refused(tls: Arc<rustls::ServerConfig>, trusted: &Ca, why: &str) {
    let mock = chat_mock(tls).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let mut bin = spawn_logged(
        &[
            "--upstream",
            &mock.url(),
            "--upstream-ca-file",
            trusted.pem.to_str().unwrap(),
            "--db",
            db.to_str().unwrap(),
        ],
        &[],
    );
    let r = send(bin.addr, chat_req("alice", &chat_body("tls-model", false))).await;
    assert_openai_error(
        &r,
        502,
        "upstream_error",
        None,
        Some("upstream_unreachable"),
    );
    let line = eventually("the failure is logged", STEP, || {
        let lines = bin.lines();
        async move {
            lines
                .into_iter()
                .find(|l| l.contains("cannot connect to upstream"))
        }
    })
    .await;
    assert!(line.contains(why), "the log says why ({why}): {line}");
    assert!(mock.seen().is_empty(), "nothing reached the handler");
    bin.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_ca_is_refused_with_502_and_logged() {
    let trusted = Ca::new("trusted CA");
    let other = Ca::new("someone else's CA");
    refused(valid(&other), &trusted, "UnknownIssuer").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused_with_502_and_logged() {
    let ca = Ca::new("tollgate test CA");
    refused(
        ca.server(&["127.0.0.1"], 2019, 2021),
        &ca,
        "certificate expired",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_host_name_is_refused_with_502_and_logged() {
    let ca = Ca::new("tollgate test CA");
    refused(
        ca.server(&["api.example.com"], 2020, 2100),
        &ca,
        "certificate not valid for name",
    )
    .await;
}
