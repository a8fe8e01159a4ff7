//! The NATS JetStream transport (`nats://host:port`), built on async-nats.
//!
//! # Topology
//! With the default namespace `tern` (see [`Topology`]):
//!
//! | name | what |
//! |---|---|
//! | stream `TERN_EVENTS`, subjects `tern.events.>` | events, on `tern.events.TYPE`; interest retention |
//! | stream `TERN_COMMANDS`, subjects `tern.commands.>` | commands and queries, on `tern.commands.TYPE`; interest retention |
//! | stream `TERN_DLQ`, subjects `tern.dlq.>` | dead letters, on `tern.dlq.SERVICE`, with `tern-error` and `tern-failed-service` headers; kept until removed |
//! | durable pull consumer `SERVICE__TYPE` | the service's shared subscription to one type, on the stream of its kind |
//!
//! All three streams are file-backed and declared (created, or updated to
//! this configuration) on connect. Interest retention keeps a message until
//! every consumer whose filter matches it has acked it, so an event nobody
//! subscribes to is dropped at once, as an AMQP topic exchange drops it.
//!
//! The envelope travels in CloudEvents' binary mode: the body is the data,
//! each attribute a `ce-` header, `datacontenttype` in `content-type`. The
//! envelope id (or the sender's dedup id, [`crate::SendOptions::dedup_id`])
//! is also `Nats-Msg-Id`, so JetStream drops a duplicate publish within its
//! duplicate window (the stream's, two minutes by default; a service's
//! [`crate::Service::deduplicate`] window does not change it). A query's reply address is the
//! `tern-reply-to` header (a JetStream publish uses the NATS reply subject
//! for its own ack).
//!
//! # One consumer per service and type
//! NATS servers before 2.10 (Debian's, which development and CI use, is
//! 2.9) allow one filter subject per consumer, so a
//! service has one durable consumer per type it handles, all named after the
//! service, and its subscription merges them. Instances of a service bind to
//! the same durables and so compete for messages; a message waits in the
//! stream while no instance runs. Consumers are never deleted by Tern: a
//! type a service stops handling keeps its consumer (and its interest) until
//! an operator deletes it.
//!
//! # Sending
//! A send resolves once JetStream acked the publish: the message is stored.
//! A command or query needs a consumer whose filter covers its subject (any
//! consumer: under interest retention that is what keeps the message),
//! otherwise the send fails with [`TransportError::NoHandler`] before
//! publishing: the transport lists the commands stream's consumers (and
//! remembers a positive answer for five seconds, so a burst of sends costs
//! one listing). Checking before publishing rather than after is what makes
//! the error reliable: with interest retention a command nobody is
//! interested in is dropped by the server without a word, and the publish
//! ack cannot tell. Within the five seconds after an operator deletes the
//! last consumer of a type, a command to it is accepted and dropped.
//! Answers to queries go over core NATS to the asker's inbox, as answers
//! need not outlive the asker.
//!
//! # Receiving and settling
//! Each instance pulls at most its prefetch window of messages (plus, while
//! idle, one long-poll request of one message per consumer), so instances
//! share the load. The consumers' `max_ack_pending` is left at the server's
//! default, because it counts across all instances: setting it to one
//! instance's prefetch would cap the whole service at one window.
//! - ack: `+ACK`;
//! - retry after a delay: `-NAK` with that delay (NakWithDelay): JetStream
//!   holds the message and redelivers it;
//! - dead-letter: a copy goes to `tern.dlq.SERVICE` (awaiting its publish ack,
//!   deduplicated by service, stream and sequence, so a crash between copy
//!   and ack does not dead-letter it twice) and then the original is acked;
//! - requeue: `-NAK` at once.
//!
//! A message whose [`Incoming`] is dropped unsettled (its handler's task was
//! aborted) is nakked at once (a crash, so it counts as an attempt); one held by a process that died comes back
//! after the ack wait (30 s by default, see [`NatsOptions`]). While a message
//! is held the transport tells JetStream every third of the ack wait that
//! work is in progress, so a slow handler or a long wait behind its
//! partition key does not trigger a redelivery.
//!
//! # Attempts
//! The attempt number is JetStream's delivery count, so a redelivery after a
//! crash counts as an attempt (a message that kills its consumer every time
//! is eventually dead-lettered). A deferral (a retry with `attempted: false`)
//! and a requeue are deliveries that are not attempts: the instance that
//! nakked the message remembers how many it gave back this way and
//! subtracts them when it gets the message again. When another instance (or
//! a restarted one) gets it, it cannot know, and counts those deliveries as
//! attempts: the count errs towards dead-lettering early, never towards
//! retrying forever.
//!
//! Several buses (or test runs) can share one server without seeing each
//! other's messages by using different namespaces ([`NatsOptions`]).
//!
//! Order: JetStream delivers a consumer's messages in stream order, and the
//! router keeps order per partition key within an instance; a retried
//! message leaves its place.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::stream::{Config as StreamConfig, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, AckKind};
use async_nats::{Client, HeaderMap, HeaderName, HeaderValue, Subject};
use bytes::Bytes;
use futures_lite::StreamExt;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::{
    BoxFuture, Incoming, Outcome, Recorded, ReplayFrom, ReplaySource, ReplaySpec, ReplyInbox,
    Route, Settle, Subscription, SubscriptionSpec, Transport, ERROR_HEADER, FAILED_SERVICE_HEADER,
};
use crate::envelope::Envelope;
use crate::error::TransportError;

const NAME: &str = "nats";

/// The header prefix of CloudEvents attributes in NATS (the CloudEvents NATS
/// binding's).
pub const NATS_PREFIX: &str = "ce-";
/// The header that carries `datacontenttype`.
pub const CONTENT_TYPE_HEADER: &str = "content-type";
/// The header that carries a query's reply address.
pub const REPLY_TO_HEADER: &str = "tern-reply-to";
/// The namespace of [`Nats::connect`].
pub const DEFAULT_NAMESPACE: &str = "tern";

/// How long JetStream waits for an ack before it delivers a message again,
/// unless [`NatsOptions::ack_wait`] says otherwise.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);
/// How long a new log stream's source may take to attach.
const SOURCE_ATTACH: Duration = Duration::from_secs(10);
/// How long an idle consumer's pull request waits for a message.
const IDLE_POLL: Duration = Duration::from_secs(5);
/// How long a positive "a consumer handles this command" answer is trusted.
const HANDLER_MEMORY: Duration = Duration::from_secs(5);
/// How long a busy consumer's fetch may take; it returns at once with what
/// is there, so this only bounds a fetch whose end was lost with the connection.
const FETCH_EXPIRES: Duration = Duration::from_secs(1);
/// How long a failing pull waits before trying again, at first and at most.
const PULL_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// How many given-back deliveries an instance remembers per consumer; past
/// that it forgets them all (and errs towards counting them as attempts).
const MAX_REMEMBERED: usize = 100_000;

fn broker_error<E: std::fmt::Display>(
    operation: impl Into<String>,
) -> impl FnOnce(E) -> TransportError {
    let operation = operation.into();
    move |e| TransportError::Broker {
        transport: NAME,
        operation,
        reason: e.to_string(),
    }
}

/// The names of one namespace's streams, subjects and consumers.
///
/// The default namespace `tern` gives the names in the module docs; another
/// namespace `ns` gives `NS_EVENTS`, `ns.events.TYPE` and so on, so that
/// several buses (or test runs) can share one server without seeing each
/// other's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    namespace: String,
}

impl Topology {
    /// The topology of `namespace`: lower-case letters, digits and `-`.
    pub fn new(namespace: &str) -> Result<Topology, TransportError> {
        let valid = !namespace.is_empty()
            && namespace
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            return Err(TransportError::Unsupported {
                transport: NAME,
                what: format!(
                    "use namespace `{namespace}`: use lower-case letters, digits and `-`"
                ),
            });
        }
        Ok(Topology {
            namespace: namespace.to_string(),
        })
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn stream(&self, what: &str) -> String {
        format!("{}_{what}", self.namespace.to_ascii_uppercase())
    }

    /// The stream of events (`TERN_EVENTS`).
    pub fn events_stream(&self) -> String {
        self.stream("EVENTS")
    }

    /// The stream that records events of type `ty` for replay
    /// (`TERN_LOG_orders_order-placed_v1`), sourced from the events stream.
    pub fn event_log_stream(&self, ty: &str) -> String {
        self.stream(&format!("LOG_{}", ty.replace('.', "_")))
    }

    /// The durable consumer of a named replay on a log stream.
    pub fn replay_consumer(name: &str) -> String {
        format!("replay__{}", name.replace('.', "_"))
    }

    /// The stream of commands and queries (`TERN_COMMANDS`).
    pub fn commands_stream(&self) -> String {
        self.stream("COMMANDS")
    }

    /// The stream of dead letters (`TERN_DLQ`).
    pub fn dead_letter_stream(&self) -> String {
        self.stream("DLQ")
    }

    /// Where events of type `ty` are published (`tern.events.TYPE`).
    pub fn event_subject(&self, ty: &str) -> String {
        format!("{}.events.{ty}", self.namespace)
    }

    /// Where commands and queries of type `ty` are sent (`tern.commands.TYPE`).
    pub fn command_subject(&self, ty: &str) -> String {
        format!("{}.commands.{ty}", self.namespace)
    }

    /// Where a service's dead letters go (`tern.dlq.SERVICE`).
    pub fn dead_letter_subject(&self, service: &str) -> String {
        format!("{}.dlq.{service}", self.namespace)
    }

    /// The durable consumer of `service` for type `ty` (`SERVICE__TYPE`,
    /// dots spelled `_`, which service and type names never contain, so
    /// the name is unambiguous).
    pub fn consumer_name(service: &str, ty: &str) -> String {
        format!(
            "{}{}",
            Topology::consumer_prefix(service),
            ty.replace('.', "_")
        )
    }

    /// What the names of all of `service`'s consumers start with.
    pub fn consumer_prefix(service: &str) -> String {
        format!("{}__", service.replace('.', "_"))
    }

    fn streams(&self) -> [(String, String, RetentionPolicy); 3] {
        let ns = &self.namespace;
        [
            (
                self.events_stream(),
                format!("{ns}.events.>"),
                RetentionPolicy::Interest,
            ),
            (
                self.commands_stream(),
                format!("{ns}.commands.>"),
                RetentionPolicy::Interest,
            ),
            (
                self.dead_letter_stream(),
                format!("{ns}.dlq.>"),
                RetentionPolicy::Limits,
            ),
        ]
    }
}

/// Whether a NATS subject filter (with `*` and `>` wildcards) covers
/// `subject`. An empty filter covers everything.
pub fn filter_covers(filter: &str, subject: &str) -> bool {
    if filter.is_empty() {
        return true;
    }
    let mut subject_tokens = subject.split('.');
    for token in filter.split('.') {
        match (token, subject_tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (literal, Some(actual)) if literal == actual => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

/// The NATS JetStream transport. Clones share one connection.
#[derive(Clone)]
pub struct Nats {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    jetstream: jetstream::Context,
    topology: Topology,
    ack_wait: Duration,
    /// Command subjects known to have a consumer, and since when.
    handled: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for Nats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nats")
            .field("namespace", &self.inner.topology.namespace)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a [`Nats`] transport is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsOptions {
    /// The namespace of its streams and subjects (see [`Topology`]);
    /// [`DEFAULT_NAMESPACE`] by default.
    pub namespace: String,
    /// How long JetStream waits for a held message's ack before it delivers
    /// it again; [`DEFAULT_ACK_WAIT`] by default. It is how long a crashed
    /// instance's messages wait before another instance gets them. A live
    /// instance renews it for the messages it holds every third of it, so
    /// handlers may take longer. It is set when a service's consumers are
    /// declared.
    pub ack_wait: Duration,
}

impl Default for NatsOptions {
    fn default() -> NatsOptions {
        NatsOptions {
            namespace: DEFAULT_NAMESPACE.to_string(),
            ack_wait: DEFAULT_ACK_WAIT,
        }
    }
}

impl NatsOptions {
    /// Uses `namespace`.
    pub fn namespace(mut self, namespace: impl Into<String>) -> NatsOptions {
        self.namespace = namespace.into();
        self
    }

    /// Uses `ack_wait` (one second at least).
    pub fn ack_wait(mut self, ack_wait: Duration) -> NatsOptions {
        self.ack_wait = ack_wait.max(Duration::from_secs(1));
        self
    }
}

impl Nats {
    /// Connects to `url` (`nats://host:port`) and declares the streams of
    /// the default namespace.
    pub async fn connect(url: &str) -> Result<Nats, TransportError> {
        Nats::connect_with(url, NatsOptions::default()).await
    }

    /// Connects to `url` with `options` and declares the streams of its
    /// namespace.
    pub async fn connect_with(url: &str, options: NatsOptions) -> Result<Nats, TransportError> {
        let topology = Topology::new(&options.namespace)?;
        let client = async_nats::ConnectOptions::new()
            .name("tern")
            .connect(url)
            .await
            .map_err(|e| TransportError::Connection {
                transport: NAME,
                target: url.to_string(),
                reason: e.to_string(),
            })?;
        let jetstream = jetstream::new(client.clone());
        for (name, subject, retention) in topology.streams() {
            let config = StreamConfig {
                name: name.clone(),
                subjects: vec![subject],
                retention,
                storage: StorageType::File,
                allow_direct: true,
                ..StreamConfig::default()
            };
            jetstream
                .create_or_update_stream(config)
                .await
                .map_err(broker_error(format!("declare stream '{name}'")))?;
        }
        Ok(Nats {
            inner: Arc::new(Inner {
                client,
                jetstream,
                topology,
                ack_wait: options.ack_wait,
                handled: Mutex::default(),
            }),
        })
    }

    /// The names this transport uses.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// The JetStream context, for tools that look into the streams.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.inner.jetstream
    }

    /// Publishes to a stream and waits for JetStream's ack.
    async fn publish(
        &self,
        subject: String,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<(), TransportError> {
        let what = || format!("publish to '{subject}'");
        let ack = self
            .inner
            .jetstream
            .publish_with_headers(subject.clone(), headers, body)
            .await
            .map_err(broker_error(what()))?;
        ack.await.map_err(broker_error(what()))?;
        Ok(())
    }

    /// A command or query goes to exactly one service: refuses `spec` if
    /// another service's consumer already takes one of its command types.
    async fn refuse_second_handler(&self, spec: &SubscriptionSpec) -> Result<(), TransportError> {
        if spec.commands.is_empty() {
            return Ok(());
        }
        let topology = &self.inner.topology;
        let subjects: Vec<(String, &String)> = spec
            .commands
            .iter()
            .map(|ty| (topology.command_subject(ty), ty))
            .collect();
        let own = Topology::consumer_prefix(&spec.service);
        let stream_name = topology.commands_stream();
        let what = || format!("list the consumers of stream '{stream_name}'");
        let stream = self
            .inner
            .jetstream
            .get_stream_no_info(&stream_name)
            .await
            .map_err(broker_error(what()))?;
        let mut consumers = stream.consumers();
        while let Some(info) = consumers.next().await {
            let info = info.map_err(broker_error(what()))?;
            if info.name.starts_with(&own) {
                continue;
            }
            if let Some((_, ty)) = subjects
                .iter()
                .find(|(subject, _)| *subject == info.config.filter_subject)
            {
                return Err(TransportError::Broker {
                    transport: NAME,
                    operation: format!("subscribe service '{}'", spec.service),
                    reason: format!(
                        "`{ty}` is already handled by consumer '{}' of another service, and a command or query has exactly one handler; \
                         stop handling it in one of them (if that service is gone, delete its consumer)",
                        info.name
                    ),
                });
            }
        }
        Ok(())
    }

    /// Whether some consumer of the commands stream covers `subject`.
    async fn has_handler(&self, subject: &str) -> Result<bool, TransportError> {
        if lock(&self.inner.handled)
            .get(subject)
            .is_some_and(|since| since.elapsed() < HANDLER_MEMORY)
        {
            return Ok(true);
        }
        let stream_name = self.inner.topology.commands_stream();
        let what = || format!("list the consumers of stream '{stream_name}'");
        let stream = self
            .inner
            .jetstream
            .get_stream_no_info(&stream_name)
            .await
            .map_err(broker_error(what()))?;
        let mut consumers = stream.consumers();
        while let Some(info) = consumers.next().await {
            let info = info.map_err(broker_error(what()))?;
            if filter_covers(&info.config.filter_subject, subject) {
                lock(&self.inner.handled).insert(subject.to_string(), Instant::now());
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn consumer(
        &self,
        stream: String,
        service: &str,
        ty: &str,
        subject: String,
    ) -> Result<PullConsumer, TransportError> {
        let name = Topology::consumer_name(service, ty);
        let config = pull::Config {
            durable_name: Some(name.clone()),
            description: Some(format!("tern service `{service}`, type `{ty}`")),
            // A new service starts with what is published from now on, as a
            // new AMQP queue does.
            deliver_policy: DeliverPolicy::New,
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.inner.ack_wait,
            filter_subject: subject,
            ..pull::Config::default()
        };
        self.inner
            .jetstream
            .create_consumer_on_stream(config, &stream)
            .await
            .map_err(broker_error(format!(
                "declare consumer '{name}' on stream '{stream}'"
            )))
    }
}

/// JetStream's deduplication key for a send: the sender's dedup id when it
/// chose one (so a retried send is stored once within the stream's
/// duplicate window), else the envelope id (so a publish the client
/// repeated after a lost ack is stored once).
fn msg_id(envelope: &Envelope) -> &str {
    envelope.dedup_id().unwrap_or(&envelope.id)
}

struct NatsReplay {
    messages: pull::Stream,
    stream: String,
    /// The message returned last, acked when the next one is asked for.
    previous: Option<jetstream::Message>,
}

impl ReplaySource for NatsReplay {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Recorded, TransportError>>> {
        Box::pin(async move {
            if let Some(message) = self.previous.take() {
                if let Err(e) = message.double_ack().await {
                    return Some(Err(broker_error(format!(
                        "acknowledge a replayed event of stream '{}'",
                        self.stream
                    ))(e)));
                }
            }
            loop {
                let message = match self.messages.next().await? {
                    Ok(message) => message,
                    Err(e) => {
                        return Some(Err(broker_error(format!(
                            "replay stream '{}'",
                            self.stream
                        ))(e)))
                    }
                };
                let sequence = message.info().map(|info| info.stream_sequence);
                let pairs = header_pairs(message.headers.as_ref());
                let recorded = sequence.map_err(|e| e.to_string()).and_then(|sequence| {
                    envelope_of(&pairs, message.payload.clone()).map(|envelope| Recorded {
                        offset: sequence.saturating_sub(1),
                        envelope,
                    })
                });
                match recorded {
                    Ok(recorded) => {
                        self.previous = Some(message);
                        return Some(Ok(recorded));
                    }
                    Err(reason) => {
                        tracing::warn!(stream = %self.stream, %reason, "skipping an event that is not a CloudEvent");
                        let _ = message.ack().await;
                    }
                }
            }
        })
    }
}

/// Puts `value` in `headers` under `name`, or says which one cannot travel.
fn put_header(headers: &mut HeaderMap, name: &str, value: &str) -> Result<(), TransportError> {
    let unsupported = |why: &str| TransportError::Unsupported {
        transport: NAME,
        what: format!("carry header `{name}`: {why}"),
    };
    let header_name = HeaderName::from_str(name)
        .map_err(|_| unsupported("the name is not a NATS header name"))?;
    let header_value =
        HeaderValue::from_str(value).map_err(|_| unsupported("the value contains a line break"))?;
    headers.insert(header_name, header_value);
    Ok(())
}

/// Free text (an error message) made fit for a header value.
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The envelope's headers in NATS's shape.
fn envelope_headers(envelope: &Envelope) -> Result<HeaderMap, TransportError> {
    let mut headers = HeaderMap::new();
    for (name, value) in envelope.to_headers(NATS_PREFIX) {
        put_header(&mut headers, &name, &value)?;
    }
    if let Some(content_type) = &envelope.datacontenttype {
        put_header(&mut headers, CONTENT_TYPE_HEADER, content_type)?;
    }
    Ok(headers)
}

/// Header names and their first values.
fn header_pairs(headers: Option<&HeaderMap>) -> Vec<(String, String)> {
    let Some(headers) = headers else {
        return Vec::new();
    };
    headers
        .iter()
        .filter_map(|(name, values)| {
            let value = values.first()?;
            Some((name.to_string(), value.as_str().to_string()))
        })
        .collect()
}

/// Reads the envelope of a NATS message (from a stream, an inbox, or the
/// dead-letter stream).
pub fn envelope_from_message(message: &async_nats::Message) -> Result<Envelope, String> {
    let pairs = header_pairs(message.headers.as_ref());
    envelope_of(&pairs, message.payload.clone())
}

fn envelope_of(pairs: &[(String, String)], payload: Bytes) -> Result<Envelope, String> {
    let content_type = pairs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(CONTENT_TYPE_HEADER))
        .map(|(_, v)| v.as_str());
    Envelope::from_headers(
        NATS_PREFIX,
        pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        content_type,
        payload,
    )
    .map_err(|e| e.to_string())
}

impl Transport for Nats {
    fn name(&self) -> &'static str {
        NAME
    }

    fn send(&self, route: Route, envelope: Envelope) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let topology = &self.inner.topology;
            let mut headers = envelope_headers(&envelope)?;
            let body = envelope.data.clone();
            match route {
                Route::Event => {
                    put_header(&mut headers, "Nats-Msg-Id", msg_id(&envelope))?;
                    self.publish(topology.event_subject(&envelope.ty), headers, body)
                        .await
                }
                Route::Command | Route::Query { .. } => {
                    let subject = topology.command_subject(&envelope.ty);
                    if !self.has_handler(&subject).await? {
                        return Err(TransportError::NoHandler(envelope.ty));
                    }
                    if let Route::Query { reply_to } = &route {
                        put_header(&mut headers, REPLY_TO_HEADER, reply_to)?;
                    }
                    put_header(&mut headers, "Nats-Msg-Id", msg_id(&envelope))?;
                    self.publish(subject, headers, body).await
                }
                Route::Reply { to } => {
                    // Answers need not outlive the asker: core NATS is enough.
                    let subject = Subject::from(to.as_str());
                    self.inner
                        .client
                        .publish_with_headers(subject, headers, body)
                        .await
                        .map_err(broker_error(format!("send an answer to '{to}'")))
                }
            }
        })
    }

    fn subscribe(
        &self,
        spec: SubscriptionSpec,
    ) -> BoxFuture<'_, Result<Box<dyn Subscription>, TransportError>> {
        Box::pin(async move {
            self.refuse_second_handler(&spec).await?;
            let topology = &self.inner.topology;
            let mut consumers = Vec::new();
            for ty in &spec.events {
                let consumer = self
                    .consumer(
                        topology.events_stream(),
                        &spec.service,
                        ty,
                        topology.event_subject(ty),
                    )
                    .await?;
                consumers.push(consumer);
            }
            for ty in &spec.commands {
                let subject = topology.command_subject(ty);
                let consumer = self
                    .consumer(
                        topology.commands_stream(),
                        &spec.service,
                        ty,
                        subject.clone(),
                    )
                    .await?;
                lock(&self.inner.handled).insert(subject, Instant::now());
                consumers.push(consumer);
            }
            let window = usize::from(spec.prefetch.max(1));
            // Room for the window plus one idle poll's message per consumer.
            let (incoming_tx, incoming_rx) = mpsc::channel(window + consumers.len());
            let (stop_tx, stop_rx) = watch::channel(false);
            let held = Arc::new(Held::default());
            tokio::spawn(renew_held(
                Arc::downgrade(&held),
                self.inner.client.clone(),
                self.inner.ack_wait / 3,
            ));
            let permits = Arc::new(Semaphore::new(window));
            for consumer in consumers {
                let driver = Driver {
                    consumer,
                    transport: self.clone(),
                    service: spec.service.clone(),
                    incoming: incoming_tx.clone(),
                    permits: Arc::clone(&permits),
                    window,
                    stop: stop_rx.clone(),
                    held: Arc::clone(&held),
                    given_back: Arc::default(),
                    failing: None,
                };
                tokio::spawn(driver.run());
            }
            Ok(Box::new(NatsSubscription {
                incoming: incoming_rx,
                stop: stop_tx,
            }) as Box<dyn Subscription>)
        })
    }

    fn record_events(&self, ty: &str) -> BoxFuture<'_, Result<(), TransportError>> {
        let ty = ty.to_string();
        Box::pin(async move {
            let topology = &self.inner.topology;
            let name = topology.event_log_stream(&ty);
            // The events stream keeps an event only while a consumer wants
            // it; a log stream sourced from it (its own consumer, counted as
            // interest) keeps them under limits retention.
            let config = StreamConfig {
                name: name.clone(),
                retention: RetentionPolicy::Limits,
                storage: StorageType::File,
                sources: Some(vec![async_nats::jetstream::stream::Source {
                    name: topology.events_stream(),
                    filter_subject: Some(topology.event_subject(&ty)),
                    ..Default::default()
                }]),
                ..StreamConfig::default()
            };
            self.inner
                .jetstream
                .create_or_update_stream(config)
                .await
                .map_err(broker_error(format!("declare log stream '{name}'")))?;
            let mut stream = self
                .inner
                .jetstream
                .get_stream(&name)
                .await
                .map_err(broker_error(format!("read log stream '{name}'")))?;
            // The server attaches the source's consumer in the background;
            // an event published before that is not recorded. Wait for it,
            // so that what is published after `record` returns is kept.
            let deadline = Instant::now() + SOURCE_ATTACH;
            loop {
                let info = stream
                    .info()
                    .await
                    .map_err(broker_error(format!("read log stream '{name}'")))?;
                if info.sources.iter().any(|s| s.active.is_some()) {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    return Err(TransportError::Broker {
                        transport: NAME,
                        operation: format!("declare log stream '{name}'"),
                        reason: format!("its source did not attach within {SOURCE_ATTACH:?}"),
                    });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    }

    fn replay(
        &self,
        spec: ReplaySpec,
    ) -> BoxFuture<'_, Result<Box<dyn ReplaySource>, TransportError>> {
        Box::pin(async move {
            self.record_events(&spec.ty).await?;
            let stream = self.inner.topology.event_log_stream(&spec.ty);
            let deliver_policy = match spec.from {
                ReplayFrom::First => DeliverPolicy::All,
                ReplayFrom::Next => DeliverPolicy::New,
                ReplayFrom::Offset(n) => DeliverPolicy::ByStartSequence {
                    start_sequence: n.saturating_add(1),
                },
                ReplayFrom::Time(t) => {
                    let nanos = t
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos() as i128)
                        .unwrap_or(0);
                    let start_time = async_nats::datetime::from_nanos(nanos)
                        .map_err(broker_error(format!("replay stream '{stream}' from {t:?}")))?;
                    DeliverPolicy::ByStartTime { start_time }
                }
            };
            let durable_name = spec.name.as_deref().map(Topology::replay_consumer);
            let jetstream = &self.inner.jetstream;
            let existing = match &durable_name {
                Some(durable) => jetstream
                    .get_consumer_from_stream::<pull::Config, _, _>(durable, &stream)
                    .await
                    .ok(),
                None => None,
            };
            // A named replay that exists resumes after its ack floor. It is
            // recreated there rather than reused: events its last reader had
            // pulled but not acknowledged would otherwise wait out the ack
            // wait before coming again.
            let deliver_policy = match existing {
                Some(mut consumer) => {
                    let floor = consumer
                        .info()
                        .await
                        .map_err(broker_error(format!("read replay consumer on '{stream}'")))?
                        .ack_floor
                        .stream_sequence;
                    if let Some(durable) = &durable_name {
                        jetstream
                            .delete_consumer_from_stream(durable, &stream)
                            .await
                            .map_err(broker_error(format!(
                                "recreate replay consumer '{durable}' on '{stream}'"
                            )))?;
                    }
                    DeliverPolicy::ByStartSequence {
                        start_sequence: floor + 1,
                    }
                }
                None => deliver_policy,
            };
            let consumer: PullConsumer = jetstream
                .create_consumer_on_stream(
                    pull::Config {
                        durable_name: durable_name.clone(),
                        description: Some(format!("tern replay of `{}`", spec.ty)),
                        deliver_policy,
                        ack_policy: AckPolicy::Explicit,
                        ack_wait: self.inner.ack_wait,
                        max_ack_pending: i64::from(spec.prefetch.max(1)),
                        ..pull::Config::default()
                    },
                    &stream,
                )
                .await
                .map_err(broker_error(format!(
                    "declare replay consumer on stream '{stream}'"
                )))?;
            let messages = consumer
                .messages()
                .await
                .map_err(broker_error(format!("replay stream '{stream}'")))?;
            Ok(Box::new(NatsReplay {
                messages,
                stream,
                previous: None,
            }) as Box<dyn ReplaySource>)
        })
    }

    fn reply_inbox(&self) -> BoxFuture<'_, Result<Box<dyn ReplyInbox>, TransportError>> {
        Box::pin(async move {
            let address = self.inner.client.new_inbox();
            let subscriber = self
                .inner
                .client
                .subscribe(address.clone())
                .await
                .map_err(broker_error(format!("subscribe to inbox '{address}'")))?;
            Ok(Box::new(NatsInbox {
                address,
                subscriber,
            }) as Box<dyn ReplyInbox>)
        })
    }
}

/// The messages an instance holds unsettled, whose ack wait it renews.
#[derive(Default)]
struct Held {
    next: AtomicU64,
    /// Token → the message's ack subject and when it was last renewed.
    messages: Mutex<HashMap<u64, (Subject, Instant)>>,
}

/// A message's place in [`Held`]; leaving it is dropping this.
struct HeldGuard {
    held: Arc<Held>,
    token: u64,
}

impl Held {
    fn hold(self: &Arc<Self>, ack_subject: Option<&Subject>) -> Option<HeldGuard> {
        let ack_subject = ack_subject?.clone();
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.messages).insert(token, (ack_subject, Instant::now()));
        Some(HeldGuard {
            held: Arc::clone(self),
            token,
        })
    }
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        lock(&self.held.messages).remove(&self.token);
    }
}

/// Tells JetStream every `every` that held messages are still being worked
/// on. Ends once the subscription and its messages are gone.
async fn renew_held(held: Weak<Held>, client: Client, every: Duration) {
    let mut tick = tokio::time::interval(every / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(held) = held.upgrade() else { return };
        let due: Vec<Subject> = {
            let mut messages = lock(&held.messages);
            messages
                .values_mut()
                .filter(|(_, since)| since.elapsed() >= every)
                .map(|(subject, since)| {
                    *since = Instant::now();
                    subject.clone()
                })
                .collect()
        };
        drop(held);
        for subject in due {
            if let Err(e) = client.publish(subject, AckKind::Progress.into()).await {
                tracing::debug!(error = %e, "renewing a held message's ack wait failed");
            }
        }
    }
}

/// Deliveries this instance gave back without an attempt, per stream
/// sequence.
type GivenBack = Arc<Mutex<HashMap<u64, u32>>>;

/// Pulls one consumer's messages into the subscription.
struct Driver {
    consumer: PullConsumer,
    transport: Nats,
    service: String,
    incoming: mpsc::Sender<Result<Incoming, TransportError>>,
    permits: Arc<Semaphore>,
    window: usize,
    stop: watch::Receiver<bool>,
    held: Arc<Held>,
    given_back: GivenBack,
    /// While pulls keep failing, the last wait between them.
    failing: Option<Duration>,
}

/// Resolves once the subscription is cancelled or dropped.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopping| *stopping).await;
}

fn is_stopping(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

impl Driver {
    /// While messages flow, fetches as many as the window has room for
    /// without waiting; when none are left, long-polls for one without
    /// holding window room, so that an idle consumer never starves a busy
    /// one of the same service. Every pull request is followed to its end,
    /// even after the subscription stopped, so that nothing the server sends
    /// is left unsettled until its ack wait runs out.
    async fn run(mut self) {
        let mut flowing = false;
        loop {
            if is_stopping(&self.stop) {
                return;
            }
            if flowing {
                let mut permits = Vec::with_capacity(self.window);
                tokio::select! {
                    permit = Arc::clone(&self.permits).acquire_owned() => match permit {
                        Ok(permit) => permits.push(permit),
                        Err(_) => return,
                    },
                    () = stopped(&mut self.stop) => return,
                }
                while permits.len() < self.window {
                    match Arc::clone(&self.permits).try_acquire_owned() {
                        Ok(permit) => permits.push(permit),
                        Err(_) => break,
                    }
                }
                let wanted = permits.len();
                let batch = self
                    .consumer
                    .fetch()
                    .max_messages(wanted)
                    .expires(FETCH_EXPIRES)
                    .messages()
                    .await;
                let got = self.follow(batch, permits).await;
                flowing = got == wanted;
            } else {
                let batch = self
                    .consumer
                    .batch()
                    .max_messages(1)
                    .expires(IDLE_POLL)
                    .messages()
                    .await;
                flowing = self.follow(batch, Vec::new()).await > 0;
            }
        }
    }

    /// Takes every message of one pull request; returns how many came.
    async fn follow(
        &mut self,
        batch: Result<pull::Batch, pull::BatchError>,
        mut permits: Vec<OwnedSemaphorePermit>,
    ) -> usize {
        let mut batch = match batch {
            Ok(batch) => batch,
            Err(e) => {
                self.pull_failed(&e).await;
                return 0;
            }
        };
        let mut got = 0;
        while let Some(item) = batch.next().await {
            match item {
                Ok(message) => {
                    got += 1;
                    self.failing = None;
                    // Held from now on, also while it waits for room.
                    let held = self.held.hold(message.message.reply.as_ref());
                    let permit = match permits.pop() {
                        Some(permit) => Some(permit),
                        None => self.permit().await,
                    };
                    self.deliver(message, permit, held).await;
                }
                Err(e) => {
                    // A 409 (the consumer was deleted, or too many acks are
                    // pending service-wide) ends the request.
                    self.pull_failed(&*e).await;
                }
            }
        }
        got
    }

    /// Waits before the next pull, longer while pulls keep failing; says so
    /// once per streak of failures.
    async fn pull_failed(&mut self, error: &(dyn std::fmt::Display + Sync)) {
        let (first, most) = PULL_BACKOFF;
        let wait = match self.failing {
            None => {
                let consumer = &self.consumer.cached_info().name;
                tracing::warn!(service = %self.service, %consumer, %error, "pulling messages failed; retrying");
                first
            }
            Some(previous) => (previous * 2).min(most),
        };
        self.failing = Some(wait);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stopped(&mut self.stop) => {}
        }
    }

    /// Room in the window for one more message, or `None` once stopping.
    async fn permit(&mut self) -> Option<OwnedSemaphorePermit> {
        tokio::select! {
            permit = Arc::clone(&self.permits).acquire_owned() => permit.ok(),
            () = stopped(&mut self.stop) => None,
        }
    }

    /// Hands a message to the subscription, or gives it back if stopping.
    async fn deliver(
        &mut self,
        message: jetstream::Message,
        permit: Option<OwnedSemaphorePermit>,
        held: Option<HeldGuard>,
    ) {
        let (stream, sequence, delivered) = match message.info() {
            Ok(info) => (
                info.stream.to_string(),
                info.stream_sequence,
                info.delivered,
            ),
            Err(e) => {
                tracing::warn!(service = %self.service, error = %e, "a pulled message has no JetStream metadata; ignoring it");
                return;
            }
        };
        let settle = NatsSettle {
            message: Some(message),
            transport: self.transport.clone(),
            service: self.service.clone(),
            stream,
            sequence,
            given_back: Arc::clone(&self.given_back),
            permit,
            _held: held,
        };
        // No room means the subscription stopped while this one waited.
        if settle.permit.is_none() || is_stopping(&self.stop) {
            let _ = Box::new(settle).settle(Outcome::Requeue).await;
            return;
        }
        let Some(jet) = settle.message.as_ref() else {
            return;
        };
        let pairs = header_pairs(jet.message.headers.as_ref());
        let reply_to = pairs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(REPLY_TO_HEADER))
            .map(|(_, v)| v.clone());
        let given_back = lock(&self.given_back).get(&sequence).copied().unwrap_or(0);
        let delivered = u32::try_from(delivered.max(1)).unwrap_or(u32::MAX);
        let item = match envelope_of(&pairs, jet.message.payload.clone()) {
            Ok(envelope) => Incoming {
                envelope,
                reply_to,
                attempt: delivered.saturating_sub(given_back).max(1),
                redelivered: delivered > 1,
                settle: Box::new(settle),
            },
            Err(reason) => {
                // Not a CloudEvent: nothing can handle it, so it goes where
                // an operator will look.
                tracing::warn!(service = %self.service, %reason, "dead-lettering a message that is not a CloudEvent");
                let outcome = Outcome::DeadLetter {
                    error: format!("not a CloudEvent: {reason}"),
                };
                tokio::spawn(Box::new(settle).settle(outcome));
                return;
            }
        };
        if let Err(mpsc::error::SendError(Ok(incoming))) = self.incoming.send(Ok(item)).await {
            // The subscription is gone: give the message back.
            let _ = incoming.settle.settle(Outcome::Requeue).await;
        }
    }
}

struct NatsSubscription {
    incoming: mpsc::Receiver<Result<Incoming, TransportError>>,
    stop: watch::Sender<bool>,
}

impl Subscription for NatsSubscription {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Incoming, TransportError>>> {
        Box::pin(self.incoming.recv())
    }

    fn cancel(&mut self) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let _ = self.stop.send(true);
            // What was pulled but not taken goes back now, so another
            // instance gets it; the drivers give back what is still on its
            // way.
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

struct NatsSettle {
    /// `None` once settled.
    message: Option<jetstream::Message>,
    transport: Nats,
    service: String,
    /// Where the message is stored, which identifies it.
    stream: String,
    sequence: u64,
    given_back: GivenBack,
    /// The message's room in the instance's window.
    permit: Option<OwnedSemaphorePermit>,
    _held: Option<HeldGuard>,
}

impl NatsSettle {
    fn remember_given_back(&self) {
        let mut given_back = lock(&self.given_back);
        if given_back.len() >= MAX_REMEMBERED {
            given_back.clear();
        }
        *given_back.entry(self.sequence).or_default() += 1;
    }

    fn forget(&self) {
        lock(&self.given_back).remove(&self.sequence);
    }

    async fn dead_letter(
        &self,
        message: &jetstream::Message,
        error: &str,
    ) -> Result<(), TransportError> {
        let mut headers = HeaderMap::new();
        // JetStream's own headers (a message id, expectations) belong to
        // the original publish, not to the copy.
        for (name, value) in header_pairs(message.message.headers.as_ref()) {
            if !name.to_ascii_lowercase().starts_with("nats-") {
                put_header(&mut headers, &name, &value)?;
            }
        }
        put_header(&mut headers, ERROR_HEADER, &one_line(error))?;
        put_header(&mut headers, FAILED_SERVICE_HEADER, &self.service)?;
        // A crash between the copy and the ack dead-letters it again; the
        // id lets JetStream drop that second copy.
        let id = format!("{}/{}/{}", self.service, self.stream, self.sequence);
        put_header(&mut headers, "Nats-Msg-Id", &id)?;
        let subject = self
            .transport
            .inner
            .topology
            .dead_letter_subject(&self.service);
        self.transport
            .publish(subject, headers, message.message.payload.clone())
            .await
    }
}

impl Settle for NatsSettle {
    fn settle(
        mut self: Box<Self>,
        outcome: Outcome,
    ) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(async move {
            let Some(message) = self.message.take() else {
                return Ok(());
            };
            let kind = match outcome {
                Outcome::Ack => {
                    self.forget();
                    AckKind::Ack
                }
                Outcome::Requeue => {
                    self.remember_given_back();
                    AckKind::Nak(None)
                }
                Outcome::Retry {
                    after, attempted, ..
                } => {
                    if !attempted {
                        self.remember_given_back();
                    }
                    AckKind::Nak(Some(after))
                }
                Outcome::DeadLetter { error } => {
                    if let Err(e) = self.dead_letter(&message, &error).await {
                        // Unsettled, it comes back; try again then.
                        self.message = Some(message);
                        return Err(e);
                    }
                    self.forget();
                    AckKind::Ack
                }
            };
            message.ack_with(kind).await.map_err(broker_error(format!(
                "settle message {} of stream '{}' for service '{}'",
                self.sequence, self.stream, self.service
            )))
        })
    }
}

impl Drop for NatsSettle {
    fn drop(&mut self) {
        // Dropped unsettled (the handler's task was aborted): give the
        // message back now rather than after the ack wait.
        let Some(message) = self.message.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = message.ack_with(AckKind::Nak(None)).await;
            });
        }
    }
}

struct NatsInbox {
    address: String,
    subscriber: async_nats::Subscriber,
}

impl ReplyInbox for NatsInbox {
    fn address(&self) -> &str {
        &self.address
    }

    fn next(&mut self) -> BoxFuture<'_, Option<Envelope>> {
        Box::pin(async move {
            loop {
                let message = self.subscriber.next().await?;
                match envelope_from_message(&message) {
                    Ok(envelope) => return Some(envelope),
                    Err(reason) => {
                        tracing::warn!(inbox = %self.address, %reason, "dropping an answer that is not a CloudEvent");
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_cover_subjects_token_by_token() {
        assert!(filter_covers("tern.commands.a.b", "tern.commands.a.b"));
        assert!(!filter_covers("tern.commands.a", "tern.commands.a.b"));
        assert!(!filter_covers("tern.commands.a.b", "tern.commands.a"));
        assert!(filter_covers("tern.commands.*.b", "tern.commands.a.b"));
        assert!(!filter_covers("tern.commands.*", "tern.commands.a.b"));
        assert!(filter_covers("tern.commands.>", "tern.commands.a.b"));
        assert!(!filter_covers("tern.commands.a.>", "tern.commands.a"));
        assert!(filter_covers("", "tern.commands.a"));
        assert!(!filter_covers("tern.events.>", "tern.commands.a"));
    }

    #[test]
    fn names_follow_the_namespace() {
        let default = Topology::new(DEFAULT_NAMESPACE).unwrap();
        assert_eq!(default.events_stream(), "TERN_EVENTS");
        assert_eq!(default.commands_stream(), "TERN_COMMANDS");
        assert_eq!(default.dead_letter_stream(), "TERN_DLQ");
        assert_eq!(
            default.event_subject("orders.order-placed.v1"),
            "tern.events.orders.order-placed.v1"
        );
        assert_eq!(default.dead_letter_subject("billing"), "tern.dlq.billing");
        let other = Topology::new("test-7").unwrap();
        assert_eq!(other.commands_stream(), "TEST-7_COMMANDS");
        assert_eq!(other.command_subject("a.b.v1"), "test-7.commands.a.b.v1");
        assert!(Topology::new("Bad.Name").is_err());
        assert!(Topology::new("").is_err());
    }

    #[test]
    fn consumer_names_cannot_collide() {
        assert_eq!(
            Topology::consumer_name("shop.orders", "orders.place-order.v1"),
            "shop_orders__orders_place-order_v1"
        );
        // A service name never holds `_`, so the first `__` ends it.
        assert_ne!(
            Topology::consumer_name("a", "b.c.v1"),
            Topology::consumer_name("a.b", "c.v1")
        );
    }

    #[test]
    fn envelopes_travel_in_headers() {
        let mut envelope = Envelope::new("orders", "orders.order-placed.v1", Bytes::from("{}"));
        envelope.datacontenttype = Some("application/json".into());
        envelope.partition_key = Some("customer-1".into());
        let headers = envelope_headers(&envelope).unwrap();
        assert_eq!(
            headers.get("content-type").map(HeaderValue::as_str),
            Some("application/json")
        );
        let message = async_nats::Message {
            subject: Subject::from("tern.events.orders.order-placed.v1"),
            reply: None,
            payload: envelope.data.clone(),
            headers: Some(headers),
            status: None,
            description: None,
            length: 0,
        };
        let read = envelope_from_message(&message).unwrap();
        assert_eq!(read.id, envelope.id);
        assert_eq!(read.partition_key.as_deref(), Some("customer-1"));
        assert_eq!(read.datacontenttype.as_deref(), Some("application/json"));
    }

    #[test]
    fn a_line_break_cannot_travel_in_a_header() {
        let mut envelope = Envelope::new("orders", "orders.order-placed.v1", Bytes::new());
        envelope.subject = Some("two\r\nlines".into());
        assert!(matches!(
            envelope_headers(&envelope),
            Err(TransportError::Unsupported { .. })
        ));
        assert_eq!(one_line("a\nb"), "a b");
    }
}
