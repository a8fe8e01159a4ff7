//! Tern's AMQP 0-9-1 front door: a TCP server that speaks RabbitMQ's
//! protocol over a [`tern_broker::Broker`].
//!
//! Frames are parsed and serialised by the `amq-protocol` crate; this crate
//! owns the protocol's state machines: the connection handshake (PLAIN
//! authentication, tuning, heartbeats, vhost), channels, content assembly,
//! deliveries, publisher confirms and the mapping of broker errors onto
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
//! Not built yet: TLS, transactions (`tx.select` is refused with 540),
//! users and permissions (only `guest`/`guest` is accepted, with PLAIN),
//! `connection.blocked`, direct reply-to (`amq.rabbitmq.reply-to`), and
//! validation of the `user-id` property.

mod channel;
mod connection;
mod convert;
mod error;
mod frame;
mod server;
mod writer;

pub use error::AmqpError;
pub use server::AmqpServer;
