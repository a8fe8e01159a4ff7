//! The router: a service's handlers, run against its subscription.
//!
//! A [`Service`] names its handlers per message type. [`Bus::start`]
//! subscribes it (one durable subscription per service name, shared by its
//! instances, so they compete for messages and messages wait while no
//! instance runs) and handles messages concurrently, up to the service's
//! prefetch window.
//!
//! Guarantees:
//! - **At least once.** A message is settled only after its handler and
//!   middleware finished: acked on success, moved to a retry (the copy
//!   durable before the ack) or to the dead-letter queue. A crash before
//!   that leaves it with the broker, which delivers it again. Handlers must
//!   therefore be idempotent (see the inbox pattern).
//! - **Order per key.** Within one instance, messages with the same
//!   partition key are handled one at a time, in the order received.
//!   Different keys run in parallel. A retried message leaves its place, and
//!   two instances of one service share a queue without splitting it by
//!   key, so strict order needs one instance (or, later, partitioned streams).
//! - **Graceful shutdown.** [`Running::shutdown`] stops taking messages,
//!   returns prefetched ones to the broker, lets in-flight handlers finish
//!   and settles them, then returns.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;
use tower::Layer;

use crate::bus::{Bus, QUERY_ERROR_EXTENSION};
use crate::context::Context;
use crate::envelope::Envelope;
use crate::error::{BusError, HandlerError, TransportError};
use crate::message::{valid_type_name, Codec, Command, Event, Message, MessageKind, Query};
use crate::middleware::{self, CatchPanic, Handling, Pipeline, Retry, Timeout};
use crate::transport::{BoxFuture, Incoming, Outcome, Route, Subscription, SubscriptionSpec};

type Handler =
    Arc<dyn Fn(Context) -> BoxFuture<'static, Result<Option<Bytes>, HandlerError>> + Send + Sync>;
type BoxLayer = Box<dyn Fn(Pipeline) -> Pipeline + Send + Sync>;

/// How long a handler may run by default before the attempt fails.
pub const DEFAULT_HANDLER_TIMEOUT: Duration = Duration::from_secs(30);
/// How many unsettled messages an instance holds by default.
pub const DEFAULT_PREFETCH: u16 = 32;

/// A service: a name and its handlers, with their middleware.
pub struct Service {
    name: String,
    handlers: HashMap<&'static str, Handler>,
    events: Vec<String>,
    commands: Vec<String>,
    prefetch: u16,
    dedup: Option<Duration>,
    retry: Option<Retry>,
    timeout: Option<Duration>,
    tracing: bool,
    metrics: bool,
    layers: Vec<BoxLayer>,
    problems: Vec<String>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("name", &self.name)
            .field("events", &self.events)
            .field("commands", &self.commands)
            .field("prefetch", &self.prefetch)
            .finish_non_exhaustive()
    }
}

impl Service {
    /// A service named `name` (lower case letters, digits, `-` and `.`),
    /// with the default middleware: tracing, metrics, [`Retry::default`],
    /// a 30 s [`Timeout`] and [`CatchPanic`].
    pub fn new(name: impl Into<String>) -> Service {
        let name = name.into();
        let mut problems = Vec::new();
        if !valid_type_name(&name) {
            problems.push(format!(
                "the name `{name}` is not valid: use lower-case letters, digits, `-` and `.`"
            ));
        }
        Service {
            name,
            handlers: HashMap::new(),
            events: Vec::new(),
            commands: Vec::new(),
            prefetch: DEFAULT_PREFETCH,
            dedup: None,
            retry: Some(Retry::default()),
            timeout: Some(DEFAULT_HANDLER_TIMEOUT),
            tracing: true,
            metrics: true,
            layers: Vec::new(),
            problems,
        }
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn register<M: Message>(mut self, handler: Handler) -> Service {
        if !valid_type_name(M::TYPE) {
            self.problems.push(format!(
                "message type `{}` is not valid: use dot-separated lower-case segments",
                M::TYPE
            ));
        }
        if self.handlers.insert(M::TYPE, handler).is_some() {
            self.problems
                .push(format!("message type `{}` has two handlers", M::TYPE));
        }
        match M::KIND {
            MessageKind::Event => self.events.push(M::TYPE.to_string()),
            MessageKind::Command | MessageKind::Query => self.commands.push(M::TYPE.to_string()),
        }
        self
    }

    /// Handles an event type.
    pub fn on_event<E, F, Fut>(self, handler: F) -> Service
    where
        E: Event,
        F: Fn(E, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.register::<E>(unit_handler(handler))
    }

    /// Handles a command type. Only one service should handle each command.
    pub fn on_command<C, F, Fut>(self, handler: F) -> Service
    where
        C: Command,
        F: Fn(C, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.register::<C>(unit_handler(handler))
    }

    /// Answers a query type.
    pub fn on_query<Q, F, Fut>(self, handler: F) -> Service
    where
        Q: Query,
        F: Fn(Q, Context) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Q::Reply, HandlerError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased: Handler = Arc::new(move |ctx: Context| {
            let query = match decode::<Q>(&ctx) {
                Ok(query) => query,
                Err(e) => return Box::pin(std::future::ready(Err(e))),
            };
            let answer = handler(query, ctx);
            Box::pin(async move {
                let reply = answer.await?;
                <Q::Codec as Codec>::encode(&reply).map(Some).map_err(|e| {
                    HandlerError::permanent(format!(
                        "cannot encode the answer to `{}`: {e}",
                        Q::TYPE
                    ))
                })
            })
        });
        self.register::<Q>(erased)
    }

    /// How many unsettled messages one instance holds at once, which is also
    /// how many handlers run at once (default 32).
    pub fn prefetch(mut self, prefetch: u16) -> Service {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Has the broker drop duplicates of a dedup id (see
    /// [`crate::SendOptions::dedup_id`]) sent to this service within
    /// `window`: the service's queue is declared deduplicating (embedded and
    /// AMQP to Tern: `x-message-deduplication` with `x-cache-ttl`, kept
    /// across broker restarts). A queue declared before without it must be
    /// deleted first (the broker refuses to change a queue's arguments).
    /// NATS JetStream deduplicates within its stream's own window instead;
    /// the memory transport keeps the window in the process.
    /// Messages without a dedup id are never dropped as duplicates.
    pub fn deduplicate(mut self, window: Duration) -> Service {
        self.dedup = Some(window);
        self
    }

    /// What the service subscribes to.
    pub(crate) fn subscription_spec(&self) -> SubscriptionSpec {
        SubscriptionSpec {
            service: self.name.clone(),
            events: self.events.clone(),
            commands: self.commands.clone(),
            prefetch: self.prefetch,
            dedup: self.dedup,
        }
    }

    /// Replaces the retry policy.
    pub fn retry(mut self, retry: Retry) -> Service {
        self.retry = Some(retry);
        self
    }

    /// No retries: a failed message is dead-lettered at once.
    pub fn no_retry(mut self) -> Service {
        self.retry = None;
        self
    }

    /// Replaces the handler timeout.
    pub fn timeout(mut self, timeout: Duration) -> Service {
        self.timeout = Some(timeout);
        self
    }

    /// Drops the default tracing and metrics layers.
    pub fn without_observability(mut self) -> Service {
        self.tracing = false;
        self.metrics = false;
        self
    }

    /// Adds a layer between the retry policy and the timeout: it sees each
    /// attempt. Layers added first are outermost.
    pub fn layer<L>(mut self, layer: L) -> Service
    where
        L: Layer<Pipeline, Service = Pipeline> + Send + Sync + 'static,
    {
        self.layers.push(Box::new(move |inner| layer.layer(inner)));
        self
    }

    /// Builds the pipeline: tracing, metrics, retry, own layers, timeout,
    /// catch-panic, then the handler chosen by message type.
    fn pipeline(&mut self) -> Pipeline {
        let handlers = Arc::new(std::mem::take(&mut self.handlers));
        let service = self.name.clone();
        let mut pipeline: Pipeline =
            tower::util::BoxCloneService::new(tower::service_fn(move |handling: Handling| {
                let handler = handlers.get(handling.ctx.envelope().ty.as_str()).cloned();
                let service = service.clone();
                async move {
                    match handler {
                        Some(handler) => handler(handling.ctx).await,
                        None => Err(HandlerError::permanent(format!(
                            "service `{service}` has no handler for `{}`",
                            handling.ctx.envelope().ty
                        ))),
                    }
                }
            }));
        pipeline = CatchPanic.layer(pipeline);
        if let Some(timeout) = self.timeout {
            pipeline = Timeout(timeout).layer(pipeline);
        }
        for layer in self.layers.iter().rev() {
            pipeline = layer(pipeline);
        }
        if let Some(retry) = self.retry {
            pipeline = retry.layer(pipeline);
        }
        if self.metrics {
            pipeline = middleware::Metrics.layer(pipeline);
        }
        if self.tracing {
            pipeline = middleware::Tracing.layer(pipeline);
        }
        pipeline
    }
}

fn decode<M: Message>(ctx: &Context) -> Result<M, HandlerError> {
    <M::Codec as Codec>::decode(&ctx.envelope().data)
        .map_err(|e| HandlerError::permanent(format!("cannot decode `{}`: {e}", M::TYPE)))
}

fn unit_handler<M, F, Fut>(handler: F) -> Handler
where
    M: Message,
    F: Fn(M, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    Arc::new(move |ctx: Context| {
        let message = match decode::<M>(&ctx) {
            Ok(message) => message,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        };
        let done = handler(message, ctx);
        Box::pin(async move { done.await.map(|()| None) })
    })
}

/// A started service. Dropping it leaves the service running in the
/// background; call [`Running::shutdown`] to stop it gracefully.
#[derive(Debug)]
pub struct Running {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), BusError>>,
}

impl Running {
    /// Stops taking messages, finishes and settles the ones in flight, and
    /// returns once nothing of the service is running.
    pub async fn shutdown(mut self) -> Result<(), BusError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.task).await {
            Ok(result) => result,
            Err(e) => Err(BusError::Transport(TransportError::Broker {
                transport: "router",
                operation: "run service".into(),
                reason: e.to_string(),
            })),
        }
    }

    /// Stops at once, as a crash would: handlers in flight are dropped
    /// unsettled and the broker delivers their messages again.
    pub fn abort(self) {
        self.task.abort();
    }

    /// Whether the service stopped by itself (its transport closed).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Bus {
    /// Subscribes `service` and starts handling its messages.
    pub async fn start(&self, mut service: Service) -> Result<Running, BusError> {
        if !service.problems.is_empty() {
            return Err(BusError::InvalidService {
                service: service.name.clone(),
                reason: service.problems.join("; "),
            });
        }
        if service.handlers.is_empty() {
            return Err(BusError::InvalidService {
                service: service.name.clone(),
                reason: "it has no handlers: add some with on_event, on_command or on_query".into(),
            });
        }
        let spec = service.subscription_spec();
        let subscription = self.transport().subscribe(spec).await?;
        let pipeline = service.pipeline();
        let (stop_tx, stop_rx) = oneshot::channel();
        let router = Router {
            bus: self.with_source(service.name.clone()),
            service: Arc::from(service.name.as_str()),
            pipeline,
            window: service.prefetch,
        };
        let task = tokio::spawn(router.run(subscription, stop_rx));
        Ok(Running {
            stop: Some(stop_tx),
            task,
        })
    }
}

type Lanes = Arc<Mutex<HashMap<String, (u64, oneshot::Receiver<()>)>>>;

struct Router {
    bus: Bus,
    service: Arc<str>,
    pipeline: Pipeline,
    window: u16,
}

impl Router {
    async fn run(
        self,
        mut subscription: Box<dyn Subscription>,
        mut stop: oneshot::Receiver<()>,
    ) -> Result<(), BusError> {
        let window = u32::from(self.window);
        let slots = Arc::new(Semaphore::new(usize::from(self.window)));
        let lanes: Lanes = Arc::default();
        let mut sequence = 0u64;
        // Owned here so that aborting the router aborts its handlers too.
        let mut handlers = tokio::task::JoinSet::new();
        let ended = loop {
            let slot = tokio::select! {
                biased;
                _ = &mut stop => break false,
                slot = Arc::clone(&slots).acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break false,
                },
            };
            let incoming = tokio::select! {
                biased;
                _ = &mut stop => break false,
                next = subscription.next() => match next {
                    Some(Ok(incoming)) => incoming,
                    Some(Err(e)) => {
                        tracing::warn!(service = %self.service, error = %e, "receiving failed");
                        continue;
                    }
                    None => break true,
                },
            };
            sequence += 1;
            let lane = Lane::join(&lanes, incoming.envelope.partition_key.as_deref(), sequence);
            let work = self.handle(incoming, lane);
            handlers.spawn(async move {
                work.await;
                drop(slot);
            });
            while handlers.try_join_next().is_some() {}
        };
        if !ended {
            if let Err(e) = subscription.cancel().await {
                tracing::warn!(service = %self.service, error = %e, "cancelling the subscription failed");
            }
        }
        // Every slot back means every handler finished and settled.
        let _ = slots.acquire_many(window).await;
        while handlers.join_next().await.is_some() {}
        drop(subscription);
        if ended {
            return Err(TransportError::Closed(self.bus.transport().name()).into());
        }
        Ok(())
    }

    fn handle(&self, incoming: Incoming, lane: Lane) -> impl Future<Output = ()> + Send + 'static {
        let bus = self.bus.clone();
        let service = Arc::clone(&self.service);
        let pipeline = self.pipeline.clone();
        async move {
            let mut lane = lane;
            lane.wait().await;
            let Incoming {
                envelope,
                reply_to,
                attempt,
                settle,
                ..
            } = incoming;
            let envelope = Arc::new(envelope);
            let ctx = Context::new(
                bus.clone(),
                Arc::clone(&envelope),
                attempt,
                Arc::clone(&service),
            );
            let result = middleware::call(pipeline, Handling { ctx }).await;
            let labels = [
                ("service", service.to_string()),
                ("type", envelope.ty.clone()),
            ];
            let outcome = match result {
                Ok(answer) => {
                    if let (Some(to), Some(data)) = (reply_to, answer) {
                        answer_query(&bus, &envelope, to, data, None).await;
                    }
                    Outcome::Ack
                }
                Err(e) if !e.is_permanent() && e.retry_after().is_some() => {
                    metrics::counter!("tern_handler_retries_total", &labels).increment(1);
                    Outcome::Retry {
                        after: e.retry_after().unwrap_or_default(),
                        error: e.to_string(),
                        attempted: !e.is_deferred(),
                    }
                }
                Err(e) => {
                    metrics::counter!("tern_handler_dead_lettered_total", &labels).increment(1);
                    let error = format!("attempt {attempt}: {e}");
                    if let Some(to) = reply_to {
                        answer_query(&bus, &envelope, to, Bytes::new(), Some(&error)).await;
                    }
                    Outcome::DeadLetter { error }
                }
            };
            if let Err(e) = settle.settle(outcome).await {
                // Unsettled, the broker delivers it again: at least once.
                tracing::warn!(%service, id = %envelope.id, error = %e, "settling a message failed");
            }
            lane.finish();
        }
    }
}

/// Sends a query's answer (or its failure) back to the asker.
async fn answer_query(bus: &Bus, query: &Envelope, to: String, data: Bytes, error: Option<&str>) {
    let mut answer =
        Envelope::new(bus.source(), format!("{}.reply", query.ty), data).caused_by(query);
    answer.datacontenttype.clone_from(&query.datacontenttype);
    if let Some(error) = error {
        answer
            .extensions
            .insert(QUERY_ERROR_EXTENSION.to_string(), error.to_string());
    }
    if let Err(e) = bus.transport().send(Route::Reply { to }, answer).await {
        tracing::warn!(query = %query.id, error = %e, "sending an answer failed; the asker will time out");
    }
}

/// A message's place in its partition key's queue within this instance.
struct Lane {
    previous: Option<oneshot::Receiver<()>>,
    done: Option<(oneshot::Sender<()>, Lanes, String, u64)>,
}

impl Lane {
    fn join(lanes: &Lanes, key: Option<&str>, sequence: u64) -> Lane {
        let Some(key) = key else {
            return Lane {
                previous: None,
                done: None,
            };
        };
        let (tx, rx) = oneshot::channel();
        let previous = lanes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string(), (sequence, rx))
            .map(|(_, rx)| rx);
        Lane {
            previous,
            done: Some((tx, Arc::clone(lanes), key.to_string(), sequence)),
        }
    }

    /// Waits until the previous message with the same key is settled.
    async fn wait(&mut self) {
        if let Some(previous) = self.previous.take() {
            // An error means that handler's task died; the lane moves on.
            let _ = previous.await;
        }
    }

    fn finish(self) {
        if let Some((tx, lanes, key, sequence)) = self.done {
            let _ = tx.send(());
            let mut lanes = lanes.lock().unwrap_or_else(|p| p.into_inner());
            if lanes.get(&key).is_some_and(|(s, _)| *s == sequence) {
                lanes.remove(&key);
            }
        }
    }
}
