//! Feeds arbitrary bytes to Tern's AMQP connection handling: the frame and
//! content decoder, the handshake, and the channel state machine, against
//! an embedded broker in this process. The server must never panic
//! (libfuzzer-sys turns a panic on any thread into an abort, which the
//! fuzzer reports as a crash) and must end the connection once the client
//! has stopped sending.
//!
//! The first input byte chooses the start: even, the rest follows a valid
//! handshake (protocol header, PLAIN login as guest, tune-ok, open of `/`,
//! channel 1 open), so that mutations reach the channel methods; odd, the
//! rest is all the server gets.

#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use amq_protocol::frame::{gen_frame, AMQPFrame, WriteContext};
use amq_protocol::protocol::{channel, connection, AMQPClass};
use amq_protocol::types::{FieldTable, LongString, ShortString};
use libfuzzer_sys::fuzz_target;
use tern_amqp::AmqpServer;
use tern_broker::{Broker, BrokerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one input may keep the connection busy after it has sent
/// everything. The server answers EOF by ending the connection at once, so
/// reaching this is itself a finding (a connection that does not end).
const END_TIMEOUT: Duration = Duration::from_secs(10);

struct Harness {
    runtime: tokio::runtime::Runtime,
    addr: SocketAddr,
    handshake: Vec<u8>,
    _server: AmqpServer,
    _dir: tempfile::TempDir,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let dir = tempfile::tempdir().expect("temporary data directory");
        let server = runtime.block_on(async {
            let broker = Broker::open(BrokerConfig::new(dir.path())).expect("broker opens");
            AmqpServer::bind("127.0.0.1:0".parse().expect("address"), broker)
                .await
                .expect("server binds")
        });
        Harness {
            addr: server.local_addr(),
            runtime,
            handshake: handshake(),
            _server: server,
            _dir: dir,
        }
    })
}

/// The client's side of a successful handshake, up to an open channel 1.
fn handshake() -> Vec<u8> {
    let frames = [
        AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: FieldTable::default(),
                mechanism: ShortString::from("PLAIN"),
                response: LongString::from(&b"\0guest\0guest"[..]),
                locale: ShortString::from("en_US"),
            })),
        ),
        AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 16,
                frame_max: 131_072,
                heartbeat: 0,
            })),
        ),
        AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: ShortString::from("/"),
            })),
        ),
        AMQPFrame::Method(
            1,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        ),
    ];
    let mut out = b"AMQP\x00\x00\x09\x01".to_vec();
    for frame in &frames {
        let ctx = gen_frame(frame)(WriteContext::from(out)).expect("frame serialises");
        out = ctx.write;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let h = harness();
    let mut input = Vec::with_capacity(h.handshake.len() + rest.len());
    if mode % 2 == 0 {
        input.extend_from_slice(&h.handshake);
    }
    input.extend_from_slice(rest);
    h.runtime.block_on(async {
        let Ok(stream) = TcpStream::connect(h.addr).await else {
            return;
        };
        let (mut read, mut write) = stream.into_split();
        let send = async {
            // The server may close first (on a protocol error): that is fine.
            let _ = write.write_all(&input).await;
            let _ = write.shutdown().await;
        };
        let drain = async {
            let mut sink = Vec::new();
            tokio::time::timeout(END_TIMEOUT, read.read_to_end(&mut sink)).await
        };
        let ((), ended) = tokio::join!(send, drain);
        assert!(
            ended.is_ok(),
            "the connection did not end within {END_TIMEOUT:?} of EOF"
        );
    });
});
