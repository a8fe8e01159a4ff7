//! Tern's storage engine: durable, segmented, append-only logs.
//!
//! A [`Store`] is one data directory. It holds many [`Log`]s (one per queue or
//! stream partition) and one journal they share. A log is a sequence of
//! segment files of checksummed batch frames, each with a sparse index by
//! offset and by time. Appends return their offsets at once and complete when
//! durable under the log's [`Durability`]: with `Always`, one group-committed
//! fsync of the shared journal covers every log appended to in that window.
//! [`Reader`]s hold independent positions, read forward in batches, and wait
//! for new records without polling. Recovery on open truncates torn tails,
//! rebuilds damaged indexes, replays the journal, and reports each repair as a
//! [`RecoveryEvent`]; damage in durable data is an error naming the file and
//! byte, never skipped.
//!
//! The engine knows nothing of protocols or networks. The on-disk format is
//! described in each module and in the workspace's `ARCHITECTURE.md`.
//!
//! ```
//! use tern_storage::{Store, StoreConfig, LogConfig, Message, Offset};
//! # let dir = tempfile::tempdir().unwrap();
//! let store = Store::open(dir.path(), StoreConfig::default())?;
//! let log = store.open_log("orders", LogConfig::default())?;
//! let appended = log.append(&[Message::new("", "order 1"), Message::new("", "order 2")])?;
//! let offsets = appended.wait()?; // durable: fsynced through the journal
//! assert_eq!(offsets.start, Offset(0));
//! let mut reader = log.reader(Offset(0))?;
//! let records = reader.read(100, 1 << 20)?;
//! assert_eq!(&records[1].body[..], b"order 2");
//! store.close()?;
//! # Ok::<(), tern_storage::StorageError>(())
//! ```

mod batch;
mod config;
mod error;
mod index;
mod journal;
mod log;
mod reader;
mod record;
mod recovery;
mod segment;
mod store;

pub use config::{Durability, LogConfig, StoreConfig};
pub use error::{Result, StorageError};
pub use journal::{FsyncHistogram, JournalStats, FSYNC_BUCKETS};
pub use log::{Appended, Log, Retention};
pub use reader::Reader;
pub use record::{Message, Offset, Offsets, Record, Timestamp};
pub use recovery::RecoveryEvent;
pub use store::{Store, STORE_VERSION};
