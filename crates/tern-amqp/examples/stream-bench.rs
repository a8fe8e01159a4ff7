//! Stream throughput in one run: a Tern stream over AMQP 0-9-1, a RabbitMQ
//! stream queue over AMQP 0-9-1, and a NATS JetStream file-storage stream.
//!
//! ```sh
//! export CARGO_TARGET_DIR=$HOME/.cache/tern-target
//! cargo run --release -p tern-amqp --example stream-bench -- \
//!     [--messages N] [--runs R] [--publishers K] [--raw-publisher] \
//!     [--rabbitmq-url URL] [--nats-url URL] [--only tern,rabbitmq,jetstream]
//! ```
//!
//! Tern runs in this process (a `Broker` on a fresh data directory under
//! the workspace's `target/`, an `AmqpServer` on `127.0.0.1:0`, on their own
//! two-thread runtime). RabbitMQ is at `--rabbitmq-url` (default
//! `TERN_TEST_RABBITMQ_URL`, else `amqp://guest:guest@127.0.0.1:5672/%2f`),
//! NATS at `--nats-url` (default `TERN_TEST_NATS_URL`, else
//! `nats://127.0.0.1:4222`); one that cannot be reached is skipped with a
//! printed line.
//!
//! The same workload on each, per run, each on a fresh stream deleted
//! afterwards:
//!
//! - **publish**: N messages (100,000 by default) of 1 KiB from one
//!   publisher, with at most 1,000 unconfirmed at a time (AMQP publisher
//!   confirms; JetStream publish acks). Timed from the first publish to the
//!   last confirm. `--publishers K` splits the messages and the window
//!   over K publishers, each on its own connection (on every target).
//!   `--raw-publisher` replaces lapin on the AMQP publishing side by a
//!   publisher that encodes the frames itself and writes up to 64
//!   publishes per write (and whatever it has when the window is full),
//!   as async-nats buffers its publishes: lapin writes and wakes once per
//!   message, which limits its publishing rate on this machine well
//!   before either broker does.
//! - **consume**: one consumer reads the N messages from the start of the
//!   stream with at most 1,000 unacked (AMQP `basic.qos` 1,000 and
//!   `x-stream-offset: first`; a JetStream pull consumer with
//!   `max_ack_pending` 1,000 and batches of 1,000), acking every 100th
//!   (AMQP `multiple`; JetStream `AckPolicy::All`). Timed from the consume
//!   request to the N-th message. Each message's place in its publisher's
//!   sequence is checked.
//!
//! Durability differs, and the bench cannot make it equal: Tern confirms a
//! publish only after an fdatasync covers it (group commit); RabbitMQ
//! streams confirm once written to the file system, without fsync (they
//! rely on replication); JetStream acks once written and fsyncs every two
//! minutes by default (`sync_interval`, not settable on 2.9). So Tern does
//! the most work per confirm.
//!
//! With `--runs R` (default 3) the targets take turns R times and the
//! median of each figure is reported, with the ratios Tern/JetStream and
//! Tern/RabbitMQ.

use std::collections::VecDeque;
use std::error::Error;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use bytes::Bytes;
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use tern_amqp::AmqpServer;
use tern_broker::{Broker, BrokerConfig};
use tokio::sync::{mpsc, Semaphore};

type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

const BODY_SIZE: usize = 1024;
/// Unconfirmed publishes in flight, and unacked deliveries, at most.
const WINDOW: usize = 1000;
const ACK_EVERY: u64 = 100;
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Tern,
    RabbitMq,
    JetStream,
}

impl Target {
    fn label(self) -> &'static str {
        match self {
            Target::Tern => "tern",
            Target::RabbitMq => "rabbitmq",
            Target::JetStream => "jetstream",
        }
    }
}

struct Args {
    messages: u64,
    runs: usize,
    publishers: usize,
    raw_publisher: bool,
    rabbitmq_url: String,
    nats_url: String,
    only: Vec<Target>,
}

fn parse_args() -> Res<Args> {
    let env_or = |var: &str, default: &str| {
        std::env::var(var)
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| default.to_string())
    };
    let mut args = Args {
        messages: 100_000,
        runs: 3,
        publishers: 1,
        raw_publisher: false,
        rabbitmq_url: env_or(
            "TERN_TEST_RABBITMQ_URL",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
        ),
        nats_url: env_or("TERN_TEST_NATS_URL", "nats://127.0.0.1:4222"),
        only: vec![Target::Tern, Target::RabbitMq, Target::JetStream],
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--messages" => args.messages = value()?.parse()?,
            "--runs" => args.runs = value()?.parse::<usize>()?.max(1),
            "--publishers" => args.publishers = value()?.parse::<usize>()?.clamp(1, WINDOW),
            "--raw-publisher" => args.raw_publisher = true,
            "--rabbitmq-url" => args.rabbitmq_url = value()?,
            "--nats-url" => args.nats_url = value()?,
            "--only" => {
                args.only = value()?
                    .split(',')
                    .map(|t| match t {
                        "tern" => Ok(Target::Tern),
                        "rabbitmq" => Ok(Target::RabbitMq),
                        "jetstream" => Ok(Target::JetStream),
                        other => Err(format!("unknown target {other:?}")),
                    })
                    .collect::<Result<_, _>>()?;
            }
            "-h" | "--help" => {
                println!(
                    "usage: stream-bench [--messages N] [--runs R] [--publishers K] \
                     [--raw-publisher] [--rabbitmq-url URL] [--nats-url URL] \
                     [--only tern,rabbitmq,jetstream]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    Ok(args)
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// A body numbered by its publisher and its place in that publisher's sequence.
fn body(publisher: usize, seq: u64) -> Vec<u8> {
    let mut b = vec![b'x'; BODY_SIZE];
    b[..8].copy_from_slice(&seq.to_le_bytes());
    b[8..16].copy_from_slice(&(publisher as u64).to_le_bytes());
    b
}

/// Checks that each publisher's messages arrive complete and in order.
struct Order {
    next: Vec<u64>,
}

impl Order {
    fn new(publishers: usize) -> Order {
        Order {
            next: vec![0; publishers],
        }
    }

    fn check(&mut self, data: &[u8]) -> Res<()> {
        let field = |r: std::ops::Range<usize>| -> Option<u64> {
            Some(u64::from_le_bytes(data.get(r)?.try_into().ok()?))
        };
        let (seq, publisher) = (field(0..8), field(8..16));
        let expected = publisher
            .and_then(|p| usize::try_from(p).ok())
            .and_then(|p| self.next.get_mut(p));
        match (expected, seq) {
            (Some(next), Some(seq)) if *next == seq => {
                *next += 1;
                Ok(())
            }
            _ => Err(format!("out of order: publisher {publisher:?} message {seq:?}").into()),
        }
    }
}

/// Splits `count` messages and the window over `publishers`.
fn shares(count: u64, publishers: usize) -> Vec<(usize, u64, usize)> {
    let k = publishers as u64;
    (0..publishers)
        .map(|p| {
            let n = count / k + u64::from((p as u64) < count % k);
            (p, n, (WINDOW / publishers).max(1))
        })
        .collect()
}

/// The in-process Tern, on its own runtime and threads.
struct Tern {
    url: String,
    broker: Broker,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Res<()>>>,
    _dir: tempfile::TempDir,
}

impl Tern {
    fn start() -> Res<Tern> {
        let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target");
        std::fs::create_dir_all(&target)?;
        let dir = tempfile::Builder::new()
            .prefix("stream-bench-")
            .tempdir_in(target)?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(String, Broker), String>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let data_dir = dir.path().to_path_buf();
        let thread =
            std::thread::Builder::new()
                .name("tern-main".into())
                .spawn(move || -> Res<()> {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .thread_name("tern-server")
                        .enable_all()
                        .build()?;
                    rt.block_on(async move {
                        let started = async {
                            let broker = Broker::open(BrokerConfig::new(&data_dir))?;
                            let server =
                                AmqpServer::bind("127.0.0.1:0".parse()?, broker.clone()).await?;
                            Ok::<_, Box<dyn Error + Send + Sync>>((broker, server))
                        }
                        .await;
                        let (broker, server) = match started {
                            Ok(v) => v,
                            Err(e) => {
                                let _ = ready_tx.send(Err(e.to_string()));
                                return Err(e);
                            }
                        };
                        let url = format!(
                            "amqp://guest:guest@127.0.0.1:{}/%2f",
                            server.local_addr().port()
                        );
                        let _ = ready_tx.send(Ok((url, broker.clone())));
                        let _ = stop_rx.await;
                        server.shutdown().await;
                        broker.close()?;
                        Ok(())
                    })
                })?;
        let (url, broker) = ready_rx.recv()??;
        Ok(Tern {
            url,
            broker,
            stop: Some(stop_tx),
            thread: Some(thread),
            _dir: dir,
        })
    }

    fn fsyncs(&self) -> u64 {
        self.broker.journal_stats().map_or(0, |s| s.commits)
    }

    fn stop(mut self) -> Res<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().map_err(|_| "the Tern thread panicked")??;
        }
        Ok(())
    }
}

// --------------------------------------------------------------- AMQP side

async fn amqp_connect(url: &str) -> Res<Connection> {
    Ok(tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .map_err(|_| format!("connecting to {url} timed out"))??)
}

async fn declare_amqp_stream(conn: &Connection, queue: &str) -> Res<()> {
    let ch = conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("stream")),
    );
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await?;
    ch.close(200, "declared".into()).await?;
    Ok(())
}

async fn delete_amqp_stream(url: &str, queue: &str) -> Res<()> {
    let conn = amqp_connect(url).await?;
    let ch = conn.create_channel().await?;
    ch.queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    conn.close(200, "deleted".into()).await?;
    Ok(())
}

/// Publishes with `publishers` connections, each its share of `count`
/// persistent messages with confirms and its share of the window; returns
/// the time from the start to the last confirm.
async fn amqp_publish(
    url: &str,
    queue: &str,
    count: u64,
    publishers: usize,
    raw: bool,
) -> Res<Duration> {
    if raw {
        return raw::publish(url, queue, count, publishers).await;
    }
    let mut channels = Vec::new();
    for _ in 0..publishers {
        let conn = amqp_connect(url).await?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        channels.push((conn, ch));
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for ((conn, ch), (p, n, window)) in channels.into_iter().zip(shares(count, publishers)) {
        let queue = queue.to_string();
        tasks.push(tokio::spawn(async move {
            let end = amqp_publisher(&ch, &queue, p, n, window).await?;
            conn.close(200, "published".into()).await?;
            Ok::<_, Box<dyn Error + Send + Sync>>(end)
        }));
    }
    let mut last = start;
    for t in tasks {
        last = last.max(t.await??);
    }
    Ok(last - start)
}

/// One publisher: `count` messages, at most `window` unconfirmed; returns
/// when the last confirm came.
async fn amqp_publisher(
    ch: &lapin::Channel,
    queue: &str,
    publisher: usize,
    count: u64,
    window: usize,
) -> Res<Instant> {
    let window = Arc::new(Semaphore::new(window));
    let (tx, mut rx) =
        mpsc::unbounded_channel::<(lapin::PublisherConfirm, tokio::sync::OwnedSemaphorePermit)>();
    let waiter = tokio::spawn(async move {
        let mut nacks = 0u64;
        while let Some((confirm, permit)) = rx.recv().await {
            if !matches!(confirm.await?, Confirmation::Ack(_)) {
                nacks += 1;
            }
            drop(permit);
        }
        Ok::<_, lapin::Error>(nacks)
    });
    let props = BasicProperties::default().with_delivery_mode(2);
    for seq in 0..count {
        let permit = window.clone().acquire_owned().await?;
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body(publisher, seq),
                props.clone(),
            )
            .await?;
        tx.send((confirm, permit))
            .map_err(|_| "the confirm waiter stopped")?;
    }
    drop(tx);
    let nacks = waiter.await??;
    let end = Instant::now();
    if nacks > 0 {
        return Err(format!("{nacks} publishes were nacked").into());
    }
    Ok(end)
}

/// Reads `count` messages from the start of the stream with prefetch
/// `WINDOW`, acking every `ACK_EVERY`-th with `multiple`.
async fn amqp_consume(url: &str, queue: &str, count: u64, publishers: usize) -> Res<Duration> {
    let conn = amqp_connect(url).await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(WINDOW as u16, BasicQosOptions::default())
        .await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString(LongString::from("first")),
    );
    let start = Instant::now();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "stream-bench".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await?;
    let mut order = Order::new(publishers);
    let mut seen = 0u64;
    while seen < count {
        let d = consumer.next().await.ok_or("the consumer ended")??;
        order.check(&d.data)?;
        seen += 1;
        if seen.is_multiple_of(ACK_EVERY) || seen == count {
            d.acker.ack(BasicAckOptions { multiple: true }).await?;
        }
    }
    let took = start.elapsed();
    conn.close(200, "consumed".into()).await?;
    Ok(took)
}

// ------------------------------------------- a raw, batching AMQP publisher

/// A publisher that writes AMQP frames itself, many publishes per write
/// (as async-nats does on the JetStream side), to measure the broker
/// rather than lapin's one write and one wake-up per message.
mod raw {
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use amq_protocol::frame::{gen_frame, parse_frame, AMQPContentHeader, AMQPFrame, WriteContext};
    use amq_protocol::protocol::{basic, channel, confirm, connection, AMQPClass, BasicProperties};
    use amq_protocol::types::{FieldTable, LongString};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
    use tokio::net::TcpStream;
    use tokio::sync::Semaphore;

    use super::{body, shares, Res};

    /// Publishes written per `write` at most.
    const BATCH: usize = 64;

    struct Reader {
        rd: OwnedReadHalf,
        buf: Vec<u8>,
    }

    impl Reader {
        async fn method(&mut self) -> Res<(u16, AMQPClass)> {
            loop {
                match parse_frame(&self.buf[..]) {
                    Ok((rest, frame)) => {
                        let used = self.buf.len() - rest.len();
                        self.buf.drain(..used);
                        match frame {
                            AMQPFrame::Method(ch, m) => return Ok((ch, m)),
                            AMQPFrame::Heartbeat => continue,
                            other => return Err(format!("unexpected frame {other:?}").into()),
                        }
                    }
                    Err(e) if e.is_incomplete() => {}
                    Err(e) => return Err(format!("bad frame from the broker: {e:?}").into()),
                }
                let mut chunk = [0u8; 16384];
                let n = self.rd.read(&mut chunk).await?;
                if n == 0 {
                    return Err("the broker closed the connection".into());
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }
    }

    fn encode(buf: &mut Vec<u8>, frame: &AMQPFrame) -> Res<()> {
        let ctx = gen_frame(frame)(WriteContext::from(std::mem::take(buf)))
            .map_err(|e| format!("encoding a frame: {e:?}"))?;
        *buf = ctx.write;
        Ok(())
    }

    async fn send(wr: &mut OwnedWriteHalf, channel: u16, method: AMQPClass) -> Res<()> {
        let mut buf = Vec::new();
        encode(&mut buf, &AMQPFrame::Method(channel, method))?;
        wr.write_all(&buf).await?;
        Ok(())
    }

    /// `amqp://user:password@host:port/vhost` (the vhost percent-decoded
    /// for `%2f` only, which is all the bench needs).
    fn parse(url: &str) -> Res<(String, String, String, String)> {
        let rest = url.strip_prefix("amqp://").ok_or("an amqp:// URL")?;
        let (creds, rest) = rest.split_once('@').ok_or("user:password@ in the URL")?;
        let (user, password) = creds.split_once(':').unwrap_or((creds, ""));
        let (host_port, vhost) = rest.split_once('/').unwrap_or((rest, "%2f"));
        let vhost = if vhost.is_empty() { "%2f" } else { vhost };
        Ok((
            host_port.to_string(),
            user.to_string(),
            password.to_string(),
            vhost.replace("%2f", "/").replace("%2F", "/"),
        ))
    }

    /// Opens a connection and channel 1 in confirm mode.
    async fn open(url: &str) -> Res<(Reader, OwnedWriteHalf)> {
        let (host_port, user, password, vhost) = parse(url)?;
        let stream = TcpStream::connect(&host_port).await?;
        stream.set_nodelay(true)?;
        let (rd, mut wr) = stream.into_split();
        let mut rd = Reader {
            rd,
            buf: Vec::new(),
        };
        wr.write_all(b"AMQP\x00\x00\x09\x01").await?;
        match rd.method().await? {
            (0, AMQPClass::Connection(connection::AMQPMethod::Start(_))) => {}
            other => return Err(format!("expected connection.start, got {other:?}").into()),
        }
        let response = format!("\0{user}\0{password}");
        let start_ok = connection::StartOk {
            client_properties: FieldTable::default(),
            mechanism: "PLAIN".into(),
            response: LongString::from(response.as_bytes()),
            locale: "en_US".into(),
        };
        send(
            &mut wr,
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(start_ok)),
        )
        .await?;
        let tune = match rd.method().await? {
            (0, AMQPClass::Connection(connection::AMQPMethod::Tune(t))) => t,
            other => return Err(format!("expected connection.tune, got {other:?}").into()),
        };
        let tune_ok = connection::TuneOk {
            channel_max: tune.channel_max,
            frame_max: tune.frame_max,
            heartbeat: 0,
        };
        send(
            &mut wr,
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(tune_ok)),
        )
        .await?;
        let open = connection::Open {
            virtual_host: vhost.as_str().into(),
        };
        send(
            &mut wr,
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(open)),
        )
        .await?;
        match rd.method().await? {
            (0, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))) => {}
            other => return Err(format!("expected connection.open-ok, got {other:?}").into()),
        }
        send(
            &mut wr,
            1,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await?;
        match rd.method().await? {
            (1, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))) => {}
            other => return Err(format!("expected channel.open-ok, got {other:?}").into()),
        }
        let select = confirm::Select { nowait: false };
        send(
            &mut wr,
            1,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(select)),
        )
        .await?;
        match rd.method().await? {
            (1, AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_))) => {}
            other => return Err(format!("expected confirm.select-ok, got {other:?}").into()),
        }
        Ok((rd, wr))
    }

    /// Counts confirms (single or multiple, in any order) and gives their
    /// window slots back; returns when `count` are confirmed.
    async fn confirms(mut rd: Reader, count: u64, window: Arc<Semaphore>) -> Res<Reader> {
        let (mut upto, mut singles, mut confirmed) = (0u64, BTreeSet::new(), 0u64);
        while confirmed < count {
            let (tag, multiple) = match rd.method().await? {
                (1, AMQPClass::Basic(basic::AMQPMethod::Ack(a))) => (a.delivery_tag, a.multiple),
                (_, AMQPClass::Basic(basic::AMQPMethod::Nack(n))) => {
                    return Err(format!("publish {} nacked", n.delivery_tag).into())
                }
                other => return Err(format!("unexpected {other:?}").into()),
            };
            let mut newly = 0u64;
            if multiple {
                for t in upto + 1..=tag {
                    if !singles.remove(&t) {
                        newly += 1;
                    }
                }
                upto = upto.max(tag);
            } else if tag > upto && singles.insert(tag) {
                newly = 1;
            }
            while singles.remove(&(upto + 1)) {
                upto += 1;
            }
            confirmed += newly;
            window.add_permits(usize::try_from(newly)?);
        }
        Ok(rd)
    }

    /// One publisher: `count` messages with at most `window` unconfirmed,
    /// written up to `BATCH` per write, and more often when the window is
    /// full. Returns when the last confirm came.
    async fn publisher(
        url: String,
        queue: String,
        publisher: usize,
        count: u64,
        window: usize,
        go: Arc<tokio::sync::Barrier>,
    ) -> Res<Instant> {
        let (rd, mut wr) = open(&url).await?;
        let slots = Arc::new(Semaphore::new(window));
        go.wait().await;
        let reader = tokio::spawn(confirms(rd, count, Arc::clone(&slots)));
        let props = BasicProperties::default().with_delivery_mode(2);
        let mut buf = Vec::with_capacity(BATCH * 1200);
        let mut batched = 0;
        for seq in 0..count {
            let permit = match slots.try_acquire() {
                Ok(p) => p,
                Err(_) => {
                    if batched > 0 {
                        wr.write_all(&buf).await?;
                        buf.clear();
                        batched = 0;
                    }
                    slots.acquire().await?
                }
            };
            permit.forget();
            let publish = basic::Publish {
                exchange: "".into(),
                routing_key: queue.as_str().into(),
                mandatory: false,
                immediate: false,
            };
            let data = body(publisher, seq);
            encode(
                &mut buf,
                &AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Publish(publish))),
            )?;
            let header = AMQPContentHeader {
                class_id: 60,
                body_size: data.len() as u64,
                properties: props.clone(),
            };
            encode(&mut buf, &AMQPFrame::Header(1, header))?;
            encode(&mut buf, &AMQPFrame::Body(1, data))?;
            batched += 1;
            if batched >= BATCH {
                wr.write_all(&buf).await?;
                buf.clear();
                batched = 0;
            }
        }
        if batched > 0 {
            wr.write_all(&buf).await?;
        }
        let mut rd = reader.await??;
        let end = Instant::now();
        let close = connection::Close {
            reply_code: 200,
            reply_text: "published".into(),
            class_id: 0,
            method_id: 0,
        };
        send(
            &mut wr,
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(close)),
        )
        .await?;
        let _ = tokio::time::timeout(Duration::from_secs(2), rd.method()).await;
        Ok(end)
    }

    /// As `amqp_publish`, with raw publishers; the clock starts once every
    /// one is connected.
    pub(super) async fn publish(
        url: &str,
        queue: &str,
        count: u64,
        publishers: usize,
    ) -> Res<Duration> {
        let go = Arc::new(tokio::sync::Barrier::new(publishers + 1));
        let mut tasks = Vec::new();
        for (p, n, window) in shares(count, publishers) {
            tasks.push(tokio::spawn(publisher(
                url.to_string(),
                queue.to_string(),
                p,
                n,
                window,
                Arc::clone(&go),
            )));
        }
        go.wait().await;
        let start = Instant::now();
        let mut last = start;
        for t in tasks {
            last = last.max(t.await??);
        }
        Ok(last - start)
    }
}

// ---------------------------------------------------------- JetStream side

/// Publishes with `publishers` connections (as the AMQP side does), each
/// its share of `count` messages and of the window; returns the time from
/// the start to the last ack.
async fn nats_publish(url: &str, subject: &str, count: u64, publishers: usize) -> Res<Duration> {
    let mut contexts = Vec::new();
    for _ in 0..publishers {
        contexts.push(jetstream::new(nats_connect(url).await?));
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (js, (p, n, window)) in contexts.into_iter().zip(shares(count, publishers)) {
        let subject = subject.to_string();
        tasks.push(tokio::spawn(async move {
            nats_publisher(&js, &subject, p, n, window).await
        }));
    }
    let mut last = start;
    for t in tasks {
        last = last.max(t.await??);
    }
    Ok(last - start)
}

async fn nats_connect(url: &str) -> Res<async_nats::Client> {
    Ok(
        tokio::time::timeout(Duration::from_secs(5), async_nats::connect(url))
            .await
            .map_err(|_| format!("connecting to {url} timed out"))??,
    )
}

/// One publisher: `count` messages, at most `window` without their ack;
/// returns when the last ack came.
async fn nats_publisher(
    js: &jetstream::Context,
    subject: &str,
    publisher: usize,
    count: u64,
    window: usize,
) -> Res<Instant> {
    let mut pending = VecDeque::with_capacity(window);
    for seq in 0..count {
        if pending.len() >= window {
            let ack: jetstream::context::PublishAckFuture =
                pending.pop_front().ok_or("no pending publish")?;
            ack.await?;
        }
        pending.push_back(
            js.publish(subject.to_string(), Bytes::from(body(publisher, seq)))
                .await?,
        );
    }
    for ack in pending {
        ack.await?;
    }
    Ok(Instant::now())
}

async fn nats_consume(
    stream: &jetstream::stream::Stream,
    count: u64,
    publishers: usize,
) -> Res<Duration> {
    let start = Instant::now();
    let consumer = stream
        .create_consumer(pull::Config {
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::All,
            max_ack_pending: WINDOW as i64,
            ..pull::Config::default()
        })
        .await?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(WINDOW)
        .messages()
        .await?;
    let mut order = Order::new(publishers);
    let mut seen = 0u64;
    while seen < count {
        let m = messages.next().await.ok_or("the pull consumer ended")??;
        order.check(&m.payload)?;
        seen += 1;
        if seen.is_multiple_of(ACK_EVERY) || seen == count {
            m.ack().await?;
        }
    }
    Ok(start.elapsed())
}

// --------------------------------------------------------------- the runs

#[derive(Debug, Clone, Copy)]
struct Figures {
    publish: Duration,
    consume: Duration,
}

async fn run_amqp(
    url: &str,
    count: u64,
    publishers: usize,
    raw: bool,
    label: &str,
) -> Res<Figures> {
    let queue = format!(
        "stream-bench-{}-{}-{label}",
        std::process::id(),
        unix_nanos()
    );
    let conn = amqp_connect(url).await?;
    declare_amqp_stream(&conn, &queue).await?;
    conn.close(200, "ready".into()).await?;
    let outcome = async {
        let publish = amqp_publish(url, &queue, count, publishers, raw);
        let publish = tokio::time::timeout(PHASE_TIMEOUT, publish)
            .await
            .map_err(|_| "publishing timed out")??;
        let consume = amqp_consume(url, &queue, count, publishers);
        let consume = tokio::time::timeout(PHASE_TIMEOUT, consume)
            .await
            .map_err(|_| "consuming timed out")??;
        Ok::<_, Box<dyn Error + Send + Sync>>(Figures { publish, consume })
    }
    .await;
    delete_amqp_stream(url, &queue).await?;
    outcome
}

async fn run_jetstream(url: &str, count: u64, publishers: usize) -> Res<Figures> {
    let js = jetstream::new(nats_connect(url).await?);
    let name = format!("STREAM_BENCH_{}_{}", std::process::id(), unix_nanos());
    let subject = format!("stream-bench.{name}");
    let stream = js
        .create_stream(StreamConfig {
            name: name.clone(),
            subjects: vec![subject.clone()],
            storage: StorageType::File,
            ..StreamConfig::default()
        })
        .await?;
    let outcome = async {
        let publish = nats_publish(url, &subject, count, publishers);
        let publish = tokio::time::timeout(PHASE_TIMEOUT, publish)
            .await
            .map_err(|_| "publishing timed out")??;
        let consume = nats_consume(&stream, count, publishers);
        let consume = tokio::time::timeout(PHASE_TIMEOUT, consume)
            .await
            .map_err(|_| "consuming timed out")??;
        Ok::<_, Box<dyn Error + Send + Sync>>(Figures { publish, consume })
    }
    .await;
    js.delete_stream(&name).await?;
    outcome
}

fn rate(count: u64, d: Duration) -> f64 {
    count as f64 / d.as_secs_f64().max(1e-9)
}

fn mib_s(count: u64, d: Duration) -> f64 {
    rate(count, d) * BODY_SIZE as f64 / (1024.0 * 1024.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Res<()> {
    let args = parse_args()?;
    let (n, k, raw) = (args.messages, args.publishers, args.raw_publisher);
    println!(
        "stream-bench: {n} messages of {BODY_SIZE} B, {k} publisher(s) sharing a window of \
         {WINDOW}, prefetch {WINDOW}, ack every {ACK_EVERY}, {} run(s) per target, targets in turn; \
         AMQP publisher: {}",
        args.runs,
        if raw { "raw, batched writes" } else { "lapin" }
    );
    let tern = if args.only.contains(&Target::Tern) {
        Some(Tern::start()?)
    } else {
        None
    };
    let mut results: Vec<(Target, Vec<Figures>)> =
        args.only.iter().map(|t| (*t, Vec::new())).collect();
    let mut skipped: Vec<Target> = Vec::new();
    for run in 1..=args.runs {
        for (target, figures) in results.iter_mut() {
            if skipped.contains(target) {
                continue;
            }
            let fsyncs_before = tern.as_ref().map_or(0, Tern::fsyncs);
            let outcome = match target {
                Target::Tern => match &tern {
                    Some(t) => run_amqp(&t.url, n, k, raw, "tern").await,
                    None => continue,
                },
                Target::RabbitMq => run_amqp(&args.rabbitmq_url, n, k, raw, "rabbitmq").await,
                Target::JetStream => run_jetstream(&args.nats_url, n, k).await,
            };
            match outcome {
                Ok(f) => {
                    let extra = match (*target, &tern) {
                        (Target::Tern, Some(t)) => {
                            let fsyncs = t.fsyncs().saturating_sub(fsyncs_before);
                            format!(
                                " ({fsyncs} fsyncs, {:.0} messages per fsync)",
                                n as f64 / fsyncs.max(1) as f64
                            )
                        }
                        _ => String::new(),
                    };
                    println!(
                        "run {run} {:<9} publish {:>9.0} msg/s {:>7.1} MiB/s | consume {:>9.0} msg/s {:>7.1} MiB/s{extra}",
                        target.label(),
                        rate(n, f.publish),
                        mib_s(n, f.publish),
                        rate(n, f.consume),
                        mib_s(n, f.consume),
                    );
                    figures.push(f);
                }
                Err(e) => {
                    println!("{} skipped: {e}", target.label());
                    skipped.push(*target);
                }
            }
        }
    }
    if let Some(t) = tern {
        t.stop()?;
    }

    let med = |target: Target| -> Option<(f64, f64)> {
        let (_, f) = results
            .iter()
            .find(|(t, f)| *t == target && !f.is_empty())?;
        Some((
            median(f.iter().map(|f| rate(n, f.publish)).collect()),
            median(f.iter().map(|f| rate(n, f.consume)).collect()),
        ))
    };
    println!();
    println!("| target | publish msg/s | publish MiB/s | consume msg/s | consume MiB/s |");
    println!("|---|---|---|---|---|");
    for target in [Target::Tern, Target::RabbitMq, Target::JetStream] {
        if let Some((p, c)) = med(target) {
            let mib = BODY_SIZE as f64 / (1024.0 * 1024.0);
            println!(
                "| {} | {p:.0} | {:.1} | {c:.0} | {:.1} |",
                target.label(),
                p * mib,
                c * mib
            );
        }
    }
    if let Some((tp, tc)) = med(Target::Tern) {
        for other in [Target::JetStream, Target::RabbitMq] {
            if let Some((op, oc)) = med(other) {
                println!(
                    "Tern/{}: publish {:.2}x, consume {:.2}x",
                    other.label(),
                    tp / op,
                    tc / oc
                );
            }
        }
    }
    Ok(())
}
