//! Tern's toolkit for services that talk by messages.
//!
//! Commands go to exactly one handler, events go to every interested
//! service, and queries are answered asynchronously. Messages travel in a
//! CloudEvents envelope that carries correlation and causation ids, over a
//! transport chosen by URL: Tern's broker in process (`embedded:DIR`, the
//! default, no set-up), AMQP 0-9-1 (`amqp://`, Tern or RabbitMQ) or NATS
//! JetStream (`nats://`).
//!
//! A whole service:
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use tern::{Bus, Context, HandlerError, Service};
//!
//! #[derive(Serialize, Deserialize)]
//! struct PlaceOrder { order_id: u64 }
//! #[derive(Serialize, Deserialize)]
//! struct OrderPlaced { order_id: u64 }
//! tern::message!(command PlaceOrder = "orders.place-order.v1");
//! tern::message!(event OrderPlaced = "orders.order-placed.v1");
//!
//! async fn place(cmd: PlaceOrder, ctx: Context) -> Result<(), HandlerError> {
//!     // ... store the order, idempotently: delivery is at least once ...
//!     ctx.publish(&OrderPlaced { order_id: cmd.order_id }).await?;
//!     Ok(())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let url = format!("embedded:{}", dir.path().display());
//! let bus = Bus::connect(&url).await?;
//! let orders = bus.start(Service::new("orders").on_command(place)).await?;
//! let shipping = bus
//!     .start(Service::new("shipping").on_event(|e: OrderPlaced, _ctx: Context| async move {
//!         println!("shipping order {}", e.order_id);
//!         Ok(())
//!     }))
//!     .await?;
//! bus.send(&PlaceOrder { order_id: 7 }).await?;
//! # tokio::time::sleep(std::time::Duration::from_millis(200)).await;
//! shipping.shutdown().await?;
//! orders.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! The modules, and what each guarantees:
//! - [`message`]: typed messages and the [`message!`] macro;
//! - [`envelope`]: the CloudEvents envelope and its binary-mode mapping;
//! - [`bus`]: sending; a send returns once the broker holds the message durably;
//! - [`router`]: running a service; at least once, ordered per key, graceful shutdown;
//! - [`replay`]: reading a recorded event stream from an offset or a time; ordered, and at
//!   least once for a named replay, which resumes where it stopped;
//! - [`schedule`]: recurring schedules kept in the broker as a chain of delayed ticks; at
//!   least once, never twice for a deduplicating target;
//! - [`middleware`]: retry, circuit breaker, rate limit, timeout, panic recovery, tracing, metrics;
//! - [`transport`]: the transport interface, the topology, and each transport.

pub mod bus;
pub mod context;
pub mod envelope;
pub mod error;
pub mod message;
pub mod middleware;
pub mod replay;
pub mod router;
pub mod schedule;
pub mod testing;
pub mod trace;
pub mod transport;

pub use bus::{Bus, SendOptions};
pub use context::Context;
pub use envelope::Envelope;
pub use error::{BusError, HandlerError, TransportError};
pub use message::{Codec, Command, Event, Json, Message, MessageKind, Query};
pub use replay::{Replay, ReplayFrom, Replayed, Replaying};
pub use router::{Running, Service};
pub use schedule::Cadence;
