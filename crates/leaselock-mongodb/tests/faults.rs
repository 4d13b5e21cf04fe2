//! The shared fault suite against a real MongoDB-protocol server named by
//! `LEASELOCK_MONGODB_URL` (`cargo xtask test` starts SecantusDB and sets it): holder processes
//! killed and paused, a holder partitioned by a proxy, a separate server restarted under a held
//! lock, skewed client clocks, and the soak across eight processes. The restart case starts a
//! SecantusDB of its own in a temporary directory, never touching the shared one.

use std::net::SocketAddr;
use std::sync::Arc;

use leaselock::{LockBackend, Result};
use leaselock_conformance::faults::{addr_in_url, with_param, FaultTarget};
use leaselock_conformance::servers::{self, ScratchServer};

/// The collection of the fault cases.
const COLLECTION: &str = "ll_fault_locks";

struct Mongo {
    url: String,
}

/// `url` for the fault collection, talking to the one server named in it (no discovery of the
/// server's other addresses, so a proxy in front of it stays in the path).
fn fault_url(url: &str) -> String {
    let url = with_param(url, "collection", COLLECTION);
    if url.contains("directConnection=") {
        url
    } else {
        with_param(&url, "directConnection", "true")
    }
}

#[leaselock::async_trait]
impl FaultTarget for Mongo {
    fn url(&self) -> String {
        self.url.clone()
    }

    async fn connect(&self, url: &str) -> Result<Arc<dyn LockBackend>> {
        leaselock_mongodb::from_url(url).await
    }

    fn server_addr(&self, url: &str) -> Option<SocketAddr> {
        addr_in_url(url)
    }

    async fn start_server(&self) -> Option<ScratchServer> {
        let server = servers::secantus().await?;
        let url = fault_url(server.url());
        Some(server.with_url(url))
    }
}

async fn setup() -> Option<Mongo> {
    let url = fault_url(&leaselock_conformance::server_url("LEASELOCK_MONGODB_URL")?);
    leaselock_mongodb::from_url(&url)
        .await
        .expect("connect")
        .init_storage()
        .await
        .expect("init the fault collection");
    Some(Mongo { url })
}

leaselock_conformance::fault_tests!(setup);
