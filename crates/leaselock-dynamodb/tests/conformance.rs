//! The shared conformance suite against DynamoDB Local (or any DynamoDB) at
//! `LEASELOCK_DYNAMODB_URL`, e.g.
//! `dynamodb://leaselock_test?endpoint=http://127.0.0.1:8000&region=us-east-1`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use leaselock::{Lease, LockBackend, Namespace, Result};
use leaselock_dynamodb::{DynamoDbBackend, DynamoDbConfig};

struct Dynamo {
    url: String,
}

impl Dynamo {
    async fn connect(&self, table: Option<&str>) -> Result<DynamoDbBackend> {
        let mut config = DynamoDbConfig::from_url(&self.url)?;
        if let Some(table) = table {
            config = config.table(table);
        }
        DynamoDbBackend::connect(config).await
    }
}

#[leaselock::async_trait]
impl leaselock_conformance::Target for Dynamo {
    async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
        // A new client (its own connections) over the shared table.
        Ok(Arc::new(self.connect(None).await?))
    }

    async fn backend_in(&self, namespace: &str) -> Result<Arc<dyn LockBackend>> {
        Namespace::for_field("table", namespace)?;
        Ok(Arc::new(self.connect(Some(namespace)).await?))
    }

    async fn kill_session(&self, _lease: &Lease) -> Result<()> {
        unreachable!("DynamoDB locks are leases, not sessions")
    }
}

async fn setup() -> Option<Dynamo> {
    let url = leaselock_conformance::server_url("LEASELOCK_DYNAMODB_URL")?;
    let target = Dynamo { url };
    let shared = target.connect(None).await.expect("connect to DynamoDB");
    shared.init_storage().await.expect("init the shared table");
    remove_old_case_tables(&shared).await;
    Some(target)
}

/// The cases create a fresh table each for their init checks; on a long-running local server
/// they would pile up. Once per test process, drop case tables older than an hour (never ones a
/// running case may still use).
async fn remove_old_case_tables(backend: &DynamoDbBackend) {
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.swap(true, Ordering::SeqCst) {
        return;
    }
    let client = backend.client();
    let Ok(listed) = client.list_tables().limit(100).send().await else {
        return;
    };
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    for name in listed.table_names() {
        if !name.starts_with("ll_cf_") {
            continue;
        }
        let Ok(described) = client.describe_table().table_name(name).send().await else {
            continue;
        };
        let created = described
            .table()
            .and_then(|t| t.creation_date_time())
            .and_then(|t| SystemTime::try_from(*t).ok());
        if created.is_some_and(|created| created < hour_ago) {
            let _ = client.delete_table().table_name(name).send().await;
        }
    }
}

leaselock_conformance::conformance_tests!(setup);
