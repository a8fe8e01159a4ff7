//! AMQPS: a real client (amqprs with its `tls` feature) publishes and
//! consumes over TLS against a certificate generated at test time (a CA and
//! a `localhost` certificate it signed, by rcgen), while the plain port of
//! the same server keeps working; a plaintext client on the TLS port is
//! disconnected without harm to anyone else; and every way a certificate or
//! key file can be wrong is an error naming the file.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

use std::path::{Path, PathBuf};
use std::time::Duration;

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{
    BasicGetArguments, BasicPublishArguments, Channel, ConfirmSelectArguments,
    QueueDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::tls::TlsAdaptor;
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, Nack, Return};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tern_amqp::{AmqpServer, TlsConfig, TlsError};
use tern_broker::{Broker, BrokerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// PEM files of a test PKI: a CA, and a `localhost` certificate it signed.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn generate() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.as_ref().pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config(&self) -> TlsConfig {
        TlsConfig::from_pem_files(&self.path("cert.pem"), &self.path("key.pem")).unwrap()
    }

    /// A client that trusts the test CA and checks the name `localhost`.
    fn client(&self) -> TlsAdaptor {
        TlsAdaptor::without_client_auth(Some(&self.path("ca.pem")), "localhost".to_string())
            .unwrap()
    }
}

struct Server {
    _dir: tempfile::TempDir,
    server: AmqpServer,
    tls_port: u16,
}

async fn start(pki: &Pki) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let mut server = AmqpServer::bind("127.0.0.1:0".parse().unwrap(), broker)
        .await
        .unwrap();
    let tls = server
        .listen_tls("127.0.0.1:0".parse().unwrap(), pki.config())
        .await
        .unwrap();
    assert_eq!(server.tls_addr(), Some(tls));
    Server {
        _dir: dir,
        tls_port: tls.port(),
        server,
    }
}

async fn connect_tls(pki: &Pki, port: u16) -> Connection {
    let args = OpenConnectionArguments::new("127.0.0.1", port, "guest", "guest")
        .tls_adaptor(pki.client())
        .finish();
    Connection::open(&args).await.unwrap()
}

async fn connect_plain(port: u16) -> Connection {
    Connection::open(&OpenConnectionArguments::new(
        "127.0.0.1",
        port,
        "guest",
        "guest",
    ))
    .await
    .unwrap()
}

/// Sends each publisher confirm's delivery tag.
struct Confirms(mpsc::UnboundedSender<u64>);

#[async_trait::async_trait]
impl ChannelCallback for Confirms {
    async fn close(&mut self, _: &Channel, _: CloseChannel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(&mut self, _: &Channel, active: bool) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        let _ = self.0.send(ack.delivery_tag());
    }
    async fn publish_nack(&mut self, _: &Channel, _: Nack) {}
    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {}
}

/// Publishes `body` to `queue` with a confirm and waits for it.
async fn publish_confirmed(conn: &Connection, queue: &str, body: &[u8]) {
    let ch = conn.open_channel(None).await.unwrap();
    let (tx, mut confirms) = mpsc::unbounded_channel();
    ch.register_callback(Confirms(tx)).await.unwrap();
    ch.confirm_select(ConfirmSelectArguments::default())
        .await
        .unwrap();
    ch.basic_publish(
        BasicProperties::default().with_delivery_mode(2).finish(),
        body.to_vec(),
        BasicPublishArguments::new("", queue),
    )
    .await
    .unwrap();
    let tag = tokio::time::timeout(Duration::from_secs(10), confirms.recv())
        .await
        .expect("a confirm within 10 s");
    assert_eq!(tag, Some(1));
    ch.close().await.unwrap();
}

async fn get(conn: &Connection, queue: &str) -> Option<Vec<u8>> {
    let ch = conn.open_channel(None).await.unwrap();
    let got = ch
        .basic_get(BasicGetArguments::new(queue).no_ack(true).finish())
        .await
        .unwrap()
        .map(|(_, _, body)| body);
    ch.close().await.unwrap();
    got
}

async fn declare(conn: &Connection, queue: &str) {
    let ch = conn.open_channel(None).await.unwrap();
    ch.queue_declare(QueueDeclareArguments::durable_client_named(queue))
        .await
        .unwrap();
    ch.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_consume_over_tls_while_the_plain_port_works() {
    let pki = Pki::generate();
    let s = start(&pki).await;
    let tls = connect_tls(&pki, s.tls_port).await;
    let plain = connect_plain(s.server.local_addr().port()).await;

    declare(&tls, "over-tls").await;
    publish_confirmed(&tls, "over-tls", b"sealed").await;
    assert_eq!(get(&tls, "over-tls").await.as_deref(), Some(&b"sealed"[..]));

    // The same broker behind both ports: what one publishes, the other reads.
    publish_confirmed(&tls, "over-tls", b"tls to plain").await;
    assert_eq!(
        get(&plain, "over-tls").await.as_deref(),
        Some(&b"tls to plain"[..])
    );
    publish_confirmed(&plain, "over-tls", b"plain to tls").await;
    assert_eq!(
        get(&tls, "over-tls").await.as_deref(),
        Some(&b"plain to tls"[..])
    );
    tls.close().await.unwrap();
    plain.close().await.unwrap();
    s.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_client_on_the_tls_port_is_disconnected_and_nobody_else_notices() {
    let pki = Pki::generate();
    let s = start(&pki).await;
    let before = connect_tls(&pki, s.tls_port).await;
    declare(&before, "survivor").await;

    // AMQP's protocol header is not a TLS ClientHello: the handshake fails
    // and the server hangs up.
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", s.tls_port))
        .await
        .unwrap();
    raw.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    let mut buf = [0u8; 512];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match raw.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                // rustls may send an alert before closing; anything but AMQP.
                Ok(n) => assert!(!buf[..n].starts_with(b"AMQP"), "{:?}", &buf[..n]),
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the server should close the plaintext socket"
    );

    // The connection opened before, and a new one, both still work.
    publish_confirmed(&before, "survivor", b"still here").await;
    let after = connect_tls(&pki, s.tls_port).await;
    assert_eq!(
        get(&after, "survivor").await.as_deref(),
        Some(&b"still here"[..])
    );
    before.close().await.unwrap();
    after.close().await.unwrap();
    s.server.shutdown().await;
}

fn load(cert: &Path, key: &Path) -> String {
    TlsConfig::from_pem_files(cert, key)
        .unwrap_err()
        .to_string()
}

#[test]
fn bad_certificate_and_key_files_are_named_in_the_error() {
    let pki = Pki::generate();
    let cert = pki.path("cert.pem");
    let key = pki.path("key.pem");

    let missing = pki.path("nope.pem");
    let e = TlsConfig::from_pem_files(&missing, &key).unwrap_err();
    assert!(matches!(e, TlsError::Read { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("certificate") && text.contains(&missing.display().to_string()),
        "{text}"
    );
    let text = load(&cert, &missing);
    assert!(
        text.contains("private key") && text.contains(&missing.display().to_string()),
        "{text}"
    );

    let garbage = pki.path("garbage.pem");
    std::fs::write(&garbage, "this is not PEM\n").unwrap();
    let e = TlsConfig::from_pem_files(&garbage, &key).unwrap_err();
    assert!(matches!(e, TlsError::NoCertificate { .. }), "{e:?}");
    assert!(
        e.to_string().contains(&garbage.display().to_string()),
        "{e}"
    );

    // A key file that holds a certificate only, and a certificate file that
    // holds a key only.
    let e = TlsConfig::from_pem_files(&cert, &cert).unwrap_err();
    assert!(matches!(e, TlsError::NoKey { .. }), "{e:?}");
    assert!(e.to_string().contains(&cert.display().to_string()), "{e}");
    let e = TlsConfig::from_pem_files(&key, &key).unwrap_err();
    assert!(matches!(e, TlsError::NoCertificate { .. }), "{e:?}");

    // Another certificate's key.
    let other = pki.path("other-key.pem");
    std::fs::write(&other, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let e = TlsConfig::from_pem_files(&cert, &other).unwrap_err();
    assert!(matches!(e, TlsError::Mismatch { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("does not match"), "{text}");
    assert!(text.contains(&other.display().to_string()), "{text}");
}
