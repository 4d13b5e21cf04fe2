//! Several OS processes contend for one key through one SQLite file.
//!
//! The parent re-runs this test binary as child processes (the ignored `child_worker` test, with
//! the database path in an environment variable). Each child does read-modify-write cycles on a
//! shared counter file under the lock and claims an "inside" marker file that must never exist
//! twice. The parent then checks the exact count, the absence of overlaps and that fencing tokens
//! strictly increase in the order the critical sections ran.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use leaselock::{Locker, WaitPolicy};
use leaselock_sqlite::{SqliteBackend, SqliteConfig};

const PROCESSES: usize = 6;
const CYCLES: usize = 15;
const CHILD_ENV: &str = "LEASELOCK_SQLITE_CHILD_DIR";

#[test]
fn processes_exclude_each_other() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("counter"), "0").unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            Command::new(&exe)
                .args([
                    "--exact",
                    "child_worker",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_ENV, dir.path())
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("spawn child")
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success(), "a child failed");
    }
    let counter: usize = fs::read_to_string(dir.path().join("counter"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        counter,
        PROCESSES * CYCLES,
        "lost updates mean overlapping sections"
    );
    let log = fs::read_to_string(dir.path().join("log")).unwrap();
    let tokens: Vec<u64> = log.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(tokens.len(), PROCESSES * CYCLES);
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "fencing tokens must strictly increase: {tokens:?}"
    );
    assert!(!dir.path().join("inside").exists());
}

#[test]
#[ignore = "a child process of processes_exclude_each_other"]
fn child_worker() {
    let dir =
        PathBuf::from(std::env::var_os(CHILD_ENV).expect("run by processes_exclude_each_other"));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(work(&dir));
}

async fn work(dir: &Path) {
    let backend = SqliteBackend::connect(SqliteConfig::new(dir.join("locks.db")))
        .await
        .unwrap();
    let locker = Locker::builder(backend)
        .wait(
            WaitPolicy::until(Duration::from_secs(120), Duration::from_millis(5))
                .with_jitter(Duration::from_millis(5)),
        )
        .build()
        .unwrap();
    locker.init_storage().await.unwrap();
    for _ in 0..CYCLES {
        let dir = dir.to_path_buf();
        locker
            .run("shared-counter", |lock| async move {
                // Claim the critical section; a second claimant means two holders at once.
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(dir.join("inside"))
                    .expect("another process is inside the critical section");
                let counter = dir.join("counter");
                let n: usize = fs::read_to_string(&counter)
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(3)).await;
                fs::write(&counter, (n + 1).to_string()).unwrap();
                let mut log = OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(dir.join("log"))
                    .unwrap();
                writeln!(log, "{}", lock.token()).unwrap();
                fs::remove_file(dir.join("inside")).unwrap();
            })
            .await
            .expect("run under lock")
            .expect("waited until acquired");
    }
}
