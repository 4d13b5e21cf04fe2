//! The shared fault suite against a real PostgreSQL server, for both backends: holder processes
//! killed and paused, a holder partitioned by a proxy, a separate server restarted under held
//! locks, skewed client clocks, and the soak across eight processes.
//!
//! Needs `LEASELOCK_POSTGRES_URL` (`cargo xtask test` sets it); skips loudly without it and fails
//! under `CI=true`. The restart case starts a server of its own (`initdb` in a temporary
//! directory), never touching the shared one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use leaselock::{LockBackend, Result};
use leaselock_conformance::faults::{addr_in_url, with_param, FaultTarget};
use leaselock_conformance::servers::{self, ScratchServer};
use leaselock_postgres::PgConfig;

const URL_VAR: &str = "LEASELOCK_POSTGRES_URL";

/// Opens `url` like `leaselock_postgres::from_url`, with a short operation timeout so a
/// partitioned session lock learns of its partition in seconds.
async fn connect(url: &str) -> Result<Arc<dyn LockBackend>> {
    let config = PgConfig::from_url(url)?
        .operation_timeout(Duration::from_secs(5))?
        .connect_timeout(Duration::from_secs(5))?;
    leaselock_postgres::backend(config)
}

/// A target over `url`, with the backend's own URL parameters `params`.
struct Pg {
    url: String,
    params: &'static [(&'static str, &'static str)],
}

impl Pg {
    fn with_params(&self, url: &str) -> String {
        self.params
            .iter()
            .fold(url.to_owned(), |url, (name, value)| {
                with_param(&url, name, value)
            })
    }

    async fn setup(params: &'static [(&'static str, &'static str)]) -> Option<Pg> {
        let base = leaselock_conformance::server_url(URL_VAR)?;
        let target = Pg {
            url: String::new(),
            params,
        };
        let url = target.with_params(&base);
        connect(&url)
            .await
            .expect("backend")
            .init_storage()
            .await
            .expect("init the shared storage");
        Some(Pg { url, params })
    }
}

#[leaselock::async_trait]
impl FaultTarget for Pg {
    fn url(&self) -> String {
        self.url.clone()
    }

    async fn connect(&self, url: &str) -> Result<Arc<dyn LockBackend>> {
        connect(url).await
    }

    fn server_addr(&self, url: &str) -> Option<SocketAddr> {
        addr_in_url(url)
    }

    async fn start_server(&self) -> Option<ScratchServer> {
        let server = servers::postgres().await?;
        let url = self.with_params(server.url());
        Some(server.with_url(url))
    }
}

mod advisory {
    use super::*;

    async fn setup() -> Option<Pg> {
        Pg::setup(&[
            ("strategy", "advisory"),
            ("table", "ll_fault_advisory"),
            ("prefix", "ll_fault"),
        ])
        .await
    }

    leaselock_conformance::fault_tests!(setup);
}

mod table {
    use super::*;

    async fn setup() -> Option<Pg> {
        Pg::setup(&[("strategy", "table"), ("table", "ll_fault_leases")]).await
    }

    leaselock_conformance::fault_tests!(setup);
}
