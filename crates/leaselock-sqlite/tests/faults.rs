//! The shared fault suite against SQLite: holder processes killed, paused and racing through
//! one database file, and the soak across eight processes. SQLite has no network to cut and no
//! server to restart, and its expiry clock is each process's own (one host, one clock), so the
//! partition, restart and clock-skew cases report that they do not apply.

use std::net::SocketAddr;
use std::sync::Arc;

use leaselock::{LockBackend, Result};
use leaselock_conformance::faults::FaultTarget;
use leaselock_conformance::servers::ScratchServer;

struct Sqlite {
    _dir: tempfile::TempDir,
    url: String,
}

#[leaselock::async_trait]
impl FaultTarget for Sqlite {
    fn url(&self) -> String {
        self.url.clone()
    }

    async fn connect(&self, url: &str) -> Result<Arc<dyn LockBackend>> {
        leaselock_sqlite::from_url(url).await
    }

    fn server_addr(&self, _url: &str) -> Option<SocketAddr> {
        None
    }

    async fn start_server(&self) -> Option<ScratchServer> {
        None
    }

    fn clock_is_per_process(&self) -> bool {
        true
    }
}

async fn setup() -> Option<Sqlite> {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("faults.db").display());
    leaselock_sqlite::from_url(&url)
        .await
        .expect("open")
        .init_storage()
        .await
        .expect("init");
    Some(Sqlite { _dir: dir, url })
}

leaselock_conformance::fault_tests!(setup);
