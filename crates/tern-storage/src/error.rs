//! The typed errors of the storage engine.
//!
//! Every error names the entity it concerns (a log, a segment file, a byte
//! position) so that an operator can act on it without reading the code.
//! Errors are `Clone` because one failed group commit fails many appends.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::record::Offset;

/// The result type of the storage engine.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// What went wrong in the storage engine.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// An I/O operation failed for a reason other than a full disk.
    #[error("i/o error while {action} {}: {source}", path.display())]
    Io {
        /// What the engine was doing.
        action: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: Arc<io::Error>,
    },

    /// The disk (or the quota) is full. The log is consistent and accepts
    /// appends again once space frees.
    #[error("disk full while {action} {}; free space and retry", path.display())]
    DiskFull {
        /// What the engine was doing.
        action: &'static str,
        /// The file concerned.
        path: PathBuf,
    },

    /// Stored bytes failed validation in a place that was already durable,
    /// so they cannot be a torn write. Nothing is skipped silently.
    #[error("corrupt data in {} at byte {position}: {reason}", path.display())]
    Corrupt {
        /// The segment, index or journal file.
        path: PathBuf,
        /// The byte position of the first bad byte or of the bad batch.
        position: u64,
        /// What check failed.
        reason: String,
    },

    /// The directory exists but is not a Tern store or log.
    #[error("{} is not a Tern data directory: {reason}", path.display())]
    NotAStore {
        /// The directory.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },

    /// The files were written by a newer format version than this binary reads.
    #[error("{} has format version {found}, but this build reads up to version {supported}; upgrade Tern", path.display())]
    UnsupportedVersion {
        /// The file that carries the version.
        path: PathBuf,
        /// The version found on disk.
        found: u32,
        /// The newest version this build understands.
        supported: u32,
    },

    /// Another process holds the store's lock file.
    #[error("the data directory {} is in use by another process (its LOCK is held)", path.display())]
    Locked {
        /// The data directory.
        path: PathBuf,
    },

    /// The log has been closed (or deleted); it accepts no more appends.
    #[error("log {log} is closed")]
    Closed {
        /// The log's name.
        log: String,
    },

    /// A read asked for an offset the log no longer has (retention removed it).
    #[error("offset {requested} of log {log} was removed by retention; the log starts at {start}")]
    OffsetBeforeStart {
        /// The log's name.
        log: String,
        /// The offset asked for.
        requested: Offset,
        /// The first offset the log still holds.
        start: Offset,
    },

    /// A read or seek asked for an offset past the end of the log.
    #[error("offset {requested} is past the end of log {log}, which ends at {end}")]
    OffsetPastEnd {
        /// The log's name.
        log: String,
        /// The offset asked for.
        requested: Offset,
        /// The next offset the log will assign.
        end: Offset,
    },

    /// An argument was invalid (an empty batch, a bad log name, an oversized message).
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// An earlier write to the journal failed in a way that leaves the state of
    /// the disk unknown (for example a failed fsync); the store must be reopened.
    #[error("the store at {} failed earlier and must be reopened: {reason}", path.display())]
    Failed {
        /// The data directory.
        path: PathBuf,
        /// The original failure.
        reason: String,
    },
}

impl StorageError {
    /// Wraps an I/O error, classifying a full disk or quota as [`StorageError::DiskFull`].
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        if is_disk_full(&source) {
            StorageError::DiskFull { action, path }
        } else {
            StorageError::Io {
                action,
                path,
                source: Arc::new(source),
            }
        }
    }

    pub(crate) fn corrupt(
        path: impl Into<PathBuf>,
        position: u64,
        reason: impl Into<String>,
    ) -> Self {
        StorageError::Corrupt {
            path: path.into(),
            position,
            reason: reason.into(),
        }
    }

    /// Whether the error is a full disk, after which appends may be retried.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StorageError::DiskFull { .. })
    }
}

/// ENOSPC and EDQUOT both mean "no room"; both are recoverable by freeing space.
fn is_disk_full(e: &io::Error) -> bool {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    e.kind() == io::ErrorKind::StorageFull
        || e.kind() == io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(ENOSPC) | Some(EDQUOT))
}
