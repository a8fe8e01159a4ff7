//! Acknowledged appends survive the death of the process that made them.
//!
//! The parent test re-executes this test binary as a child process that opens
//! a store and appends, with [`Durability::Always`], to several logs from
//! several threads at once, each thread keeping many appends in flight. Every
//! time an append's [`Appended::wait`] returns, the child reports each of its
//! records to the parent over its stdout pipe as an `ACK` line. At a random
//! moment the parent kills the child with SIGKILL, so the kill lands anywhere:
//! in the middle of a journal write, a group commit's fsync, a segment roll,
//! a journal checkpoint, or the store's own opening. Small segments and a
//! small journal checkpoint threshold make rolls and checkpoints frequent.
//!
//! After every kill the parent reopens the same directory itself and checks
//! that the store recovers without error and that
//!
//! - every acknowledged record is at the offset it was acknowledged at, with
//!   its timestamp, headers and body byte for byte as appended;
//! - every log's offsets are dense from its start to its end, and reading the
//!   whole log never returns an error (no damaged batch is ever served);
//! - every record present is one some writer appended, and none appears twice;
//! - everything seen after the previous kill is still there, unchanged.
//!
//! The directory is reused for every round, so damage left by one crash would
//! surface in a later one. Each record's content is a function of the
//! `(writer, sequence)` pair carried in its headers, so the parent can check
//! any record's bytes, acknowledged or not.
//!
//! A second test kills children within their first milliseconds, each in a
//! fresh directory, so that the kill interrupts the creation of the store and
//! of its logs: the next open must treat what is left as a new store or log,
//! never refuse the directory.
//!
//! A SIGKILL loses no data the process handed to the kernel, so these tests
//! prove that recovery copes with every intermediate state the engine's
//! sequence of writes, renames and fsyncs can be interrupted in; losing
//! unsynced data to a power cut is a different failure, not simulated here.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::ops::Range;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::{SmallRng, StdRng};
use rand::{Rng, SeedableRng};
use tern_storage::{
    Appended, Durability, Log, LogConfig, Message, Offset, Record, RecoveryEvent, StorageError,
    Store, StoreConfig, Timestamp,
};

/// Set in the child's environment: the store directory to append to.
const CHILD_DIR_VAR: &str = "TERN_CRASH_CHILD_DIR";
/// Set in the child's environment: which round this is, so that writer ids
/// (and hence every record's content) are unique across rounds.
const CHILD_ROUND_VAR: &str = "TERN_CRASH_CHILD_ROUND";
/// Set in the parent's environment to replay a particular run's kill delays.
const SEED_VAR: &str = "TERN_CRASH_SEED";

const LOGS: [&str; 3] = ["crash-a", "crash-b", "crash-c"];
const WRITERS_PER_CHILD: u64 = 4;
const IN_FLIGHT_PER_WRITER: usize = 64;
const ROUNDS: u64 = 40;
/// How long after spawning the child the parent kills it.
const KILL_AFTER_MS: Range<u64> = 20..300;
/// Stores killed while the child creates them, and when after spawning.
const CREATION_ATTEMPTS: u64 = 30;
const CREATION_KILL_AFTER_US: Range<u64> = 0..30_000;
/// A child that is never killed (its parent died) stops on its own.
const CHILD_LIFETIME: Duration = Duration::from_secs(30);
/// Timestamps are synthetic, so that they too can be checked byte for byte.
const BASE_TIMESTAMP: u64 = 1_700_000_000_000;

fn log_config() -> LogConfig {
    LogConfig {
        segment_bytes: 16 * 1024,
        index_interval_bytes: 2048,
        ..LogConfig::with_durability(Durability::Always)
    }
}

fn store_config() -> StoreConfig {
    StoreConfig {
        journal_checkpoint_bytes: 64 * 1024,
        ..StoreConfig::default()
    }
}

/// The message that `writer` appends as its `seq`th record: headers name the
/// pair, and the body (0 bytes to 4 KiB) and timestamp are derived from it.
fn message(writer: u64, seq: u64) -> Message {
    let mix = splitmix64((writer << 32) ^ seq);
    let headers = format!("w={writer} s={seq} {}", "#".repeat((mix % 13) as usize));
    let body_len = match (mix >> 8) % 8 {
        0 => 0,
        1 => (mix >> 16) % 16,
        _ => (mix >> 16) % 4097,
    } as usize;
    let pattern: Vec<u8> = (0..251u64)
        .map(|i| (splitmix64(mix ^ i) & 0xff) as u8)
        .collect();
    let body: Vec<u8> = pattern.iter().copied().cycle().take(body_len).collect();
    Message {
        timestamp: Timestamp(BASE_TIMESTAMP + writer * 1_000_000 + seq),
        headers: headers.into(),
        body: body.into(),
    }
}

/// The `(writer, seq)` pair a record's headers claim it is.
fn identify(record: &Record) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(&record.headers).ok()?;
    let mut words = text.split(' ');
    let writer = words.next()?.strip_prefix("w=")?.parse().ok()?;
    let seq = words.next()?.strip_prefix("s=")?.parse().ok()?;
    Some((writer, seq))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// ---------------------------------------------------------------------------
// The child: appends until it is killed.
// ---------------------------------------------------------------------------

/// The child process's body. Without the environment variable (a normal test
/// run, even with `--ignored`) it does nothing.
#[test]
#[ignore = "run as a child process by acknowledged_appends_survive_sigkill"]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR_VAR) else {
        return;
    };
    let round: u64 = std::env::var(CHILD_ROUND_VAR)
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| die(format!("{CHILD_ROUND_VAR} must be a number")));
    let store = open_store(Path::new(&dir))
        .unwrap_or_else(|e| die(format!("child cannot open the store: {e}")));
    let logs: Vec<Log> = LOGS
        .iter()
        .map(|name| {
            store
                .open_log(name, log_config())
                .unwrap_or_else(|e| die(format!("child cannot open log {name}: {e}")))
        })
        .collect();
    let deadline = Instant::now() + CHILD_LIFETIME;
    std::thread::scope(|s| {
        for t in 0..WRITERS_PER_CHILD {
            let logs = &logs;
            s.spawn(move || append_until_killed(logs, round * WRITERS_PER_CHILD + t, deadline));
        }
    });
}

/// Appends batches of 1 to 3 records to randomly chosen logs, keeping up to
/// [`IN_FLIGHT_PER_WRITER`] appends in flight and acknowledging the oldest
/// once it is durable. Returns when the parent stops listening or the
/// deadline passes.
fn append_until_killed(logs: &[Log], writer: u64, deadline: Instant) {
    let mut rng = SmallRng::seed_from_u64(writer);
    let mut in_flight: VecDeque<(usize, u64, Appended)> = VecDeque::new();
    let mut next_seq = 0u64;
    while Instant::now() < deadline {
        let log = rng.gen_range(0..logs.len());
        let count = rng.gen_range(1..=3u64);
        let messages: Vec<Message> = (next_seq..next_seq + count)
            .map(|seq| message(writer, seq))
            .collect();
        let appended = logs[log]
            .append(&messages)
            .unwrap_or_else(|e| die(format!("append by writer {writer} failed: {e}")));
        in_flight.push_back((log, next_seq, appended));
        next_seq += count;
        if in_flight.len() >= IN_FLIGHT_PER_WRITER {
            let (log, first_seq, appended) = in_flight.pop_front().expect("in flight");
            if !acknowledge(log, writer, first_seq, appended) {
                return;
            }
        }
    }
    while let Some((log, first_seq, appended)) = in_flight.pop_front() {
        if !acknowledge(log, writer, first_seq, appended) {
            return;
        }
    }
}

/// Waits until the append is durable, then tells the parent, one
/// `ACK <log> <offset> <writer> <seq>` line per record, in a single write.
/// Returns false once the parent no longer reads.
fn acknowledge(log: usize, writer: u64, first_seq: u64, appended: Appended) -> bool {
    let offsets = appended
        .wait()
        .unwrap_or_else(|e| die(format!("durable append by writer {writer} failed: {e}")));
    let mut lines = String::new();
    for (i, offset) in (offsets.start.0..offsets.end.0).enumerate() {
        let seq = first_seq + i as u64;
        writeln!(lines, "ACK {log} {offset} {writer} {seq}").expect("formatting to a string");
    }
    let mut out = std::io::stdout().lock();
    out.write_all(lines.as_bytes())
        .and_then(|()| out.flush())
        .is_ok()
}

/// Ends the child at once with a failure status, which the parent reports.
/// (A panic in one writer thread would leave the others running until killed.)
fn die(reason: String) -> ! {
    eprintln!("crash child: {reason}");
    std::process::exit(3)
}

// ---------------------------------------------------------------------------
// The parent: kills children and checks what they left behind.
// ---------------------------------------------------------------------------

/// One record the child reported durable.
#[derive(Debug, Clone, Copy)]
struct Ack {
    log: usize,
    offset: u64,
    id: (u64, u64),
}

/// What the parent knows must be in the store.
#[derive(Debug, Default)]
struct Expected {
    /// Per log: every acknowledged offset and the `(writer, seq)` it holds.
    acked: Vec<HashMap<u64, (u64, u64)>>,
    /// Per log: every record seen when the store was last checked.
    seen: Vec<Vec<Record>>,
}

impl Expected {
    fn new() -> Self {
        Expected {
            acked: vec![HashMap::new(); LOGS.len()],
            seen: vec![Vec::new(); LOGS.len()],
        }
    }

    fn acknowledge(&mut self, ack: Ack) {
        let previous = self.acked[ack.log].insert(ack.offset, ack.id);
        assert!(
            previous.is_none_or(|p| p == ack.id),
            "offset {} of log {} was acknowledged for {:?} and again for {:?}",
            ack.offset,
            LOGS[ack.log],
            previous,
            ack.id
        );
    }

    fn total_seen(&self) -> usize {
        self.seen.iter().map(Vec::len).sum()
    }
}

/// What one check of the store found, for the test's output.
#[derive(Debug, Default)]
struct Checked {
    /// How many events `Store::recovery_events` and `Log::recovery_events` reported.
    store_events: usize,
    log_events: usize,
    /// The same events by kind.
    truncated_tails: usize,
    indexes_rebuilt: usize,
    records_replayed: u64,
    ends: Vec<u64>,
}

impl Checked {
    fn count(&mut self, events: &[RecoveryEvent]) {
        for event in events {
            match event {
                RecoveryEvent::TruncatedTail { .. } => self.truncated_tails += 1,
                RecoveryEvent::IndexRebuilt { .. } => self.indexes_rebuilt += 1,
                RecoveryEvent::Replayed { records, .. } => self.records_replayed += records,
                _ => {}
            }
        }
    }
}

/// Acknowledged records survive SIGKILL at any moment, byte for byte and at
/// their offsets, in logs that stay dense and readable, round after round.
#[test]
fn acknowledged_appends_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let seed = std::env::var(SEED_VAR)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("crash test seed {seed} (set {SEED_VAR} to replay the kill delays)");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut expected = Expected::new();
    let mut total_acks = 0usize;
    let mut rounds_with_acks = 0;
    let mut repairs = Checked::default();
    let started = Instant::now();

    for round in 0..ROUNDS {
        let delay = Duration::from_millis(rng.gen_range(KILL_AFTER_MS));
        let acks = run_child_until_killed(dir.path(), round, delay);
        total_acks += acks.len();
        rounds_with_acks += usize::from(!acks.is_empty());
        for ack in &acks {
            expected.acknowledge(*ack);
        }
        let before = expected.total_seen();
        let checked = check_store(dir.path(), &mut expected);
        println!(
            "round {round:2}: killed after {:3} ms, {:4} acks, records per log {:?} (+{}), \
             recovery events: store {}, logs {}",
            delay.as_millis(),
            acks.len(),
            checked.ends,
            expected.total_seen() - before,
            checked.store_events,
            checked.log_events,
        );
        repairs.truncated_tails += checked.truncated_tails;
        repairs.indexes_rebuilt += checked.indexes_rebuilt;
        repairs.records_replayed += checked.records_replayed;
    }

    println!(
        "{ROUNDS} rounds, {total_acks} acknowledged records checked, {} records in the store, \
         {:.1?}; recovery truncated {} torn tails, rebuilt {} indexes, replayed {} records",
        expected.total_seen(),
        started.elapsed(),
        repairs.truncated_tails,
        repairs.indexes_rebuilt,
        repairs.records_replayed,
    );
    assert!(
        total_acks > 0 && rounds_with_acks >= ROUNDS as usize / 4,
        "too few children acknowledged anything ({rounds_with_acks} of {ROUNDS} rounds, \
         {total_acks} records): the test proves nothing"
    );
    assert!(
        expected.seen.iter().all(|records| !records.is_empty()),
        "every log should have received records"
    );
}

/// A store or log whose creation was cut short by SIGKILL opens as a new one.
#[test]
fn a_kill_while_creating_the_store_and_its_logs_never_bricks_it() {
    // A child creates the store and its logs in its first few milliseconds,
    // so kills soon after spawning land in the middle of that creation.
    let mut rng = rand::thread_rng();
    let mut acks = 0;
    for attempt in 0..CREATION_ATTEMPTS {
        let dir = tempfile::tempdir().unwrap();
        let delay = Duration::from_micros(rng.gen_range(CREATION_KILL_AFTER_US));
        let mut expected = Expected::new();
        for ack in run_child_until_killed(dir.path(), attempt, delay) {
            expected.acknowledge(ack);
            acks += 1;
        }
        check_store(dir.path(), &mut expected);
    }
    println!("{CREATION_ATTEMPTS} stores killed while being created; {acks} acknowledged records checked");
}

/// Runs one child against `dir`, SIGKILLs it after `delay`, and returns the
/// acknowledgements it sent before dying.
fn run_child_until_killed(dir: &Path, round: u64, delay: Duration) -> Vec<Ack> {
    let exe = std::env::current_exe().expect("path of the test binary");
    let mut child = Command::new(exe)
        .args([
            "crash_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_VAR, dir)
        .env(CHILD_ROUND_VAR, round.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawning the crash child");
    let stdout = child.stdout.take().expect("the child's stdout pipe");
    let reader = std::thread::spawn(move || read_acks(stdout));
    std::thread::sleep(delay);
    let early = child.try_wait().expect("polling the crash child");
    if early.is_none() {
        child.kill().expect("killing the crash child");
    }
    let status = child.wait().expect("reaping the crash child");
    assert_eq!(
        status.signal(),
        Some(9),
        "round {round}: the crash child should die of SIGKILL, but ended with {status} \
         (see its stderr above)"
    );
    reader.join().expect("the ack reader thread")
}

/// Reads `ACK` lines until the pipe closes. The test harness's own output is
/// ignored, as is a final line cut short by the kill.
fn read_acks(stdout: impl Read) -> Vec<Ack> {
    let mut acks = Vec::new();
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .expect("reading the child's stdout");
        if n == 0 || !line.ends_with('\n') {
            return acks;
        }
        // The harness may have begun the line ("test crash_child ... ").
        let Some((_, fields)) = line.trim_end().split_once("ACK ") else {
            continue;
        };
        let numbers: Vec<u64> = fields
            .split(' ')
            .map(|f| f.parse().expect("an ACK field is a number"))
            .collect();
        let [log, offset, writer, seq] = numbers[..] else {
            panic!("malformed ACK line {line:?}");
        };
        acks.push(Ack {
            log: log as usize,
            offset,
            id: (writer, seq),
        });
    }
}

/// Opens the store, waiting out a `Locked` that is not ours: another test in
/// this process may be spawning a child at this moment, and between its fork
/// and its exec that child holds a copy of every open file, the lock included.
fn open_store(dir: &Path) -> tern_storage::Result<Store> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Store::open(dir, store_config()) {
            Err(StorageError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Reopens the store after a kill and checks every log against `expected`,
/// then records what it saw there for the next round, and closes the store.
fn check_store(dir: &Path, expected: &mut Expected) -> Checked {
    let store = open_store(dir).expect("the store reopens after SIGKILL");
    let mut checked = Checked {
        store_events: store.recovery_events().len(),
        ..Checked::default()
    };
    checked.count(store.recovery_events());
    let mut ids_seen = HashSet::new();
    for (i, name) in LOGS.iter().enumerate() {
        let log = store
            .open_log(name, log_config())
            .expect("every log reopens after SIGKILL");
        checked.log_events += log.recovery_events().len();
        checked.count(&log.recovery_events());
        let records = read_everything(&log);
        assert_eq!(log.start(), Offset(0), "log {name}: nothing was deleted");
        assert_eq!(
            log.start().0 + records.len() as u64,
            log.end().0,
            "log {name}: reading from the start should reach the end"
        );
        for (at, record) in records.iter().enumerate() {
            assert_eq!(
                record.offset,
                Offset(log.start().0 + at as u64),
                "log {name}: offsets should be dense"
            );
        }

        // Records seen last round are all still there, unchanged.
        let previous = &expected.seen[i];
        assert!(
            records.len() >= previous.len(),
            "log {name} shrank from {} to {} records",
            previous.len(),
            records.len()
        );
        for (old, new) in previous.iter().zip(&records) {
            assert!(
                old == new,
                "log {name}: record at offset {} changed after a crash",
                old.offset
            );
        }

        // Every record is one some writer appended, byte for byte, once.
        for record in &records {
            let id = identify(record).unwrap_or_else(|| {
                panic!(
                    "log {name}: record at offset {} has headers no writer wrote: {:?}",
                    record.offset, record.headers
                )
            });
            assert!(
                ids_seen.insert(id),
                "record {id:?} appears twice (again at offset {} of log {name})",
                record.offset
            );
        }
        for record in &records[previous.len()..] {
            let (writer, seq) = identify(record).expect("identified above");
            let m = message(writer, seq);
            assert!(
                record.timestamp == m.timestamp
                    && record.headers == m.headers
                    && record.body == m.body,
                "log {name}: record at offset {} is not byte-identical to writer {writer}'s \
                 record {seq}",
                record.offset
            );
        }

        // Every acknowledged record is where it was acknowledged.
        for (&offset, &id) in &expected.acked[i] {
            let found = records.get(offset as usize).map(identify);
            assert_eq!(
                found,
                Some(Some(id)),
                "log {name}: acknowledged record {id:?} is missing from offset {offset}"
            );
        }

        checked.ends.push(log.end().0);
        expected.seen[i] = records;
    }
    store.close().expect("the store closes cleanly");
    checked
}

/// Every record of the log, from its start, in bounded reads.
fn read_everything(log: &Log) -> Vec<Record> {
    let mut reader = log
        .reader(log.start())
        .expect("a reader at the log's start");
    let mut records = Vec::new();
    loop {
        let batch = reader
            .read(1000, 1 << 20)
            .unwrap_or_else(|e| panic!("reading log {} failed: {e}", log.name()));
        if batch.is_empty() {
            return records;
        }
        records.extend(batch);
    }
}
