//! A log: one queue's or one stream partition's ordered, durable records.
//!
//! This module owns a log's directory, its list of segments, the writer that
//! appends to the active segment and rolls it, the publication of the
//! committed end to readers and waiters, and retention. Appends with
//! [`Durability::Always`] go through the store's journal, which calls back
//! into [`LogShared::write_batch`]; other appends write here directly.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::sync::{oneshot, watch};

use crate::batch::{self, EncodedFrame};
use crate::config::{Durability, LogConfig};
use crate::error::{Result, StorageError};
use crate::journal::JournalShared;
use crate::reader::Reader;
use crate::record::{Message, Offset, Offsets, Timestamp};
use crate::recovery::RecoveryEvent;
use crate::segment::{self, ActiveSegment, CommitPoint, Savepoint, Segment};

const LOG_META: &str = "LOG";
/// Where a new log's identity is written before it is renamed into place.
const LOG_META_TMP: &str = "LOG.tmp";
const LOG_MAGIC: &[u8; 8] = b"TERNLOG\0";
pub(crate) const LOG_VERSION: u32 = 1;

/// Checks that a log name is safe to use as a directory name.
pub(crate) fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StorageError::InvalidInput(format!(
            "log name {name:?} must be 1 to 200 characters of A-Z, a-z, 0-9, '.', '_' or '-', not starting with '.'"
        )))
    }
}

/// A handle to an open log. Clones share the log; it stays open until
/// [`Log::close`] or until its store closes.
#[derive(Debug, Clone)]
pub struct Log {
    pub(crate) inner: Arc<LogShared>,
}

/// Retention limits, applied by whole sealed segments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Delete segments whose newest record is older than this.
    pub max_age: Option<Duration>,
    /// Delete the oldest segments while the log is larger than this.
    pub max_bytes: Option<u64>,
}

/// The outcome of an append: its offsets, and whether it is durable yet.
#[derive(Debug)]
pub struct Appended {
    offsets: Offsets,
    log: String,
    durable: Option<oneshot::Receiver<Result<()>>>,
}

impl Appended {
    /// The offsets assigned to the appended messages, in order.
    pub fn offsets(&self) -> Offsets {
        self.offsets
    }

    /// Blocks until the append is durable under the log's policy. Must not
    /// be called from inside an async runtime; use [`Appended::durable`] there.
    pub fn wait(self) -> Result<Offsets> {
        match self.durable {
            None => Ok(self.offsets),
            Some(rx) => match rx.blocking_recv() {
                Ok(result) => result.map(|()| self.offsets),
                Err(_) => Err(StorageError::Closed { log: self.log }),
            },
        }
    }

    /// Resolves once the append is durable under the log's policy.
    pub async fn durable(self) -> Result<Offsets> {
        match self.durable {
            None => Ok(self.offsets),
            Some(rx) => match rx.await {
                Ok(result) => result.map(|()| self.offsets),
                Err(_) => Err(StorageError::Closed { log: self.log }),
            },
        }
    }
}

/// State shared by every handle, reader and the journal.
#[derive(Debug)]
pub(crate) struct LogShared {
    pub(crate) name: String,
    pub(crate) dir: PathBuf,
    /// A random identity, so journal entries of a deleted log are never
    /// replayed into a new log that reuses its name.
    pub(crate) incarnation: u64,
    config: RwLock<LogConfig>,
    /// Every segment, oldest first; the last is the active one.
    segments: RwLock<Vec<Arc<Segment>>>,
    start: AtomicU64,
    /// One past the last committed (readable, durable per policy) offset.
    end: AtomicU64,
    /// The next offset the journal will assign. Changed only under the
    /// journal's pending lock, which is what keeps offsets dense and ordered.
    pub(crate) reserved_end: AtomicU64,
    pub(crate) writer: Mutex<LogWriter>,
    pub(crate) closed: AtomicBool,
    wait_lock: Mutex<()>,
    wait_cond: Condvar,
    watch: watch::Sender<u64>,
    pub(crate) journal: Arc<JournalShared>,
    events: Mutex<Vec<RecoveryEvent>>,
}

/// The writer's exclusive state.
#[derive(Debug)]
pub(crate) struct LogWriter {
    active: ActiveSegment,
    scratch: BytesMut,
    /// A copy of the log's `index_interval_bytes`, read on every frame.
    index_interval: u64,
    /// Written since the last fsync (for `Interval`).
    dirty: bool,
    last_sync: Instant,
}

impl LogWriter {
    pub(crate) fn savepoint(&self) -> Savepoint {
        self.active.savepoint()
    }

    pub(crate) fn rollback(&mut self, sp: Savepoint) -> Result<()> {
        self.active.rollback(sp)
    }

    /// Where a commit of everything flushed so far would put the log.
    pub(crate) fn commit_point(&self) -> CommitPoint {
        self.active.commit_point()
    }

    /// Writes the frames appended since the last flush to the segment file.
    pub(crate) fn flush(&mut self) -> Result<()> {
        self.active.flush()
    }

    pub(crate) fn sync(&mut self) -> Result<()> {
        self.active.sync()?;
        self.dirty = false;
        self.last_sync = Instant::now();
        Ok(())
    }

    pub(crate) fn end(&self) -> Offset {
        self.active.end()
    }

    pub(crate) fn active_len(&self) -> u64 {
        self.active.len()
    }

    /// Fsyncs if anything was written and `interval` has passed since the last sync.
    pub(crate) fn sync_if_due(&mut self, interval: Duration) -> Result<()> {
        if self.dirty && self.last_sync.elapsed() >= interval {
            self.sync()?;
        }
        Ok(())
    }
}

impl LogShared {
    /// Opens (creating if need be) the log in `dir`, recovering its segments.
    pub(crate) fn open(
        dir: PathBuf,
        name: &str,
        config: LogConfig,
        journal: Arc<JournalShared>,
    ) -> Result<Arc<LogShared>> {
        config.validate()?;
        let index_interval = config.index_interval_bytes;
        let mut events = Vec::new();
        let incarnation = open_meta(&dir)?;
        let mut bases = list_segments(&dir)?;
        if bases.is_empty() {
            ActiveSegment::create(&dir, Offset(0))?;
            sync_dir(&dir)?;
            bases.push(Offset(0));
        }
        let mut segments: Vec<Arc<Segment>> = Vec::with_capacity(bases.len());
        let (tail_base, sealed_bases) = match bases.split_last() {
            Some((tail, sealed)) => (*tail, sealed),
            None => (Offset(0), &[][..]),
        };
        for &base in sealed_bases {
            let seg = segment::open_sealed(&dir, base, &mut events)?;
            if let Some(prev) = segments.last() {
                check_contiguous(prev, base)?;
            }
            segments.push(seg);
        }
        let active = ActiveSegment::open_tail(&dir, tail_base, &mut events)?;
        if let Some(prev) = segments.last() {
            check_contiguous(prev, tail_base)?;
        }
        segments.push(Arc::clone(&active.seg));
        let start = segments.first().map(|s| s.base).unwrap_or_default();
        let end = active.end();
        Ok(Arc::new(LogShared {
            name: name.to_string(),
            dir,
            incarnation,
            config: RwLock::new(config),
            segments: RwLock::new(segments),
            start: AtomicU64::new(start.0),
            end: AtomicU64::new(end.0),
            reserved_end: AtomicU64::new(end.0),
            writer: Mutex::new(LogWriter {
                active,
                scratch: BytesMut::new(),
                index_interval,
                dirty: false,
                last_sync: Instant::now(),
            }),
            closed: AtomicBool::new(false),
            wait_lock: Mutex::new(()),
            wait_cond: Condvar::new(),
            watch: watch::Sender::new(end.0),
            journal,
            events: Mutex::new(events),
        }))
    }

    pub(crate) fn config(&self) -> LogConfig {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn set_config(&self, config: LogConfig) {
        self.lock_writer().index_interval = config.index_interval_bytes;
        *self.config.write().unwrap_or_else(|p| p.into_inner()) = config;
    }

    pub(crate) fn lock_writer(&self) -> MutexGuard<'_, LogWriter> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn start(&self) -> Offset {
        Offset(self.start.load(Ordering::Acquire))
    }

    pub(crate) fn end(&self) -> Offset {
        Offset(self.end.load(Ordering::Acquire))
    }

    pub(crate) fn segments(&self) -> Vec<Arc<Segment>> {
        self.segments
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The segment holding `offset`, if the log still has it.
    pub(crate) fn segment_for(&self, offset: Offset) -> Option<Arc<Segment>> {
        let segments = self.segments.read().unwrap_or_else(|p| p.into_inner());
        let i = segments.partition_point(|s| s.base <= offset);
        i.checked_sub(1).and_then(|i| segments.get(i)).cloned()
    }

    /// The segment that follows `seg`, if any.
    pub(crate) fn segment_after(&self, seg: &Segment) -> Option<Arc<Segment>> {
        let segments = self.segments.read().unwrap_or_else(|p| p.into_inner());
        segments.iter().find(|s| s.base > seg.base).cloned()
    }

    /// Makes offsets up to `end` visible and wakes every waiter.
    pub(crate) fn publish_end(&self, end: Offset) {
        self.end.store(end.0, Ordering::Release);
        self.watch.send_replace(end.0);
        self.wake_blocking();
    }

    /// Wakes every waiter, blocking and async, to re-check the log (for
    /// example because it closed): async waiters listen only to the watch.
    pub(crate) fn wake(&self) {
        self.watch.send_modify(|_| {});
        self.wake_blocking();
    }

    fn wake_blocking(&self) {
        let _guard = self.wait_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.wait_cond.notify_all();
    }

    /// Blocks until `pred` holds or `timeout` passes; returns whether it holds.
    pub(crate) fn wait_until(&self, timeout: Duration, pred: impl Fn(&LogShared) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut guard = self.wait_lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if pred(self) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            guard = self
                .wait_cond
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.watch.subscribe()
    }

    /// Seals the active segment and starts a new one if it is full.
    /// Rolling is a committed step of its own, never undone by a rollback.
    pub(crate) fn roll_if_full(&self, w: &mut LogWriter) -> Result<()> {
        let limit = self
            .config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .segment_bytes;
        if w.active.len() < limit || !w.active.has_records() {
            return Ok(());
        }
        let base = w.active.end();
        let next = ActiveSegment::create(&self.dir, base)?;
        // Sealing fsyncs: every segment but the last is durable, so damage in
        // one is corruption, never a torn write. The full segment is sealed
        // in place, so that if that fails (a full disk) it stays the active
        // one and the next append retries the roll.
        if let Err(e) = sync_dir(&self.dir).and_then(|()| w.active.seal()) {
            let _ = next.seg.delete_files();
            return Err(e);
        }
        w.active = next;
        self.segments
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::clone(&w.active.seg));
        Ok(())
    }

    /// Appends one encoded frame to the active segment, in memory; it is
    /// written by [`LogWriter::flush`] and made visible by [`LogShared::commit`].
    pub(crate) fn write_frame(&self, w: &mut LogWriter, frame: &[u8], enc: &EncodedFrame) {
        let interval = w.index_interval;
        w.active.append_frame(frame, enc, interval);
        w.dirty = true;
    }

    /// Makes a commit point visible to readers and wakes every waiter.
    pub(crate) fn publish(&self, point: &CommitPoint) {
        point.publish();
        self.publish_end(point.end());
    }

    /// Makes the writer's progress visible.
    pub(crate) fn commit(&self, w: &LogWriter) {
        w.active.commit();
        self.publish_end(w.active.end());
    }

    /// Appends without the journal (`Interval` and `Never`).
    fn append_direct(&self, messages: &[Message]) -> Result<Offsets> {
        let mut w = self.lock_writer();
        if self.closed.load(Ordering::Acquire) {
            return Err(StorageError::Closed {
                log: self.name.clone(),
            });
        }
        self.roll_if_full(&mut w)?;
        let start = w.active.end();
        let mut scratch = std::mem::take(&mut w.scratch);
        scratch.clear();
        let enc = batch::encode(&mut scratch, start, messages);
        let sp = w.savepoint();
        self.write_frame(&mut w, &scratch, &enc);
        w.scratch = scratch;
        if let Err(e) = w.flush() {
            // The in-memory state rolls back even if truncating fails; the
            // next write then overwrites whatever is left past the end.
            let _ = w.rollback(sp);
            return Err(e);
        }
        self.commit(&w);
        Ok(Offsets {
            start,
            end: enc.end(),
        })
    }

    /// Deletes sealed segments from the front while `doomed` says so.
    fn delete_front(&self, mut doomed: impl FnMut(&Segment, u64) -> bool) -> Result<u64> {
        let removed: Vec<Arc<Segment>> = {
            let mut segments = self.segments.write().unwrap_or_else(|p| p.into_inner());
            let mut total: u64 = segments.iter().map(|s| s.size()).sum();
            let mut n = 0;
            // The last segment is the active one and is never deleted.
            while n + 1 < segments.len() {
                let Some(seg) = segments.get(n) else { break };
                if !seg.is_sealed() || !doomed(seg, total) {
                    break;
                }
                total -= seg.size();
                n += 1;
            }
            let removed: Vec<_> = segments.drain(..n).collect();
            if let Some(first) = segments.first() {
                self.start.store(first.base.0, Ordering::Release);
            }
            removed
        };
        for seg in &removed {
            seg.delete_files()?;
        }
        Ok(removed.len() as u64)
    }
}

fn check_contiguous(prev: &Segment, next_base: Offset) -> Result<()> {
    if prev.end() == next_base {
        Ok(())
    } else {
        Err(StorageError::corrupt(
            &prev.path,
            prev.committed_len(),
            format!(
                "segment ends at offset {} but the next segment starts at {}",
                prev.end(),
                next_base
            ),
        ))
    }
}

fn list_segments(dir: &Path) -> Result<Vec<Offset>> {
    let mut bases = Vec::new();
    let entries =
        fs::read_dir(dir).map_err(|e| StorageError::io("listing log directory", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io("listing log directory", dir, e))?;
        if let Some(base) = entry
            .file_name()
            .to_str()
            .and_then(segment::parse_segment_name)
        {
            bases.push(base);
        }
    }
    bases.sort();
    Ok(bases)
}

/// Reads the log's identity file, creating the log directory if it is new.
fn open_meta(dir: &Path) -> Result<u64> {
    let path = dir.join(LOG_META);
    match File::open(&path) {
        Ok(mut f) => {
            let mut b = Vec::new();
            f.read_to_end(&mut b)
                .map_err(|e| StorageError::io("reading log identity", &path, e))?;
            decode_meta(&b, &path)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // A LOG.tmp alone is a creation that a crash interrupted.
            let has_content = match fs::read_dir(dir) {
                Ok(mut it) => {
                    it.any(|entry| !matches!(entry, Ok(e) if e.file_name() == LOG_META_TMP))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => return Err(StorageError::io("listing log directory", dir, e)),
            };
            if has_content {
                return Err(StorageError::NotAStore {
                    path: dir.to_path_buf(),
                    reason: format!("it has files but no {LOG_META} identity file"),
                });
            }
            fs::create_dir_all(dir)
                .map_err(|e| StorageError::io("creating log directory", dir, e))?;
            let incarnation = random_u64();
            let tmp = dir.join(LOG_META_TMP);
            File::create(&tmp)
                .and_then(|mut f| {
                    f.write_all(&encode_meta(incarnation))?;
                    f.sync_all()
                })
                .and_then(|()| fs::rename(&tmp, &path))
                .map_err(|e| StorageError::io("writing log identity", &path, e))?;
            sync_dir(dir)?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
            Ok(incarnation)
        }
        Err(e) => Err(StorageError::io("opening log identity", &path, e)),
    }
}

fn encode_meta(incarnation: u64) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..8].copy_from_slice(LOG_MAGIC);
    b[8..12].copy_from_slice(&LOG_VERSION.to_le_bytes());
    b[16..24].copy_from_slice(&incarnation.to_le_bytes());
    let crc = crc32c::crc32c(&b[0..24]);
    b[24..28].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode_meta(b: &[u8], path: &Path) -> Result<u64> {
    let not_log = |reason: &str| StorageError::NotAStore {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    let b: &[u8; 28] = b
        .try_into()
        .map_err(|_| not_log("identity file has the wrong size"))?;
    if &b[0..8] != LOG_MAGIC {
        return Err(not_log("identity file has the wrong magic"));
    }
    let version = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    if version > LOG_VERSION {
        return Err(StorageError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version,
            supported: LOG_VERSION,
        });
    }
    if crc32c::crc32c(&b[0..24]) != u32::from_le_bytes([b[24], b[25], b[26], b[27]]) {
        return Err(StorageError::corrupt(
            path,
            24,
            "log identity fails its checksum",
        ));
    }
    let mut inc = [0u8; 8];
    inc.copy_from_slice(&b[16..24]);
    Ok(u64::from_le_bytes(inc))
}

/// A random number from the OS-seeded hasher: good enough for an identity
/// that only has to differ between incarnations of one log name.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io("syncing directory", dir, e))
}

impl Log {
    /// The log's name within its store.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The directory holding the log's segments.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The first offset the log still holds.
    pub fn start(&self) -> Offset {
        self.inner.start()
    }

    /// One past the last committed offset: the offset the next record will get
    /// once everything in flight has committed.
    pub fn end(&self) -> Offset {
        self.inner.end()
    }

    /// The log's total size on disk, in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.inner.segments().iter().map(|s| s.size()).sum()
    }

    /// How many segment files the log has.
    pub fn segment_count(&self) -> usize {
        self.inner.segments().len()
    }

    /// The repairs made when the log was opened.
    pub fn recovery_events(&self) -> Vec<RecoveryEvent> {
        self.inner
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Appends a batch of messages, assigning them consecutive offsets.
    ///
    /// The returned [`Appended`] carries the offsets at once; wait on it to
    /// learn when the batch is durable under the log's [`Durability`].
    pub fn append(&self, messages: &[Message]) -> Result<Appended> {
        if messages.is_empty() {
            return Err(StorageError::InvalidInput(format!(
                "an append to log {} must hold at least one message",
                self.inner.name
            )));
        }
        let config = self.inner.config();
        let size = batch::encoded_len(messages);
        if size > config.max_batch_bytes {
            return Err(StorageError::InvalidInput(format!(
                "a batch of {size} bytes exceeds log {}'s limit of {} bytes",
                self.inner.name, config.max_batch_bytes
            )));
        }
        if messages
            .iter()
            .any(|m| m.headers.len() > u32::MAX as usize || m.body.len() > u32::MAX as usize)
        {
            return Err(StorageError::InvalidInput(
                "a message part exceeds 4 GiB".into(),
            ));
        }
        match config.durability {
            Durability::Always => {
                let (offsets, rx) = self.inner.journal.submit(&self.inner, messages)?;
                Ok(Appended {
                    offsets,
                    log: self.inner.name.clone(),
                    durable: Some(rx),
                })
            }
            Durability::Interval(_) | Durability::Never => {
                let offsets = self.inner.append_direct(messages)?;
                Ok(Appended {
                    offsets,
                    log: self.inner.name.clone(),
                    durable: None,
                })
            }
        }
    }

    /// A reader positioned at `offset`.
    pub fn reader(&self, offset: Offset) -> Result<Reader> {
        let mut r = Reader::new(Arc::clone(&self.inner));
        r.seek(offset)?;
        Ok(r)
    }

    /// A reader positioned at the first record whose timestamp is at or after
    /// `ts` (or at the end if there is none).
    pub fn reader_at_time(&self, ts: Timestamp) -> Result<Reader> {
        let mut r = Reader::new(Arc::clone(&self.inner));
        r.seek_to_time(ts)?;
        Ok(r)
    }

    /// Deletes sealed segments all of whose records are below `watermark`:
    /// the queue case, where everything before the watermark is acknowledged.
    /// Returns how many segments were deleted.
    pub fn delete_before(&self, watermark: Offset) -> Result<u64> {
        self.inner.delete_front(|seg, _| seg.end() <= watermark)
    }

    /// Deletes sealed segments by age and total size. Returns how many were deleted.
    pub fn apply_retention(&self, retention: &Retention, now: Timestamp) -> Result<u64> {
        let cutoff = retention
            .max_age
            .map(|age| Timestamp(now.0.saturating_sub(age.as_millis() as u64)));
        self.inner.delete_front(|seg, total| {
            cutoff.is_some_and(|c| seg.max_timestamp() < c)
                || retention.max_bytes.is_some_and(|max| total > max)
        })
    }

    /// Fsyncs the active segment now, whatever the durability policy.
    pub fn sync(&self) -> Result<()> {
        self.inner.lock_writer().sync()
    }

    /// Closes the log: waits for appends in flight, fsyncs, and refuses
    /// further appends. Readers may finish reading what is committed.
    pub fn close(&self) -> Result<()> {
        self.inner.journal.close_log(&self.inner);
        let inner = &self.inner;
        // Appends already handed to the journal complete (or fail) before we sync.
        inner.wait_until(Duration::from_secs(3600), |l| {
            l.end().0 >= l.reserved_end.load(Ordering::Acquire)
        });
        let result = inner.lock_writer().sync();
        inner.wake();
        result
    }
}
