//! The bus: publish events, send commands, ask queries.
//!
//! A [`Bus`] wraps one transport. Every send resolves only once the broker
//! holds the message durably, so a returned `Ok` survives a broker crash.
//! Inside a handler, use the handler's [`Context`] instead: what it sends
//! carries the conversation's correlation id and names the handled message
//! as its cause.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;

use crate::envelope::Envelope;
use crate::error::{BusError, TransportError};
use crate::message::{Codec, Command, Event, Message, Query};
use crate::transport::{Route, Transport};

/// How long [`Bus::request`] waits for an answer unless told otherwise.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The CloudEvents extension that carries a failed query's error.
pub(crate) const QUERY_ERROR_EXTENSION: &str = "ternerror";

/// Per-message options for a send.
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    /// The ordering key: messages with the same key are handled in order by
    /// one router (see [`crate::router`]).
    pub partition_key: Option<String>,
    /// The CloudEvents `subject`.
    pub subject: Option<String>,
    /// For [`Bus::request_with`], how long to wait for the answer.
    pub timeout: Option<Duration>,
    /// The deduplication id: sends with the same id within the broker's
    /// window are delivered once (see [`SendOptions::dedup_id`]).
    pub dedup_id: Option<String>,
}

impl SendOptions {
    /// Sets the ordering key.
    pub fn key(mut self, key: impl Into<String>) -> SendOptions {
        self.partition_key = Some(key.into());
        self
    }

    /// Sets the subject.
    pub fn subject(mut self, subject: impl Into<String>) -> SendOptions {
        self.subject = Some(subject.into());
        self
    }

    /// Sets the deduplication id. By default a message has none, and a
    /// publisher that retries a send after an error may deliver it twice;
    /// with an id derived from what the message means (an order number,
    /// say), the broker delivers the first send within its window and
    /// confirms the others without delivering them. Embedded, AMQP (to
    /// Tern) and memory honour it for services started with
    /// [`crate::Service::deduplicate`]; NATS JetStream honours it in the
    /// stream's duplicate window (two minutes by default). AMQP without
    /// [`crate::transport::amqp::AmqpOptions::deduplication`] refuses the
    /// send with [`TransportError::Unsupported`].
    pub fn dedup_id(mut self, id: impl Into<String>) -> SendOptions {
        self.dedup_id = Some(id.into());
        self
    }

    /// Sets a query's timeout.
    pub fn timeout(mut self, timeout: Duration) -> SendOptions {
        self.timeout = Some(timeout);
        self
    }
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<Envelope>>>>;

struct Replies {
    address: String,
    waiters: Waiters,
}

struct Inner {
    transport: Arc<dyn Transport>,
    source: String,
    replies: tokio::sync::Mutex<Option<Replies>>,
}

/// A handle to a transport for sending. Clones share it.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("transport", &self.inner.transport.name())
            .field("source", &self.inner.source)
            .finish()
    }
}

impl Bus {
    /// A bus over `transport`.
    pub fn new(transport: impl Transport) -> Bus {
        Bus::from_arc(Arc::new(transport))
    }

    /// A bus over a shared transport.
    pub fn from_arc(transport: Arc<dyn Transport>) -> Bus {
        Bus {
            inner: Arc::new(Inner {
                transport,
                source: "tern://bus".to_string(),
                replies: tokio::sync::Mutex::new(None),
            }),
        }
    }

    /// Connects by URL: `embedded:DIR` opens Tern's broker in process,
    /// `amqp://…` connects to Tern or RabbitMQ (with the `amqp` feature), and
    /// `nats://…` to NATS JetStream (with the `nats` feature).
    pub async fn connect(url: &str) -> Result<Bus, BusError> {
        if let Some(dir) = url.strip_prefix("embedded:") {
            let dir = if dir.is_empty() { "./tern-data" } else { dir };
            return Ok(Bus::new(
                crate::transport::embedded::Embedded::open(dir).await?,
            ));
        }
        #[cfg(feature = "amqp")]
        if url.starts_with("amqp://") || url.starts_with("amqps://") {
            return Ok(Bus::new(crate::transport::amqp::Amqp::connect(url).await?));
        }
        #[cfg(feature = "nats")]
        if url.starts_with("nats://") {
            return Ok(Bus::new(crate::transport::nats::Nats::connect(url).await?));
        }
        Err(TransportError::UnsupportedUrl(url.to_string()).into())
    }

    /// The same bus, naming `source` as the producer of what it sends.
    pub fn with_source(&self, source: impl Into<String>) -> Bus {
        Bus {
            inner: Arc::new(Inner {
                transport: Arc::clone(&self.inner.transport),
                source: source.into(),
                replies: tokio::sync::Mutex::new(None),
            }),
        }
    }

    /// The `source` this bus writes on what it sends.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// The transport underneath.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.inner.transport
    }

    /// Publishes an event to every service subscribed to it.
    pub async fn publish<E: Event>(&self, event: &E) -> Result<(), BusError> {
        self.publish_with(event, SendOptions::default()).await
    }

    /// Publishes an event with options.
    pub async fn publish_with<E: Event>(
        &self,
        event: &E,
        options: SendOptions,
    ) -> Result<(), BusError> {
        let (envelope, _span) = self.envelope(event, &options, None, None)?;
        self.inner.transport.send(Route::Event, envelope).await?;
        Ok(())
    }

    /// Sends a command to the one service that handles it. Fails with
    /// [`TransportError::NoHandler`] if none does.
    pub async fn send<C: Command>(&self, command: &C) -> Result<(), BusError> {
        self.send_with(command, SendOptions::default()).await
    }

    /// Sends a command with options.
    pub async fn send_with<C: Command>(
        &self,
        command: &C,
        options: SendOptions,
    ) -> Result<(), BusError> {
        let (envelope, _span) = self.envelope(command, &options, None, None)?;
        self.inner.transport.send(Route::Command, envelope).await?;
        Ok(())
    }

    /// Sends a command to be handled `delay` from now. The broker holds it
    /// durably meanwhile (the embedded broker's timer index, or an AMQP
    /// broker's `x-delayed-message` exchange when the transport is told to
    /// use one); transports that cannot fail with
    /// [`TransportError::Unsupported`].
    pub async fn send_after<C: Command>(
        &self,
        command: &C,
        delay: Duration,
    ) -> Result<(), BusError> {
        let (envelope, _span) = self.envelope(command, &SendOptions::default(), None, None)?;
        self.inner
            .transport
            .send_after(Route::Command, envelope, delay)
            .await?;
        Ok(())
    }

    /// Sends a command to be handled at `at` (at once if that has passed).
    pub async fn send_at<C: Command>(&self, command: &C, at: SystemTime) -> Result<(), BusError> {
        let delay = at.duration_since(SystemTime::now()).unwrap_or_default();
        self.send_after(command, delay).await
    }

    /// Publishes an event to be delivered `delay` from now, like
    /// [`Bus::send_after`].
    pub async fn publish_after<E: Event>(
        &self,
        event: &E,
        delay: Duration,
    ) -> Result<(), BusError> {
        let (envelope, _span) = self.envelope(event, &SendOptions::default(), None, None)?;
        self.inner
            .transport
            .send_after(Route::Event, envelope, delay)
            .await?;
        Ok(())
    }

    /// Asks a query and waits for its typed answer (30 seconds at most).
    pub async fn request<Q: Query>(&self, query: &Q) -> Result<Q::Reply, BusError> {
        self.request_with(query, SendOptions::default()).await
    }

    /// Asks a query with options, such as its timeout.
    pub async fn request_with<Q: Query>(
        &self,
        query: &Q,
        options: SendOptions,
    ) -> Result<Q::Reply, BusError> {
        let (envelope, _span) = self.envelope(query, &options, None, None)?;
        self.ask::<Q>(envelope, options.timeout).await
    }

    pub(crate) async fn ask<Q: Query>(
        &self,
        envelope: Envelope,
        timeout: Option<Duration>,
    ) -> Result<Q::Reply, BusError> {
        let timeout = timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT);
        let (address, waiters) = self.replies().await?;
        let id = envelope.id.clone();
        let (tx, rx) = oneshot::channel();
        lock(&waiters).insert(id.clone(), tx);
        let forget = |waiters: &Waiters| {
            lock(waiters).remove(&id);
        };
        if let Err(e) = self
            .inner
            .transport
            .send(Route::Query { reply_to: address }, envelope)
            .await
        {
            forget(&waiters);
            return Err(e.into());
        }
        let answer = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => {
                return Err(TransportError::Closed(self.inner.transport.name()).into());
            }
            Err(_) => {
                forget(&waiters);
                return Err(BusError::Timeout {
                    ty: Q::TYPE.to_string(),
                    after: timeout,
                });
            }
        };
        if let Some(reason) = answer.extensions.get(QUERY_ERROR_EXTENSION) {
            return Err(BusError::QueryFailed {
                ty: Q::TYPE.to_string(),
                reason: reason.clone(),
            });
        }
        <Q::Codec as Codec>::decode(&answer.data).map_err(|e| BusError::Codec {
            direction: "decode",
            ty: format!("{} reply", Q::TYPE),
            reason: e.0,
        })
    }

    /// The reply inbox, opened on first use, and its dispatcher.
    async fn replies(&self) -> Result<(String, Waiters), BusError> {
        let mut replies = self.inner.replies.lock().await;
        if let Some(r) = replies.as_ref() {
            return Ok((r.address.clone(), Arc::clone(&r.waiters)));
        }
        let mut inbox = self.inner.transport.reply_inbox().await?;
        let address = inbox.address().to_string();
        let waiters: Waiters = Arc::default();
        let dispatch = Arc::clone(&waiters);
        tokio::spawn(async move {
            while let Some(answer) = inbox.next().await {
                // An answer names its query as its cause.
                let Some(cause) = answer.causation_id.as_deref() else {
                    continue;
                };
                if let Some(waiter) = lock(&dispatch).remove(cause) {
                    let _ = waiter.send(answer);
                }
            }
        });
        *replies = Some(Replies {
            address: address.clone(),
            waiters: Arc::clone(&waiters),
        });
        Ok((address, waiters))
    }

    /// Builds the envelope for a message, as an effect of `cause` if given,
    /// and opens its publish span (a child of `trace_parent` if given).
    pub(crate) fn envelope<M: Message>(
        &self,
        message: &M,
        options: &SendOptions,
        cause: Option<&Envelope>,
        trace_parent: Option<&str>,
    ) -> Result<(Envelope, crate::trace::PublishSpan), BusError> {
        let data = <M::Codec as Codec>::encode(message).map_err(|e| BusError::Codec {
            direction: "encode",
            ty: M::TYPE.to_string(),
            reason: e.0,
        })?;
        let mut envelope = Envelope::new(self.inner.source.clone(), M::TYPE, data);
        envelope.datacontenttype = Some(<M::Codec as Codec>::CONTENT_TYPE.to_string());
        envelope.partition_key.clone_from(&options.partition_key);
        envelope.subject.clone_from(&options.subject);
        if let Some(id) = &options.dedup_id {
            envelope.set_dedup_id(id.clone());
        }
        if let Some(cause) = cause {
            envelope = envelope.caused_by(cause);
        }
        let span = crate::trace::start_publish(&mut envelope, trace_parent);
        Ok((envelope, span))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
