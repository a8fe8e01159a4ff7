//! Who may use the API: credentials from the `Authorization` header, checked
//! by an [`Authenticator`].
//!
//! [`BrokerUsers`], the default, checks basic credentials against the
//! broker's users (`Broker::authenticate`: argon2, the loopback-only rule)
//! and accepts an optional bearer token for scripts, which acts as an
//! administrator. As in RabbitMQ's management plugin, a user without any
//! tag may not use the API at all, and only administrators manage users,
//! permissions and vhosts ([`Principal::require_administrator`]).

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use std::collections::HashMap;

use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use tern_broker::{Broker, UserTag};

use crate::error::ApiError;
use crate::scope::{self, Scope};
use crate::server::AppState;

/// Credentials a request presented.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// `Authorization: Basic base64(user:password)`.
    Basic {
        /// The user name.
        user: String,
        /// The password.
        password: String,
    },
    /// `Authorization: Bearer <token>`.
    Bearer(String),
}

impl fmt::Debug for Credentials {
    /// Never prints the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Basic { user, .. } => write!(f, "Basic({user}, ***)"),
            Credentials::Bearer(_) => f.write_str("Bearer(***)"),
        }
    }
}

/// Who a request was authenticated as; handlers find it in the request's
/// extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user name (`token` for a bearer token).
    pub user: String,
    /// The user's tags (a bearer token is an administrator).
    pub tags: Vec<UserTag>,
}

impl Principal {
    /// Whether the principal has the `administrator` tag.
    pub fn is_administrator(&self) -> bool {
        self.tags.contains(&UserTag::Administrator)
    }

    /// 403 unless the principal is an administrator.
    pub fn require_administrator(&self, what: &str) -> Result<(), ApiError> {
        if self.is_administrator() {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "access_refused",
                format!(
                    "user '{}' may not {what}: that needs the administrator tag",
                    self.user
                ),
            ))
        }
    }
}

/// Why a request was refused. Each is answered with 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization` header.
    #[error("authentication required: send HTTP basic auth or a bearer token")]
    Missing,
    /// An `Authorization` header that is not well-formed basic or bearer auth.
    #[error("malformed Authorization header: {0}")]
    Malformed(String),
    /// Unknown user, wrong password or wrong token.
    #[error("invalid credentials for user '{0}'")]
    BadCredentials(String),
    /// A user that may only log in from a loopback address, from elsewhere.
    #[error("user '{0}' can only log in via localhost")]
    LoopbackOnly(String),
    /// A user without any management tag (RabbitMQ's "Not management user").
    #[error("user '{0}' has no management tag; give it management, monitoring, policymaker or administrator")]
    NotManagementUser(String),
}

/// What [`Authenticator::authenticate`] returns: a boxed future, so that
/// authenticators stay usable as trait objects.
pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<Principal, AuthError>> + Send + 'a>>;

/// Decides whether credentials from a peer are accepted.
pub trait Authenticator: fmt::Debug + Send + Sync + 'static {
    /// Checks `credentials` presented from `peer` (unknown for connections
    /// that did not come over TCP).
    fn authenticate<'a>(
        &'a self,
        credentials: &'a Credentials,
        peer: Option<IpAddr>,
    ) -> AuthFuture<'a>;
}

/// The broker's users, and an optional bearer token.
#[derive(Clone)]
pub struct BrokerUsers {
    broker: Broker,
    bearer_token: Option<String>,
}

impl fmt::Debug for BrokerUsers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerUsers")
            .field("bearer_token", &self.bearer_token.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

impl BrokerUsers {
    /// The broker's users and no bearer token.
    pub fn new(broker: Broker) -> BrokerUsers {
        BrokerUsers {
            broker,
            bearer_token: None,
        }
    }

    /// Also accepts `Authorization: Bearer <token>` (from any address), as
    /// an administrator. An empty token is ignored, so that an unset
    /// variable never opens the API.
    pub fn with_bearer_token(mut self, token: impl Into<String>) -> BrokerUsers {
        let token = token.into();
        self.bearer_token = (!token.is_empty()).then_some(token);
        self
    }
}

/// Compares secrets in time that does not depend on where they differ.
fn secret_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Authenticator for BrokerUsers {
    fn authenticate<'a>(
        &'a self,
        credentials: &'a Credentials,
        peer: Option<IpAddr>,
    ) -> AuthFuture<'a> {
        Box::pin(async move {
            match credentials {
                Credentials::Bearer(token) => match &self.bearer_token {
                    Some(expected) if secret_eq(token, expected) => Ok(Principal {
                        user: "token".into(),
                        tags: vec![UserTag::Administrator],
                    }),
                    _ => Err(AuthError::BadCredentials("token".into())),
                },
                Credentials::Basic { user, password } => {
                    // A request without a peer address did not come over
                    // TCP from anywhere we can vouch for: not loopback.
                    let peer = Some(peer.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)));
                    let auth = self
                        .broker
                        .authenticate(user, password, peer)
                        .await
                        .map_err(|e| match e {
                            tern_broker::AuthError::LoopbackOnly { .. } => {
                                AuthError::LoopbackOnly(user.clone())
                            }
                            _ => AuthError::BadCredentials(user.clone()),
                        })?;
                    if auth.tags().is_empty() {
                        return Err(AuthError::NotManagementUser(user.clone()));
                    }
                    Ok(Principal {
                        user: user.clone(),
                        tags: auth.tags().to_vec(),
                    })
                }
            }
        })
    }
}

/// Reads the credentials of an `Authorization` header value.
pub(crate) fn parse_authorization(value: &[u8]) -> Result<Credentials, AuthError> {
    let value = std::str::from_utf8(value)
        .map_err(|_| AuthError::Malformed("the header is not UTF-8".into()))?;
    let (scheme, rest) = value
        .split_once(' ')
        .ok_or_else(|| AuthError::Malformed("expected '<scheme> <credentials>'".into()))?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .map_err(|e| AuthError::Malformed(format!("basic credentials are not base64: {e}")))?;
        let decoded = String::from_utf8(decoded)
            .map_err(|_| AuthError::Malformed("basic credentials are not UTF-8".into()))?;
        let (user, password) = decoded
            .split_once(':')
            .ok_or_else(|| AuthError::Malformed("basic credentials lack a ':'".into()))?;
        Ok(Credentials::Basic {
            user: user.to_string(),
            password: password.to_string(),
        })
    } else if scheme.eq_ignore_ascii_case("bearer") {
        Ok(Credentials::Bearer(rest.to_string()))
    } else {
        Err(AuthError::Malformed(format!(
            "unsupported scheme '{scheme}'; use Basic or Bearer"
        )))
    }
}

/// Middleware: lets a request through only with accepted credentials.
pub(crate) async fn require(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let verdict = match request.headers().get(header::AUTHORIZATION) {
        None => Err(AuthError::Missing),
        Some(value) => match parse_authorization(value.as_bytes()) {
            Ok(c) => state.authenticator().authenticate(&c, peer).await,
            Err(e) => Err(e),
        },
    };
    let mut request = request;
    match verdict {
        Ok(principal) => {
            request = match authorize(&state, &principal, request).await {
                Ok(request) => request,
                Err(e) => return e.into_response(),
            };
            request
                .extensions_mut()
                .insert(Scope::of(state.broker(), &principal));
            request.extensions_mut().insert(principal);
            next.run(request).await
        }
        Err(e) => {
            let mut response = ApiError::unauthorized(e.to_string()).into_response();
            // A script (the dashboard) asks for no challenge, which would
            // make the browser pop up its own login dialog.
            if request.headers().contains_key("x-requested-with") {
                response.headers_mut().remove(header::WWW_AUTHENTICATE);
            }
            response
        }
    }
}

/// What a user who is not an administrator may do (`scope::authorize`),
/// decided by the route the request matched and its decoded path
/// parameters, before the handler runs.
async fn authorize(
    state: &AppState,
    principal: &Principal,
    request: Request,
) -> Result<Request, ApiError> {
    if principal.is_administrator() {
        return Ok(request);
    }
    let (mut parts, body) = request.into_parts();
    let Some(route) = parts
        .extensions
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
    else {
        // Every route under this middleware has a matched path.
        return Ok(Request::from_parts(parts, body));
    };
    let params: HashMap<String, String> = RawPathParams::from_request_parts(&mut parts, state)
        .await
        .map_err(|e| ApiError::bad_request(e.body_text()))?
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    scope::authorize(state.broker(), principal, &parts.method, &route, &params)?;
    Ok(Request::from_parts(parts, body))
}

/// The authenticator a server was configured with, shareable.
pub(crate) type SharedAuthenticator = Arc<dyn Authenticator>;

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, password: &str) -> Credentials {
        Credentials::Basic {
            user: user.into(),
            password: password.into(),
        }
    }

    #[test]
    fn authorization_headers_parse() {
        assert_eq!(
            parse_authorization(b"Basic Z3Vlc3Q6Z3Vlc3Q="),
            Ok(basic("guest", "guest"))
        );
        assert_eq!(
            parse_authorization(b"bearer abc"),
            Ok(Credentials::Bearer("abc".into()))
        );
        assert!(matches!(
            parse_authorization(b"Basic !!!"),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            parse_authorization(b"Digest x"),
            Err(AuthError::Malformed(_))
        ));
        assert!(matches!(
            parse_authorization(b"Basic"),
            Err(AuthError::Malformed(_))
        ));
    }
}
