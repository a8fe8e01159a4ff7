//! Side-by-side AMQP benchmark: Tern's AMQP front door against a real
//! RabbitMQ, driven by the same client (lapin) with the same workload.
//!
//! ```sh
//! export CARGO_TARGET_DIR=$HOME/.cache/tern-target
//! cargo run --release -p tern-amqp --example amqp-bench -- [--quick] [--rabbitmq-url URL]
//! ```
//!
//! In one run it starts an in-process Tern (a `Broker` on a fresh data
//! directory under the workspace's `target/`, plus an `AmqpServer` on
//! `127.0.0.1:0`, both on their own tokio runtime whose threads are named
//! `tern-*`) and connects to RabbitMQ at `--rabbitmq-url` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`; skipped with a printed line when
//! it cannot be reached). Against each broker it measures:
//!
//! - **Throughput**, with a fixed message count (100,000; 20,000 with
//!   `--quick`): 1 producer + 1 consumer, then 4 producers + 4 consumers, each
//!   on its own connection. Every run uses a fresh durable queue with a unique
//!   name, deleted afterwards, fed through the default exchange. Messages are
//!   persistent (`delivery_mode` 2) 1 KiB bodies. Producers use publisher
//!   confirms with at most 1,000 unconfirmed publishes in flight each.
//!   Consumers use manual acks with prefetch 1,000 and ack with
//!   `multiple = true` every 100 deliveries. Reported: confirmed msg/s (from
//!   the start signal to the last confirm) and consumed msg/s (to the last
//!   delivery), and the CPU used by broker and client over the run.
//! - **Latency** at a fixed offered rate of 5,000 msg/s for 10 s (3 s with
//!   `--quick`): one producer paced by a 1 ms token bucket, one consumer; the
//!   publish time is in the body, and the p50 / p99 / max publish-to-deliver
//!   latency is taken over the messages after the first 500 ms.
//!
//! It prints a markdown table with the Tern/RabbitMQ ratios at the end.

use std::collections::BTreeMap;
use std::error::Error;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Acker, BasicProperties, Confirmation, Connection, ConnectionProperties};
use tern_amqp::AmqpServer;
use tern_broker::{Broker, BrokerConfig};
use tokio::sync::{mpsc, watch, Semaphore};

type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

const BODY_SIZE: usize = 1024;
const WINDOW: usize = 1000;
const PREFETCH: u16 = 1000;
const ACK_EVERY: u64 = 100;
const LATENCY_RATE: u64 = 5000;
const LATENCY_WARMUP: Duration = Duration::from_millis(500);
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

struct Args {
    quick: bool,
    rabbitmq_url: String,
}

fn parse_args() -> Res<Args> {
    let mut args = Args {
        quick: false,
        rabbitmq_url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_string(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--rabbitmq-url" => {
                args.rabbitmq_url = it.next().ok_or("--rabbitmq-url needs a value")?;
            }
            "-h" | "--help" => {
                println!("usage: amqp-bench [--quick] [--rabbitmq-url URL]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    Ok(args)
}

/// The in-process Tern, on its own runtime and threads.
struct Tern {
    url: String,
    broker: Broker,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Res<()>>>,
    dir: PathBuf,
}

impl Tern {
    fn start() -> Res<Tern> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../target")
            .join(format!(
                "amqp-bench-{}-{}",
                std::process::id(),
                unix_nanos()
            ));
        std::fs::create_dir_all(&dir)?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(String, Broker), String>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let data_dir = dir.clone();
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
                            let addr = "127.0.0.1:0".parse()?;
                            let server = AmqpServer::bind(addr, broker.clone()).await?;
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
            dir,
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
        std::fs::remove_dir_all(&self.dir)?;
        Ok(())
    }
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn queue_name(label: &str) -> String {
    format!("amqp-bench-{}-{}-{label}", std::process::id(), unix_nanos())
}

// ---------------------------------------------------------------- CPU usage

/// CPU ticks used so far: by Tern's threads (named `tern-*`), by the rest of
/// this process (the lapin clients), and by RabbitMQ's `beam.smp`, if any.
#[derive(Clone, Copy, Default)]
struct Cpu {
    tern: u64,
    client: u64,
    beam: u64,
}

fn ticks_of_stat(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    // Fields after comm start at field 3 (state); utime is 14, stime 15.
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

fn find_beam() -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.find_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(pid)
    })
}

fn cpu_now(beam: Option<u32>) -> Cpu {
    let total = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| ticks_of_stat(&s))
        .map_or(0, |(_, t)| t);
    let mut tern = 0;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            if let Some((comm, ticks)) = std::fs::read_to_string(t.path().join("stat"))
                .ok()
                .and_then(|s| ticks_of_stat(&s))
            {
                if comm.starts_with("tern-") {
                    tern += ticks;
                }
            }
        }
    }
    let beam = beam
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .and_then(|s| ticks_of_stat(&s))
        .map_or(0, |(_, t)| t);
    Cpu {
        tern,
        client: total.saturating_sub(tern),
        beam,
    }
}

/// Cores busy between two snapshots: (broker, client).
fn cores(before: Cpu, after: Cpu, secs: f64, is_tern: bool) -> (f64, f64) {
    let hz = 100.0; // USER_HZ on Linux
    let broker = if is_tern {
        after.tern.saturating_sub(before.tern)
    } else {
        after.beam.saturating_sub(before.beam)
    };
    let client = after.client.saturating_sub(before.client);
    (
        broker as f64 / hz / secs.max(1e-9),
        client as f64 / hz / secs.max(1e-9),
    )
}

// ----------------------------------------------------------------- clients

async fn connect(url: &str) -> Res<Connection> {
    let conn = tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .map_err(|_| "connect timed out")??;
    Ok(conn)
}

fn body(seq: u64, sent_nanos: u64) -> Vec<u8> {
    let mut b = vec![b'x'; BODY_SIZE];
    b[..8].copy_from_slice(&seq.to_le_bytes());
    b[8..16].copy_from_slice(&sent_nanos.to_le_bytes());
    b
}

fn sent_nanos_of(data: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(data.get(8..16)?.try_into().ok()?))
}

/// A producer's channel with confirms on, and a window of unconfirmed
/// publishes: a semaphore of `WINDOW` permits, released as confirms arrive.
struct Producer {
    conn: Connection,
    channel: lapin::Channel,
}

impl Producer {
    async fn open(url: &str) -> Res<Producer> {
        let conn = connect(url).await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Producer { conn, channel })
    }

    /// Publishes `count` messages (the next one whenever `pace` allows) and
    /// returns when the last is confirmed.
    async fn run<P>(&self, queue: &str, count: u64, base: Instant, mut pace: P) -> Res<Instant>
    where
        P: AsyncPace,
    {
        let window = Arc::new(Semaphore::new(WINDOW));
        let (tx, mut rx) = mpsc::unbounded_channel::<(
            lapin::PublisherConfirm,
            tokio::sync::OwnedSemaphorePermit,
        )>();
        let waiter = tokio::spawn(async move {
            let mut nacks = 0u64;
            while let Some((confirm, permit)) = rx.recv().await {
                match confirm.await? {
                    Confirmation::Ack(_) => {}
                    _ => nacks += 1,
                }
                drop(permit);
            }
            Ok::<_, lapin::Error>((Instant::now(), nacks))
        });
        let props = BasicProperties::default().with_delivery_mode(2);
        for seq in 0..count {
            pace.wait().await;
            let permit = window.clone().acquire_owned().await?;
            let now = u64::try_from(base.elapsed().as_nanos())?;
            let confirm = self
                .channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    &body(seq, now),
                    props.clone(),
                )
                .await?;
            tx.send((confirm, permit))
                .map_err(|_| "the confirm waiter stopped")?;
        }
        drop(tx);
        let (last, nacks) = waiter.await??;
        if nacks > 0 {
            return Err(format!("{nacks} publishes were nacked").into());
        }
        Ok(last)
    }

    async fn close(self) -> Res<()> {
        self.conn.close(200, "bye".into()).await?;
        Ok(())
    }
}

/// Decides when the next publish may go.
trait AsyncPace {
    async fn wait(&mut self);
}

/// As fast as the window allows.
struct Unpaced;

impl AsyncPace for Unpaced {
    async fn wait(&mut self) {}
}

/// A token bucket refilled every millisecond at `rate` tokens per second.
struct TokenBucket {
    start: Instant,
    rate: u64,
    sent: u64,
    interval: tokio::time::Interval,
}

impl TokenBucket {
    fn new(rate: u64) -> TokenBucket {
        let mut interval = tokio::time::interval(Duration::from_millis(1));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        TokenBucket {
            start: Instant::now(),
            rate,
            sent: 0,
            interval,
        }
    }
}

impl AsyncPace for TokenBucket {
    async fn wait(&mut self) {
        loop {
            let due = (self.start.elapsed().as_secs_f64() * self.rate as f64) as u64;
            if self.sent < due {
                self.sent += 1;
                return;
            }
            self.interval.tick().await;
        }
    }
}

/// A consumer with prefetch `PREFETCH` that acks every `ACK_EVERY`
/// deliveries with `multiple = true`.
struct ConsumerConn {
    conn: Connection,
    consumer: lapin::Consumer,
}

impl ConsumerConn {
    async fn open(url: &str, queue: &str, tag: &str) -> Res<ConsumerConn> {
        let conn = connect(url).await?;
        let channel = conn.create_channel().await?;
        channel
            .basic_qos(PREFETCH, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(ConsumerConn { conn, consumer })
    }

    /// Consumes until `done` turns true, calling `on_delivery` for each
    /// delivery (it returns whether this was the last one wanted overall).
    async fn run(
        &mut self,
        mut done: watch::Receiver<bool>,
        mut on_delivery: impl FnMut(&[u8]) -> bool,
    ) -> Res<()> {
        let mut since_ack = 0u64;
        let mut unacked: Option<Acker> = None;
        let multiple = BasicAckOptions { multiple: true };
        loop {
            let delivery = tokio::select! {
                d = self.consumer.next() => d,
                _ = done.wait_for(|v| *v) => break,
            };
            let delivery = delivery.ok_or("the consumer was cancelled")??;
            let last = on_delivery(&delivery.data);
            since_ack += 1;
            if since_ack >= ACK_EVERY {
                delivery.acker.ack(multiple).await?;
                since_ack = 0;
                unacked = None;
            } else {
                unacked = Some(delivery.acker);
            }
            if last {
                break;
            }
        }
        if let Some(acker) = unacked {
            acker.ack(multiple).await?;
        }
        Ok(())
    }

    async fn close(self) -> Res<()> {
        self.conn.close(200, "bye".into()).await?;
        Ok(())
    }
}

async fn declare(url: &str, queue: &str) -> Res<Connection> {
    let conn = connect(url).await?;
    let ch = conn.create_channel().await?;
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await?;
    Ok(conn)
}

async fn delete(admin: Connection, queue: &str) -> Res<()> {
    let ch = admin.create_channel().await?;
    ch.queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    admin.close(200, "bye".into()).await?;
    Ok(())
}

// --------------------------------------------------------------- scenarios

struct Throughput {
    confirmed_per_s: f64,
    consumed_per_s: f64,
    secs: f64,
    broker_cores: f64,
    client_cores: f64,
    fsyncs_per_s: Option<f64>,
}

async fn throughput(
    broker: &BrokerUnderTest<'_>,
    producers: u64,
    consumers: u64,
    total: u64,
) -> Res<Throughput> {
    let url = broker.url();
    let queue = queue_name(&format!("{producers}p{consumers}c"));
    let admin = declare(url, &queue).await?;

    let consumed = Arc::new(AtomicU64::new(0));
    let last_delivery: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let (done_tx, done_rx) = watch::channel(false);
    let done_tx = Arc::new(done_tx);
    let mut consumer_tasks = Vec::new();
    for i in 0..consumers {
        let mut c = ConsumerConn::open(url, &queue, &format!("bench-{i}")).await?;
        let (consumed, last_delivery, done_tx, done_rx) = (
            consumed.clone(),
            last_delivery.clone(),
            done_tx.clone(),
            done_rx.clone(),
        );
        consumer_tasks.push(tokio::spawn(async move {
            c.run(done_rx, |_| {
                let n = consumed.fetch_add(1, Ordering::Relaxed) + 1;
                if n == total {
                    *last_delivery.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                    let _ = done_tx.send(true);
                }
                n >= total
            })
            .await?;
            c.close().await
        }));
    }
    let mut opened = Vec::new();
    for _ in 0..producers {
        opened.push(Producer::open(url).await?);
    }

    let (go_tx, go_rx) = watch::channel(false);
    let base = Instant::now();
    let mut producer_tasks = Vec::new();
    for p in opened {
        let (queue, mut go_rx) = (queue.clone(), go_rx.clone());
        producer_tasks.push(tokio::spawn(async move {
            go_rx.wait_for(|v| *v).await?;
            let last = p.run(&queue, total / producers, base, Unpaced).await?;
            p.close().await?;
            Ok::<_, Box<dyn Error + Send + Sync>>(last)
        }));
    }
    drop(go_rx);

    let cpu_before = cpu_now(broker.beam());
    let fsyncs_before = broker.fsyncs();
    let start = Instant::now();
    go_tx.send(true)?;
    let mut last_confirm = start;
    for t in producer_tasks {
        last_confirm = last_confirm.max(t.await??);
    }
    for t in consumer_tasks {
        t.await??;
    }
    let end = Instant::now();
    let cpu_after = cpu_now(broker.beam());
    let fsyncs_after = broker.fsyncs();
    delete(admin, &queue).await?;

    let last_delivery = last_delivery
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .ok_or("no last delivery recorded")?;
    let secs = (end - start).as_secs_f64();
    let (broker_cores, client_cores) = cores(cpu_before, cpu_after, secs, broker.is_tern());
    Ok(Throughput {
        confirmed_per_s: total as f64 / (last_confirm - start).as_secs_f64(),
        consumed_per_s: total as f64 / (last_delivery - start).as_secs_f64(),
        secs,
        broker_cores,
        client_cores,
        fsyncs_per_s: fsyncs_before.and_then(|b| Some((fsyncs_after? - b) as f64 / secs)),
    })
}

struct Latency {
    offered_per_s: f64,
    measured: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    broker_cores: f64,
}

async fn latency(broker: &BrokerUnderTest<'_>, duration: Duration) -> Res<Latency> {
    let url = broker.url();
    let queue = queue_name("latency");
    let admin = declare(url, &queue).await?;
    let total = LATENCY_RATE * duration.as_secs();
    let base = Instant::now();
    let warmup_nanos = u64::try_from(LATENCY_WARMUP.as_nanos())?;

    let mut c = ConsumerConn::open(url, &queue, "bench-latency").await?;
    let (_done_tx, done_rx) = watch::channel(false);
    let consumer = tokio::spawn(async move {
        let mut lat_us: Vec<u64> = Vec::with_capacity(usize::try_from(total)?);
        let mut received = 0u64;
        let mut first_sent: Option<u64> = None;
        c.run(done_rx, |data| {
            received += 1;
            if let Some(sent) = sent_nanos_of(data) {
                let first = *first_sent.get_or_insert(sent);
                let now = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
                if sent >= first + warmup_nanos {
                    lat_us.push(now.saturating_sub(sent) / 1000);
                }
            }
            received >= total
        })
        .await?;
        c.close().await?;
        Ok::<_, Box<dyn Error + Send + Sync>>(lat_us)
    });

    let producer = Producer::open(url).await?;
    let cpu_before = cpu_now(broker.beam());
    let start = Instant::now();
    producer
        .run(&queue, total, base, TokenBucket::new(LATENCY_RATE))
        .await?;
    let publish_secs = start.elapsed().as_secs_f64();
    producer.close().await?;
    let mut lat = consumer.await??;
    let secs = start.elapsed().as_secs_f64();
    let cpu_after = cpu_now(broker.beam());
    delete(admin, &queue).await?;

    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat[i.min(lat.len() - 1)] as f64 / 1000.0
    };
    let (broker_cores, _) = cores(cpu_before, cpu_after, secs, broker.is_tern());
    Ok(Latency {
        offered_per_s: total as f64 / publish_secs,
        measured: lat.len(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
        broker_cores,
    })
}

// ------------------------------------------------------------------ driver

enum BrokerUnderTest<'a> {
    Tern(&'a Tern),
    RabbitMq { url: String, beam: Option<u32> },
}

impl BrokerUnderTest<'_> {
    fn name(&self) -> &'static str {
        match self {
            BrokerUnderTest::Tern(_) => "Tern",
            BrokerUnderTest::RabbitMq { .. } => "RabbitMQ",
        }
    }
    fn url(&self) -> &str {
        match self {
            BrokerUnderTest::Tern(t) => &t.url,
            BrokerUnderTest::RabbitMq { url, .. } => url,
        }
    }
    fn is_tern(&self) -> bool {
        matches!(self, BrokerUnderTest::Tern(_))
    }
    fn beam(&self) -> Option<u32> {
        match self {
            BrokerUnderTest::Tern(_) => None,
            BrokerUnderTest::RabbitMq { beam, .. } => *beam,
        }
    }
    fn fsyncs(&self) -> Option<u64> {
        match self {
            BrokerUnderTest::Tern(t) => Some(t.fsyncs()),
            BrokerUnderTest::RabbitMq { .. } => None,
        }
    }
}

async fn timed<T>(what: &str, f: impl Future<Output = Res<T>>) -> Res<T> {
    tokio::time::timeout(RUN_TIMEOUT, f)
        .await
        .map_err(|_| format!("{what} timed out after {RUN_TIMEOUT:?}"))?
}

fn ratio(a: f64, b: f64) -> String {
    format!("{:.2}x", a / b)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Res<()> {
    let args = parse_args()?;
    let total: u64 = if args.quick { 20_000 } else { 100_000 };
    let lat_duration = Duration::from_secs(if args.quick { 3 } else { 10 });

    let tern = Tern::start()?;
    println!("Tern listening at {}", tern.url);
    let mut brokers = vec![BrokerUnderTest::Tern(&tern)];
    match connect(&args.rabbitmq_url).await {
        Ok(conn) => {
            println!("RabbitMQ at {}", args.rabbitmq_url);
            conn.close(200, "bye".into()).await?;
            brokers.push(BrokerUnderTest::RabbitMq {
                url: args.rabbitmq_url.clone(),
                beam: find_beam(),
            });
        }
        Err(e) => println!(
            "skipping RabbitMQ: cannot connect to {}: {e}",
            args.rabbitmq_url
        ),
    }

    let scenarios = [(1u64, 1u64), (4, 4)];
    let mut tp: BTreeMap<(u64, &'static str), Throughput> = BTreeMap::new();
    for &(p, c) in &scenarios {
        for b in &brokers {
            let label = format!("{} {p}p/{c}c", b.name());
            let r = timed(&label, throughput(b, p, c, total)).await?;
            println!(
                "{label}: {total} msgs in {:.2}s; confirmed {:.0} msg/s, consumed {:.0} msg/s; \
                 broker {:.2} cores, client {:.2} cores{}",
                r.secs,
                r.confirmed_per_s,
                r.consumed_per_s,
                r.broker_cores,
                r.client_cores,
                r.fsyncs_per_s
                    .map(|f| format!(", {f:.0} fsyncs/s"))
                    .unwrap_or_default()
            );
            tp.insert((p, b.name()), r);
        }
    }
    let mut lat: BTreeMap<&'static str, Latency> = BTreeMap::new();
    for b in &brokers {
        let label = format!("{} latency", b.name());
        let r = timed(&label, latency(b, lat_duration)).await?;
        println!(
            "{label}: offered {:.0} msg/s, {} measured; p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; broker {:.2} cores",
            r.offered_per_s, r.measured, r.p50_ms, r.p99_ms, r.max_ms, r.broker_cores
        );
        lat.insert(b.name(), r);
    }

    println!();
    println!(
        "| scenario | broker | confirmed msg/s | consumed msg/s | broker CPU cores | client CPU cores |"
    );
    println!("|---|---|---|---|---|---|");
    for &(p, c) in &scenarios {
        for b in &brokers {
            if let Some(r) = tp.get(&(p, b.name())) {
                println!(
                    "| {p} producer(s) + {c} consumer(s), {total} msgs | {} | {:.0} | {:.0} | {:.2} | {:.2} |",
                    b.name(),
                    r.confirmed_per_s,
                    r.consumed_per_s,
                    r.broker_cores,
                    r.client_cores
                );
            }
        }
        if let (Some(t), Some(r)) = (tp.get(&(p, "Tern")), tp.get(&(p, "RabbitMQ"))) {
            println!(
                "| {p} producer(s) + {c} consumer(s) | **Tern / RabbitMQ** | **{}** | **{}** | | |",
                ratio(t.confirmed_per_s, r.confirmed_per_s),
                ratio(t.consumed_per_s, r.consumed_per_s)
            );
        }
    }
    println!();
    println!(
        "| latency at {LATENCY_RATE} msg/s offered, {}s | offered msg/s | measured msgs | p50 ms | p99 ms | max ms | broker CPU cores |",
        lat_duration.as_secs()
    );
    println!("|---|---|---|---|---|---|---|");
    for b in &brokers {
        if let Some(r) = lat.get(b.name()) {
            println!(
                "| {} | {:.0} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
                b.name(),
                r.offered_per_s,
                r.measured,
                r.p50_ms,
                r.p99_ms,
                r.max_ms,
                r.broker_cores
            );
        }
    }
    if let (Some(t), Some(r)) = (lat.get("Tern"), lat.get("RabbitMQ")) {
        println!(
            "| **Tern / RabbitMQ** | | | **{}** | **{}** | **{}** | |",
            ratio(t.p50_ms, r.p50_ms),
            ratio(t.p99_ms, r.p99_ms),
            ratio(t.max_ms, r.max_ms)
        );
    }

    drop(brokers);
    tern.stop()?;
    Ok(())
}
