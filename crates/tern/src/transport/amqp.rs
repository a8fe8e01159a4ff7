//! The AMQP 0-9-1 transport (lapin), for Tern's AMQP server or RabbitMQ.
//!
//! Selected by `amqp://user:pass@host:port/vhost`. On connect it declares
//! the two exchanges of the topology in [`crate::transport`]; a
//! subscription declares its service's queue, dead-letter queue and
//! bindings; retry queues are declared on first use. Everything is durable
//! and nothing needs a broker plugin, so the same topology works on a
//! RabbitMQ cluster.
//!
//! Replay uses stream queues (`x-queue-type: stream`, `x-stream-offset`),
//! which RabbitMQ has too; named replays (`x-stream-consumer-name`) and dedup
//! ids need Tern, or plugins, and are switched on by [`AmqpOptions`]
//! ([`AmqpOptions::tern`] switches on all of Tern's). A named replay sends
//! its `from` too: Tern lets a name's committed offset win over
//! `x-stream-offset`, so a new name starts at `from` and a known one resumes
//! where it stopped.
//!
//! Sends use a channel in confirm mode: a send resolves on the broker's
//! `basic.ack`, which RabbitMQ and Tern send only once the message is on
//! disk. Commands and queries are published `mandatory`, so a type no
//! service handles comes back as a `basic.return` and fails the send with
//! [`TransportError::NoHandler`].

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeBindOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};

use super::mapping::{attempt_of, dedup_window_ms, AmqpShape, AMQP_PREFIX};
use super::{
    dead_letter_queue, retry_queue, BoxFuture, Incoming, Outcome, Recorded, ReplayFrom,
    ReplaySource, ReplaySpec, ReplyInbox, Route, Settle, Subscription, SubscriptionSpec, Transport,
    ATTEMPT_HEADER, ERROR_HEADER, FAILED_SERVICE_HEADER,
};
use crate::envelope::Envelope;
use crate::error::TransportError;

const NAME: &str = "amqp";

/// How an AMQP bus is laid out on its broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpOptions {
    /// The prefix of the bus's exchanges (`NAMESPACE.events` and
    /// `NAMESPACE.commands`): buses with different namespaces share a broker
    /// and a vhost without seeing each other's messages. `tern` by default.
    pub namespace: String,
    /// Whether the broker has the `x-delayed-message` exchange type (Tern
    /// does; RabbitMQ with its delayed-message plugin). With it, retries
    /// wait their exact backoff in the broker instead of per-attempt retry
    /// queues, and `Bus::send_after` works. Off by default.
    pub delayed_exchange: bool,
    /// Whether the broker deduplicates queues (`x-message-deduplication`
    /// with `x-deduplication-header`: Tern does; RabbitMQ with its
    /// message-deduplication plugin). With it, dedup ids
    /// ([`crate::SendOptions::dedup_id`]) and deduplicating services
    /// ([`crate::Service::deduplicate`]) work; without it they are refused,
    /// since a broker that ignores the arguments would deliver duplicates
    /// without a word. Off by default.
    pub deduplication: bool,
    /// Whether the broker tracks named stream consumers' offsets
    /// (`x-stream-consumer-name`, a Tern extension; RabbitMQ keeps stream
    /// offsets only over its stream protocol, not AMQP). With it a named
    /// replay resumes where it left off; without it a named replay is
    /// refused. Off by default.
    pub tracked_stream_offsets: bool,
}

impl Default for AmqpOptions {
    fn default() -> AmqpOptions {
        AmqpOptions {
            namespace: "tern".to_string(),
            delayed_exchange: false,
            deduplication: false,
            tracked_stream_offsets: false,
        }
    }
}

impl AmqpOptions {
    /// Uses `namespace`.
    pub fn namespace(mut self, namespace: impl Into<String>) -> AmqpOptions {
        self.namespace = namespace.into();
        self
    }

    /// Everything Tern's broker has: delayed messages, deduplication and
    /// tracked stream offsets.
    pub fn tern() -> AmqpOptions {
        AmqpOptions {
            delayed_exchange: true,
            deduplication: true,
            tracked_stream_offsets: true,
            ..AmqpOptions::default()
        }
    }

    /// Uses the broker's deduplication (see the field).
    pub fn deduplication(mut self, enabled: bool) -> AmqpOptions {
        self.deduplication = enabled;
        self
    }

    /// Uses the broker's tracked stream offsets (see the field).
    pub fn tracked_stream_offsets(mut self, enabled: bool) -> AmqpOptions {
        self.tracked_stream_offsets = enabled;
        self
    }

    /// Uses the broker's `x-delayed-message` exchange type (see the field).
    pub fn delayed_exchange(mut self, enabled: bool) -> AmqpOptions {
        self.delayed_exchange = enabled;
        self
    }
}

/// The AMQP transport. Clones share one connection.
#[derive(Clone)]
pub struct Amqp {
    namespace: Arc<str>,
    events_exchange: Arc<str>,
    commands_exchange: Arc<str>,
    /// When the broker delays messages itself.
    delayed: Option<Arc<DelayedExchanges>>,
    connection: Arc<Connection>,
    publisher: Channel,
    target: Arc<str>,
    declared_retry_queues: Arc<Mutex<HashSet<String>>>,
    deduplication: bool,
    tracked_stream_offsets: bool,
}

impl std::fmt::Debug for Amqp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Amqp")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

fn failed(operation: impl Into<String>) -> impl FnOnce(lapin::Error) -> TransportError {
    let operation = operation.into();
    move |e| TransportError::Broker {
        transport: NAME,
        operation,
        reason: e.to_string(),
    }
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

impl Amqp {
    /// Connects and declares the bus's exchanges, `tern.events` and
    /// `tern.commands`.
    pub async fn connect(url: &str) -> Result<Amqp, TransportError> {
        Amqp::connect_with(url, AmqpOptions::default()).await
    }

    /// Connects with options and declares the bus's exchanges.
    pub async fn connect_with(url: &str, options: AmqpOptions) -> Result<Amqp, TransportError> {
        if !crate::message::valid_type_name(&options.namespace) {
            return Err(TransportError::Unsupported {
                transport: NAME,
                what: format!(
                    "use the namespace `{}`: use lower-case letters, digits, `-` and `.`",
                    options.namespace
                ),
            });
        }
        let events_exchange = format!("{}.events", options.namespace);
        let commands_exchange = format!("{}.commands", options.namespace);
        let target = redact(url);
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .map_err(|e| TransportError::Connection {
                transport: NAME,
                target: target.clone(),
                reason: e.to_string(),
            })?;
        let publisher = connection
            .create_channel()
            .await
            .map_err(failed("open the publishing channel"))?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(failed("select confirm mode"))?;
        for (name, kind) in [
            (events_exchange.as_str(), ExchangeKind::Topic),
            (commands_exchange.as_str(), ExchangeKind::Direct),
        ] {
            publisher
                .exchange_declare(
                    name.into(),
                    kind,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(failed(format!("declare exchange '{name}'")))?;
        }
        let delayed = if options.delayed_exchange {
            let names = declare_delayed(
                &publisher,
                &options.namespace,
                &events_exchange,
                &commands_exchange,
            )
            .await?;
            Some(Arc::new(names))
        } else {
            None
        };
        Ok(Amqp {
            namespace: Arc::from(options.namespace.as_str()),
            delayed,
            events_exchange: Arc::from(events_exchange.as_str()),
            commands_exchange: Arc::from(commands_exchange.as_str()),
            connection: Arc::new(connection),
            publisher,
            target: Arc::from(target.as_str()),
            declared_retry_queues: Arc::default(),
            deduplication: options.deduplication,
            tracked_stream_offsets: options.tracked_stream_offsets,
        })
    }

    /// Publishes with a confirm. Returns whether the broker routed it
    /// (`false` only for a `mandatory` publish that came back).
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        shape: AmqpShape,
        body: &[u8],
        mandatory: bool,
    ) -> Result<bool, TransportError> {
        let what = || format!("publish to exchange '{exchange}' with key '{routing_key}'");
        let confirm = self
            .publisher
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory,
                    ..BasicPublishOptions::default()
                },
                body,
                properties(shape),
            )
            .await
            .map_err(failed(what()))?
            .await
            .map_err(failed(what()))?;
        match confirm {
            Confirmation::Ack(None) => Ok(true),
            Confirmation::Ack(Some(_returned)) => Ok(false),
            Confirmation::Nack(_) => Err(TransportError::Broker {
                transport: NAME,
                operation: what(),
                reason: "the broker refused the message (basic.nack)".into(),
            }),
            Confirmation::NotRequested => Ok(true),
        }
    }

    /// The stream queue recording events of type `ty`.
    fn event_stream(&self, ty: &str) -> String {
        format!("{}.stream.{ty}", self.namespace)
    }

    /// A dedup id needs a broker that deduplicates: one that ignores the
    /// header would deliver every copy.
    fn check_dedup_id(&self, envelope: &Envelope) -> Result<(), TransportError> {
        if envelope.dedup_id().is_some() && !self.deduplication {
            return Err(TransportError::Unsupported {
                transport: NAME,
                what: format!(
                    "deduplicate `{}` by its dedup id without broker deduplication: connect \
                     with AmqpOptions::deduplication(true) (Tern has it; RabbitMQ needs its \
                     message-deduplication plugin)",
                    envelope.ty
                ),
            });
        }
        Ok(())
    }

    async fn declare_queue(
        &self,
        channel: &Channel,
        name: &str,
        arguments: FieldTable,
    ) -> Result<(), TransportError> {
        channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .map(|_| ())
            .map_err(failed(format!("declare queue '{name}'")))
    }

    async fn ensure_retry_queue(
        &self,
        service: &str,
        attempt: u32,
    ) -> Result<String, TransportError> {
        let name = retry_queue(service, attempt);
        let known = self
            .declared_retry_queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&name);
        if !known {
            let mut arguments = FieldTable::default();
            arguments.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString("".into()),
            );
            arguments.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(service.into()),
            );
            self.declare_queue(&self.publisher, &name, arguments)
                .await?;
            self.declared_retry_queues
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.clone());
        }
        Ok(name)
    }

    async fn channel(&self) -> Result<Channel, TransportError> {
        self.connection
            .create_channel()
            .await
            .map_err(failed("open a channel"))
    }
}

/// The delayed-message exchanges of a namespace.
#[derive(Debug)]
struct DelayedExchanges {
    /// `NAMESPACE.events.delayed` (fanout into the events exchange).
    events: String,
    /// `NAMESPACE.commands.delayed` (fanout into the commands exchange).
    commands: String,
    /// `NAMESPACE.retry` (direct; each service queue bound by its name).
    retry: String,
}

/// Declares the delayed-message exchanges. Scheduled sends wait in
/// `NAMESPACE.events.delayed` or `NAMESPACE.commands.delayed`, which hand
/// them, routing key intact, to the events or commands exchange when due;
/// retries wait in `NAMESPACE.retry`, which routes them to the one service
/// queue bound by its own name.
async fn declare_delayed(
    channel: &Channel,
    namespace: &str,
    events_exchange: &str,
    commands_exchange: &str,
) -> Result<DelayedExchanges, TransportError> {
    let names = DelayedExchanges {
        events: format!("{events_exchange}.delayed"),
        commands: format!("{commands_exchange}.delayed"),
        retry: format!("{namespace}.retry"),
    };
    for (name, routing, target) in [
        (&names.events, "fanout", Some(events_exchange)),
        (&names.commands, "fanout", Some(commands_exchange)),
        (&names.retry, "direct", None),
    ] {
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-delayed-type".into(),
            AMQPValue::LongString(routing.into()),
        );
        channel
            .exchange_declare(
                name.as_str().into(),
                ExchangeKind::Custom("x-delayed-message".into()),
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                arguments,
            )
            .await
            .map_err(failed(format!(
                "declare exchange '{name}' of type x-delayed-message (does the broker have it?)"
            )))?;
        if let Some(target) = target {
            channel
                .exchange_bind(
                    target.into(),
                    name.as_str().into(),
                    "".into(),
                    ExchangeBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(failed(format!("bind exchange '{target}' to '{name}'")))?;
        }
    }
    Ok(names)
}

/// A delay as `x-delay` milliseconds: at least 1, since the exchange routes
/// a message without a positive delay at once.
fn delay_ms(delay: std::time::Duration) -> i64 {
    i64::try_from(delay.as_millis()).unwrap_or(i64::MAX).max(1)
}

fn short(value: String) -> ShortString {
    ShortString::from(value)
}

fn properties(shape: AmqpShape) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (name, value) in shape.headers {
        headers.insert(short(name), AMQPValue::LongString(LongString::from(value)));
    }
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(v) = shape.content_type {
        props = props.with_content_type(short(v));
    }
    if let Some(v) = shape.message_id {
        props = props.with_message_id(short(v));
    }
    if let Some(v) = shape.correlation_id {
        props = props.with_correlation_id(short(v));
    }
    if let Some(v) = shape.reply_to {
        props = props.with_reply_to(short(v));
    }
    if let Some(v) = shape.kind {
        props = props.with_type(short(v));
    }
    if let Some(v) = shape.app_id {
        props = props.with_app_id(short(v));
    }
    if let Some(v) = shape.timestamp {
        props = props.with_timestamp(v);
    }
    if let Some(v) = shape.expiration {
        props = props.with_expiration(short(v));
    }
    if let Some(ms) = shape.delay_ms {
        headers_insert(&mut props, "x-delay", AMQPValue::LongLongInt(ms));
    }
    props
}

fn headers_insert(props: &mut BasicProperties, name: &str, value: AMQPValue) {
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(name.into(), value);
    *props = props.clone().with_headers(headers);
}

/// Header values as strings; numbers from foreign publishers are spelled out.
fn string_headers(properties: &BasicProperties) -> Vec<(String, String)> {
    let Some(headers) = properties.headers() else {
        return Vec::new();
    };
    headers
        .inner()
        .iter()
        .filter_map(|(name, value)| {
            let text = match value {
                AMQPValue::LongString(s) => String::from_utf8(s.as_bytes().to_vec()).ok()?,
                AMQPValue::ShortString(s) => s.as_str().to_string(),
                AMQPValue::ShortShortInt(n) => n.to_string(),
                AMQPValue::ShortShortUInt(n) => n.to_string(),
                AMQPValue::ShortInt(n) => n.to_string(),
                AMQPValue::ShortUInt(n) => n.to_string(),
                AMQPValue::LongInt(n) => n.to_string(),
                AMQPValue::LongUInt(n) => n.to_string(),
                AMQPValue::LongLongInt(n) => n.to_string(),
                _ => return None,
            };
            Some((name.as_str().to_string(), text))
        })
        .collect()
}

fn shape_of(properties: &BasicProperties) -> AmqpShape {
    let text = |v: &Option<ShortString>| v.as_ref().map(|s| s.as_str().to_string());
    AmqpShape {
        headers: string_headers(properties),
        content_type: text(properties.content_type()),
        message_id: text(properties.message_id()),
        correlation_id: text(properties.correlation_id()),
        reply_to: text(properties.reply_to()),
        kind: text(properties.kind()),
        app_id: text(properties.app_id()),
        timestamp: *properties.timestamp(),
        expiration: None,
        delay_ms: None,
    }
}

/// Reads the envelope and attempt of a delivered message.
fn envelope_of(properties: &BasicProperties, data: &[u8]) -> Result<(Envelope, u32), String> {
    let headers = string_headers(properties);
    let pairs = || headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    let envelope = Envelope::from_headers(
        AMQP_PREFIX,
        pairs(),
        properties.content_type().as_ref().map(|s| s.as_str()),
        bytes::Bytes::copy_from_slice(data),
    )
    .map_err(|e| e.to_string())?;
    Ok((envelope, attempt_of(pairs())))
}

/// Reads the envelope of a message fetched with any AMQP client, for tools
/// that look into queues.
pub fn envelope_from_delivery(
    properties: &BasicProperties,
    data: &[u8],
) -> Result<Envelope, String> {
    envelope_of(properties, data).map(|(envelope, _)| envelope)
}

impl Transport for Amqp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn send(&self, route: Route, envelope: Envelope) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            self.check_dedup_id(&envelope)?;
            let (exchange, key, reply_to, mandatory) = match route {
                Route::Event => (&*self.events_exchange, envelope.ty.clone(), None, false),
                Route::Command => (&*self.commands_exchange, envelope.ty.clone(), None, true),
                Route::Query { reply_to } => (
                    &*self.commands_exchange,
                    envelope.ty.clone(),
                    Some(reply_to),
                    true,
                ),
                Route::Reply { to } => ("", to, None, false),
            };
            let shape = AmqpShape::of(&envelope, 1, reply_to);
            let routed = self
                .publish(exchange, &key, shape, &envelope.data, mandatory)
                .await?;
            if !routed {
                return Err(TransportError::NoHandler(envelope.ty));
            }
            Ok(())
        })
    }

    fn delays_messages(&self) -> bool {
        self.delayed.is_some()
    }

    fn send_after(
        &self,
        route: Route,
        envelope: Envelope,
        delay: std::time::Duration,
    ) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            self.check_dedup_id(&envelope)?;
            let Some(delayed) = &self.delayed else {
                return Err(TransportError::Unsupported {
                    transport: NAME,
                    what: "send a message for later without the broker's x-delayed-message \
                           exchange type: connect with AmqpOptions::delayed_exchange(true) \
                           (Tern has it; RabbitMQ needs its delayed-message plugin)"
                        .into(),
                });
            };
            let exchange = match route {
                Route::Event => &delayed.events,
                Route::Command => &delayed.commands,
                Route::Query { .. } | Route::Reply { .. } => {
                    return Err(TransportError::Unsupported {
                        transport: NAME,
                        what:
                            "delay a query or an answer: only events and commands can be scheduled"
                                .into(),
                    })
                }
            };
            let mut shape = AmqpShape::of(&envelope, 1, None);
            shape.delay_ms = Some(delay_ms(delay));
            self.publish(exchange, &envelope.ty, shape, &envelope.data, false)
                .await
                .map(|_| ())
        })
    }

    fn subscribe(
        &self,
        spec: SubscriptionSpec,
    ) -> BoxFuture<'_, Result<Box<dyn Subscription>, TransportError>> {
        Box::pin(async move {
            let service = spec.service.clone();
            let mut arguments = FieldTable::default();
            if let Some(window) = spec.dedup {
                if !self.deduplication {
                    return Err(TransportError::Unsupported {
                        transport: NAME,
                        what: format!(
                            "deduplicate service '{service}' without broker deduplication: \
                             connect with AmqpOptions::deduplication(true) (Tern has it; \
                             RabbitMQ needs its message-deduplication plugin)"
                        ),
                    });
                }
                arguments.insert("x-message-deduplication".into(), AMQPValue::Boolean(true));
                arguments.insert(
                    "x-cache-ttl".into(),
                    AMQPValue::LongLongInt(dedup_window_ms(window)),
                );
            }
            let channel = self.channel().await?;
            self.declare_queue(&channel, &service, arguments).await?;
            self.declare_queue(
                &channel,
                &dead_letter_queue(&service),
                FieldTable::default(),
            )
            .await?;
            let bindings = spec
                .events
                .iter()
                .map(|t| (&*self.events_exchange, t))
                .chain(spec.commands.iter().map(|t| (&*self.commands_exchange, t)));
            for (exchange, ty) in bindings {
                channel
                    .queue_bind(
                        service.as_str().into(),
                        exchange.into(),
                        ty.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(failed(format!(
                        "bind queue '{service}' to '{exchange}' with key '{ty}'"
                    )))?;
            }
            if let Some(delayed) = &self.delayed {
                channel
                    .queue_bind(
                        service.as_str().into(),
                        delayed.retry.as_str().into(),
                        service.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(failed(format!(
                        "bind queue '{service}' to '{}'",
                        delayed.retry
                    )))?;
            }
            channel
                .basic_qos(spec.prefetch.max(1), BasicQosOptions::default())
                .await
                .map_err(failed("set the prefetch window"))?;
            let tag = format!("tern-{service}-{}", uuid::Uuid::now_v7().simple());
            let consumer = channel
                .basic_consume(
                    service.as_str().into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(failed(format!("consume from queue '{service}'")))?;
            Ok(Box::new(AmqpSubscription {
                transport: self.clone(),
                channel,
                consumer,
                tag,
                service,
            }) as Box<dyn Subscription>)
        })
    }

    fn record_events(&self, ty: &str) -> BoxFuture<'_, Result<(), TransportError>> {
        let ty = ty.to_string();
        Box::pin(async move {
            let stream = self.event_stream(&ty);
            let channel = self.channel().await?;
            let mut arguments = FieldTable::default();
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("stream".into()),
            );
            self.declare_queue(&channel, &stream, arguments).await?;
            channel
                .queue_bind(
                    stream.as_str().into(),
                    self.events_exchange.as_ref().into(),
                    ty.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(failed(format!(
                    "bind stream '{stream}' to '{}' with key '{ty}'",
                    self.events_exchange
                )))?;
            let _ = channel.close(200, "declared".into()).await;
            Ok(())
        })
    }

    fn replay(
        &self,
        spec: ReplaySpec,
    ) -> BoxFuture<'_, Result<Box<dyn ReplaySource>, TransportError>> {
        Box::pin(async move {
            if spec.name.is_some() && !self.tracked_stream_offsets {
                return Err(TransportError::Unsupported {
                    transport: NAME,
                    what: format!(
                        "replay `{}` under a name without broker-tracked stream offsets: \
                         connect with AmqpOptions::tracked_stream_offsets(true) (Tern has them; \
                         RabbitMQ keeps stream offsets over its stream protocol only), or \
                         replay without a name",
                        spec.ty
                    ),
                });
            }
            self.record_events(&spec.ty).await?;
            let stream = self.event_stream(&spec.ty);
            let channel = self.channel().await?;
            channel
                .basic_qos(spec.prefetch.max(1), BasicQosOptions::default())
                .await
                .map_err(failed("set the replay's prefetch window"))?;
            let mut arguments = FieldTable::default();
            // A name's committed offset wins over this on Tern, so it is
            // where a new name starts.
            let offset = match spec.from {
                ReplayFrom::First => AMQPValue::LongString("first".into()),
                ReplayFrom::Next => AMQPValue::LongString("next".into()),
                ReplayFrom::Offset(n) => {
                    AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX))
                }
                ReplayFrom::Time(t) => AMQPValue::Timestamp(
                    t.duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                ),
            };
            arguments.insert("x-stream-offset".into(), offset);
            if let Some(name) = &spec.name {
                arguments.insert(
                    "x-stream-consumer-name".into(),
                    AMQPValue::LongString(name.as_str().into()),
                );
            }
            let tag = format!("tern-replay-{}", uuid::Uuid::now_v7().simple());
            let consumer = channel
                .basic_consume(
                    stream.as_str().into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    arguments,
                )
                .await
                .map_err(failed(format!("replay stream '{stream}'")))?;
            Ok(Box::new(AmqpReplay {
                _channel: channel,
                consumer,
                stream,
                previous: None,
            }) as Box<dyn ReplaySource>)
        })
    }

    fn reply_inbox(&self) -> BoxFuture<'_, Result<Box<dyn ReplyInbox>, TransportError>> {
        Box::pin(async move {
            let channel = self.channel().await?;
            let declared = channel
                .queue_declare(
                    "".into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(failed("declare a reply queue"))?;
            let address = declared.name().as_str().to_string();
            let consumer = channel
                .basic_consume(
                    address.as_str().into(),
                    "".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        exclusive: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(failed(format!("consume from reply queue '{address}'")))?;
            Ok(Box::new(AmqpInbox {
                address,
                _channel: channel,
                consumer,
            }) as Box<dyn ReplyInbox>)
        })
    }
}

struct AmqpSubscription {
    transport: Amqp,
    channel: Channel,
    consumer: lapin::Consumer,
    tag: String,
    service: String,
}

impl AmqpSubscription {
    fn incoming(&self, delivery: lapin::message::Delivery) -> Option<Incoming> {
        let settle = AmqpSettle {
            transport: self.transport.clone(),
            service: self.service.clone(),
            acker: delivery.acker.clone(),
            shape: shape_of(&delivery.properties),
            body: delivery.data.clone(),
        };
        match envelope_of(&delivery.properties, &delivery.data) {
            Ok((envelope, attempt)) => Some(Incoming {
                envelope,
                reply_to: settle.shape.reply_to.clone(),
                attempt,
                redelivered: delivery.redelivered,
                settle: Box::new(settle),
            }),
            Err(reason) => {
                tracing::warn!(service = %self.service, %reason, "dead-lettering a message that is not a CloudEvent");
                let outcome = Outcome::DeadLetter {
                    error: format!("not a CloudEvent: {reason}"),
                };
                tokio::spawn(Box::new(settle).settle(outcome));
                None
            }
        }
    }
}

impl Subscription for AmqpSubscription {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Incoming, TransportError>>> {
        Box::pin(async move {
            loop {
                match self.consumer.next().await? {
                    Ok(delivery) => {
                        if let Some(incoming) = self.incoming(delivery) {
                            return Some(Ok(incoming));
                        }
                    }
                    Err(e) => {
                        return Some(Err(failed(format!(
                            "consume from queue '{}'",
                            self.service
                        ))(e)))
                    }
                }
            }
        })
    }

    fn cancel(&mut self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            self.channel
                .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
                .await
                .map_err(failed(format!("cancel consumer '{}'", self.tag)))?;
            // Deliveries already in the client's buffer go back now, so
            // another instance gets them without waiting for this channel.
            while let Ok(Some(Ok(delivery))) =
                tokio::time::timeout(std::time::Duration::from_millis(50), self.consumer.next())
                    .await
            {
                let _ = delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await;
            }
            Ok(())
        })
    }
}

impl Drop for AmqpSubscription {
    fn drop(&mut self) {
        // Closing the channel hands every unacked delivery back to the
        // broker: what a crashed consumer's messages need.
        let channel = self.channel.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = channel.close(200, "subscription closed".into()).await;
            });
        }
    }
}

struct AmqpSettle {
    transport: Amqp,
    service: String,
    acker: lapin::Acker,
    shape: AmqpShape,
    body: Vec<u8>,
}

impl AmqpSettle {
    async fn ack(&self) -> Result<(), TransportError> {
        self.acker
            .ack(BasicAckOptions::default())
            .await
            .map(|_| ())
            .map_err(failed(format!("ack on queue '{}'", self.service)))
    }
}

impl Settle for AmqpSettle {
    fn settle(self: Box<Self>, outcome: Outcome) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(async move {
            match outcome {
                Outcome::Ack => self.ack().await,
                Outcome::Requeue => self
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await
                    .map(|_| ())
                    .map_err(failed(format!("requeue on queue '{}'", self.service))),
                Outcome::Retry {
                    after,
                    error,
                    attempted,
                } => {
                    let attempt = attempt_of(
                        self.shape
                            .headers
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.as_str())),
                    );
                    let mut shape = self.shape.clone();
                    shape.set_header(ATTEMPT_HEADER, (attempt + u32::from(attempted)).to_string());
                    shape.set_header(ERROR_HEADER, error);
                    shape.fresh_dedup_key();
                    // Durable copy first, then the ack: at least once.
                    if let Some(delayed) = &self.transport.delayed {
                        shape.delay_ms = Some(delay_ms(after));
                        self.transport
                            .publish(&delayed.retry, &self.service, shape, &self.body, false)
                            .await?;
                    } else {
                        let queue = self
                            .transport
                            .ensure_retry_queue(&self.service, attempt)
                            .await?;
                        shape.expire_after(after);
                        self.transport
                            .publish("", &queue, shape, &self.body, false)
                            .await?;
                    }
                    self.ack().await
                }
                Outcome::DeadLetter { error } => {
                    let mut shape = self.shape.clone();
                    shape.set_header(ERROR_HEADER, error);
                    shape.set_header(FAILED_SERVICE_HEADER, self.service.clone());
                    // A redrive back into a deduplicating queue is not a
                    // duplicate (the dedup id stays in the envelope).
                    shape.fresh_dedup_key();
                    let queue = dead_letter_queue(&self.service);
                    self.transport
                        .publish("", &queue, shape, &self.body, false)
                        .await?;
                    self.ack().await
                }
            }
        })
    }
}

struct AmqpReplay {
    _channel: Channel,
    consumer: lapin::Consumer,
    stream: String,
    /// The delivery returned last, acked when the next one is asked for.
    previous: Option<lapin::Acker>,
}

impl ReplaySource for AmqpReplay {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Recorded, TransportError>>> {
        Box::pin(async move {
            if let Some(acker) = self.previous.take() {
                if let Err(e) = acker.ack(BasicAckOptions::default()).await {
                    return Some(Err(failed(format!(
                        "acknowledge a replayed event of stream '{}'",
                        self.stream
                    ))(e)));
                }
            }
            loop {
                let delivery = match self.consumer.next().await? {
                    Ok(delivery) => delivery,
                    Err(e) => {
                        return Some(Err(failed(format!("replay stream '{}'", self.stream))(e)))
                    }
                };
                let headers = string_headers(&delivery.properties);
                let offset = headers
                    .iter()
                    .find(|(k, _)| k == "x-stream-offset")
                    .and_then(|(_, v)| v.parse::<u64>().ok());
                let recorded = offset
                    .ok_or_else(|| "it has no stream offset".to_string())
                    .and_then(|offset| {
                        envelope_of(&delivery.properties, &delivery.data)
                            .map(|(envelope, _)| Recorded { offset, envelope })
                    });
                match recorded {
                    Ok(recorded) => {
                        self.previous = Some(delivery.acker);
                        return Some(Ok(recorded));
                    }
                    Err(reason) => {
                        tracing::warn!(stream = %self.stream, %reason, "skipping an event that is not a CloudEvent");
                        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                    }
                }
            }
        })
    }
}

struct AmqpInbox {
    address: String,
    _channel: Channel,
    consumer: lapin::Consumer,
}

impl ReplyInbox for AmqpInbox {
    fn address(&self) -> &str {
        &self.address
    }

    fn next(&mut self) -> BoxFuture<'_, Option<Envelope>> {
        Box::pin(async move {
            loop {
                match self.consumer.next().await? {
                    Ok(delivery) => match envelope_of(&delivery.properties, &delivery.data) {
                        Ok((envelope, _)) => return Some(envelope),
                        Err(reason) => {
                            tracing::warn!(inbox = %self.address, %reason, "dropping an answer that is not a CloudEvent");
                        }
                    },
                    Err(_) => return None,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact("amqp://host:5672"), "amqp://host:5672");
    }
}
