//! What a handler knows about the message it handles, and how it sends more.

use std::sync::Arc;

use crate::bus::{Bus, SendOptions};
use crate::envelope::Envelope;
use crate::error::BusError;
use crate::message::{Command, Event, Query};
use crate::transport::Route;

/// A handler's view of the message being handled, and a bus whose sends
/// are effects of it: they carry its correlation id, name it as their
/// cause and continue its trace.
#[derive(Debug, Clone)]
pub struct Context {
    bus: Bus,
    envelope: Arc<Envelope>,
    attempt: u32,
    service: Arc<str>,
    /// The `traceparent` of the span handling this message, when one is
    /// recorded: what the handler sends becomes its child.
    trace_parent: Option<Arc<str>>,
}

impl Context {
    pub(crate) fn new(
        bus: Bus,
        envelope: Arc<Envelope>,
        attempt: u32,
        service: Arc<str>,
    ) -> Context {
        Context {
            bus,
            envelope,
            attempt,
            service,
            trace_parent: None,
        }
    }

    /// The bus underneath, for the toolkit's own handlers.
    pub(crate) fn bus(&self) -> &Bus {
        &self.bus
    }

    #[cfg_attr(not(feature = "opentelemetry"), allow(dead_code))]
    pub(crate) fn set_trace_parent(&mut self, traceparent: String) {
        self.trace_parent = Some(Arc::from(traceparent));
    }

    /// The envelope of the message being handled.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// Which attempt this is, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The service handling the message.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The conversation's correlation id.
    pub fn correlation_id(&self) -> &str {
        self.envelope
            .correlation_id
            .as_deref()
            .unwrap_or(&self.envelope.id)
    }

    /// Publishes an event as an effect of the handled message.
    pub async fn publish<E: Event>(&self, event: &E) -> Result<(), BusError> {
        self.publish_with(event, SendOptions::default()).await
    }

    /// Publishes an event with options.
    pub async fn publish_with<E: Event>(
        &self,
        event: &E,
        options: SendOptions,
    ) -> Result<(), BusError> {
        let (envelope, _span) = self.bus.envelope(
            event,
            &options,
            Some(&self.envelope),
            self.trace_parent.as_deref(),
        )?;
        self.bus.transport().send(Route::Event, envelope).await?;
        Ok(())
    }

    /// Sends a command as an effect of the handled message.
    pub async fn send<C: Command>(&self, command: &C) -> Result<(), BusError> {
        self.send_with(command, SendOptions::default()).await
    }

    /// Sends a command with options.
    pub async fn send_with<C: Command>(
        &self,
        command: &C,
        options: SendOptions,
    ) -> Result<(), BusError> {
        let (envelope, _span) = self.bus.envelope(
            command,
            &options,
            Some(&self.envelope),
            self.trace_parent.as_deref(),
        )?;
        self.bus.transport().send(Route::Command, envelope).await?;
        Ok(())
    }

    /// Asks a query as an effect of the handled message.
    pub async fn request<Q: Query>(&self, query: &Q) -> Result<Q::Reply, BusError> {
        self.request_with(query, SendOptions::default()).await
    }

    /// Asks a query with options.
    pub async fn request_with<Q: Query>(
        &self,
        query: &Q,
        options: SendOptions,
    ) -> Result<Q::Reply, BusError> {
        let (envelope, _span) = self.bus.envelope(
            query,
            &options,
            Some(&self.envelope),
            self.trace_parent.as_deref(),
        )?;
        self.bus.ask::<Q>(envelope, options.timeout).await
    }
}
