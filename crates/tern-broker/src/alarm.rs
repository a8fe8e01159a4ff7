//! Resource alarms: the memory high-watermark and the disk free-space
//! limit, as RabbitMQ has them. [`Alarms`] is the broker's current set of
//! raised alarms, published through a `tokio::sync::watch` so that front
//! doors can block publishers while any is raised and unblock them when all
//! clear. [`Alarms::monitor`] starts the task that raises and clears them by
//! sampling the process's resident memory (`/proc/self/statm`, against a
//! fraction of `/proc/meminfo`'s total or an absolute limit) and the free
//! space of the data directory's file system (`statvfs`).
//!
//! Where a sample cannot be taken (not Linux, `/proc` not mounted), that
//! resource's alarm is left as it was rather than guessed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A resource that can run low.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    /// The broker's resident memory is above its high-watermark.
    Memory,
    /// The data directory's file system has less free space than its limit.
    Disk,
}

impl Resource {
    /// Every resource, in a fixed order.
    pub const ALL: [Resource; 2] = [Resource::Memory, Resource::Disk];

    /// The name RabbitMQ uses in alarms and `connection.blocked` reasons.
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Memory => "memory",
            Resource::Disk => "disk",
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The alarms raised at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AlarmSet {
    memory: bool,
    disk: bool,
}

impl AlarmSet {
    /// Whether no alarm is raised.
    pub fn is_empty(&self) -> bool {
        !self.memory && !self.disk
    }

    /// Whether the alarm of `resource` is raised.
    pub fn contains(&self, resource: Resource) -> bool {
        match resource {
            Resource::Memory => self.memory,
            Resource::Disk => self.disk,
        }
    }

    /// The raised alarms, in [`Resource::ALL`] order.
    pub fn raised(&self) -> Vec<Resource> {
        Resource::ALL
            .into_iter()
            .filter(|r| self.contains(*r))
            .collect()
    }

    fn set(&mut self, resource: Resource, raised: bool) {
        match resource {
            Resource::Memory => self.memory = raised,
            Resource::Disk => self.disk = raised,
        }
    }
}

/// The broker's resource alarms. Cheap to clone; every clone is the same set.
#[derive(Debug, Clone)]
pub struct Alarms {
    tx: Arc<watch::Sender<AlarmSet>>,
}

impl Default for Alarms {
    fn default() -> Alarms {
        Alarms {
            tx: Arc::new(watch::channel(AlarmSet::default()).0),
        }
    }
}

impl Alarms {
    /// The alarms raised now.
    pub fn current(&self) -> AlarmSet {
        *self.tx.borrow()
    }

    /// A receiver that sees every change of the set.
    pub fn subscribe(&self) -> watch::Receiver<AlarmSet> {
        self.tx.subscribe()
    }

    /// Raises or clears one alarm; watchers are woken only by a change.
    pub fn set(&self, resource: Resource, raised: bool) {
        self.tx.send_if_modified(|set| {
            let before = *set;
            set.set(resource, raised);
            *set != before
        });
    }

    /// Starts sampling memory and the free space of `data_dir` with
    /// `limits` on the current tokio runtime. The task stops when the
    /// returned monitor is dropped; the alarms keep their last state.
    pub fn monitor(&self, limits: AlarmLimits, data_dir: &Path) -> AlarmMonitor {
        let (limits_tx, limits_rx) = watch::channel(limits);
        let task = tokio::spawn(sample_loop(self.clone(), limits_rx, data_dir.to_path_buf()));
        AlarmMonitor {
            limits: limits_tx,
            task,
        }
    }
}

/// The memory high-watermark.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemoryLimit {
    /// A fraction of the machine's total memory (RabbitMQ's default is 0.4).
    Fraction(f64),
    /// An absolute number of bytes.
    Bytes(u64),
}

/// When the monitor raises alarms, and how often it looks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlarmLimits {
    /// Resident memory above this raises the memory alarm.
    pub memory: MemoryLimit,
    /// Free space below this many bytes raises the disk alarm.
    pub disk_free: u64,
    /// Time between samples.
    pub interval: Duration,
}

impl Default for AlarmLimits {
    /// RabbitMQ's defaults: 40% of memory, 50 MB of free disk; a sample a second.
    fn default() -> AlarmLimits {
        AlarmLimits {
            memory: MemoryLimit::Fraction(0.4),
            disk_free: 50_000_000,
            interval: Duration::from_secs(1),
        }
    }
}

/// The sampling task. Dropping it stops sampling.
#[derive(Debug)]
pub struct AlarmMonitor {
    limits: watch::Sender<AlarmLimits>,
    task: JoinHandle<()>,
}

impl AlarmMonitor {
    /// Changes the limits; the next sample, taken at once, uses them.
    pub fn set_limits(&self, limits: AlarmLimits) {
        self.limits.send_replace(limits);
    }
}

impl Drop for AlarmMonitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn sample_loop(alarms: Alarms, mut limits: watch::Receiver<AlarmLimits>, data_dir: PathBuf) {
    loop {
        let current = *limits.borrow_and_update();
        if let Some(raised) = memory_alarm(current.memory) {
            alarms.set(Resource::Memory, raised);
        }
        if let Some(free) = free_disk_bytes(&data_dir) {
            alarms.set(Resource::Disk, free < current.disk_free);
        }
        tokio::select! {
            _ = tokio::time::sleep(current.interval) => {}
            changed = limits.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

/// Whether resident memory is above the limit; `None` when either cannot
/// be read.
fn memory_alarm(limit: MemoryLimit) -> Option<bool> {
    let limit = match limit {
        MemoryLimit::Bytes(bytes) => bytes,
        MemoryLimit::Fraction(f) => (total_memory_bytes()? as f64 * f) as u64,
    };
    Some(resident_memory_bytes()? > limit)
}

/// The process's resident set: the second field of `/proc/self/statm`, in pages.
fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages.saturating_mul(rustix::param::page_size() as u64))
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn total_memory_bytes() -> Option<u64> {
    parse_mem_total(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut fields = line.split_whitespace().skip(1);
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") => Some(value.saturating_mul(1024)),
        None => Some(value),
        Some(_) => None,
    }
}

/// Bytes available to unprivileged writers on the file system of `dir`.
fn free_disk_bytes(dir: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(dir).ok()?;
    Some(stat.f_bavail.saturating_mul(stat.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_total_is_read_in_bytes() {
        let meminfo = "MemTotal:       16318412 kB\nMemFree:         1000 kB\n";
        assert_eq!(parse_mem_total(meminfo), Some(16_318_412 * 1024));
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(parse_mem_total("MemTotal: lots kB\n"), None);
    }

    #[test]
    fn set_wakes_watchers_only_on_change() {
        let alarms = Alarms::default();
        let mut rx = alarms.subscribe();
        alarms.set(Resource::Memory, false);
        assert!(!rx.has_changed().unwrap());
        alarms.set(Resource::Disk, true);
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().raised(), vec![Resource::Disk]);
        alarms.set(Resource::Memory, true);
        assert_eq!(
            alarms.current().raised(),
            vec![Resource::Memory, Resource::Disk]
        );
        alarms.set(Resource::Memory, false);
        alarms.set(Resource::Disk, false);
        assert!(alarms.current().is_empty());
    }

    #[tokio::test]
    async fn the_monitor_follows_its_limits() {
        let dir = tempfile::tempdir().unwrap();
        let alarms = Alarms::default();
        let mut rx = alarms.subscribe();
        let never = AlarmLimits {
            memory: MemoryLimit::Bytes(u64::MAX),
            disk_free: 0,
            interval: Duration::from_secs(3600),
        };
        let monitor = alarms.monitor(
            AlarmLimits {
                disk_free: u64::MAX,
                ..never
            },
            dir.path(),
        );
        rx.wait_for(|set| set.contains(Resource::Disk))
            .await
            .unwrap();
        assert!(!alarms.current().contains(Resource::Memory));

        monitor.set_limits(AlarmLimits {
            memory: MemoryLimit::Bytes(1),
            ..never
        });
        let set = *rx
            .wait_for(|set| set.contains(Resource::Memory) && !set.contains(Resource::Disk))
            .await
            .unwrap();
        assert_eq!(set.raised(), vec![Resource::Memory]);

        monitor.set_limits(never);
        rx.wait_for(AlarmSet::is_empty).await.unwrap();
    }
}
