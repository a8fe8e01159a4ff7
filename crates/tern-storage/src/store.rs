//! A store: one data directory holding many logs and the journal they share.
//!
//! The store owns the directory lock, the format marker, the registry of open
//! logs, the journal writer thread (group commit for `Always` logs) and the
//! syncer thread (periodic fsync for `Interval` logs). Opening a store
//! replays the journal into the logs before anything else can append.
//!
//! ```text
//! <dir>/FORMAT            "tern-store <version>"
//! <dir>/LOCK              held (flock) while the store is open
//! <dir>/journal/*.wal     the shared journal (see `journal`)
//! <dir>/logs/<name>/LOG   a log's identity: format version and incarnation
//! <dir>/logs/<name>/*.seg, *.idx   its segments and their indexes
//! ```

use std::collections::HashMap;
use std::fs::{self, File, TryLockError};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::{Durability, LogConfig, StoreConfig};
use crate::error::{Result, StorageError};
use crate::journal::{self, FsyncHistogram, JournalShared, JournalStats, JournalWriter};
use crate::log::{self, sync_dir, Log, LogShared};
use crate::recovery::RecoveryEvent;

/// The version of the store's directory layout that this build writes.
pub const STORE_VERSION: u32 = 1;
const FORMAT_PREFIX: &str = "tern-store ";

/// An open data directory. Dropping it closes it; prefer [`Store::close`],
/// which reports errors.
#[derive(Debug)]
pub struct Store {
    shared: Arc<StoreShared>,
    writer: Option<JoinHandle<()>>,
    syncer: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct StoreShared {
    dir: PathBuf,
    journal: Arc<JournalShared>,
    logs: Mutex<HashMap<String, Registered>>,
    events: Vec<RecoveryEvent>,
    stop: Mutex<bool>,
    stop_cond: Condvar,
    _lock: File,
}

#[derive(Debug)]
struct Registered {
    log: Arc<LogShared>,
    /// False for a log opened only to replay the journal into it: its
    /// configuration is set by the first caller that opens it.
    claimed: bool,
}

impl StoreShared {
    fn logs(&self) -> MutexGuard<'_, HashMap<String, Registered>> {
        self.logs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn log_dir(&self, name: &str) -> PathBuf {
        self.dir.join("logs").join(name)
    }
}

impl Store {
    /// Opens (creating if need be) the store in `dir`, recovering every log
    /// that the journal has batches for.
    pub fn open(dir: impl AsRef<Path>, config: StoreConfig) -> Result<Store> {
        let dir = dir.as_ref().to_path_buf();
        init_or_check_format(&dir)?;
        let lock = lock_dir(&dir)?;
        remove_tombstones(&dir.join("logs"))?;
        let journal = JournalShared::new(&dir, config);
        let mut logs: HashMap<String, Registered> = HashMap::new();
        let mut events = Vec::new();
        let logs_dir = dir.join("logs");
        let next_seq = journal::recover(
            &dir.join("journal"),
            |name, incarnation| {
                if let Some(r) = logs.get(name) {
                    return Ok((r.log.incarnation == incarnation).then(|| Arc::clone(&r.log)));
                }
                if log::validate_name(name).is_err() || !logs_dir.join(name).is_dir() {
                    return Ok(None);
                }
                let log = LogShared::open(
                    logs_dir.join(name),
                    name,
                    LogConfig::default(),
                    Arc::clone(&journal),
                )?;
                let matches = log.incarnation == incarnation;
                logs.insert(
                    name.to_string(),
                    Registered {
                        log: Arc::clone(&log),
                        claimed: false,
                    },
                );
                Ok(matches.then_some(log))
            },
            &mut events,
        )?;
        let writer = JournalWriter::create(Arc::clone(&journal), next_seq)?;
        let writer = std::thread::Builder::new()
            .name("tern-journal".into())
            .spawn(move || writer.run())
            .map_err(|e| StorageError::io("starting the journal thread for", &dir, e))?;
        let shared = Arc::new(StoreShared {
            dir: dir.clone(),
            journal,
            logs: Mutex::new(logs),
            events,
            stop: Mutex::new(false),
            stop_cond: Condvar::new(),
            _lock: lock,
        });
        let syncer_shared = Arc::clone(&shared);
        let syncer = std::thread::Builder::new()
            .name("tern-syncer".into())
            .spawn(move || run_syncer(&syncer_shared))
            .map_err(|e| StorageError::io("starting the syncer thread for", &dir, e))?;
        Ok(Store {
            shared,
            writer: Some(writer),
            syncer: Some(syncer),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// The repairs made to the journal while opening, and the batches it replayed.
    /// Repairs to a log's own files are reported by [`Log::recovery_events`].
    pub fn recovery_events(&self) -> &[RecoveryEvent] {
        &self.shared.events
    }

    /// Opens the log called `name`, creating it if it does not exist.
    /// Opening an open log returns another handle to it, provided the
    /// configuration is the same.
    pub fn open_log(&self, name: &str, config: LogConfig) -> Result<Log> {
        log::validate_name(name)?;
        config.validate()?;
        let mut logs = self.shared.logs();
        if let Some(r) = logs.get_mut(name) {
            if !r.log.closed.load(Ordering::Acquire) {
                if !r.claimed {
                    r.log.set_config(config);
                    r.log.reserved_end.store(r.log.end().0, Ordering::Release);
                    r.claimed = true;
                } else if r.log.config() != config {
                    return Err(StorageError::InvalidInput(format!(
                        "log {name} is already open with a different configuration"
                    )));
                }
                return Ok(Log {
                    inner: Arc::clone(&r.log),
                });
            }
            logs.remove(name);
        }
        let log = LogShared::open(
            self.shared.log_dir(name),
            name,
            config,
            Arc::clone(&self.shared.journal),
        )?;
        logs.insert(
            name.to_string(),
            Registered {
                log: Arc::clone(&log),
                claimed: true,
            },
        );
        Ok(Log { inner: log })
    }

    /// Closes and deletes the log called `name` with all its data. Returns
    /// whether it existed.
    pub fn delete_log(&self, name: &str) -> Result<bool> {
        log::validate_name(name)?;
        let mut logs = self.shared.logs();
        if let Some(r) = logs.remove(name) {
            Log { inner: r.log }.close()?;
        }
        let dir = self.shared.log_dir(name);
        let logs_dir = self.shared.dir.join("logs");
        // Renamed away first, atomically, so that a crash part-way through the
        // removal leaves a tombstone that the next open finishes removing, not
        // a half-deleted log that can no longer be opened.
        let tombstone = logs_dir.join(format!(".deleted-{name}"));
        match fs::rename(&dir, &tombstone) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(StorageError::io("deleting log directory", &dir, e)),
        }
        sync_dir(&logs_dir)?;
        fs::remove_dir_all(&tombstone)
            .map_err(|e| StorageError::io("removing deleted log", &tombstone, e))?;
        Ok(true)
    }

    /// What the shared journal has done since the store opened: group
    /// commits (one fsync each), and the batches and records they covered.
    pub fn journal_stats(&self) -> JournalStats {
        self.shared.journal.stats()
    }

    /// How long the commits' fsyncs have taken since the store opened.
    pub fn fsync_histogram(&self) -> FsyncHistogram {
        self.shared.journal.fsync_histogram()
    }

    /// The names of every log in the store, open or not.
    pub fn log_names(&self) -> Result<Vec<String>> {
        let dir = self.shared.dir.join("logs");
        let mut names = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| StorageError::io("listing logs", &dir, e))? {
            let entry = entry.map_err(|e| StorageError::io("listing logs", &dir, e))?;
            if let Some(name) = entry.file_name().to_str() {
                if log::validate_name(name).is_ok() {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    /// Drains appends in flight, fsyncs every log, and releases the directory.
    pub fn close(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        let Some(writer) = self.writer.take() else {
            return Ok(());
        };
        self.shared.journal.shutdown();
        let _ = writer.join();
        *self.shared.stop.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.shared.stop_cond.notify_all();
        if let Some(syncer) = self.syncer.take() {
            let _ = syncer.join();
        }
        let mut first_error = self
            .shared
            .journal
            .failure()
            .map(|reason| StorageError::Failed {
                path: self.shared.dir.clone(),
                reason,
            });
        for r in self.shared.logs().values() {
            r.log.closed.store(true, Ordering::Release);
            if let Err(e) = r.log.lock_writer().sync() {
                first_error.get_or_insert(e);
            }
            r.log.wake();
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Fsyncs `Interval` logs that are due. One thread serves every log.
fn run_syncer(shared: &StoreShared) {
    let mut stop = shared.stop.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let due: Vec<(Arc<LogShared>, Duration)> = shared
            .logs()
            .values()
            .filter_map(|r| match r.log.config().durability {
                Durability::Interval(d) => Some((Arc::clone(&r.log), d)),
                _ => None,
            })
            .collect();
        let tick = due
            .iter()
            .map(|(_, d)| *d)
            .min()
            .unwrap_or(Duration::from_millis(100))
            .clamp(Duration::from_millis(1), Duration::from_millis(100));
        drop(stop);
        for (log, interval) in &due {
            // A failed background fsync is retried on the next tick; the
            // next explicit sync or close reports it.
            let _ = log.lock_writer().sync_if_due(*interval);
        }
        stop = shared.stop.lock().unwrap_or_else(|p| p.into_inner());
        if *stop {
            return;
        }
        stop = shared
            .stop_cond
            .wait_timeout(stop, tick)
            .unwrap_or_else(|p| p.into_inner())
            .0;
        if *stop {
            return;
        }
    }
}

fn init_or_check_format(dir: &Path) -> Result<()> {
    let format = dir.join("FORMAT");
    match fs::read_to_string(&format) {
        Ok(text) => {
            let version = text
                .trim()
                .strip_prefix(FORMAT_PREFIX)
                .and_then(|v| v.parse::<u32>().ok())
                .ok_or_else(|| StorageError::NotAStore {
                    path: dir.to_path_buf(),
                    reason: format!("its FORMAT file does not read \"{FORMAT_PREFIX}<version>\""),
                })?;
            if version > STORE_VERSION {
                return Err(StorageError::UnsupportedVersion {
                    path: format,
                    found: version,
                    supported: STORE_VERSION,
                });
            }
            for sub in ["logs", "journal"] {
                fs::create_dir_all(dir.join(sub))
                    .map_err(|e| StorageError::io("creating directory", dir.join(sub), e))?;
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir)
                .map_err(|e| StorageError::io("creating data directory", dir, e))?;
            // A FORMAT.tmp alone is a creation that a crash interrupted.
            let nonempty = fs::read_dir(dir)
                .map_err(|e| StorageError::io("listing data directory", dir, e))?
                .any(|entry| !matches!(entry, Ok(e) if e.file_name() == "FORMAT.tmp"));
            if nonempty {
                return Err(StorageError::NotAStore {
                    path: dir.to_path_buf(),
                    reason: "it holds files but no FORMAT file; point Tern at an empty or Tern-owned directory".into(),
                });
            }
            let tmp = dir.join("FORMAT.tmp");
            File::create(&tmp)
                .and_then(|mut f| {
                    writeln!(f, "{FORMAT_PREFIX}{STORE_VERSION}")?;
                    f.sync_all()
                })
                .and_then(|()| fs::rename(&tmp, &format))
                .map_err(|e| StorageError::io("writing format marker", &format, e))?;
            sync_dir(dir)?;
            // Only once FORMAT exists, so that a crash before this point leaves
            // a directory that the next open still takes for an empty one; if
            // it crashes here, the next open creates what is missing.
            for sub in ["logs", "journal"] {
                fs::create_dir_all(dir.join(sub))
                    .map_err(|e| StorageError::io("creating directory", dir.join(sub), e))?;
            }
            sync_dir(dir)
        }
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => Err(StorageError::NotAStore {
            path: dir.to_path_buf(),
            reason: "it is a file, not a directory".into(),
        }),
        Err(e) => Err(StorageError::io("reading format marker", &format, e)),
    }
}

/// Finishes deletions that a crash interrupted.
fn remove_tombstones(logs_dir: &Path) -> Result<()> {
    let entries =
        fs::read_dir(logs_dir).map_err(|e| StorageError::io("listing logs", logs_dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io("listing logs", logs_dir, e))?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(".deleted-"))
        {
            let path = entry.path();
            fs::remove_dir_all(&path)
                .map_err(|e| StorageError::io("removing deleted log", &path, e))?;
        }
    }
    Ok(())
}

fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join("LOCK");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StorageError::io("opening lock file", &path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(StorageError::Locked {
            path: dir.to_path_buf(),
        }),
        Err(TryLockError::Error(e)) => Err(StorageError::io("locking", &path, e)),
    }
}
