//! Middleware: `tower` layers around a service's handlers.
//!
//! Every handler call goes through a [`Pipeline`], a boxed `tower::Service`
//! from a [`Handling`] to the encoded answer (for queries) or a
//! [`HandlerError`]. A layer is any `tower::Layer<Pipeline, Service = Pipeline>`,
//! so a team's own layers sit beside these:
//! - [`Retry`]: exponential backoff with full jitter, up to a number of
//!   attempts; it only *chooses* the delay, and the transport holds the
//!   message for it (a delayed requeue), so no handler slot waits;
//! - [`CircuitBreaker`]: closed, open and half-open with one probe; while
//!   open, messages are deferred without spending an attempt;
//! - [`RateLimit`]: at most N handler calls per second per instance;
//! - [`Timeout`]: a slow handler becomes a failed attempt;
//! - [`CatchPanic`]: a panicking handler becomes a failed attempt, not a
//!   dead process;
//! - [`Tracing`] and [`Metrics`]: a `tracing` span per handled message with
//!   its ids, and handler duration, attempts and in-flight gauges.
//!
//! [`crate::router::ServiceBuilder`] installs a default stack (tracing,
//! metrics, retry, timeout, catch-panic) and puts extra layers between retry
//! and timeout.

use std::future::Future;

use bytes::Bytes;
use tower::util::BoxCloneService;
use tower::ServiceExt;

use crate::context::Context;
use crate::error::HandlerError;

mod circuit_breaker;
mod observe;
mod rate_limit;
mod retry;
mod safety;

pub use circuit_breaker::CircuitBreaker;
pub use observe::{Metrics, Tracing};
pub use rate_limit::RateLimit;
pub use retry::Retry;
pub use safety::{CatchPanic, Timeout};

/// One message on its way through a service's middleware to its handler.
#[derive(Debug, Clone)]
pub struct Handling {
    /// The message and its context.
    pub ctx: Context,
}

/// What every layer wraps: a boxed service from a [`Handling`] to the
/// encoded answer of a query (`None` for events and commands).
pub type Pipeline = BoxCloneService<Handling, Option<Bytes>, HandlerError>;

/// Wraps `inner` in `f`, which gets a clone of `inner` and the request.
pub(crate) fn around<F, Fut>(inner: Pipeline, f: F) -> Pipeline
where
    F: Fn(Pipeline, Handling) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Option<Bytes>, HandlerError>> + Send + 'static,
{
    BoxCloneService::new(tower::service_fn(move |handling: Handling| {
        f(inner.clone(), handling)
    }))
}

/// Calls a pipeline once (waiting for it to be ready first).
pub(crate) async fn call(
    inner: Pipeline,
    handling: Handling,
) -> Result<Option<Bytes>, HandlerError> {
    inner.oneshot(handling).await
}
