//! The servers a conformance scenario runs against: an in-process Tern on
//! a fresh data directory, and, when `TERN_TEST_RABBITMQ_URL` is set, that
//! RabbitMQ too ([`run_on_both`]). A [`Target`] prefixes every name a
//! scenario uses, so runs against a shared RabbitMQ never collide, and
//! deletes what the scenario declared afterwards (with lapin, whichever
//! client the scenario drives), even when it fails.
//!
//! Shared by every client's test file; each uses a different part of it.
#![allow(dead_code)]

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use tern_amqp::AmqpServer;
use tern_broker::{Broker, BrokerConfig};

/// The variable naming a RabbitMQ to run every scenario against as well.
pub(crate) const RABBITMQ_URL_VAR: &str = "TERN_TEST_RABBITMQ_URL";

pub(crate) struct Harness {
    _dir: tempfile::TempDir,
    pub(crate) broker: Broker,
    pub(crate) server: AmqpServer,
}

impl Harness {
    pub(crate) async fn start() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
        let server = AmqpServer::bind("127.0.0.1:0".parse().unwrap(), broker.clone())
            .await
            .unwrap();
        Harness {
            _dir: dir,
            broker,
            server,
        }
    }
}

/// One server a scenario runs against: Tern in-process, or a RabbitMQ.
pub(crate) struct Target {
    /// "tern" or "rabbitmq", for messages.
    pub(crate) label: &'static str,
    /// `host:port`.
    pub(crate) host_port: String,
    pub(crate) user: String,
    pub(crate) password: String,
    /// The vhost, percent-encoded as in a URL (`%2f` for `/`).
    pub(crate) vhost: String,
    /// Prepended to every queue, exchange and vhost name a scenario uses.
    pub(crate) prefix: String,
    /// Set for Tern: lets a scenario look inside the broker too.
    pub(crate) tern: Option<Harness>,
    /// What the scenario declared, deleted after it.
    pub(crate) queues: Mutex<Vec<String>>,
    pub(crate) exchanges: Mutex<Vec<String>>,
}

pub(crate) fn unique_prefix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "tern-test-{:x}-{:x}-{}.",
        nanos,
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl Target {
    pub(crate) async fn tern() -> Target {
        let h = Harness::start().await;
        Target {
            label: "tern",
            host_port: format!("127.0.0.1:{}", h.server.local_addr().port()),
            user: "guest".into(),
            password: "guest".into(),
            vhost: "%2f".into(),
            prefix: unique_prefix(),
            tern: Some(h),
            queues: Mutex::default(),
            exchanges: Mutex::default(),
        }
    }

    /// A RabbitMQ at `url`: `amqp://user:password@host:port/vhost`.
    pub(crate) fn rabbitmq(url: &str) -> Target {
        let rest = url
            .strip_prefix("amqp://")
            .unwrap_or_else(|| panic!("{RABBITMQ_URL_VAR} must start with amqp://: {url}"));
        let (creds, rest) = rest
            .split_once('@')
            .unwrap_or_else(|| panic!("{RABBITMQ_URL_VAR} must hold user:password@: {url}"));
        let (user, password) = creds.split_once(':').unwrap_or((creds, ""));
        let (host_port, vhost) = rest.split_once('/').unwrap_or((rest, "%2f"));
        Target {
            label: "rabbitmq",
            host_port: host_port.into(),
            user: user.into(),
            password: password.into(),
            vhost: if vhost.is_empty() { "%2f" } else { vhost }.into(),
            prefix: unique_prefix(),
            tern: None,
            queues: Mutex::default(),
            exchanges: Mutex::default(),
        }
    }

    pub(crate) fn uri(&self, user: &str, password: &str, vhost: &str) -> String {
        format!("amqp://{user}:{password}@{}/{vhost}", self.host_port)
    }

    /// The host and the port apart, for clients that take them so.
    pub(crate) fn host_and_port(&self) -> (&str, u16) {
        let (host, port) = self
            .host_port
            .rsplit_once(':')
            .unwrap_or((&self.host_port, "5672"));
        (host, port.parse().unwrap())
    }

    /// The vhost itself (`/`), not URL-encoded.
    pub(crate) fn vhost_name(&self) -> String {
        self.vhost.replace("%2f", "/").replace("%2F", "/")
    }

    pub(crate) fn url(&self) -> String {
        self.uri(&self.user, &self.password, &self.vhost)
    }

    pub(crate) async fn connect(&self) -> Connection {
        Connection::connect(&self.url(), ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("connecting to {} ({}): {e:?}", self.label, self.url()))
    }

    /// The prefixed name of a queue the scenario declares; deleted afterwards.
    pub(crate) fn queue(&self, name: &str) -> String {
        let name = format!("{}{name}", self.prefix);
        self.queues.lock().unwrap().push(name.clone());
        name
    }

    /// The prefixed name of an exchange the scenario declares; deleted afterwards.
    pub(crate) fn exchange(&self, name: &str) -> String {
        let name = format!("{}{name}", self.prefix);
        self.exchanges.lock().unwrap().push(name.clone());
        name
    }

    /// A prefixed name for something that must not exist.
    pub(crate) fn missing(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Tern's broker, for looking inside; `None` on RabbitMQ.
    pub(crate) fn broker(&self) -> Option<&Broker> {
        self.tern.as_ref().map(|h| &h.broker)
    }

    /// Deletes what the scenario declared (what is already gone is fine).
    pub(crate) async fn cleanup(&self) {
        let queues = std::mem::take(&mut *self.queues.lock().unwrap());
        let exchanges = std::mem::take(&mut *self.exchanges.lock().unwrap());
        if queues.is_empty() && exchanges.is_empty() {
            return;
        }
        let Ok(conn) = Connection::connect(&self.url(), ConnectionProperties::default()).await
        else {
            eprintln!("{}: cleanup could not connect", self.label);
            return;
        };
        // A failed delete closes its channel: one channel per delete.
        for q in queues {
            if let Ok(ch) = conn.create_channel().await {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        for x in exchanges {
            if let Ok(ch) = conn.create_channel().await {
                let _ = ch
                    .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
        }
        let _ = conn.close(200, "cleanup".into()).await;
    }
}

/// Runs `scenario` against Tern, then against RabbitMQ if
/// `TERN_TEST_RABBITMQ_URL` is set (saying so when it is not).
pub(crate) async fn run_on_both<F, Fut>(scenario: F)
where
    F: Fn(Arc<Target>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    run_on(Arc::new(Target::tern().await), &scenario).await;
    match std::env::var(RABBITMQ_URL_VAR) {
        Ok(url) if !url.is_empty() => run_on(Arc::new(Target::rabbitmq(&url)), &scenario).await,
        _ => println!(
            "RabbitMQ half skipped: {RABBITMQ_URL_VAR} is not set \
             (set it to e.g. amqp://guest:guest@127.0.0.1:5672/%2f to check against RabbitMQ)"
        ),
    }
}

pub(crate) async fn run_on<F, Fut>(target: Arc<Target>, scenario: &F)
where
    F: Fn(Arc<Target>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    println!("running against {} at {}", target.label, target.host_port);
    // A task, so a failed assertion still lets the cleanup run.
    let outcome = tokio::spawn(scenario(target.clone())).await;
    target.cleanup().await;
    if let Err(e) = outcome {
        eprintln!("the scenario failed against {}", target.label);
        match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("the scenario against {} did not finish: {e}", target.label),
        }
    }
}

/// The AMQP reply code of a channel or connection error, if the broker
/// sent one.
pub(crate) fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}
