//! The conformance suite against the in-memory backend.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use leaselock::{Lease, LockBackend, MemoryBackend, Namespace, Result};

struct Memory {
    shared: MemoryBackend,
    /// One store per namespace name, like tables in one database.
    namespaces: Mutex<HashMap<String, MemoryBackend>>,
}

#[leaselock::async_trait]
impl leaselock_conformance::Target for Memory {
    async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
        // Clones share one store, like connections to one database.
        Ok(Arc::new(self.shared.clone()))
    }

    async fn backend_in(&self, namespace: &str) -> Result<Arc<dyn LockBackend>> {
        Namespace::new(namespace)?;
        let mut namespaces = self.namespaces.lock().unwrap();
        let store = namespaces
            .entry(namespace.to_owned())
            .or_insert_with(MemoryBackend::new_uninitialized);
        Ok(Arc::new(store.clone()))
    }

    async fn kill_session(&self, _lease: &Lease) -> Result<()> {
        unreachable!("memory locks are leases, not sessions")
    }
}

async fn setup() -> Option<Memory> {
    Some(Memory {
        shared: MemoryBackend::new(),
        namespaces: Mutex::default(),
    })
}

leaselock_conformance::conformance_tests!(setup);
