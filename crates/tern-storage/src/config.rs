//! Tuning knobs for stores and logs, with validation.

use std::time::Duration;

use crate::error::{Result, StorageError};

/// When an append counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// An append completes only after an fdatasync covers it. Concurrent
    /// appends, to this log and to every other `Always` log of the store,
    /// share one fsync of the store's journal (group commit).
    Always,
    /// An append completes once written to the page cache; the log's segment
    /// is fsynced at least this often. A crash loses at most the last interval.
    Interval(Duration),
    /// An append completes once written to the page cache and is fsynced only
    /// when a segment is sealed or the log closes.
    Never,
}

/// Per-log settings. They may change between opens of the same log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// When an append counts as durable.
    pub durability: Durability,
    /// A segment is sealed and a new one started once it reaches this size.
    pub segment_bytes: u64,
    /// An index entry is written every this many bytes of segment data.
    pub index_interval_bytes: u64,
    /// The largest batch one append may write, once encoded.
    pub max_batch_bytes: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            durability: Durability::Always,
            segment_bytes: 64 * 1024 * 1024,
            index_interval_bytes: 4096,
            max_batch_bytes: 16 * 1024 * 1024,
        }
    }
}

impl LogConfig {
    /// The default configuration with the given durability.
    pub fn with_durability(durability: Durability) -> Self {
        LogConfig {
            durability,
            ..LogConfig::default()
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        const MAX_SEGMENT: u64 = 1 << 31;
        if self.segment_bytes < 4096 || self.segment_bytes > MAX_SEGMENT {
            return Err(StorageError::InvalidInput(format!(
                "segment_bytes must be between 4096 and {MAX_SEGMENT}, got {}",
                self.segment_bytes
            )));
        }
        if self.index_interval_bytes == 0 {
            return Err(StorageError::InvalidInput(
                "index_interval_bytes must be at least 1".into(),
            ));
        }
        if self.max_batch_bytes < 64 || self.max_batch_bytes > crate::batch::MAX_FRAME_LEN {
            return Err(StorageError::InvalidInput(format!(
                "max_batch_bytes must be between 64 and {}, got {}",
                crate::batch::MAX_FRAME_LEN,
                self.max_batch_bytes
            )));
        }
        if let Durability::Interval(d) = self.durability {
            if d.is_zero() {
                return Err(StorageError::InvalidInput(
                    "a durability interval must be longer than zero; use Durability::Always".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Store-wide settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Once the journal holds this many bytes, logs are checkpointed (their
    /// segments fsynced) and the journal starts a new file.
    pub journal_checkpoint_bytes: u64,
    /// Appenders wait once this many bytes are queued for the next group
    /// commit, so a slow disk pushes back instead of growing memory.
    pub max_pending_bytes: usize,
    /// Whether a group commit that touches a single log fsyncs that log's
    /// segment instead of writing and fsyncing the journal: one fsync either
    /// way, but each byte is written once instead of twice. On by default;
    /// tests turn it off to exercise the journal.
    pub single_log_commits_skip_journal: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            journal_checkpoint_bytes: 128 * 1024 * 1024,
            max_pending_bytes: 32 * 1024 * 1024,
            single_log_commits_skip_journal: true,
        }
    }
}
