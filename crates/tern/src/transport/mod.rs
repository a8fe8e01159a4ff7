//! The one interface every transport implements, and the topology they share.
//!
//! A transport moves [`Envelope`]s. It does four things:
//! - [`Transport::send`] an envelope along a [`Route`], returning only once
//!   the broker has durably accepted it (a publisher confirm, a JetStream
//!   ack, or the embedded broker's fsync);
//! - [`Transport::subscribe`] a service to the types it handles, through
//!   one durable subscription per service that its instances share, so
//!   instances compete and messages wait while the service is down;
//! - settle each [`Incoming`] message with an [`Outcome`]: ack, retry after
//!   a delay (the transport holds the message for the delay, not the
//!   handler), dead-letter, or requeue;
//! - open a [`Transport::reply_inbox`] for request/reply.
//!
//! And, where the broker can: [`Transport::send_after`] (a durable delay),
//! [`Transport::record_events`] and [`Transport::replay`] (event streams),
//! and deduplication by an envelope's [`Envelope::dedup_id`] for services
//! whose [`SubscriptionSpec::dedup`] asks for it. A transport that cannot
//! answers [`TransportError::Unsupported`], naming itself and the feature.
//!
//! Delivery is at least once: a message is acked only after its handler
//! finished, so a process that dies mid-message gets it redelivered. A
//! replay is ordered by stream offset and, when named, at least once: an
//! event is committed when the next one is asked for.
//!
//! # Topology (embedded and AMQP)
//! | name | what |
//! |---|---|
//! | exchange `tern.events` (topic) | events, routed by their type |
//! | exchange `tern.commands` (direct) | commands and queries, routed by their type |
//! | queue `SERVICE` | the service's shared subscription, bound to each type it handles |
//! | queue `SERVICE.dlq` | messages that ran out of attempts, with the error in headers |
//! | queue `SERVICE.retry.N` | AMQP only: attempt N waiting out its backoff (per-message TTL), then dead-lettered back to `SERVICE` |
//! | stream queue `tern.stream.TYPE` (AMQP: `NAMESPACE.stream.TYPE`) | events of one type recorded for replay, bound to `tern.events` |
//! | queue `tern.scheduler` (deduplicating) | the ticks of recurring schedules (see [`crate::schedule`]) |
//!
//! A service started with [`crate::Service::deduplicate`] has its queue
//! declared with `x-message-deduplication` and `x-cache-ttl`; a dedup id
//! travels as `x-deduplication-header`.
//!
//! The embedded transport needs no retry queues: a retry is a delayed
//! publish to `SERVICE` through the broker's durable timer index, which
//! fires it at its due time whatever else waits.
//!
//! # Topology (NATS JetStream)
//! | name | what |
//! |---|---|
//! | stream `TERN_EVENTS` (`tern.events.>`) | events, on subject `tern.events.TYPE` |
//! | stream `TERN_COMMANDS` (`tern.commands.>`) | commands and queries, on subject `tern.commands.TYPE` |
//! | durable pull consumer `SERVICE__TYPE` | the service's shared subscription, one per type it handles |
//! | stream `TERN_DLQ` (`tern.dlq.>`) | dead letters, on subject `tern.dlq.SERVICE`, with the error in headers |
//! | stream `TERN_LOG_TYPE` (sourced from `TERN_EVENTS`) | events of one type recorded for replay |
//!
//! Retries need no queues there: a retry is a `-NAK` with a delay, and
//! JetStream holds the message. See [`nats`] for the details.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use crate::envelope::Envelope;
use crate::error::TransportError;

pub mod embedded;
mod mapping;
pub mod memory;

#[cfg(feature = "amqp")]
pub mod amqp;

#[cfg(feature = "nats")]
pub mod nats;

/// A boxed, sendable future, so that transports can be chosen at run time.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The exchange events are published to.
pub const EVENTS_EXCHANGE: &str = "tern.events";
/// The exchange commands and queries are sent to.
pub const COMMANDS_EXCHANGE: &str = "tern.commands";
/// The header that counts a message's handling attempts (1 on first delivery).
pub const ATTEMPT_HEADER: &str = "tern-attempt";
/// The header that records why a message was dead-lettered.
pub const ERROR_HEADER: &str = "tern-error";
/// The header naming the service that dead-lettered a message.
pub const FAILED_SERVICE_HEADER: &str = "tern-failed-service";

/// The stream queue (embedded and AMQP) that records events of type `ty`
/// for replay.
pub fn event_stream(ty: &str) -> String {
    format!("tern.stream.{ty}")
}

/// The queue of a service's dead letters.
pub fn dead_letter_queue(service: &str) -> String {
    format!("{service}.dlq")
}

/// The queue where attempt `attempt` of a service's messages waits out its
/// backoff. One per attempt keeps the waits in each queue of one order of
/// magnitude, so a message is never held much past its due time behind a
/// longer one (per-message TTLs only expire at a queue's head).
pub fn retry_queue(service: &str, attempt: u32) -> String {
    format!("{service}.retry.{attempt}")
}

/// Where an outgoing envelope goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// To every service subscribed to the envelope's type.
    Event,
    /// To the one service that handles the envelope's type. Fails with
    /// [`TransportError::NoHandler`] if no service handles it.
    Command,
    /// Like a command, and the answer goes to `reply_to`.
    Query {
        /// The asker's reply address, from [`ReplyInbox::address`].
        reply_to: String,
    },
    /// An answer, straight to an asker's reply address.
    Reply {
        /// The asker's reply address.
        to: String,
    },
}

/// What a service subscribes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionSpec {
    /// The service's name: its instances share one subscription.
    pub service: String,
    /// The event types it handles.
    pub events: Vec<String>,
    /// The command and query types it handles.
    pub commands: Vec<String>,
    /// How many unsettled messages one instance may hold at once.
    pub prefetch: u16,
    /// When set, the broker drops a message whose dedup id it saw within
    /// this window (see [`crate::SendOptions::dedup_id`]).
    pub dedup: Option<Duration>,
}

/// How a handled message is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done: remove it.
    Ack,
    /// Handle it again after `after`: as the next attempt if this one was
    /// `attempted`, or as the same attempt if the handler never ran (a
    /// deferral by an open circuit breaker).
    Retry {
        /// How long the transport holds it first.
        after: Duration,
        /// What went wrong this time.
        error: String,
        /// Whether this counted as an attempt.
        attempted: bool,
    },
    /// Give up: move it to the service's dead-letter queue with the reason.
    DeadLetter {
        /// What went wrong.
        error: String,
    },
    /// Put it back at once, without counting an attempt (a shutdown, say).
    Requeue,
}

/// Settles one incoming message. Each transport has its own.
pub trait Settle: Send + 'static {
    /// Applies the outcome. Resolves once the transport has it: for a retry
    /// or a dead letter, the copy is durable before the original is acked.
    fn settle(self: Box<Self>, outcome: Outcome) -> BoxFuture<'static, Result<(), TransportError>>;
}

/// A message delivered to a service.
pub struct Incoming {
    /// The envelope.
    pub envelope: Envelope,
    /// For a query, where the answer goes.
    pub reply_to: Option<String>,
    /// Which attempt this is, from 1.
    pub attempt: u32,
    /// Whether the broker delivered it before (to a consumer that did not
    /// settle it).
    pub redelivered: bool,
    /// How to settle it.
    pub settle: Box<dyn Settle>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("type", &self.envelope.ty)
            .field("id", &self.envelope.id)
            .field("attempt", &self.attempt)
            .field("redelivered", &self.redelivered)
            .finish_non_exhaustive()
    }
}

/// A service's stream of incoming messages.
pub trait Subscription: Send {
    /// The next message, or `None` once the subscription is cancelled or
    /// the connection is gone.
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Incoming, TransportError>>>;

    /// Stops taking new messages. Messages already received can still be
    /// settled; anything prefetched but not yet returned by `next` goes
    /// back to the broker when the subscription is dropped.
    fn cancel(&mut self) -> BoxFuture<'_, Result<(), TransportError>>;
}

/// Where a replay starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayFrom {
    /// The oldest event the stream still holds.
    First,
    /// The event at this offset (0 is the first event ever recorded), or
    /// the oldest held if that one has gone.
    Offset(u64),
    /// The first event recorded at or after this time. Embedded and AMQP
    /// read it to the second (AMQP timestamps are whole seconds); NATS to
    /// the nanosecond.
    Time(SystemTime),
    /// Only events recorded after the replay starts.
    Next,
}

/// A replay to open: which event type, from where, and under which name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplaySpec {
    /// The event type.
    pub ty: String,
    /// Where to start when there is no committed offset to resume from.
    pub from: ReplayFrom,
    /// A named replay's position is kept by the broker: reopened under the
    /// same name, it resumes after the last event it moved past.
    pub name: Option<String>,
    /// How many events the broker sends ahead of the reader.
    pub prefetch: u16,
}

/// One event read from a stream.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Its offset in the stream of its type, from 0.
    pub offset: u64,
    /// The envelope.
    pub envelope: Envelope,
}

/// An open replay. Reading the next event acknowledges the one before it
/// (for a named replay, commits its offset), so a reader that dies while
/// handling an event reads that event again when it resumes: at least once.
pub trait ReplaySource: Send {
    /// The next event, waiting for one to be recorded at the stream's end;
    /// `None` once the connection is gone.
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Recorded, TransportError>>>;
}

/// Where the answers to one bus's queries arrive.
pub trait ReplyInbox: Send {
    /// The address to put in a query's `reply_to`.
    fn address(&self) -> &str;
    /// The next answer, or `None` once the inbox is gone.
    fn next(&mut self) -> BoxFuture<'_, Option<Envelope>>;
}

/// Moves envelopes between services. See the module docs.
pub trait Transport: Send + Sync + 'static {
    /// A short name for logs and errors (`embedded`, `amqp`, `nats`).
    fn name(&self) -> &'static str;

    /// Sends an envelope along a route; resolves once the broker has it
    /// durably.
    fn send(&self, route: Route, envelope: Envelope) -> BoxFuture<'_, Result<(), TransportError>>;

    /// Whether [`Transport::send_after`] works: the broker holds messages
    /// for later, durably.
    fn delays_messages(&self) -> bool {
        false
    }

    /// Sends an event or a command to be delivered `delay` from now,
    /// durably: a send that returned survives a broker restart. Transports
    /// that cannot hold messages for later say so with
    /// [`TransportError::Unsupported`]. A delayed command is not checked for
    /// a handler: one that nobody handles at its due time is dropped.
    fn send_after(
        &self,
        route: Route,
        envelope: Envelope,
        delay: Duration,
    ) -> BoxFuture<'_, Result<(), TransportError>> {
        let _ = (route, envelope, delay);
        let transport = self.name();
        Box::pin(async move {
            Err(TransportError::Unsupported {
                transport,
                what: "send a message for later (scheduled and delayed sends need the embedded \
                       transport, or AMQP with a broker that delays messages)"
                    .into(),
            })
        })
    }

    /// Declares the service's subscription (and its dead-letter and retry
    /// places) and starts receiving from it.
    fn subscribe(
        &self,
        spec: SubscriptionSpec,
    ) -> BoxFuture<'_, Result<Box<dyn Subscription>, TransportError>>;

    /// Starts recording events of type `ty` in a stream that can be
    /// replayed (idempotent). Events published before are not in it.
    fn record_events(&self, ty: &str) -> BoxFuture<'_, Result<(), TransportError>> {
        let what = format!("record events of type `{ty}` for replay (it has no streams)");
        let transport = self.name();
        Box::pin(async move { Err(TransportError::Unsupported { transport, what }) })
    }

    /// Opens a replay of a recorded event stream (recording it from now on
    /// if it was not).
    fn replay(
        &self,
        spec: ReplaySpec,
    ) -> BoxFuture<'_, Result<Box<dyn ReplaySource>, TransportError>> {
        let what = format!("replay events of type `{}` (it has no streams)", spec.ty);
        let transport = self.name();
        Box::pin(async move { Err(TransportError::Unsupported { transport, what }) })
    }

    /// Opens an inbox for answers to queries, private to the caller.
    fn reply_inbox(&self) -> BoxFuture<'_, Result<Box<dyn ReplyInbox>, TransportError>>;
}
