//! `delay-bench`: a million pending delayed messages across a restart.
//!
//! ```text
//! cargo run --release -p tern-broker --example delay-bench -- \
//!     [--count N] [--lead-ms MS] [--spread-ms MS] [--sorted] [--dir DIR]
//! ```
//!
//! Publishes `--count` messages (default 1,000,000, 100-byte bodies) to an
//! `x-delayed-message` exchange (`x-delayed-type` direct) bound to one
//! durable queue, each with an `x-delay` that makes it due at a target time
//! between `--lead-ms` (default 30,000) and `--lead-ms + --spread-ms`
//! (default 20,000) after the start. Target times are uniformly random
//! (uncorrelated with publish order, the timer index's worst case) unless
//! `--sorted`, which makes them follow publish order (a fixed backoff's
//! case). Four publishers keep 2,000 publishes each awaiting confirms.
//!
//! Once every publish is confirmed, the broker is closed and reopened (the
//! timer index is rebuilt from disk), and one consumer (prefetch 1000, acks
//! every 100) receives the messages as they fire. Figures: publish rate;
//! reopen time; pending count after reopen; per message, lateness = receipt
//! time minus its due time (p50, p99, p99.9, max, and the share within 100
//! ms), counting only messages due after the reopen finished; messages
//! received out of due order; peak `VmRSS` while publishing and while firing
//! (sampled every 5 ms), against the figure before the broker opened.
//!
//! Without `--dir` the data goes under the workspace's `target/` (a real
//! disk), and is removed at the end.

use std::error::Error;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, BytesMut};
use tern_broker::{
    Broker, BrokerConfig, ChannelEvent, ConsumeOptions, ExchangeDeclare, ExchangeKind,
    ExchangeName, FieldTable, FieldValue, Message, Properties, QueueDeclare,
};

type BoxResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

const EXCHANGE: &str = "bench.delayed";
const QUEUE: &str = "bench.sink";
const BODY: usize = 100;
const PUBLISHERS: u64 = 4;
const WINDOW: usize = 2_000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

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

/// Samples `VmRSS` every 5 ms into a peak until stopped.
struct PeakRss {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakRss {
    fn start() -> PeakRss {
        let peak = Arc::new(AtomicU64::new(rss_bytes()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (Arc::clone(&peak), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_bytes(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        PeakRss {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// xorshift64*, so the bench needs no RNG features.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

struct Args {
    count: u64,
    lead_ms: u64,
    spread_ms: u64,
    sorted: bool,
    dir: Option<PathBuf>,
}

fn parse_args() -> BoxResult<Args> {
    let mut args = Args {
        count: 1_000_000,
        lead_ms: 30_000,
        spread_ms: 20_000,
        sorted: false,
        dir: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--count" => args.count = value()?.parse()?,
            "--lead-ms" => args.lead_ms = value()?.parse()?,
            "--spread-ms" => args.spread_ms = value()?.parse()?,
            "--sorted" => args.sorted = true,
            "--dir" => args.dir = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    Ok(args)
}

async fn declare(broker: &Broker) -> BoxResult<()> {
    let conn = broker.new_connection_id();
    let mut ex = ExchangeDeclare::new(EXCHANGE, ExchangeKind::Direct);
    ex.kind = "x-delayed-message".into();
    ex.arguments
        .insert("x-delayed-type".into(), FieldValue::String("direct".into()));
    broker.declare_exchange("/", ex).await?;
    broker
        .declare_queue("/", QueueDeclare::new(QUEUE), conn)
        .await?;
    broker
        .bind_queue("/", QUEUE, EXCHANGE, "k", &FieldTable::new(), conn)
        .await?;
    Ok(())
}

/// Publishes messages `i` for `i ≡ index (mod PUBLISHERS)`, each due at
/// `dues[i]` (absolute ms). The body carries the clock read before the
/// publish and the delay; `after[i]` gets the clock read after it.
async fn publisher(
    broker: Broker,
    index: u64,
    dues: Arc<Vec<u64>>,
    after: Arc<Vec<AtomicU64>>,
) -> BoxResult<()> {
    let mut in_flight = std::collections::VecDeque::new();
    let mut i = index;
    while let Some(&due) = dues.get(i as usize) {
        // The broker reads its clock between `before` and `after`, so its due
        // time lies in [before + delay, after + delay]; the body carries both
        // bounds, so order is judged without the bench's own scheduling noise.
        let before = now_ms();
        let delay = due.saturating_sub(before).max(1);
        let mut body = BytesMut::with_capacity(BODY);
        body.put_u64_le(before);
        body.put_u64_le(i);
        body.put_u64_le(delay);
        body.resize(BODY, 0);
        let mut headers = FieldTable::new();
        headers.insert("x-delay".into(), FieldValue::I64(delay as i64));
        let message = Message {
            exchange: ExchangeName::new(EXCHANGE)?,
            routing_key: "k".into(),
            properties: Properties {
                delivery_mode: Some(2),
                headers: Some(headers),
                ..Properties::default()
            },
            body: body.freeze(),
        };
        in_flight.push_back(broker.publish("/", message)?.confirmed());
        if let Some(a) = after.get(i as usize) {
            a.store(now_ms(), Ordering::Relaxed);
        }
        if in_flight.len() >= WINDOW {
            if let Some(c) = in_flight.pop_front() {
                c.await?;
            }
        }
        i += PUBLISHERS;
    }
    for c in in_flight {
        c.await?;
    }
    Ok(())
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(at).copied().unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> BoxResult<()> {
    let args = parse_args()?;
    let dir = args.dir.clone().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/delay-bench")
    });
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let rss_before = rss_bytes();

    let start = now_ms();
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut dues: Vec<u64> = (0..args.count)
        .map(|i| {
            let offset = if args.sorted {
                i * args.spread_ms / args.count.max(1)
            } else {
                next_random(&mut seed) % args.spread_ms.max(1)
            };
            start + args.lead_ms + offset
        })
        .collect();
    if args.sorted {
        dues.sort_unstable();
    }
    let dues = Arc::new(dues);
    let after: Arc<Vec<AtomicU64>> = Arc::new((0..args.count).map(|_| AtomicU64::new(0)).collect());
    let memory_of_dues = args.count * (8 + 8 + 1 + 8);

    // Phase 1: publish and confirm.
    let broker = Broker::open(BrokerConfig::new(&dir))?;
    declare(&broker).await?;
    let peak = PeakRss::start();
    let t = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        tasks.push(tokio::spawn(publisher(
            broker.clone(),
            p,
            Arc::clone(&dues),
            Arc::clone(&after),
        )));
    }
    for task in tasks {
        task.await.map_err(|e| e.to_string())??;
    }
    let publish_secs = t.elapsed().as_secs_f64();
    let pending_before = broker.delayed_count();
    let publish_peak = peak.finish();
    println!(
        "published and confirmed {} delayed messages in {:.1} s ({:.0} msg/s); pending {}",
        args.count,
        publish_secs,
        args.count as f64 / publish_secs,
        pending_before
    );

    // Phase 2: restart.
    broker.close()?;
    let t = Instant::now();
    let peak = PeakRss::start();
    let broker = Broker::open(BrokerConfig::new(&dir))?;
    let reopen_secs = t.elapsed().as_secs_f64();
    let reopened_at = now_ms();
    let pending_after = broker.delayed_count();
    println!(
        "reopened in {:.2} s with {} pending (RSS {:.0} MiB)",
        reopen_secs,
        pending_after,
        mib(rss_bytes())
    );
    let first_due = dues.iter().min().copied().unwrap_or(0);
    if reopened_at > first_due {
        println!(
            "warning: the reopen finished {} ms after the first due time; raise --lead-ms",
            reopened_at - first_due
        );
    }

    // Phase 3: fire and consume.
    let conn = broker.new_connection_id();
    let mut ch = broker.open_channel("/", conn)?;
    ch.qos(1000, false);
    ch.consume(QUEUE, ConsumeOptions::default())?;
    let mut lateness: Vec<i64> = Vec::with_capacity(args.count as usize);
    let mut overdue_at_reopen = 0u64;
    let mut out_of_order = 0u64;
    let mut last_due = 0u64;
    let mut received = 0u64;
    let mut seen = vec![false; args.count as usize];
    let mut duplicates = 0u64;
    while received < args.count {
        // Stalled: nothing for 30 s after the next message was due.
        let stall =
            Duration::from_millis(first_due.max(last_due).saturating_sub(now_ms()) + 30_000);
        let event = tokio::time::timeout(stall, ch.recv()).await;
        let Ok(Some(ChannelEvent::Delivery(d))) = event else {
            println!("stalled after {received} messages");
            break;
        };
        let at = now_ms();
        let body = &d.message.body;
        let field = |at: usize| {
            u64::from_le_bytes(
                body.get(at..at + 8)
                    .and_then(|b| b.try_into().ok())
                    .unwrap_or([0; 8]),
            )
        };
        let (before, id, delay) = (field(0), field(8), field(16));
        // The broker's due time lies between these two.
        let due = before + delay;
        let due_hi = after
            .get(id as usize)
            .map_or(due, |a| a.load(Ordering::Relaxed) + delay);
        match seen.get_mut(id as usize) {
            Some(s) if *s => duplicates += 1,
            Some(s) => {
                *s = true;
                received += 1;
            }
            None => {}
        }
        // Out of order only if certainly due before one received earlier.
        if due_hi < last_due {
            out_of_order += 1;
        }
        last_due = last_due.max(due);
        if due <= reopened_at {
            overdue_at_reopen += 1;
        } else {
            lateness.push(at as i64 - due as i64);
        }
        if received.is_multiple_of(100) || received == args.count {
            ch.ack(d.tag, true)?;
        }
    }
    let fire_peak = peak.finish();
    lateness.sort_unstable();
    let within = lateness.iter().filter(|l| **l <= 100).count();
    println!(
        "received {received} ({duplicates} duplicates, {out_of_order} out of due order, \
         {overdue_at_reopen} already due at reopen and not counted below)"
    );
    println!(
        "lateness ms: p50 {} p99 {} p99.9 {} max {} min {}; within 100 ms: {:.2}%",
        percentile(&lateness, 0.5),
        percentile(&lateness, 0.99),
        percentile(&lateness, 0.999),
        lateness.last().copied().unwrap_or(0),
        lateness.first().copied().unwrap_or(0),
        100.0 * within as f64 / lateness.len().max(1) as f64
    );
    println!(
        "peak RSS: {:.0} MiB publishing, {:.0} MiB reopening and firing; {:.0} MiB before \
         the broker opened (the bench's own tables take {:.0} MiB of it)",
        mib(publish_peak),
        mib(fire_peak),
        mib(rss_before),
        mib(memory_of_dues)
    );
    broker.close()?;
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
