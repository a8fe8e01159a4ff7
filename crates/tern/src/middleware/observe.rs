//! Seeing handlers work: a tracing span and metrics per handled message.

use std::time::Instant;

use tower::Layer;
use tracing::Instrument;

use super::{around, call, Pipeline};

/// Runs each handler call in a `tracing` span named `handle`, with the
/// service, the message type, its id, its correlation id, its
/// `traceparent` and the attempt, and logs failures. With the
/// `opentelemetry` feature it also opens an OpenTelemetry `handle TYPE`
/// span, a child of the message's publish span (see [`crate::trace`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Tracing;

impl Layer<Pipeline> for Tracing {
    type Service = Pipeline;

    fn layer(&self, inner: Pipeline) -> Pipeline {
        around(inner, |inner, handling| {
            #[cfg(feature = "opentelemetry")]
            let mut otel_span =
                crate::trace::otel::handle_span(handling.ctx.envelope(), handling.ctx.service());
            #[cfg(feature = "opentelemetry")]
            let handling = {
                let mut handling = handling;
                if let Some(traceparent) = crate::trace::otel::traceparent_of(&otel_span) {
                    handling.ctx.set_trace_parent(traceparent);
                }
                handling
            };
            let ctx = &handling.ctx;
            let envelope = ctx.envelope();
            let span = tracing::info_span!(
                "handle",
                service = ctx.service(),
                r#type = %envelope.ty,
                id = %envelope.id,
                correlation_id = ctx.correlation_id(),
                traceparent = envelope.traceparent.as_deref().unwrap_or(""),
                attempt = ctx.attempt(),
            );
            async move {
                let result = call(inner, handling).await;
                if let Err(e) = &result {
                    tracing::warn!(error = %e, permanent = e.is_permanent(), "handler failed");
                    #[cfg(feature = "opentelemetry")]
                    crate::trace::otel::fail(&mut otel_span, e.to_string());
                }
                #[cfg(feature = "opentelemetry")]
                drop(otel_span);
                result
            }
            .instrument(span)
        })
    }
}

/// Records, per service and message type: `tern_handler_duration_seconds`
/// (histogram, labelled with the outcome), `tern_handler_attempts_total`
/// and `tern_handler_in_flight`. The router adds
/// `tern_handler_retries_total` and `tern_handler_dead_lettered_total`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Metrics;

impl Layer<Pipeline> for Metrics {
    type Service = Pipeline;

    fn layer(&self, inner: Pipeline) -> Pipeline {
        around(inner, |inner, handling| {
            let labels = [
                ("service", handling.ctx.service().to_string()),
                ("type", handling.ctx.envelope().ty.clone()),
            ];
            async move {
                let in_flight = metrics::gauge!("tern_handler_in_flight", &labels);
                in_flight.increment(1.0);
                metrics::counter!("tern_handler_attempts_total", &labels).increment(1);
                let started = Instant::now();
                let result = call(inner, handling).await;
                in_flight.decrement(1.0);
                let outcome = if result.is_ok() { "ok" } else { "error" };
                let [service, ty] = labels;
                metrics::histogram!(
                    "tern_handler_duration_seconds",
                    &[service, ty, ("outcome", outcome.to_string())]
                )
                .record(started.elapsed().as_secs_f64());
                result
            }
        })
    }
}
