//! Redrive jobs: moving dead letters back to where they came from, in the
//! background, at a limited rate, with progress an operator can poll.
//!
//! Each message is fetched from the dead-letter queue through a broker
//! channel, republished to its target, and acknowledged only once the
//! republish is durable (publish confirmed, then ack): a crash in between
//! leaves a copy in both places, never in neither. A message that cannot
//! be moved (no target, a target that routes it nowhere or refuses it) is
//! returned to the dead-letter queue and the job stops as failed, naming
//! it. A job moves at most the messages that were ready when it started,
//! so redriving a queue into itself ends.
//!
//! The target of a message, unless the request names one: for a dead
//! letter of the `tern` toolkit (a `tern-failed-service` header), the
//! default exchange with the service's queue (the service's name), and
//! the toolkit's attempt and error headers are dropped so that the service
//! gets fresh attempts; otherwise the exchange and first routing key of
//! its latest `x-death` entry.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Value};
use tern_broker::{Broker, ConnectionId, ExchangeName, FieldValue, Message};
use tokio::task::AbortHandle;

/// The toolkit's header naming the service that dead-lettered a message.
pub(crate) const FAILED_SERVICE_HEADER: &str = "tern-failed-service";
/// The toolkit's header saying why.
pub(crate) const ERROR_HEADER: &str = "tern-error";
/// The toolkit's attempt counter.
const ATTEMPT_HEADER: &str = "tern-attempt";
/// Finished jobs kept for their progress to be read; older ones are forgotten.
const KEEP_FINISHED: usize = 100;

/// Where a redriven message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// The exchange ("" for the default exchange).
    pub(crate) exchange: String,
    /// The routing key.
    pub(crate) routing_key: String,
}

fn header<'a>(message: &'a Message, name: &str) -> Option<&'a FieldValue> {
    message.properties.headers.as_ref()?.get(name)
}

/// Where a message goes back to by default, or `None` if it does not say.
pub(crate) fn default_target(message: &Message) -> Option<Target> {
    if let Some(service) = header(message, FAILED_SERVICE_HEADER).and_then(FieldValue::as_str) {
        return Some(Target {
            exchange: String::new(),
            routing_key: service.to_string(),
        });
    }
    let Some(FieldValue::Array(deaths)) = header(message, "x-death") else {
        return None;
    };
    let Some(FieldValue::Table(latest)) = deaths.first() else {
        return None;
    };
    let exchange = latest.get("exchange").and_then(FieldValue::as_str)?;
    let routing_key = match latest.get("routing-keys") {
        Some(FieldValue::Array(keys)) => keys.first().and_then(FieldValue::as_str)?,
        _ => return None,
    };
    Some(Target {
        exchange: exchange.to_string(),
        routing_key: routing_key.to_string(),
    })
}

/// What a redrive request asks for.
#[derive(Debug, Clone)]
pub(crate) struct RedriveSpec {
    pub(crate) vhost: String,
    pub(crate) queue: String,
    pub(crate) rate_per_second: f64,
    pub(crate) limit: Option<u64>,
    /// The exchange every message goes to, instead of its own target's.
    pub(crate) to_exchange: Option<String>,
    /// The routing key every message goes with, instead of its own
    /// target's (or, without a target, its own routing key).
    pub(crate) routing_key: Option<String>,
}

/// Where a job is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum JobState {
    Running,
    Completed,
    Failed(String),
}

/// One redrive job and its progress.
#[derive(Debug)]
pub(crate) struct Job {
    id: u64,
    spec: RedriveSpec,
    /// How many messages the job will move at most (set when it starts).
    total: AtomicU64,
    moved: AtomicU64,
    state: Mutex<JobState>,
}

impl Job {
    fn state(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn finish(&self, state: JobState) {
        *self.state() = state;
    }

    /// The vhost of the queue it drains.
    pub(crate) fn vhost(&self) -> &str {
        &self.spec.vhost
    }

    /// The job's progress as the API reports it.
    pub(crate) fn progress(&self) -> Value {
        let state = self.state().clone();
        let moved = self.moved.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        let (name, reason) = match &state {
            JobState::Running => ("running", None),
            JobState::Completed => ("completed", None),
            JobState::Failed(reason) => ("failed", Some(reason.clone())),
        };
        json!({
            "id": self.id,
            "vhost": self.spec.vhost,
            "queue": self.spec.queue,
            "state": name,
            "moved": moved,
            "remaining": if state == JobState::Running { total.saturating_sub(moved) } else { 0 },
            "total": total,
            "rate_per_second": self.spec.rate_per_second,
            "reason": reason,
        })
    }
}

/// The server's redrive jobs. Dropping it stops the running ones (a
/// message in flight stays unacked on the job's channel and so returns
/// to its queue).
#[derive(Debug, Default)]
pub(crate) struct Redrives {
    next_id: AtomicU64,
    jobs: Mutex<BTreeMap<u64, (Arc<Job>, AbortHandle)>>,
}

impl Redrives {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, (Arc<Job>, AbortHandle)>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a job on the current runtime; returns it.
    pub(crate) fn start(
        &self,
        broker: Broker,
        connection: ConnectionId,
        spec: RedriveSpec,
    ) -> Arc<Job> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let job = Arc::new(Job {
            id,
            spec,
            total: AtomicU64::new(0),
            moved: AtomicU64::new(0),
            state: Mutex::new(JobState::Running),
        });
        let task = tokio::spawn(run(Arc::clone(&job), broker, connection));
        let mut jobs = self.lock();
        jobs.insert(id, (Arc::clone(&job), task.abort_handle()));
        // Forget the oldest finished jobs beyond the bound.
        let finished: Vec<u64> = jobs
            .iter()
            .filter(|(_, (j, _))| *j.state() != JobState::Running)
            .map(|(id, _)| *id)
            .collect();
        for old in finished
            .iter()
            .take(finished.len().saturating_sub(KEEP_FINISHED))
        {
            jobs.remove(old);
        }
        job
    }

    /// A job by id.
    pub(crate) fn get(&self, id: u64) -> Option<Arc<Job>> {
        self.lock().get(&id).map(|(job, _)| Arc::clone(job))
    }

    /// Every job, oldest first.
    pub(crate) fn all(&self) -> Vec<Arc<Job>> {
        self.lock()
            .values()
            .map(|(job, _)| Arc::clone(job))
            .collect()
    }
}

impl Drop for Redrives {
    fn drop(&mut self) {
        for (_, (_, task)) in self.lock().iter() {
            task.abort();
        }
    }
}

/// Runs a job to its end, recording how it ended.
async fn run(job: Arc<Job>, broker: Broker, connection: ConnectionId) {
    let end = match drive(&job, &broker, connection).await {
        Ok(()) => JobState::Completed,
        Err(reason) => JobState::Failed(reason),
    };
    job.finish(end);
}

async fn drive(job: &Job, broker: &Broker, connection: ConnectionId) -> Result<(), String> {
    let spec = &job.spec;
    let ready = broker
        .queue_info(&spec.vhost, &spec.queue)
        .map_err(|e| e.to_string())?
        .ready;
    let total = spec.limit.map_or(ready, |limit| limit.min(ready));
    job.total.store(total, Ordering::Relaxed);
    let mut channel = broker
        .open_channel(&spec.vhost, connection)
        .map_err(|e| e.to_string())?;
    let pause = Duration::from_secs_f64(1.0 / spec.rate_per_second);
    let mut next = tokio::time::Instant::now();
    let mut moved = 0;
    while moved < total {
        tokio::time::sleep_until(next).await;
        next += pause;
        let got = channel.get(&spec.queue, false).map_err(|e| e.to_string())?;
        let Some(got) = got else {
            // Someone else took the rest.
            job.total.store(moved, Ordering::Relaxed);
            break;
        };
        let tag = got.tag;
        let outcome = republish(broker, spec, got.message).await;
        match outcome {
            Ok(()) => {
                channel.ack(tag, false).map_err(|e| e.to_string())?;
                moved += 1;
                job.moved.store(moved, Ordering::Relaxed);
            }
            Err(reason) => {
                // Back to the dead-letter queue, at its head, unchanged.
                let _ = channel.reject(tag, true);
                return Err(reason);
            }
        }
    }
    channel.close();
    Ok(())
}

/// Publishes one dead letter to its target and waits until it is durable.
async fn republish(
    broker: &Broker,
    spec: &RedriveSpec,
    mut message: Message,
) -> Result<(), String> {
    let own = default_target(&message);
    // The request's exchange and key, each defaulting to the message's own.
    let exchange = match (&spec.to_exchange, &own) {
        (Some(exchange), _) => exchange.clone(),
        (None, Some(t)) => t.exchange.clone(),
        (None, None) => {
            return Err(format!(
                "a message in queue '{}' has neither an x-death entry nor a {FAILED_SERVICE_HEADER} header to say where it came from; name to_exchange",
                spec.queue
            ))
        }
    };
    let routing_key = spec
        .routing_key
        .clone()
        .or_else(|| own.as_ref().map(|t| t.routing_key.clone()))
        .unwrap_or_else(|| message.routing_key.clone());
    let target = Target {
        exchange,
        routing_key,
    };
    if header(&message, FAILED_SERVICE_HEADER).is_some() {
        if let Some(headers) = message.properties.headers.as_mut() {
            for name in [FAILED_SERVICE_HEADER, ERROR_HEADER, ATTEMPT_HEADER] {
                headers.remove(name);
            }
        }
    }
    message.exchange = ExchangeName::new(target.exchange.as_str()).map_err(|e| e.to_string())?;
    message.routing_key = target.routing_key.clone();
    let published = broker
        .publish(&spec.vhost, message)
        .map_err(|e| e.to_string())?;
    let shown = if target.exchange.is_empty() {
        "the default exchange".to_string()
    } else {
        format!("exchange '{}'", target.exchange)
    };
    if published.rejected {
        return Err(format!(
            "{shown} with routing key '{}' reached a full queue that refused the message",
            target.routing_key
        ));
    }
    if published.routed == 0 {
        return Err(format!(
            "{shown} routes routing key '{}' to no queue",
            target.routing_key
        ));
    }
    published.confirmed().await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tern_broker::{FieldTable, Properties};

    fn message(headers: Vec<(&str, FieldValue)>) -> Message {
        let mut table = FieldTable::new();
        for (k, v) in headers {
            table.insert(k.into(), v);
        }
        Message {
            exchange: ExchangeName::new("dlx").unwrap(),
            routing_key: "orders".into(),
            properties: Properties {
                headers: Some(table),
                ..Properties::default()
            },
            body: Bytes::from_static(b"x"),
        }
    }

    fn death(exchange: &str, key: &str) -> FieldValue {
        let mut t = FieldTable::new();
        t.insert("exchange".into(), FieldValue::String(exchange.into()));
        t.insert(
            "routing-keys".into(),
            FieldValue::Array(vec![FieldValue::String(key.into())]),
        );
        FieldValue::Table(t)
    }

    #[test]
    fn targets_come_from_the_latest_death_or_the_failed_service() {
        let m = message(vec![(
            "x-death",
            FieldValue::Array(vec![death("shop", "order.placed"), death("", "old")]),
        )]);
        assert_eq!(
            default_target(&m),
            Some(Target {
                exchange: "shop".into(),
                routing_key: "order.placed".into()
            })
        );
        let toolkit = message(vec![
            (
                "x-death",
                FieldValue::Array(vec![death("", "billing.retry.1")]),
            ),
            (FAILED_SERVICE_HEADER, FieldValue::String("billing".into())),
        ]);
        assert_eq!(
            default_target(&toolkit),
            Some(Target {
                exchange: String::new(),
                routing_key: "billing".into()
            })
        );
        assert_eq!(default_target(&message(vec![])), None);
        let no_keys = message(vec![(
            "x-death",
            FieldValue::Array(vec![FieldValue::Table(FieldTable::new())]),
        )]);
        assert_eq!(default_target(&no_keys), None);
    }
}
