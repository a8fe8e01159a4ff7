//! An in-memory transport: no broker, no disk, for unit tests.
//!
//! It keeps the semantics that handlers depend on: events fan out to every
//! subscribed service, a command or query goes to the one service that
//! handles its type (or fails with [`TransportError::NoHandler`]),
//! instances of one service compete for its queue, a retry waits out its
//! delay before the message comes back, dead letters are kept per service,
//! and a message dropped unsettled (its handler's task died) is delivered
//! again, and a deduplicating service lets in one message per dedup id
//! within its window. It is not durable: everything is gone with the
//! process, and it has no delayed sends (so no schedules) and no streams
//! (so no replay). The
//! conformance suite runs against it like against the real transports.
//! [`crate::testing::TestHarness`] builds on it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::{
    BoxFuture, Incoming, Outcome, ReplyInbox, Route, Settle, Subscription, SubscriptionSpec,
    Transport,
};
use crate::envelope::Envelope;
use crate::error::TransportError;

const NAME: &str = "memory";

#[derive(Debug, Clone)]
struct Queued {
    envelope: Envelope,
    reply_to: Option<String>,
    attempt: u32,
    redelivered: bool,
}

#[derive(Debug, Default)]
struct ServiceQueue {
    ready: VecDeque<Queued>,
    in_flight: usize,
}

#[derive(Debug, Default)]
struct State {
    queues: HashMap<String, ServiceQueue>,
    /// Which services take each event type.
    events: HashMap<String, HashSet<String>>,
    /// Which services take each command or query type.
    commands: HashMap<String, HashSet<String>>,
    inboxes: HashMap<String, tokio::sync::mpsc::UnboundedSender<Envelope>>,
    sent: Vec<(Route, Envelope)>,
    dead_letters: HashMap<String, Vec<DeadLetter>>,
    waiting_retries: usize,
    /// The deduplicating services' windows of seen dedup ids.
    dedup: HashMap<String, DedupWindow>,
}

#[derive(Debug)]
struct DedupWindow {
    window: Duration,
    /// Dedup id to when it was first let in.
    seen: HashMap<String, Instant>,
}

impl DedupWindow {
    /// Whether `id` is new within the window (and remembers it if so).
    fn admit(&mut self, id: &str) -> bool {
        let now = Instant::now();
        let window = self.window;
        self.seen.retain(|_, at| now.duration_since(*at) < window);
        if self.seen.contains_key(id) {
            return false;
        }
        self.seen.insert(id.to_string(), now);
        true
    }
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Wakes subscriptions when a queue gains a message.
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enqueue(&self, service: &str, queued: Queued, front: bool) {
        {
            let mut state = self.lock();
            let queue = state.queues.entry(service.to_string()).or_default();
            if front {
                queue.ready.push_front(queued);
            } else {
                queue.ready.push_back(queued);
            }
        }
        self.changed.notify_waiters();
    }
}

/// A message a service gave up on.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The message.
    pub envelope: Envelope,
    /// Why the service gave up (the last attempt's error).
    pub error: String,
}

/// The in-memory transport. Clones share one set of queues.
#[derive(Debug, Clone, Default)]
pub struct Memory {
    shared: Arc<Shared>,
}

impl Memory {
    /// An empty transport.
    pub fn new() -> Memory {
        Memory::default()
    }

    /// Every envelope sent so far, with its route, oldest first.
    pub fn sent(&self) -> Vec<(Route, Envelope)> {
        self.shared.lock().sent.clone()
    }

    /// The messages a service dead-lettered, oldest first.
    pub fn dead_letters(&self, service: &str) -> Vec<DeadLetter> {
        self.shared
            .lock()
            .dead_letters
            .get(service)
            .cloned()
            .unwrap_or_default()
    }

    /// Takes a service's dead letters out.
    pub fn take_dead_letters(&self, service: &str) -> Vec<DeadLetter> {
        self.shared
            .lock()
            .dead_letters
            .remove(service)
            .unwrap_or_default()
    }

    /// Whether nothing is queued, in flight or waiting to be retried.
    pub fn is_idle(&self) -> bool {
        let state = self.shared.lock();
        state.waiting_retries == 0
            && state
                .queues
                .values()
                .all(|q| q.ready.is_empty() && q.in_flight == 0)
    }
}

impl Transport for Memory {
    fn name(&self) -> &'static str {
        NAME
    }

    fn send(&self, route: Route, envelope: Envelope) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move {
            let queued = |reply_to: Option<String>| Queued {
                envelope: envelope.clone(),
                reply_to,
                attempt: 1,
                redelivered: false,
            };
            let targets: Vec<(String, Queued)> = {
                let mut guard = self.shared.lock();
                let state = &mut *guard;
                state.sent.push((route.clone(), envelope.clone()));
                match &route {
                    Route::Event => state
                        .events
                        .get(&envelope.ty)
                        .map(|services| {
                            services.iter().map(|s| (s.clone(), queued(None))).collect()
                        })
                        .unwrap_or_default(),
                    Route::Command | Route::Query { .. } => {
                        let reply_to = match &route {
                            Route::Query { reply_to } => Some(reply_to.clone()),
                            _ => None,
                        };
                        let services = state.commands.get(&envelope.ty);
                        match services.filter(|s| !s.is_empty()) {
                            Some(services) => services
                                .iter()
                                .map(|s| (s.clone(), queued(reply_to.clone())))
                                .collect(),
                            None => return Err(TransportError::NoHandler(envelope.ty.clone())),
                        }
                    }
                    Route::Reply { to } => {
                        if let Some(inbox) = state.inboxes.get(to) {
                            let _ = inbox.send(envelope.clone());
                        }
                        Vec::new()
                    }
                }
            };
            // A deduplicating service lets one message per dedup id in per
            // window; the send itself succeeds, as a broker confirms a
            // duplicate.
            let targets: Vec<(String, Queued)> = match envelope.dedup_id() {
                None => targets,
                Some(id) => {
                    let mut state = self.shared.lock();
                    targets
                        .into_iter()
                        .filter(|(service, _)| {
                            state.dedup.get_mut(service).is_none_or(|w| w.admit(id))
                        })
                        .collect()
                }
            };
            for (service, queued) in targets {
                self.shared.enqueue(&service, queued, false);
            }
            Ok(())
        })
    }

    fn subscribe(
        &self,
        spec: SubscriptionSpec,
    ) -> BoxFuture<'_, Result<Box<dyn Subscription>, TransportError>> {
        Box::pin(async move {
            if let Some(window) = spec.dedup {
                self.shared
                    .lock()
                    .dedup
                    .entry(spec.service.clone())
                    .or_insert_with(|| DedupWindow {
                        window,
                        seen: HashMap::new(),
                    });
            }
            {
                let mut state = self.shared.lock();
                for ty in &spec.commands {
                    if let Some(other) = state
                        .commands
                        .get(ty)
                        .and_then(|services| services.iter().find(|s| **s != spec.service))
                    {
                        return Err(TransportError::Broker {
                            transport: NAME,
                            operation: format!("subscribe service '{}'", spec.service),
                            reason: format!(
                                "`{ty}` is already handled by service '{other}', and a command or query has exactly one handler"
                            ),
                        });
                    }
                }
                state.queues.entry(spec.service.clone()).or_default();
                for ty in &spec.events {
                    state
                        .events
                        .entry(ty.clone())
                        .or_default()
                        .insert(spec.service.clone());
                }
                for ty in &spec.commands {
                    state
                        .commands
                        .entry(ty.clone())
                        .or_default()
                        .insert(spec.service.clone());
                }
            }
            Ok(Box::new(MemorySubscription {
                shared: Arc::clone(&self.shared),
                service: spec.service,
                cancelled: false,
            }) as Box<dyn Subscription>)
        })
    }

    fn reply_inbox(&self) -> BoxFuture<'_, Result<Box<dyn ReplyInbox>, TransportError>> {
        Box::pin(async move {
            let address = format!("memory.reply.{}", uuid::Uuid::now_v7().simple());
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            self.shared.lock().inboxes.insert(address.clone(), tx);
            Ok(Box::new(MemoryInbox { address, rx }) as Box<dyn ReplyInbox>)
        })
    }
}

struct MemorySubscription {
    shared: Arc<Shared>,
    service: String,
    cancelled: bool,
}

impl Subscription for MemorySubscription {
    fn next(&mut self) -> BoxFuture<'_, Option<Result<Incoming, TransportError>>> {
        Box::pin(async move {
            loop {
                if self.cancelled {
                    return None;
                }
                // Register for a wake-up before looking, so a message
                // enqueued in between is not missed.
                let changed = self.shared.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                let taken = {
                    let mut state = self.shared.lock();
                    let queue = state.queues.entry(self.service.clone()).or_default();
                    let taken = queue.ready.pop_front();
                    if taken.is_some() {
                        queue.in_flight += 1;
                    }
                    taken
                };
                if let Some(queued) = taken {
                    return Some(Ok(Incoming {
                        envelope: queued.envelope.clone(),
                        reply_to: queued.reply_to.clone(),
                        attempt: queued.attempt,
                        redelivered: queued.redelivered,
                        settle: Box::new(MemorySettle {
                            shared: Arc::clone(&self.shared),
                            service: self.service.clone(),
                            queued: Some(queued),
                        }),
                    }));
                }
                changed.await;
            }
        })
    }

    fn cancel(&mut self) -> BoxFuture<'_, Result<(), TransportError>> {
        self.cancelled = true;
        Box::pin(std::future::ready(Ok(())))
    }
}

struct MemorySettle {
    shared: Arc<Shared>,
    service: String,
    queued: Option<Queued>,
}

impl MemorySettle {
    fn finish(&self) {
        let mut state = self.shared.lock();
        if let Some(queue) = state.queues.get_mut(&self.service) {
            queue.in_flight = queue.in_flight.saturating_sub(1);
        }
    }
}

impl Drop for MemorySettle {
    /// Dropped unsettled: its handler died, so the message goes back, as a
    /// broker does when a consumer's channel closes.
    fn drop(&mut self) {
        if let Some(mut queued) = self.queued.take() {
            self.finish();
            queued.redelivered = true;
            self.shared.enqueue(&self.service, queued, true);
        }
    }
}

impl Settle for MemorySettle {
    fn settle(
        mut self: Box<Self>,
        outcome: Outcome,
    ) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(async move {
            let Some(mut queued) = self.queued.take() else {
                return Ok(());
            };
            self.finish();
            match outcome {
                Outcome::Ack => {}
                Outcome::Requeue => self.shared.enqueue(&self.service, queued, true),
                Outcome::Retry {
                    after,
                    error,
                    attempted,
                } => {
                    queued.attempt += u32::from(attempted);
                    tracing::debug!(service = %self.service, %error, ?after, "retrying");
                    self.shared.lock().waiting_retries += 1;
                    let shared = Arc::clone(&self.shared);
                    let service = self.service.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        shared.lock().waiting_retries -= 1;
                        shared.enqueue(&service, queued, false);
                    });
                }
                Outcome::DeadLetter { error } => {
                    self.shared
                        .lock()
                        .dead_letters
                        .entry(self.service.clone())
                        .or_default()
                        .push(DeadLetter {
                            envelope: queued.envelope,
                            error,
                        });
                }
            }
            Ok(())
        })
    }
}

struct MemoryInbox {
    address: String,
    rx: tokio::sync::mpsc::UnboundedReceiver<Envelope>,
}

impl ReplyInbox for MemoryInbox {
    fn address(&self) -> &str {
        &self.address
    }

    fn next(&mut self) -> BoxFuture<'_, Option<Envelope>> {
        Box::pin(self.rx.recv())
    }
}
