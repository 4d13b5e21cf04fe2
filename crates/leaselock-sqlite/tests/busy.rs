//! Another connection (another process, in real use) holding the database's write lock: a call
//! waits for it through the busy timeout instead of failing, and gives up with an error when the
//! busy timeout passes first.
//!
//! Calls on a free connection run on the caller's thread with a busy handler that gives up at
//! once (an async thread must not wait), then on the blocking pool, which waits: these tests
//! check that the second step happens.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use leaselock::{AcquireOutcome, AcquireRequest, LockBackend, LockKey, OwnerId};
use leaselock_sqlite::{SqliteBackend, SqliteConfig};
use rusqlite::{Connection, TransactionBehavior};

fn request(key: &str) -> AcquireRequest {
    AcquireRequest::new(
        LockKey::new(key).unwrap(),
        OwnerId::new("busy-test").unwrap(),
        Duration::from_secs(30),
    )
    .unwrap()
}

/// Holds the write lock of `path` from another connection on another thread: returns once it is
/// held, and releases it when `release` receives (or is dropped), setting `released` first.
fn hold_write_lock(
    path: std::path::PathBuf,
    released: Arc<AtomicBool>,
) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (held_tx, held_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        let mut conn = Connection::open(&path).unwrap();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .unwrap();
        held_tx.send(()).unwrap();
        let _ = release_rx.recv();
        released.store(true, Ordering::SeqCst);
        tx.commit().unwrap();
    });
    held_rx.recv().unwrap();
    (release_tx, holder)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_on_a_locked_database_waits_for_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.db");
    let config = SqliteConfig::new(&path).busy_timeout(Duration::from_secs(30));
    let backend = SqliteBackend::connect(config).await.unwrap();
    backend.init_storage().await.unwrap();

    let released = Arc::new(AtomicBool::new(false));
    let (release, holder) = hold_write_lock(path.clone(), Arc::clone(&released));
    let acquiring = tokio::spawn({
        let backend = backend.clone();
        async move { backend.try_acquire(&request("busy/wait")).await }
    });
    // Let the call meet the lock before it goes (with 30 s of busy timeout, the call cannot give
    // up meanwhile: this pause only makes the wait likely to be exercised, never the verdict).
    tokio::time::sleep(Duration::from_millis(200)).await;
    release.send(()).unwrap();
    let outcome = acquiring.await.unwrap().expect("waits, then acquires");
    assert!(
        matches!(outcome, AcquireOutcome::Acquired(_)),
        "{outcome:?}"
    );
    assert!(released.load(Ordering::SeqCst));
    holder.join().unwrap();
}

#[tokio::test]
async fn a_call_gives_up_when_the_busy_timeout_passes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.db");
    let config = SqliteConfig::new(&path).busy_timeout(Duration::from_millis(50));
    let backend = SqliteBackend::connect(config).await.unwrap();
    backend.init_storage().await.unwrap();

    let released = Arc::new(AtomicBool::new(false));
    let (release, holder) = hold_write_lock(path.clone(), Arc::clone(&released));
    let error = backend
        .try_acquire(&request("busy/give-up"))
        .await
        .expect_err("the write lock is held past the busy timeout");
    assert!(
        error.is_retryable(),
        "a busy database is worth retrying: {error:?}"
    );
    assert!(!released.load(Ordering::SeqCst));
    release.send(()).unwrap();
    holder.join().unwrap();
    // Once the other connection is gone, the same call succeeds, on the caller's thread again.
    let outcome = backend.try_acquire(&request("busy/give-up")).await.unwrap();
    assert!(
        matches!(outcome, AcquireOutcome::Acquired(_)),
        "{outcome:?}"
    );
}
