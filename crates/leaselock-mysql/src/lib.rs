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
