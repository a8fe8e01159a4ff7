//! Request/reply: a query answered by another service, with a timeout.
//!
//! ```text
//! cargo run -p tern --example request_reply               # embedded
//! cargo run -p tern --example request_reply -- amqp://guest:guest@127.0.0.1:5672/%2f
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tern::{Bus, Context, HandlerError, SendOptions, Service};

#[derive(Debug, Serialize, Deserialize)]
struct GetStock {
    sku: String,
}
#[derive(Debug, Serialize, Deserialize)]
struct StockLevel {
    sku: String,
    available: u32,
}
tern::message!(query GetStock = "inventory.get-stock.v1", reply StockLevel);

async fn get_stock(query: GetStock, _ctx: Context) -> Result<StockLevel, HandlerError> {
    if query.sku.is_empty() {
        return Err(HandlerError::permanent("a SKU is required"));
    }
    Ok(StockLevel {
        available: query.sku.len() as u32 * 10,
        sku: query.sku,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "embedded:./tern-data-example".into());
    let bus = Bus::connect(&url).await?;
    let inventory = bus
        .start(Service::new("inventory").on_query(get_stock))
        .await?;

    let level = bus
        .request_with(
            &GetStock {
                sku: "tern-mug".into(),
            },
            SendOptions::default().timeout(Duration::from_secs(5)),
        )
        .await?;
    println!("{} has {} available", level.sku, level.available);

    match bus.request(&GetStock { sku: String::new() }).await {
        Ok(level) => println!("unexpected answer: {level:?}"),
        Err(e) => println!("as expected, the query failed: {e}"),
    }
    inventory.shutdown().await?;
    Ok(())
}
