//! The sparse segment index: one file per segment that serves both lookups,
//! by offset and by time.
//!
//! An entry is written every `index_interval_bytes` of segment data, at a batch
//! boundary, plus one for the first batch. Each entry records where a batch
//! starts (offset relative to the segment's base, byte position) and the
//! largest timestamp of every record *before* that batch. Because that maximum
//! never decreases, a binary search finds where to start scanning for the
//! first record at or after a given time, even if producers' clocks disagree.
//! Sealing a segment appends a final `Seal` entry holding the segment's record
//! count, length and largest timestamp, so that opening a log reads one entry
//! per sealed segment rather than the whole index.
//!
//! ```text
//! header (16 bytes): magic "TERNIDX\0", u32 version, u32 reserved
//! entry  (24 bytes): u32 relative_offset, u32 position,
//!                    u64 max_timestamp_before, u32 kind (0 batch, 1 seal),
//!                    u32 crc32c of the preceding 20 bytes
//! ```
//! The index is derived data: it is never fsynced on the append path, and a
//! missing, short or damaged index is rebuilt from the segment.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::record::Timestamp;

pub(crate) const INDEX_HEADER_LEN: u64 = 16;
pub(crate) const INDEX_ENTRY_LEN: usize = 24;
const INDEX_MAGIC: &[u8; 8] = b"TERNIDX\0";
pub(crate) const INDEX_VERSION: u32 = 1;

/// What an index entry marks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryKind {
    /// The start of a batch.
    Batch,
    /// The end of a sealed segment.
    Seal,
}

/// One index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub(crate) relative_offset: u32,
    pub(crate) position: u32,
    pub(crate) max_timestamp_before: Timestamp,
    pub(crate) kind: EntryKind,
}

impl IndexEntry {
    pub(crate) fn encode(&self) -> [u8; INDEX_ENTRY_LEN] {
        let mut b = [0u8; INDEX_ENTRY_LEN];
        b[0..4].copy_from_slice(&self.relative_offset.to_le_bytes());
        b[4..8].copy_from_slice(&self.position.to_le_bytes());
        b[8..16].copy_from_slice(&self.max_timestamp_before.0.to_le_bytes());
        let kind: u32 = match self.kind {
            EntryKind::Batch => 0,
            EntryKind::Seal => 1,
        };
        b[16..20].copy_from_slice(&kind.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..20]);
        b[20..24].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Option<IndexEntry> {
        let b: &[u8; INDEX_ENTRY_LEN] = b.try_into().ok()?;
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if crc32c::crc32c(&b[0..20]) != word(20) {
            return None;
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&b[8..16]);
        let kind = match word(16) {
            0 => EntryKind::Batch,
            1 => EntryKind::Seal,
            _ => return None,
        };
        Some(IndexEntry {
            relative_offset: word(0),
            position: word(4),
            max_timestamp_before: Timestamp(u64::from_le_bytes(ts)),
            kind,
        })
    }
}

/// Why an index file could not be used as it is.
#[derive(Debug)]
pub(crate) enum IndexDamage {
    Missing,
    Unreadable(io::Error),
    Damaged(String),
    NewerVersion(u32),
}

impl std::fmt::Display for IndexDamage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IndexDamage::Missing => write!(f, "index file missing"),
            IndexDamage::Unreadable(e) => write!(f, "index file unreadable: {e}"),
            IndexDamage::Damaged(r) => write!(f, "{r}"),
            IndexDamage::NewerVersion(v) => write!(f, "index written by newer format version {v}"),
        }
    }
}

pub(crate) fn header_bytes() -> [u8; INDEX_HEADER_LEN as usize] {
    let mut h = [0u8; INDEX_HEADER_LEN as usize];
    h[0..8].copy_from_slice(INDEX_MAGIC);
    h[8..12].copy_from_slice(&INDEX_VERSION.to_le_bytes());
    h
}

fn check_header(h: &[u8]) -> Result<(), IndexDamage> {
    if h.len() < INDEX_HEADER_LEN as usize || &h[0..8] != INDEX_MAGIC {
        return Err(IndexDamage::Damaged("bad index header".into()));
    }
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if version > INDEX_VERSION {
        return Err(IndexDamage::NewerVersion(version));
    }
    Ok(())
}

/// Reads and validates a whole index file against the segment's length.
/// Entries must be well-formed, strictly increasing, and inside the segment.
pub(crate) fn load(path: &Path, segment_len: u64) -> Result<Vec<IndexEntry>, IndexDamage> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => f.read_to_end(&mut bytes).map_err(IndexDamage::Unreadable)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(IndexDamage::Missing),
        Err(e) => return Err(IndexDamage::Unreadable(e)),
    };
    check_header(&bytes)?;
    let body = &bytes[INDEX_HEADER_LEN as usize..];
    let mut entries = Vec::with_capacity(body.len() / INDEX_ENTRY_LEN);
    // A trailing partial entry is an unfinished write, not damage: ignore it.
    for (i, chunk) in body.chunks_exact(INDEX_ENTRY_LEN).enumerate() {
        let e = IndexEntry::decode(chunk)
            .ok_or_else(|| IndexDamage::Damaged(format!("index entry {i} fails its checksum")))?;
        if let Some(prev) = entries.last() {
            let prev: &IndexEntry = prev;
            let ordered = e.relative_offset > prev.relative_offset
                && e.position > prev.position
                && e.max_timestamp_before >= prev.max_timestamp_before
                && prev.kind == EntryKind::Batch;
            if !ordered {
                return Err(IndexDamage::Damaged(format!(
                    "index entry {i} is out of order"
                )));
            }
        }
        if u64::from(e.position) > segment_len
            || (e.kind == EntryKind::Batch && u64::from(e.position) >= segment_len)
        {
            return Err(IndexDamage::Damaged(format!(
                "index entry {i} points past the segment's end"
            )));
        }
        entries.push(e);
    }
    Ok(entries)
}

/// Reads only the final entry, which for a sealed segment is its seal.
pub(crate) fn read_seal(path: &Path) -> Result<IndexEntry, IndexDamage> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(IndexDamage::Missing),
        Err(e) => return Err(IndexDamage::Unreadable(e)),
    };
    let len = f.metadata().map_err(IndexDamage::Unreadable)?.len();
    let mut header = [0u8; INDEX_HEADER_LEN as usize];
    f.read_exact(&mut header)
        .map_err(|_| IndexDamage::Damaged("short index header".into()))?;
    check_header(&header)?;
    let body = len.saturating_sub(INDEX_HEADER_LEN);
    if body < INDEX_ENTRY_LEN as u64 || body % INDEX_ENTRY_LEN as u64 != 0 {
        return Err(IndexDamage::Damaged("index has no seal entry".into()));
    }
    f.seek(SeekFrom::Start(len - INDEX_ENTRY_LEN as u64))
        .map_err(IndexDamage::Unreadable)?;
    let mut last = [0u8; INDEX_ENTRY_LEN];
    f.read_exact(&mut last).map_err(IndexDamage::Unreadable)?;
    match IndexEntry::decode(&last) {
        Some(e) if e.kind == EntryKind::Seal => Ok(e),
        _ => Err(IndexDamage::Damaged("index has no valid seal entry".into())),
    }
}

/// Writes a complete index file from entries (used when rebuilding).
pub(crate) fn write_all(path: &Path, entries: &[IndexEntry]) -> io::Result<File> {
    let mut f = File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)?;
    let mut bytes = Vec::with_capacity(INDEX_HEADER_LEN as usize + entries.len() * INDEX_ENTRY_LEN);
    bytes.extend_from_slice(&header_bytes());
    for e in entries {
        bytes.extend_from_slice(&e.encode());
    }
    f.write_all(&bytes)?;
    Ok(f)
}

/// The last entry at or before `relative_offset`.
pub(crate) fn lookup_offset(entries: &[IndexEntry], relative_offset: u64) -> Option<&IndexEntry> {
    let n = entries.partition_point(|e| {
        e.kind == EntryKind::Batch && u64::from(e.relative_offset) <= relative_offset
    });
    n.checked_sub(1).and_then(|i| entries.get(i))
}

/// The last batch entry before which every record is older than `ts`: scanning
/// from it finds the first record at or after `ts`.
pub(crate) fn lookup_time(entries: &[IndexEntry], ts: Timestamp) -> Option<&IndexEntry> {
    let n = entries.partition_point(|e| e.kind == EntryKind::Batch && e.max_timestamp_before < ts);
    n.checked_sub(1).and_then(|i| entries.get(i))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(rel: u32, pos: u32, ts: u64) -> IndexEntry {
        IndexEntry {
            relative_offset: rel,
            position: pos,
            max_timestamp_before: Timestamp(ts),
            kind: EntryKind::Batch,
        }
    }

    #[test]
    fn entries_round_trip_and_detect_damage() {
        let entry = e(7, 4096, 123);
        let mut b = entry.encode();
        assert_eq!(IndexEntry::decode(&b), Some(entry));
        b[5] ^= 1;
        assert_eq!(IndexEntry::decode(&b), None);
    }

    #[test]
    fn lookups_find_the_entry_to_scan_from() {
        let entries = [e(0, 32, 0), e(10, 4200, 50), e(20, 8400, 90)];
        assert_eq!(lookup_offset(&entries, 0).unwrap().relative_offset, 0);
        assert_eq!(lookup_offset(&entries, 15).unwrap().relative_offset, 10);
        assert_eq!(lookup_offset(&entries, 99).unwrap().relative_offset, 20);
        assert_eq!(lookup_time(&entries, Timestamp(0)), None);
        assert_eq!(
            lookup_time(&entries, Timestamp(1)).unwrap().relative_offset,
            0
        );
        assert_eq!(
            lookup_time(&entries, Timestamp(60))
                .unwrap()
                .relative_offset,
            10
        );
        assert_eq!(
            lookup_time(&entries, Timestamp(1000))
                .unwrap()
                .relative_offset,
            20
        );
    }
}
