//! `tern serve`: opens the broker on its data directory, serves AMQP until
//! SIGINT or SIGTERM, then shuts down in order: stop accepting and close the
//! connections, then close the broker (which flushes and fsyncs the store).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use tern_amqp::AmqpServer;
use tern_broker::{Broker, BrokerConfig};

/// The port RabbitMQ and Tern both use for AMQP by default.
const AMQP_DEFAULT_PORT: u16 = 5672;

/// Flags of `tern serve`. Each has an environment variable; a flag given on
/// the command line wins over the variable.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Directory holding the broker's durable data; created if missing.
    #[arg(
        long,
        env = "TERN_DATA_DIR",
        value_name = "DIR",
        default_value = "./tern-data"
    )]
    data_dir: PathBuf,

    /// Address to accept AMQP 0-9-1 connections on; port 0 picks a free port.
    #[arg(
        long,
        env = "TERN_AMQP_ADDR",
        value_name = "HOST:PORT",
        default_value = "127.0.0.1:5672"
    )]
    amqp_addr: String,
}

/// Runs the server until a shutdown signal; `Ok` after a clean shutdown.
pub(crate) fn run(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tern-worker")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let amqp_addr = resolve(&args.amqp_addr).await?;
    check_data_dir(&args.data_dir)?;
    // Signals are caught from here on, so that a signal arriving during
    // start-up still leads to an orderly shutdown rather than a kill.
    let mut shutdown = Shutdown::install()?;

    let broker = Broker::open(BrokerConfig::new(&args.data_dir))
        .with_context(|| format!("cannot open the data directory {}", args.data_dir.display()))?;
    tracing::info!(data_dir = %args.data_dir.display(), "broker opened");

    let server = match AmqpServer::bind(amqp_addr, broker.clone()).await {
        Ok(server) => server,
        Err(e) => {
            let error = bind_error(amqp_addr, &e);
            if let Err(close) = broker.close() {
                tracing::warn!("closing the broker: {close}");
            }
            return Err(error);
        }
    };
    let local = server.local_addr();
    tracing::info!(addr = %local, "AMQP listening");
    println!("tern: AMQP listening on {local}");
    println!("tern: data directory {}", args.data_dir.display());

    let signal = shutdown.wait().await;
    tracing::info!("{signal} received: shutting down");
    server.shutdown().await;
    tracing::info!("connections closed");
    broker
        .close()
        .context("closing the broker (flushing the data directory)")?;
    tracing::info!("broker closed; bye");
    Ok(())
}

/// Resolves HOST:PORT (an IP address or a host name) to the first address.
async fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return Ok(a);
    }
    let mut addrs = tokio::net::lookup_host(addr).await.with_context(|| {
        format!("--amqp-addr / TERN_AMQP_ADDR: {addr:?} is not a HOST:PORT address")
    })?;
    addrs
        .next()
        .with_context(|| format!("--amqp-addr / TERN_AMQP_ADDR: {addr:?} resolves to no address"))
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
fn bind_error(addr: SocketAddr, e: &io::Error) -> anyhow::Error {
    let mut message = format!("cannot listen for AMQP on {addr}: ");
    if e.kind() == io::ErrorKind::AddrInUse {
        message.push_str("the address is already in use by another process");
        if addr.port() == AMQP_DEFAULT_PORT {
            message.push_str(
                " (probably RabbitMQ, which also listens on 5672; `ss -ltnp 'sport = :5672'` shows who)",
            );
        }
    } else {
        message.push_str(&e.to_string());
    }
    message.push_str(
        "; choose another address with --amqp-addr HOST:PORT or TERN_AMQP_ADDR (port 0 picks a free one)",
    );
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
