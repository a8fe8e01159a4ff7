//! What the API tests share: a broker with the HTTP server on 127.0.0.1
//! port 0, and a small HTTP/1.1 client over a real socket (hyper's
//! connection-level client: one connection per request, no pool).

#![allow(clippy::unwrap_used)] // a test helper that fails should panic
#![allow(dead_code)] // each test file uses part of it

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tern_broker::{Broker, BrokerConfig};
use tern_http::{HttpConfig, HttpServer};

/// `Basic base64("guest:guest")`.
pub(crate) const GUEST: &str = "Basic Z3Vlc3Q6Z3Vlc3Q=";

/// A broker in a temporary directory with the HTTP API in front of it.
pub(crate) struct TestServer {
    pub(crate) broker: Broker,
    pub(crate) server: HttpServer,
    pub(crate) client: Client,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub(crate) async fn start() -> TestServer {
        TestServer::start_with(HttpConfig::default()).await
    }

    pub(crate) async fn start_with(config: HttpConfig) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
        let server = HttpServer::bind("127.0.0.1:0".parse().unwrap(), broker.clone(), config)
            .await
            .unwrap();
        let client = Client {
            addr: server.local_addr(),
            auth: Some(GUEST.to_string()),
        };
        TestServer {
            broker,
            server,
            client,
            _dir: dir,
        }
    }
}

/// An HTTP client of the server, with the `Authorization` it sends.
#[derive(Clone)]
pub(crate) struct Client {
    pub(crate) addr: SocketAddr,
    pub(crate) auth: Option<String>,
}

/// A response, read whole.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Reply {
    /// The body as JSON (panics, naming the body, if it is not).
    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The `error` code of a JSON error body.
    pub(crate) fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Asserts the status, showing the body if it differs.
    #[track_caller]
    pub(crate) fn expect(&self, status: u16) -> &Reply {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected status; body: {}",
            String::from_utf8_lossy(&self.body)
        );
        self
    }
}

impl Client {
    /// The same client with other credentials (None: none at all).
    pub(crate) fn with_auth(&self, auth: Option<&str>) -> Client {
        Client {
            addr: self.addr,
            auth: auth.map(str::to_string),
        }
    }

    /// Sends a request with a raw body.
    pub(crate) async fn raw(&self, method: &str, path: &str, body: Option<&[u8]>) -> Reply {
        self.raw_with(method, path, body, &[]).await
    }

    /// Sends a request with a raw body and extra headers.
    pub(crate) async fn raw_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut request = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap())
            .uri(path)
            .header("host", self.addr.to_string());
        if let Some(auth) = &self.auth {
            request = request.header(AUTHORIZATION, auth);
        }
        if body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::copy_from_slice(body.unwrap_or_default())))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    pub(crate) async fn get(&self, path: &str) -> Reply {
        self.raw("GET", path, None).await
    }

    pub(crate) async fn delete(&self, path: &str) -> Reply {
        self.raw("DELETE", path, None).await
    }

    pub(crate) async fn put(&self, path: &str, body: Value) -> Reply {
        self.raw("PUT", path, Some(body.to_string().as_bytes()))
            .await
    }

    pub(crate) async fn post(&self, path: &str, body: Value) -> Reply {
        self.raw("POST", path, Some(body.to_string().as_bytes()))
            .await
    }
}
