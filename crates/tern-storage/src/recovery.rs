//! What recovery did, reported as events the caller can log.
//!
//! Recovery never drops data silently: each repair it makes on open is
//! returned as a [`RecoveryEvent`], and damage it cannot repair is an error.

use std::path::PathBuf;

/// One repair made while opening a store or a log.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecoveryEvent {
    /// A torn write at the end of a segment or journal file was cut off at
    /// the last complete, valid batch. Nothing cut off had been acknowledged
    /// as durable, or it is restored from the journal.
    TruncatedTail {
        /// The file that was truncated.
        path: PathBuf,
        /// The byte position it now ends at.
        position: u64,
        /// How many bytes were discarded.
        discarded_bytes: u64,
        /// What was wrong with the discarded bytes.
        reason: String,
    },
    /// An index file was missing or damaged and was rebuilt from its segment.
    IndexRebuilt {
        /// The index file.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// Batches acknowledged through the journal but not yet in the log's
    /// segments were written into them.
    Replayed {
        /// The log that received them.
        log: String,
        /// How many records were replayed.
        records: u64,
    },
}
