//! The message trace index: a bounded, in-memory record of recent
//! messages' envelopes (ids, type, source, exchange, routing key, the
//! queues they reached) and what happened to them (delivered, acked,
//! rejected, requeued), looked up by correlation id, so that an operator
//! can follow one flow across services without an external tracing system.
//!
//! Off by default ([`Broker::set_tracing`] turns it on). When on, only
//! messages with a correlation id are recorded, and of those only one
//! correlation id in `sample_one_in` (chosen by a hash of the id, so a
//! flow is kept or dropped whole). The index holds at most `capacity`
//! messages; the oldest go first. When off, the cost on the message path
//! is one atomic load.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::SystemTime;

use crate::broker::Broker;
use crate::message::Message;
use crate::name::{QueueName, VhostName};
use crate::value::FieldValue;

/// The header the `tern` toolkit carries a causation id in (CloudEvents'
/// AMQP binding spelling).
const CAUSATION_HEADER: &str = "cloudEvents_causationid";

/// How tracing is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceSettings {
    /// The most messages kept.
    pub capacity: usize,
    /// Keep one correlation id in this many (1: all).
    pub sample_one_in: u32,
}

/// What happened to a traced message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceEventKind {
    /// Handed to a consumer, or fetched.
    Delivered,
    /// Acknowledged.
    Acked,
    /// Rejected without requeue (dropped or dead-lettered).
    Rejected,
    /// Returned to its queue.
    Requeued,
}

/// One event of a traced message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEvent {
    /// What happened.
    pub kind: TraceEventKind,
    /// In which queue.
    pub queue: QueueName,
    /// To which consumer (deliveries to consumers only).
    pub consumer_tag: Option<String>,
    /// When.
    pub at: SystemTime,
}

/// A traced message: its envelope and its events, in time order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TracedMessage {
    /// The `message-id` property.
    pub message_id: Option<String>,
    /// The `correlation-id` property.
    pub correlation_id: String,
    /// The causation id header, if any.
    pub causation_id: Option<String>,
    /// The `type` property.
    pub message_type: Option<String>,
    /// The `app-id` property: the sending service.
    pub app_id: Option<String>,
    /// The vhost it was published in.
    pub vhost: VhostName,
    /// The exchange it was published to ("" for the default exchange).
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// The queues it reached.
    pub queues: Vec<QueueName>,
    /// When it was published.
    pub published_at: SystemTime,
    /// What happened to it since.
    pub events: Vec<TraceEvent>,
}

/// Which traced message a delivery is of: enough to find it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TraceKey {
    correlation_id: String,
    message_id: Option<String>,
}

#[derive(Debug)]
struct Index {
    settings: TraceSettings,
    messages: VecDeque<TracedMessage>,
}

/// The broker's trace index.
#[derive(Debug, Default)]
pub(crate) struct Tracer {
    on: AtomicBool,
    index: Mutex<Option<Index>>,
}

fn sampled(correlation_id: &str, one_in: u32) -> bool {
    if one_in <= 1 {
        return true;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    correlation_id.hash(&mut h);
    h.finish().is_multiple_of(u64::from(one_in))
}

impl Tracer {
    fn lock(&self) -> MutexGuard<'_, Option<Index>> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The key a message is traced under, if tracing is on and it is sampled.
    pub(crate) fn key(&self, message: &Message) -> Option<TraceKey> {
        if !self.on.load(Ordering::Relaxed) {
            return None;
        }
        let correlation_id = message.properties.correlation_id.clone()?;
        Some(TraceKey {
            correlation_id,
            message_id: message.properties.message_id.clone(),
        })
    }

    /// Records a publish that reached `queues`.
    pub(crate) fn published(&self, message: &Message, vhost: &VhostName, queues: Vec<QueueName>) {
        let Some(key) = self.key(message) else {
            return;
        };
        let mut guard = self.lock();
        let Some(index) = guard.as_mut() else {
            return;
        };
        if !sampled(&key.correlation_id, index.settings.sample_one_in) {
            return;
        }
        let p = &message.properties;
        let header = |name: &str| {
            p.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .and_then(FieldValue::as_str)
                .map(str::to_string)
        };
        while index.messages.len() >= index.settings.capacity.max(1) {
            index.messages.pop_front();
        }
        index.messages.push_back(TracedMessage {
            message_id: key.message_id,
            correlation_id: key.correlation_id,
            causation_id: header(CAUSATION_HEADER),
            message_type: p.kind.clone(),
            app_id: p.app_id.clone(),
            vhost: vhost.clone(),
            exchange: message.exchange.as_str().to_string(),
            routing_key: message.routing_key.clone(),
            queues,
            published_at: SystemTime::now(),
            events: Vec::new(),
        });
    }

    /// Records an event of the traced message `key` in `queue`.
    pub(crate) fn event(
        &self,
        key: &TraceKey,
        kind: TraceEventKind,
        queue: &QueueName,
        consumer_tag: Option<&str>,
    ) {
        let mut guard = self.lock();
        let Some(index) = guard.as_mut() else {
            return;
        };
        // The latest publish of this message that reached this queue.
        let found = index.messages.iter_mut().rev().find(|m| {
            m.correlation_id == key.correlation_id
                && m.message_id == key.message_id
                && m.queues.contains(queue)
        });
        if let Some(m) = found {
            m.events.push(TraceEvent {
                kind,
                queue: queue.clone(),
                consumer_tag: consumer_tag.map(str::to_string),
                at: SystemTime::now(),
            });
        }
    }
}

/// Tracing: turning it on and off, and looking flows up.
impl Broker {
    /// Turns tracing on with `settings` (clearing what was kept), or off
    /// with `None` (dropping it).
    pub fn set_tracing(&self, settings: Option<TraceSettings>) {
        let tracer = self.tracer();
        let mut guard = tracer.lock();
        *guard = settings.map(|settings| Index {
            settings,
            messages: VecDeque::new(),
        });
        tracer.on.store(guard.is_some(), Ordering::Relaxed);
    }

    /// How tracing is set; `None` when off.
    pub fn tracing(&self) -> Option<TraceSettings> {
        self.tracer().lock().as_ref().map(|i| i.settings)
    }

    /// The traced messages with this correlation id, in publish order.
    pub fn trace(&self, correlation_id: &str) -> Vec<TracedMessage> {
        self.tracer()
            .lock()
            .as_ref()
            .map(|i| {
                i.messages
                    .iter()
                    .filter(|m| m.correlation_id == correlation_id)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_keeps_a_flow_whole_and_one_in_n_roughly() {
        assert!(sampled("anything", 1));
        let kept = (0..10_000)
            .filter(|i| sampled(&format!("flow-{i}"), 10))
            .count();
        assert!((500..1500).contains(&kept), "{kept}");
        for i in 0..100 {
            let id = format!("flow-{i}");
            assert_eq!(sampled(&id, 7), sampled(&id, 7));
        }
    }
}
