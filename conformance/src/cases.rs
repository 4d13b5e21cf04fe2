//! The conformance cases: plain async functions over a [`Target`]. Each panics on failure.
//!
//! Cases that only apply to some backends branch on [`leaselock::Capabilities`] and say so in
//! their documentation; everything else runs everywhere.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use leaselock::{
    AcquireOutcome, AcquireRequest, Error, LockBackend, LockKey, LockKind, LockState, Locker,
    OnUnavailable, WaitPolicy, MAX_LEASE_DURATION,
};

use crate::support::*;
use crate::Target;

/// A backend over a fresh, initialized namespace that no other case touches.
async fn isolated(t: &Arc<dyn Target>) -> Arc<dyn LockBackend> {
    let b = t.backend_in(&fresh_namespace()).await.expect("backend_in");
    b.init_storage().await.expect("init");
    b
}

fn locker(backend: &Arc<dyn LockBackend>) -> leaselock::LockerBuilder {
    Locker::builder(Arc::clone(backend)).lease_duration(Duration::from_secs(30))
}

/// Storage init twice, then the check passes and locks work.
pub async fn init_storage_is_idempotent(t: Arc<dyn Target>) {
    let b = t.backend_in(&fresh_namespace()).await.expect("backend_in");
    b.init_storage().await.expect("first init");
    b.init_storage().await.expect("second init");
    b.check_storage().await.expect("check after init");
    let key = fresh_key("init_idempotent");
    let lease = must_acquire(&*b, &request(&key, &owner("a"), LONG_TTL)).await;
    assert!(b.release(&lease).await.unwrap());
}

/// 16 instances initialize the same fresh storage at once: none fails.
pub async fn init_storage_concurrently(t: Arc<dyn Target>) {
    let ns = fresh_namespace();
    let mut instances = Vec::new();
    for _ in 0..16 {
        instances.push(t.backend_in(&ns).await.expect("backend_in"));
    }
    let tasks: Vec<_> = instances
        .iter()
        .map(|b| {
            let b = Arc::clone(b);
            tokio::spawn(async move { b.init_storage().await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().expect("concurrent init must not fail");
    }
    for b in &instances {
        b.check_storage()
            .await
            .expect("check after concurrent init");
    }
    let key = fresh_key("init_concurrent");
    let lease = must_acquire(&*instances[0], &request(&key, &owner("a"), LONG_TTL)).await;
    must_be_held(&*instances[15], &request(&key, &owner("b"), LONG_TTL)).await;
    assert!(instances[0].release(&lease).await.unwrap());
}

/// Before init the check fails naming what is missing, and acquiring fails cleanly; after init
/// both work.
pub async fn check_storage_before_and_after_init(t: Arc<dyn Target>) {
    let b = t.backend_in(&fresh_namespace()).await.expect("backend_in");
    match b.check_storage().await {
        Err(Error::NotInitialized { what, .. }) | Err(Error::NotAccessible { what, .. }) => {
            assert!(!what.is_empty(), "the error must say what is missing")
        }
        other => panic!("check before init must fail with NotInitialized/NotAccessible: {other:?}"),
    }
    let key = fresh_key("check_before_init");
    let err = b
        .try_acquire(&request(&key, &owner("a"), LONG_TTL))
        .await
        .expect_err("acquire before init must fail");
    assert!(
        matches!(
            err,
            Error::NotInitialized { .. } | Error::NotAccessible { .. }
        ),
        "{err:?}"
    );
    b.init_storage().await.expect("init");
    b.check_storage().await.expect("check after init");
}

/// Acquire, then release by the owner: the key is free again.
pub async fn acquire_then_release(t: Arc<dyn Target>) {
    let b = t.backend().await.unwrap();
    let key = fresh_key("acquire_release");
    let me = owner("a");
    let lease = must_acquire(&*b, &request(&key, &me, LONG_TTL)).await;
    assert!(lease.token.get() >= 1, "tokens start at 1");
    assert!(b.verify(&lease).await.unwrap());
    assert!(
        b.release(&lease).await.unwrap(),
        "the owner's release must report it held"
    );
    assert!(!b.verify(&lease).await.unwrap());
    assert_eq!(b.status(&key).await.unwrap(), LockState::Free);
    let again = must_acquire(&*b, &request(&key, &owner("b"), LONG_TTL)).await;
    assert!(b.release(&again).await.unwrap());
}

/// A second owner on another connection is refused and told who holds the lock.
pub async fn held_lock_reports_holder(t: Arc<dyn Target>) {
    let (a, b) = (t.backend().await.unwrap(), t.backend().await.unwrap());
    let key = fresh_key("held_reports_holder");
    let lease = must_acquire(&*a, &request(&key, &owner("a"), LONG_TTL)).await;
    match b
        .try_acquire(&request(&key, &owner("b"), LONG_TTL))
        .await
        .unwrap()
    {
        AcquireOutcome::Held(Some(info)) => {
            assert_eq!(info.key, key);
            assert_eq!(info.owner, lease.owner);
            assert_eq!(info.token, lease.token);
        }
        other => panic!("expected Held with the holder, got {other:?}"),
    }
    assert!(a.release(&lease).await.unwrap());
}

/// The same owner asking again is refused too: locks are not reentrant, so two tasks sharing
/// one locker still exclude each other.
pub async fn locks_are_not_reentrant(t: Arc<dyn Target>) {
    let b = t.backend().await.unwrap();
    let key = fresh_key("not_reentrant");
    let me = owner("a");
    let lease = must_acquire(&*b, &request(&key, &me, LONG_TTL)).await;
    must_be_held(&*b, &request(&key, &me, LONG_TTL)).await;
    assert!(
        b.verify(&lease).await.unwrap(),
        "the refused attempt must not disturb the lease"
    );
    assert!(b.release(&lease).await.unwrap());
}

/// A lease naming another owner (or another token) releases nothing.
pub async fn release_by_non_owner_changes_nothing(t: Arc<dyn Target>) {
    let (a, b) = (t.backend().await.unwrap(), t.backend().await.unwrap());
    let key = fresh_key("release_non_owner");
    let lease = must_acquire(&*a, &request(&key, &owner("a"), LONG_TTL)).await;
    let mut forged = lease.clone();
    forged.owner = owner("intruder");
    assert!(!b.release(&forged).await.unwrap());
    let mut stale = lease.clone();
    stale.token = leaselock::FencingToken::new(lease.token.get() + 1000);
    assert!(!b.release(&stale).await.unwrap());
    match b.status(&key).await.unwrap() {
        LockState::Held(info) => assert_eq!(info.owner, lease.owner),
        other => panic!("still held by the owner, got {other:?}"),
    }
    assert!(a.verify(&lease).await.unwrap());
    assert!(a.release(&lease).await.unwrap());
}

/// The second release of the same lease reports that nothing was held.
pub async fn release_twice(t: Arc<dyn Target>) {
    let b = t.backend().await.unwrap();
    let key = fresh_key("release_twice");
    let lease = must_acquire(&*b, &request(&key, &owner("a"), LONG_TTL)).await;
    assert!(b.release(&lease).await.unwrap());
    assert!(!b.release(&lease).await.unwrap());
}

/// Status tells a free key from a held one, with the holder's details.
pub async fn status_free_and_held(t: Arc<dyn Target>) {
    let (a, b) = (t.backend().await.unwrap(), t.backend().await.unwrap());
    let key = fresh_key("status");
    assert_eq!(b.status(&key).await.unwrap(), LockState::Free);
    let lease = must_acquire(&*a, &request(&key, &owner("a"), LONG_TTL)).await;
    match b.status(&key).await.unwrap() {
        LockState::Held(info) => {
            assert_eq!(info.key, key);
            assert_eq!(info.owner, lease.owner);
            assert_eq!(info.token, lease.token);
            assert!(info.acquired_at.is_some(), "acquired_at is recorded");
            if is_lease_based(&a.capabilities()) {
                assert!(info.expires_at.is_some());
                let remaining = info.remaining.expect("remaining time of a lease");
                assert!(remaining <= LONG_TTL, "{remaining:?}");
                assert!(remaining > LONG_TTL / 2, "{remaining:?}");
            }
        }
        other => panic!("expected Held, got {other:?}"),
    }
    assert!(a.release(&lease).await.unwrap());
    assert_eq!(b.status(&key).await.unwrap(), LockState::Free);
}

/// List shows held locks and stops showing released ones.
pub async fn list_shows_held_locks(t: Arc<dyn Target>) {
    let (a, b) = (t.backend().await.unwrap(), t.backend().await.unwrap());
    let keys: Vec<LockKey> = (0..3).map(|_| fresh_key("list")).collect();
    let mut leases = Vec::new();
    for key in &keys {
        leases.push(must_acquire(&*a, &request(key, &owner("a"), LONG_TTL)).await);
    }
    let listed = b.list().await.unwrap();
    for lease in &leases {
        let info = listed
            .iter()
            .find(|i| i.key == lease.key)
            .unwrap_or_else(|| panic!("`{}` missing from list", lease.key));
        assert_eq!(info.owner, lease.owner);
        assert_eq!(info.token, lease.token);
    }
    assert!(a.release(&leases[0]).await.unwrap());
    let listed = b.list().await.unwrap();
    assert!(
        !listed.iter().any(|i| i.key == keys[0]),
        "released lock still listed"
    );
    assert!(listed.iter().any(|i| i.key == keys[1]));
    for lease in &leases[1..] {
        assert!(a.release(lease).await.unwrap());
    }
}

/// An unrefreshed lease expires and another owner takes over with a higher token; the old holder
/// no longer verifies. (Lease backends; a session lock never expires while its session lives.)
pub async fn expiry_and_takeover(t: Arc<dyn Target>) {
    let (a, b) = (t.backend().await.unwrap(), t.backend().await.unwrap());
    if !is_lease_based(&a.capabilities()) {
        return;
    }
    let key = fresh_key("expiry_takeover");
    let first = must_acquire(&*a, &request(&key, &owner("a"), SHORT_TTL)).await;
    let second = acquire_within(&*b, &request(&key, &owner("b"), LONG_TTL), takeover_limit()).await;
    assert!(second.token > first.token);
    assert!(
        !a.verify(&first).await.unwrap(),
        "the expired holder must not verify"
    );
    assert!(b.verify(&second).await.unwrap());
    assert!(b.release(&second).await.unwrap());
}

/// Status reports an expired lease as expired, not held. (Backends whose expiry clock every
/// client can read: the database's or the process's.)
pub async fn status_shows_expired(t: Arc<dyn Target>) {
    // A namespace of its own: other cases' `release_expired` would clear the expired lease.
    let b = isolated(&t).await;
    let caps = b.capabilities();
    if !is_lease_based(&caps) || !reads_expiry(&caps) {
        return;
    }
    let key = fresh_key("status_expired");
    let lease = must_acquire(&*b, &request(&key, &owner("a"), SHORT_TTL)).await;
    tokio::time::sleep(SHORT_TTL * 2).await;
    match b.status(&key).await.unwrap() {
        LockState::Expired(info) => {
            assert_eq!(info.owner, lease.owner);
            assert_eq!(info.remaining, Some(Duration::ZERO));
        }
        other => panic!("expected Expired, got {other:?}"),
    }
    assert!(
        !b.list().await.unwrap().iter().any(|i| i.key == key),
        "expired locks are not listed as held"
    );
}

/// `list_with_expired` shows the held locks that `list` shows, as held, and the expired leases
/// nobody has taken over yet, as expired (on backends whose expiry clock every client can read;
/// on others an expired lease may still show as held); a released key is gone from it. Session
/// locks never expire: for them it is `list`.
pub async fn list_with_expired_shows_stale_leases(t: Arc<dyn Target>) {
    // A namespace of its own: other cases' `release_expired` would clear the expired lease.
    let b = isolated(&t).await;
    let caps = b.capabilities();
    let held_key = fresh_key("list_all_held");
    let stale_key = fresh_key("list_all_stale");
    let gone_key = fresh_key("list_all_gone");
    let held = must_acquire(&*b, &request(&held_key, &owner("a"), LONG_TTL)).await;
    let gone = must_acquire(&*b, &request(&gone_key, &owner("a"), LONG_TTL)).await;
    assert!(b.release(&gone).await.unwrap());
    let stale = if is_lease_based(&caps) {
        let stale = must_acquire(&*b, &request(&stale_key, &owner("b"), SHORT_TTL)).await;
        tokio::time::sleep(SHORT_TTL * 2).await;
        Some(stale)
    } else {
        None
    };
    let all = b.list_with_expired().await.unwrap();
    let key_of = |state: &LockState| match state {
        LockState::Held(info) | LockState::Expired(info) => info.key.clone(),
        LockState::Free => panic!("list_with_expired returned a free key: {all:?}"),
    };
    let keys: Vec<LockKey> = all.iter().map(key_of).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "list_with_expired is in key order");
    assert!(!keys.contains(&gone_key), "a released key is not listed");
    match all.iter().find(|s| key_of(s) == held_key) {
        Some(LockState::Held(info)) => {
            assert_eq!(info.owner, held.owner);
            assert_eq!(info.token, held.token);
        }
        other => panic!("the held lock must be listed as held, got {other:?}"),
    }
    let held_now: Vec<LockKey> = b.list().await.unwrap().into_iter().map(|i| i.key).collect();
    for key in &held_now {
        assert!(
            keys.contains(key),
            "`{key}` is in list but not in list_with_expired"
        );
    }
    if let Some(stale) = stale {
        let found = all.iter().find(|s| key_of(s) == stale_key);
        match found {
            Some(LockState::Expired(info)) => {
                assert_eq!(info.owner, stale.owner);
                assert_eq!(info.token, stale.token);
                assert_eq!(info.remaining, Some(Duration::ZERO));
                assert!(
                    info.expires_at.is_some(),
                    "an expired lease tells when it expired"
                );
                assert!(
                    !held_now.contains(&stale_key),
                    "an expired lease is not held"
                );
            }
            Some(LockState::Held(info)) if !reads_expiry(&caps) => {
                assert_eq!(info.token, stale.token);
            }
            other => panic!("the expired lease must be listed as expired, got {other:?}"),
        }
        if reads_expiry(&caps) {
            assert_eq!(b.release_expired().await.unwrap(), 1);
            let after = b.list_with_expired().await.unwrap();
            assert!(
                !after.iter().any(|s| key_of(s) == stale_key),
                "a cleared lease is not listed"
            );
        }
    }
    assert!(b.release(&held).await.unwrap());
}

/// Refreshing keeps a lease alive past its original duration.
pub async fn refresh_extends_lease(t: Arc<dyn Target>) {
    let (a, b) = (t.backend().await.unwrap(), t.backend().await.unwrap());
    let key = fresh_key("refresh");
    let mut lease =
        must_acquire(&*a, &request(&key, &owner("a"), Duration::from_millis(800))).await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let fresh = a.refresh(&lease).await.expect("refresh of a held lease");
        assert_eq!(fresh.token, lease.token, "refresh keeps the token");
        assert_eq!(fresh.owner, lease.owner);
        if let (Some(old), Some(new)) = (lease.expires_at, fresh.expires_at) {
            assert!(new >= old, "refresh must not shorten the lease");
        }
        lease = fresh;
    }
    // 1.5 s after acquiring an 800 ms lease, it is still ours.
    assert!(a.verify(&lease).await.unwrap());
    must_be_held(&*b, &request(&key, &owner("b"), LONG_TTL)).await;
    assert!(a.release(&lease).await.unwrap());
}

/// Refreshing a lease that was broken reports it lost.
pub async fn refresh_after_loss_reports_lost(t: Arc<dyn Target>) {
    let (a, op) = (t.backend().await.unwrap(), t.backend().await.unwrap());
    let key = fresh_key("refresh_lost");
    let lease = must_acquire(&*a, &request(&key, &owner("a"), LONG_TTL)).await;
    assert!(op.force_release(&key).await.unwrap().is_some());
    match a.refresh(&lease).await {
        Err(Error::Lost { key: lost, .. }) => assert_eq!(lost, key),
        other => panic!("expected Lost, got {other:?}"),
    }
}

/// A batched refresh answers for each lease in order: held ones are extended, lost ones are
/// `Lost` without failing the others, a stale lease beside its successor on the same key is
/// lost while the successor is refreshed, and an empty batch is an empty answer.
pub async fn refresh_many_answers_each_lease(t: Arc<dyn Target>) {
    let (a, op) = (t.backend().await.unwrap(), t.backend().await.unwrap());
    let keys: Vec<LockKey> = (0..4).map(|_| fresh_key("refresh_many")).collect();
    let ttl = Duration::from_millis(1500);
    let short = must_acquire(&*a, &request(&keys[0], &owner("a"), ttl)).await;
    let long = must_acquire(&*a, &request(&keys[1], &owner("a"), LONG_TTL)).await;
    let broken = must_acquire(&*a, &request(&keys[2], &owner("a"), LONG_TTL)).await;
    let stale = must_acquire(&*a, &request(&keys[3], &owner("a"), LONG_TTL)).await;
    assert!(op.force_release(&keys[2]).await.unwrap().is_some());
    assert!(op.force_release(&keys[3]).await.unwrap().is_some());
    let successor = must_acquire(&*a, &request(&keys[3], &owner("a"), LONG_TTL)).await;
    assert!(a.refresh_many(&[]).await.is_empty());

    tokio::time::sleep(Duration::from_millis(1000)).await;
    let batch = [short, long, broken, stale, successor];
    let results = a.refresh_many(&batch).await;
    assert_eq!(results.len(), batch.len(), "one result per lease");
    let mut fresh = Vec::new();
    for (n, (sent, result)) in batch.iter().zip(results).enumerate() {
        let lost = n == 2 || n == 3; // broken, stale
        match result {
            Ok(lease) => {
                assert!(!lost, "a lost lease was refreshed: {sent:?}");
                assert_eq!((&lease.key, &lease.owner), (&sent.key, &sent.owner));
                assert_eq!(lease.token, sent.token, "refresh keeps the token");
                if let (Some(old), Some(new)) = (sent.expires_at, lease.expires_at) {
                    assert!(new >= old, "refresh must not shorten the lease");
                }
                fresh.push(lease);
            }
            Err(Error::Lost { key, .. }) => {
                assert!(lost, "a held lease was reported lost: {sent:?}");
                assert_eq!(key, sent.key);
            }
            Err(other) => panic!("refresh_many of {sent:?}: {other}"),
        }
    }
    assert_eq!(fresh.len(), 3);
    // Past the first lease's original duration: the batched refresh extended it.
    tokio::time::sleep(Duration::from_millis(800)).await;
    for lease in &fresh {
        assert!(a.verify(lease).await.unwrap(), "{lease:?} still held");
    }
    must_be_held(&*op, &request(&keys[0], &owner("b"), LONG_TTL)).await;
    for lease in &fresh {
        assert!(a.release(lease).await.unwrap());
    }
}

/// Verifying a broken lease is false.
pub async fn verify_after_loss_is_false(t: Arc<dyn Target>) {
    let (a, op) = (t.backend().await.unwrap(), t.backend().await.unwrap());
    let key = fresh_key("verify_lost");
    let lease = must_acquire(&*a, &request(&key, &owner("a"), LONG_TTL)).await;
    op.force_release(&key).await.unwrap();
    assert!(!a.verify(&lease).await.unwrap());
}

/// Releasing a lost lease changes nothing: the new holder keeps the lock.
pub async fn release_after_loss_keeps_new_holder(t: Arc<dyn Target>) {
    let (a, b) = (t.backend().await.unwrap(), t.backend().await.unwrap());
    let key = fresh_key("release_lost");
    let old = must_acquire(&*a, &request(&key, &owner("a"), LONG_TTL)).await;
    b.force_release(&key).await.unwrap();
    let new = must_acquire(&*b, &request(&key, &owner("b"), LONG_TTL)).await;
    assert!(
        !a.release(&old).await.unwrap(),
        "a lost lease releases nothing"
    );
    assert!(
        b.verify(&new).await.unwrap(),
        "the new holder keeps the lock"
    );
    assert!(b.release(&new).await.unwrap());
}

/// Force release breaks anyone's lock and reports whom it removed.
pub async fn force_release_removes_holder(t: Arc<dyn Target>) {
    let (a, op) = (t.backend().await.unwrap(), t.backend().await.unwrap());
    let key = fresh_key("force_release");
    let lease = must_acquire(&*a, &request(&key, &owner("a"), LONG_TTL)).await;
    let removed = op
        .force_release(&key)
        .await
        .unwrap()
        .expect("a holder was removed");
    assert_eq!(removed.owner, lease.owner);
    assert_eq!(removed.token, lease.token);
    assert_eq!(op.status(&key).await.unwrap(), LockState::Free);
    let next = must_acquire(&*op, &request(&key, &owner("b"), LONG_TTL)).await;
    assert!(next.token > lease.token);
    assert!(op.release(&next).await.unwrap());
}

/// Force-releasing a free key is not an error and removes nothing.
pub async fn force_release_of_free_key(t: Arc<dyn Target>) {
    let b = t.backend().await.unwrap();
    let key = fresh_key("force_free");
    assert_eq!(b.force_release(&key).await.unwrap(), None);
    let lease = must_acquire(&*b, &request(&key, &owner("a"), LONG_TTL)).await;
    assert!(b.release(&lease).await.unwrap());
    assert_eq!(b.force_release(&key).await.unwrap(), None);
}

/// Releasing expired locks clears those and leaves live ones alone. (Lease backends.)
pub async fn release_expired_clears_only_expired(t: Arc<dyn Target>) {
    // A namespace of its own, so the count is ours alone.
    let b = isolated(&t).await;
    let caps = b.capabilities();
    if !is_lease_based(&caps) {
        b.release_expired()
            .await
            .expect("release_expired works on session backends too");
        return;
    }
    let dead = fresh_key("cleanup_dead");
    let live = fresh_key("cleanup_live");
    let dead_lease = must_acquire(&*b, &request(&dead, &owner("a"), SHORT_TTL)).await;
    let live_lease = must_acquire(&*b, &request(&live, &owner("a"), LONG_TTL)).await;
    if reads_expiry(&caps) {
        tokio::time::sleep(SHORT_TTL * 2).await;
        assert_eq!(
            b.release_expired().await.unwrap(),
            1,
            "exactly the one expired lease"
        );
        assert_eq!(b.status(&dead).await.unwrap(), LockState::Free);
    } else {
        b.release_expired().await.unwrap();
    }
    assert!(!b.verify(&dead_lease).await.unwrap() || !reads_expiry(&caps));
    assert!(
        b.verify(&live_lease).await.unwrap(),
        "a live lease must survive cleanup"
    );
    assert!(b.release(&live_lease).await.unwrap());
}

/// Different keys do not block each other.
pub async fn independent_keys(t: Arc<dyn Target>) {
    let (a, b) = (t.backend().await.unwrap(), t.backend().await.unwrap());
    let (k1, k2) = (fresh_key("independent"), fresh_key("independent"));
    let l1 = must_acquire(&*a, &request(&k1, &owner("a"), LONG_TTL)).await;
    let l2 = must_acquire(&*b, &request(&k2, &owner("b"), LONG_TTL)).await;
    assert!(a.release(&l1).await.unwrap());
    assert!(
        b.verify(&l2).await.unwrap(),
        "releasing one key leaves the other held"
    );
    assert!(b.release(&l2).await.unwrap());
}

/// Tokens strictly increase over acquire/release cycles, whoever acquires.
pub async fn fencing_increases_across_releases(t: Arc<dyn Target>) {
    let (a, b) = (t.backend().await.unwrap(), t.backend().await.unwrap());
    let key = fresh_key("fencing_release");
    let mut last = 0;
    for i in 0..6 {
        let backend = if i % 2 == 0 { &a } else { &b };
        let lease = must_acquire(&**backend, &request(&key, &owner("x"), LONG_TTL)).await;
        assert!(
            lease.token.get() > last,
            "token {} after {last}",
            lease.token
        );
        last = lease.token.get();
        assert!(backend.release(&lease).await.unwrap());
    }
}

/// A takeover after expiry gets a higher token. (Lease backends.)
pub async fn fencing_increases_across_takeover(t: Arc<dyn Target>) {
    let (a, b) = (t.backend().await.unwrap(), t.backend().await.unwrap());
    if !is_lease_based(&a.capabilities()) {
        return;
    }
    let key = fresh_key("fencing_takeover");
    let mut last = must_acquire(&*a, &request(&key, &owner("a"), SHORT_TTL)).await;
    for backend in [&b, &a] {
        let next = acquire_within(
            &**backend,
            &request(&key, &owner("n"), SHORT_TTL),
            takeover_limit(),
        )
        .await;
        assert!(
            next.token > last.token,
            "{} then {}",
            last.token,
            next.token
        );
        last = next;
    }
}

/// Force release and cleanup of expired locks never make a token go back.
pub async fn fencing_survives_force_release_and_cleanup(t: Arc<dyn Target>) {
    let b = t.backend().await.unwrap();
    let key = fresh_key("fencing_cleanup");
    let first = must_acquire(&*b, &request(&key, &owner("a"), LONG_TTL)).await;
    b.force_release(&key).await.unwrap();
    let second = must_acquire(&*b, &request(&key, &owner("b"), SHORT_TTL)).await;
    assert!(second.token > first.token);
    if is_lease_based(&b.capabilities()) {
        tokio::time::sleep(SHORT_TTL * 2).await;
        b.release_expired().await.unwrap();
        let third =
            acquire_within(&*b, &request(&key, &owner("c"), LONG_TTL), takeover_limit()).await;
        assert!(third.token > second.token);
        assert!(b.release(&third).await.unwrap());
    } else {
        assert!(b.release(&second).await.unwrap());
        b.release_expired().await.unwrap();
        let third = must_acquire(&*b, &request(&key, &owner("c"), LONG_TTL)).await;
        assert!(third.token > second.token);
        assert!(b.release(&third).await.unwrap());
    }
}

/// A new backend instance (a restarted process) continues the token sequence.
pub async fn fencing_survives_new_instances(t: Arc<dyn Target>) {
    let key = fresh_key("fencing_restart");
    let mut last = 0;
    for _ in 0..3 {
        let b = t.backend().await.unwrap();
        let lease = must_acquire(&*b, &request(&key, &owner("p"), LONG_TTL)).await;
        assert!(lease.token.get() > last);
        last = lease.token.get();
        assert!(b.release(&lease).await.unwrap());
        drop(b);
    }
}

/// Records critical sections and fails on any overlap or token regression.
#[derive(Default)]
struct Sections {
    inside: AtomicBool,
    overlaps: AtomicU64,
    tokens: Mutex<Vec<u64>>,
}

impl Sections {
    async fn enter(&self, token: u64) {
        if self.inside.swap(true, Ordering::SeqCst) {
            self.overlaps.fetch_add(1, Ordering::SeqCst);
        }
        self.tokens.lock().unwrap().push(token);
        tokio::time::sleep(Duration::from_millis(2)).await;
        self.inside.store(false, Ordering::SeqCst);
    }

    fn check(&self, expected: usize) {
        assert_eq!(
            self.overlaps.load(Ordering::SeqCst),
            0,
            "critical sections overlapped"
        );
        let tokens = self.tokens.lock().unwrap();
        assert_eq!(tokens.len(), expected, "every worker finished every cycle");
        assert!(
            tokens.windows(2).all(|w| w[0] < w[1]),
            "fencing tokens must strictly increase in acquisition order: {tokens:?}"
        );
    }
}

async fn contend(lockers: Vec<Locker>, tasks_per_locker: usize, cycles: usize, key: LockKey) {
    let sections = Arc::new(Sections::default());
    let mut handles = Vec::new();
    for locker in lockers {
        for _ in 0..tasks_per_locker {
            let (locker, sections, key) = (locker.clone(), Arc::clone(&sections), key.clone());
            handles.push(tokio::spawn(async move {
                for _ in 0..cycles {
                    let sections = Arc::clone(&sections);
                    locker
                        .run(key.as_str(), |lock| async move {
                            sections.enter(lock.token().get()).await
                        })
                        .await
                        .expect("run under lock")
                        .expect("waits until acquired");
                }
            }));
        }
    }
    let total = handles.len() * cycles;
    for h in handles {
        h.await.expect("worker");
    }
    sections.check(total);
}

fn patient(builder: leaselock::LockerBuilder) -> Locker {
    builder
        .wait(
            WaitPolicy::until(Duration::from_secs(120), Duration::from_millis(10))
                .with_jitter(Duration::from_millis(5)),
        )
        .build()
        .expect("locker")
}

/// Many tasks sharing one locker (one owner) on one key: no two critical sections overlap and
/// tokens strictly increase.
pub async fn mutual_exclusion_across_tasks(t: Arc<dyn Target>) {
    let b = t.backend().await.unwrap();
    contend(vec![patient(locker(&b))], 8, 6, fresh_key("mutex_tasks")).await;
}

/// Several separate backend instances (connections), each with its own locker and owner, on one
/// key: no overlap, strictly increasing tokens.
pub async fn mutual_exclusion_across_instances(t: Arc<dyn Target>) {
    let instances = backends(&t, 6).await;
    let lockers = instances.iter().map(|b| patient(locker(b))).collect();
    contend(lockers, 2, 5, fresh_key("mutex_instances")).await;
}

/// Empty and oversized keys are refused with a typed error naming `key`, and nothing changes;
/// the longest valid key works.
pub async fn rejects_bad_keys(t: Arc<dyn Target>) {
    let b = t.backend().await.unwrap();
    let l = locker(&b).build().unwrap();
    for bad in [String::new(), "k".repeat(256), "nul\0byte".to_owned()] {
        match l.acquire(&bad).await {
            Err(Error::InvalidInput { field: "key", .. }) => {}
            other => panic!("key {bad:?}: expected InvalidInput(key), got {other:?}"),
        }
        assert!(matches!(
            l.status(&bad).await,
            Err(Error::InvalidInput { field: "key", .. })
        ));
        assert!(matches!(
            l.force_release(&bad).await,
            Err(Error::InvalidInput { field: "key", .. })
        ));
    }
    // Storage unchanged (other cases may add locks concurrently, never ours).
    let after = b.list().await.unwrap();
    assert!(!after
        .iter()
        .any(|i| i.key.as_str().is_empty() || i.key.as_str().len() > 255));
    let longest = LockKey::new(
        format!("{}{}", fresh_key("long").as_str(), "z".repeat(255))
            .chars()
            .take(255)
            .collect::<String>(),
    )
    .unwrap();
    assert_eq!(longest.as_str().len(), 255);
    let lease = must_acquire(&*b, &request(&longest, &owner("a"), LONG_TTL)).await;
    match b.status(&longest).await.unwrap() {
        LockState::Held(info) => assert_eq!(info.key, longest, "the key round-trips unchanged"),
        other => panic!("expected Held, got {other:?}"),
    }
    assert!(b.release(&lease).await.unwrap());
}

/// Keys that differ only after a long common prefix, or only in non-ASCII characters, are
/// distinct locks (backends that map keys to short native names must not merge them).
pub async fn long_and_unicode_keys_are_distinct(t: Arc<dyn Target>) {
    let b = t.backend().await.unwrap();
    let base = format!("{}/{}", fresh_key("distinct").as_str(), "p".repeat(180));
    let k1 = LockKey::new(format!("{base}-1")).unwrap();
    let k2 = LockKey::new(format!("{base}-2")).unwrap();
    let u1 = LockKey::new(format!("{}/ключ-é", fresh_key("unicode").as_str())).unwrap();
    let u2 = LockKey::new(format!(
        "{}/ключ-e",
        u1.as_str().rsplit_once('/').unwrap().0
    ))
    .unwrap();
    let mut leases = Vec::new();
    for key in [&k1, &k2, &u1, &u2] {
        leases.push(must_acquire(&*b, &request(key, &owner("a"), LONG_TTL)).await);
    }
    for lease in &leases {
        match b.status(&lease.key).await.unwrap() {
            LockState::Held(info) => assert_eq!(info.key, lease.key),
            other => panic!("expected Held, got {other:?}"),
        }
        assert!(b.release(lease).await.unwrap());
    }
}

/// Invalid namespace identifiers, injection attempts included, are refused with a typed error,
/// and the shared storage still works afterwards.
pub async fn rejects_bad_identifiers(t: Arc<dyn Target>) {
    for bad in [
        "",
        "locks; DROP TABLE x",
        "locks\"; DROP TABLE x; --",
        "locks`; DROP TABLE x; --",
        "a b",
        "1starts_with_digit",
        "has-dash",
        "x".repeat(300).as_str(),
    ] {
        match t.backend_in(bad).await {
            Err(Error::InvalidInput { field, reason }) => {
                assert!(!field.is_empty() && !reason.is_empty())
            }
            Ok(b) => panic!("namespace {bad:?} accepted: {b:?}"),
            Err(other) => panic!("namespace {bad:?}: expected InvalidInput, got {other:?}"),
        }
    }
    let b = t.backend().await.unwrap();
    b.check_storage().await.expect("storage untouched");
    let key = fresh_key("after_bad_identifiers");
    let lease = must_acquire(&*b, &request(&key, &owner("a"), LONG_TTL)).await;
    assert!(b.release(&lease).await.unwrap());
}

/// Zero, too short and absurd durations, and a refresh interval not shorter than the lease, are
/// refused with typed errors naming the field; nothing changes.
pub async fn rejects_bad_durations(t: Arc<dyn Target>) {
    let b = t.backend().await.unwrap();
    let key = fresh_key("bad_durations");
    let me = owner("a");
    for ttl in [
        Duration::ZERO,
        Duration::from_millis(1),
        MAX_LEASE_DURATION + Duration::from_secs(1),
        Duration::MAX,
    ] {
        assert!(matches!(
            AcquireRequest::new(key.clone(), me.clone(), ttl),
            Err(Error::InvalidInput { field: "ttl", .. })
        ));
        assert!(matches!(
            locker(&b).lease_duration(ttl).build(),
            Err(Error::InvalidInput {
                field: "lease_duration",
                ..
            })
        ));
    }
    for interval in [
        Duration::ZERO,
        Duration::from_secs(30),
        Duration::from_secs(31),
    ] {
        assert!(matches!(
            locker(&b).refresh_interval(interval).build(),
            Err(Error::InvalidInput {
                field: "refresh_interval",
                ..
            })
        ));
    }
    assert!(matches!(
        locker(&b)
            .wait(WaitPolicy::attempts(0, Duration::from_secs(1)))
            .build(),
        Err(Error::InvalidInput {
            field: "wait.attempts",
            ..
        })
    ));
    assert!(matches!(
        locker(&b).owner("").build(),
        Err(Error::InvalidInput { field: "owner", .. })
    ));
    assert_eq!(
        b.status(&key).await.unwrap(),
        LockState::Free,
        "nothing was written"
    );
}

/// A session lock's connection killed from outside: the holder's lost signal fires and the lock
/// is free at once. (Session backends.)
pub async fn killed_session_frees_lock_and_tells_holder(t: Arc<dyn Target>) {
    let (a, b) = (t.backend().await.unwrap(), t.backend().await.unwrap());
    if a.capabilities().kind != LockKind::Session {
        return;
    }
    let key = fresh_key("killed_session");
    let guard = locker(&a)
        .build()
        .unwrap()
        .acquire(key.as_str())
        .await
        .unwrap()
        .unwrap();
    let lease = guard.lease().expect("a held lease");
    t.kill_session(&lease).await.expect("kill the session");
    let reason = tokio::time::timeout(Duration::from_secs(10), guard.lost().wait())
        .await
        .expect("the lost signal must fire after the session is killed");
    assert!(!reason.is_empty());
    let next = acquire_within(
        &*b,
        &request(&key, &owner("b"), LONG_TTL),
        Duration::from_secs(10),
    )
    .await;
    assert!(next.token > lease.token);
    assert!(b.release(&next).await.unwrap());
    assert!(!guard.release().await.unwrap_or(false));
}

/// A guard whose lock is broken by an operator learns it through its lost signal (refresh
/// daemon or backend notification), and `ensure_held` reports the loss.
pub async fn guard_signals_loss_after_force_release(t: Arc<dyn Target>) {
    let (a, op) = (t.backend().await.unwrap(), t.backend().await.unwrap());
    let key = fresh_key("guard_lost");
    let l = locker(&a)
        .lease_duration(Duration::from_secs(3))
        .refresh_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let guard = l.acquire(key.as_str()).await.unwrap().unwrap();
    guard
        .ensure_held()
        .await
        .expect("held right after acquiring");
    assert!(!guard.is_lost());
    op.force_release(&key)
        .await
        .unwrap()
        .expect("removed the holder");
    tokio::time::timeout(Duration::from_secs(20), guard.lost().wait())
        .await
        .expect("the lost signal must fire");
    assert!(guard.is_lost());
    assert!(matches!(guard.ensure_held().await, Err(Error::Lost { .. })));
    assert!(!guard.release().await.unwrap(), "nothing left to release");
}

/// Without refreshing, the lost signal fires at the local deadline. (Lease backends.)
pub async fn lost_signal_fires_at_local_deadline(t: Arc<dyn Target>) {
    let b = t.backend().await.unwrap();
    if !is_lease_based(&b.capabilities()) {
        return;
    }
    let key = fresh_key("local_deadline");
    let l = locker(&b)
        .lease_duration(SHORT_TTL)
        .refresh(false)
        .build()
        .unwrap();
    let guard = l.acquire(key.as_str()).await.unwrap().unwrap();
    let reason = tokio::time::timeout(Duration::from_secs(20), guard.lost().wait())
        .await
        .expect("the lost signal must fire at the local deadline");
    assert!(reason.contains("lease duration"), "{reason}");
    assert!(matches!(guard.ensure_held().await, Err(Error::Lost { .. })));
}

/// `run` releases the lock when the work returns an error and when it panics.
pub async fn run_releases_on_error_and_panic(t: Arc<dyn Target>) {
    let b = t.backend().await.unwrap();
    let l = locker(&b).build().unwrap();
    let key = fresh_key("run_release");
    let out = l
        .run(key.as_str(), |_| async {
            Err::<(), &str>("the work failed")
        })
        .await
        .unwrap();
    assert_eq!(out, Some(Err("the work failed")));
    assert_eq!(b.status(&key).await.unwrap(), LockState::Free);

    let (l2, key2) = (l.clone(), key.clone());
    let panicked = tokio::spawn(async move {
        l2.run(key2.as_str(), |_| async { panic!("the work panicked") })
            .await
            .map(|_: Option<()>| ())
    })
    .await;
    assert!(panicked.unwrap_err().is_panic(), "the panic propagates");
    assert_eq!(
        b.status(&key).await.unwrap(),
        LockState::Free,
        "released despite the panic"
    );
    let lease = must_acquire(&*b, &request(&key, &owner("next"), LONG_TTL)).await;
    assert!(b.release(&lease).await.unwrap());
}

/// When the lease is lost while the work runs, the work is told and `run` returns `Lost`.
pub async fn run_reports_lost_lease(t: Arc<dyn Target>) {
    let (a, op) = (t.backend().await.unwrap(), t.backend().await.unwrap());
    let key = fresh_key("run_lost");
    let l = locker(&a)
        .lease_duration(Duration::from_secs(3))
        .refresh_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let k = key.clone();
    let result = l
        .run(key.as_str(), |lock| async move {
            op.force_release(&k).await.unwrap();
            tokio::time::timeout(Duration::from_secs(20), lock.lost().wait())
                .await
                .is_ok()
        })
        .await;
    match result {
        Err(Error::Lost { key: lost, .. }) => assert_eq!(lost, key),
        other => panic!("expected Lost, got {other:?}"),
    }
}

/// A waiting locker gets the lock once the holder releases it.
pub async fn waiter_acquires_after_release(t: Arc<dyn Target>) {
    let (a, b) = (t.backend().await.unwrap(), t.backend().await.unwrap());
    let key = fresh_key("waiter");
    let holder = must_acquire(&*a, &request(&key, &owner("a"), LONG_TTL)).await;
    let waiter = locker(&b)
        .wait(WaitPolicy::until(
            Duration::from_secs(60),
            Duration::from_millis(50),
        ))
        .build()
        .unwrap();
    let k = key.clone();
    let task = tokio::spawn(async move { waiter.acquire(k.as_str()).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !task.is_finished(),
        "the waiter must wait while the lock is held"
    );
    assert!(a.release(&holder).await.unwrap());
    let guard = task
        .await
        .unwrap()
        .unwrap()
        .expect("acquired after the release");
    assert!(guard.token() > holder.token);
    assert!(guard.release().await.unwrap());
}

/// With `OnUnavailable::ReturnNone`, a held lock gives `None` instead of an error, and the work
/// does not run; with the default it is `Error::Held` naming the holder.
pub async fn unavailable_returns_none_when_configured(t: Arc<dyn Target>) {
    let (a, b) = (t.backend().await.unwrap(), t.backend().await.unwrap());
    let key = fresh_key("unavailable");
    let holder = must_acquire(&*a, &request(&key, &owner("a"), LONG_TTL)).await;
    let none = locker(&b)
        .on_unavailable(OnUnavailable::ReturnNone)
        .build()
        .unwrap();
    let ran = AtomicBool::new(false);
    let out = none
        .run(key.as_str(), |_| async {
            ran.store(true, Ordering::SeqCst)
        })
        .await
        .unwrap();
    assert!(out.is_none());
    assert!(!ran.load(Ordering::SeqCst), "the work must not run");
    let strict = locker(&b)
        .wait(WaitPolicy::attempts(2, Duration::from_millis(20)))
        .build()
        .unwrap();
    match strict.acquire(key.as_str()).await {
        Err(Error::Held {
            key: k,
            holder: Some(info),
        }) => {
            assert_eq!(k, key);
            assert_eq!(info.owner, holder.owner);
        }
        other => panic!("expected Held with the holder, got {other:?}"),
    }
    assert!(a.release(&holder).await.unwrap());
}

/// A lease handed over to another instance (another process) is refreshed and released there,
/// with ownership still checked by the backend; a lost lease cannot be adopted. Session locks
/// refuse hand-over with a typed error.
pub async fn lease_hand_over(t: Arc<dyn Target>) {
    let (a, b, op) = (
        t.backend().await.unwrap(),
        t.backend().await.unwrap(),
        t.backend().await.unwrap(),
    );
    let key = fresh_key("hand_over");
    let first = locker(&a).build().unwrap();
    let second = locker(&b).build().unwrap();
    let guard = first.acquire(key.as_str()).await.unwrap().unwrap();
    let lease = guard.hand_over().expect("a held lease");
    if a.capabilities().kind == LockKind::Session {
        assert!(matches!(
            second.adopt(lease.clone()).await,
            Err(Error::InvalidInput { field: "lease", .. })
        ));
        // The first instance still holds its session lock: release it directly.
        assert!(a.release(&lease).await.unwrap());
        return;
    }
    let adopted = second
        .adopt(lease.clone())
        .await
        .expect("adopt a live lease");
    assert_eq!(
        adopted.token(),
        lease.token,
        "hand-over keeps the fencing token"
    );
    adopted.ensure_held().await.expect("held after adoption");
    must_be_held(&*op, &request(&key, &owner("c"), LONG_TTL)).await;
    assert!(adopted.release().await.unwrap());
    assert_eq!(op.status(&key).await.unwrap(), LockState::Free);
    // The lease is gone now: adopting it again must fail as lost.
    assert!(matches!(second.adopt(lease).await, Err(Error::Lost { .. })));
}

/// A lock without expiry (a request without a lease duration) is never taken over, reported
/// expired, cleaned up or listed as anything but held, however long it is held, while a lease
/// taken beside it expires and is taken over; only its owner's release or a force release
/// frees it, and fencing goes on. (Every backend; session backends hold every lock until it is
/// released, so for them the case only waits a while.)
pub async fn lock_without_expiry_does_not_expire(t: Arc<dyn Target>) {
    let (a, b) = (t.backend().await.unwrap(), t.backend().await.unwrap());
    let caps = a.capabilities();
    let key = fresh_key("no_expiry");
    let me = owner("a");
    let forever = AcquireRequest::without_expiry(key.clone(), me.clone());
    let lease = must_acquire(&*a, &forever).await;
    assert_eq!(
        (lease.expires_at, lease.ttl),
        (None, None),
        "a lock without expiry has no expiry"
    );
    let other = request(&key, &owner("b"), LONG_TTL);
    if is_lease_based(&caps) {
        // Wait, trying as a waiter would, until a short lease taken at the same time has expired
        // and been taken over on this backend: the lock without expiry must stay held throughout.
        let control = fresh_key("no_expiry_control");
        let short = must_acquire(&*a, &request(&control, &owner("a"), SHORT_TTL)).await;
        let start = std::time::Instant::now();
        let taken = loop {
            must_be_held(&*b, &other).await;
            if let AcquireOutcome::Acquired(l) = b
                .try_acquire(&request(&control, &owner("b"), LONG_TTL))
                .await
                .expect("try_acquire")
            {
                break l;
            }
            assert!(
                start.elapsed() < takeover_limit(),
                "the control lease was not taken over"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        assert!(taken.token > short.token);
        assert!(b.release(&taken).await.unwrap());
    }
    tokio::time::sleep(SHORT_TTL * 2).await;
    must_be_held(&*b, &other).await;
    b.release_expired().await.expect("release_expired");
    must_be_held(&*b, &other).await;
    match b.status(&key).await.unwrap() {
        LockState::Held(info) => {
            assert_eq!(info.owner, me);
            assert_eq!(info.token, lease.token);
            assert_eq!((info.expires_at, info.remaining), (None, None));
        }
        other => panic!("a lock without expiry must stay held, got {other:?}"),
    }
    let listed = b.list().await.unwrap();
    let entry = listed
        .iter()
        .find(|i| i.key == key)
        .expect("a lock without expiry is listed");
    assert_eq!(entry.expires_at, None);
    assert!(a.verify(&lease).await.unwrap(), "still held by its owner");

    // Its owner releases it; then a force release frees the next one.
    assert!(a.release(&lease).await.unwrap());
    let next = acquire_within(
        &*b,
        &AcquireRequest::without_expiry(key.clone(), owner("b")),
        Duration::from_secs(10),
    )
    .await;
    assert!(next.token > lease.token);
    let removed = a
        .force_release(&key)
        .await
        .unwrap()
        .expect("a holder removed");
    assert_eq!(removed.token, next.token);
    let last = acquire_within(&*a, &request(&key, &me, LONG_TTL), Duration::from_secs(10)).await;
    assert!(last.token > next.token, "fencing goes on");
    assert!(a.release(&last).await.unwrap());
}
