//! The log behaves exactly like a simple in-memory model.
//!
//! Random sequences of appends (to logs under each durability policy), reads
//! from random offsets with random limits, time seeks, reopens of the whole
//! store and retention are applied both to a real store and to a `Vec` per
//! log. After every step, and in full after every reopen, the log must hold
//! exactly the model's records: same offsets, timestamps, headers and bodies.

use std::time::Duration;

use proptest::prelude::*;
use tern_storage::{
    Durability, Log, LogConfig, Message, Offset, Retention, Store, StoreConfig, Timestamp,
};

const LOGS: [(&str, Durability); 3] = [
    ("always", Durability::Always),
    ("never", Durability::Never),
    ("interval", Durability::Interval(Duration::from_millis(2))),
];

#[derive(Debug, Clone)]
enum Op {
    Append {
        log: usize,
        messages: Vec<(u64, Vec<u8>, Vec<u8>)>,
    },
    Read {
        log: usize,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    },
    SeekTime {
        log: usize,
        ts: u64,
    },
    Reopen,
    DeleteBefore {
        log: usize,
        watermark: u64,
    },
    KeepBytes {
        log: usize,
        max_bytes: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let message = (
        0u64..1000,
        prop::collection::vec(any::<u8>(), 0..20),
        prop::collection::vec(any::<u8>(), 0..700),
    );
    prop_oneof![
        10 => (0..LOGS.len(), prop::collection::vec(message, 1..6)).prop_map(|(log, messages)| Op::Append { log, messages }),
        4 => (0..LOGS.len(), any::<u64>(), 1usize..50, 1usize..20_000)
            .prop_map(|(log, from, max_records, max_bytes)| Op::Read { log, from, max_records, max_bytes }),
        2 => (0..LOGS.len(), 0u64..1100).prop_map(|(log, ts)| Op::SeekTime { log, ts }),
        1 => Just(Op::Reopen),
        1 => (0..LOGS.len(), any::<u64>()).prop_map(|(log, watermark)| Op::DeleteBefore { log, watermark }),
        1 => (0..LOGS.len(), 0u64..40_000).prop_map(|(log, max_bytes)| Op::KeepBytes { log, max_bytes }),
    ]
}

/// What a log must hold: records from `start` on.
#[derive(Debug, Default)]
struct Model {
    start: u64,
    records: Vec<(u64, Vec<u8>, Vec<u8>)>,
}

impl Model {
    fn end(&self) -> u64 {
        self.records.len() as u64
    }
}

fn config(durability: Durability) -> LogConfig {
    LogConfig {
        durability,
        segment_bytes: 4096,
        index_interval_bytes: 300,
        ..LogConfig::default()
    }
}

fn store_config(skip_journal: bool) -> StoreConfig {
    StoreConfig {
        single_log_commits_skip_journal: skip_journal,
        journal_checkpoint_bytes: 16 * 1024,
        ..StoreConfig::default()
    }
}

fn open(dir: &std::path::Path, skip_journal: bool) -> (Store, Vec<Log>) {
    let store = Store::open(dir, store_config(skip_journal)).expect("open store");
    let logs = LOGS
        .iter()
        .map(|(name, d)| store.open_log(name, config(*d)).expect("open log"))
        .collect();
    (store, logs)
}

/// Reads `[from, end)` and checks it against the model.
fn check_range(log: &Log, model: &Model, from: u64) -> Result<(), TestCaseError> {
    let mut reader = log
        .reader(Offset(from))
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut next = from;
    loop {
        let batch = reader
            .read(37, 5000)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        if batch.is_empty() {
            break;
        }
        for r in batch {
            prop_assert_eq!(r.offset, Offset(next));
            let (ts, h, b) = &model.records[next as usize];
            prop_assert_eq!(r.timestamp, Timestamp(*ts));
            prop_assert_eq!(&r.headers[..], &h[..]);
            prop_assert_eq!(&r.body[..], &b[..]);
            next += 1;
        }
    }
    prop_assert_eq!(next, model.end());
    Ok(())
}

fn check_all(logs: &[Log], models: &[Model]) -> Result<(), TestCaseError> {
    for (log, model) in logs.iter().zip(models) {
        prop_assert_eq!(log.start(), Offset(model.start), "start of {}", log.name());
        prop_assert_eq!(log.end(), Offset(model.end()), "end of {}", log.name());
        check_range(log, model, model.start)?;
    }
    Ok(())
}

fn run(ops: Vec<Op>, skip_journal: bool) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut store, mut logs) = open(dir.path(), skip_journal);
    let mut models: Vec<Model> = LOGS.iter().map(|_| Model::default()).collect();
    for op in ops {
        match op {
            Op::Append { log, messages } => {
                let batch: Vec<Message> = messages
                    .iter()
                    .map(|(ts, h, b)| Message {
                        timestamp: Timestamp(*ts),
                        headers: h.clone().into(),
                        body: b.clone().into(),
                    })
                    .collect();
                let offsets = logs[log]
                    .append(&batch)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let offsets = offsets
                    .wait()
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(offsets.start, Offset(models[log].end()));
                prop_assert_eq!(offsets.len(), messages.len() as u64);
                models[log].records.extend(messages);
                prop_assert_eq!(logs[log].end(), Offset(models[log].end()));
            }
            Op::Read {
                log,
                from,
                max_records,
                max_bytes,
            } => {
                let model = &models[log];
                let span = model.end() - model.start + 1;
                let from = model.start + from % span;
                let mut reader = logs[log]
                    .reader(Offset(from))
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let got = reader
                    .read(max_records, max_bytes)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let available = (model.end() - from) as usize;
                if available == 0 {
                    prop_assert!(got.is_empty());
                } else {
                    prop_assert!(
                        !got.is_empty(),
                        "a read with records available returns at least one"
                    );
                    prop_assert!(got.len() <= max_records.min(available));
                }
                for (i, r) in got.iter().enumerate() {
                    let want = from + i as u64;
                    prop_assert_eq!(r.offset, Offset(want));
                    prop_assert_eq!(&r.body[..], &model.records[want as usize].2[..]);
                }
                prop_assert_eq!(reader.position(), Offset(from + got.len() as u64));
            }
            Op::SeekTime { log, ts } => {
                let model = &models[log];
                let want = (model.start..model.end())
                    .find(|&o| model.records[o as usize].0 >= ts)
                    .unwrap_or(model.end());
                let reader = logs[log]
                    .reader_at_time(Timestamp(ts))
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(
                    reader.position(),
                    Offset(want),
                    "first record at or after {}",
                    ts
                );
            }
            Op::Reopen => {
                drop(logs);
                store
                    .close()
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                (store, logs) = open(dir.path(), skip_journal);
                check_all(&logs, &models)?;
            }
            Op::DeleteBefore { log, watermark } => {
                let model = &mut models[log];
                let watermark = watermark % (model.end() + 2);
                logs[log]
                    .delete_before(Offset(watermark))
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let start = logs[log].start().0;
                prop_assert!(start >= model.start, "retention never moves the start back");
                prop_assert!(
                    start <= watermark.max(model.start),
                    "only records below the watermark are deleted"
                );
                model.start = start;
                check_range(&logs[log], model, model.start)?;
            }
            Op::KeepBytes { log, max_bytes } => {
                let retention = Retention {
                    max_bytes: Some(max_bytes),
                    max_age: None,
                };
                logs[log]
                    .apply_retention(&retention, Timestamp::now())
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert!(
                    logs[log].size_bytes() <= max_bytes || logs[log].segment_count() == 1,
                    "size {} over {} with {} segments",
                    logs[log].size_bytes(),
                    max_bytes,
                    logs[log].segment_count()
                );
                let model = &mut models[log];
                prop_assert!(logs[log].start().0 >= model.start);
                model.start = logs[log].start().0;
                check_range(&logs[log], model, model.start)?;
            }
        }
    }
    drop(logs);
    store
        .close()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let (store, logs) = open(dir.path(), skip_journal);
    check_all(&logs, &models)?;
    drop(logs);
    store
        .close()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_log_matches_the_model(ops in prop::collection::vec(op(), 1..80), skip_journal in any::<bool>()) {
        run(ops, skip_journal)?;
    }
}
