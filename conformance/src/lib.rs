//! The shared conformance suite every leaselock backend runs against a real server.
//!
//! The cases are plain async functions over [`Target`] in [`cases`]; [`conformance_tests!`] turns
//! them into one `#[test]` each. A backend crate's `tests/conformance.rs` implements [`Target`] and
//! invokes the macro with a setup function:
//!
//! ```no_run
//! use std::sync::Arc;
//! use leaselock::{LockBackend, Lease, MemoryBackend, Result};
//!
//! struct Memory(MemoryBackend);
//!
//! #[leaselock::async_trait]
//! impl leaselock_conformance::Target for Memory {
//!     async fn backend(&self) -> Result<Arc<dyn LockBackend>> {
//!         Ok(Arc::new(self.0.clone()))
//!     }
//!     async fn backend_in(&self, namespace: &str) -> Result<Arc<dyn LockBackend>> {
//!         leaselock::Namespace::new(namespace)?;
//!         Ok(Arc::new(MemoryBackend::new_uninitialized()))
//!     }
//!     async fn kill_session(&self, _lease: &Lease) -> Result<()> {
//!         unreachable!("memory locks are leases, not sessions")
//!     }
//! }
//!
//! async fn setup() -> Option<Memory> {
//!     Some(Memory(MemoryBackend::new()))
//! }
//!
//! leaselock_conformance::conformance_tests!(setup);
//! # fn main() {}
//! ```
//!
//! Every case uses fresh random keys (and namespaces), so the cases run in parallel against one
//! server. A setup function for a real server should use [`server_url`], which skips loudly when
//! the server's variable is unset, and fails under `CI=true`, where every backend is required.
//!
//! Fault cases (killed, paused and partitioned holders, server restarts, skewed clocks, a soak
//! across processes) live in [`faults`], with their own trait [`faults::FaultTarget`] and macro
//! [`fault_tests!`]; [`proxy`] is the TCP proxy that makes partitions and [`servers`] starts
//! separate database servers a test may restart.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use leaselock::{Lease, LockBackend, Result};

pub mod cases;
pub mod faults;
pub mod proxy;
pub mod servers;
mod support;

pub use support::{fresh_key, fresh_namespace};

/// What a backend's test setup supplies to the suite.
#[leaselock::async_trait]
pub trait Target: Send + Sync + 'static {
    /// A new backend instance (its own connection) over the suite's shared storage, which is
    /// already initialized. Separate calls must give separate connections: the contention cases
    /// use several instances as stand-ins for several processes.
    async fn backend(&self) -> Result<Arc<dyn LockBackend>>;

    /// A new backend instance over the namespace (table, collection, ...) named `namespace`,
    /// which the suite has not initialized. Invalid names must fail with
    /// `Error::InvalidInput` before anything touches the server.
    async fn backend_in(&self, namespace: &str) -> Result<Arc<dyn LockBackend>>;

    /// Ends, from outside, the database session that holds `lease`, the way an operator would
    /// (`pg_terminate_backend`, `KILL CONNECTION`). Called only for session-lock backends.
    async fn kill_session(&self, lease: &Lease) -> Result<()>;
}

/// A boxed case future.
pub type CaseFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How long one case may take before it counts as hung.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(180);

/// Runs one case on a fresh multi-threaded runtime (used by [`conformance_tests!`]).
#[doc(hidden)]
pub fn run_case<T, S, SF>(name: &str, setup: S, case: fn(Arc<dyn Target>) -> CaseFuture)
where
    T: Target,
    S: FnOnce() -> SF,
    SF: Future<Output = Option<T>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("build a tokio runtime");
    runtime.block_on(async move {
        let Some(target) = setup().await else {
            return;
        };
        let target: Arc<dyn Target> = Arc::new(target);
        if tokio::time::timeout(CASE_TIMEOUT, case(target))
            .await
            .is_err()
        {
            panic!("conformance case `{name}` hung for {CASE_TIMEOUT:?}");
        }
    });
}

/// Reads the URL of a real server from the environment variable `var`.
///
/// When it is unset: under `CI=true` this panics (in CI every backend is required); elsewhere it
/// prints a loud message naming the variable and returns `None`, so the caller skips.
///
/// ```
/// // Unset, outside CI: skipped with a message on stderr.
/// if std::env::var("CI").is_err() {
///     assert_eq!(leaselock_conformance::server_url("LEASELOCK_DOCTEST_UNSET_URL"), None);
/// }
/// ```
pub fn server_url(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.trim().is_empty() => Some(url),
        _ => {
            if is_ci() {
                panic!(
                    "{var} is not set, and under CI=true every backend's server is required; \
                     `cargo xtask test` starts the servers and sets it"
                );
            }
            eprintln!(
                "\n#####  SKIPPED: {var} is not set, so this test did not run against a real \
                 server.  Set {var}, or run `cargo xtask test`, which starts the servers.  #####\n"
            );
            None
        }
    }
}

/// Whether we run under CI (`CI=true` or `CI=1`).
pub fn is_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

/// Expands to one `#[test]` per conformance case, each calling `$setup` (an `async fn() ->
/// Option<impl Target>`; `None` skips).
#[macro_export]
macro_rules! conformance_tests {
    ($setup:path) => {
        $crate::__conformance_cases!(
            $setup;
            init_storage_is_idempotent,
            init_storage_concurrently,
            check_storage_before_and_after_init,
            acquire_then_release,
            held_lock_reports_holder,
            locks_are_not_reentrant,
            release_by_non_owner_changes_nothing,
            release_twice,
            status_free_and_held,
            list_shows_held_locks,
            list_with_expired_shows_stale_leases,
            expiry_and_takeover,
            status_shows_expired,
            refresh_extends_lease,
            refresh_after_loss_reports_lost,
            refresh_many_answers_each_lease,
            verify_after_loss_is_false,
            release_after_loss_keeps_new_holder,
            force_release_removes_holder,
            force_release_of_free_key,
            release_expired_clears_only_expired,
            independent_keys,
            fencing_increases_across_releases,
            fencing_increases_across_takeover,
            fencing_survives_force_release_and_cleanup,
            fencing_survives_new_instances,
            mutual_exclusion_across_tasks,
            mutual_exclusion_across_instances,
            rejects_bad_keys,
            long_and_unicode_keys_are_distinct,
            rejects_bad_identifiers,
            rejects_bad_durations,
            killed_session_frees_lock_and_tells_holder,
            guard_signals_loss_after_force_release,
            lost_signal_fires_at_local_deadline,
            run_releases_on_error_and_panic,
            run_reports_lost_lease,
            waiter_acquires_after_release,
            unavailable_returns_none_when_configured,
            lease_hand_over,
            lock_without_expiry_does_not_expire,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    ($setup:path; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::run_case(stringify!($case), $setup, |target| {
                    ::std::boxed::Box::pin($crate::cases::$case(target))
                });
            }
        )*
    };
}
