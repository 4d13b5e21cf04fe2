//! Helpers shared by the cases.

use std::sync::Arc;
use std::time::{Duration, Instant};

use leaselock::{
    AcquireOutcome, AcquireRequest, Capabilities, ExpiryClock, Lease, LockBackend, LockKey,
    LockKind, OwnerId,
};

/// A fresh random key for one case, so cases never share a lock.
pub fn fresh_key(case: &str) -> LockKey {
    LockKey::new(format!(
        "conformance/{case}/{}",
        uuid::Uuid::new_v4().simple()
    ))
    .expect("a valid key")
}

/// A fresh random namespace name (a valid identifier).
pub fn fresh_namespace() -> String {
    format!("ll_cf_{}", &uuid::Uuid::new_v4().simple().to_string()[..16])
}

pub(crate) fn owner(name: &str) -> OwnerId {
    OwnerId::new(format!("{name}-{}", uuid::Uuid::new_v4().simple())).expect("a valid owner")
}

pub(crate) fn request(key: &LockKey, owner: &OwnerId, ttl: Duration) -> AcquireRequest {
    AcquireRequest::new(key.clone(), owner.clone(), ttl).expect("a valid request")
}

/// Acquires or panics.
pub(crate) async fn must_acquire(backend: &dyn LockBackend, req: &AcquireRequest) -> Lease {
    match backend.try_acquire(req).await.expect("try_acquire") {
        AcquireOutcome::Acquired(lease) => {
            assert_eq!(&lease.key, req.key());
            assert_eq!(&lease.owner, req.owner());
            lease
        }
        AcquireOutcome::Held(holder) => {
            panic!("`{}` should be free, held by {holder:?}", req.key())
        }
    }
}

/// Asserts the key is held by someone else.
pub(crate) async fn must_be_held(backend: &dyn LockBackend, req: &AcquireRequest) {
    match backend.try_acquire(req).await.expect("try_acquire") {
        AcquireOutcome::Held(_) => {}
        AcquireOutcome::Acquired(lease) => {
            panic!(
                "`{}` should be held, but was acquired again: {lease:?}",
                req.key()
            )
        }
    }
}

/// Keeps trying (as a waiter would) until acquired or `limit` passes.
pub(crate) async fn acquire_within(
    backend: &dyn LockBackend,
    req: &AcquireRequest,
    limit: Duration,
) -> Lease {
    let start = Instant::now();
    loop {
        if let AcquireOutcome::Acquired(lease) =
            backend.try_acquire(req).await.expect("try_acquire")
        {
            return lease;
        }
        assert!(
            start.elapsed() < limit,
            "`{}` was not acquired within {limit:?}",
            req.key()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub(crate) fn is_lease_based(caps: &Capabilities) -> bool {
    caps.kind == LockKind::Lease
}

/// Whether a status read can tell an expired lease (the clock deciding expiry is readable by
/// every client).
pub(crate) fn reads_expiry(caps: &Capabilities) -> bool {
    matches!(
        caps.expiry_clock,
        ExpiryClock::Database | ExpiryClock::Process
    )
}

/// A short lease for expiry cases.
pub(crate) const SHORT_TTL: Duration = Duration::from_millis(400);
/// A lease long enough never to expire during a case.
pub(crate) const LONG_TTL: Duration = Duration::from_secs(120);

/// How long an expired lease may take to be taken over: several lease durations plus slack, so
/// backends whose waiters watch a lease on their own clock (a whole lease) pass too.
pub(crate) fn takeover_limit() -> Duration {
    SHORT_TTL * 10 + Duration::from_secs(10)
}

pub(crate) async fn backends(
    target: &Arc<dyn crate::Target>,
    n: usize,
) -> Vec<Arc<dyn LockBackend>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(target.backend().await.expect("backend"));
    }
    out
}
