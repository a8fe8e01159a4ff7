//! `GET /api/events`: live updates as Server-Sent Events. Every second
//! the server pushes one `snapshot` event: the overview, every queue's
//! depths, the dead-letter queues, the redrive jobs, and the client
//! connections with their consumers, so that a
//! dashboard needs no polling. A browser's `EventSource` cannot send an
//! `Authorization` header, so the dashboard reads the stream with
//! `fetch`; the route needs credentials like every other.
//!
//! Each snapshot shows what the caller sees (`scope.rs`), worked out again
//! for every snapshot, so a permission granted or revoked shows in the
//! next one.
//!
//! The stream ends when the server shuts down, so that open dashboards do
//! not hold a graceful shutdown up.

use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Extension;
use futures_lite::Stream;
use serde_json::{json, Value};

use super::connections::{connection_json, visible_connections, visible_consumers};
use super::dead_letters::vhost_dlqs;
use super::overview::overview_json;
use crate::auth::Principal;
use crate::scope::Scope;
use crate::server::AppState;

/// How often a snapshot is pushed.
const PERIOD: Duration = Duration::from_secs(1);

/// One snapshot: what the dashboard's pages show, of what the caller sees.
fn snapshot(state: &AppState, scope: &Scope) -> Value {
    let broker = state.broker();
    let mut queues = Vec::new();
    let mut dlqs = Vec::new();
    for vhost in scope.vhosts(broker) {
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
        .filter(|j| scope.sees_vhost(j.vhost()))
        .map(|j| j.progress())
        .collect();
    let connections: Vec<Value> = visible_connections(state, scope)
        .iter()
        .map(|c| connection_json(state, c))
        .collect();
    let consumers = visible_consumers(state, scope, None).unwrap_or_default();
    json!({
        "overview": overview_json(state, scope),
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
    Extension(me): Extension<Principal>,
) -> Sse<impl Stream<Item = Result<Event, axum::Error>>> {
    let mut ticks = tokio::time::interval(PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let closing = state.closing();
    let stream = futures_lite::stream::unfold(
        (state, ticks, closing, me),
        |(state, mut ticks, mut closing, me)| async move {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = closing.wait_for(|closed| *closed) => return None,
            }
            let scope = Scope::of(state.broker(), &me);
            let event = Event::default()
                .event("snapshot")
                .json_data(snapshot(&state, &scope));
            Some((event, (state, ticks, closing, me)))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}
