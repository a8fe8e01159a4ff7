//! `tern serve`: opens the broker on its data directory, serves AMQP and
//! the management HTTP API until SIGINT or SIGTERM, then shuts down in
//! order: the HTTP server (requests in flight finish), the AMQP server (stop
//! accepting and close the connections), then the broker (which flushes and
//! fsyncs the store).

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tern_amqp::{AmqpServer, TlsConfig};
use tern_broker::{Broker, BrokerConfig};
use tern_http::{HttpConfig, HttpServer, MetricsSource};

use crate::config::ServeConfig;

/// The port RabbitMQ and Tern both use for AMQP by default.
const AMQP_DEFAULT_PORT: u16 = 5672;
/// The port RabbitMQ and Tern both use for AMQP over TLS by default.
const AMQPS_DEFAULT_PORT: u16 = 5671;
/// The port RabbitMQ's management plugin and Tern's HTTP API use by default.
const HTTP_DEFAULT_PORT: u16 = 15672;
/// How often the metrics recorder drains its histogram buckets.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// The listener of one protocol, for resolving its address and reporting
/// a failure to bind it with what to change.
#[derive(Debug, Clone, Copy)]
struct Listener {
    protocol: &'static str,
    flag: &'static str,
    /// The key in the configuration file.
    key: &'static str,
    env: &'static str,
    default_port: u16,
    /// What usually holds the default port on a developer's machine.
    usual_holder: &'static str,
}

const AMQP: Listener = Listener {
    protocol: "AMQP",
    flag: "--amqp-addr",
    key: "amqp_addr",
    env: "TERN_AMQP_ADDR",
    default_port: AMQP_DEFAULT_PORT,
    usual_holder: "RabbitMQ, which also listens on 5672",
};

const AMQPS: Listener = Listener {
    protocol: "AMQPS",
    flag: "--amqps-addr",
    key: "amqps_addr",
    env: "TERN_AMQPS_ADDR",
    default_port: AMQPS_DEFAULT_PORT,
    usual_holder: "RabbitMQ, which also listens on 5671 with TLS",
};

const HTTP: Listener = Listener {
    protocol: "HTTP",
    flag: "--http-addr",
    key: "http_addr",
    env: "TERN_HTTP_ADDR",
    default_port: HTTP_DEFAULT_PORT,
    usual_holder: "RabbitMQ's management plugin, which also listens on 15672",
};

/// Runs the server until a shutdown signal; `Ok` after a clean shutdown.
pub(crate) fn run(args: ServeConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tern-worker")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServeConfig) -> anyhow::Result<()> {
    let amqp_addr = resolve(&args.amqp_addr, AMQP).await?;
    let http_addr = resolve(&args.http_addr, HTTP).await?;
    // The certificate and key are read before anything starts, so that a
    // bad file stops the start-up with nothing bound.
    let tls = match &args.tls {
        Some(settings) => {
            let addr = resolve(&settings.amqps_addr, AMQPS).await?;
            let config = TlsConfig::from_pem_files(&settings.tls_cert, &settings.tls_key)
                .context("cannot load the AMQPS certificate; check --tls-cert and --tls-key (or TERN_TLS_CERT and TERN_TLS_KEY, or `tls_cert` and `tls_key` in the --config file)")?;
            Some((addr, config))
        }
        None => None,
    };
    check_data_dir(&args.data_dir)?;
    // Signals are caught from here on, so that a signal arriving during
    // start-up still leads to an orderly shutdown rather than a kill.
    let mut shutdown = Shutdown::install()?;
    // Before the broker opens: it takes its metric handles as queues and
    // exchanges are created, and handles taken earlier would record nothing.
    let metrics = metrics_handle();

    let broker = Broker::open(BrokerConfig::new(&args.data_dir))
        .with_context(|| format!("cannot open the data directory {}", args.data_dir.display()))?;
    tracing::info!(data_dir = %args.data_dir.display(), "broker opened");
    // Sampling memory and disk until shutdown; publishers are blocked
    // while an alarm is raised.
    let _alarm_monitor = broker.alarms().monitor(args.alarms.limits, &args.data_dir);
    tokio::spawn(log_alarms(broker.alarms().subscribe()));

    let mut server = match AmqpServer::bind(amqp_addr, broker.clone()).await {
        Ok(server) => server,
        Err(e) => {
            let error = bind_error(AMQP, amqp_addr, &e);
            if let Err(close) = broker.close() {
                tracing::warn!("closing the broker: {close}");
            }
            return Err(error);
        }
    };
    if let Some((addr, config)) = tls {
        if let Err(e) = server.listen_tls(addr, config).await {
            let error = bind_error(AMQPS, addr, &e);
            server.shutdown().await;
            if let Err(close) = broker.close() {
                tracing::warn!("closing the broker: {close}");
            }
            return Err(error);
        }
    }
    let mut http_config = HttpConfig::default();
    if let Some(token) = &args.http_token {
        http_config = http_config.with_bearer_token(token.clone());
    }
    if let Some(handle) = metrics {
        http_config = http_config.with_metrics(MetricsSource::new(move || handle.render()));
    }
    let http = match HttpServer::bind(http_addr, broker.clone(), http_config).await {
        Ok(http) => http,
        Err(e) => {
            let error = bind_error(HTTP, http_addr, &e);
            server.shutdown().await;
            if let Err(close) = broker.close() {
                tracing::warn!("closing the broker: {close}");
            }
            return Err(error);
        }
    };
    // Announced once both listen, so that a failed start announces nothing.
    let local = server.local_addr();
    tracing::info!(addr = %local, "AMQP listening");
    println!("tern: AMQP listening on {local}");
    if let Some(tls_local) = server.tls_addr() {
        tracing::info!(addr = %tls_local, "AMQPS listening");
        println!("tern: AMQPS listening on {tls_local}");
    }
    let http_local = http.local_addr();
    tracing::info!(addr = %http_local, "HTTP listening");
    println!("tern: HTTP listening on {http_local}");
    println!("tern: data directory {}", args.data_dir.display());

    let signal = shutdown.wait().await;
    tracing::info!("{signal} received: shutting down");
    http.shutdown().await;
    tracing::info!("HTTP server stopped");
    server.shutdown().await;
    tracing::info!("connections closed");
    broker
        .close()
        .context("closing the broker (flushing the data directory)")?;
    tracing::info!("broker closed; bye");
    Ok(())
}

/// Logs every change of the resource alarms, with the settings that move them.
async fn log_alarms(mut alarms: tokio::sync::watch::Receiver<tern_broker::alarm::AlarmSet>) {
    while alarms.changed().await.is_ok() {
        let raised = alarms.borrow_and_update().raised();
        if raised.is_empty() {
            tracing::info!("resource alarms cleared: publishers unblocked");
        } else {
            let names: Vec<&str> = raised.iter().map(|r| r.as_str()).collect();
            tracing::warn!(
                alarms = ?names,
                "resource alarm raised: publishing connections are blocked until it clears (see --vm-memory-high-watermark and --disk-free-limit)"
            );
        }
    }
}

/// Installs the process's metrics recorder (Prometheus) and keeps its
/// upkeep running; the broker's metrics go to it from here on. `None` if a
/// recorder was already installed, when `/metrics` shows the broker's
/// queue gauges only.
fn metrics_handle() -> Option<PrometheusHandle> {
    match PrometheusBuilder::new().install_recorder() {
        Ok(handle) => {
            let upkeep = handle.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(METRICS_UPKEEP);
                loop {
                    tick.tick().await;
                    upkeep.run_upkeep();
                }
            });
            Some(handle)
        }
        Err(e) => {
            tracing::warn!("metrics recorder not installed: {e}");
            None
        }
    }
}

/// Resolves HOST:PORT (an IP address or a host name) to the first address.
async fn resolve(addr: &str, listener: Listener) -> anyhow::Result<SocketAddr> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(a);
    }
    let Listener { flag, env, .. } = listener;
    let mut addrs = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("{flag} / {env}: {addr:?} is not a HOST:PORT address"))?;
    addrs
        .next()
        .with_context(|| format!("{flag} / {env}: {addr:?} resolves to no address"))
}

/// Refuses data directories that cannot be Tern's: a path that is not a
/// directory, or a directory holding other files but no Tern store. The
/// storage layer then checks the store itself (format, lock).
fn check_data_dir(dir: &Path) -> anyhow::Result<()> {
    let meta = match std::fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot read the data directory {}", dir.display()))
        }
    };
    if !meta.is_dir() {
        bail!(
            "the data directory {} is not a directory; point --data-dir (or TERN_DATA_DIR) at a directory of its own",
            dir.display()
        );
    }
    let mut entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list the data directory {}", dir.display()))?;
    let has_store = dir.join("store").is_dir();
    if !has_store && entries.next().is_some() {
        bail!(
            "{} is not a Tern data directory: it holds other files but no Tern store; point --data-dir (or TERN_DATA_DIR) at an empty or new directory",
            dir.display()
        );
    }
    Ok(())
}

/// The error for a listener that could not be bound, with what to change.
fn bind_error(listener: Listener, addr: SocketAddr, e: &io::Error) -> anyhow::Error {
    let Listener {
        protocol,
        flag,
        key,
        env,
        default_port,
        usual_holder,
    } = listener;
    let mut message = format!("cannot listen for {protocol} on {addr}: ");
    if e.kind() == io::ErrorKind::AddrInUse {
        message.push_str("the address is already in use by another process");
        if addr.port() == default_port {
            message.push_str(&format!(
                " (probably {usual_holder}; `ss -ltnp 'sport = :{default_port}'` shows who)"
            ));
        }
    } else {
        message.push_str(&e.to_string());
    }
    message.push_str(&format!(
        "; choose another address with {flag} HOST:PORT, {env} or `{key}` in the --config file (port 0 picks a free one)"
    ));
    anyhow::Error::msg(message)
}

/// The signals that end `tern serve`: SIGINT (Ctrl-C) and, on Unix, SIGTERM.
struct Shutdown {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Shutdown {
    fn install() -> anyhow::Result<Shutdown> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Shutdown {
                term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
                int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Shutdown {})
        }
    }

    /// Waits for the first signal and names it.
    async fn wait(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}
