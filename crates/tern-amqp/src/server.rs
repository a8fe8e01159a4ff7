//! The listener: [`AmqpServer`] binds a TCP address, accepts connections on
//! a spawned task, serves each on its own task, and on shutdown stops
//! accepting and closes open connections with 320 CONNECTION_FORCED.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tern_broker::Broker;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::connection;

/// An AMQP 0-9-1 server over a [`Broker`]. Dropping it stops accepting
/// connections and closes the open ones; [`AmqpServer::shutdown`] also
/// waits for them to finish.
#[derive(Debug)]
pub struct AmqpServer {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    accept: Option<JoinHandle<()>>,
}

impl AmqpServer {
    /// Binds `addr` and starts accepting connections on the current tokio
    /// runtime. Port 0 picks a free port; see [`AmqpServer::local_addr`].
    pub async fn bind(addr: SocketAddr, broker: Broker) -> io::Result<AmqpServer> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(listener, broker, stopped));
        Ok(AmqpServer {
            local_addr,
            stop,
            accept: Some(accept),
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, closes every open connection (320 CONNECTION_FORCED)
    /// and waits until they have ended.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(accept) = self.accept.take() {
            let _ = accept.await;
        }
    }
}

impl Drop for AmqpServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn accept_loop(listener: TcpListener, broker: Broker, mut stopped: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    connections.spawn(connection::serve(stream, broker.clone(), stopped.clone()));
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
