//! Throughput of the toolkit against its raw transport, per transport, in
//! one run, with 1 KiB JSON events. Publishing (concurrent publishers, each
//! send awaiting its durable confirm) is measured on its own; then a
//! backlog of the same size is handled by one service instance:
//!
//! - `router`: `Service` with the default middleware stack (tracing,
//!   metrics, retry, timeout, catch-panic), handler decodes the JSON;
//! - `raw`: the same transport driven directly: `Transport::send` and a
//!   bare `Subscription` that acks each message.
//!
//! ```text
//! cargo run --release -p tern --example toolkit-bench -- [MESSAGES] [PUBLISHERS] [ROUNDS]
//! ```
//! AMQP against RabbitMQ runs when `TERN_TEST_RABBITMQ_URL` is set, NATS
//! JetStream when `TERN_TEST_NATS_URL` is set.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tern::transport::{Outcome, Route, SubscriptionSpec, Transport};
use tern::{Bus, Context, Envelope, Service};
use tokio::sync::Notify;

#[derive(Debug, Serialize, Deserialize)]
struct Measured {
    seq: u64,
    payload: String,
}
tern::message!(event Measured = "bench.measured.v1");

fn event(seq: u64) -> Measured {
    Measured {
        seq,
        payload: "x".repeat(1000),
    }
}

/// Publishes `messages` events from `publishers` concurrent tasks, each
/// send awaiting its confirm. Returns messages per second.
async fn publish(transport: &Arc<dyn Transport>, messages: u64, publishers: u64) -> f64 {
    let per = messages / publishers;
    let body = Bytes::from(serde_json::to_vec(&event(0)).expect("encode"));
    let started = Instant::now();
    let tasks: Vec<_> = (0..publishers)
        .map(|_| {
            let transport = Arc::clone(transport);
            let body = body.clone();
            tokio::spawn(async move {
                for _ in 0..per {
                    let mut envelope = Envelope::new("bench", "bench.measured.v1", body.clone());
                    envelope.datacontenttype = Some("application/json".into());
                    transport.send(Route::Event, envelope).await.expect("send");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("publisher");
    }
    (per * publishers) as f64 / started.elapsed().as_secs_f64()
}

fn service(name: &str, handled: &Arc<AtomicU64>, done: &Arc<Notify>, target: u64) -> Service {
    let (count, signal) = (Arc::clone(handled), Arc::clone(done));
    Service::new(name)
        .prefetch(256)
        .on_event(move |e: Measured, _ctx: Context| {
            std::hint::black_box(e.seq);
            if count.fetch_add(1, Ordering::Relaxed) + 1 == target {
                signal.notify_one();
            }
            std::future::ready(Ok(()))
        })
}

/// Handles a backlog of `target` events through the router with the default
/// middleware. Returns messages per second.
async fn router(
    transport: Arc<dyn Transport>,
    target: u64,
    publishers: u64,
    name: &str,
) -> (f64, f64) {
    let bus = Bus::from_arc(Arc::clone(&transport));
    let (handled, done) = (Arc::new(AtomicU64::new(0)), Arc::new(Notify::new()));
    // Declare the subscription, then let the backlog build while it is down.
    bus.start(service(name, &handled, &done, u64::MAX))
        .await
        .expect("start")
        .shutdown()
        .await
        .expect("shutdown");
    let publish_rate = publish(&transport, target, publishers).await;
    let target = target / publishers * publishers;
    let started = Instant::now();
    let running = bus
        .start(service(name, &handled, &done, target))
        .await
        .expect("start");
    while handled.load(Ordering::Relaxed) < target {
        let _ = tokio::time::timeout(Duration::from_millis(50), done.notified()).await;
    }
    let rate = target as f64 / started.elapsed().as_secs_f64();
    running.shutdown().await.expect("shutdown");
    (publish_rate, rate)
}

/// Handles a backlog of `target` events on the bare transport, acking each.
async fn raw(
    transport: Arc<dyn Transport>,
    target: u64,
    publishers: u64,
    name: &str,
) -> (f64, f64) {
    let spec = SubscriptionSpec {
        service: name.to_string(),
        events: vec!["bench.measured.v1".into()],
        commands: Vec::new(),
        prefetch: 256,
        dedup: None,
    };
    let mut first = transport.subscribe(spec.clone()).await.expect("subscribe");
    first.cancel().await.expect("cancel");
    drop(first);
    let publish_rate = publish(&transport, target, publishers).await;
    let target = target / publishers * publishers;
    let started = Instant::now();
    let mut subscription = transport.subscribe(spec).await.expect("subscribe");
    let mut seen = 0;
    let mut acks = tokio::task::JoinSet::new();
    while seen < target {
        let Some(Ok(incoming)) = subscription.next().await else {
            break;
        };
        let settle = incoming.settle;
        // Settled concurrently, as the router does, so acks pipeline.
        acks.spawn(async move { settle.settle(Outcome::Ack).await.expect("ack") });
        while acks.try_join_next().is_some() {}
        seen += 1;
    }
    while acks.join_next().await.is_some() {}
    let rate = seen as f64 / started.elapsed().as_secs_f64();
    let _ = subscription.cancel().await;
    (publish_rate, rate)
}

fn median(mut rates: Vec<f64>) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}

/// Alternates raw and router rounds, so that drift on a shared machine hits
/// both alike, and reports medians.
async fn measure(
    label: &str,
    transport: Arc<dyn Transport>,
    messages: u64,
    publishers: u64,
    rounds: u32,
) {
    let (mut publish_rates, mut raw_rates, mut router_rates) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let suffix = uuid::Uuid::now_v7().simple().to_string();
        let (p, r) = raw(
            Arc::clone(&transport),
            messages,
            publishers,
            &format!("bench-raw-{suffix}"),
        )
        .await;
        publish_rates.push(p);
        raw_rates.push(r);
        let (p, r) = router(
            Arc::clone(&transport),
            messages,
            publishers,
            &format!("bench-router-{suffix}"),
        )
        .await;
        publish_rates.push(p);
        router_rates.push(r);
    }
    let (raw_rate, router_rate) = (median(raw_rates), median(router_rates));
    println!(
        "{label:<18} publish {:>7.0} msg/s | handle: raw {raw_rate:>7.0} msg/s, router {router_rate:>7.0} msg/s, router/raw {:.2}",
        median(publish_rates),
        router_rate / raw_rate
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let messages: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let publishers: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(16);
    let rounds: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    println!("{messages} messages of 1 KiB JSON, {publishers} concurrent publishers, prefetch 256, median of {rounds} rounds");

    // TERN_BENCH_ONLY=embedded (say) runs one transport, for profiling.
    let only = std::env::var("TERN_BENCH_ONLY").ok();
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let dir = tempfile::tempdir_in(".").expect("a temporary directory here (not tmpfs)");
    let broker =
        tern_broker::Broker::open(tern_broker::BrokerConfig::new(dir.path().join("embedded")))
            .expect("open broker");
    let embedded = tern::transport::embedded::Embedded::with_broker(broker)
        .await
        .expect("embedded");
    if wanted("embedded") {
        measure("embedded", Arc::new(embedded), messages, publishers, rounds).await;
    }

    let server_broker =
        tern_broker::Broker::open(tern_broker::BrokerConfig::new(dir.path().join("server")))
            .expect("open broker");
    let server = tern_amqp::AmqpServer::bind("127.0.0.1:0".parse().expect("addr"), server_broker)
        .await
        .expect("bind");
    let url = format!("amqp://guest:guest@{}/%2f", server.local_addr());
    let amqp = tern::transport::amqp::Amqp::connect(&url)
        .await
        .expect("connect to Tern");
    if wanted("tern") {
        measure("amqp (Tern)", Arc::new(amqp), messages, publishers, rounds).await;
    }

    let peer = |transport: &str, variable: &str| {
        wanted(transport)
            .then(|| std::env::var(variable).ok())
            .flatten()
    };
    if let Some(url) = peer("rabbitmq", "TERN_TEST_RABBITMQ_URL") {
        let amqp = tern::transport::amqp::Amqp::connect(&url)
            .await
            .expect("connect to RabbitMQ");
        measure(
            "amqp (RabbitMQ)",
            Arc::new(amqp),
            messages,
            publishers,
            rounds,
        )
        .await;
    } else {
        println!("amqp (RabbitMQ): skipped (not selected, or TERN_TEST_RABBITMQ_URL is not set)");
    }
    if let Some(url) = peer("nats", "TERN_TEST_NATS_URL") {
        // A namespace of its own, so the benchmark's streams start empty.
        let namespace = format!("bench{}", &uuid::Uuid::now_v7().simple().to_string()[20..]);
        let options = tern::transport::nats::NatsOptions::default().namespace(namespace);
        let nats = tern::transport::nats::Nats::connect_with(&url, options)
            .await
            .expect("connect to NATS");
        measure(
            "nats (JetStream)",
            Arc::new(nats),
            messages,
            publishers,
            rounds,
        )
        .await;
    } else {
        println!("nats: skipped (not selected, or TERN_TEST_NATS_URL is not set)");
    }
    server.shutdown().await;
}
