//! The shared conformance suite against a real MySQL/MariaDB server, once per backend.
//!
//! Needs `LEASELOCK_MYSQL_URL` (for example `mysql://root@127.0.0.1:3306/leaselock_test`); skips
//! loudly without it, and fails under `CI=true`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use leaselock::{Error, Lease, LockBackend, Namespace, Result};
use leaselock_mysql::mysql_async::prelude::*;
use leaselock_mysql::mysql_async::{Conn, Opts};
use leaselock_mysql::{MysqlConfig, MysqlGetLockBackend, MysqlTableBackend};

const URL_VAR: &str = "LEASELOCK_MYSQL_URL";

async fn raw_conn(url: &str) -> Conn {
    let opts = Opts::from_url(url).expect("a valid LEASELOCK_MYSQL_URL");
    Conn::new(opts).await.expect("connect to the test server")
}

/// Drops the tables earlier runs' cases left behind (fresh namespaces `ll_cf_*` older than an
/// hour), once per test process.
async fn sweep_old_namespaces(url: &str) {
    static SWEPT: AtomicBool = AtomicBool::new(false);
    if SWEPT.swap(true, Ordering::SeqCst) {
        return;
    }
    let mut conn = raw_conn(url).await;
    let old: Vec<String> = conn
        .query(
            "SELECT table_name FROM information_schema.tables \
             WHERE table_schema = DATABASE() AND table_name LIKE 'll\\_cf\\_%' \
             AND create_time < NOW() - INTERVAL 1 HOUR",
        )
        .await
        .expect("list old test tables");
    for table in old {
        let table = Namespace::for_field("table", table).expect("a test namespace");
        conn.query_drop(format!("DROP TABLE IF EXISTS {}", table.backquoted()))
            .await
            .expect("drop an old test table");
    }
    let _ = conn.disconnect().await;
}

/// `KILL CONNECTION` of whoever holds `lock_name`, from a separate connection.
async fn kill_holder(url: &str, lock_name: &str) -> Result<()> {
    let mut conn = raw_conn(url).await;
    let holder: Option<Option<u64>> = conn
        .exec_first("SELECT IS_USED_LOCK(?)", (lock_name,))
        .await
        .map_err(|e| Error::transient("test", e))?;
    let id = holder
        .flatten()
        .ok_or_else(|| Error::invalid("lease", format!("`{lock_name}` is not held")))?;
    // The id is a number the server gave: the plain-text form works on every server version.
    conn.query_drop(format!("KILL CONNECTION {id}"))
        .await
        .map_err(|e| Error::transient("test", e))?;
    let _ = conn.disconnect().await;
    Ok(())
}

mod get_lock {
    use super::*;

    const TABLE: &str = "leaselock_cf_get_lock";
    const PREFIX: &str = "llcf";

    pub struct Target {
        url: String,
    }

    impl Target {
        fn config(&self) -> Result<MysqlConfig> {
            MysqlConfig::from_url(&self.url)
        }
    }

    #[leaselock::async_trait]
    impl leaselock_conformance::Target for Target {
        async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
            let config = self.config()?.table(TABLE).prefix(PREFIX);
            Ok(Arc::new(MysqlGetLockBackend::new(config)?))
        }

        async fn backend_in(&self, namespace: &str) -> Result<Arc<dyn LockBackend>> {
            let config = self.config()?.table(namespace).prefix(namespace);
            Ok(Arc::new(MysqlGetLockBackend::new(config)?))
        }

        async fn kill_session(&self, lease: &Lease) -> Result<()> {
            kill_holder(
                &self.url,
                &leaselock_mysql::lock_name(PREFIX, lease.key.as_str()),
            )
            .await
        }
    }

    async fn setup() -> Option<Target> {
        let url = leaselock_conformance::server_url(URL_VAR)?;
        sweep_old_namespaces(&url).await;
        let target = Target { url };
        leaselock_conformance::Target::backend(&target)
            .await
            .expect("backend")
            .init_storage()
            .await
            .expect("init the shared storage");
        Some(target)
    }

    leaselock_conformance::conformance_tests!(setup);
}

mod table {
    use super::*;

    const TABLE: &str = "leaselock_cf_table";

    pub struct Target {
        url: String,
    }

    impl Target {
        fn config(&self) -> Result<MysqlConfig> {
            MysqlConfig::from_url(&self.url)
        }
    }

    #[leaselock::async_trait]
    impl leaselock_conformance::Target for Target {
        async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
            Ok(Arc::new(MysqlTableBackend::new(
                self.config()?.table(TABLE),
            )?))
        }

        async fn backend_in(&self, namespace: &str) -> Result<Arc<dyn LockBackend>> {
            Ok(Arc::new(MysqlTableBackend::new(
                self.config()?.table(namespace),
            )?))
        }

        async fn kill_session(&self, _lease: &Lease) -> Result<()> {
            unreachable!("lease-table locks are not tied to a session")
        }
    }

    async fn setup() -> Option<Target> {
        let url = leaselock_conformance::server_url(URL_VAR)?;
        sweep_old_namespaces(&url).await;
        let target = Target { url };
        leaselock_conformance::Target::backend(&target)
            .await
            .expect("backend")
            .init_storage()
            .await
            .expect("init the shared storage");
        Some(target)
    }

    leaselock_conformance::conformance_tests!(setup);
}
