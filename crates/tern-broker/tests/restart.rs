//! A broker killed with SIGKILL loses no confirmed message and keeps its
//! definitions.
//!
//! The parent test re-executes this test binary as a child process that
//! opens a broker on a data directory, declares a topic exchange, a durable
//! queue and a binding between them, and then, until it is killed:
//!
//! - publishes messages with unique ids (`<round>-<n>`) through the exchange,
//!   several in flight at once, and prints `CONFIRMED <id>` once a message's
//!   [`Published::confirmed`] resolves;
//! - consumes from the queue (after a random delay, so a backlog builds up)
//!   with a random prefetch, printing `DELIVERED <id>` for each delivery,
//!   `ACKING <id>` before each ack (single or multiple) and `ACKED <id>`
//!   after it returns; now and then it nacks a delivery with requeue, or
//!   holds it unacked for a while. A kill between an ack and its `ACKED` line
//!   leaves the message either way, so only `ACKING` lets it go missing.
//!
//! At a random moment the parent kills the child with SIGKILL, reopens the
//! broker itself on the same directory and checks that
//!
//! - the queue, the exchange and the binding are intact (once the child has
//!   printed `READY`, having declared them): a publish through
//!   the exchange with a matching key reaches the queue, one with a
//!   non-matching key reaches nothing;
//! - every message confirmed and not acked (in this round, or present at the
//!   previous check and not acked since) is in the queue, and no message is
//!   there twice;
//! - no acked message comes back, except one acked in the last moments before
//!   the kill ([`ACK_LOSS_WINDOW`]; acks are fsynced every 50 ms, which
//!   matters for a power cut, while a SIGKILL keeps what reached the page
//!   cache), and those are counted and printed; a message acked and then
//!   found gone at a check never comes back, and a message absent at a check
//!   never appears later;
//! - every message still carries the delivery count it had: at least the
//!   number of `DELIVERED` lines and of the parent's own fetches of it, with
//!   `redelivered` set accordingly.
//!
//! The parent fetches the queue with `get` (without ack) and then closes its
//! channel, so everything stays for the next round's child; then it closes
//! the broker cleanly. The directory is reused for every round, and a small
//! journal checkpoint threshold makes journal rotations frequent.

#![allow(clippy::unwrap_used)] // a test helper that fails should panic

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tern_broker::*;

/// Set in the child's environment: the broker's data directory.
const CHILD_DIR_VAR: &str = "TERN_BROKER_RESTART_DIR";
/// Set in the child's environment: the round, which prefixes message ids.
const CHILD_ROUND_VAR: &str = "TERN_BROKER_RESTART_ROUND";
/// Set in the parent's environment to replay a run's kill delays.
const SEED_VAR: &str = "TERN_BROKER_RESTART_SEED";

const EXCHANGE: &str = "orders";
const QUEUE: &str = "work";
const BINDING: &str = "order.#";
const KEY: &str = "order.new";
const ROUNDS: u64 = 12;
/// How long after its start the child is killed.
const KILL_AFTER_MS: std::ops::Range<u64> = 10..900;
/// A child that lives this long was never killed; it stops on its own.
const CHILD_LIFETIME: Duration = Duration::from_secs(30);
/// An acked message may come back only if its `ACKED` line reached the
/// parent this shortly before the kill: the ack log's 50 ms fsync interval,
/// plus slack for the pipe and the scheduler.
const ACK_LOSS_WINDOW: Duration = Duration::from_millis(300);

fn config(dir: &Path) -> BrokerConfig {
    let mut config = BrokerConfig::new(dir);
    config.store.journal_checkpoint_bytes = 64 * 1024;
    config
}

fn message(key: &str, id: &str) -> Message {
    Message {
        exchange: ExchangeName::new(EXCHANGE).unwrap(),
        routing_key: key.to_string(),
        properties: Properties {
            delivery_mode: Some(2),
            message_id: Some(id.to_string()),
            ..Properties::default()
        },
        body: Bytes::copy_from_slice(id.as_bytes()),
    }
}

fn id_of(message: &Message) -> String {
    String::from_utf8(message.body.to_vec()).unwrap()
}

// ---------------------------------------------------------------------------
// The child: publishes and consumes until it is killed.
// ---------------------------------------------------------------------------

/// Lines to the parent, written and flushed at once.
fn report<'a>(kind: &str, ids: impl IntoIterator<Item = &'a str>) {
    let mut text = String::new();
    for id in ids {
        text.push_str(&format!("{kind} {id}\n"));
    }
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).unwrap();
    out.flush().unwrap();
}

/// The child process's body. Without the environment variable (a normal
/// test run, even with `--ignored`) it does nothing.
#[test]
#[ignore = "run as a child process by confirmed_messages_survive_sigkill"]
fn restart_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR_VAR) else {
        return;
    };
    let round: u64 = std::env::var(CHILD_ROUND_VAR).unwrap().parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let broker = Broker::open(config(Path::new(&dir))).unwrap();
        let conn = broker.new_connection_id();
        broker
            .declare_exchange("/", ExchangeDeclare::new(EXCHANGE, ExchangeKind::Topic))
            .await
            .unwrap();
        broker
            .declare_queue("/", QueueDeclare::new(QUEUE), conn)
            .await
            .unwrap();
        broker
            .bind_queue("/", QUEUE, EXCHANGE, BINDING, &FieldTable::new(), conn)
            .await
            .unwrap();
        report("READY", ["definitions"]);
        let mut rng = SmallRng::seed_from_u64(round);
        let consumer = tokio::spawn(consume(
            broker.clone(),
            conn,
            SmallRng::seed_from_u64(round ^ 0xC0FF_EE00),
        ));
        let deadline = Instant::now() + CHILD_LIFETIME;
        let mut in_flight: VecDeque<(String, Published)> = VecDeque::new();
        let mut n = 0u64;
        while Instant::now() < deadline && !consumer.is_finished() {
            let id = format!("{round}-{n}");
            n += 1;
            let published = broker.publish("/", message(KEY, &id)).unwrap();
            assert_eq!(published.routed, 1, "{id} should reach the queue");
            in_flight.push_back((id, published));
            let limit = rng.gen_range(1..=16);
            while in_flight.len() >= limit {
                let (id, published) = in_flight.pop_front().unwrap();
                published.confirmed().await.unwrap();
                report("CONFIRMED", [id.as_str()]);
            }
        }
        consumer.await.unwrap();
    });
}

/// Consumes from the queue: acks most deliveries (some with `multiple`),
/// requeues a few, holds a few for a while; in some rounds slowly.
async fn consume(broker: Broker, conn: ConnectionId, mut rng: SmallRng) {
    tokio::time::sleep(Duration::from_millis(rng.gen_range(0..300))).await;
    // A slow consumer lets a backlog of confirmed, unacked messages build up.
    let slow = rng.gen_bool(0.5);
    let mut ch = broker.open_channel("/", conn).unwrap();
    let prefetch: u16 = rng.gen_range(1..=32);
    ch.qos(prefetch, false);
    ch.consume(QUEUE, ConsumeOptions::default()).unwrap();
    // Deliveries held unacked, in tag order.
    let mut held: Vec<(DeliveryTag, String)> = Vec::new();
    while let Some(event) = ch.recv().await {
        let ChannelEvent::Delivery(d) = event else {
            panic!("unexpected event {event:?}");
        };
        let id = id_of(&d.message);
        report("DELIVERED", [id.as_str()]);
        if slow && rng.gen_bool(0.25) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let roll: f64 = rng.gen();
        if roll < 0.1 {
            ch.nack(d.tag, false, true).unwrap();
        } else if roll < 0.3 && held.len() + 1 < usize::from(prefetch) {
            held.push((d.tag, id));
        } else if roll < 0.5 {
            // Acks this one and everything held before it.
            held.push((d.tag, id));
            let ids: Vec<&str> = held.iter().map(|(_, id)| id.as_str()).collect();
            report("ACKING", ids.iter().copied());
            ch.ack(d.tag, true).unwrap();
            report("ACKED", ids.iter().copied());
            held.clear();
        } else {
            report("ACKING", [id.as_str()]);
            ch.ack(d.tag, false).unwrap();
            report("ACKED", [id.as_str()]);
        }
    }
}

// ---------------------------------------------------------------------------
// The parent: kills children and checks what they left.
// ---------------------------------------------------------------------------

/// One line from the child and when the parent read it.
struct Line {
    at: Instant,
    kind: String,
    id: String,
}

/// Reads the child's lines until the pipe closes. The test harness's own
/// output is ignored, as is a final line cut short by the kill.
fn read_lines(stdout: impl Read) -> Vec<Line> {
    let mut lines = Vec::new();
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).unwrap();
        if n == 0 || !line.ends_with('\n') {
            return lines;
        }
        let at = Instant::now();
        // The harness may have begun the line ("test restart_child ... ").
        for kind in ["READY", "CONFIRMED", "DELIVERED", "ACKING", "ACKED"] {
            if let Some((_, id)) = line.trim_end().split_once(&format!("{kind} ")) {
                lines.push(Line {
                    at,
                    kind: kind.to_string(),
                    id: id.to_string(),
                });
                break;
            }
        }
    }
}

/// Runs one child against `dir`, SIGKILLs it after `delay`, and returns its
/// lines and the moment of the kill.
fn run_child_until_killed(dir: &Path, round: u64, delay: Duration) -> (Vec<Line>, Instant) {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--ignored",
            "--exact",
            "restart_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_VAR, dir)
        .env(CHILD_ROUND_VAR, round.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || read_lines(stdout));
    std::thread::sleep(delay);
    let killed_at = Instant::now();
    if child.try_wait().unwrap().is_none() {
        child.kill().unwrap();
    }
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "round {round}: the child should die of SIGKILL, but ended with {status} \
         (see its stderr above)"
    );
    (reader.join().unwrap(), killed_at)
}

/// What the parent knows between rounds.
#[derive(Default)]
struct Expected {
    /// Whether a child has declared the exchange, the queue and the binding.
    declared: bool,
    /// Messages that must be in the queue at the next check.
    present: BTreeSet<String>,
    /// Messages acked and found gone: they must never come back.
    gone: HashSet<String>,
    /// The fewest deliveries each message in the queue has had.
    deliveries: HashMap<String, u32>,
    /// Acked messages found in the queue again, over all rounds.
    resurrected: usize,
}

/// Totals for the summary line.
#[derive(Default)]
struct Totals {
    confirmed: usize,
    acked: usize,
    largest_backlog: usize,
}

/// One message found in the queue.
struct Found {
    id: String,
    redelivered: bool,
    delivery_count: u32,
}

fn check_round(
    runtime: &tokio::runtime::Runtime,
    dir: &Path,
    round: u64,
    lines: &[Line],
    killed_at: Instant,
    expected: &mut Expected,
    totals: &mut Totals,
) {
    let mut confirmed: BTreeSet<String> = BTreeSet::new();
    // Acks begun (`ACKING`), and when they were done (`ACKED`), if they were.
    let mut acking: BTreeMap<String, Option<Instant>> = BTreeMap::new();
    let was_declared = expected.declared;
    for line in lines {
        match line.kind.as_str() {
            "READY" => expected.declared = true,
            "CONFIRMED" => {
                confirmed.insert(line.id.clone());
            }
            "ACKING" => {
                acking.insert(line.id.clone(), None);
            }
            "ACKED" => {
                acking.insert(line.id.clone(), Some(line.at));
            }
            _ => *expected.deliveries.entry(line.id.clone()).or_insert(0) += 1,
        }
    }
    totals.confirmed += confirmed.len();
    totals.acked += acking.values().filter(|a| a.is_some()).count();
    let must: BTreeSet<String> = expected
        .present
        .union(&confirmed)
        .filter(|id| !acking.contains_key(*id))
        .cloned()
        .collect();

    let found: Vec<Found> = runtime.block_on(async {
        let broker = Broker::open(config(dir)).unwrap();
        let conn = broker.new_connection_id();
        if !was_declared {
            // The child may have died before declaring everything.
            broker
                .declare_exchange("/", ExchangeDeclare::new(EXCHANGE, ExchangeKind::Topic))
                .await
                .unwrap();
            broker
                .declare_queue("/", QueueDeclare::new(QUEUE), conn)
                .await
                .unwrap();
            broker
                .bind_queue("/", QUEUE, EXCHANGE, BINDING, &FieldTable::new(), conn)
                .await
                .unwrap();
        }
        let mut ch = broker.open_channel("/", conn).unwrap();
        let mut found = Vec::new();
        while let Some(m) = ch.get(QUEUE, false).unwrap() {
            assert_eq!(m.message.routing_key, KEY);
            found.push(Found {
                id: id_of(&m.message),
                redelivered: m.redelivered,
                delivery_count: m.delivery_count,
            });
        }
        // Everything goes back to the queue for the next round.
        ch.close();
        let info = broker.queue_info("/", QUEUE).unwrap();
        assert_eq!(
            (info.ready, info.unacked),
            (found.len() as u64, 0),
            "round {round}: closing the channel returns every fetched message"
        );

        // The definitions survived: the binding routes by its pattern.
        let probe = format!("probe-{round}");
        let published = broker.publish("/", message(KEY, &probe)).unwrap();
        assert_eq!(
            published.routed, 1,
            "round {round}: the exchange, queue and binding survive"
        );
        published.confirmed().await.unwrap();
        let stray = broker
            .publish("/", message("invoice.new", "stray"))
            .unwrap();
        assert_eq!(stray.routed, 0, "round {round}: the binding keeps its key");
        stray.confirmed().await.unwrap();
        broker.close().unwrap();
        found
    });

    let mut seen: HashSet<&str> = HashSet::new();
    let mut resurrected = 0;
    for f in &found {
        let id = f.id.as_str();
        assert!(
            seen.insert(id),
            "round {round}: message {id} is in the queue twice"
        );
        assert!(
            !expected.gone.contains(id),
            "round {round}: message {id} was acked and gone, and came back"
        );
        if let Some(acked) = acking.get(id) {
            // An ack the kill interrupted may or may not have happened.
            if let Some(at) = acked {
                let before_kill = killed_at.saturating_duration_since(*at);
                assert!(
                    before_kill <= ACK_LOSS_WINDOW,
                    "round {round}: message {id}, acked {before_kill:?} before the kill, came back"
                );
                resurrected += 1;
            }
        } else if !must.contains(id) {
            // Published but not yet confirmed when the child died: only
            // this round's child can have left such a message behind.
            assert!(
                id.starts_with(&format!("{round}-")),
                "round {round}: message {id} appeared, but it was not in the queue at the \
                 last check"
            );
        }
        if !acking.contains_key(id) {
            let least = expected.deliveries.get(id).copied().unwrap_or(0);
            assert!(
                f.delivery_count >= least,
                "round {round}: message {id} was delivered at least {least} times, but its \
                 delivery count is {}",
                f.delivery_count
            );
        }
        assert_eq!(
            f.redelivered,
            f.delivery_count > 0,
            "round {round}: message {id}: redelivered and its delivery count disagree"
        );
    }
    let lost: Vec<&String> = must
        .iter()
        .filter(|id| !seen.contains(id.as_str()))
        .collect();
    assert!(
        lost.is_empty(),
        "round {round}: {} confirmed, unacked messages are missing: {:?}",
        lost.len(),
        lost.iter().take(20).collect::<Vec<_>>()
    );

    for id in acking.keys() {
        if !seen.contains(id.as_str()) {
            expected.gone.insert(id.clone());
        }
    }
    let probe = format!("probe-{round}");
    expected.present = found.iter().map(|f| f.id.clone()).collect();
    expected.present.insert(probe.clone());
    // Each message was fetched once more by this check.
    let mut deliveries: HashMap<String, u32> = found
        .iter()
        .map(|f| (f.id.clone(), f.delivery_count + 1))
        .collect();
    deliveries.insert(probe, 0);
    expected.deliveries = deliveries;
    expected.resurrected += resurrected;
    totals.largest_backlog = totals.largest_backlog.max(found.len());
    println!(
        "round {round}: {} confirmed, {} acked, {} in the queue, {resurrected} acked ones back",
        confirmed.len(),
        acking.values().filter(|a| a.is_some()).count(),
        found.len()
    );
}

#[test]
fn confirmed_messages_survive_sigkill() {
    let seed = std::env::var(SEED_VAR)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("kill delays from seed {seed} (set {SEED_VAR} to replay)");
    let mut rng = SmallRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut expected = Expected::default();
    let mut totals = Totals::default();
    for round in 0..ROUNDS {
        let delay = Duration::from_millis(rng.gen_range(KILL_AFTER_MS));
        let (lines, killed_at) = run_child_until_killed(dir.path(), round, delay);
        println!("round {round}: killed after {delay:?}");
        check_round(
            &runtime,
            dir.path(),
            round,
            &lines,
            killed_at,
            &mut expected,
            &mut totals,
        );
    }
    println!(
        "{ROUNDS} kills: {} messages confirmed, {} acked, at most {} in the queue; \
         {} acked messages came back",
        totals.confirmed, totals.acked, totals.largest_backlog, expected.resurrected
    );
}
