//! `GET /api/events`: Server-Sent Events read over a real socket. A
//! snapshot comes at once and then every second, reflects what changed
//! in between, needs credentials, and the stream ends when the server
//! shuts down.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{TestServer, GUEST};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// An open event stream.
struct Events {
    body: Incoming,
    buffer: String,
}

impl Events {
    async fn open(t: &TestServer, auth: Option<&str>) -> (u16, Option<Events>) {
        let stream = tokio::net::TcpStream::connect(t.server.local_addr())
            .await
            .unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut request = Request::get("/api/events").header("host", "tern");
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let response = sender
            .send_request(request.body(Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        if status != 200 {
            return (status, None);
        }
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        (
            status,
            Some(Events {
                body: response.into_body(),
                buffer: String::new(),
            }),
        )
    }

    /// The next `snapshot` event's data, or None when the stream ended.
    async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let event: String = self.buffer.drain(..end + 2).collect();
                if !event.lines().any(|l| l == "event: snapshot") {
                    continue; // a keep-alive comment
                }
                let data: String = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect();
                return Some(serde_json::from_str(&data).unwrap());
            }
            let frame = tokio::time::timeout(Duration::from_secs(10), self.body.frame())
                .await
                .expect("no event within 10 s");
            match frame {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.push_str(std::str::from_utf8(&data).unwrap());
                    }
                }
                _ => return None,
            }
        }
    }
}

fn ready(snapshot: &Value, queue: &str) -> Option<u64> {
    snapshot["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == queue)
        .map(|q| q["messages_ready"].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_follow_the_broker_and_end_with_the_server() {
    let t = TestServer::start().await;
    assert_eq!(Events::open(&t, None).await.0, 401);
    assert_eq!(
        Events::open(&t, Some("Basic Z3Vlc3Q6d3Jvbmc=")).await.0,
        401
    );

    t.client
        .put("/api/queues/%2F/jobs", json!({}))
        .await
        .expect(201);
    t.client
        .put("/api/queues/%2F/jobs.dlq", json!({}))
        .await
        .expect(201);
    let (_, events) = Events::open(&t, Some(GUEST)).await;
    let mut events = events.unwrap();
    let first = events.next().await.unwrap();
    assert_eq!(first["overview"]["object_totals"]["queues"], 2);
    assert_eq!(ready(&first, "jobs"), Some(0));
    assert_eq!(first["dlqs"][0]["name"], "jobs.dlq");
    assert_eq!(first["redrives"], json!([]));

    for _ in 0..2 {
        t.client
            .post(
                "/api/exchanges/%2F/amq.default/publish",
                json!({"routing_key": "jobs", "payload": "x"}),
            )
            .await
            .expect(200);
    }
    // A later snapshot shows them, without asking again.
    let mut seen = None;
    for _ in 0..5 {
        let s = events.next().await.unwrap();
        if ready(&s, "jobs") == Some(2) {
            seen = Some(s);
            break;
        }
    }
    let seen = seen.expect("no snapshot showed the two messages");
    assert_eq!(seen["overview"]["queue_totals"]["messages_ready"], 2);

    // Shutting down ends the stream rather than waiting on it.
    let TestServer { server, .. } = t;
    let shutdown = tokio::spawn(server.shutdown());
    let mut ended = false;
    for _ in 0..5 {
        if events.next().await.is_none() {
            ended = true;
            break;
        }
    }
    assert!(ended, "the stream outlived the server");
    shutdown.await.unwrap();
}
