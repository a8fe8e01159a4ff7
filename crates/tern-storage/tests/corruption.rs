//! Specifies what the storage engine does with damaged files: a damaged tail
//! of the active segment or of the journal is a torn write, cut off at the
//! last good batch and reported as a [`RecoveryEvent::TruncatedTail`]; damage
//! followed by good data, or anywhere in a sealed segment, is a
//! [`StorageError::Corrupt`] naming the file and the batch's byte position,
//! and no record is ever skipped silently; a damaged, missing or short index
//! is rebuilt from its segment, and reads by offset and by time stay correct.

use std::fs;
use std::path::{Path, PathBuf};

use tern_storage::*;

const RECORDS_PER_BATCH: u64 = 2;

/// A small message whose timestamp and contents are derived from `i`.
fn msg(i: u64) -> Message {
    Message {
        timestamp: Timestamp(5_000_000 + i * 10),
        headers: format!("h{i}").into(),
        body: format!("record number {i}").into(),
    }
}

/// A message of about 100 bytes, for logs that should span several segments.
fn wide_msg(i: u64) -> Message {
    Message {
        body: format!("record number {i:>6} ").repeat(4).into(),
        ..msg(i)
    }
}

/// Appends `batches` batches of [`RECORDS_PER_BATCH`] messages made by `make`.
fn append_batches(log: &Log, batches: std::ops::Range<u64>, make: fn(u64) -> Message) {
    for b in batches {
        let first = b * RECORDS_PER_BATCH;
        let messages: Vec<Message> = (first..first + RECORDS_PER_BATCH).map(make).collect();
        let offsets = log
            .append(&messages)
            .expect("append")
            .wait()
            .expect("durable");
        assert_eq!(offsets.start, Offset(first), "offsets are dense");
    }
}

/// Every record from `from` to the end of the log.
fn read_from(log: &Log, from: Offset) -> Vec<Record> {
    let mut reader = log.reader(from).expect("reader");
    let mut out = Vec::new();
    loop {
        let batch = reader.read(64, 1 << 20).expect("read");
        if batch.is_empty() {
            return out;
        }
        out.extend(batch);
    }
}

/// Asserts that `records` are exactly the messages `range` made by `make`.
fn assert_records(records: &[Record], range: std::ops::Range<u64>, make: fn(u64) -> Message) {
    assert_eq!(
        records.len() as u64,
        range.end - range.start,
        "record count"
    );
    for (r, i) in records.iter().zip(range) {
        let m = make(i);
        assert_eq!(r.offset, Offset(i));
        assert_eq!(r.timestamp, m.timestamp, "timestamp of {i}");
        assert_eq!(r.headers, m.headers, "headers of {i}");
        assert_eq!(r.body, m.body, "body of {i}");
    }
}

/// Asserts that every offset in `range` is found both by offset and by time.
fn assert_lookups(log: &Log, range: std::ops::Range<u64>, make: fn(u64) -> Message) {
    for i in range {
        let got = log
            .reader(Offset(i))
            .expect("reader by offset")
            .read(1, 1)
            .expect("read by offset");
        assert_eq!(got.len(), 1, "offset {i}");
        assert_eq!(got[0].offset, Offset(i));
        assert_eq!(got[0].body, make(i).body, "body of {i}");
        let by_time = log
            .reader_at_time(make(i).timestamp)
            .expect("reader by time");
        assert_eq!(by_time.position(), Offset(i), "time of {i}");
    }
}

/// The `(position, length)` of every batch frame in a segment file, walking
/// the length fields from the 24-byte header.
fn frames(seg: &Path) -> Vec<(u64, u64)> {
    let bytes = fs::read(seg).expect("read segment");
    let mut out = Vec::new();
    let mut pos = 24usize;
    while pos + 4 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        assert!(len >= 32 && pos + len <= bytes.len(), "bad frame at {pos}");
        out.push((pos as u64, len as u64));
        pos += len;
    }
    assert_eq!(pos, bytes.len(), "segment ends inside a frame");
    out
}

/// The `(position, length)` of every entry in a journal file, after its 16-byte header.
fn journal_entries(wal: &Path) -> Vec<(u64, u64)> {
    let bytes = fs::read(wal).expect("read journal");
    let mut out = Vec::new();
    let mut pos = 16usize;
    while pos < bytes.len() {
        let len = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().expect("4 bytes")) as usize;
        out.push((pos as u64, len as u64));
        pos += len;
    }
    assert_eq!(pos, bytes.len(), "journal ends inside an entry");
    out
}

/// Inverts some bits of the byte at `at`.
fn flip(path: &Path, at: u64) {
    let mut bytes = fs::read(path).expect("read file to damage");
    bytes[at as usize] ^= 0x5a;
    fs::write(path, bytes).expect("write damaged file");
}

fn set_len(path: &Path, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open file to truncate")
        .set_len(len)
        .expect("truncate");
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).expect("metadata").len()
}

/// The segment files of a log directory, oldest first.
fn segments(log_dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(log_dir)
        .expect("list log dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    out.sort();
    out
}

fn index_of(seg: &Path) -> PathBuf {
    seg.with_extension("idx")
}

/// The base offset in a segment file's name.
fn base_of(seg: &Path) -> u64 {
    seg.file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("segment name")
}

/// Copies a directory tree, as a backup tool would while the store runs.
fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create copy dir");
    for entry in fs::read_dir(from).expect("list dir to copy") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

/// Writes `batches` batches to log `q` of a new store in `dir` and closes it.
/// Returns the log's directory.
fn write_and_close(
    dir: &Path,
    config: &LogConfig,
    batches: u64,
    make: fn(u64) -> Message,
) -> PathBuf {
    let store = Store::open(dir, StoreConfig::default()).expect("open store");
    let log = store.open_log("q", config.clone()).expect("open log");
    append_batches(&log, 0..batches, make);
    let log_dir = log.dir().to_path_buf();
    store.close().expect("close store");
    log_dir
}

fn never() -> LogConfig {
    LogConfig::with_durability(Durability::Never)
}

/// Segments of 4 KiB with an index entry every 4 KiB: several index entries
/// would need more than one segment, so each sealed segment has one batch
/// entry and its seal.
fn small_segments() -> LogConfig {
    LogConfig {
        segment_bytes: 4096,
        ..never()
    }
}

/// Asserts that `err` is corruption of `path` at byte `position`.
fn assert_corrupt(err: &StorageError, path: &Path, position: u64) {
    match err {
        StorageError::Corrupt {
            path: p,
            position: at,
            reason,
        } => {
            assert_eq!(p, path, "corrupt file ({reason})");
            assert_eq!(*at, position, "corrupt position ({reason})");
            assert!(!reason.is_empty());
        }
        other => panic!(
            "expected Corrupt in {} at {position}, got {other:?}",
            path.display()
        ),
    }
}

/// Asserts that `events` is exactly one truncation of `path` at `position`,
/// discarding `discarded` bytes.
fn assert_truncated(events: &[RecoveryEvent], path: &Path, position: u64, discarded: u64) {
    assert_eq!(events.len(), 1, "{events:?}");
    match &events[0] {
        RecoveryEvent::TruncatedTail {
            path: p,
            position: at,
            discarded_bytes,
            reason,
        } => {
            assert_eq!(p, path);
            assert_eq!(*at, position, "truncation point ({reason})");
            assert_eq!(*discarded_bytes, discarded, "bytes discarded ({reason})");
        }
        other => panic!("expected TruncatedTail, got {other:?}"),
    }
}

/// Asserts that `events` is exactly one rebuild of the index `path`.
fn assert_index_rebuilt(events: &[RecoveryEvent], path: &Path) {
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(
        matches!(&events[0], RecoveryEvent::IndexRebuilt { path: p, reason } if p == path && !reason.is_empty()),
        "expected IndexRebuilt of {}, got {events:?}",
        path.display()
    );
}

/// Reopens log `q` of the store in `dir`, expecting the tail cut back to
/// `batches` batches at `position` with `discarded` bytes gone; then checks
/// that every record reads back, that appends continue densely, and that the
/// repair is permanent.
fn assert_recovers_from_torn_tail(
    dir: &Path,
    config: &LogConfig,
    seg: &Path,
    batches: u64,
    position: u64,
    discarded: u64,
) {
    let store = Store::open(dir, StoreConfig::default()).expect("reopen store");
    assert!(
        store.recovery_events().is_empty(),
        "{:?}",
        store.recovery_events()
    );
    let log = store.open_log("q", config.clone()).expect("reopen log");
    assert_truncated(&log.recovery_events(), seg, position, discarded);
    assert_eq!(
        file_len(seg),
        position,
        "the file now ends at the truncation point"
    );
    let end = batches * RECORDS_PER_BATCH;
    assert_eq!(log.end(), Offset(end));
    assert_records(&read_from(&log, Offset(0)), 0..end, msg);
    assert_lookups(&log, 0..end, msg);
    append_batches(&log, batches..batches + 2, msg);
    store.close().expect("close store");

    let store = Store::open(dir, StoreConfig::default()).expect("reopen store again");
    let log = store
        .open_log("q", config.clone())
        .expect("reopen log again");
    assert!(
        log.recovery_events().is_empty(),
        "{:?}",
        log.recovery_events()
    );
    let end = (batches + 2) * RECORDS_PER_BATCH;
    assert_eq!(log.end(), Offset(end));
    assert_records(&read_from(&log, Offset(0)), 0..end, msg);
    store.close().expect("close store");
}

// ---------------------------------------------------------------- the tail of the active segment

#[test]
fn a_flipped_byte_in_the_last_batch_is_cut_off_as_a_torn_tail() {
    for durability in [Durability::Never, Durability::Always] {
        // Damage in the frame header's length, checksum, magic and base
        // offset, and in the records.
        for at_in_batch in [0, 4, 8, 20, 40] {
            let dir = tempfile::tempdir().unwrap();
            let config = LogConfig::with_durability(durability);
            let log_dir = write_and_close(dir.path(), &config, 10, msg);
            let seg = &segments(&log_dir)[0];
            let (pos, len) = *frames(seg).last().unwrap();
            flip(seg, pos + at_in_batch);
            assert_recovers_from_torn_tail(dir.path(), &config, seg, 9, pos, len);
        }
    }
}

#[test]
fn a_batch_torn_mid_write_is_cut_off_at_its_start() {
    let config = never();
    // Torn inside the frame header and inside the records.
    for cut in [1, 4, 31, 32, 33] {
        let dir = tempfile::tempdir().unwrap();
        let log_dir = write_and_close(dir.path(), &config, 10, msg);
        let seg = &segments(&log_dir)[0];
        let (pos, len) = *frames(seg).last().unwrap();
        let cut = cut.min(len - 1);
        set_len(seg, pos + cut);
        assert_recovers_from_torn_tail(dir.path(), &config, seg, 9, pos, cut);
    }
}

#[test]
fn garbage_after_the_last_batch_is_cut_off() {
    let config = never();
    for garbage in [vec![0u8; 5], vec![0u8; 100], vec![0xee; 3000]] {
        let dir = tempfile::tempdir().unwrap();
        let log_dir = write_and_close(dir.path(), &config, 10, msg);
        let seg = &segments(&log_dir)[0];
        let good_len = file_len(seg);
        let mut bytes = fs::read(seg).unwrap();
        bytes.extend_from_slice(&garbage);
        fs::write(seg, bytes).unwrap();
        assert_recovers_from_torn_tail(
            dir.path(),
            &config,
            seg,
            10,
            good_len,
            garbage.len() as u64,
        );
    }
}

#[test]
fn a_torn_tail_in_an_indexed_last_batch_also_rebuilds_the_index() {
    // With an index entry per batch, the last entry points at the damaged
    // batch itself: the index cannot be trusted and is rebuilt from the start.
    let config = LogConfig {
        index_interval_bytes: 1,
        ..never()
    };
    let dir = tempfile::tempdir().unwrap();
    let log_dir = write_and_close(dir.path(), &config, 10, msg);
    let seg = &segments(&log_dir)[0];
    let (pos, len) = *frames(seg).last().unwrap();
    flip(seg, pos + 40);
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let log = store.open_log("q", config.clone()).unwrap();
    let events = log.recovery_events();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(
        matches!(&events[0], RecoveryEvent::IndexRebuilt { path, .. } if *path == index_of(seg)),
        "{events:?}"
    );
    assert_truncated(&events[1..], seg, pos, len);
    assert_eq!(log.end(), Offset(9 * RECORDS_PER_BATCH));
    assert_lookups(&log, 0..9 * RECORDS_PER_BATCH, msg);
    append_batches(&log, 9..11, msg);
    assert_records(&read_from(&log, Offset(0)), 0..11 * RECORDS_PER_BATCH, msg);
    store.close().unwrap();
}

// ---------------------------------------------------------------- damage followed by good data

#[test]
fn a_flipped_byte_mid_tail_segment_after_its_last_index_entry_fails_the_open() {
    // With the default index interval, the small tail segment has a single
    // index entry (its first batch), so opening validates every batch.
    let config = never();
    for (batch, at_in_batch) in [(5, 40), (5, 0), (5, 8), (0, 40), (8, 40)] {
        let dir = tempfile::tempdir().unwrap();
        let log_dir = write_and_close(dir.path(), &config, 10, msg);
        let seg = &segments(&log_dir)[0];
        let (pos, _) = frames(seg)[batch];
        let len_before = file_len(seg);
        flip(seg, pos + at_in_batch);
        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        let err = store.open_log("q", config.clone()).unwrap_err();
        assert_corrupt(&err, seg, pos);
        assert_eq!(file_len(seg), len_before, "nothing was truncated");
        // It stays an error: the batches after the damage are never dropped.
        let err = store.open_log("q", config.clone()).unwrap_err();
        assert_corrupt(&err, seg, pos);
        store.close().unwrap();
    }
}

#[test]
fn a_flipped_byte_before_the_tail_segments_last_index_entry_is_an_error_on_read() {
    // An index entry per batch: opening validates only the last batch, so
    // the damage in batch 5 is found by the first read that reaches it.
    let config = LogConfig {
        index_interval_bytes: 1,
        ..never()
    };
    let dir = tempfile::tempdir().unwrap();
    let log_dir = write_and_close(dir.path(), &config, 10, msg);
    let seg = &segments(&log_dir)[0];
    let (pos, _) = frames(seg)[5];
    flip(seg, pos + 40);
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let log = store.open_log("q", config).unwrap();
    assert!(
        log.recovery_events().is_empty(),
        "{:?}",
        log.recovery_events()
    );
    assert_eq!(log.end(), Offset(10 * RECORDS_PER_BATCH));
    let damaged = Offset(5 * RECORDS_PER_BATCH);

    // A read that runs into the damage fails and returns nothing, and the
    // reader does not move past records it did not return.
    let mut reader = log.reader(Offset(0)).unwrap();
    assert_corrupt(&reader.read(1000, 1 << 20).unwrap_err(), seg, pos);
    assert_eq!(reader.position(), Offset(0));
    // The records before the damage can be read; the damage is never skipped.
    assert_records(
        &reader.read(damaged.0 as usize, 1 << 20).unwrap(),
        0..damaged.0,
        msg,
    );
    for _ in 0..3 {
        assert_corrupt(&reader.read(1000, 1 << 20).unwrap_err(), seg, pos);
        assert_eq!(reader.position(), damaged);
    }
    // Seeking into the damaged batch, by offset or by time, fails the same way.
    let mut inside = log.reader(Offset(damaged.0 + 1)).unwrap();
    assert_corrupt(&inside.read(10, 1 << 20).unwrap_err(), seg, pos);
    assert_corrupt(
        &log.reader_at_time(msg(damaged.0).timestamp).unwrap_err(),
        seg,
        pos,
    );
    // What follows the damage is still reachable by seeking past it.
    let after = Offset(damaged.0 + RECORDS_PER_BATCH);
    assert_records(
        &read_from(&log, after),
        after.0..10 * RECORDS_PER_BATCH,
        msg,
    );
    store.close().unwrap();
}

#[test]
fn a_flipped_byte_in_a_sealed_segment_is_an_error_on_read_never_a_truncation() {
    let config = small_segments();
    let dir = tempfile::tempdir().unwrap();
    let log_dir = write_and_close(dir.path(), &config, 100, wide_msg);
    let segs = segments(&log_dir);
    assert!(segs.len() >= 4, "{} segments", segs.len());
    let total = 100 * RECORDS_PER_BATCH;

    // A batch in the middle of the first segment, and the very last batch of
    // the second: sealed segments were fsynced, so neither is a torn write.
    let (mid_pos, _) = frames(&segs[0])[3];
    flip(&segs[0], mid_pos + 50);
    let (last_pos, _) = *frames(&segs[1]).last().unwrap();
    flip(&segs[1], last_pos + 50);
    let lens: Vec<u64> = segs.iter().map(|s| file_len(s)).collect();

    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let log = store.open_log("q", config).unwrap();
    assert!(
        log.recovery_events().is_empty(),
        "{:?}",
        log.recovery_events()
    );
    assert_eq!(log.end(), Offset(total));

    let mut reader = log.reader(Offset(0)).unwrap();
    assert_corrupt(&reader.read(1000, 1 << 20).unwrap_err(), &segs[0], mid_pos);
    assert_eq!(reader.position(), Offset(0));
    assert_records(
        &reader
            .read(3 * RECORDS_PER_BATCH as usize, 1 << 20)
            .unwrap(),
        0..6,
        wide_msg,
    );
    assert_corrupt(&reader.read(1000, 1 << 20).unwrap_err(), &segs[0], mid_pos);

    let second = base_of(&segs[1]);
    let mut reader = log.reader(Offset(second)).unwrap();
    assert_corrupt(&reader.read(1000, 1 << 20).unwrap_err(), &segs[1], last_pos);
    assert_eq!(reader.position(), Offset(second));

    // Segments after the damage read normally.
    let third = base_of(&segs[2]);
    assert_records(&read_from(&log, Offset(third)), third..total, wide_msg);
    // Nothing was cut off any file.
    let after: Vec<u64> = segs.iter().map(|s| file_len(s)).collect();
    assert_eq!(after, lens);
    store.close().unwrap();
}

#[test]
fn a_flipped_byte_in_a_sealed_segment_whose_seal_is_damaged_fails_the_open() {
    let config = small_segments();
    let dir = tempfile::tempdir().unwrap();
    let log_dir = write_and_close(dir.path(), &config, 100, wide_msg);
    let segs = segments(&log_dir);
    let (pos, _) = frames(&segs[1])[4];
    flip(&segs[1], pos + 50);
    // The seal is the last entry; without it the segment is validated in full.
    let idx = index_of(&segs[1]);
    flip(&idx, file_len(&idx) - 3);
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let err = store.open_log("q", config).unwrap_err();
    assert_corrupt(&err, &segs[1], pos);
    store.close().unwrap();
}

// ---------------------------------------------------------------- indexes

/// How to damage an index file.
#[derive(Debug, Clone, Copy)]
enum IndexDamage {
    FlipLastEntry,
    FlipFirstEntry,
    FlipMagic,
    Delete,
    CutInsideHeader,
    CutToHeader,
}

const INDEX_DAMAGE: [IndexDamage; 6] = [
    IndexDamage::FlipLastEntry,
    IndexDamage::FlipFirstEntry,
    IndexDamage::FlipMagic,
    IndexDamage::Delete,
    IndexDamage::CutInsideHeader,
    IndexDamage::CutToHeader,
];

fn damage_index(idx: &Path, damage: IndexDamage) {
    match damage {
        IndexDamage::FlipLastEntry => flip(idx, file_len(idx) - 10),
        IndexDamage::FlipFirstEntry => flip(idx, 16 + 5),
        IndexDamage::FlipMagic => flip(idx, 2),
        IndexDamage::Delete => fs::remove_file(idx).expect("delete index"),
        IndexDamage::CutInsideHeader => set_len(idx, 10),
        IndexDamage::CutToHeader => set_len(idx, 16),
    }
}

#[test]
fn a_damaged_or_missing_tail_index_is_rebuilt_and_reported() {
    // An entry every 256 bytes gives the single tail segment many entries.
    let config = LogConfig {
        index_interval_bytes: 256,
        ..never()
    };
    for damage in INDEX_DAMAGE {
        let dir = tempfile::tempdir().unwrap();
        let log_dir = write_and_close(dir.path(), &config, 60, wide_msg);
        let segs = segments(&log_dir);
        assert_eq!(segs.len(), 1);
        let idx = index_of(&segs[0]);
        assert!(
            file_len(&idx) > 16 + 5 * 24,
            "the index has several entries"
        );
        damage_index(&idx, damage);

        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        let log = store.open_log("q", config.clone()).unwrap();
        let events = log.recovery_events();
        if matches!(damage, IndexDamage::CutToHeader) {
            // An index holding no entries yet is merely behind: it is
            // extended from the segment without any complaint.
            assert!(events.is_empty(), "{damage:?}: {events:?}");
        } else {
            assert_index_rebuilt(&events, &idx);
        }
        let end = 60 * RECORDS_PER_BATCH;
        assert_eq!(log.end(), Offset(end), "{damage:?}");
        assert_records(&read_from(&log, Offset(0)), 0..end, wide_msg);
        assert_lookups(&log, 0..end, wide_msg);
        append_batches(&log, 60..62, wide_msg);
        store.close().unwrap();

        // The rebuilt index is written back: the next open has nothing to repair.
        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        let log = store.open_log("q", config.clone()).unwrap();
        assert!(
            log.recovery_events().is_empty(),
            "{damage:?}: {:?}",
            log.recovery_events()
        );
        assert_lookups(&log, 0..62 * RECORDS_PER_BATCH, wide_msg);
        store.close().unwrap();
    }
}

#[test]
fn a_tail_index_cut_short_is_extended_without_complaint() {
    // The index is never fsynced, so after a crash it may lag its segment.
    let config = LogConfig {
        index_interval_bytes: 256,
        ..never()
    };
    for cut_entries in [1.0, 1.5, 3.0] {
        let dir = tempfile::tempdir().unwrap();
        let log_dir = write_and_close(dir.path(), &config, 60, wide_msg);
        let idx = index_of(&segments(&log_dir)[0]);
        set_len(&idx, 16 + (24.0 * cut_entries) as u64);
        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        let log = store.open_log("q", config.clone()).unwrap();
        assert!(
            log.recovery_events().is_empty(),
            "{:?}",
            log.recovery_events()
        );
        assert!(file_len(&idx) > 16 + 24 * 3, "the index was extended");
        assert_lookups(&log, 0..60 * RECORDS_PER_BATCH, wide_msg);
        store.close().unwrap();
    }
}

#[test]
fn a_sealed_segments_damaged_or_missing_seal_is_rebuilt_on_open_and_reported() {
    let config = LogConfig {
        segment_bytes: 16 * 1024,
        ..never()
    };
    let damages = [
        IndexDamage::FlipLastEntry,
        IndexDamage::FlipMagic,
        IndexDamage::Delete,
        IndexDamage::CutInsideHeader,
        IndexDamage::CutToHeader,
    ];
    for damage in damages {
        let dir = tempfile::tempdir().unwrap();
        let log_dir = write_and_close(dir.path(), &config, 200, wide_msg);
        let segs = segments(&log_dir);
        assert!(segs.len() >= 3, "{} segments", segs.len());
        let idx = index_of(&segs[1]);
        let original = fs::read(&idx).unwrap();
        damage_index(&idx, damage);

        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        let log = store.open_log("q", config.clone()).unwrap();
        assert_index_rebuilt(&log.recovery_events(), &idx);
        // The rebuilt index is the one the writer wrote.
        assert_eq!(fs::read(&idx).unwrap(), original, "{damage:?}");
        let end = 200 * RECORDS_PER_BATCH;
        assert_eq!(log.end(), Offset(end));
        assert_records(&read_from(&log, Offset(0)), 0..end, wide_msg);
        assert_lookups(&log, 0..end, wide_msg);
        store.close().unwrap();
    }
}

#[test]
fn a_sealed_segments_damaged_index_body_is_rebuilt_on_first_use() {
    // Opening reads only the seal entry; a damaged entry before it is found,
    // and quietly rebuilt, when a read first needs the index.
    let config = LogConfig {
        segment_bytes: 16 * 1024,
        ..never()
    };
    let dir = tempfile::tempdir().unwrap();
    let log_dir = write_and_close(dir.path(), &config, 200, wide_msg);
    let segs = segments(&log_dir);
    assert!(segs.len() >= 3, "{} segments", segs.len());
    let idx = index_of(&segs[0]);
    let original = fs::read(&idx).unwrap();
    assert!(original.len() >= 16 + 3 * 24, "batch entries and a seal");
    flip(&idx, 16 + 24 + 6);
    let damaged = fs::read(&idx).unwrap();

    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let log = store.open_log("q", config).unwrap();
    assert!(
        log.recovery_events().is_empty(),
        "{:?}",
        log.recovery_events()
    );
    assert_eq!(fs::read(&idx).unwrap(), damaged, "not read yet");
    let end = 200 * RECORDS_PER_BATCH;
    assert_lookups(&log, 0..end, wide_msg);
    assert_records(&read_from(&log, Offset(0)), 0..end, wide_msg);
    assert_eq!(
        fs::read(&idx).unwrap(),
        original,
        "rewritten as the writer wrote it"
    );
    store.close().unwrap();
}

// ---------------------------------------------------------------- the journal

/// Appends `batches` durable batches to an `Always` log and copies the data
/// directory while the store is still open, so that the copy holds the
/// journal before any checkpoint. Returns the copy's journal file and the
/// log's segment in the copy.
fn copy_with_live_journal(dir: &Path, copy: &Path, batches: u64) -> (PathBuf, PathBuf) {
    let config = StoreConfig {
        single_log_commits_skip_journal: false,
        ..StoreConfig::default()
    };
    let store = Store::open(dir, config).expect("open store");
    let log = store.open_log("q", LogConfig::default()).expect("open log");
    append_batches(&log, 0..batches, msg);
    copy_dir(dir, copy);
    store.close().expect("close store");
    let journal: Vec<PathBuf> = fs::read_dir(copy.join("journal"))
        .expect("list journal")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    assert_eq!(journal.len(), 1, "{journal:?}");
    let wal = journal.into_iter().next().expect("one journal file");
    assert_eq!(
        journal_entries(&wal).len() as u64,
        batches,
        "one entry per batch"
    );
    let seg = segments(&copy.join("logs/q"))
        .into_iter()
        .next()
        .expect("a segment");
    (wal, seg)
}

#[test]
fn a_damaged_last_journal_entry_is_cut_off_and_the_rest_replayed() {
    for damage in ["flip", "tear"] {
        let dir = tempfile::tempdir().unwrap();
        let copy = tempfile::tempdir().unwrap();
        let copy = copy.path().join("store");
        let (wal, seg) = copy_with_live_journal(dir.path(), &copy, 10);
        let entries = journal_entries(&wal);
        let (last_pos, last_len) = *entries.last().unwrap();
        match damage {
            "flip" => flip(&wal, last_pos + last_len - 5),
            _ => set_len(&wal, last_pos + last_len / 2),
        }
        let discarded = file_len(&wal) - last_pos;
        // The segment lost its last four batches (their fsync was still due
        // at the checkpoint), so the journal must restore three of them.
        set_len(&seg, frames(&seg)[6].0);

        let store = Store::open(&copy, StoreConfig::default()).unwrap();
        let events = store.recovery_events().to_vec();
        assert_eq!(events.len(), 2, "{damage}: {events:?}");
        assert_truncated(&events[..1], &wal, last_pos, discarded);
        assert_eq!(
            events[1],
            RecoveryEvent::Replayed {
                log: "q".into(),
                records: 3 * RECORDS_PER_BATCH
            }
        );
        let log = store.open_log("q", LogConfig::default()).unwrap();
        assert!(
            log.recovery_events().is_empty(),
            "{:?}",
            log.recovery_events()
        );
        let end = 9 * RECORDS_PER_BATCH;
        assert_eq!(log.end(), Offset(end));
        assert_records(&read_from(&log, Offset(0)), 0..end, msg);
        append_batches(&log, 9..11, msg);
        store.close().unwrap();

        let store = Store::open(&copy, StoreConfig::default()).unwrap();
        assert!(
            store.recovery_events().is_empty(),
            "{:?}",
            store.recovery_events()
        );
        let log = store.open_log("q", LogConfig::default()).unwrap();
        assert_records(&read_from(&log, Offset(0)), 0..11 * RECORDS_PER_BATCH, msg);
        store.close().unwrap();
    }
}

#[test]
fn a_damaged_journal_entry_followed_by_good_ones_fails_the_open() {
    for (entry, at) in [(4, 30), (4, 0), (0, 60), (8, 9)] {
        let dir = tempfile::tempdir().unwrap();
        let copy = tempfile::tempdir().unwrap();
        let copy = copy.path().join("store");
        let (wal, _) = copy_with_live_journal(dir.path(), &copy, 10);
        let (pos, _) = journal_entries(&wal)[entry];
        flip(&wal, pos + at);
        let len_before = file_len(&wal);
        let err = Store::open(&copy, StoreConfig::default()).unwrap_err();
        assert_corrupt(&err, &wal, pos);
        assert_eq!(file_len(&wal), len_before, "the journal is kept as it is");
        let err = Store::open(&copy, StoreConfig::default()).unwrap_err();
        assert_corrupt(&err, &wal, pos);
    }
}
