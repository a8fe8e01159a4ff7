//! `broker-bench`: in-process publish-to-ack throughput of the broker engine
//! for 1 KiB persistent messages (`delivery_mode` 2) on durable queues, whose
//! message logs use `Durability::Always` (a publish is confirmed once a group
//! commit of the storage journal has fsynced it).
//!
//! ```text
//! cargo run --release -p tern-broker --example broker-bench -- [--quick] [--dir DIR]
//! ```
//!
//! Three scenarios run in one process, one after the other, each on a fresh
//! broker in a fresh directory, three times each (the median repetition by
//! delivery rate is reported, with the range):
//!
//! - **a. one queue**: 4 publisher tasks to one queue through the default
//!   exchange, one consumer; 200,000 messages.
//! - **b. fan-out**: 4 publisher tasks to a fanout exchange bound to 4 queues,
//!   one consumer per queue, each on its own channel; 200,000 messages, so
//!   800,000 deliveries.
//! - **c. 100 queues**: 100 publisher tasks, each to its own queue through the
//!   default exchange, one consumer per queue; 2,000 messages per queue.
//!
//! Each publisher keeps a window of unconfirmed publishes in flight (500 in a
//! and b, 50 in c so that 100 publishers keep 5,000 in flight, not 50,000):
//! every publish spawns a task awaiting `Published::confirmed` (which records
//! the publish-to-confirm latency), and the publisher waits for any one of
//! them once the window is full. Each consumer runs on its own channel with
//! prefetch 1000 and acks with `multiple` every 100 deliveries. Consumers
//! attach before the publishers start.
//!
//! Figures, from the moment the publishers start: messages published and
//! confirmed per second (until the last confirm); deliveries acked per
//! second (until the last consumer's last ack; for the fan-out also per
//! published message); the p50 and p99 publish-to-confirm latency; the peak
//! resident memory (`VmRSS` sampled every 5 ms by a thread, and its rise over
//! the figure just before the broker opened); CPU cores busy (the process's
//! user + system time over wall time); the journal's group commits (one
//! fdatasync each) per second and records per commit, from
//! `Broker::journal_stats`; and the bytes read back (`rchar`) per body byte
//! delivered.
//!
//! Without `--dir` the data goes under the workspace's `target/` (on the real
//! disk; `/tmp` may be a tmpfs, which would make every figure meaningless).
//! Each scenario's directory is removed when it ends. `--quick` shrinks every
//! scenario for a smoke test (one repetition); `--only LETTERS` runs some
//! scenarios (e.g. `--only b`), for profiling. A scenario that makes no
//! progress for 20 s prints the state of its queues and exits with status 2
//! rather than hanging. Results for this machine are in `BENCHMARKS.md`.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_broker::{
    Broker, BrokerConfig, ChannelEvent, ConsumeOptions, ExchangeDeclare, ExchangeKind,
    ExchangeName, FieldTable, JournalStats, Message, Properties, QueueDeclare,
};
use tokio::task::JoinSet;

type BoxResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// Message body size.
const BODY: usize = 1024;
/// Repetitions of each scenario in a full run (the median is reported).
const REPS: usize = 3;
/// Consumer prefetch (per consumer).
const PREFETCH: u16 = 1000;
/// A consumer acks (with `multiple`) every this many deliveries.
const ACK_EVERY: u64 = 100;
/// The fanout exchange of scenario b.
const FANOUT: &str = "bench.fanout";
/// A scenario that makes no progress for this long is reported as stalled.
const STALL: Duration = Duration::from_secs(20);

/// Confirms and deliveries so far, for the stall watchdog.
#[derive(Debug, Default)]
struct Progress {
    confirmed: AtomicU64,
    delivered: AtomicU64,
}

/// One scenario's shape.
#[derive(Debug, Clone)]
struct Scenario {
    name: &'static str,
    queues: usize,
    fanout: bool,
    publishers: usize,
    per_publisher: u64,
    /// Unconfirmed publishes each publisher keeps in flight.
    window: usize,
}

impl Scenario {
    fn published(&self) -> u64 {
        self.publishers as u64 * self.per_publisher
    }

    /// Deliveries each queue will see.
    fn expected(&self, queue: usize) -> u64 {
        if self.fanout {
            return self.published();
        }
        (0..self.publishers)
            .filter(|p| p % self.queues == queue)
            .count() as u64
            * self.per_publisher
    }
}

fn scenarios(quick: bool) -> Vec<Scenario> {
    let (ab, c) = if quick { (5_000, 100) } else { (50_000, 2_000) };
    vec![
        Scenario {
            name: "a. 1 queue, 4 publishers, 1 consumer",
            queues: 1,
            fanout: false,
            publishers: 4,
            per_publisher: ab,
            window: 500,
        },
        Scenario {
            name: "b. fanout to 4 queues, 4 publishers, 4 consumers",
            queues: 4,
            fanout: true,
            publishers: 4,
            per_publisher: ab,
            window: 500,
        },
        Scenario {
            name: "c. 100 queues, 1 publisher and 1 consumer each",
            queues: 100,
            fanout: false,
            publishers: 100,
            per_publisher: c,
            window: 50,
        },
    ]
}

/// What one scenario measured.
#[derive(Debug)]
struct Outcome {
    published: u64,
    confirm_secs: f64,
    delivered: u64,
    ack_secs: f64,
    p50_us: u64,
    p99_us: u64,
    rss_before: u64,
    rss_peak: u64,
    journal: JournalStats,
    /// Bytes the process read through `read`/`pread` (`rchar`), mostly queues
    /// reading their messages back from the page cache to deliver them.
    read_bytes: u64,
    /// CPU time (user + system) of the whole process, in seconds.
    cpu_secs: f64,
}

impl Outcome {
    fn confirm_rate(&self) -> f64 {
        self.published as f64 / self.confirm_secs
    }

    fn delivery_rate(&self) -> f64 {
        self.delivered as f64 / self.ack_secs
    }
}

fn queue_name(i: usize) -> String {
    format!("bench.q{i}")
}

/// The process's resident set size in bytes, from `/proc/self/status`.
fn rss_bytes() -> u64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Bytes read through `read`-family system calls so far (`rchar` in
/// `/proc/self/io`), page-cache hits included.
fn rchar() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("rchar:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system) the process has used, in seconds, from
/// `/proc/self/stat` (in clock ticks of 1/100 s, Linux's `USER_HZ`).
fn cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// Samples `VmRSS` every 5 ms on its own thread until stopped; returns the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl RssSampler {
    fn start() -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_bytes()));
        let thread = {
            let (stop, peak) = (Arc::clone(&stop), Arc::clone(&peak));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    peak.fetch_max(rss_bytes(), Ordering::AcqRel);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        RssSampler { stop, peak, thread }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Release);
        let _ = self.thread.join();
        self.peak.load(Ordering::Acquire).max(rss_bytes())
    }
}

fn message(exchange: &ExchangeName, routing_key: &str, body: &Bytes) -> Message {
    Message {
        exchange: exchange.clone(),
        routing_key: routing_key.to_string(),
        properties: Properties {
            delivery_mode: Some(2),
            ..Properties::default()
        },
        body: body.clone(),
    }
}

/// Publishes `count` messages keeping up to `window` unconfirmed. Returns the
/// publish-to-confirm latencies in microseconds and when the last confirm came.
async fn publisher(
    broker: Broker,
    exchange: ExchangeName,
    routing_key: String,
    routes_to: usize,
    count: u64,
    window: usize,
    progress: Arc<Progress>,
) -> BoxResult<(Vec<u32>, Instant)> {
    let body = Bytes::from(vec![0x5a; BODY]);
    let mut latencies = Vec::with_capacity(count as usize);
    let mut in_flight: JoinSet<BoxResult<u32>> = JoinSet::new();
    for _ in 0..count {
        if in_flight.len() >= window {
            let lat = in_flight.join_next().await.ok_or("window empty")???;
            latencies.push(lat);
        }
        let sent = Instant::now();
        let published = broker.publish("/", message(&exchange, &routing_key, &body))?;
        if published.routed != routes_to {
            return Err(format!("routed to {} queues, not {routes_to}", published.routed).into());
        }
        let progress = Arc::clone(&progress);
        in_flight.spawn(async move {
            published.confirmed().await?;
            progress.confirmed.fetch_add(1, Ordering::Relaxed);
            Ok(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32)
        });
    }
    while let Some(lat) = in_flight.join_next().await {
        latencies.push(lat??);
    }
    Ok((latencies, Instant::now()))
}

/// Consumes `expected` messages from `queue`, acking every [`ACK_EVERY`].
/// Returns when the last ack was made.
async fn consumer(
    broker: Broker,
    queue: String,
    expected: u64,
    progress: Arc<Progress>,
) -> BoxResult<Instant> {
    let mut channel = broker.open_channel("/", broker.new_connection_id())?;
    channel.qos(PREFETCH, false);
    channel.consume(&queue, ConsumeOptions::default())?;
    let mut received = 0u64;
    while received < expected {
        match channel.recv().await {
            Some(ChannelEvent::Delivery(d)) => {
                received += 1;
                progress.delivered.fetch_add(1, Ordering::Relaxed);
                if d.message.body.len() != BODY {
                    return Err("a delivery with the wrong body".into());
                }
                if received.is_multiple_of(ACK_EVERY) || received == expected {
                    channel.ack(d.tag, true)?;
                }
            }
            Some(ChannelEvent::Cancelled { consumer_tag }) => {
                return Err(format!("consumer {consumer_tag} cancelled").into())
            }
            None => return Err("channel closed".into()),
        }
    }
    Ok(Instant::now())
}

/// Exits the process, describing every queue, if the scenario stops making
/// progress: a benchmark that hangs says nothing.
async fn watchdog(broker: Broker, queues: usize, progress: Arc<Progress>) {
    let mut last = (0, 0);
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = (
            progress.confirmed.load(Ordering::Relaxed),
            progress.delivered.load(Ordering::Relaxed),
        );
        if now != last {
            (last, since) = (now, Instant::now());
            continue;
        }
        if since.elapsed() < STALL {
            continue;
        }
        eprintln!(
            "stalled for {:?}: {} confirmed, {} delivered",
            STALL, now.0, now.1
        );
        for q in 0..queues {
            if let Ok(info) = broker.queue_info("/", &queue_name(q)) {
                if info.ready > 0 || info.unacked > 0 {
                    eprintln!("  {info:?}");
                }
            }
        }
        std::process::exit(2);
    }
}

fn percentile(sorted: &[u32], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    u64::from(sorted[i])
}

async fn run(s: &Scenario, dir: &Path) -> BoxResult<Outcome> {
    let rss_before = rss_bytes();
    let sampler = RssSampler::start();
    let broker = Broker::open(BrokerConfig::new(dir))?;
    let owner = broker.new_connection_id();
    for q in 0..s.queues {
        broker
            .declare_queue("/", QueueDeclare::new(queue_name(q)), owner)
            .await?;
    }
    if s.fanout {
        broker
            .declare_exchange("/", ExchangeDeclare::new(FANOUT, ExchangeKind::Fanout))
            .await?;
        for q in 0..s.queues {
            broker
                .bind_queue("/", &queue_name(q), FANOUT, "", &FieldTable::new(), owner)
                .await?;
        }
    }
    let progress = Arc::new(Progress::default());
    let mut consumers = JoinSet::new();
    for q in 0..s.queues {
        consumers.spawn(consumer(
            broker.clone(),
            queue_name(q),
            s.expected(q),
            Arc::clone(&progress),
        ));
    }
    // Let every consumer attach before the clock starts.
    while (0..s.queues).any(|q| {
        broker
            .queue_info("/", &queue_name(q))
            .map_or(true, |i| i.consumers == 0)
    }) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let journal_before = broker.journal_stats().unwrap_or_default();
    let read_before = rchar();
    let cpu_before = cpu_secs();
    let start = Instant::now();
    let mut publishers = JoinSet::new();
    for p in 0..s.publishers {
        let (exchange, key, routes_to) = if s.fanout {
            (ExchangeName::new(FANOUT)?, String::new(), s.queues)
        } else {
            (
                ExchangeName::default_exchange(),
                queue_name(p % s.queues),
                1,
            )
        };
        publishers.spawn(publisher(
            broker.clone(),
            exchange,
            key,
            routes_to,
            s.per_publisher,
            s.window,
            Arc::clone(&progress),
        ));
    }
    let watchdog = tokio::spawn(watchdog(broker.clone(), s.queues, Arc::clone(&progress)));
    let mut latencies = Vec::with_capacity(s.published() as usize);
    let mut confirmed_at = start;
    while let Some(r) = publishers.join_next().await {
        let (lat, at) = r??;
        latencies.extend(lat);
        confirmed_at = confirmed_at.max(at);
    }
    let mut acked_at = start;
    while let Some(r) = consumers.join_next().await {
        acked_at = acked_at.max(r??);
    }
    watchdog.abort();
    let read_bytes = rchar() - read_before;
    let cpu_used = cpu_secs() - cpu_before;
    let journal_after = broker.journal_stats().unwrap_or_default();
    broker.close()?;
    let rss_peak = sampler.finish();
    latencies.sort_unstable();
    Ok(Outcome {
        published: s.published(),
        confirm_secs: (confirmed_at - start).as_secs_f64(),
        delivered: (0..s.queues).map(|q| s.expected(q)).sum(),
        ack_secs: (acked_at - start).as_secs_f64(),
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
        rss_before,
        rss_peak,
        read_bytes,
        cpu_secs: cpu_used,
        journal: JournalStats {
            commits: journal_after.commits - journal_before.commits,
            batches: journal_after.batches - journal_before.batches,
            records: journal_after.records - journal_before.records,
            bytes: journal_after.bytes - journal_before.bytes,
            checkpoints: journal_after.checkpoints - journal_before.checkpoints,
        },
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn ms(us: u64) -> String {
    format!("{:.1}", us as f64 / 1000.0)
}

/// One row per scenario: the median repetition by delivery rate, with the
/// range of every repetition's throughput.
fn table(rows: &[(Scenario, Vec<Outcome>)]) -> String {
    let mut out = String::new();
    out.push_str(
        "| scenario | published | in flight | confirmed msg/s | delivered+acked msg/s | \
         confirm p50 / p99 (ms) | peak RSS MiB (+ over start) | CPU cores busy | \
         fsyncs/s | records/fsync | bytes read / body byte delivered |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (s, reps) in rows {
        let mut order: Vec<&Outcome> = reps.iter().collect();
        order.sort_by(|a, b| a.delivery_rate().total_cmp(&b.delivery_rate()));
        let Some(o) = order.get(order.len() / 2) else {
            continue;
        };
        let range = |f: fn(&Outcome) -> f64, scale: f64| {
            let lo = reps.iter().map(f).fold(f64::INFINITY, f64::min) / scale;
            let hi = reps.iter().map(f).fold(0.0, f64::max) / scale;
            if reps.len() > 1 {
                format!(" ({lo:.0}-{hi:.0})")
            } else {
                String::new()
            }
        };
        let confirmed = format!(
            "{:.0}{}",
            o.confirm_rate(),
            range(Outcome::confirm_rate, 1.0)
        );
        let delivered = if s.fanout {
            let queues = s.queues as f64;
            format!(
                "{:.0}{} deliveries/s = {:.0}{} published msg/s",
                o.delivery_rate(),
                range(Outcome::delivery_rate, 1.0),
                o.delivery_rate() / queues,
                range(Outcome::delivery_rate, queues),
            )
        } else {
            format!(
                "{:.0}{}",
                o.delivery_rate(),
                range(Outcome::delivery_rate, 1.0)
            )
        };
        out.push_str(&format!(
            "| {} | {} | {} × {} | {} | {} | {} / {} | {:.0} (+{:.0}) | {:.2} | {:.0} | {:.0} | {:.1} |\n",
            s.name,
            o.published,
            s.publishers,
            s.window,
            confirmed,
            delivered,
            ms(o.p50_us),
            ms(o.p99_us),
            mib(o.rss_peak),
            mib(o.rss_peak.saturating_sub(o.rss_before)),
            o.cpu_secs / o.ack_secs.max(o.confirm_secs),
            o.journal.commits as f64 / o.confirm_secs,
            o.journal.records as f64 / o.journal.commits.max(1) as f64,
            o.read_bytes as f64 / (o.delivered as f64 * BODY as f64),
        ));
    }
    out
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> BoxResult<()> {
    let mut quick = false;
    let mut only = String::from("abc");
    let mut base: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--dir" => base = Some(args.next().ok_or("--dir needs a directory")?.into()),
            "--only" => only = args.next().ok_or("--only needs letters, e.g. ab")?,
            other => {
                return Err(format!(
                    "unknown argument {other}; usage: [--quick] [--dir DIR] [--only LETTERS]"
                )
                .into())
            }
        }
    }
    let base = base
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
        .join(format!("broker-bench-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    println!(
        "data under {} ({} worker threads){}",
        base.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if quick { ", quick" } else { "" }
    );
    let reps = if quick { 1 } else { REPS };
    let mut rows = Vec::new();
    for (i, s) in scenarios(quick).into_iter().enumerate() {
        if !s.name.get(..1).is_some_and(|letter| only.contains(letter)) {
            continue;
        }
        let mut outcomes = Vec::new();
        for rep in 0..reps {
            let dir = base.join(format!("s{i}-{rep}"));
            let outcome = run(&s, &dir).await;
            std::fs::remove_dir_all(&dir)?;
            let o = outcome?;
            println!(
                "{} #{}: {} published in {:.2}s, {} delivered in {:.2}s; {} fsyncs, \
                 {} records, {:.0} MiB journaled; {:.0} MiB read back; {:.2} CPU-s",
                s.name,
                rep + 1,
                o.published,
                o.confirm_secs,
                o.delivered,
                o.ack_secs,
                o.journal.commits,
                o.journal.records,
                mib(o.journal.bytes),
                mib(o.read_bytes),
                o.cpu_secs,
            );
            outcomes.push(o);
        }
        rows.push((s, outcomes));
    }
    std::fs::remove_dir_all(&base)?;
    println!();
    print!("{}", table(&rows));
    Ok(())
}
