//! A segment: one file of consecutive batch frames, with its sparse index.
//!
//! A log is a sequence of segments. Only the last one (the active segment)
//! is written; the others are sealed, which means fsynced and closed with a
//! seal entry in their index. This module owns the segment file format, the
//! validation of a segment on open (torn tail versus corruption), and the
//! positional reads and writes that let readers and the writer share one file
//! without sharing a cursor.
//!
//! ```text
//! segment file name: <base offset, 20 digits>.seg, index: <base offset>.idx
//! header (24 bytes): magic "TERNSEG\0", u32 version, u32 reserved, u64 base offset
//! then batch frames (see `batch`), back to back
//! ```

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use bytes::{Bytes, BytesMut};

use crate::batch::{self, EncodedFrame, FrameHeader, HEADER_LEN};
use crate::error::{Result, StorageError};
use crate::index::{self, EntryKind, IndexEntry, INDEX_ENTRY_LEN, INDEX_HEADER_LEN};
use crate::record::{Offset, Timestamp};
use crate::recovery::RecoveryEvent;

pub(crate) const SEGMENT_HEADER_LEN: u64 = 24;
const SEGMENT_MAGIC: &[u8; 8] = b"TERNSEG\0";
pub(crate) const SEGMENT_VERSION: u32 = 1;

/// The file names of the segment starting at `base`.
pub(crate) fn segment_paths(dir: &Path, base: Offset) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{:020}.seg", base.0)),
        dir.join(format!("{:020}.idx", base.0)),
    )
}

/// Parses `<20 digits>.seg` into a base offset.
pub(crate) fn parse_segment_name(name: &str) -> Option<Offset> {
    let digits = name.strip_suffix(".seg")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok().map(Offset))
        .flatten()
}

/// A segment as readers see it. The writer shares it through an `Arc` and
/// publishes progress through the atomics, so readers never take the writer's lock.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(crate) base: Offset,
    pub(crate) path: PathBuf,
    pub(crate) index_path: PathBuf,
    file: File,
    /// Bytes readers may read: everything up to here is committed.
    committed_len: AtomicU64,
    /// One past the last committed offset.
    end: AtomicU64,
    /// Largest committed record timestamp.
    max_timestamp: AtomicU64,
    sealed: AtomicBool,
    /// `None` until first needed: sealed segments load their index lazily so
    /// that opening a large log does not read every index.
    index: RwLock<Option<Vec<IndexEntry>>>,
}

impl Segment {
    pub(crate) fn committed_len(&self) -> u64 {
        self.committed_len.load(Ordering::Acquire)
    }

    pub(crate) fn end(&self) -> Offset {
        Offset(self.end.load(Ordering::Acquire))
    }

    pub(crate) fn max_timestamp(&self) -> Timestamp {
        Timestamp(self.max_timestamp.load(Ordering::Acquire))
    }

    pub(crate) fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::Acquire)
    }

    /// The on-disk size of the segment.
    pub(crate) fn size(&self) -> u64 {
        self.committed_len()
    }

    /// The index, loading (and if need be rebuilding) it on first use.
    fn index(&self) -> Result<RwLockReadGuard<'_, Option<Vec<IndexEntry>>>> {
        {
            let guard = self.index.read().unwrap_or_else(|p| p.into_inner());
            if guard.is_some() {
                return Ok(guard);
            }
        }
        let len = self.committed_len();
        let entries = match index::load(&self.index_path, len) {
            Ok(entries) if entries.last().is_some_and(|e| e.kind == EntryKind::Seal) => entries,
            // The seal was validated at open, so a damaged body is rebuilt quietly.
            _ => {
                let scan = scan(
                    &self.file,
                    &self.path,
                    self.base,
                    SEGMENT_HEADER_LEN,
                    self.base,
                    len,
                )?;
                if let Some(stop) = scan.stop {
                    return Err(StorageError::corrupt(
                        &self.path,
                        stop.position,
                        stop.reason,
                    ));
                }
                let mut entries = scan.entries;
                entries.push(seal_entry(
                    self.base,
                    scan.end,
                    scan.len,
                    scan.max_timestamp,
                ));
                // Best effort: a failed rewrite only means rebuilding again next time.
                let _ = index::write_all(&self.index_path, &entries);
                entries
            }
        };
        *self.index.write().unwrap_or_else(|p| p.into_inner()) = Some(entries);
        Ok(self.index.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The byte position at which to start scanning for `offset`.
    pub(crate) fn position_for_offset(&self, offset: Offset) -> Result<(u64, Offset)> {
        let guard = self.index()?;
        let rel = offset.0.saturating_sub(self.base.0);
        Ok(guard
            .as_deref()
            .and_then(|entries| index::lookup_offset(entries, rel))
            .map(|e| {
                (
                    u64::from(e.position),
                    self.base.plus(u64::from(e.relative_offset)),
                )
            })
            .unwrap_or((SEGMENT_HEADER_LEN, self.base)))
    }

    /// The byte position at which to start scanning for the first record at or after `ts`.
    pub(crate) fn position_for_time(&self, ts: Timestamp) -> Result<(u64, Offset)> {
        let guard = self.index()?;
        Ok(guard
            .as_deref()
            .and_then(|entries| index::lookup_time(entries, ts))
            .map(|e| {
                (
                    u64::from(e.position),
                    self.base.plus(u64::from(e.relative_offset)),
                )
            })
            .unwrap_or((SEGMENT_HEADER_LEN, self.base)))
    }

    /// Reads up to `max` committed bytes starting at `position`.
    pub(crate) fn read_chunk(&self, position: u64, max: usize) -> Result<Bytes> {
        let limit = self.committed_len();
        let n = (limit.saturating_sub(position)).min(max as u64) as usize;
        let mut buf = BytesMut::zeroed(n);
        self.file
            .read_exact_at(&mut buf, position)
            .map_err(|e| StorageError::io("reading segment", &self.path, e))?;
        Ok(buf.freeze())
    }

    /// Removes the segment's files (retention). Readers holding the segment
    /// keep reading the unlinked file until they let go.
    pub(crate) fn delete_files(&self) -> Result<()> {
        for path in [&self.path, &self.index_path] {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StorageError::io("deleting segment file", path, e)),
            }
        }
        Ok(())
    }

    pub(crate) fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| StorageError::io("syncing segment", &self.path, e))
    }
}

fn seal_entry(base: Offset, end: Offset, len: u64, max_timestamp: Timestamp) -> IndexEntry {
    IndexEntry {
        relative_offset: (end.0 - base.0) as u32,
        position: len as u32,
        max_timestamp_before: max_timestamp,
        kind: EntryKind::Seal,
    }
}

fn segment_header(base: Offset) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[0..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&base.0.to_le_bytes());
    h
}

/// Checks a segment's header. Returns `Ok(false)` for a file too short to
/// hold one (a segment created just before a crash).
fn check_segment_header(file: &File, path: &Path, base: Offset, len: u64) -> Result<bool> {
    if len < SEGMENT_HEADER_LEN {
        return Ok(false);
    }
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    file.read_exact_at(&mut h, 0)
        .map_err(|e| StorageError::io("reading segment header", path, e))?;
    if &h[0..8] != SEGMENT_MAGIC {
        return Err(StorageError::corrupt(path, 0, "bad segment magic"));
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if version > SEGMENT_VERSION {
        return Err(StorageError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version,
            supported: SEGMENT_VERSION,
        });
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[16..24]);
    if u64::from_le_bytes(b) != base.0 {
        return Err(StorageError::corrupt(
            path,
            16,
            "segment header's base offset disagrees with its file name",
        ));
    }
    Ok(true)
}

/// Why a scan stopped before the end of the file.
#[derive(Debug)]
pub(crate) struct ScanStop {
    pub(crate) position: u64,
    pub(crate) reason: String,
    /// Whether a valid frame follows the bad bytes, which rules out a torn write.
    pub(crate) followed_by_valid_frame: bool,
}

/// The result of validating frames from some position to the end of a file.
#[derive(Debug)]
pub(crate) struct Scan {
    /// Index entries for the frames found, by the default interval.
    pub(crate) entries: Vec<IndexEntry>,
    pub(crate) end: Offset,
    pub(crate) len: u64,
    pub(crate) max_timestamp: Timestamp,
    pub(crate) stop: Option<ScanStop>,
}

const SCAN_INDEX_INTERVAL: u64 = 4096;

/// Validates frames in `[from, file_len)`, checking checksums and that offsets
/// continue densely from `from_offset`.
pub(crate) fn scan(
    file: &File,
    path: &Path,
    base: Offset,
    from: u64,
    from_offset: Offset,
    file_len: u64,
) -> Result<Scan> {
    let mut out = Scan {
        entries: Vec::new(),
        end: from_offset,
        len: from,
        max_timestamp: Timestamp(0),
        stop: None,
    };
    let mut since_index = u64::MAX;
    let mut reader = ChunkReader::new(file, path, from, file_len);
    loop {
        let pos = out.len;
        if pos == file_len {
            return Ok(out);
        }
        let bad = |reason: &str, out: &mut Scan, reader: &mut ChunkReader<'_>| -> Result<()> {
            let followed = reader.valid_frame_after(pos + 1)?;
            out.stop = Some(ScanStop {
                position: pos,
                reason: reason.to_string(),
                followed_by_valid_frame: followed,
            });
            Ok(())
        };
        let Some(head) = reader.get(pos, HEADER_LEN)? else {
            bad("partial batch header at end of file", &mut out, &mut reader)?;
            return Ok(out);
        };
        let Some(header) = FrameHeader::parse(&head) else {
            bad("unreadable batch header", &mut out, &mut reader)?;
            return Ok(out);
        };
        let Some(frame) = reader.get(pos, header.len as usize)? else {
            bad("batch extends past end of file", &mut out, &mut reader)?;
            return Ok(out);
        };
        if !header.verify(&frame) {
            bad("batch checksum mismatch", &mut out, &mut reader)?;
            return Ok(out);
        }
        if header.base != out.end {
            bad(
                &format!(
                    "batch starts at offset {} where {} was expected",
                    header.base, out.end
                ),
                &mut out,
                &mut reader,
            )?;
            return Ok(out);
        }
        if since_index >= SCAN_INDEX_INTERVAL {
            out.entries.push(IndexEntry {
                relative_offset: (header.base.0 - base.0) as u32,
                position: pos as u32,
                max_timestamp_before: out.max_timestamp,
                kind: EntryKind::Batch,
            });
            since_index = 0;
        }
        since_index += u64::from(header.len);
        out.len = pos + u64::from(header.len);
        out.end = header.end();
        out.max_timestamp = out.max_timestamp.max(header.max_timestamp);
    }
}

/// Sequential reads through a file in large chunks, for scanning.
struct ChunkReader<'a> {
    file: &'a File,
    path: &'a Path,
    file_len: u64,
    chunk_start: u64,
    chunk: Vec<u8>,
}

const SCAN_CHUNK: usize = 1 << 20;

impl<'a> ChunkReader<'a> {
    fn new(file: &'a File, path: &'a Path, from: u64, file_len: u64) -> Self {
        ChunkReader {
            file,
            path,
            file_len,
            chunk_start: from,
            chunk: Vec::new(),
        }
    }

    /// The `n` bytes at `pos`, or `None` if the file ends first.
    fn get(&mut self, pos: u64, n: usize) -> Result<Option<Vec<u8>>> {
        if pos + n as u64 > self.file_len {
            return Ok(None);
        }
        let chunk_end = self.chunk_start + self.chunk.len() as u64;
        if pos < self.chunk_start || pos + n as u64 > chunk_end {
            let len = (n.max(SCAN_CHUNK) as u64).min(self.file_len - pos) as usize;
            self.chunk.resize(len, 0);
            self.file
                .read_exact_at(&mut self.chunk, pos)
                .map_err(|e| StorageError::io("scanning segment", self.path, e))?;
            self.chunk_start = pos;
        }
        let at = (pos - self.chunk_start) as usize;
        Ok(self.chunk.get(at..at + n).map(<[u8]>::to_vec))
    }

    /// Whether any well-formed, checksum-valid frame starts at or after `from`.
    /// Only called once damage is found, so its cost is never on the normal path.
    fn valid_frame_after(&mut self, from: u64) -> Result<bool> {
        if from >= self.file_len {
            return Ok(false);
        }
        let mut rest = vec![0u8; (self.file_len - from) as usize];
        self.file
            .read_exact_at(&mut rest, from)
            .map_err(|e| StorageError::io("scanning segment", self.path, e))?;
        Ok(any_valid_frame(&rest))
    }
}

/// Whether `bytes` contains a complete, checksum-valid frame at any position.
pub(crate) fn any_valid_frame(bytes: &[u8]) -> bool {
    (0..bytes.len()).any(|i| {
        bytes.get(i..).is_some_and(|rest| {
            FrameHeader::parse(rest).is_some_and(|h| {
                rest.get(..h.len as usize)
                    .is_some_and(|frame| h.verify(frame))
            })
        })
    })
}

/// Opens a sealed segment cheaply: reads its seal entry only. A missing or
/// damaged seal triggers a full validation and an index rebuild.
pub(crate) fn open_sealed(
    dir: &Path,
    base: Offset,
    events: &mut Vec<RecoveryEvent>,
) -> Result<Arc<Segment>> {
    let (path, index_path) = segment_paths(dir, base);
    let file = File::open(&path).map_err(|e| StorageError::io("opening segment", &path, e))?;
    let len = file
        .metadata()
        .map_err(|e| StorageError::io("reading segment metadata", &path, e))?
        .len();
    if !check_segment_header(&file, &path, base, len)? {
        return Err(StorageError::corrupt(
            &path,
            0,
            "sealed segment is shorter than its header",
        ));
    }
    let (end, max_ts, index) = match index::read_seal(&index_path) {
        Ok(seal) if u64::from(seal.position) == len => (
            base.plus(u64::from(seal.relative_offset)),
            seal.max_timestamp_before,
            None,
        ),
        other => {
            let reason = match other {
                Ok(_) => "seal entry disagrees with the segment's length".to_string(),
                Err(damage) => damage.to_string(),
            };
            let scan = scan(&file, &path, base, SEGMENT_HEADER_LEN, base, len)?;
            if let Some(stop) = scan.stop {
                // Sealed segments were fsynced before sealing: damage is corruption.
                return Err(StorageError::corrupt(&path, stop.position, stop.reason));
            }
            let mut entries = scan.entries;
            entries.push(seal_entry(base, scan.end, scan.len, scan.max_timestamp));
            index::write_all(&index_path, &entries)
                .and_then(|f| f.sync_data())
                .map_err(|e| StorageError::io("rebuilding index", &index_path, e))?;
            events.push(RecoveryEvent::IndexRebuilt {
                path: index_path.clone(),
                reason,
            });
            (scan.end, scan.max_timestamp, Some(entries))
        }
    };
    Ok(Arc::new(Segment {
        base,
        path,
        index_path,
        file,
        committed_len: AtomicU64::new(len),
        end: AtomicU64::new(end.0),
        max_timestamp: AtomicU64::new(max_ts.0),
        sealed: AtomicBool::new(true),
        index: RwLock::new(index),
    }))
}

/// The segment being written, owned by the log's writer.
///
/// Frames and index entries appended during one commit are gathered in
/// memory and written with one positional write each by [`flush`](Self::flush),
/// so a group commit costs one system call per log rather than one per batch.
#[derive(Debug)]
pub(crate) struct ActiveSegment {
    pub(crate) seg: Arc<Segment>,
    index_file: File,
    /// Logical length, including frames not yet flushed.
    len: u64,
    end: Offset,
    max_timestamp: Timestamp,
    index_count: usize,
    since_index: u64,
    /// Frames appended since the last flush; they belong at `flushed_len`.
    unflushed: Vec<u8>,
    flushed_len: u64,
    /// Index entries appended since the last flush.
    unflushed_index: Vec<u8>,
    flushed_index_count: usize,
}

/// At a checkpoint, a write buffer larger than this gives its memory back, so
/// that a burst to one log does not pin memory for every log. Shrinking only
/// then, not after every flush, spares busy logs a reallocation per commit.
const KEEP_BUFFER: usize = 1 << 20;

/// How far a segment's readable data reaches after some write.
#[derive(Debug, Clone)]
pub(crate) struct CommitPoint {
    seg: Arc<Segment>,
    len: u64,
    end: Offset,
    max_timestamp: Timestamp,
}

impl CommitPoint {
    /// Makes the data up to this point visible to readers.
    pub(crate) fn publish(&self) {
        self.seg
            .max_timestamp
            .store(self.max_timestamp.0, Ordering::Release);
        self.seg.committed_len.store(self.len, Ordering::Release);
        self.seg.end.store(self.end.0, Ordering::Release);
    }

    /// One past the last offset this point covers.
    pub(crate) fn end(&self) -> Offset {
        self.end
    }

    /// The segment this point is in.
    pub(crate) fn segment(&self) -> &Arc<Segment> {
        &self.seg
    }
}

/// Where to roll back to if a write fails part-way.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Savepoint {
    len: u64,
    end: Offset,
    max_timestamp: Timestamp,
    index_count: usize,
    since_index: u64,
}

impl ActiveSegment {
    /// Creates a new, empty segment file and index.
    pub(crate) fn create(dir: &Path, base: Offset) -> Result<ActiveSegment> {
        let (path, index_path) = segment_paths(dir, base);
        let file = File::options()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| StorageError::io("creating segment", &path, e))?;
        let index_file = file
            .write_all_at(&segment_header(base), 0)
            .map_err(|e| StorageError::io("writing segment header", &path, e))
            .and_then(|()| {
                index::write_all(&index_path, &[])
                    .map_err(|e| StorageError::io("creating index", &index_path, e))
            });
        let index_file = match index_file {
            Ok(f) => f,
            Err(e) => {
                // Remove the half-made files (a full disk still allows it), so
                // that a retry can create them afresh.
                let _ = fs::remove_file(&path);
                let _ = fs::remove_file(&index_path);
                return Err(e);
            }
        };
        Ok(Self::from_parts(
            path,
            index_path,
            file,
            index_file,
            base,
            SEGMENT_HEADER_LEN,
            base,
            Timestamp(0),
            Vec::new(),
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn from_parts(
        path: PathBuf,
        index_path: PathBuf,
        file: File,
        index_file: File,
        base: Offset,
        len: u64,
        end: Offset,
        max_timestamp: Timestamp,
        entries: Vec<IndexEntry>,
    ) -> ActiveSegment {
        let index_count = entries.len();
        let since_index = entries
            .last()
            .map(|e| len - u64::from(e.position))
            .unwrap_or(u64::MAX);
        ActiveSegment {
            seg: Arc::new(Segment {
                base,
                path,
                index_path,
                file,
                committed_len: AtomicU64::new(len),
                end: AtomicU64::new(end.0),
                max_timestamp: AtomicU64::new(max_timestamp.0),
                sealed: AtomicBool::new(false),
                index: RwLock::new(Some(entries)),
            }),
            index_file,
            len,
            end,
            max_timestamp,
            index_count,
            since_index,
            unflushed: Vec::new(),
            flushed_len: len,
            unflushed_index: Vec::new(),
            flushed_index_count: index_count,
        }
    }

    /// Opens the last segment of a log: validates it from its last trusted
    /// index entry, truncates a torn tail, and rebuilds a damaged index.
    pub(crate) fn open_tail(
        dir: &Path,
        base: Offset,
        events: &mut Vec<RecoveryEvent>,
    ) -> Result<ActiveSegment> {
        let (path, index_path) = segment_paths(dir, base);
        let file = File::options()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| StorageError::io("opening segment", &path, e))?;
        let file_len = file
            .metadata()
            .map_err(|e| StorageError::io("reading segment metadata", &path, e))?
            .len();
        if !check_segment_header(&file, &path, base, file_len)? {
            // Created just before a crash: nothing in it was ever acknowledged.
            file.set_len(0)
                .and_then(|()| file.write_all_at(&segment_header(base), 0))
                .map_err(|e| StorageError::io("rewriting segment header", &path, e))?;
            let index_file = index::write_all(&index_path, &[])
                .map_err(|e| StorageError::io("creating index", &index_path, e))?;
            return Ok(Self::from_parts(
                path,
                index_path,
                file,
                index_file,
                base,
                SEGMENT_HEADER_LEN,
                base,
                Timestamp(0),
                Vec::new(),
            ));
        }

        let mut rewrite_index = false;
        let mut entries = match index::load(&index_path, file_len) {
            Ok(entries) => entries,
            Err(index::IndexDamage::NewerVersion(found)) => {
                return Err(StorageError::UnsupportedVersion {
                    path: index_path,
                    found,
                    supported: index::INDEX_VERSION,
                })
            }
            Err(damage) => {
                // A missing index on a segment holding only its header is just unwritten.
                if file_len > SEGMENT_HEADER_LEN || !matches!(damage, index::IndexDamage::Missing) {
                    events.push(RecoveryEvent::IndexRebuilt {
                        path: index_path.clone(),
                        reason: damage.to_string(),
                    });
                }
                rewrite_index = true;
                Vec::new()
            }
        };
        // Reopened for writing: a seal from a roll that did not finish is dropped.
        if entries.last().is_some_and(|e| e.kind == EntryKind::Seal) {
            entries.pop();
            rewrite_index = true;
        }

        // Scan from the last index entry; if the entry itself does not lead to a
        // valid chain of frames, distrust the index and scan from the start.
        let mut from = entries.last().map(|e| {
            (
                u64::from(e.position),
                base.plus(u64::from(e.relative_offset)),
            )
        });
        let mut max_ts = entries
            .last()
            .map(|e| e.max_timestamp_before)
            .unwrap_or_default();
        let scan = loop {
            let (pos, off) = from.unwrap_or((SEGMENT_HEADER_LEN, base));
            let scan = scan(&file, &path, base, pos, off, file_len)?;
            let trusted_entry_failed =
                from.is_some() && scan.stop.as_ref().is_some_and(|s| s.position == pos);
            if trusted_entry_failed {
                events.push(RecoveryEvent::IndexRebuilt {
                    path: index_path.clone(),
                    reason: format!(
                        "index entry points at byte {pos}, where no valid batch starts"
                    ),
                });
                entries.clear();
                rewrite_index = true;
                from = None;
                max_ts = Timestamp(0);
                continue;
            }
            break scan;
        };
        let mut len = scan.len;
        if let Some(stop) = scan.stop {
            if stop.followed_by_valid_frame {
                return Err(StorageError::corrupt(&path, stop.position, stop.reason));
            }
            file.set_len(stop.position)
                .and_then(|()| file.sync_data())
                .map_err(|e| StorageError::io("truncating torn tail of", &path, e))?;
            events.push(RecoveryEvent::TruncatedTail {
                path: path.clone(),
                position: stop.position,
                discarded_bytes: file_len - stop.position,
                reason: stop.reason,
            });
            len = stop.position;
        }
        // The scan's entries continue the index; its first one repeats the entry it started from.
        let mut scanned = scan.entries.into_iter();
        if from.is_some() {
            scanned.next();
        } else {
            entries.clear();
        }
        for e in scanned {
            entries.push(IndexEntry {
                max_timestamp_before: e.max_timestamp_before.max(max_ts),
                ..e
            });
            rewrite_index = true;
        }
        let max_timestamp = max_ts.max(scan.max_timestamp);
        let index_file = if rewrite_index {
            index::write_all(&index_path, &entries)
        } else {
            File::options()
                .read(true)
                .write(true)
                .open(&index_path)
                .and_then(|f| {
                    f.set_len(INDEX_HEADER_LEN + (entries.len() * INDEX_ENTRY_LEN) as u64)?;
                    Ok(f)
                })
        }
        .map_err(|e| StorageError::io("writing index", &index_path, e))?;
        Ok(Self::from_parts(
            path,
            index_path,
            file,
            index_file,
            base,
            len,
            scan.end,
            max_timestamp,
            entries,
        ))
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    pub(crate) fn end(&self) -> Offset {
        self.end
    }

    pub(crate) fn has_records(&self) -> bool {
        self.end != self.seg.base
    }

    pub(crate) fn savepoint(&self) -> Savepoint {
        Savepoint {
            len: self.len,
            end: self.end,
            max_timestamp: self.max_timestamp,
            index_count: self.index_count,
            since_index: self.since_index,
        }
    }

    /// Appends one encoded frame after the last one, in memory. It reaches
    /// the file at the next [`flush`](Self::flush) and readers at the next
    /// [`commit`](Self::commit).
    pub(crate) fn append_frame(&mut self, frame: &[u8], enc: &EncodedFrame, index_interval: u64) {
        if self.since_index >= index_interval {
            let entry = IndexEntry {
                relative_offset: (enc.base.0 - self.seg.base.0) as u32,
                position: self.len as u32,
                max_timestamp_before: self.max_timestamp,
                kind: EntryKind::Batch,
            };
            self.unflushed_index.extend_from_slice(&entry.encode());
            self.index_count += 1;
            if let Some(entries) = self
                .seg
                .index
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .as_mut()
            {
                entries.push(entry);
            }
            self.since_index = 0;
        }
        self.unflushed.extend_from_slice(frame);
        self.since_index += frame.len() as u64;
        self.len += frame.len() as u64;
        self.end = enc.end();
        self.max_timestamp = self.max_timestamp.max(enc.max_timestamp);
    }

    /// Writes appended frames and index entries to their files (page cache).
    pub(crate) fn flush(&mut self) -> Result<()> {
        if !self.unflushed.is_empty() {
            self.seg
                .file
                .write_all_at(&self.unflushed, self.flushed_len)
                .map_err(|e| StorageError::io("writing segment", &self.seg.path, e))?;
            self.flushed_len += self.unflushed.len() as u64;
            self.unflushed.clear();
        }
        if !self.unflushed_index.is_empty() {
            let at = INDEX_HEADER_LEN + (self.flushed_index_count * INDEX_ENTRY_LEN) as u64;
            self.index_file
                .write_all_at(&self.unflushed_index, at)
                .map_err(|e| StorageError::io("writing index", &self.seg.index_path, e))?;
            self.flushed_index_count = self.index_count;
            self.unflushed_index.clear();
        }
        Ok(())
    }

    /// Makes everything flushed so far visible to readers.
    pub(crate) fn commit(&self) {
        self.commit_point().publish();
    }

    /// What [`commit`](Self::commit) would publish now, to be published
    /// later (once an fsync that covers it completes).
    pub(crate) fn commit_point(&self) -> CommitPoint {
        debug_assert!(self.unflushed.is_empty(), "commit before flush");
        CommitPoint {
            seg: Arc::clone(&self.seg),
            len: self.flushed_len,
            end: self.end,
            max_timestamp: self.max_timestamp,
        }
    }

    /// Undoes uncommitted appends after a failure, so the files end where
    /// readers and the next append expect them to. The in-memory state rolls
    /// back even if truncating fails: the next flush then overwrites whatever
    /// is left past the end, and recovery treats it as a torn tail.
    pub(crate) fn rollback(&mut self, sp: Savepoint) -> Result<()> {
        if let Some(entries) = self
            .seg
            .index
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            entries.truncate(sp.index_count);
        }
        self.unflushed.clear();
        self.unflushed_index.clear();
        self.len = sp.len;
        self.flushed_len = sp.len;
        self.end = sp.end;
        self.max_timestamp = sp.max_timestamp;
        self.index_count = sp.index_count;
        self.flushed_index_count = sp.index_count;
        self.since_index = sp.since_index;
        self.seg
            .file
            .set_len(sp.len)
            .map_err(|e| StorageError::io("rolling back segment", &self.seg.path, e))?;
        self.index_file
            .set_len(INDEX_HEADER_LEN + (sp.index_count * INDEX_ENTRY_LEN) as u64)
            .map_err(|e| StorageError::io("rolling back index", &self.seg.index_path, e))
    }

    /// Flushes the segment and its index to disk.
    pub(crate) fn sync(&mut self) -> Result<()> {
        self.flush()?;
        self.unflushed.shrink_to(KEEP_BUFFER);
        self.seg.sync()?;
        self.index_file
            .sync_data()
            .map_err(|e| StorageError::io("syncing index", &self.seg.index_path, e))
    }

    /// Seals the segment: fsyncs it and writes its seal entry, after which it
    /// is never written again. If sealing fails, the segment stays active and
    /// unsealed, so that the caller can keep it and retry.
    pub(crate) fn seal(&mut self) -> Result<()> {
        self.sync()?;
        let seal = seal_entry(self.seg.base, self.end, self.len, self.max_timestamp);
        let at = INDEX_HEADER_LEN + (self.index_count * INDEX_ENTRY_LEN) as u64;
        if let Err(e) = self
            .index_file
            .write_all_at(&seal.encode(), at)
            .and_then(|()| self.index_file.sync_data())
        {
            // Best effort: a seal entry left behind is dropped when the tail is reopened.
            let _ = self.index_file.set_len(at);
            return Err(StorageError::io("sealing index", &self.seg.index_path, e));
        }
        self.index_count += 1;
        if let Some(entries) = self
            .seg
            .index
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            entries.push(seal);
        }
        self.seg.sealed.store(true, Ordering::Release);
        Ok(())
    }
}

/// Decodes the frame at the start of `chunk`, if it is complete.
/// Returns `Ok(None)` when the chunk ends before the frame does.
pub(crate) fn frame_at(
    chunk: &Bytes,
    seg: &Segment,
    position: u64,
) -> Result<Option<(FrameHeader, Bytes)>> {
    let Some(head) = chunk.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let header = FrameHeader::parse(head)
        .ok_or_else(|| StorageError::corrupt(&seg.path, position, "unreadable batch header"))?;
    let Some(frame) = chunk.get(..header.len as usize) else {
        return Ok(None);
    };
    if !header.verify(frame) {
        return Err(StorageError::corrupt(
            &seg.path,
            position,
            "batch checksum mismatch",
        ));
    }
    Ok(Some((header, chunk.slice(..header.len as usize))))
}

/// Decodes a verified frame's records, reporting layout damage as corruption.
pub(crate) fn records_of(
    header: &FrameHeader,
    frame: &Bytes,
    seg: &Segment,
    position: u64,
) -> Result<Vec<crate::record::Record>> {
    batch::decode(header, frame).ok_or_else(|| {
        StorageError::corrupt(
            &seg.path,
            position,
            "batch records disagree with its header",
        )
    })
}
