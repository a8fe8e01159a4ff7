//! Readers: independent positions in a log that read forward in batches and
//! wait for new records without polling.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::error::{Result, StorageError};
use crate::log::LogShared;
use crate::record::{Offset, Record, Timestamp};
use crate::segment::{self, Segment};

/// How much a reader asks the file for at once: large enough that reading
/// from the page cache is dominated by copying, not by system calls.
const READ_CHUNK: usize = 1 << 20;

/// A position in a log. Each reader is independent; many may read one log
/// while it is being appended to.
#[derive(Debug)]
pub struct Reader {
    log: Arc<LogShared>,
    next: Offset,
    cursor: Option<Cursor>,
    /// The last chunk read and where it came from: a read that stops early
    /// (on its record or byte limit) leaves the rest for the next read, which
    /// then costs no system call and no copy.
    chunk: Option<(Arc<Segment>, u64, Bytes)>,
}

/// Where the frame holding `offset` starts, so sequential reads never consult the index.
#[derive(Debug, Clone)]
struct Cursor {
    seg: Arc<Segment>,
    position: u64,
    offset: Offset,
}

impl Reader {
    pub(crate) fn new(log: Arc<LogShared>) -> Reader {
        let next = log.start();
        Reader {
            chunk: None,
            log,
            next,
            cursor: None,
        }
    }

    /// The offset of the next record this reader will return.
    pub fn position(&self) -> Offset {
        self.next
    }

    /// Moves to `offset`, which must lie between the log's start and end (inclusive).
    pub fn seek(&mut self, offset: Offset) -> Result<()> {
        let (start, end) = (self.log.start(), self.log.end());
        if offset < start {
            return Err(StorageError::OffsetBeforeStart {
                log: self.log.name.clone(),
                requested: offset,
                start,
            });
        }
        if offset > end {
            return Err(StorageError::OffsetPastEnd {
                log: self.log.name.clone(),
                requested: offset,
                end,
            });
        }
        self.next = offset;
        self.cursor = None;
        Ok(())
    }

    /// Moves to the first record whose timestamp is at or after `ts`, or to
    /// the end of the log if there is none yet.
    pub fn seek_to_time(&mut self, ts: Timestamp) -> Result<()> {
        let end = self.log.end();
        let found = self
            .log
            .segments()
            .into_iter()
            .find(|s| s.base < s.end() && s.max_timestamp() >= ts);
        let Some(seg) = found else {
            self.next = end;
            self.cursor = None;
            return Ok(());
        };
        let (mut position, mut offset) = seg.position_for_time(ts)?;
        loop {
            if position >= seg.committed_len() {
                // The segment's maximum said a match exists; not finding one is damage.
                return Err(StorageError::corrupt(
                    &seg.path,
                    position,
                    "time index promises a record that the segment does not hold",
                ));
            }
            let chunk = read_whole_frames(&seg, position, READ_CHUNK)?;
            let mut at = 0usize;
            while let Some((header, frame)) = frame_in(&chunk, at, &seg, position)? {
                let frame_pos = position + at as u64;
                check_base(&header.base, offset, &seg, frame_pos)?;
                if header.max_timestamp >= ts {
                    let records = segment::records_of(&header, &frame, &seg, frame_pos)?;
                    if let Some(r) = records.iter().find(|r| r.timestamp >= ts) {
                        self.next = r.offset;
                        self.cursor = Some(Cursor {
                            seg: Arc::clone(&seg),
                            position: frame_pos,
                            offset: header.base,
                        });
                        return Ok(());
                    }
                }
                at += header.len as usize;
                offset = header.end();
            }
            if at == 0 {
                return Err(StorageError::corrupt(
                    &seg.path,
                    position,
                    "committed data ends inside a batch",
                ));
            }
            position += at as u64;
        }
    }

    /// Reads up to `max_records` records and roughly `max_bytes` of bodies and
    /// headers (at least one record if any is available). An empty result
    /// means the reader is at the end of the log. A read that fails returns
    /// no records and leaves the reader where it was.
    pub fn read(&mut self, max_records: usize, max_bytes: usize) -> Result<Vec<Record>> {
        let next = self.next;
        let result = self.read_records(max_records, max_bytes);
        if result.is_err() {
            // Records decoded before the failure were never returned: the
            // reader must not move past them.
            self.next = next;
            self.cursor = None;
        }
        result
    }

    fn read_records(&mut self, max_records: usize, max_bytes: usize) -> Result<Vec<Record>> {
        let mut out = Vec::new();
        let end = self.log.end();
        if self.next >= end || max_records == 0 {
            return Ok(out);
        }
        let start = self.log.start();
        if self.next < start {
            return Err(StorageError::OffsetBeforeStart {
                log: self.log.name.clone(),
                requested: self.next,
                start,
            });
        }
        let mut cursor = match self.cursor.take() {
            Some(c) if c.offset <= self.next => c,
            _ => self.locate(self.next)?,
        };
        let mut bytes = 0usize;
        'chunks: while out.len() < max_records && bytes < max_bytes {
            let committed = cursor.seg.committed_len();
            if cursor.position >= committed {
                // Move on only once this segment is finished.
                if !cursor.seg.is_sealed() {
                    break;
                }
                match self.log.segment_after(&cursor.seg) {
                    Some(next) => {
                        cursor = Cursor {
                            position: segment::SEGMENT_HEADER_LEN,
                            offset: next.base,
                            seg: next,
                        };
                        continue;
                    }
                    None => break,
                }
            }
            let want = max_bytes.clamp(64 << 10, 64 << 20);
            let chunk = match self.cached(&cursor.seg, cursor.position) {
                Some(rest) => rest,
                None => {
                    let chunk = read_whole_frames(&cursor.seg, cursor.position, want)?;
                    self.chunk = Some((Arc::clone(&cursor.seg), cursor.position, chunk.clone()));
                    chunk
                }
            };
            let mut at = 0usize;
            while let Some((header, frame)) = frame_in(&chunk, at, &cursor.seg, cursor.position)? {
                let frame_pos = cursor.position + at as u64;
                check_base(&header.base, cursor.offset, &cursor.seg, frame_pos)?;
                if header.end() > self.next {
                    let records = segment::records_of(&header, &frame, &cursor.seg, frame_pos)?;
                    let from = self.next;
                    for r in records.into_iter().filter(|r| r.offset >= from) {
                        if out.len() >= max_records || (bytes >= max_bytes && !out.is_empty()) {
                            // Stop mid-frame; the cursor stays on this frame.
                            cursor.position = frame_pos;
                            cursor.offset = header.base;
                            self.cursor = Some(cursor);
                            return Ok(out);
                        }
                        bytes += r.body.len() + r.headers.len();
                        self.next = r.offset.plus(1);
                        out.push(r);
                    }
                }
                at += header.len as usize;
                cursor.offset = header.end();
                if out.len() >= max_records || bytes >= max_bytes {
                    cursor.position += at as u64;
                    break 'chunks;
                }
            }
            if at == 0 {
                return Err(StorageError::corrupt(
                    &cursor.seg.path,
                    cursor.position,
                    "committed data ends inside a batch",
                ));
            }
            cursor.position += at as u64;
        }
        self.cursor = Some(cursor);
        Ok(out)
    }

    /// Blocks until a record at the reader's position is available, the log
    /// closes, or `timeout` passes. Returns whether a record is available.
    pub fn wait(&self, timeout: Duration) -> bool {
        let next = self.next;
        self.log.wait_until(timeout, |l| {
            l.end() > next || l.closed.load(std::sync::atomic::Ordering::Acquire)
        });
        self.log.end() > next
    }

    /// Resolves once a record at the reader's position is available.
    /// Returns `false` if the log closed first.
    pub async fn wait_async(&self) -> bool {
        let mut rx = self.log.subscribe();
        loop {
            if self.log.end() > self.next {
                return true;
            }
            if self.log.closed.load(std::sync::atomic::Ordering::Acquire)
                || rx.changed().await.is_err()
            {
                return self.log.end() > self.next;
            }
        }
    }

    /// The rest of the last chunk read, from `position` on, if it still
    /// starts with a whole frame there.
    fn cached(&self, seg: &Arc<Segment>, position: u64) -> Option<Bytes> {
        let (chunk_seg, start, chunk) = self.chunk.as_ref()?;
        if !Arc::ptr_eq(chunk_seg, seg) || position < *start {
            return None;
        }
        let rest = chunk.get(usize::try_from(position - start).ok()?..)?;
        let header = crate::batch::FrameHeader::parse(rest.get(..crate::batch::HEADER_LEN)?)?;
        (rest.len() >= header.len as usize).then(|| chunk.slice(chunk.len() - rest.len()..))
    }

    fn locate(&self, offset: Offset) -> Result<Cursor> {
        let seg = self
            .log
            .segment_for(offset)
            .ok_or_else(|| StorageError::OffsetBeforeStart {
                log: self.log.name.clone(),
                requested: offset,
                start: self.log.start(),
            })?;
        let (position, offset) = seg.position_for_offset(offset)?;
        Ok(Cursor {
            seg,
            position,
            offset,
        })
    }
}

/// Reads about `want` bytes at `position`, or more if the first frame there
/// is larger, so that the result always starts with a whole frame.
fn read_whole_frames(seg: &Segment, position: u64, want: usize) -> Result<Bytes> {
    let chunk = seg.read_chunk(position, want)?;
    let first_len = chunk
        .get(..crate::batch::HEADER_LEN)
        .and_then(crate::batch::FrameHeader::parse)
        .map(|h| h.len as usize);
    match first_len {
        Some(len) if len > chunk.len() => seg.read_chunk(position, len),
        _ => Ok(chunk),
    }
}

/// The complete frame at `at` in `chunk`, if the chunk holds all of it.
fn frame_in(
    chunk: &Bytes,
    at: usize,
    seg: &Segment,
    chunk_pos: u64,
) -> Result<Option<(crate::batch::FrameHeader, Bytes)>> {
    if at >= chunk.len() {
        return Ok(None);
    }
    segment::frame_at(&chunk.slice(at..), seg, chunk_pos + at as u64)
}

fn check_base(found: &Offset, expected: Offset, seg: &Segment, position: u64) -> Result<()> {
    if *found == expected {
        Ok(())
    } else {
        Err(StorageError::corrupt(
            &seg.path,
            position,
            format!("batch starts at offset {found} where {expected} was expected"),
        ))
    }
}
