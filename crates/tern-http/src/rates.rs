//! Message rates and a short history for the dashboard's charts.
//!
//! The broker keeps monotonic counters (published, delivered, redelivered,
//! acked per queue; published and unroutable per exchange) only in the
//! process's metrics recorder, so a background task reads them from the
//! recorder's rendered text every interval (5 s by default), together with
//! every queue's depth from the broker, and keeps the last
//! [`HISTORY`] samples. A rate is the difference between the two newest
//! samples divided by the time between them, in messages per second, as
//! RabbitMQ's `*_details.rate` over its last sampling interval.
//!
//! Without a recorder there are no counters: `message_stats` is absent
//! (null in the overview), while depths are still sampled.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use tokio::sync::watch;

use crate::metrics::MetricsSource;

/// How many samples are kept: 10 minutes at the default 5 s interval.
pub(crate) const HISTORY: usize = 120;

/// The default time between samples.
pub(crate) const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// A queue or exchange, by vhost and name.
type Entity = (String, String);

/// A queue's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct QueueCounters {
    publish: u64,
    deliver_get: u64,
    ack: u64,
    redeliver: u64,
}

impl QueueCounters {
    const KEYS: [&'static str; 4] = ["publish", "deliver_get", "ack", "redeliver"];

    fn values(&self) -> [u64; 4] {
        [self.publish, self.deliver_get, self.ack, self.redeliver]
    }

    fn add(&mut self, other: &QueueCounters) {
        self.publish += other.publish;
        self.deliver_get += other.deliver_get;
        self.ack += other.ack;
        self.redeliver += other.redeliver;
    }
}

/// An exchange's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct ExchangeCounters {
    publish_in: u64,
    unroutable: u64,
}

impl ExchangeCounters {
    const KEYS: [&'static str; 2] = ["publish_in", "publish_out"];

    /// Messages in, and messages that left for at least one queue.
    fn values(&self) -> [u64; 2] {
        [
            self.publish_in,
            self.publish_in.saturating_sub(self.unroutable),
        ]
    }
}

/// One sample: counters (when a recorder exists) and depths.
#[derive(Debug, Clone, Default)]
struct Sample {
    /// Milliseconds since the Unix epoch.
    at_ms: u64,
    counters: Option<Counters>,
    /// Every queue's ready plus unacknowledged messages.
    depths: HashMap<Entity, u64>,
    /// Every client connection's bytes received and sent, by name.
    traffic: HashMap<String, (u64, u64)>,
}

#[derive(Debug, Clone, Default)]
struct Counters {
    queues: HashMap<Entity, QueueCounters>,
    exchanges: HashMap<Entity, ExchangeCounters>,
}

impl Counters {
    /// The counters summed over the queues of the vhosts `sees` keeps.
    fn total(&self, sees: &dyn Fn(&str) -> bool) -> QueueCounters {
        let mut total = QueueCounters::default();
        for ((vhost, _), c) in &self.queues {
            if sees(vhost) {
                total.add(c);
            }
        }
        total
    }
}

/// The samples, newest last, shared by the sampler and the handlers.
#[derive(Debug, Clone)]
pub(crate) struct Rates {
    inner: Arc<Mutex<VecDeque<Sample>>>,
    interval: Duration,
}

impl Rates {
    pub(crate) fn new(interval: Duration) -> Rates {
        Rates {
            inner: Arc::new(Mutex::new(VecDeque::with_capacity(HISTORY))),
            interval,
        }
    }

    fn samples(&self) -> MutexGuard<'_, VecDeque<Sample>> {
        // A panic while holding the lock cannot leave the deque half-updated
        // (push and pop are whole), so a poisoned lock is still good.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one sample now.
    pub(crate) fn sample(&self, broker: &tern_broker::Broker, metrics: Option<&MetricsSource>) {
        let mut depths = HashMap::new();
        for vhost in broker.vhosts() {
            // A vhost deleted meanwhile has no queues.
            for q in broker.queues(vhost.as_str()).unwrap_or_default() {
                depths.insert(
                    (vhost.as_str().to_string(), q.name.as_str().to_string()),
                    q.ready + q.unacked,
                );
            }
        }
        let traffic = broker
            .connections()
            .into_iter()
            .map(|c| (c.name, (c.received_bytes, c.sent_bytes)))
            .collect();
        let sample = Sample {
            at_ms: now_ms(),
            counters: metrics.map(|m| parse(&m.render())),
            depths,
            traffic,
        };
        let mut samples = self.samples();
        if samples.len() == HISTORY {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// The two newest samples that have counters, newest first.
    fn last_two(samples: &VecDeque<Sample>) -> Option<(&Sample, Option<&Sample>)> {
        let mut with = samples.iter().rev().filter(|s| s.counters.is_some());
        let newest = with.next()?;
        Some((newest, with.next()))
    }

    /// The overview's `message_stats`: totals over every queue of the
    /// vhosts `sees` keeps, with their rates; None without a recorder or
    /// before the first sample.
    pub(crate) fn overview_stats(&self, sees: &dyn Fn(&str) -> bool) -> Option<Map<String, Value>> {
        let samples = self.samples();
        let (newest, older) = Rates::last_two(&samples)?;
        let now = newest.counters.as_ref()?.total(sees);
        let before = older.and_then(|o| o.counters.as_ref().map(|c| c.total(sees)));
        Some(stats(
            &QueueCounters::KEYS,
            &now.values(),
            before
                .as_ref()
                .map(QueueCounters::values)
                .as_ref()
                .map(|v| &v[..]),
            elapsed(newest, older),
        ))
    }

    /// A queue's `message_stats`.
    pub(crate) fn queue_stats(&self, vhost: &str, name: &str) -> Option<Value> {
        let samples = self.samples();
        let (newest, older) = Rates::last_two(&samples)?;
        let key = (vhost.to_string(), name.to_string());
        let now = newest
            .counters
            .as_ref()?
            .queues
            .get(&key)
            .copied()
            .unwrap_or_default();
        let before = older
            .and_then(|o| o.counters.as_ref())
            .map(|c| c.queues.get(&key).copied().unwrap_or_default());
        Some(Value::Object(stats(
            &QueueCounters::KEYS,
            &now.values(),
            before
                .as_ref()
                .map(QueueCounters::values)
                .as_ref()
                .map(|v| &v[..]),
            elapsed(newest, older),
        )))
    }

    /// A connection's bytes per second received and sent over the last
    /// interval, as RabbitMQ's `recv_oct_details.rate` and
    /// `send_oct_details.rate`; 0 until two samples have seen it.
    pub(crate) fn connection_rates(&self, name: &str) -> (f64, f64) {
        let samples = self.samples();
        let mut newest_first = samples.iter().rev();
        let (Some(newest), Some(older)) = (newest_first.next(), newest_first.next()) else {
            return (0.0, 0.0);
        };
        let (Some(now), Some(before)) = (newest.traffic.get(name), older.traffic.get(name)) else {
            return (0.0, 0.0);
        };
        let secs = elapsed(newest, Some(older));
        (
            rate(now.0, Some(before.0), secs),
            rate(now.1, Some(before.1), secs),
        )
    }

    /// An exchange's `message_stats` (`publish_in`, `publish_out`).
    pub(crate) fn exchange_stats(&self, vhost: &str, name: &str) -> Option<Value> {
        let samples = self.samples();
        let (newest, older) = Rates::last_two(&samples)?;
        let key = (vhost.to_string(), name.to_string());
        let now = newest
            .counters
            .as_ref()?
            .exchanges
            .get(&key)
            .copied()
            .unwrap_or_default();
        let before = older
            .and_then(|o| o.counters.as_ref())
            .map(|c| c.exchanges.get(&key).copied().unwrap_or_default());
        Some(Value::Object(stats(
            &ExchangeCounters::KEYS,
            &now.values(),
            before
                .as_ref()
                .map(ExchangeCounters::values)
                .as_ref()
                .map(|v| &v[..]),
            elapsed(newest, older),
        )))
    }

    /// `GET /api/rates`: the history of the vhosts `sees` keeps, oldest
    /// first. Each point's rates are over the interval that ends at it (the
    /// first point has none); each queue's depths line up with the points
    /// (null where it did not exist).
    pub(crate) fn history(&self, sees: &dyn Fn(&str) -> bool) -> Value {
        let samples = self.samples();
        let mut points = Vec::with_capacity(samples.len());
        let mut queues: BTreeMap<&Entity, Vec<Value>> = BTreeMap::new();
        for s in samples.iter() {
            for key in s.depths.keys().filter(|(vhost, _)| sees(vhost)) {
                queues.entry(key).or_default();
            }
        }
        for (i, s) in samples.iter().enumerate() {
            let older = i.checked_sub(1).and_then(|j| samples.get(j));
            let mut point = Map::new();
            point.insert("timestamp".into(), json!(s.at_ms));
            let messages: u64 = s
                .depths
                .iter()
                .filter(|((vhost, _), _)| sees(vhost))
                .map(|(_, d)| d)
                .sum();
            point.insert("messages".into(), json!(messages));
            let rates = match (&s.counters, older.and_then(|o| o.counters.as_ref())) {
                (Some(now), Some(before)) => {
                    let secs = elapsed(s, older);
                    let (now, before) = (now.total(sees).values(), before.total(sees).values());
                    QueueCounters::KEYS
                        .iter()
                        .zip(now.iter().zip(before.iter()))
                        .map(|(k, (n, b))| ((*k).to_string(), json!(rate(*n, Some(*b), secs))))
                        .collect::<Map<String, Value>>()
                }
                _ => Map::new(),
            };
            for k in QueueCounters::KEYS {
                point.insert(k.into(), rates.get(k).cloned().unwrap_or(Value::Null));
            }
            points.push(Value::Object(point));
            for (key, depths) in queues.iter_mut() {
                depths.push(s.depths.get(*key).map_or(Value::Null, |d| json!(d)));
            }
        }
        let queues: Vec<Value> = queues
            .into_iter()
            .map(|((vhost, name), messages)| json!({"vhost": vhost, "name": name, "messages": messages}))
            .collect();
        json!({
            "interval_ms": u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX),
            "samples": points,
            "queues": queues,
        })
    }

    /// Samples every interval until the server closes.
    pub(crate) fn spawn(
        &self,
        broker: tern_broker::Broker,
        metrics: Option<MetricsSource>,
        mut closing: watch::Receiver<bool>,
    ) {
        let rates = self.clone();
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = ticks.tick() => rates.sample(&broker, metrics.as_ref()),
                    _ = closing.wait_for(|closed| *closed) => return,
                }
            }
        });
    }
}

/// Seconds between two samples; None if there is no older one or no time
/// passed.
fn elapsed(newest: &Sample, older: Option<&Sample>) -> Option<f64> {
    let ms = newest.at_ms.checked_sub(older?.at_ms)?;
    (ms > 0).then(|| ms as f64 / 1000.0)
}

/// Messages per second between two counter values; 0 without an older
/// one. A counter that went down (a queue deleted and declared again)
/// counts from zero.
fn rate(now: u64, before: Option<u64>, secs: Option<f64>) -> f64 {
    match (before, secs) {
        (Some(b), Some(s)) => {
            let delta = if now >= b { now - b } else { now };
            // Rounded to 0.1 msg/s: finer is noise at this interval.
            (delta as f64 / s * 10.0).round() / 10.0
        }
        _ => 0.0,
    }
}

/// RabbitMQ's shape: `{key: count, key_details: {rate}}` per counter.
fn stats(
    keys: &[&str],
    now: &[u64],
    before: Option<&[u64]>,
    secs: Option<f64>,
) -> Map<String, Value> {
    let mut out = Map::new();
    for (i, key) in keys.iter().enumerate() {
        let n = now.get(i).copied().unwrap_or(0);
        let b = before.and_then(|b| b.get(i).copied());
        out.insert((*key).to_string(), json!(n));
        out.insert(format!("{key}_details"), json!({"rate": rate(n, b, secs)}));
    }
    out
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The per-queue and per-exchange counters in a Prometheus text rendering.
fn parse(text: &str) -> Counters {
    let mut counters = Counters::default();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((family, labels, value)) = split_sample(line) else {
            continue;
        };
        let get = |name: &str| {
            labels
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        // Counters are whole numbers; the exporter may print them as floats.
        let value = value as u64;
        if let Some(exchange) = family.strip_prefix("tern_exchange_messages_") {
            let (Some(vhost), Some(name)) = (get("vhost"), get("exchange")) else {
                continue;
            };
            let c = counters.exchanges.entry((vhost, name)).or_default();
            match exchange {
                "published_total" => c.publish_in += value,
                "unroutable_total" => c.unroutable += value,
                _ => {}
            }
        } else if let Some(queue) = family.strip_prefix("tern_queue_messages_") {
            let (Some(vhost), Some(name)) = (get("vhost"), get("queue")) else {
                continue;
            };
            let slot: fn(&mut QueueCounters) -> &mut u64 = match queue {
                "published_total" => |c: &mut QueueCounters| &mut c.publish,
                "delivered_total" => |c: &mut QueueCounters| &mut c.deliver_get,
                "acked_total" => |c: &mut QueueCounters| &mut c.ack,
                "redelivered_total" => |c: &mut QueueCounters| &mut c.redeliver,
                _ => continue,
            };
            *slot(counters.queues.entry((vhost, name)).or_default()) += value;
        }
    }
    counters
}

/// A sample's labels, unescaped, in order.
type Labels = Vec<(String, String)>;

/// A sample line's family, labels and value.
pub(crate) fn split_sample(line: &str) -> Option<(&str, Labels, f64)> {
    let name_end = line.find(['{', ' '])?;
    let family = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        let mut key = String::new();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '}' => {
                    end = Some(i + 1);
                    break;
                }
                ',' | ' ' => {}
                '=' => {
                    if chars.next().map(|(_, c)| c) != Some('"') {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '"' => break,
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            other => value.push(other),
                        }
                    }
                    labels.push((std::mem::take(&mut key), value));
                }
                c => key.push(c),
            }
        }
        rest = &body[end?..];
    }
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some((family, labels, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_split_with_escaped_labels() {
        let (family, labels, value) =
            split_sample(r#"tern_queue_messages_acked_total{vhost="/",queue="a\"b,c}"} 42"#)
                .unwrap_or_else(|| panic!("not parsed"));
        assert_eq!(family, "tern_queue_messages_acked_total");
        assert_eq!(
            labels,
            vec![
                ("vhost".into(), "/".into()),
                ("queue".into(), "a\"b,c}".into())
            ]
        );
        assert_eq!(value, 42.0);
        assert!(split_sample("tern_up").is_none());
        assert_eq!(split_sample("tern_up 1").map(|s| s.2), Some(1.0));
    }

    #[test]
    fn counters_are_summed_per_entity() {
        let text = "\
# TYPE tern_queue_messages_published_total counter
tern_queue_messages_published_total{vhost=\"/\",queue=\"q\"} 10
tern_queue_messages_delivered_total{vhost=\"/\",queue=\"q\"} 4
tern_queue_messages_dead_lettered_total{vhost=\"/\",queue=\"q\",reason=\"expired\"} 9
tern_exchange_messages_published_total{vhost=\"/\",exchange=\"x\"} 7
tern_exchange_messages_unroutable_total{vhost=\"/\",exchange=\"x\"} 2
";
        let c = parse(text);
        let q = c.queues[&("/".to_string(), "q".to_string())];
        assert_eq!(
            q,
            QueueCounters {
                publish: 10,
                deliver_get: 4,
                ack: 0,
                redeliver: 0
            }
        );
        let x = c.exchanges[&("/".to_string(), "x".to_string())];
        assert_eq!(x.values(), [7, 5]);
    }

    #[test]
    fn connection_rates_are_bytes_per_second_over_the_last_interval() {
        let rates = Rates::new(DEFAULT_INTERVAL);
        let sample = |at_ms, recv, sent| Sample {
            at_ms,
            traffic: [("c".to_string(), (recv, sent))].into_iter().collect(),
            ..Sample::default()
        };
        assert_eq!(rates.connection_rates("c"), (0.0, 0.0));
        rates.samples().push_back(sample(1_000, 100, 10));
        assert_eq!(rates.connection_rates("c"), (0.0, 0.0), "one sample");
        rates.samples().push_back(sample(3_000, 4_100, 30));
        assert_eq!(rates.connection_rates("c"), (2_000.0, 10.0));
        assert_eq!(rates.connection_rates("gone"), (0.0, 0.0));
    }

    #[test]
    fn rates_are_per_second_and_survive_a_reset() {
        assert_eq!(rate(30, Some(10), Some(5.0)), 4.0);
        assert_eq!(rate(3, Some(10), Some(1.0)), 3.0);
        assert_eq!(rate(30, None, Some(5.0)), 0.0);
        assert_eq!(rate(30, Some(10), None), 0.0);
    }
}
