//! With an OpenTelemetry tracer provider installed, a message's path is one
//! trace: publish span, then the handler's span as its child, then the
//! handler's own publish as a child of that, and the envelopes'
//! `traceparent`s name those spans.
#![allow(clippy::unwrap_used)]
#![cfg(feature = "opentelemetry")]

use std::time::Duration;

use opentelemetry::trace::{SpanKind, Status};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tern::testing::TestHarness;
use tern::{Context, HandlerError, Service};

#[derive(Debug, Serialize, Deserialize)]
struct ShipOrder {
    order_id: u64,
}
#[derive(Debug, Serialize, Deserialize)]
struct OrderShipped {
    order_id: u64,
}
tern::message!(command ShipOrder = "shipping.ship-order.v1");
tern::message!(event OrderShipped = "shipping.order-shipped.v1");

#[tokio::test]
async fn spans_follow_a_message_across_handlers() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    opentelemetry::global::set_tracer_provider(provider);

    let harness = TestHarness::new();
    harness
        .start(Service::new("shipping").no_retry().on_command(
            |c: ShipOrder, ctx: Context| async move {
                if c.order_id == 0 {
                    return Err(HandlerError::permanent("no such order"));
                }
                ctx.publish(&OrderShipped {
                    order_id: c.order_id,
                })
                .await?;
                Ok(())
            },
        ))
        .await
        .unwrap();
    harness
        .bus()
        .send(&ShipOrder { order_id: 1 })
        .await
        .unwrap();
    harness
        .bus()
        .send(&ShipOrder { order_id: 0 })
        .await
        .unwrap();
    harness.settle().await;
    tokio::time::sleep(Duration::from_millis(50)).await;

    let spans = exporter.get_finished_spans().unwrap();
    let named =
        |name: &str| -> Vec<_> { spans.iter().filter(|s| s.name == name).cloned().collect() };
    let sends = named("publish shipping.ship-order.v1");
    let handles = named("handle shipping.ship-order.v1");
    let shipped = named("publish shipping.order-shipped.v1");
    assert_eq!(
        (sends.len(), handles.len(), shipped.len()),
        (2, 2, 1),
        "{spans:#?}"
    );
    assert!(sends.iter().all(|s| s.span_kind == SpanKind::Producer));
    assert!(handles.iter().all(|s| s.span_kind == SpanKind::Consumer));

    for handle in &handles {
        let send = sends
            .iter()
            .find(|s| s.span_context.span_id() == handle.parent_span_id)
            .expect("each handle span is a child of a publish span");
        assert_eq!(send.span_context.trace_id(), handle.span_context.trace_id());
    }
    let event = &shipped[0];
    let parent = handles
        .iter()
        .find(|h| h.span_context.span_id() == event.parent_span_id)
        .expect("the handler's publish is a child of its handle span");
    assert_eq!(
        parent.span_context.trace_id(),
        event.span_context.trace_id()
    );
    assert_eq!(parent.status, Status::Unset);
    assert!(
        handles.iter().any(|h| matches!(&h.status, Status::Error { description } if description.contains("no such order"))),
        "the failed handling is marked as an error"
    );

    // The envelope carries the publish span's ids.
    let envelope = &harness.published_envelopes::<OrderShipped>()[0];
    let traceparent = envelope.traceparent.as_deref().unwrap();
    assert_eq!(
        traceparent,
        format!(
            "00-{}-{}-01",
            event.span_context.trace_id(),
            event.span_context.span_id()
        )
    );
}
