//! The transport conformance suite: what every transport must do, written
//! once. Each transport's test file implements [`Fixture`] and runs every
//! scenario through the `conformance_tests!` macro.

#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tern::middleware::Retry;
use tern::{
    Bus, BusError, Context, Envelope, HandlerError, Replay, ReplayFrom, Replaying, SendOptions,
    Service, TransportError,
};
use tokio::sync::Notify;

/// How a transport is set up for one scenario.
pub trait Fixture: Send + Sync + 'static {
    /// A new connection to the same broker (another "process").
    fn bus(&self) -> impl Future<Output = Bus> + Send;
    /// Takes every message in a service's dead-letter queue.
    fn dead_letters(&self, service: &str) -> impl Future<Output = Vec<Envelope>> + Send;
    /// Removes what a scenario declared for `service` (on shared brokers).
    fn cleanup(&self, service: &str) -> impl Future<Output = ()> + Send;
    /// Whether the transport, as this fixture sets it up, deduplicates by
    /// dedup id. One that does not must refuse with an `Unsupported` error.
    fn deduplicates(&self) -> bool {
        true
    }
    /// How far the transport replays event streams.
    fn replays(&self) -> Replays {
        Replays::Named
    }
    /// Removes the recorded stream of an event type (on shared brokers).
    fn forget_stream(&self, ty: &str) -> impl Future<Output = ()> + Send {
        let _ = ty;
        std::future::ready(())
    }
}

/// How far a transport replays event streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replays {
    /// Not at all: it says so.
    No,
    /// From an offset or a time, but it keeps no named positions.
    Unnamed,
    /// Also named replays that resume.
    Named,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EntryRecorded {
    pub n: u32,
}
tern::message!(event EntryRecorded = "conformance.entry-recorded.v1");

/// Reads `count` events from a replay, failing the test after 20 s.
pub async fn read(replay: &mut Replaying<EntryRecorded>, count: usize) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    while out.len() < count {
        let next = tokio::time::timeout(Duration::from_secs(20), replay.next())
            .await
            .expect("a replayed event within 20 s")
            .expect("the replay is open")
            .unwrap();
        out.push((next.offset, next.event.n));
    }
    out
}

async fn publish_entries(bus: &Bus, range: std::ops::Range<u32>) {
    for n in range {
        bus.publish(&EntryRecorded { n }).await.unwrap();
    }
}

/// Whether `err` is the transport saying it lacks a feature.
pub fn is_unsupported(err: &BusError) -> bool {
    matches!(err, BusError::Transport(TransportError::Unsupported { .. }))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Pinged {
    pub n: u32,
}
tern::message!(event Pinged = "conformance.pinged.v1");

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DoWork {
    pub n: u32,
}
tern::message!(command DoWork = "conformance.do-work.v1");

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Unhandled {
    pub n: u32,
}
tern::message!(command Unhandled = "conformance.unhandled-command.v1");

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Add {
    pub a: i64,
    pub b: i64,
}
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sum {
    pub sum: i64,
}
tern::message!(query Add = "conformance.add.v1", reply Sum);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkDone {
    pub n: u32,
}
tern::message!(event WorkDone = "conformance.work-done.v1");

/// A service name no other run uses, for brokers shared between runs.
pub fn unique(name: &str) -> String {
    format!("{name}-{}", uuid::Uuid::now_v7().simple())
}

type Seen = Arc<Mutex<Vec<(u32, Envelope)>>>;

fn recorder(
    seen: &Seen,
) -> impl Fn(Pinged, Context) -> std::future::Ready<Result<(), HandlerError>> + Send + Sync + 'static
{
    let seen = Arc::clone(seen);
    move |event: Pinged, ctx: Context| {
        seen.lock().unwrap().push((event.n, ctx.envelope().clone()));
        std::future::ready(Ok(()))
    }
}

/// Waits until `done` holds, failing the test after 20 s.
pub async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn numbers(seen: &Seen) -> BTreeSet<u32> {
    seen.lock().unwrap().iter().map(|(n, _)| *n).collect()
}

/// Every published event reaches a subscribed service.
pub async fn delivers_every_event_at_least_once<F: Fixture>(f: F) {
    let bus = f.bus().await;
    let service = unique("receiver");
    let seen: Seen = Arc::default();
    let running = bus
        .start(Service::new(&service).on_event(recorder(&seen)))
        .await
        .unwrap();
    for n in 0..200 {
        bus.publish(&Pinged { n }).await.unwrap();
    }
    eventually("all 200 events", || numbers(&seen).len() == 200).await;
    assert_eq!(numbers(&seen), (0..200).collect());
    running.shutdown().await.unwrap();
    f.cleanup(&service).await;
}

/// Messages published while a service is down wait for it.
pub async fn messages_wait_for_a_stopped_service<F: Fixture>(f: F) {
    let bus = f.bus().await;
    let service = unique("sleeper");
    let seen: Seen = Arc::default();
    let first = bus
        .start(Service::new(&service).on_event(recorder(&seen)))
        .await
        .unwrap();
    first.shutdown().await.unwrap();
    for n in 0..20 {
        bus.publish(&Pinged { n }).await.unwrap();
    }
    let second = bus
        .start(Service::new(&service).on_event(recorder(&seen)))
        .await
        .unwrap();
    eventually("the 20 events published while down", || {
        numbers(&seen).len() == 20
    })
    .await;
    second.shutdown().await.unwrap();
    f.cleanup(&service).await;
}

/// An event reaches every subscribed service.
pub async fn fans_out_to_every_service<F: Fixture>(f: F) {
    let bus = f.bus().await;
    let (a, b) = (unique("fan-a"), unique("fan-b"));
    let (seen_a, seen_b): (Seen, Seen) = (Arc::default(), Arc::default());
    let ra = bus
        .start(Service::new(&a).on_event(recorder(&seen_a)))
        .await
        .unwrap();
    let rb = bus
        .start(Service::new(&b).on_event(recorder(&seen_b)))
        .await
        .unwrap();
    for n in 0..50 {
        bus.publish(&Pinged { n }).await.unwrap();
    }
    eventually("both services got all 50", || {
        numbers(&seen_a).len() == 50 && numbers(&seen_b).len() == 50
    })
    .await;
    ra.shutdown().await.unwrap();
    rb.shutdown().await.unwrap();
    f.cleanup(&a).await;
    f.cleanup(&b).await;
}

/// Instances of one service share its messages: each is handled by one.
pub async fn instances_of_a_service_compete<F: Fixture>(f: F) {
    let (bus1, bus2) = (f.bus().await, f.bus().await);
    let service = unique("workers");
    let handled: Arc<Mutex<BTreeMap<u32, Vec<u8>>>> = Arc::default();
    let worker = |instance: u8| {
        let handled = Arc::clone(&handled);
        Service::new(&service)
            .prefetch(2)
            .on_command(move |c: DoWork, _ctx: Context| {
                let handled = Arc::clone(&handled);
                async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    handled
                        .lock()
                        .unwrap()
                        .entry(c.n)
                        .or_default()
                        .push(instance);
                    Ok(())
                }
            })
    };
    let r1 = bus1.start(worker(1)).await.unwrap();
    let r2 = bus2.start(worker(2)).await.unwrap();
    for n in 0..60 {
        bus1.send(&DoWork { n }).await.unwrap();
    }
    eventually("all 60 commands", || handled.lock().unwrap().len() == 60).await;
    r1.shutdown().await.unwrap();
    r2.shutdown().await.unwrap();
    let handled = handled.lock().unwrap().clone();
    assert!(
        handled.values().all(|by| by.len() == 1),
        "each command handled once: {handled:?}"
    );
    let by: BTreeSet<u8> = handled.values().flatten().copied().collect();
    assert_eq!(by, BTreeSet::from([1, 2]), "both instances took a share");
    f.cleanup(&service).await;
}

/// Messages with the same key are handled in order, even when handlers
/// run concurrently and take different times.
pub async fn keeps_order_per_key<F: Fixture>(f: F) {
    let bus = f.bus().await;
    let service = unique("ordered");
    let log: Arc<Mutex<BTreeMap<String, Vec<u32>>>> = Arc::default();
    let sink = Arc::clone(&log);
    let running = bus
        .start(
            Service::new(&service)
                .prefetch(16)
                .on_event(move |e: Pinged, ctx: Context| {
                    let sink = Arc::clone(&sink);
                    let key = ctx.envelope().partition_key.clone().unwrap_or_default();
                    async move {
                        // Later messages finish faster, so without lanes they would overtake.
                        tokio::time::sleep(Duration::from_millis(u64::from(20 - e.n % 20))).await;
                        sink.lock().unwrap().entry(key).or_default().push(e.n);
                        Ok(())
                    }
                }),
        )
        .await
        .unwrap();
    for n in 0..80 {
        let key = format!("customer-{}", n % 4);
        bus.publish_with(&Pinged { n }, SendOptions::default().key(key))
            .await
            .unwrap();
    }
    eventually("all 80 events", || {
        log.lock().unwrap().values().map(Vec::len).sum::<usize>() == 80
    })
    .await;
    running.shutdown().await.unwrap();
    for (key, order) in log.lock().unwrap().iter() {
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order, &sorted, "order for {key}");
    }
    f.cleanup(&service).await;
}

/// A failing handler is retried with backoff up to the limit, then the
/// message is dead-lettered with the error; a later success stops retries.
pub async fn retries_then_dead_letters<F: Fixture>(f: F) {
    let bus = f.bus().await;
    let service = unique("flaky");
    let attempts: Arc<Mutex<BTreeMap<u32, Vec<u32>>>> = Arc::default();
    let sink = Arc::clone(&attempts);
    let running = bus
        .start(
            Service::new(&service)
                .retry(
                    Retry::exponential(Duration::from_millis(20), Duration::from_millis(100))
                        .max_attempts(3),
                )
                .on_command(move |c: DoWork, ctx: Context| {
                    sink.lock()
                        .unwrap()
                        .entry(c.n)
                        .or_default()
                        .push(ctx.attempt());
                    // Message 1 succeeds on its second attempt; message 2 never does.
                    let result = if c.n == 1 && ctx.attempt() >= 2 {
                        Ok(())
                    } else {
                        Err(HandlerError::transient(format!(
                            "failure on attempt {}",
                            ctx.attempt()
                        )))
                    };
                    std::future::ready(result)
                }),
        )
        .await
        .unwrap();
    bus.send(&DoWork { n: 1 }).await.unwrap();
    bus.send(&DoWork { n: 2 }).await.unwrap();
    let dead = {
        let mut dead = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while dead.is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no dead letter arrived"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
            dead = f.dead_letters(&service).await;
        }
        dead
    };
    running.shutdown().await.unwrap();
    let attempts = attempts.lock().unwrap().clone();
    assert_eq!(
        attempts.get(&1),
        Some(&vec![1, 2]),
        "retried once, then done"
    );
    assert_eq!(
        attempts.get(&2),
        Some(&vec![1, 2, 3]),
        "three attempts in all"
    );
    assert_eq!(dead.len(), 1, "only the hopeless message is dead-lettered");
    assert_eq!(dead[0].ty, "conformance.do-work.v1");
    let body: DoWork = serde_json::from_slice(&dead[0].data).unwrap();
    assert_eq!(body, DoWork { n: 2 });
    f.cleanup(&service).await;
}

/// A permanent error and an undecodable message skip the retries.
pub async fn permanent_failures_dead_letter_at_once<F: Fixture>(f: F) {
    let bus = f.bus().await;
    let service = unique("strict");
    let calls = Arc::new(Mutex::new(0u32));
    let sink = Arc::clone(&calls);
    let running = bus
        .start(
            Service::new(&service).on_command(move |_c: DoWork, _ctx: Context| {
                *sink.lock().unwrap() += 1;
                std::future::ready(Err(HandlerError::permanent("invalid order")))
            }),
        )
        .await
        .unwrap();
    bus.send(&DoWork { n: 9 }).await.unwrap();
    let mut dead = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while dead.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no dead letter arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        dead = f.dead_letters(&service).await;
    }
    running.shutdown().await.unwrap();
    assert_eq!(*calls.lock().unwrap(), 1);
    assert_eq!(dead.len(), 1);
    f.cleanup(&service).await;
}

/// A panicking handler is a failed attempt; the service lives on.
pub async fn survives_a_panicking_handler<F: Fixture>(f: F) {
    let bus = f.bus().await;
    let service = unique("panicky");
    let done = Arc::new(Notify::new());
    let signal = Arc::clone(&done);
    let running = bus
        .start(
            Service::new(&service)
                .retry(Retry::exponential(
                    Duration::from_millis(10),
                    Duration::from_millis(10),
                ))
                .on_command(move |_c: DoWork, ctx: Context| {
                    let signal = Arc::clone(&signal);
                    async move {
                        if ctx.attempt() == 1 {
                            panic!("boom on the first attempt");
                        }
                        signal.notify_one();
                        Ok(())
                    }
                }),
        )
        .await
        .unwrap();
    bus.send(&DoWork { n: 1 }).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), done.notified())
        .await
        .expect("the second attempt succeeded");
    running.shutdown().await.unwrap();
    f.cleanup(&service).await;
}

/// A query gets its typed answer; a slow one times out; an unanswered
/// type and an unhandled command fail with a clear error.
pub async fn answers_queries_with_a_timeout<F: Fixture>(f: F) {
    let bus = f.bus().await;
    let asker = f.bus().await;
    let service = unique("calculator");
    let running = bus
        .start(
            Service::new(&service).on_query(|q: Add, _ctx: Context| async move {
                if q.a < 0 {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                if q.b < 0 {
                    return Err(HandlerError::permanent("negative numbers are not allowed"));
                }
                Ok(Sum { sum: q.a + q.b })
            }),
        )
        .await
        .unwrap();
    let sum = asker.request(&Add { a: 2, b: 3 }).await.unwrap();
    assert_eq!(sum, Sum { sum: 5 });
    let slow = asker
        .request_with(
            &Add { a: -1, b: 1 },
            SendOptions::default().timeout(Duration::from_millis(300)),
        )
        .await;
    assert!(matches!(slow, Err(BusError::Timeout { .. })), "{slow:?}");
    let failed = asker.request(&Add { a: 1, b: -1 }).await;
    assert!(
        matches!(&failed, Err(BusError::QueryFailed { reason, .. }) if reason.contains("negative")),
        "{failed:?}"
    );
    let nobody = asker.send(&Unhandled { n: 1 }).await;
    assert!(
        matches!(nobody, Err(BusError::Transport(TransportError::NoHandler(ref t))) if t == "conformance.unhandled-command.v1"),
        "{nobody:?}"
    );
    running.shutdown().await.unwrap();
    let _ = f.dead_letters(&service).await;
    f.cleanup(&service).await;
}

/// What a handler sends carries the conversation's ids.
pub async fn propagates_correlation_and_causation<F: Fixture>(f: F) {
    let bus = f.bus().await;
    let (worker, watcher) = (unique("worker"), unique("watcher"));
    let seen: Arc<Mutex<Vec<Envelope>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let r1 = bus
        .start(
            Service::new(&worker).on_command(|c: DoWork, ctx: Context| async move {
                ctx.publish(&WorkDone { n: c.n }).await?;
                Ok(())
            }),
        )
        .await
        .unwrap();
    let r2 = bus
        .start(
            Service::new(&watcher).on_event(move |_e: WorkDone, ctx: Context| {
                sink.lock().unwrap().push(ctx.envelope().clone());
                std::future::ready(Ok(()))
            }),
        )
        .await
        .unwrap();
    // The command's own id is only known inside the worker, so check the
    // chain through what the watcher sees.
    bus.send(&DoWork { n: 4 }).await.unwrap();
    eventually("the WorkDone event", || !seen.lock().unwrap().is_empty()).await;
    let event = seen.lock().unwrap()[0].clone();
    assert_eq!(event.source, worker);
    assert!(event.causation_id.is_some());
    assert_eq!(
        event.correlation_id, event.causation_id,
        "the command started the conversation"
    );
    assert!(event.traceparent.is_some());
    r1.shutdown().await.unwrap();
    r2.shutdown().await.unwrap();
    f.cleanup(&worker).await;
    f.cleanup(&watcher).await;
}

/// A consumer that dies mid-message has it redelivered to another instance.
pub async fn redelivers_when_a_consumer_dies<F: Fixture>(f: F) {
    let (bus1, bus2) = (f.bus().await, f.bus().await);
    let service = unique("mortal");
    let started = Arc::new(Notify::new());
    let signal = Arc::clone(&started);
    let doomed = bus1
        .start(
            Service::new(&service).on_command(move |_c: DoWork, _ctx: Context| {
                let signal = Arc::clone(&signal);
                async move {
                    signal.notify_one();
                    std::future::pending::<()>().await;
                    Ok(())
                }
            }),
        )
        .await
        .unwrap();
    bus1.send(&DoWork { n: 5 }).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), started.notified())
        .await
        .expect("the first instance took it");
    doomed.abort();
    drop(bus1);
    let seen: Arc<Mutex<Vec<(u32, bool)>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let survivor = bus2
        .start(
            Service::new(&service).on_command(move |c: DoWork, _ctx: Context| {
                sink.lock().unwrap().push((c.n, true));
                std::future::ready(Ok(()))
            }),
        )
        .await
        .unwrap();
    eventually("the redelivery", || !seen.lock().unwrap().is_empty()).await;
    assert_eq!(seen.lock().unwrap()[0].0, 5);
    survivor.shutdown().await.unwrap();
    f.cleanup(&service).await;
}

/// Shutdown finishes what is in flight and loses nothing: what was not
/// handled is handled by the next instance.
pub async fn shuts_down_gracefully_without_loss<F: Fixture>(f: F) {
    let bus = f.bus().await;
    let service = unique("graceful");
    let seen: Arc<Mutex<Vec<u32>>> = Arc::default();
    let make = |seen: &Arc<Mutex<Vec<u32>>>| {
        let sink = Arc::clone(seen);
        Service::new(&service)
            .prefetch(8)
            .on_command(move |c: DoWork, _ctx: Context| {
                let sink = Arc::clone(&sink);
                async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    sink.lock().unwrap().push(c.n);
                    Ok(())
                }
            })
    };
    let first = bus.start(make(&seen)).await.unwrap();
    for n in 0..100 {
        bus.send(&DoWork { n }).await.unwrap();
    }
    eventually("a few handled", || seen.lock().unwrap().len() >= 5).await;
    first.shutdown().await.unwrap();
    let after_shutdown = seen.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        seen.lock().unwrap().len(),
        after_shutdown,
        "nothing runs after shutdown returned"
    );
    let second = bus.start(make(&seen)).await.unwrap();
    eventually("all 100 handled", || {
        seen.lock().unwrap().iter().collect::<BTreeSet<_>>().len() == 100
    })
    .await;
    second.shutdown().await.unwrap();
    f.cleanup(&service).await;
}

/// The same dedup id sent twice is handled once; other ids and messages
/// without one are all handled. A transport without deduplication refuses
/// it with an error naming the feature.
pub async fn handles_a_dedup_id_once<F: Fixture>(f: F) {
    let bus = f.bus().await;
    let service = unique("deduper");
    let seen: Arc<Mutex<Vec<u32>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let started = bus
        .start(
            Service::new(&service)
                .deduplicate(Duration::from_secs(60))
                .on_command(move |c: DoWork, _ctx: Context| {
                    sink.lock().unwrap().push(c.n);
                    std::future::ready(Ok(()))
                }),
        )
        .await;
    if !f.deduplicates() {
        let err = started.expect_err("a service asking for dedup is refused");
        assert!(is_unsupported(&err), "{err}");
        assert!(err.to_string().contains("deduplicate"), "{err}");
        let err = bus
            .send_with(&DoWork { n: 1 }, SendOptions::default().dedup_id("x"))
            .await
            .unwrap_err();
        assert!(is_unsupported(&err), "{err}");
        f.cleanup(&service).await;
        return;
    }
    let running = started.unwrap();
    let once = format!("order-{}", uuid::Uuid::now_v7());
    bus.send_with(&DoWork { n: 1 }, SendOptions::default().dedup_id(&once))
        .await
        .unwrap();
    // A publisher retrying after a lost confirm: accepted, not delivered.
    bus.send_with(&DoWork { n: 1 }, SendOptions::default().dedup_id(&once))
        .await
        .unwrap();
    bus.send_with(
        &DoWork { n: 2 },
        SendOptions::default().dedup_id(format!("{once}-other")),
    )
    .await
    .unwrap();
    bus.send(&DoWork { n: 3 }).await.unwrap();
    bus.send(&DoWork { n: 3 }).await.unwrap();
    eventually("the distinct messages", || seen.lock().unwrap().len() >= 4).await;
    // Anything the duplicate would have caused has arrived by now: it was
    // sent before the last messages, on the same queue.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got = seen.lock().unwrap().clone();
    got.sort_unstable();
    assert_eq!(got, vec![1, 2, 3, 3]);
    running.shutdown().await.unwrap();
    f.cleanup(&service).await;
}

/// On a deduplicating service, a retried message (a copy of the original,
/// with its dedup id or message id) is not mistaken for a duplicate.
pub async fn retries_on_a_deduplicating_service<F: Fixture>(f: F) {
    if !f.deduplicates() {
        return;
    }
    let bus = f.bus().await;
    let service = unique("dedup-retry");
    let attempts: Arc<Mutex<Vec<(u32, u32)>>> = Arc::default();
    let sink = Arc::clone(&attempts);
    let running = bus
        .start(
            Service::new(&service)
                .deduplicate(Duration::from_secs(60))
                .retry(
                    Retry::exponential(Duration::from_millis(20), Duration::from_millis(50))
                        .max_attempts(3),
                )
                .on_command(move |c: DoWork, ctx: Context| {
                    sink.lock().unwrap().push((c.n, ctx.attempt()));
                    let result = if ctx.attempt() == 1 {
                        Err(HandlerError::transient("not yet"))
                    } else {
                        Ok(())
                    };
                    std::future::ready(result)
                }),
        )
        .await
        .unwrap();
    bus.send_with(&DoWork { n: 1 }, SendOptions::default().dedup_id("retried"))
        .await
        .unwrap();
    bus.send(&DoWork { n: 2 }).await.unwrap();
    eventually("both handled on their second attempt", || {
        attempts.lock().unwrap().len() == 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut got = attempts.lock().unwrap().clone();
    got.sort_unstable();
    assert_eq!(got, vec![(1, 1), (1, 2), (2, 1), (2, 2)]);
    assert!(f.dead_letters(&service).await.is_empty());
    running.shutdown().await.unwrap();
    f.cleanup(&service).await;
}

/// A recorded stream replays from the first event, from an offset, from a
/// time and from the end: each gives exactly the right suffix, in order.
pub async fn replays_from_an_offset_or_a_time<F: Fixture>(f: F) {
    let bus = f.bus().await;
    let recorded = bus.record::<EntryRecorded>().await;
    if f.replays() == Replays::No {
        let err = recorded.unwrap_err();
        assert!(is_unsupported(&err), "{err}");
        assert!(err.to_string().contains("replay"), "{err}");
        return;
    }
    recorded.unwrap();
    publish_entries(&bus, 0..10).await;
    let mut all = bus
        .replay::<EntryRecorded>(Replay::from(ReplayFrom::First))
        .await
        .unwrap();
    let got = read(&mut all, 10).await;
    assert_eq!(
        got.iter().map(|e| e.1).collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>()
    );
    let first = got[0].0;
    let offsets: Vec<u64> = got.iter().map(|e| e.0).collect();
    assert_eq!(
        offsets,
        (first..first + 10).collect::<Vec<_>>(),
        "offsets are consecutive"
    );

    let mut suffix = bus
        .replay::<EntryRecorded>(Replay::from(ReplayFrom::Offset(first + 4)))
        .await
        .unwrap();
    assert_eq!(
        read(&mut suffix, 6).await,
        got[4..].to_vec(),
        "from an offset: that event and the ones after it"
    );

    // Whole seconds: AMQP timestamps have no finer grain.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let boundary = Duration::from_secs(now.as_secs() + 1);
    tokio::time::sleep(boundary - now + Duration::from_millis(20)).await;
    publish_entries(&bus, 10..15).await;
    let mut since = bus
        .replay::<EntryRecorded>(Replay::from(ReplayFrom::Time(
            std::time::UNIX_EPOCH + boundary,
        )))
        .await
        .unwrap();
    let got = read(&mut since, 5).await;
    assert_eq!(
        got.iter().map(|e| e.1).collect::<Vec<_>>(),
        (10..15).collect::<Vec<_>>()
    );

    let mut next = bus
        .replay::<EntryRecorded>(Replay::from(ReplayFrom::Next))
        .await
        .unwrap();
    // The consumer is attached once `replay` returned; what follows is new.
    publish_entries(&bus, 15..16).await;
    assert_eq!(read(&mut next, 1).await[0].1, 15);
    // The live reader of the first replay sees the later events too.
    assert_eq!(
        read(&mut all, 6)
            .await
            .iter()
            .map(|e| e.1)
            .collect::<Vec<_>>(),
        (10..16).collect::<Vec<_>>()
    );
    drop((all, suffix, since, next));
    f.forget_stream(<EntryRecorded as tern::Message>::TYPE)
        .await;
    f.cleanup(&unique("replayer")).await;
}

/// A named replay resumes, after its bus was dropped and a new one
/// connected, at the first event it had not moved past.
pub async fn a_named_replay_resumes_where_it_stopped<F: Fixture>(f: F) {
    let bus = f.bus().await;
    let name = unique("auditor");
    let opened = bus
        .replay::<EntryRecorded>(Replay::named(&name, ReplayFrom::First))
        .await;
    match f.replays() {
        Replays::Named => {}
        Replays::Unnamed | Replays::No => {
            let err = opened.unwrap_err();
            assert!(is_unsupported(&err), "{err}");
            return;
        }
    }
    let mut replay = opened.unwrap();
    publish_entries(&bus, 0..10).await;
    let got = read(&mut replay, 5).await;
    assert_eq!(
        got.iter().map(|e| e.1).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    // Event 4 was being handled when the process stopped: not committed.
    drop(replay);
    drop(bus);
    let bus = f.bus().await;
    // `from` applies only to a replay with no position yet.
    let mut resumed = bus
        .replay::<EntryRecorded>(Replay::named(&name, ReplayFrom::First))
        .await
        .unwrap();
    let got = read(&mut resumed, 6).await;
    assert_eq!(
        got.iter().map(|e| e.1).collect::<Vec<_>>(),
        vec![4, 5, 6, 7, 8, 9]
    );
    drop(resumed);
    // A name with no position yet starts at `from`, here the first event
    // (10 events were recorded before it existed).
    let mut fresh = bus
        .replay::<EntryRecorded>(Replay::named(unique("newcomer"), ReplayFrom::First))
        .await
        .unwrap();
    let got = read(&mut fresh, 10).await;
    assert_eq!(
        got.iter().map(|e| e.1).collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>()
    );
    drop(fresh);
    f.forget_stream(<EntryRecorded as tern::Message>::TYPE)
        .await;
    f.cleanup(&unique("replayer")).await;
}

/// Runs every scenario as its own test against a fixture expression.
#[macro_export]
macro_rules! conformance_tests {
    ($fixture:expr) => {
        $crate::conformance_tests!(@each $fixture;
            delivers_every_event_at_least_once,
            messages_wait_for_a_stopped_service,
            fans_out_to_every_service,
            instances_of_a_service_compete,
            keeps_order_per_key,
            retries_then_dead_letters,
            permanent_failures_dead_letter_at_once,
            survives_a_panicking_handler,
            answers_queries_with_a_timeout,
            propagates_correlation_and_causation,
            redelivers_when_a_consumer_dies,
            shuts_down_gracefully_without_loss,
            handles_a_dedup_id_once,
            retries_on_a_deduplicating_service,
            replays_from_an_offset_or_a_time,
            a_named_replay_resumes_where_it_stopped,
        );
    };
    (@each $fixture:expr; $($scenario:ident,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                let Some(fixture) = $fixture else { return };
                $crate::conformance::$scenario(fixture).await;
            }
        )*
    };
}
