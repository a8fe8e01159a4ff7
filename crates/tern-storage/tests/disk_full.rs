//! Specifies what happens when the disk fills up: an append fails with
//! [`StorageError::DiskFull`], every record acknowledged before it stays
//! readable with dense offsets, and once space frees appends continue at the
//! next offset, with nothing to repair on the next open. This holds wherever
//! the write runs out of room: in a batch, in the journal, while creating the
//! next segment, or while sealing the full one.
//!
//! The tests run on a small tmpfs, so they need to be root (or otherwise
//! allowed to mount); where mounting fails they print why and pass. tmpfs
//! ignores fsync, so ENOSPC arrives at `write`.

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use tern_storage::*;

/// Serializes the tests of this file. Each runs `mount` and `umount`, and a
/// child process holds copies of the parent's descriptors until it execs: run
/// beside another test, it could keep that test's deleted filler file
/// allocated, or its store's lock held, for a moment.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A tmpfs mounted on a temporary directory for the guard's lifetime.
struct Tmpfs {
    dir: tempfile::TempDir,
    _serial: MutexGuard<'static, ()>,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (as `mount` spells it, e.g. "2m").
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().map_err(|e| format!("no temporary directory: {e}"))?;
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "mount -t tmpfs failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            dir,
            _serial: serial,
        })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Something still holds a file open (a test failed mid-way): detach.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// Mounts a 2 MiB tmpfs, or says why the test is skipped.
fn small_disk(test: &str) -> Option<Tmpfs> {
    match Tmpfs::mount("2m") {
        Ok(fs) => Some(fs),
        Err(why) => {
            println!("skipping {test}: {why}");
            None
        }
    }
}

/// Grows a filler file until the file system is full; returns it.
fn fill_disk(path: &Path) -> File {
    let mut file = File::create(path).expect("create filler");
    let chunk = vec![0x55u8; 64 * 1024];
    loop {
        match file.write(&chunk) {
            Ok(0) => return file,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::StorageFull || e.raw_os_error() == Some(28) => {
                return file
            }
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
}

/// Shrinks the filler by `bytes`, freeing that much space.
fn free_space(filler: &File, bytes: u64) {
    let len = filler.metadata().expect("filler metadata").len();
    assert!(len >= bytes, "the filler holds only {len} bytes");
    filler.set_len(len - bytes).expect("shrink filler");
}

/// A message whose timestamp and contents are derived from `i`.
fn msg(i: u64, body_len: usize) -> Message {
    let body: Vec<u8> = (0..body_len).map(|j| (i as usize * 31 + j) as u8).collect();
    Message {
        timestamp: Timestamp(7_000_000 + i),
        headers: Vec::new().into(),
        body: body.into(),
    }
}

/// Appends message `i` alone and waits until it is durable under the log's policy.
fn append(log: &Log, i: u64, body_len: usize) -> Result<Offsets> {
    log.append(&[msg(i, body_len)])?.wait()
}

/// The body lengths of the acknowledged records, by offset: what the log must hold.
type Acked = Vec<usize>;

/// Appends message `acked.len()` with a body of `body_len` bytes and records
/// it as acknowledged if it succeeds.
fn append_next(log: &Log, acked: &mut Acked, body_len: usize) -> Result<()> {
    let i = acked.len() as u64;
    let offsets = append(log, i, body_len)?;
    assert_eq!(offsets.start, Offset(i), "offsets are dense");
    acked.push(body_len);
    Ok(())
}

/// Asserts that the log holds exactly the acknowledged records, each intact.
fn assert_holds(log: &Log, acked: &Acked) {
    assert_eq!(log.start(), Offset(0));
    assert_eq!(
        log.end(),
        Offset(acked.len() as u64),
        "the end is the count of acknowledged records"
    );
    let mut reader = log.reader(Offset(0)).expect("reader");
    let mut next = 0u64;
    loop {
        let records = reader.read(100, 1 << 20).expect("read");
        if records.is_empty() {
            break;
        }
        for r in records {
            let m = msg(next, acked[next as usize]);
            assert_eq!(r.offset, Offset(next));
            assert_eq!(r.timestamp, m.timestamp, "timestamp of {next}");
            assert_eq!(r.body, m.body, "body of {next}");
            next += 1;
        }
    }
    assert_eq!(next, acked.len() as u64, "records read back");
}

/// Asserts that `err` is a full disk while writing a file of the store in `dir`.
fn assert_disk_full(err: &StorageError, dir: &Path) {
    match err {
        StorageError::DiskFull { path, .. } => {
            assert!(err.is_disk_full());
            assert!(
                path.starts_with(dir),
                "{} is not in the store",
                path.display()
            )
        }
        other => panic!("expected DiskFull, got {other:?}"),
    }
}

/// Appends records of `body_len` bytes until one fails; returns its error.
fn append_until_full(log: &Log, acked: &mut Acked, body_len: usize) -> StorageError {
    for _ in 0..100_000 {
        if let Err(e) = append_next(log, acked, body_len) {
            return e;
        }
    }
    panic!("the disk never filled up");
}

/// Frees the filler, appends more records after the acknowledged ones, and
/// checks everything, then again after reopening the store.
fn assert_resumes(
    store: Store,
    log: Log,
    filler: (File, PathBuf),
    config: &LogConfig,
    mut acked: Acked,
) {
    let dir = store.dir().to_path_buf();
    drop(filler.0);
    fs::remove_file(&filler.1).expect("delete filler");
    for _ in 0..20 {
        append_next(&log, &mut acked, 300).expect("append after space freed");
    }
    assert_holds(&log, &acked);
    store.close().expect("close store");

    let store = Store::open(&dir, StoreConfig::default()).expect("reopen store");
    assert!(
        store.recovery_events().is_empty(),
        "{:?}",
        store.recovery_events()
    );
    let log = store.open_log("q", config.clone()).expect("reopen log");
    assert!(
        log.recovery_events().is_empty(),
        "{:?}",
        log.recovery_events()
    );
    assert_holds(&log, &acked);
    append_next(&log, &mut acked, 300).expect("append after reopen");
    store.close().expect("close store");
}

/// Fills the disk but for 256 KiB, appends until the disk is full, and
/// checks the failure, the records, and the recovery once space frees.
fn fill_then_recover(test: &str, durability: Durability) {
    let Some(disk) = small_disk(test) else { return };
    let dir = disk.path().join("store");
    let store = Store::open(&dir, StoreConfig::default()).expect("open store");
    let config = LogConfig {
        segment_bytes: 64 * 1024,
        ..LogConfig::with_durability(durability)
    };
    let log = store.open_log("q", config.clone()).expect("open log");
    let mut acked = Acked::new();
    for _ in 0..10 {
        append_next(&log, &mut acked, 1000).expect("append with room to spare");
    }
    let filler_path = disk.path().join("filler");
    let filler = fill_disk(&filler_path);
    free_space(&filler, 256 * 1024);

    let err = append_until_full(&log, &mut acked, 1000);
    assert_disk_full(&err, &dir);
    assert!(
        acked.len() > 60,
        "only {} appends fit in 256 KiB",
        acked.len()
    );
    assert_holds(&log, &acked);

    // Still full: it fails the same way, and nothing changes.
    for _ in 0..3 {
        let err = append(&log, acked.len() as u64, 1000).expect_err("append to a full disk");
        assert_disk_full(&err, &dir);
        assert_holds(&log, &acked);
    }
    // Smaller appends may fit in the space left; whatever fits stays dense.
    let err = append_until_full(&log, &mut acked, 10);
    assert_disk_full(&err, &dir);
    assert_holds(&log, &acked);
    assert_resumes(store, log, (filler, filler_path), &config, acked);
}

#[test]
fn a_full_disk_fails_durable_appends_with_disk_full_and_they_resume_once_space_frees() {
    fill_then_recover(
        "a_full_disk_fails_durable_appends_with_disk_full_and_they_resume_once_space_frees",
        Durability::Always,
    );
}

#[test]
fn a_full_disk_fails_page_cache_appends_with_disk_full_and_they_resume_once_space_frees() {
    fill_then_recover(
        "a_full_disk_fails_page_cache_appends_with_disk_full_and_they_resume_once_space_frees",
        Durability::Never,
    );
}

/// The base offsets of the log's segment files, oldest first.
fn segments_of(log: &Log) -> Vec<u64> {
    let mut bases: Vec<u64> = fs::read_dir(log.dir())
        .expect("list log dir")
        .filter_map(|e| {
            let name = e.expect("dir entry").file_name().into_string().ok()?;
            name.strip_suffix(".seg")?.parse().ok()
        })
        .collect();
    bases.sort();
    bases
}

/// The length of the log's newest segment file.
fn active_segment_len(log: &Log) -> u64 {
    let base = segments_of(log).last().copied().expect("a segment");
    fs::metadata(log.dir().join(format!("{base:020}.seg")))
        .expect("segment metadata")
        .len()
}

/// Which step of rolling to a new segment runs out of room.
#[derive(Debug, Clone, Copy)]
enum RollStep {
    /// Writing the header of the next segment's file.
    CreateNext,
    /// Writing the full segment's seal entry into its index.
    SealFull,
}

/// Appends until the active segment is full, so that the next append rolls;
/// fills the disk but for `free` bytes; and checks that the rolling append
/// fails with a full disk at `step`, again and again, and succeeds once space
/// frees.
fn full_disk_while_rolling(
    test: &str,
    config: LogConfig,
    body_len: usize,
    free: u64,
    step: RollStep,
) {
    let Some(disk) = small_disk(test) else { return };
    let dir = disk.path().join("store");
    let store = Store::open(&dir, StoreConfig::default()).expect("open store");
    let log = store.open_log("q", config.clone()).expect("open log");
    let mut acked = Acked::new();
    while active_segment_len(&log) < config.segment_bytes {
        append_next(&log, &mut acked, body_len).expect("append with room to spare");
    }
    let segments = log.segment_count();
    let filler_path = disk.path().join("filler");
    let filler = fill_disk(&filler_path);
    if free > 0 {
        free_space(&filler, free);
    }

    let full_base = segments_of(&log).last().copied().expect("a segment");
    let failing_file = match step {
        RollStep::CreateNext => format!("{:020}.seg", acked.len()),
        RollStep::SealFull => format!("{full_base:020}.idx"),
    };
    for _ in 0..3 {
        let err = append(&log, acked.len() as u64, body_len)
            .expect_err("append that must roll on a full disk");
        assert_disk_full(&err, &dir);
        assert!(
            matches!(&err, StorageError::DiskFull { path, .. } if path.ends_with(&failing_file)),
            "{step:?}: expected the disk to fill writing {failing_file}, got {err:?}"
        );
        assert_eq!(
            segments_of(&log).last(),
            Some(&full_base),
            "no half-made segment is left"
        );
        assert_holds(&log, &acked);
        assert_eq!(
            log.segment_count(),
            segments,
            "no half-made segment is visible"
        );
    }
    assert_resumes(store, log, (filler, filler_path), &config, acked);
}

#[test]
fn a_full_disk_while_creating_the_next_segment_fails_with_disk_full_and_recovers() {
    let config = LogConfig {
        segment_bytes: 8192,
        ..LogConfig::default()
    };
    for durability in [Durability::Always, Durability::Never] {
        full_disk_while_rolling(
            "a_full_disk_while_creating_the_next_segment_fails_with_disk_full_and_recovers",
            LogConfig {
                durability,
                ..config.clone()
            },
            500,
            0,
            RollStep::CreateNext,
        );
    }
}

#[test]
fn a_full_disk_while_sealing_the_full_segment_fails_with_disk_full_and_recovers() {
    // 170 batches of exactly 96 bytes, each with an index entry, fill the
    // segment and exactly one 4 KiB page of index (16 + 170 * 24 bytes), so
    // the seal entry needs a new page. Two free pages let the next segment's
    // files be created; the seal then finds the disk full.
    let frame_len = 96;
    let batches = 170;
    let config = LogConfig {
        segment_bytes: 24 + frame_len * batches,
        index_interval_bytes: 1,
        ..LogConfig::default()
    };
    let body_len = (frame_len - 32 - 16) as usize;
    for durability in [Durability::Always, Durability::Never] {
        full_disk_while_rolling(
            "a_full_disk_while_sealing_the_full_segment_fails_with_disk_full_and_recovers",
            LogConfig {
                durability,
                ..config.clone()
            },
            body_len,
            2 * 4096,
            RollStep::SealFull,
        );
    }
}
