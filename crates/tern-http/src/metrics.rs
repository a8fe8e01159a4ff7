//! `GET /metrics`: Prometheus text exposition.
//!
//! Two sources are joined. The binary installs a `metrics` recorder (the
//! Prometheus exporter's) and hands its render function over as a
//! [`MetricsSource`]: that gives the broker's counters. The per-queue depth
//! gauges (`tern_queue_messages_ready`, `tern_queue_messages_unacked`,
//! `tern_queue_consumers`) are read from the broker at scrape time instead,
//! so that they are exact and a deleted queue's series disappear; the
//! recorder's families of the same names are left out of its output. So
//! are `tern_dlq_messages` (the depth of each dead-letter queue, as
//! `/api/dlq` finds them), `tern_connections` (client connections) and
//! `tern_stream_consumer_lag` (per stream consumer, by name or tag).
//! `tern_alarm_active` (1 while a resource alarm is raised, per resource),
//! `tern_connection_channels`, `tern_connection_received_bytes_total` and
//! `tern_connection_sent_bytes_total` (per connection, counted by the
//! front door into the broker's registry) and the histogram
//! `tern_storage_fsync_duration_seconds`.

use std::collections::BTreeMap;
use std::fmt::{self, Write};
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use tern_broker::alarm::Resource;

use crate::server::AppState;

/// Renders the process's metrics recorder in Prometheus text format.
#[derive(Clone)]
pub struct MetricsSource(Arc<dyn Fn() -> String + Send + Sync>);

impl MetricsSource {
    /// A source rendered by `render` (for the Prometheus exporter:
    /// `move || handle.render()`).
    pub fn new(render: impl Fn() -> String + Send + Sync + 'static) -> MetricsSource {
        MetricsSource(Arc::new(render))
    }

    pub(crate) fn render(&self) -> String {
        (self.0)()
    }
}

impl fmt::Debug for MetricsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MetricsSource(..)")
    }
}

/// A gauge read from the broker at scrape time: name, help, and how to
/// read the value from a queue's facts.
type QueueGauge = (
    &'static str,
    &'static str,
    fn(&tern_broker::QueueInfo) -> f64,
);

const QUEUE_GAUGES: [QueueGauge; 3] = [
    (
        "tern_queue_messages_ready",
        "Messages ready for delivery in the queue.",
        |q| q.ready as f64,
    ),
    (
        "tern_queue_messages_unacked",
        "Messages delivered from the queue and not yet acknowledged.",
        |q| q.unacked as f64,
    ),
    (
        "tern_queue_consumers",
        "Consumers attached to the queue.",
        |q| f64::from(q.consumers),
    ),
];

/// The other gauges read from the broker at scrape time.
const OWN_GAUGES: [&str; 4] = [
    "tern_dlq_messages",
    "tern_connections",
    "tern_stream_consumer_lag",
    "tern_alarm_active",
];

/// The metric family a sample or comment line belongs to.
fn family_of(line: &str) -> &str {
    let rest = line
        .strip_prefix("# HELP ")
        .or_else(|| line.strip_prefix("# TYPE "))
        .unwrap_or(line);
    let end = rest.find(['{', ' ']).unwrap_or(rest.len());
    &rest[..end]
}

/// Escapes a label value: backslash, double quote and newline.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The whole exposition: the recorder's families, less the ones read from
/// the broker, then those.
pub(crate) fn render(state: &AppState) -> String {
    let mut out = String::new();
    if let Some(source) = state.metrics() {
        for line in source.render().lines() {
            let family = family_of(line);
            if QUEUE_GAUGES.iter().any(|(name, _, _)| *name == family)
                || OWN_GAUGES.contains(&family)
            {
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
    }
    let broker = state.broker();
    let mut queues = Vec::new();
    for vhost in broker.vhosts() {
        // A vhost deleted since it was listed has no queues to report.
        if let Ok(list) = broker.queues(vhost.as_str()) {
            queues.extend(list.into_iter().map(|q| (vhost.clone(), q)));
        }
    }
    let mut dlqs = Vec::new();
    for vhost in broker.vhosts() {
        dlqs.extend(crate::api::vhost_dlqs(state, vhost.as_str()).unwrap_or_default());
    }
    let _ = writeln!(
        out,
        "# HELP tern_dlq_messages Messages in a dead-letter queue (ready and unacked)."
    );
    let _ = writeln!(out, "# TYPE tern_dlq_messages gauge");
    for q in &dlqs {
        let _ = writeln!(
            out,
            "tern_dlq_messages{{vhost=\"{}\",queue=\"{}\"}} {}",
            escape_label(q["vhost"].as_str().unwrap_or_default()),
            escape_label(q["name"].as_str().unwrap_or_default()),
            q["messages"].as_u64().unwrap_or(0)
        );
    }
    let _ = writeln!(out, "# HELP tern_connections Open client connections.");
    let _ = writeln!(out, "# TYPE tern_connections gauge");
    let connections = broker.connections();
    let _ = writeln!(out, "tern_connections {}", connections.len());
    let _ = writeln!(
        out,
        "# HELP tern_connection_channels Channels open on a client connection."
    );
    let _ = writeln!(out, "# TYPE tern_connection_channels gauge");
    for c in &connections {
        let _ = writeln!(
            out,
            "tern_connection_channels{{connection=\"{}\",user=\"{}\",vhost=\"{}\"}} {}",
            escape_label(&c.name),
            escape_label(&c.user),
            escape_label(&c.vhost),
            c.channels
        );
    }
    for (family, help, value) in [
        (
            "tern_connection_received_bytes_total",
            "Bytes received from a client connection.",
            (|c| c.received_bytes) as fn(&tern_broker::ConnectionInfo) -> u64,
        ),
        (
            "tern_connection_sent_bytes_total",
            "Bytes sent to a client connection.",
            |c| c.sent_bytes,
        ),
    ] {
        let _ = writeln!(out, "# HELP {family} {help}");
        let _ = writeln!(out, "# TYPE {family} counter");
        for c in &connections {
            let _ = writeln!(
                out,
                "{family}{{connection=\"{}\",user=\"{}\",vhost=\"{}\"}} {}",
                escape_label(&c.name),
                escape_label(&c.user),
                escape_label(&c.vhost),
                value(c)
            );
        }
    }
    if let Some(h) = broker.fsync_histogram() {
        let name = "tern_storage_fsync_duration_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} How long each storage commit's fsync took (one per group commit)."
        );
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (le, count) in tern_broker::FSYNC_BUCKETS.iter().zip(h.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "{name}_sum {}", h.sum_seconds);
        let _ = writeln!(out, "{name}_count {}", h.count);
    }
    let _ = writeln!(
        out,
        "# HELP tern_stream_consumer_lag Messages between a stream consumer and the stream's end \
         (from the committed offset for a named consumer, attached or not)."
    );
    let _ = writeln!(out, "# TYPE tern_stream_consumer_lag gauge");
    for (vhost, q) in queues
        .iter()
        .filter(|(_, q)| q.queue_type == tern_broker::QueueType::Stream)
    {
        // A stream deleted since it was listed has nothing to report.
        let Ok(offsets) = broker.stream_offsets(vhost.as_str(), q.name.as_str()) else {
            continue;
        };
        // The members of a consumer group share their name and committed
        // offset, so one series per name (a repeated series is invalid).
        let mut seen = std::collections::BTreeSet::new();
        for c in &offsets.consumers {
            let consumer = match (&c.name, &c.consumer_tag) {
                (Some(name), _) => name.as_str(),
                (None, Some(tag)) => tag.as_str(),
                (None, None) => continue,
            };
            if !seen.insert(consumer) {
                continue;
            }
            let _ = writeln!(
                out,
                "tern_stream_consumer_lag{{vhost=\"{}\",queue=\"{}\",consumer=\"{}\"}} {}",
                escape_label(vhost.as_str()),
                escape_label(q.name.as_str()),
                escape_label(consumer),
                c.lag
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP tern_alarm_active Whether a resource alarm is raised (1), blocking publishers."
    );
    let _ = writeln!(out, "# TYPE tern_alarm_active gauge");
    let alarms = broker.alarms().current();
    for resource in Resource::ALL {
        let _ = writeln!(
            out,
            "tern_alarm_active{{resource=\"{resource}\"}} {}",
            u8::from(alarms.contains(resource))
        );
    }
    for (name, help, value) in QUEUE_GAUGES {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for (vhost, q) in &queues {
            let _ = writeln!(
                out,
                "{name}{{vhost=\"{}\",queue=\"{}\"}} {}",
                escape_label(vhost.as_str()),
                escape_label(q.name.as_str()),
                value(q)
            );
        }
    }
    out
}

/// The broker's message counters summed over every queue and exchange of
/// the vhosts `sees` keeps, from the recorder's current values, for the
/// overview: `None` without a recorder. Keys are the counter names less
/// `tern_` and `_total`.
pub(crate) fn message_totals(
    state: &AppState,
    sees: &dyn Fn(&str) -> bool,
) -> Option<BTreeMap<&'static str, f64>> {
    const TOTALS: [(&str, &str); 6] = [
        ("tern_queue_messages_published_total", "published"),
        ("tern_queue_messages_delivered_total", "delivered"),
        ("tern_queue_messages_redelivered_total", "redelivered"),
        ("tern_queue_messages_acked_total", "acked"),
        ("tern_queue_messages_dead_lettered_total", "dead_lettered"),
        ("tern_exchange_messages_unroutable_total", "unroutable"),
    ];
    let text = state.metrics()?.render();
    let mut totals: BTreeMap<&'static str, f64> = TOTALS.iter().map(|(_, k)| (*k, 0.0)).collect();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let family = family_of(line);
        let Some((_, key)) = TOTALS.iter().find(|(name, _)| *name == family) else {
            continue;
        };
        let Some((_, labels, value)) = crate::rates::split_sample(line) else {
            continue;
        };
        let vhost = labels.iter().find(|(k, _)| k == "vhost").map(|(_, v)| v);
        if !vhost.is_some_and(|v| sees(v)) {
            continue;
        }
        if let Some(total) = totals.get_mut(key) {
            *total += value;
        }
    }
    Some(totals)
}

/// The `/metrics` handler.
pub(crate) async fn serve(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(&state),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_recognised_on_every_kind_of_line() {
        assert_eq!(
            family_of("# HELP tern_queue_consumers x"),
            "tern_queue_consumers"
        );
        assert_eq!(
            family_of("# TYPE tern_queue_consumers gauge"),
            "tern_queue_consumers"
        );
        assert_eq!(
            family_of("tern_queue_consumers{vhost=\"/\"} 1"),
            "tern_queue_consumers"
        );
        assert_eq!(family_of("tern_up 1"), "tern_up");
        assert_eq!(family_of(""), "");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
