//! The shared fault suite against a real MySQL/MariaDB server, for both backends: holder
//! processes killed and paused, a holder partitioned by a proxy, a separate server restarted
//! under held locks, skewed client clocks, and the soak across eight processes.
//!
//! Needs `LEASELOCK_MYSQL_URL` (`cargo xtask test` sets it); skips loudly without it and fails
//! under `CI=true`. The restart case starts a MariaDB of its own (`mariadb-install-db` and
//! `mariadbd` in a temporary directory), never touching the shared one.

use std::net::SocketAddr;
use std::sync::Arc;

use leaselock::{LockBackend, Result};
use leaselock_conformance::faults::{addr_in_url, with_param, FaultTarget};
use leaselock_conformance::servers::{self, ScratchServer};

const URL_VAR: &str = "LEASELOCK_MYSQL_URL";

/// A target over `url`, with the backend's own URL parameters `params`.
struct Mysql {
    url: String,
    params: &'static [(&'static str, &'static str)],
}

impl Mysql {
    fn with_params(&self, url: &str) -> String {
        self.params
            .iter()
            .fold(url.to_owned(), |url, (name, value)| {
                with_param(&url, name, value)
            })
    }

    async fn setup(params: &'static [(&'static str, &'static str)]) -> Option<Mysql> {
        let base = leaselock_conformance::server_url(URL_VAR)?;
        let mut target = Mysql {
            url: String::new(),
            params,
        };
        target.url = target.with_params(&base);
        let backend = leaselock_mysql::from_url(&target.url)
            .await
            .expect("backend");
        // The shared server may be busy with every other test ("Too many connections"): retry.
        let started = std::time::Instant::now();
        while let Err(error) = backend.init_storage().await {
            assert!(
                error.is_retryable() && started.elapsed() < std::time::Duration::from_secs(60),
                "init the shared storage: {error}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        Some(target)
    }
}

#[leaselock::async_trait]
impl FaultTarget for Mysql {
    fn url(&self) -> String {
        self.url.clone()
    }

    async fn connect(&self, url: &str) -> Result<Arc<dyn LockBackend>> {
        leaselock_mysql::from_url(url).await
    }

    fn server_addr(&self, url: &str) -> Option<SocketAddr> {
        addr_in_url(url)
    }

    fn url_via(&self, url: &str, addr: SocketAddr) -> String {
        let server = addr_in_url(url).expect("a server address in the URL");
        let url = url.replacen(&server.to_string(), &addr.to_string(), 1);
        // mysql_async switches to the server's Unix socket when it finds the server local
        // (`prefer_socket`), which would go around the proxy.
        with_param(&url, "prefer_socket", "false")
    }

    async fn start_server(&self) -> Option<ScratchServer> {
        let server = servers::mariadb().await?;
        let url = self.with_params(server.url());
        Some(server.with_url(url))
    }
}

mod get_lock {
    use super::*;

    async fn setup() -> Option<Mysql> {
        Mysql::setup(&[
            ("strategy", "get_lock"),
            ("pool_max", "4"),
            ("table", "ll_fault_get_lock"),
            ("prefix", "llfault"),
        ])
        .await
    }

    leaselock_conformance::fault_tests!(setup);
}

mod table {
    use super::*;

    async fn setup() -> Option<Mysql> {
        Mysql::setup(&[
            ("strategy", "table"),
            ("table", "ll_fault_leases"),
            ("pool_max", "4"),
        ])
        .await
    }

    leaselock_conformance::fault_tests!(setup);
}
