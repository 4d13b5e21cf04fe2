//! The contract every storage backend implements.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::error::Result;
use crate::types::{
    AcquireOutcome, AcquireRequest, Capabilities, Lease, LockInfo, LockKey, LockState,
};

/// A future that resolves when something a backend watches happens (a release, a lost session).
pub type Wakeup = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// The locking contract: one round trip per operation wherever the database allows, no waiting,
/// no retries, no hooks. Those belong to the orchestrator, [`crate::Locker`].
///
/// Every method but [`LockBackend::refresh_many`] (which defaults to one refresh after another) is
/// required, so a backend author thinks about each one. Keys, owners and lease durations arrive
/// already validated. The shared conformance suite (`leaselock-conformance`)
/// checks an implementation against a real server.
///
/// ```
/// use leaselock::{AcquireOutcome, AcquireRequest, LockBackend, LockKey, MemoryBackend, OwnerId};
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> leaselock::Result<()> {
/// let backend = MemoryBackend::new();
/// backend.init_storage().await?;
/// let req = AcquireRequest::new(LockKey::new("job")?, OwnerId::new("me")?, Duration::from_secs(5))?;
/// let AcquireOutcome::Acquired(lease) = backend.try_acquire(&req).await? else { panic!() };
/// assert!(backend.verify(&lease).await?);
/// assert!(backend.release(&lease).await?);
/// # Ok(()) }
/// ```
#[async_trait]
pub trait LockBackend: Send + Sync + Debug {
    /// What this backend can do.
    fn capabilities(&self) -> Capabilities;

    /// Creates the storage (table, collection, counters) if missing. Idempotent, and safe when many
    /// processes run it at once.
    async fn init_storage(&self) -> Result<()>;

    /// Pre-flight check: the storage is reachable, initialized and usable. Fails with
    /// [`crate::Error::NotInitialized`], [`crate::Error::NotAccessible`] (cannot be reached now,
    /// retryable) or [`crate::Error::Denied`] (credentials or permissions refused, permanent),
    /// naming what is missing.
    async fn check_storage(&self) -> Result<()>;

    /// One attempt to acquire; never waits. A key held by anyone, the same owner included, is
    /// [`AcquireOutcome::Held`]: locks are not reentrant.
    ///
    /// A request without a lease duration ([`AcquireRequest::ttl`] is `None`, from
    /// [`AcquireRequest::without_expiry`]) asks for a lock without expiry: a lease backend records
    /// none, so the lock is held until its owner releases it or it is force-released. It never
    /// expires, [`LockBackend::release_expired`] leaves it alone, no waiter takes it over, its
    /// lease and [`LockInfo`] have no `expires_at`, `ttl` or `remaining`, and
    /// [`LockBackend::list`] shows it. Session backends hold every lock as long as the session.
    async fn try_acquire(&self, request: &AcquireRequest) -> Result<AcquireOutcome>;

    /// Extends a lease still held by its owner by its lease duration, returning the new lease.
    /// Fails with [`crate::Error::Lost`] when the lease is gone. Session locks check that their
    /// session is alive and unchanged. A lock without expiry has nothing to extend: the
    /// orchestrator verifies it instead, and a lease backend may refuse to refresh it with
    /// [`crate::Error::InvalidInput`].
    async fn refresh(&self, lease: &Lease) -> Result<Lease>;

    /// Refreshes several leases, in as few round trips as the database allows: one result per
    /// lease, in the order given, each what [`LockBackend::refresh`] would have returned for it
    /// (a lost lease is [`crate::Error::Lost`] and does not keep the others from being
    /// refreshed). An error of the whole call (the connection dropped) is returned for every
    /// lease. The leases may hold different keys with different durations, and two of them may
    /// name the same key (a stale lease beside its successor).
    ///
    /// The orchestrator calls it only with at most [`Capabilities::max_refresh_batch`] leases,
    /// and only when that is above 1. The default refreshes one lease after the other; a backend
    /// that can do better (one transaction, one statement) overrides it and raises
    /// `max_refresh_batch`.
    ///
    /// ```
    /// use leaselock::{AcquireOutcome, AcquireRequest, LockBackend, LockKey, MemoryBackend, OwnerId};
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> leaselock::Result<()> {
    /// let backend = MemoryBackend::new();
    /// let mut leases = Vec::new();
    /// for key in ["a", "b"] {
    ///     let req = AcquireRequest::new(LockKey::new(key)?, OwnerId::new("me")?, Duration::from_secs(5))?;
    ///     let AcquireOutcome::Acquired(lease) = backend.try_acquire(&req).await? else { panic!() };
    ///     leases.push(lease);
    /// }
    /// backend.force_release(&LockKey::new("b")?).await?;
    /// let results = backend.refresh_many(&leases).await;
    /// assert!(results[0].is_ok());
    /// assert!(matches!(results[1], Err(leaselock::Error::Lost { .. })));
    /// # Ok(()) }
    /// ```
    async fn refresh_many(&self, leases: &[Lease]) -> Vec<Result<Lease>> {
        let mut results = Vec::with_capacity(leases.len());
        for lease in leases {
            results.push(self.refresh(lease).await);
        }
        results
    }

    /// Whether `lease` (its owner and fencing token) still holds its key and has not expired.
    async fn verify(&self, lease: &Lease) -> Result<bool>;

    /// Releases `lease` if it still holds its key. Returns whether it did; releasing a lost lease
    /// returns `false` and changes nothing.
    async fn release(&self, lease: &Lease) -> Result<bool>;

    /// The state of a key.
    async fn status(&self, key: &LockKey) -> Result<LockState>;

    /// Every lock currently held (not expired), in key order.
    async fn list(&self) -> Result<Vec<LockInfo>>;

    /// Every lock held now and every expired lease nobody has taken over or cleared yet (the
    /// stale locks an operator looks for), in key order: each a [`LockState::Held`] or a
    /// [`LockState::Expired`], never [`LockState::Free`]. The held ones are what
    /// [`LockBackend::list`] returns.
    ///
    /// The default returns [`LockBackend::list`] as held locks, which is right for a backend
    /// whose locks never expire (session locks end with their session and leave nothing
    /// behind). A lease backend overrides it.
    ///
    /// ```
    /// use leaselock::{AcquireOutcome, AcquireRequest, LockBackend, LockKey, LockState, MemoryBackend, OwnerId};
    /// use std::time::Duration;
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> leaselock::Result<()> {
    /// let backend = MemoryBackend::new();
    /// let req = AcquireRequest::new(LockKey::new("job")?, OwnerId::new("me")?, Duration::from_millis(20))?;
    /// let AcquireOutcome::Acquired(_) = backend.try_acquire(&req).await? else { panic!() };
    /// tokio::time::sleep(Duration::from_millis(50)).await;
    /// assert!(backend.list().await?.is_empty());
    /// let all = backend.list_with_expired().await?;
    /// assert!(matches!(&all[..], [LockState::Expired(info)] if info.key.as_str() == "job"));
    /// # Ok(()) }
    /// ```
    async fn list_with_expired(&self) -> Result<Vec<LockState>> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .map(LockState::Held)
            .collect())
    }

    /// Releases a key whoever holds it. Returns the holder it removed, if any. The fencing
    /// counter is kept.
    async fn force_release(&self, key: &LockKey) -> Result<Option<LockInfo>>;

    /// Releases every expired lease. Returns how many. Fencing counters are kept.
    async fn release_expired(&self) -> Result<u64>;

    /// Starts watching `key` for a release, before an acquisition attempt; the orchestrator awaits
    /// the returned future (racing its retry delay) after a failed attempt, so a waiter is woken
    /// in milliseconds. Backends without release notifications return `Ok(None)` and waiters poll.
    async fn watch_release(&self, key: &LockKey) -> Result<Option<Wakeup>>;

    /// A future that resolves when the backend learns, without being asked, that `lease` is gone
    /// (a session lock's connection dropped or was killed). `None` when the backend cannot tell;
    /// the refresh daemon then finds out at its next refresh or at the local deadline.
    fn watch_lost(&self, lease: &Lease) -> Option<Wakeup>;

    /// Closes the backend's connections (its client or pool) in an orderly way, for a program
    /// about to end its async runtime: some drivers clean up in background tasks when their last
    /// handle is dropped, and those tasks can fail noisily when the runtime is already going
    /// away. Call it once, after the last operation, when nothing holds a lock through this
    /// backend any more: any later operation may fail. A backend built over a client or pool
    /// the application passed in leaves that client alone.
    ///
    /// Best effort and bounded: it never fails, and a backend that has nothing to close keeps
    /// the default, which does nothing.
    async fn shutdown(&self) {}
}

/// [`LockBackend::refresh_many`] for a database that can extend many leases of one duration in
/// one statement but only tells how many it extended (an `UPDATE … WHERE (key, owner, token) IN
/// (…)` and its row count).
///
/// Groups `leases` by duration, calls `refresh_chunk(duration, chunk)` for every `chunk_size` of
/// them, and when it returns `Ok(true)` (every lease of the chunk was extended) answers each with
/// its lease extended by `duration` from the moment before the call. `Ok(false)` means one of them
/// was lost: each lease of that chunk is then refreshed on its own with
/// [`LockBackend::refresh`], which tells the lost ones apart. An error fails its chunk's leases;
/// a lease without a duration is refused.
///
/// ```
/// use std::time::Duration;
/// use leaselock::{refresh_in_chunks, AcquireOutcome, AcquireRequest, LockBackend, LockKey, MemoryBackend, OwnerId};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> leaselock::Result<()> {
/// let backend = MemoryBackend::new();
/// let req = AcquireRequest::new(LockKey::new("a")?, OwnerId::new("me")?, Duration::from_secs(5))?;
/// let AcquireOutcome::Acquired(lease) = backend.try_acquire(&req).await? else { panic!() };
/// // A stand-in for one statement over the chunk: it says some lease was not found, so each
/// // lease is refreshed on its own.
/// let results = refresh_in_chunks(&backend, &[lease], 50, |_duration, _chunk| async { Ok(false) }).await;
/// assert!(results[0].is_ok());
/// # Ok(()) }
/// ```
pub async fn refresh_in_chunks<'a, B, F, Fut>(
    backend: &B,
    leases: &'a [Lease],
    chunk_size: usize,
    mut refresh_chunk: F,
) -> Vec<Result<Lease>>
where
    B: LockBackend + ?Sized,
    F: FnMut(Duration, Vec<&'a Lease>) -> Fut + Send,
    Fut: Future<Output = Result<bool>> + Send,
{
    let mut results: Vec<Option<Result<Lease>>> = leases.iter().map(|_| None).collect();
    let mut by_duration: BTreeMap<Duration, Vec<usize>> = BTreeMap::new();
    for (n, lease) in leases.iter().enumerate() {
        match lease.ttl {
            Some(ttl) => by_duration.entry(ttl).or_default().push(n),
            None => {
                results[n] = Some(Err(crate::Error::invalid(
                    "lease",
                    "a lease without a duration cannot be refreshed",
                )))
            }
        }
    }
    for (ttl, group) in by_duration {
        for positions in group.chunks(chunk_size.max(1)) {
            let chunk: Vec<&Lease> = positions.iter().map(|&n| &leases[n]).collect();
            let sent = SystemTime::now();
            let answers: Vec<Result<Lease>> = match refresh_chunk(ttl, chunk.clone()).await {
                Ok(true) => chunk
                    .iter()
                    .map(|lease| Ok((*lease).clone().with_expiry(sent + ttl, ttl)))
                    .collect(),
                Ok(false) => {
                    let mut answers = Vec::with_capacity(chunk.len());
                    for lease in &chunk {
                        answers.push(backend.refresh(lease).await);
                    }
                    answers
                }
                Err(error) => error.for_batch(chunk.len()).into_iter().map(Err).collect(),
            };
            for (&n, answer) in positions.iter().zip(answers) {
                results[n] = Some(answer);
            }
        }
    }
    results
        .into_iter()
        .map(|result| result.expect("every lease is answered"))
        .collect()
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<B: LockBackend + ?Sized> LockBackend for Arc<B> {
    fn capabilities(&self) -> Capabilities {
        (**self).capabilities()
    }
    async fn init_storage(&self) -> Result<()> {
        (**self).init_storage().await
    }
    async fn check_storage(&self) -> Result<()> {
        (**self).check_storage().await
    }
    async fn try_acquire(&self, request: &AcquireRequest) -> Result<AcquireOutcome> {
        (**self).try_acquire(request).await
    }
    async fn refresh(&self, lease: &Lease) -> Result<Lease> {
        (**self).refresh(lease).await
    }
    async fn refresh_many(&self, leases: &[Lease]) -> Vec<Result<Lease>> {
        (**self).refresh_many(leases).await
    }
    async fn verify(&self, lease: &Lease) -> Result<bool> {
        (**self).verify(lease).await
    }
    async fn release(&self, lease: &Lease) -> Result<bool> {
        (**self).release(lease).await
    }
    async fn status(&self, key: &LockKey) -> Result<LockState> {
        (**self).status(key).await
    }
    async fn list(&self) -> Result<Vec<LockInfo>> {
        (**self).list().await
    }
    async fn list_with_expired(&self) -> Result<Vec<LockState>> {
        (**self).list_with_expired().await
    }
    async fn force_release(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        (**self).force_release(key).await
    }
    async fn release_expired(&self) -> Result<u64> {
        (**self).release_expired().await
    }
    async fn watch_release(&self, key: &LockKey) -> Result<Option<Wakeup>> {
        (**self).watch_release(key).await
    }
    fn watch_lost(&self, lease: &Lease) -> Option<Wakeup> {
        (**self).watch_lost(lease)
    }
    async fn shutdown(&self) {
        (**self).shutdown().await
    }
}
