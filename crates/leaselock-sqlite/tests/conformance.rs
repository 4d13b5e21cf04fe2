//! The conformance suite against SQLite: every case on a real database file, each backend
//! instance on its own connection.

use std::path::PathBuf;
use std::sync::Arc;

use leaselock::{Lease, LockBackend, Result};
use leaselock_sqlite::{SqliteBackend, SqliteConfig};

struct Sqlite {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

#[leaselock::async_trait]
impl leaselock_conformance::Target for Sqlite {
    async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(
            SqliteBackend::connect(SqliteConfig::new(&self.path)).await?,
        ))
    }

    async fn backend_in(&self, namespace: &str) -> Result<Arc<dyn LockBackend>> {
        let config = SqliteConfig::new(&self.path).table(namespace);
        Ok(Arc::new(SqliteBackend::connect(config).await?))
    }

    async fn kill_session(&self, _lease: &Lease) -> Result<()> {
        unreachable!("SQLite locks are leases, not sessions")
    }
}

async fn setup() -> Option<Sqlite> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("conformance.db");
    let backend = SqliteBackend::connect(SqliteConfig::new(&path))
        .await
        .expect("open");
    backend.init_storage().await.expect("init");
    Some(Sqlite { _dir: dir, path })
}

leaselock_conformance::conformance_tests!(setup);
