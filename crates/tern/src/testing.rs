//! A test harness for services, in the spirit of MassTransit's: run real
//! handlers on an in-memory bus and assert on what they published, sent
//! and dead-lettered, without a broker.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use tern::testing::TestHarness;
//! use tern::{Context, Service};
//!
//! #[derive(Serialize, Deserialize)]
//! struct PlaceOrder { order_id: u64 }
//! #[derive(Serialize, Deserialize, Debug, PartialEq)]
//! struct OrderPlaced { order_id: u64 }
//! tern::message!(command PlaceOrder = "orders.place-order.v1");
//! tern::message!(event OrderPlaced = "orders.order-placed.v1");
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let harness = TestHarness::new();
//! harness
//!     .start(Service::new("orders").on_command(|c: PlaceOrder, ctx: Context| async move {
//!         ctx.publish(&OrderPlaced { order_id: c.order_id }).await?;
//!         Ok(())
//!     }))
//!     .await
//!     .unwrap();
//! harness.bus().send(&PlaceOrder { order_id: 7 }).await.unwrap();
//! harness.settle().await;
//! assert_eq!(harness.published::<OrderPlaced>(), vec![OrderPlaced { order_id: 7 }]);
//! # }
//! ```

use std::sync::Mutex;
use std::time::Duration;

use crate::bus::Bus;
use crate::envelope::Envelope;
use crate::error::BusError;
use crate::message::{Codec, Command, Event, Message};
use crate::router::{Running, Service};
use crate::transport::memory::{DeadLetter, Memory};
use crate::transport::Route;

/// An in-memory bus with the services under test.
#[derive(Debug)]
pub struct TestHarness {
    memory: Memory,
    bus: Bus,
    running: Mutex<Vec<Running>>,
}

impl Default for TestHarness {
    fn default() -> TestHarness {
        TestHarness::new()
    }
}

impl TestHarness {
    /// An empty harness.
    pub fn new() -> TestHarness {
        let memory = Memory::new();
        TestHarness {
            bus: Bus::new(memory.clone()),
            memory,
            running: Mutex::default(),
        }
    }

    /// The bus, to send what starts a test.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The transport, for lower-level assertions.
    pub fn transport(&self) -> &Memory {
        &self.memory
    }

    /// Starts a service; it runs until the harness is dropped.
    pub async fn start(&self, service: Service) -> Result<(), BusError> {
        let running = self.bus.start(service).await?;
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(running);
        Ok(())
    }

    /// Waits until nothing is queued, in flight or waiting for a retry
    /// (10 s at most, so a test that never settles fails instead of hanging).
    pub async fn settle(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        // Idle twice in a row: a handler may be between settling one
        // message and sending the next.
        let mut idle_in_a_row = 0;
        while idle_in_a_row < 2 && tokio::time::Instant::now() < deadline {
            if self.memory.is_idle() {
                idle_in_a_row += 1;
            } else {
                idle_in_a_row = 0;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn decoded<M: Message>(&self, route: impl Fn(&Route) -> bool) -> Vec<M> {
        self.envelopes::<M>(route)
            .iter()
            .filter_map(|e| <M::Codec as Codec>::decode(&e.data).ok())
            .collect()
    }

    fn envelopes<M: Message>(&self, route: impl Fn(&Route) -> bool) -> Vec<Envelope> {
        self.memory
            .sent()
            .into_iter()
            .filter(|(r, e)| route(r) && e.ty == M::TYPE)
            .map(|(_, e)| e)
            .collect()
    }

    /// Every event of type `E` published so far, oldest first.
    pub fn published<E: Event>(&self) -> Vec<E> {
        self.decoded::<E>(|r| *r == Route::Event)
    }

    /// The envelopes of every event of type `E` published so far.
    pub fn published_envelopes<E: Event>(&self) -> Vec<Envelope> {
        self.envelopes::<E>(|r| *r == Route::Event)
    }

    /// Every command of type `C` sent so far, oldest first.
    pub fn sent<C: Command>(&self) -> Vec<C> {
        self.decoded::<C>(|r| *r == Route::Command)
    }

    /// What `service` dead-lettered, with the errors.
    pub fn dead_letters(&self, service: &str) -> Vec<DeadLetter> {
        self.memory.dead_letters(service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::Context;
    use crate::error::HandlerError;
    use crate::middleware::Retry;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct ChargeCard {
        cents: u64,
    }
    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct CardCharged {
        cents: u64,
    }
    crate::message!(command ChargeCard = "payments.charge-card.v1");
    crate::message!(event CardCharged = "payments.card-charged.v1");

    fn payments() -> Service {
        Service::new("payments")
            .retry(
                Retry::exponential(Duration::from_millis(1), Duration::from_millis(5))
                    .max_attempts(2),
            )
            .on_command(|c: ChargeCard, ctx: Context| async move {
                if c.cents == 0 {
                    return Err(HandlerError::transient("nothing to charge"));
                }
                ctx.publish(&CardCharged { cents: c.cents }).await?;
                Ok(())
            })
    }

    #[tokio::test]
    async fn records_what_handlers_publish_with_their_ids() {
        let harness = TestHarness::new();
        harness.start(payments()).await.unwrap();
        harness
            .bus()
            .send(&ChargeCard { cents: 500 })
            .await
            .unwrap();
        harness.settle().await;
        assert_eq!(
            harness.sent::<ChargeCard>(),
            vec![ChargeCard { cents: 500 }]
        );
        assert_eq!(
            harness.published::<CardCharged>(),
            vec![CardCharged { cents: 500 }]
        );
        let event = &harness.published_envelopes::<CardCharged>()[0];
        assert_eq!(event.source, "payments");
        assert!(event.correlation_id.is_some());
    }

    #[tokio::test]
    async fn records_dead_letters_with_their_errors() {
        let harness = TestHarness::new();
        harness.start(payments()).await.unwrap();
        harness.bus().send(&ChargeCard { cents: 0 }).await.unwrap();
        harness.settle().await;
        let dead = harness.dead_letters("payments");
        assert_eq!(dead.len(), 1);
        assert!(
            dead[0].error.contains("attempt 2: nothing to charge"),
            "{}",
            dead[0].error
        );
        assert!(harness.published::<CardCharged>().is_empty());
    }
}
