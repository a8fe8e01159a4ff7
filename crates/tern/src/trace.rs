//! W3C trace context on envelopes, so a message's path can be followed
//! across services with or without a tracing backend.
//!
//! Each envelope carries a `traceparent`: a message sent while handling
//! another keeps its trace id and gets a new span id, so every message of a
//! conversation shares one trace. A message sent from outside a handler
//! starts a new trace, or, with OpenTelemetry, continues the caller's.
//!
//! With the `opentelemetry` feature (on by default), sending opens a
//! `publish TYPE` span (kind producer) and handling a `handle TYPE` span
//! (kind consumer) through the global tracer provider. The `traceparent`
//! is the publish span's, and the handle span is its child, so a tracing
//! backend draws the path of a message across services; what a handler
//! sends is a child of its handle span. Without an installed provider the
//! spans are no-ops and the ids come from [`stamp`]'s own generator.

use rand::Rng;

use crate::envelope::Envelope;

/// Gives `envelope` a `traceparent` and opens the publish span, which
/// lasts as long as the returned guard. The parent is `parent` (a
/// handler's span), else what the envelope inherited from its cause, else
/// the caller's current OpenTelemetry context.
pub(crate) fn start_publish(envelope: &mut Envelope, parent: Option<&str>) -> PublishSpan {
    if let Some(parent) = parent {
        envelope.traceparent = Some(parent.to_string());
    }
    #[cfg(feature = "opentelemetry")]
    {
        let span = otel::publish_span(envelope);
        if let Some(traceparent) = otel::traceparent_of(&span) {
            envelope.traceparent = Some(traceparent);
            return PublishSpan { _span: Some(span) };
        }
    }
    stamp(envelope);
    PublishSpan {
        #[cfg(feature = "opentelemetry")]
        _span: None,
    }
}

/// Keeps a publish span open until the send is done.
pub(crate) struct PublishSpan {
    #[cfg(feature = "opentelemetry")]
    _span: Option<opentelemetry::global::BoxedSpan>,
}

/// Gives `envelope` a `traceparent` from Tern's own generator: a child of
/// the one it inherited from its cause, or the root of a new trace.
pub(crate) fn stamp(envelope: &mut Envelope) {
    let mut rng = rand::thread_rng();
    let span: u64 = rng.gen::<u64>().max(1);
    let trace = envelope
        .traceparent
        .as_deref()
        .and_then(trace_id)
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:032x}", rng.gen::<u128>().max(1)));
    envelope.traceparent = Some(format!("00-{trace}-{span:016x}-01"));
}

/// The trace id of a well-formed version-00 `traceparent`.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    let well_formed = version == "00"
        && hex(trace, 32)
        && hex(span, 16)
        && hex(flags, 2)
        && parts.next().is_none()
        && trace.bytes().any(|b| b != b'0');
    well_formed.then_some(trace)
}

#[cfg(feature = "opentelemetry")]
pub(crate) mod otel {
    //! The bridge to OpenTelemetry's API (the global tracer provider).

    use opentelemetry::global::{self, BoxedSpan};
    use opentelemetry::trace::{
        Span, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
        TraceState, Tracer,
    };
    use opentelemetry::{Context, KeyValue};

    use crate::envelope::Envelope;

    const TRACER: &str = "tern";

    /// The OpenTelemetry context of a remote parent named by `traceparent`.
    fn remote(traceparent: &str) -> Option<Context> {
        super::trace_id(traceparent)?;
        let mut parts = traceparent.split('-').skip(1);
        let (trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?);
        let context = SpanContext::new(
            TraceId::from_hex(trace).ok()?,
            SpanId::from_hex(span).ok()?,
            TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
            true,
            TraceState::default(),
        );
        context
            .is_valid()
            .then(|| Context::new().with_remote_span_context(context))
    }

    fn attributes(envelope: &Envelope) -> Vec<KeyValue> {
        let mut attributes = vec![
            KeyValue::new("messaging.system", "tern"),
            KeyValue::new("messaging.message.id", envelope.id.clone()),
            KeyValue::new("cloudevents.event_type", envelope.ty.clone()),
            KeyValue::new("cloudevents.event_source", envelope.source.clone()),
        ];
        if let Some(correlation) = &envelope.correlation_id {
            attributes.push(KeyValue::new(
                "messaging.message.conversation_id",
                correlation.clone(),
            ));
        }
        attributes
    }

    pub(crate) fn publish_span(envelope: &Envelope) -> BoxedSpan {
        let parent = envelope
            .traceparent
            .as_deref()
            .and_then(remote)
            .unwrap_or_else(Context::current);
        let tracer = global::tracer(TRACER);
        let mut span = tracer
            .span_builder(format!("publish {}", envelope.ty))
            .with_kind(SpanKind::Producer)
            .start_with_context(&tracer, &parent);
        // Attributes cost allocations; a no-op provider would drop them.
        if span.is_recording() {
            span.set_attributes(attributes(envelope));
        }
        span
    }

    pub(crate) fn handle_span(envelope: &Envelope, service: &str) -> BoxedSpan {
        let parent = envelope
            .traceparent
            .as_deref()
            .and_then(remote)
            .unwrap_or_default();
        let tracer = global::tracer(TRACER);
        let mut attributes = attributes(envelope);
        attributes.push(KeyValue::new(
            "messaging.consumer.group.name",
            service.to_string(),
        ));
        tracer
            .span_builder(format!("handle {}", envelope.ty))
            .with_kind(SpanKind::Consumer)
            .with_attributes(attributes)
            .start_with_context(&tracer, &parent)
    }

    /// The `traceparent` of a recording span, if one is installed.
    pub(crate) fn traceparent_of(span: &BoxedSpan) -> Option<String> {
        let context = span.span_context();
        context.is_valid().then(|| {
            format!(
                "00-{}-{}-{:02x}",
                context.trace_id(),
                context.span_id(),
                context.trace_flags().to_u8()
            )
        })
    }

    /// Marks a handle span failed.
    pub(crate) fn fail(span: &mut BoxedSpan, error: String) {
        span.set_status(Status::error(error));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Envelope;
    use bytes::Bytes;

    #[test]
    fn a_new_message_starts_a_trace_and_its_effects_continue_it() {
        let mut cause = Envelope::new("a", "x.happened.v1", Bytes::new());
        stamp(&mut cause);
        let root = cause.traceparent.clone().unwrap();
        assert!(trace_id(&root).is_some(), "{root}");
        let mut effect = Envelope::new("b", "y.do.v1", Bytes::new()).caused_by(&cause);
        stamp(&mut effect);
        let child = effect.traceparent.unwrap();
        assert_eq!(trace_id(&child), trace_id(&root));
        assert_ne!(child, root, "the effect has its own span id");
    }

    #[test]
    fn malformed_trace_parents_are_not_continued() {
        for bad in [
            "",
            "00-abc-def-01",
            "01-00000000000000000000000000000001-0000000000000001-01",
            "00-00000000000000000000000000000000-0000000000000001-01",
        ] {
            assert_eq!(trace_id(bad), None, "{bad}");
        }
    }
}
