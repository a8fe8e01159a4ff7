//! The listeners: [`AmqpServer`] binds a TCP address (and, optionally, an
//! AMQPS address through [`TlsConfig`]), accepts connections on a spawned
//! task per listener, serves each connection on its own task, and on
//! shutdown stops accepting and closes open connections with 320
//! CONNECTION_FORCED. Both listeners share the broker, the direct reply-to
//! registry and the shutdown signal, so a reply address taken over TLS is
//! reachable from a plain connection and the other way round.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tern_broker::Broker;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::connection::{self, HANDSHAKE_TIMEOUT};
use crate::reply_to::ReplyRegistry;
use crate::tls::TlsConfig;

/// An AMQP 0-9-1 server over a [`Broker`]. Dropping it stops accepting
/// connections and closes the open ones; [`AmqpServer::shutdown`] also
/// waits for them to finish.
#[derive(Debug)]
pub struct AmqpServer {
    local_addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    broker: Broker,
    replies: ReplyRegistry,
    stop: watch::Sender<bool>,
    accepts: Vec<JoinHandle<()>>,
}

/// What an accepted socket goes through before AMQP starts.
#[derive(Debug, Clone)]
enum Transport {
    Plain,
    Tls(TlsConfig),
}

impl AmqpServer {
    /// Binds `addr` and starts accepting connections on the current tokio
    /// runtime. Port 0 picks a free port; see [`AmqpServer::local_addr`].
    pub async fn bind(addr: SocketAddr, broker: Broker) -> io::Result<AmqpServer> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let (stop, _) = watch::channel(false);
        let mut server = AmqpServer {
            local_addr,
            tls_addr: None,
            broker,
            // Direct reply-to addresses are reachable from every connection.
            replies: ReplyRegistry::default(),
            stop,
            accepts: Vec::new(),
        };
        server.start(listener, Transport::Plain);
        Ok(server)
    }

    /// Also serves AMQP over TLS (AMQPS) on `addr`, with the same broker.
    /// Returns the bound address (port 0 picks a free port). A client whose
    /// TLS handshake fails is logged and disconnected; nothing else is
    /// affected.
    pub async fn listen_tls(&mut self, addr: SocketAddr, tls: TlsConfig) -> io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        self.tls_addr = Some(local);
        self.start(listener, Transport::Tls(tls));
        Ok(local)
    }

    fn start(&mut self, listener: TcpListener, transport: Transport) {
        let accept = tokio::spawn(accept_loop(
            listener,
            transport,
            self.broker.clone(),
            self.replies.clone(),
            self.stop.subscribe(),
        ));
        self.accepts.push(accept);
    }

    /// The address the plain (TCP) listener listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address the AMQPS listener listens on, if there is one.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// Stops accepting, closes every open connection (320 CONNECTION_FORCED)
    /// and waits until they have ended.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for accept in self.accepts.drain(..) {
            let _ = accept.await;
        }
    }
}

impl Drop for AmqpServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn accept_loop(
    listener: TcpListener,
    transport: Transport,
    broker: Broker,
    replies: ReplyRegistry,
    mut stopped: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    connections.spawn(serve_socket(
                        stream,
                        transport.clone(),
                        broker.clone(),
                        replies.clone(),
                        stopped.clone(),
                    ));
                }
                // Out of file descriptors and the like: back off, keep serving.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            changed = stopped.changed() => {
                if changed.is_err() || *stopped.borrow() {
                    break;
                }
            }
        }
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Serves one accepted socket: straight to AMQP, or through a TLS handshake
/// first. The handshake has the same time limit as AMQP's own, and a socket
/// still in it at shutdown is dropped.
async fn serve_socket(
    stream: TcpStream,
    transport: Transport,
    broker: Broker,
    replies: ReplyRegistry,
    shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let addrs = stream.peer_addr().ok().zip(stream.local_addr().ok());
    match transport {
        Transport::Plain => {
            let (read, write) = stream.into_split();
            connection::serve(read, write, addrs, broker, replies, shutdown).await;
        }
        Transport::Tls(tls) => {
            let mut stop = shutdown.clone();
            let handshake = tokio::select! {
                done = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)) => done,
                _ = stop.wait_for(|stopped| *stopped) => return,
            };
            let peer = addrs.map(|(peer, _)| peer.to_string()).unwrap_or_default();
            match handshake {
                Ok(Ok(stream)) => {
                    let (read, write) = tokio::io::split(stream);
                    connection::serve(read, write, addrs, broker, replies, shutdown).await;
                }
                Ok(Err(e)) => tracing::info!(%peer, "AMQPS: TLS handshake failed: {e}"),
                Err(_) => tracing::info!(%peer, "AMQPS: TLS handshake timed out"),
            }
        }
    }
}
