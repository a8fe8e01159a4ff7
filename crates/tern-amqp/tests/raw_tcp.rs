//! The server against a hand-driven socket: wrong protocol headers, garbage
//! and malformed frames, oversized frames, frames on unopened channels, and
//! heartbeat timeouts. Each must be answered (header or `connection.close`
//! with the right code) and closed without disturbing the server.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

use std::time::Duration;

use amq_protocol::frame::{gen_frame, parse_frame, AMQPContentHeader, AMQPFrame, WriteContext};
use amq_protocol::protocol::{channel, connection, AMQPClass, BasicProperties};
use amq_protocol::types::{FieldTable, LongString};
use tern_amqp::AmqpServer;
use tern_broker::{Broker, BrokerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEADER: &[u8] = b"AMQP\x00\x00\x09\x01";

struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(server: &AmqpServer) -> Raw {
        Raw {
            stream: TcpStream::connect(server.local_addr()).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn send_frame(&mut self, frame: AMQPFrame) {
        let ctx = gen_frame(&frame)(WriteContext::from(Vec::new())).unwrap();
        self.send(&ctx.write).await;
    }

    async fn send_method(&mut self, channel: u16, method: AMQPClass) {
        self.send_frame(AMQPFrame::Method(channel, method)).await;
    }

    /// The next frame, or `None` at EOF.
    async fn frame(&mut self) -> Option<AMQPFrame> {
        loop {
            match parse_frame(&self.buf[..]) {
                Ok((rest, frame)) => {
                    let used = self.buf.len() - rest.len();
                    self.buf.drain(..used);
                    return Some(frame);
                }
                Err(e) => assert!(e.is_incomplete(), "server sent a bad frame: {e:?}"),
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk))
                .await
                .expect("the server answers within 10 s")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next frame that is not a heartbeat.
    async fn method(&mut self) -> Option<(u16, AMQPClass)> {
        loop {
            match self.frame().await? {
                AMQPFrame::Method(ch, m) => return Some((ch, m)),
                AMQPFrame::Heartbeat => continue,
                other => panic!("expected a method, got {other:?}"),
            }
        }
    }

    /// Expects `connection.close` with `code`, answers close-ok, expects EOF.
    async fn expect_close(&mut self, code: u16) {
        match self.method().await {
            Some((0, AMQPClass::Connection(connection::AMQPMethod::Close(c)))) => {
                assert_eq!(c.reply_code, code, "{}", c.reply_text);
            }
            other => panic!("expected connection.close {code}, got {other:?}"),
        }
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
        )
        .await;
        assert_eq!(self.frame().await, None, "the server closes the socket");
    }

    /// Runs the handshake up to `connection.open-ok` with the given heartbeat.
    async fn open(&mut self, heartbeat: u16) {
        self.send(HEADER).await;
        match self.method().await {
            Some((0, AMQPClass::Connection(connection::AMQPMethod::Start(s)))) => {
                assert_eq!((s.version_major, s.version_minor), (0, 9));
                assert!(s.server_properties.contains_key("capabilities"));
            }
            other => panic!("expected connection.start, got {other:?}"),
        }
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: FieldTable::default(),
                mechanism: "PLAIN".into(),
                response: LongString::from(&b"\0guest\0guest"[..]),
                locale: "en_US".into(),
            })),
        )
        .await;
        let tune = match self.method().await {
            Some((0, AMQPClass::Connection(connection::AMQPMethod::Tune(t)))) => t,
            other => panic!("expected connection.tune, got {other:?}"),
        };
        assert_eq!(
            (tune.channel_max, tune.frame_max, tune.heartbeat),
            (2047, 131_072, 60)
        );
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 100,
                frame_max: 8192,
                heartbeat,
            })),
        )
        .await;
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
        )
        .await;
        match self.method().await {
            Some((0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)))) => {}
            other => panic!("expected connection.open-ok, got {other:?}"),
        }
    }

    async fn open_channel(&mut self, id: u16) {
        self.send_method(
            id,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await;
        match self.method().await {
            Some((ch, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)))) if ch == id => {}
            other => panic!("expected channel.open-ok, got {other:?}"),
        }
    }
}

async fn start() -> (tempfile::TempDir, AmqpServer) {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
    let server = AmqpServer::bind("127.0.0.1:0".parse().unwrap(), broker)
        .await
        .unwrap();
    (dir, server)
}

async fn still_serves(server: &AmqpServer) {
    let mut raw = Raw::connect(server).await;
    raw.open(0).await;
    raw.open_channel(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_protocol_header_is_answered_with_ours() {
    let (_dir, server) = start().await;
    for wrong in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"AMQP\x00\x00\x08\x00",
        b"AMQP\x01\x01\x00\x0a",
    ] {
        let mut raw = Raw::connect(&server).await;
        raw.send(wrong).await;
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), raw.stream.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer, HEADER);
    }
    still_serves(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_close_the_connection_with_a_frame_error() {
    let (_dir, server) = start().await;
    // Garbage during the handshake.
    let mut raw = Raw::connect(&server).await;
    raw.send(HEADER).await;
    assert!(matches!(
        raw.method().await,
        Some((0, AMQPClass::Connection(connection::AMQPMethod::Start(_))))
    ));
    raw.send(&[0xff; 32]).await;
    raw.expect_close(501).await;

    // A frame without its frame-end byte.
    let mut raw = Raw::connect(&server).await;
    raw.open(0).await;
    raw.send(&[1, 0, 1, 0, 0, 0, 4, 0, 20, 0, 10, 0x00]).await;
    raw.expect_close(501).await;

    // A method frame whose payload is no known method.
    let mut raw = Raw::connect(&server).await;
    raw.open(0).await;
    raw.send(&[1, 0, 1, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff, 0xce])
        .await;
    raw.expect_close(502).await;

    // A frame larger than the negotiated frame-max (8192), refused from its size alone.
    let mut raw = Raw::connect(&server).await;
    raw.open(0).await;
    raw.send(&[3, 0, 1, 0, 0x10, 0, 0]).await;
    raw.expect_close(501).await;

    still_serves(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_out_of_place_close_the_connection() {
    let (_dir, server) = start().await;
    // A method on a channel that was never opened.
    let mut raw = Raw::connect(&server).await;
    raw.open(0).await;
    raw.send_method(
        5,
        AMQPClass::Channel(channel::AMQPMethod::Flow(channel::Flow { active: true })),
    )
    .await;
    raw.expect_close(504).await;

    // A content header with no basic.publish before it.
    let mut raw = Raw::connect(&server).await;
    raw.open(0).await;
    raw.open_channel(1).await;
    raw.send_frame(AMQPFrame::Header(
        1,
        AMQPContentHeader {
            class_id: 60,
            body_size: 3,
            properties: BasicProperties::default(),
        },
    ))
    .await;
    raw.expect_close(505).await;

    // A server-only method sent by the client.
    let mut raw = Raw::connect(&server).await;
    raw.open(0).await;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
    )
    .await;
    raw.expect_close(503).await;

    // Opening a channel twice.
    let mut raw = Raw::connect(&server).await;
    raw.open(0).await;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
    .await;
    raw.expect_close(504).await;

    still_serves(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_gets_heartbeats_and_is_dropped_after_two_intervals() {
    let (_dir, server) = start().await;
    let mut raw = Raw::connect(&server).await;
    raw.open(1).await;
    let started = std::time::Instant::now();
    let mut heartbeats = 0;
    while let Some(frame) = raw.frame().await {
        assert_eq!(frame, AMQPFrame::Heartbeat);
        heartbeats += 1;
    }
    let elapsed = started.elapsed();
    assert!(heartbeats >= 2, "{heartbeats} heartbeats");
    assert!(
        elapsed >= Duration::from_secs(2) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    still_serves(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_open_connections_with_connection_forced() {
    let (_dir, server) = start().await;
    let mut raw = Raw::connect(&server).await;
    raw.open(0).await;
    let addr = server.local_addr();
    let closing = tokio::spawn(server.shutdown());
    raw.expect_close(320).await;
    closing.await.unwrap();
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_socket_that_sent_nothing() {
    let (_dir, server) = start().await;
    let _silent = TcpStream::connect(server.local_addr()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    tokio::time::timeout(Duration::from_secs(2), server.shutdown())
        .await
        .expect("shutdown well before the 10 s handshake timeout");
}
