//! `tern serve` with AMQPS, run as the real binary: the TLS listener starts
//! only with a certificate and a key (flags, variables or the file), speaks
//! AMQP after a TLS handshake checked against the test's own CA, leaves the
//! plain port as it was, and every incomplete or wrong TLS setting stops
//! the start-up with an error that names the file or the missing setting.

#![allow(clippy::unwrap_used)] // a test that fails should panic

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use support::{run, stderr, stdout, Serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

/// Writes `ca.pem`, and `cert.pem` / `key.pem` for `localhost` signed by it.
fn write_pki(dir: &Path) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    std::fs::write(dir.join("ca.pem"), ca.as_ref().pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A TLS handshake that trusts only `ca.pem` and checks the name
/// `localhost`, then AMQP's protocol header: the first frame back must be
/// `connection.start` on channel 0.
async fn assert_speaks_amqps(addr: SocketAddr, ca: &Path) {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    let mut head = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(head[0], 1, "a method frame");
    assert_eq!(&head[1..3], &[0, 0], "on channel 0");
    assert_eq!(&head[7..11], &[0, 10, 0, 10], "connection.start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_speaks_amqps_with_a_certificate_and_plain_amqp_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    write_pki(dir.path());
    let data = dir.path().join("data");
    let mut serve = Serve::start_with(
        &[
            "serve",
            "--data-dir",
            s(&data),
            "--amqp-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--amqps-addr",
            "127.0.0.1:0",
            "--tls-cert",
            s(&dir.path().join("cert.pem")),
            "--tls-key",
            s(&dir.path().join("key.pem")),
        ],
        &[],
    );
    let amqps = serve.amqps.expect("a `tern: AMQPS listening on` line");
    assert_ne!(amqps.port(), 0, "port 0 is replaced by the chosen port");
    assert_ne!(amqps, serve.addr);
    assert_speaks_amqps(amqps, &dir.path().join("ca.pem")).await;
    // The plain port still speaks plain AMQP.
    let mut plain = tokio::net::TcpStream::connect(serve.addr).await.unwrap();
    plain.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    let mut head = [0u8; 11];
    plain.read_exact(&mut head).await.unwrap();
    assert_eq!(&head[7..11], &[0, 10, 0, 10], "connection.start");
    assert_eq!(serve.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_settings_come_from_the_environment_or_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_pki(dir.path());
    let file = dir.path().join("tern.toml");
    std::fs::write(
        &file,
        format!(
            "tls_cert = {:?}\ntls_key = {:?}\namqps_addr = \"127.0.0.1:0\"\n",
            s(&dir.path().join("cert.pem")),
            s(&dir.path().join("key.pem")),
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let mut serve = Serve::start_with(
        &[
            "serve",
            "--config",
            s(&file),
            "--data-dir",
            s(&data),
            "--amqp-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ],
        &[],
    );
    let amqps = serve.amqps.expect("AMQPS from the file's keys");
    assert_speaks_amqps(amqps, &dir.path().join("ca.pem")).await;
    assert_eq!(serve.stop(), Some(0));

    // Variables, and --print-config shows what was merged (with the
    // default address when none is given).
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let out = run(
        &["serve", "--print-config"],
        &[("TERN_TLS_CERT", s(&cert)), ("TERN_TLS_KEY", s(&key))],
        b"",
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let toml = stdout(&out);
    assert!(toml.contains("amqps_addr = \"127.0.0.1:5671\""), "{toml}");
    assert!(
        toml.contains(&format!("tls_cert = {:?}", s(&cert))),
        "{toml}"
    );
    assert!(toml.contains(&format!("tls_key = {:?}", s(&key))), "{toml}");
    // Without TLS settings, no AMQPS keys at all.
    let out = run(&["serve", "--print-config"], &[], b"");
    assert!(!stdout(&out).contains("amqps_addr"), "{}", stdout(&out));
}

/// `tern ARGS` must fail at start-up, announce nothing and say `expect`.
fn fails_with(args: &[&str], env: &[(&str, &str)], expect: &[&str]) {
    let out = run(args, env, b"");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(
        !stdout(&out).contains("listening"),
        "announced: {}",
        stdout(&out)
    );
    for e in expect {
        assert!(err.contains(e), "expected {e:?} in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    let mut all = base.to_vec();
    all.extend_from_slice(extra);
    all
}

#[test]
fn incomplete_or_wrong_tls_settings_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    write_pki(dir.path());
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let data = dir.path().join("data");
    let base = [
        "serve",
        "--data-dir",
        s(&data),
        "--amqp-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
        "--amqps-addr",
        "127.0.0.1:0",
    ];
    let a = with(&base, &["--tls-cert", s(&cert)]);
    fails_with(&a, &[], &["no private key", "--tls-key"]);
    let a = with(&base, &["--tls-key", s(&key)]);
    fails_with(&a, &[], &["no certificate", "--tls-cert"]);
    fails_with(&base, &[], &["--amqps-addr", "--tls-cert", "--tls-key"]);

    let missing = dir.path().join("missing.pem");
    let a = with(&base, &["--tls-cert", s(&missing), "--tls-key", s(&key)]);
    fails_with(&a, &[], &[s(&missing), "certificate"]);
    // The key and certificate files swapped.
    let a = with(&base, &["--tls-cert", s(&key), "--tls-key", s(&cert)]);
    fails_with(&a, &[], &[s(&key), "no PEM certificate"]);
    let other = dir.path().join("other.pem");
    std::fs::write(&other, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let a = with(&base, &["--tls-cert", s(&cert), "--tls-key", s(&other)]);
    fails_with(&a, &[], &[s(&other), "does not match"]);
    assert!(!data.exists(), "nothing was started, not even the broker");
}
