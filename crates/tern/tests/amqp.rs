//! The conformance suite on the AMQP transport, twice: against Tern's own
//! AMQP server (always), and against RabbitMQ when `TERN_TEST_RABBITMQ_URL`
//! is set (CI sets it).
#![allow(clippy::unwrap_used)]
#![cfg(feature = "amqp")]

mod conformance;

use lapin::options::{BasicGetOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use tern::transport::amqp::{envelope_from_delivery, Amqp, AmqpOptions};
use tern::{Bus, Envelope};

struct AmqpFixture {
    url: String,
    /// Scenarios run in parallel on one RabbitMQ and send the same types,
    /// so each gets exchanges of its own, as a separate vhost would.
    namespace: String,
    /// Whether to use the broker's x-delayed-message exchanges.
    delayed: bool,
    // Kept alive for Tern-backed runs: the server and its broker's directory.
    _tern: Option<(tern_amqp::AmqpServer, tempfile::TempDir)>,
}

impl AmqpFixture {
    async fn tern() -> Option<AmqpFixture> {
        let dir = tempfile::tempdir().unwrap();
        let broker = tern_broker::Broker::open(tern_broker::BrokerConfig::new(dir.path())).unwrap();
        let server = tern_amqp::AmqpServer::bind("127.0.0.1:0".parse().unwrap(), broker)
            .await
            .unwrap();
        let url = format!("amqp://guest:guest@{}/%2f", server.local_addr());
        Some(AmqpFixture {
            url,
            namespace: "tern".into(),
            delayed: false,
            _tern: Some((server, dir)),
        })
    }

    /// Tern's server with the transport using its delayed-message exchanges.
    async fn tern_delayed() -> Option<AmqpFixture> {
        let mut fixture = AmqpFixture::tern().await?;
        fixture.delayed = true;
        Some(fixture)
    }

    async fn rabbitmq() -> Option<AmqpFixture> {
        let Ok(url) = std::env::var("TERN_TEST_RABBITMQ_URL") else {
            println!("skipping: TERN_TEST_RABBITMQ_URL is not set");
            return None;
        };
        let namespace = format!("conformance-{}", uuid::Uuid::now_v7().simple());
        Some(AmqpFixture {
            url,
            namespace,
            delayed: false,
            _tern: None,
        })
    }

    async fn connection(&self) -> Connection {
        Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .unwrap()
    }
}

impl conformance::Fixture for AmqpFixture {
    async fn bus(&self) -> Bus {
        let options = AmqpOptions::default()
            .namespace(&self.namespace)
            .delayed_exchange(self.delayed)
            .deduplication(self._tern.is_some())
            .tracked_stream_offsets(self._tern.is_some());
        Bus::new(Amqp::connect_with(&self.url, options).await.unwrap())
    }

    fn deduplicates(&self) -> bool {
        // RabbitMQ deduplicates only with a plugin CI does not install.
        self._tern.is_some()
    }

    async fn forget_stream(&self, ty: &str) {
        let connection = self.connection().await;
        let channel = connection.create_channel().await.unwrap();
        let name = format!("{}.stream.{ty}", self.namespace);
        let _ = channel
            .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = connection.close(200, "done".into()).await;
    }

    fn replays(&self) -> conformance::Replays {
        if self._tern.is_some() {
            conformance::Replays::Named
        } else {
            conformance::Replays::Unnamed
        }
    }

    async fn dead_letters(&self, service: &str) -> Vec<Envelope> {
        let connection = self.connection().await;
        let channel = connection.create_channel().await.unwrap();
        let queue = tern::transport::dead_letter_queue(service);
        let mut out = Vec::new();
        while let Some(got) = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            out.push(envelope_from_delivery(&got.delivery.properties, &got.delivery.data).unwrap());
        }
        let _ = connection.close(200, "done".into()).await;
        out
    }

    async fn cleanup(&self, service: &str) {
        let connection = self.connection().await;
        let channel = connection.create_channel().await.unwrap();
        let mut queues = vec![
            service.to_string(),
            tern::transport::dead_letter_queue(service),
        ];
        queues.extend((1..=10).map(|n| tern::transport::retry_queue(service, n)));
        for queue in queues {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        if self.namespace != "tern" {
            // Deleting an exchange another service of this scenario still
            // uses fails and closes the channel; that is fine, the last
            // cleanup removes it.
            for exchange in ["events", "commands"] {
                let name = format!("{}.{exchange}", self.namespace);
                let _ = channel
                    .exchange_delete(
                        name.as_str().into(),
                        ExchangeDeleteOptions {
                            if_unused: true,
                            ..ExchangeDeleteOptions::default()
                        },
                    )
                    .await;
            }
        }
        let _ = connection.close(200, "done".into()).await;
    }
}

mod tern_server {
    use super::*;
    conformance_tests!(AmqpFixture::tern().await);
}

mod rabbitmq {
    use super::*;
    conformance_tests!(AmqpFixture::rabbitmq().await);
}

mod tern_server_delayed {
    use super::*;
    conformance_tests!(AmqpFixture::tern_delayed().await);
}

mod scheduling {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use tern::{BusError, Context, Service, TransportError};

    use super::*;
    use crate::conformance::{DoWork, Fixture};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scheduled_sends_wait_in_the_broker_when_it_delays_messages() {
        let fixture = AmqpFixture::tern_delayed().await.unwrap();
        let bus = fixture.bus().await;
        let seen: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::default();
        let sink = Arc::clone(&seen);
        let running = bus
            .start(
                Service::new("amqp-scheduler").on_command(move |c: DoWork, _ctx: Context| {
                    sink.lock().unwrap().push((c.n, Instant::now()));
                    std::future::ready(Ok(()))
                }),
            )
            .await
            .unwrap();
        let sent = Instant::now();
        bus.send_after(&DoWork { n: 1 }, Duration::from_millis(300))
            .await
            .unwrap();
        bus.send(&DoWork { n: 0 }).await.unwrap();
        crate::conformance::eventually("both", || seen.lock().unwrap().len() == 2).await;
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.iter().map(|(n, _)| *n).collect::<Vec<_>>(), vec![0, 1]);
        assert!(seen[1].1 - sent >= Duration::from_millis(300));
        running.shutdown().await.unwrap();
    }

    #[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
    struct Tick {
        n: u32,
    }
    tern::message!(command Tick = "amqp-schedule.tick.v1");

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_recurring_schedule_runs_on_tern_over_amqp() {
        let fixture = AmqpFixture::tern().await.unwrap();
        let options = AmqpOptions::tern();
        let bus = Bus::new(Amqp::connect_with(&fixture.url, options).await.unwrap());
        let fires: Arc<Mutex<Vec<String>>> = Arc::default();
        let sink = Arc::clone(&fires);
        let target = bus
            .start(
                Service::new("amqp-ticks")
                    .deduplicate(Duration::from_secs(60))
                    .on_command(move |_t: Tick, ctx: Context| {
                        let id = ctx.envelope().dedup_id().unwrap_or_default().to_string();
                        sink.lock().unwrap().push(id);
                        std::future::ready(Ok(()))
                    }),
            )
            .await
            .unwrap();
        let scheduler = bus.start(tern::schedule::scheduler()).await.unwrap();
        bus.schedule(
            "amqp-ticks",
            tern::Cadence::every(Duration::from_millis(300)),
            &Tick { n: 1 },
        )
        .await
        .unwrap();
        crate::conformance::eventually("three fires", || fires.lock().unwrap().len() >= 3).await;
        let fires = fires.lock().unwrap().clone();
        let distinct: std::collections::BTreeSet<_> = fires.iter().collect();
        assert_eq!(distinct.len(), fires.len(), "no fire twice: {fires:?}");
        assert!(
            fires.iter().all(|f| tern::schedule::fire_time(f).is_some()),
            "{fires:?}"
        );
        scheduler.shutdown().await.unwrap();
        target.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rabbitmq_without_plugins_refuses_a_schedule_naming_what_it_lacks() {
        let Some(fixture) = AmqpFixture::rabbitmq().await else {
            return;
        };
        let bus = fixture.bus().await;
        let err = bus
            .schedule(
                "nightly",
                tern::Cadence::every(Duration::from_secs(60)),
                &Tick { n: 1 },
            )
            .await
            .unwrap_err();
        assert!(crate::conformance::is_unsupported(&err), "{err}");
        assert!(err.to_string().contains("for later"), "{err}");
        fixture.cleanup(tern::schedule::SCHEDULER_SERVICE).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_delayed_exchanges_a_scheduled_send_says_how_to_enable_it() {
        let fixture = AmqpFixture::tern().await.unwrap();
        let err = fixture
            .bus()
            .await
            .send_after(&DoWork { n: 1 }, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                BusError::Transport(TransportError::Unsupported {
                    transport: "amqp",
                    ..
                })
            ),
            "{err}"
        );
        assert!(err.to_string().contains("delayed_exchange(true)"), "{err}");
    }
}
