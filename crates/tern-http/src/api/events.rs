//! `GET /api/events`: live updates as Server-Sent Events. Every second
//! the server pushes one `snapshot` event: the overview, every queue's
//! depths, the dead-letter queues, the redrive jobs, and the client
//! connections with their consumers, so that a
//! dashboard needs no polling. A browser's `EventSource` cannot send an
//! `Authorization` header, so the dashboard reads the stream with
//! `fetch`; the route needs credentials like every other.
//!
//! The stream ends when the server shuts down, so that open dashboards do
//! not hold a graceful shutdown up.

use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_lite::Stream;
use serde_json::{json, Value};

use super::connections::{connection_json, consumer_json};
use super::dead_letters::vhost_dlqs;
use super::overview::overview_json;
use crate::server::AppState;

/// How often a snapshot is pushed.
const PERIOD: Duration = Duration::from_secs(1);

/// One snapshot: what the dashboard's pages show.
fn snapshot(state: &AppState) -> Value {
    let broker = state.broker();
    let mut queues = Vec::new();
    let mut dlqs = Vec::new();
    for vhost in broker.vhosts() {
        // A vhost deleted meanwhile has nothing to show.
        for q in broker.queues(vhost.as_str()).unwrap_or_default() {
            let mut entry = json!({
                "vhost": vhost.as_str(),
                "name": q.name.as_str(),
                "type": q.queue_type.as_str(),
                "messages_ready": q.ready,
                "messages_unacknowledged": q.unacked,
                "consumers": q.consumers,
            });
            if let Some(stats) = state.rates().queue_stats(vhost.as_str(), q.name.as_str()) {
                entry["message_stats"] = stats;
            }
            queues.push(entry);
        }
        dlqs.extend(vhost_dlqs(state, vhost.as_str()).unwrap_or_default());
    }
    let redrives: Vec<Value> = state
        .redrives()
        .all()
        .iter()
        .map(|j| j.progress())
        .collect();
    let connections: Vec<Value> = broker.connections().iter().map(connection_json).collect();
    let channels = broker.channels();
    let consumers: Vec<Value> = broker
        .consumers(None)
        .unwrap_or_default()
        .iter()
        .map(|c| consumer_json(c, &channels))
        .collect();
    json!({
        "overview": overview_json(state),
        "queues": queues,
        "dlqs": dlqs,
        "redrives": redrives,
        "connections": connections,
        "consumers": consumers,
    })
}

/// The event stream: a snapshot at once, then one a second.
pub(crate) async fn events(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, axum::Error>>> {
    let mut ticks = tokio::time::interval(PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let closing = state.closing();
    let stream = futures_lite::stream::unfold(
        (state, ticks, closing),
        |(state, mut ticks, mut closing)| async move {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = closing.wait_for(|closed| *closed) => return None,
            }
            let event = Event::default()
                .event("snapshot")
                .json_data(snapshot(&state));
            Some((event, (state, ticks, closing)))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}
