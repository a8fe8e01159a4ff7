//! The conformance suite on the NATS JetStream transport, against the server
//! at `TERN_TEST_NATS_URL` (skipped when it is not set).
//!
//! Each scenario runs in a namespace of its own (its own streams), as the
//! embedded scenarios each get a broker of their own: the scenarios run in
//! parallel on one server and handle the same message types, and would
//! otherwise take each other's commands. The namespace is removed when its
//! last service is cleaned up; namespaces left by failed runs are removed by
//! later runs once they are an hour old.
#![allow(clippy::unwrap_used)]

mod conformance;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use futures_lite::StreamExt;
use tern::transport::nats::{envelope_from_message, Nats, NatsOptions, Topology};
use tern::{Bus, Envelope};

const PREFIX: &str = "conformance-";
const STALE_AFTER: Duration = Duration::from_secs(3600);

struct NatsFixture {
    url: String,
    admin: Nats,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

impl NatsFixture {
    async fn new() -> Option<NatsFixture> {
        let Ok(url) = std::env::var("TERN_TEST_NATS_URL") else {
            println!("skipping: TERN_TEST_NATS_URL is not set");
            return None;
        };
        // conformance-SECONDS-RANDOM: the age is in the name.
        let namespace = format!(
            "{PREFIX}{}-{}",
            now_secs(),
            &uuid::Uuid::now_v7().simple().to_string()[24..]
        );
        let admin = Nats::connect_with(&url, NatsOptions::default().namespace(namespace))
            .await
            .unwrap();
        remove_stale_namespaces(&admin).await;
        Some(NatsFixture { url, admin })
    }

    fn topology(&self) -> &Topology {
        self.admin.topology()
    }
}

/// Deletes the streams of conformance namespaces older than [`STALE_AFTER`].
async fn remove_stale_namespaces(admin: &Nats) {
    let js = admin.jetstream();
    let mut names = js.stream_names();
    let mut stale = Vec::new();
    let upper = PREFIX.to_ascii_uppercase();
    while let Some(name) = names.next().await {
        let name = name.unwrap();
        let Some(rest) = name.strip_prefix(&upper) else {
            continue;
        };
        let born = rest.split('-').next().and_then(|s| s.parse::<u64>().ok());
        if born.is_some_and(|born| now_secs().saturating_sub(born) > STALE_AFTER.as_secs()) {
            stale.push(name);
        }
    }
    for name in stale {
        let _ = js.delete_stream(&name).await;
    }
}

impl conformance::Fixture for NatsFixture {
    async fn bus(&self) -> Bus {
        let options = NatsOptions::default().namespace(self.topology().namespace());
        Bus::new(Nats::connect_with(&self.url, options).await.unwrap())
    }

    async fn dead_letters(&self, service: &str) -> Vec<Envelope> {
        let topology = self.topology();
        let stream = self
            .admin
            .jetstream()
            .get_stream(topology.dead_letter_stream())
            .await
            .unwrap();
        // An ephemeral consumer that reads the service's dead letters once.
        let consumer = stream
            .create_consumer(pull::Config {
                filter_subject: topology.dead_letter_subject(service),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                ..pull::Config::default()
            })
            .await
            .unwrap();
        let mut out = Vec::new();
        loop {
            let mut batch = consumer
                .fetch()
                .max_messages(100)
                .expires(Duration::from_millis(500))
                .messages()
                .await
                .unwrap();
            let mut got = 0;
            while let Some(message) = batch.next().await {
                let message = message.unwrap();
                got += 1;
                let sequence = message.info().unwrap().stream_sequence;
                let envelope = envelope_from_message(&message.message).unwrap();
                let headers = message.message.headers.as_ref().unwrap();
                for header in ["tern-error", "tern-failed-service"] {
                    let value = headers.get(header).map(|v| v.as_str().to_string());
                    assert!(value.is_some(), "a dead letter carries `{header}`");
                }
                assert_eq!(
                    headers.get("tern-failed-service").unwrap().as_str(),
                    service
                );
                out.push(envelope);
                // Taken: it is not read again.
                stream.delete_message(sequence).await.unwrap();
            }
            if got == 0 {
                break;
            }
        }
        let name = consumer.cached_info().name.clone();
        let _ = stream.delete_consumer(&name).await;
        out
    }

    async fn forget_stream(&self, ty: &str) {
        self.forget_log_stream(ty).await;
    }

    async fn cleanup(&self, service: &str) {
        let topology = self.topology();
        let js = self.admin.jetstream();
        let prefix = Topology::consumer_prefix(service);
        let mut remaining = 0;
        for stream_name in [topology.events_stream(), topology.commands_stream()] {
            let stream = js.get_stream(&stream_name).await.unwrap();
            let mut names = stream.consumer_names();
            let mut ours = Vec::new();
            while let Some(name) = names.next().await {
                let name = name.unwrap();
                if name.starts_with(&prefix) {
                    ours.push(name);
                } else {
                    remaining += 1;
                }
            }
            for name in ours {
                stream.delete_consumer(&name).await.unwrap();
            }
        }
        let dlq = js.get_stream(topology.dead_letter_stream()).await.unwrap();
        dlq.purge()
            .filter(topology.dead_letter_subject(service))
            .await
            .unwrap();
        if remaining == 0 {
            for stream_name in [
                topology.events_stream(),
                topology.commands_stream(),
                topology.dead_letter_stream(),
            ] {
                let _ = js.delete_stream(&stream_name).await;
            }
        }
    }
}

impl NatsFixture {
    async fn forget_log_stream(&self, ty: &str) {
        let name = self.topology().event_log_stream(ty);
        let _ = self.admin.jetstream().delete_stream(&name).await;
    }
}

conformance_tests!(NatsFixture::new().await);

// What is particular to NATS.

use std::sync::{Arc, Mutex};

use conformance::{eventually, unique, DoWork, Fixture, Pinged};
use tern::{Context, HandlerError, Service};

/// A deferral (the handler did not run) gives the message back without
/// spending an attempt, although JetStream counts it as a delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferral_does_not_spend_an_attempt() {
    let Some(f) = NatsFixture::new().await else {
        return;
    };
    let bus = f.bus().await;
    let service = unique("patient");
    let calls: Arc<Mutex<Vec<(u32, bool)>>> = Arc::default();
    let sink = Arc::clone(&calls);
    let running = bus
        .start(
            Service::new(&service).on_command(move |_c: DoWork, ctx: Context| {
                let mut calls = sink.lock().unwrap();
                let first = calls.is_empty();
                calls.push((ctx.attempt(), first));
                std::future::ready(if first {
                    Err(HandlerError::deferred(
                        "circuit open",
                        Duration::from_millis(20),
                    ))
                } else {
                    Ok(())
                })
            }),
        )
        .await
        .unwrap();
    bus.send(&DoWork { n: 1 }).await.unwrap();
    eventually("the second delivery", || calls.lock().unwrap().len() == 2).await;
    running.shutdown().await.unwrap();
    assert_eq!(*calls.lock().unwrap(), vec![(1, true), (1, false)]);
    f.cleanup(&service).await;
}

/// Any NATS client can publish an event in CloudEvents' binary mode; a
/// message that is not a CloudEvent is dead-lettered, not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speaks_cloudevents_with_foreign_publishers() {
    let Some(f) = NatsFixture::new().await else {
        return;
    };
    let bus = f.bus().await;
    let service = unique("listener");
    let seen: Arc<Mutex<Vec<(u32, Envelope)>>> = Arc::default();
    let sink = Arc::clone(&seen);
    let running = bus
        .start(
            Service::new(&service).on_event(move |e: Pinged, ctx: Context| {
                sink.lock().unwrap().push((e.n, ctx.envelope().clone()));
                std::future::ready(Ok(()))
            }),
        )
        .await
        .unwrap();
    let js = f.admin.jetstream();
    let subject = f.topology().event_subject("conformance.pinged.v1");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("ce-specversion", "1.0");
    headers.insert("ce-id", "foreign-1");
    headers.insert("ce-source", "https://example.com/pinger");
    headers.insert("ce-type", "conformance.pinged.v1");
    headers.insert("ce-tenant", "acme");
    headers.insert("content-type", "application/json");
    js.publish_with_headers(subject.clone(), headers, r#"{"n":7}"#.into())
        .await
        .unwrap()
        .await
        .unwrap();
    js.publish(subject, "not a cloud event".into())
        .await
        .unwrap()
        .await
        .unwrap();
    eventually("the foreign event", || !seen.lock().unwrap().is_empty()).await;
    let mut dead = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while dead.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(20)).await;
        dead = raw_dead_letters(&f, &service).await;
    }
    running.shutdown().await.unwrap();
    let (n, envelope) = seen.lock().unwrap()[0].clone();
    assert_eq!(n, 7);
    assert_eq!(envelope.id, "foreign-1");
    assert_eq!(envelope.source, "https://example.com/pinger");
    assert_eq!(
        envelope.datacontenttype.as_deref(),
        Some("application/json")
    );
    assert_eq!(
        envelope.extensions.get("tenant").map(String::as_str),
        Some("acme")
    );
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload, "not a cloud event");
    let error = dead[0].headers.as_ref().unwrap().get("tern-error").unwrap();
    assert!(error.as_str().contains("not a CloudEvent"), "{error}");
    f.cleanup(&service).await;
}

/// The raw messages in a service's dead-letter subject.
async fn raw_dead_letters(f: &NatsFixture, service: &str) -> Vec<async_nats::Message> {
    let topology = f.topology();
    let stream = f
        .admin
        .jetstream()
        .get_stream(topology.dead_letter_stream())
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut sequence = 1;
    while let Ok(message) = stream
        .raw_message_builder()
        .sequence(sequence)
        .next_by_subject(topology.dead_letter_subject(service))
        .send()
        .await
    {
        sequence = message.sequence + 1;
        out.push(async_nats::Message {
            subject: message.subject,
            reply: None,
            payload: message.payload,
            headers: Some(message.headers),
            status: None,
            description: None,
            length: 0,
        });
    }
    out
}

/// `nats://` URLs connect in the default namespace, with its streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_by_url_with_the_default_streams() {
    let Some(f) = NatsFixture::new().await else {
        return;
    };
    let bus = Bus::connect(&f.url).await.unwrap();
    assert_eq!(bus.transport().name(), "nats");
    for stream in ["TERN_EVENTS", "TERN_COMMANDS", "TERN_DLQ"] {
        f.admin.jetstream().get_stream(stream).await.unwrap();
    }
    f.cleanup("nobody").await;
}

/// A handler that runs longer than the ack wait keeps its message: the
/// transport renews the ack wait of what it holds, so JetStream does not
/// deliver it to anyone else meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_keeps_its_message() {
    let Some(f) = NatsFixture::new().await else {
        return;
    };
    let options = NatsOptions::default()
        .namespace(f.topology().namespace())
        .ack_wait(Duration::from_secs(1));
    let bus = Bus::new(Nats::connect_with(&f.url, options).await.unwrap());
    let service = unique("slowpoke");
    let (started, finished) = (Arc::new(Mutex::new(0)), Arc::new(Mutex::new(0)));
    let (s, d) = (Arc::clone(&started), Arc::clone(&finished));
    let running = bus
        .start(
            Service::new(&service).on_command(move |_c: DoWork, _ctx: Context| {
                let (s, d) = (Arc::clone(&s), Arc::clone(&d));
                async move {
                    *s.lock().unwrap() += 1;
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    *d.lock().unwrap() += 1;
                    Ok(())
                }
            }),
        )
        .await
        .unwrap();
    bus.send(&DoWork { n: 1 }).await.unwrap();
    eventually("the handler finished", || *finished.lock().unwrap() == 1).await;
    // Long enough for a redelivery of an expired ack wait to show up.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    running.shutdown().await.unwrap();
    assert_eq!(*started.lock().unwrap(), 1, "delivered once");
    f.cleanup(&service).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_service_handling_the_same_command_is_refused() {
    let Some(f) = NatsFixture::new().await else {
        return;
    };
    let bus = f.bus().await;
    let (first, second) = (unique("billing"), unique("invoicing"));
    let handles = |name: &str| {
        Service::new(name).on_command(|_c: DoWork, _ctx: Context| std::future::ready(Ok(())))
    };
    let running = bus.start(handles(&first)).await.unwrap();
    let err = bus.start(handles(&second)).await.unwrap_err().to_string();
    assert!(err.contains("already handled by consumer"), "{err}");
    // Another instance of the same service is fine.
    let again = bus.start(handles(&first)).await.unwrap();
    running.shutdown().await.unwrap();
    again.shutdown().await.unwrap();
    // The refused service created nothing to clean up.
    f.cleanup(&first).await;
}

/// JetStream cannot hold a message for later, so a recurring schedule is
/// refused with an error naming the transport and the feature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_is_refused_for_want_of_delayed_sends() {
    let Some(f) = NatsFixture::new().await else {
        return;
    };
    let err = f
        .bus()
        .await
        .schedule(
            "nightly",
            tern::Cadence::every(Duration::from_secs(60)),
            &DoWork { n: 1 },
        )
        .await
        .unwrap_err();
    assert!(conformance::is_unsupported(&err), "{err}");
    assert!(err.to_string().contains("nats"), "{err}");
    assert!(err.to_string().contains("for later"), "{err}");
    f.cleanup(tern::schedule::SCHEDULER_SERVICE).await;
}
