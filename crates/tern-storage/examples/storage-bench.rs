//! `storage-bench`: measures tern-storage against its performance targets, in
//! one run, on one directory, and prints the figures as a markdown table.
//!
//! ```text
//! cargo run --release -p tern-storage --example storage-bench -- [--dir DIR] [--quick]
//! ```
//!
//! Without `--dir` the data goes to a fresh directory under the workspace's
//! `target/` (on the same disk as the sources; `/tmp` may be a tmpfs, which
//! would make every durability figure meaningless). The directory is removed
//! at the end. `--quick` shrinks every workload for a smoke test (seconds);
//! the full run repeats the throughput figures three times (the median is
//! reported) and writes about 25 GiB in all, at most about 5 GiB at a time
//! (under a minute on a 2-core VM; longer on slower disks).
//! `--only LETTERS` runs a subset of the figures (a to f), for profiling.
//!
//! The machine matters: on a virtual machine whose guest memory is backed
//! lazily by the host, writing into page-cache pages that the guest has not
//! touched recently is far slower than rewriting recycled ones, so buffered
//! figures (including `dd` without `oflag=direct`) vary from run to run. The
//! table therefore also shows `dd` with `O_DIRECT` and a page-cache-only `dd`.
//!
//! Figures use decimal units like `dd` does: 1 MB/s = 10^6 bytes per second.
//! Throughput counts message bodies (1 KiB each) only, not framing.

use std::collections::VecDeque;
use std::error::Error;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tern_storage::{
    Appended, Durability, JournalStats, Log, LogConfig, Message, Offset, Store, StoreConfig,
    Timestamp,
};

type BoxResult<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// Message body size for the throughput figures.
const MSG: usize = 1024;
/// Appends each appender keeps in flight with `Durability::Always`.
const WINDOW: usize = 1000;
/// Messages per append call for the batched `Never` figure.
const NEVER_BATCH: usize = 64;
/// Appender threads for the concurrent figures.
const THREADS: usize = 8;
/// Logs in the many-logs figure.
const MANY_LOGS: usize = 100;
/// Body size and batch size for the open-time log.
const SMALL_BODY: usize = 100;
const SMALL_BATCH: usize = 1000;
/// The hidden flag that makes this binary the child of the unclean-shutdown test.
const CHILD_FLAG: &str = "--child-writer";

const MIB: u64 = 1 << 20;

/// How much work each figure does.
#[derive(Debug, Clone, Copy)]
struct Scale {
    dd_mib: u64,
    dd_runs: usize,
    /// Repetitions of the b, c and d throughput figures (the median is reported).
    reps: usize,
    always_bytes: u64,
    many_bytes: u64,
    never_batch_bytes: u64,
    never_single_bytes: u64,
    open_records: u64,
}

const FULL: Scale = Scale {
    dd_mib: 1024,
    dd_runs: 3,
    reps: 3,
    always_bytes: 512 * MIB,
    many_bytes: 512 * MIB,
    never_batch_bytes: 2048 * MIB,
    never_single_bytes: 512 * MIB,
    open_records: 10_000_000,
};

const QUICK: Scale = Scale {
    dd_mib: 256,
    dd_runs: 1,
    reps: 1,
    always_bytes: 128 * MIB,
    many_bytes: 128 * MIB,
    never_batch_bytes: 512 * MIB,
    never_single_bytes: 128 * MIB,
    open_records: 1_000_000,
};

fn main() -> BoxResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(CHILD_FLAG) {
        return child_writer(&args[1..]);
    }
    let mut dir: Option<PathBuf> = None;
    let mut quick = false;
    let mut only: Option<String> = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--dir" => dir = Some(it.next().ok_or("--dir needs a directory")?.into()),
            "--only" => only = Some(it.next().ok_or("--only needs letters, e.g. bc")?.clone()),
            "-h" | "--help" => {
                println!("usage: storage-bench [--dir DIR] [--quick] [--only LETTERS]");
                println!("  --only abdef  runs only the figures named (a..f); ratios to");
                println!("                skipped figures are left out");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?}; try --help").into()),
        }
    }
    let scale = if quick { QUICK } else { FULL };
    let base = match dir {
        Some(d) => d,
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
    };
    std::fs::create_dir_all(&base)?;
    let base = std::fs::canonicalize(&base)?;
    let tmp = tempfile::Builder::new()
        .prefix("storage-bench-")
        .tempdir_in(&base)?;
    let dir = tmp.path().to_path_buf();
    let result = run(&dir, scale, quick, only.as_deref());
    // The directory is removed even if a figure failed.
    drop(tmp);
    result
}

/// One line of the results table.
struct Row {
    id: &'static str,
    figure: String,
    value: String,
    target: String,
    pass: Option<bool>,
}

impl Row {
    fn info(id: &'static str, figure: impl Into<String>, value: impl Into<String>) -> Row {
        Row {
            id,
            figure: figure.into(),
            value: value.into(),
            target: "-".into(),
            pass: None,
        }
    }

    fn checked(
        id: &'static str,
        figure: impl Into<String>,
        value: impl Into<String>,
        target: impl Into<String>,
        pass: bool,
    ) -> Row {
        Row {
            id,
            figure: figure.into(),
            value: value.into(),
            target: target.into(),
            pass: Some(pass),
        }
    }
}

fn run(dir: &Path, scale: Scale, quick: bool, only: Option<&str>) -> BoxResult<()> {
    eprintln!("storage-bench: data directory {}", dir.display());
    let want = |c: char| only.is_none_or(|o| o.contains(c));
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load_before = loadavg();
    let started = Instant::now();
    let mut rows = Vec::new();

    // a. Raw disk bandwidth. Virtual disks vary a lot from run to run, so dd
    // runs several times and the median is the reference for the ratios.
    let mut dd = None;
    if want('a') {
        let mut dds = Vec::new();
        for i in 0..scale.dd_runs {
            settle();
            eprintln!(
                "[a] dd {} MiB with conv=fdatasync ({}/{})",
                scale.dd_mib,
                i + 1,
                scale.dd_runs
            );
            dds.push(dd_bandwidth(dir, scale.dd_mib)?);
        }
        let runs = dds
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", ");
        dds.sort_by(f64::total_cmp);
        let median = dds.get(dds.len() / 2).copied().ok_or("no dd run")?;
        rows.push(Row::info(
            "a",
            format!(
                "raw disk write, dd bs=1M count={} conv=fdatasync, median of {}",
                scale.dd_mib, scale.dd_runs
            ),
            format!("{median:.0} MB/s (runs: {runs} MB/s)"),
        ));
        settle();
        let direct = dd_direct(dir, scale.dd_mib)?;
        rows.push(Row::info(
            "a",
            format!(
                "device write, dd bs=1M count={} oflag=direct conv=fdatasync (no page cache)",
                scale.dd_mib
            ),
            format!("{direct:.0} MB/s"),
        ));
        let latency = fsync_latency(dir, 200)?;
        rows.push(Row::info(
            "a",
            "4 KiB pwrite + fdatasync, mean of 200",
            format!("{:.0} us", latency.as_secs_f64() * 1e6),
        ));
        dd = Some(median);
    }
    let of_dd = |mb_s: f64| match dd {
        Some(dd) => format!("{mb_s:.0} MB/s ({:.0}% of dd)", mb_s / dd * 100.0),
        None => format!("{mb_s:.0} MB/s"),
    };

    // b. One log, Always, 1 and 8 appenders.
    let mut single_1 = None;
    let mut single_8 = None;
    if want('b') {
        for threads in [1, THREADS] {
            let mut runs = Vec::new();
            for r in 0..scale.reps {
                settle();
                eprintln!("[b] Always, 1 log, {threads} appender(s), run {}", r + 1);
                let store_dir = dir.join(format!("always-{threads}-{r}"));
                runs.push(always_run(&store_dir, 1, threads, scale.always_bytes)?);
                std::fs::remove_dir_all(&store_dir)?;
            }
            let listed = list_runs(&runs, |f| f.mb_s);
            let f = median(runs, |f| f.mb_s).ok_or("no run")?;
            let label = format!(
                "Always, 1 log, {threads} appender(s) x {WINDOW} in flight, 1 KiB, {} MiB{}",
                scale.always_bytes / MIB,
                median_note(scale.reps)
            );
            let value = format!("{}{listed}", of_dd(f.mb_s));
            if threads == THREADS {
                rows.push(Row {
                    id: "b",
                    figure: label,
                    value,
                    target: ">= 70% of dd".into(),
                    pass: dd.map(|dd| f.mb_s / dd >= 0.70),
                });
                single_8 = Some(f.mb_s);
            } else {
                rows.push(Row::info("b", label, value));
                single_1 = Some(f.mb_s);
            }
            rows.push(Row::info(
                "b",
                format!("  ... journal, {threads} appender(s), median run"),
                f.journal_summary(),
            ));
        }
    }

    // c. 100 logs, Always, 8 appenders.
    if want('c') {
        let mut runs = Vec::new();
        for r in 0..scale.reps {
            settle();
            eprintln!(
                "[c] Always, {MANY_LOGS} logs, {THREADS} appenders, run {}",
                r + 1
            );
            let store_dir = dir.join(format!("always-many-{r}"));
            runs.push(always_run(
                &store_dir,
                MANY_LOGS,
                THREADS,
                scale.many_bytes,
            )?);
            std::fs::remove_dir_all(&store_dir)?;
        }
        let listed = list_runs(&runs, |f| f.mb_s);
        let many = median(runs, |f| f.mb_s).ok_or("no run")?;
        let mut value = format!("{}{listed}", of_dd(many.mb_s));
        if let (Some(s8), Some(s1)) = (single_8, single_1) {
            value.push_str(&format!(
                "; 1 log with {THREADS} appenders is {:.2}x this, with 1 appender {:.2}x",
                s8 / many.mb_s,
                s1 / many.mb_s
            ));
        }
        rows.push(Row {
            id: "c",
            figure: format!(
                "Always, {MANY_LOGS} logs, {THREADS} appenders x {WINDOW} in flight, 1 KiB, {} MiB{}",
                scale.many_bytes / MIB,
                median_note(scale.reps)
            ),
            value,
            target: "within 2x of 1 log (8 appenders)".into(),
            pass: single_8.map(|s8| s8 / many.mb_s <= 2.0),
        });
        rows.push(Row::info(
            "c",
            format!("  ... journal, {MANY_LOGS} logs, median run"),
            many.journal_summary(),
        ));
    }

    // d. Never, batched and single; e. reading the batched log back.
    let cfg = LogConfig::with_durability(Durability::Never);
    if want('d') || want('e') {
        settle();
        let never_dir = dir.join("never");
        let store = Store::open(&never_dir, StoreConfig::default())?;
        let reps = if want('d') { scale.reps } else { 1 };
        let mut runs = Vec::new();
        for r in 0..reps {
            if r > 0 {
                // Only the last run's log is kept, for the read figure.
                store.delete_log(&format!("batched-{}", r - 1))?;
                settle();
            }
            eprintln!("[d] Never, batches of {NEVER_BATCH}, run {}", r + 1);
            let log = store.open_log(&format!("batched-{r}"), cfg.clone())?;
            runs.push(never_run(&log, NEVER_BATCH, scale.never_batch_bytes)?);
        }
        let batched = store.open_log(&format!("batched-{}", reps - 1), cfg.clone())?;
        if want('d') {
            let listed = list_runs(&runs, |f| f.mb_s);
            let f = median(runs, |f| f.mb_s).ok_or("no run")?;
            rows.push(Row::checked(
                "d",
                format!(
                    "Never, {NEVER_BATCH} x 1 KiB per append, 1 appender, {} MiB{}",
                    scale.never_batch_bytes / MIB,
                    median_note(reps)
                ),
                format!("{:.0} MB/s{listed}", f.mb_s),
                ">= 1000 MB/s",
                f.mb_s >= 1000.0,
            ));
            rows.push(Row::info(
                "d",
                "  ... seals, batched, median run",
                f.seal_summary(),
            ));
            settle();
            eprintln!("[d] Never, single messages");
            let single_log = store.open_log("single", cfg.clone())?;
            let f = never_run(&single_log, 1, scale.never_single_bytes)?;
            rows.push(Row::info(
                "d",
                format!(
                    "Never, 1 x 1 KiB per append, 1 appender, {} MiB",
                    scale.never_single_bytes / MIB
                ),
                format!(
                    "{:.0} MB/s ({:.0} appends/s)",
                    f.mb_s,
                    f.mb_s * 1e6 / MSG as f64
                ),
            ));
            rows.push(Row::info("d", "  ... seals, single", f.seal_summary()));
            // After the Never runs, so that the pages it frees cannot help them.
            settle();
            eprintln!("[d] dd without fsync");
            let ceiling = dd_page_cache(dir, scale.never_batch_bytes / MIB)?;
            rows.push(Row::info(
                "d",
                format!(
                    "page-cache write ceiling: dd bs=1M count={} to a new file, no fsync",
                    scale.never_batch_bytes / MIB
                ),
                format!("{ceiling:.0} MB/s"),
            ));
        }
        if want('e') {
            // Writeback of the batched log would otherwise compete with the reads.
            settle();
            eprintln!("[e] read back {} MiB", scale.never_batch_bytes / MIB);
            let mut best = 0.0f64;
            for _ in 0..2 {
                best = best.max(read_all(&batched)?);
            }
            rows.push(Row::checked(
                "e",
                format!(
                    "read {} MiB from page cache, Reader::read(10000, 16 MiB), best of 2",
                    scale.never_batch_bytes / MIB
                ),
                format!("{best:.0} MB/s"),
                ">= 2000 MB/s",
                best >= 2000.0,
            ));
        }
        store.close()?;
        std::fs::remove_dir_all(&never_dir)?;
    }

    // f. Open time of a large log, after a clean close and after SIGKILL.
    if want('f') {
        settle();
        let n = scale.open_records;
        eprintln!("[f] write {n} records, close cleanly, reopen");
        let clean_dir = dir.join("open-clean");
        let (write_s, size, segments) = {
            let store = Store::open(&clean_dir, StoreConfig::default())?;
            let log = store.open_log("big", cfg.clone())?;
            let t = Instant::now();
            write_small_records(&log, n)?;
            let write_s = t.elapsed().as_secs_f64();
            let size = log.size_bytes();
            let segments = log.segment_count();
            store.close()?;
            (write_s, size, segments)
        };
        rows.push(Row::info(
            "f",
            format!("write {n} x {SMALL_BODY} B records, Never, {SMALL_BATCH} per append"),
            format!(
                "{:.2} s ({:.2} M records/s); log is {:.0} MiB in {segments} segments",
                write_s,
                n as f64 / write_s / 1e6,
                size as f64 / MIB as f64
            ),
        ));
        let size_mib = size / MIB;
        settle();
        let (open_s, events) = timed_reopen(&clean_dir, n)?;
        rows.push(Row::checked(
            "f",
            format!("open {n}-record log after clean close (Store::open + open_log)"),
            format!("{:.1} ms ({events} recovery events)", open_s * 1e3),
            "< 1 s",
            open_s < 1.0,
        ));
        std::fs::remove_dir_all(&clean_dir)?;

        settle();
        eprintln!("[f] write {n} records in a child, sync, SIGKILL, reopen");
        let crash_dir = dir.join("open-killed");
        let child_s = killed_child(&crash_dir, n)?;
        settle();
        let (open_s, events) = timed_reopen(&crash_dir, n)?;
        rows.push(Row::checked(
            "f",
            format!(
                "open {n}-record log after SIGKILL (child wrote it in {child_s:.1} s, Log::sync, killed)"
            ),
            format!("{:.1} ms ({events} recovery events)", open_s * 1e3),
            "< 1 s",
            open_s < 1.0,
        ));

        // Not a target: the worst case, every index gone, so that opening
        // validates every segment in full and rebuilds its index.
        let log_dir = crash_dir.join("logs").join("big");
        for entry in std::fs::read_dir(&log_dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "idx") {
                std::fs::remove_file(path)?;
            }
        }
        settle();
        let (open_s, events) = timed_reopen(&crash_dir, n)?;
        rows.push(Row::info(
            "f",
            format!("open the same log with every .idx file deleted (full scan, {size_mib} MiB)"),
            format!(
                "{:.0} ms ({events} recovery events, {:.0} MB/s scanned)",
                open_s * 1e3,
                size as f64 / open_s / 1e6
            ),
        ));
        std::fs::remove_dir_all(&crash_dir)?;
    }

    let load_after = loadavg();
    print_report(
        &rows,
        dir,
        cpus,
        quick,
        started.elapsed(),
        &load_before,
        &load_after,
    );
    Ok(())
}

fn print_report(
    rows: &[Row],
    dir: &Path,
    cpus: usize,
    quick: bool,
    took: Duration,
    load_before: &str,
    load_after: &str,
) {
    let mut out = String::new();
    out.push_str(&format!(
        "## tern-storage bench ({})\n\n",
        if quick { "--quick" } else { "full" }
    ));
    out.push_str(&format!(
        "- dir: {} ({cpus} CPUs)\n- load average before: {load_before}; after: {load_after}\n- took {:.0} s\n\n",
        dir.display(),
        took.as_secs_f64()
    ));
    out.push_str("| # | figure | measured | target | result |\n|---|---|---|---|---|\n");
    for r in rows {
        let result = match r.pass {
            None => "",
            Some(true) => "PASS",
            Some(false) => "FAIL",
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.id, r.figure, r.value, r.target, result
        ));
    }
    print!("{out}");
    let _ = std::io::stdout().flush();
}

/// The median run by `key`.
fn median<T>(mut runs: Vec<T>, key: impl Fn(&T) -> f64) -> Option<T> {
    runs.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let mid = runs.len() / 2;
    runs.into_iter().nth(mid)
}

/// `" (runs: a, b, c MB/s)"` in the order run, or nothing for a single run.
fn list_runs<T>(runs: &[T], key: impl Fn(&T) -> f64) -> String {
    if runs.len() < 2 {
        return String::new();
    }
    let listed: Vec<String> = runs.iter().map(|r| format!("{:.0}", key(r))).collect();
    format!(" (runs: {} MB/s)", listed.join(", "))
}

fn median_note(reps: usize) -> String {
    if reps > 1 {
        format!(", median of {reps}")
    } else {
        String::new()
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Flushes dirty pages so one figure's writeback does not slow the next.
fn settle() {
    let _ = Command::new("sync").status();
}

/// Writes a file of zeros with `dd ... conv=fdatasync` and returns MB/s.
fn dd_bandwidth(dir: &Path, mib: u64) -> BoxResult<f64> {
    dd(dir, mib, &["conv=fdatasync"])
}

/// Like [`dd_bandwidth`] with `O_DIRECT`: the device without the page cache.
fn dd_direct(dir: &Path, mib: u64) -> BoxResult<f64> {
    dd(dir, mib, &["oflag=direct", "conv=fdatasync"])
}

/// Writes a file of zeros with `dd` and no fsync (page cache only); returns MB/s.
fn dd_page_cache(dir: &Path, mib: u64) -> BoxResult<f64> {
    dd(dir, mib, &[])
}

/// Runs `dd if=/dev/zero of=<dir>/dd.tmp bs=1M count=<mib> <extra>`, deletes
/// the file, and returns MB/s as dd reports it (or as timed here).
fn dd(dir: &Path, mib: u64, extra: &[&str]) -> BoxResult<f64> {
    let path = dir.join("dd.tmp");
    let t = Instant::now();
    let out = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", path.display()))
        .arg("bs=1M")
        .arg(format!("count={mib}"))
        .args(extra)
        .output()?;
    let own = (mib * MIB) as f64 / t.elapsed().as_secs_f64() / 1e6;
    std::fs::remove_file(&path)?;
    if !out.status.success() {
        return Err(format!("dd failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(parse_dd(&String::from_utf8_lossy(&out.stderr)).unwrap_or(own))
}

/// Parses `N bytes (...) copied, S s, R MB/s` into MB/s (bytes / seconds).
fn parse_dd(stderr: &str) -> Option<f64> {
    let line = stderr.lines().find(|l| l.contains(" copied, "))?;
    let bytes: f64 = line.split_whitespace().next()?.parse().ok()?;
    let (_, after) = line.split_once(" copied, ")?;
    let secs: f64 = after.split_whitespace().next()?.parse().ok()?;
    (secs > 0.0).then(|| bytes / secs / 1e6)
}

/// The mean latency of a 4 KiB write plus `fdatasync`, as the journal does it.
fn fsync_latency(dir: &Path, n: u32) -> BoxResult<Duration> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("fsync.tmp");
    let file = std::fs::File::options()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)?;
    let page = [0x5au8; 4096];
    let t = Instant::now();
    for i in 0..u64::from(n) {
        file.write_all_at(&page, i * 4096)?;
        file.sync_data()?;
    }
    let took = t.elapsed() / n;
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(took)
}

fn body(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

fn message(body: &Bytes) -> Message {
    Message {
        timestamp: Timestamp::now(),
        headers: Bytes::new(),
        body: body.clone(),
    }
}

/// The result of an `Always` run.
struct AlwaysFigures {
    /// Payload (message bodies) per second, in MB/s.
    mb_s: f64,
    secs: f64,
    stats: JournalStats,
    /// Bytes written to files (journal + segments) per payload byte.
    amplification: f64,
}

impl AlwaysFigures {
    fn journal_summary(&self) -> String {
        let s = &self.stats;
        let commits = s.commits.max(1) as f64;
        format!(
            "{:.0} fsyncs/s, {:.0} records/fsync, {:.0} KiB/fsync, {} checkpoints; \
             {:.2} bytes written per payload byte (journal + segment) = {:.0} MB/s to the files",
            s.commits as f64 / self.secs,
            s.records as f64 / commits,
            s.bytes as f64 / commits / 1024.0,
            s.checkpoints,
            self.amplification,
            self.mb_s * self.amplification
        )
    }
}

fn stats_delta(a: JournalStats, b: JournalStats) -> JournalStats {
    JournalStats {
        commits: b.commits - a.commits,
        batches: b.batches - a.batches,
        records: b.records - a.records,
        bytes: b.bytes - a.bytes,
        checkpoints: b.checkpoints - a.checkpoints,
    }
}

/// `threads` appenders, each with up to `WINDOW` appends in flight, spread
/// over `logs` logs (thread `t` round-robins over logs `t, t + threads, ...`;
/// with fewer logs than threads, threads share logs).
fn always_run(dir: &Path, logs: usize, threads: usize, total: u64) -> BoxResult<AlwaysFigures> {
    let store = Store::open(dir, StoreConfig::default())?;
    let cfg = LogConfig::with_durability(Durability::Always);
    let all: Vec<Log> = (0..logs)
        .map(|i| store.open_log(&format!("log-{i:03}"), cfg.clone()))
        .collect::<Result<_, _>>()?;
    let per_thread = (total / MSG as u64) as usize / threads;
    let body = body(MSG);
    let before = store.journal_stats();
    let t = Instant::now();
    std::thread::scope(|s| -> BoxResult<()> {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let mine: Vec<Log> = if logs >= threads {
                    all.iter().skip(i).step_by(threads).cloned().collect()
                } else {
                    all.iter().skip(i % logs).take(1).cloned().collect()
                };
                let body = body.clone();
                s.spawn(move || append_windowed(&mine, per_thread, &body))
            })
            .collect();
        for h in handles {
            h.join().map_err(|_| "appender thread panicked")??;
        }
        Ok(())
    })?;
    let secs = t.elapsed().as_secs_f64();
    let stats = stats_delta(before, store.journal_stats());
    let segment_bytes: u64 = all.iter().map(Log::size_bytes).sum();
    store.close()?;
    let bytes = (per_thread * threads * MSG) as f64;
    Ok(AlwaysFigures {
        mb_s: bytes / secs / 1e6,
        secs,
        stats,
        amplification: (stats.bytes + segment_bytes) as f64 / bytes,
    })
}

/// Appends `n` single-message batches round-robin over `logs`, waiting on the
/// oldest append whenever `WINDOW` are in flight.
fn append_windowed(logs: &[Log], n: usize, body: &Bytes) -> BoxResult<()> {
    let mut in_flight: VecDeque<Appended> = VecDeque::with_capacity(WINDOW);
    for i in 0..n {
        if in_flight.len() == WINDOW {
            if let Some(oldest) = in_flight.pop_front() {
                oldest.wait()?;
            }
        }
        let log = &logs[i % logs.len()];
        in_flight.push_back(log.append(&[message(body)])?);
    }
    while let Some(a) = in_flight.pop_front() {
        a.wait()?;
    }
    Ok(())
}

/// The result of a `Never` run.
struct NeverFigures {
    mb_s: f64,
    secs: f64,
    /// Segments sealed (each fsynced) during the run, and the time spent in
    /// the appends that sealed them.
    seals: usize,
    seal_secs: f64,
}

impl NeverFigures {
    fn seal_summary(&self) -> String {
        format!(
            "{} segments sealed; the appends that sealed them (fsync of a 64 MiB segment) took {:.0}% of the time",
            self.seals,
            self.seal_secs / self.secs * 100.0
        )
    }
}

/// Appends `total` bytes of 1 KiB messages, `batch` per append.
fn never_run(log: &Log, batch: usize, total: u64) -> BoxResult<NeverFigures> {
    let body = body(MSG);
    let appends = (total / (MSG * batch) as u64) as usize;
    let mut messages: Vec<Message> = (0..batch).map(|_| message(&body)).collect();
    let segments_before = log.segment_count();
    let mut segments = segments_before;
    let mut seal_secs = 0.0;
    let t = Instant::now();
    for _ in 0..appends {
        let now = Timestamp::now();
        for m in &mut messages {
            m.timestamp = now;
        }
        let started = Instant::now();
        log.append(&messages)?.wait()?;
        // Cheap enough next to an append: a read lock and a short Vec clone.
        let count = log.segment_count();
        if count != segments {
            seal_secs += started.elapsed().as_secs_f64();
            segments = count;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(NeverFigures {
        mb_s: (appends * batch * MSG) as f64 / secs / 1e6,
        secs,
        seals: segments - segments_before,
        seal_secs,
    })
}

/// Reads the whole log from its start; returns MB/s of bodies read.
fn read_all(log: &Log) -> BoxResult<f64> {
    let mut reader = log.reader(log.start())?;
    let mut bytes = 0usize;
    let mut records = 0u64;
    let t = Instant::now();
    loop {
        let batch = reader.read(10_000, 16 << 20)?;
        if batch.is_empty() {
            break;
        }
        records += batch.len() as u64;
        bytes += batch.iter().map(|r| r.body.len()).sum::<usize>();
    }
    let secs = t.elapsed().as_secs_f64();
    let expected = log.end().0 - log.start().0;
    if records != expected {
        return Err(format!("read {records} records, expected {expected}").into());
    }
    Ok(bytes as f64 / secs / 1e6)
}

/// Appends `n` records of `SMALL_BODY` bytes in batches of `SMALL_BATCH`.
fn write_small_records(log: &Log, n: u64) -> BoxResult<()> {
    let body = body(SMALL_BODY);
    let mut messages: Vec<Message> = (0..SMALL_BATCH).map(|_| message(&body)).collect();
    let mut left = n;
    while left > 0 {
        let k = left.min(SMALL_BATCH as u64) as usize;
        let now = Timestamp::now();
        for m in &mut messages {
            m.timestamp = now;
        }
        log.append(&messages[..k])?.wait()?;
        left -= k as u64;
    }
    Ok(())
}

/// Times `Store::open` + `open_log` on a store holding one log of `n` records.
fn timed_reopen(dir: &Path, n: u64) -> BoxResult<(f64, usize)> {
    let t = Instant::now();
    let store = Store::open(dir, StoreConfig::default())?;
    let log = store.open_log("big", LogConfig::with_durability(Durability::Never))?;
    let secs = t.elapsed().as_secs_f64();
    if log.end() != Offset(n) {
        return Err(format!("reopened log ends at {}, expected {n}", log.end()).into());
    }
    let events = store.recovery_events().len() + log.recovery_events().len();
    store.close()?;
    Ok((secs, events))
}

/// Runs this binary as a child that writes `n` records, syncs, and waits to
/// be killed; kills it with SIGKILL. Returns the child's write time.
fn killed_child(dir: &Path, n: u64) -> BoxResult<f64> {
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .arg(CHILD_FLAG)
        .arg(dir)
        .arg(n.to_string())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    let read = match child.stdout.take() {
        Some(stdout) => BufReader::new(stdout).read_line(&mut line).map(drop),
        None => Ok(()),
    };
    // Killed without closing the store or the log: no seal, no final sync
    // of the index, the directory lock released by the kernel. The child is
    // killed (and reaped) whatever happened, so that it never outlives us; if
    // it already exited, the kill has nothing to do.
    let killed = child.kill();
    let status = child.wait()?;
    read?;
    match line
        .strip_prefix("synced ")
        .and_then(|s| s.trim().parse::<f64>().ok())
    {
        Some(secs) => {
            killed?;
            Ok(secs)
        }
        None => Err(format!("child did not report its write ({status}): {line:?}").into()),
    }
}

/// The child side of [`killed_child`].
fn child_writer(args: &[String]) -> BoxResult<()> {
    let [dir, n] = args else {
        return Err(format!("usage: {CHILD_FLAG} DIR RECORDS").into());
    };
    let n: u64 = n.parse()?;
    let store = Store::open(dir, StoreConfig::default())?;
    let log = store.open_log("big", LogConfig::with_durability(Durability::Never))?;
    let t = Instant::now();
    write_small_records(&log, n)?;
    log.sync()?;
    let secs = t.elapsed().as_secs_f64();
    let mut stdout = std::io::stdout();
    writeln!(stdout, "synced {secs}")?;
    stdout.flush()?;
    // Wait for SIGKILL with the store and log still open.
    let _open = (store, log);
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}
