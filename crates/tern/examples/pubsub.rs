//! A publisher and two subscribing services on one bus.
//!
//! ```text
//! cargo run -p tern --example pubsub                      # embedded, in ./tern-data-example
//! cargo run -p tern --example pubsub -- amqp://guest:guest@127.0.0.1:5672/%2f
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tern::{Bus, Context, HandlerError, Service};

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: u64,
    total_cents: u64,
}
tern::message!(event OrderPlaced = "orders.order-placed.v1");

async fn reserve_stock(event: OrderPlaced, ctx: Context) -> Result<(), HandlerError> {
    println!(
        "inventory: reserving stock for order {} (correlation {})",
        event.order_id,
        ctx.correlation_id()
    );
    Ok(())
}

async fn send_receipt(event: OrderPlaced, _ctx: Context) -> Result<(), HandlerError> {
    println!(
        "notification: receipt for order {}, {} cents",
        event.order_id, event.total_cents
    );
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "embedded:./tern-data-example".into());
    let bus = Bus::connect(&url).await?;
    let inventory = bus
        .start(Service::new("inventory").on_event(reserve_stock))
        .await?;
    let notification = bus
        .start(Service::new("notification").on_event(send_receipt))
        .await?;
    for order_id in 1..=3 {
        bus.publish(&OrderPlaced {
            order_id,
            total_cents: 1999 * order_id,
        })
        .await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    inventory.shutdown().await?;
    notification.shutdown().await?;
    Ok(())
}
