//! Robustness against hostile byte streams, as a property: whatever a
//! client sends (valid frames in any order, on any channel, mutated,
//! truncated, mixed with garbage, after a valid handshake or not), the
//! server
//!
//! - never panics (a panic hook counts panics on every thread),
//! - answers only with well-formed frames (or its protocol header),
//! - ends the connection once the client stops sending, and
//! - keeps serving a long-lived client on another connection, which does a
//!   confirmed publish and a `basic.get` round trip after every case.
//!
//! Frames are built with `amq-protocol` from a vocabulary covering every
//! class the server implements (connection, channel, exchange, queue, basic,
//! confirm, tx), with small sets of names, tags and channel ids so that
//! cases reach deep states: consumers, unacked deliveries, transactions,
//! direct reply-to, content assembly.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::Duration;

use amq_protocol::frame::{gen_frame, parse_frame, AMQPContentHeader, AMQPFrame, WriteContext};
use amq_protocol::protocol::{
    basic, channel, confirm, connection, exchange, queue, tx, AMQPClass, BasicProperties,
};
use amq_protocol::types::{FieldTable, LongString, ShortString};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::{Confirmation, Connection, ConnectionProperties};
use proptest::prelude::*;
use tern_amqp::AmqpServer;
use tern_broker::{Broker, BrokerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEADER: &[u8] = b"AMQP\x00\x00\x09\x01";
const QUEUES: &[&str] = &[
    "fuzz.q",
    "fuzz.other",
    "",
    "amq.rabbitmq.reply-to",
    "amq.rabbitmq.reply-to.nope",
];
const EXCHANGES: &[&str] = &["", "amq.direct", "amq.fanout", "fuzz.x", "missing"];
const KINDS: &[&str] = &["direct", "fanout", "topic", "headers", "bogus"];
const TAGS: &[&str] = &["", "c1", "c2"];

/// Counts panics on every thread (the server's tasks included).
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    });
}

fn s(v: &str) -> ShortString {
    ShortString::from(v.to_string())
}

/// A method a client may send on an open channel (which may still fail).
fn method() -> impl Strategy<Value = AMQPClass> {
    prop_oneof![60 => channel_method(), 1 => misfit()]
}

/// Methods that end the connection wherever they come (channel.open on
/// an open channel, a publish without its content), or end the channel
/// (close, close-ok) so that what follows on it does.
fn misfit() -> impl Strategy<Value = AMQPClass> {
    prop_oneof![
        Just(AMQPClass::Channel(channel::AMQPMethod::Close(
            channel::Close {
                reply_code: 200,
                reply_text: s("bye"),
                class_id: 0,
                method_id: 0,
            }
        ))),
        Just(AMQPClass::Channel(channel::AMQPMethod::CloseOk(
            channel::CloseOk {}
        ))),
        (
            prop::sample::select(EXCHANGES),
            prop::sample::select(QUEUES),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(x, key, mandatory, immediate)| AMQPClass::Basic(
                basic::AMQPMethod::Publish(basic::Publish {
                    exchange: s(x),
                    routing_key: s(key),
                    mandatory,
                    immediate,
                })
            )),
        Just(AMQPClass::Channel(channel::AMQPMethod::Open(
            channel::Open {}
        ))),
        Just(AMQPClass::Basic(basic::AMQPMethod::GetEmpty(
            basic::GetEmpty {}
        ))),
        Just(AMQPClass::Connection(connection::AMQPMethod::Open(
            connection::Open {
                virtual_host: s("/"),
            }
        ))),
        Just(AMQPClass::Connection(connection::AMQPMethod::Close(
            connection::Close {
                reply_code: 200,
                reply_text: s("bye"),
                class_id: 0,
                method_id: 0,
            }
        ))),
    ]
}

fn channel_method() -> impl Strategy<Value = AMQPClass> {
    let name = || prop::sample::select(QUEUES);
    let exch = || prop::sample::select(EXCHANGES);
    let tag = || 0u64..6;
    prop_oneof![
        3 => any::<bool>().prop_map(|active| AMQPClass::Channel(channel::AMQPMethod::Flow(
            channel::Flow { active }
        ))),
        3 => (exch(), prop::sample::select(KINDS), any::<bool>(), any::<bool>()).prop_map(
            |(x, kind, passive, durable)| AMQPClass::Exchange(exchange::AMQPMethod::Declare(
                exchange::Declare {
                    exchange: s(x),
                    kind: s(kind),
                    passive,
                    durable,
                    auto_delete: false,
                    internal: false,
                    nowait: false,
                    arguments: FieldTable::default(),
                }
            ))
        ),
        3 => (
            name(),
            prop::bool::weighted(0.1),
            any::<bool>(),
            prop::bool::weighted(0.2),
        )
            .prop_map(|(q, passive, durable, exclusive)| AMQPClass::Queue(queue::AMQPMethod::Declare(
                queue::Declare {
                    queue: s(q),
                    passive,
                    durable,
                    exclusive,
                    auto_delete: false,
                    nowait: false,
                    arguments: FieldTable::default(),
                }
            ))
        ),
        3 => (name(), exch()).prop_map(|(q, x)| AMQPClass::Queue(queue::AMQPMethod::Bind(
            queue::Bind {
                queue: s(q),
                exchange: s(x),
                routing_key: s(q),
                nowait: false,
                arguments: FieldTable::default(),
            }
        ))),
        3 => name().prop_map(|q| AMQPClass::Queue(queue::AMQPMethod::Purge(queue::Purge {
            queue: s(q),
            nowait: false,
        }))),
        3 => (name(), any::<bool>()).prop_map(|(q, if_empty)| AMQPClass::Queue(
            queue::AMQPMethod::Delete(queue::Delete {
                queue: s(q),
                if_unused: false,
                if_empty,
                nowait: false,
            })
        )),
        3 => (0u16..3, any::<bool>()).prop_map(|(prefetch_count, global)| AMQPClass::Basic(
            basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count,
                global
            })
        )),
        3 => (name(), prop::sample::select(TAGS), any::<bool>(), any::<bool>()).prop_map(
            |(q, t, no_ack, exclusive)| AMQPClass::Basic(basic::AMQPMethod::Consume(
                basic::Consume {
                    queue: s(q),
                    consumer_tag: s(t),
                    no_local: false,
                    no_ack,
                    exclusive,
                    nowait: false,
                    arguments: FieldTable::default(),
                }
            ))
        ),
        3 => prop::sample::select(TAGS).prop_map(|t| AMQPClass::Basic(basic::AMQPMethod::Cancel(
            basic::Cancel {
                consumer_tag: s(t),
                nowait: false,
            }
        ))),
        3 => (name(), any::<bool>()).prop_map(|(q, no_ack)| AMQPClass::Basic(
            basic::AMQPMethod::Get(basic::Get {
                queue: s(q),
                no_ack
            })
        )),
        3 => (tag(), any::<bool>()).prop_map(|(delivery_tag, multiple)| AMQPClass::Basic(
            basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag,
                multiple
            })
        )),
        3 => (tag(), any::<bool>(), any::<bool>()).prop_map(|(delivery_tag, multiple, requeue)| {
            AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                delivery_tag,
                multiple,
                requeue,
            }))
        }),
        3 => (tag(), any::<bool>()).prop_map(|(delivery_tag, requeue)| AMQPClass::Basic(
            basic::AMQPMethod::Reject(basic::Reject {
                delivery_tag,
                requeue
            })
        )),
        3 => Just(AMQPClass::Basic(basic::AMQPMethod::Recover(basic::Recover {
            requeue: true
        }))),
        3 => Just(AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
            nowait: false
        }))),
        3 => Just(AMQPClass::Tx(tx::AMQPMethod::Select(tx::Select {}))),
        3 => Just(AMQPClass::Tx(tx::AMQPMethod::Commit(tx::Commit {}))),
        3 => Just(AMQPClass::Tx(tx::AMQPMethod::Rollback(tx::Rollback {}))),
    ]
}

/// One frame, as the client means it (before any mutation).
fn frame() -> impl Strategy<Value = AMQPFrame> {
    let ch = || prop_oneof![60 => 1u16..3, 1 => 0u16..6];
    prop_oneof![
        60 => (ch(), method()).prop_map(|(c, m)| AMQPFrame::Method(c, m)),
        1 => (ch(), 0u64..20, prop_oneof![9 => Just(60u16), 1 => 0u16..100]).prop_map(
            |(c, body_size, class_id)| AMQPFrame::Header(
                c,
                AMQPContentHeader {
                    class_id,
                    body_size,
                    properties: BasicProperties::default()
                        .with_reply_to(s("amq.rabbitmq.reply-to"))
                        .with_delivery_mode(2),
                }
            )
        ),
        1 => (ch(), prop::collection::vec(any::<u8>(), 0..12))
            .prop_map(|(c, body)| AMQPFrame::Body(c, body)),
        1 => Just(AMQPFrame::Heartbeat),
    ]
}

/// What is done to a frame's bytes.
#[derive(Debug, Clone)]
enum Mutation {
    None,
    /// XOR one byte (the index wraps around the frame).
    Flip(usize, u8),
    /// Keep only a prefix.
    Truncate(usize),
    /// Overwrite the size field.
    Size(u32),
    /// Overwrite the frame type.
    Type(u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        100 => Just(Mutation::None),
        2 => (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => any::<u32>().prop_map(Mutation::Size),
        1 => any::<u8>().prop_map(Mutation::Type),
    ]
}

#[derive(Debug, Clone)]
enum Piece {
    Frame(Box<AMQPFrame>, Mutation),
    /// A well-formed publish: method, header, body frames (none if empty).
    Message {
        channel: u16,
        publish: basic::Publish,
        reply_to: Option<&'static str>,
        body: Vec<u8>,
    },
    /// `channel.close-ok` then `channel.open`: a fresh channel, whether
    /// the server had closed the old one or not.
    Reopen(u16),
    Garbage(Vec<u8>),
}

fn message() -> impl Strategy<Value = Piece> {
    (
        1u16..3,
        prop::sample::select(EXCHANGES),
        prop::sample::select(QUEUES),
        any::<bool>(),
        prop::option::weighted(0.3, prop::sample::select(QUEUES)),
        prop::collection::vec(any::<u8>(), 0..9000),
    )
        .prop_map(
            |(channel, x, key, mandatory, reply_to, body)| Piece::Message {
                channel,
                publish: basic::Publish {
                    exchange: s(x),
                    routing_key: s(key),
                    mandatory,
                    immediate: false,
                },
                reply_to,
                body,
            },
        )
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        40 => (frame(), mutation()).prop_map(|(f, m)| Piece::Frame(Box::new(f), m)),
        12 => message(),
        4 => (1u16..3).prop_map(Piece::Reopen),
        1 => prop::collection::vec(any::<u8>(), 1..40).prop_map(Piece::Garbage),
    ]
}

fn encode(frame: &AMQPFrame) -> Vec<u8> {
    gen_frame(frame)(WriteContext::from(Vec::new()))
        .unwrap()
        .write
}

fn mutate(mut bytes: Vec<u8>, m: &Mutation) -> Vec<u8> {
    match *m {
        Mutation::None => {}
        Mutation::Flip(i, x) => {
            let len = bytes.len();
            bytes[i % len] ^= x;
        }
        Mutation::Truncate(n) => bytes.truncate(n % bytes.len()),
        Mutation::Size(size) => bytes[3..7].copy_from_slice(&size.to_be_bytes()),
        Mutation::Type(t) => bytes[0] = t,
    }
    bytes
}

/// The client's whole byte stream for a case.
fn stream(handshake: bool, pieces: &[Piece]) -> Vec<u8> {
    let mut out = Vec::new();
    if handshake {
        out.extend_from_slice(HEADER);
        for m in [
            connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: FieldTable::default(),
                mechanism: s("PLAIN"),
                response: LongString::from(&b"\0guest\0guest"[..]),
                locale: s("en_US"),
            }),
            connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 8,
                frame_max: 4096,
                heartbeat: 0,
            }),
            connection::AMQPMethod::Open(connection::Open {
                virtual_host: s("/"),
            }),
        ] {
            out.extend(encode(&AMQPFrame::Method(0, AMQPClass::Connection(m))));
        }
        // Two open channels, so that most methods reach a channel.
        for ch in 1..3 {
            let open = AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}));
            out.extend(encode(&AMQPFrame::Method(ch, open)));
        }
    }
    for p in pieces {
        match p {
            Piece::Frame(f, m) => out.extend(mutate(encode(f), m)),
            Piece::Message {
                channel,
                publish,
                reply_to,
                body,
            } => {
                let method = AMQPClass::Basic(basic::AMQPMethod::Publish(publish.clone()));
                out.extend(encode(&AMQPFrame::Method(*channel, method)));
                let mut properties = BasicProperties::default().with_delivery_mode(2);
                if let Some(r) = reply_to {
                    properties = properties.with_reply_to(s(r));
                }
                let header = AMQPContentHeader {
                    class_id: 60,
                    body_size: body.len() as u64,
                    properties,
                };
                out.extend(encode(&AMQPFrame::Header(*channel, header)));
                // Cut to the negotiated frame-max (4096).
                for chunk in body.chunks(4000) {
                    out.extend(encode(&AMQPFrame::Body(*channel, chunk.to_vec())));
                }
            }
            Piece::Reopen(ch) => {
                let close_ok =
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {}));
                out.extend(encode(&AMQPFrame::Method(*ch, close_ok)));
                let open = AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {}));
                out.extend(encode(&AMQPFrame::Method(*ch, open)));
            }
            Piece::Garbage(g) => out.extend_from_slice(g),
        }
    }
    if handshake {
        let close = connection::AMQPMethod::Close(connection::Close {
            reply_code: 200,
            reply_text: s("done"),
            class_id: 0,
            method_id: 0,
        });
        out.extend(encode(&AMQPFrame::Method(0, AMQPClass::Connection(close))));
    }
    out
}

/// What the server answered, over all cases, by method (and reply code
/// for closes): printed with `TERN_FUZZ_STATS=1`, to see how deep the
/// generated streams get.
static ANSWERS: Mutex<BTreeMap<String, usize>> = Mutex::new(BTreeMap::new());

fn tally(mut answer: &[u8]) {
    let mut answers = ANSWERS.lock().unwrap();
    while let Ok((rest, frame)) = parse_frame(answer) {
        let key = match &frame {
            AMQPFrame::Method(_, AMQPClass::Channel(channel::AMQPMethod::Close(c))) => {
                format!("channel.close {}", c.reply_code)
            }
            AMQPFrame::Method(_, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
                format!("connection.close {}", c.reply_code)
            }
            AMQPFrame::Method(_, m) => {
                format!(
                    "method {}.{}",
                    m.get_amqp_class_id(),
                    m.get_amqp_method_id()
                )
            }
            AMQPFrame::Header(..) => "content header".into(),
            AMQPFrame::Body(..) => "content body".into(),
            _ => "other".into(),
        };
        *answers.entry(key).or_default() += 1;
        answer = rest;
    }
}

/// Checks the server's answer: its protocol header, or well-formed frames.
fn well_formed(mut answer: &[u8]) -> Result<(), String> {
    if answer.starts_with(b"AMQP") {
        return if answer == HEADER {
            Ok(())
        } else {
            Err(format!("a bad protocol header: {answer:?}"))
        };
    }
    while !answer.is_empty() {
        match parse_frame(answer) {
            Ok((rest, _)) => answer = rest,
            Err(e) => return Err(format!("a malformed frame from the server: {e:?}")),
        }
    }
    Ok(())
}

/// Sends the stream, then, unless the server has closed the connection
/// within a moment (the stream ends with `connection.close`, which it
/// answers once its channels have served what they were sent), half-closes;
/// reads the answer until the server closes the connection.
async fn hostile_client(server: &AmqpServer, bytes: Vec<u8>) -> Vec<u8> {
    let stream = TcpStream::connect(server.local_addr()).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let closed = std::sync::Arc::new(tokio::sync::Notify::new());
    let server_closed = closed.clone();
    let writer = tokio::spawn(async move {
        // The server may close first: a failed write is part of the game.
        let _ = write.write_all(&bytes).await;
        // A stream cut inside a frame leaves the server waiting for the rest.
        let _ = tokio::time::timeout(Duration::from_millis(150), server_closed.notified()).await;
        let _ = write.shutdown().await;
        write
    });
    let mut answer = Vec::new();
    let read_all = async {
        let mut chunk = [0u8; 8192];
        loop {
            match read.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&chunk[..n]),
            }
        }
        closed.notify_one();
    };
    tokio::time::timeout(Duration::from_secs(20), read_all)
        .await
        .expect("the server ends the connection within 20 s of the client's last byte");
    drop(writer.await);
    answer
}

/// The long-lived client: a confirmed publish and a get, round trip.
async fn witness_round_trip(ch: &lapin::Channel, round: u64) {
    let body = format!("witness {round}");
    let confirm = ch
        .basic_publish(
            "".into(),
            "fuzz.witness".into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            lapin::BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(confirm, Confirmation::Ack(None));
    let got = ch
        .basic_get("fuzz.witness".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the witness's message is there");
    assert_eq!(got.delivery.data, body.into_bytes());
}

struct World {
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    server: AmqpServer,
    _witness: Connection,
    witness: lapin::Channel,
    rounds: std::cell::Cell<u64>,
}

impl World {
    fn new() -> World {
        count_panics();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (server, conn, ch) = rt.block_on(async {
            let broker = Broker::open(BrokerConfig::new(dir.path())).unwrap();
            let server = AmqpServer::bind("127.0.0.1:0".parse().unwrap(), broker)
                .await
                .unwrap();
            let url = format!("amqp://guest:guest@{}/%2f", server.local_addr());
            let conn = Connection::connect(&url, ConnectionProperties::default())
                .await
                .unwrap();
            let ch = conn.create_channel().await.unwrap();
            ch.queue_declare(
                "fuzz.witness".into(),
                QueueDeclareOptions::default(),
                Default::default(),
            )
            .await
            .unwrap();
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            (server, conn, ch)
        });
        World {
            rt,
            _dir: dir,
            server,
            _witness: conn,
            witness: ch,
            rounds: std::cell::Cell::new(0),
        }
    }

    fn case(&self, handshake: bool, pieces: &[Piece]) -> Result<(), TestCaseError> {
        let bytes = stream(handshake, pieces);
        let answer = self.rt.block_on(hostile_client(&self.server, bytes));
        prop_assert_eq!(PANICS.load(Ordering::SeqCst), 0, "the server panicked");
        well_formed(&answer).map_err(TestCaseError::fail)?;
        tally(&answer);
        let round = self.rounds.get() + 1;
        self.rounds.set(round);
        self.rt
            .block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(10),
                    witness_round_trip(&self.witness, round),
                )
                .await
            })
            .map_err(|_| TestCaseError::fail("the witness client got no answer in 10 s"))?;
        Ok(())
    }
}

#[test]
fn hostile_streams_never_panic_the_server_nor_disturb_other_clients() {
    let world = World::new();
    let config = ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(192),
        max_shrink_iters: 256,
        // Run by hand, not through `proptest!`: no source file to keep
        // regressions beside; a failure prints its minimal input.
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let cases = (
        prop::bool::weighted(0.85),
        prop::collection::vec(piece(), 0..40),
    );
    let outcome = runner.run(&cases, |(handshake, pieces)| world.case(handshake, &pieces));
    if std::env::var_os("TERN_FUZZ_STATS").is_some() {
        for (answer, count) in ANSWERS.lock().unwrap().iter() {
            println!("{count:7}  {answer}");
        }
    }
    if let Err(e) = outcome {
        panic!("{e}");
    }
}
