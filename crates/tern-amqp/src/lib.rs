//! Tern's AMQP 0-9-1 front door: a TCP server that speaks RabbitMQ's
//! protocol over a [`tern_broker::Broker`].
//!
//! Frames are parsed and serialised by the `amq-protocol` crate; this crate
//! owns the protocol's state machines: the connection handshake (PLAIN and
//! AMQPLAIN authentication against the broker's users, tuning, heartbeats,
//! vhost access), channels with RabbitMQ's permission checks, content assembly,
//! deliveries, publisher confirms, transactions, direct reply-to
//! (`amq.rabbitmq.reply-to`) and the mapping of broker errors onto
//! `channel.close` / `connection.close` reply codes.
//!
//! ```no_run
//! # async fn demo(broker: tern_broker::Broker) -> std::io::Result<()> {
//! let server = tern_amqp::AmqpServer::bind("127.0.0.1:5672".parse().unwrap(), broker).await?;
//! println!("listening on {}", server.local_addr());
//! server.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! [`AmqpServer::listen_tls`] serves the same protocol over TLS (AMQPS) with
//! a [`TlsConfig`] loaded from PEM files.
//!
//! While a resource alarm of the broker is raised, connections that publish
//! are blocked (`connection.blocked`, and no more reads) until it clears.
//!
//! Not built yet: client certificates (and the EXTERNAL mechanism).

mod auth;
mod channel;
mod connection;
mod convert;
mod error;
mod flow;
mod frame;
mod reply_to;
mod server;
mod tls;
mod transaction;
mod writer;

pub use error::AmqpError;
pub use server::AmqpServer;
pub use tls::{TlsConfig, TlsError};
