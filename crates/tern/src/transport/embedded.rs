//! The embedded transport: Tern's broker in the same process, no network.
//!
//! It is the default for tests and single-binary apps (`embedded:./data`),
//! and it is as durable as `tern serve`: a send resolves once the broker
//! has fsynced the message, and a message is acked only after its handler
//! finished, so a process killed mid-message handles it again on restart.
//! The topology is the one in [`crate::transport`]'s docs, so an AMQP
//! client looking at the same broker sees the same exchanges and queues.
//! It carries every feature: delayed sends (the broker's durable timer
//! index), dedup ids (deduplicating queues), replay (stream queues, with
//! named consumers whose offsets the broker commits) and so schedules.

use std::path::PathBuf;

use bytes::Bytes;
use tern_broker::{
    Broker, BrokerConfig, BrokerError, Channel, ChannelEvent, ConnectionId, ConsumeOptions,
    DeliveryTag, ExchangeDeclare, ExchangeKind, FieldTable, FieldValue, Message, Properties,
    QueueDeclare,
};
use tokio::sync::{mpsc, oneshot};

use super::mapping::{attempt_of, dedup_window_ms, AmqpShape, AMQP_PREFIX};
use super::{
    dead_letter_queue, event_stream, BoxFuture, Incoming, Outcome, Recorded, ReplayFrom,
    ReplaySource, ReplaySpec, ReplyInbox, Route, Settle, Subscription, SubscriptionSpec, Transport,
    COMMANDS_EXCHANGE, ERROR_HEADER, EVENTS_EXCHANGE, FAILED_SERVICE_HEADER,
};
use crate::envelope::Envelope;
use crate::error::TransportError;

const NAME: &str = "embedded";
const VHOST: &str = "/";

/// The embedded transport. Clones share one broker.
#[derive(Debug, Clone)]
pub struct Embedded {
    broker: Broker,
    connection: ConnectionId,
}

fn broker_error(operation: impl Into<String>) -> impl FnOnce(BrokerError) -> TransportError {
    let operation = operation.into();
    move |e| TransportError::Broker {
        transport: NAME,
        operation,
        reason: e.to_string(),
    }
}

impl Embedded {
    /// Opens (or creates) a broker in `dir` and declares the bus's exchanges.
    /// Must be called inside a tokio runtime.
    pub async fn open(dir: impl Into<PathBuf>) -> Result<Embedded, TransportError> {
        let dir = dir.into();
        let broker = Broker::open(BrokerConfig::new(&dir))
            .map_err(broker_error(format!("open broker in {}", dir.display())))?;
        Embedded::with_broker(broker).await
    }

    /// Uses a broker that is already open, for example one that `tern serve`
    /// also exposes over AMQP.
    pub async fn with_broker(broker: Broker) -> Result<Embedded, TransportError> {
        let connection = broker.new_connection_id();
        for (name, kind) in [
            (EVENTS_EXCHANGE, ExchangeKind::Topic),
            (COMMANDS_EXCHANGE, ExchangeKind::Direct),
        ] {
            broker
                .declare_exchange(VHOST, ExchangeDeclare::new(name, kind))
                .await
                .map_err(broker_error(format!("declare exchange '{name}'")))?;
        }
        Ok(Embedded { broker, connection })
    }

    /// The broker underneath.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    async fn declare_queue(&self, declare: QueueDeclare) -> Result<(), TransportError> {
        let name = declare.name.clone();
        self.broker
            .declare_queue(VHOST, declare, self.connection)
            .await
            .map(|_| ())
            .map_err(broker_error(format!("declare queue '{name}'")))
    }

    /// Publishes and waits for the fsync. Returns how many queues took it.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        shape: AmqpShape,
        body: Bytes,
    ) -> Result<usize, TransportError> {
        let message = Message {
            exchange: tern_broker::ExchangeName::new(exchange)
                .map_err(|e| broker_error(format!("publish to '{exchange}'"))(e.into()))?,
            routing_key: routing_key.to_string(),
            properties: properties(shape),
            body,
        };
        let what = || format!("publish to exchange '{exchange}' with key '{routing_key}'");
        let published = self
            .broker
            .publish(VHOST, message)
            .map_err(broker_error(what()))?;
        let routed = published.routed;
        published.confirmed().await.map_err(broker_error(what()))?;
        Ok(routed)
    }

    /// A command or query goes to exactly one service, so a second service
    /// that registers a type another already handles is refused (a renamed
    /// service leaves its old queue bound: deleting that queue fixes it).
    fn refuse_second_handler(&self, spec: &SubscriptionSpec) -> Result<(), TransportError> {
        let bindings = self
            .broker
            .bindings(VHOST)
            .map_err(broker_error("list bindings"))?;
        for binding in bindings {
            let tern_broker::Destination::Queue(queue) = &binding.destination else {
                continue;
            };
            if binding.source.as_str() == COMMANDS_EXCHANGE
                && queue.as_str() != spec.service
                && spec.commands.contains(&binding.routing_key)
            {
                return Err(TransportError::Broker {
                    transport: NAME,
                    operation: format!("subscribe service '{}'", spec.service),
                    reason: format!(
                        "`{}` is already handled by service '{}', and a command or query has exactly one handler; \
                         stop handling it in one of them (if '{}' is gone, delete its queue)",
                        binding.routing_key,
                        queue.as_str(),
                        queue.as_str()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Publishes to be routed `delay` from now, through the broker's
    /// durable timer index, and waits until that is on disk.
    async fn publish_delayed(
        &self,
        exchange: &str,
        routing_key: &str,
        shape: AmqpShape,
        body: Bytes,
        delay: std::time::Duration,
    ) -> Result<(), TransportError> {
        let what =
            || format!("publish to exchange '{exchange}' with key '{routing_key}' after {delay:?}");
        let message = Message {
            exchange: tern_broker::ExchangeName::new(exchange)
                .map_err(|e| broker_error(what())(e.into()))?,
            routing_key: routing_key.to_string(),
            properties: properties(shape),
            body,
        };
        self.broker
            .publish_delayed(VHOST, message, delay)
            .map_err(broker_error(what()))?
            .confirmed()
            .await
            .map_err(broker_error(what()))
    }
}

fn properties(shape: AmqpShape) -> Properties {
    let headers: FieldTable = shape
        .headers
        .into_iter()
        .map(|(k, v)| (k, FieldValue::String(v)))
        .collect();
    Properties {
        content_type: shape.content_type,
        headers: Some(headers),
        delivery_mode: Some(2),
        correlation_id: shape.correlation_id,
        reply_to: shape.reply_to,
        expiration: shape.expiration,
        message_id: shape.message_id,
        timestamp: shape.timestamp,
        kind: shape.kind,
        app_id: shape.app_id,
        ..Properties::default()
    }
}

/// Header values as strings; numbers from foreign publishers are spelled out.
fn string_headers(properties: &Properties) -> Vec<(String, String)> {
    let Some(headers) = &properties.headers else {
        return Vec::new();
    };
    headers
        .iter()
        .filter_map(|(k, v)| {
            let text = match v {
                FieldValue::String(s) => s.clone(),
                FieldValue::Bytes(b) => String::from_utf8(b.to_vec()).ok()?,
                other => other.as_i64()?.to_string(),
            };
            Some((k.clone(), text))
        })
        .collect()
}

/// Reads the envelope of a message the embedded broker holds, for tools
/// that look into queues (a dead-letter browser, say).
pub fn envelope_from_message(message: &Message) -> Result<Envelope, String> {
    envelope_of(message).map(|(envelope, _)| envelope)
}

fn envelope_of(message: &Message) -> Result<(Envelope, u32), String> {
    let headers = string_headers(&message.properties);
    let pairs = || headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    let envelope = Envelope::from_headers(
        AMQP_PREFIX,
        pairs(),
        message.properties.content_type.as_deref(),
        message.body.clone(),
    )
    .map_err(|e| e.to_string())?;
    Ok((envelope, attempt_of(pairs())))
}

/// The consumer arguments of a replay: `x-stream-offset` from `from`, and
/// `x-stream-consumer-name` for a named one. The broker lets a name's
/// committed offset win over `x-stream-offset`, so `from` is where a new
/// name starts and a known one resumes where it stopped.
pub(crate) fn replay_arguments(spec: &ReplaySpec) -> FieldTable {
    let mut args = FieldTable::new();
    let offset = match spec.from {
        ReplayFrom::First => FieldValue::String("first".into()),
        ReplayFrom::Next => FieldValue::String("next".into()),
        ReplayFrom::Offset(n) => FieldValue::I64(i64::try_from(n).unwrap_or(i64::MAX)),
        ReplayFrom::Time(t) => FieldValue::Timestamp(
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        ),
    };
    args.insert(tern_broker::stream::OFFSET_ARGUMENT.into(), offset);
    if let Some(name) = &spec.name {
        args.insert(
            tern_broker::stream::CONSUMER_NAME_ARGUMENT.into(),
            FieldValue::String(name.clone()),
        );
    }
    args
}

/// The stream offset the broker writes on each delivery from a stream.
pub(crate) fn offset_header<'a>(
    mut headers: impl Iterator<Item = (&'a str, &'a str)>,
) -> Option<u64> {
    headers
        .find(|(k, _)| *k == tern_broker::stream::OFFSET_ARGUMENT)
        .and_then(|(_, v)| v.parse().ok())
}

impl Transport for Embedded {
    fn name(&self) -> &'static str {
        NAME
    }

    fn send(&self, route: Route, envelope: Envelope) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let body = envelope.data.clone();
            match route {
                Route::Event => {
                    let shape = AmqpShape::of(&envelope, 1, None);
                    self.publish(EVENTS_EXCHANGE, &envelope.ty, shape, body)
                        .await?;
                }
                Route::Command | Route::Query { .. } => {
                    let reply_to = match route {
                        Route::Query { reply_to } => Some(reply_to),
                        _ => None,
                    };
                    let shape = AmqpShape::of(&envelope, 1, reply_to);
                    if self
                        .publish(COMMANDS_EXCHANGE, &envelope.ty, shape, body)
                        .await?
                        == 0
                    {
                        return Err(TransportError::NoHandler(envelope.ty));
                    }
                }
                Route::Reply { to } => {
                    let shape = AmqpShape::of(&envelope, 1, None);
                    if self.publish("", &to, shape, body).await? == 0 {
                        tracing::debug!(reply_to = %to, "the asker is gone; its answer is dropped");
                    }
                }
            }
            Ok(())
        })
    }

    fn delays_messages(&self) -> bool {
        true
    }

    fn send_after(
        &self,
        route: Route,
        envelope: Envelope,
        delay: std::time::Duration,
    ) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let exchange = match route {
                Route::Event => EVENTS_EXCHANGE,
                Route::Command => COMMANDS_EXCHANGE,
                Route::Query { .. } | Route::Reply { .. } => {
                    return Err(TransportError::Unsupported {
                        transport: NAME,
                        what:
                            "delay a query or an answer: only events and commands can be scheduled"
                                .into(),
                    })
                }
            };
            let shape = AmqpShape::of(&envelope, 1, None);
            let body = envelope.data.clone();
            self.publish_delayed(exchange, &envelope.ty, shape, body, delay)
                .await
        })
    }

    fn subscribe(
        &self,
        spec: SubscriptionSpec,
    ) -> BoxFuture<'_, Result<Box<dyn Subscription>, TransportError>> {
        Box::pin(async move {
            let service = spec.service.clone();
            self.refuse_second_handler(&spec)?;
            let mut declare = QueueDeclare::new(&service);
            if let Some(window) = spec.dedup {
                declare
                    .arguments
                    .insert("x-message-deduplication".into(), FieldValue::Bool(true));
                declare.arguments.insert(
                    "x-cache-ttl".into(),
                    FieldValue::I64(dedup_window_ms(window)),
                );
            }
            self.declare_queue(declare).await?;
            self.declare_queue(QueueDeclare::new(dead_letter_queue(&service)))
                .await?;
            let bindings = spec
                .events
                .iter()
                .map(|t| (EVENTS_EXCHANGE, t))
                .chain(spec.commands.iter().map(|t| (COMMANDS_EXCHANGE, t)));
            for (exchange, ty) in bindings {
                self.broker
                    .bind_queue(
                        VHOST,
                        &service,
                        exchange,
                        ty,
                        &FieldTable::new(),
                        self.connection,
                    )
                    .await
                    .map_err(broker_error(format!(
                        "bind queue '{service}' to '{exchange}' with key '{ty}'"
                    )))?;
            }
            let mut channel = self
                .broker
                .open_channel(VHOST, self.connection)
                .map_err(broker_error("open channel"))?;
            channel.qos(spec.prefetch.max(1), false);
            let consumer_tag = channel
                .consume(&service, ConsumeOptions::default())
                .map_err(broker_error(format!("consume from queue '{service}'")))?;
            let (incoming_tx, incoming_rx) = mpsc::channel(usize::from(spec.prefetch.max(1)));
            let (control_tx, control_rx) = mpsc::unbounded_channel();
            tokio::spawn(drive_channel(
                channel,
                consumer_tag,
                incoming_tx,
                control_rx,
                control_tx.downgrade(),
                self.clone(),
                service,
            ));
            Ok(Box::new(EmbeddedSubscription {
                incoming: incoming_rx,
                control: control_tx,
            }) as Box<dyn Subscription>)
        })
    }

    fn record_events(&self, ty: &str) -> BoxFuture<'_, Result<(), TransportError>> {
        let ty = ty.to_string();
        Box::pin(async move {
            let stream = event_stream(&ty);
            let mut declare = QueueDeclare::new(&stream);
            declare
                .arguments
                .insert("x-queue-type".into(), FieldValue::String("stream".into()));
            self.declare_queue(declare).await?;
            self.broker
                .bind_queue(
                    VHOST,
                    &stream,
                    EVENTS_EXCHANGE,
                    &ty,
                    &FieldTable::new(),
                    self.connection,
                )
                .await
                .map_err(broker_error(format!(
                    "bind stream '{stream}' to '{EVENTS_EXCHANGE}' with key '{ty}'"
                )))
        })
    }

    fn replay(
        &self,
        spec: ReplaySpec,
    ) -> BoxFuture<'_, Result<Box<dyn ReplaySource>, TransportError>> {
        Box::pin(async move {
            self.record_events(&spec.ty).await?;
            let stream = event_stream(&spec.ty);
            let mut channel = self
                .broker
                .open_channel(VHOST, self.connection)
                .map_err(broker_error("open channel"))?;
            channel.qos(spec.prefetch.max(1), false);
            let options = ConsumeOptions {
                arguments: replay_arguments(&spec),
                ..ConsumeOptions::default()
            };
            channel
                .consume(&stream, options)
                .map_err(broker_error(format!("replay stream '{stream}'")))?;
            Ok(Box::new(EmbeddedReplay {
                channel,
                stream,
                previous: None,
            }) as Box<dyn ReplaySource>)
        })
    }

    fn reply_inbox(&self) -> BoxFuture<'_, Result<Box<dyn ReplyInbox>, TransportError>> {
        Box::pin(async move {
            let address = format!("tern.reply.{}", uuid::Uuid::now_v7());
            let declare = QueueDeclare {
                durable: false,
                exclusive: true,
                auto_delete: true,
                ..QueueDeclare::new(&address)
            };
            self.declare_queue(declare).await?;
            let mut channel = self
                .broker
                .open_channel(VHOST, self.connection)
                .map_err(broker_error("open channel"))?;
            let options = ConsumeOptions {
                no_ack: true,
                exclusive: true,
                ..ConsumeOptions::default()
            };
            channel
                .consume(&address, options)
                .map_err(broker_error(format!(
                    "consume from reply queue '{address}'"
                )))?;
            Ok(Box::new(EmbeddedInbox { address, channel }) as Box<dyn ReplyInbox>)
        })
    }
}

enum Control {
    Settle(DeliveryTag, Disposal),
    Cancel(oneshot::Sender<()>),
}

enum Disposal {
    Ack,
    Requeue,
}

/// Owns the broker channel: turns deliveries into [`Incoming`]s and applies
/// settlements, which arrive from handler tasks through `control`.
async fn drive_channel(
    mut channel: Channel,
    consumer_tag: String,
    incoming: mpsc::Sender<Result<Incoming, TransportError>>,
    mut control: mpsc::UnboundedReceiver<Control>,
    control_tx: mpsc::WeakUnboundedSender<Control>,
    transport: Embedded,
    service: String,
) {
    let mut consuming = true;
    loop {
        tokio::select! {
            event = channel.recv(), if consuming => {
                let Some(event) = event else { break };
                match event {
                    ChannelEvent::Delivery(delivery) => {
                        let tag = delivery.tag;
                        // Weak, so that once the subscription and every
                        // settle handle are gone the control channel closes
                        // and this task ends, returning what is unacked.
                        let Some(control) = control_tx.upgrade() else { break };
                        let settle = EmbeddedSettle {
                            tag,
                            control,
                            transport: transport.clone(),
                            service: service.clone(),
                            message: delivery.message.clone(),
                        };
                        let item = match envelope_of(&delivery.message) {
                            Ok((envelope, attempt)) => Ok(Incoming {
                                reply_to: delivery.message.properties.reply_to.clone(),
                                envelope,
                                attempt,
                                redelivered: delivery.redelivered,
                                settle: Box::new(settle),
                            }),
                            Err(reason) => {
                                // Not a CloudEvent: nothing can handle it, so
                                // it goes where an operator will look.
                                tracing::warn!(%service, %reason, "dead-lettering a message that is not a CloudEvent");
                                let outcome = Outcome::DeadLetter { error: format!("not a CloudEvent: {reason}") };
                                tokio::spawn(Box::new(settle).settle(outcome));
                                continue;
                            }
                        };
                        if incoming.send(item).await.is_err() {
                            break;
                        }
                    }
                    ChannelEvent::Cancelled { .. } => consuming = false,
                }
            }
            request = control.recv() => {
                match request {
                    Some(Control::Settle(tag, disposal)) => {
                        let result = match disposal {
                            Disposal::Ack => channel.ack(tag, false),
                            Disposal::Requeue => channel.reject(tag, true),
                        };
                        if let Err(e) = result {
                            tracing::warn!(%service, error = %e, "settling a delivery failed");
                        }
                    }
                    Some(Control::Cancel(done)) => {
                        channel.cancel(&consumer_tag);
                        consuming = false;
                        let _ = done.send(());
                    }
                    None => break,
                }
            }
        }
    }
}

struct EmbeddedSubscription {
    incoming: mpsc::Receiver<Result<Incoming, TransportError>>,
    control: mpsc::UnboundedSender<Control>,
}

impl Subscription for EmbeddedSubscription {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Incoming, TransportError>>> {
        Box::pin(self.incoming.recv())
    }

    fn cancel(&mut self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let (done_tx, done_rx) = oneshot::channel();
            if self.control.send(Control::Cancel(done_tx)).is_ok() {
                let _ = done_rx.await;
            }
            // What was prefetched but not taken goes back now rather than
            // when the subscription is dropped, so another instance gets it.
            self.incoming.close();
            while let Some(item) = self.incoming.recv().await {
                if let Ok(incoming) = item {
                    let _ = incoming.settle.settle(Outcome::Requeue).await;
                }
            }
            Ok(())
        })
    }
}

struct EmbeddedSettle {
    tag: DeliveryTag,
    control: mpsc::UnboundedSender<Control>,
    transport: Embedded,
    service: String,
    message: Message,
}

impl EmbeddedSettle {
    fn disposal(&self, disposal: Disposal) -> Result<(), TransportError> {
        self.control
            .send(Control::Settle(self.tag, disposal))
            .map_err(|_| TransportError::Closed(NAME))
    }

    /// The message's properties for a copy, with its expiry cleared.
    fn copy_shape(&self) -> AmqpShape {
        let p = &self.message.properties;
        AmqpShape {
            headers: string_headers(p),
            content_type: p.content_type.clone(),
            message_id: p.message_id.clone(),
            correlation_id: p.correlation_id.clone(),
            reply_to: p.reply_to.clone(),
            kind: p.kind.clone(),
            app_id: p.app_id.clone(),
            timestamp: p.timestamp,
            expiration: None,
            delay_ms: None,
        }
    }
}

impl Settle for EmbeddedSettle {
    fn settle(self: Box<Self>, outcome: Outcome) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(async move {
            match outcome {
                Outcome::Ack => self.disposal(Disposal::Ack),
                Outcome::Requeue => self.disposal(Disposal::Requeue),
                Outcome::Retry {
                    after,
                    error,
                    attempted,
                } => {
                    let headers = string_headers(&self.message.properties);
                    let attempt = attempt_of(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                    let mut shape = self.copy_shape();
                    let next = attempt + u32::from(attempted);
                    shape.set_header(super::ATTEMPT_HEADER, next.to_string());
                    shape.set_header(ERROR_HEADER, error);
                    shape.fresh_dedup_key();
                    // Back into this service's queue only, when due, from
                    // the broker's durable timer index. The copy is durable
                    // before the original is acked: a crash in between
                    // handles the message twice, never zero times.
                    self.transport
                        .publish_delayed("", &self.service, shape, self.message.body.clone(), after)
                        .await?;
                    self.disposal(Disposal::Ack)
                }
                Outcome::DeadLetter { error } => {
                    let mut shape = self.copy_shape();
                    shape.set_header(ERROR_HEADER, error);
                    shape.set_header(FAILED_SERVICE_HEADER, self.service.clone());
                    // A redrive back into a deduplicating queue is not a
                    // duplicate (the dedup id stays in the envelope).
                    shape.fresh_dedup_key();
                    let queue = dead_letter_queue(&self.service);
                    self.transport
                        .publish("", &queue, shape, self.message.body.clone())
                        .await?;
                    self.disposal(Disposal::Ack)
                }
            }
        })
    }
}

struct EmbeddedInbox {
    address: String,
    channel: Channel,
}

impl ReplyInbox for EmbeddedInbox {
    fn address(&self) -> &str {
        &self.address
    }

    fn next(&mut self) -> BoxFuture<'_, Option<Envelope>> {
        Box::pin(async move {
            loop {
                match self.channel.recv().await? {
                    ChannelEvent::Delivery(delivery) => match envelope_of(&delivery.message) {
                        Ok((envelope, _)) => return Some(envelope),
                        Err(reason) => {
                            tracing::warn!(inbox = %self.address, %reason, "dropping an answer that is not a CloudEvent");
                        }
                    },
                    ChannelEvent::Cancelled { .. } => return None,
                }
            }
        })
    }
}

struct EmbeddedReplay {
    channel: Channel,
    stream: String,
    /// The delivery returned last, acked when the next one is asked for.
    previous: Option<DeliveryTag>,
}

impl ReplaySource for EmbeddedReplay {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Recorded, TransportError>>> {
        Box::pin(async move {
            if let Some(tag) = self.previous.take() {
                if let Err(e) = self.channel.ack(tag, false) {
                    return Some(Err(broker_error(format!(
                        "acknowledge a replayed event of stream '{}'",
                        self.stream
                    ))(e)));
                }
            }
            loop {
                match self.channel.recv().await? {
                    ChannelEvent::Delivery(delivery) => {
                        let headers = string_headers(&delivery.message.properties);
                        let pairs = || headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
                        let recorded = offset_header(pairs())
                            .ok_or_else(|| "it has no stream offset".to_string())
                            .and_then(|offset| {
                                envelope_of(&delivery.message)
                                    .map(|(envelope, _)| Recorded { offset, envelope })
                            });
                        match recorded {
                            Ok(recorded) => {
                                self.previous = Some(delivery.tag);
                                return Some(Ok(recorded));
                            }
                            Err(reason) => {
                                // Acked at once, so it is not read again.
                                tracing::warn!(stream = %self.stream, %reason, "skipping an event that is not a CloudEvent");
                                let _ = self.channel.ack(delivery.tag, false);
                            }
                        }
                    }
                    ChannelEvent::Cancelled { .. } => return None,
                }
            }
        })
    }
}
