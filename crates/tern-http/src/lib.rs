//! Tern's management front door: a JSON REST API shaped like RabbitMQ's
//! management plugin (`/api/...`), Prometheus metrics (`/metrics`) and an
//! OpenAPI 3 document of the API (`/api/openapi.json`), over a
//! [`tern_broker::Broker`].
//!
//! A small web dashboard (`/`, assets embedded) shows the queues over the same API.
//!
//! [`HttpServer::bind`] serves it on a TCP address; `tern serve` runs it
//! beside the AMQP server. Every `/api/...` route except the OpenAPI
//! document needs HTTP basic auth or a bearer token, checked by an
//! [`Authenticator`] ([`BrokerUsers`], the broker's own users, by default).
//! Errors are JSON `{"error": ..., "reason": ...}` with the status the
//! broker's error maps to (see [`ApiError`]).
//!
//! The crate knows the broker only through its public API, and metrics only
//! through a [`MetricsSource`] that renders whatever recorder the binary
//! installed; `ARCHITECTURE.md` has the map of routes and modules.

mod api;
mod auth;
mod convert;
mod dashboard;
mod error;
mod metrics;
mod openapi;
mod rates;
mod redrive;
mod scope;
mod server;

pub use auth::{AuthError, AuthFuture, Authenticator, BrokerUsers, Credentials, Principal};
pub use error::ApiError;
pub use metrics::MetricsSource;
pub use openapi::document as openapi_document;
pub use server::{HttpConfig, HttpServer};
