//! The conformance suite against a real MongoDB-protocol server named by `LEASELOCK_MONGODB_URL`
//! (for example `mongodb://127.0.0.1:27018/leaselock_test`; `cargo xtask test` starts one).

use std::sync::Arc;

use leaselock::{Lease, LockBackend, Result};
use leaselock_mongodb::{MongoBackend, MongoConfig};

struct Mongo {
    url: String,
}

#[leaselock::async_trait]
impl leaselock_conformance::Target for Mongo {
    async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
        // A new client per instance: its own connection pool, like another process.
        Ok(Arc::new(
            MongoBackend::connect(MongoConfig::from_url(&self.url)?).await?,
        ))
    }

    async fn backend_in(&self, namespace: &str) -> Result<Arc<dyn LockBackend>> {
        let config = MongoConfig::from_url(&self.url)?.collection(namespace);
        Ok(Arc::new(MongoBackend::connect(config).await?))
    }

    async fn kill_session(&self, _lease: &Lease) -> Result<()> {
        unreachable!("MongoDB locks are leases, not sessions")
    }
}

async fn setup() -> Option<Mongo> {
    let url = leaselock_conformance::server_url("LEASELOCK_MONGODB_URL")?;
    let shared = MongoBackend::connect(MongoConfig::from_url(&url).expect("a valid URL"))
        .await
        .expect("connect");
    shared
        .init_storage()
        .await
        .expect("init the shared collection");
    Some(Mongo { url })
}

leaselock_conformance::conformance_tests!(setup);
