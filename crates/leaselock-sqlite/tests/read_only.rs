//! Opening for tools that only look: `SqliteConfig::read_only` and `create_if_missing(false)`
//! create nothing and change nothing; a file that is not a lock table says so.

use std::path::Path;
use std::time::Duration;

use leaselock::{AcquireOutcome, AcquireRequest, Error, LockBackend, LockKey, LockState, OwnerId};
use leaselock_sqlite::{SqliteBackend, SqliteConfig};

fn request(key: &str) -> AcquireRequest {
    AcquireRequest::new(
        LockKey::new(key).unwrap(),
        OwnerId::new("me").unwrap(),
        Duration::from_secs(30),
    )
    .unwrap()
}

/// Every file in `dir`, with its bytes.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p.file_name().unwrap().to_string_lossy().into_owned(), bytes)
        })
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn a_missing_file_is_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.db");
    for config in [
        SqliteConfig::new(&path).read_only(true),
        SqliteConfig::new(&path).create_if_missing(false),
        SqliteConfig::new(&path)
            .read_only(true)
            .create_if_missing(true),
    ] {
        let err = SqliteBackend::connect(config).await.unwrap_err();
        assert!(matches!(err, Error::NotInitialized { .. }), "{err}");
        assert!(err.to_string().contains("does not exist"), "{err}");
        assert!(!path.exists(), "the file was created");
    }
    assert!(snapshot(dir.path()).is_empty());
}

#[tokio::test]
async fn read_only_reads_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locks.db");
    {
        let rw = SqliteBackend::connect(SqliteConfig::new(&path))
            .await
            .unwrap();
        rw.init_storage().await.unwrap();
        let AcquireOutcome::Acquired(_) = rw.try_acquire(&request("held")).await.unwrap() else {
            panic!("not acquired")
        };
    }
    let before = std::fs::read(&path).unwrap();
    let ro = SqliteBackend::connect(SqliteConfig::new(&path).read_only(true))
        .await
        .unwrap();
    ro.check_storage().await.unwrap();
    let key = LockKey::new("held").unwrap();
    assert!(matches!(ro.status(&key).await.unwrap(), LockState::Held(_)));
    assert_eq!(ro.list().await.unwrap().len(), 1);
    assert_eq!(ro.list_with_expired().await.unwrap().len(), 1);
    // Writes fail at once, as errors no retry can fix.
    let err = ro.try_acquire(&request("other")).await.unwrap_err();
    assert!(!err.is_retryable(), "{err:?}");
    assert!(err.to_string().contains("read-only"), "{err}");
    let err = ro.force_release(&key).await.unwrap_err();
    assert!(!err.is_retryable(), "{err:?}");
    drop(ro);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the database changed"
    );
}

#[tokio::test]
async fn a_directory_or_a_foreign_file_is_not_accessible() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("dir.db");
    std::fs::create_dir(&sub).unwrap();
    let foreign = dir.path().join("notes.db");
    std::fs::write(&foreign, "not a database, just some words ".repeat(8)).unwrap();
    let before = snapshot(dir.path());
    for path in [&sub, &foreign] {
        for config in [
            SqliteConfig::new(path),
            SqliteConfig::new(path).read_only(true),
        ] {
            let err = SqliteBackend::connect(config).await.unwrap_err();
            // Waiting does not turn either into a database: permanent, never retried.
            assert!(!err.is_retryable(), "{err}");
            let text = err.to_string();
            assert!(
                text.contains(&*path.file_name().unwrap().to_string_lossy()),
                "{text}"
            );
        }
    }
    assert_eq!(snapshot(dir.path()), before, "something changed");
    assert_eq!(std::fs::read_dir(&sub).unwrap().count(), 0);
}

#[tokio::test]
async fn check_names_a_view_or_a_table_with_other_columns() {
    let dir = tempfile::tempdir().unwrap();
    for (name, schema, expected) in [
        (
            "view.db",
            "CREATE TABLE t (x); CREATE VIEW leaselock_locks AS SELECT x FROM t;",
            "is a view",
        ),
        (
            "columns.db",
            "CREATE TABLE leaselock_locks (id INTEGER PRIMARY KEY, name TEXT);",
            "is not a leaselock lock table",
        ),
    ] {
        let path = dir.path().join(name);
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(schema)
            .unwrap();
        let backend = SqliteBackend::connect(SqliteConfig::new(&path))
            .await
            .unwrap();
        // `CREATE TABLE IF NOT EXISTS` succeeds over both; the check after it must not.
        backend.init_storage().await.unwrap();
        let err = backend.check_storage().await.unwrap_err();
        assert!(matches!(err, Error::NotAccessible { .. }), "{name}: {err}");
        assert!(err.to_string().contains(expected), "{name}: {err}");
    }
}
