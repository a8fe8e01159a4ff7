//! Criterion benchmarks of one log: appends with `Never` and `Always`, and
//! reads from the page cache.
//!
//! ```text
//! cargo bench -p tern-storage --bench log
//! ```
//!
//! Sample counts and measurement times are kept small so that the whole run
//! takes well under a minute. The data goes to a temporary directory under the
//! workspace's `target/` rather than `/tmp`, which may be a tmpfs (where an
//! fsync costs nothing). For the figures against the project's targets, run the
//! `storage-bench` example instead.

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_main, BenchmarkId, Criterion, Throughput};
use tern_storage::{Appended, Durability, Log, LogConfig, Message, Store, StoreConfig, Timestamp};

const MSG: usize = 1024;
const BATCH: usize = 64;
const WINDOW: usize = 1000;
const READ_LOG_BYTES: usize = 256 << 20;

fn body() -> Bytes {
    (0..MSG)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

fn messages(n: usize) -> Vec<Message> {
    let body = body();
    (0..n)
        .map(|_| Message {
            timestamp: Timestamp::now(),
            headers: Bytes::new(),
            body: body.clone(),
        })
        .collect()
}

fn bench_dir() -> tempfile::TempDir {
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target");
    std::fs::create_dir_all(&base).expect("creating target/");
    tempfile::Builder::new()
        .prefix("tern-storage-bench-")
        .tempdir_in(base)
        .expect("creating a bench directory")
}

/// Deletes the sealed segments already appended, so a long benchmark does
/// not fill the disk. Run outside the timed section.
fn trim(log: &Log) {
    log.delete_before(log.end()).expect("trimming the log");
}

fn append_never(c: &mut Criterion) {
    let dir = bench_dir();
    let store = Store::open(dir.path(), StoreConfig::default()).expect("opening store");
    let mut group = c.benchmark_group("append_never");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for batch in [1, BATCH] {
        let log = store
            .open_log(
                &format!("never-{batch}"),
                LogConfig::with_durability(Durability::Never),
            )
            .expect("opening log");
        let msgs = messages(batch);
        group.throughput(Throughput::Bytes((batch * MSG) as u64));
        group.bench_with_input(
            BenchmarkId::new("1KiB_messages_per_append", batch),
            &msgs,
            |b, msgs| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        log.append(msgs).expect("append").wait().expect("wait");
                    }
                    let took = start.elapsed();
                    trim(&log);
                    took
                });
            },
        );
    }
    group.finish();
    store.close().expect("closing store");
}

fn append_always(c: &mut Criterion) {
    let dir = bench_dir();
    let store = Store::open(dir.path(), StoreConfig::default()).expect("opening store");
    let log = store
        .open_log("always", LogConfig::with_durability(Durability::Always))
        .expect("opening log");
    let msg = messages(1);
    let mut group = c.benchmark_group("append_always");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));
    group.throughput(Throughput::Bytes(MSG as u64));
    group.bench_function(BenchmarkId::new("1KiB_1_appender_in_flight", WINDOW), |b| {
        b.iter_custom(|iters| {
            let mut in_flight: VecDeque<Appended> = VecDeque::with_capacity(WINDOW);
            let start = Instant::now();
            for _ in 0..iters {
                if in_flight.len() == WINDOW {
                    if let Some(oldest) = in_flight.pop_front() {
                        oldest.wait().expect("durable");
                    }
                }
                in_flight.push_back(log.append(&msg).expect("append"));
            }
            while let Some(a) = in_flight.pop_front() {
                a.wait().expect("durable");
            }
            let took = start.elapsed();
            trim(&log);
            took
        });
    });
    group.finish();
    let stats = store.journal_stats();
    eprintln!(
        "append_always: {} group commits (fsyncs), {:.0} records per fsync over the whole run",
        stats.commits,
        stats.records as f64 / stats.commits.max(1) as f64
    );
    store.close().expect("closing store");
}

fn read_page_cache(c: &mut Criterion) {
    let dir = bench_dir();
    let store = Store::open(dir.path(), StoreConfig::default()).expect("opening store");
    let log = store
        .open_log("read", LogConfig::with_durability(Durability::Never))
        .expect("opening log");
    let msgs = messages(BATCH);
    for _ in 0..READ_LOG_BYTES / (BATCH * MSG) {
        log.append(&msgs).expect("append");
    }
    let total: u64 = log.end().0 * MSG as u64;
    let mut group = c.benchmark_group("read_page_cache");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    group.throughput(Throughput::Bytes(total));
    group.bench_function("whole_log_256MiB_read_10000_records_16MiB", |b| {
        b.iter(|| {
            let mut reader = log.reader(log.start()).expect("reader");
            let mut bytes = 0usize;
            loop {
                let records = reader.read(10_000, 16 << 20).expect("read");
                if records.is_empty() {
                    break;
                }
                bytes += records.iter().map(|r| r.body.len()).sum::<usize>();
            }
            assert_eq!(bytes as u64, total);
            bytes
        });
    });
    group.finish();
    store.close().expect("closing store");
}

/// Every benchmark in this file (what `criterion_group!` would generate, plus
/// a doc comment for the `missing_docs` lint).
fn benches() {
    let mut c = Criterion::default().configure_from_args();
    append_never(&mut c);
    append_always(&mut c);
    read_page_cache(&mut c);
}

criterion_main!(benches);
