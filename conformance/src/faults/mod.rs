//! Fault cases: crashed, paused and partitioned holders, server restarts, skewed clocks and a
//! soak across processes, checking that nothing is ever granted twice.
//!
//! The cases are plain async functions over [`Faults`] (in [`cases`]);
//! [`fault_tests!`](crate::fault_tests!) turns them into one `#[test]` each. A backend crate's
//! `tests/faults.rs` implements [`FaultTarget`], which supplies the means (a URL that holder
//! processes open with the crate's `from_url`, the server's address for a partitioning
//! [`crate::proxy::Proxy`], a separate server the test may restart), and invokes the macro with a
//! setup function:
//!
//! ```no_run
//! use std::net::SocketAddr;
//! use std::sync::Arc;
//! use leaselock::{LockBackend, Result};
//! use leaselock_conformance::faults::FaultTarget;
//! use leaselock_conformance::servers::{self, ScratchServer};
//!
//! struct Pg {
//!     url: String,
//! }
//!
//! #[leaselock::async_trait]
//! impl FaultTarget for Pg {
//!     fn url(&self) -> String {
//!         self.url.clone()
//!     }
//!     async fn connect(&self, url: &str) -> Result<Arc<dyn LockBackend>> {
//!         # let _ = url; unimplemented!() // leaselock_postgres::from_url(url).await
//!     }
//!     fn server_addr(&self, _url: &str) -> Option<SocketAddr> {
//!         Some("127.0.0.1:5432".parse().unwrap())
//!     }
//!     async fn start_server(&self) -> Option<ScratchServer> {
//!         servers::postgres().await
//!     }
//! }
//!
//! async fn setup() -> Option<Pg> {
//!     let url = leaselock_conformance::server_url("LEASELOCK_POSTGRES_URL")?;
//!     Some(Pg { url })
//! }
//!
//! leaselock_conformance::fault_tests!(setup);
//! # fn main() {}
//! ```
//!
//! Holder processes are the test binary itself, run again with the hidden test `fault_child`
//! that the macro adds (the pattern of `leaselock-sqlite`'s `tests/processes.rs`). Cases that
//! need a means a target lacks (no network for SQLite, no restartable server) say so on stderr
//! and pass; those that need a program that is missing (`faketime`) skip loudly, and fail under
//! `CI=true`.
//!
//! Figures (recovery times, counts) are printed on stderr as `leaselock-fault: …` lines and, when
//! `LEASELOCK_FAULT_REPORT` names a file, appended to it; `cargo xtask chaos` collects them.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use leaselock::{LockBackend, Result};

use crate::proxy::Proxy;
use crate::servers::ScratchServer;

pub mod cases;
mod child;

pub use child::{run_child, HolderProcess};

/// What a backend's fault-test setup supplies to the fault cases.
#[leaselock::async_trait]
pub trait FaultTarget: Send + Sync + 'static {
    /// The URL of the shared test server (or file), in the syntax of the backend crate's
    /// `from_url`. Holder processes receive it (or a variant through a proxy, or of a scratch
    /// server) and open it with [`FaultTarget::connect`].
    fn url(&self) -> String;

    /// Opens a backend for `url`: the crate's `from_url`, plus whatever settings the tests need
    /// (shorter timeouts, say). Called in the test process and in holder processes; each call
    /// makes a new instance with its own connections. Storage is already initialized for
    /// [`FaultTarget::url`]; the cases initialize it for other URLs.
    async fn connect(&self, url: &str) -> Result<Arc<dyn LockBackend>>;

    /// The address of the server `url` reaches, for a proxy to forward to. `None` when the
    /// backend has no network (an embedded database): the partition case then does not apply.
    fn server_addr(&self, url: &str) -> Option<SocketAddr>;

    /// `url` changed to reach the server at `addr` instead (a proxy in front of it). The default
    /// replaces the text of [`FaultTarget::server_addr`] in the URL.
    fn url_via(&self, url: &str, addr: SocketAddr) -> String {
        let server = self
            .server_addr(url)
            .expect("url_via needs a server address");
        assert!(
            url.contains(&server.to_string()),
            "the default url_via needs `{server}` written in the URL; override url_via"
        );
        url.replacen(&server.to_string(), &addr.to_string(), 1)
    }

    /// Starts a separate server of the test's own (never the shared one) for the restart case,
    /// with its URL set in the crate's syntax (see [`crate::servers`]). `None`: the case does
    /// not apply (or skips loudly when the server's programs are missing).
    async fn start_server(&self) -> Option<ScratchServer>;

    /// Whether the clock that decides expiry is the clock of each process that runs a statement
    /// (an embedded database such as SQLite reads the host's clock in-process). Skewing one
    /// process's clock then skews "the database clock" for that process alone, which cannot
    /// happen on one host, so the clock-skew case does not apply. Default: `false`.
    fn clock_is_per_process(&self) -> bool {
        false
    }

    /// A backend through a new proxy in front of the shared server, and the proxy (keep it
    /// alive; switch it with [`Proxy::set`]). `None` without a network.
    async fn proxied_backend(&self) -> Result<Option<(Arc<dyn LockBackend>, Proxy)>> {
        let url = self.url();
        let Some(server) = self.server_addr(&url) else {
            return Ok(None);
        };
        let proxy = Proxy::start(server)
            .await
            .map_err(|e| leaselock::Error::transient("fault-proxy", e))?;
        let backend = self.connect(&self.url_via(&url, proxy.addr())).await?;
        Ok(Some((backend, proxy)))
    }
}

/// The first `IP:PORT` (or `localhost:PORT`) written in `url`: the server a URL such as
/// `postgres://u@127.0.0.1:5432/db` or `dynamodb://t?endpoint=http://127.0.0.1:8000` reaches.
/// A helper for [`FaultTarget::server_addr`].
///
/// ```
/// use leaselock_conformance::faults::addr_in_url;
/// assert_eq!(
///     addr_in_url("postgres://postgres@127.0.0.1:5432/db?x=1"),
///     Some("127.0.0.1:5432".parse().unwrap())
/// );
/// assert_eq!(
///     addr_in_url("dynamodb://t?endpoint=http://127.0.0.1:8000&region=us-east-1"),
///     Some("127.0.0.1:8000".parse().unwrap())
/// );
/// assert_eq!(addr_in_url("sqlite:///tmp/x.db"), None);
/// ```
pub fn addr_in_url(url: &str) -> Option<SocketAddr> {
    url.split(['/', '@', '?', '&', '=', ','])
        .filter_map(|part| match part.rsplit_once(':') {
            Some(("localhost", port)) => {
                Some(SocketAddr::from(([127, 0, 0, 1], port.parse().ok()?)))
            }
            _ => part.parse().ok(),
        })
        .next()
}

/// `url` with `name=value` added to its query.
///
/// ```
/// use leaselock_conformance::faults::with_param;
/// let url = with_param("postgres://h/db", "strategy", "table");
/// assert_eq!(url, "postgres://h/db?strategy=table");
/// assert_eq!(with_param("postgres://h/db?a=1", "b", "2"), "postgres://h/db?a=1&b=2");
/// ```
pub fn with_param(url: &str, name: &str, value: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{name}={value}")
}

/// What a fault case gets: the target and how to start holder processes.
#[derive(Clone)]
pub struct Faults {
    target: Arc<dyn FaultTarget>,
    child_test: String,
}

impl Faults {
    /// Wraps a target; `child_test` is the full name of the test that runs a holder process
    /// (`fault_child`, or `module::fault_child` when the macro was invoked in a module).
    pub fn new(target: Arc<dyn FaultTarget>, child_test: impl Into<String>) -> Self {
        Self {
            target,
            child_test: child_test.into(),
        }
    }

    /// The target.
    pub fn target(&self) -> &Arc<dyn FaultTarget> {
        &self.target
    }

    /// Starts a holder process running `role` against `url`, with its wall clock shifted by
    /// `skew` (a libfaketime offset such as `+30s`) if given.
    pub fn spawn(&self, role: child::Role, url: &str, skew: Option<&str>) -> HolderProcess {
        HolderProcess::spawn(&self.child_test, role, url, skew)
    }
}

pub use child::Role;

/// A boxed fault case future.
pub type FaultFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How long one fault case may take before it counts as hung (the soak's own limit grows with
/// its size).
pub const FAULT_CASE_TIMEOUT: Duration = Duration::from_secs(600);

/// The full test name of the holder-process entry for a macro invoked in `module_path`.
#[doc(hidden)]
pub fn child_test_name(module_path: &str) -> String {
    match module_path.split_once("::") {
        Some((_, inner)) => format!("{inner}::fault_child"),
        None => "fault_child".to_owned(),
    }
}

/// Runs one fault case on a fresh multi-threaded runtime (used by [`fault_tests!`]).
#[doc(hidden)]
pub fn run_case<T, S, SF>(name: &str, module_path: &str, setup: S, case: fn(Faults) -> FaultFuture)
where
    T: FaultTarget,
    S: FnOnce() -> SF,
    SF: Future<Output = Option<T>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("build a tokio runtime");
    let child_test = child_test_name(module_path);
    runtime.block_on(async move {
        let Some(target) = setup().await else {
            return;
        };
        let faults = Faults::new(Arc::new(target), child_test);
        let limit = FAULT_CASE_TIMEOUT + cases::soak_limit();
        if tokio::time::timeout(limit, case(faults)).await.is_err() {
            panic!("fault case `{name}` hung for {limit:?}");
        }
    });
}

/// Expands to one `#[test]` per fault case, each calling `$setup` (an `async fn() ->
/// Option<impl FaultTarget>`; `None` skips), plus the ignored test `fault_child` that holder
/// processes run.
///
/// `fault_tests!(setup)` runs every case. `fault_tests!(setup; case, case, …)` runs the cases
/// listed (their names in [`cases`]), each of which may carry attributes, such as
/// `#[ignore = "bug: …"] partitioned_holder_loses_first` for a case that finds a known bug.
#[macro_export]
macro_rules! fault_tests {
    ($setup:path) => {
        $crate::fault_tests!(
            $setup;
            holder_killed_frees_lock,
            holder_paused_loses_lease,
            partitioned_holder_is_told,
            partitioned_holder_loses_first,
            partitioned_holder_check_returns,
            server_restart_no_double_owner,
            clock_skew_no_double_grant,
            soak_across_processes,
        );
    };
    ($setup:path; $($(#[$meta:meta])* $case:ident),* $(,)?) => {
        $(
            $(#[$meta])*
            #[test]
            fn $case() {
                $crate::faults::run_case(stringify!($case), module_path!(), $setup, |faults| {
                    ::std::boxed::Box::pin($crate::faults::cases::$case(faults))
                });
            }
        )*

        #[test]
        #[ignore = "a holder process of the fault tests, started by them"]
        fn fault_child() {
            $crate::faults::run_child($setup);
        }
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn child_test_names() {
        assert_eq!(super::child_test_name("faults"), "fault_child");
        assert_eq!(
            super::child_test_name("faults::advisory"),
            "advisory::fault_child"
        );
    }
}
