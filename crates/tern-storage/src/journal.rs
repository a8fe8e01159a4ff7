//! The store's shared write-ahead journal and its group commit.
//!
//! Every append to a log with [`Durability::Always`](crate::Durability::Always)
//! is encoded once, under one lock, into the journal's pending buffer. A
//! single writer thread takes everything pending, writes it to the journal
//! file with one `write`, copies each batch into its log's active segment (page
//! cache only), and then issues one `fdatasync` on the journal that covers
//! every log in the commit. Only then do the logs' committed ends advance and
//! the appenders' completions fire. While one commit is syncing, the next one
//! accumulates: that is the group commit.
//!
//! Segments are fsynced lazily, at checkpoints: once the journal file passes
//! [`StoreConfig::journal_checkpoint_bytes`], every log written since the last
//! checkpoint is fsynced, a new journal file starts and the old one is deleted.
//! Recovery replays whatever journal files remain into the logs' segments.
//!
//! ```text
//! journal/<sequence, 20 digits>.wal
//! header (16 bytes): magic "TERNWAL\0", u32 version, u32 reserved
//! entry: u32 crc32c (of the next 14 + name_len bytes), u32 entry_len,
//!        u64 log incarnation, u16 name_len, log name, batch frame
//! ```

use std::collections::HashMap;
use std::fs::{self, File};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};

use bytes::{BufMut, BytesMut};
use tokio::sync::oneshot;

use crate::batch::{self, EncodedFrame, FrameHeader};
use crate::config::StoreConfig;
use crate::error::{Result, StorageError};
use crate::log::{sync_dir, LogShared};
use crate::record::{Message, Offset, Offsets};
use crate::recovery::RecoveryEvent;
use crate::segment::any_valid_frame;
use crate::segment::{CommitPoint, Segment};

const JOURNAL_MAGIC: &[u8; 8] = b"TERNWAL\0";
pub(crate) const JOURNAL_VERSION: u32 = 1;
const JOURNAL_HEADER_LEN: u64 = 16;
const ENTRY_FIXED_LEN: usize = 18;

/// State shared between appenders and the writer thread.
#[derive(Debug)]
pub(crate) struct JournalShared {
    dir: PathBuf,
    store_dir: PathBuf,
    config: StoreConfig,
    pending: Mutex<Pending>,
    has_work: Condvar,
    has_room: Condvar,
    stats: Counters,
}

/// Counters of the journal's work since the store opened.
#[derive(Debug, Default)]
struct Counters {
    commits: AtomicU64,
    batches: AtomicU64,
    records: AtomicU64,
    bytes: AtomicU64,
    checkpoints: AtomicU64,
    fsync: FsyncCounters,
}

/// The upper bounds, in seconds, of the fsync latency histogram's buckets
/// (the last bucket, `+Inf`, is implied). They span what disks do: tens of
/// microseconds for a write cache, tens of milliseconds for a busy disk.
pub const FSYNC_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0,
];

/// Atomic counters behind [`FsyncHistogram`]: one per bucket (not
/// cumulative) plus `+Inf`, and the total time.
#[derive(Debug, Default)]
struct FsyncCounters {
    buckets: [AtomicU64; FSYNC_BUCKETS.len() + 1],
    nanos: AtomicU64,
}

impl FsyncCounters {
    fn record(&self, took: std::time::Duration) {
        let secs = took.as_secs_f64();
        let i = FSYNC_BUCKETS
            .iter()
            .position(|le| secs <= *le)
            .unwrap_or(FSYNC_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// How long the commits' fsyncs took since the store opened, as a
/// Prometheus-style histogram: `counts[i]` fsyncs took at most
/// `FSYNC_BUCKETS[i]` seconds (cumulative, as Prometheus buckets are), and
/// `count` is all of them (the `+Inf` bucket).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FsyncHistogram {
    /// Cumulative counts per bucket of [`FSYNC_BUCKETS`].
    pub counts: [u64; FSYNC_BUCKETS.len()],
    /// Every fsync timed.
    pub count: u64,
    /// Their total duration, in seconds.
    pub sum_seconds: f64,
}

/// What the journal has done since the store opened, for monitoring and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Group commits, each ending in exactly one fdatasync: of the journal,
    /// or of the one segment written when a commit touches a single log.
    pub commits: u64,
    /// Appended batches covered by those commits.
    pub batches: u64,
    /// Records covered by those commits.
    pub records: u64,
    /// Bytes written to the journal.
    pub bytes: u64,
    /// Checkpoints taken (segments fsynced and a journal file retired).
    pub checkpoints: u64,
}

#[derive(Debug, Default)]
struct Pending {
    buf: BytesMut,
    entries: Vec<Entry>,
    failed: Option<String>,
    shutdown: bool,
}

#[derive(Debug)]
struct Entry {
    log: Arc<LogShared>,
    entry_start: usize,
    frame: Range<usize>,
    enc: EncodedFrame,
    done: oneshot::Sender<Result<()>>,
}

impl JournalShared {
    pub(crate) fn new(store_dir: &Path, config: StoreConfig) -> Arc<JournalShared> {
        Arc::new(JournalShared {
            dir: store_dir.join("journal"),
            store_dir: store_dir.to_path_buf(),
            config,
            pending: Mutex::new(Pending::default()),
            has_work: Condvar::new(),
            has_room: Condvar::new(),
            stats: Counters::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a batch for the next group commit and assigns its offsets.
    pub(crate) fn submit(
        &self,
        log: &Arc<LogShared>,
        messages: &[Message],
    ) -> Result<(Offsets, oneshot::Receiver<Result<()>>)> {
        let name = log.name.as_bytes();
        let need = ENTRY_FIXED_LEN + name.len() + batch::encoded_len(messages);
        let mut p = self.lock();
        loop {
            if let Some(reason) = &p.failed {
                return Err(StorageError::Failed {
                    path: self.store_dir.clone(),
                    reason: reason.clone(),
                });
            }
            if p.shutdown || log.closed.load(Ordering::Acquire) {
                return Err(StorageError::Closed {
                    log: log.name.clone(),
                });
            }
            if p.buf.is_empty() || p.buf.len() + need <= self.config.max_pending_bytes {
                break;
            }
            p = self.has_room.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        let base = Offset(log.reserved_end.load(Ordering::Acquire));
        let entry_start = p.buf.len();
        p.buf.put_u32_le(0); // checksum, patched below
        p.buf.put_u32_le(need as u32);
        p.buf.put_u64_le(log.incarnation);
        p.buf.put_u16_le(name.len() as u16);
        p.buf.put_slice(name);
        let frame_start = p.buf.len();
        let enc = batch::encode(&mut p.buf, base, messages);
        let crc = crc32c::crc32c(&p.buf[entry_start + 4..frame_start]);
        p.buf[entry_start..entry_start + 4].copy_from_slice(&crc.to_le_bytes());
        log.reserved_end.store(enc.end().0, Ordering::Release);
        let (done, rx) = oneshot::channel();
        let frame = frame_start..p.buf.len();
        p.entries.push(Entry {
            log: Arc::clone(log),
            entry_start,
            frame,
            enc,
            done,
        });
        // The writer only sleeps when nothing is pending, so only the batch
        // that makes the queue non-empty needs to wake it.
        let first = p.entries.len() == 1;
        drop(p);
        if first {
            self.has_work.notify_one();
        }
        Ok((
            Offsets {
                start: base,
                end: enc.end(),
            },
            rx,
        ))
    }

    /// Marks a log closed so that no further batch for it is queued.
    pub(crate) fn close_log(&self, log: &LogShared) {
        let _p = self.lock();
        log.closed.store(true, Ordering::Release);
    }

    /// Asks the writer to drain what is pending and stop.
    pub(crate) fn shutdown(&self) {
        self.lock().shutdown = true;
        self.has_work.notify_all();
        self.has_room.notify_all();
    }
}

/// The writer thread's state: the open journal file and the logs to
/// checkpoint.
#[derive(Debug)]
pub(crate) struct JournalWriter {
    shared: Arc<JournalShared>,
    file: Arc<File>,
    path: PathBuf,
    seq: u64,
    len: u64,
    spare: BytesMut,
    dirty_logs: HashMap<usize, Arc<LogShared>>,
}

fn journal_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:020}.wal"))
}

fn create_journal_file(dir: &Path, seq: u64) -> Result<(File, PathBuf)> {
    let path = journal_path(dir, seq);
    let mut header = [0u8; JOURNAL_HEADER_LEN as usize];
    header[0..8].copy_from_slice(JOURNAL_MAGIC);
    header[8..12].copy_from_slice(&JOURNAL_VERSION.to_le_bytes());
    let file = File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .and_then(|f| {
            f.write_all_at(&header, 0)?;
            f.sync_all()?;
            Ok(f)
        })
        .map_err(|e| StorageError::io("creating journal file", &path, e))?;
    sync_dir(dir)?;
    Ok((file, path))
}

impl JournalWriter {
    /// Starts a fresh journal file numbered `seq`.
    pub(crate) fn create(shared: Arc<JournalShared>, seq: u64) -> Result<JournalWriter> {
        let (file, path) = create_journal_file(&shared.dir, seq)?;
        Ok(JournalWriter {
            shared,
            file: Arc::new(file),
            path,
            seq,
            len: JOURNAL_HEADER_LEN,
            spare: BytesMut::new(),
            dirty_logs: HashMap::new(),
        })
    }

    /// The writer thread's loop; returns after a shutdown, once drained.
    ///
    /// Commits are pipelined over two threads: this one writes commit N+1
    /// while the sync thread fsyncs commit N, publishes it and completes its
    /// appends. The hand-over is a rendezvous, so at most one commit waits
    /// for its fsync while the next is written, and commits complete in order.
    pub(crate) fn run(mut self) {
        let (jobs, inbox) = mpsc::sync_channel::<SyncJob>(0);
        let shared = Arc::clone(&self.shared);
        let syncer = std::thread::Builder::new()
            .name("tern-journal-sync".into())
            .spawn(move || run_sync(&shared, inbox));
        let syncer = match syncer {
            Ok(handle) => handle,
            Err(e) => {
                let err = StorageError::io(
                    "starting the journal sync thread for",
                    &self.shared.store_dir,
                    e,
                );
                self.fail(Vec::new(), err);
                return;
            }
        };
        loop {
            let (buf, entries) = {
                let mut p = self.shared.lock();
                while p.entries.is_empty() && !p.shutdown {
                    p = self
                        .shared
                        .has_work
                        .wait(p)
                        .unwrap_or_else(|e| e.into_inner());
                }
                if p.entries.is_empty() {
                    break;
                }
                let spare = std::mem::take(&mut self.spare);
                (
                    std::mem::replace(&mut p.buf, spare),
                    std::mem::take(&mut p.entries),
                )
            };
            self.shared.has_room.notify_all();
            let mut entries = entries;
            while !entries.is_empty() {
                if let Some(reason) = self.shared.failure() {
                    let err = StorageError::Failed {
                        path: self.shared.store_dir.clone(),
                        reason,
                    };
                    self.fail(entries, err);
                    break;
                }
                // A log's segment may roll only between commits, so a commit
                // stops before the batch that would overfill a segment.
                let n = rollover_prefix(&entries);
                let rest = entries.split_off(n);
                match self.prepare(&buf, &entries) {
                    Ok((target, points)) => {
                        let job = SyncJob {
                            target,
                            points,
                            entries,
                        };
                        if let Err(mpsc::SendError(job)) = jobs.send(job) {
                            let err = StorageError::Failed {
                                path: self.shared.store_dir.clone(),
                                reason: "the journal sync thread stopped".into(),
                            };
                            self.fail(job.entries, err);
                        }
                        entries = rest;
                    }
                    Err(err) => {
                        entries.extend(rest);
                        self.fail(entries, err);
                        break;
                    }
                }
            }
            let mut buf = buf;
            buf.clear();
            self.spare = buf;
            if self.len >= self.shared.config.journal_checkpoint_bytes {
                if let Err(err) = self.checkpoint() {
                    self.fail(Vec::new(), err);
                }
            }
        }
        drop(jobs);
        let _ = syncer.join();
        if let Err(err) = self.checkpoint() {
            self.fail(Vec::new(), err);
        }
    }

    /// Writes one group commit of `entries`, whose bytes lie in `buf`, and
    /// says what must be fsynced for it and what to publish afterwards. On
    /// error, everything it wrote is undone.
    fn prepare(&mut self, buf: &[u8], entries: &[Entry]) -> Result<(SyncTarget, Vec<Publish>)> {
        let range = match (entries.first(), entries.last()) {
            (Some(first), Some(last)) => first.entry_start..last.frame.end,
            _ => return Ok((SyncTarget::Nothing, Vec::new())),
        };
        let bytes = self.slice(buf, range)?;
        let mut touched: Vec<Arc<LogShared>> = Vec::new();
        let mut savepoints = Vec::new();
        let mut seen: HashMap<usize, ()> = HashMap::new();
        for e in entries {
            let key = Arc::as_ptr(&e.log) as usize;
            if seen.insert(key, ()).is_none() {
                let mut w = e.log.lock_writer();
                e.log.roll_if_full(&mut w)?;
                savepoints.push(w.savepoint());
                touched.push(Arc::clone(&e.log));
                self.dirty_logs
                    .entry(key)
                    .or_insert_with(|| Arc::clone(&e.log));
            }
        }
        // The journal exists to share one fsync among many logs. A commit
        // that touches a single log fsyncs that log's segment instead: still
        // one fsync, and every byte is written once rather than twice.
        let direct = touched.len() == 1 && self.shared.config.single_log_commits_skip_journal;
        let pre = self.len;
        let result = (|| {
            if !direct {
                self.file
                    .write_all_at(bytes, pre)
                    .map_err(|e| StorageError::io("writing journal", &self.path, e))?;
            }
            for e in entries {
                let mut w = e.log.lock_writer();
                if w.end() != e.enc.base {
                    return Err(StorageError::Failed {
                        path: self.shared.store_dir.clone(),
                        reason: format!(
                            "journal batch for log {} starts at offset {} but the log ends at {}",
                            e.log.name,
                            e.enc.base,
                            w.end()
                        ),
                    });
                }
                let frame = self.slice(buf, e.frame.clone())?;
                e.log.write_frame(&mut w, frame, &e.enc);
            }
            let mut points = Vec::with_capacity(touched.len());
            for log in &touched {
                let mut w = log.lock_writer();
                w.flush()?;
                points.push((Arc::clone(log), w.commit_point()));
            }
            Ok(points)
        })();
        match result {
            Ok(points) => {
                let written = if direct { 0 } else { bytes.len() as u64 };
                self.len = pre + written;
                self.shared
                    .stats
                    .bytes
                    .fetch_add(written, Ordering::Relaxed);
                let target = match points.first() {
                    Some((_, point)) if direct => SyncTarget::Segment(Arc::clone(point.segment())),
                    _ => SyncTarget::Journal(Arc::clone(&self.file), self.path.clone()),
                };
                Ok((target, points))
            }
            Err(err) => {
                let truncated = self.file.set_len(pre);
                for (log, sp) in touched.iter().zip(savepoints) {
                    let _ = log.lock_writer().rollback(sp);
                }
                match truncated {
                    Ok(()) => Err(err),
                    Err(e) => Err(StorageError::Failed {
                        path: self.shared.store_dir.clone(),
                        reason: format!("{err}; then truncating the journal failed: {e}"),
                    }),
                }
            }
        }
    }

    fn slice<'b>(&self, buf: &'b [u8], range: Range<usize>) -> Result<&'b [u8]> {
        buf.get(range.clone()).ok_or_else(|| StorageError::Failed {
            path: self.shared.store_dir.clone(),
            reason: format!("journal entry bytes {range:?} lie outside the pending buffer"),
        })
    }

    /// Fails a commit and everything queued behind it. Only a full disk
    /// leaves the store usable; any other failure leaves the disk's state
    /// unknown, so the store refuses appends until reopened.
    fn fail(&mut self, entries: Vec<Entry>, err: StorageError) {
        let later = {
            let mut p = self.shared.lock();
            if !err.is_disk_full() && p.failed.is_none() {
                p.failed = Some(err.to_string());
            }
            p.buf.clear();
            let later = std::mem::take(&mut p.entries);
            // Offsets handed out to failed batches are taken back, so offsets stay dense.
            // The writer's end, not the committed one: batches already
            // written and waiting for their fsync keep their offsets.
            for e in entries.iter().chain(later.iter()) {
                let end = e.log.lock_writer().end();
                e.log.reserved_end.store(end.0, Ordering::Release);
            }
            later
        };
        self.shared.has_room.notify_all();
        for e in entries.into_iter().chain(later) {
            let _ = e.done.send(Err(err.clone()));
            e.log.wake();
        }
    }

    /// Fsyncs every log written since the last checkpoint, then replaces the
    /// journal file with an empty one.
    fn checkpoint(&mut self) -> Result<()> {
        for (_, log) in self.dirty_logs.drain() {
            log.lock_writer().sync()?;
        }
        let (file, path) = create_journal_file(&self.shared.dir, self.seq + 1)?;
        self.shared
            .stats
            .checkpoints
            .fetch_add(1, Ordering::Relaxed);
        let old = std::mem::replace(&mut self.path, path);
        self.file = Arc::new(file);
        self.seq += 1;
        self.len = JOURNAL_HEADER_LEN;
        // If the removal is lost in a crash, replaying the old file is harmless:
        // batches the logs already hold are skipped.
        fs::remove_file(&old)
            .map_err(|e| StorageError::io("removing checkpointed journal", &old, e))
    }
}

/// What a prepared commit needs fsynced before it may complete.
#[derive(Debug)]
enum SyncTarget {
    /// The journal file the commit was written to.
    Journal(Arc<File>, PathBuf),
    /// The one segment the commit was written to (it skipped the journal).
    Segment(Arc<Segment>),
    /// Nothing was written.
    Nothing,
}

/// A written commit on its way to the sync thread.
#[derive(Debug)]
struct SyncJob {
    target: SyncTarget,
    points: Vec<Publish>,
    entries: Vec<Entry>,
}

/// A log and the point its readers may see once the commit is durable.
type Publish = (Arc<LogShared>, CommitPoint);

/// The sync thread: fsyncs each written commit, then publishes it to
/// readers and completes its appends, in order. After a failed fsync the
/// state of the disk is unknown, so it fails that commit and every later one
/// and makes the store refuse appends.
fn run_sync(shared: &JournalShared, inbox: mpsc::Receiver<SyncJob>) {
    for job in inbox {
        let synced = match &job.target {
            _ if shared.failure().is_some() => Err(StorageError::Failed {
                path: shared.store_dir.clone(),
                reason: shared.failure().unwrap_or_default(),
            }),
            SyncTarget::Journal(file, path) => {
                let started = std::time::Instant::now();
                let synced = file
                    .sync_data()
                    .map_err(|e| StorageError::io("syncing journal", path, e));
                shared.stats.fsync.record(started.elapsed());
                synced
            }
            SyncTarget::Segment(seg) => {
                let started = std::time::Instant::now();
                let synced = seg.sync();
                shared.stats.fsync.record(started.elapsed());
                synced
            }
            SyncTarget::Nothing => Ok(()),
        };
        match synced {
            Ok(()) => {
                for (log, point) in &job.points {
                    log.publish(point);
                }
                let stats = &shared.stats;
                stats.commits.fetch_add(1, Ordering::Relaxed);
                stats
                    .batches
                    .fetch_add(job.entries.len() as u64, Ordering::Relaxed);
                let records: u64 = job.entries.iter().map(|e| u64::from(e.enc.count)).sum();
                stats.records.fetch_add(records, Ordering::Relaxed);
                for e in job.entries {
                    let _ = e.done.send(Ok(()));
                }
            }
            Err(err) => {
                {
                    let mut p = shared.lock();
                    if p.failed.is_none() {
                        p.failed = Some(err.to_string());
                    }
                }
                shared.has_room.notify_all();
                for e in job.entries {
                    let _ = e.done.send(Err(err.clone()));
                    e.log.wake();
                }
            }
        }
    }
}

/// How many leading entries can be committed together without any log's
/// active segment growing past its size limit (always at least one).
fn rollover_prefix(entries: &[Entry]) -> usize {
    let mut projected: HashMap<usize, (u64, u64)> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        let key = Arc::as_ptr(&e.log) as usize;
        let (len, limit) = projected.entry(key).or_insert_with(|| {
            let w = e.log.lock_writer();
            // A segment already full rolls at the start of the commit.
            let len = if w.active_len() >= e.log.config().segment_bytes {
                0
            } else {
                w.active_len()
            };
            (len, e.log.config().segment_bytes)
        });
        if i > 0 && *len >= *limit {
            return i;
        }
        *len += e.frame.len() as u64;
    }
    entries.len()
}

/// Lists journal files by sequence number.
fn list_journal(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut files = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| StorageError::io("listing journal", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io("listing journal", dir, e))?;
        let name = entry.file_name();
        let Some(seq) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".wal"))
            .filter(|d| d.len() == 20 && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse::<u64>().ok())
        else {
            continue;
        };
        files.push((seq, entry.path()));
    }
    files.sort();
    Ok(files)
}

/// Replays every journal file into the logs it names, fsyncs those logs, and
/// removes the journal. `open_log` resolves a name and incarnation to an open
/// log, or `None` if that log no longer exists. Returns the next journal
/// sequence number.
pub(crate) fn recover(
    dir: &Path,
    mut open_log: impl FnMut(&str, u64) -> Result<Option<Arc<LogShared>>>,
    events: &mut Vec<RecoveryEvent>,
) -> Result<u64> {
    fs::create_dir_all(dir).map_err(|e| StorageError::io("creating journal directory", dir, e))?;
    let files = list_journal(dir)?;
    let mut replayed: Vec<(Arc<LogShared>, u64)> = Vec::new();
    let next_seq = files.last().map(|(s, _)| s + 1).unwrap_or(0);
    for (i, (_, path)) in files.iter().enumerate() {
        let last = i + 1 == files.len();
        replay_file(path, last, &mut open_log, &mut replayed, events)?;
    }
    for (log, records) in &replayed {
        log.lock_writer().sync()?;
        if *records > 0 {
            events.push(RecoveryEvent::Replayed {
                log: log.name.clone(),
                records: *records,
            });
        }
    }
    for (_, path) in &files {
        fs::remove_file(path)
            .map_err(|e| StorageError::io("removing replayed journal", path, e))?;
    }
    Ok(next_seq)
}

fn replay_file(
    path: &Path,
    last: bool,
    open_log: &mut impl FnMut(&str, u64) -> Result<Option<Arc<LogShared>>>,
    replayed: &mut Vec<(Arc<LogShared>, u64)>,
    events: &mut Vec<RecoveryEvent>,
) -> Result<()> {
    let bytes = fs::read(path).map_err(|e| StorageError::io("reading journal", path, e))?;
    if bytes.len() < JOURNAL_HEADER_LEN as usize {
        if last {
            // Created just before a crash; it never held an acknowledged entry.
            return Ok(());
        }
        return Err(StorageError::corrupt(
            path,
            0,
            "journal file is shorter than its header",
        ));
    }
    if bytes.get(0..8) != Some(&JOURNAL_MAGIC[..]) {
        return Err(StorageError::corrupt(path, 0, "bad journal magic"));
    }
    let version = bytes
        .get(8..12)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .unwrap_or(0);
    if version > JOURNAL_VERSION {
        return Err(StorageError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version,
            supported: JOURNAL_VERSION,
        });
    }
    let mut pos = JOURNAL_HEADER_LEN as usize;
    while pos < bytes.len() {
        let rest = bytes.get(pos..).unwrap_or_default();
        match parse_entry(rest) {
            Ok((incarnation, name, header, frame, len)) => {
                if let Some(log) = open_log(name, incarnation)? {
                    let n = replay_frame(&log, &header, frame, path, pos as u64)?;
                    match replayed.iter_mut().find(|(l, _)| Arc::ptr_eq(l, &log)) {
                        Some((_, count)) => *count += n,
                        None => replayed.push((log, n)),
                    }
                }
                pos += len;
            }
            Err(reason) => {
                let followed = rest.get(1..).is_some_and(any_valid_frame);
                if followed || !last {
                    return Err(StorageError::corrupt(path, pos as u64, reason));
                }
                events.push(RecoveryEvent::TruncatedTail {
                    path: path.to_path_buf(),
                    position: pos as u64,
                    discarded_bytes: (bytes.len() - pos) as u64,
                    reason: reason.to_string(),
                });
                break;
            }
        }
    }
    Ok(())
}

type ParsedEntry<'a> = (u64, &'a str, FrameHeader, &'a [u8], usize);

fn parse_entry(b: &[u8]) -> Result<ParsedEntry<'_>, &'static str> {
    let fixed = b
        .get(..ENTRY_FIXED_LEN)
        .ok_or("partial journal entry header")?;
    let word = |i: usize| {
        fixed
            .get(i..i + 4)
            .and_then(|s| s.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let crc = word(0).ok_or("partial journal entry header")?;
    let len = word(4).ok_or("partial journal entry header")? as usize;
    let incarnation = fixed
        .get(8..16)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or("partial journal entry header")?;
    let name_len = fixed
        .get(16..18)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_le_bytes)
        .ok_or("partial journal entry header")? as usize;
    let header_end = ENTRY_FIXED_LEN + name_len;
    let covered = b
        .get(4..header_end)
        .ok_or("journal entry ends inside its log name")?;
    if crc32c::crc32c(covered) != crc {
        return Err("journal entry header checksum mismatch");
    }
    let entry = b
        .get(..len)
        .ok_or("journal entry extends past end of file")?;
    let name = entry
        .get(ENTRY_FIXED_LEN..header_end)
        .and_then(|n| std::str::from_utf8(n).ok())
        .ok_or("journal entry log name is not UTF-8")?;
    let frame = entry
        .get(header_end..)
        .ok_or("journal entry shorter than its header")?;
    let header = FrameHeader::parse(frame).ok_or("unreadable batch header in journal entry")?;
    if !header.verify(frame) {
        return Err("batch checksum mismatch in journal entry");
    }
    Ok((incarnation, name, header, frame, len))
}

/// Writes the part of a journal batch that the log does not already hold.
fn replay_frame(
    log: &LogShared,
    header: &FrameHeader,
    frame: &[u8],
    path: &Path,
    pos: u64,
) -> Result<u64> {
    let mut w = log.lock_writer();
    let end = w.end();
    if header.end() <= end {
        return Ok(0);
    }
    if header.base > end {
        return Err(StorageError::corrupt(
            path,
            pos,
            format!(
                "journal batch for log {} starts at offset {} but the log ends at {}",
                log.name, header.base, end
            ),
        ));
    }
    log.roll_if_full(&mut w)?;
    let mut owned = BytesMut::new();
    let (bytes, enc): (&[u8], EncodedFrame) = if header.base == end {
        let enc = EncodedFrame {
            len: frame.len(),
            count: header.count,
            base: header.base,
            max_timestamp: header.max_timestamp,
        };
        (frame, enc)
    } else {
        // The segment kept part of this batch: re-encode only the rest.
        let frame = bytes::Bytes::copy_from_slice(frame);
        let records = batch::decode(header, &frame).ok_or_else(|| {
            StorageError::corrupt(path, pos, "journal batch records disagree with its header")
        })?;
        let messages: Vec<Message> = records
            .into_iter()
            .filter(|r| r.offset >= end)
            .map(|r| Message {
                timestamp: r.timestamp,
                headers: r.headers,
                body: r.body,
            })
            .collect();
        let enc = batch::encode(&mut owned, end, &messages);
        (&owned[..], enc)
    };
    let sp = w.savepoint();
    log.write_frame(&mut w, bytes, &enc);
    if let Err(e) = w.flush() {
        let _ = w.rollback(sp);
        return Err(e);
    }
    log.commit(&w);
    log.reserved_end.store(enc.end().0, Ordering::Release);
    Ok(header.end().0 - end.0)
}

impl JournalShared {
    pub(crate) fn stats(&self) -> JournalStats {
        let s = &self.stats;
        JournalStats {
            commits: s.commits.load(Ordering::Relaxed),
            batches: s.batches.load(Ordering::Relaxed),
            records: s.records.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            checkpoints: s.checkpoints.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn fsync_histogram(&self) -> FsyncHistogram {
        let f = &self.stats.fsync;
        let mut counts = [0u64; FSYNC_BUCKETS.len()];
        let mut total = 0u64;
        for (i, bucket) in f.buckets.iter().enumerate() {
            total += bucket.load(Ordering::Relaxed);
            if let Some(c) = counts.get_mut(i) {
                *c = total;
            }
        }
        FsyncHistogram {
            counts,
            count: total,
            sum_seconds: f.nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }

    /// Why the journal refuses appends, if it does.
    pub(crate) fn failure(&self) -> Option<String> {
        self.lock().failed.clone()
    }
}
