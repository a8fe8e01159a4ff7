//! The API's errors as HTTP responses: a status code and a JSON body
//! `{"error": "<code>", "reason": "<what failed, on which entity>"}`.
//!
//! [`ApiError::from`] a [`BrokerError`] is the one place broker errors map
//! onto statuses; [`json_errors`] gives axum's own refusals (unknown route,
//! wrong method, a path or query that does not parse, a body too large) the
//! same JSON shape, so a client never has to parse two error formats.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tern_broker::BrokerError;

/// An error answer of the API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {error}: {reason}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// A stable, machine-readable code, such as `not_found` or `inequivalent_arg`.
    pub error: &'static str,
    /// A sentence for people: what failed, on which entity.
    pub reason: String,
}

impl ApiError {
    /// An error with this status, code and reason.
    pub fn new(status: StatusCode, error: &'static str, reason: impl Into<String>) -> ApiError {
        ApiError {
            status,
            error,
            reason: reason.into(),
        }
    }

    /// 400: the request is malformed or names something invalid.
    pub fn bad_request(reason: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", reason)
    }

    /// 401: no credentials, or wrong ones.
    pub fn unauthorized(reason: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "not_authorized", reason)
    }

    /// 404: the vhost, exchange, queue or binding does not exist.
    pub fn not_found(reason: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", reason)
    }
}

impl From<BrokerError> for ApiError {
    /// Broker errors by what the client can do about them: fix the request
    /// (400), look elsewhere (404), not do this (403), or resolve a
    /// conflict with the entity's current state (409). Only a storage
    /// failure is the server's fault (500).
    fn from(e: BrokerError) -> ApiError {
        let reason = e.to_string();
        let (status, error) = match &e {
            BrokerError::InvalidName(_) => (StatusCode::BAD_REQUEST, "invalid_name"),
            BrokerError::InvalidArgument { .. } => (StatusCode::BAD_REQUEST, "invalid_argument"),
            // Used for an unknown exchange type, and for a closed broker
            // (which only happens during shutdown).
            BrokerError::NotAllowed(_) => (StatusCode::BAD_REQUEST, "not_allowed"),
            // A well-formed argument this broker does not support yet: the
            // same request will keep failing, so it is the client's to change.
            BrokerError::NotImplemented(_) => (StatusCode::BAD_REQUEST, "not_implemented"),
            BrokerError::VhostNotFound(_)
            | BrokerError::ExchangeNotFound { .. }
            | BrokerError::QueueNotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            BrokerError::AccessRefused(_) => (StatusCode::FORBIDDEN, "access_refused"),
            BrokerError::Inequivalent { .. } => (StatusCode::CONFLICT, "inequivalent_arg"),
            BrokerError::ResourceLocked { .. } => (StatusCode::CONFLICT, "resource_locked"),
            BrokerError::PreconditionFailed(_) => (StatusCode::CONFLICT, "precondition_failed"),
            BrokerError::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
            // `BrokerError` is non-exhaustive: a new kind is a server-side
            // gap until it is given its status here.
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        };
        ApiError::new(status, error, reason)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.error, "reason": self.reason });
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"tern\""),
            );
        }
        response
    }
}

/// The code for an error status that axum produced itself.
fn code_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_client_error() => "bad_request",
        _ => "internal_error",
    }
}

/// Middleware: rewrites every error response that is not JSON already
/// into the API's JSON error shape, keeping its status (and headers such
/// as `Allow` on a 405).
pub(crate) async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // axum's refusals are one short sentence; anything longer is cut.
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let mut reason = String::from_utf8_lossy(&text).trim().to_string();
    if reason.is_empty() {
        reason = match status {
            StatusCode::NOT_FOUND => "no such resource".to_string(),
            StatusCode::METHOD_NOT_ALLOWED => "method not allowed on this resource".to_string(),
            _ => status
                .canonical_reason()
                .unwrap_or("request failed")
                .to_string(),
        };
    }
    let fresh = ApiError::new(status, code_for(status), reason).into_response();
    let (fresh_parts, fresh_body) = fresh.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    for (name, value) in fresh_parts.headers.iter() {
        parts.headers.insert(name.clone(), value.clone());
    }
    Response::from_parts(parts, Body::new(fresh_body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_errors_map_to_client_statuses() {
        let cases = [
            (
                BrokerError::QueueNotFound {
                    vhost: "/".into(),
                    queue: "q".into(),
                },
                StatusCode::NOT_FOUND,
            ),
            (
                BrokerError::VhostNotFound("v".into()),
                StatusCode::NOT_FOUND,
            ),
            (
                BrokerError::Inequivalent {
                    entity: "queue 'q'".into(),
                    property: "durable".into(),
                    current: "true".into(),
                    received: "false".into(),
                },
                StatusCode::CONFLICT,
            ),
            (
                BrokerError::ResourceLocked {
                    vhost: "/".into(),
                    queue: "q".into(),
                },
                StatusCode::CONFLICT,
            ),
            (
                BrokerError::PreconditionFailed("in use".into()),
                StatusCode::CONFLICT,
            ),
            (
                BrokerError::InvalidArgument {
                    argument: "x-max-length".into(),
                    reason: "negative".into(),
                },
                StatusCode::BAD_REQUEST,
            ),
            (
                BrokerError::AccessRefused("amq.".into()),
                StatusCode::FORBIDDEN,
            ),
            (
                BrokerError::Storage("disk".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (e, status) in cases {
            let reason = e.to_string();
            let api = ApiError::from(e);
            assert_eq!(api.status, status, "{reason}");
            assert_eq!(api.reason, reason);
        }
    }
}
