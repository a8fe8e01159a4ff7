//! Specifies how the storage engine answers misuse and bad input: with a
//! typed [`StorageError`] naming what was wrong, never with a panic. Also
//! specifies retention (whole sealed segments only, never the active one) and
//! how readers wait for records, blocking and async.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use tern_storage::*;

/// A message whose timestamp and contents are derived from `i`.
fn msg(i: u64) -> Message {
    Message {
        timestamp: Timestamp(1_000_000 + i * 1_000),
        headers: format!("h{i}").into(),
        body: format!("body of record {i} ").repeat(8).into(),
    }
}

/// Small segments, so that a few dozen records span several of them.
fn small_segments(durability: Durability) -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        ..LogConfig::with_durability(durability)
    }
}

/// Appends `range` one record per batch and waits for each to be durable.
fn append_range(log: &Log, range: std::ops::Range<u64>) {
    for i in range {
        let offsets = log
            .append(&[msg(i)])
            .expect("append")
            .wait()
            .expect("durable");
        assert_eq!(offsets.start, Offset(i), "offsets are dense");
    }
}

/// Every record from `from` to the end of the log.
fn read_from(log: &Log, from: Offset) -> Vec<Record> {
    let mut reader = log.reader(from).expect("reader");
    let mut out = Vec::new();
    loop {
        let batch = reader.read(50, 1 << 20).expect("read");
        if batch.is_empty() {
            return out;
        }
        out.extend(batch);
    }
}

/// Asserts that `records` are exactly the records `range` as appended by [`append_range`].
fn assert_records(records: &[Record], range: std::ops::Range<u64>) {
    assert_eq!(
        records.len() as u64,
        range.end - range.start,
        "record count"
    );
    for (r, i) in records.iter().zip(range) {
        let m = msg(i);
        assert_eq!(r.offset, Offset(i));
        assert_eq!(r.timestamp, m.timestamp, "timestamp of {i}");
        assert_eq!(r.headers, m.headers, "headers of {i}");
        assert_eq!(r.body, m.body, "body of {i}");
    }
}

/// The base offsets and sizes of a log's segment files, oldest first.
fn segment_files(dir: &Path) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = fs::read_dir(dir)
        .expect("list log dir")
        .filter_map(|e| {
            let e = e.expect("dir entry");
            let name = e.file_name().into_string().expect("utf-8 name");
            let base = name.strip_suffix(".seg")?.parse().ok()?;
            Some((base, e.metadata().expect("metadata").len()))
        })
        .collect();
    out.sort();
    out
}

/// The base of the segment holding `offset`, given the bases of all segments.
fn base_holding(bases: &[u64], offset: u64) -> u64 {
    bases
        .iter()
        .copied()
        .filter(|&b| b <= offset)
        .max()
        .expect("some segment holds the offset")
}

fn segment_path(log_dir: &Path, base: u64) -> PathBuf {
    log_dir.join(format!("{base:020}.seg"))
}

/// Overwrites the little-endian u32 at `at` in the file at `path`.
fn patch_u32(path: &Path, at: usize, value: u32) {
    let mut bytes = fs::read(path).expect("read file to patch");
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    fs::write(path, bytes).expect("write patched file");
}

// ---------------------------------------------------------------- appends

#[test]
fn appending_an_empty_batch_is_invalid_input() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    for durability in [Durability::Always, Durability::Never] {
        let name = format!("{durability:?}").to_lowercase();
        let log = store
            .open_log(&name, LogConfig::with_durability(durability))
            .unwrap();
        let err = log.append(&[]).unwrap_err();
        assert!(
            matches!(err, StorageError::InvalidInput(_)),
            "{durability:?}: {err:?}"
        );
        assert_eq!(log.end(), Offset(0), "nothing was appended");
        // The refusal consumed no offset.
        assert_eq!(
            log.append(&[msg(0)]).unwrap().wait().unwrap().start,
            Offset(0)
        );
    }
    store.close().unwrap();
}

#[test]
fn appending_a_batch_larger_than_max_batch_bytes_is_invalid_input() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    for durability in [Durability::Always, Durability::Never] {
        let name = format!("{durability:?}").to_lowercase();
        let config = LogConfig {
            max_batch_bytes: 1024,
            ..LogConfig::with_durability(durability)
        };
        let log = store.open_log(&name, config).unwrap();
        let big = Message::new("", vec![7u8; 2000]);
        let err = log.append(&[big]).unwrap_err();
        assert!(
            matches!(&err, StorageError::InvalidInput(m) if m.contains("1024")),
            "{durability:?}: {err:?}"
        );
        // Many small messages that together exceed the limit are refused too.
        let many: Vec<Message> = (0..20).map(|_| Message::new("", vec![1u8; 60])).collect();
        assert!(matches!(
            log.append(&many).unwrap_err(),
            StorageError::InvalidInput(_)
        ));
        assert_eq!(log.end(), Offset(0));
        // A batch within the limit still goes through at offset 0.
        let ok = log.append(&[Message::new("", vec![7u8; 900])]).unwrap();
        assert_eq!(ok.wait().unwrap().start, Offset(0));
    }
    store.close().unwrap();
}

#[test]
fn appending_to_a_closed_log_is_refused_as_closed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    for durability in [Durability::Always, Durability::Never] {
        let name = format!("{durability:?}").to_lowercase();
        let log = store
            .open_log(&name, LogConfig::with_durability(durability))
            .unwrap();
        append_range(&log, 0..3);
        log.close().unwrap();
        let err = log.append(&[msg(3)]).unwrap_err();
        assert!(
            matches!(&err, StorageError::Closed { log } if *log == name),
            "{durability:?}: {err:?}"
        );
        // Readers may still read what was committed.
        assert_records(&read_from(&log, Offset(0)), 0..3);
    }
    store.close().unwrap();
}

#[test]
fn appending_after_the_store_closed_is_refused_as_closed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let always = store
        .open_log("always", LogConfig::with_durability(Durability::Always))
        .unwrap();
    let never = store
        .open_log("never", LogConfig::with_durability(Durability::Never))
        .unwrap();
    append_range(&always, 0..2);
    append_range(&never, 0..2);
    store.close().unwrap();
    for (name, log) in [("always", &always), ("never", &never)] {
        let err = log.append(&[msg(2)]).unwrap_err();
        assert!(
            matches!(&err, StorageError::Closed { log } if log == name),
            "{name}: {err:?}"
        );
        assert_eq!(log.end(), Offset(2), "{name}");
        assert_records(&read_from(log, Offset(0)), 0..2);
    }
}

// ---------------------------------------------------------------- reads

#[test]
fn seeking_past_the_end_is_offset_past_end_and_leaves_the_reader_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let log = store
        .open_log("q", LogConfig::with_durability(Durability::Never))
        .unwrap();
    append_range(&log, 0..5);

    let err = log.reader(Offset(6)).unwrap_err();
    match err {
        StorageError::OffsetPastEnd {
            log: name,
            requested,
            end,
        } => {
            assert_eq!(name, "q");
            assert_eq!(requested, Offset(6));
            assert_eq!(end, Offset(5));
        }
        other => panic!("expected OffsetPastEnd, got {other:?}"),
    }

    // The end itself is a valid position: reading there yields nothing yet.
    let mut at_end = log.reader(Offset(5)).unwrap();
    assert!(at_end.read(10, 1 << 20).unwrap().is_empty());

    let mut reader = log.reader(Offset(2)).unwrap();
    let err = reader.seek(Offset(u64::MAX)).unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::OffsetPastEnd {
                requested: Offset(u64::MAX),
                end: Offset(5),
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(reader.position(), Offset(2), "a failed seek does not move");
    assert_eq!(reader.read(1, 1).unwrap()[0].offset, Offset(2));

    // Asking for nothing returns nothing rather than failing.
    assert!(reader.read(0, 1 << 20).unwrap().is_empty());
    store.close().unwrap();
}

#[test]
fn reading_below_the_start_after_delete_before_is_offset_before_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let log = store
        .open_log("q", small_segments(Durability::Never))
        .unwrap();
    append_range(&log, 0..100);
    assert!(log.segment_count() >= 4, "{} segments", log.segment_count());

    // A reader created before retention, that has not read yet.
    let mut early = log.reader(Offset(0)).unwrap();

    let deleted = log.delete_before(Offset(50)).unwrap();
    assert!(deleted >= 1);
    let start = log.start();
    assert!(start > Offset(0) && start <= Offset(50), "start {start}");

    let err = log.reader(Offset(0)).unwrap_err();
    match err {
        StorageError::OffsetBeforeStart {
            log: name,
            requested,
            start: s,
        } => {
            assert_eq!(name, "q");
            assert_eq!(requested, Offset(0));
            assert_eq!(s, start);
        }
        other => panic!("expected OffsetBeforeStart, got {other:?}"),
    }
    let err = early.read(10, 1 << 20).unwrap_err();
    assert!(
        matches!(err, StorageError::OffsetBeforeStart { requested: Offset(0), start: s, .. } if s == start),
        "{err:?}"
    );
    let err = early.seek(Offset(start.0 - 1)).unwrap_err();
    assert!(
        matches!(err, StorageError::OffsetBeforeStart { .. }),
        "{err:?}"
    );

    // Seeking to the start recovers the reader.
    early.seek(start).unwrap();
    assert_records(&read_from(&log, start), start.0..100);
    store.close().unwrap();
}

// ---------------------------------------------------------------- opening stores

#[test]
fn opening_a_store_on_a_directory_of_unrelated_files_is_not_a_store() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("notes.txt"), b"my notes").unwrap();
    let err = Store::open(dir.path(), StoreConfig::default()).unwrap_err();
    match err {
        StorageError::NotAStore { path, .. } => assert_eq!(path, dir.path()),
        other => panic!("expected NotAStore, got {other:?}"),
    }
    // Nothing was written into the foreign directory.
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["notes.txt"]);
    assert_eq!(fs::read(dir.path().join("notes.txt")).unwrap(), b"my notes");
}

#[test]
fn opening_a_store_on_a_regular_file_is_not_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain");
    fs::write(&file, b"not a directory").unwrap();
    for path in [file.clone(), file.join("below")] {
        let err = Store::open(&path, StoreConfig::default()).unwrap_err();
        assert!(
            matches!(&err, StorageError::NotAStore { path: p, .. } if *p == path),
            "{}: {err:?}",
            path.display()
        );
    }
    assert_eq!(fs::read(&file).unwrap(), b"not a directory");
}

#[test]
fn a_format_file_that_does_not_name_a_tern_store_is_not_a_store() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("FORMAT"), "something else 1\n").unwrap();
    let err = Store::open(dir.path(), StoreConfig::default()).unwrap_err();
    assert!(matches!(err, StorageError::NotAStore { .. }), "{err:?}");
}

#[test]
fn a_store_written_by_a_newer_version_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    Store::open(dir.path(), StoreConfig::default())
        .unwrap()
        .close()
        .unwrap();
    let format = dir.path().join("FORMAT");
    assert_eq!(
        fs::read_to_string(&format).unwrap().trim(),
        format!("tern-store {STORE_VERSION}")
    );
    fs::write(&format, "tern-store 99\n").unwrap();
    let err = Store::open(dir.path(), StoreConfig::default()).unwrap_err();
    match err {
        StorageError::UnsupportedVersion {
            path,
            found,
            supported,
        } => {
            assert_eq!(path, format);
            assert_eq!(found, 99);
            assert_eq!(supported, STORE_VERSION);
        }
        other => panic!("expected UnsupportedVersion, got {other:?}"),
    }
}

#[test]
fn a_journal_written_by_a_newer_version_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    Store::open(dir.path(), StoreConfig::default())
        .unwrap()
        .close()
        .unwrap();
    let journals: Vec<PathBuf> = fs::read_dir(dir.path().join("journal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    assert_eq!(journals.len(), 1, "a closed store keeps one empty journal");
    patch_u32(&journals[0], 8, 7);
    let err = Store::open(dir.path(), StoreConfig::default()).unwrap_err();
    assert!(
        matches!(&err, StorageError::UnsupportedVersion { path, found: 7, .. } if *path == journals[0]),
        "{err:?}"
    );
}

#[test]
fn a_log_whose_identity_file_has_a_newer_version_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        append_range(&store.open_log("q", LogConfig::default()).unwrap(), 0..3);
        store.close().unwrap();
    }
    let meta = dir.path().join("logs/q/LOG");
    patch_u32(&meta, 8, 2);
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let err = store.open_log("q", LogConfig::default()).unwrap_err();
    match err {
        StorageError::UnsupportedVersion {
            path,
            found,
            supported,
        } => {
            assert_eq!(path, meta);
            assert_eq!(found, 2);
            assert!(supported < found);
        }
        other => panic!("expected UnsupportedVersion, got {other:?}"),
    }
    // Other logs of the store are unaffected.
    append_range(
        &store.open_log("other", LogConfig::default()).unwrap(),
        0..1,
    );
    store.close().unwrap();
}

#[test]
fn a_log_whose_segment_header_has_a_newer_version_is_unsupported() {
    // Both the tail segment (validated on open) and a sealed one (opened from its seal).
    for sealed in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let log_dir = dir.path().join("logs/q");
        {
            let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
            let log = store
                .open_log("q", small_segments(Durability::Never))
                .unwrap();
            append_range(&log, 0..40);
            assert!(log.segment_count() >= 2);
            store.close().unwrap();
        }
        let files = segment_files(&log_dir);
        let base = if sealed {
            files[0].0
        } else {
            files[files.len() - 1].0
        };
        let seg = segment_path(&log_dir, base);
        patch_u32(&seg, 8, 3);
        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        let err = store
            .open_log("q", small_segments(Durability::Never))
            .unwrap_err();
        assert!(
            matches!(&err, StorageError::UnsupportedVersion { path, found: 3, supported: 1 } if *path == seg),
            "sealed={sealed}: {err:?}"
        );
        store.close().unwrap();
    }
}

#[test]
fn a_log_directory_with_files_but_no_identity_is_not_a_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let stray = dir.path().join("logs/q");
    fs::create_dir_all(&stray).unwrap();
    fs::write(stray.join("README"), b"hands off").unwrap();
    let err = store.open_log("q", LogConfig::default()).unwrap_err();
    assert!(matches!(err, StorageError::NotAStore { .. }), "{err:?}");
    assert_eq!(fs::read(stray.join("README")).unwrap(), b"hands off");
    store.close().unwrap();
}

#[test]
fn opening_a_directory_that_is_already_open_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let first = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let err = Store::open(dir.path(), StoreConfig::default()).unwrap_err();
    match err {
        StorageError::Locked { path } => assert_eq!(path, dir.path()),
        other => panic!("expected Locked, got {other:?}"),
    }
    // The first store is unharmed by the failed second open.
    let log = first.open_log("q", LogConfig::default()).unwrap();
    append_range(&log, 0..2);
    first.close().unwrap();
    // Once closed, the directory can be opened again.
    let again = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let log = again.open_log("q", LogConfig::default()).unwrap();
    assert_records(&read_from(&log, Offset(0)), 0..2);
    again.close().unwrap();
}

// ---------------------------------------------------------------- names and configs

#[test]
fn invalid_log_names_are_invalid_input_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let too_long = "x".repeat(201);
    let names = [
        "",
        "..",
        ".",
        "../x",
        "a/b",
        "/abs",
        ".hidden",
        "a b",
        "tab\t",
        "ünïcode",
        "nul\0",
        too_long.as_str(),
    ];
    for name in names {
        let err = store.open_log(name, LogConfig::default()).unwrap_err();
        assert!(
            matches!(err, StorageError::InvalidInput(_)),
            "{name:?}: {err:?}"
        );
        let err = store.delete_log(name).unwrap_err();
        assert!(
            matches!(err, StorageError::InvalidInput(_)),
            "delete {name:?}: {err:?}"
        );
    }
    assert!(!dir.path().join("x").exists(), "\"../x\" escaped logs/");
    assert!(store.log_names().unwrap().is_empty());
    // The longest and most unusual valid name works.
    let ok = "a".repeat(200);
    store.open_log(&ok, LogConfig::default()).unwrap();
    store.open_log("A-z_0.9", LogConfig::default()).unwrap();
    assert_eq!(store.log_names().unwrap().len(), 2);
    store.close().unwrap();
}

#[test]
fn invalid_log_configs_are_invalid_input_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let base = LogConfig::default();
    let bad = [
        (
            "segment_bytes too small",
            LogConfig {
                segment_bytes: 4095,
                ..base.clone()
            },
        ),
        (
            "segment_bytes zero",
            LogConfig {
                segment_bytes: 0,
                ..base.clone()
            },
        ),
        (
            "segment_bytes too large",
            LogConfig {
                segment_bytes: u64::MAX,
                ..base.clone()
            },
        ),
        (
            "index_interval_bytes zero",
            LogConfig {
                index_interval_bytes: 0,
                ..base.clone()
            },
        ),
        (
            "max_batch_bytes too small",
            LogConfig {
                max_batch_bytes: 10,
                ..base.clone()
            },
        ),
        (
            "max_batch_bytes too large",
            LogConfig {
                max_batch_bytes: usize::MAX,
                ..base.clone()
            },
        ),
        (
            "zero durability interval",
            LogConfig::with_durability(Durability::Interval(Duration::ZERO)),
        ),
    ];
    for (what, config) in bad {
        let err = store.open_log("q", config).unwrap_err();
        assert!(
            matches!(err, StorageError::InvalidInput(_)),
            "{what}: {err:?}"
        );
    }
    assert!(store.log_names().unwrap().is_empty());
    // The smallest valid values are accepted.
    store
        .open_log(
            "q",
            LogConfig {
                segment_bytes: 4096,
                index_interval_bytes: 1,
                max_batch_bytes: 64,
                durability: Durability::Interval(Duration::from_millis(1)),
            },
        )
        .unwrap();
    store.close().unwrap();
}

#[test]
fn opening_an_open_log_with_a_different_config_is_invalid_input() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let log = store.open_log("q", LogConfig::default()).unwrap();
    let err = store
        .open_log("q", LogConfig::with_durability(Durability::Never))
        .unwrap_err();
    assert!(matches!(err, StorageError::InvalidInput(_)), "{err:?}");
    // The same config yields another handle to the same log.
    let again = store.open_log("q", LogConfig::default()).unwrap();
    append_range(&log, 0..1);
    assert_eq!(again.end(), Offset(1));
    store.close().unwrap();
}

// ---------------------------------------------------------------- retention

#[test]
fn retention_by_size_deletes_the_fewest_oldest_sealed_segments() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let log = store
        .open_log("q", small_segments(Durability::Never))
        .unwrap();
    append_range(&log, 0..100);
    let before = segment_files(log.dir());
    assert!(before.len() >= 5, "{} segments", before.len());
    let total: u64 = before.iter().map(|(_, s)| s).sum();
    assert_eq!(log.size_bytes(), total);

    // Under the limit: nothing happens.
    let untouched = Retention {
        max_bytes: Some(total),
        max_age: None,
    };
    assert_eq!(
        log.apply_retention(&untouched, Timestamp::now()).unwrap(),
        0
    );
    assert_eq!(
        log.apply_retention(&Retention::default(), Timestamp::now())
            .unwrap(),
        0
    );
    assert_eq!(log.segment_count(), before.len());

    let max = total / 2;
    let deleted = log
        .apply_retention(
            &Retention {
                max_bytes: Some(max),
                max_age: None,
            },
            Timestamp::now(),
        )
        .unwrap() as usize;
    assert!(deleted >= 1);
    let after = segment_files(log.dir());
    assert_eq!(after, before[deleted..], "whole segments, oldest first");
    let kept: u64 = after.iter().map(|(_, s)| s).sum();
    assert!(kept <= max, "kept {kept} bytes over a limit of {max}");
    assert!(
        kept + before[deleted - 1].1 > max,
        "deleted one segment more than needed"
    );
    assert_eq!(log.size_bytes(), kept);
    assert_eq!(log.start(), Offset(after[0].0));
    assert_eq!(log.end(), Offset(100));
    assert_records(&read_from(&log, log.start()), after[0].0..100);

    // A limit of zero deletes every sealed segment but never the active one.
    let active_base = after[after.len() - 1].0;
    let zero = Retention {
        max_bytes: Some(0),
        max_age: None,
    };
    log.apply_retention(&zero, Timestamp::now()).unwrap();
    assert_eq!(segment_files(log.dir()), after[after.len() - 1..]);
    assert_eq!(log.segment_count(), 1);
    assert_eq!(log.start(), Offset(active_base));
    assert_records(&read_from(&log, log.start()), active_base..100);
    // The log goes on accepting appends.
    append_range(&log, 100..110);
    assert_records(&read_from(&log, log.start()), active_base..110);
    store.close().unwrap();
}

#[test]
fn retention_by_age_deletes_sealed_segments_whose_newest_record_is_older() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let config = small_segments(Durability::Never);
    {
        let log = store.open_log("q", config.clone()).unwrap();
        append_range(&log, 0..100);
        log.close().unwrap();
    }
    // Reopened, sealed segments are known from their seal entries only.
    let log = store.open_log("q", config).unwrap();
    let before = segment_files(log.dir());
    let bases: Vec<u64> = before.iter().map(|(b, _)| *b).collect();
    assert!(bases.len() >= 5);

    // Record i has timestamp 1_000_000 + i * 1000: a cutoff at record 40's
    // time deletes exactly the segments whose records all precede record 40.
    let now = Timestamp(msg(100).timestamp.0);
    let age = Duration::from_millis(now.0 - msg(40).timestamp.0);
    let retention = Retention {
        max_age: Some(age),
        max_bytes: None,
    };
    let deleted = log.apply_retention(&retention, now).unwrap() as usize;
    let expected_start = base_holding(&bases, 40);
    let expected_deleted = bases.iter().filter(|&&b| b < expected_start).count();
    assert_eq!(deleted, expected_deleted);
    assert_eq!(log.start(), Offset(expected_start));
    assert_eq!(segment_files(log.dir()), before[deleted..]);
    assert_records(&read_from(&log, log.start()), expected_start..100);

    // However old, the active segment stays.
    let ancient = Retention {
        max_age: Some(Duration::from_millis(1)),
        max_bytes: None,
    };
    log.apply_retention(&ancient, Timestamp(u64::MAX / 2))
        .unwrap();
    let active_base = bases[bases.len() - 1];
    assert_eq!(log.segment_count(), 1);
    assert_eq!(log.start(), Offset(active_base));
    assert_eq!(log.end(), Offset(100));
    assert_records(&read_from(&log, log.start()), active_base..100);
    store.close().unwrap();
}

#[test]
fn delete_before_deletes_only_segments_entirely_below_the_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let log = store
        .open_log("q", small_segments(Durability::Never))
        .unwrap();
    append_range(&log, 0..100);
    let before = segment_files(log.dir());
    let bases: Vec<u64> = before.iter().map(|(b, _)| *b).collect();
    assert!(bases.len() >= 5);

    // Below the end of the first segment: nothing goes.
    assert_eq!(log.delete_before(Offset(bases[1] - 1)).unwrap(), 0);
    assert_eq!(log.start(), Offset(0));

    // Exactly the end of the second segment: the first two go.
    assert_eq!(log.delete_before(Offset(bases[2])).unwrap(), 2);
    assert_eq!(log.start(), Offset(bases[2]));
    assert_eq!(segment_files(log.dir()), before[2..]);

    // Inside a segment: that segment stays.
    let inside = bases[3] + 1;
    assert_eq!(log.delete_before(Offset(inside)).unwrap(), 1);
    assert_eq!(log.start(), Offset(bases[3]));
    assert_records(&read_from(&log, log.start()), bases[3]..100);

    // Beyond the end: every sealed segment goes, the active one stays.
    log.delete_before(Offset(u64::MAX)).unwrap();
    let active_base = bases[bases.len() - 1];
    assert_eq!(segment_files(log.dir()), before[before.len() - 1..]);
    assert_eq!(log.start(), Offset(active_base));
    assert_records(&read_from(&log, log.start()), active_base..100);
    append_range(&log, 100..101);
    store.close().unwrap();

    // Retention is durable: a reopened log starts where it left off.
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let log = store
        .open_log("q", small_segments(Durability::Never))
        .unwrap();
    assert_eq!(log.start(), Offset(active_base));
    assert_eq!(log.end(), Offset(101));
    assert_records(&read_from(&log, log.start()), active_base..101);
    store.close().unwrap();
}

// ---------------------------------------------------------------- waiting readers

#[test]
fn reader_wait_times_out_with_false_and_wakes_with_true_on_append() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let log = store.open_log("q", LogConfig::default()).unwrap();
    append_range(&log, 0..1);
    let mut reader = log.reader(Offset(1)).unwrap();

    let started = Instant::now();
    assert!(!reader.wait(Duration::from_millis(100)));
    assert!(started.elapsed() >= Duration::from_millis(100));

    let writer = log.clone();
    let appender = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        append_range(&writer, 1..2);
    });
    let started = Instant::now();
    assert!(reader.wait(Duration::from_secs(30)));
    assert!(started.elapsed() < Duration::from_secs(30));
    let got = reader.read(10, 1 << 20).unwrap();
    assert_records(&got, 1..2);
    appender.join().unwrap();

    // A record already there: no waiting at all.
    let early = log.reader(Offset(0)).unwrap();
    assert!(early.wait(Duration::ZERO));
    store.close().unwrap();
}

#[test]
fn reader_wait_returns_false_promptly_when_the_log_closes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let log = store.open_log("q", LogConfig::default()).unwrap();
    let reader = log.reader(Offset(0)).unwrap();
    let closer = log.clone();
    let handle = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        closer.close().unwrap();
    });
    let started = Instant::now();
    assert!(!reader.wait(Duration::from_secs(30)));
    assert!(started.elapsed() < Duration::from_secs(10));
    handle.join().unwrap();
    store.close().unwrap();
}

/// Runs `fut` on a fresh current-thread runtime; `None` if it is still
/// pending after `limit`.
fn block_on_within<F: std::future::Future>(limit: Duration, fut: F) -> Option<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("tokio runtime");
    rt.block_on(async { tokio::time::timeout(limit, fut).await.ok() })
}

#[test]
fn reader_wait_async_resolves_when_a_record_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let log = store.open_log("q", LogConfig::default()).unwrap();
    let mut reader = log.reader(Offset(0)).unwrap();

    // Nothing arrives: it stays pending.
    let pending = block_on_within(Duration::from_millis(100), reader.wait_async());
    assert_eq!(pending, None, "resolved with no record");

    let (tx, rx) = mpsc::channel();
    let writer = log.clone();
    let appender = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        append_range(&writer, 0..1);
        tx.send(()).unwrap();
    });
    let arrived = block_on_within(Duration::from_secs(30), reader.wait_async());
    assert_eq!(arrived, Some(true));
    rx.recv().unwrap();
    assert_records(&reader.read(10, 1 << 20).unwrap(), 0..1);
    appender.join().unwrap();

    // A record already there resolves at once.
    let early = log.reader(Offset(0)).unwrap();
    assert_eq!(
        block_on_within(Duration::from_secs(1), early.wait_async()),
        Some(true)
    );
    store.close().unwrap();
}

#[test]
fn reader_wait_async_resolves_false_when_the_log_closes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let log = store.open_log("q", LogConfig::default()).unwrap();
    let reader = log.reader(Offset(0)).unwrap();
    let closer = log.clone();
    let handle = thread::spawn(move || {
        thread::sleep(Duration::from_millis(50));
        closer.close().unwrap();
    });
    let outcome = block_on_within(Duration::from_secs(10), reader.wait_async());
    assert_eq!(
        outcome,
        Some(false),
        "wait_async must resolve to false once the log closes"
    );
    handle.join().unwrap();

    // Closing the whole store wakes async waiters too.
    let log = store.open_log("r", LogConfig::default()).unwrap();
    let reader = log.reader(Offset(0)).unwrap();
    let (tx, rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let outcome = block_on_within(Duration::from_secs(10), reader.wait_async());
        tx.send(outcome).unwrap();
    });
    thread::sleep(Duration::from_millis(50));
    store.close().unwrap();
    assert_eq!(rx.recv().unwrap(), Some(false));
    waiter.join().unwrap();
}
