//! The shared fault suite against DynamoDB Local (or any DynamoDB) at `LEASELOCK_DYNAMODB_URL`
//! (`cargo xtask test` starts DynamoDB Local and sets it): holder processes killed and paused, a
//! holder partitioned by a proxy, a separate server restarted under a held lock, skewed client
//! clocks (a takeover still waits a whole lease), and the soak across eight processes. The
//! restart case starts a DynamoDB Local of its own that persists to a temporary directory, never
//! touching the shared one.

use std::net::SocketAddr;
use std::sync::Arc;

use leaselock::{LockBackend, Result};
use leaselock_conformance::faults::{addr_in_url, FaultTarget};
use leaselock_conformance::servers::{self, ScratchServer};

/// The table of the fault cases.
const TABLE: &str = "ll_fault_locks";

struct Dynamo {
    url: String,
}

/// `url` (`dynamodb://TABLE?…`) naming the fault table instead.
fn fault_url(url: &str) -> String {
    let rest = url.strip_prefix("dynamodb://").expect("a dynamodb:// URL");
    let query = rest.split_once('?').map(|(_, q)| q).unwrap_or("");
    format!("dynamodb://{TABLE}?{query}")
}

#[leaselock::async_trait]
impl FaultTarget for Dynamo {
    fn url(&self) -> String {
        self.url.clone()
    }

    async fn connect(&self, url: &str) -> Result<Arc<dyn LockBackend>> {
        leaselock_dynamodb::from_url(url).await
    }

    fn server_addr(&self, url: &str) -> Option<SocketAddr> {
        addr_in_url(url)
    }

    async fn start_server(&self) -> Option<ScratchServer> {
        let server = servers::dynamodb_local().await?;
        let url = fault_url(server.url());
        Some(server.with_url(url))
    }
}

async fn setup() -> Option<Dynamo> {
    let url = fault_url(&leaselock_conformance::server_url(
        "LEASELOCK_DYNAMODB_URL",
    )?);
    leaselock_dynamodb::from_url(&url)
        .await
        .expect("connect")
        .init_storage()
        .await
        .expect("init the fault table");
    Some(Dynamo { url })
}

leaselock_conformance::fault_tests!(setup);
