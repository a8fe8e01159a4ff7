//! Observability hooks: counters and gauges per queue and per exchange,
//! through the `metrics` facade, so that any exporter (the HTTP crate's
//! Prometheus endpoint, a test recorder) can read them. Without a recorder
//! installed they cost an atomic operation or nothing.
//!
//! Names follow Prometheus conventions: `tern_queue_messages_ready`,
//! `tern_queue_messages_published_total`, and so on, labelled with `vhost`
//! and `queue` (or `exchange`), and `reason` for dead-lettered and dropped
//! messages.

use metrics::{counter, describe_counter, describe_gauge, gauge, Counter, Gauge, Unit};

use crate::dead_letter::Reason;

const REASONS: [Reason; 4] = [
    Reason::Rejected,
    Reason::Expired,
    Reason::MaxLen,
    Reason::DeliveryLimit,
];

/// Gives every metric its unit and help text, which exporters print (the
/// Prometheus `# HELP` line). Called when the broker opens: a recorder
/// installed later misses the descriptions, not the values.
pub(crate) fn describe() {
    let counters: [(&str, Unit, &str); 9] = [
        (
            "tern_queue_messages_published_total",
            Unit::Count,
            "Messages stored in the queue.",
        ),
        (
            "tern_queue_published_bytes_total",
            Unit::Bytes,
            "Body bytes of the messages stored in the queue.",
        ),
        (
            "tern_queue_messages_delivered_total",
            Unit::Count,
            "Deliveries from the queue, to consumers and to gets.",
        ),
        (
            "tern_queue_messages_redelivered_total",
            Unit::Count,
            "Deliveries of messages delivered before.",
        ),
        (
            "tern_queue_messages_acked_total",
            Unit::Count,
            "Messages acknowledged and removed from the queue.",
        ),
        (
            "tern_queue_messages_dead_lettered_total",
            Unit::Count,
            "Messages that left the queue for its dead-letter exchange, by reason.",
        ),
        (
            "tern_queue_messages_dropped_total",
            Unit::Count,
            "Messages that left the queue with no dead-letter exchange to go to, by reason.",
        ),
        (
            "tern_exchange_messages_published_total",
            Unit::Count,
            "Messages published to the exchange.",
        ),
        (
            "tern_exchange_messages_unroutable_total",
            Unit::Count,
            "Messages published to the exchange that reached no queue.",
        ),
    ];
    for (name, unit, help) in counters {
        describe_counter!(name, unit, help);
    }
    let gauges: [(&str, &str); 3] = [
        (
            "tern_queue_messages_ready",
            "Messages ready for delivery in the queue.",
        ),
        (
            "tern_queue_messages_unacked",
            "Messages delivered from the queue and not yet acknowledged.",
        ),
        ("tern_queue_consumers", "Consumers attached to the queue."),
    ];
    for (name, help) in gauges {
        describe_gauge!(name, Unit::Count, help);
    }
}

/// The metric handles of one queue, registered once when the queue opens.
#[derive(Debug, Clone)]
pub(crate) struct QueueMetrics {
    pub(crate) published: Counter,
    pub(crate) published_bytes: Counter,
    pub(crate) delivered: Counter,
    pub(crate) redelivered: Counter,
    pub(crate) acked: Counter,
    dead_lettered: [Counter; 4],
    dropped: [Counter; 4],
    pub(crate) ready: Gauge,
    pub(crate) unacked: Gauge,
    pub(crate) consumers: Gauge,
}

impl QueueMetrics {
    pub(crate) fn new(vhost: &str, queue: &str) -> QueueMetrics {
        let labels = [("vhost", vhost.to_string()), ("queue", queue.to_string())];
        let by_reason = |name: &'static str| {
            REASONS.map(|r| {
                let mut l = labels.to_vec();
                l.push(("reason", r.as_str().to_string()));
                counter!(name, &l)
            })
        };
        QueueMetrics {
            published: counter!("tern_queue_messages_published_total", &labels),
            published_bytes: counter!("tern_queue_published_bytes_total", &labels),
            delivered: counter!("tern_queue_messages_delivered_total", &labels),
            redelivered: counter!("tern_queue_messages_redelivered_total", &labels),
            acked: counter!("tern_queue_messages_acked_total", &labels),
            dead_lettered: by_reason("tern_queue_messages_dead_lettered_total"),
            dropped: by_reason("tern_queue_messages_dropped_total"),
            ready: gauge!("tern_queue_messages_ready", &labels),
            unacked: gauge!("tern_queue_messages_unacked", &labels),
            consumers: gauge!("tern_queue_consumers", &labels),
        }
    }

    /// Counts a message leaving the queue for `reason`: dead-lettered if
    /// the queue has somewhere to send it, dropped otherwise.
    pub(crate) fn died(&self, reason: Reason, dead_lettered: bool) {
        let i = REASONS.iter().position(|r| *r == reason).unwrap_or(0);
        let counters = if dead_lettered {
            &self.dead_lettered
        } else {
            &self.dropped
        };
        if let Some(c) = counters.get(i) {
            c.increment(1);
        }
    }
}

/// The metric handles of one exchange.
#[derive(Debug, Clone)]
pub(crate) struct ExchangeMetrics {
    pub(crate) published: Counter,
    pub(crate) unroutable: Counter,
}

impl ExchangeMetrics {
    pub(crate) fn new(vhost: &str, exchange: &str) -> ExchangeMetrics {
        let labels = [
            ("vhost", vhost.to_string()),
            ("exchange", exchange.to_string()),
        ];
        ExchangeMetrics {
            published: counter!("tern_exchange_messages_published_total", &labels),
            unroutable: counter!("tern_exchange_messages_unroutable_total", &labels),
        }
    }
}
