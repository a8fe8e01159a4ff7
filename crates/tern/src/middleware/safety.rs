//! Handlers that hang or panic become failed attempts.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_lite::FutureExt;

use tower::Layer;

use super::{around, call, Pipeline};
use crate::error::HandlerError;

/// Fails an attempt that takes longer than the limit. The handler's future
/// is dropped, so it must not leave half-done work that a retry would not
/// redo (handlers are idempotent under at-least-once anyway).
#[derive(Debug, Clone, Copy)]
pub struct Timeout(pub Duration);

impl Layer<Pipeline> for Timeout {
    type Service = Pipeline;

    fn layer(&self, inner: Pipeline) -> Pipeline {
        let limit = self.0;
        around(inner, move |inner, handling| async move {
            match tokio::time::timeout(limit, call(inner, handling)).await {
                Ok(result) => result,
                Err(_) => Err(HandlerError::transient(format!(
                    "handler timed out after {limit:?}"
                ))),
            }
        })
    }
}

/// Catches a panic in the handler's future, so that it fails the attempt
/// with the panic's message instead of taking the router down and leaving
/// the message unsettled.
#[derive(Debug, Clone, Copy, Default)]
pub struct CatchPanic;

impl Layer<Pipeline> for CatchPanic {
    type Service = Pipeline;

    fn layer(&self, inner: Pipeline) -> Pipeline {
        around(inner, |inner, handling| async move {
            // Unwind safety: after a panic nothing of the handler's state is
            // used again; the message is retried from its bytes.
            match AssertUnwindSafe(call(inner, handling)).catch_unwind().await {
                Ok(result) => result,
                Err(payload) => {
                    let message = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a non-string panic payload".to_string());
                    Err(HandlerError::transient(format!(
                        "handler panicked: {message}"
                    )))
                }
            }
        })
    }
}
