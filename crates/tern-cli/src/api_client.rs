//! The operator commands' way to the management HTTP API: the http:// URL
//! of `--url` (`TERN_URL`, or the `--api` alias; see `endpoint.rs`) with its
//! user and password or a bearer token (`--token`, `TERN_HTTP_TOKEN`), one
//! HTTP/1.1 request per connection
//! (hyper's connection-level client), and the API's JSON errors turned into
//! one line that names the problem.

use std::fmt;

use anyhow::{anyhow, Context};
use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::endpoint::{Endpoint, DEFAULT_API_URL};

/// A parsed management API URL.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct ApiUrl {
    /// `host:port`.
    authority: String,
    user: Option<(String, String)>,
}

impl fmt::Debug for ApiUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl ApiUrl {
    /// Parses `http://[USER[:PASS]@]HOST[:PORT][/]`; user and password may
    /// be percent-encoded.
    pub(crate) fn parse(url: &str) -> anyhow::Result<ApiUrl> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            anyhow!(
                "the management API URL must be an http:// URL such as {DEFAULT_API_URL}, not '{}'",
                redact(url)
            )
        })?;
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') {
            return Err(anyhow!(
                "the management API URL takes no path ('{}'): give --url http://USER:PASS@HOST:PORT",
                redact(url)
            ));
        }
        let (user, host) = match rest.rsplit_once('@') {
            Some((userinfo, host)) => {
                let (u, p) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                (Some((percent_decode(u)?, percent_decode(p)?)), host)
            }
            None => (None, rest),
        };
        if host.is_empty() {
            return Err(anyhow!(
                "the management API URL names no host: '{}'",
                redact(url)
            ));
        }
        let authority = if host
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            host.to_string()
        } else {
            format!("{host}:80")
        };
        Ok(ApiUrl { authority, user })
    }

    /// The URL with the password as `***`, for messages.
    pub(crate) fn redacted(&self) -> String {
        match &self.user {
            Some((u, _)) => format!("http://{u}:***@{}", self.authority),
            None => format!("http://{}", self.authority),
        }
    }
}

fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or_default();
                format!("{scheme}://{user}:***@{host}")
            }
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

fn percent_decode(s: &str) -> anyhow::Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    anyhow!("bad percent-encoding in the management API URL's user or password")
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).context("the management API URL's user or password is not UTF-8")
}

/// Percent-encodes one path segment (a vhost `/` is `%2F`).
pub(crate) fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A client of the HTTP API.
#[derive(Debug)]
pub(crate) struct ApiClient {
    url: ApiUrl,
    authorization: String,
}

/// An answer: the status and the body, as JSON if it is some.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) body: Value,
}

impl ApiClient {
    pub(crate) fn new(endpoint: &Endpoint) -> anyhow::Result<ApiClient> {
        let url = ApiUrl::parse(&endpoint.http()?)?;
        let authorization = match (&endpoint.token, &url.user) {
            (Some(token), _) if !token.is_empty() => format!("Bearer {token}"),
            (_, Some((u, p))) => format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            ),
            _ => {
                return Err(anyhow!(
                    "no credentials for {}: put USER:PASS@ in --url (or TERN_URL), or give --token (or TERN_HTTP_TOKEN)",
                    url.redacted()
                ))
            }
        };
        Ok(ApiClient { url, authorization })
    }

    /// Sends one request; any answer comes back, failures to reach the
    /// server are errors naming the URL and the fix.
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Answer> {
        let api = self.url.redacted();
        let stream = tokio::net::TcpStream::connect(&self.url.authority)
            .await
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    anyhow!("cannot reach the HTTP API at {api}: connection refused; is `tern serve` running? point --url (or TERN_URL) at its HTTP address")
                } else {
                    anyhow!("cannot reach the HTTP API at {api}: {e}; check --url (or TERN_URL)")
                }
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .with_context(|| format!("HTTP handshake with {api}"))?;
        tokio::spawn(conn);
        let payload = match body {
            Some(v) => Bytes::from(v.to_string()),
            None => Bytes::new(),
        };
        let mut request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, &self.url.authority)
            .header(AUTHORIZATION, &self.authorization);
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(payload))
            .with_context(|| format!("building {method} {path}"))?;
        let response = sender
            .send_request(request)
            .await
            .with_context(|| format!("{method} {path} at {api}"))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .with_context(|| format!("reading the answer to {method} {path}"))?
            .to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok(Answer { status, body })
    }

    /// Sends a request that must succeed: a 2xx answer's body, or an error
    /// with the API's reason and status.
    pub(crate) async fn ok(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let answer = self.send(method, path, body).await?;
        if answer.status.is_success() {
            return Ok(answer.body);
        }
        Err(self.explain(&answer))
    }

    /// The API's `{error, reason}` as one line, with the fix for a 401.
    pub(crate) fn explain(&self, answer: &Answer) -> anyhow::Error {
        let reason = answer.body["reason"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| answer.body.to_string());
        let code = answer.status.as_u16();
        if code == 401 {
            anyhow!(
                "{reason} (HTTP 401 from {}); check the user and password in --url (or TERN_URL), or --token",
                self.url.redacted()
            )
        } else {
            anyhow!("{reason} (HTTP {code})")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_urls_parse_and_redact() {
        let u = ApiUrl::parse("http://guest:gu%40st@127.0.0.1:15672/").unwrap();
        assert_eq!(u.authority, "127.0.0.1:15672");
        assert_eq!(u.user, Some(("guest".into(), "gu@st".into())));
        assert_eq!(u.redacted(), "http://guest:***@127.0.0.1:15672");
        assert_eq!(format!("{u:?}"), "http://guest:***@127.0.0.1:15672");
        let u = ApiUrl::parse("http://localhost").unwrap();
        assert_eq!(u.authority, "localhost:80");
        assert_eq!(u.user, None);
        let err = ApiUrl::parse("https://a:s3cret@h").unwrap_err().to_string();
        assert!(!err.contains("s3cret"), "{err}");
        assert!(ApiUrl::parse("http://h:1/api").is_err());
        assert!(ApiUrl::parse("http://a:%zz@h:1").is_err());
    }

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(segment("/"), "%2F");
        assert_eq!(segment("a b/c"), "a%20b%2Fc");
        assert_eq!(segment("plain-name_1.x"), "plain-name_1.x");
    }
}
