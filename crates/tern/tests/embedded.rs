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

mod schedules {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde::{Deserialize, Serialize};
    use tern::schedule::{
        fire_time, scheduler, Cadence, ScheduleTick, ScheduledCommand, TickPhase,
    };
    use tern::transport::embedded::Embedded;
    use tern::{Bus, Context, Running, SendOptions, Service};
    use tern_broker::{Broker, BrokerConfig};

    use crate::conformance::eventually;

    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct SendReport {
        day: String,
    }
    tern::message!(command SendReport = "reports.send-report.v1");

    /// Fire time (ms) to the times it was handled.
    type Fires = Arc<Mutex<BTreeMap<u64, Vec<SystemTime>>>>;

    async fn start(bus: &Bus, fires: &Fires) -> (Running, Running) {
        start_with(bus, fires, true).await
    }

    async fn start_with(bus: &Bus, fires: &Fires, dedup: bool) -> (Running, Running) {
        let sink = Arc::clone(fires);
        let service = Service::new("reports");
        let service = if dedup {
            service.deduplicate(Duration::from_secs(60))
        } else {
            service
        };
        let reports = bus
            .start(service.on_command(move |r: SendReport, ctx: Context| {
                assert_eq!(r.day, "today");
                let at = ctx
                    .envelope()
                    .dedup_id()
                    .and_then(fire_time)
                    .expect("a scheduled command names its fire time");
                let ms = at.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
                sink.lock()
                    .unwrap()
                    .entry(ms)
                    .or_default()
                    .push(SystemTime::now());
                std::future::ready(Ok(()))
            }))
            .await
            .unwrap();
        let scheduler = bus.start(scheduler()).await.unwrap();
        (scheduler, reports)
    }

    fn check(fires: &Fires) -> Vec<u64> {
        check_except(fires, None)
    }

    /// Checks every fire was handled once, on time and on the grid, but
    /// for `except`, which may have been handled twice.
    fn check_except(fires: &Fires, except: Option<u64>) -> Vec<u64> {
        let fires = fires.lock().unwrap();
        for (at, handled) in fires.iter() {
            if Some(*at) == except {
                assert!(handled.len() <= 2, "{handled:?}");
            } else {
                assert_eq!(handled.len(), 1, "the fire at {at} was handled {handled:?}");
            }
            let due = UNIX_EPOCH + Duration::from_millis(*at);
            assert!(handled[0] >= due, "the fire at {at} was handled early");
            assert_eq!(at % 1000, 0, "fires keep to the 1 s grid");
        }
        fires.keys().copied().collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_schedule_fires_on_time_repeatedly_and_survives_a_broker_restart() {
        let dir = tempfile::tempdir().unwrap();
        let fires: Fires = Arc::default();
        let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
        let bus = Bus::new(Embedded::with_broker(broker.clone()).await.unwrap());
        let (scheduler_1, reports_1) = start(&bus, &fires).await;
        let report = SendReport {
            day: "today".into(),
        };
        bus.schedule(
            "daily-report",
            Cadence::every(Duration::from_secs(1)),
            &report,
        )
        .await
        .unwrap();
        // Again, as a service does at every start: still one schedule.
        bus.schedule(
            "daily-report",
            Cadence::every(Duration::from_secs(1)),
            &report,
        )
        .await
        .unwrap();
        eventually("three fires", || fires.lock().unwrap().len() >= 3).await;
        let before = check(&fires);
        for pair in before.windows(2) {
            assert_eq!(pair[1] - pair[0], 1000, "consecutive fires: {before:?}");
        }

        // The broker and both services go; the chain waits on disk.
        scheduler_1.shutdown().await.unwrap();
        reports_1.shutdown().await.unwrap();
        drop(bus);
        broker.close().unwrap();
        let stopped = fires.lock().unwrap().len();
        tokio::time::sleep(Duration::from_millis(1500)).await;

        let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
        let bus = Bus::new(Embedded::with_broker(broker.clone()).await.unwrap());
        let (scheduler_2, reports_2) = start(&bus, &fires).await;
        eventually("three more fires after the restart", || {
            fires.lock().unwrap().len() >= stopped + 3
        })
        .await;
        let after = check(&fires);
        let last_three = &after[after.len() - 3..];
        assert_eq!(last_three[2] - last_three[0], 2000, "{after:?}");
        scheduler_2.shutdown().await.unwrap();
        reports_2.shutdown().await.unwrap();
        drop(bus);
        broker.close().unwrap();
    }

    async fn handle_a_fire_twice(dedup: bool) {
        let dir = tempfile::tempdir().unwrap();
        let fires: Fires = Arc::default();
        let bus = Bus::new(Embedded::open(dir.path()).await.unwrap());
        let (scheduler, reports) = start_with(&bus, &fires, dedup).await;
        let report = SendReport {
            day: "today".into(),
        };
        bus.schedule("report", Cadence::every(Duration::from_secs(1)), &report)
            .await
            .unwrap();
        eventually("a first fire", || !fires.lock().unwrap().is_empty()).await;
        let first = *fires.lock().unwrap().keys().next().unwrap();
        // The tick for `first` handled again, as after a crash before its
        // ack: it bypasses the queue's dedup (another key), so the
        // scheduler sends the command and the next tick a second time.
        let duplicate = ScheduleTick {
            schedule: "report".into(),
            cadence: Cadence::every(Duration::from_secs(1)),
            fire_at_ms: first,
            phase: TickPhase::Fire,
            command: ScheduledCommand {
                ty: "reports.send-report.v1".into(),
                datacontenttype: Some("application/json".into()),
                data: serde_json::to_vec(&report).unwrap(),
            },
        };
        bus.send_with(&duplicate, SendOptions::default().dedup_id("redelivered"))
            .await
            .unwrap();
        eventually("four fires", || fires.lock().unwrap().len() >= 4).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Without dedup at the target, the redelivered fire itself may come
        // twice; the chain must not fork, so every later one comes once.
        let got = check_except(&fires, (!dedup).then_some(first));
        for pair in got.windows(2) {
            assert_eq!(pair[1] - pair[0], 1000, "one chain, no gaps: {got:?}");
        }
        scheduler.shutdown().await.unwrap();
        reports.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_duplicate_tick_does_not_fire_twice() {
        handle_a_fire_twice(true).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_duplicate_tick_does_not_fork_the_chain() {
        handle_a_fire_twice(false).await;
    }

    #[tokio::test]
    async fn transports_without_durable_delays_refuse_schedules() {
        let bus = Bus::new(tern::transport::memory::Memory::new());
        let err = bus
            .schedule(
                "report",
                Cadence::every(Duration::from_secs(1)),
                &SendReport { day: "x".into() },
            )
            .await
            .unwrap_err();
        assert!(crate::conformance::is_unsupported(&err), "{err}");
        assert!(err.to_string().contains("memory"), "{err}");
        assert!(err.to_string().contains("for later"), "{err}");
        let err = Cadence::cron("not a cron").unwrap_err();
        assert!(err.to_string().contains("not a cron"), "{err}");
        assert!(Cadence::cron("*/5 * * * * *").is_ok());
    }
}

mod dedup {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tern::transport::embedded::Embedded;
    use tern::{Bus, Context, HandlerError, SendOptions, Service};
    use tern_broker::{Broker, BrokerConfig, ExchangeName};

    use crate::conformance::{eventually, DoWork};

    /// A dead letter redriven into its deduplicating queue within the
    /// window is handled: it is not a duplicate of itself.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redriven_dead_letter_is_not_a_duplicate() {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
        let bus = Bus::new(Embedded::with_broker(broker.clone()).await.unwrap());
        let calls: Arc<Mutex<Vec<bool>>> = Arc::default();
        let sink = Arc::clone(&calls);
        let running = bus
            .start(
                Service::new("billing")
                    .deduplicate(Duration::from_secs(600))
                    .on_command(move |_c: DoWork, _ctx: Context| {
                        let mut calls = sink.lock().unwrap();
                        let first = calls.is_empty();
                        calls.push(first);
                        std::future::ready(if first {
                            Err(HandlerError::permanent("bad data, fixed later"))
                        } else {
                            Ok(())
                        })
                    }),
            )
            .await
            .unwrap();
        bus.send_with(
            &DoWork { n: 1 },
            SendOptions::default().dedup_id("invoice-7"),
        )
        .await
        .unwrap();
        let mut channel = broker
            .open_channel("/", broker.new_connection_id())
            .unwrap();
        let mut dead = None;
        eventually("the dead letter", || {
            dead = channel.get("billing.dlq", true).unwrap();
            dead.is_some()
        })
        .await;
        let mut message = dead.unwrap().message;
        message.exchange = ExchangeName::new("").unwrap();
        message.routing_key = "billing".into();
        broker
            .publish("/", message)
            .unwrap()
            .confirmed()
            .await
            .unwrap();
        eventually("the redriven message handled", || {
            calls.lock().unwrap().len() == 2
        })
        .await;
        // The original's dedup id still holds for new sends.
        bus.send_with(
            &DoWork { n: 1 },
            SendOptions::default().dedup_id("invoice-7"),
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(*calls.lock().unwrap(), vec![true, false]);
        running.shutdown().await.unwrap();
    }
}
