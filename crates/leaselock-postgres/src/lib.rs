//! PostgreSQL backends for [leaselock], over `tokio-postgres`.
//!
//! Two backends, chosen by the user:
//!
//! | | [`PgAdvisoryBackend`] | [`PgTableBackend`] |
//! |---|---|---|
//! | lock | session advisory lock, `pg_try_advisory_lock` | a row in a lease table |
//! | kind | [`LockKind::Session`](leaselock::LockKind::Session): held while its connection lives | [`LockKind::Lease`](leaselock::LockKind::Lease): expires unless refreshed |
//! | expiry clock | none | the server's, `now()` |
//! | fencing tokens | the holder table, in the same statement as the lock, under a durable reservation in the counter table | in the lease row |
//! | holder told when lost | at once, when its session ends | at its next refresh, or its local deadline |
//! | waiters woken on release | `LISTEN`/`NOTIFY` | `LISTEN`/`NOTIFY` |
//! | through PgBouncer (transaction pooling) | refused with a clear error | works (wake-ups fall back to polling) |
//! | storage | `leaselock_advisory` and `leaselock_advisory_holders` (configurable) | `leaselock_locks` (configurable) |
//!
//! The advisory backend is what goose, sqlx and Flyway use, done right: try-lock only (so work
//! running `CREATE INDEX CONCURRENTLY` under the lock cannot deadlock with waiters), one dedicated
//! session per held lock, a documented key ([`advisory_key`]), and a server process check that
//! refuses to run behind a transaction-pooling proxy. The table backend is what goose's table
//! locker does, with expiry decided by the server's clock.
//!
//! Both create their table with `init_storage` (idempotent, and safe when many processes run it at
//! once), validate and quote every identifier, bind every value as a parameter, and never show a
//! password in logs, errors or `Debug` output.
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> leaselock::Result<()> {
//! let backend = leaselock_postgres::from_url("postgres://app@localhost/app?strategy=table").await?;
//! let locker = leaselock::Locker::builder(backend).build()?;
//! locker.init_storage().await?;
//! let ran = locker.run("nightly-report", |lock| async move { lock.token() }).await?;
//! # Ok(()) }
//! ```
//!
//! # Connections
//!
//! A backend opens its connections on first use and keeps them, sized to its work:
//!
//! - **Statement connections** (every table operation; the advisory backend's storage check,
//!   status, list, cleanup and pooler probe): one, and another only when an operation starts
//!   while every open one has a statement in flight, up to [`PgConfig::connections`] (default
//!   4). A caller that runs one operation at a time keeps one.
//! - **LISTEN** for release wake-ups runs on a statement connection: no connection of its own.
//! - **Advisory sessions**: one per held lock, and the one a refused attempt used, kept idle for
//!   the next attempt (at most [`PgConfig::max_idle_sessions`]).
//!
//! So a process that holds one lock or waits for one keeps **1 connection with the table
//! backend** and **2 with the advisory backend** (the lock's session, and the statement
//! connection, which the pooler probe needs to be another connection). The `leaselock` CLI
//! measured with one holder and three waiters on one key: table 4 connections (was 20), advisory
//! 8 (was 20).
//!
//! **A crowded server.** A waiter counts the server's client connections (`pg_stat_activity`,
//! at most once a second). When a third of `max_connections` or more are in use, it does not
//! listen (it stops a LISTEN in place): it polls, at the wait policy's interval, and between
//! attempts it keeps no connection at all; an advisory holder then keeps only its lock's
//! session. It listens again once a later count finds the server below that. The count is a
//! heuristic (processes that count at the same moment all see the same figure), but a crowd of
//! waiting processes then costs the server about a connection per attempt in flight rather than
//! two per process: 100 `leaselock run --wait` processes started at once against a server with
//! `max_connections = 100` all finished, the work once, with at most 42-47 connections open
//! (advisory) and 24-48 (table); when the work took 3 s, 56-71 and 52-70 across runs, so the
//! count keeps a crowd well below the limit but does not promise a ceiling. Before, the
//! advisory herd filled the server and 17 to 59 of its processes failed with "too many
//! clients" after waiting 120 s. The price: an attempt per poll interval, each on a new connection, and a release
//! reaching the crowd at its next poll instead of at once.
//!
//! # Durability
//!
//! Acquisitions and refreshes commit as the server's `synchronous_commit` says; keep it on (the
//! default), so that they wait for the log flush: a fencing token or an expiry the server forgot
//! in a crash could be handed out twice. Releases do not wait (`synchronous_commit` is turned off
//! for the releasing transaction alone), which takes a log flush off every release and off every
//! handoff: a release a crashed server loses leaves a lease held until it expires, or names a
//! process that no longer exists (advisory), which reads as free. A lock without expiry on the
//! table backend is released durably, since a lost release would hold it for good. The next
//! durable commit writes every release before it.
//!
//! The advisory backend's lock lives in the server's memory, and so does most of its
//! bookkeeping: its holder table is `UNLOGGED`, so an acquisition waits for no flush either,
//! except the one in 1,000 per key that raises the key's token reservation in the durable counter
//! table. A crash, which ends every session lock, also empties the holder table, and tokens
//! continue above the reservation (see [`PgAdvisoryBackend`]).
//!
//! # TLS
//!
//! With the `tls` cargo feature (off by default), connections use rustls whenever the URL's
//! `sslmode` asks for it (`prefer`, the default, uses TLS when the server offers it; `require`
//! insists). Server certificates are verified against the platform's root certificates plus any
//! CA given with `sslrootcert=PATH` in the URL or `PgConfig::tls_root_certificates_pem`. For a
//! local server with a self-signed certificate, pass `sslmode=disable`.
#![forbid(unsafe_code)]

mod backend;
mod config;
mod error;

use std::sync::Arc;

pub use backend::advisory::PgAdvisoryBackend;
pub use backend::table::PgTableBackend;
pub use backend::{advisory_key, advisory_lock_parts};
pub use config::{
    PgConfig, Strategy, DEFAULT_CONNECTIONS, DEFAULT_COUNTER_TABLE, DEFAULT_PREFIX, DEFAULT_TABLE,
};

/// The backend a URL describes: `postgres://…` or `postgresql://…` with leaselock's own query
/// parameters `strategy=advisory|table` (default `advisory`), `table=`, `schema=`, `prefix=`
/// (advisory only) and, with the `tls` feature, `sslrootcert=` (see [`PgConfig::from_url`]).
/// Everything else goes to `tokio-postgres`. Does not connect: the first operation does.
///
/// A malformed URL is [`leaselock::Error::InvalidInput`] with field `url`; its message never
/// contains the password.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> leaselock::Result<()> {
/// let backend = leaselock_postgres::from_url("postgresql://app:pw@db/app?strategy=table&table=locks").await?;
/// assert_eq!(backend.capabilities().backend, "postgres-table");
/// let backend = leaselock_postgres::from_url("postgres://app:pw@db/app").await?;
/// assert_eq!(backend.capabilities().backend, "postgres-advisory");
/// let err = leaselock_postgres::from_url("postgres://app:pw@db/app?strategy=nope").await.unwrap_err();
/// assert!(matches!(err, leaselock::Error::InvalidInput { field: "url", .. }));
/// # Ok(()) }
/// ```
pub async fn from_url(url: &str) -> leaselock::Result<Arc<dyn leaselock::LockBackend>> {
    let config = PgConfig::from_url(url)?;
    backend(config)
}

/// The backend `config`'s [`Strategy`] names.
pub fn backend(config: PgConfig) -> leaselock::Result<Arc<dyn leaselock::LockBackend>> {
    Ok(match config.get_strategy() {
        Strategy::Advisory => Arc::new(PgAdvisoryBackend::new(config)?),
        Strategy::Table => Arc::new(PgTableBackend::new(config)?),
    })
}
