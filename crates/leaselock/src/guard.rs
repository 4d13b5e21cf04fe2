//! The guard of a held lock, its lost-lease signal and its refresh daemon.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::backend::{LockBackend, Wakeup};
use crate::error::{Error, Result};
use crate::guardian::{Guardian, Slot};
use crate::hooks::{Hooks, Operation};
use crate::refresher::Refresher;
use crate::types::{FencingToken, Lease, LockKey, OwnerId};

/// Fires once when a held lease is lost. Clone it freely; await [`LostSignal::wait`] in a
/// `tokio::select!` beside the work, or poll [`LostSignal::is_lost`] between steps.
///
/// It fires when the refresh daemon's refresh finds the lease gone, when the local deadline (the
/// lease duration less a tenth of it, at most a second, measured from before the last successful
/// acquire or refresh was sent) passes
/// without a successful refresh (even if the database is unreachable), when a session backend sees
/// its connection end, or when [`LockContext::ensure_held`] finds the lease gone. It never fires
/// after a normal release.
#[derive(Clone)]
pub struct LostSignal {
    state: Arc<LostState>,
}

/// The reason, set once, and the waiters to wake then. (A set-once cell and a `Notify` cost less
/// per guard than a watch channel, whose sender wakes its receivers when it is dropped.)
#[derive(Default)]
struct LostState {
    reason: OnceLock<Arc<str>>,
    notify: Notify,
}

impl fmt::Debug for LostSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LostSignal")
            .field("lost", &self.reason())
            .finish()
    }
}

impl LostSignal {
    /// Whether the lease has been lost.
    pub fn is_lost(&self) -> bool {
        self.state.reason.get().is_some()
    }

    /// Why the lease was lost, once it has been.
    pub fn reason(&self) -> Option<String> {
        self.state.reason.get().map(|reason| reason.to_string())
    }

    /// Resolves with the reason when the lease is lost; never resolves if it is released
    /// normally.
    pub async fn wait(&self) -> String {
        loop {
            let notified = self.state.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a loss right after it still wakes this wait.
            notified.as_mut().enable();
            if let Some(reason) = self.state.reason.get() {
                return reason.to_string();
            }
            notified.await;
        }
    }

    /// A signal that has not fired; only its guard's `Held` can fire it, so a disabled locker's
    /// (which has none) never does.
    fn new() -> Self {
        Self {
            state: Arc::default(),
        }
    }

    /// Fires with `reason`; `false` when it had fired already.
    fn fire(&self, reason: &str) -> bool {
        let first = self.state.reason.set(Arc::from(reason)).is_ok();
        if first {
            self.state.notify.notify_waiters();
        }
        first
    }
}

/// State shared by a guard, its contexts and its refresh daemon.
pub(crate) struct Held {
    pub(crate) backend: Arc<dyn LockBackend>,
    pub(crate) hooks: Hooks,
    /// Where refreshes go when the backend batches them; `None`: straight to the backend.
    refresher: Option<Arc<Refresher>>,
    release_timeout: Duration,
    lease: Mutex<Lease>,
    lost: LostSignal,
    /// The local deadline after which the lease counts as lost without a successful refresh.
    deadline: Mutex<Option<Instant>>,
    released: AtomicBool,
}

impl Held {
    pub(crate) fn lease(&self) -> Lease {
        self.lease.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn deadline(&self) -> Option<Instant> {
        *self.deadline.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the lease lost (once), telling the hooks and the work. Does nothing once the lease
    /// has been released or handed over: a refresh daemon that was running on another thread
    /// when it was stopped can see the lease gone because of that very release.
    async fn mark_lost(&self, reason: &str) {
        if self.released.load(Ordering::SeqCst) {
            return;
        }
        if self.lost.fire(reason) {
            let lease = self.lease();
            tracing::warn!(key = %lease.key, token = %lease.token, reason, "lease lost");
            self.hooks
                .call("lease_lost", |h| h.lease_lost(&lease, reason))
                .await;
        }
    }

    fn is_lost(&self) -> bool {
        self.lost.is_lost()
    }
}

/// A cheap, clonable view of a held lock, handed to the work in [`crate::Locker::run`].
///
/// ```
/// use leaselock::{Locker, MemoryBackend};
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> leaselock::Result<()> {
/// let locker = Locker::builder(MemoryBackend::new()).build()?;
/// locker
///     .run("nightly-report", |lock| async move {
///         lock.ensure_held().await?; // before each write the work makes
///         println!("writing with fencing token {}", lock.token());
///         Ok::<_, leaselock::Error>(())
///     })
///     .await?
///     .expect("the default policy errors instead of returning None")?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct LockContext {
    key: LockKey,
    owner: OwnerId,
    token: FencingToken,
    held: Option<Arc<Held>>,
    lost: LostSignal,
}

impl fmt::Debug for LockContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockContext")
            .field("key", &self.key)
            .field("owner", &self.owner)
            .field("token", &self.token)
            .field("locked", &self.held.is_some())
            .field("lost", &self.lost.is_lost())
            .finish()
    }
}

impl LockContext {
    /// The key held.
    pub fn key(&self) -> &LockKey {
        &self.key
    }

    /// The owner holding it.
    pub fn owner(&self) -> &OwnerId {
        &self.owner
    }

    /// The fencing token of this acquisition. Zero when the locker is disabled (no lock held).
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// Whether a lock is really held: `false` when the locker is disabled.
    pub fn is_locked(&self) -> bool {
        self.held.is_some()
    }

    /// The current lease (its expiry moves with every refresh); `None` when disabled.
    pub fn lease(&self) -> Option<Lease> {
        self.held.as_ref().map(|h| h.lease())
    }

    /// The signal that fires when the lease is lost.
    pub fn lost(&self) -> &LostSignal {
        &self.lost
    }

    /// Whether the lease is known to be lost.
    pub fn is_lost(&self) -> bool {
        self.lost.is_lost()
    }

    /// Checks with the backend that the lock is still held (the lock guardian to call before each
    /// database access of the work). Fails with [`Error::Lost`] (and fires the lost signal) when it
    /// is not, or when the local deadline passes before the backend answers: a check never
    /// outlasts the lease it checks, even when the database cannot be reached. (A lock without
    /// expiry has no deadline; its check waits for the backend's own timeouts.)
    pub async fn ensure_held(&self) -> Result<()> {
        let Some(held) = &self.held else {
            return Ok(());
        };
        if let Some(reason) = self.lost.reason() {
            return Err(Error::lost(&self.key, reason));
        }
        if held.deadline().is_some_and(|d| Instant::now() >= d) {
            held.mark_lost(DEADLINE_REASON).await;
            return Err(Error::lost(&self.key, DEADLINE_REASON));
        }
        let lease = held.lease();
        // The check races the guard's own knowledge: a backend that cannot answer (a
        // partition, a hung connection) must not hold the work past the local deadline, and a
        // loss the daemon or the session watch finds meanwhile ends the check at once.
        let verify = held.backend.verify(&lease);
        tokio::pin!(verify);
        let outcome = loop {
            let deadline = held.deadline();
            tokio::select! {
                outcome = &mut verify => break outcome,
                reason = self.lost.wait() => return Err(Error::lost(&self.key, reason)),
                _ = sleep_until_opt(deadline) => {
                    // A refresh may have moved the deadline while the check ran.
                    if held.deadline().is_some_and(|d| Instant::now() >= d) {
                        held.mark_lost(DEADLINE_REASON).await;
                        return Err(Error::lost(&self.key, DEADLINE_REASON));
                    }
                }
            }
        };
        match outcome {
            Ok(true) => Ok(()),
            Ok(false) => {
                let reason = "the backend no longer has this lease";
                held.mark_lost(reason).await;
                Err(Error::lost(&self.key, reason))
            }
            Err(error) => {
                held.hooks
                    .call("error", |h| {
                        h.error(Operation::Verify, Some(&self.key), &error)
                    })
                    .await;
                Err(error)
            }
        }
    }
}

/// A held lock. Release it with [`LockGuard::release`]; dropping it releases in the background on
/// a best-effort basis (a drop cannot wait or report errors, so prefer an explicit release, or
/// [`crate::Locker::run`], which always releases).
///
/// Dereferences to its [`LockContext`]: `guard.token()`, `guard.lost()`, `guard.ensure_held()`.
pub struct LockGuard {
    ctx: LockContext,
    /// Its daemon's place in the locker's guardian (see `guardian.rs`): waiting to start, or
    /// running as a task.
    daemon: Option<Arc<Slot>>,
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard").field("ctx", &self.ctx).finish()
    }
}

impl std::ops::Deref for LockGuard {
    type Target = LockContext;
    fn deref(&self) -> &LockContext {
        &self.ctx
    }
}

/// How a guard keeps its lease alive and lets it go.
pub(crate) struct GuardConfig {
    /// Refresh every this often; `None`: no refreshing, only watch the deadline and the session.
    pub(crate) refresh_every: Option<Duration>,
    /// Verify ownership instead of refreshing (a lock without expiry on a lease backend).
    pub(crate) verify_only: bool,
    /// How long a release retries transient errors.
    pub(crate) release_timeout: Duration,
    /// For a lease without expiry (a session lock) that is refreshed: how long it may go
    /// without a successful refresh (a liveness check of its session) before the holder counts
    /// it lost. A partitioned session may be ended by the server at any time, so the holder must
    /// not trust it for ever. The locker's lease duration.
    pub(crate) session_bound: Duration,
    /// The locker's batching refresher, for a lease it may refresh in batches.
    pub(crate) refresher: Option<Arc<Refresher>>,
}

impl LockGuard {
    pub(crate) fn disabled(key: LockKey, owner: OwnerId) -> Self {
        Self {
            ctx: LockContext {
                key,
                owner,
                token: FencingToken::new(0),
                held: None,
                lost: LostSignal::new(),
            },
            daemon: None,
        }
    }

    /// Starts guarding `lease`, acquired with a request sent at `sent_at`. Its daemon waits in
    /// `guardian` until it has work to do.
    pub(crate) fn start(
        backend: Arc<dyn LockBackend>,
        hooks: Hooks,
        lease: Lease,
        sent_at: Instant,
        config: GuardConfig,
        guardian: &Guardian,
    ) -> Self {
        // A session lock's liveness checks are its refreshes: bound them like a lease's.
        // A lock without expiry on a lease backend cannot lapse while its holder is cut off, so
        // it has no bound: only a force release (found by verifying) ends it.
        let bound = match config.verify_only {
            true => None,
            false => lease
                .ttl
                .or_else(|| config.refresh_every.map(|_| config.session_bound)),
        };
        let deadline = bound.map(|bound| local_deadline(sent_at, bound));
        let lost = LostSignal::new();
        let lost_watch = backend.watch_lost(&lease);
        let held = Arc::new(Held {
            backend,
            hooks,
            refresher: config.refresher,
            release_timeout: config.release_timeout,
            lease: Mutex::new(lease.clone()),
            lost: lost.clone(),
            deadline: Mutex::new(deadline),
            released: AtomicBool::new(false),
        });
        let needs_daemon =
            deadline.is_some() || lost_watch.is_some() || config.refresh_every.is_some();
        let handle = needs_daemon.then(|| {
            // The refresh interval runs from the acquisition, as the deadline does.
            let first_refresh = config.refresh_every.map(|every| sent_at + every);
            let due = match (first_refresh, deadline) {
                (Some(refresh), Some(deadline)) => Some(refresh.min(deadline)),
                (refresh, deadline) => refresh.or(deadline),
            };
            let start = DaemonStart {
                held: Arc::clone(&held),
                refresh_every: config.refresh_every,
                first_refresh,
                bound,
                verify_only: config.verify_only,
            };
            guardian.register(start, due, lost_watch)
        });
        Self {
            ctx: LockContext {
                key: lease.key.clone(),
                owner: lease.owner.clone(),
                token: lease.token,
                held: Some(held),
                lost,
            },
            daemon: handle,
        }
    }

    /// A clonable view of this lock for the work.
    pub fn context(&self) -> LockContext {
        self.ctx.clone()
    }

    /// Stops refreshing and releases the lock. Returns whether it was still held (`false` when the
    /// lease had been lost; then nothing is changed). A disabled locker's guard returns `true`.
    pub async fn release(mut self) -> Result<bool> {
        self.stop_daemon();
        let Some(held) = self.ctx.held.clone() else {
            return Ok(true);
        };
        held.released.store(true, Ordering::SeqCst);
        release_held(&held).await
    }

    /// Stops refreshing and gives the lease up without releasing it, to hand it to another
    /// process (leases serialize with serde), which takes it over with
    /// [`crate::Locker::adopt`]. `None` for a disabled locker's guard.
    pub fn hand_over(mut self) -> Option<Lease> {
        self.stop_daemon();
        let held = self.ctx.held.clone()?;
        held.released.store(true, Ordering::SeqCst);
        Some(held.lease())
    }

    fn stop_daemon(&mut self) {
        if let Some(daemon) = self.daemon.take() {
            daemon.stop();
        }
    }
}

/// Releases, retrying transient errors with backoff for up to the release timeout.
async fn release_with_retries(held: &Held, lease: &Lease) -> Result<bool> {
    let started = Instant::now();
    let deadline = started + held.release_timeout;
    let mut backoff = Duration::from_millis(50);
    loop {
        let attempt = held.backend.release(lease);
        let outcome = if held.release_timeout.is_zero() {
            attempt.await
        } else {
            // A database that never answers must not hold the caller past the release timeout.
            tokio::time::timeout_at(deadline, attempt)
                .await
                .unwrap_or_else(|_| {
                    Err(Error::transient(
                        held.backend.capabilities().backend,
                        format!(
                            "the release got no answer within the release timeout ({:?})",
                            held.release_timeout
                        ),
                    ))
                })
        };
        match outcome {
            Err(error)
                if error.is_retryable() && started.elapsed() + backoff < held.release_timeout =>
            {
                tracing::debug!(key = %lease.key, %error, ?backoff, "release failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            outcome => return outcome,
        }
    }
}

async fn release_held(held: &Held) -> Result<bool> {
    let lease = held.lease();
    held.hooks
        .call("before_release", |h| h.before_release(&lease))
        .await;
    match release_with_retries(held, &lease).await {
        Ok(was_held) => {
            if was_held {
                tracing::debug!(key = %lease.key, token = %lease.token, "lock released");
            } else {
                tracing::warn!(key = %lease.key, token = %lease.token, "released a lease that was no longer held");
            }
            held.hooks
                .call("released", |h| h.released(&lease, was_held))
                .await;
            Ok(was_held)
        }
        Err(error) => {
            if lease.ttl.is_some() {
                tracing::error!(key = %lease.key, token = %lease.token, %error, "release failed; the lock stays held until its lease expires (or until force-released)");
            } else {
                tracing::error!(key = %lease.key, token = %lease.token, %error, "release failed; the lock has no expiry and stays held until force-released (or its session ends)");
            }
            held.hooks
                .call("error", |h| {
                    h.error(Operation::Release, Some(&lease.key), &error)
                })
                .await;
            Err(error)
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.stop_daemon();
        let Some(held) = self.ctx.held.take() else {
            return;
        };
        if held.released.swap(true, Ordering::SeqCst) || held.is_lost() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                tracing::debug!(key = %self.ctx.key, "lock guard dropped without release; releasing in the background");
                runtime.spawn(async move {
                    let _ = release_held(&held).await;
                });
            }
            Err(_) => tracing::warn!(
                key = %self.ctx.key,
                "lock guard dropped outside a runtime; the lease will expire on its own"
            ),
        }
    }
}

/// When the holder stops trusting a lease sent for at `sent_at`: a tenth of the lease (at most a
/// second) before the database's expiry can come. The server's lease runs from the request's
/// arrival, so `sent_at + lease` is already no later than the server's expiry; the margin makes
/// the lost signal reach the work before another owner's acquisition can, even when this
/// process is slow to run its timer.
pub(crate) fn local_deadline(sent_at: Instant, lease: Duration) -> Instant {
    sent_at + lease - (lease / 10).min(Duration::from_secs(1))
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

const DEADLINE_REASON: &str = "the lease duration passed without a successful refresh";
const SESSION_REASON: &str = "the backend reported the lease gone (session ended)";

/// What a guard's daemon needs, kept in the guardian until the daemon starts.
pub(crate) struct DaemonStart {
    held: Arc<Held>,
    refresh_every: Option<Duration>,
    /// When the first refresh is due (the interval after the acquisition).
    first_refresh: Option<Instant>,
    bound: Option<Duration>,
    verify_only: bool,
}

impl DaemonStart {
    /// Runs the daemon as a task of its own, watching `lost_watch`.
    pub(crate) fn spawn(self, lost_watch: Wakeup) -> tokio::task::AbortHandle {
        tokio::spawn(run_daemon(self, lost_watch)).abort_handle()
    }
}

/// Keeps a lease alive until aborted or lost. With `verify_only` (a lock without expiry), checks
/// ownership instead of refreshing.
async fn run_daemon(start: DaemonStart, mut lost_watch: Wakeup) {
    let DaemonStart {
        held,
        refresh_every,
        first_refresh,
        bound,
        verify_only,
    } = start;
    let mut next_refresh = first_refresh;
    loop {
        let deadline = held.deadline();
        tokio::select! {
            _ = &mut lost_watch => {
                held.mark_lost(SESSION_REASON).await;
                return;
            }
            _ = sleep_until_opt(deadline) => {
                held.mark_lost(DEADLINE_REASON).await;
                return;
            }
            _ = sleep_until_opt(next_refresh) => {}
        }
        let Some(every) = refresh_every else { continue };
        let lease = held.lease();
        let sent_at = Instant::now();
        let check = async {
            if !verify_only {
                return match &held.refresher {
                    Some(refresher) => refresher.refresh(lease.clone()).await,
                    None => held.backend.refresh(&lease).await,
                };
            }
            match held.backend.verify(&lease).await {
                Ok(true) => Ok(lease.clone()),
                Ok(false) => Err(Error::lost(
                    &lease.key,
                    "the backend no longer has this lock",
                )),
                Err(error) => Err(error),
            }
        };
        let outcome = tokio::select! {
            outcome = check => outcome,
            _ = &mut lost_watch => {
                held.mark_lost(SESSION_REASON).await;
                return;
            }
            _ = sleep_until_opt(deadline) => {
                held.mark_lost(DEADLINE_REASON).await;
                return;
            }
        };
        match outcome {
            Ok(fresh) => {
                tracing::trace!(key = %fresh.key, "lease refreshed");
                *held.deadline.lock().unwrap_or_else(|p| p.into_inner()) =
                    fresh.ttl.or(bound).map(|ttl| local_deadline(sent_at, ttl));
                *held.lease.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
                next_refresh = Some(Instant::now() + every);
            }
            Err(Error::Lost { reason, .. }) => {
                held.mark_lost(&reason).await;
                return;
            }
            Err(error) => {
                // Transient or not, the deadline decides: keep trying a few times before it.
                let retry_in = (every / 4).max(Duration::from_millis(50));
                tracing::warn!(key = %lease.key, %error, ?retry_in, "lease refresh (or check) failed; retrying");
                held.hooks
                    .call("error", |h| {
                        h.error(Operation::Refresh, Some(&lease.key), &error)
                    })
                    .await;
                next_refresh = Some(Instant::now() + retry_in);
            }
        }
    }
}

/// Runs `work`, reporting a panic as `Err(payload)`.
pub(crate) async fn catch_panic<T>(
    work: impl Future<Output = T>,
) -> std::result::Result<T, Box<dyn std::any::Any + Send>> {
    crate::unwind::CatchUnwind::new(std::panic::AssertUnwindSafe(work)).await
}
