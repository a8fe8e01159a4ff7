//! A service process killed with SIGKILL mid-message loses nothing: every
//! confirmed send survives, and the message it was handling is handled
//! again by the next process on the same embedded data directory.
//!
//! The test re-runs its own binary as the child (`child_process`, which does
//! nothing unless `TERN_CRASH_CHILD_DIR` is set).
#![allow(clippy::unwrap_used)]
#![cfg(unix)]

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tern::transport::embedded::Embedded;
use tern::{Bus, Context, Service};

#[derive(Debug, Serialize, Deserialize)]
struct ProcessItem {
    n: u32,
}
tern::message!(command ProcessItem = "crash.process-item.v1");

const CHILD_DIR: &str = "TERN_CRASH_CHILD_DIR";
const ITEMS: u32 = 40;
/// The child blocks forever on this item, so the kill lands mid-message.
const STUCK: u32 = 17;

fn append_line(path: &Path, line: &str) {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    // One write per line: the sender and the handlers log concurrently, and
    // O_APPEND keeps whole writes apart, not the pieces of a `writeln!`.
    file.write_all(format!("{line}\n").as_bytes()).unwrap();
    file.sync_all().unwrap();
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The child: sends every item (each confirmed), then handles them, and
/// hangs inside the handler of item `STUCK` until it is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_process() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let bus = Bus::new(Embedded::open(dir.join("broker")).await.unwrap());
    let log = dir.join("child.log");
    let handler_log = log.clone();
    let _running = bus
        .start(Service::new("crash-worker").prefetch(4).on_command(
            move |item: ProcessItem, _ctx: Context| {
                let log = handler_log.clone();
                async move {
                    append_line(&log, &format!("start {}", item.n));
                    if item.n == STUCK {
                        std::future::pending::<()>().await;
                    }
                    append_line(&log, &format!("done {}", item.n));
                    Ok(())
                }
            },
        ))
        .await
        .unwrap();
    for n in 0..ITEMS {
        bus.send(&ProcessItem { n }).await.unwrap();
        append_line(&log, &format!("sent {n}"));
    }
    std::future::pending::<()>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_service_loses_no_confirmed_or_unacked_message() {
    if std::env::var(CHILD_DIR).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("child.log");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["child_process", "--exact", "--nocapture"])
        .env(CHILD_DIR, dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = lines(&log);
        let sent_all = seen.iter().any(|l| l == &format!("sent {}", ITEMS - 1));
        let stuck = seen.iter().any(|l| l == &format!("start {STUCK}"));
        if sent_all && stuck {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the child never got going: {seen:?}"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the child exited early"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let child_lines = lines(&log);
    let done_by_child: BTreeSet<u32> = child_lines
        .iter()
        .filter_map(|l| l.strip_prefix("done ")?.parse().ok())
        .collect();
    assert!(!done_by_child.contains(&STUCK));

    // A new process on the same directory handles the rest.
    let bus = Bus::new(Embedded::open(dir.path().join("broker")).await.unwrap());
    let handled: Arc<Mutex<BTreeSet<u32>>> = Arc::default();
    let sink = Arc::clone(&handled);
    let running = bus
        .start(
            Service::new("crash-worker").on_command(move |item: ProcessItem, _ctx: Context| {
                sink.lock().unwrap().insert(item.n);
                std::future::ready(Ok(()))
            }),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all: BTreeSet<u32> = handled
            .lock()
            .unwrap()
            .union(&done_by_child)
            .copied()
            .collect();
        if all.len() == ITEMS as usize {
            break;
        }
        if Instant::now() >= deadline {
            let missing: Vec<u32> = (0..ITEMS).filter(|n| !all.contains(n)).collect();
            let about: Vec<&String> = child_lines
                .iter()
                .filter(|l| missing.iter().any(|n| l.ends_with(&format!(" {n}"))))
                .collect();
            panic!(
                "after the kill, {missing:?} were never handled; the child's log of them: {about:?}; handled after restart: {:?}",
                handled.lock().unwrap()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        handled.lock().unwrap().contains(&STUCK),
        "the message in flight at the kill is handled again"
    );
    running.shutdown().await.unwrap();
}
