//! An in-memory backend for tests: your own and the core's.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::backend::{LockBackend, Wakeup};
use crate::error::{Error, Result};
use crate::types::{
    AcquireOutcome, AcquireRequest, Capabilities, ExpiryClock, FencingToken, Lease, LockInfo,
    LockKey, LockKind, LockState, OwnerId,
};

const NAME: &str = "memory";

/// Leases one batched refresh takes (one lock of the store each).
const MAX_REFRESH_BATCH: usize = 1000;

/// Locks in this process's memory. Clones share the same storage, so clones act like separate
/// connections to one database. Expiry follows this process's monotonic clock.
///
/// For tests, examples and single-process programs; it locks nothing across processes.
///
/// ```
/// use leaselock::{Locker, MemoryBackend};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> leaselock::Result<()> {
/// let locker = Locker::builder(MemoryBackend::new()).build()?;
/// let out = locker.run("job", |lock| async move { lock.token().get() }).await?;
/// assert_eq!(out, Some(1));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct MemoryBackend {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    initialized: AtomicBool,
    keys: Mutex<BTreeMap<LockKey, Entry>>,
}

#[derive(Debug)]
struct Entry {
    /// The last token handed out for this key; never goes back.
    last_token: u64,
    holder: Option<Holder>,
    /// Bumped when a holder goes (released, force-released, expired and cleaned up or taken
    /// over), for this key's release and lost notifications. Only sent to when somebody
    /// listens, so an uncontended acquire and release notify nobody.
    gone: watch::Sender<u64>,
}

impl Default for Entry {
    fn default() -> Self {
        Self {
            last_token: 0,
            holder: None,
            gone: watch::channel(0).0,
        }
    }
}

impl Entry {
    /// Whether `lease` holds this key (expired or not).
    fn held_by(&self, lease: &Lease) -> bool {
        self.holder.as_ref().is_some_and(|h| h.matches(lease))
    }

    /// Takes the holder away, telling whoever listens.
    fn clear(&mut self) -> Option<Holder> {
        let holder = self.holder.take();
        if holder.is_some() && self.gone.receiver_count() > 0 {
            self.gone.send_modify(|n| *n = n.wrapping_add(1));
        }
        holder
    }
}

#[derive(Debug, Clone)]
struct Holder {
    owner: OwnerId,
    token: FencingToken,
    acquired_at: SystemTime,
    /// `None` for a lock without expiry (and then `expires` and `expires_at` are `None` too).
    ttl: Option<Duration>,
    expires: Option<Instant>,
    expires_at: Option<SystemTime>,
}

impl Holder {
    fn is_expired(&self, now: Instant) -> bool {
        self.expires.is_some_and(|expires| expires <= now)
    }

    fn matches(&self, lease: &Lease) -> bool {
        self.owner == lease.owner && self.token == lease.token
    }

    fn info(&self, key: &LockKey, now: Instant) -> LockInfo {
        let mut info = LockInfo::new(key.clone(), self.owner.clone(), self.token);
        info.acquired_at = Some(self.acquired_at);
        info.expires_at = self.expires_at;
        info.remaining = self
            .expires
            .map(|expires| expires.saturating_duration_since(now));
        info
    }

    fn lease(&self, key: &LockKey) -> Lease {
        let lease = Lease::new(
            key.clone(),
            self.owner.clone(),
            self.token,
            self.acquired_at,
        );
        match (self.expires_at, self.ttl) {
            (Some(expires_at), Some(ttl)) => lease.with_expiry(expires_at, ttl),
            _ => lease,
        }
    }
}

fn not_initialized() -> Error {
    Error::NotInitialized {
        backend: NAME,
        what: "the in-memory store was created uninitialized".into(),
    }
}

/// Extends `lease` in `keys` if it still holds its key.
fn refresh_in(keys: &mut BTreeMap<LockKey, Entry>, lease: &Lease, now: Instant) -> Result<Lease> {
    let ttl = lease
        .ttl
        .ok_or_else(|| Error::invalid("lease", "a lease without a duration cannot be refreshed"))?;
    match keys.get_mut(&lease.key).and_then(|e| e.holder.as_mut()) {
        Some(holder) if holder.matches(lease) && holder.ttl.is_none() => Err(Error::invalid(
            "lease",
            "a lock without expiry has nothing to refresh",
        )),
        Some(holder) if holder.matches(lease) && !holder.is_expired(now) => {
            holder.ttl = Some(ttl);
            holder.expires = Some(now + ttl);
            holder.expires_at = Some(SystemTime::now() + ttl);
            Ok(holder.lease(&lease.key))
        }
        Some(holder) if holder.matches(lease) => Err(Error::lost(&lease.key, "the lease expired")),
        _ => Err(Error::lost(
            &lease.key,
            "the lease was released or taken over",
        )),
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBackend {
    /// An empty, ready-to-use store.
    pub fn new() -> Self {
        let backend = Self::new_uninitialized();
        backend.shared.initialized.store(true, Ordering::SeqCst);
        backend
    }

    /// An empty store that, like a fresh database, refuses work until
    /// [`LockBackend::init_storage`] runs. For testing start-up code.
    ///
    /// ```
    /// use leaselock::{LockBackend, MemoryBackend};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let backend = MemoryBackend::new_uninitialized();
    /// assert!(backend.check_storage().await.is_err());
    /// backend.init_storage().await.unwrap();
    /// assert!(backend.check_storage().await.is_ok());
    /// # }
    /// ```
    pub fn new_uninitialized() -> Self {
        Self {
            shared: Arc::new(Shared {
                initialized: AtomicBool::new(false),
                keys: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    fn keys(&self) -> Result<MutexGuard<'_, BTreeMap<LockKey, Entry>>> {
        if !self.shared.initialized.load(Ordering::SeqCst) {
            return Err(not_initialized());
        }
        // A panic while holding this lock cannot leave an entry half-written: recover.
        Ok(self
            .shared
            .keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()))
    }
}

#[async_trait]
impl LockBackend for MemoryBackend {
    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::new(NAME, LockKind::Lease, ExpiryClock::Process);
        caps.release_notifications = true;
        caps.lost_notifications = true;
        caps.max_refresh_batch = MAX_REFRESH_BATCH;
        caps
    }

    async fn init_storage(&self) -> Result<()> {
        self.shared.initialized.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn check_storage(&self) -> Result<()> {
        self.keys().map(drop)
    }

    async fn try_acquire(&self, request: &AcquireRequest) -> Result<AcquireOutcome> {
        let now = Instant::now();
        let mut keys = self.keys()?;
        let entry = keys.entry(request.key().clone()).or_default();
        if let Some(holder) = &entry.holder {
            if !holder.is_expired(now) {
                return Ok(AcquireOutcome::Held(Some(holder.info(request.key(), now))));
            }
            // Taken over: its holder is told.
            entry.clear();
        }
        entry.last_token += 1;
        let wall = SystemTime::now();
        let holder = Holder {
            owner: request.owner().clone(),
            token: FencingToken::new(entry.last_token),
            acquired_at: wall,
            ttl: request.ttl(),
            expires: request.ttl().map(|ttl| now + ttl),
            expires_at: request.ttl().map(|ttl| wall + ttl),
        };
        let lease = holder.lease(request.key());
        entry.holder = Some(holder);
        Ok(AcquireOutcome::Acquired(lease))
    }

    async fn refresh(&self, lease: &Lease) -> Result<Lease> {
        refresh_in(&mut *self.keys()?, lease, Instant::now())
    }

    /// All of them under one lock of the store.
    async fn refresh_many(&self, leases: &[Lease]) -> Vec<Result<Lease>> {
        let now = Instant::now();
        let Ok(mut keys) = self.keys() else {
            return leases.iter().map(|_| Err(not_initialized())).collect();
        };
        leases
            .iter()
            .map(|lease| refresh_in(&mut keys, lease, now))
            .collect()
    }

    async fn verify(&self, lease: &Lease) -> Result<bool> {
        let now = Instant::now();
        let keys = self.keys()?;
        Ok(matches!(
            keys.get(&lease.key).and_then(|e| e.holder.as_ref()),
            Some(holder) if holder.matches(lease) && !holder.is_expired(now)
        ))
    }

    async fn release(&self, lease: &Lease) -> Result<bool> {
        let now = Instant::now();
        let mut keys = self.keys()?;
        let Some(entry) = keys.get_mut(&lease.key) else {
            return Ok(false);
        };
        match &entry.holder {
            Some(holder) if holder.matches(lease) && !holder.is_expired(now) => {
                entry.clear();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn status(&self, key: &LockKey) -> Result<LockState> {
        let now = Instant::now();
        let keys = self.keys()?;
        Ok(match keys.get(key).and_then(|e| e.holder.as_ref()) {
            None => LockState::Free,
            Some(holder) if holder.is_expired(now) => LockState::Expired(holder.info(key, now)),
            Some(holder) => LockState::Held(holder.info(key, now)),
        })
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let now = Instant::now();
        let keys = self.keys()?;
        Ok(keys
            .iter()
            .filter_map(|(key, e)| e.holder.as_ref().map(|h| (key, h)))
            .filter(|(_, h)| !h.is_expired(now))
            .map(|(key, h)| h.info(key, now))
            .collect())
    }

    async fn list_with_expired(&self) -> Result<Vec<LockState>> {
        let now = Instant::now();
        let keys = self.keys()?;
        Ok(keys
            .iter()
            .filter_map(|(key, e)| e.holder.as_ref().map(|h| (key, h)))
            .map(|(key, h)| {
                let info = h.info(key, now);
                if h.is_expired(now) {
                    LockState::Expired(info)
                } else {
                    LockState::Held(info)
                }
            })
            .collect())
    }

    async fn force_release(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        let now = Instant::now();
        let mut keys = self.keys()?;
        Ok(keys
            .get_mut(key)
            .and_then(Entry::clear)
            .map(|h| h.info(key, now)))
    }

    async fn release_expired(&self) -> Result<u64> {
        let now = Instant::now();
        let mut keys = self.keys()?;
        let mut count = 0;
        for entry in keys.values_mut() {
            if entry.holder.as_ref().is_some_and(|h| h.is_expired(now)) {
                entry.clear();
                count += 1;
            }
        }
        Ok(count)
    }

    async fn watch_release(&self, key: &LockKey) -> Result<Option<Wakeup>> {
        let mut rx = self
            .keys()?
            .entry(key.clone())
            .or_default()
            .gone
            .subscribe();
        Ok(Some(Box::pin(async move {
            // A closed channel means the store is gone: wake the waiter so it finds out.
            let _ = rx.changed().await;
        })))
    }

    fn watch_lost(&self, lease: &Lease) -> Option<Wakeup> {
        // Subscribed under the same lock that shows the lease held, so no loss falls between.
        // Not held (or no store) resolves at once.
        let rx = self.keys().ok().and_then(|keys| {
            let entry = keys.get(&lease.key)?;
            entry.held_by(lease).then(|| entry.gone.subscribe())
        });
        let this = self.clone();
        let lease = lease.clone();
        Some(Box::pin(async move {
            let Some(mut rx) = rx else { return };
            // A holder of this key went; was it this lease?
            while rx.changed().await.is_ok() {
                let still_held = this
                    .keys()
                    .is_ok_and(|keys| keys.get(&lease.key).is_some_and(|e| e.held_by(&lease)));
                if !still_held {
                    return;
                }
            }
        }))
    }
}
