//! The conformance suite on the embedded transport (Tern's broker in process).
#![allow(clippy::unwrap_used)]

mod conformance;

use tern::transport::embedded::Embedded;
use tern::{Bus, Envelope};
use tern_broker::{Broker, BrokerConfig};

struct EmbeddedFixture {
    broker: Broker,
    _dir: tempfile::TempDir,
}

impl EmbeddedFixture {
    async fn new() -> Option<EmbeddedFixture> {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
        Some(EmbeddedFixture { broker, _dir: dir })
    }
}

impl conformance::Fixture for EmbeddedFixture {
    async fn bus(&self) -> Bus {
        Bus::new(Embedded::with_broker(self.broker.clone()).await.unwrap())
    }

    async fn dead_letters(&self, service: &str) -> Vec<Envelope> {
        let connection = self.broker.new_connection_id();
        let mut channel = self.broker.open_channel("/", connection).unwrap();
        let queue = tern::transport::dead_letter_queue(service);
        let mut out = Vec::new();
        while let Some(got) = channel.get(&queue, true).unwrap() {
            out.push(tern::transport::embedded::envelope_from_message(&got.message).unwrap());
        }
        out
    }

    async fn cleanup(&self, _service: &str) {}
}

conformance_tests!(EmbeddedFixture::new().await);

mod scheduling {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use tern::transport::embedded::Embedded;
    use tern::transport::memory::Memory;
    use tern::{Bus, BusError, Context, Service, TransportError};

    use crate::conformance::DoWork;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delayed_command_is_handled_when_due_not_before() {
        let dir = tempfile::tempdir().unwrap();
        let bus = Bus::new(Embedded::open(dir.path()).await.unwrap());
        let seen: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::default();
        let sink = Arc::clone(&seen);
        let running = bus
            .start(
                Service::new("scheduler").on_command(move |c: DoWork, _ctx: Context| {
                    sink.lock().unwrap().push((c.n, Instant::now()));
                    std::future::ready(Ok(()))
                }),
            )
            .await
            .unwrap();
        let sent = Instant::now();
        bus.send_after(&DoWork { n: 2 }, Duration::from_millis(400))
            .await
            .unwrap();
        bus.send_at(
            &DoWork { n: 1 },
            std::time::SystemTime::now() + Duration::from_millis(200),
        )
        .await
        .unwrap();
        bus.send(&DoWork { n: 0 }).await.unwrap();
        crate::conformance::eventually("all three", || seen.lock().unwrap().len() == 3).await;
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            vec![0, 1, 2],
            "due order"
        );
        assert!(seen[1].1 - sent >= Duration::from_millis(200));
        assert!(seen[2].1 - sent >= Duration::from_millis(400));
        running.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn a_transport_without_timers_says_so() {
        let bus = Bus::new(Memory::new());
        let err = bus
            .send_after(&DoWork { n: 1 }, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(
                &err,
                BusError::Transport(TransportError::Unsupported {
                    transport: "memory",
                    ..
                })
            ),
            "{err}"
        );
        assert!(
            err.to_string().contains("send a message for later"),
            "{err}"
        );
    }
}

mod one_handler {
    use tern::transport::embedded::Embedded;
    use tern::{Bus, Context, Service};

    use crate::conformance::{DoWork, Pinged};

    fn handles_do_work(name: &str) -> Service {
        Service::new(name).on_command(|_c: DoWork, _ctx: Context| std::future::ready(Ok(())))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_service_handling_the_same_command_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bus = Bus::new(Embedded::open(dir.path()).await.unwrap());
        let first = bus.start(handles_do_work("billing")).await.unwrap();
        let err = bus
            .start(handles_do_work("invoicing"))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("already handled by service 'billing'"),
            "{err}"
        );
        // Another instance of the same service, and events, are fine.
        let second = bus.start(handles_do_work("billing")).await.unwrap();
        let listener = bus
            .start(
                Service::new("audit")
                    .on_event(|_e: Pinged, _ctx: Context| std::future::ready(Ok(()))),
            )
            .await
            .unwrap();
        for running in [first, second, listener] {
            running.shutdown().await.unwrap();
        }
    }
}
