//! MySQL and MariaDB backends for [`leaselock`], over `mysql_async`.
//!
//! Two backends, chosen with [`Strategy`] (or `strategy=` in a URL):
//!
//! * [`MysqlGetLockBackend`] (`get_lock`, the default): session locks with `GET_LOCK(name, 0)`,
//!   one dedicated connection per held lock. Freed by the server the moment the holder's
//!   connection ends; a killed connection fires the guard's lost signal within about 250 ms; a
//!   release wakes waiters at once. Lock names follow [`lock_name()`].
//! * [`MysqlTableBackend`] (`table`): leases in a table, expiring by the server's clock
//!   (`UTC_TIMESTAMP(6)`), refreshed by the orchestrator. Survives reconnects, works through
//!   proxies that do not keep sessions.
//!
//! Both keep fencing tokens that strictly increase per key forever (rows are never deleted),
//! in a table whose name is configurable (validated with [`leaselock::Namespace`], quoted with
//! backticks). Storage initialization is `CREATE TABLE IF NOT EXISTS`, safe when many processes
//! run it at once. Values are always bound as parameters; passwords never appear in errors,
//! logs or `Debug` output.
//!
//! ```no_run
//! # async fn f() -> leaselock::Result<()> {
//! use leaselock::Locker;
//! let backend = leaselock_mysql::from_url("mysql://app:secret@127.0.0.1:3306/app").await?;
//! backend.init_storage().await?;
//! let locker = Locker::builder(backend).build()?;
//! locker.run("migrations", |_lock| async { /* migrate */ }).await?;
//! # Ok(()) }
//! ```
//!
//! # Connections
//!
//! Each backend instance has its own `mysql_async` pool. A `GET_LOCK` lock holds a connection
//! of its own until it is released. A table backend's lease operation, and a clean `GET_LOCK`
//! release, keep their connection for the backend's next operation, for up to a second, instead
//! of giving it back to the pool (which takes a returned connection in through a recycler task:
//! a wake-up of another task per statement). A kept connection that has ended on the server
//! meanwhile (killed, or the server restarted) is replaced from the pool, as the pool's own
//! check would have.
//!
//! The pool keeps at most one idle connection unless the application sets `pool_min`/`pool_max`
//! (mysql_async's own default keeps 10 per pool for ever, which a few dozen waiting processes
//! multiply into a full server): it opens more while operations run concurrently, and closes them
//! as they come back. A `GET_LOCK` waiter waits for the release on the connection its refused
//! attempt used, and all the waiters of one key in a backend share one waiting connection. So a
//! process that holds one lock or waits for one keeps **1 connection with the table backend** and
//! **2 with `GET_LOCK`** (the lock's own, or the waiting one, plus the one operations use). The
//! `leaselock` CLI measured with one holder and three waiters on one key: `GET_LOCK` 7
//! connections (was 16), table 4 (was 4). A server process that runs many lock operations at
//! once should raise `pool_min` to keep its connections.
//!
//! **A crowded server.** A waiter counts the server's connections (`Threads_connected`, at most
//! once a second). When a third of `max_connections` or more are in use, it keeps no connection
//! between its attempts, and a `GET_LOCK` waiter polls instead of parking a connection in
//! `GET_LOCK`, until a later count finds the server below that. The count is a heuristic
//! (processes that count at the same moment all see the same figure). 100 `leaselock run --wait`
//! processes started at once against the default `max_connections = 151` all finished, the work
//! once, with at most 39-62 connections open with `GET_LOCK` and 35-53 with the table (87-93
//! and 68 when the work took 3 s); before, they peaked at 151 (the limit) and 146.
//!
//! # MySQL 8 and MariaDB
//!
//! Tested against MariaDB 10.11; written for MySQL 8 too. The differences that matter here:
//! MySQL compares `GET_LOCK` names case-insensitively and rejects names over 64 characters,
//! MariaDB 10.11 compares them exactly and accepts longer ones: [`lock_name()`] produces
//! lower-case ASCII names of at most 64 characters, the same on both. `KILL` of another user's
//! connection needs `CONNECTION_ADMIN` on MySQL, `CONNECTION ADMIN` (or `SUPER`) on MariaDB.
//! Nothing uses syntax only one of them has (no `VALUES()` in `ON DUPLICATE KEY UPDATE`, which
//! MySQL 8 deprecates; no row aliases, which MariaDB lacks; no `RETURNING`).
//!
//! # Features
//!
//! * `tls`: TLS to the server (rustls, ring provider, bundled root certificates), configured
//!   with `mysql_async`'s URL parameters such as `require_ssl=true`. Off by default.
#![forbid(unsafe_code)]

mod backend;
mod config;
mod error;
mod lock_name;

use std::sync::Arc;

pub use backend::{MysqlGetLockBackend, MysqlTableBackend};
pub use config::{
    MysqlConfig, Strategy, DEFAULT_GET_LOCK_TABLE, DEFAULT_LIVENESS_INTERVAL, DEFAULT_PREFIX,
    DEFAULT_RELEASE_WAIT, DEFAULT_TABLE,
};
pub use lock_name::{lock_name, MAX_LOCK_NAME_LEN};
/// The driver, re-exported for [`MysqlConfig::new`] and its `OptsBuilder`.
pub use mysql_async;

/// A backend from a `mysql://` or `mariadb://` URL, as the `leaselock` command uses it.
///
/// Query parameters of leaselock: `strategy=get_lock|table` (default `get_lock`), `table=`,
/// `prefix=`; the others go to `mysql_async` (see [`MysqlConfig::from_url`]). Connects lazily:
/// a bad URL fails here with [`leaselock::Error::InvalidInput`] (field `url`, never showing the
/// password), an unreachable server at the first operation. Call within a Tokio runtime.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> leaselock::Result<()> {
/// let backend = leaselock_mysql::from_url("mysql://root@127.0.0.1:3306/app?strategy=table").await?;
/// assert_eq!(backend.capabilities().backend, "mysql-table");
/// let err = leaselock_mysql::from_url("mysql://root:pw@host/db?strategy=redis").await.unwrap_err();
/// assert!(matches!(err, leaselock::Error::InvalidInput { field: "url", .. }));
/// # Ok(()) }
/// ```
pub async fn from_url(url: &str) -> leaselock::Result<Arc<dyn leaselock::LockBackend>> {
    MysqlConfig::from_url(url)?.build()
}
