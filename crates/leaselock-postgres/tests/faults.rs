//! The shared fault suite against a real PostgreSQL server, for both backends: holder processes
//! killed and paused, a holder partitioned by a proxy, a separate server restarted under held
//! locks, skewed client clocks, and the soak across eight processes; and for the advisory
//! backend, fencing tokens across a real server crash.
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

/// A real server crash: one server process killed with SIGKILL makes PostgreSQL end every
/// session and run crash recovery, which empties unlogged tables. The advisory backend's holder
/// table is one; the next token still comes out above every token handed out before, from the
/// durable reservation. On a server of the test's own, never the shared one.
#[tokio::test]
async fn advisory_tokens_grow_across_a_server_crash() {
    use leaselock::{AcquireOutcome, AcquireRequest, LockKey, OwnerId};
    use leaselock_postgres::PgAdvisoryBackend;

    if leaselock_conformance::server_url(URL_VAR).is_none() {
        return;
    }
    let Some(server) = servers::postgres().await else {
        return;
    };
    let url = with_param(server.url(), "table", "ll_crash_advisory");
    let backend = || PgAdvisoryBackend::new(PgConfig::from_url(&url).unwrap()).unwrap();
    let key = LockKey::new("crash/tokens").unwrap();
    let request = AcquireRequest::without_expiry(key.clone(), OwnerId::new("crash-test").unwrap());
    let acquire = |backend: PgAdvisoryBackend| {
        let request = request.clone();
        async move {
            match backend.try_acquire(&request).await.expect("try_acquire") {
                AcquireOutcome::Acquired(lease) => {
                    assert!(backend.release(&lease).await.expect("release"));
                    lease.token.get()
                }
                AcquireOutcome::Held(holder) => panic!("free key held by {holder:?}"),
            }
        }
    };

    let before = backend();
    before.init_storage().await.expect("init");
    let mut tokens = Vec::new();
    for _ in 0..3 {
        tokens.push(acquire(before.clone()).await);
    }
    assert_eq!(tokens, [1, 2, 3]);
    let (client, connection) = tokio_postgres::connect(server.url(), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success(), "kill -KILL {pid}");
    drop(before);

    // Crash recovery takes the server a moment: connect until it answers again.
    let after = backend();
    let started = std::time::Instant::now();
    while let Err(e) = after.check_storage().await {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the server did not come back from the crash: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (client, connection) = tokio_postgres::connect(server.url(), tokio_postgres::NoTls)
        .await
        .expect("connect after the crash");
    tokio::spawn(connection);
    let rows: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {}", after.holder_table()),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "crash recovery empties the unlogged holder table");
    let next = acquire(after.clone()).await;
    assert_eq!(
        next, 1001,
        "above the reservation (1 + 999), so above 1, 2 and 3"
    );
    drop(server);
}
