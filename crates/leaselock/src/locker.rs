//! The orchestrator: waiting, two-phase acquisition, hooks, refreshing and run-under-lock.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::LockBackend;
use crate::config::{OnUnavailable, WaitPolicy};
use crate::error::{Error, Result};
use crate::guard::{catch_panic, GuardConfig, LockContext, LockGuard};
use crate::guardian::Guardian;
use crate::hooks::{Hooks, LockHooks, Operation};
use crate::refresher::Refresher;
use crate::types::{
    validate_lease_duration, AcquireOutcome, AcquireRequest, Capabilities, LockInfo, LockKey,
    LockState, OwnerId,
};

/// The default lease duration: 60 seconds.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(60);
/// The default time a release keeps retrying transient errors: 10 seconds.
pub const DEFAULT_RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// The refresh batch window of a locker that sets none: a twentieth of its refresh interval, at
/// most one second.
fn default_refresh_batch_window(refresh_interval: Duration) -> Duration {
    (refresh_interval / 20).min(Duration::from_secs(1))
}

/// What [`Locker::run_if_needed`] did.
///
/// Only [`RunIfNeeded::Ran`] and [`RunIfNeeded::NotNeededOnceLocked`] took the lock; a caller
/// that found nothing to do ([`RunIfNeeded::NotNeeded`]) never touched it.
///
/// ```
/// use leaselock::RunIfNeeded;
/// let ran: RunIfNeeded<u32> = RunIfNeeded::Ran(3);
/// assert!(ran.took_lock());
/// assert_eq!(ran.ran(), Some(3));
/// assert!(!RunIfNeeded::<u32>::NotNeeded.took_lock());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[must_use = "tells whether the work ran"]
pub enum RunIfNeeded<T> {
    /// The check found work, found it again under the lock, and the work ran with this output.
    Ran(T),
    /// The check, made without the lock, found nothing to do: the lock was not acquired.
    NotNeeded,
    /// The check found work, but once the lock was held it found none any more: another
    /// instance did the work meanwhile. The lock was released without running the work.
    NotNeededOnceLocked,
    /// The check found work, but the lock stayed held by someone else after waiting as
    /// configured; returned only with [`OnUnavailable::ReturnNone`] (the default,
    /// [`OnUnavailable::Error`], fails with [`Error::Held`]). The work did not run.
    Unavailable,
}

impl<T> RunIfNeeded<T> {
    /// The work's output, if it ran.
    pub fn ran(self) -> Option<T> {
        match self {
            RunIfNeeded::Ran(value) => Some(value),
            _ => None,
        }
    }

    /// Whether the lock was acquired (the work ran, or the check under the lock found nothing).
    pub fn took_lock(&self) -> bool {
        matches!(self, RunIfNeeded::Ran(_) | RunIfNeeded::NotNeededOnceLocked)
    }
}

/// Builds a [`Locker`]. Every setting has a documented default; [`LockerBuilder::build`] checks
/// them all and names the field at fault.
///
/// ```
/// use std::time::Duration;
/// use leaselock::{Locker, MemoryBackend, OnUnavailable, WaitPolicy};
/// let locker = Locker::builder(MemoryBackend::new())
///     .lease_duration(Duration::from_secs(30))
///     .wait(WaitPolicy::until(Duration::from_secs(120), Duration::from_secs(1)))
///     .on_unavailable(OnUnavailable::ReturnNone)
///     .build()?;
/// assert_eq!(locker.lease_duration(), Duration::from_secs(30));
///
/// let err = Locker::builder(MemoryBackend::new())
///     .lease_duration(Duration::from_secs(10))
///     .refresh_interval(Duration::from_secs(10))
///     .build()
///     .unwrap_err();
/// assert!(matches!(err, leaselock::Error::InvalidInput { field: "refresh_interval", .. }));
/// # Ok::<(), leaselock::Error>(())
/// ```
#[must_use = "call .build() to get a Locker"]
pub struct LockerBuilder {
    backend: Arc<dyn LockBackend>,
    enabled: bool,
    lease_duration: Duration,
    expires: bool,
    refresh: bool,
    refresh_interval: Option<Duration>,
    refresh_batch_window: Option<Duration>,
    wait: WaitPolicy,
    on_unavailable: OnUnavailable,
    verify_after_acquire: bool,
    hooks: Hooks,
    owner: Option<OwnerId>,
    owner_error: Option<Error>,
    release_timeout: Duration,
}

impl fmt::Debug for LockerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockerBuilder")
            .field("backend", &self.backend)
            .field("enabled", &self.enabled)
            .field("lease_duration", &self.lease_duration)
            .field("expires", &self.expires)
            .field("refresh", &self.refresh)
            .field("refresh_interval", &self.refresh_interval)
            .field("refresh_batch_window", &self.refresh_batch_window)
            .field("wait", &self.wait)
            .field("on_unavailable", &self.on_unavailable)
            .field("verify_after_acquire", &self.verify_after_acquire)
            .field("owner", &self.owner)
            .field("release_timeout", &self.release_timeout)
            .finish_non_exhaustive()
    }
}

impl LockerBuilder {
    /// Whether locking is on. Default: `true`. A disabled locker runs the work without any lock
    /// and logs a warning every time it does.
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// How long a lease lasts without a refresh. Default: 60 s ([`DEFAULT_LEASE_DURATION`]).
    /// Between 10 ms and one year. Session-lock backends hold the lock as long as their session
    /// instead; for them this is how long the holder trusts its session without a successful
    /// liveness check (a refresh) before it counts the lock lost, so a partitioned holder is told
    /// even when its connection hangs.
    pub fn lease_duration(mut self, lease_duration: Duration) -> Self {
        self.lease_duration = lease_duration;
        self
    }

    /// Whether locks expire. Default: `true`: a lock is a lease that the refresh daemon extends,
    /// and that expires after one lease duration if its holder stops (crashes, hangs, loses the
    /// network), so the lock is never stuck.
    ///
    /// `false`, asked for explicitly, takes locks without expiry
    /// ([`crate::AcquireRequest::without_expiry`]): held until the owner releases them or an
    /// operator force-releases them ([`Locker::force_release`]), also after the owner crashed
    /// (session backends still free them when the session ends). Nothing is refreshed; the
    /// daemon only verifies ownership every refresh interval, so the lost signal still fires
    /// after a force release. The lease duration then only paces that check.
    ///
    /// ```
    /// use leaselock::{Locker, MemoryBackend};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> leaselock::Result<()> {
    /// let locker = Locker::builder(MemoryBackend::new()).expires(false).build()?;
    /// let guard = locker.acquire("maintenance-window").await?.unwrap();
    /// assert_eq!(guard.lease().unwrap().expires_at, None);
    /// assert!(guard.release().await?);
    /// # Ok(()) }
    /// ```
    pub fn expires(mut self, expires: bool) -> Self {
        self.expires = expires;
        self
    }

    /// Whether a background task refreshes held leases. Default: `true`. Without it, a lease
    /// lasts one lease duration and the work must finish in that time (its lost signal still fires
    /// at the deadline).
    pub fn refresh(mut self, refresh: bool) -> Self {
        self.refresh = refresh;
        self
    }

    /// How often the refresh daemon extends a lease. Default: a third of the lease duration, so
    /// two refreshes can fail before the lease runs out. Must be shorter than the lease duration.
    pub fn refresh_interval(mut self, refresh_interval: Duration) -> Self {
        self.refresh_interval = Some(refresh_interval);
        self
    }

    /// How long the refresh daemon gathers the leases that fall due together into one batched
    /// refresh ([`LockBackend::refresh_many`]), on a backend that batches
    /// ([`crate::Capabilities::max_refresh_batch`] above 1): the first lease due waits up to this
    /// long for others, so a process holding thousands of leases refreshes them in a few
    /// statements a second instead of one each. Default: a twentieth of the refresh interval, at
    /// most one second (one second with the default 60 s lease); zero refreshes every lease on
    /// its own the moment it is due. Must be shorter than the refresh interval. A lease's local
    /// deadline still runs from before its refresh was queued, so waiting in a batch never
    /// stretches how long a holder trusts its lease.
    ///
    /// Measured with 10,000 leases of 30 s (`cargo xtask bench --only scale`, BENCHMARKS.md), a
    /// 0.5 s window took the CPU of the refreshes from 5.4% of one core to 1.1% on SQLite and
    /// from 3.3% to 0.8% on a PostgreSQL lease table.
    ///
    /// ```
    /// use std::time::Duration;
    /// use leaselock::{Locker, MemoryBackend};
    /// let locker = Locker::builder(MemoryBackend::new())
    ///     .refresh_batch_window(Duration::from_millis(500)) // gather due leases for 0.5 s
    ///     .build()?;
    /// # Ok::<(), leaselock::Error>(())
    /// ```
    pub fn refresh_batch_window(mut self, window: Duration) -> Self {
        self.refresh_batch_window = Some(window);
        self
    }

    /// How long to keep trying while someone else holds the lock. Default:
    /// [`WaitPolicy::fail_fast`].
    pub fn wait(mut self, wait: WaitPolicy) -> Self {
        self.wait = wait;
        self
    }

    /// What to return when the lock stays held. Default: [`OnUnavailable::Error`].
    pub fn on_unavailable(mut self, on_unavailable: OnUnavailable) -> Self {
        self.on_unavailable = on_unavailable;
        self
    }

    /// Two-phase acquisition: after acquiring, ask the backend again whether the lease is ours
    /// before handing it out. Default: `false`, because every leaselock backend's acquire returns
    /// its ownership proof atomically in the same round trip; turn it on to pay one more round
    /// trip for a second check (the behaviour of some migration runners).
    pub fn verify_after_acquire(mut self, verify: bool) -> Self {
        self.verify_after_acquire = verify;
        self
    }

    /// How long a release keeps retrying transient errors (a dropped connection, a busy
    /// database) before it gives up loudly, leaving the lease to expire; an attempt that gets no
    /// answer at all is abandoned when this runs out. Default: 10 s
    /// ([`DEFAULT_RELEASE_TIMEOUT`]); at most one hour; zero means one attempt, however long it
    /// takes.
    pub fn release_timeout(mut self, release_timeout: Duration) -> Self {
        self.release_timeout = release_timeout;
        self
    }

    /// Lifecycle hooks. Default: none, which behaves as [`NoHooks`](crate::NoHooks) and costs
    /// nothing per lock.
    pub fn hooks(mut self, hooks: impl LockHooks + 'static) -> Self {
        self.hooks = Hooks::new(Arc::new(hooks));
        self
    }

    /// Hooks shared with other lockers.
    pub fn shared_hooks(mut self, hooks: Arc<dyn LockHooks>) -> Self {
        self.hooks = Hooks::new(hooks);
        self
    }

    /// The owner id this locker acquires as. Default: [`OwnerId::generate`] (`host-pid-uuid`),
    /// fresh for each locker.
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        match OwnerId::new(owner) {
            Ok(owner) => {
                self.owner = Some(owner);
                self.owner_error = None;
            }
            Err(error) => self.owner_error = Some(error),
        }
        self
    }

    /// Checks every setting and builds the locker.
    pub fn build(self) -> Result<Locker> {
        if let Some(error) = self.owner_error {
            return Err(error);
        }
        let lease_duration = validate_lease_duration("lease_duration", self.lease_duration)?;
        let refresh_interval = match self.refresh_interval {
            Some(interval) => {
                if interval.is_zero() || interval >= lease_duration {
                    return Err(Error::invalid(
                        "refresh_interval",
                        format!(
                            "{interval:?} must be above zero and shorter than the lease duration {lease_duration:?}"
                        ),
                    ));
                }
                interval
            }
            None => lease_duration / 3,
        };
        let refresh_batch_window = match self.refresh_batch_window {
            Some(window) if window >= refresh_interval => {
                return Err(Error::invalid(
                    "refresh_batch_window",
                    format!(
                        "{window:?} must be shorter than the refresh interval {refresh_interval:?}"
                    ),
                ));
            }
            Some(window) => window,
            None => default_refresh_batch_window(refresh_interval),
        };
        self.wait.validate()?;
        if self.release_timeout > Duration::from_secs(3600) {
            return Err(Error::invalid(
                "release_timeout",
                format!("{:?} is longer than one hour", self.release_timeout),
            ));
        }
        let capabilities = self.backend.capabilities();
        let batches = capabilities.max_refresh_batch > 1 && !refresh_batch_window.is_zero();
        let refresher = (batches && self.refresh && self.expires).then(|| {
            Arc::new(Refresher::new(
                Arc::clone(&self.backend),
                refresh_batch_window,
                capabilities.max_refresh_batch,
            ))
        });
        Ok(Locker {
            inner: Arc::new(Inner {
                backend: self.backend,
                capabilities,
                enabled: self.enabled,
                lease_duration,
                expires: self.expires,
                refresh: self.refresh,
                refresh_interval,
                refresher,
                guardian: Guardian::new(self.release_timeout),
                wait: self.wait,
                on_unavailable: self.on_unavailable,
                verify_after_acquire: self.verify_after_acquire,
                hooks: self.hooks,
                owner: self.owner.unwrap_or_else(OwnerId::generate),
                release_timeout: self.release_timeout,
            }),
        })
    }
}

/// The orchestrator over one backend: acquires with waiting, verification and hooks, keeps leases
/// refreshed, runs work under a lock, and exposes the operator's operations (status, list, force
/// release). Cheap to clone; clones share configuration and owner id.
///
/// ```
/// use std::time::Duration;
/// use leaselock::{Locker, MemoryBackend, WaitPolicy};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> leaselock::Result<()> {
/// let locker = Locker::builder(MemoryBackend::new())
///     .wait(WaitPolicy::until(Duration::from_secs(10), Duration::from_millis(100)))
///     .build()?;
/// let guard = locker.acquire("migrations").await?.expect("waits, then errors; never None here");
/// println!("holding with fencing token {}", guard.token());
/// guard.release().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Locker {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Arc<dyn LockBackend>,
    capabilities: Capabilities,
    enabled: bool,
    lease_duration: Duration,
    expires: bool,
    refresh: bool,
    refresh_interval: Duration,
    /// Batches refreshes when the backend can (see [`LockerBuilder::refresh_batch_window`]).
    refresher: Option<Arc<Refresher>>,
    /// Where the guards' daemons wait until they have work (see `guardian.rs`).
    guardian: Guardian,
    wait: WaitPolicy,
    on_unavailable: OnUnavailable,
    verify_after_acquire: bool,
    hooks: Hooks,
    owner: OwnerId,
    release_timeout: Duration,
}

impl fmt::Debug for Locker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("Locker")
            .field("backend", &i.backend)
            .field("enabled", &i.enabled)
            .field("lease_duration", &i.lease_duration)
            .field("expires", &i.expires)
            .field("refresh", &i.refresh)
            .field("refresh_interval", &i.refresh_interval)
            .field("refresher", &i.refresher)
            .field("wait", &i.wait)
            .field("on_unavailable", &i.on_unavailable)
            .field("verify_after_acquire", &i.verify_after_acquire)
            .field("owner", &i.owner)
            .field("release_timeout", &i.release_timeout)
            .finish_non_exhaustive()
    }
}

impl Locker {
    /// Starts configuring a locker over `backend` (any [`LockBackend`], or an
    /// `Arc<dyn LockBackend>` shared with others).
    pub fn builder(backend: impl LockBackend + 'static) -> LockerBuilder {
        LockerBuilder {
            backend: Arc::new(backend),
            enabled: true,
            lease_duration: DEFAULT_LEASE_DURATION,
            expires: true,
            refresh: true,
            refresh_interval: None,
            refresh_batch_window: None,
            wait: WaitPolicy::default(),
            on_unavailable: OnUnavailable::default(),
            verify_after_acquire: false,
            hooks: Hooks::default(),
            owner: None,
            owner_error: None,
            release_timeout: DEFAULT_RELEASE_TIMEOUT,
        }
    }

    /// The owner id this locker acquires as.
    pub fn owner(&self) -> &OwnerId {
        &self.inner.owner
    }

    /// The configured lease duration.
    pub fn lease_duration(&self) -> Duration {
        self.inner.lease_duration
    }

    /// How long a lease due for its refresh waits for others to share a batch with (see
    /// [`LockerBuilder::refresh_batch_window`]); zero when this locker refreshes each lease on
    /// its own (the window is zero, the backend refreshes one lease a call, or nothing is
    /// refreshed).
    ///
    /// ```
    /// use std::time::Duration;
    /// use leaselock::{Locker, MemoryBackend};
    /// let locker = Locker::builder(MemoryBackend::new())
    ///     .lease_duration(Duration::from_secs(30)) // refreshed every 10 s
    ///     .build()?;
    /// assert_eq!(locker.refresh_batch_window(), Duration::from_millis(500));
    /// # Ok::<(), leaselock::Error>(())
    /// ```
    pub fn refresh_batch_window(&self) -> Duration {
        self.inner
            .refresher
            .as_ref()
            .map_or(Duration::ZERO, |refresher| refresher.window())
    }

    /// Whether this locker's locks expire (see [`LockerBuilder::expires`]).
    pub fn expires(&self) -> bool {
        self.inner.expires
    }

    /// The backend's capabilities.
    pub fn capabilities(&self) -> &Capabilities {
        &self.inner.capabilities
    }

    /// Where this locker's guards wait for their daemons.
    #[cfg(test)]
    pub(crate) fn guardian(&self) -> &Guardian {
        &self.inner.guardian
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<dyn LockBackend> {
        &self.inner.backend
    }

    /// Creates the backend's storage if missing (idempotent; safe from many processes at once).
    pub async fn init_storage(&self) -> Result<()> {
        let outcome = self.inner.backend.init_storage().await;
        self.report(Operation::InitStorage, None, outcome).await
    }

    /// Pre-flight check that storage is reachable and initialized.
    pub async fn check_storage(&self) -> Result<()> {
        let outcome = self.inner.backend.check_storage().await;
        self.report(Operation::CheckStorage, None, outcome).await
    }

    /// Acquires `key`, waiting as configured.
    ///
    /// Returns `Ok(Some(guard))` when acquired; when the lock stays held, `Err(Error::Held)` or,
    /// with [`OnUnavailable::ReturnNone`], `Ok(None)`. A disabled locker returns a guard that holds
    /// nothing (token zero) after logging a warning.
    pub async fn acquire(&self, key: impl AsRef<str>) -> Result<Option<LockGuard>> {
        let key = LockKey::new(key.as_ref())?;
        let i = &self.inner;
        if !i.enabled {
            tracing::warn!(%key, "locking is DISABLED: running without a lock");
            return Ok(Some(LockGuard::disabled(key, i.owner.clone())));
        }
        let request = if i.expires {
            AcquireRequest::new(key.clone(), i.owner.clone(), i.lease_duration)?
        } else {
            AcquireRequest::without_expiry(key.clone(), i.owner.clone())
        };
        i.hooks
            .call("before_acquire", |h| h.before_acquire(&key, &i.owner))
            .await;
        let started = Instant::now();
        let mut attempt: u32 = 1;
        loop {
            let may_wait = i.wait != WaitPolicy::fail_fast();
            let wakeup = if may_wait {
                i.backend.watch_release(&key).await.unwrap_or_else(|error| {
                    tracing::debug!(%key, %error, "release notifications unavailable; polling");
                    None
                })
            } else {
                None
            };
            // The first attempt is sent after `started`: an earlier start only makes the
            // guard's deadline earlier, never later.
            let sent_at = if attempt == 1 {
                started
            } else {
                Instant::now()
            };
            let (holder, failure) = match i.backend.try_acquire(&request).await {
                Ok(AcquireOutcome::Acquired(lease)) => {
                    if i.verify_after_acquire {
                        self.verify_fresh(&lease).await?;
                    }
                    tracing::debug!(%key, token = %lease.token, "lock acquired");
                    i.hooks.call("acquired", |h| h.acquired(&lease)).await;
                    return Ok(Some(self.guard(lease, sent_at)));
                }
                Ok(AcquireOutcome::Held(holder)) => (holder, None),
                Err(error) => {
                    i.hooks
                        .call("error", |h| h.error(Operation::Acquire, Some(&key), &error))
                        .await;
                    if !error.is_retryable() {
                        return Err(error);
                    }
                    tracing::warn!(%key, %error, attempt, "acquisition attempt failed");
                    (None, Some(error))
                }
            };
            match i.wait.next_delay(attempt, started.into_std()) {
                Some(delay) => {
                    tracing::debug!(%key, attempt, ?delay, holder = ?holder.as_ref().map(|h| h.owner.as_str()), "lock held; waiting");
                    i.hooks
                        .call("retry", |h| h.retry(&key, attempt, holder.as_ref()))
                        .await;
                    let wakeup = match failure {
                        // After an error, back off the full delay rather than spin on wake-ups.
                        Some(_) => None,
                        None => wakeup,
                    };
                    match wakeup {
                        Some(wakeup) => {
                            tokio::select! {
                                _ = tokio::time::sleep(delay) => {}
                                _ = wakeup => {}
                            }
                        }
                        None => tokio::time::sleep(delay).await,
                    }
                    attempt = attempt.saturating_add(1);
                }
                None => {
                    if let Some(error) = failure {
                        return Err(error);
                    }
                    tracing::info!(%key, attempt, holder = ?holder.as_ref().map(|h| h.owner.as_str()), "lock unavailable");
                    i.hooks
                        .call("acquisition_failed", |h| {
                            h.acquisition_failed(&key, holder.as_ref())
                        })
                        .await;
                    return match i.on_unavailable {
                        OnUnavailable::ReturnNone => Ok(None),
                        OnUnavailable::Error => Err(Error::Held {
                            key,
                            holder: holder.map(Box::new),
                        }),
                    };
                }
            }
        }
    }

    fn guard(&self, lease: crate::Lease, sent_at: Instant) -> LockGuard {
        let i = &self.inner;
        // A lock without expiry on a lease backend has nothing to refresh: verify it instead.
        let verify_only = lease.ttl.is_none() && i.capabilities.kind == crate::LockKind::Lease;
        let ttl = lease.ttl;
        LockGuard::start(
            Arc::clone(&i.backend),
            i.hooks.clone(),
            lease,
            sent_at,
            GuardConfig {
                refresh_every: i.refresh.then_some(i.refresh_interval),
                verify_only,
                release_timeout: i.release_timeout,
                session_bound: i.lease_duration,
                refresher: i
                    .refresher
                    .clone()
                    .filter(|_| ttl.is_some() && !verify_only),
            },
            &i.guardian,
        )
    }

    /// Takes over a lease acquired elsewhere: lease hand-over. Another process serialized it
    /// (leases implement serde); this one refreshes it at once (the backend checks its owner and
    /// fencing token, so a lost or forged lease fails with [`Error::Lost`]) and from then on
    /// refreshes, watches and releases it like its own. A lock without expiry is verified instead
    /// of refreshed. Session locks live on their holder's connection and cannot be handed over
    /// ([`Error::InvalidInput`]).
    ///
    /// ```
    /// use leaselock::{Lease, Locker, MemoryBackend};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> leaselock::Result<()> {
    /// let backend = MemoryBackend::new();
    /// let first = Locker::builder(backend.clone()).build()?;
    /// let guard = first.acquire("batch").await?.unwrap();
    /// let lease = guard.hand_over().unwrap(); // stop refreshing, keep the lock
    /// let wire = serde_json::to_string(&lease).unwrap();
    ///
    /// let second = Locker::builder(backend).build()?;
    /// let lease: Lease = serde_json::from_str(&wire).unwrap();
    /// let adopted = second.adopt(lease).await?;
    /// assert!(adopted.release().await?);
    /// # Ok(()) }
    /// ```
    pub async fn adopt(&self, lease: crate::Lease) -> Result<LockGuard> {
        let i = &self.inner;
        if i.capabilities.kind == crate::LockKind::Session {
            return Err(Error::invalid(
                "lease",
                "session locks live on their holder's connection and cannot be handed over",
            ));
        }
        if let Some(ttl) = lease.ttl {
            validate_lease_duration("lease.ttl", ttl)?;
        } else if lease.expires_at.is_some() {
            return Err(Error::invalid(
                "lease",
                "a lease with an expiry but without a duration cannot be adopted",
            ));
        }
        let sent_at = Instant::now();
        let (op, outcome) = if lease.ttl.is_some() {
            (Operation::Refresh, i.backend.refresh(&lease).await)
        } else {
            // A lock without expiry: nothing to extend, only ownership to check.
            let verified = i.backend.verify(&lease).await.and_then(|held| {
                if held {
                    Ok(lease.clone())
                } else {
                    Err(Error::lost(
                        &lease.key,
                        "the lock is no longer held by this lease",
                    ))
                }
            });
            (Operation::Verify, verified)
        };
        let fresh = match outcome {
            Ok(fresh) => fresh,
            Err(error) => {
                i.hooks
                    .call("error", |h| h.error(op, Some(&lease.key), &error))
                    .await;
                return Err(error);
            }
        };
        tracing::info!(key = %fresh.key, token = %fresh.token, owner = %fresh.owner, "lease adopted");
        i.hooks.call("acquired", |h| h.acquired(&fresh)).await;
        Ok(self.guard(fresh, sent_at))
    }

    /// Phase two of a two-phase acquisition.
    async fn verify_fresh(&self, lease: &crate::Lease) -> Result<()> {
        let i = &self.inner;
        let verified = match i.backend.verify(lease).await {
            Ok(verified) => verified,
            Err(error) => {
                i.hooks
                    .call("error", |h| {
                        h.error(Operation::Verify, Some(&lease.key), &error)
                    })
                    .await;
                let _ = i.backend.release(lease).await;
                return Err(error);
            }
        };
        if verified {
            return Ok(());
        }
        tracing::error!(key = %lease.key, token = %lease.token, "ownership verification after acquire failed");
        i.hooks
            .call("verification_failed", |h| h.verification_failed(lease))
            .await;
        Err(Error::lost(
            &lease.key,
            "ownership verification right after acquiring failed",
        ))
    }

    /// Runs `work` under the lock on `key`: acquires (waiting as configured), runs, and always
    /// releases, also when the work fails or panics (the panic then continues after the release).
    ///
    /// The work receives a [`LockContext`] with the fencing token, a lost-lease signal and
    /// [`LockContext::ensure_held`]. If the lease is lost while the work runs, the work is told
    /// through that signal, and this call returns [`Error::Lost`] once the work has returned
    /// (its output is discarded: it ran without the lock for a while). Returns `Ok(None)` only
    /// when the lock stayed held and [`OnUnavailable::ReturnNone`] is configured.
    ///
    /// ```
    /// use leaselock::{Locker, MemoryBackend};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> leaselock::Result<()> {
    /// let locker = Locker::builder(MemoryBackend::new()).build()?;
    /// let applied = locker
    ///     .run("schema-migrations", |lock| async move {
    ///         tokio::select! {
    ///             reason = lock.lost().wait() => Err(reason),
    ///             n = async { /* apply migrations */ 3 } => Ok(n),
    ///         }
    ///     })
    ///     .await?;
    /// assert_eq!(applied, Some(Ok(3)));
    /// # Ok(()) }
    /// ```
    pub async fn run<F, Fut, T>(&self, key: impl AsRef<str>, work: F) -> Result<Option<T>>
    where
        F: FnOnce(LockContext) -> Fut,
        Fut: Future<Output = T>,
    {
        let Some(guard) = self.acquire(key).await? else {
            return Ok(None);
        };
        let ctx = guard.context();
        let outcome = catch_panic(work(ctx.clone())).await;
        let lost = ctx.lost().reason();
        let released = guard.release().await;
        match outcome {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(_) if lost.is_some() => Err(Error::lost(ctx.key(), lost.unwrap_or_default())),
            Ok(value) => {
                if let Err(error) = released {
                    tracing::warn!(key = %ctx.key(), %error, "the work finished but its lock could not be released; it will expire");
                }
                Ok(Some(value))
            }
        }
    }

    /// Runs `work` under the lock on `key` only if `check` says there is work to do, taking the
    /// lock only when there may be (the run-if-needed pattern of migration runners: when nothing
    /// is pending, the lock is not acquired).
    ///
    /// 1. `check` runs without the lock. `Ok(false)`: returns [`RunIfNeeded::NotNeeded`] at once,
    ///    without acquiring.
    /// 2. Otherwise acquires `key`, waiting as configured (when the lock stays held:
    ///    [`Error::Held`], or [`RunIfNeeded::Unavailable`] with [`OnUnavailable::ReturnNone`]).
    /// 3. `check` runs again under the lock, since another instance may have done the work while
    ///    this one waited. `Ok(false)`: releases and returns [`RunIfNeeded::NotNeededOnceLocked`].
    /// 4. `work` runs with the [`LockContext`] (fencing token, lost signal, `ensure_held`), and
    ///    the lock is released: [`RunIfNeeded::Ran`] with its output.
    ///
    /// `check` and `work` fail with the caller's own error type `E`; leaselock's errors reach the
    /// caller converted with `E: From<`[`Error`]`>` (true of `anyhow::Error`, [`crate::BoxError`]
    /// and any error enum with a `#[from] leaselock::Error` variant). As with [`Locker::run`], the
    /// lock is always released, also when the check or the work fails or panics, and a lease lost
    /// while the work ran makes the call fail with [`Error::Lost`] (the work's result is then
    /// discarded, with a warning in the log if it was an error). A disabled locker checks and
    /// runs without a lock.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// use leaselock::{Locker, MemoryBackend, RunIfNeeded};
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> leaselock::Result<()> {
    /// let locker = Locker::builder(MemoryBackend::new()).build()?;
    /// let applied = &AtomicU32::new(0); // stands for the database's migration table
    /// let pending = move || async move { Ok::<_, leaselock::Error>(applied.load(Ordering::SeqCst) < 3) };
    ///
    /// let first = locker
    ///     .run_if_needed("schema-migrations", pending, |lock| async move {
    ///         lock.ensure_held().await?;
    ///         applied.store(3, Ordering::SeqCst); // apply them, passing lock.token() along
    ///         Ok(lock.token())
    ///     })
    ///     .await?;
    /// assert!(matches!(first, RunIfNeeded::Ran(_)));
    ///
    /// // Nothing pending any more: returns at once, without taking the lock.
    /// let second = locker
    ///     .run_if_needed("schema-migrations", pending, |_| async { Ok(0) })
    ///     .await?;
    /// assert_eq!(second, RunIfNeeded::NotNeeded);
    /// assert!(!second.took_lock());
    /// # Ok(()) }
    /// ```
    pub async fn run_if_needed<C, CFut, F, Fut, T, E>(
        &self,
        key: impl AsRef<str>,
        mut check: C,
        work: F,
    ) -> Result<RunIfNeeded<T>, E>
    where
        C: FnMut() -> CFut,
        CFut: Future<Output = Result<bool, E>>,
        F: FnOnce(LockContext) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<Error>,
    {
        let key = LockKey::new(key.as_ref())?;
        if !check().await? {
            tracing::debug!(%key, "nothing to do; the lock was not taken");
            return Ok(RunIfNeeded::NotNeeded);
        }
        let Some(guard) = self.acquire(key.as_str()).await? else {
            return Ok(RunIfNeeded::Unavailable);
        };
        let ctx = guard.context();
        let outcome = catch_panic(async {
            if !check().await? {
                return Ok(None);
            }
            work(ctx.clone()).await.map(Some)
        })
        .await;
        let lost = ctx.lost().reason();
        let released = guard.release().await;
        let outcome = match outcome {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(outcome) => outcome,
        };
        if let Err(error) = &released {
            tracing::warn!(%key, %error, "the lock could not be released; it will expire");
        }
        match outcome {
            Ok(None) => {
                tracing::debug!(%key, "nothing to do once the lock was held; released");
                Ok(RunIfNeeded::NotNeededOnceLocked)
            }
            outcome if lost.is_some() => {
                if outcome.is_err() {
                    tracing::warn!(%key, "the work failed after its lease was lost; reporting the loss");
                }
                Err(Error::lost(&key, lost.unwrap_or_default()).into())
            }
            Ok(Some(value)) => Ok(RunIfNeeded::Ran(value)),
            Err(error) => Err(error),
        }
    }

    /// The state of `key`.
    pub async fn status(&self, key: impl AsRef<str>) -> Result<LockState> {
        let key = LockKey::new(key.as_ref())?;
        let outcome = self.inner.backend.status(&key).await;
        self.report(Operation::Status, Some(&key), outcome).await
    }

    /// Every lock held now.
    pub async fn list(&self) -> Result<Vec<LockInfo>> {
        let outcome = self.inner.backend.list().await;
        self.report(Operation::List, None, outcome).await
    }

    /// Every lock held now and every expired lease not yet taken over or cleared, in key order
    /// (see [`LockBackend::list_with_expired`]).
    pub async fn list_with_expired(&self) -> Result<Vec<LockState>> {
        let outcome = self.inner.backend.list_with_expired().await;
        self.report(Operation::List, None, outcome).await
    }

    /// Breaks the lock on `key` whoever holds it (for operators: a crashed holder's lock that
    /// will not expire soon). Returns the holder removed, if any.
    pub async fn force_release(&self, key: impl AsRef<str>) -> Result<Option<LockInfo>> {
        let key = LockKey::new(key.as_ref())?;
        let outcome = self.inner.backend.force_release(&key).await;
        let removed = self
            .report(Operation::ForceRelease, Some(&key), outcome)
            .await?;
        tracing::warn!(%key, previous = ?removed.as_ref().map(|h| h.owner.as_str()), "lock force-released");
        self.inner
            .hooks
            .call("force_released", |h| {
                h.force_released(&key, removed.as_ref())
            })
            .await;
        Ok(removed)
    }

    /// Releases every expired lease; returns how many.
    pub async fn release_expired(&self) -> Result<u64> {
        let outcome = self.inner.backend.release_expired().await;
        self.report(Operation::ReleaseExpired, None, outcome).await
    }

    async fn report<T>(
        &self,
        op: Operation,
        key: Option<&LockKey>,
        outcome: Result<T>,
    ) -> Result<T> {
        if let Err(error) = &outcome {
            self.inner
                .hooks
                .call("error", |h| h.error(op, key, error))
                .await;
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::{Lease, MemoryBackend};

    /// A memory backend whose first releases fail with a transient error, and that (like most
    /// lease backends) does not report lost leases on its own.
    #[derive(Debug)]
    struct FlakyRelease {
        inner: MemoryBackend,
        failures_left: AtomicU32,
        /// While set, verify fails with a transient error (the database is unreachable).
        unreachable: std::sync::atomic::AtomicBool,
        /// Errors the next acquisition attempts fail with, the last first.
        acquire_errors: std::sync::Mutex<Vec<Error>>,
    }

    #[async_trait::async_trait]
    impl LockBackend for FlakyRelease {
        fn capabilities(&self) -> Capabilities {
            self.inner.capabilities()
        }
        async fn init_storage(&self) -> Result<()> {
            self.inner.init_storage().await
        }
        async fn check_storage(&self) -> Result<()> {
            self.inner.check_storage().await
        }
        async fn try_acquire(&self, request: &AcquireRequest) -> Result<AcquireOutcome> {
            if let Some(error) = self.acquire_errors.lock().unwrap().pop() {
                return Err(error);
            }
            self.inner.try_acquire(request).await
        }
        async fn refresh(&self, lease: &Lease) -> Result<Lease> {
            self.inner.refresh(lease).await
        }
        async fn verify(&self, lease: &Lease) -> Result<bool> {
            if self.unreachable.load(Ordering::SeqCst) {
                let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "down");
                return Err(Error::transient("flaky", refused));
            }
            self.inner.verify(lease).await
        }
        async fn release(&self, lease: &Lease) -> Result<bool> {
            let left = self.failures_left.load(Ordering::SeqCst);
            if left > 0 {
                self.failures_left.store(left - 1, Ordering::SeqCst);
                let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
                return Err(Error::transient("flaky", reset));
            }
            self.inner.release(lease).await
        }
        async fn status(&self, key: &LockKey) -> Result<LockState> {
            self.inner.status(key).await
        }
        async fn list(&self) -> Result<Vec<LockInfo>> {
            self.inner.list().await
        }
        async fn force_release(&self, key: &LockKey) -> Result<Option<LockInfo>> {
            self.inner.force_release(key).await
        }
        async fn release_expired(&self) -> Result<u64> {
            self.inner.release_expired().await
        }
        async fn watch_release(&self, key: &LockKey) -> Result<Option<crate::Wakeup>> {
            self.inner.watch_release(key).await
        }
        fn watch_lost(&self, _lease: &Lease) -> Option<crate::Wakeup> {
            None
        }
    }

    fn flaky(failures: u32) -> (MemoryBackend, FlakyRelease) {
        let inner = MemoryBackend::new();
        let backend = FlakyRelease {
            inner: inner.clone(),
            failures_left: AtomicU32::new(failures),
            unreachable: Default::default(),
            acquire_errors: Default::default(),
        };
        (inner, backend)
    }

    /// Under a wait policy, storage that cannot be reached is tried again; refused credentials
    /// end the acquisition at once, at the first attempt.
    #[tokio::test]
    async fn a_wait_retries_unreachable_storage_but_not_refused_credentials() {
        let patient = WaitPolicy::until(Duration::from_secs(60), Duration::from_millis(5));
        let (_, backend) = flaky(0);
        let backend = Arc::new(backend);
        *backend.acquire_errors.lock().unwrap() = (0..3)
            .map(|_| Error::not_accessible("flaky", "connection refused", None))
            .collect();
        let locker = Locker::builder(Arc::clone(&backend))
            .wait(patient.clone())
            .build()
            .unwrap();
        let guard = locker.acquire("k").await.unwrap().expect("acquired");
        assert!(backend.acquire_errors.lock().unwrap().is_empty());
        assert!(guard.release().await.unwrap());

        *backend.acquire_errors.lock().unwrap() = (0..3)
            .map(|_| Error::denied("flaky", "password authentication failed", None))
            .collect();
        let err = locker.acquire("k").await.unwrap_err();
        assert!(matches!(err, Error::Denied { .. }), "{err:?}");
        assert_eq!(
            backend.acquire_errors.lock().unwrap().len(),
            2,
            "one attempt only"
        );
    }

    #[tokio::test]
    async fn release_retries_transient_errors() {
        let (store, backend) = flaky(3);
        let locker = Locker::builder(backend).build().unwrap();
        let guard = locker.acquire("k").await.unwrap().unwrap();
        assert!(
            guard.release().await.unwrap(),
            "released after three transient failures"
        );
        assert_eq!(
            store.status(&LockKey::new("k").unwrap()).await.unwrap(),
            LockState::Free
        );
    }

    #[tokio::test]
    async fn release_gives_up_after_its_timeout() {
        let (store, backend) = flaky(u32::MAX);
        let locker = Locker::builder(backend)
            .release_timeout(Duration::from_millis(200))
            .build()
            .unwrap();
        let guard = locker.acquire("k").await.unwrap().unwrap();
        let err = guard.release().await.unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(store
            .status(&LockKey::new("k").unwrap())
            .await
            .unwrap()
            .is_held());
    }

    /// A session-lock backend whose connection hangs (a partition): refreshes and checks never
    /// answer. [`HangingSession::releases`] hangs releases instead, and answers the rest.
    #[derive(Debug)]
    struct HangingSession {
        store: MemoryBackend,
        hang_release: bool,
    }

    impl HangingSession {
        fn checks() -> Self {
            Self {
                store: MemoryBackend::new(),
                hang_release: false,
            }
        }

        fn releases() -> Self {
            Self {
                store: MemoryBackend::new(),
                hang_release: true,
            }
        }
    }

    #[async_trait::async_trait]
    impl LockBackend for HangingSession {
        fn capabilities(&self) -> Capabilities {
            Capabilities::new(
                "hanging",
                crate::LockKind::Session,
                crate::ExpiryClock::None,
            )
        }
        async fn init_storage(&self) -> Result<()> {
            Ok(())
        }
        async fn check_storage(&self) -> Result<()> {
            Ok(())
        }
        async fn try_acquire(&self, request: &AcquireRequest) -> Result<AcquireOutcome> {
            Ok(match self.store.try_acquire(request).await? {
                AcquireOutcome::Acquired(lease) => AcquireOutcome::Acquired(Lease::new(
                    lease.key,
                    lease.owner,
                    lease.token,
                    lease.acquired_at,
                )),
                held => held,
            })
        }
        async fn refresh(&self, lease: &Lease) -> Result<Lease> {
            if !self.hang_release {
                std::future::pending::<()>().await;
            }
            Ok(lease.clone())
        }
        async fn verify(&self, _lease: &Lease) -> Result<bool> {
            if !self.hang_release {
                std::future::pending::<()>().await;
            }
            Ok(true)
        }
        async fn release(&self, _lease: &Lease) -> Result<bool> {
            if self.hang_release {
                std::future::pending::<()>().await;
            }
            Ok(false)
        }
        async fn status(&self, key: &LockKey) -> Result<LockState> {
            self.store.status(key).await
        }
        async fn list(&self) -> Result<Vec<LockInfo>> {
            self.store.list().await
        }
        async fn force_release(&self, key: &LockKey) -> Result<Option<LockInfo>> {
            self.store.force_release(key).await
        }
        async fn release_expired(&self) -> Result<u64> {
            Ok(0)
        }
        async fn watch_release(&self, _key: &LockKey) -> Result<Option<crate::Wakeup>> {
            Ok(None)
        }
        fn watch_lost(&self, _lease: &Lease) -> Option<crate::Wakeup> {
            None
        }
    }

    #[tokio::test]
    async fn a_hanging_session_is_lost_after_one_lease_duration() {
        let locker = Locker::builder(HangingSession::checks())
            .lease_duration(Duration::from_millis(300))
            .build()
            .unwrap();
        let guard = locker.acquire("k").await.unwrap().unwrap();
        let reason = tokio::time::timeout(Duration::from_secs(20), guard.lost().wait())
            .await
            .expect("a session that cannot be checked must count as lost");
        assert!(reason.contains("lease duration"), "{reason}");
    }

    #[tokio::test]
    async fn a_release_that_gets_no_answer_ends_at_the_release_timeout() {
        let locker = Locker::builder(HangingSession::releases())
            .release_timeout(Duration::from_millis(200))
            .build()
            .unwrap();
        let guard = locker.acquire("k").await.unwrap().unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(20), guard.release())
            .await
            .expect("a release must not outlast its release timeout");
        let err = outcome.unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(err.to_string().contains("no answer"), "{err}");
    }

    #[tokio::test]
    async fn a_check_on_a_hanging_backend_ends_at_the_deadline() {
        let locker = Locker::builder(HangingSession::checks())
            .lease_duration(Duration::from_millis(300))
            .build()
            .unwrap();
        let guard = locker.acquire("k").await.unwrap().unwrap();
        // The backend never answers: the check must end by the guard's own deadline, not hang.
        let outcome = tokio::time::timeout(Duration::from_secs(20), guard.ensure_held())
            .await
            .expect("ensure_held must not outlast the lease when the backend cannot answer");
        let err = outcome.unwrap_err();
        assert!(matches!(err, Error::Lost { .. }), "{err}");
        assert!(guard.is_lost(), "the lost signal fired too");
    }

    #[tokio::test]
    async fn an_unrefreshed_session_is_not_bounded() {
        let locker = Locker::builder(HangingSession::checks())
            .lease_duration(Duration::from_millis(100))
            .refresh(false)
            .build()
            .unwrap();
        let guard = locker.acquire("k").await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            !guard.is_lost(),
            "without liveness checks a session lock lives with its session"
        );
    }

    #[tokio::test]
    async fn disabled_locker_runs_without_a_lock() {
        let store = MemoryBackend::new();
        let locker = Locker::builder(store.clone())
            .enabled(false)
            .build()
            .unwrap();
        let out = locker
            .run(
                "k",
                |lock| async move { (lock.is_locked(), lock.token().get()) },
            )
            .await
            .unwrap();
        assert_eq!(out, Some((false, 0)));
        assert!(
            store.list().await.unwrap().is_empty(),
            "nothing was written"
        );
    }

    /// Counts acquisition attempts, to tell whether a call took the lock.
    #[derive(Default)]
    struct CountAcquires(AtomicU32);

    #[async_trait::async_trait]
    impl LockHooks for CountAcquires {
        async fn before_acquire(&self, _key: &LockKey, _owner: &OwnerId) -> crate::HookResult {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// Counts lost-lease reports.
    #[derive(Default)]
    struct CountLost(AtomicU32);

    #[async_trait::async_trait]
    impl LockHooks for CountLost {
        async fn lease_lost(&self, _lease: &Lease, _reason: &str) -> crate::HookResult {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// A refresh daemon running on another worker thread while its guard releases must not
    /// report the lease lost because of that release: a refresh that lands just after the
    /// release finds the lease gone. Refreshing every millisecond, each taking 200 µs of its
    /// thread, the daemons (which start at the first refresh) are often mid-refresh on the other
    /// worker at the moment of a release.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_released_lease_is_never_reported_lost() {
        let hooks = Arc::new(CountLost::default());
        let backend = Arc::new(CountingBatches::default());
        backend.busy_refresh.store(true, Ordering::SeqCst);
        let locker = Locker::builder(Arc::clone(&backend))
            .shared_hooks(hooks.clone())
            .lease_duration(Duration::from_secs(5))
            .refresh_interval(Duration::from_millis(1))
            .refresh_batch_window(Duration::ZERO)
            .build()
            .unwrap();
        for _ in 0..300 {
            let guard = locker.acquire("k").await.unwrap().unwrap();
            let lost = guard.lost().clone();
            tokio::time::sleep(Duration::from_millis(2)).await;
            assert!(guard.release().await.unwrap());
            assert!(!lost.is_lost(), "a normal release fired the lost signal");
        }
        assert!(locker.guardian().started() > 0, "no daemon ever ran");
        assert_eq!(
            hooks.0.load(Ordering::SeqCst),
            0,
            "lease_lost after release"
        );
    }

    fn counted(store: &MemoryBackend) -> (Locker, Arc<CountAcquires>) {
        let hooks = Arc::new(CountAcquires::default());
        let locker = Locker::builder(store.clone())
            .shared_hooks(hooks.clone())
            .build()
            .unwrap();
        (locker, hooks)
    }

    /// The next token handed out for `key`: 1 + the number of acquisitions so far.
    async fn next_token(store: &MemoryBackend, key: &str) -> u64 {
        let req = AcquireRequest::new(
            LockKey::new(key).unwrap(),
            OwnerId::new("probe").unwrap(),
            Duration::from_secs(5),
        )
        .unwrap();
        let AcquireOutcome::Acquired(lease) = store.try_acquire(&req).await.unwrap() else {
            panic!("{key} should be free");
        };
        assert!(store.release(&lease).await.unwrap());
        lease.token.get()
    }

    #[derive(Debug)]
    enum AppError {
        Lock(Error),
        Check(&'static str),
    }

    impl From<Error> for AppError {
        fn from(error: Error) -> Self {
            AppError::Lock(error)
        }
    }

    #[tokio::test]
    async fn run_if_needed_without_work_does_not_lock() {
        let store = MemoryBackend::new();
        let (locker, hooks) = counted(&store);
        let out = locker
            .run_if_needed(
                "k",
                || async { Ok::<_, Error>(false) },
                |_| async { panic!("must not run") },
            )
            .await
            .unwrap();
        let out: RunIfNeeded<()> = out;
        assert_eq!(out, RunIfNeeded::NotNeeded);
        assert!(!out.took_lock());
        assert_eq!(hooks.0.load(Ordering::SeqCst), 0, "no acquisition attempt");
        assert_eq!(
            next_token(&store, "k").await,
            1,
            "nothing was ever acquired"
        );
    }

    #[tokio::test]
    async fn run_if_needed_runs_pending_work_under_the_lock() {
        let store = MemoryBackend::new();
        let (locker, hooks) = counted(&store);
        let checks = &AtomicU32::new(0);
        let out = locker
            .run_if_needed(
                "k",
                move || async move {
                    checks.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Error>(true)
                },
                |lock| async move {
                    lock.ensure_held().await?;
                    Ok(lock.token().get())
                },
            )
            .await
            .unwrap();
        assert_eq!(out, RunIfNeeded::Ran(1));
        assert_eq!(
            checks.load(Ordering::SeqCst),
            2,
            "once before, once under the lock"
        );
        assert_eq!(hooks.0.load(Ordering::SeqCst), 1);
        assert_eq!(
            store.status(&LockKey::new("k").unwrap()).await.unwrap(),
            LockState::Free,
            "released"
        );
    }

    #[tokio::test]
    async fn run_if_needed_rechecks_under_the_lock() {
        let store = MemoryBackend::new();
        let (locker, hooks) = counted(&store);
        // Pending at first; done by "someone else" by the time the lock is held.
        let checks = &AtomicU32::new(0);
        let out: RunIfNeeded<()> = locker
            .run_if_needed(
                "k",
                move || async move { Ok::<_, Error>(checks.fetch_add(1, Ordering::SeqCst) == 0) },
                |_| async { panic!("must not run") },
            )
            .await
            .unwrap();
        assert_eq!(out, RunIfNeeded::NotNeededOnceLocked);
        assert!(out.took_lock());
        assert_eq!(hooks.0.load(Ordering::SeqCst), 1);
        assert_eq!(
            next_token(&store, "k").await,
            2,
            "acquired once, then released"
        );
    }

    #[tokio::test]
    async fn run_if_needed_reports_check_and_work_errors_with_the_callers_type() {
        let store = MemoryBackend::new();
        let (locker, hooks) = counted(&store);
        let err = locker
            .run_if_needed(
                "k",
                || async { Err::<bool, _>(AppError::Check("no database")) },
                |_| async { Ok::<(), AppError>(()) },
            )
            .await
            .unwrap_err();
        assert!(matches!(err, AppError::Check("no database")), "{err:?}");
        assert_eq!(hooks.0.load(Ordering::SeqCst), 0, "no lock taken");

        // Failing under the lock: released all the same.
        let checks = &AtomicU32::new(0);
        let err = locker
            .run_if_needed(
                "k",
                move || async move {
                    match checks.fetch_add(1, Ordering::SeqCst) {
                        0 => Ok(true),
                        _ => Err(AppError::Check("second check")),
                    }
                },
                |_| async { Ok::<(), AppError>(()) },
            )
            .await
            .unwrap_err();
        assert!(matches!(err, AppError::Check("second check")), "{err:?}");
        let err = locker
            .run_if_needed(
                "k",
                || async { Ok(true) },
                |_| async { Err::<(), _>(AppError::Check("work")) },
            )
            .await
            .unwrap_err();
        assert!(matches!(err, AppError::Check("work")), "{err:?}");
        assert_eq!(
            next_token(&store, "k").await,
            3,
            "two acquisitions, both released"
        );

        // leaselock's own errors arrive converted.
        let err = locker
            .run_if_needed(
                "",
                || async { Ok(true) },
                |_| async { Ok::<(), AppError>(()) },
            )
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                AppError::Lock(Error::InvalidInput { field: "key", .. })
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn run_if_needed_when_the_lock_stays_held() {
        let store = MemoryBackend::new();
        let holder = Locker::builder(store.clone()).build().unwrap();
        let guard = holder.acquire("k").await.unwrap().unwrap();
        let strict = Locker::builder(store.clone()).build().unwrap();
        let err = strict
            .run_if_needed(
                "k",
                || async { Ok(true) },
                |_| async { Ok::<(), Error>(()) },
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Held { .. }), "{err}");
        let lenient = Locker::builder(store.clone())
            .on_unavailable(OnUnavailable::ReturnNone)
            .build()
            .unwrap();
        let out = lenient
            .run_if_needed(
                "k",
                || async { Ok(true) },
                |_| async { Ok::<(), Error>(()) },
            )
            .await
            .unwrap();
        assert_eq!(out, RunIfNeeded::Unavailable);
        assert!(!out.took_lock());
        assert!(guard.release().await.unwrap());
    }

    #[tokio::test]
    async fn run_if_needed_releases_on_panic_and_reports_a_lost_lease() {
        let store = MemoryBackend::new();
        let locker = Locker::builder(store.clone()).build().unwrap();
        let panicked = tokio::spawn({
            let locker = locker.clone();
            async move {
                locker
                    .run_if_needed(
                        "k",
                        || async { Ok(true) },
                        |_| async { panic!("work panicked") },
                    )
                    .await
                    .map(|_: RunIfNeeded<()>| ())
                    .map_err(|e: Error| e.to_string())
            }
        })
        .await;
        assert!(panicked.unwrap_err().is_panic());
        assert_eq!(next_token(&store, "k").await, 2, "released after the panic");

        let breaker = store.clone();
        let err = locker
            .run_if_needed(
                "k",
                || async { Ok(true) },
                |lock| async move {
                    breaker.force_release(lock.key()).await?;
                    let _ = lock.ensure_held().await;
                    Ok::<_, Error>(())
                },
            )
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Lost { .. }), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn run_if_needed_runs_once_among_many() {
        let store = MemoryBackend::new();
        let applied = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let locker = Locker::builder(store.clone())
                .wait(WaitPolicy::until(
                    Duration::from_secs(30),
                    Duration::from_millis(5),
                ))
                .build()
                .unwrap();
            let applied = Arc::clone(&applied);
            tasks.push(tokio::spawn(async move {
                let check = {
                    let applied = Arc::clone(&applied);
                    move || {
                        let applied = Arc::clone(&applied);
                        async move { Ok::<_, Error>(applied.load(Ordering::SeqCst) == 0) }
                    }
                };
                locker
                    .run_if_needed("k", check, |_| async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        applied.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    })
                    .await
                    .unwrap()
            }));
        }
        let mut ran = 0;
        for task in tasks {
            if let RunIfNeeded::Ran(()) = task.await.unwrap() {
                ran += 1;
            }
        }
        assert_eq!(ran, 1);
        assert_eq!(applied.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn locks_without_expiry_outlive_their_lease_duration() {
        let store = MemoryBackend::new();
        let locker = Locker::builder(store.clone())
            .lease_duration(Duration::from_millis(50))
            .expires(false)
            .build()
            .unwrap();
        assert!(!locker.expires());
        let guard = locker.acquire("k").await.unwrap().unwrap();
        let lease = guard.lease().unwrap();
        assert_eq!((lease.expires_at, lease.ttl), (None, None));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!guard.is_lost(), "{:?}", guard.lost().reason());
        guard.ensure_held().await.unwrap();
        let key = LockKey::new("k").unwrap();
        let LockState::Held(info) = store.status(&key).await.unwrap() else {
            panic!("held");
        };
        assert_eq!((info.expires_at, info.remaining), (None, None));
        assert_eq!(store.release_expired().await.unwrap(), 0);
        assert_eq!(store.list().await.unwrap().len(), 1);
        let other = Locker::builder(store.clone()).build().unwrap();
        assert!(matches!(other.acquire("k").await, Err(Error::Held { .. })));
        // Only a force release frees it, and the holder learns of it.
        assert!(store.force_release(&key).await.unwrap().is_some());
        tokio::time::timeout(Duration::from_secs(5), guard.lost().wait())
            .await
            .expect("the lost signal fires after a force release");
        assert!(!guard.release().await.unwrap());
    }

    #[tokio::test]
    async fn lock_without_expiry_lost_without_notifications_is_found_by_verifying() {
        // No lost notifications from this backend: the daemon's periodic verify must notice.
        let (store, backend) = flaky(0);
        let locker = Locker::builder(backend)
            .lease_duration(Duration::from_millis(60))
            .expires(false)
            .build()
            .unwrap();
        let guard = locker.acquire("k").await.unwrap().unwrap();
        assert!(store
            .force_release(&LockKey::new("k").unwrap())
            .await
            .unwrap()
            .is_some());
        tokio::time::timeout(Duration::from_secs(5), guard.lost().wait())
            .await
            .expect("the lost signal fires");
    }

    #[tokio::test]
    async fn locks_without_expiry_can_be_handed_over() {
        let store = MemoryBackend::new();
        let first = Locker::builder(store.clone())
            .expires(false)
            .build()
            .unwrap();
        let second = Locker::builder(store.clone())
            .expires(false)
            .build()
            .unwrap();
        let lease = first
            .acquire("k")
            .await
            .unwrap()
            .unwrap()
            .hand_over()
            .unwrap();
        let adopted = second.adopt(lease.clone()).await.unwrap();
        assert_eq!(adopted.token(), lease.token);
        adopted.ensure_held().await.unwrap();
        assert!(adopted.release().await.unwrap());
        assert!(matches!(second.adopt(lease).await, Err(Error::Lost { .. })));
    }

    #[tokio::test]
    async fn lock_without_expiry_survives_an_unreachable_backend() {
        // It cannot lapse in the database, so being cut off from it is no reason to give it up.
        let (store, backend) = flaky(0);
        let backend = Arc::new(backend);
        let locker = Locker::builder(Arc::clone(&backend))
            .lease_duration(Duration::from_millis(60))
            .expires(false)
            .build()
            .unwrap();
        let guard = locker.acquire("k").await.unwrap().unwrap();
        backend.unreachable.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!guard.is_lost(), "{:?}", guard.lost().reason());
        backend.unreachable.store(false, Ordering::SeqCst);
        guard.ensure_held().await.unwrap();
        assert!(guard.release().await.unwrap());
        assert_eq!(
            store.status(&LockKey::new("k").unwrap()).await.unwrap(),
            LockState::Free
        );
    }

    /// A memory store that batches at most 8 leases a call, and records every refresh call.
    #[derive(Debug, Default)]
    struct CountingBatches {
        store: MemoryBackend,
        /// The size of every `refresh_many` call.
        batches: std::sync::Mutex<Vec<usize>>,
        /// How many single `refresh` calls came.
        singles: AtomicU32,
        /// A single `refresh` first keeps its thread busy for 200 µs, as a slow client would.
        busy_refresh: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl LockBackend for CountingBatches {
        fn capabilities(&self) -> Capabilities {
            let mut caps = self.store.capabilities();
            caps.max_refresh_batch = 8;
            caps
        }
        async fn init_storage(&self) -> Result<()> {
            self.store.init_storage().await
        }
        async fn check_storage(&self) -> Result<()> {
            self.store.check_storage().await
        }
        async fn try_acquire(&self, request: &AcquireRequest) -> Result<AcquireOutcome> {
            self.store.try_acquire(request).await
        }
        async fn refresh(&self, lease: &Lease) -> Result<Lease> {
            self.singles.fetch_add(1, Ordering::SeqCst);
            if self.busy_refresh.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_micros(200));
            }
            self.store.refresh(lease).await
        }
        async fn refresh_many(&self, leases: &[Lease]) -> Vec<Result<Lease>> {
            self.batches.lock().unwrap().push(leases.len());
            self.store.refresh_many(leases).await
        }
        async fn verify(&self, lease: &Lease) -> Result<bool> {
            self.store.verify(lease).await
        }
        async fn release(&self, lease: &Lease) -> Result<bool> {
            self.store.release(lease).await
        }
        async fn status(&self, key: &LockKey) -> Result<LockState> {
            self.store.status(key).await
        }
        async fn list(&self) -> Result<Vec<LockInfo>> {
            self.store.list().await
        }
        async fn force_release(&self, key: &LockKey) -> Result<Option<LockInfo>> {
            self.store.force_release(key).await
        }
        async fn release_expired(&self) -> Result<u64> {
            self.store.release_expired().await
        }
        async fn watch_release(&self, key: &LockKey) -> Result<Option<crate::Wakeup>> {
            self.store.watch_release(key).await
        }
        fn watch_lost(&self, _lease: &Lease) -> Option<crate::Wakeup> {
            // Like most lease backends: a loss is found by the next refresh, in its batch.
            None
        }
    }

    fn batching_locker(backend: &Arc<CountingBatches>, window: Duration) -> Locker {
        Locker::builder(Arc::clone(backend))
            .lease_duration(Duration::from_secs(3))
            .refresh_interval(Duration::from_secs(1))
            .refresh_batch_window(window)
            .build()
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leases_due_together_are_refreshed_in_batches() {
        let backend = Arc::new(CountingBatches::default());
        let locker = batching_locker(&backend, Duration::from_millis(300));
        let mut guards = Vec::new();
        for n in 0..20 {
            guards.push(locker.acquire(format!("k{n}")).await.unwrap().unwrap());
        }
        // Past the first lease duration: only refreshes kept them.
        tokio::time::sleep(Duration::from_millis(3500)).await;
        for guard in &guards {
            assert!(!guard.is_lost(), "{:?}", guard.lost().reason());
            let lease = guard.lease().unwrap();
            assert!(backend.store.verify(&lease).await.unwrap());
        }
        let batches = backend.batches.lock().unwrap().clone();
        assert_eq!(backend.singles.load(Ordering::SeqCst), 0, "{batches:?}");
        assert!(batches.iter().all(|&n| (1..=8).contains(&n)), "{batches:?}");
        assert!(batches.iter().any(|&n| n > 1), "never batched: {batches:?}");
        assert!(
            batches.iter().sum::<usize>() >= 40,
            "two refreshes per lease at least: {batches:?}"
        );
        for guard in guards {
            assert!(guard.release().await.unwrap());
        }
        assert!(backend.store.list().await.unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lease_lost_in_a_batch_is_told_alone() {
        let backend = Arc::new(CountingBatches::default());
        let locker = batching_locker(&backend, Duration::from_millis(300));
        let mut guards = Vec::new();
        for n in 0..3 {
            guards.push(locker.acquire(format!("k{n}")).await.unwrap().unwrap());
        }
        let broken = LockKey::new("k1").unwrap();
        assert!(backend
            .store
            .force_release(&broken)
            .await
            .unwrap()
            .is_some());
        let reason = tokio::time::timeout(Duration::from_secs(10), guards[1].lost().wait())
            .await
            .expect("the batched refresh reports the broken lease");
        assert!(reason.contains("released"), "{reason}");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!guards[0].is_lost() && !guards[2].is_lost());
        assert!(backend.batches.lock().unwrap().iter().any(|&n| n > 1));
        let mut guards = guards.into_iter();
        assert!(guards.next().unwrap().release().await.unwrap());
        assert!(!guards.next().unwrap().release().await.unwrap());
        assert!(guards.next().unwrap().release().await.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_zero_batch_window_refreshes_each_lease_alone() {
        let backend = Arc::new(CountingBatches::default());
        let locker = Locker::builder(Arc::clone(&backend))
            .lease_duration(Duration::from_millis(600))
            .refresh_batch_window(Duration::ZERO)
            .build()
            .unwrap();
        let guards = [
            locker.acquire("a").await.unwrap().unwrap(),
            locker.acquire("b").await.unwrap().unwrap(),
        ];
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(backend.singles.load(Ordering::SeqCst) >= 2);
        assert!(backend.batches.lock().unwrap().is_empty());
        for guard in guards {
            assert!(guard.release().await.unwrap());
        }
    }

    #[test]
    fn the_default_batch_window_is_a_twentieth_of_the_refresh_interval() {
        let window = |locker: Locker| Some(locker.refresh_batch_window()).filter(|w| !w.is_zero());
        let batching = || Arc::new(CountingBatches::default());
        let locker = Locker::builder(batching()).build().unwrap();
        assert_eq!(window(locker), Some(Duration::from_secs(1)), "60 s lease");
        let locker = Locker::builder(batching())
            .lease_duration(Duration::from_secs(3))
            .build()
            .unwrap();
        assert_eq!(window(locker), Some(Duration::from_millis(50)));
        let locker = Locker::builder(batching())
            .lease_duration(Duration::from_secs(600))
            .build()
            .unwrap();
        assert_eq!(window(locker), Some(Duration::from_secs(1)), "at most 1 s");
        let locker = Locker::builder(batching())
            .refresh_batch_window(Duration::ZERO)
            .build()
            .unwrap();
        assert_eq!(window(locker), None, "zero turns batching off");
    }

    #[test]
    fn batch_window_must_be_shorter_than_the_refresh_interval() {
        let err = Locker::builder(MemoryBackend::new())
            .lease_duration(Duration::from_secs(30))
            .refresh_batch_window(Duration::from_secs(10))
            .build()
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidInput {
                    field: "refresh_batch_window",
                    ..
                }
            ),
            "{err}"
        );
    }
}
