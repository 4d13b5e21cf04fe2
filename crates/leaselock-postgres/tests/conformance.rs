//! The shared conformance suite against a real PostgreSQL server, for both backends.
//!
//! Set `LEASELOCK_POSTGRES_URL` (for example
//! `postgres://postgres@127.0.0.1:5432/leaselock_test`), or run `cargo xtask test`, which starts
//! the server and sets it. Unset: skipped loudly; under `CI=true`: a failure.

use std::sync::Arc;

use leaselock::{Error, Lease, LockBackend, Result};
use leaselock_postgres::{PgAdvisoryBackend, PgConfig, PgTableBackend};

const URL_VAR: &str = "LEASELOCK_POSTGRES_URL";

fn config(url: &str) -> Result<PgConfig> {
    PgConfig::from_url(url)
}

mod advisory {
    use super::*;

    /// The suite's shared storage: one counter table and prefix for every case.
    const TABLE: &str = "ll_conformance_advisory";
    const PREFIX: &str = "ll_conformance";

    pub struct Advisory {
        url: String,
    }

    #[leaselock::async_trait]
    impl leaselock_conformance::Target for Advisory {
        async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
            let config = config(&self.url)?.table(TABLE)?.prefix(PREFIX)?;
            Ok(Arc::new(PgAdvisoryBackend::new(config)?))
        }

        async fn backend_in(&self, namespace: &str) -> Result<Arc<dyn LockBackend>> {
            let config = config(&self.url)?.table(namespace)?.prefix(namespace)?;
            Ok(Arc::new(PgAdvisoryBackend::new(config)?))
        }

        async fn kill_session(&self, lease: &Lease) -> Result<()> {
            let id = leaselock_postgres::advisory_key(PREFIX, lease.key.as_str());
            let (classid, objid) = leaselock_postgres::advisory_lock_parts(id);
            let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
                .await
                .map_err(|e| Error::transient("test", e))?;
            tokio::spawn(connection);
            let rows = client
                .query(
                    "SELECT pg_terminate_backend(l.pid, 5000) FROM pg_locks l \
                      WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
                        AND l.classid = $1::int8::oid AND l.objid = $2::int8::oid \
                        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                    &[&i64::from(classid), &i64::from(objid)],
                )
                .await
                .map_err(|e| Error::transient("test", e))?;
            assert_eq!(rows.len(), 1, "exactly one session holds `{}`", lease.key);
            assert!(rows[0].get::<_, bool>(0), "the session was terminated");
            Ok(())
        }
    }

    async fn setup() -> Option<Advisory> {
        let url = leaselock_conformance::server_url(URL_VAR)?;
        let target = Advisory { url };
        let backend = leaselock_conformance::Target::backend(&target)
            .await
            .expect("backend");
        backend
            .init_storage()
            .await
            .expect("init the shared storage");
        Some(target)
    }

    leaselock_conformance::conformance_tests!(setup);
}

mod table {
    use super::*;

    /// The suite's shared lease table.
    const TABLE: &str = "ll_conformance_leases";

    pub struct Table {
        url: String,
    }

    #[leaselock::async_trait]
    impl leaselock_conformance::Target for Table {
        async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
            Ok(Arc::new(PgTableBackend::new(
                config(&self.url)?.table(TABLE)?,
            )?))
        }

        async fn backend_in(&self, namespace: &str) -> Result<Arc<dyn LockBackend>> {
            Ok(Arc::new(PgTableBackend::new(
                config(&self.url)?.table(namespace)?,
            )?))
        }

        async fn kill_session(&self, _lease: &Lease) -> Result<()> {
            unreachable!("the table backend holds leases, not sessions")
        }
    }

    async fn setup() -> Option<Table> {
        let url = leaselock_conformance::server_url(URL_VAR)?;
        let target = Table { url };
        let backend = leaselock_conformance::Target::backend(&target)
            .await
            .expect("backend");
        backend
            .init_storage()
            .await
            .expect("init the shared storage");
        Some(target)
    }

    leaselock_conformance::conformance_tests!(setup);
}
