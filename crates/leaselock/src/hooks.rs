//! Lifecycle hooks for metrics, alerts and audit logs.

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::{BoxError, Error};
use crate::types::{Lease, LockInfo, LockKey, OwnerId};
use crate::unwind::CatchUnwind;

/// What a hook returns; an error is logged and ignored.
pub type HookResult = Result<(), BoxError>;

/// The operation an [`LockHooks::error`] call is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Operation {
    /// Creating storage.
    InitStorage,
    /// The pre-flight check.
    CheckStorage,
    /// An acquisition attempt.
    Acquire,
    /// Ownership verification.
    Verify,
    /// A lease refresh.
    Refresh,
    /// A release.
    Release,
    /// A status read.
    Status,
    /// Listing locks.
    List,
    /// A force release.
    ForceRelease,
    /// Releasing expired locks.
    ReleaseExpired,
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operation::InitStorage => "init_storage",
            Operation::CheckStorage => "check_storage",
            Operation::Acquire => "acquire",
            Operation::Verify => "verify",
            Operation::Refresh => "refresh",
            Operation::Release => "release",
            Operation::Status => "status",
            Operation::List => "list",
            Operation::ForceRelease => "force_release",
            Operation::ReleaseExpired => "release_expired",
        })
    }
}

/// Called by the orchestrator at each step of a lock's life. Every method has an empty default,
/// so implement only what you need. A hook that fails (or panics) is logged with `tracing` and
/// ignored: hooks never change the outcome of a lock operation.
///
/// ```
/// use leaselock::{Lease, LockHooks, HookResult};
/// use std::sync::atomic::{AtomicU64, Ordering};
///
/// #[derive(Default)]
/// struct Metrics { acquired: AtomicU64 }
///
/// #[async_trait::async_trait]
/// impl LockHooks for Metrics {
///     async fn acquired(&self, _lease: &Lease) -> HookResult {
///         self.acquired.fetch_add(1, Ordering::Relaxed);
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait LockHooks: Send + Sync {
    /// Before the first acquisition attempt.
    async fn before_acquire(&self, key: &LockKey, owner: &OwnerId) -> HookResult {
        let _ = (key, owner);
        Ok(())
    }

    /// The lock was acquired (and verified, if two-phase acquisition is on).
    async fn acquired(&self, lease: &Lease) -> HookResult {
        let _ = lease;
        Ok(())
    }

    /// Acquisition gave up; `holder` is the current holder when known.
    async fn acquisition_failed(&self, key: &LockKey, holder: Option<&LockInfo>) -> HookResult {
        let _ = (key, holder);
        Ok(())
    }

    /// An attempt failed and another follows; `attempt` counts from 1.
    async fn retry(&self, key: &LockKey, attempt: u32, holder: Option<&LockInfo>) -> HookResult {
        let _ = (key, attempt, holder);
        Ok(())
    }

    /// Two-phase acquisition found the fresh lease not owned.
    async fn verification_failed(&self, lease: &Lease) -> HookResult {
        let _ = lease;
        Ok(())
    }

    /// Before a release.
    async fn before_release(&self, lease: &Lease) -> HookResult {
        let _ = lease;
        Ok(())
    }

    /// After a release; `was_held` tells whether the lease still held the key.
    async fn released(&self, lease: &Lease, was_held: bool) -> HookResult {
        let _ = (lease, was_held);
        Ok(())
    }

    /// A key was force-released; `previous` is the holder removed, if any.
    async fn force_released(&self, key: &LockKey, previous: Option<&LockInfo>) -> HookResult {
        let _ = (key, previous);
        Ok(())
    }

    /// An operation failed.
    async fn error(
        &self,
        operation: Operation,
        key: Option<&LockKey>,
        error: &Error,
    ) -> HookResult {
        let _ = (operation, key, error);
        Ok(())
    }

    /// A held lease was lost while the work ran.
    async fn lease_lost(&self, lease: &Lease, reason: &str) -> HookResult {
        let _ = (lease, reason);
        Ok(())
    }
}

/// Hooks that do nothing: the default.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHooks;

impl LockHooks for NoHooks {}

/// The hooks a locker and its guards call: none unless the builder was given some, so that a
/// locker without hooks spends nothing on them (each call of an `async_trait` method allocates
/// its future, even an empty default one).
#[derive(Clone, Default)]
pub(crate) struct Hooks(Option<Arc<dyn LockHooks>>);

impl Hooks {
    pub(crate) fn new(hooks: Arc<dyn LockHooks>) -> Self {
        Hooks(Some(hooks))
    }

    /// Calls one hook, if there are hooks: `call` makes its future. Logs and swallows the
    /// hook's error or panic.
    pub(crate) async fn call<'a, F, Fut>(&'a self, name: &'static str, call: F)
    where
        F: FnOnce(&'a dyn LockHooks) -> Fut,
        Fut: Future<Output = HookResult>,
    {
        if let Some(hooks) = &self.0 {
            call_hook(name, call(hooks.as_ref())).await;
        }
    }
}

/// Runs one hook call, logging and swallowing its error or panic.
async fn call_hook(name: &'static str, hook: impl Future<Output = HookResult>) {
    match CatchUnwind::new(AssertUnwindSafe(hook)).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(hook = name, %error, "lock hook failed; ignored"),
        Err(_) => tracing::error!(hook = name, "lock hook panicked; ignored"),
    }
}
